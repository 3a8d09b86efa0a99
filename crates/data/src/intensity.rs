//! Per-image intensity normalisation (nnU-Net's `ZScoreNormalization` for non-CT images):
//! every channel of every image to zero mean and unit standard deviation, so that a
//! model sees the same input statistics whatever the scanner, camera or exposure.
//!
//! Two forms of one function: [`Normalisation::apply_slice`] on a `[C, H, W]` image in
//! memory (the training batches' CPU pipeline, before augmentation, as in nnU-Net) and
//! [`Normalisation::apply`] on a `[B, C, H, W]` tensor from differentiable ops (evaluation,
//! prediction, synthetic images whose gradient must reach the generator).

use candle_core::{D, Result, Tensor};
use serde::{Deserialize, Serialize};

/// Added to the standard deviation, as nnU-Net does (`max(std, 1e-8)` there).
const STD_FLOOR: f64 = 1e-8;

/// How image intensities are normalised before the model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalisation {
    /// Values in `[0, 1]` as loaded (the reference code).
    #[default]
    None,
    /// Per image and channel: `(x - mean) / max(std, 1e-8)`, with the biased std.
    ZScore,
}

impl Normalisation {
    /// Normalises one `[C, H, W]` image of `channels` planes in place.
    pub fn apply_slice(self, image: &mut [f32], channels: usize) {
        if self == Normalisation::None || channels == 0 {
            return;
        }
        let plane = image.len() / channels;
        for p in image.chunks_exact_mut(plane.max(1)) {
            let n = p.len() as f64;
            let mean = p.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
            let var = p
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / n;
            let std = var.sqrt().max(STD_FLOOR);
            for v in p {
                *v = ((f64::from(*v) - mean) / std) as f32;
            }
        }
    }

    /// Normalises `[B, C, H, W]` images (differentiable).
    pub fn apply(self, images: &Tensor) -> Result<Tensor> {
        match self {
            Normalisation::None => Ok(images.clone()),
            Normalisation::ZScore => {
                let (b, c, h, w) = images.dims4()?;
                let planes = images.reshape((b, c, h * w))?;
                let centred = planes.broadcast_sub(&planes.mean_keepdim(D::Minus1)?)?;
                let std = centred.sqr()?.mean_keepdim(D::Minus1)?.sqrt()?;
                let std = std.maximum(STD_FLOOR)?;
                centred.broadcast_div(&std)?.reshape((b, c, h, w))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn slice_and_tensor_forms_agree_and_standardise() -> Result<()> {
        let values: Vec<f32> = (0..2 * 3 * 16)
            .map(|i| ((i * 37) % 23) as f32 / 23.0)
            .collect();
        let mut by_image = values.clone();
        for image in by_image.chunks_exact_mut(3 * 16) {
            Normalisation::ZScore.apply_slice(image, 3);
        }
        let t = Tensor::from_vec(values.clone(), (2, 3, 4, 4), &Device::Cpu)?;
        let got = Normalisation::ZScore
            .apply(&t)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (a, b) in got.iter().zip(&by_image) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        for plane in by_image.chunks_exact(16) {
            let mean = plane.iter().sum::<f32>() / 16.0;
            let var = plane.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 16.0;
            assert!(
                mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4,
                "{mean} {var}"
            );
        }
        // A constant plane stays finite (zero), and None is the identity.
        let mut flat = vec![0.5f32; 16];
        Normalisation::ZScore.apply_slice(&mut flat, 1);
        assert!(flat.iter().all(|&v| v == 0.0));
        let same = Normalisation::None
            .apply(&t)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(same, values);
        Ok(())
    }
}
