//! `cargo xtask aggregate <exp dir>`: the tables, plots and report of an experiment
//! manifest's finished runs.
//!
//! `results.csv` has one line per run and test set (Dice and IoU, each the mean over the
//! set's cases). `results.md` has, per dataset and test set, one row per regime, backbone
//! and method: Dice and IoU mean ± sample std over seeds, and the difference to the
//! baseline of the same cell (`baseline` when the recipe has it, else its first method),
//! paired by seed, with the two-sided p-value of a paired t-test across seeds. `plots/`
//! holds a bar chart per dataset and test set and, with several regimes, the
//! data-efficiency curve; `results.html` ([`crate::report`]) shows it all on one page.
//! These are the standard split's runs (fold 0). A recipe with `folds = K` adds
//! `folds.csv` and a results.md table of validation Dice averaged over each seed's K
//! validation folds (K × n_val labelled images), the signal to choose settings on.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use genseg_pipelines::manifest::{self, RunSpec};
use statrs::distribution::{ContinuousCDF, StudentsT};

use crate::experiment::{best_val_dice, loop_seconds, mean_dice, mean_std, read_json};

/// One finished run scored on one test set.
#[derive(Debug)]
struct Score {
    dataset: String,
    test_set: String,
    regime: String,
    n_train: usize,
    backbone: String,
    method: String,
    seed: u64,
    dice: f64,
    iou: f64,
    /// Training wall time of the run, generator pre-training included.
    seconds: Option<f64>,
}

/// The training loops' wall time of `run`: its own and its generator's pre-training
/// (`None` when a `metrics.jsonl` lacks it).
fn run_seconds(run: &RunSpec) -> Option<f64> {
    let own = loop_seconds(&run.dir).ok()?;
    let generator = crate::report::generator_dir(run).map(loop_seconds);
    match generator {
        Some(Ok(g)) => Some(own + g),
        Some(Err(_)) => None,
        None => Some(own),
    }
}

fn metric(summary: &serde_json::Value, name: &str, path: &Path) -> Result<f64> {
    summary[name]["mean"]
        .as_f64()
        .with_context(|| format!("{} has no {name}.mean", path.display()))
}

