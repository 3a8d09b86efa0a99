//! End-to-end GenSeg (`genseg train --method genseg`): the paper's three-level optimisation
//! (spec §1.1) with the intended finite-difference hypergradient (§1.5) and schedule (§1.6).
//!
//! Levels, lowest first, run by a [`genseg_mlo::Engine`]:
//! 1. generator weights W_G on the pix2pix loss of a real batch (α fixed), with the
//!    discriminator stepped just before, as in pix2pix;
//! 2. segmenter weights W_S on `L(real) + λ·L(synthetic)`, the synthetic images painted by
//!    the generator from freshly augmented masks of the batch, **not detached**;
//! 3. architecture weights α on the segmentation loss of a validation batch, along the
//!    hypergradient chained through level 2 (→ W_G) and level 1 (→ α).
//!
//! Every loss is a pure function of the iteration's inputs, drawn once per iteration from
//! streams of `(seed, purpose, iteration)`, so the ± perturbations of a hop see the same
//! batch, augmentation and dropout masks, and a resumed run repeats an uninterrupted one.
//! Two shortcuts that change no number: the segmenter's step uses the synthetic batch
//! detached (its W_S gradient is the same), and the generator hop evaluates only the
//! synthetic term (the real term does not depend on W_G).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use genseg_backbones::SegModel;
use genseg_backbones::unet::UNet;
use genseg_data::dataset::Dataset;
use genseg_data::writer::{image_grid, images_from_tensor, write_image};
use genseg_generator::discriminator::PatchDiscriminator;
use genseg_generator::generator::Pix2PixGenerator;
use genseg_generator::loss::{LossConfig, discriminator_loss, generator_loss};
use genseg_generator::mixed::CANDIDATES;
use genseg_generator::postprocess::{GradientPath, PostProcessor};
use genseg_masks::{MaskAugmentConfig, MaskAugmenter};
use genseg_mlo::{Engine, Hypergradient, LossFn, Problem, Snapshot};
use genseg_nn::checkpoint::Checkpoint;
use genseg_nn::optim::{Adam, AdamConfig, Optimizer};
use genseg_nn::params::ParamStore;
use serde_json::json;

use crate::config::RunConfig;
use crate::driver::{Cadence, LoopTask, extra_f64, extra_u64, run_loop};
use crate::plot::{Series, plot_panels};
use crate::pretrain::{Networks, PretrainConfig, build_networks, without_buffer_updates};
use crate::run_dir::{MetricsLog, RunDir, Which, read_lines, series};
use crate::seeding::{Purpose, rng_for, seed_for};
use crate::synth::masks_to_tensor;
use crate::train::{
    PreparedRun, TrainOutcome, batch_indices, build_model, finish_training, keep_if_better,
    prepare_run, subsets, validation_dice,
};

/// Where the automatic pre-training of a run without `genseg.generator` goes.
pub fn pretrain_dir(run: &Path) -> PathBuf {
    run.join("pretrain")
}

/// The generator pre-training run a GenSeg run starts from.
fn generator_run(cfg: &RunConfig, run: &RunDir) -> PathBuf {
    if cfg.genseg.generator.as_os_str().is_empty() {
        pretrain_dir(run.root())
    } else {
        cfg.genseg.generator.clone()
    }
}

/// Starts a new GenSeg run in `out`.
pub fn train(
    cfg: RunConfig,
    out: &Path,
    device: &Device,
    stop: &AtomicBool,
) -> Result<TrainOutcome> {
    let PreparedRun { cfg, run, data, .. } = prepare_run(cfg, out)?;
    if !cfg.genseg.generator.as_os_str().is_empty() {
        // Fail before config.toml is written when the generator does not fit the data.
        generator_config(&cfg.genseg.generator, &cfg, data.channels())?;
    }
    run.write_config(&cfg)?;
    start(cfg, run, device, &data, stop, false)
}

