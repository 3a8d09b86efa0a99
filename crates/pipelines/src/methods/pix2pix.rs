//! pix2pix pre-training of the mask-to-image generator (`genseg pretrain-generator`, a run
//! with `method = "pix2pix"`, spec §1.7): the warm-up that GenSeg and its "Separate"
//! baseline start from. The networks and the D and G steps are genseg-generator's
//! [`Pix2Pix`]; this module is the pipeline around them.
//!
//! One iteration on a batch of real training pairs `(x, m)` (order from the same per-epoch
//! seeded shuffle as `genseg train`): `fake = G(m)` in train mode (dropout masks drawn from a
//! per-iteration stream), a discriminator step on `½[GAN(D(m, fake.detach()) → 0) +
//! GAN(D(m, x) → 1)]`, then a generator step on `GAN(D(m, fake) → 1) + λ_L1 · |fake − x|`.
//! Both use Adam; the generator's optimizer holds its weights only, so the architecture
//! weights α stay at their initial values (the reference does not train them here either) but
//! are saved with the weights. The mask is `{0, 1}` and the target image `[0, 1]`, as in the
//! reference. With `train.transforms` each pair is first augmented by the spatial part of
//! the `[transforms]` chain (rotation, scaling, mirroring; image and mask alike, intensities
//! untouched), so that a handful of pairs cannot be memorised whole (docs/results.md, DRIVE).
//! With `consistency.run` the generator's step also gets `weight · BCE(S(fake), m)`, where
//! `S` is that run's frozen segmenter (eval mode): the painted image must show the mask.
//!
//! Every `val_every` iterations (and before the first) the generator synthesises images for
//! the validation masks; `metrics.jsonl` gets their L1 and SSIM against the real images, the
//! lowest L1 is checkpointed to `best/`, and `samples/iter_<n>.png` shows mask | real |
//! generated rows. Validation runs in train mode, as GenSeg synthesises, with the BatchNorm
//! running statistics restored afterwards so validating never changes training.
//! `last/` (both networks, both optimizers) is refreshed every `checkpoint_every`
//! iterations, at the end and on Ctrl-C; resuming from it is bit-exact.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use genseg_backbones::SegModel;
use genseg_data::dataset::Dataset;
use genseg_data::split::Split;
use genseg_data::transforms::TransformConfig;
use genseg_data::writer::{image_grid, images_from_tensor, write_image};
use genseg_generator::pix2pix::{DISCRIMINATOR_OPTIMIZER, GENERATOR_OPTIMIZER, Pix2Pix};
use genseg_generator::ssim::ssim;
use genseg_nn::checkpoint::Checkpoint;
use genseg_nn::ops::bce_with_logits;
use genseg_nn::optim::{Adam, AdamConfig, Optimizer};
use serde_json::{Map, Value, json};

use crate::config::{Method, RunConfig};
use crate::evaluate::load_run;
use crate::learner::{
    CheckpointMeta, Color, Figure, Goal, Learner, Observer, Pipeline, State, Validation, curve,
    panel,
};
use crate::run::{PreparedRun, cadence, prepare_run, read_generator_run, reopen_run, subsets};
use crate::run_dir::{RunDir, Which};
use crate::seeding::batch_indices;
use crate::seeding::{Purpose, rng_for, seed_for};
use crate::segmenter::{Segmenter, frozen_model};

/// Validation masks shown in each sample grid (rows).
pub const SAMPLE_ROWS: usize = 4;

/// Builds both networks of `cfg` (already fitted to the data), seeded from the run's
/// seed, with `adam` for their optimizers.
pub fn build_pix2pix(cfg: &RunConfig, adam: AdamConfig, device: &Device) -> Result<Pix2Pix> {
    Pix2Pix::new(
        &cfg.generator,
        &cfg.discriminator,
        cfg.gan,
        adam,
        (
            seed_for(cfg.seed, Purpose::GeneratorWeights),
            seed_for(cfg.seed, Purpose::DiscriminatorWeights),
        ),
        device,
    )
}

