//! Project automation and experiment recipes: `cargo xtask <recipe>`.
//!
//! Each recipe builds the `genseg` binary in release mode and drives it, so a
//! recipe is exactly what a user could type by hand, written down once.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod aggregate;
mod bench_vs_nnunet;
mod bench_vs_torch;
mod exp;
mod experiment;
mod report;
mod select;

#[derive(Parser)]
#[command(name = "xtask", about = "GenSeg project recipes")]
struct Cli {
    #[command(subcommand)]
    recipe: Recipe,
}

#[derive(Subcommand)]
enum Recipe {
    /// The main job on built-in synthetic data: builds the release binary and runs
    /// `genseg demo` (baseline, Separate and GenSeg on 7 + 2 lung phantoms, scored in
    /// domain and on a shifted domain).
    Demo {
        /// Where the demo writes its data, runs, predictions and summary.md.
        #[arg(long, default_value = "demo-out")]
        out: PathBuf,
    },
    /// Methods (and ablations of them) over several seeds on one dataset: per seed a
    /// generator pre-training run when a method needs one, then every method from the same
    /// split; every run's test split (and an optional out-of-domain dataset) is scored, and
    /// `results.md` / `results.csv` in `--out` get mean ± std over the seeds and each row's
    /// paired difference to the first. Re-running continues: finished runs are kept,
    /// interrupted ones resumed.
    Experiment {
        #[command(flatten)]
        study: experiment::Study,
        /// Methods, comma-separated: baseline, separate, genseg or an augmentation baseline
        /// on the plain recipe; `strong` or `strong-<method>` on the strong recipe.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "baseline,separate,genseg"
        )]
        methods: Vec<String>,
        /// `--set` overrides for the segmentation runs (all methods); `{seed}` in a value
        /// stands for the run's seed, `{out}` for `--out`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// `--set` overrides for the strong-recipe methods only (after `--set`), e.g.
        /// nnU-Net's SGD to reproduce a table measured before the recipe chose RMSprop.
        #[arg(long = "strong-set", value_name = "KEY=VALUE")]
        strong_sets: Vec<String>,
        /// `--set` overrides for the generator pre-training runs, with `{seed}` and `{out}`
        /// as in `--set`; e.g. `consistency.run="{out}/strong-s{seed}"` (the generator of a
        /// seed is pre-trained after the variants listed before the first that uses it).
        #[arg(long = "pretrain-set", value_name = "KEY=VALUE")]
        pretrain_sets: Vec<String>,
        /// A piece taken away: adds, per method, the variant `<method>-NAME` trained with
        /// these overrides as well (e.g. `no-aug:train.transforms=false`); one that sets only
        /// generator keys (`separate.`, `genseg.`, ...) skips methods without a generator.
        #[arg(long = "ablate", value_name = "NAME:KEY=VALUE[;KEY=VALUE...]")]
        ablations: Vec<String>,
    },
    /// An experiment grid from a recipe (xtask/recipes/<name>.toml, or a path): datasets x
    /// regimes x backbones x methods x seeds, written as `<out>/runs.jsonl` (one resolved,
    /// resumable run per line) and run by a local worker pool with one progress bar, or
    /// handed to Slurm as a job array (`--emit-slurm`); then `aggregate`. The same command
    /// skips finished runs and resumes interrupted ones.
    Exp {
        /// Recipe name (xtask/recipes/) or path to a .toml file.
        recipe: String,
        /// The experiment folder; default `target/exp/<recipe>`.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Where the recipe's relative dataset paths start.
        #[arg(long, default_value = "../shared/data")]
        data_root: PathBuf,
        /// Runs at a time (they share the cores; on CPU one at a time is fastest per run).
        #[arg(short = 'j', long, default_value_t = 1)]
        jobs: usize,
        /// Write `<out>/slurm/` (a job array over the manifest, the aggregation as a
        /// dependent job, submit.sh) instead of running here.
        #[arg(long)]
        emit_slurm: bool,
        #[command(flatten)]
        slurm: exp::SlurmOptions,
        /// Use this `genseg` binary instead of building one.
        #[arg(long)]
        genseg_bin: Option<PathBuf>,
    },
    /// The tables of an experiment folder's finished runs: results.csv and results.md (per
    /// dataset and test set: Dice and IoU mean ± std over seeds, the paired difference to
    /// the baseline with a paired t-test).
    Aggregate {
        /// The experiment folder (holds runs.jsonl).
        exp: PathBuf,
    },
    /// One training step of the same networks in genseg and in PyTorch (installed from PyPI
    /// into target/bench-venv; not for CI): runs `genseg bench-step` and
    /// xtask/bench/torch_step.py alternately, prints per config the median step times, their
    /// ratio, peak memory and GFLOP/s, and writes a markdown table.
    BenchVsTorch {
        /// Configs, comma-separated (default: all): unet-b64-3x256-b4, unet-b16-1x128-b8,
        /// pix2pix-ngf64-256-b2.
        #[arg(long, value_delimiter = ',')]
        configs: Vec<String>,
        /// Processes per side and config.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Timed steps per process.
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// Untimed steps per process before them.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// Compute threads of each side (the project's machine has 2 cores).
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// The markdown table.
        #[arg(long, default_value = "target/bench-vs-torch.md")]
        out: PathBuf,
    },
    /// The strong recipe against nnU-Net v2 itself (installed from PyPI into
    /// target/bench-venv; not for CI): per seed the same split and images, both trained on
    /// the CPU, both scored by `genseg score`; writes results.md in `--out`.
    BenchVsNnunet {
        #[command(flatten)]
        study: experiment::Study,
        /// Image side both sides train and are scored at.
        #[arg(long, default_value_t = 64)]
        size: u32,
        /// `--set` overrides for our side's training run (nnU-Net's side is nnU-Net's).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Per seed, the candidate (e.g. one generator setting's Separate runs) whose run scored
    /// the highest validation Dice, and the test Dice of that choice against always taking
    /// one candidate: choosing by downstream validation Dice instead of a fixed setting.
    Select {
        /// `NAME=PREFIX`, at least two: the runs `PREFIX-s<seed>` (made by `experiment`).
        #[arg(long = "candidate", value_name = "NAME=PREFIX", required = true)]
        candidates: Vec<select::Candidate>,
        /// Seeds, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
        seeds: Vec<u64>,
        /// The out-of-domain evaluation folder inside each run, e.g. `eval-ph2-all`.
        #[arg(long)]
        ood: Option<String>,
        /// Choose on the mean validation Dice over this many folds of each seed's labelled
        /// pool (runs `PREFIX-s<seed>-f<i>` besides `PREFIX-s<seed>`; a recipe's `folds`).
        #[arg(long, default_value_t = 1)]
        folds: usize,
        /// Also write the report to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Runs `genseg data check` on every dataset folder under a directory.
    CheckDatasets {
        /// The folder holding one sub-folder per dataset.
        #[arg(long, default_value = "../shared/data")]
        data: PathBuf,
    },
}

fn main() -> Result<()> {
    let root = workspace_root();
    match Cli::parse().recipe {
        Recipe::Demo { out } => demo(&root, &root.join(out)),
        Recipe::CheckDatasets { data } => check_datasets(&root, &root.join(data)),
        Recipe::BenchVsTorch {
            configs,
            runs,
            steps,
            warmup,
            threads,
            out,
        } => bench_vs_torch::run(
            &root,
            &bench_vs_torch::Plan {
                configs,
                runs,
                steps,
                warmup,
                threads,
                out: root.join(out),
            },
        ),
        Recipe::BenchVsNnunet { study, size, sets } => {
            bench_vs_nnunet::run(&root, &study.under(&root), size, &sets)
        }
        Recipe::Exp {
            recipe,
            out,
            data_root,
            jobs,
            emit_slurm,
            slurm,
            genseg_bin,
        } => {
            let (name, recipe) = exp::Recipe::load(&root, &recipe)?;
            let out = root.join(out.unwrap_or_else(|| Path::new("target/exp").join(&name)));
            let bin = match genseg_bin {
                Some(b) => root.join(b),
                None => build_genseg(&root)?,
            };
            let how = exp::Execution {
                jobs,
                slurm: emit_slurm.then_some(slurm),
            };
            exp::run(&recipe, &root.join(data_root), &out, &bin, &how)
        }
        Recipe::Aggregate { exp } => aggregate::run(&root.join(exp)),
        Recipe::Select {
            candidates,
            seeds,
            ood,
            folds,
            out,
        } => {
            let candidates = candidates
                .into_iter()
                .map(|c| select::Candidate {
                    prefix: root.join(c.prefix),
                    ..c
                })
                .collect();
            let report = select::run(&select::Plan {
                candidates,
                seeds,
                ood,
                folds,
            })?;
            if let Some(out) = out {
                let out = root.join(out);
                std::fs::write(&out, &report)
                    .with_context(|| format!("writing {}", out.display()))?;
            }
            println!("{report}");
            Ok(())
        }
        Recipe::Experiment {
            study,
            methods,
            sets,
            strong_sets,
            pretrain_sets,
            ablations,
        } => experiment::run(
            &root,
            &experiment::Plan {
                study: study.under(&root),
                methods,
                sets,
                strong_sets,
                pretrain_sets,
                ablations,
            },
        ),
    }
}

fn workspace_root() -> PathBuf {
    // xtask/Cargo.toml sits one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// Builds the release binary once and returns its path.
pub(crate) fn build_genseg(root: &Path) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(root)
        .args(["build", "--release", "--bin", "genseg"])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --release --bin genseg failed ({status})");
    }
    Ok(root.join("target/release/genseg"))
}

pub(crate) fn genseg(bin: &Path, args: &[&str]) -> Result<()> {
    eprintln!("$ genseg {}", args.join(" "));
    let status = Command::new(bin)
        .args(args)
        .status()
        .with_context(|| format!("starting {}", bin.display()))?;
    if !status.success() {
        bail!("`genseg {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn demo(root: &Path, out: &Path) -> Result<()> {
    let bin = build_genseg(root)?;
    genseg(&bin, &["demo", "--out", &out.to_string_lossy()])
}

fn check_datasets(root: &Path, data: &Path) -> Result<()> {
    let bin = build_genseg(root)?;
    let mut entries: Vec<PathBuf> = std::fs::read_dir(data)
        .with_context(|| format!("reading dataset folder {}", data.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    entries.sort();
    if entries.is_empty() {
        bail!("no dataset folders under {}", data.display());
    }
    let mut failed = Vec::new();
    for dir in &entries {
        if genseg(&bin, &["data", "check", &dir.to_string_lossy()]).is_err() {
            failed.push(dir.display().to_string());
        }
    }
    if !failed.is_empty() {
        bail!("datasets that failed the check: {}", failed.join(", "));
    }
    Ok(())
}
