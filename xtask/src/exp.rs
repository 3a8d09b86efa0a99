//! `cargo xtask exp <recipe>`: an experiment grid from a TOML recipe (xtask/recipes/), as a
//! manifest of independent, resumable runs, executed by a local worker pool or as a Slurm
//! job array.
//!
//! A recipe names datasets (with out-of-domain test folders), labelled-set regimes (the
//! recipe's, or a dataset's own), methods, backbones, seeds, a profile and overrides. It
//! expands into `<out>/runs.jsonl` ([`genseg_pipelines::manifest`]): one line per dataset ×
//! regime × backbone × method × seed, each with its own folder under `<out>/runs/` and the
//! `genseg` commands that make it, which `genseg run --manifest <out>/runs.jsonl --index <i>`
//! executes. Running the same command again skips finished runs and resumes interrupted
//! ones; `genseg train` locks a run folder while it trains in it. Afterwards
//! [`crate::aggregate`] writes the tables.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};
use genseg_pipelines::manifest::{self, Action, RunSpec, Step};
use serde::Deserialize;

use crate::experiment::{Variant, pretrain_args, s};

/// A recipe file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// What the grid measures, one line.
    pub description: String,
    /// `genseg --profile` of every run (`cpu`, `paper` or `study`).
    #[serde(default = "default_profile")]
    pub profile: String,
    /// Seeds (each draws its own split).
    pub seeds: Vec<u64>,
    /// Methods as `cargo xtask experiment` names them: `baseline`, `combine`, `separate`,
    /// `genseg`, ... on the plain recipe; `strong`, `strong-<method>` on the strong one.
    pub methods: Vec<String>,
    /// Backbones (`model.kind`): `unet`, `deeplab`, `swin_unet`, `foundation`.
    #[serde(default = "default_backbones")]
    pub backbones: Vec<String>,
    /// `--set KEY=VALUE` for every segmentation run.
    #[serde(default)]
    pub sets: Vec<String>,
    /// `--set KEY=VALUE` for the runs on the strong recipe only (after `sets`): how a recipe
    /// keeps the strong recipe it was measured with (e.g. nnU-Net's SGD) when its default
    /// moves on, without touching the plain methods beside it.
    #[serde(default)]
    pub strong_sets: Vec<String>,
    /// `--set KEY=VALUE` for every generator pre-training.
    #[serde(default)]
    pub pretrain_sets: Vec<String>,
    /// The labelled pools.
    pub datasets: Vec<DatasetEntry>,
    /// Labelled-set sizes, for every dataset that names none of its own.
    #[serde(default)]
    pub regimes: Vec<Regime>,
    /// Validation folds per seed: 1 trains on the standard split only; K > 1 also trains
    /// every cell on folds 1 to K-1 of the seed's labelled pool (same test cases, other
    /// validation cases), so that `aggregate` reports validation Dice over K × n_val
    /// labelled images, a signal for choosing settings that does not touch the test set.
    /// The test tables stay those of fold 0.
    #[serde(default = "one")]
    pub folds: usize,
}

fn one() -> usize {
    1
}

fn default_profile() -> String {
    "cpu".into()
}

fn default_backbones() -> Vec<String> {
    vec!["unet".into()]
}

/// One labelled pool and where its models are also scored.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetEntry {
    /// Its name in run ids and tables.
    pub name: String,
    /// Its folder: relative to `--data-root`, or absolute.
    pub path: PathBuf,
    /// Out-of-domain test folders (every image), relative to `--data-root` or absolute.
    #[serde(default)]
    pub ood: Vec<PathBuf>,
    /// This pool's labelled-set sizes, instead of the recipe's `regimes` (a study of pools
    /// labelled in different amounts, e.g. 7 + 2 lung X-rays beside 32 + 8 skin photos).
    #[serde(default)]
    pub regimes: Vec<Regime>,
}

/// A labelled-set size: training and validation pairs drawn per seed.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Regime {
    /// Training pairs.
    pub n_train: usize,
    /// Validation pairs.
    pub n_val: usize,
}

impl Regime {
    fn name(&self) -> String {
        format!("{}+{}", self.n_train, self.n_val)
    }
}