/// What a finished (or interrupted) pre-training run reports.
#[derive(Debug, Clone)]
pub struct PretrainOutcome {
    /// Iterations completed.
    pub iterations: u64,
    /// Validation L1 of the untrained generator (iteration 0).
    pub initial_val_l1: f64,
    /// Lowest validation L1 and the iteration of `best/`.
    pub best_val_l1: f64,
    /// The iteration of `best/`.
    pub best_iteration: u64,
    /// `true` when stopped by Ctrl-C before the last iteration.
    pub interrupted: bool,
    /// Wall time of this invocation.
    pub seconds: f64,
}

/// Validation scores of the generator.
#[derive(Debug, Clone, Copy)]
struct ValScores {
    l1: f64,
    ssim: f64,
}

/// The pix2pix pre-training pipeline.
struct Pretrainer {
    cfg: RunConfig,
    root: PathBuf,
    device: Device,
    train_set: Dataset,
    val_set: Dataset,
    nets: Pix2Pix,
    opt_g: Adam,
    /// The spatial chain the training pairs go through (`train.transforms`).
    pair_transforms: Option<TransformConfig>,
    /// The frozen segmenter of `consistency.run` and the term's weight.
    consistency: Option<(Segmenter, f64)>,
    iteration: u64,
    initial_l1: f64,
}

/// The frozen segmenter of `consistency.run` (its `best/` checkpoint) with the term's
/// weight, or `None` when the term is off. It must work at the generator's size and take
/// its channel count.
fn consistency_segmenter(cfg: &RunConfig, device: &Device) -> Result<Option<(Segmenter, f64)>> {
    let c = &cfg.consistency;
    if c.run.as_os_str().is_empty() {
        return Ok(None);
    }
    let loaded = load_run(&c.run, Which::Best, device)
        .with_context(|| format!("consistency.run {}", c.run.display()))?;
    anyhow::ensure!(
        loaded.cfg.data.size == cfg.data.size
            && loaded.cfg.model.in_channels() == cfg.generator.out_channels,
        "consistency.run {}: its segmenter takes {}-channel images at {} px, the generator \
         paints {}-channel images at {} px",
        c.run.display(),
        loaded.cfg.model.in_channels(),
        loaded.cfg.data.size,
        cfg.generator.out_channels,
        cfg.data.size
    );
    tracing::info!(
        "consistency term: weight {} x BCE of the frozen segmenter {} on the painted images",
        c.weight,
        loaded.checkpoint.display()
    );
    // Constant weights: the term's backward needs only the gradient of the painted images.
    Ok(Some((frozen_model(&loaded.cfg, &loaded.store)?, c.weight)))
}

/// The folder of sample grids.
pub fn samples_dir(run: &Path) -> PathBuf {
    run.join("samples")
}

/// Starts a new pre-training run in `out`.
pub fn pretrain(
    cfg: RunConfig,
    out: &Path,
    device: &Device,
    stop: &AtomicBool,
    observer: &mut dyn Observer,
) -> Result<PretrainOutcome> {
    anyhow::ensure!(
        cfg.method == Method::Pix2pix,
        "a generator pre-training run needs method = \"pix2pix\" (not {})",
        cfg.method
    );
    cfg.validate()?;
    let prepared = prepare_run(cfg, out)?;
    let PreparedRun {
        cfg, data, split, ..
    } = &prepared;
    anyhow::ensure!(
        !split.val.is_empty(),
        "the split has no validation cases: they choose the best generator"
    );
    prepared.run.write_config(cfg)?;
    tracing::info!(
        "pix2pix pre-training {}: {} ({} train / {} val, {} channel(s), {} px, ngf {}, ndf {})",
        out.display(),
        cfg.data.path.display(),
        split.train.len(),
        split.val.len(),
        data.channels(),
        cfg.data.size,
        cfg.generator.ngf,
        cfg.discriminator.ndf
    );
    fit(prepared, None, device, stop, observer)
}

/// Continues the pre-training run in `run_dir` from its `last/` checkpoint.
pub fn resume(
    run_dir: &Path,
    device: &Device,
    stop: &AtomicBool,
    observer: &mut dyn Observer,
) -> Result<PretrainOutcome> {
    read_generator_run(&RunDir::open(run_dir)?)?;
    let (prepared, ckpt) = reopen_run(run_dir)?;
    fit(prepared, ckpt.as_ref(), device, stop, observer)
}

