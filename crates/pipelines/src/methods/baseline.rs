//! Supervised training of the segmenter on real pairs: the baseline, and the loop that the
//! augmentation baselines ([`super::augment`]) and Separate ([`super::separate`]) extend
//! with a second loss term.
//!
//! One iteration: a batch of real pairs (order from a per-epoch seeded shuffle) — with
//! `train.transforms`, normalised and augmented on a background thread while the previous
//! step runs ([`RealBatches`]) — the configured loss (deeply supervised when the backbone
//! has deep-supervision heads), plus — when the method has one — the same loss on a batch derived from
//! the real one (an augmented copy, or synthetic pairs painted by a frozen generator)
//! weighted by λ; backward; optimizer step. Every random draw is a pure function of the
//! seed and the iteration (see [`crate::seeding`]), so a resumed run is bit-exact.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use genseg_backbones::SegModel;
use genseg_data::dataset::Dataset;
use genseg_data::prefetch::Prefetcher;
use genseg_nn::checkpoint::Checkpoint;
use genseg_nn::optim::Optimizer;
use genseg_nn::params::ParamStore;
use serde_json::{Map, Value, json};

use genseg_data::intensity::Normalisation;
use genseg_data::transforms::TransformConfig;

use crate::config::{Method, RunConfig};
use crate::learner::{Color, Figure, Pipeline, State, Validation, curve, panel};
use crate::seeding::{Purpose, batch_indices, rng_for};
use crate::segmenter::{
    SEGMENTER_OPTIMIZER, Segmenter, build_model, start_from_pretrained, validation_dice,
};

/// A second loss term on a batch derived from the real one.
pub trait ExtraTerm {
    /// Metrics key of its loss (`loss_augmented`, `loss_synthetic`).
    fn key(&self) -> &'static str;
    /// Its curve's label in `progress.png`.
    fn label(&self) -> &'static str;
    /// The derived batch `(images, masks)` of iteration `it` from the real batch.
    fn batch(&self, images: &Tensor, masks: &Tensor, it: u64) -> Result<(Tensor, Tensor)>;
}

/// The real training batches of a run: the dataset's pairs, or, with `train.transforms`,
/// pairs normalised and augmented by nnU-Net's chain on a prefetch thread. Either way the
/// batch of iteration `t` is a pure function of the seed and `t` (resume is exact).
pub struct RealBatches {
    train_set: Dataset,
    seed: u64,
    batch_size: usize,
    prefetch: Option<Prefetcher<(Vec<f32>, Vec<f32>)>>,
}

/// Batches the prefetch thread keeps ready.
const PREFETCH_DEPTH: usize = 2;

/// What the strong recipe does to a batch of pairs before the segmenter sees it: each image
/// normalised (`data.normalisation`), then the pair augmented by nnU-Net's chain
/// (`[transforms]`), image `k` of iteration `it` drawing from `(seed, purpose, it·B + k)`.
#[derive(Clone)]
pub struct RecipeChain {
    normalisation: Normalisation,
    chain: TransformConfig,
    seed: u64,
    batch_size: u64,
}

impl RecipeChain {
    /// The chain of `cfg`.
    pub fn new(cfg: &RunConfig) -> Self {
        Self {
            normalisation: cfg.data.normalisation,
            chain: cfg.transforms.clone(),
            seed: cfg.seed,
            batch_size: cfg.train.batch_size as u64,
        }
    }

    /// Applies the chain in place to `images` (`[B, C, H, W]`) and `masks` (`[B, H, W]`).
    pub fn apply(
        &self,
        images: &mut [f32],
        masks: &mut [f32],
        chw: (usize, usize, usize),
        purpose: Purpose,
        it: u64,
    ) {
        for image in images.chunks_exact_mut(chw.0 * chw.1 * chw.2) {
            self.normalisation.apply_slice(image, chw.0);
        }
        let (seed, batch) = (self.seed, self.batch_size);
        self.chain.apply_batch(images, masks, chw, |k| {
            rng_for(seed, purpose, it * batch + k as u64)
        });
    }
}

impl RealBatches {
    /// The batches of `cfg` from iteration `start` on.
    pub fn new(cfg: &RunConfig, train_set: Dataset, start: u64) -> Self {
        let prefetch = cfg.train.transforms.then(|| {
            let data = train_set.clone();
            let (seed, batch) = (cfg.seed, cfg.train.batch_size);
            let chain = RecipeChain::new(cfg);
            Prefetcher::new(start, PREFETCH_DEPTH, move |it| {
                let idx = batch_indices(seed, data.len(), batch, it);
                let (mut images, mut masks) = data.batch_values(&idx)?;
                chain.apply(&mut images, &mut masks, data.chw(), Purpose::Transforms, it);
                Ok::<_, candle_core::Error>((images, masks))
            })
        });
        Self {
            train_set,
            seed: cfg.seed,
            batch_size: cfg.train.batch_size,
            prefetch,
        }
    }

