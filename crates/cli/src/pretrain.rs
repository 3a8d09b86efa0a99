//! pix2pix pre-training of the mask-to-image generator (`genseg pretrain-generator`,
//! spec §1.7): the warm-up that GenSeg and its "Separate" baseline start from.
//!
//! One iteration on a batch of real training pairs `(x, m)` (order from the same per-epoch
//! seeded shuffle as `genseg train`): `fake = G(m)` in train mode (dropout masks drawn from a
//! per-iteration stream), a discriminator step on `½[GAN(D(m, fake.detach()) → 0) +
//! GAN(D(m, x) → 1)]`, then a generator step on `GAN(D(m, fake) → 1) + λ_L1 · |fake − x|`.
//! Both use Adam; the generator's optimizer holds its weights only, so the architecture
//! weights α stay at their initial values (the reference does not train them here either) but
//! are saved with the weights. The mask is `{0, 1}` and the target image `[0, 1]`, as in the
//! reference.
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
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use genseg_data::dataset::Dataset;
use genseg_data::split::{Split, write_split_file};
use genseg_data::writer::{image_grid, images_from_tensor, write_image};
use genseg_generator::discriminator::{DiscriminatorConfig, PatchDiscriminator};
use genseg_generator::generator::{GeneratorConfig, Pix2PixGenerator};
use genseg_generator::loss::{LossConfig, discriminator_loss, generator_loss};
use genseg_nn::checkpoint::Checkpoint;
use genseg_nn::optim::{Adam, AdamConfig, Optimizer};
use genseg_nn::params::ParamStore;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::{DataSection, Profile, RunConfig};
use crate::driver::{Cadence, LoopTask, extra_f64, extra_u64, run_loop};
use crate::plot::{Series, plot_panels};
use crate::run_dir::{MetricsLog, RunDir, Which, read_lines, series};
use crate::seeding::{Purpose, rng_for, seed_for};
use crate::ssim::ssim;
use crate::train::batch_indices;

/// Name prefix of the generator's tensors in checkpoints.
pub const GENERATOR_PREFIX: &str = "netG";
/// Name prefix of the discriminator's tensors in checkpoints.
pub const DISCRIMINATOR_PREFIX: &str = "netD";

/// `[train]` of a pre-training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainTrainSection {
    /// Iterations (one D step and one G step each).
    pub iterations: u64,
    /// Pairs per iteration.
    pub batch_size: usize,
    /// Adam learning rate of both networks (constant: the reference's linear policy over
    /// 10000 epochs never decays within a run).
    pub lr: f64,
    /// Adam's beta1 (0.5 in pix2pix).
    pub beta1: f64,
    /// Adam's beta2.
    pub beta2: f64,
    /// Validate, keep `best/` and write a sample grid every this many iterations.
    pub val_every: u64,
    /// Write a line to metrics.jsonl every this many iterations.
    pub log_every: u64,
    /// Refresh `last/` every this many iterations.
    pub checkpoint_every: u64,
    /// Validation masks shown in each sample grid (rows).
    pub grid_rows: usize,
}

/// The whole configuration of a pre-training run (kept apart from [`RunConfig`] so the keys
/// of `genseg train` do not change).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainConfig {
    /// The one seed: weights, split, batches and dropout derive from it.
    pub seed: u64,
    /// `[data]`: as for `genseg train`; `size` is also the generator's image size.
    pub data: DataSection,
    /// `[generator]`; `image_size` and `out_channels` are set from the data.
    pub generator: GeneratorConfig,
    /// `[discriminator]`; `in_channels` is set from the data.
    pub discriminator: DiscriminatorConfig,
    /// `[loss]`: GAN mode and λ_L1.
    pub loss: LossConfig,
    /// `[train]`.
    pub train: PretrainTrainSection,
}