impl Recipe {
    /// Reads the recipe `name_or_path`: a file, or `xtask/recipes/<name>.toml`.
    pub fn load(root: &Path, name_or_path: &str) -> Result<(String, Self)> {
        let given = Path::new(name_or_path);
        let path = if given.extension().is_some_and(|e| e == "toml") {
            root.join(given)
        } else {
            root.join("xtask/recipes")
                .join(format!("{name_or_path}.toml"))
        };
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading recipe {} (recipes: {})",
                path.display(),
                known_recipes(root).join(", ")
            )
        })?;
        let recipe: Self =
            toml::from_str(&text).with_context(|| format!("parsing recipe {}", path.display()))?;
        recipe
            .check()
            .with_context(|| format!("recipe {}", path.display()))?;
        let name = path
            .file_stem()
            .map_or_else(|| "exp".into(), |n| n.to_string_lossy().into_owned());
        Ok((name, recipe))
    }

    fn check(&self) -> Result<()> {
        for (what, empty) in [
            ("seeds", self.seeds.is_empty()),
            ("methods", self.methods.is_empty()),
            ("backbones", self.backbones.is_empty()),
            ("datasets", self.datasets.is_empty()),
        ] {
            anyhow::ensure!(!empty, "`{what}` is empty");
        }
        for dataset in &self.datasets {
            anyhow::ensure!(
                !self.regimes_of(dataset).is_empty(),
                "dataset {:?} has no regimes: give the recipe `[[regimes]]` or the dataset \
                 `[[datasets.regimes]]`",
                dataset.name
            );
        }
        anyhow::ensure!(
            ["cpu", "paper", "study"].contains(&self.profile.as_str()),
            "profile {:?}: expected cpu, paper or study",
            self.profile
        );
        anyhow::ensure!(self.folds >= 1, "`folds` must be at least 1");
        for r in self.datasets.iter().flat_map(|d| self.regimes_of(d)) {
            anyhow::ensure!(
                r.n_train > 0 && r.n_val > 0,
                "regime {}: both sizes must be > 0",
                r.name()
            );
            let most = genseg_data::split::Split::low_data_fold_count(r.n_train, r.n_val);
            anyhow::ensure!(
                self.folds <= most,
                "regime {}: {} folds asked, its labelled pool has {most} disjoint validation \
                 folds",
                r.name(),
                self.folds
            );
        }
        let mut names: Vec<&str> = self.datasets.iter().map(|d| d.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        anyhow::ensure!(
            names.len() == self.datasets.len(),
            "two datasets share a name"
        );
        for kv in self
            .sets
            .iter()
            .chain(&self.strong_sets)
            .chain(&self.pretrain_sets)
        {
            anyhow::ensure!(kv.contains('='), "override {kv:?}: expected KEY=VALUE");
        }
        Ok(())
    }

    /// Every run of the grid, in the order the pool starts them: fold-major (the standard
    /// split's runs, which the test tables report, first), then seed-major, so an
    /// interrupted sweep has whole seeds of every cell rather than all seeds of a few.
    pub fn expand(&self, data_root: &Path, out: &Path) -> Vec<RunSpec> {
        let mut runs = Vec::new();
        for fold in 0..self.folds {
            for &seed in &self.seeds {
                for dataset in &self.datasets {
                    for regime in self.regimes_of(dataset) {
                        for backbone in &self.backbones {
                            for method in &self.methods {
                                let cell = Cell {
                                    dataset,
                                    regime,
                                    backbone,
                                    method,
                                    seed,
                                    fold,
                                };
                                runs.push(self.run(data_root, out, &cell));
                            }
                        }
                    }
                }
            }
        }
        runs
    }

    /// The labelled-set sizes `dataset` is trained at: its own, else the recipe's.
    fn regimes_of<'a>(&'a self, dataset: &'a DatasetEntry) -> &'a [Regime] {
        if dataset.regimes.is_empty() {
            &self.regimes
        } else {
            &dataset.regimes
        }
    }

    fn run(&self, data_root: &Path, out: &Path, cell: &Cell) -> RunSpec {
        let Cell {
            dataset,
            regime,
            backbone,
            method,
            seed,
            fold,
        } = *cell;
        let variant = Variant::parse(method);
        let fold_suffix = |sep: char| {
            if fold == 0 {
                String::new()
            } else {
                format!("{sep}f{fold}")
            }
        };
        let name = format!(
            "{}-{}-{backbone}-{method}-s{seed}{}",
            dataset.name,
            regime.name(),
            fold_suffix('-')
        );
        let dir = out.join("runs").join(&name);
        let test_summary = dir.join("eval-test").join("summary.json");
        let mut common = vec![
            "--data".to_string(),
            s(&data_root.join(&dataset.path)),
            "--n-train".into(),
            regime.n_train.to_string(),
            "--n-val".into(),
            regime.n_val.to_string(),
            "--seed".into(),
            seed.to_string(),
            "--profile".into(),
            self.profile.clone(),
        ];
        if fold > 0 {
            common.extend(["--set".into(), format!("data.fold={fold}")]);
        }
        let mut steps = Vec::new();
        let mut generator = None;
        if variant.uses_generator() {
            // Its own generator, so that runs stay independent (pre-training is
            // deterministic: the runs of one seed get the same generator).
            let dir = out.join("runs").join(format!("{name}.generator"));
            let mut pretrain: Vec<String> = vec!["pretrain-generator".into()];
            pretrain.extend(pretrain_args(&common, &dir, &self.pretrain_sets));
            steps.push(Step {
                args: pretrain,
                resume: Some(dir.clone()),
                // Once the segmentation run is scored its generator is not needed again.
                done: Some(test_summary.clone()),
            });
            generator = Some(dir);
        }
        let backbone_set = format!("model.kind=\"{backbone}\"");
        let mut train: Vec<String> = vec!["train".into()];
        train.extend(variant.train_args(
            &common,
            generator.as_deref(),
            &dir,
            std::iter::once(&backbone_set).chain(&self.sets),
            &self.strong_sets,
        ));
        steps.push(Step {
            args: train,
            resume: Some(dir.clone()),
            done: Some(test_summary.clone()),
        });
        let mut scores = BTreeMap::from([("test".to_string(), test_summary)]);
        // The other folds only add validation Dice: not scored out of domain.
        for ood in dataset.ood.iter().filter(|_| fold == 0) {
            let set = ood
                .file_name()
                .map_or_else(|| "ood".into(), |n| n.to_string_lossy().into_owned());
            let report = dir.join(format!("eval-{set}"));
            let summary = report.join("summary.json");
            steps.push(Step {
                args: vec![
                    "evaluate".into(),
                    "--run".into(),
                    s(&dir),
                    "--data".into(),
                    s(&data_root.join(ood)),
                    "--out".into(),
                    s(&report),
                ],
                resume: None,
                done: Some(summary.clone()),
            });
            scores.insert(set, summary);
        }
        RunSpec {
            id: format!(
                "{}/{}/{backbone}/{method}/s{seed}{}",
                dataset.name,
                regime.name(),
                fold_suffix('/')
            ),
            dataset: dataset.name.clone(),
            regime: regime.name(),
            n_train: regime.n_train,
            n_val: regime.n_val,
            method: method.to_string(),
            backbone: backbone.to_string(),
            seed,
            fold,
            dir,
            steps,
            scores,
        }
    }
}

