//! Segmentation losses of the reference code (spec §4), chosen in the config
//! as a sum of terms.
//!
//! - `bce`: BCE-with-logits, mean over pixels (the stable form from genseg-nn).
//! - `dice_batch`: 1 - soft Dice over the whole batch as one volume
//!   (reference lungs, milesial `dice_loss(multiclass=False)`).
//! - `dice_per_image`: 1 - mean over images of soft Dice.
//! - `jaccard_per_image`: 1 - mean over images of soft Jaccard with smooth 1
//!   (reference skin).
//!
//! `p = sigmoid(logits)`; targets are `{0, 1}` masks of the logits' shape.

use candle_core::{D, DType, Result, Tensor};
use genseg_nn::ops::bce_with_logits;
use serde::{Deserialize, Serialize};

/// One summand of a [`SegLoss`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossTerm {
    /// Binary cross-entropy on the logits, mean over all pixels.
    Bce,
    /// Soft Dice computed over the whole batch at once, eps 1e-6.
    DiceBatch,
    /// Soft Dice per image, eps 1e-6, averaged over the batch.
    DicePerImage,
    /// Soft Jaccard per image, smooth 1, averaged over the batch.
    JaccardPerImage,
}

/// A sum of loss terms, e.g. `["bce", "dice_batch"]` (reference lungs) or
/// `["bce", "jaccard_per_image"]` (reference skin).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SegLoss {
    /// The summed terms; must not be empty.
    pub terms: Vec<LossTerm>,
}

impl SegLoss {
    /// The reference loss of the lung (JSRT) scripts.
    pub fn lungs() -> Self {
        Self {
            terms: vec![LossTerm::Bce, LossTerm::DiceBatch],
        }
    }

    /// The reference loss of the skin (ISIC) scripts.
    pub fn skin() -> Self {
        Self {
            terms: vec![LossTerm::Bce, LossTerm::JaccardPerImage],
        }
    }

    /// The deeply supervised loss of nnU-Net: `outputs[i]` (side `H >> i`, as
    /// [`crate::SegModel::forward_deep_t`] returns them) is scored against the targets
    /// average-pooled by `2^i` and thresholded at 0.5, with weight `2^-i`, the weights
    /// normalised to sum to 1. One output is [`SegLoss::forward`].
    pub fn forward_deep(&self, outputs: &[Tensor], targets: &Tensor) -> Result<Tensor> {
        let weights = deep_supervision_weights(outputs.len());
        let mut total: Option<Tensor> = None;
        for (i, (logits, w)) in outputs.iter().zip(weights).enumerate() {
            let scaled = if i == 0 {
                targets.clone()
            } else {
                targets
                    .avg_pool2d(1 << i)?
                    .ge(0.5)?
                    .to_dtype(targets.dtype())?
            };
            let term = (self.forward(logits, &scaled)? * w)?;
            total = Some(match total {
                None => term,
                Some(t) => (t + term)?,
            });
        }
        total.ok_or_else(|| candle_core::Error::Msg("forward_deep: no outputs".into()))
    }

    /// `logits` and `targets`: `[B, 1, H, W]`; returns a scalar.
    pub fn forward(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        if self.terms.is_empty() {
            candle_core::bail!("segmentation loss has no terms");
        }
        if logits.dims() != targets.dims() {
            candle_core::bail!(
                "loss: logits {:?} and targets {:?} differ in shape",
                logits.dims(),
                targets.dims()
            );
        }
        let probs = candle_nn::ops::sigmoid(logits)?;
        let mut total: Option<Tensor> = None;
        for term in &self.terms {
            let value = match term {
                LossTerm::Bce => bce_with_logits(logits, targets)?,
                LossTerm::DiceBatch => (1.0 - soft_dice_batch(&probs, targets)?)?,
                LossTerm::DicePerImage => {
                    (1.0 - soft_dice_per_image(&probs, targets)?.mean_all()?)?
                }
                LossTerm::JaccardPerImage => {
                    (1.0 - soft_jaccard_per_image(&probs, targets)?.mean_all()?)?
                }
            };
            total = Some(match total {
                Some(t) => (t + value)?,
                None => value,
            });
        }
        Ok(total.expect("terms is not empty"))
    }
}