/// Pre-trains the networks of `prepared`, from `ckpt` when resuming.
fn fit(
    prepared: PreparedRun,
    ckpt: Option<&Checkpoint>,
    device: &Device,
    stop: &AtomicBool,
    observer: &mut dyn Observer,
) -> Result<PretrainOutcome> {
    let PreparedRun {
        cfg,
        run,
        data,
        split,
        lock: _lock,
    } = prepared;
    let mut learner = Learner::new(
        run.clone(),
        cadence(&cfg),
        toml::to_string_pretty(&cfg)?,
        Goal::Minimise,
        ckpt,
        observer,
        stop,
    )?;
    let mut pipeline = Pretrainer::new(cfg, run.root(), device, &data, &split, ckpt)?;
    if pipeline.iteration == 0 {
        // The untrained generator's scores: the yardstick for what pre-training bought.
        let mut record = json!({"iteration": 0, "seconds": 0.0});
        learner.validate(&mut pipeline, 0, &mut record)?;
        learner.log(&record)?;
        tracing::info!(
            "untrained generator: validation L1 {:.4}, SSIM {:.4}",
            record["val_l1"].as_f64().unwrap_or(f64::NAN),
            record["val_ssim"].as_f64().unwrap_or(f64::NAN)
        );
    }
    let end = learner.fit(&mut pipeline)?;
    if end.interrupted {
        tracing::warn!(
            "interrupted at iteration {}: last/ saved; continue with `genseg pretrain-generator --resume {}`",
            pipeline.iteration,
            run.root().display()
        );
    }
    tracing::info!(
        "pre-trained {} iterations in {:.1} s; validation L1 {:.4} untrained, best {:.4} at iteration {}",
        pipeline.iteration,
        end.seconds,
        pipeline.initial_l1,
        end.best.score,
        end.best.iteration
    );
    Ok(PretrainOutcome {
        iterations: pipeline.iteration,
        initial_val_l1: pipeline.initial_l1,
        best_val_l1: end.best.score,
        best_iteration: end.best.iteration,
        interrupted: end.interrupted,
        seconds: end.seconds,
    })
}

impl Pretrainer {
    fn new(
        cfg: RunConfig,
        root: &Path,
        device: &Device,
        data: &Dataset,
        split: &Split,
        ckpt: Option<&Checkpoint>,
    ) -> Result<Self> {
        let (train_set, val_set, _) = subsets(data, split)?;
        anyhow::ensure!(
            train_set.channels() == cfg.generator.out_channels,
            "{} has {}-channel images, the run's generator makes {}",
            cfg.data.path.display(),
            train_set.channels(),
            cfg.generator.out_channels
        );
        let t = &cfg.train;
        let adam = AdamConfig {
            lr: t.lr,
            beta1: t.beta1,
            beta2: t.beta2,
            ..AdamConfig::default()
        };
        let mut nets = build_pix2pix(&cfg, adam, device)?;
        let mut opt_g = nets.generator_optimizer()?;
        let (iteration, initial_l1) = match ckpt {
            Some(c) => {
                nets.load_weights(&c.weights)
                    .context("resuming from last/")?;
                c.restore_optimizer(GENERATOR_OPTIMIZER, &mut opt_g)
                    .context("resuming from last/")?;
                nets.restore_discriminator_optimizer(c)
                    .context("resuming from last/")?;
                let meta = CheckpointMeta::of(c)?;
                (c.step, meta.initial_val_l1.unwrap_or(f64::NAN))
            }
            None => (0, f64::NAN),
        };
        let pair_transforms = cfg.train.transforms.then(|| cfg.transforms.spatial());
        let consistency = consistency_segmenter(&cfg, device)?;
        Ok(Self {
            pair_transforms,
            consistency,
            cfg,
            root: root.to_path_buf(),
            device: device.clone(),
            train_set,
            val_set,
            nets,
            opt_g,
            iteration,
            initial_l1,
        })
    }

