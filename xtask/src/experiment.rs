//! `cargo xtask experiment`: the method comparison over seeds (docs/results.md).
//!
//! Layout of `--out`: `pix2pix-s<seed>/` (generator pre-training), `<method>-s<seed>/`
//! (segmentation runs, with `eval-test/` and `eval-<ood>-all/`), `results.csv` (one line
//! per run) and `results.md` (mean ± std over seeds per method).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::{build_genseg, genseg};

/// What to run.
pub struct Plan {
    pub study: Study,
    pub methods: Vec<String>,
    pub sets: Vec<String>,
    pub pretrain_sets: Vec<String>,
}

/// What every multi-seed recipe (`experiment`, `bench-vs-nnunet`) is run on and where it
/// writes.
#[derive(clap::Args, Clone, Debug)]
pub struct Study {
    /// The labelled pool.
    #[arg(long)]
    pub data: PathBuf,
    /// Training pairs per seed.
    #[arg(long)]
    pub n_train: usize,
    /// Validation pairs per seed.
    #[arg(long)]
    pub n_val: usize,
    /// Seeds, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    pub seeds: Vec<u64>,
    /// A dataset to score every run on as well (out of domain), e.g. ../shared/data/ph2.
    #[arg(long)]
    pub ood: Option<PathBuf>,
    /// The study folder (one run folder per method or side, and seed; results.md).
    #[arg(long)]
    pub out: PathBuf,
    /// Use this `genseg` binary instead of building one (e.g. a CUDA build, or a copy
    /// that later builds of the tree do not replace mid-experiment).
    #[arg(long)]
    pub genseg_bin: Option<PathBuf>,
}

impl Study {
    /// The same study with its paths taken relative to `root` (absolute ones stay).
    pub fn under(self, root: &Path) -> Self {
        Self {
            data: root.join(self.data),
            ood: self.ood.map(|o| root.join(o)),
            out: root.join(self.out),
            genseg_bin: self.genseg_bin.map(|b| root.join(b)),
            ..self
        }
    }
}

/// The head of a results table: `| <first> | seeds | test Dice | [out-of-domain Dice |]
/// <last> |` and its rule.
pub(crate) fn table_head(first: &str, ood: bool, last: &str) -> String {
    let (ood_head, ood_rule) = if ood {
        ("out-of-domain Dice | ", "---|")
    } else {
        ("", "")
    };
    format!("| {first} | seeds | test Dice | {ood_head}{last} |\n|---|---|---|{ood_rule}---|\n")
}

/// One finished segmentation run.
struct Row {
    method: String,
    seed: u64,
    test_dice: f64,
    ood_dice: Option<f64>,
    /// Training loop wall time (without the test evaluation).
    seconds: f64,
}

fn uses_generator(method: &str) -> bool {
    method == "separate" || method == "genseg"
}

pub(crate) fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

pub(crate) fn mean_dice(summary: &Path) -> Result<f64> {
    read_json(summary)?["dice"]["mean"]
        .as_f64()
        .with_context(|| format!("{} has no dice.mean", summary.display()))
}

/// Seconds of the training loop: the `seconds` of the last metrics line.
pub(crate) fn loop_seconds(run: &Path) -> Result<f64> {
    let path = run.join("metrics.jsonl");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .with_context(|| format!("{} is empty", path.display()))?;
    serde_json::from_str::<serde_json::Value>(last)?["seconds"]
        .as_f64()
        .with_context(|| format!("no seconds in the last line of {}", path.display()))
}

/// Starts `run` with `args`, or resumes it when it exists and `done` does not (resuming a
/// finished run only rewrites its last/).
pub(crate) fn train_or_resume(
    bin: &Path,
    cmd: &str,
    run: &Path,
    done: Option<&Path>,
    args: &[String],
) -> Result<()> {
    if done.is_some_and(Path::exists) {
        eprintln!("{} finished already, kept", run.display());
        return Ok(());
    }
    if run.join("config.toml").exists() {
        return genseg(bin, &[cmd, "--resume", &s(run)]);
    }
    let mut all: Vec<&str> = vec![cmd];
    all.extend(args.iter().map(String::as_str));
    genseg(bin, &all)
}