/// Continues the GenSeg run in `run` (its config already read): finishes the automatic
/// pre-training if it was interrupted, then resumes from `last/`.
pub fn resume(
    cfg: RunConfig,
    run: RunDir,
    device: &Device,
    stop: &AtomicBool,
) -> Result<TrainOutcome> {
    let data = cfg.data.load(&cfg.data.path)?;
    start(cfg, run, device, &data, stop, true)
}

fn start(
    cfg: RunConfig,
    run: RunDir,
    device: &Device,
    data: &Dataset,
    stop: &AtomicBool,
    resuming: bool,
) -> Result<TrainOutcome> {
    let split = run.split(&data.ids())?;
    if !ensure_generator(&cfg, &run, device, stop)? {
        anyhow::bail!(
            "interrupted during the generator pre-training: resume with `genseg train --resume {}`",
            run.root().display()
        );
    }
    crate::log_to_file(&run.log_path())?;
    let ckpt = if resuming {
        run.last_checkpoint()?
    } else {
        None
    };
    let (train_set, val_set, test_set) = subsets(data, &split)?;
    let mut task = EndToEnd::new(cfg, run, device, train_set, val_set, ckpt)?;
    let g = &task.cfg.genseg;
    let rates = task.cfg.genseg_rates();
    tracing::info!(
        "genseg: generator {} ({}/), λ {}, lr generator {:.1e} α {:.1e} segmenter {:.1e}, \
         α step every {}, radius {}, preconditioning {}, synthetic {}",
        generator_run(&task.cfg, &task.run).display(),
        g.checkpoint.name(),
        g.weight,
        rates.generator,
        rates.arch,
        rates.segmenter,
        g.arch_every,
        g.radius,
        g.precondition,
        if g.detach_synthetic {
            "detached (reference)"
        } else {
            "attached"
        }
    );
    let t = &task.cfg.train;
    let cadence = Cadence {
        total: t.iterations,
        val_every: t.val_every,
        log_every: t.log_every,
        checkpoint_every: t.checkpoint_every,
    };
    let end = run_loop(&mut task, cadence, stop, Instant::now())?;
    finish_training(
        &task.run,
        &task.cfg,
        &task.seg_store,
        &task.seg,
        test_set.as_ref(),
        device,
        task.iteration,
        task.best,
        end,
    )
}

/// Makes sure the generator run exists and is finished, pre-training it into
/// `<run>/pretrain` (or resuming that) when `genseg.generator` is empty. `false` when
/// interrupted.
fn ensure_generator(
    cfg: &RunConfig,
    run: &RunDir,
    device: &Device,
    stop: &AtomicBool,
) -> Result<bool> {
    if !cfg.genseg.generator.as_os_str().is_empty() {
        return Ok(true);
    }
    let dir = pretrain_dir(run.root());
    let outcome = if dir.join("config.toml").is_file() {
        let existing = RunDir::open(&dir)?;
        let pcfg: PretrainConfig = existing.read_config()?;
        let done = existing
            .last_checkpoint()?
            .is_some_and(|c| c.step >= pcfg.train.iterations);
        if done {
            return Ok(true);
        }
        crate::pretrain::resume(&dir, device, stop)?
    } else {
        let mut pcfg = PretrainConfig::profile(cfg.genseg.pretrain_profile);
        pcfg.seed = cfg.seed;
        pcfg.data = cfg.data.clone();
        // The run's own split, so the generator never sees a validation or test image.
        pcfg.data.split_file = run.split_path();
        pcfg.data.fold = 0;
        if cfg.genseg.pretrain_iterations > 0 {
            pcfg.train.iterations = cfg.genseg.pretrain_iterations;
        }
        tracing::info!(
            "genseg: no generator given, pre-training one first into {}",
            dir.display()
        );
        crate::pretrain::pretrain(pcfg, &dir, device, stop)?
    };
    crate::log_to_file(&run.log_path())?;
    Ok(!outcome.interrupted)
}