    /// L1 and SSIM on the validation pairs; writes the sample grid of iteration `it`.
    fn score(&self, it: u64) -> Result<ValScores> {
        let n = self.val_set.len();
        let indices: Vec<usize> = (0..n).collect();
        let mut rng = rng_for(self.cfg.seed, Purpose::ValidationDropout, it);
        let g = &self.nets.generator;
        let (mut l1_sum, mut ssim_sum) = (0.0, 0.0);
        let mut rows = Vec::new();
        self.nets.g_store.without_buffer_updates(|| -> Result<()> {
            for chunk in indices.chunks(self.cfg.train.batch_size.max(1)) {
                let (real, mask) = self.val_set.batch(chunk, &self.device)?;
                let fake = g.forward_t(&mask, true, &mut rng)?;
                let b = chunk.len() as f64;
                l1_sum += (&fake - &real)?
                    .abs()?
                    .mean_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?
                    * b;
                let shown = fake.clamp(0f32, 1f32)?;
                ssim_sum += ssim(&shown, &real)? * b;
                if rows.len() < SAMPLE_ROWS {
                    let masks = images_from_tensor(&mask)?;
                    let reals = images_from_tensor(&real)?;
                    let fakes = images_from_tensor(&shown)?;
                    for ((m, r), f) in masks.into_iter().zip(reals).zip(fakes) {
                        if rows.len() < SAMPLE_ROWS {
                            rows.push(vec![m, r, f]);
                        }
                    }
                }
            }
            Ok(())
        })?;
        let grid = image_grid(&rows, 2)?;
        let path = samples_dir(&self.root).join(format!("iter_{it:06}.png"));
        write_image(&path, &image::DynamicImage::ImageRgb8(grid))?;
        Ok(ValScores {
            l1: l1_sum / n as f64,
            ssim: ssim_sum / n as f64,
        })
    }
}

