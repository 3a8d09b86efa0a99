//! pix2pix's objectives (spec §3; `GANLoss` in `models_pix2pix/networks.py`).
//!
//! - [`gan_loss`]: the discriminator's patch logits against a constant target, 1 for "real"
//!   and 0 for "fake" — binary cross-entropy on logits ([`GanMode::Vanilla`], the reference)
//!   or mean squared error ([`GanMode::Lsgan`]).
//! - [`generator_loss`]: `GAN(D(m, G(m)) → real) + λ_L1 · mean|G(m) − x|` (λ_L1 = 100).
//! - [`discriminator_loss`]: `½ [GAN(D(m, G(m)) → fake) + GAN(D(m, x) → real)]`.
//!
//! All return scalar tensors with their parts, so a training loop can step on `total` and log
//! the rest. The discriminator loss must see a *detached* synthetic image (pix2pix's
//! `fake_B.detach()`), otherwise its backward pass would also reach the generator.

use candle_core::{Result, Tensor};
use genseg_nn::ops::bce_with_logits;
use serde::{Deserialize, Serialize};

/// The GAN objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GanMode {
    /// Binary cross-entropy on logits (`BCEWithLogitsLoss`), the reference's choice.
    #[default]
    Vanilla,
    /// Least squares (`MSELoss` on the raw logits).
    Lsgan,
}

/// Weights of the pix2pix objective.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    /// The GAN objective.
    pub gan_mode: GanMode,
    /// Weight of the L1 reconstruction term (`--lambda_L1`, 100).
    pub lambda_l1: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            gan_mode: GanMode::Vanilla,
            lambda_l1: 100.0,
        }
    }
}

/// Mean GAN loss of the patch logits `pred` against the constant target 1 (`target_is_real`)
/// or 0.
pub fn gan_loss(pred: &Tensor, target_is_real: bool, mode: GanMode) -> Result<Tensor> {
    let target = if target_is_real {
        pred.ones_like()?
    } else {
        pred.zeros_like()?
    };
    match mode {
        GanMode::Vanilla => bce_with_logits(pred, &target),
        GanMode::Lsgan => (pred - target)?.sqr()?.mean_all(),
    }
}

/// The generator's objective and its parts (scalars).
#[derive(Debug, Clone)]
pub struct GeneratorLoss {
    /// `gan + λ_L1 · l1`: what the generator steps on.
    pub total: Tensor,
    /// The adversarial part, `GAN(D(m, G(m)) → real)`.
    pub gan: Tensor,
    /// The unweighted reconstruction part, `mean|G(m) − x|`.
    pub l1: Tensor,
}

/// The generator loss from the discriminator's logits on the synthetic pair
/// (`pred_fake = D(m, G(m))`, not detached), the synthetic image `fake = G(m)` and the real
/// image `real` (same shape).
pub fn generator_loss(
    pred_fake: &Tensor,
    fake: &Tensor,
    real: &Tensor,
    cfg: &LossConfig,
) -> Result<GeneratorLoss> {
    if fake.shape() != real.shape() {
        candle_core::bail!(
            "generator_loss: synthetic image {:?} and real image {:?} differ in shape",
            fake.dims(),
            real.dims()
        );
    }
    if !cfg.lambda_l1.is_finite() || cfg.lambda_l1 < 0.0 {
        candle_core::bail!(
            "generator_loss: lambda_l1 must be finite and >= 0, got {}",
            cfg.lambda_l1
        );
    }
    let gan = gan_loss(pred_fake, true, cfg.gan_mode)?;
    let l1 = (fake - real.to_dtype(fake.dtype())?)?.abs()?.mean_all()?;
    let total = (&gan + l1.affine(cfg.lambda_l1, 0.0)?.to_dtype(gan.dtype())?)?;
    Ok(GeneratorLoss { total, gan, l1 })
}

/// The discriminator's objective and its parts (scalars).
#[derive(Debug, Clone)]
pub struct DiscriminatorLoss {
    /// `½ (fake + real)`: what the discriminator steps on.
    pub total: Tensor,
    /// `GAN(D(m, G(m)) → fake)`.
    pub fake: Tensor,
    /// `GAN(D(m, x) → real)`.
    pub real: Tensor,
}

