//! Supervised training of a segmentation model: the baseline, the
//! augmentation baselines (`genseg train --method baseline|flip|...`) and the
//! "Separate" baseline (`--method separate`).
//!
//! One iteration: a batch of real pairs (order from a per-epoch seeded
//! shuffle), the configured loss, plus for augmentation methods the same loss
//! on an augmented copy weighted by `augment.weight`, or for `separate` the
//! same loss on a synthetic batch weighted by `separate.weight`: the batch's
//! masks augmented afresh and painted by a frozen pre-trained generator
//! ([`crate::synth`]); backward; optimizer step. Every `val_every` iterations the model is scored on the validation
//! split (Dice, eval mode) and the best is checkpointed to `best/`; `last/` is
//! refreshed every `checkpoint_every` iterations, at the end and on Ctrl-C.
//! Resuming from `last/` is bit-exact: weights, BatchNorm statistics and the
//! optimizer state are restored, and every random draw is a pure function of
//! the seed and the iteration (see [`crate::seeding`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use genseg_backbones::SegModel;
use genseg_backbones::metrics::{binarize_logits, binarize_targets, case_metrics};
use genseg_backbones::report::Summary;
use genseg_backbones::unet::UNet;
use genseg_data::dataset::Dataset;
use genseg_data::split::{Split, write_split_file};
use genseg_nn::checkpoint::Checkpoint;
use genseg_nn::optim::Optimizer;
use genseg_nn::params::ParamStore;
use rand::seq::SliceRandom;
use serde_json::json;

use crate::augment::augment_batch;
use crate::config::{Method, RunConfig};
use crate::driver::{Cadence, LoopEnd, LoopTask, extra_f64, extra_u64, run_loop};
use crate::evaluate::evaluate_model;
use crate::plot::{Series, plot_panels};
use crate::pretrain::{DISCRIMINATOR_PREFIX, GENERATOR_PREFIX};
use crate::run_dir::{MetricsLog, RunDir, Which, read_lines, series};
use crate::seeding::{Purpose, rng_for, seed_for};
use crate::synth::{Synthesizer, load_generator};

/// What a finished (or interrupted) training run reports.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// Iterations completed.
    pub iterations: u64,
    /// Best validation Dice and the iteration it was reached at.
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

/// Builds the configured segmentation model in a fresh, seeded store.
pub fn build_model(cfg: &RunConfig, device: &Device) -> Result<(ParamStore, UNet)> {
    let store = ParamStore::new(
        seed_for(cfg.seed, Purpose::Weights),
        candle_core::DType::F32,
        device,
    );
    let model = UNet::new(&cfg.model.unet, store.var_builder())?;
    Ok((store, model))
}

/// The batch of iteration `t`: a continuous stream over per-epoch shuffles, so
/// every batch is full and the order depends only on `(seed, t)`.
pub(crate) fn batch_indices(seed: u64, n: usize, batch: usize, t: u64) -> Vec<usize> {
    let start = t as usize * batch;
    let mut cached: Option<(usize, Vec<usize>)> = None;
    (start..start + batch)
        .map(|k| {
            let epoch = k / n;
            if cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
                let mut perm: Vec<usize> = (0..n).collect();
                perm.shuffle(&mut rng_for(seed, Purpose::BatchOrder, epoch as u64));
                cached = Some((epoch, perm));
            }
            cached.as_ref().expect("just set").1[k % n]
        })
        .collect()
}

/// Mean per-case Dice of `model` on `data` (eval mode).
pub fn validation_dice(
    model: &dyn SegModel,
    data: &Dataset,
    cfg: &RunConfig,
    device: &Device,
) -> Result<f64> {
    let indices: Vec<usize> = (0..data.len()).collect();
    let mut dice = Vec::with_capacity(data.len());
    for chunk in indices.chunks(cfg.train.batch_size.max(1)) {
        let (x, y) = data.batch(chunk, device)?;
        let logits = model.forward_t(&x, false)?;
        for (p, t) in binarize_logits(&logits)?
            .iter()
            .zip(binarize_targets(&y)?.iter())
        {
            if let Some(d) = case_metrics(p, t, &cfg.eval)?.dice {
                dice.push(d);
            }
        }
    }
    Ok(if dice.is_empty() {
        f64::NAN
    } else {
        dice.iter().sum::<f64>() / dice.len() as f64
    })
}

struct Trainer<'a> {
    cfg: RunConfig,
    run: RunDir,
    device: Device,
    train_set: Dataset,
    val_set: Dataset,
    test_set: Option<Dataset>,
    store: ParamStore,
    model: UNet,
    opt: Box<dyn Optimizer>,
    iteration: u64,
    best: (f64, u64),
    metrics: MetricsLog,
    stop: &'a AtomicBool,
    /// The frozen generator of `--method separate`.
    synth: Option<Synthesizer>,
}