/// The pre-training configuration of the generator run `path`, checked against the data.
fn generator_config(path: &Path, cfg: &RunConfig, channels: usize) -> Result<PretrainConfig> {
    let pcfg: PretrainConfig = RunDir::open(path)?.read_config().with_context(|| {
        format!(
            "{} is not a generator pre-training run (made by `genseg pretrain-generator`)",
            path.display()
        )
    })?;
    anyhow::ensure!(
        pcfg.generator.image_size == cfg.data.size as usize,
        "generator run {} makes {} px images but data.size is {}: pre-train at the same size \
         or set data.size={}",
        path.display(),
        pcfg.generator.image_size,
        cfg.data.size,
        pcfg.generator.image_size
    );
    anyhow::ensure!(
        pcfg.generator.out_channels == channels,
        "generator run {} makes {}-channel images but {} has {} channel(s)",
        path.display(),
        pcfg.generator.out_channels,
        cfg.data.path.display(),
        channels
    );
    anyhow::ensure!(
        pcfg.generator.searchable_up || pcfg.generator.searchable_down,
        "generator run {} has no searchable cells: α has nothing to tune",
        path.display()
    );
    Ok(pcfg)
}

/// What every loss reads: the inputs of the current iteration.
struct Inputs {
    iteration: u64,
    images: Tensor,
    masks: Tensor,
    synth_masks: Tensor,
    val_images: Tensor,
    val_masks: Tensor,
    /// `true` while hypergradients are taken: the synthetic batch keeps its graph to W_G.
    hop_mode: bool,
}

/// The networks, shared by the loss closures of the levels.
#[derive(Clone)]
struct Nets {
    seg: Rc<UNet>,
    generator: Rc<Pix2PixGenerator>,
    discriminator: Rc<PatchDiscriminator>,
    post: Rc<PostProcessor>,
}

struct EndToEnd {
    cfg: RunConfig,
    run: RunDir,
    device: Device,
    train_set: Dataset,
    val_set: Dataset,
    seg_store: ParamStore,
    seg: Rc<UNet>,
    nets: Networks,
    shared: Nets,
    engine: Engine,
    opt_d: Adam,
    /// The GAN loss settings of the generator's pre-training run.
    gan: LossConfig,
    inputs: Rc<RefCell<Inputs>>,
    /// (real, synthetic) segmentation losses of the last segmenter step.
    seg_parts: Rc<Cell<(f64, f64)>>,
    augmenter: MaskAugmenter,
    iteration: u64,
    best: (f64, u64),
    metrics: MetricsLog,
}

/// `softmax(α)` per searchable up cell of `generator`, outermost first.
fn alpha_softmax(generator: &Pix2PixGenerator) -> Result<Vec<Vec<f64>>> {
    Ok(match generator.upconv_mixing_weights()? {
        Some(w) => w.to_dtype(DType::F64)?.to_vec2::<f64>()?,
        None => Vec::new(),
    })
}

const LEVEL_GENERATOR: usize = 0;
const LEVEL_SEGMENTER: usize = 1;

fn scalar(t: &Tensor) -> candle_core::Result<f64> {
    t.to_dtype(DType::F64)?.to_scalar::<f64>()
}