/// Sums over everything but the batch dimension: `[B, ...] -> [B]`.
fn per_image_sum(x: &Tensor) -> Result<Tensor> {
    x.flatten_from(1)?.sum(D::Minus1)
}

/// Soft Dice over the batch as one volume: `(2 Σpy + eps) / (Σp + Σy + eps)`.
/// Where `Σp + Σy = 0` the reference substitutes the intersection (Dice 1).
pub fn soft_dice_batch(probs: &Tensor, targets: &Tensor) -> Result<Tensor> {
    dice_from_sums(
        &(probs * targets)?.sum_all()?,
        &(probs.sum_all()? + targets.sum_all()?)?,
    )
}

/// Soft Dice per image: `[B]`.
pub fn soft_dice_per_image(probs: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let inter = per_image_sum(&(probs * targets)?)?;
    let sets = (per_image_sum(probs)? + per_image_sum(targets)?)?;
    dice_from_sums(&inter, &sets)
}

fn dice_from_sums(inter: &Tensor, sets: &Tensor) -> Result<Tensor> {
    const EPS: f64 = 1e-6;
    let sets = sets.eq(0.0)?.where_cond(inter, sets)?;
    ((inter * 2.0)? + EPS)?.div(&(sets + EPS)?)
}

/// Soft Jaccard per image with smooth 1: `(Σpy + 1) / (Σp + Σy - Σpy + 1)`, `[B]`.
pub fn soft_jaccard_per_image(probs: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let inter = per_image_sum(&(probs * targets)?)?;
    let union = ((per_image_sum(probs)? + per_image_sum(targets)?)? - &inter)?;
    (inter + 1.0)?.div(&(union + 1.0)?)
}

/// Convenience for tests and logs: a scalar loss as `f64`.
pub fn scalar(t: &Tensor) -> Result<f64> {
    t.to_dtype(DType::F64)?.to_scalar::<f64>()
}