impl PretrainConfig {
    /// The defaults of a profile.
    ///
    /// `paper`: 256 px, ngf = ndf = 64, batch 2, Adam lr 2e-5 betas (0.5, 0.999), 800
    /// iterations (≈ 200 epochs of a 7-image split, the reference's epoch count).
    /// `cpu`: measured on 2 cores (docs/method.md): 64 px, ngf 16, ndf 16, batch 4,
    /// lr 2e-4 (pix2pix's default; at 2e-5 the lung phantoms' validation L1 after 50
    /// iterations is 0.36 instead of 0.07), 200 iterations (it plateaus by then).
    pub fn profile(profile: Profile) -> Self {
        let mut data = RunConfig::profile(Profile::Paper).data;
        data.n_train = 7;
        data.n_val = 2;
        let paper = Self {
            seed: 0,
            data,
            generator: GeneratorConfig::default(),
            discriminator: DiscriminatorConfig::default(),
            loss: LossConfig::default(),
            train: PretrainTrainSection {
                iterations: 800,
                batch_size: 2,
                lr: 2e-5,
                beta1: 0.5,
                beta2: 0.999,
                val_every: 100,
                log_every: 10,
                checkpoint_every: 100,
                grid_rows: 4,
            },
        };
        match profile {
            Profile::Paper => paper,
            Profile::Cpu => {
                let mut cpu = paper;
                cpu.data.size = 64;
                cpu.generator.ngf = 16;
                cpu.discriminator.ndf = 16;
                cpu.train.batch_size = 4;
                cpu.train.lr = 2e-4;
                cpu.train.iterations = 200;
                cpu.train.val_every = 50;
                cpu.train.checkpoint_every = 50;
                cpu
            }
        }
    }

    /// Sets the fields that follow from the data: the generator's image size and channels and
    /// the discriminator's input channels.
    pub fn fit_to_data(&mut self, channels: usize) {
        self.generator.image_size = self.data.size as usize;
        self.generator.in_channels = 1;
        self.generator.out_channels = channels;
        self.discriminator.in_channels = 1 + channels;
    }

    /// Checks the numbers that the sections cannot check alone.
    pub fn validate(&self) -> Result<()> {
        let t = &self.train;
        anyhow::ensure!(t.iterations > 0, "train.iterations must be > 0");
        anyhow::ensure!(t.batch_size > 0, "train.batch_size must be > 0");
        anyhow::ensure!(
            t.lr > 0.0 && t.lr.is_finite(),
            "train.lr {} must be a positive number",
            t.lr
        );
        anyhow::ensure!(
            t.val_every > 0 && t.log_every > 0 && t.checkpoint_every > 0,
            "train.val_every, log_every and checkpoint_every must be > 0"
        );
        anyhow::ensure!(self.data.n_train > 0, "data.n_train must be > 0");
        anyhow::ensure!(
            self.data.n_val > 0 || !self.data.split_file.as_os_str().is_empty(),
            "data.n_val must be > 0: validation pairs choose the best generator"
        );
        let mut g = self.generator.clone();
        g.image_size = self.data.size as usize;
        g.validate()
            .with_context(|| format!("data.size {} for the generator", self.data.size))?;
        self.discriminator.validate()?;
        anyhow::ensure!(
            self.discriminator
                .output_size(self.data.size as usize)
                .is_some(),
            "data.size {} is too small for the discriminator's {} stride-2 layers",
            self.data.size,
            self.discriminator.n_layers
        );
        self.data.data_config()?;
        Ok(())
    }
}

/// The generator and discriminator of a run, each in its own seeded store.
pub struct Networks {
    /// Holds every generator tensor under [`GENERATOR_PREFIX`].
    pub g_store: ParamStore,
    /// The generator.
    pub generator: Pix2PixGenerator,
    /// Holds every discriminator tensor under [`DISCRIMINATOR_PREFIX`].
    pub d_store: ParamStore,
    /// The discriminator.
    pub discriminator: PatchDiscriminator,
}

impl Networks {
    /// Loads both networks from checkpoint `weights` (their tensors under
    /// [`GENERATOR_PREFIX`] and [`DISCRIMINATOR_PREFIX`]; other tensors are ignored).
    pub fn load_weights(&self, weights: &BTreeMap<String, Tensor>) -> Result<()> {
        self.g_store
            .load_named_tensors(&with_prefix(weights, GENERATOR_PREFIX), true)
            .context("loading the generator")?;
        self.d_store
            .load_named_tensors(&with_prefix(weights, DISCRIMINATOR_PREFIX), true)
            .context("loading the discriminator")
    }
}