fn scores(runs: &[RunSpec]) -> Result<Vec<Score>> {
    let mut all = Vec::new();
    for run in runs.iter().filter(|r| r.fold == 0) {
        let seconds = run_seconds(run);
        for (set, path) in &run.scores {
            if !path.exists() {
                continue;
            }
            let summary = read_json(path)?;
            all.push(Score {
                dataset: run.dataset.clone(),
                test_set: set.clone(),
                regime: run.regime.clone(),
                n_train: run.n_train,
                backbone: run.backbone.clone(),
                method: run.method.clone(),
                seed: run.seed,
                dice: metric(&summary, "dice", path)?,
                iou: metric(&summary, "iou", path)?,
                seconds,
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

/// One regime x backbone x method of a [`Section`], over its seeds.
#[derive(Debug)]
pub(crate) struct Row {
    pub regime: String,
    pub n_train: usize,
    pub backbone: String,
    pub method: String,
    pub seeds: Vec<u64>,
    /// Dice mean and sample std over seeds.
    pub dice: (f64, f64),
    /// IoU mean and sample std over seeds.
    pub iou: (f64, f64),
    /// Paired Dice difference to the reference method (mean, std); `None` for the
    /// reference itself or without a shared seed.
    pub delta: Option<(f64, f64)>,
    /// Paired t-test p-value of `delta`.
    pub p: Option<f64>,
    /// Training wall time per run (generator pre-training included), mean over seeds.
    pub seconds: Option<f64>,
}

/// The rows of one dataset and test set.
#[derive(Debug)]
pub(crate) struct Section {
    pub dataset: String,
    pub test_set: String,
    pub rows: Vec<Row>,
}

/// Everything the tables, plots and report show.
#[derive(Debug)]
pub(crate) struct Tables {
    /// The method every Δ is taken against.
    pub reference: String,
    /// Methods in the recipe's order.
    pub methods: Vec<String>,
    pub finished: usize,
    pub total: usize,
    /// Training wall time summed over the finished runs.
    pub total_seconds: f64,
    /// Per dataset its own test split first, then the out-of-domain sets.
    pub sections: Vec<Section>,
}

/// Writes results.csv, results.md, plots/ and results.html for the manifest in `exp`.
pub fn run(exp: &Path) -> Result<()> {
    let runs = manifest::read(&exp.join("runs.jsonl"))?;
    let scores = scores(&runs)?;
    let mut csv =
        String::from("dataset,test_set,regime,backbone,method,seed,dice,iou,train_seconds\n");
    for s in &scores {
        writeln!(
            csv,
            "{},{},{},{},{},{},{:.4},{:.4},{}",
            s.dataset,
            s.test_set,
            s.regime,
            s.backbone,
            s.method,
            s.seed,
            s.dice,
            s.iou,
            s.seconds.map_or(String::new(), |t| format!("{t:.0}"))
        )?;
    }
    std::fs::write(exp.join("results.csv"), csv)?;
    let tables = tables(&runs, &scores);
    let plots = crate::report::plots(exp, &tables)?;
    let mut md = markdown(&tables, &plots)?;
    if let Some((folds_csv, folds_md)) = fold_validation(&runs, &tables.methods, &tables.reference)?
    {
        std::fs::write(exp.join("folds.csv"), folds_csv)?;
        md += &folds_md;
    }
    std::fs::write(exp.join("results.md"), &md)?;
    crate::report::html(exp, &runs, &tables, &plots)?;
    println!("{md}");
    println!("report: {}", exp.join("results.html").display());
    Ok(())
}

fn tables(runs: &[RunSpec], scores: &[Score]) -> Tables {
    // Methods in the recipe's order; the reference is `baseline`, else the first.
    let mut methods: Vec<String> = Vec::new();
    for r in runs {
        if !methods.contains(&r.method) {
            methods.push(r.method.clone());
        }
    }
    let reference = if methods.iter().any(|m| m == "baseline") {
        "baseline".to_string()
    } else {
        methods
            .first()
            .cloned()
            .unwrap_or_else(|| "baseline".into())
    };
    let finished: Vec<&RunSpec> = runs
        .iter()
        .filter(|r| r.scores.values().all(|p| p.exists()))
        .collect();
    let total_seconds = finished.iter().filter_map(|r| run_seconds(r)).sum();
    let finished = finished.len();
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
    let sections = cells
        .into_iter()
        .map(|((dataset, _, set), group)| {
            let mut keys: Vec<(usize, &str, &str, &str)> = group
                .iter()
                .map(|s| {
                    (
                        s.n_train,
                        s.regime.as_str(),
                        s.backbone.as_str(),
                        s.method.as_str(),
                    )
                })
                .collect();
            keys.sort_by_key(|&(n, regime, backbone, method)| {
                (
                    n,
                    regime,
                    backbone,
                    methods.iter().position(|x| x == method),
                )
            });
            keys.dedup();
            let rows = keys
                .into_iter()
                .map(|(n_train, regime, backbone, method)| {
                    let cell = |m: &str| -> Vec<&&Score> {
                        group
                            .iter()
                            .filter(|s| {
                                (s.regime.as_str(), s.backbone.as_str(), s.method.as_str())
                                    == (regime, backbone, m)
                            })
                            .collect()
                    };
                    let mine = cell(method);
                    let base = cell(&reference);
                    let diffs: Vec<f64> = mine
                        .iter()
                        .filter_map(|s| {
                            let b = base.iter().find(|b| b.seed == s.seed)?;
                            Some(s.dice - b.dice)
                        })
                        .collect();
                    let (delta, p) = if method == reference || diffs.is_empty() {
                        (None, None)
                    } else {
                        (Some(mean_std(&diffs)), paired_t_p(&diffs))
                    };
                    let times: Option<Vec<f64>> = mine.iter().map(|s| s.seconds).collect();
                    Row {
                        seconds: times.map(|t| mean_std(&t).0),
                        regime: regime.into(),
                        n_train,
                        backbone: backbone.into(),
                        method: method.into(),
                        seeds: mine.iter().map(|s| s.seed).collect(),
                        dice: mean_std(&mine.iter().map(|s| s.dice).collect::<Vec<_>>()),
                        iou: mean_std(&mine.iter().map(|s| s.iou).collect::<Vec<_>>()),
                        delta,
                        p,
                    }
                })
                .collect();
            Section {
                dataset: dataset.into(),
                test_set: set.into(),
                rows,
            }
        })
        .collect();
    Tables {
        reference,
        methods,
        finished,
        total: runs.len(),
        total_seconds,
        sections,
    }
}

impl Tables {
    /// The sentence that says what the numbers are.
    pub(crate) fn legend(&self) -> String {
        format!(
            "{} of {} runs finished, {} of training in all. Dice and IoU: each run's \
             mean over the test set's cases, then mean ± sample std over seeds; Δ: the \
             paired difference to {} on the same seeds (mean ± std), p: two-sided paired \
             t-test across seeds; time: a run's training wall time (its generator's \
             pre-training included), mean over seeds.",
            self.finished,
            self.total,
            if self.total_seconds >= 3600.0 {
                format!("{:.1} h", self.total_seconds / 3600.0)
            } else {
                format!("{:.0} min", self.total_seconds / 60.0)
            },
            self.reference
        )
    }
}

/// The columns of a results table, in the order of [`Row::cells`].
pub(crate) fn columns(reference: &str) -> [String; 9] {
    let delta = format!("Δ Dice vs {reference}");
    [
        "regime", "backbone", "method", "seeds", "Dice", "IoU", &delta, "p", "time",
    ]
    .map(String::from)
}

impl Row {
    /// The row's table cells (see [`columns`]); `—` where there is no value.
    pub(crate) fn cells(&self) -> [String; 9] {
        let (delta, p) = match self.delta {
            Some((m, sd)) => (
                format!("{:+.1} ± {:.1} pt", 100.0 * m, 100.0 * sd),
                self.p.map_or("—".into(), |p| format!("{p:.3}")),
            ),
            None => ("—".into(), "—".into()),
        };
        let seeds: Vec<String> = self.seeds.iter().map(u64::to_string).collect();
        [
            self.regime.clone(),
            self.backbone.clone(),
            self.method.clone(),
            seeds.join(","),
            format!("{:.3} ± {:.3}", self.dice.0, self.dice.1),
            format!("{:.3} ± {:.3}", self.iou.0, self.iou.1),
            delta,
            p,
            self.seconds.map_or("—".into(), |t| format!("{t:.0} s")),
        ]
    }
}

fn markdown(tables: &Tables, plots: &crate::report::Plots) -> Result<String> {
    let reference = &tables.reference;
    let mut md = tables.legend() + "\n";
    for (k, section) in tables.sections.iter().enumerate() {
        let head = columns(reference);
        write!(
            md,
            "\n### {}, test set `{}`\n\n| {} |\n|{}\n",
            section.dataset,
            section.test_set,
            head.join(" | "),
            "---|".repeat(head.len())
        )?;
        for row in &section.rows {
            writeln!(md, "| {} |", row.cells().join(" | "))?;
        }
        for (alt, file) in plots.of(k) {
            write!(md, "\n![{alt}]({file})\n")?;
        }
    }
    Ok(md)
}

/// Per dataset, regime, backbone and method: each seed's best validation Dice and test
/// Dice averaged over its K folds (seeds with every fold finished), then mean ± std over
/// seeds and the paired difference of the validation means to `reference`. `None` when the
/// manifest has one fold. Rows follow `methods` (the recipe's order). Returns folds.csv and
/// the results.md section.
fn fold_validation(
    runs: &[RunSpec],
    methods: &[String],
    reference: &str,
) -> Result<Option<(String, String)>> {
    let folds = runs.iter().map(|r| r.fold + 1).max().unwrap_or(1);
    if folds < 2 {
        return Ok(None);
    }
    // (dataset, n_train, regime, backbone, the method's place in the recipe, method)
    type Cell<'a> = (&'a str, usize, &'a str, &'a str, usize, &'a str);
    let place = |method: &str| {
        methods
            .iter()
            .position(|m| m == method)
            .unwrap_or(usize::MAX)
    };
    // cell -> seed -> one (val, test) per finished fold
    let mut found: BTreeMap<Cell, BTreeMap<u64, Vec<(f64, f64)>>> = BTreeMap::new();
    let mut csv = String::from("dataset,regime,backbone,method,seed,fold,val_dice,test_dice\n");
    for r in runs {
        let Some(test) = r.scores.get("test").filter(|p| p.exists()) else {
            continue;
        };
        let (val, test) = (best_val_dice(&r.dir)?, mean_dice(test)?);
        writeln!(
            csv,
            "{},{},{},{},{},{},{val:.4},{test:.4}",
            r.dataset, r.regime, r.backbone, r.method, r.seed, r.fold
        )?;
        found
            .entry((
                &r.dataset,
                r.n_train,
                &r.regime,
                &r.backbone,
                place(&r.method),
                &r.method,
            ))
            .or_default()
            .entry(r.seed)
            .or_default()
            .push((val, test));
    }
    // seed -> (mean val, mean test) over the folds, for the seeds with all of them
    let means = |seeds: &BTreeMap<u64, Vec<(f64, f64)>>| -> BTreeMap<u64, (f64, f64)> {
        seeds
            .iter()
            .filter(|(_, v)| v.len() == folds)
            .map(|(&seed, v)| {
                let (val, test): (Vec<f64>, Vec<f64>) = v.iter().copied().unzip();
                (seed, (mean_std(&val).0, mean_std(&test).0))
            })
            .collect()
    };
    let mut md = format!(
        "\n### Validation Dice over {folds} folds\n\nEach seed's labelled pool validated \
         {folds} times (fold 0 is the standard split, the others validate on other labelled \
         images; same test cases): per seed the mean over its folds of each run's best \
         validation Dice (and of its test Dice), then mean ± std over the seeds with every \
         fold finished; Δ: paired by seed against {reference}'s fold means.\n\n| dataset | \
         regime | backbone | method | seeds | validation Dice | Δ validation vs \
         {reference} | test Dice, mean over folds |\n|---|---|---|---|---|---|---|---|\n"
    );
    for (&(dataset, _, regime, backbone, _, method), seeds) in &found {
        let mine = means(seeds);
        if mine.is_empty() {
            continue;
        }
        let base = found
            .iter()
            .find(|(k, _)| (k.0, k.2, k.3, k.5) == (dataset, regime, backbone, reference))
            .map(|(_, s)| means(s))
            .unwrap_or_default();
        let diffs: Vec<f64> = mine
            .iter()
            .filter_map(|(seed, m)| Some(m.0 - base.get(seed)?.0))
            .collect();
        let delta = if method == reference || diffs.is_empty() {
            "—".to_string()
        } else {
            let (m, sd) = mean_std(&diffs);
            format!("{:+.1} ± {:.1} pt", 100.0 * m, 100.0 * sd)
        };
        let (val, test): (Vec<f64>, Vec<f64>) = mine.values().copied().unzip();
        let ((vm, vsd), (tm, tsd)) = (mean_std(&val), mean_std(&test));
        let seeds: Vec<String> = mine.keys().map(u64::to_string).collect();
        writeln!(
            md,
            "| {dataset} | {regime} | {backbone} | {method} | {} | {vm:.3} ± {vsd:.3} | {delta} \
             | {tm:.3} ± {tsd:.3} |",
            seeds.join(",")
        )?;
    }
    Ok(Some((csv, md)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fold_run(root: &Path, method: &str, seed: u64, fold: usize, val: f64, test: f64) -> RunSpec {
        let dir = root.join(format!("{method}-s{seed}-f{fold}"));
        std::fs::create_dir_all(dir.join("best")).unwrap();
        std::fs::create_dir_all(dir.join("eval-test")).unwrap();
        let state = serde_json::json!({"extra": {"best_val_dice": val}});
        std::fs::write(dir.join("best/state.json"), state.to_string()).unwrap();
        let summary = serde_json::json!({"dice": {"mean": test}});
        std::fs::write(dir.join("eval-test/summary.json"), summary.to_string()).unwrap();
        RunSpec {
            id: format!("lungs/7+2/unet/{method}/s{seed}/f{fold}"),
            dataset: "lungs".into(),
            regime: "7+2".into(),
            n_train: 7,
            n_val: 2,
            method: method.into(),
            backbone: "unet".into(),
            seed,
            fold,
            steps: Vec::new(),
            scores: BTreeMap::from([("test".into(), dir.join("eval-test/summary.json"))]),
            dir,
        }
    }

    #[test]
    fn fold_validation_averages_each_seeds_folds() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let root = tmp.path();
        let mut runs = vec![
            fold_run(root, "baseline", 0, 0, 0.80, 0.70),
            fold_run(root, "baseline", 0, 1, 0.60, 0.72),
            fold_run(root, "genseg", 0, 0, 0.90, 0.75),
            fold_run(root, "genseg", 0, 1, 0.70, 0.77),
            fold_run(root, "baseline", 1, 0, 0.50, 0.60),
        ];
        // Seed 1's fold 1 is not finished: the seed is left out of the means.
        let unfinished = fold_run(root, "baseline", 1, 1, 0.0, 0.0);
        std::fs::remove_file(&unfinished.scores["test"])?;
        runs.push(unfinished);
        // Rows follow the recipe's order of methods, not the alphabet's.
        let methods = ["genseg".to_string(), "baseline".to_string()];
        let (csv, md) = fold_validation(&runs, &methods, "baseline")?.expect("two folds");
        assert_eq!(csv.lines().count(), 1 + 5, "{csv}");
        assert!(
            md.contains(
                "| lungs | 7+2 | unet | baseline | 0 | 0.700 ± 0.000 | — | 0.710 ± 0.000 |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| lungs | 7+2 | unet | genseg | 0 | 0.800 ± 0.000 | +10.0 ± 0.0 pt | 0.760 ± 0.000 |"),
            "{md}"
        );
        assert!(md.find("| genseg |") < md.find("| baseline |"), "{md}");
        // One fold: no section.
        runs.retain(|r| r.fold == 0);
        assert!(fold_validation(&runs, &methods, "baseline")?.is_none());
        Ok(())
    }

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
