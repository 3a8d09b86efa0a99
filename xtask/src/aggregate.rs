//! `cargo xtask aggregate <exp dir>`: the tables of an experiment manifest's finished runs.
//!
//! `results.csv` has one line per run and test set (Dice and IoU, each the mean over the
//! set's cases). `results.md` has, per dataset and test set, one row per regime, backbone
//! and method: Dice and IoU mean ± sample std over seeds, and the difference to the
//! baseline of the same cell (`baseline` when the recipe has it, else its first method),
//! paired by seed, with the two-sided p-value of a paired t-test across seeds.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use genseg_pipelines::manifest::{self, RunSpec};
use statrs::distribution::{ContinuousCDF, StudentsT};

use crate::experiment::{mean_std, read_json};

/// One finished run scored on one test set.
#[derive(Debug)]
struct Score {
    dataset: String,
    test_set: String,
    regime: String,
    backbone: String,
    method: String,
    seed: u64,
    dice: f64,
    iou: f64,
}

fn metric(summary: &serde_json::Value, name: &str, path: &Path) -> Result<f64> {
    summary[name]["mean"]
        .as_f64()
        .with_context(|| format!("{} has no {name}.mean", path.display()))
}

fn scores(runs: &[RunSpec]) -> Result<Vec<Score>> {
    let mut all = Vec::new();
    for run in runs {
        for (set, path) in &run.scores {
            if !path.exists() {
                continue;
            }
            let summary = read_json(path)?;
            all.push(Score {
                dataset: run.dataset.clone(),
                test_set: set.clone(),
                regime: run.regime.clone(),
                backbone: run.backbone.clone(),
                method: run.method.clone(),
                seed: run.seed,
                dice: metric(&summary, "dice", path)?,
                iou: metric(&summary, "iou", path)?,
            });
        }
    }
    Ok(all)
}

/// Two-sided p-value of a paired t-test of `diffs` against 0; `None` below two pairs or
/// when every difference is the same.
pub(crate) fn paired_t_p(diffs: &[f64]) -> Option<f64> {
    let (mean, std) = mean_std(diffs);
    if diffs.len() < 2 || std == 0.0 {
        return None;
    }
    let n = diffs.len() as f64;
    let t = mean / (std / n.sqrt());
    let dist = StudentsT::new(0.0, 1.0, n - 1.0).ok()?;
    Some(2.0 * (1.0 - dist.cdf(t.abs())))
}

/// Writes results.csv and results.md for the manifest in `exp`.
pub fn run(exp: &Path) -> Result<()> {
    let runs = manifest::read(&exp.join("runs.jsonl"))?;
    let scores = scores(&runs)?;
    let mut csv = String::from("dataset,test_set,regime,backbone,method,seed,dice,iou\n");
    for s in &scores {
        writeln!(
            csv,
            "{},{},{},{},{},{},{:.4},{:.4}",
            s.dataset, s.test_set, s.regime, s.backbone, s.method, s.seed, s.dice, s.iou
        )?;
    }
    std::fs::write(exp.join("results.csv"), csv)?;
    let md = table(&runs, &scores)?;
    std::fs::write(exp.join("results.md"), &md)?;
    println!("{md}");
    Ok(())
}

fn table(runs: &[RunSpec], scores: &[Score]) -> Result<String> {
    // Methods in the recipe's order; the reference is `baseline`, else the first.
    let mut methods: Vec<&str> = Vec::new();
    for r in runs {
        if !methods.contains(&r.method.as_str()) {
            methods.push(&r.method);
        }
    }
    let reference = if methods.contains(&"baseline") {
        "baseline"
    } else {
        methods.first().copied().unwrap_or("baseline")
    };
    let finished = runs
        .iter()
        .filter(|r| r.scores.values().all(|p| p.exists()))
        .count();
    let mut md = format!(
        "{finished} of {} runs finished. Dice and IoU: each run's mean over the test set's \
         cases, then mean ± sample std over seeds; Δ: the paired difference to {reference} \
         on the same seeds (mean ± std), p: two-sided paired t-test across seeds.\n",
        runs.len()
    );
    // Per dataset its own test split first, then the out-of-domain sets.
    let mut cells: BTreeMap<(&str, bool, &str), Vec<&Score>> = BTreeMap::new();
    for s in scores {
        cells
            .entry((
                s.dataset.as_str(),
                s.test_set != "test",
                s.test_set.as_str(),
            ))
            .or_default()
            .push(s);
    }
    for ((dataset, _, set), group) in cells {
        write!(
            md,
            "\n### {dataset}, test set `{set}`\n\n| regime | backbone | method | seeds | Dice | \
             IoU | Δ Dice vs {reference} | p |\n|---|---|---|---|---|---|---|---|\n"
        )?;
        let mut rows: Vec<(&str, &str, &str)> = group
            .iter()
            .map(|s| (s.regime.as_str(), s.backbone.as_str(), s.method.as_str()))
            .collect();
        rows.sort_by_key(|&(regime, backbone, method)| {
            let n: usize = regime
                .split('+')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let m = methods.iter().position(|x| *x == method);
            (n, regime, backbone, m)
        });
        rows.dedup();
        for (regime, backbone, method) in rows {
            let mine: Vec<&&Score> = group
                .iter()
                .filter(|s| {
                    (s.regime.as_str(), s.backbone.as_str(), s.method.as_str())
                        == (regime, backbone, method)
                })
                .collect();
            let (d, ds) = mean_std(&mine.iter().map(|s| s.dice).collect::<Vec<_>>());
            let (i, is) = mean_std(&mine.iter().map(|s| s.iou).collect::<Vec<_>>());
            let diffs: Vec<f64> = mine
                .iter()
                .filter_map(|s| {
                    let base = group.iter().find(|b| {
                        (
                            b.regime.as_str(),
                            b.backbone.as_str(),
                            b.method.as_str(),
                            b.seed,
                        ) == (regime, backbone, reference, s.seed)
                    })?;
                    Some(s.dice - base.dice)
                })
                .collect();
            let (delta, p) = if method == reference || diffs.is_empty() {
                ("—".to_string(), "—".to_string())
            } else {
                let (m, sd) = mean_std(&diffs);
                (
                    format!("{:+.1} ± {:.1} pt", 100.0 * m, 100.0 * sd),
                    paired_t_p(&diffs).map_or("—".into(), |p| format!("{p:.3}")),
                )
            };
            let seeds: Vec<String> = mine.iter().map(|s| s.seed.to_string()).collect();
            writeln!(
                md,
                "| {regime} | {backbone} | {method} | {} | {d:.3} ± {ds:.3} | {i:.3} ± {is:.3} | \
                 {delta} | {p} |",
                seeds.join(",")
            )?;
        }
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_paired_t_test_matches_a_hand_computation() {
        // diffs 1, 2, 3: mean 2, sd 1, t = 2 / (1 / sqrt 3) = 3.4641, df 2:
        // p = 2 (1 - F(3.4641)) = 0.0742 (scipy.stats.ttest_1samp).
        let p = paired_t_p(&[1.0, 2.0, 3.0]).unwrap();
        assert!((p - 0.0742).abs() < 1e-4, "{p}");
        assert_eq!(paired_t_p(&[0.5]), None);
        assert_eq!(paired_t_p(&[0.5, 0.5]), None);
    }
}
