//! End-to-end GenSeg (`genseg train --method genseg`): the paper's three-level optimisation
//! (spec §1.1) with the intended finite-difference hypergradient (§1.5) and schedule (§1.6).
//!
//! Levels, lowest first, run by a [`genseg_mlo::Engine`]:
//! 1. generator weights W_G on the pix2pix loss of a real batch (α fixed), with the
//!    discriminator stepped just before, as in pix2pix;
//! 2. segmenter weights W_S on `L(real) + λ·L(synthetic)`, the synthetic images painted by
//!    the generator from freshly augmented masks of the batch, **not detached**; the real
//!    term is the segmenter recipe's (with `train.transforms` the batch normalised and
//!    augmented on a prefetch thread, deep supervision, the `train.schedule` learning rate:
//!    the strong recipe), the same as the baseline's;
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
use genseg_data::dataset::Dataset;
use genseg_data::writer::{image_grid, images_from_tensor, write_image};
use genseg_generator::generator::Pix2PixGenerator;
use genseg_generator::mixed::CANDIDATES;
use genseg_generator::pix2pix::{DISCRIMINATOR_OPTIMIZER, GENERATOR_OPTIMIZER, Pix2Pix};
use genseg_generator::postprocess::{GradientPath, PostProcessor};
use genseg_masks::{MaskAugmentConfig, MaskAugmenter};
use genseg_mlo::{Engine, Hypergradient, LossFn, Problem, Snapshot};
use genseg_nn::checkpoint::Checkpoint;
use genseg_nn::optim::{Adam, AdamConfig, Optimizer};
use genseg_nn::params::ParamStore;
use serde_json::json;