impl EndToEnd {
    fn new(
        cfg: RunConfig,
        run: RunDir,
        device: &Device,
        train_set: Dataset,
        val_set: Dataset,
        ckpt: Option<Checkpoint>,
    ) -> Result<Self> {
        anyhow::ensure!(
            !val_set.is_empty(),
            "the split has no validation cases: GenSeg tunes α on them"
        );
        let source = generator_run(&cfg, &run);
        let pcfg = generator_config(&source, &cfg, train_set.channels())?;
        let nets = build_networks(&pcfg, device)?;
        let (seg_store, seg) = build_model(&cfg, device)?;
        let seg = Rc::new(seg);
        let rates = cfg.genseg_rates();
        let g_adam = |vars: Vec<(String, Var)>| -> Result<Adam> {
            Ok(Adam::new(
                vars,
                AdamConfig {
                    lr: rates.generator,
                    beta1: pcfg.train.beta1,
                    beta2: pcfg.train.beta2,
                    ..AdamConfig::default()
                },
            )?)
        };
        let group = |name: &str| -> Result<String> {
            nets.generator
                .param_groups()
                .into_iter()
                .find(|(g, _)| *g == name)
                .map(|(_, prefix)| prefix)
                .with_context(|| format!("the generator has no {name} group"))
        };
        let g_vars = nets.g_store.trainable_vars_with_prefix(&group("weights")?);
        let arch_vars = nets.g_store.trainable_vars_with_prefix(&group("arch")?);
        let mut opt_g = g_adam(g_vars.clone())?;
        let mut opt_d = g_adam(nets.d_store.trainable_vars())?;
        let g = &cfg.genseg;
        let mut opt_arch = Adam::new(
            arch_vars.clone(),
            AdamConfig {
                lr: rates.arch,
                beta1: g.arch_beta1,
                beta2: g.arch_beta2,
                weight_decay: g.arch_weight_decay,
                ..AdamConfig::default()
            },
        )?;
        let mut seg_train = cfg.train.clone();
        seg_train.lr = rates.segmenter;
        let mut opt_seg = seg_train.build_optimizer(seg_store.trainable_vars())?;

        let (iteration, best) = match &ckpt {
            Some(c) => {
                seg_store
                    .load_named_tensors(&crate::train::segmenter_weights(&c.weights), true)
                    .context("restoring the segmenter from last/")?;
                nets.load_weights(&c.weights)
                    .context("resuming from last/")?;
                let opts: [(&str, &mut dyn Optimizer); 4] = [
                    ("segmenter", opt_seg.as_mut()),
                    ("generator", &mut opt_g),
                    ("discriminator", &mut opt_d),
                    ("arch", &mut opt_arch),
                ];
                for (name, opt) in opts {
                    c.restore_optimizer(name, opt)
                        .context("resuming from last/")?;
                }
                (
                    c.step,
                    (
                        extra_f64(&c.extra, "best_val_dice").unwrap_or(f64::NEG_INFINITY),
                        extra_u64(&c.extra, "best_iteration").unwrap_or(0),
                    ),
                )
            }
            None => {
                let dir = RunDir::open(&source)?.checkpoint(g.checkpoint);
                anyhow::ensure!(
                    dir.join("state.json").is_file(),
                    "generator run {} has no {}/ checkpoint yet",
                    source.display(),
                    g.checkpoint.name()
                );
                let pre = Checkpoint::load(&dir)
                    .with_context(|| format!("loading generator checkpoint {}", dir.display()))?;
                nets.load_weights(&pre.weights)
                    .with_context(|| format!("starting from {}", dir.display()))?;
                (0, (f64::NEG_INFINITY, 0))
            }
        };

        let mut post = g
            .postprocess
            .config(train_set.channels(), cfg.data.equalize_gamma);
        post.gradient = if g.detach_synthetic {
            GradientPath::Detach
        } else {
            GradientPath::StraightThrough
        };
        let shared = Nets {
            seg: seg.clone(),
            generator: Rc::new(nets.generator.clone()),
            discriminator: Rc::new(nets.discriminator.clone()),
            post: Rc::new(PostProcessor::new(post)?),
        };
        let empty = Tensor::zeros(1, DType::F32, device)?;
        let inputs = Rc::new(RefCell::new(Inputs {
            iteration,
            images: empty.clone(),
            masks: empty.clone(),
            synth_masks: empty.clone(),
            val_images: empty.clone(),
            val_masks: empty,
            hop_mode: false,
        }));
        let seg_parts = Rc::new(Cell::new((f64::NAN, f64::NAN)));

        let mut g_buffers = nets.g_store.buffers();
        let gd_buffers: Vec<_> = g_buffers
            .iter()
            .cloned()
            .chain(nets.d_store.buffers())
            .collect();
        g_buffers.extend(seg_store.buffers());
        let generator_level = Problem::with_adam(
            "generator",
            g_vars,
            opt_g,
            generator_loss_fn(&shared, &inputs, cfg.seed, &pcfg.loss),
        )
        .with_buffers(gd_buffers);
        let segmenter_level = Problem::new(
            "segmenter",
            seg_store.trainable_vars(),
            opt_seg,
            segmenter_loss_fn(&shared, &inputs, &seg_parts, &cfg),
        )
        .with_buffers(g_buffers);
        let arch = Problem::with_adam(
            "arch",
            arch_vars,
            opt_arch,
            validation_loss_fn(&shared, &inputs, &cfg, seg_store.buffers()),
        );
        let engine = Engine::new(
            vec![generator_level, segmenter_level],
            arch,
            Hypergradient {
                radius: g.radius,
                precondition: g.precondition,
            },
        )?;
        if ckpt.is_none() && run.metrics_path().exists() {
            std::fs::remove_file(run.metrics_path())
                .with_context(|| format!("removing {}", run.metrics_path().display()))?;
        }
        let mut metrics = MetricsLog::open(&run.metrics_path(), Some(iteration))?;
        if iteration == 0 {
            // Where α starts (the pre-trained generator's), the first point of alpha.png.
            metrics.append(&json!({
                "iteration": 0,
                "alpha_softmax": alpha_softmax(&nets.generator)?,
            }))?;
        }
        Ok(Self {
            cfg,
            run,
            device: device.clone(),
            train_set,
            val_set,
            seg_store,
            seg,
            nets,
            shared,
            engine,
            opt_d,
            gan: pcfg.loss,
            inputs,
            seg_parts,
            augmenter: MaskAugmenter::new(MaskAugmentConfig::default())?,
            iteration,
            best,
            metrics,
        })
    }