/// Loads the generator of `--method separate` and checks it against the data:
/// same image size and channels.
fn synthesizer(cfg: &RunConfig, channels: usize, device: &Device) -> Result<Option<Synthesizer>> {
    if cfg.method != Method::Separate {
        return Ok(None);
    }
    let s = &cfg.separate;
    let loaded = load_generator(&s.generator, s.checkpoint, device)?;
    anyhow::ensure!(
        loaded.image_size() == cfg.data.size as usize,
        "generator run {} makes {} px images but data.size is {}: pre-train at the same size \
         or set data.size={}",
        s.generator.display(),
        loaded.image_size(),
        cfg.data.size,
        loaded.image_size()
    );
    anyhow::ensure!(
        loaded.channels() == channels,
        "generator run {} makes {}-channel images but {} has {} channel(s)",
        s.generator.display(),
        loaded.channels(),
        cfg.data.path.display(),
        channels
    );
    let post = s.postprocess.config(channels, cfg.data.equalize_gamma);
    tracing::info!(
        "separate: generator {} (iteration {}), post-processing {:?}",
        loaded.checkpoint.display(),
        loaded.config.train.iterations,
        post.steps
    );
    Ok(Some(Synthesizer::new(loaded, post)?))
}

/// A new run folder with everything a training pipeline starts from.
pub(crate) struct PreparedRun {
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
pub(crate) fn prepare_run(cfg: RunConfig, out: &Path) -> Result<PreparedRun> {
    let mut cfg = cfg;
    // Absolute, so `--resume` from another working directory finds the data and the
    // generator run.
    let absolute = |path: &Path, what: &str| -> Result<PathBuf> {
        std::fs::canonicalize(path).with_context(|| format!("{what} {} not found", path.display()))
    };
    cfg.data.path = absolute(&cfg.data.path, "dataset folder")?;
    if cfg.method == Method::Separate {
        cfg.separate.generator = absolute(&cfg.separate.generator, "generator run")?;
    }
    if cfg.method == Method::Genseg && !cfg.genseg.generator.as_os_str().is_empty() {
        cfg.genseg.generator = absolute(&cfg.genseg.generator, "generator run")?;
    }
    let run = RunDir::create(out)?;
    crate::log_to_file(&run.log_path())?;
    let data = cfg.data.load(&cfg.data.path)?;
    cfg.model.unet.in_channels = data.channels();
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

/// The train, validation and (possibly empty) test subsets of `split`.
pub(crate) fn subsets(
    data: &Dataset,
    split: &Split,
) -> Result<(Dataset, Dataset, Option<Dataset>)> {
    let subset = |ids: &[String]| -> Result<Dataset> { Ok(data.subset(&data.indices_of(ids)?)?) };
    let test = if split.test.is_empty() {
        None
    } else {
        Some(subset(&split.test)?)
    };
    Ok((subset(&split.train)?, subset(&split.val)?, test))
}

/// Starts a new run in `out`.
pub fn train(
    cfg: RunConfig,
    out: &Path,
    device: &Device,
    stop: &AtomicBool,
) -> Result<TrainOutcome> {
    cfg.validate()?;
    if cfg.method == Method::Genseg {
        return crate::end_to_end::train(cfg, out, device, stop);
    }
    let PreparedRun {
        cfg,
        run,
        data,
        split,
    } = prepare_run(cfg, out)?;
    // Fail before config.toml is written when the generator does not fit the data.
    let synth = synthesizer(&cfg, data.channels(), device)?;
    run.write_config(&cfg)?;
    let trainer = Trainer::new(cfg, run, device, &data, &split, stop, None, synth)?;
    trainer.run()
}

/// Continues the run in `run_dir` from its `last/` checkpoint.
pub fn resume(run_dir: &Path, device: &Device, stop: &AtomicBool) -> Result<TrainOutcome> {
    let run = RunDir::open(run_dir)?;
    crate::log_to_file(&run.log_path())?;
    let cfg: RunConfig = run.read_config()?;
    cfg.validate()?;
    if cfg.method == Method::Genseg {
        return crate::end_to_end::resume(cfg, run, device, stop);
    }
    let data = cfg.data.load(&cfg.data.path)?;
    let split = run.split(&data.ids())?;
    let ckpt = run.last_checkpoint()?;
    let synth = synthesizer(&cfg, data.channels(), device)?;
    let trainer = Trainer::new(cfg, run, device, &data, &split, stop, ckpt, synth)?;
    trainer.run()
}

impl<'a> Trainer<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        cfg: RunConfig,
        run: RunDir,
        device: &Device,
        data: &Dataset,
        split: &Split,
        stop: &'a AtomicBool,
        ckpt: Option<Checkpoint>,
        synth: Option<Synthesizer>,
    ) -> Result<Self> {
        let (train_set, val_set, test_set) = subsets(data, split)?;
        let (store, model) = build_model(&cfg, device)?;
        let mut opt = cfg.train.build_optimizer(store.trainable_vars())?;
        let (iteration, best) = match &ckpt {
            Some(c) => {
                store
                    .load_named_tensors(&c.weights, true)
                    .context("restoring weights from last/")?;
                c.restore_optimizer("segmenter", opt.as_mut())
                    .context("resuming from last/")?;
                let best_dice = extra_f64(&c.extra, "best_val_dice").unwrap_or(f64::NEG_INFINITY);
                let best_it = extra_u64(&c.extra, "best_iteration").unwrap_or(0);
                (c.step, (best_dice, best_it))
            }
            None => (0, (f64::NEG_INFINITY, 0)),
        };
        let metrics = MetricsLog::open(&run.metrics_path(), Some(iteration))?;
        Ok(Self {
            cfg,
            run,
            device: device.clone(),
            train_set,
            val_set,
            test_set,
            store,
            model,
            opt,
            iteration,
            best,
            metrics,
            stop,
            synth,
        })
    }