/// One run of the grid: where [`Recipe::expand`]'s loops are.
#[derive(Clone, Copy)]
struct Cell<'a> {
    dataset: &'a DatasetEntry,
    regime: &'a Regime,
    backbone: &'a str,
    method: &'a str,
    seed: u64,
    fold: usize,
}

fn known_recipes(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root.join("xtask/recipes"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let p = e.path();
            (p.extension()? == "toml")
                .then(|| p.file_stem().map(|s| s.to_string_lossy().into_owned()))?
        })
        .collect();
    names.sort();
    names
}

/// Whether every step of `run` is done.
pub fn finished(run: &RunSpec) -> bool {
    run.steps.iter().all(|s| s.action() == Action::Skip)
}

/// How `cargo xtask exp` executes the manifest.
pub struct Execution {
    /// Runs at a time on this machine.
    pub jobs: usize,
    /// Write the Slurm scripts instead of running.
    pub slurm: Option<SlurmOptions>,
}

/// What the sbatch scripts ask of the cluster.
#[derive(clap::Args, Clone, Debug)]
pub struct SlurmOptions {
    /// CPUs per array task (the compute threads of its run).
    #[arg(long = "slurm-cpus", default_value_t = 2)]
    pub cpus: usize,
    /// Wall-time limit per array task (`sbatch --time`).
    #[arg(long = "slurm-time", default_value = "04:00:00")]
    pub time: String,
    /// Partition (`sbatch --partition`); the cluster's default when absent.
    #[arg(long = "slurm-partition")]
    pub partition: Option<String>,
}