    /// Draws the inputs of iteration `it`: the real batch, its masks augmented afresh and a
    /// validation batch.
    fn draw_inputs(&self, it: u64) -> Result<()> {
        let seed = self.cfg.seed;
        let batch = self.cfg.train.batch_size;
        let idx = batch_indices(seed, self.train_set.len(), batch, it);
        let (images, masks) = self.train_set.batch(&idx, &self.device)?;
        let mut rng = rng_for(seed, Purpose::MaskAugment, it);
        let augmented = self.augmenter.augment_batch(
            &genseg_data::writer::masks_from_tensor(&masks, 0.5)?,
            &mut rng,
        );
        let synth_masks = masks_to_tensor(&augmented, &self.device)?;
        let val_seed = seed_for(seed, Purpose::ValidationBatchOrder);
        let vidx = batch_indices(val_seed, self.val_set.len(), batch, it);
        let (val_images, val_masks) = self.val_set.batch(&vidx, &self.device)?;
        *self.inputs.borrow_mut() = Inputs {
            iteration: it,
            images,
            masks,
            synth_masks,
            val_images,
            val_masks,
            hop_mode: false,
        };
        Ok(())
    }

    /// The discriminator step of the iteration (before the generator's, as in pix2pix).
    fn discriminator_step(&mut self) -> Result<f64> {
        let inputs = self.inputs.borrow();
        let mut rng = rng_for(self.cfg.seed, Purpose::GeneratorDropout, inputs.iteration);
        let (g, d) = (&self.shared.generator, &self.shared.discriminator);
        let fake = g.forward_t(&inputs.masks, true, &mut rng)?.detach();
        let loss = discriminator_loss(
            &d.forward_t(&inputs.masks, &fake, true)?,
            &d.forward_t(&inputs.masks, &inputs.images, true)?,
            self.gan.gan_mode,
        )?;
        self.opt_d.step(&loss.total.backward()?)?;
        Ok(scalar(&loss.total)?)
    }

