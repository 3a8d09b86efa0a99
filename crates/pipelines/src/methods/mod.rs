//! The training methods, one module each, and the path every segmentation run shares:
//! [`train`] prepares a new run folder (data, split, resolved config) and [`resume`]
//! reopens one; both hand a [`Pipeline`](crate::learner::Pipeline) to the
//! [`Learner`](crate::learner::Learner) and score `best/` on the test split at the end.
//!
//! - [`baseline`]: real pairs only, and the supervised loop the next two extend;
//! - [`augment`]: + a flipped / rotated / translated copy (the augmentation baselines);
//! - [`separate`]: + synthetic pairs from a frozen pre-trained generator;
//! - [`genseg`]: generator, segmenter and α trained end to end (multi-level optimisation);
//! - [`pix2pix`]: the generator's pre-training (`genseg pretrain-generator`).

pub mod augment;
pub mod baseline;
pub mod genseg;
pub mod pix2pix;
pub mod separate;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use genseg_backbones::SegModel;
use genseg_backbones::evaluate::{mean_dice, score_cases};
use genseg_backbones::report::Summary;
use genseg_data::dataset::Dataset;
use genseg_data::split::{Split, write_split_file};
use genseg_generator::pix2pix::{DISCRIMINATOR_PREFIX, GENERATOR_PREFIX};
use genseg_nn::checkpoint::{Checkpoint, without_prefixes};
use genseg_nn::params::ParamStore;

use crate::config::{Method, RunConfig};
use crate::evaluate::evaluate_model;
use crate::learner::{Cadence, Goal, Learner, LoopEnd, Observer, Pipeline};
use crate::run_dir::{RunDir, Which};
use crate::seeding::{Purpose, rng_for, seed_for};

/// Checkpoint name of the segmenter's optimizer.
pub const SEGMENTER_OPTIMIZER: &str = "segmenter";

/// What a finished (or interrupted) training run reports.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// Iterations completed.
    pub iterations: u64,
    /// Best validation Dice.
    pub best_val_dice: f64,
    /// The iteration of `best/`.
    pub best_iteration: u64,
    /// `true` when stopped by Ctrl-C before the last iteration.
    pub interrupted: bool,
    /// Test-split evaluation of `best/` (when the split has test cases).
    pub test: Option<Summary>,
    /// Wall time of this invocation.
    pub seconds: f64,
}

/// Builds the configured segmentation model in a fresh store seeded from the run's seed.
pub fn build_model(cfg: &RunConfig, device: &Device) -> Result<(ParamStore, Box<dyn SegModel>)> {
    let store = ParamStore::new(
        seed_for(cfg.seed, Purpose::Weights),
        candle_core::DType::F32,
        device,
    );
    let model = cfg.model.build(store.var_builder())?;
    Ok((store, model))
}

/// The batch of iteration `t` of a run with seed `seed` (see [`genseg_data::sampler`]).
pub fn batch_indices(seed: u64, n: usize, batch: usize, t: u64) -> Vec<usize> {
    genseg_data::sampler::batch_indices(n, batch, t, |epoch| {
        rng_for(seed, Purpose::BatchOrder, epoch)
    })
}

/// Mean per-case Dice of `model` on `data` (eval mode), as `genseg evaluate` scores it.
pub fn validation_dice(
    model: &dyn SegModel,
    data: &Dataset,
    cfg: &RunConfig,
    device: &Device,
) -> Result<f64> {
    let cases = score_cases(model, data, cfg.train.batch_size, &cfg.eval, device)?;
    Ok(mean_dice(&cases))
}

/// The segmentation model's tensors of a checkpoint: a GenSeg checkpoint also holds the
/// generator's and discriminator's, under their prefixes.
pub fn segmenter_weights(weights: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    without_prefixes(weights, &[GENERATOR_PREFIX, DISCRIMINATOR_PREFIX])
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
}

/// Creates the run folder `out` for `cfg`: absolute data path, the pool loaded, the split
/// drawn (or read) and written. The caller writes config.toml once its own checks passed.
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
        cfg.adopt_generator(&pix2pix::read_generator_run(&dir)?);
    }
    let run = RunDir::create(out)?;
    crate::logging::log_to_file(&run.log_path())?;
    let data = cfg.data.load(&cfg.data.path)?;
    cfg.fit_to_data(data.channels());
    let split = cfg.data.split(&data.ids(), cfg.seed)?;
    write_split_file(&run.split_path(), std::slice::from_ref(&split))?;
    tracing::info!(
        "run {}: {} on {} ({} train / {} val / {} test, {} channel(s), {} px)",
        out.display(),
        cfg.method,
        cfg.data.path.display(),
        split.train.len(),
        split.val.len(),
        split.test.len(),
        data.channels(),
        cfg.data.size
    );
    Ok(PreparedRun {
        cfg,
        run,
        data,
        split,
    })
}