    /// The batch of iteration `it` (the next one): `(images, masks, prepared)`, where
    /// `prepared` says the images are already normalised (and augmented).
    pub fn next(&mut self, it: u64, device: &Device) -> Result<(Tensor, Tensor, bool)> {
        match &mut self.prefetch {
            Some(p) => {
                let (images, masks) = p.take(it)?;
                let (x, y) = self.train_set.batch_tensors(images, masks, device)?;
                Ok((x, y, true))
            }
            None => {
                let idx = batch_indices(self.seed, self.train_set.len(), self.batch_size, it);
                let (x, y) = self.train_set.batch(&idx, device)?;
                Ok((x, y, false))
            }
        }
    }

    /// The un-augmented real pairs of iteration `it` (what an [`ExtraTerm`] derives from).
    pub fn plain(&self, it: u64, device: &Device) -> Result<(Tensor, Tensor)> {
        let idx = batch_indices(self.seed, self.train_set.len(), self.batch_size, it);
        Ok(self.train_set.batch(&idx, device)?)
    }

    /// `chain` applied to the pairs `(images, masks)` (`[B, C, H, W]`, `[B, 1, H, W]`, the
    /// training images' size and channels) of iteration `it`, drawing for `purpose`.
    pub fn through(
        &self,
        chain: &RecipeChain,
        (images, masks): (&Tensor, &Tensor),
        purpose: Purpose,
        it: u64,
    ) -> Result<(Tensor, Tensor)> {
        let mut values = images.flatten_all()?.to_vec1::<f32>()?;
        let mut labels = masks.flatten_all()?.to_vec1::<f32>()?;
        chain.apply(&mut values, &mut labels, self.train_set.chw(), purpose, it);
        Ok(self
            .train_set
            .batch_tensors(values, labels, images.device())?)
    }
}

/// The segmenter trained on real pairs, with an optional [`ExtraTerm`].
pub struct Supervised {
    cfg: RunConfig,
    device: Device,
    batches: RealBatches,
    val_set: Dataset,
    store: ParamStore,
    model: Segmenter,
    opt: Box<dyn Optimizer>,
    extra: Option<Box<dyn ExtraTerm>>,
    /// The real pairs' chain, for the extra term's pairs too (`separate.transforms`).
    extra_chain: Option<RecipeChain>,
    iteration: u64,
}

impl Supervised {
    /// Builds the segmenter and its optimizer from `cfg`, restored from `ckpt` when resuming.
    pub fn new(
        cfg: RunConfig,
        device: &Device,
        (train_set, val_set): (Dataset, Dataset),
        extra: Option<Box<dyn ExtraTerm>>,
        ckpt: Option<&Checkpoint>,
    ) -> Result<Self> {
        let (store, model) = build_model(&cfg, device)?;
        let mut opt = cfg.train.build_optimizer(store.trainable_vars())?;
        let iteration = match ckpt {
            Some(c) => {
                store
                    .load_named_tensors(&c.weights, true)
                    .context("restoring weights from last/")?;
                c.restore_optimizer(SEGMENTER_OPTIMIZER, opt.as_mut())
                    .context("resuming from last/")?;
                c.step
            }
            None => {
                start_from_pretrained(&cfg, &store)?;
                0
            }
        };
        let batches = RealBatches::new(&cfg, train_set, iteration);
        let extra_chain =
            (cfg.method == Method::Separate && cfg.separate.transforms && cfg.train.transforms)
                .then(|| RecipeChain::new(&cfg));
        Ok(Self {
            cfg,
            device: device.clone(),
            batches,
            val_set,
            store,
            model,
            opt,
            extra,
            extra_chain,
            iteration,
        })
    }

    /// The parameter store and the model (for scoring `best/` after training).
    pub fn segmenter(&self) -> (&ParamStore, &dyn SegModel) {
        (&self.store, &self.model)
    }