    /// `softmax(α)` per searchable up cell, outermost first.
    fn mixing_weights(&self) -> Result<Vec<Vec<f64>>> {
        alpha_softmax(&self.nets.generator)
    }

    /// mask | real | synthetic rows for the first validation pairs, without moving any
    /// BatchNorm statistics.
    fn sample_grid(&self, it: u64) -> Result<()> {
        let n = self.val_set.len().min(4);
        let (real, mask) = self
            .val_set
            .batch(&(0..n).collect::<Vec<_>>(), &self.device)?;
        let mut rng = rng_for(self.cfg.seed, Purpose::ValidationDropout, it);
        let mut post_rng = rng_for(self.cfg.seed, Purpose::PostProcess, u64::MAX - it);
        let fake = without_buffer_updates(&self.nets.g_store, || {
            let raw = self.shared.generator.forward_t(&mask, true, &mut rng)?;
            Ok(self.shared.post.apply(&raw, &mut post_rng)?.detach())
        })?;
        let rows: Vec<Vec<_>> = images_from_tensor(&mask)?
            .into_iter()
            .zip(images_from_tensor(&real)?)
            .zip(images_from_tensor(&fake)?)
            .map(|((m, r), f)| vec![m, r, f])
            .collect();
        let path = self
            .run
            .root()
            .join("samples")
            .join(format!("iter_{it:06}.png"));
        write_image(
            &path,
            &image::DynamicImage::ImageRgb8(image_grid(&rows, 2)?),
        )?;
        Ok(())
    }
}

/// Level 1: `GAN(D(m, G(m)) → real) + λ_L1·|G(m) − x|` on the real batch.
fn generator_loss_fn(
    nets: &Nets,
    inputs: &Rc<RefCell<Inputs>>,
    seed: u64,
    gan: &LossConfig,
) -> LossFn {
    let (nets, inputs, loss_cfg) = (nets.clone(), inputs.clone(), *gan);
    Box::new(move || {
        let s = inputs.borrow();
        let mut rng = rng_for(seed, Purpose::GeneratorDropout, s.iteration);
        let fake = nets.generator.forward_t(&s.masks, true, &mut rng)?;
        let pred = nets.discriminator.forward_t(&s.masks, &fake, true)?;
        Ok(generator_loss(&pred, &fake, &s.images, &loss_cfg)?.total)
    })
}

/// Level 2: `L(S(x), y) + λ·L(S(G(aug(y))), aug(y))`.
fn segmenter_loss_fn(
    nets: &Nets,
    inputs: &Rc<RefCell<Inputs>>,
    parts: &Rc<Cell<(f64, f64)>>,
    cfg: &RunConfig,
) -> LossFn {
    let (nets, inputs, parts) = (nets.clone(), inputs.clone(), parts.clone());
    let (seed, weight, loss) = (cfg.seed, cfg.genseg.weight, cfg.train.loss.clone());
    Box::new(move || {
        let s = inputs.borrow();
        let mut rng = rng_for(seed, Purpose::SynthesisDropout, s.iteration);
        let mut post_rng = rng_for(seed, Purpose::PostProcess, s.iteration);
        let raw = nets.generator.forward_t(&s.synth_masks, true, &mut rng)?;
        let mut synthetic = nets.post.apply(&raw, &mut post_rng)?;
        if !s.hop_mode {
            synthetic = synthetic.detach();
        }
        let syn = loss.forward(&nets.seg.forward_t(&synthetic, true)?, &s.synth_masks)?;
        if s.hop_mode {
            return syn * weight;
        }
        let real = loss.forward(&nets.seg.forward_t(&s.images, true)?, &s.masks)?;
        parts.set((scalar(&real)?, scalar(&syn)?));
        real + (syn * weight)?
    })
}

