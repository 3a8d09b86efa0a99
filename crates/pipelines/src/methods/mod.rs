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

use std::path::Path;
use std::sync::atomic::AtomicBool;

use anyhow::Result;
use candle_core::Device;
use genseg_nn::checkpoint::Checkpoint;

use crate::config::{Method, RunConfig};
use crate::learner::{Goal, Learner, Observer, Pipeline};
use crate::run::{PreparedRun, cadence, prepare_run, reopen_run, subsets};
use crate::segmenter::{TrainOutcome, finish_training};

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
    // Fail before config.toml is written when the generator does not fit the data.
    let extra = extra_term(&prepared.cfg, prepared.data.channels(), device)?;
    prepared.run.write_config(&prepared.cfg)?;
    supervised(prepared, None, extra, device, stop, observer)
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
    let extra = extra_term(&prepared.cfg, prepared.data.channels(), device)?;
    supervised(prepared, ckpt.as_ref(), extra, device, stop, observer)
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

/// Trains the segmenter of `prepared` on real pairs (+ `extra`), from `ckpt` when resuming.
fn supervised(
    prepared: PreparedRun,
    ckpt: Option<&Checkpoint>,
    extra: Option<Box<dyn baseline::ExtraTerm>>,
    device: &Device,
    stop: &AtomicBool,
    observer: &mut dyn Observer,
) -> Result<TrainOutcome> {
    let PreparedRun {
        cfg,
        run,
        data,
        split,
        lock: _lock,
    } = prepared;
    let (train_set, val_set, test_set) = subsets(&data, &split)?;
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
