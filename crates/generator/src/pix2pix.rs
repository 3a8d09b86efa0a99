//! pix2pix training, written once for the generator's pre-training and for GenSeg's first
//! level (spec §1.7): the two networks in their own seeded stores, the discriminator's
//! optimizer and step, and the generator's objective.
//!
//! One pix2pix iteration on real pairs `(x, m)`: `fake = G(m)` (train mode, dropout masks
//! from a seeded stream); a discriminator step on `½[GAN(D(m, fake.detach()) → 0) +
//! GAN(D(m, x) → 1)]`; then a generator step on `GAN(D(m, fake) → 1) + λ_L1·|fake − x|`,
//! which sees the discriminator just updated. Pre-training runs both with
//! [`Pix2Pix::step`]; GenSeg steps the discriminator with [`Pix2Pix::discriminator_step`]
//! and hands [`Pix2Pix::generator_loss`] to its multi-level engine, which owns the
//! generator's optimizer there.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use genseg_nn::checkpoint::{Checkpoint, with_prefix};
use genseg_nn::optim::{Adam, AdamConfig, Optimizer};
use genseg_nn::params::ParamStore;
use genseg_nn::rng::SeededRng;

use crate::discriminator::{DiscriminatorConfig, PatchDiscriminator};
use crate::generator::{GeneratorConfig, Pix2PixGenerator};
use crate::loss::{GeneratorLoss, LossConfig, discriminator_loss, generator_loss};

/// Name prefix of the generator's tensors in checkpoints.
pub const GENERATOR_PREFIX: &str = "netG";
/// Name prefix of the discriminator's tensors in checkpoints.
pub const DISCRIMINATOR_PREFIX: &str = "netD";
/// Checkpoint name of the generator weights' optimizer.
pub const GENERATOR_OPTIMIZER: &str = "generator";
/// Checkpoint name of the discriminator's optimizer.
pub const DISCRIMINATOR_OPTIMIZER: &str = "discriminator";

/// Builds the generator of `cfg` under [`GENERATOR_PREFIX`] in a fresh store seeded with
/// `seed`.
pub fn build_generator(
    cfg: &GeneratorConfig,
    seed: u64,
    device: &Device,
) -> Result<(ParamStore, Pix2PixGenerator)> {
    let store = ParamStore::new(seed, DType::F32, device);
    let generator = Pix2PixGenerator::new(cfg, store.var_builder().pp(GENERATOR_PREFIX))?;
    Ok((store, generator))
}

/// The losses of one pix2pix iteration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pix2PixLosses {
    /// The discriminator's objective.
    pub d: f64,
    /// The generator's adversarial part.
    pub g_gan: f64,
    /// The generator's (unweighted) L1 part.
    pub g_l1: f64,
    /// The caller's extra term of [`Pix2Pix::step_with`] (weighted), if any.
    pub g_extra: Option<f64>,
}

/// Generator and discriminator (each in its own seeded store), the discriminator's Adam and
/// the GAN objective.
pub struct Pix2Pix {
    /// Holds every generator tensor under [`GENERATOR_PREFIX`].
    pub g_store: ParamStore,
    /// The generator.
    pub generator: Pix2PixGenerator,
    /// Holds every discriminator tensor under [`DISCRIMINATOR_PREFIX`].
    pub d_store: ParamStore,
    /// The discriminator.
    pub discriminator: PatchDiscriminator,
    /// GAN mode and λ_L1.
    pub loss: LossConfig,
    /// The discriminator's optimizer.
    pub opt_d: Adam,
    adam: AdamConfig,
}

impl Pix2Pix {
    /// Builds both networks (`g_seed`, `d_seed` seed their stores) and the discriminator's
    /// Adam with `adam`.
    pub fn new(
        generator: &GeneratorConfig,
        discriminator: &DiscriminatorConfig,
        loss: LossConfig,
        adam: AdamConfig,
        (g_seed, d_seed): (u64, u64),
        device: &Device,
    ) -> Result<Self> {
        let (g_store, generator) = build_generator(generator, g_seed, device)?;
        let d_store = ParamStore::new(d_seed, DType::F32, device);
        let discriminator = PatchDiscriminator::new(
            discriminator,
            d_store.var_builder().pp(DISCRIMINATOR_PREFIX),
        )?;
        let opt_d = Adam::new(d_store.trainable_vars(), adam)?;
        Ok(Self {
            g_store,
            generator,
            d_store,
            discriminator,
            loss,
            opt_d,
            adam,
        })
    }

    /// The generator's variables of parameter group `group` (`"weights"` or `"arch"`).
    pub fn generator_group(&self, group: &str) -> Result<Vec<(String, Var)>> {
        let prefix = self
            .generator
            .param_groups()
            .into_iter()
            .find(|(g, _)| *g == group)
            .map(|(_, prefix)| prefix)
            .with_context(|| format!("the generator has no {group} group"))?;
        Ok(self.g_store.trainable_vars_with_prefix(&prefix))
    }

    /// A fresh Adam over the generator's weights (not α), with the settings of the
    /// discriminator's: pix2pix never steps α.
    pub fn generator_optimizer(&self) -> Result<Adam> {
        Ok(Adam::new(self.generator_group("weights")?, self.adam)?)
    }