use super::baseline::RealBatches;
use super::pix2pix::build_pix2pix;
use crate::config::RunConfig;
use crate::learner::{
    CheckpointMeta, Color, Curve, Figure, Goal, Learner, Observer, Panel, Pipeline, State,
    Validation, curve, panel,
};
use crate::run::{PreparedRun, cadence, generator_checkpoint, read_generator_run, subsets};
use crate::run_dir::RunDir;
use crate::seeding::batch_indices;
use crate::seeding::{Purpose, rng_for, seed_for};
use crate::segmenter::{
    SEGMENTER_OPTIMIZER, Segmenter, TrainOutcome, build_model, finish_training, segmenter_weights,
    start_from_pretrained, validation_dice,
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

/// Starts the GenSeg run prepared in `prepared`.
pub fn train(
    prepared: PreparedRun,
    device: &Device,
    stop: &AtomicBool,
    observer: &mut dyn Observer,
) -> Result<TrainOutcome> {
    let cfg = &prepared.cfg;
    if !cfg.genseg.generator.as_os_str().is_empty() {
        // Fail before config.toml is written when the generator does not fit the data.
        generator_config(&cfg.genseg.generator, cfg, prepared.data.channels())?;
    }
    prepared.run.write_config(cfg)?;
    resume(prepared, None, device, stop, observer)
}

/// Runs the GenSeg run of `prepared` from `ckpt` (its `last/` when resuming, `None` from the
/// start): finishes (or runs) the automatic pre-training first when it has no generator.
pub fn resume(
    prepared: PreparedRun,
    ckpt: Option<Checkpoint>,
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
    if !ensure_generator(&cfg, &run, device, stop, observer)? {
        anyhow::bail!(
            "interrupted during the generator pre-training: resume with `genseg train --resume {}`",
            run.root().display()
        );
    }
    crate::logging::log_to_file(&run.log_path())?;
    let (train_set, val_set, test_set) = subsets(&data, &split)?;
    let g = &cfg.genseg;
    let rates = cfg.genseg_rates();
    tracing::info!(
        "genseg: generator {} ({}/), λ {}, lr generator {:.1e} α {:.1e} segmenter {:.1e}, \
         α step every {}, generator step every {}, radius {}, preconditioning {}, \
         synthetic {}",
        generator_run(&cfg, &run).display(),
        g.checkpoint.name(),
        cfg.train.lambda,
        rates.generator,
        rates.arch,
        rates.segmenter,
        g.arch_every,
        g.generator_every,
        g.radius,
        g.precondition,
        if g.detach_synthetic {
            "detached (reference)"
        } else {
            "attached"
        }
    );
    let mut learner = Learner::new(
        run.clone(),
        cadence(&cfg),
        toml::to_string_pretty(&cfg)?,
        Goal::Maximise,
        ckpt.as_ref(),
        observer,
        stop,
    )?;
    let mut task = EndToEnd::new(cfg.clone(), &run, device, train_set, val_set, ckpt.as_ref())?;
    if task.iteration == 0 {
        // Where α starts (the pre-trained generator's), the first point of alpha.png.
        learner.log(&json!({
            "iteration": 0,
            "alpha_softmax": task.mixing_weights()?,
        }))?;
    }
    let end = learner.fit(&mut task)?;
    finish_training(
        &run,
        &cfg,
        &task.seg_store,
        task.seg.as_ref(),
        test_set.as_ref(),
        device,
        task.iteration,
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
    observer: &mut dyn Observer,
) -> Result<bool> {
    if !cfg.genseg.generator.as_os_str().is_empty() {
        return Ok(true);
    }
    let dir = pretrain_dir(run.root());
    let outcome = if dir.join("config.toml").is_file() {
        let existing = RunDir::open(&dir)?;
        let pcfg = read_generator_run(&existing)?;
        let done = existing
            .last_checkpoint()?
            .is_some_and(|c| c.step >= pcfg.train.iterations);
        if done {
            return Ok(true);
        }
        super::pix2pix::resume(&dir, device, stop, observer)?
    } else {
        // The pre-training loop of `pretrain_profile`, on this run's networks and data.
        let mut pcfg = RunConfig::pix2pix(cfg.genseg.pretrain_profile);
        pcfg.seed = cfg.seed;
        pcfg.data = cfg.data.clone();
        pcfg.generator = cfg.generator.clone();
        pcfg.discriminator = cfg.discriminator.clone();
        pcfg.gan = cfg.gan;
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
        super::pix2pix::pretrain(pcfg, &dir, device, stop, observer)?
    };
    crate::logging::log_to_file(&run.log_path())?;
    Ok(!outcome.interrupted)
}

/// The configuration of the generator run `path`, checked against the data.
fn generator_config(path: &Path, cfg: &RunConfig, channels: usize) -> Result<RunConfig> {
    let pcfg = read_generator_run(&RunDir::open(path)?)?;
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
    /// The raw real batch (what the generator level learns to paint).
    images: Tensor,
    masks: Tensor,
    /// The real batch of the segmenter's level: the same pairs, or, with
    /// `train.transforms`, normalised and augmented ones (`seg_prepared`).
    seg_images: Tensor,
    seg_masks: Tensor,
    seg_prepared: bool,
    synth_masks: Tensor,
    val_images: Tensor,
    val_masks: Tensor,
    /// `true` while hypergradients are taken: the synthetic batch keeps its graph to W_G.
    hop_mode: bool,
}

/// The networks, shared by the loss closures of the levels.
#[derive(Clone)]
struct Nets {
    seg: Rc<Segmenter>,
    pix2pix: Rc<RefCell<Pix2Pix>>,
    post: Rc<PostProcessor>,
    /// The real batch's masks as painted for this iteration's discriminator step, with
    /// their graph to W_G: level 1's step takes them (the same weights, dropout masks and
    /// batch statistics would paint the same images) instead of painting them again,
    /// which would cost a generator pass and move its BatchNorm running statistics twice.
    painted: Rc<RefCell<Option<Tensor>>>,
}

struct EndToEnd {
    cfg: RunConfig,
    root: PathBuf,
    device: Device,
    batches: RealBatches,
    val_set: Dataset,
    seg_store: ParamStore,
    seg: Rc<Segmenter>,
    shared: Nets,
    engine: Engine,
    inputs: Rc<RefCell<Inputs>>,
    /// (real, synthetic) segmentation losses of the last segmenter step.
    seg_parts: Rc<Cell<(f64, f64)>>,
    augmenter: MaskAugmenter,
    iteration: u64,
    /// Seconds spent per phase by this process (see [`PhaseSeconds`]).
    phases: PhaseSeconds,
}

/// Where a GenSeg iteration's time goes, summed over the iterations this process ran
/// (a resumed run starts again from zero): logged with every metrics line, so the cost of
/// each level can be read off any run (docs/performance.md).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
struct PhaseSeconds {
    /// Drawing the batches: real (plain and the recipe's), augmented masks, validation.
    inputs: f64,
    /// Level 1: the discriminator step and the generator step (every `generator_every`).
    generator: f64,
    /// Level 2: synthesis and the segmenter step on real + synthetic pairs.
    segmenter: f64,
    /// Level 3: the hypergradient and α's step (every `arch_every`).
    hypergradient: f64,
}

/// `softmax(α)` per searchable up cell of `generator`, innermost first (the α table's rows).
fn alpha_softmax(generator: &Pix2PixGenerator) -> Result<Vec<Vec<f64>>> {
    Ok(match generator.upconv_mixing_weights()? {
        Some(w) => w.to_dtype(DType::F64)?.to_vec2::<f64>()?,
        None => Vec::new(),
    })
}

/// Checkpoint name of α's optimizer.
pub const ARCH_OPTIMIZER: &str = "arch";

const LEVEL_GENERATOR: usize = 0;
const LEVEL_SEGMENTER: usize = 1;

/// Seconds since `clock`, which restarts.
fn lap(clock: &mut Instant) -> f64 {
    let elapsed = clock.elapsed().as_secs_f64();
    *clock = Instant::now();
    elapsed
}

fn scalar(t: &Tensor) -> candle_core::Result<f64> {
    t.to_dtype(DType::F64)?.to_scalar::<f64>()
}

impl EndToEnd {
    fn new(
        cfg: RunConfig,
        run: &RunDir,
        device: &Device,
        train_set: Dataset,
        val_set: Dataset,
        ckpt: Option<&Checkpoint>,
    ) -> Result<Self> {
        anyhow::ensure!(
            !val_set.is_empty(),
            "the split has no validation cases: GenSeg tunes α on them"
        );
        let source = generator_run(&cfg, run);
        generator_config(&source, &cfg, train_set.channels())?;
        let rates = cfg.genseg_rates();
        let adam = AdamConfig {
            lr: rates.generator,
            beta1: cfg.genseg.generator_beta1,
            beta2: cfg.genseg.generator_beta2,
            ..AdamConfig::default()
        };
        let mut nets = build_pix2pix(&cfg, adam, device)?;
        let (seg_store, seg) = build_model(&cfg, device)?;
        let seg = Rc::new(seg);
        let g_vars = nets.generator_group("weights")?;
        let arch_vars = nets.generator_group("arch")?;
        let mut opt_g = nets.generator_optimizer()?;
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

        let iteration = match ckpt {
            Some(c) => {
                seg_store
                    .load_named_tensors(&segmenter_weights(&c.weights), true)
                    .context("restoring the segmenter from last/")?;
                nets.load_weights(&c.weights)
                    .context("resuming from last/")?;
                let opts: [(&str, &mut dyn Optimizer); 4] = [
                    (SEGMENTER_OPTIMIZER, opt_seg.as_mut()),
                    (GENERATOR_OPTIMIZER, &mut opt_g),
                    (DISCRIMINATOR_OPTIMIZER, &mut nets.opt_d),
                    (ARCH_OPTIMIZER, &mut opt_arch),
                ];
                for (name, opt) in opts {
                    c.restore_optimizer(name, opt)
                        .context("resuming from last/")?;
                }
                c.step
            }
            None => {
                let pre = generator_checkpoint(&source, g.checkpoint)?;
                nets.load_weights(&pre.weights).with_context(|| {
                    format!(
                        "starting from {}",
                        source.join(g.checkpoint.name()).display()
                    )
                })?;
                start_from_pretrained(&cfg, &seg_store)?;
                0
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
            pix2pix: Rc::new(RefCell::new(nets)),
            post: Rc::new(PostProcessor::new(post)?),
            painted: Rc::new(RefCell::new(None)),
        };
        let empty = Tensor::zeros(1, DType::F32, device)?;
        let inputs = Rc::new(RefCell::new(Inputs {
            iteration,
            images: empty.clone(),
            masks: empty.clone(),
            seg_images: empty.clone(),
            seg_masks: empty.clone(),
            seg_prepared: false,
            synth_masks: empty.clone(),
            val_images: empty.clone(),
            val_masks: empty,
            hop_mode: false,
        }));
        let seg_parts = Rc::new(Cell::new((f64::NAN, f64::NAN)));

        let (mut g_buffers, d_buffers) = {
            let p = shared.pix2pix.borrow();
            (p.g_store.buffers(), p.d_store.buffers())
        };
        let gd_buffers: Vec<_> = g_buffers.iter().cloned().chain(d_buffers).collect();
        g_buffers.extend(seg_store.buffers());
        let generator_level = Problem::with_adam(
            "generator",
            g_vars,
            opt_g,
            generator_loss_fn(&shared, &inputs, cfg.seed),
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
        let batches = RealBatches::new(&cfg, train_set, iteration);
        Ok(Self {
            cfg,
            root: run.root().to_path_buf(),
            device: device.clone(),
            batches,
            val_set,
            seg_store,
            seg,
            shared,
            engine,
            inputs,
            seg_parts,
            augmenter: MaskAugmenter::new(MaskAugmentConfig::default())?,
            iteration,
            phases: PhaseSeconds::default(),
        })
    }

    /// Draws the inputs of iteration `it`: the real batch (raw, and as the segmenter's
    /// recipe prepares it), its masks augmented afresh and a validation batch.
    fn draw_inputs(&mut self, it: u64) -> Result<()> {
        let seed = self.cfg.seed;
        let batch = self.cfg.train.batch_size;
        let (images, masks) = self.batches.plain(it, &self.device)?;
        let (seg_images, seg_masks, seg_prepared) = match self.cfg.train.transforms {
            true => self.batches.next(it, &self.device)?,
            false => (images.clone(), masks.clone(), false),
        };
        let mut rng = rng_for(seed, Purpose::MaskAugment, it);
        let augmented = self.augmenter.augment_batch(
            &genseg_data::writer::masks_from_tensor(&masks, 0.5)?,
            &mut rng,
        );
        let synth_masks = genseg_data::writer::masks_to_tensor(&augmented, &self.device)?;
        let val_seed = seed_for(seed, Purpose::ValidationBatchOrder);
        let vidx = batch_indices(val_seed, self.val_set.len(), batch, it);
        let (val_images, val_masks) = self.val_set.batch(&vidx, &self.device)?;
        *self.inputs.borrow_mut() = Inputs {
            iteration: it,
            images,
            masks,
            seg_images,
            seg_masks,
            seg_prepared,
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
        let mut p = self.shared.pix2pix.borrow_mut();
        let fake = p.generator.forward_t(&inputs.masks, true, &mut rng)?;
        let loss = p.discriminator_step(&inputs.masks, &inputs.images, &fake)?;
        *self.shared.painted.borrow_mut() = Some(fake);
        Ok(loss)
    }

    /// `softmax(α)` per searchable up cell, innermost first.
    fn mixing_weights(&self) -> Result<Vec<Vec<f64>>> {
        alpha_softmax(&self.shared.pix2pix.borrow().generator)
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
        let p = self.shared.pix2pix.borrow();
        let fake = p.g_store.without_buffer_updates(|| -> Result<Tensor> {
            let raw = p.generator.forward_t(&mask, true, &mut rng)?;
            Ok(self.shared.post.apply(&raw, &mut post_rng)?.detach())
        })?;
        let rows: Vec<Vec<_>> = images_from_tensor(&mask)?
            .into_iter()
            .zip(images_from_tensor(&real)?)
            .zip(images_from_tensor(&fake)?)
            .map(|((m, r), f)| vec![m, r, f])
            .collect();
        let path = self.root.join("samples").join(format!("iter_{it:06}.png"));
        write_image(
            &path,
            &image::DynamicImage::ImageRgb8(image_grid(&rows, 2)?),
        )?;
        Ok(())
    }
}

/// Level 1: `GAN(D(m, G(m)) → real) + λ_L1·|G(m) − x|` on the real batch.
fn generator_loss_fn(nets: &Nets, inputs: &Rc<RefCell<Inputs>>, seed: u64) -> LossFn {
    let (nets, inputs) = (nets.clone(), inputs.clone());
    Box::new(move || {
        let s = inputs.borrow();
        let p = nets.pix2pix.borrow();
        // Hops evaluate the loss at perturbed weights: they always paint afresh.
        let painted = match s.hop_mode {
            true => None,
            false => nets.painted.borrow_mut().take(),
        };
        let fake = match painted {
            Some(fake) => fake,
            None => {
                let mut rng = rng_for(seed, Purpose::GeneratorDropout, s.iteration);
                p.generator.forward_t(&s.masks, true, &mut rng)?
            }
        };
        let loss = p
            .generator_loss(&s.masks, &s.images, &fake)
            .map_err(candle_core::Error::msg)?;
        Ok(loss.total)
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
    let (seed, train, loss) = (cfg.seed, cfg.train.clone(), cfg.train.loss.clone());
    Box::new(move || {
        let s = inputs.borrow();
        let weight = train.lambda_at(s.iteration);
        if weight == 0.0 && !s.hop_mode {
            // Past `train.lambda_fade`: the real pairs alone, no synthesis.
            let real = loss.forward_deep(&real_outputs(&nets, &s)?, &s.seg_masks)?;
            parts.set((scalar(&real)?, f64::NAN));
            return Ok(real);
        }
        let mut rng = rng_for(seed, Purpose::SynthesisDropout, s.iteration);
        let mut post_rng = rng_for(seed, Purpose::PostProcess, s.iteration);
        let raw = nets
            .pix2pix
            .borrow()
            .generator
            .forward_t(&s.synth_masks, true, &mut rng)?;
        let mut synthetic = nets.post.apply(&raw, &mut post_rng)?;
        if !s.hop_mode {
            synthetic = synthetic.detach();
        }
        let syn = loss.forward(&nets.seg.forward_t(&synthetic, true)?, &s.synth_masks)?;
        if s.hop_mode {
            return syn * weight;
        }
        let real = loss.forward_deep(&real_outputs(&nets, &s)?, &s.seg_masks)?;
        parts.set((scalar(&real)?, scalar(&syn)?));
        real + (syn * weight)?
    })
}

/// The segmenter's (deeply supervised) outputs on the iteration's real batch.
fn real_outputs(nets: &Nets, s: &Inputs) -> candle_core::Result<Vec<Tensor>> {
    match s.seg_prepared {
        true => nets.seg.forward_deep_normalised(&s.seg_images, true),
        false => nets.seg.forward_deep_t(&s.seg_images, true),
    }
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

impl Pipeline for EndToEnd {
    fn method(&self) -> &'static str {
        "genseg"
    }

    fn iteration(&self) -> u64 {
        self.iteration
    }

    fn step(&mut self) -> Result<serde_json::Map<String, serde_json::Value>> {
        let it = self.iteration;
        let mut clock = Instant::now();
        self.draw_inputs(it)?;
        self.phases.inputs += lap(&mut clock);
        let t = &self.cfg.train;
        let segmenter_lr = t
            .schedule
            .lr(self.cfg.genseg_rates().segmenter, it, t.iterations);
        self.engine.levels_mut()[LEVEL_SEGMENTER]
            .optimizer_mut()
            .set_learning_rate(segmenter_lr);
        let mut record = serde_json::Map::new();
        // Past `train.lambda_fade` nothing reads the generator or α: neither steps.
        let synthetic = t.lambda_at(it) > 0.0;
        if synthetic && it % self.cfg.genseg.generator_every == 0 {
            let loss_d = self.discriminator_step()?;
            let loss_g = self.engine.step_level(LEVEL_GENERATOR);
            // Never left for a later loss, even when the step failed.
            self.shared.painted.borrow_mut().take();
            let loss_g = loss_g?;
            record.insert("loss_d".into(), json!(loss_d));
            record.insert("loss_g".into(), json!(loss_g));
        }
        self.phases.generator += lap(&mut clock);
        let loss = self.engine.step_level(LEVEL_SEGMENTER)?;
        self.phases.segmenter += lap(&mut clock);
        let (real, syn) = self.seg_parts.get();
        record.insert("loss".into(), json!(loss));
        record.insert("loss_real".into(), json!(real));
        if synthetic {
            record.insert("loss_synthetic".into(), json!(syn));
        }
        if synthetic && (it + 1) % self.cfg.genseg.arch_every == 0 {
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
            let seconds = lap(&mut clock);
            self.phases.hypergradient += seconds;
            record.insert("hypergradient_seconds".into(), json!(seconds));
        }
        record.insert("phase_seconds".into(), json!(self.phases));
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

    fn validate(&mut self, it: u64, record: &mut serde_json::Value) -> Result<Validation> {
        let dice = validation_dice(self.seg.as_ref(), &self.val_set, &self.cfg, &self.device)?;
        record["val_dice"] = json!(dice);
        self.sample_grid(it)?;
        Ok(Validation {
            score: dice,
            summary: format!("val Dice {dice:.4}"),
        })
    }

    fn state(&self) -> Result<State> {
        let mut weights = self.seg_store.named_tensors()?;
        let p = self.shared.pix2pix.borrow();
        weights.extend(p.named_tensors()?);
        let mut optimizers = BTreeMap::new();
        let levels = self.engine.levels();
        optimizers.insert(
            GENERATOR_OPTIMIZER.to_string(),
            levels[LEVEL_GENERATOR].optimizer().state()?,
        );
        optimizers.insert(
            SEGMENTER_OPTIMIZER.to_string(),
            levels[LEVEL_SEGMENTER].optimizer().state()?,
        );
        optimizers.insert(DISCRIMINATOR_OPTIMIZER.to_string(), p.opt_d.state()?);
        optimizers.insert(
            ARCH_OPTIMIZER.to_string(),
            self.engine.upper().optimizer().state()?,
        );
        Ok(State {
            weights,
            optimizers,
        })
    }

    fn annotate(&self, meta: &mut CheckpointMeta) -> Result<()> {
        meta.alpha_softmax = Some(self.mixing_weights()?);
        Ok(())
    }

    fn figures(&self, lines: &[serde_json::Value]) -> Vec<Figure> {
        let mut figures = vec![Figure {
            file: "progress.png".into(),
            panels: vec![
                panel(
                    "segmentation losses",
                    "loss",
                    vec![
                        curve(lines, "loss_real", "real", Color::Blue),
                        curve(lines, "loss_synthetic", "synthetic", Color::Green),
                        curve(lines, "loss_val", "validation batch", Color::Red),
                    ],
                ),
                panel(
                    "generator level",
                    "loss",
                    vec![
                        curve(lines, "loss_d", "D", Color::Blue),
                        curve(lines, "loss_g", "G (GAN + λ·L1)", Color::Green),
                    ],
                ),
                panel(
                    "validation",
                    "Dice",
                    vec![curve(lines, "val_dice", "val Dice", Color::Red)],
                ),
            ],
        }];
        // One panel per searchable cell: the softmax of its α over the candidates.
        let cells = lines
            .iter()
            .rev()
            .find_map(|v| v.get("alpha_softmax")?.as_array().map(Vec::len))
            .unwrap_or(0);
        let colors = [Color::Blue, Color::Green, Color::Red];
        let mut curves: Vec<Vec<Vec<(f64, f64)>>> = vec![vec![Vec::new(); CANDIDATES.len()]; cells];
        for v in lines {
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
        let panels: Vec<Panel> = curves
            .into_iter()
            .enumerate()
            .map(|(cell, candidates)| Panel {
                title: format!("up cell {cell} (0 = innermost): softmax(α)"),
                y_label: "weight".into(),
                curves: candidates
                    .into_iter()
                    .zip(CANDIDATES.iter())
                    .zip(colors)
                    .map(|((points, c), color)| Curve {
                        label: format!("k{} p{}", c.kernel, c.padding),
                        points,
                        color,
                    })
                    .collect(),
            })
            .collect();
        if !panels.is_empty() {
            figures.push(Figure {
                file: "alpha.png".into(),
                panels,
            });
        }
        figures
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use genseg_data::phantom::{PhantomConfig, PhantomKind, write_phantoms};

    use super::*;
    use crate::config::{Method, Profile};
    use crate::learner::Silent;
    use crate::run_dir::{Which, read_lines};

    /// A GenSeg run on 32 px phantoms with networks a few channels wide, pre-training its
    /// own generator for two iterations.
    fn tiny(data: &Path) -> Result<RunConfig> {
        write_phantoms(data, &PhantomConfig::new(PhantomKind::Lungs, 32, 0), 12)?;
        let mut cfg = RunConfig::profile(Profile::Cpu);
        cfg.method = Method::Genseg;
        cfg.data.path = data.to_path_buf();
        cfg.data.size = 32;
        cfg.model.unet.base_width = 2;
        cfg.model.unet.depth = 2;
        cfg.generator.ngf = 2;
        cfg.discriminator.ndf = 2;
        cfg.genseg.pretrain_iterations = 2;
        cfg.train.iterations = 3;
        cfg.train.val_every = 3;
        cfg.train.log_every = 1;
        cfg.train.checkpoint_every = 1;
        Ok(cfg)
    }

    /// The largest absolute elementwise difference of two f32 tensors.
    fn largest_difference(a: &Tensor, b: &Tensor) -> Result<f32> {
        Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
    }

    /// Sets the stop flag once `at` iterations of the loop of `total` are done (the
    /// pre-training loop before it runs to its end).
    struct StopAt<'a> {
        at: u64,
        total: u64,
        current: u64,
        stop: &'a AtomicBool,
    }

    impl Observer for StopAt<'_> {
        fn started(&mut self, total: u64, _position: u64) {
            self.current = total;
        }
        fn advanced(&mut self, position: u64) {
            if self.current == self.total && position == self.at {
                self.stop.store(true, Ordering::SeqCst);
            }
        }
    }

    #[test]
    fn genseg_pretrains_moves_alpha_and_resumes_bit_exactly() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let cfg = tiny(&dir.path().join("data"))?;
        assert_pretrains_moves_alpha_and_resumes_bit_exactly(cfg, dir.path())
    }

    /// On the strong recipe the segmenter's real pairs come from the prefetch thread
    /// (normalised, augmented) and its loss is deeply supervised; with nnU-Net's decaying
    /// learning rate (the recipe's is constant) and level 1 every second iteration, the
    /// run still tunes α at every iteration and resumes bit-exactly.
    #[test]
    fn genseg_on_the_strong_recipe_moves_alpha_and_resumes_bit_exactly() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let plain = tiny(&dir.path().join("data"))?;
        let mut cfg = plain.clone().with_recipe(crate::config::Recipe::Strong);
        cfg.train.iterations = plain.train.iterations;
        cfg.train.val_every = plain.train.val_every;
        cfg.train.checkpoint_every = plain.train.checkpoint_every;
        cfg.genseg.generator_every = 2;
        cfg.train.schedule = crate::config::Schedule::Poly;
        assert!(cfg.train.transforms && cfg.model.unet.deep_supervision);
        assert_pretrains_moves_alpha_and_resumes_bit_exactly(cfg.clone(), dir.path())?;
        let lines = read_lines(&dir.path().join("whole/metrics.jsonl"))?;
        let lr: Vec<f64> = lines.iter().filter_map(|l| l.get("lr")?.as_f64()).collect();
        assert_eq!(lr.len(), 3);
        assert!(lr.windows(2).all(|w| w[1] < w[0]), "poly decay: {lr:?}");
        // Level 1 stepped at iterations 0 and 2 only; the segmenter at every one.
        let stepped: Vec<bool> = lines
            .iter()
            .filter(|l| l.get("lr").is_some())
            .map(|l| l.get("loss_g").is_some() && l.get("loss_d").is_some())
            .collect();
        assert_eq!(stepped, [true, false, true]);
        Ok(())
    }

    /// Level 1 skipped leaves the weights of the generator and discriminator exactly as
    /// they were.
    #[test]
    fn skipped_generator_level_leaves_the_generator_untouched() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let mut cfg = tiny(&dir.path().join("data"))?;
        cfg.train.iterations = 2;
        cfg.train.val_every = 2;
        cfg.genseg.generator_every = 2;
        cfg.genseg.arch_every = 4;
        // One iteration (pre-training a generator), then two from that generator.
        let (one, two) = (dir.path().join("one"), dir.path().join("two"));
        let mut first = cfg.clone();
        (first.train.iterations, first.train.val_every) = (1, 1);
        let stop = AtomicBool::new(false);
        super::super::train(first, &one, &Device::Cpu, &stop, &mut Silent)?;
        cfg.genseg.generator = pretrain_dir(&one);
        super::super::train(cfg, &two, &Device::Cpu, &stop, &mut Silent)?;
        let (a, b) = (
            Checkpoint::load(&one.join("last"))?,
            Checkpoint::load(&two.join("last"))?,
        );
        let (mut same, mut moved) = (0, 0);
        for (name, t) in &a.weights {
            let d = largest_difference(t, &b.weights[name])?;
            // The synthesis still moves the generator's BatchNorm statistics (train mode).
            let buffer = genseg_nn::params::BUFFER_NAMES
                .iter()
                .any(|b| name.ends_with(b));
            if (name.starts_with("netG.") || name.starts_with("netD.")) && !buffer {
                assert_eq!(d, 0.0, "{name} moved at a skipped level-1 iteration");
                same += 1;
            } else if d > 0.0 {
                moved += 1;
            }
        }
        assert!(
            same > 0 && moved > 0,
            "{same} generator tensors, {moved} moved"
        );
        Ok(())
    }

    /// Past `train.lambda_fade` an iteration trains the segmenter on real pairs alone:
    /// no synthetic loss, no generator step, no hypergradient, α and the generator (its
    /// BatchNorm statistics too: nothing is synthesised) left exactly as they were.
    #[test]
    fn faded_lambda_trains_on_real_pairs_alone() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let mut cfg = tiny(&dir.path().join("data"))?;
        (cfg.train.iterations, cfg.train.val_every) = (4, 4);
        cfg.train.lambda_fade = [0.5, 0.5];
        let run = dir.path().join("run");
        let stop = AtomicBool::new(false);
        super::super::train(cfg.clone(), &run, &Device::Cpu, &stop, &mut Silent)?;
        let lines = read_lines(&run.join("metrics.jsonl"))?;
        let steps: Vec<&serde_json::Value> =
            lines.iter().filter(|l| l.get("lr").is_some()).collect();
        assert_eq!(steps.len(), 4);
        for (it, l) in steps.iter().enumerate() {
            let synthetic = it < 2;
            for key in ["loss_synthetic", "loss_g", "norm_arch_grad"] {
                assert_eq!(l.get(key).is_some(), synthetic, "{key} at iteration {it}");
            }
            assert!(l.get("loss_real").and_then(|x| x.as_f64()).is_some());
        }
        assert_eq!(steps[1]["alpha_softmax"], steps[3]["alpha_softmax"]);
        assert_ne!(steps[0]["alpha_softmax"], steps[1]["alpha_softmax"]);
        // The generator of the last checkpoint is the one iteration 2 started from.
        let stopped = dir.path().join("stopped");
        let mut observer = StopAt {
            at: 2,
            total: 4,
            current: 0,
            stop: &stop,
        };
        super::super::train(cfg, &stopped, &Device::Cpu, &stop, &mut observer)?;
        let (a, b) = (
            Checkpoint::load(&stopped.join("last"))?,
            Checkpoint::load(&run.join("last"))?,
        );
        let (mut generator, mut segmenter) = (0, 0);
        for (name, t) in &a.weights {
            let d = largest_difference(t, &b.weights[name])?;
            if name.starts_with("netG.") || name.starts_with("netD.") || name.contains("alpha") {
                assert_eq!(d, 0.0, "{name} moved after λ faded");
                generator += 1;
            } else if d > 0.0 {
                segmenter += 1;
            }
        }
        assert!(generator > 0 && segmenter > 0, "{generator} / {segmenter}");
        Ok(())
    }

    fn assert_pretrains_moves_alpha_and_resumes_bit_exactly(
        cfg: RunConfig,
        dir: &Path,
    ) -> Result<()> {
        let device = Device::Cpu;

        let whole = dir.join("whole");
        let outcome = super::super::train(
            cfg.clone(),
            &whole,
            &device,
            &AtomicBool::new(false),
            &mut Silent,
        )?;
        assert_eq!(outcome.iterations, 3);
        assert!(whole.join("pretrain/best/state.json").is_file());
        // The generator sections the run used are in its own config.
        let written: RunConfig = RunDir::open(&whole)?.read_config()?;
        assert_eq!(written.generator.ngf, 2);
        // α received a hypergradient and moved at every iteration.
        let lines = read_lines(&whole.join("metrics.jsonl"))?;
        let alphas: Vec<&serde_json::Value> = lines
            .iter()
            .filter_map(|l| l.get("alpha_softmax"))
            .collect();
        assert_eq!(alphas.len(), 4, "iteration 0 and three steps");
        assert!(alphas.windows(2).all(|w| w[0] != w[1]));
        assert!(
            lines
                .iter()
                .filter_map(|l| l.get("norm_generator_signal")?.as_f64())
                .all(|n| n > 0.0)
        );
        let last = Checkpoint::load(&whole.join("last"))?;
        let meta = CheckpointMeta::of(&last)?;
        assert_eq!(meta.method, "genseg");
        assert_eq!(
            meta.alpha_softmax.as_ref().map(Vec::len),
            alphas[3].as_array().map(Vec::len)
        );

        // Stopped after two iterations and resumed, the run ends where the whole one did.
        let split = dir.join("split");
        let stop = AtomicBool::new(false);
        let mut observer = StopAt {
            at: 2,
            total: 3,
            current: 0,
            stop: &stop,
        };
        let first = super::super::train(cfg, &split, &device, &stop, &mut observer)?;
        assert!(first.interrupted && first.iterations == 2);
        let resumed = super::super::resume(&split, &device, &AtomicBool::new(false), &mut Silent)?;
        assert_eq!(resumed.iterations, 3);
        let again = Checkpoint::load(&split.join("last"))?;
        for (name, t) in &last.weights {
            let d = largest_difference(t, &again.weights[name])?;
            assert_eq!(d, 0.0, "{name} differs after resume");
        }
        let best = Checkpoint::load(&whole.join(Which::Best.name()))?;
        assert_eq!(CheckpointMeta::of(&best)?.best_iteration, 3);
        Ok(())
    }
}
