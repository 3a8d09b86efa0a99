//! `cargo xtask select`: per seed, the candidate whose segmentation run scored the highest
//! validation Dice, and what that choice scores on the test split (issue 17, hypothesis 5:
//! choose the generator by the downstream Dice of Separate, not by its own validation L1).
//!
//! A candidate is `NAME=PREFIX`, its run of seed `s` the folder `PREFIX-s<s>` (the naming of
//! `cargo xtask experiment`, so candidates may come from different experiment folders, e.g.
//! one per generator setting). The choice reads only `best/state.json`'s `best_val_dice`;
//! the test (and out-of-domain) scores are read afterwards, for the table. Ties go to the
//! candidate listed first. The run with the highest validation Dice is picked on a maximum
//! over its validations, so a noisier candidate is favoured a little: with two validation
//! images (Montgomery 7 + 2) the choice is close to a coin; with eight or more it means more.
//! With `folds` > 1 a candidate's validation Dice is the mean over its runs on folds 0 to
//! K-1 of the seed's labelled pool (`PREFIX-s<s>`, then `PREFIX-s<s>-f<i>`, as a recipe
//! with `folds = K` names them): K × n_val validation images (40 on ISIC 32 + 8 with K = 5)
//! and the same test cases, whose score is still the standard split's run (fold 0).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use crate::experiment::{best_val_dice, mean_dice, mean_std, s};

/// One candidate: a name and the prefix of its per-seed run folders.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub name: String,
    pub prefix: PathBuf,
}

impl std::str::FromStr for Candidate {
    type Err = anyhow::Error;
    fn from_str(spec: &str) -> Result<Self> {
        match spec.split_once('=') {
            Some((name, prefix)) if !name.is_empty() && !prefix.is_empty() => Ok(Self {
                name: name.to_string(),
                prefix: PathBuf::from(prefix),
            }),
            _ => bail!("a candidate is NAME=PREFIX (runs PREFIX-s<seed>), not {spec:?}"),
        }
    }
}

/// What to compare.
pub struct Plan {
    pub candidates: Vec<Candidate>,
    pub seeds: Vec<u64>,
    /// The out-of-domain evaluation folder inside each run (e.g. `eval-ph2-all`).
    pub ood: Option<String>,
    /// Validation folds averaged per seed (1 = the standard split's run only).
    pub folds: usize,
}

/// One candidate's run of one seed.
#[derive(Clone, Copy, Debug)]
struct Scores {
    val: f64,
    test: f64,
    ood: Option<f64>,
}

/// The scores of the runs `prefix-s<seed>` (and `-f<i>` for the other folds).
fn scores(prefix: &Path, seed: u64, folds: usize, ood: Option<&str>) -> Result<Scores> {
    let run = PathBuf::from(format!("{}-s{seed}", s(prefix)));
    let vals = (0..folds)
        .map(|fold| match fold {
            0 => best_val_dice(&run),
            _ => best_val_dice(Path::new(&format!("{}-f{fold}", s(&run)))),
        })
        .collect::<Result<Vec<f64>>>()?;
    let val = mean_std(&vals).0;
    let test = mean_dice(&run.join("eval-test").join("summary.json"))?;
    let ood = match ood {
        Some(folder) => Some(mean_dice(&run.join(folder).join("summary.json"))?),
        None => None,
    };
    Ok(Scores { val, test, ood })
}