/// Builds the generator of `cfg` (already fitted to the data) in a fresh store seeded from
/// `seed`.
pub fn build_generator(
    cfg: &GeneratorConfig,
    seed: u64,
    device: &Device,
) -> Result<(ParamStore, Pix2PixGenerator)> {
    let store = ParamStore::new(
        seed_for(seed, Purpose::GeneratorWeights),
        DType::F32,
        device,
    );
    let generator = Pix2PixGenerator::new(cfg, store.var_builder().pp(GENERATOR_PREFIX))?;
    Ok((store, generator))
}

/// Builds both networks of `cfg` (already fitted to the data).
pub fn build_networks(cfg: &PretrainConfig, device: &Device) -> Result<Networks> {
    let (g_store, generator) = build_generator(&cfg.generator, cfg.seed, device)?;
    let d_store = ParamStore::new(
        seed_for(cfg.seed, Purpose::DiscriminatorWeights),
        DType::F32,
        device,
    );
    let discriminator = PatchDiscriminator::new(
        &cfg.discriminator,
        d_store.var_builder().pp(DISCRIMINATOR_PREFIX),
    )?;
    Ok(Networks {
        g_store,
        generator,
        d_store,
        discriminator,
    })
}

/// The tensors of `weights` whose names start with `prefix.`.
pub fn with_prefix(weights: &BTreeMap<String, Tensor>, prefix: &str) -> BTreeMap<String, Tensor> {
    let dotted = format!("{prefix}.");
    weights
        .iter()
        .filter(|(k, _)| k.starts_with(&dotted))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
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

struct Pretrainer<'a> {
    cfg: PretrainConfig,
    run: RunDir,
    device: Device,
    train_set: Dataset,
    val_set: Dataset,
    nets: Networks,
    opt_g: Adam,
    opt_d: Adam,
    iteration: u64,
    initial_l1: f64,
    best: (f64, u64),
    metrics: MetricsLog,
    stop: &'a AtomicBool,
}

/// The folder of sample grids.
pub fn samples_dir(run: &Path) -> PathBuf {
    run.join("samples")
}

/// Starts a new pre-training run in `out`.
pub fn pretrain(
    cfg: PretrainConfig,
    out: &Path,
    device: &Device,
    stop: &AtomicBool,
) -> Result<PretrainOutcome> {
    cfg.validate()?;
    let run = RunDir::create(out)?;
    crate::log_to_file(&run.log_path())?;
    let mut cfg = cfg;
    let data = cfg.data.load(&cfg.data.path)?;
    cfg.fit_to_data(data.channels());
    let split = cfg.data.split(&data.ids(), cfg.seed)?;
    anyhow::ensure!(
        !split.val.is_empty(),
        "the split has no validation cases: they choose the best generator"
    );
    write_split_file(&run.split_path(), std::slice::from_ref(&split))?;
    run.write_config(&cfg)?;
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
    Pretrainer::new(cfg, run, device, &data, &split, stop, None)?.run()
}

/// Continues the pre-training run in `run_dir` from its `last/` checkpoint.
pub fn resume(run_dir: &Path, device: &Device, stop: &AtomicBool) -> Result<PretrainOutcome> {
    let run = RunDir::open(run_dir)?;
    crate::log_to_file(&run.log_path())?;
    let cfg: PretrainConfig = run
        .read_config()
        .with_context(|| format!("{} is not a pre-training run", run_dir.display()))?;
    cfg.validate()?;
    let data = cfg.data.load(&cfg.data.path)?;
    let split = run.split(&data.ids())?;
    let ckpt = run.last_checkpoint()?;
    Pretrainer::new(cfg, run, device, &data, &split, stop, ckpt)?.run()
}

fn adam(vars: Vec<(String, candle_core::Var)>, t: &PretrainTrainSection) -> Result<Adam> {
    Ok(Adam::new(
        vars,
        AdamConfig {
            lr: t.lr,
            beta1: t.beta1,
            beta2: t.beta2,
            ..AdamConfig::default()
        },
    )?)
}