/// Level 3: the segmentation loss of a validation batch, in train mode like the levels
/// below (batch statistics; in eval mode the running statistics of the first iterations
/// give losses in the hundreds), with the BatchNorm running statistics it would move put
/// back, so validation data never leaks into the segmenter.
fn validation_loss_fn(
    nets: &Nets,
    inputs: &Rc<RefCell<Inputs>>,
    cfg: &RunConfig,
    seg_buffers: Vec<(String, Var)>,
) -> LossFn {
    let (nets, inputs, loss) = (nets.clone(), inputs.clone(), cfg.train.loss.clone());
    Box::new(move || {
        let s = inputs.borrow();
        let saved = Snapshot::capture(&seg_buffers)?;
        let value = loss.forward(&nets.seg.forward_t(&s.val_images, true)?, &s.val_masks);
        saved.restore()?;
        value
    })
}

impl LoopTask for EndToEnd {
    fn iteration(&self) -> u64 {
        self.iteration
    }

    fn step(&mut self) -> Result<serde_json::Map<String, serde_json::Value>> {
        let it = self.iteration;
        self.draw_inputs(it)?;
        let loss_d = self.discriminator_step()?;
        let level_losses = self.engine.step_levels()?;
        let (real, syn) = self.seg_parts.get();
        let mut record = serde_json::Map::new();
        record.insert("loss_d".into(), json!(loss_d));
        record.insert("loss_g".into(), json!(level_losses[LEVEL_GENERATOR]));
        record.insert("loss".into(), json!(level_losses[LEVEL_SEGMENTER]));
        record.insert("loss_real".into(), json!(real));
        record.insert("loss_synthetic".into(), json!(syn));
        if (it + 1) % self.cfg.genseg.arch_every == 0 {
            let t0 = Instant::now();
            self.inputs.borrow_mut().hop_mode = true;
            let upper = self.engine.upper_hypergradient();
            self.inputs.borrow_mut().hop_mode = false;
            let upper = upper?;
            let norm = genseg_mlo::l2_norm(&upper.grad)?;
            anyhow::ensure!(
                norm.is_finite(),
                "the architecture hypergradient is {norm} at iteration {}",
                it + 1
            );
            // Zero means no signal reached α (e.g. detached synthetic images): no step, so
            // weight decay alone does not move it.
            if norm > 0.0 {
                self.engine.step_upper(&upper.grad)?;
            }
            record.insert("loss_val".into(), json!(upper.loss));
            // ‖∇_{W_S} L_V‖ entering the segmenter hop, and what that hop passed down to
            // the generator weights: zero when synthetic images are detached.
            record.insert(
                "norm_val_grad".into(),
                json!(upper.entering_norms[LEVEL_SEGMENTER]),
            );
            record.insert(
                "norm_generator_signal".into(),
                json!(upper.entering_norms[LEVEL_GENERATOR]),
            );
            record.insert("norm_arch_grad".into(), json!(norm));
            record.insert(
                "hypergradient_seconds".into(),
                json!(t0.elapsed().as_secs_f64()),
            );
        }
        record.insert("alpha_softmax".into(), json!(self.mixing_weights()?));
        record.insert(
            "lr".into(),
            json!(
                self.engine.levels()[LEVEL_SEGMENTER]
                    .optimizer()
                    .learning_rate()
            ),
        );
        self.iteration += 1;
        Ok(record)
    }

    fn validate(&mut self, it: u64, record: &mut serde_json::Value) -> Result<String> {
        let dice = validation_dice(self.seg.as_ref(), &self.val_set, &self.cfg, &self.device)?;
        record["val_dice"] = json!(dice);
        if keep_if_better(&mut self.best, dice, it) {
            self.checkpoint(Which::Best)?;
        }
        self.sample_grid(it)?;
        Ok(format!(
            "val Dice {dice:.4}  best {:.4} @{}",
            self.best.0, self.best.1
        ))
    }

