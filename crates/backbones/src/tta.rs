//! Mirroring test-time augmentation (nnU-Net's default at inference): the model runs on
//! the image and on its horizontal, vertical and doubly flipped copies, each output is
//! flipped back, and the foreground probabilities are averaged.

use candle_core::{Result, Tensor};

use crate::SegModel;

/// The flips of the mirroring TTA: `(horizontal, vertical)`.
const FLIPS: [(bool, bool); 4] = [(false, false), (true, false), (false, true), (true, true)];

fn flip(x: &Tensor, (horizontal, vertical): (bool, bool)) -> Result<Tensor> {
    let x = if horizontal { x.flip(&[3])? } else { x.clone() };
    if vertical { x.flip(&[2]) } else { Ok(x) }
}

/// Logits of the mean foreground probability over the four mirrorings of `images`
/// (eval mode), clamped so that a probability of 0 or 1 stays finite.
pub fn mirrored_logits(model: &dyn SegModel, images: &Tensor) -> Result<Tensor> {
    let mut sum: Option<Tensor> = None;
    for f in FLIPS {
        let logits = model.forward_t(&flip(images, f)?, false)?;
        let probs = flip(&candle_nn::ops::sigmoid(&logits)?, f)?;
        sum = Some(match sum {
            None => probs,
            Some(s) => (s + probs)?,
        });
    }
    let p = (sum.expect("four flips") / FLIPS.len() as f64)?.clamp(1e-7f32, 1.0 - 1e-7)?;
    // logit(p) = ln p - ln(1 - p)
    p.log()? - p.affine(-1.0, 1.0)?.log()?
}

/// A [`SegModel`] whose eval-mode forward is [`mirrored_logits`]; training passes (and
/// deep supervision) go to the wrapped model unchanged.
pub struct MirrorTta(pub Box<dyn SegModel>);

impl SegModel for MirrorTta {
    fn forward_t(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            self.0.forward_t(images, true)
        } else {
            mirrored_logits(self.0.as_ref(), images)
        }
    }

    fn forward_deep_t(&self, images: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        self.0.forward_deep_t(images, train)
    }

    fn param_groups(&self) -> Vec<(&'static str, String)> {
        self.0.param_groups()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Logits = the first channel's values minus their column index: not mirror-symmetric.
    struct Ramp;

    impl SegModel for Ramp {
        fn forward_t(&self, images: &Tensor, _train: bool) -> Result<Tensor> {
            let (b, _, h, w) = images.dims4()?;
            let ramp = Tensor::arange(0f32, w as f32, images.device())?
                .reshape((1, 1, 1, w))?
                .broadcast_as((b, 1, h, w))?;
            images.narrow(1, 0, 1)? - ramp
        }

        fn param_groups(&self) -> Vec<(&'static str, String)> {
            Vec::new()
        }
    }

    #[test]
    fn averages_probabilities_of_the_flipped_back_outputs() -> anyhow::Result<()> {
        let x = Tensor::new(&[[1f32, -2.0, 0.5], [3.0, 0.0, -1.0]], &Device::Cpu)?
            .reshape((1, 1, 2, 3))?;
        let got = mirrored_logits(&Ramp, &x)?;
        let sig = |v: f32| 1.0 / (1.0 + (-v).exp());
        // Flipped back, a horizontal flip turns the ramp -j into -(w-1-j); vertical
        // flips leave it alone. So p = (sig(x - j) + sig(x - (2 - j))) / 2.
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let got = got.flatten_all()?.to_vec1::<f32>()?;
        for (k, (&v, g)) in xs.iter().zip(got).enumerate() {
            let j = (k % 3) as f32;
            let p = (sig(v - j) + sig(v - (2.0 - j))) / 2.0;
            let want = (p / (1.0 - p)).ln();
            assert!((g - want).abs() < 1e-4, "pixel {k}: {g} vs {want}");
        }
        let wrapped = MirrorTta(Box::new(Ramp));
        assert_eq!(
            wrapped
                .forward_t(&x, true)?
                .flatten_all()?
                .to_vec1::<f32>()?,
            Ramp.forward_t(&x, true)?.flatten_all()?.to_vec1::<f32>()?
        );
        let zeros = Tensor::zeros((1, 1, 2, 2), DType::F32, &Device::Cpu)?;
        assert!(
            mirrored_logits(&Ramp, &zeros)?
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .all(|v| v.is_finite())
        );
        Ok(())
    }
}
