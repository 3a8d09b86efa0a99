//! The augmentation baselines of the paper (spec §6): an extra loss term on a
//! flipped, rotated, translated (or all three, "combine") copy of the real
//! batch. The geometry is genseg-masks' [`Geometry`]; warped masks are re-binarised at 0.5.

use candle_core::{DType, Device, Result, Tensor};
use genseg_masks::{Geometry, PairKinds};
use rand::Rng;

use super::baseline::ExtraTerm;
use crate::config::{AugmentSection, Method};
use crate::seeding::{Purpose, rng_for};

/// The extra loss term of `--method flip|rotate|translate|combine`: the real batch, copied
/// with a geometry drawn per image from the stream `(seed, Augment, iteration)`.
pub struct AugmentedTerm {
    method: Method,
    cfg: AugmentSection,
    seed: u64,
}

impl AugmentedTerm {
    /// The term of `cfg.method`.
    pub fn new(cfg: &crate::config::RunConfig) -> Self {
        Self {
            method: cfg.method,
            cfg: cfg.augment.clone(),
            seed: cfg.seed,
        }
    }
}

impl ExtraTerm for AugmentedTerm {
    fn key(&self) -> &'static str {
        "loss_augmented"
    }

    fn label(&self) -> &'static str {
        "augmented"
    }

    fn batch(&self, images: &Tensor, masks: &Tensor, it: u64) -> anyhow::Result<(Tensor, Tensor)> {
        let mut rng = rng_for(self.seed, Purpose::Augment, it);
        Ok(augment_batch(
            images,
            masks,
            self.method,
            &self.cfg,
            &mut rng,
        )?)
    }
}

/// The transforms of `method`'s extra loss term (none for the methods whose extra term is
/// synthetic rather than a geometric copy).
pub fn kinds(method: Method) -> PairKinds {
    let (flip, rotate, translate) = match method {
        Method::Baseline | Method::Separate | Method::Genseg | Method::Pix2pix => {
            (false, false, false)
        }
        Method::Flip => (true, false, false),
        Method::Rotate => (false, true, false),
        Method::Translate => (false, false, true),
        Method::Combine => (true, true, true),
    };
    PairKinds {
        flip,
        rotate,
        translate,
    }
}

/// An augmented copy of `(images [B,C,H,W], masks [B,1,H,W])`.
pub fn augment_batch(
    images: &Tensor,
    masks: &Tensor,
    method: Method,
    cfg: &AugmentSection,
    rng: &mut impl Rng,
) -> Result<(Tensor, Tensor)> {
    let (b, c, h, w) = images.dims4()?;
    let device: Device = images.device().clone();
    let imgs = images
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let msks = masks
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let plane = h * w;
    let mut out_imgs = Vec::with_capacity(imgs.len());
    let mut out_msks = Vec::with_capacity(msks.len());
    for i in 0..b {
        let g = Geometry::draw(
            kinds(method),
            cfg.rotate_degrees,
            cfg.translate_fraction,
            (h, w),
            rng,
        );
        for ch in 0..c {
            let start = (i * c + ch) * plane;
            out_imgs.extend(g.apply(&imgs[start..start + plane], h, w));
        }
        let m = g.apply(&msks[i * plane..(i + 1) * plane], h, w);
        out_msks.extend(m.into_iter().map(|v| if v > 0.5 { 1.0f32 } else { 0.0 }));
    }
    let images = Tensor::from_vec(out_imgs, (b, c, h, w), &device)?.to_dtype(images.dtype())?;
    let masks = Tensor::from_vec(out_msks, (b, 1, h, w), &device)?.to_dtype(masks.dtype())?;
    Ok((images, masks))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn cfg() -> AugmentSection {
        AugmentSection {
            rotate_degrees: 8.0,
            translate_fraction: 0.25,
        }
    }

    #[test]
    fn batches_keep_shapes_and_binary_masks() -> Result<()> {
        let dev = Device::Cpu;
        let images = Tensor::rand(0f32, 1.0, (2, 3, 16, 16), &dev)?;
        let masks = Tensor::rand(0f32, 1.0, (2, 1, 16, 16), &dev)?
            .ge(0.5)?
            .to_dtype(DType::F32)?;
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for method in [
            Method::Flip,
            Method::Rotate,
            Method::Translate,
            Method::Combine,
        ] {
            let (i, m) = augment_batch(&images, &masks, method, &cfg(), &mut rng)?;
            assert_eq!(i.dims(), images.dims());
            assert_eq!(m.dims(), masks.dims());
            let values = m.flatten_all()?.to_vec1::<f32>()?;
            assert!(values.iter().all(|v| *v == 0.0 || *v == 1.0));
        }
        // Baseline draws the identity.
        let (i, _) = augment_batch(&images, &masks, Method::Baseline, &cfg(), &mut rng)?;
        assert_eq!(
            i.flatten_all()?.to_vec1::<f32>()?,
            images.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }
}
