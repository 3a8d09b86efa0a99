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

#[cfg(test)]
mod tests {
    use genseg_data::phantom::{PhantomConfig, PhantomKind, write_phantoms};

    use super::*;
    use crate::config::Profile;
    use crate::learner::Silent;
    use crate::run_dir::read_lines;

    /// Past `train.lambda_fade` a supervised method's second term is not computed at all.
    #[test]
    fn the_second_term_stops_where_lambda_has_faded() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data");
        write_phantoms(&data, &PhantomConfig::new(PhantomKind::Lungs, 32, 0), 12)?;
        let mut cfg = RunConfig::profile(Profile::Cpu);
        cfg.method = Method::Flip;
        cfg.data.path = data;
        cfg.data.size = 32;
        cfg.model.unet.base_width = 2;
        cfg.model.unet.depth = 2;
        (cfg.train.iterations, cfg.train.val_every) = (4, 4);
        cfg.train.log_every = 1;
        cfg.train.lambda_fade = [0.25, 0.75];
        let run = dir.path().join("run");
        let stop = AtomicBool::new(false);
        train(cfg, &run, &Device::Cpu, &stop, &mut Silent)?;
        let lines = read_lines(&run.join("metrics.jsonl"))?;
        let augmented: Vec<bool> = lines
            .iter()
            .filter(|l| l.get("lr").is_some())
            .map(|l| l.get("loss_augmented").is_some())
            .collect();
        assert_eq!(augmented, [true, true, true, false]);
        Ok(())
    }
}