/// nnU-Net's deep-supervision weights for `n` outputs: `2^-i`, normalised to sum to 1.
pub fn deep_supervision_weights(n: usize) -> Vec<f64> {
    let raw: Vec<f64> = (0..n).map(|i| 0.5f64.powi(i as i32)).collect();
    let sum: f64 = raw.iter().sum();
    raw.into_iter().map(|w| w / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use genseg_nn::gradcheck::{GradCheckOptions, check_gradients};

    fn t(v: &[f64], shape: (usize, usize, usize, usize)) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn deep_supervision_weights_and_pooled_targets() -> Result<()> {
        assert_eq!(deep_supervision_weights(1), vec![1.0]);
        let w = deep_supervision_weights(3);
        assert!((w[0] - 4.0 / 7.0).abs() < 1e-12 && (w[2] - 1.0 / 7.0).abs() < 1e-12);
        let loss = SegLoss {
            terms: vec![LossTerm::Bce],
        };
        // 4x4 target whose top-left 2x2 block is 3/4 foreground, the rest 1/4 or 0.
        let target = t(
            &[
                1., 1., 0., 0., 1., 0., 1., 0., 0., 0., 0., 0., 0., 0., 0., 0.,
            ],
            (1, 1, 4, 4),
        );
        let full = t(&[0.3; 16], (1, 1, 4, 4));
        let coarse = t(&[2.0, -1.0, 0.5, 0.0], (1, 1, 2, 2));
        let one = loss.forward_deep(std::slice::from_ref(&full), &target)?;
        assert_eq!(
            one.to_scalar::<f64>()?,
            loss.forward(&full, &target)?.to_scalar::<f64>()?
        );
        // Pooled targets: [0.75, 0.25, 0, 0] -> [1, 0, 0, 0].
        let pooled = t(&[1., 0., 0., 0.], (1, 1, 2, 2));
        let want = 2.0 / 3.0 * loss.forward(&full, &target)?.to_scalar::<f64>()?
            + 1.0 / 3.0 * loss.forward(&coarse, &pooled)?.to_scalar::<f64>()?;
        let got = loss
            .forward_deep(&[full, coarse], &target)?
            .to_scalar::<f64>()?;
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        Ok(())
    }

    #[test]
    fn dice_and_jaccard_by_hand() -> Result<()> {
        // Two 1x2x2 images: probabilities and targets.
        let p = t(&[1.0, 0.5, 0.0, 0.0, 0.25, 0.25, 0.25, 0.25], (2, 1, 2, 2));
        let y = t(&[1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], (2, 1, 2, 2));
        // Batch: Σpy = 1.5, Σp = 2.5, Σy = 2 -> (3 + 1e-6) / (4.5 + 1e-6).
        let d = scalar(&soft_dice_batch(&p, &y)?)?;
        assert!((d - (3.0 + 1e-6) / (4.5 + 1e-6)).abs() < 1e-12);
        // Per image: image 1 (3 + e)/(3.5 + e), image 2 e/(1 + e).
        let per = soft_dice_per_image(&p, &y)?.to_vec1::<f64>()?;
        assert!((per[0] - (3.0 + 1e-6) / (3.5 + 1e-6)).abs() < 1e-12);
        assert!((per[1] - 1e-6 / (1.0 + 1e-6)).abs() < 1e-12);
        // Jaccard: image 1 (1.5 + 1)/(1.5 + 2 - 1.5 + 1) = 2.5/3, image 2 1/(1 + 1) = 0.5.
        let j = soft_jaccard_per_image(&p, &y)?.to_vec1::<f64>()?;
        assert!((j[0] - 2.5 / 3.0).abs() < 1e-12 && (j[1] - 0.5).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn empty_prediction_and_target_give_dice_one() -> Result<()> {
        let zeros = Tensor::zeros((1, 1, 3, 3), DType::F64, &Device::Cpu)?;
        assert_eq!(scalar(&soft_dice_batch(&zeros, &zeros)?)?, 1.0);
        assert_eq!(
            soft_dice_per_image(&zeros, &zeros)?.to_vec1::<f64>()?,
            vec![1.0]
        );
        Ok(())
    }

    #[test]
    fn perfect_logits_give_small_loss() -> Result<()> {
        let y = t(&[1.0, 0.0, 1.0, 0.0], (1, 1, 2, 2));
        let logits = ((&y * 2.0)? - 1.0)?.affine(20.0, 0.0)?;
        for loss in [SegLoss::lungs(), SegLoss::skin()] {
            assert!(scalar(&loss.forward(&logits, &y)?)? < 1e-6);
            let wrong = logits.neg()?;
            assert!(scalar(&loss.forward(&wrong, &y)?)? > 1.0);
        }
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> anyhow::Result<()> {
        let logits = Tensor::randn(0f64, 1.5, (2, 1, 3, 4), &Device::Cpu)?;
        let y = Tensor::rand(0f64, 1., (2, 1, 3, 4), &Device::Cpu)?
            .ge(0.5)?
            .to_dtype(DType::F64)?;
        for terms in [
            vec![LossTerm::Bce],
            vec![LossTerm::DiceBatch],
            vec![LossTerm::DicePerImage],
            vec![LossTerm::JaccardPerImage],
            vec![
                LossTerm::Bce,
                LossTerm::DiceBatch,
                LossTerm::JaccardPerImage,
            ],
        ] {
            let loss = SegLoss {
                terms: terms.clone(),
            };
            let y = y.clone();
            let report = check_gradients(
                move |xs| loss.forward(&xs[0], &y),
                std::slice::from_ref(&logits),
                GradCheckOptions::default(),
            )?;
            report
                .ensure(1e-6)
                .map_err(|e| anyhow::anyhow!("{terms:?}: {e}"))?;
        }
        Ok(())
    }

    #[test]
    fn config_round_trip_and_errors() -> anyhow::Result<()> {
        #[derive(Serialize, Deserialize)]
        struct Wrapper {
            loss: SegLoss,
        }
        let w: Wrapper = serde_json::from_str(r#"{"loss": ["bce", "dice_batch"]}"#)?;
        assert_eq!(w.loss, SegLoss::lungs());
        assert!(serde_json::from_str::<Wrapper>(r#"{"loss": ["bce", "focal"]}"#).is_err());
        let empty = SegLoss { terms: vec![] };
        let x = Tensor::zeros((1, 1, 2, 2), DType::F32, &Device::Cpu)?;
        assert!(empty.forward(&x, &x).is_err());
        Ok(())
    }
}