impl Pipeline for Pretrainer {
    fn method(&self) -> &'static str {
        "pix2pix"
    }

    fn iteration(&self) -> u64 {
        self.iteration
    }

    fn step(&mut self) -> Result<Map<String, Value>> {
        let idx = batch_indices(
            self.cfg.seed,
            self.train_set.len(),
            self.cfg.train.batch_size,
            self.iteration,
        );
        let (real, mask) = match &self.pair_transforms {
            None => self.train_set.batch(&idx, &self.device)?,
            Some(chain) => {
                let (mut images, mut masks) = self.train_set.batch_values(&idx)?;
                let (seed, first) = (self.cfg.seed, self.iteration * idx.len() as u64);
                chain.apply_batch(&mut images, &mut masks, self.train_set.chw(), |k| {
                    rng_for(seed, Purpose::PairTransforms, first + k as u64)
                });
                self.train_set.batch_tensors(images, masks, &self.device)?
            }
        };
        let mut rng = rng_for(self.cfg.seed, Purpose::GeneratorDropout, self.iteration);
        let consistency = self.consistency.as_ref();
        let losses =
            self.nets
                .step_with(&mut self.opt_g, &mask, &real, &mut rng, |fake, masks| {
                    consistency
                        .map(|(segmenter, weight)| -> Result<_> {
                            let logits = segmenter.forward_t(fake, false)?;
                            Ok((bce_with_logits(&logits, masks)? * *weight)?)
                        })
                        .transpose()
                })?;
        self.iteration += 1;
        let mut record = Map::new();
        record.insert("loss_d".into(), json!(losses.d));
        record.insert("loss_g_gan".into(), json!(losses.g_gan));
        record.insert("loss_g_l1".into(), json!(losses.g_l1));
        if let Some(term) = losses.g_extra {
            record.insert("loss_g_consistency".into(), json!(term));
        }
        record.insert("lr".into(), json!(self.opt_g.learning_rate()));
        Ok(record)
    }

    fn validate(&mut self, it: u64, record: &mut Value) -> Result<Validation> {
        let s = self.score(it)?;
        record["val_l1"] = json!(s.l1);
        record["val_ssim"] = json!(s.ssim);
        if it == 0 {
            self.initial_l1 = s.l1;
        }
        Ok(Validation {
            score: s.l1,
            summary: format!("val L1 {:.4}  SSIM {:.4}", s.l1, s.ssim),
        })
    }

    fn state(&self) -> Result<State> {
        let mut optimizers = BTreeMap::new();
        optimizers.insert(GENERATOR_OPTIMIZER.to_string(), self.opt_g.state()?);
        optimizers.insert(
            DISCRIMINATOR_OPTIMIZER.to_string(),
            self.nets.opt_d.state()?,
        );
        Ok(State {
            weights: self.nets.named_tensors()?,
            optimizers,
        })
    }

    fn annotate(&self, meta: &mut CheckpointMeta) -> Result<()> {
        meta.initial_val_l1 = Some(self.initial_l1);
        Ok(())
    }

    fn figures(&self, lines: &[Value]) -> Vec<Figure> {
        vec![Figure {
            file: "progress.png".into(),
            panels: vec![
                panel(
                    "adversarial losses",
                    "loss",
                    vec![
                        curve(lines, "loss_d", "D", Color::Blue),
                        curve(lines, "loss_g_gan", "G (GAN)", Color::Green),
                    ],
                ),
                panel(
                    "L1 to the real image",
                    "L1",
                    vec![
                        curve(lines, "loss_g_l1", "train", Color::Blue),
                        curve(lines, "val_l1", "val", Color::Red),
                    ],
                ),
                panel(
                    "validation SSIM",
                    "SSIM",
                    vec![curve(lines, "val_ssim", "val SSIM", Color::Red)],
                ),
            ],
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Profile;
    use crate::overrides::layered;
    use candle_core::Tensor;

    #[test]
    fn profiles_round_trip_and_paper_is_the_reference() -> Result<()> {
        for p in [Profile::Paper, Profile::Cpu] {
            let cfg = RunConfig::pix2pix(p);
            let back: RunConfig = toml::from_str(&toml::to_string(&cfg)?)?;
            assert_eq!(back, cfg);
        }
        let paper = RunConfig::pix2pix(Profile::Paper);
        assert_eq!(
            (
                paper.data.size,
                paper.generator.ngf,
                paper.discriminator.ndf
            ),
            (256, 64, 64)
        );
        assert_eq!(
            (paper.train.lr, paper.train.beta1, paper.train.batch_size),
            (2e-5, 0.5, 2)
        );
        assert_eq!(paper.gan.lambda_l1, 100.0);
        Ok(())
    }

    #[test]
    fn set_reaches_the_sections_and_validation_names_the_problem() -> Result<()> {
        let sets = ["generator.ngf=4".to_string(), "data.size=48".into()];
        let cfg: RunConfig = layered(&RunConfig::pix2pix(Profile::Cpu), None, &sets)?;
        assert_eq!(cfg.generator.ngf, 4);
        let err = format!("{:#}", cfg.validate().unwrap_err());
        assert!(err.contains("data.size 48"), "{err}");
        let mut ok = cfg;
        ok.data.size = 32;
        ok.validate()?;
        ok.fit_to_data(3);
        assert_eq!(
            (
                ok.generator.image_size,
                ok.generator.out_channels,
                ok.discriminator.in_channels
            ),
            (32, 3, 4)
        );
        Ok(())
    }

    #[test]
    fn buffers_are_restored_after_a_train_mode_pass() -> Result<()> {
        let mut cfg = RunConfig::profile(Profile::Cpu);
        cfg.data.size = 32;
        cfg.generator.ngf = 2;
        cfg.fit_to_data(1);
        let (store, g) =
            genseg_generator::pix2pix::build_generator(&cfg.generator, 0, &Device::Cpu)?;
        let before = store.named_tensors()?;
        let mask = Tensor::ones((2, 1, 32, 32), DType::F32, &Device::Cpu)?;
        let mut rng = rng_for(0, Purpose::ValidationDropout, 0);
        store.without_buffer_updates(|| g.forward_t(&mask, true, &mut rng))?;
        let after = store.named_tensors()?;
        for (name, t) in &before {
            let diff = (t - &after[name])?.abs()?.sum_all()?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{name} changed");
        }
        // Without the guard the running statistics do move.
        g.forward_t(&mask, true, &mut rng)?;
        let moved = store.named_tensors()?;
        assert!(before.iter().any(|(n, t)| {
            (t - &moved[n])
                .and_then(|d| d.abs()?.sum_all()?.to_scalar::<f32>())
                .is_ok_and(|d| d > 0.0)
        }));
        Ok(())
    }
}