/// Runs `f` with the BatchNorm running statistics of `store` restored afterwards, so a
/// train-mode forward pass for validation or sampling leaves no trace.
pub fn without_buffer_updates<T>(store: &ParamStore, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let saved: Vec<(candle_core::Var, Tensor)> = store
        .buffers()
        .into_iter()
        .map(|(_, v)| {
            let copy = v.as_tensor().copy()?;
            Ok((v, copy))
        })
        .collect::<Result<_>>()?;
    let out = f();
    for (var, value) in saved {
        var.set(&value)?;
    }
    out
}

impl<'a> Pretrainer<'a> {
    fn new(
        cfg: PretrainConfig,
        run: RunDir,
        device: &Device,
        data: &Dataset,
        split: &Split,
        stop: &'a AtomicBool,
        ckpt: Option<Checkpoint>,
    ) -> Result<Self> {
        let (train_set, val_set, _) = crate::train::subsets(data, split)?;
        anyhow::ensure!(
            train_set.channels() == cfg.generator.out_channels,
            "{} has {}-channel images, the run's generator makes {}",
            cfg.data.path.display(),
            train_set.channels(),
            cfg.generator.out_channels
        );
        let nets = build_networks(&cfg, device)?;
        let g_weights = nets
            .generator
            .param_groups()
            .into_iter()
            .find(|(group, _)| *group == "weights")
            .map(|(_, prefix)| prefix)
            .context("the generator has no weight group")?;
        let mut opt_g = adam(
            nets.g_store.trainable_vars_with_prefix(&g_weights),
            &cfg.train,
        )?;
        let mut opt_d = adam(nets.d_store.trainable_vars(), &cfg.train)?;
        let (iteration, initial_l1, best) = match &ckpt {
            Some(c) => {
                nets.load_weights(&c.weights)
                    .context("resuming from last/")?;
                c.restore_optimizer("generator", &mut opt_g)
                    .context("resuming from last/")?;
                c.restore_optimizer("discriminator", &mut opt_d)
                    .context("resuming from last/")?;
                (
                    c.step,
                    extra_f64(&c.extra, "initial_val_l1").unwrap_or(f64::NAN),
                    (
                        extra_f64(&c.extra, "best_val_l1").unwrap_or(f64::INFINITY),
                        extra_u64(&c.extra, "best_iteration").unwrap_or(0),
                    ),
                )
            }
            None => (0, f64::NAN, (f64::INFINITY, 0)),
        };
        if ckpt.is_none() && run.metrics_path().exists() {
            // Restarting from iteration 0: the old lines (its iteration-0 line included) are
            // all redone.
            std::fs::remove_file(run.metrics_path())
                .with_context(|| format!("removing {}", run.metrics_path().display()))?;
        }
        let metrics = MetricsLog::open(&run.metrics_path(), Some(iteration))?;
        Ok(Self {
            cfg,
            run,
            device: device.clone(),
            train_set,
            val_set,
            nets,
            opt_g,
            opt_d,
            iteration,
            initial_l1,
            best,
            metrics,
            stop,
        })
    }

    /// One D step then one G step; returns (D loss, G GAN part, G L1 part).
    fn adversarial_step(&mut self) -> Result<(f64, f64, f64)> {
        let idx = batch_indices(
            self.cfg.seed,
            self.train_set.len(),
            self.cfg.train.batch_size,
            self.iteration,
        );
        let (real, mask) = self.train_set.batch(&idx, &self.device)?;
        let mut rng = rng_for(self.cfg.seed, Purpose::GeneratorDropout, self.iteration);
        let (g, d) = (&self.nets.generator, &self.nets.discriminator);
        let fake = g.forward_t(&mask, true, &mut rng)?;
        let d_loss = discriminator_loss(
            &d.forward_t(&mask, &fake.detach(), true)?,
            &d.forward_t(&mask, &real, true)?,
            self.cfg.loss.gan_mode,
        )?;
        self.opt_d.step(&d_loss.total.backward()?)?;
        // The generator step sees the discriminator just updated, as in pix2pix.
        let g_loss = generator_loss(
            &d.forward_t(&mask, &fake, true)?,
            &fake,
            &real,
            &self.cfg.loss,
        )?;
        self.opt_g.step(&g_loss.total.backward()?)?;
        let scalar =
            |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
        Ok((
            scalar(&d_loss.total)?,
            scalar(&g_loss.gan)?,
            scalar(&g_loss.l1)?,
        ))
    }

