//! nnU-Net's on-the-fly training augmentation for 2D images, on `[C, H, W]` f32 images
//! (already normalised, see [`crate::intensity`]) and `[H, W]` {0, 1} masks.
//!
//! The chain and its defaults follow `nnUNetTrainer.get_training_transforms` (nnU-Net
//! v2, 2D, no elastic deformation), each transform with its own probability:
//!
//! | transform | probability | range |
//! |---|---|---|
//! | rotation (image and mask) | 0.2 | ±180° |
//! | scaling (image and mask) | 0.2 | zoom 0.7–1.4 |
//! | Gaussian noise | 0.1 | std U(0, 0.1) |
//! | Gaussian blur, each channel with p 0.5 | 0.2 | σ U(0.5, 1) |
//! | multiplicative brightness | 0.15 | ×U(0.75, 1.25) |
//! | contrast (range preserved) | 0.15 | ×U(0.75, 1.25) around the mean |
//! | simulated low resolution, each channel with p 0.5 | 0.25 | zoom U(0.5, 1) |
//! | gamma of the inverted image (stats retained) | 0.1 | γ 0.7–1.5 |
//! | gamma (stats retained) | 0.3 | γ 0.7–1.5 |
//! | mirroring, each axis | 0.5 | |
//!
//! Rotation and scaling are one affine warp about the centre (imageproc's bilinear
//! warp; outside the image the intensity is 0, the normalised mean, and the mask 0; the
//! mask is warped bilinearly and re-binarised at 0.5, which is nnU-Net v2's
//! interpolate-then-argmax for one foreground class). Low resolution: nearest
//! down-sampling, bilinear up-sampling. Every draw comes from the generator the caller
//! passes, so a batch is a pure function of its seed; [`TransformConfig::apply_batch`]
//! runs the images of a batch in parallel (rayon), one generator per image.

use image::imageops::{FilterType, resize};
use image::{ImageBuffer, Luma};
use imageproc::filter::gaussian_blur_f32;
use imageproc::geometric_transformations::{Border, Interpolation, Projection, warp_into};
use rand::Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

type Plane = ImageBuffer<Luma<f32>, Vec<f32>>;

/// Probabilities and ranges of the augmentation chain; the defaults are nnU-Net's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransformConfig {
    /// Probability of a rotation.
    pub p_rotation: f64,
    /// Largest rotation angle in degrees (drawn uniformly in ±this).
    pub rotation_degrees: f64,
    /// Probability of a scaling.
    pub p_scale: f64,
    /// Zoom factor range (content magnified by the factor).
    pub scale: [f64; 2],
    /// Probability of additive Gaussian noise.
    pub p_noise: f64,
    /// Range of the noise's standard deviation.
    pub noise_std: [f64; 2],
    /// Probability of Gaussian blur.
    pub p_blur: f64,
    /// Range of the blur's σ in pixels.
    pub blur_sigma: [f64; 2],
    /// Probability of a multiplicative brightness change.
    pub p_brightness: f64,
    /// Range of the brightness factor.
    pub brightness: [f64; 2],
    /// Probability of a contrast change.
    pub p_contrast: f64,
    /// Range of the contrast factor.
    pub contrast: [f64; 2],
    /// Probability of simulated low resolution.
    pub p_low_resolution: f64,
    /// Range of the down-sampling factor.
    pub low_resolution: [f64; 2],
    /// Probability of a gamma change on the inverted image.
    pub p_gamma_inverted: f64,
    /// Probability of a gamma change.
    pub p_gamma: f64,
    /// Range of γ (values below 1 drawn half the time).
    pub gamma: [f64; 2],
    /// Probability of mirroring, per axis.
    pub p_mirror: f64,
}

impl Default for TransformConfig {
    fn default() -> Self {
        Self {
            p_rotation: 0.2,
            rotation_degrees: 180.0,
            p_scale: 0.2,
            scale: [0.7, 1.4],
            p_noise: 0.1,
            noise_std: [0.0, 0.1],
            p_blur: 0.2,
            blur_sigma: [0.5, 1.0],
            p_brightness: 0.15,
            brightness: [0.75, 1.25],
            p_contrast: 0.15,
            contrast: [0.75, 1.25],
            p_low_resolution: 0.25,
            low_resolution: [0.5, 1.0],
            p_gamma_inverted: 0.1,
            p_gamma: 0.3,
            gamma: [0.7, 1.5],
            p_mirror: 0.5,
        }
    }
}