    fn checkpoint(&self, which: Which) -> Result<()> {
        let mut weights = self.seg_store.named_tensors()?;
        weights.extend(self.nets.g_store.named_tensors()?);
        weights.extend(self.nets.d_store.named_tensors()?);
        let mut optimizers = BTreeMap::new();
        let levels = self.engine.levels();
        optimizers.insert(
            "generator".to_string(),
            levels[LEVEL_GENERATOR].optimizer().state()?,
        );
        optimizers.insert(
            "segmenter".to_string(),
            levels[LEVEL_SEGMENTER].optimizer().state()?,
        );
        optimizers.insert("discriminator".to_string(), self.opt_d.state()?);
        optimizers.insert("arch".to_string(), self.engine.upper().optimizer().state()?);
        let ckpt = Checkpoint {
            step: self.iteration,
            weights,
            optimizers,
            rng: BTreeMap::new(),
            config_toml: toml::to_string_pretty(&self.cfg)?,
            extra: json!({
                "best_val_dice": self.best.0,
                "best_iteration": self.best.1,
                "method": "genseg",
                "alpha_softmax": self.mixing_weights()?,
            }),
        };
        self.run.save_checkpoint(which, &ckpt)
    }

    fn plot(&self) -> Result<()> {
        let lines = read_lines(&self.run.metrics_path())?;
        let pts = |key: &str| series(&lines, key);
        let (real, syn, val) = (pts("loss_real"), pts("loss_synthetic"), pts("loss_val"));
        let (d, g, dice) = (pts("loss_d"), pts("loss_g"), pts("val_dice"));
        use plotters::style::{BLUE, GREEN, RED};
        let series = |label, points, color| Series {
            label,
            points,
            color,
        };
        plot_panels(
            &self.run.progress_path(),
            &[
                (
                    "segmentation losses",
                    "loss",
                    vec![
                        series("real", &real, BLUE),
                        series("synthetic", &syn, GREEN),
                        series("validation batch", &val, RED),
                    ],
                ),
                (
                    "generator level",
                    "loss",
                    vec![series("D", &d, BLUE), series("G (GAN + λ·L1)", &g, GREEN)],
                ),
                ("validation", "Dice", vec![series("val Dice", &dice, RED)]),
            ],
        )?;
        // One panel per searchable cell: the softmax of its α over the candidates.
        let cells = lines
            .iter()
            .rev()
            .find_map(|v| v.get("alpha_softmax")?.as_array().map(Vec::len))
            .unwrap_or(0);
        let colors = [BLUE, GREEN, RED];
        let mut curves: Vec<Vec<Vec<(f64, f64)>>> = vec![vec![Vec::new(); CANDIDATES.len()]; cells];
        for v in &lines {
            let (Some(it), Some(rows)) = (
                v.get("iteration").and_then(|x| x.as_f64()),
                v.get("alpha_softmax").and_then(|x| x.as_array()),
            ) else {
                continue;
            };
            for (cell, row) in rows.iter().enumerate().take(cells) {
                for (k, p) in row.as_array().into_iter().flatten().enumerate() {
                    if let (Some(p), Some(curve)) = (p.as_f64(), curves[cell].get_mut(k)) {
                        curve.push((it, p));
                    }
                }
            }
        }
        let labels: Vec<String> = CANDIDATES
            .iter()
            .map(|c| format!("k{} p{}", c.kernel, c.padding))
            .collect();
        let titles: Vec<String> = (0..cells)
            .map(|c| format!("up cell {c} (0 = outermost): softmax(α)"))
            .collect();
        let panels: Vec<(&str, &str, Vec<Series>)> = curves
            .iter()
            .zip(&titles)
            .map(|(cell, title)| {
                let s = cell
                    .iter()
                    .zip(&labels)
                    .zip(colors)
                    .map(|((points, label), color)| series(label, points, color))
                    .collect();
                (title.as_str(), "weight", s)
            })
            .collect();
        if !panels.is_empty() {
            plot_panels(&self.run.root().join("alpha.png"), &panels)?;
        }
        Ok(())
    }

    fn metrics(&mut self) -> &mut MetricsLog {
        &mut self.metrics
    }
}