    /// L1 and SSIM on the validation pairs; writes the sample grid of iteration `it`.
    fn score(&self, it: u64) -> Result<ValScores> {
        let n = self.val_set.len();
        let indices: Vec<usize> = (0..n).collect();
        let mut rng = rng_for(self.cfg.seed, Purpose::ValidationDropout, it);
        let g = &self.nets.generator;
        let (mut l1_sum, mut ssim_sum) = (0.0, 0.0);
        let mut rows = Vec::new();
        without_buffer_updates(&self.nets.g_store, || {
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
                if rows.len() < self.cfg.train.grid_rows {
                    let masks = images_from_tensor(&mask)?;
                    let reals = images_from_tensor(&real)?;
                    let fakes = images_from_tensor(&shown)?;
                    for ((m, r), f) in masks.into_iter().zip(reals).zip(fakes) {
                        if rows.len() < self.cfg.train.grid_rows {
                            rows.push(vec![m, r, f]);
                        }
                    }
                }
            }
            Ok(())
        })?;
        let grid = image_grid(&rows, 2)?;
        let path = samples_dir(self.run.root()).join(format!("iter_{it:06}.png"));
        write_image(&path, &image::DynamicImage::ImageRgb8(grid))?;
        Ok(ValScores {
            l1: l1_sum / n as f64,
            ssim: ssim_sum / n as f64,
        })
    }

    /// Validates at iteration `it`; keeps `best/` when the L1 is strictly lower.
    fn validate_and_keep(&mut self, it: u64, record: &mut serde_json::Value) -> Result<ValScores> {
        let scores = self.score(it)?;
        record["val_l1"] = json!(scores.l1);
        record["val_ssim"] = json!(scores.ssim);
        if it == 0 {
            self.initial_l1 = scores.l1;
        }
        if scores.l1 < self.best.0 {
            self.best = (scores.l1, it);
            self.checkpoint(Which::Best)?;
        }
        tracing::debug!(
            iteration = it,
            val_l1 = scores.l1,
            val_ssim = scores.ssim,
            "validated"
        );
        Ok(scores)
    }

    fn run(mut self) -> Result<PretrainOutcome> {
        let started = Instant::now();
        if self.iteration == 0 {
            // The untrained generator's scores: the yardstick for what pre-training bought.
            let mut record = json!({"iteration": 0, "seconds": 0.0});
            let s = self.validate_and_keep(0, &mut record)?;
            self.metrics.append(&record)?;
            tracing::info!(
                "untrained generator: validation L1 {:.4}, SSIM {:.4}",
                s.l1,
                s.ssim
            );
        }
        let t = &self.cfg.train;
        let cadence = Cadence {
            total: t.iterations,
            val_every: t.val_every,
            log_every: t.log_every,
            checkpoint_every: t.checkpoint_every,
        };
        let stop = self.stop;
        let end = run_loop(&mut self, cadence, stop, started)?;
        if end.interrupted {
            tracing::warn!(
                "interrupted at iteration {}: last/ saved; continue with `genseg pretrain-generator --resume {}`",
                self.iteration,
                self.run.root().display()
            );
        }
        tracing::info!(
            "pre-trained {} iterations in {:.1} s; validation L1 {:.4} untrained, best {:.4} at iteration {}",
            self.iteration,
            end.seconds,
            self.initial_l1,
            self.best.0,
            self.best.1
        );
        Ok(PretrainOutcome {
            iterations: self.iteration,
            initial_val_l1: self.initial_l1,
            best_val_l1: self.best.0,
            best_iteration: self.best.1,
            interrupted: end.interrupted,
            seconds: end.seconds,
        })
    }
}