/// Reopens the run folder `run_dir` to continue it: logging to its train.log, its config
/// (checked), data and split, and its `last/` checkpoint (`None` when it has none yet).
pub fn reopen_run(run_dir: &Path) -> Result<(PreparedRun, Option<Checkpoint>)> {
    let run = RunDir::open(run_dir)?;
    crate::logging::log_to_file(&run.log_path())?;
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

/// Starts a new segmentation run in `out` with `cfg.method`.
pub fn train(
    cfg: RunConfig,
    out: &Path,
    device: &Device,
    stop: &AtomicBool,
    observer: &mut dyn Observer,
) -> Result<TrainOutcome> {
    cfg.validate()?;
    anyhow::ensure!(
        cfg.method != Method::Pix2pix,
        "method pix2pix pre-trains a generator: run it with `genseg pretrain-generator`"
    );
    let prepared = prepare_run(cfg, out)?;
    if prepared.cfg.method == Method::Genseg {
        return genseg::train(prepared, device, stop, observer);
    }
    let PreparedRun {
        cfg,
        run,
        data,
        split,
    } = prepared;
    // Fail before config.toml is written when the generator does not fit the data.
    let extra = extra_term(&cfg, data.channels(), device)?;
    run.write_config(&cfg)?;
    supervised(cfg, run, device, &data, &split, extra, None, stop, observer)
}

/// Continues the run in `run_dir` from its `last/` checkpoint.
pub fn resume(
    run_dir: &Path,
    device: &Device,
    stop: &AtomicBool,
    observer: &mut dyn Observer,
) -> Result<TrainOutcome> {
    let (prepared, ckpt) = reopen_run(run_dir)?;
    anyhow::ensure!(
        prepared.cfg.method != Method::Pix2pix,
        "{} is a generator pre-training run: resume it with `genseg pretrain-generator --resume`",
        run_dir.display()
    );
    if prepared.cfg.method == Method::Genseg {
        return genseg::resume(prepared, ckpt, device, stop, observer);
    }
    let PreparedRun {
        cfg,
        run,
        data,
        split,
    } = prepared;
    let extra = extra_term(&cfg, data.channels(), device)?;
    supervised(
        cfg,
        run,
        device,
        &data,
        &split,
        extra,
        ckpt.as_ref(),
        stop,
        observer,
    )
}

/// The extra loss term of a supervised method (none for the baseline).
fn extra_term(
    cfg: &RunConfig,
    channels: usize,
    device: &Device,
) -> Result<Option<Box<dyn baseline::ExtraTerm>>> {
    Ok(match cfg.method {
        Method::Baseline => None,
        Method::Separate => Some(Box::new(separate::SyntheticTerm::new(
            cfg, channels, device,
        )?)),
        Method::Flip | Method::Rotate | Method::Translate | Method::Combine => {
            Some(Box::new(augment::AugmentedTerm::new(cfg)))
        }
        Method::Genseg | Method::Pix2pix => {
            anyhow::bail!("{} is not a supervised method", cfg.method)
        }
    })
}

#[allow(clippy::too_many_arguments)]
fn supervised(
    cfg: RunConfig,
    run: RunDir,
    device: &Device,
    data: &Dataset,
    split: &Split,
    extra: Option<Box<dyn baseline::ExtraTerm>>,
    ckpt: Option<&Checkpoint>,
    stop: &AtomicBool,
    observer: &mut dyn Observer,
) -> Result<TrainOutcome> {
    let (train_set, val_set, test_set) = subsets(data, split)?;
    let mut learner = Learner::new(
        run.clone(),
        cadence(&cfg),
        toml::to_string_pretty(&cfg)?,
        Goal::Maximise,
        ckpt,
        observer,
        stop,
    )?;
    let mut pipeline =
        baseline::Supervised::new(cfg.clone(), device, (train_set, val_set), extra, ckpt)?;
    let end = learner.fit(&mut pipeline)?;
    let (store, model) = pipeline.segmenter();
    finish_training(
        &run,
        &cfg,
        store,
        model,
        test_set.as_ref(),
        device,
        pipeline.iteration(),
        end,
    )
}

/// Logs the end of a segmentation run and, unless interrupted, scores `best/` on the test
/// split into `eval-test/`.
#[allow(clippy::too_many_arguments)]
pub fn finish_training(
    run: &RunDir,
    cfg: &RunConfig,
    store: &ParamStore,
    model: &dyn SegModel,
    test_set: Option<&Dataset>,
    device: &Device,
    iterations: u64,
    end: LoopEnd,
) -> Result<TrainOutcome> {
    let best = end.best;
    if end.interrupted {
        tracing::warn!(
            "interrupted at iteration {iterations}: last/ saved; continue with `genseg train --resume {}`",
            run.root().display()
        );
    }
    tracing::info!(
        "trained {iterations} iterations in {:.1} s; best validation Dice {:.4} at iteration {}",
        end.seconds,
        best.score,
        best.iteration
    );
    let test = match (test_set, end.interrupted) {
        (Some(test_set), false) => {
            let best_dir = run.checkpoint(Which::Best);
            let ckpt = Checkpoint::load(&best_dir)
                .with_context(|| format!("loading {}", best_dir.display()))?;
            store.load_named_tensors(&segmenter_weights(&ckpt.weights), true)?;
            let out = run.root().join("eval-test");
            let summary = evaluate_model(
                model,
                test_set,
                cfg,
                device,
                &out,
                &cfg.data.path.display().to_string(),
                &best_dir.display().to_string(),
            )?;
            tracing::info!(
                "test split ({} cases): Dice {:.4} ± {:.4}, IoU {:.4} -> {}",
                summary.n_cases,
                summary.metrics["dice"].mean,
                summary.metrics["dice"].std,
                summary.metrics["iou"].mean,
                out.display()
            );
            Some(summary)
        }
        _ => None,
    };
    Ok(TrainOutcome {
        iterations,
        best_val_dice: best.score,
        best_iteration: best.iteration,
        interrupted: end.interrupted,
        test,
        seconds: end.seconds,
    })
}