/// Probability that one channel is blurred or down-sampled when the transform applies.
const P_PER_CHANNEL: f64 = 0.5;

fn uniform<R: Rng + ?Sized>(rng: &mut R, [lo, hi]: [f64; 2]) -> f64 {
    if hi > lo {
        rng.random_range(lo..hi)
    } else {
        lo
    }
}

fn happens<R: Rng + ?Sized>(rng: &mut R, p: f64) -> bool {
    p > 0.0 && rng.random::<f64>() < p
}

impl TransformConfig {
    /// Checks every probability and range, naming the key.
    pub fn validate(&self) -> Result<()> {
        let probabilities = [
            ("p_rotation", self.p_rotation),
            ("p_scale", self.p_scale),
            ("p_noise", self.p_noise),
            ("p_blur", self.p_blur),
            ("p_brightness", self.p_brightness),
            ("p_contrast", self.p_contrast),
            ("p_low_resolution", self.p_low_resolution),
            ("p_gamma_inverted", self.p_gamma_inverted),
            ("p_gamma", self.p_gamma),
            ("p_mirror", self.p_mirror),
        ];
        for (key, p) in probabilities {
            if !(0.0..=1.0).contains(&p) {
                return Err(DataError::Config(format!(
                    "transforms.{key} = {p} is not a probability in [0, 1]"
                )));
            }
        }
        let ranges = [
            ("scale", self.scale, 0.05, 20.0),
            ("noise_std", self.noise_std, 0.0, 10.0),
            ("blur_sigma", self.blur_sigma, 0.01, 20.0),
            ("brightness", self.brightness, 0.0, 10.0),
            ("contrast", self.contrast, 0.0, 10.0),
            ("low_resolution", self.low_resolution, 0.05, 1.0),
            ("gamma", self.gamma, 0.05, 10.0),
        ];
        for (key, [lo, hi], min, max) in ranges {
            if !(lo.is_finite() && hi.is_finite() && min <= lo && lo <= hi && hi <= max) {
                return Err(DataError::Config(format!(
                    "transforms.{key} = [{lo}, {hi}] must be an ordered range within [{min}, {max}]"
                )));
            }
        }
        if !(0.0..=360.0).contains(&self.rotation_degrees) {
            return Err(DataError::Config(format!(
                "transforms.rotation_degrees = {} is outside [0, 360]",
                self.rotation_degrees
            )));
        }
        Ok(())
    }

    /// The chain's spatial part alone (rotation, scaling, mirroring), every intensity
    /// transform off: what a mask-to-image generator may be trained on, since its target
    /// images must keep their natural intensities.
    pub fn spatial(&self) -> Self {
        Self {
            p_noise: 0.0,
            p_blur: 0.0,
            p_brightness: 0.0,
            p_contrast: 0.0,
            p_low_resolution: 0.0,
            p_gamma_inverted: 0.0,
            p_gamma: 0.0,
            ..self.clone()
        }
    }