    fn train_step(&mut self) -> Result<(f64, Option<f64>)> {
        let idx = batch_indices(
            self.cfg.seed,
            self.train_set.len(),
            self.cfg.train.batch_size,
            self.iteration,
        );
        let (x, y) = self.train_set.batch(&idx, &self.device)?;
        let loss_fn = &self.cfg.train.loss;
        let real = loss_fn.forward(&self.model.forward_t(&x, true)?, &y)?;
        let mut total = real.clone();
        let mut aug_value = None;
        if let Some(synth) = &self.synth {
            let it = self.iteration;
            let seed = self.cfg.seed;
            let batch = synth.synthesize(
                &y,
                Some(&mut rng_for(seed, Purpose::MaskAugment, it)),
                &mut rng_for(seed, Purpose::GeneratorDropout, it),
                &mut rng_for(seed, Purpose::PostProcess, it),
            )?;
            let syn = loss_fn.forward(&self.model.forward_t(&batch.images, true)?, &batch.masks)?;
            aug_value = Some(syn.to_scalar::<f32>()? as f64);
            total = (total + (syn * self.cfg.separate.weight)?)?;
        } else if self.cfg.method != Method::Baseline {
            let mut rng = rng_for(self.cfg.seed, Purpose::Augment, self.iteration);
            let (xa, ya) = augment_batch(&x, &y, self.cfg.method, &self.cfg.augment, &mut rng)?;
            let aug = loss_fn.forward(&self.model.forward_t(&xa, true)?, &ya)?;
            aug_value = Some(aug.to_scalar::<f32>()? as f64);
            total = (total + (aug * self.cfg.augment.weight)?)?;
        }
        let grads = total.backward()?;
        self.opt.step(&grads)?;
        Ok((real.to_scalar::<f32>()? as f64, aug_value))
    }

    fn run(mut self) -> Result<TrainOutcome> {
        let cadence = Cadence {
            total: self.cfg.train.iterations,
            val_every: self.cfg.train.val_every,
            log_every: self.cfg.train.log_every,
            checkpoint_every: self.cfg.train.checkpoint_every,
        };
        let stop = self.stop;
        let end = run_loop(&mut self, cadence, stop, Instant::now())?;
        finish_training(
            &self.run,
            &self.cfg,
            &self.store,
            &self.model,
            self.test_set.as_ref(),
            &self.device,
            self.iteration,
            self.best,
            end,
        )
    }
}