    fn train_step(&mut self) -> Result<(f64, Option<f64>)> {
        let it = self.iteration;
        let (x, y, prepared) = self.batches.next(it, &self.device)?;
        let loss_fn = &self.cfg.train.loss;
        let outputs = match prepared {
            true => self.model.forward_deep_normalised(&x, true)?,
            false => self.model.forward_deep_t(&x, true)?,
        };
        let real = loss_fn.forward_deep(&outputs, &y)?;
        let mut total = real.clone();
        let mut extra_value = None;
        let weight = self.cfg.train.lambda_at(it);
        if let Some(extra) = self.extra.as_ref().filter(|_| weight > 0.0) {
            let (x, y) = match prepared {
                true => self.batches.plain(it, &self.device)?,
                false => (x, y),
            };
            let (xe, ye) = extra.batch(&x, &y, it)?;
            let term = match &self.extra_chain {
                // Trained exactly as the real pairs: normalised, augmented, deeply supervised.
                Some(chain) => {
                    let purpose = Purpose::SyntheticTransforms;
                    let (xe, ye) = self.batches.through(chain, (&xe, &ye), purpose, it)?;
                    loss_fn.forward_deep(&self.model.forward_deep_normalised(&xe, true)?, &ye)?
                }
                None => loss_fn.forward(&self.model.forward_t(&xe, true)?, &ye)?,
            };
            extra_value = Some(term.to_scalar::<f32>()? as f64);
            total = (total + (term * weight)?)?;
        }
        let grads = total.backward()?;
        let t = &self.cfg.train;
        self.opt
            .set_learning_rate(t.schedule.lr(t.lr, it, t.iterations));
        self.opt.step(&grads)?;
        Ok((real.to_scalar::<f32>()? as f64, extra_value))
    }
}

impl Pipeline for Supervised {
    fn method(&self) -> &'static str {
        self.cfg.method.name()
    }

    fn iteration(&self) -> u64 {
        self.iteration
    }

    fn step(&mut self) -> Result<Map<String, Value>> {
        let (loss, extra) = self.train_step()?;
        self.iteration += 1;
        let mut record = Map::new();
        record.insert("loss".into(), json!(loss));
        record.insert("lr".into(), json!(self.opt.learning_rate()));
        if let (Some(term), Some(value)) = (&self.extra, extra) {
            record.insert(term.key().into(), json!(value));
        }
        Ok(record)
    }

    fn validate(&mut self, _it: u64, record: &mut Value) -> Result<Validation> {
        let dice = validation_dice(&self.model, &self.val_set, &self.cfg, &self.device)?;
        record["val_dice"] = json!(dice);
        Ok(Validation {
            score: dice,
            summary: format!("val Dice {dice:.4}"),
        })
    }

    fn state(&self) -> Result<State> {
        let mut optimizers = BTreeMap::new();
        optimizers.insert(SEGMENTER_OPTIMIZER.to_string(), self.opt.state()?);
        Ok(State {
            weights: self.store.named_tensors()?,
            optimizers,
        })
    }

    fn figures(&self, lines: &[Value]) -> Vec<Figure> {
        let mut losses = vec![curve(lines, "loss", "real", Color::Blue)];
        if let Some(term) = &self.extra {
            let c = curve(lines, term.key(), term.label(), Color::Green);
            if !c.points.is_empty() {
                losses.push(c);
            }
        }
        vec![Figure {
            file: "progress.png".into(),
            panels: vec![
                panel("training loss", "loss", losses),
                panel(
                    "validation",
                    "Dice",
                    vec![curve(lines, "val_dice", "val Dice", Color::Red)],
                ),
            ],
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Profile;

    #[test]
    fn the_recipe_chain_is_seeded_per_purpose_and_iteration() {
        let mut cfg = RunConfig::profile(Profile::Cpu).with_recipe(crate::config::Recipe::Strong);
        cfg.train.batch_size = 4;
        let chain = RecipeChain::new(&cfg);
        let chw = (1, 16, 16);
        // Four images, so that two independent draws cannot all come out alike.
        let image: Vec<f32> = (0..4 * 256).map(|i| (i % 37) as f32 / 37.0).collect();
        let mask: Vec<f32> = (0..4 * 256).map(|i| ((i % 16) < 8) as u8 as f32).collect();
        let run = |purpose, it| {
            let (mut x, mut y) = (image.clone(), mask.clone());
            chain.apply(&mut x, &mut y, chw, purpose, it);
            (x, y)
        };
        let real = run(Purpose::Transforms, 3);
        assert_eq!(real, run(Purpose::Transforms, 3));
        assert_ne!(real.0, run(Purpose::SyntheticTransforms, 3).0);
        assert_ne!(real.0, run(Purpose::Transforms, 4).0);
        // Masks stay binary whatever the spatial draws did.
        assert!(real.1.iter().all(|&v| v == 0.0 || v == 1.0));
    }
}