    /// Augments one pair in place: `image` `[C, H, W]`, `mask` `[H, W]`.
    pub fn apply<R: Rng + ?Sized>(
        &self,
        image: &mut [f32],
        mask: &mut [f32],
        (_channels, height, width): (usize, usize, usize),
        rng: &mut R,
    ) {
        let (h, w) = (height, width);
        let plane = |data: &[f32]| to_plane(data, h, w);
        // Spatial: one warp for rotation and scaling together.
        let angle = if happens(rng, self.p_rotation) {
            uniform(rng, [-self.rotation_degrees, self.rotation_degrees]).to_radians()
        } else {
            0.0
        };
        let zoom = if happens(rng, self.p_scale) {
            uniform(rng, self.scale)
        } else {
            1.0
        };
        if angle != 0.0 || zoom != 1.0 {
            rotate_and_zoom(image, mask, (height, width), angle, zoom);
        }
        if happens(rng, self.p_noise) {
            let std = uniform(rng, self.noise_std) as f32;
            let normal = rand_distr::Normal::new(0.0f32, std.max(f32::MIN_POSITIVE))
                .expect("a finite, positive std");
            for v in image.iter_mut() {
                *v += rng.sample(normal);
            }
        }
        if happens(rng, self.p_blur) {
            for c in image.chunks_exact_mut(h * w) {
                if happens(rng, P_PER_CHANNEL) {
                    let sigma = uniform(rng, self.blur_sigma) as f32;
                    c.copy_from_slice(gaussian_blur_f32(&plane(c), sigma).as_raw());
                }
            }
        }
        if happens(rng, self.p_brightness) {
            for c in image.chunks_exact_mut(h * w) {
                let factor = uniform(rng, self.brightness) as f32;
                c.iter_mut().for_each(|v| *v *= factor);
            }
        }
        if happens(rng, self.p_contrast) {
            for c in image.chunks_exact_mut(h * w) {
                let factor = uniform(rng, self.contrast) as f32;
                let (lo, hi) = min_max(c);
                let mean = mean(c);
                c.iter_mut()
                    .for_each(|v| *v = ((*v - mean) * factor + mean).clamp(lo, hi));
            }
        }
        if happens(rng, self.p_low_resolution) {
            for c in image.chunks_exact_mut(h * w) {
                if happens(rng, P_PER_CHANNEL) {
                    let f = uniform(rng, self.low_resolution);
                    let (sw, sh) = (
                        ((w as f64 * f).round() as u32).max(1),
                        ((h as f64 * f).round() as u32).max(1),
                    );
                    let small = resize(&plane(c), sw, sh, FilterType::Nearest);
                    c.copy_from_slice(
                        resize(&small, w as u32, h as u32, FilterType::Triangle).as_raw(),
                    );
                }
            }
        }
        if happens(rng, self.p_gamma_inverted) {
            self.gamma_channels(image, h * w, true, rng);
        }
        if happens(rng, self.p_gamma) {
            self.gamma_channels(image, h * w, false, rng);
        }
        if happens(rng, self.p_mirror) {
            for c in image.chunks_exact_mut(h * w) {
                mirror_rows(c, w);
            }
            mirror_rows(mask, w);
        }
        if happens(rng, self.p_mirror) {
            for c in image.chunks_exact_mut(h * w) {
                mirror_columns(c, w);
            }
            mirror_columns(mask, w);
        }
    }

    /// nnU-Net's gamma with retained statistics: rescale to [0, 1], `x^γ`, rescale back,
    /// then restore the channel's mean and std; `inverted` does it on `-x`.
    fn gamma_channels<R: Rng + ?Sized>(
        &self,
        image: &mut [f32],
        plane: usize,
        inverted: bool,
        rng: &mut R,
    ) {
        for c in image.chunks_exact_mut(plane) {
            let gamma = if rng.random::<f64>() < 0.5 && self.gamma[0] < 1.0 {
                uniform(rng, [self.gamma[0], 1.0])
            } else {
                uniform(rng, [self.gamma[0].max(1.0), self.gamma[1]])
            } as f32;
            let sign = if inverted { -1.0 } else { 1.0 };
            c.iter_mut().for_each(|v| *v *= sign);
            let (old_mean, old_std) = (mean(c), std(c));
            let (lo, hi) = min_max(c);
            let range = (hi - lo).max(1e-7);
            c.iter_mut()
                .for_each(|v| *v = ((*v - lo) / range).max(0.0).powf(gamma) * range + lo);
            let (new_mean, new_std) = (mean(c), std(c));
            let scale = old_std / new_std.max(1e-7);
            c.iter_mut()
                .for_each(|v| *v = sign * ((*v - new_mean) * scale + old_mean));
        }
    }

    /// Augments every pair of a batch (`images` `[B, C, H, W]`, `masks` `[B, H, W]`) in
    /// parallel; image `k` draws from `rng_for(k)`.
    pub fn apply_batch<R, F>(
        &self,
        images: &mut [f32],
        masks: &mut [f32],
        (channels, height, width): (usize, usize, usize),
        rng_for: F,
    ) where
        R: Rng,
        F: Fn(usize) -> R + Sync,
    {
        let pixels = height * width;
        images
            .par_chunks_exact_mut(channels * pixels)
            .zip(masks.par_chunks_exact_mut(pixels))
            .enumerate()
            .for_each(|(k, (image, mask))| {
                let mut rng = rng_for(k);
                self.apply(image, mask, (channels, height, width), &mut rng);
            });
    }
}

fn to_plane(data: &[f32], h: usize, w: usize) -> Plane {
    Plane::from_raw(w as u32, h as u32, data.to_vec()).expect("plane of h x w values")
}