impl LoopTask for Trainer<'_> {
    fn iteration(&self) -> u64 {
        self.iteration
    }

    fn step(&mut self) -> Result<serde_json::Map<String, serde_json::Value>> {
        let (loss, aug) = self.train_step()?;
        self.iteration += 1;
        let mut record = serde_json::Map::new();
        record.insert("loss".into(), json!(loss));
        record.insert("lr".into(), json!(self.opt.learning_rate()));
        if let Some(a) = aug {
            let key = if self.cfg.method == Method::Separate {
                "loss_synthetic"
            } else {
                "loss_augmented"
            };
            record.insert(key.into(), json!(a));
        }
        Ok(record)
    }

    fn validate(&mut self, it: u64, record: &mut serde_json::Value) -> Result<String> {
        let dice = validation_dice(&self.model, &self.val_set, &self.cfg, &self.device)?;
        record["val_dice"] = json!(dice);
        if keep_if_better(&mut self.best, dice, it) {
            self.checkpoint(Which::Best)?;
        }
        tracing::debug!(iteration = it, val_dice = dice, "validated");
        Ok(format!(
            "val Dice {dice:.4}  best {:.4} @{}",
            self.best.0, self.best.1
        ))
    }

    fn checkpoint(&self, which: Which) -> Result<()> {
        let mut optimizers = BTreeMap::new();
        optimizers.insert("segmenter".to_string(), self.opt.state()?);
        let ckpt = Checkpoint {
            step: self.iteration,
            weights: self.store.named_tensors()?,
            optimizers,
            rng: BTreeMap::new(),
            config_toml: toml::to_string_pretty(&self.cfg)?,
            extra: json!({
                "best_val_dice": self.best.0,
                "best_iteration": self.best.1,
                "method": self.cfg.method.to_string(),
            }),
        };
        self.run.save_checkpoint(which, &ckpt)
    }

    fn plot(&self) -> Result<()> {
        let lines = read_lines(&self.run.metrics_path())?;
        let pts = |key: &str| series(&lines, key);
        let (loss, val) = (pts("loss"), pts("val_dice"));
        let (aug, aug_label) = if self.cfg.method == Method::Separate {
            (pts("loss_synthetic"), "synthetic")
        } else {
            (pts("loss_augmented"), "augmented")
        };
        let mut loss_series = vec![Series {
            label: "real",
            points: &loss,
            color: plotters::style::BLUE,
        }];
        if !aug.is_empty() {
            loss_series.push(Series {
                label: aug_label,
                points: &aug,
                color: plotters::style::GREEN,
            });
        }
        plot_panels(
            &self.run.progress_path(),
            &[
                ("training loss", "loss", loss_series),
                (
                    "validation",
                    "Dice",
                    vec![Series {
                        label: "val Dice",
                        points: &val,
                        color: plotters::style::RED,
                    }],
                ),
            ],
        )
    }

    fn metrics(&mut self) -> &mut MetricsLog {
        &mut self.metrics
    }
}

/// Keeps `(dice, it)` as the best when strictly better, like the reference (ties keep the
/// earlier model); a NaN first score (no foreground anywhere) still gives a `best/`.
pub(crate) fn keep_if_better(best: &mut (f64, u64), dice: f64, it: u64) -> bool {
    let better = dice > best.0 || (best.0 == f64::NEG_INFINITY && dice.is_nan());
    if better {
        *best = (dice, it);
    }
    better
}

/// Logs the end of a segmentation run and, unless interrupted, scores `best/` on the test
/// split into `eval-test/`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn finish_training(
    run: &RunDir,
    cfg: &RunConfig,
    store: &ParamStore,
    model: &UNet,
    test_set: Option<&Dataset>,
    device: &Device,
    iterations: u64,
    best: (f64, u64),
    end: LoopEnd,
) -> Result<TrainOutcome> {
    if end.interrupted {
        tracing::warn!(
            "interrupted at iteration {iterations}: last/ saved; continue with `genseg train --resume {}`",
            run.root().display()
        );
    }
    tracing::info!(
        "trained {iterations} iterations in {:.1} s; best validation Dice {:.4} at iteration {}",
        end.seconds,
        best.0,
        best.1
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
        best_val_dice: best.0,
        best_iteration: best.1,
        interrupted: end.interrupted,
        test,
        seconds: end.seconds,
    })
}

/// The segmentation model's tensors of a checkpoint: an end-to-end GenSeg checkpoint also
/// holds the generator's and discriminator's, under their prefixes.
pub fn segmenter_weights(
    weights: &BTreeMap<String, candle_core::Tensor>,
) -> BTreeMap<String, candle_core::Tensor> {
    let other = [
        format!("{GENERATOR_PREFIX}."),
        format!("{DISCRIMINATOR_PREFIX}."),
    ];
    weights
        .iter()
        .filter(|(k, _)| !other.iter().any(|p| k.starts_with(p.as_str())))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_full_cover_each_epoch_and_are_reproducible() {
        let n = 7;
        let mut seen = vec![0usize; n];
        // 7 iterations of batch 2 = exactly 2 epochs.
        for t in 0..7 {
            let b = batch_indices(3, n, 2, t);
            assert_eq!(b.len(), 2);
            assert_eq!(b, batch_indices(3, n, 2, t));
            for i in b {
                seen[i] += 1;
            }
        }
        assert!(seen.iter().all(|&c| c == 2), "{seen:?}");
        assert_ne!(
            (0..7)
                .flat_map(|t| batch_indices(3, n, 2, t))
                .collect::<Vec<_>>(),
            (0..7)
                .flat_map(|t| batch_indices(4, n, 2, t))
                .collect::<Vec<_>>()
        );
    }
}
