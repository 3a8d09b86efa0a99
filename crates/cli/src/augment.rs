//! The augmentation baselines of the paper (spec §6): an extra loss term on a
//! flipped, rotated, translated (or all three, "combine") copy of the real
//! batch. Geometry is done on the CPU with imageproc (bilinear, zero fill);
//! warped masks are re-binarised at 0.5.

use candle_core::{DType, Device, Result, Tensor};
use image::{ImageBuffer, Luma};
use imageproc::geometric_transformations::{Border, Interpolation, Projection, warp};
use rand::Rng;

use crate::config::{AugmentSection, Method};

/// One geometric transform, drawn per image.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Geometry {
    /// Mirror left-right.
    pub flip: bool,
    /// Rotation about the centre, degrees (counter-clockwise on screen).
    pub degrees: f32,
    /// Shift in pixels (x right, y down).
    pub shift: (f32, f32),
}

impl Geometry {
    /// Draws the transform of `method`; random signs keep the copy unbiased.
    pub fn draw(
        method: Method,
        cfg: &AugmentSection,
        side: (usize, usize),
        rng: &mut impl Rng,
    ) -> Self {
        let mut sign = || if rng.random::<bool>() { 1.0f32 } else { -1.0 };
        let (flip, rotate, translate) = match method {
            // The generator methods' extra terms are synthetic, not geometric copies.
            Method::Baseline | Method::Separate | Method::Genseg => (false, false, false),
            Method::Flip => (true, false, false),
            Method::Rotate => (false, true, false),
            Method::Translate => (false, false, true),
            Method::Combine => (true, true, true),
        };
        let degrees = if rotate {
            sign() * cfg.rotate_degrees as f32
        } else {
            0.0
        };
        let shift = if translate {
            let f = cfg.translate_fraction as f32;
            (sign() * f * side.1 as f32, sign() * f * side.0 as f32)
        } else {
            (0.0, 0.0)
        };
        Self {
            flip,
            degrees,
            shift,
        }
    }

    /// The forward map from source to destination pixel coordinates.
    fn projection(&self, h: usize, w: usize) -> Projection {
        let (cx, cy) = ((w as f32 - 1.0) / 2.0, (h as f32 - 1.0) / 2.0);
        let flip = if self.flip {
            Projection::translate(cx, cy)
                * Projection::scale(-1.0, 1.0)
                * Projection::translate(-cx, -cy)
        } else {
            Projection::scale(1.0, 1.0)
        };
        // Image y points down, so a screen-counter-clockwise turn is -theta here.
        let rotate = Projection::translate(cx, cy)
            * Projection::rotate(-self.degrees.to_radians())
            * Projection::translate(-cx, -cy);
        Projection::translate(self.shift.0, self.shift.1) * rotate * flip
    }

    /// Warps one `[H, W]` plane.
    pub fn apply(&self, plane: &[f32], h: usize, w: usize) -> Vec<f32> {
        let moves = self.degrees != 0.0 || self.shift != (0.0, 0.0);
        if !self.flip && !moves {
            return plane.to_vec();
        }
        if self.flip && !moves {
            // Exact mirror without resampling.
            return plane
                .chunks(w)
                .flat_map(|row| row.iter().rev().copied())
                .collect();
        }
        let img: ImageBuffer<Luma<f32>, Vec<f32>> =
            ImageBuffer::from_raw(w as u32, h as u32, plane.to_vec())
                .expect("plane has h*w values");
        warp(
            &img,
            self.projection(h, w),
            Interpolation::Bilinear,
            Border::Constant(Luma([0.0])),
        )
        .into_raw()
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
        let g = Geometry::draw(method, cfg, (h, w), rng);
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
            weight: 1.0,
            rotate_degrees: 8.0,
            translate_fraction: 0.25,
        }
    }

    #[test]
    fn flip_mirrors_exactly_and_twice_is_identity() {
        let plane: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let g = Geometry {
            flip: true,
            degrees: 0.0,
            shift: (0.0, 0.0),
        };
        let once = g.apply(&plane, 3, 4);
        assert_eq!(&once[..4], &[3.0, 2.0, 1.0, 0.0]);
        assert_eq!(g.apply(&once, 3, 4), plane);
    }

    #[test]
    fn translate_moves_content_right_and_down() {
        let mut plane = vec![0.0f32; 64];
        plane[2 * 8 + 2] = 1.0; // (y 2, x 2)
        let g = Geometry {
            flip: false,
            degrees: 0.0,
            shift: (3.0, 1.0),
        };
        let out = g.apply(&plane, 8, 8);
        assert_eq!(out[3 * 8 + 5], 1.0, "{out:?}");
        assert!((out.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn rotation_keeps_the_centre_and_turns_counter_clockwise() {
        // A pixel right of the centre of a 9x9 plane moves up under +90 degrees.
        let mut plane = vec![0.0f32; 81];
        plane[4 * 9 + 7] = 1.0;
        plane[4 * 9 + 4] = 1.0;
        let out = Geometry {
            flip: false,
            degrees: 90.0,
            shift: (0.0, 0.0),
        }
        .apply(&plane, 9, 9);
        assert!((out[4 * 9 + 4] - 1.0).abs() < 1e-5);
        assert!((out[9 + 4] - 1.0).abs() < 1e-5, "{out:?}");
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