/// Rotates by `angle` radians and magnifies by `zoom` about the image centre: every channel
/// bilinearly (0 outside), the mask bilinearly then re-binarised at 0.5.
fn rotate_and_zoom(
    image: &mut [f32],
    mask: &mut [f32],
    (h, w): (usize, usize),
    angle: f64,
    zoom: f64,
) {
    // Pixel centres sit at integer coordinates, so the centre is ((w-1)/2, (h-1)/2).
    let (cx, cy) = ((w as f32 - 1.0) / 2.0, (h as f32 - 1.0) / 2.0);
    let projection = Projection::translate(cx, cy)
        * Projection::rotate(angle as f32)
        * Projection::scale(zoom as f32, zoom as f32)
        * Projection::translate(-cx, -cy);
    let warp = |data: &mut [f32]| {
        let mut out = Plane::new(w as u32, h as u32);
        warp_into(
            &to_plane(data, h, w),
            projection,
            Interpolation::Bilinear,
            Border::Constant(Luma([0.0])),
            &mut out,
        );
        data.copy_from_slice(out.as_raw());
    };
    image.chunks_exact_mut(h * w).for_each(warp);
    warp(mask);
    for v in mask.iter_mut() {
        *v = if *v >= 0.5 { 1.0 } else { 0.0 };
    }
}

fn mean(c: &[f32]) -> f32 {
    (c.iter().map(|&v| f64::from(v)).sum::<f64>() / c.len().max(1) as f64) as f32
}

fn std(c: &[f32]) -> f32 {
    let m = f64::from(mean(c));
    let var = c.iter().map(|&v| (f64::from(v) - m).powi(2)).sum::<f64>() / c.len().max(1) as f64;
    var.sqrt() as f32
}