    /// Loads both networks from checkpoint `weights` (tensors of other networks are ignored).
    pub fn load_weights(&self, weights: &BTreeMap<String, Tensor>) -> Result<()> {
        self.g_store
            .load_named_tensors(&with_prefix(weights, GENERATOR_PREFIX), true)
            .context("loading the generator")?;
        self.d_store
            .load_named_tensors(&with_prefix(weights, DISCRIMINATOR_PREFIX), true)
            .context("loading the discriminator")
    }

    /// Deep copies of both networks' tensors, under their prefixes.
    pub fn named_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut weights = self.g_store.named_tensors()?;
        weights.extend(self.d_store.named_tensors()?);
        Ok(weights)
    }

    /// One discriminator step on `fake` (detached here) against the real pair.
    pub fn discriminator_step(
        &mut self,
        masks: &Tensor,
        real: &Tensor,
        fake: &Tensor,
    ) -> Result<f64> {
        let d = &self.discriminator;
        let loss = discriminator_loss(
            &d.forward_t(masks, &fake.detach(), true)?,
            &d.forward_t(masks, real, true)?,
            self.loss.gan_mode,
        )?;
        self.opt_d.step(&loss.total.backward()?)?;
        Ok(scalar(&loss.total)?)
    }

    /// The generator's objective for `fake = G(masks)` (not detached) against `real`.
    pub fn generator_loss(
        &self,
        masks: &Tensor,
        real: &Tensor,
        fake: &Tensor,
    ) -> Result<GeneratorLoss> {
        Ok(generator_loss(
            &self.discriminator.forward_t(masks, fake, true)?,
            fake,
            real,
            &self.loss,
        )?)
    }

    /// One pix2pix iteration: a discriminator step, then a step of `opt_g` (from
    /// [`Pix2Pix::generator_optimizer`]) on the generator's objective. Dropout masks come
    /// from `rng`.
    pub fn step(
        &mut self,
        opt_g: &mut Adam,
        masks: &Tensor,
        real: &Tensor,
        rng: &mut SeededRng,
    ) -> Result<Pix2PixLosses> {
        self.step_with(opt_g, masks, real, rng, |_, _| Ok(None))
    }

    /// [`Pix2Pix::step`] with a term of the caller's added to the generator's objective:
    /// `extra(fake, masks)` returns it (already weighted; `None` for none), and its value is
    /// reported as `g_extra`.
    pub fn step_with(
        &mut self,
        opt_g: &mut Adam,
        masks: &Tensor,
        real: &Tensor,
        rng: &mut SeededRng,
        extra: impl Fn(&Tensor, &Tensor) -> Result<Option<Tensor>>,
    ) -> Result<Pix2PixLosses> {
        let fake = self.generator.forward_t(masks, true, rng)?;
        let d = self.discriminator_step(masks, real, &fake)?;
        let g = self.generator_loss(masks, real, &fake)?;
        let extra = extra(&fake, masks)?;
        let total = match &extra {
            Some(term) => (&g.total + term)?,
            None => g.total.clone(),
        };
        opt_g.step(&total.backward()?)?;
        Ok(Pix2PixLosses {
            d,
            g_gan: scalar(&g.gan)?,
            g_l1: scalar(&g.l1)?,
            g_extra: extra.as_ref().map(scalar).transpose()?,
        })
    }

    /// Restores the discriminator's optimizer from `ckpt`.
    pub fn restore_discriminator_optimizer(&mut self, ckpt: &Checkpoint) -> Result<()> {
        ckpt.restore_optimizer(DISCRIMINATOR_OPTIMIZER, &mut self.opt_d)
    }
}

fn scalar(t: &Tensor) -> candle_core::Result<f64> {
    t.to_dtype(DType::F64)?.to_scalar::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Result<Pix2Pix> {
        let g = GeneratorConfig {
            ngf: 2,
            image_size: 32,
            ..GeneratorConfig::default()
        };
        let d = DiscriminatorConfig {
            ndf: 2,
            ..DiscriminatorConfig::default()
        };
        Pix2Pix::new(
            &g,
            &d,
            LossConfig::default(),
            AdamConfig::default(),
            (1, 2),
            &Device::Cpu,
        )
    }

    #[test]
    fn a_step_moves_both_networks_but_not_alpha() -> Result<()> {
        let mut p = tiny()?;
        let mut opt_g = p.generator_optimizer()?;
        let before = p.named_tensors()?;
        let masks = Tensor::ones((2, 1, 32, 32), DType::F32, &Device::Cpu)?;
        let real = Tensor::zeros((2, 1, 32, 32), DType::F32, &Device::Cpu)?;
        let losses = p.step(&mut opt_g, &masks, &real, &mut SeededRng::new(0))?;
        assert!(losses.d.is_finite() && losses.g_gan.is_finite() && losses.g_l1 > 0.0);
        let after = p.named_tensors()?;
        let moved = |prefix: &str| {
            before
                .iter()
                .filter(|(n, _)| n.starts_with(prefix))
                .any(|(n, t)| {
                    (t - &after[n])
                        .and_then(|d| d.abs()?.sum_all()?.to_scalar::<f32>())
                        .is_ok_and(|d| d > 0.0)
                })
        };
        assert!(moved("netG.model") && moved("netD."));
        assert!(!moved("netG.arch"), "pix2pix must not step α");
        // Reloading the saved tensors restores the networks exactly.
        p.load_weights(&before)?;
        let back = p.named_tensors()?;
        for (n, t) in &before {
            let d = (t - &back[n])?.abs()?.sum_all()?.to_scalar::<f32>()?;
            assert_eq!(d, 0.0, "{n}");
        }
        Ok(())
    }
}