pub fn run(root: &Path, plan: &Plan) -> Result<()> {
    let bin = match &plan.study.genseg_bin {
        Some(b) => b.clone(),
        None => build_genseg(root)?,
    };
    std::fs::create_dir_all(&plan.study.out)
        .with_context(|| format!("creating {}", plan.study.out.display()))?;
    let common = |seed: u64| -> Vec<String> {
        vec![
            "--data".into(),
            s(&plan.study.data),
            "--n-train".into(),
            plan.study.n_train.to_string(),
            "--n-val".into(),
            plan.study.n_val.to_string(),
            "--seed".into(),
            seed.to_string(),
        ]
    };
    let mut rows = Vec::new();
    for &seed in &plan.study.seeds {
        let pix2pix = plan.study.out.join(format!("pix2pix-s{seed}"));
        if plan.methods.iter().any(|m| uses_generator(m)) {
            let mut args = common(seed);
            args.extend(["--out".into(), s(&pix2pix)]);
            for kv in &plan.pretrain_sets {
                args.extend(["--set".into(), kv.clone()]);
            }
            train_or_resume(&bin, "pretrain-generator", &pix2pix, None, &args)?;
        }
        for method in &plan.methods {
            let run = plan.study.out.join(format!("{method}-s{seed}"));
            let mut args = common(seed);
            args.extend(["--method".into(), method.clone(), "--out".into(), s(&run)]);
            if uses_generator(method) {
                args.extend(["--generator".into(), s(&pix2pix)]);
            }
            for kv in &plan.sets {
                args.extend(["--set".into(), kv.clone()]);
            }
            let test_summary = run.join("eval-test").join("summary.json");
            train_or_resume(&bin, "train", &run, Some(&test_summary), &args)?;
            let ood_dice = match &plan.study.ood {
                Some(ood) => {
                    let name = ood
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_else(|| "ood".into());
                    let summary = run.join(format!("eval-{name}-all")).join("summary.json");
                    if !summary.exists() {
                        genseg(&bin, &["evaluate", "--run", &s(&run), "--data", &s(ood)])?;
                    }
                    Some(mean_dice(&summary)?)
                }
                None => None,
            };
            rows.push(Row {
                method: method.clone(),
                seed,
                test_dice: mean_dice(&test_summary)?,
                ood_dice,
                seconds: loop_seconds(&run)?,
            });
            write_results(plan, &rows)?;
        }
    }
    let table = std::fs::read_to_string(plan.study.out.join("results.md"))?;
    println!("{table}");
    Ok(())
}

pub(crate) fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    // Sample standard deviation over seeds (n − 1), 0 for a single seed.
    let var = if values.len() > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

fn write_results(plan: &Plan, rows: &[Row]) -> Result<()> {
    let mut csv = String::from("method,seed,test_dice,ood_dice,train_seconds\n");
    for r in rows {
        let ood = r.ood_dice.map(|d| format!("{d:.4}")).unwrap_or_default();
        writeln!(
            csv,
            "{},{},{:.4},{ood},{:.1}",
            r.method, r.seed, r.test_dice, r.seconds
        )?;
    }
    std::fs::write(plan.study.out.join("results.csv"), csv)?;
    let mut md = format!(
        "{} ({} train + {} val per seed); Dice is each run's mean over its cases, then mean ± \
         sample std over seeds\n\n{}",
        plan.study.data.display(),
        plan.study.n_train,
        plan.study.n_val,
        table_head("method", plan.study.ood.is_some(), "train time per run"),
    );
    for method in &plan.methods {
        let mine: Vec<&Row> = rows.iter().filter(|r| &r.method == method).collect();
        if mine.is_empty() {
            continue;
        }
        let (t, ts) = mean_std(&mine.iter().map(|r| r.test_dice).collect::<Vec<_>>());
        let (sec, _) = mean_std(&mine.iter().map(|r| r.seconds).collect::<Vec<_>>());
        let seeds: Vec<String> = mine.iter().map(|r| r.seed.to_string()).collect();
        let ood = if plan.study.ood.is_some() {
            let (o, os) = mean_std(&mine.iter().filter_map(|r| r.ood_dice).collect::<Vec<_>>());
            format!("{o:.3} ± {os:.3} | ")
        } else {
            String::new()
        };
        writeln!(
            md,
            "| {method} | {} | {t:.3} ± {ts:.3} | {ood}{:.0} s |",
            seeds.join(","),
            sec
        )?;
    }
    std::fs::write(plan.study.out.join("results.md"), md)?;
    Ok(())
}