impl LoopTask for Pretrainer<'_> {
    fn iteration(&self) -> u64 {
        self.iteration
    }

    fn step(&mut self) -> Result<serde_json::Map<String, serde_json::Value>> {
        let (loss_d, loss_g_gan, loss_g_l1) = self.adversarial_step()?;
        self.iteration += 1;
        let mut record = serde_json::Map::new();
        record.insert("loss_d".into(), json!(loss_d));
        record.insert("loss_g_gan".into(), json!(loss_g_gan));
        record.insert("loss_g_l1".into(), json!(loss_g_l1));
        record.insert("lr".into(), json!(self.opt_g.learning_rate()));
        Ok(record)
    }

    fn validate(&mut self, it: u64, record: &mut serde_json::Value) -> Result<String> {
        let s = self.validate_and_keep(it, record)?;
        Ok(format!(
            "val L1 {:.4}  SSIM {:.4}  best {:.4} @{}",
            s.l1, s.ssim, self.best.0, self.best.1
        ))
    }

    fn checkpoint(&self, which: Which) -> Result<()> {
        let mut weights = self.nets.g_store.named_tensors()?;
        weights.extend(self.nets.d_store.named_tensors()?);
        let mut optimizers = BTreeMap::new();
        optimizers.insert("generator".to_string(), self.opt_g.state()?);
        optimizers.insert("discriminator".to_string(), self.opt_d.state()?);
        let ckpt = Checkpoint {
            step: self.iteration,
            weights,
            optimizers,
            rng: BTreeMap::new(),
            config_toml: toml::to_string_pretty(&self.cfg)?,
            extra: json!({
                "initial_val_l1": self.initial_l1,
                "best_val_l1": self.best.0,
                "best_iteration": self.best.1,
                "method": "pix2pix",
            }),
        };
        self.run.save_checkpoint(which, &ckpt)
    }

    fn plot(&self) -> Result<()> {
        let lines = read_lines(&self.run.metrics_path())?;
        let pts = |key: &str| series(&lines, key);
        let (d, g, l1, val) = (
            pts("loss_d"),
            pts("loss_g_gan"),
            pts("loss_g_l1"),
            pts("val_l1"),
        );
        let ssim = pts("val_ssim");
        plot_panels(
            &self.run.progress_path(),
            &[
                (
                    "adversarial losses",
                    "loss",
                    vec![
                        Series {
                            label: "D",
                            points: &d,
                            color: plotters::style::BLUE,
                        },
                        Series {
                            label: "G (GAN)",
                            points: &g,
                            color: plotters::style::GREEN,
                        },
                    ],
                ),
                (
                    "L1 to the real image",
                    "L1",
                    vec![
                        Series {
                            label: "train",
                            points: &l1,
                            color: plotters::style::BLUE,
                        },
                        Series {
                            label: "val",
                            points: &val,
                            color: plotters::style::RED,
                        },
                    ],
                ),
                (
                    "validation SSIM",
                    "SSIM",
                    vec![Series {
                        label: "val SSIM",
                        points: &ssim,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overrides::layered;

    #[test]
    fn profiles_round_trip_and_paper_is_the_reference() -> Result<()> {
        for p in [Profile::Paper, Profile::Cpu] {
            let cfg = PretrainConfig::profile(p);
            let back: PretrainConfig = toml::from_str(&toml::to_string(&cfg)?)?;
            assert_eq!(back, cfg);
        }
        let paper = PretrainConfig::profile(Profile::Paper);
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
        assert_eq!(paper.loss.lambda_l1, 100.0);
        Ok(())
    }

    #[test]
    fn set_reaches_the_sections_and_validation_names_the_problem() -> Result<()> {
        let sets = ["generator.ngf=4".to_string(), "data.size=48".into()];
        let cfg: PretrainConfig = layered(&PretrainConfig::profile(Profile::Cpu), None, &sets)?;
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
        let mut cfg = PretrainConfig::profile(Profile::Cpu);
        cfg.data.size = 32;
        cfg.generator.ngf = 2;
        cfg.fit_to_data(1);
        let (store, g) = build_generator(&cfg.generator, 0, &Device::Cpu)?;
        let before = store.named_tensors()?;
        let mask = Tensor::ones((2, 1, 32, 32), DType::F32, &Device::Cpu)?;
        let mut rng = rng_for(0, Purpose::ValidationDropout, 0);
        without_buffer_updates(&store, || Ok(g.forward_t(&mask, true, &mut rng)?))?;
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