/// The markdown report: per seed every candidate's validation and test Dice and the
/// choice; then per rule (each candidate always, or the choice) mean ± std over seeds and
/// the paired difference to the first candidate.
pub fn run(plan: &Plan) -> Result<String> {
    if plan.candidates.len() < 2 {
        bail!("select needs at least two candidates");
    }
    if plan.folds == 0 {
        bail!("select needs at least one fold");
    }
    let mut table: Vec<Vec<Scores>> = Vec::new();
    let mut chosen: Vec<usize> = Vec::new();
    for &seed in &plan.seeds {
        let row = plan
            .candidates
            .iter()
            .map(|c| scores(&c.prefix, seed, plan.folds, plan.ood.as_deref()))
            .collect::<Result<Vec<_>>>()?;
        // The first of the highest (max_by would keep the last of equals).
        let best = (0..row.len()).fold(0, |b, i| if row[i].val > row[b].val { i } else { b });
        chosen.push(best);
        table.push(row);
    }
    let names: Vec<&str> = plan.candidates.iter().map(|c| c.name.as_str()).collect();
    let mut md = format!(
        "Per seed: each candidate's best validation Dice{} / test Dice, and the candidate \
         with the highest validation Dice (ties: the first listed).\n\n| seed | {} | chosen | \
         test Dice of the chosen |{}\n|{}\n",
        if plan.folds > 1 {
            format!(" (mean over {} folds)", plan.folds)
        } else {
            String::new()
        },
        names.join(" | "),
        if plan.ood.is_some() {
            " out-of-domain Dice of the chosen |"
        } else {
            ""
        },
        "---|".repeat(names.len() + 3 + usize::from(plan.ood.is_some()))
    );
    for ((seed, row), &c) in plan.seeds.iter().zip(&table).zip(&chosen) {
        let cells: Vec<String> = row
            .iter()
            .map(|r| format!("{:.4} / {:.4}", r.val, r.test))
            .collect();
        let ood = row[c].ood.map(|o| format!(" {o:.4} |")).unwrap_or_default();
        writeln!(
            md,
            "| {seed} | {} | {} | {:.4} |{ood}",
            cells.join(" | "),
            names[c],
            row[c].test
        )?;
    }
    let rule_rows: Vec<(String, Vec<Scores>)> = (0..names.len())
        .map(|i| {
            (
                format!("always {}", names[i]),
                table.iter().map(|r| r[i]).collect(),
            )
        })
        .chain(std::iter::once((
            "chosen by validation Dice".to_string(),
            table.iter().zip(&chosen).map(|(r, &c)| r[c]).collect(),
        )))
        .collect();
    write!(
        md,
        "\n| rule | test Dice | Δ test vs {0} (paired) |{1}\n|---|---|---|{2}\n",
        names[0],
        if plan.ood.is_some() {
            format!(" out-of-domain Dice | Δ vs {} |", names[0])
        } else {
            String::new()
        },
        if plan.ood.is_some() { "---|---|" } else { "" }
    )?;
    let first: Vec<Scores> = table.iter().map(|r| r[0]).collect();
    for (rule, picked) in &rule_rows {
        let cell = |value: fn(&Scores) -> Option<f64>| -> String {
            let v: Vec<f64> = picked.iter().filter_map(value).collect();
            let d: Vec<f64> = picked
                .iter()
                .zip(&first)
                .filter_map(|(p, f)| Some(value(p)? - value(f)?))
                .collect();
            let (m, sd) = mean_std(&v);
            let (dm, dsd) = mean_std(&d);
            format!(
                "{m:.3} ± {sd:.3} | {:+.1} ± {:.1} pt",
                100.0 * dm,
                100.0 * dsd
            )
        };
        let ood = if plan.ood.is_some() {
            format!(" {} |", cell(|r| r.ood))
        } else {
            String::new()
        };
        writeln!(md, "| {rule} | {} |{ood}", cell(|r| Some(r.test)))?;
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_run(dir: &Path, val: f64, test: f64) -> Result<()> {
        std::fs::create_dir_all(dir.join("best"))?;
        std::fs::create_dir_all(dir.join("eval-test"))?;
        std::fs::write(
            dir.join("best/state.json"),
            serde_json::json!({"extra": {"best_val_dice": val}}).to_string(),
        )?;
        std::fs::write(
            dir.join("eval-test/summary.json"),
            serde_json::json!({"dice": {"mean": test}}).to_string(),
        )?;
        Ok(())
    }

    #[test]
    fn each_seed_takes_the_candidate_with_the_best_validation_dice() -> Result<()> {
        let dir = tempfile::tempdir()?;
        // seed 0: b validates better (and tests worse); seed 1: a tie on validation -> a.
        fake_run(&dir.path().join("a-s0"), 0.80, 0.90)?;
        fake_run(&dir.path().join("b-s0"), 0.85, 0.70)?;
        fake_run(&dir.path().join("a-s1"), 0.90, 0.92)?;
        fake_run(&dir.path().join("b-s1"), 0.90, 0.60)?;
        let candidate = |n: &str| -> Result<Candidate> {
            format!("{n}={}", dir.path().join(n).display()).parse()
        };
        let plan = Plan {
            candidates: vec![candidate("a")?, candidate("b")?],
            seeds: vec![0, 1],
            ood: None,
            folds: 1,
        };
        let md = run(&plan)?;
        assert!(
            md.contains("| 0 | 0.8000 / 0.9000 | 0.8500 / 0.7000 | b | 0.7000 |"),
            "{md}"
        );
        assert!(
            md.contains("| 1 | 0.9000 / 0.9200 | 0.9000 / 0.6000 | a | 0.9200 |"),
            "{md}"
        );
        // chosen: 0.70 and 0.92 -> 0.810 ± 0.156; against always-a: -0.20 and 0 -> -10.0 ± 14.1.
        assert!(
            md.contains("| chosen by validation Dice | 0.810 ± 0.156 | -10.0 ± 14.1 pt |"),
            "{md}"
        );
        assert!(
            md.contains("| always a | 0.910 ± 0.014 | +0.0 ± 0.0 pt |"),
            "{md}"
        );
        Ok(())
    }

    /// With folds, the choice reads the mean validation Dice over the folds' runs; the test
    /// score is the standard split's.
    #[test]
    fn folds_average_the_validation_dice_of_each_candidate() -> Result<()> {
        let dir = tempfile::tempdir()?;
        // On fold 0 alone b wins; over three folds a does (0.80 against 0.78).
        fake_run(&dir.path().join("a-s0"), 0.80, 0.90)?;
        fake_run(&dir.path().join("a-s0-f1"), 0.85, 0.10)?;
        fake_run(&dir.path().join("a-s0-f2"), 0.75, 0.10)?;
        fake_run(&dir.path().join("b-s0"), 0.84, 0.70)?;
        fake_run(&dir.path().join("b-s0-f1"), 0.80, 0.10)?;
        fake_run(&dir.path().join("b-s0-f2"), 0.70, 0.10)?;
        let plan = |folds| -> Result<Plan> {
            Ok(Plan {
                candidates: vec![
                    format!("a={}", dir.path().join("a").display()).parse()?,
                    format!("b={}", dir.path().join("b").display()).parse()?,
                ],
                seeds: vec![0],
                ood: None,
                folds,
            })
        };
        let md = run(&plan(1)?)?;
        assert!(md.contains("| b | 0.7000 |"), "{md}");
        let md = run(&plan(3)?)?;
        assert!(
            md.contains("| 0 | 0.8000 / 0.9000 | 0.7800 / 0.7000 | a | 0.9000 |"),
            "{md}"
        );
        assert!(md.contains("(mean over 3 folds)"), "{md}");
        let err = format!("{:#}", run(&plan(4)?).unwrap_err());
        assert!(err.contains("a-s0-f3"), "{err}");
        Ok(())
    }

    #[test]
    fn a_missing_run_or_a_bad_candidate_is_named() -> Result<()> {
        let dir = tempfile::tempdir()?;
        fake_run(&dir.path().join("a-s0"), 0.8, 0.9)?;
        let plan = Plan {
            candidates: vec![
                format!("a={}", dir.path().join("a").display()).parse()?,
                format!("b={}", dir.path().join("b").display()).parse()?,
            ],
            seeds: vec![0],
            ood: None,
            folds: 1,
        };
        let err = format!("{:#}", run(&plan).unwrap_err());
        assert!(err.contains("b-s0") && err.contains("state.json"), "{err}");
        let err = "no-equals-sign"
            .parse::<Candidate>()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("NAME=PREFIX") && err.contains("no-equals-sign"),
            "{err}"
        );
        Ok(())
    }
}
