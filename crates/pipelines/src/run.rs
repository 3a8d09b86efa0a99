//! The two ways into a run folder that every method shares: [`prepare_run`] creates one
//! (absolute paths, the generator's sections adopted, data loaded and fitted, the split
//! drawn and written) and [`reopen_run`] opens one to continue it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use genseg_data::dataset::Dataset;
use genseg_data::split::{Split, write_split_file};
use genseg_nn::checkpoint::Checkpoint;

use crate::config::{Method, ModelKind, RunConfig};
use crate::learner::Cadence;
use crate::run_dir::{RunDir, RunLock, Which};

/// The configuration of the generator pre-training run `run` (an error when it is another
/// kind of run).
pub fn read_generator_run(run: &RunDir) -> Result<RunConfig> {
    let not_one = || {
        format!(
            "{} is not a generator pre-training run (made by `genseg pretrain-generator`)",
            run.root().display()
        )
    };
    let cfg: RunConfig = run.read_config().with_context(not_one)?;
    anyhow::ensure!(cfg.method == Method::Pix2pix, "{}", not_one());
    Ok(cfg)
}

/// The `which` checkpoint of the generator pre-training run `source` (an error naming the
/// run when it has none yet).
pub fn generator_checkpoint(source: &Path, which: Which) -> Result<Checkpoint> {
    RunDir::open(source)?
        .load_checkpoint(which)?
        .with_context(|| {
            format!(
                "generator run {} has no {}/ checkpoint yet",
                source.display(),
                which.name()
            )
        })
}

/// A new run folder with everything a training pipeline starts from.
pub struct PreparedRun {
    /// The configuration, with absolute paths and `in_channels` from the data.
    pub cfg: RunConfig,
    /// The run folder (created, logging to its train.log, split.json written).
    pub run: RunDir,
    /// The whole labelled pool.
    pub data: Dataset,
    /// The split in use.
    pub split: Split,
    /// The claim on the run folder, held while the run trains (for a new run, dropping it
    /// before config.toml is written removes what the start wrote).
    pub lock: RunLock,
}

/// Creates the run folder `out` for `cfg`: absolute data path, the pool loaded, the split
/// drawn (or read) and written. The caller writes config.toml once its own checks passed;
/// until then a failure (the returned lock dropped) withdraws what was written.
pub fn prepare_run(cfg: RunConfig, out: &Path) -> Result<PreparedRun> {
    let mut cfg = cfg;
    // Absolute, so `--resume` from another working directory finds the data and the
    // generator run.
    let absolute = |path: &Path, what: &str| -> Result<PathBuf> {
        std::fs::canonicalize(path).with_context(|| format!("{what} {} not found", path.display()))
    };
    cfg.data.path = absolute(&cfg.data.path, "dataset folder")?;
    if !cfg.data.split_file.as_os_str().is_empty() {
        cfg.data.split_file = absolute(&cfg.data.split_file, "split file")?;
    }
    if cfg.model.kind == ModelKind::Foundation {
        cfg.model.foundation.weights =
            absolute(&cfg.model.foundation.weights, "model.foundation.weights")?;
    }
    if !cfg.model.pretrained.as_os_str().is_empty() {
        cfg.model.pretrained = absolute(&cfg.model.pretrained, "pretrained weights")?;
    }
    if !cfg.consistency.run.as_os_str().is_empty() {
        cfg.consistency.run = absolute(&cfg.consistency.run, "consistency.run")?;
    }
    if cfg.method == Method::Separate {
        cfg.separate.generator = absolute(&cfg.separate.generator, "generator run")?;
    }
    if cfg.method == Method::Genseg && !cfg.genseg.generator.as_os_str().is_empty() {
        cfg.genseg.generator = absolute(&cfg.genseg.generator, "generator run")?;
    }
    let source = match cfg.method {
        Method::Separate => Some(cfg.separate.generator.clone()),
        Method::Genseg if !cfg.genseg.generator.as_os_str().is_empty() => {
            Some(cfg.genseg.generator.clone())
        }
        _ => None,
    };
    if let Some(source) = source {
        let dir = RunDir::open(&source)
            .with_context(|| format!("opening generator run {}", source.display()))?;
        cfg.adopt_generator(&read_generator_run(&dir)?);
    }
    let created_folder = !out.exists();
    let run = RunDir::create(out)?;
    // From here on a failure before config.toml is written withdraws the folder.
    let lock = RunLock::acquire_new(run.root(), created_folder)?;
    crate::logging::log_to_file(&run.log_path())?;
    let data = cfg.data.load(&cfg.data.path)?;
    cfg.fit_to_data(data.channels());
    let split = cfg.data.split(&data.ids(), cfg.seed)?;
    write_split_file(&run.split_path(), std::slice::from_ref(&split))?;
    tracing::info!(
        "run {}: {} on {} ({} train / {} val / {} test, {} channel(s), {} px, {})",
        out.display(),
        cfg.method,
        cfg.data.path.display(),
        split.train.len(),
        split.val.len(),
        split.test.len(),
        data.channels(),
        cfg.data.size,
        compute_threads()
    );
    Ok(PreparedRun {
        cfg,
        run,
        data,
        split,
        lock,
    })
}

/// The CPU compute threads (`RAYON_NUM_THREADS`), for the run log. They do not change the
/// numbers (genseg-nn's tests/thread_count.rs); before `e0afa36` they did, since they set
/// the order of float sums (on ISIC 32+8 one seed's test Dice moved by 8 points between 1
/// and 2 threads, docs/results.md), so the log of an older run says which count it ran at.
fn compute_threads() -> String {
    format!(
        "{} CPU compute thread(s)",
        candle_core::utils::get_num_threads()
    )
}

/// Reopens the run folder `run_dir` to continue it: logging to its train.log, its config
/// (checked), data and split, and its `last/` checkpoint (`None` when it has none yet).
pub fn reopen_run(run_dir: &Path) -> Result<(PreparedRun, Option<Checkpoint>)> {
    let run = RunDir::open(run_dir)?;
    let lock = RunLock::acquire(run.root())?;
    crate::logging::log_to_file(&run.log_path())?;
    tracing::info!("resuming run {}, {}", run_dir.display(), compute_threads());
    let cfg: RunConfig = run.read_config()?;
    cfg.validate()?;
    let data = cfg.data.load(&cfg.data.path)?;
    let split = run.split(&data.ids())?;
    let ckpt = run.last_checkpoint()?;
    Ok((
        PreparedRun {
            cfg,
            run,
            data,
            split,
            lock,
        },
        ckpt,
    ))
}

/// The train, validation and (possibly empty) test subsets of `split`.
pub fn subsets(data: &Dataset, split: &Split) -> Result<(Dataset, Dataset, Option<Dataset>)> {
    let subset = |ids: &[String]| -> Result<Dataset> { Ok(data.subset(&data.indices_of(ids)?)?) };
    let test = if split.test.is_empty() {
        None
    } else {
        Some(subset(&split.test)?)
    };
    Ok((subset(&split.train)?, subset(&split.val)?, test))
}

/// The learner's cadence from `[train]`.
pub fn cadence(cfg: &RunConfig) -> Cadence {
    let t = &cfg.train;
    Cadence {
        total: t.iterations,
        val_every: t.val_every,
        log_every: t.log_every,
        checkpoint_every: t.checkpoint_every,
    }
}