/// Expands `recipe` into `<out>/runs.jsonl` and runs it (or writes its Slurm scripts).
pub fn run(
    recipe: &Recipe,
    data_root: &Path,
    out: &Path,
    bin: &Path,
    how: &Execution,
) -> Result<()> {
    std::fs::create_dir_all(out.join("runs"))
        .with_context(|| format!("creating {}", out.display()))?;
    let runs = recipe.expand(data_root, out);
    let manifest_path = out.join("runs.jsonl");
    manifest::write(&manifest_path, &runs)?;
    eprintln!(
        "{}: {} runs in {}",
        recipe.description,
        runs.len(),
        manifest_path.display()
    );
    if let Some(slurm) = &how.slurm {
        return write_slurm(out, &manifest_path, runs.len(), bin, slurm);
    }
    let failed = run_local(&manifest_path, &runs, bin, how.jobs, out)?;
    crate::aggregate::run(out)?;
    if !failed.is_empty() {
        bail!(
            "{} run(s) failed: {} (logs in {}; the same command resumes them)",
            failed.len(),
            failed.join(", "),
            out.join("logs").display()
        );
    }
    Ok(())
}

/// The worker pool: `jobs` runs at a time, each `genseg run` with the machine's cores shared
/// among them and its output in `<out>/logs/<index>.log`; one progress bar with the ETA.
/// Every finished run also appends a line to `<out>/progress.log` (and to stderr when the
/// bar is hidden, as under `nohup`), so a sweep in the background shows where it is.
/// Returns the ids of the runs that failed.
fn run_local(
    manifest_path: &Path,
    runs: &[RunSpec],
    bin: &Path,
    jobs: usize,
    out: &Path,
) -> Result<Vec<String>> {
    let logs = out.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let todo: Vec<usize> = (0..runs.len()).filter(|&i| !finished(&runs[i])).collect();
    let bar = indicatif::ProgressBar::new(runs.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} runs, ETA {eta} {msg}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_position((runs.len() - todo.len()) as u64);
    let jobs = jobs.clamp(1, todo.len().max(1));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / jobs).max(1).to_string();
    let next = AtomicUsize::new(0);
    let failed = Mutex::new(Vec::new());
    let progress_path = out.join("progress.log");
    let progress = Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&progress_path)
            .with_context(|| format!("opening {}", progress_path.display()))?,
    );
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| {
                while let Some(&i) = todo.get(next.fetch_add(1, Ordering::SeqCst)) {
                    bar.set_message(runs[i].id.clone());
                    let started = std::time::Instant::now();
                    let ok = run_one(
                        manifest_path,
                        i,
                        bin,
                        &threads,
                        &logs.join(format!("{i}.log")),
                    );
                    let outcome = match ok {
                        Ok(()) => "finished",
                        Err(err) => {
                            bar.println(format!("run {i} ({}) failed: {err:#}", runs[i].id));
                            failed.lock().expect("no panics").push(runs[i].id.clone());
                            "failed"
                        }
                    };
                    bar.inc(1);
                    let line = progress_line(&bar, &runs[i].id, outcome, started.elapsed());
                    if bar.is_hidden() {
                        eprintln!("{line}");
                    }
                    // Losing a progress line must not stop the sweep; the run's own files
                    // say whether it finished.
                    let _ = writeln!(progress.lock().expect("no panics"), "{line}");
                }
            });
        }
    });
    bar.finish_with_message("done");
    Ok(failed.into_inner().expect("no panics"))
}