fn min_max(c: &[f32]) -> (f32, f32) {
    c.iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

/// Mirrors left-right: reverses every row of width `w`.
fn mirror_rows(plane: &mut [f32], w: usize) {
    plane.chunks_exact_mut(w).for_each(|row| row.reverse());
}

/// Mirrors top-bottom: reverses the order of the rows of width `w`.
fn mirror_columns(plane: &mut [f32], w: usize) {
    let h = plane.len() / w;
    for r in 0..h / 2 {
        let (top, bottom) = plane.split_at_mut((h - 1 - r) * w);
        top[r * w..(r + 1) * w].swap_with_slice(&mut bottom[..w]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn off() -> TransformConfig {
        TransformConfig {
            p_rotation: 0.0,
            p_scale: 0.0,
            p_mirror: 0.0,
            ..TransformConfig::default().spatial()
        }
    }

    fn pair(h: usize, w: usize) -> (Vec<f32>, Vec<f32>) {
        let image: Vec<f32> = (0..h * w).map(|i| (i as f32 * 0.37).sin()).collect();
        let mask: Vec<f32> = (0..h * w)
            .map(|i| f32::from(u8::from(i % w < w / 3)))
            .collect();
        (image, mask)
    }

    #[test]
    fn the_spatial_part_moves_pixels_and_keeps_their_values() {
        let (h, w) = (8, 8);
        let chain = TransformConfig {
            p_mirror: 1.0,
            p_rotation: 0.0,
            p_scale: 0.0,
            p_noise: 1.0,
            p_brightness: 1.0,
            p_gamma: 1.0,
            ..TransformConfig::default()
        }
        .spatial();
        let (mut image, mut mask) = pair(h, w);
        let (i0, m0) = (image.clone(), mask.clone());
        chain.apply(
            &mut image,
            &mut mask,
            (1, h, w),
            &mut ChaCha8Rng::seed_from_u64(3),
        );
        // Mirrored on both axes (p = 1), nothing else: the same values, point-reflected.
        let reflected = |v: &[f32]| -> Vec<f32> { v.iter().rev().copied().collect() };
        assert_eq!(image, reflected(&i0));
        assert_eq!(mask, reflected(&m0));
        assert_eq!(
            (chain.p_mirror, chain.scale),
            (1.0, TransformConfig::default().scale)
        );
    }

    #[test]
    fn nothing_applies_at_probability_zero_and_mirroring_is_exact() {
        let (h, w) = (6, 5);
        let (mut image, mut mask) = pair(h, w);
        let (i0, m0) = (image.clone(), mask.clone());
        off().apply(
            &mut image,
            &mut mask,
            (1, h, w),
            &mut ChaCha8Rng::seed_from_u64(0),
        );
        assert_eq!((&image, &mask), (&i0, &m0));
        let both = TransformConfig {
            p_mirror: 1.0,
            ..off()
        };
        both.apply(
            &mut image,
            &mut mask,
            (1, h, w),
            &mut ChaCha8Rng::seed_from_u64(0),
        );
        // Both axes mirrored = the whole plane reversed.
        let reversed: Vec<f32> = i0.iter().rev().copied().collect();
        assert_eq!(image, reversed);
        assert_eq!(mask, m0.iter().rev().copied().collect::<Vec<_>>());
    }

    #[test]
    fn every_transform_keeps_masks_binary_values_finite_and_is_seeded() {
        let all = TransformConfig {
            p_rotation: 1.0,
            p_scale: 1.0,
            p_noise: 1.0,
            p_blur: 1.0,
            p_brightness: 1.0,
            p_contrast: 1.0,
            p_low_resolution: 1.0,
            p_gamma_inverted: 1.0,
            p_gamma: 1.0,
            p_mirror: 1.0,
            ..TransformConfig::default()
        };
        all.validate().unwrap();
        let (h, w, c) = (16, 12, 3);
        let run = |seed: u64| {
            let mut images: Vec<f32> = (0..2 * c * h * w)
                .map(|i| (i as f32 * 0.11).cos())
                .collect();
            let mut masks: Vec<f32> = (0..2 * h * w)
                .map(|i| f32::from(u8::from(i % 7 < 3)))
                .collect();
            all.apply_batch(&mut images, &mut masks, (c, h, w), |k| {
                ChaCha8Rng::seed_from_u64(seed * 100 + k as u64)
            });
            (images, masks)
        };
        let (images, masks) = run(1);
        assert!(images.iter().all(|v| v.is_finite()));
        assert!(masks.iter().all(|&v| v == 0.0 || v == 1.0));
        assert_eq!(
            run(1),
            (images.clone(), masks.clone()),
            "same seeds, same batch"
        );
        assert_ne!(run(2).0, images);
    }

    #[test]
    fn gamma_retains_mean_and_std() {
        let cfg = TransformConfig {
            p_gamma: 1.0,
            ..off()
        };
        let (h, w) = (8, 8);
        let (mut image, mut mask) = pair(h, w);
        let before = (mean(&image), std(&image));
        cfg.apply(
            &mut image,
            &mut mask,
            (1, h, w),
            &mut ChaCha8Rng::seed_from_u64(3),
        );
        assert!((mean(&image) - before.0).abs() < 1e-4 && (std(&image) - before.1).abs() < 1e-4);
    }

    #[test]
    fn a_quarter_turn_moves_the_mask_with_the_image_and_zoom_magnifies() {
        // The left third of a 9x9 mask, turned by 90°, is the top or bottom third.
        let (h, w) = (9, 9);
        let (mut image, mut mask) = pair(h, w);
        let stripe = mask.clone();
        rotate_and_zoom(
            &mut image,
            &mut mask,
            (h, w),
            std::f64::consts::FRAC_PI_2,
            1.0,
        );
        let band = |rows: std::ops::Range<usize>| -> Vec<f32> {
            (0..h * w)
                .map(|i| f32::from(u8::from(rows.contains(&(i / w)))))
                .collect()
        };
        assert!(mask == band(0..3) || mask == band(6..9), "{mask:?}");
        // The image moved the same way: its old column 0 is now a full row.
        let col0: Vec<f32> = (0..h).map(|r| pair(h, w).0[r * w]).collect();
        let row = if mask == band(0..3) { 0 } else { h - 1 };
        let got = &image[row * w..(row + 1) * w];
        let matches = |v: &[f32]| v.iter().zip(got).all(|(a, b)| (a - b).abs() < 1e-4);
        let reversed: Vec<f32> = col0.iter().rev().copied().collect();
        assert!(matches(&col0) || matches(&reversed), "{got:?} vs {col0:?}");
        // Zoom 2 about the centre: the centre pixel stays, the stripe grows past column 3.
        let mut image = pair(h, w).0;
        let mut mask = stripe;
        rotate_and_zoom(&mut image, &mut mask, (h, w), 0.0, 2.0);
        assert_eq!(mask[4 * w], 1.0);
        assert_eq!(mask[4 * w + 3], 0.0);
        assert!((image[4 * w + 4] - pair(h, w).0[4 * w + 4]).abs() < 1e-5);
    }

    #[test]
    fn bad_ranges_are_named() {
        let bad = TransformConfig {
            scale: [1.4, 0.7],
            ..TransformConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("transforms.scale")
        );
        let bad = TransformConfig {
            p_noise: 1.5,
            ..TransformConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("transforms.p_noise")
        );
    }
}