/// The discriminator loss from its logits on the synthetic pair (computed from a detached
/// `G(m)`) and on the real pair.
pub fn discriminator_loss(
    pred_fake: &Tensor,
    pred_real: &Tensor,
    mode: GanMode,
) -> Result<DiscriminatorLoss> {
    let fake = gan_loss(pred_fake, false, mode)?;
    let real = gan_loss(pred_real, true, mode)?;
    let total = ((&fake + &real)? * 0.5)?;
    Ok(DiscriminatorLoss { total, fake, real })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn scalar(t: &Tensor) -> f64 {
        t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    }

    fn softplus(x: f64) -> f64 {
        (1.0 + x.exp()).ln()
    }

    #[test]
    fn gan_losses_by_hand() -> anyhow::Result<()> {
        let logits = [0.0f64, 2.0, -1.0, 0.5];
        let pred = Tensor::new(&logits, &Device::Cpu)?.reshape((1, 1, 2, 2))?;
        // BCE against 1 is softplus(-x); against 0 it is softplus(x).
        let real: f64 = logits.iter().map(|x| softplus(-x)).sum::<f64>() / 4.0;
        let fake: f64 = logits.iter().map(|x| softplus(*x)).sum::<f64>() / 4.0;
        assert!((scalar(&gan_loss(&pred, true, GanMode::Vanilla)?) - real).abs() < 1e-12);
        assert!((scalar(&gan_loss(&pred, false, GanMode::Vanilla)?) - fake).abs() < 1e-12);
        // LSGAN: mean (x - 1)^2 = (1 + 1 + 4 + 0.25) / 4; mean x^2 = (0 + 4 + 1 + 0.25) / 4.
        assert!((scalar(&gan_loss(&pred, true, GanMode::Lsgan)?) - 6.25 / 4.0).abs() < 1e-12);
        assert!((scalar(&gan_loss(&pred, false, GanMode::Lsgan)?) - 5.25 / 4.0).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn generator_and_discriminator_losses_by_hand() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let pred_fake = Tensor::new(&[[[[1.0f64, -2.0]]]], &dev)?;
        let pred_real = Tensor::new(&[[[[3.0f64, 0.0]]]], &dev)?;
        let fake = Tensor::new(&[[[[0.5f64, -0.5], [0.0, 1.0]]]], &dev)?;
        let real = Tensor::new(&[[[[0.0f32, 0.0], [0.25, 1.0]]]], &dev)?;
        let g = generator_loss(&pred_fake, &fake, &real, &LossConfig::default())?;
        let gan = (softplus(-1.0) + softplus(2.0)) / 2.0;
        let l1 = (0.5 + 0.5 + 0.25 + 0.0) / 4.0;
        assert!((scalar(&g.gan) - gan).abs() < 1e-12);
        assert!((scalar(&g.l1) - l1).abs() < 1e-12);
        assert!((scalar(&g.total) - (gan + 100.0 * l1)).abs() < 1e-10);
        let lsq = LossConfig {
            gan_mode: GanMode::Lsgan,
            lambda_l1: 10.0,
        };
        let g = generator_loss(&pred_fake, &fake, &real, &lsq)?;
        assert!((scalar(&g.total) - ((0.0 + 9.0) / 2.0 + 10.0 * l1)).abs() < 1e-10);

        let d = discriminator_loss(&pred_fake, &pred_real, GanMode::Vanilla)?;
        let d_fake = (softplus(1.0) + softplus(-2.0)) / 2.0;
        let d_real = (softplus(-3.0) + softplus(0.0)) / 2.0;
        assert!((scalar(&d.fake) - d_fake).abs() < 1e-12);
        assert!((scalar(&d.real) - d_real).abs() < 1e-12);
        assert!((scalar(&d.total) - 0.5 * (d_fake + d_real)).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn gradients_reach_both_images_and_logits() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let pred = Var::new(&[[[[0.3f64, -0.7]]]], &dev)?;
        let fake = Var::new(&[[[[0.2f64, -0.1]]]], &dev)?;
        let real = Tensor::new(&[[[[0.0f64, 0.0]]]], &dev)?;
        let g = generator_loss(
            pred.as_tensor(),
            fake.as_tensor(),
            &real,
            &LossConfig::default(),
        )?;
        let grads = g.total.backward()?;
        let gf: Vec<f64> = grads
            .get(fake.as_tensor())
            .unwrap()
            .flatten_all()?
            .to_vec1()?;
        // d/dfake of 100 · mean|fake − real| = 100 · sign / 2.
        assert_eq!(gf, vec![50.0, -50.0]);
        let gp: Vec<f64> = grads
            .get(pred.as_tensor())
            .unwrap()
            .flatten_all()?
            .to_vec1()?;
        // d/dx of mean softplus(−x) = (sigmoid(x) − 1) / 2.
        for (g, x) in gp.iter().zip([0.3f64, -0.7]) {
            let want = (1.0 / (1.0 + (-x).exp()) - 1.0) / 2.0;
            assert!((g - want).abs() < 1e-12);
        }
        Ok(())
    }

    #[test]
    fn mismatched_images_and_bad_lambda_are_errors() -> anyhow::Result<()> {
        let p = Tensor::zeros((1, 1, 2, 2), DType::F32, &Device::Cpu)?;
        let a = Tensor::zeros((1, 1, 4, 4), DType::F32, &Device::Cpu)?;
        let b = Tensor::zeros((1, 3, 4, 4), DType::F32, &Device::Cpu)?;
        let e = generator_loss(&p, &a, &b, &LossConfig::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[1, 1, 4, 4]") && e.contains("[1, 3, 4, 4]"),
            "{e}"
        );
        let bad = LossConfig {
            lambda_l1: f64::NAN,
            ..Default::default()
        };
        assert!(generator_loss(&p, &a, &a, &bad).is_err());
        let cfg: LossConfig = serde_json::from_str(r#"{"gan_mode": "lsgan"}"#)?;
        assert_eq!(cfg.gan_mode, GanMode::Lsgan);
        assert_eq!(cfg.lambda_l1, 100.0);
        Ok(())
    }
}