/// `[0:12:03] 3/60 runs: isic/3+1/unet/strong/s0 finished in 0:04:24, ETA 4:10:00`.
fn progress_line(
    bar: &indicatif::ProgressBar,
    id: &str,
    outcome: &str,
    took: std::time::Duration,
) -> String {
    use indicatif::FormattedDuration as Hms;
    format!(
        "[{}] {}/{} runs: {id} {outcome} in {}, ETA {}",
        Hms(bar.elapsed()),
        bar.position(),
        bar.length().unwrap_or(0),
        Hms(took),
        Hms(bar.eta())
    )
}

fn run_one(
    manifest_path: &Path,
    index: usize,
    bin: &Path,
    threads: &str,
    log: &Path,
) -> Result<()> {
    let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let status = Command::new(bin)
        .args([
            "run",
            "--manifest",
            &s(manifest_path),
            "--index",
            &index.to_string(),
        ])
        .env("RAYON_NUM_THREADS", threads)
        .stdout(Stdio::from(file.try_clone()?))
        .stderr(Stdio::from(file))
        .status()
        .with_context(|| format!("starting {}", bin.display()))?;
    anyhow::ensure!(status.success(), "{status}, see {}", log.display());
    Ok(())
}

/// Writes `<out>/slurm/`: `runs.sbatch` (a job array, one task per manifest line),
/// `aggregate.sbatch` (the tables) and `submit.sh`, which submits the array and the
/// aggregation as a job that starts after every task succeeded (`--dependency=afterok`).
fn write_slurm(
    out: &Path,
    manifest_path: &Path,
    n: usize,
    bin: &Path,
    opts: &SlurmOptions,
) -> Result<()> {
    let dir = out.join("slurm");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let xtask = std::env::current_exe().context("locating the xtask binary")?;
    let partition = opts
        .partition
        .as_ref()
        .map(|p| format!("#SBATCH --partition={p}\n"))
        .unwrap_or_default();
    let array = format!(
        "#!/bin/bash\n#SBATCH --job-name=genseg-runs\n#SBATCH --array=0-{last}\n\
         #SBATCH --cpus-per-task={cpus}\n#SBATCH --time={time}\n{partition}\
         #SBATCH --output={logs}/%a.log\n\n\
         # One manifest line per array task; re-submitting resumes unfinished runs.\n\
         export RAYON_NUM_THREADS=\"${{SLURM_CPUS_PER_TASK:-{cpus}}}\"\n\
         exec {bin} run --manifest {manifest} --index \"$SLURM_ARRAY_TASK_ID\"\n",
        last = n.saturating_sub(1),
        cpus = opts.cpus,
        time = opts.time,
        logs = s(&out.join("logs")),
        bin = s(bin),
        manifest = s(manifest_path),
    );
    let aggregate = format!(
        "#!/bin/bash\n#SBATCH --job-name=genseg-aggregate\n#SBATCH --cpus-per-task=1\n\
         #SBATCH --time=00:30:00\n{partition}#SBATCH --output={logs}/aggregate.log\n\n\
         exec {xtask} aggregate {out}\n",
        logs = s(&out.join("logs")),
        xtask = s(&xtask),
        out = s(out),
    );
    let submit = format!(
        "#!/bin/bash\n# Submits the runs as a job array and the aggregation after all of them.\n\
         set -euo pipefail\nmkdir -p {logs}\n\
         runs=$(sbatch --parsable {array})\n\
         sbatch --parsable --dependency=afterok:\"${{runs%%;*}}\" {aggregate}\n",
        logs = s(&out.join("logs")),
        array = s(&dir.join("runs.sbatch")),
        aggregate = s(&dir.join("aggregate.sbatch")),
    );
    for (file, text) in [
        ("runs.sbatch", array),
        ("aggregate.sbatch", aggregate),
        ("submit.sh", submit),
    ] {
        let path = dir.join(file);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    eprintln!(
        "wrote {}: submit with `bash {}`",
        dir.display(),
        s(&dir.join("submit.sh"))
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECIPE: &str = r#"
description = "two methods on a pool"
seeds = [0, 1]
methods = ["baseline", "strong-separate"]
[[datasets]]
name = "lungs"
path = "montgomery"
ood = ["/elsewhere/ph2"]
[[regimes]]
n_train = 7
n_val = 2
"#;

    #[test]
    fn a_recipe_expands_seed_major_into_resolved_runs() -> Result<()> {
        let recipe: Recipe = toml::from_str(RECIPE)?;
        recipe.check()?;
        let runs = recipe.expand(Path::new("/data"), Path::new("/exp"));
        let ids: Vec<&str> = runs.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "lungs/7+2/unet/baseline/s0",
                "lungs/7+2/unet/strong-separate/s0",
                "lungs/7+2/unet/baseline/s1",
                "lungs/7+2/unet/strong-separate/s1"
            ]
        );
        let plain = &runs[0];
        assert_eq!(
            plain.steps.len(),
            2,
            "train, then the out-of-domain evaluation"
        );
        let train = plain.steps[0].args.join(" ");
        assert!(train.starts_with("train --data /data/montgomery --n-train 7 --n-val 2 --seed 0 --profile cpu --method baseline --out /exp/runs/lungs-7+2-unet-baseline-s0"), "{train}");
        assert!(train.ends_with("--set model.kind=\"unet\""), "{train}");
        assert_eq!(plain.steps[1].args[4], "/elsewhere/ph2");
        assert_eq!(plain.scores.keys().collect::<Vec<_>>(), ["ph2", "test"]);
        let separate = &runs[1];
        assert_eq!(separate.steps.len(), 3);
        assert_eq!(separate.steps[0].args[0], "pretrain-generator");
        let train = separate.steps[1].args.join(" ");
        assert!(train.contains("--method separate --recipe strong --generator /exp/runs/lungs-7+2-unet-strong-separate-s0.generator"), "{train}");
        Ok(())
    }

    /// Every run, finished or failed, leaves one line in `<out>/progress.log`, and the
    /// failed ones are returned.
    #[cfg(unix)]
    #[test]
    fn strong_sets_reach_only_the_strong_recipe_runs() -> Result<()> {
        let recipe: Recipe = toml::from_str(&format!(
            "sets = [\"train.iterations=9\"]\nstrong_sets = [\"train.optimizer=\\\"sgd\\\"\"]\n{RECIPE}"
        ))?;
        recipe.check()?;
        let runs = recipe.expand(Path::new("/data"), Path::new("/exp"));
        let train_args = |run: &RunSpec| {
            let train = run.steps.iter().find(|s| s.args[0] == "train").unwrap();
            train.args.join(" ")
        };
        let plain = train_args(&runs[0]);
        assert!(plain.ends_with("--set train.iterations=9"), "{plain}");
        assert!(!plain.contains("sgd"), "{plain}");
        let strong = train_args(&runs[1]);
        assert!(
            strong.contains("--recipe strong")
                && strong.ends_with("--set train.iterations=9 --set train.optimizer=\"sgd\""),
            "{strong}"
        );
        Ok(())
    }

    #[test]
    fn the_pool_logs_each_run_and_returns_the_failed() -> Result<()> {
        let recipe: Recipe = toml::from_str(RECIPE)?;
        let tmp = tempfile::tempdir()?;
        let out = tmp.path();
        let runs = recipe.expand(Path::new("/data"), out);
        let manifest_path = out.join("runs.jsonl");
        manifest::write(&manifest_path, &runs)?;
        for (bin, outcome, failed) in [("/bin/true", "finished", 0), ("/bin/false", "failed", 4)] {
            let _ = std::fs::remove_file(out.join("progress.log"));
            let got = run_local(&manifest_path, &runs, Path::new(bin), 2, out)?;
            assert_eq!(got.len(), failed, "{got:?}");
            let log = std::fs::read_to_string(out.join("progress.log"))?;
            assert_eq!(log.lines().count(), 4, "{log}");
            assert!(log.contains(" 4/4 runs: "), "{log}");
            for run in &runs {
                assert!(log.contains(&format!("{} {outcome} in ", run.id)), "{log}");
            }
        }
        Ok(())
    }

    /// `folds = K` adds, after every standard-split run, the runs of folds 1 to K-1: same
    /// seed, `data.fold=i` for the pre-training and the training, no out-of-domain scoring.
    #[test]
    fn folds_add_runs_on_the_other_validation_folds() -> Result<()> {
        let recipe: Recipe = toml::from_str(&format!("folds = 2\n{RECIPE}"))?;
        recipe.check()?;
        let runs = recipe.expand(Path::new("/data"), Path::new("/exp"));
        let ids: Vec<&str> = runs.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids.len(), 8);
        assert_eq!(ids[4], "lungs/7+2/unet/baseline/s0/f1");
        assert_eq!(ids[7], "lungs/7+2/unet/strong-separate/s1/f1");
        assert!(runs[..4].iter().all(|r| r.fold == 0));
        let fold = &runs[5];
        assert_eq!((fold.fold, fold.seed), (1, 0));
        assert_eq!(
            fold.dir,
            Path::new("/exp/runs/lungs-7+2-unet-strong-separate-s0-f1")
        );
        assert_eq!(fold.scores.keys().collect::<Vec<_>>(), ["test"]);
        assert_eq!(fold.steps.len(), 2, "pre-training and training, no ood");
        for step in &fold.steps {
            assert!(
                step.args.join(" ").contains("--set data.fold=1"),
                "{step:?}"
            );
        }
        Ok(())
    }

    /// A dataset's own `regimes` replace the recipe's for that dataset only.
    #[test]
    fn a_dataset_may_name_its_own_regimes() -> Result<()> {
        let recipe: Recipe = toml::from_str(&format!(
            "{RECIPE}
[[datasets]]
name = \"skin\"
path = \"isic\"
[[datasets.regimes]]
n_train = 32
n_val = 8
"
        ))?;
        recipe.check()?;
        let runs = recipe.expand(Path::new("/data"), Path::new("/exp"));
        let ids: Vec<&str> = runs.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            &ids[..4],
            [
                "lungs/7+2/unet/baseline/s0",
                "lungs/7+2/unet/strong-separate/s0",
                "skin/32+8/unet/baseline/s0",
                "skin/32+8/unet/strong-separate/s0"
            ]
        );
        assert_eq!(ids.len(), 8);
        let train = runs[2].steps[0].args.join(" ");
        assert!(
            train.contains("--data /data/isic --n-train 32 --n-val 8"),
            "{train}"
        );

        let bare = RECIPE.split("[[regimes]]").next().unwrap();
        let err = toml::from_str::<Recipe>(bare)?
            .check()
            .unwrap_err()
            .to_string();
        assert!(err.contains("dataset \"lungs\" has no regimes"), "{err}");
        Ok(())
    }

    #[test]
    fn a_bad_recipe_is_refused_with_the_reason() {
        for (bad, reason) in [
            (
                RECIPE.replace("seeds = [0, 1]", "seeds = []"),
                "`seeds` is empty",
            ),
            (RECIPE.replace("n_val = 2", "n_val = 0"), "regime 7+0"),
            (format!("profile = \"fast\"\n{RECIPE}"), "profile \"fast\""),
            (
                format!("folds = 5\n{RECIPE}"),
                "5 folds asked, its labelled pool has 4",
            ),
            (format!("folds = 0\n{RECIPE}"), "at least 1"),
        ] {
            let recipe: Recipe = toml::from_str(&bad).unwrap();
            let err = recipe.check().unwrap_err().to_string();
            assert!(err.contains(reason), "{err}");
        }
        assert!(toml::from_str::<Recipe>(&format!("typo = 1\n{RECIPE}")).is_err());
    }

    #[test]
    fn the_shipped_recipes_parse() -> Result<()> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let names = known_recipes(root);
        assert!(names.len() >= 5, "{names:?}");
        for name in names {
            let (_, recipe) = Recipe::load(root, &name)?;
            assert!(!recipe.expand(Path::new("d"), Path::new("o")).is_empty());
        }
        Ok(())
    }
}
