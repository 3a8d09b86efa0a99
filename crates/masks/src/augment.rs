//! [`MaskAugmenter`]: draws a random geometric transformation per mask ([`AugmentParams`]) and
//! applies it, step by step, the way the GenSeg reference's imgaug `Sequential` does (spec §2).
//!
//! Every step works on a float copy of the mask with values in [0, 1] and resamples it
//! (bilinear, zero outside the mask; bicubic with edge replication for the resize of
//! CropAndPad, as imgaug's `imresize_single_image` through `cv2.resize`), so soft values
//! accumulate across steps exactly as they do in the reference; only the final threshold
//! ([`crate::MaskAugmentConfig::binarize_threshold`]) makes the mask binary again. A step whose
//! parameters are the identity is skipped, so identity parameters return the input unchanged.

use image::{GrayImage, ImageBuffer, Luma};
use imageproc::filter::gaussian_blur_f32;
use imageproc::geometric_transformations::{Border, Interpolation, warp_into_with};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::{Augmenter, Limit, MAX_ELASTIC_SIGMA, MaskAugmentConfig, check_value};
use crate::error::{MaskError, Result};

/// A mask as floats in [0, 1] while it is being transformed.
type Field = ImageBuffer<Luma<f32>, Vec<f32>>;

/// Pad (positive) or crop (negative) fractions of the four sides, in imgaug's order.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Sides {
    /// Fraction of the height added (or removed) at the top.
    pub top: f64,
    /// Fraction of the width at the right.
    pub right: f64,
    /// Fraction of the height at the bottom.
    pub bottom: f64,
    /// Fraction of the width at the left.
    pub left: f64,
}

/// The elastic deformation drawn for one mask.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ElasticParams {
    /// Displacement scale in pixels.
    pub alpha: f64,
    /// Gaussian smoothing sigma of the displacement field in pixels.
    pub sigma: f64,
    /// Seed of the uniform noise the displacement field is made from; keeping the seed instead
    /// of the field keeps the parameters small.
    pub seed: u64,
}

/// Everything random about the augmentation of one mask: what [`MaskAugmenter::draw_params`]
/// draws and [`MaskAugmenter::apply`] applies. Steps missing from `order` keep their identity
/// values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AugmentParams {
    /// Width of the mask the parameters are for.
    pub width: u32,
    /// Height of the mask the parameters are for.
    pub height: u32,
    /// The steps in the order they are applied.
    pub order: Vec<Augmenter>,
    /// Whether the horizontal-flip step mirrors left-right (the coin came up).
    pub horizontal_flip: bool,
    /// Whether the vertical-flip step mirrors top-bottom.
    pub vertical_flip: bool,
    /// Per-side pad/crop fractions of the CropAndPad step.
    pub crop_and_pad: Sides,
    /// Scale factors `[x, y]`.
    pub scale: [f64; 2],
    /// Shift `[x, y]` as fractions of width and height.
    pub translate_fraction: [f64; 2],
    /// Rotation in degrees, clockwise on screen.
    pub rotate_degrees: f64,
    /// Shear angle along x in degrees.
    pub shear_degrees: f64,
    /// The elastic deformation; `None` deforms nothing.
    pub elastic: Option<ElasticParams>,
}

impl AugmentParams {
    /// Parameters that change nothing, for a `width` x `height` mask.
    pub fn identity(width: u32, height: u32) -> Self {
        Self {
            width,
            height,
            order: Vec::new(),
            horizontal_flip: false,
            vertical_flip: false,
            crop_and_pad: Sides::default(),
            scale: [1.0, 1.0],
            translate_fraction: [0.0, 0.0],
            rotate_degrees: 0.0,
            shear_degrees: 0.0,
            elastic: None,
        }
    }

    /// Checks that every value can be applied (the limits of [`MaskAugmentConfig::validate`]).
    pub fn validate(&self) -> Result<()> {
        let c = &self.crop_and_pad;
        for (field, v) in [
            ("crop_and_pad.top", c.top),
            ("crop_and_pad.right", c.right),
            ("crop_and_pad.bottom", c.bottom),
            ("crop_and_pad.left", c.left),
        ] {
            check_value(field, v, Limit::Above(-0.5), Limit::AtMost(1.0))?;
        }
        check_value("scale[0]", self.scale[0], Limit::Above(0.0), Limit::None)?;
        check_value("scale[1]", self.scale[1], Limit::Above(0.0), Limit::None)?;
        for (field, v) in [
            ("translate_fraction[0]", self.translate_fraction[0]),
            ("translate_fraction[1]", self.translate_fraction[1]),
            ("rotate_degrees", self.rotate_degrees),
        ] {
            check_value(field, v, Limit::None, Limit::None)?;
        }
        check_value(
            "shear_degrees",
            self.shear_degrees,
            Limit::Above(-90.0),
            Limit::Below(90.0),
        )?;
        if let Some(e) = &self.elastic {
            check_value("elastic.alpha", e.alpha, Limit::AtLeast(0.0), Limit::None)?;
            check_value(
                "elastic.sigma",
                e.sigma,
                Limit::Above(0.0),
                Limit::AtMost(MAX_ELASTIC_SIGMA),
            )?;
        }
        Ok(())
    }
}

/// The mask generator of GenSeg: random geometric augmentation of binary masks (spec §2).
///
/// Masks are `GrayImage`s of any size whose non-zero pixels are foreground. The output has the
/// input's size and convention: foreground pixels take the input's largest value (1 for {0, 1}
/// masks, 255 for {0, 255}), background is 0.
///
/// The reference skips augmentation when the batch holds a single mask (its `batch_size > 1`
/// guard); this augmenter always augments, and leaves that choice to the caller.
#[derive(Debug, Clone)]
pub struct MaskAugmenter {
    config: MaskAugmentConfig,
}

impl MaskAugmenter {
    /// Builds the augmenter after checking every range of `config`.
    pub fn new(config: MaskAugmentConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self { config })
    }

    /// The configuration the augmenter was built from.
    pub fn config(&self) -> &MaskAugmentConfig {
        &self.config
    }

    /// Draws the augmentation of one `width` x `height` mask: first the order of the steps
    /// (shuffled when [`MaskAugmentConfig::random_order`]), then each step's parameters in that
    /// order.
    pub fn draw_params<R: Rng + ?Sized>(
        &self,
        width: u32,
        height: u32,
        rng: &mut R,
    ) -> AugmentParams {
        let cfg = &self.config;
        let mut params = AugmentParams::identity(width, height);
        params.order = cfg.augmenters.clone();
        if cfg.random_order {
            params.order.shuffle(rng);
        }
        for step in params.order.clone() {
            match step {
                Augmenter::HorizontalFlip => {
                    params.horizontal_flip = rng.random::<f64>() < cfg.horizontal_flip_probability;
                }
                Augmenter::VerticalFlip => {
                    params.vertical_flip = rng.random::<f64>() < cfg.vertical_flip_probability;
                }
                Augmenter::CropAndPad => {
                    // imgaug's sample_independently=True: one draw per side, top/right/bottom/left.
                    let r = cfg.crop_and_pad_fraction;
                    params.crop_and_pad = Sides {
                        top: uniform(rng, r),
                        right: uniform(rng, r),
                        bottom: uniform(rng, r),
                        left: uniform(rng, r),
                    };
                }
                Augmenter::Scale => {
                    params.scale = [uniform(rng, cfg.scale_x), uniform(rng, cfg.scale_y)];
                }
                Augmenter::Translate => {
                    params.translate_fraction = [
                        uniform(rng, cfg.translate_x_fraction),
                        uniform(rng, cfg.translate_y_fraction),
                    ];
                }
                Augmenter::Rotate => params.rotate_degrees = uniform(rng, cfg.rotate_degrees),
                Augmenter::Shear => params.shear_degrees = uniform(rng, cfg.shear_degrees),
                Augmenter::Elastic => {
                    params.elastic = Some(ElasticParams {
                        alpha: uniform(rng, cfg.elastic_alpha),
                        sigma: uniform(rng, cfg.elastic_sigma),
                        seed: rng.random(),
                    });
                }
            }
        }
        params
    }

    /// Applies drawn (or hand-made) parameters to `mask`: the steps of `params.order`, then the
    /// threshold. Fails if the parameters were drawn for another size or hold invalid values.
    pub fn apply(&self, mask: &GrayImage, params: &AugmentParams) -> Result<GrayImage> {
        let (width, height) = mask.dimensions();
        if (width, height) != (params.width, params.height) {
            return Err(MaskError::SizeMismatch {
                expected_width: params.width,
                expected_height: params.height,
                width,
                height,
            });
        }
        params.validate()?;
        Ok(self.apply_valid(mask, params))
    }

    /// Augments one mask with parameters drawn from `rng`.
    pub fn augment<R: Rng + ?Sized>(&self, mask: &GrayImage, rng: &mut R) -> GrayImage {
        let params = self.draw_params(mask.width(), mask.height(), rng);
        self.apply_valid(mask, &params)
    }

    /// Augments every mask independently, drawing from `rng` mask after mask, so a seed fixes
    /// the whole batch.
    pub fn augment_batch<R: Rng + ?Sized>(
        &self,
        masks: &[GrayImage],
        rng: &mut R,
    ) -> Vec<GrayImage> {
        masks.iter().map(|m| self.augment(m, rng)).collect()
    }

    /// [`MaskAugmenter::augment`] for a row-major `[H, W]` buffer, e.g. a
    /// `genseg_data::Sample::mask` in {0, 1}.
    pub fn augment_values<R: Rng + ?Sized>(
        &self,
        mask: &[u8],
        width: u32,
        height: u32,
        rng: &mut R,
    ) -> Result<Vec<u8>> {
        let expected = width as usize * height as usize;
        let wrong_length = MaskError::BufferLength {
            width,
            height,
            expected,
            len: mask.len(),
        };
        if mask.len() != expected {
            return Err(wrong_length);
        }
        let image = GrayImage::from_raw(width, height, mask.to_vec()).ok_or(wrong_length)?;
        Ok(self.augment(&image, rng).into_raw())
    }

    /// Applies parameters already known to be valid and of the mask's size.
    fn apply_valid(&self, mask: &GrayImage, params: &AugmentParams) -> GrayImage {
        let foreground = mask.pixels().map(|p| p.0[0]).max().unwrap_or(0);
        // Every step maps zero to zero, so an empty mask stays empty.
        if foreground == 0 {
            return mask.clone();
        }
        let mut field: Field = ImageBuffer::from_fn(mask.width(), mask.height(), |x, y| {
            Luma([if mask.get_pixel(x, y).0[0] > 0 {
                1.0
            } else {
                0.0
            }])
        });
        for step in &params.order {
            field = match step {
                Augmenter::HorizontalFlip if params.horizontal_flip => {
                    image::imageops::flip_horizontal(&field)
                }
                Augmenter::VerticalFlip if params.vertical_flip => {
                    image::imageops::flip_vertical(&field)
                }
                Augmenter::CropAndPad => crop_and_pad(&field, &params.crop_and_pad),
                Augmenter::Scale => {
                    let [sx, sy] = params.scale;
                    warp_affine(&field, [sx, 0.0, 0.0, sy], [0.0, 0.0])
                }
                Augmenter::Translate => {
                    let [fx, fy] = params.translate_fraction;
                    let shift = [
                        fx * f64::from(field.width()),
                        fy * f64::from(field.height()),
                    ];
                    warp_affine(&field, [1.0, 0.0, 0.0, 1.0], shift)
                }
                Augmenter::Rotate => {
                    let (s, c) = params.rotate_degrees.to_radians().sin_cos();
                    warp_affine(&field, [c, -s, s, c], [0.0, 0.0])
                }
                Augmenter::Shear => {
                    // imgaug's x-shear: x' = x - tan(shear) * y about the centre; det = 1.
                    let t = params.shear_degrees.to_radians().tan();
                    warp_affine(&field, [1.0, -t, 0.0, 1.0], [0.0, 0.0])
                }
                Augmenter::Elastic => match &params.elastic {
                    Some(e) => elastic(&field, e),
                    None => field,
                },
                Augmenter::HorizontalFlip | Augmenter::VerticalFlip => field,
            };
        }
        let threshold = self.config.binarize_threshold as f32;
        ImageBuffer::from_fn(mask.width(), mask.height(), |x, y| {
            Luma([if field.get_pixel(x, y).0[0] > threshold {
                foreground
            } else {
                0
            }])
        })
    }
}

/// `U(lo, hi)`; a zero-width range returns its value without drawing.
fn uniform<R: Rng + ?Sized>(rng: &mut R, [lo, hi]: [f64; 2]) -> f64 {
    if lo == hi {
        lo
    } else {
        (lo + (hi - lo) * rng.random::<f64>()).clamp(lo, hi)
    }
}

/// Pads (zeros) or crops each side by its rounded pixel amount, then resizes back to the input
/// size (imgaug `CropAndPad` with `keep_size=True`).
fn crop_and_pad(field: &Field, sides: &Sides) -> Field {
    let (w, h) = (i64::from(field.width()), i64::from(field.height()));
    // imgaug rounds fraction * side with numpy's round half to even.
    let px = |fraction: f64, side: i64| (fraction * side as f64).round_ties_even() as i64;
    let (mut top, mut bottom) = (px(sides.top, h), px(sides.bottom, h));
    let (mut left, mut right) = (px(sides.left, w), px(sides.right, w));
    if [top, right, bottom, left] == [0; 4] || w == 0 || h == 0 {
        return field.clone();
    }
    // Crops just under half a side each can still round to the whole side: give back one pixel
    // at a time, as imgaug's prevent_zero_size does.
    keep_one_pixel(w, &mut left, &mut right);
    keep_one_pixel(h, &mut top, &mut bottom);
    let (pw, ph) = (w + left + right, h + top + bottom);
    let padded: Field = ImageBuffer::from_fn(pw as u32, ph as u32, |x, y| {
        let (sx, sy) = (i64::from(x) - left, i64::from(y) - top);
        if (0..w).contains(&sx) && (0..h).contains(&sy) {
            *field.get_pixel(sx as u32, sy as u32)
        } else {
            Luma([0.0])
        }
    });
    if (pw, ph) == (w, h) {
        return padded;
    }
    // cv2.resize geometry: pixel centres align, src = (dst + 0.5) * in / out - 0.5.
    let (kx, ky) = (pw as f32 / w as f32, ph as f32 / h as f32);
    let mut out = Field::new(w as u32, h as u32);
    warp_into_with(
        &padded,
        move |x, y| ((x + 0.5) * kx - 0.5, (y + 0.5) * ky - 0.5),
        Interpolation::Bicubic,
        Border::Replicate,
        &mut out,
    );
    out
}

/// Shrinks the crops (negative amounts) of one axis until at least one pixel remains.
fn keep_one_pixel(side: i64, start: &mut i64, end: &mut i64) {
    while side + *start + *end < 1 {
        if *start <= *end {
            *start += 1;
        } else {
            *end += 1;
        }
    }
}

/// Warps by `x' = L (x - c) + c + shift` with `L = [[a, b], [c, d]]` given row-major and `c` the
/// centre of the pixel grid (imgaug's `(w - 1) / 2`), sampling bilinearly with zero outside.
/// An identity transform is skipped so that it is exact.
fn warp_affine(field: &Field, linear: [f64; 4], shift: [f64; 2]) -> Field {
    if linear == [1.0, 0.0, 0.0, 1.0] && shift == [0.0, 0.0] {
        return field.clone();
    }
    let [a, b, c, d] = linear;
    let det = a * d - b * c;
    // Output -> input: x = L^-1 (x' - c - shift) + c.
    let inv = [d / det, -b / det, -c / det, a / det];
    let cx = (f64::from(field.width()) - 1.0) / 2.0;
    let cy = (f64::from(field.height()) - 1.0) / 2.0;
    let (ox, oy) = (cx + shift[0], cy + shift[1]);
    let mapping = move |x: f32, y: f32| {
        let (u, v) = (f64::from(x) - ox, f64::from(y) - oy);
        (
            (inv[0] * u + inv[1] * v + cx) as f32,
            (inv[2] * u + inv[3] * v + cy) as f32,
        )
    };
    let mut out = Field::new(field.width(), field.height());
    warp_into_with(
        field,
        mapping,
        Interpolation::Bilinear,
        Border::Constant(Luma([0.0])),
        &mut out,
    );
    out
}

/// Elastic deformation: each output pixel samples the input at its position plus
/// `alpha * G_sigma * U(-1, 1)` noise per axis (the imgaug/Simard construction).
fn elastic(field: &Field, e: &ElasticParams) -> Field {
    let (w, h) = field.dimensions();
    if e.alpha == 0.0 || w == 0 || h == 0 {
        return field.clone();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(e.seed);
    let mut noise = || -> Field {
        let raw: Field = ImageBuffer::from_fn(w, h, |_, _| Luma([rng.random_range(-1.0..1.0)]));
        gaussian_blur_f32(&raw, e.sigma as f32)
    };
    let (dx, dy) = (noise(), noise());
    let alpha = e.alpha as f32;
    let mapping = move |x: f32, y: f32| {
        // The warp asks for integer output positions only.
        let (i, j) = (x as u32, y as u32);
        (
            x + alpha * dx.get_pixel(i, j).0[0],
            y + alpha * dy.get_pixel(i, j).0[0],
        )
    };
    let mut out = Field::new(w, h);
    warp_into_with(
        field,
        mapping,
        Interpolation::Bilinear,
        Border::Constant(Luma([0.0])),
        &mut out,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    fn augmenter(config: MaskAugmentConfig) -> MaskAugmenter {
        MaskAugmenter::new(config).unwrap()
    }

    /// A filled axis-aligned rectangle or ellipse centred at `(cx, cy)` with half-extents
    /// `(ax, ay)`, foreground value `fg`.
    fn shape(
        w: u32,
        h: u32,
        ellipse: bool,
        centre: (f64, f64),
        half: (f64, f64),
        fg: u8,
    ) -> GrayImage {
        let (cx, cy) = centre;
        let (ax, ay) = half;
        GrayImage::from_fn(w, h, |x, y| {
            let (u, v) = ((f64::from(x) - cx) / ax, (f64::from(y) - cy) / ay);
            let inside = if ellipse {
                u * u + v * v <= 1.0
            } else {
                u.abs() <= 1.0 && v.abs() <= 1.0
            };
            Luma([if inside { fg } else { 0 }])
        })
    }

    fn area(mask: &GrayImage) -> usize {
        mask.pixels().filter(|p| p.0[0] > 0).count()
    }

    /// Random rectangles and ellipses on 32..64 px canvases, anywhere on the canvas.
    fn any_mask() -> impl Strategy<Value = GrayImage> {
        (
            32u32..=64,
            32u32..=64,
            any::<bool>(),
            0.0..1.0f64,
            0.0..1.0f64,
            2.0..20.0f64,
            2.0..20.0f64,
            prop_oneof![Just(1u8), Just(255u8)],
        )
            .prop_map(|(w, h, ellipse, fx, fy, ax, ay, fg)| {
                shape(
                    w,
                    h,
                    ellipse,
                    (fx * f64::from(w), fy * f64::from(h)),
                    (ax, ay),
                    fg,
                )
            })
    }

    /// Random shapes near the centre of a square canvas, small enough that scale, rotation and
    /// shear from the reference ranges never push them across the border.
    fn central_mask() -> impl Strategy<Value = GrayImage> {
        (
            32u32..=64,
            any::<bool>(),
            -0.02..0.02f64,
            -0.02..0.02f64,
            0.06..0.15f64,
            0.06..0.15f64,
        )
            .prop_map(|(s, ellipse, ox, oy, hx, hy)| {
                let c = (f64::from(s) - 1.0) / 2.0;
                let sf = f64::from(s);
                shape(
                    s,
                    s,
                    ellipse,
                    (c + ox * sf, c + oy * sf),
                    (hx * sf, hy * sf),
                    1,
                )
            })
    }

    fn values_within(mask: &GrayImage, allowed: [u8; 2]) -> bool {
        mask.pixels().all(|p| allowed.contains(&p.0[0]))
    }

    fn with_elastic() -> MaskAugmentConfig {
        let mut cfg = MaskAugmentConfig::default();
        cfg.augmenters.push(Augmenter::Elastic);
        cfg.augmenters.push(Augmenter::VerticalFlip);
        cfg
    }

    /// Every augmenter, with ranges that can only give the identity.
    fn zero_ranges() -> MaskAugmentConfig {
        MaskAugmentConfig {
            augmenters: vec![
                Augmenter::HorizontalFlip,
                Augmenter::VerticalFlip,
                Augmenter::CropAndPad,
                Augmenter::Scale,
                Augmenter::Translate,
                Augmenter::Rotate,
                Augmenter::Shear,
                Augmenter::Elastic,
            ],
            random_order: true,
            horizontal_flip_probability: 0.0,
            vertical_flip_probability: 0.0,
            crop_and_pad_fraction: [0.0, 0.0],
            scale_x: [1.0, 1.0],
            scale_y: [1.0, 1.0],
            translate_x_fraction: [0.0, 0.0],
            translate_y_fraction: [0.0, 0.0],
            rotate_degrees: [0.0, 0.0],
            shear_degrees: [0.0, 0.0],
            elastic_alpha: [0.0, 0.0],
            elastic_sigma: [3.0, 3.0],
            binarize_threshold: 0.1,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn output_is_binary_of_input_size_and_convention(mask in any_mask(), seed in any::<u64>()) {
            let fg = mask.pixels().map(|p| p.0[0]).max().unwrap();
            for cfg in [MaskAugmentConfig::default(), with_elastic()] {
                let out = augmenter(cfg).augment(&mask, &mut rng(seed));
                prop_assert_eq!(out.dimensions(), mask.dimensions());
                prop_assert!(values_within(&out, [0, fg]));
            }
        }

        #[test]
        fn zero_ranges_and_no_augmenters_are_the_identity(mask in any_mask(), seed in any::<u64>()) {
            let out = augmenter(zero_ranges()).augment(&mask, &mut rng(seed));
            prop_assert_eq!(&out, &mask);
            let out = augmenter(MaskAugmentConfig::identity()).augment(&mask, &mut rng(seed));
            prop_assert_eq!(&out, &mask);
        }

        #[test]
        fn flipping_twice_is_the_identity_and_once_mirrors(mask in any_mask()) {
            let aug = augmenter(MaskAugmentConfig::default());
            let (w, h) = mask.dimensions();
            for (step, mirrored) in [
                (Augmenter::HorizontalFlip, image::imageops::flip_horizontal(&mask)),
                (Augmenter::VerticalFlip, image::imageops::flip_vertical(&mask)),
            ] {
                let mut once = AugmentParams::identity(w, h);
                once.horizontal_flip = true;
                once.vertical_flip = true;
                once.order = vec![step];
                prop_assert_eq!(&aug.apply(&mask, &once).unwrap(), &mirrored);
                let mut twice = once.clone();
                twice.order = vec![step, step];
                prop_assert_eq!(&aug.apply(&mask, &twice).unwrap(), &mask);
            }
        }

        #[test]
        fn area_scales_by_the_drawn_factors(mask in central_mask(), seed in any::<u64>()) {
            // Flip, rotation and shear preserve area; translation and CropAndPad are left out
            // because their only other effect is clipping at the border resp. a rescale.
            let cfg = MaskAugmentConfig {
                augmenters: vec![
                    Augmenter::HorizontalFlip,
                    Augmenter::Scale,
                    Augmenter::Rotate,
                    Augmenter::Shear,
                ],
                ..MaskAugmentConfig::default()
            };
            let aug = augmenter(cfg);
            let params = aug.draw_params(mask.width(), mask.height(), &mut rng(seed));
            let out = aug.apply(&mask, &params).unwrap();
            let (before, after) = (area(&mask) as f64, area(&out) as f64);
            // Thresholding at 0.1 after up to three bilinear resamplings dilates the shape (by
            // up to 1.2 px per px of the input's bounding-box perimeter over 3000 seeded draws);
            // rasterisation adds a fraction of a pixel either way.
            let (bw, bh) = bounding_box(&mask);
            let perimeter = 2.0 * f64::from(bw + bh);
            let expected = before * params.scale[0] * params.scale[1];
            prop_assert!(
                after >= expected - 0.25 * perimeter && after <= expected + 1.5 * perimeter,
                "area {} -> {}, expected {:.1} (perimeter {}) for {:?}", before, after, expected, perimeter, params
            );
            let tolerance = 1.5 * perimeter;
            prop_assert!(after >= 0.64 * before - tolerance && after <= 1.44 * before + tolerance);
        }

        #[test]
        fn crop_and_pad_rescales_the_area(mask in central_mask(), seed in any::<u64>()) {
            let cfg = MaskAugmentConfig {
                augmenters: vec![Augmenter::CropAndPad],
                ..MaskAugmentConfig::default()
            };
            let aug = augmenter(cfg);
            let (w, h) = mask.dimensions();
            let params = aug.draw_params(w, h, &mut rng(seed));
            let out = aug.apply(&mask, &params).unwrap();
            let c = params.crop_and_pad;
            let sx = 1.0 / (1.0 + c.left + c.right);
            let sy = 1.0 / (1.0 + c.top + c.bottom);
            let (before, after) = (area(&mask) as f64, area(&out) as f64);
            let (bw, bh) = bounding_box(&mask);
            // One bicubic resize with pad amounts rounded to whole pixels: at most 0.72 px per px
            // of bounding-box perimeter over 3000 seeded draws.
            let tolerance = 2.0 * f64::from(bw + bh);
            prop_assert!(
                (after - before * sx * sy).abs() <= tolerance,
                "area {} -> {}, expected {:.1} +- {:.1}", before, after, before * sx * sy, tolerance
            );
        }

        #[test]
        fn the_same_seed_gives_the_same_masks(masks in proptest::collection::vec(any_mask(), 1..4), seed in any::<u64>()) {
            let aug = augmenter(with_elastic());
            let a = aug.augment_batch(&masks, &mut rng(seed));
            let b = aug.augment_batch(&masks, &mut rng(seed));
            prop_assert_eq!(a, b);
        }

        #[test]
        fn drawn_parameters_lie_in_their_ranges(w in 1u32..300, h in 1u32..300, seed in any::<u64>()) {
            let cfg = with_elastic();
            let aug = augmenter(cfg.clone());
            let p = aug.draw_params(w, h, &mut rng(seed));
            prop_assert_eq!((p.width, p.height), (w, h));
            let mut order = p.order.clone();
            let mut listed = cfg.augmenters.clone();
            order.sort_by_key(|a| *a as u8);
            listed.sort_by_key(|a| *a as u8);
            prop_assert_eq!(order, listed);
            let within = |v: f64, [lo, hi]: [f64; 2]| lo <= v && v <= hi;
            let c = p.crop_and_pad;
            for v in [c.top, c.right, c.bottom, c.left] {
                prop_assert!(within(v, cfg.crop_and_pad_fraction));
            }
            prop_assert!(within(p.scale[0], cfg.scale_x) && within(p.scale[1], cfg.scale_y));
            prop_assert!(within(p.translate_fraction[0], cfg.translate_x_fraction));
            prop_assert!(within(p.translate_fraction[1], cfg.translate_y_fraction));
            prop_assert!(within(p.rotate_degrees, cfg.rotate_degrees));
            prop_assert!(within(p.shear_degrees, cfg.shear_degrees));
            let e = p.elastic.unwrap();
            prop_assert!(within(e.alpha, cfg.elastic_alpha) && within(e.sigma, cfg.elastic_sigma));
            prop_assert!(p.validate().is_ok());
        }
    }

    fn bounding_box(mask: &GrayImage) -> (u32, u32) {
        let fg: Vec<(u32, u32)> = mask
            .enumerate_pixels()
            .filter(|(_, _, p)| p.0[0] > 0)
            .map(|(x, y, _)| (x, y))
            .collect();
        let span = |f: fn(&(u32, u32)) -> u32| {
            let lo = fg.iter().map(f).min().unwrap_or(0);
            let hi = fg.iter().map(f).max().unwrap_or(0);
            hi - lo + 1
        };
        (span(|p| p.0), span(|p| p.1))
    }

    fn only(step: Augmenter, w: u32, h: u32) -> AugmentParams {
        let mut p = AugmentParams::identity(w, h);
        p.order = vec![step];
        p
    }

    #[test]
    fn translation_by_whole_pixels_shifts_right_and_up() {
        let mask = shape(40, 20, false, (20.0, 10.0), (4.0, 3.0), 255);
        let mut p = only(Augmenter::Translate, 40, 20);
        p.translate_fraction = [0.1, -0.1]; // 4 px right, 2 px up
        let out = augmenter(MaskAugmentConfig::default())
            .apply(&mask, &p)
            .unwrap();
        let expected = shape(40, 20, false, (24.0, 8.0), (4.0, 3.0), 255);
        assert_eq!(out, expected);
    }

    #[test]
    fn rotation_turns_clockwise_about_the_pixel_grid_centre() {
        // An L-shaped mask off-centre on an even canvas: 90 degrees about c = 15.5 maps the grid
        // onto itself, (x, y) -> (2c - y, x), which is a clockwise turn on screen.
        let mask = GrayImage::from_fn(32, 32, |x, y| {
            Luma([u8::from(
                (3..20).contains(&x) && (5..9).contains(&y)
                    || (3..7).contains(&x) && (5..25).contains(&y),
            )])
        });
        let mut p = only(Augmenter::Rotate, 32, 32);
        p.rotate_degrees = 90.0;
        let out = augmenter(MaskAugmentConfig::default())
            .apply(&mask, &p)
            .unwrap();
        let expected = GrayImage::from_fn(32, 32, |x, y| *mask.get_pixel(y, 31 - x));
        assert_eq!(out, expected);
    }

    #[test]
    fn padding_the_left_side_squeezes_the_mask_to_the_right() {
        let mask = GrayImage::from_pixel(40, 16, Luma([1]));
        let mut p = only(Augmenter::CropAndPad, 40, 16);
        p.crop_and_pad.left = 1.0; // 40 zero columns, then resized from 80 back to 40
        let out = augmenter(MaskAugmentConfig::default())
            .apply(&mask, &p)
            .unwrap();
        for (x, _, v) in out.enumerate_pixels() {
            if x < 19 {
                assert_eq!(v.0[0], 0, "column {x}");
            } else if x > 20 {
                assert_eq!(v.0[0], 1, "column {x}");
            }
        }
    }

    #[test]
    fn cropping_every_side_zooms_in() {
        // A centred 20x20 square on 40x40; cropping 10 px per side makes it fill the canvas.
        let mask = shape(40, 40, false, (19.5, 19.5), (10.0, 10.0), 1);
        let mut p = only(Augmenter::CropAndPad, 40, 40);
        p.crop_and_pad = Sides {
            top: -0.25,
            right: -0.25,
            bottom: -0.25,
            left: -0.25,
        };
        let out = augmenter(MaskAugmentConfig::default())
            .apply(&mask, &p)
            .unwrap();
        assert!(area(&out) >= 40 * 40 - 4 * 40, "area {}", area(&out));
    }

    #[test]
    fn near_total_crops_keep_one_pixel() {
        let mask = GrayImage::from_pixel(2, 2, Luma([1]));
        let mut p = only(Augmenter::CropAndPad, 2, 2);
        p.crop_and_pad = Sides {
            top: -0.49,
            right: -0.49,
            bottom: -0.49,
            left: -0.49,
        };
        let out = augmenter(MaskAugmentConfig::default())
            .apply(&mask, &p)
            .unwrap();
        assert_eq!(out, mask);
    }

    #[test]
    fn elastic_deformation_moves_the_boundary_but_keeps_the_area() {
        let mask = shape(64, 64, true, (31.5, 31.5), (16.0, 12.0), 255);
        let aug = augmenter(MaskAugmentConfig {
            augmenters: vec![Augmenter::Elastic],
            elastic_alpha: [60.0, 60.0],
            elastic_sigma: [4.0, 4.0],
            ..MaskAugmentConfig::default()
        });
        let out = aug.augment(&mask, &mut rng(3));
        assert_ne!(out, mask);
        let (a, b) = (area(&mask) as f64, area(&out) as f64);
        assert!((b / a - 1.0).abs() < 0.25, "area {a} -> {b}");
        assert_eq!(out, aug.augment(&mask, &mut rng(3)));
    }

    #[test]
    fn the_order_is_shuffled_only_when_asked() {
        let aug = augmenter(MaskAugmentConfig::default());
        let mut r = rng(0);
        let orders: std::collections::HashSet<Vec<Augmenter>> = (0..40)
            .map(|_| aug.draw_params(8, 8, &mut r).order)
            .collect();
        assert!(orders.len() > 20, "{} distinct orders", orders.len());
        let fixed = augmenter(MaskAugmentConfig {
            random_order: false,
            ..MaskAugmentConfig::default()
        });
        for _ in 0..5 {
            assert_eq!(fixed.draw_params(8, 8, &mut r).order, Augmenter::REFERENCE);
        }
    }

    #[test]
    fn the_flip_coin_is_fair() {
        let aug = augmenter(MaskAugmentConfig::default());
        let mut r = rng(1);
        let heads = (0..2000)
            .filter(|_| aug.draw_params(8, 8, &mut r).horizontal_flip)
            .count();
        assert!((900..1100).contains(&heads), "{heads} flips in 2000");
    }

    #[test]
    fn empty_masks_stay_empty() {
        let mask = GrayImage::new(33, 47);
        assert_eq!(augmenter(with_elastic()).augment(&mask, &mut rng(5)), mask);
    }

    #[test]
    fn raw_buffers_keep_their_zero_one_convention() {
        let mask = shape(48, 40, true, (24.0, 20.0), (9.0, 7.0), 1);
        let aug = augmenter(MaskAugmentConfig::default());
        let out = aug
            .augment_values(mask.as_raw(), 48, 40, &mut rng(9))
            .unwrap();
        assert_eq!(out, aug.augment(&mask, &mut rng(9)).into_raw());
        assert!(out.iter().all(|&v| v <= 1) && out.contains(&1));
        let err = aug
            .augment_values(&[0, 1, 1], 2, 2, &mut rng(9))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "mask augmentation: a 2x2 mask needs 4 values, got 3"
        );
    }

    #[test]
    fn apply_rejects_parameters_of_another_size_or_out_of_range() {
        let aug = augmenter(MaskAugmentConfig::default());
        let mask = GrayImage::new(10, 12);
        let err = aug
            .apply(&mask, &AugmentParams::identity(12, 10))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("drawn for a 12x10 mask but the mask is 10x12"),
            "{err}"
        );
        let mut p = AugmentParams::identity(10, 12);
        p.scale = [1.0, 0.0];
        let err = aug.apply(&mask, &p).unwrap_err().to_string();
        assert!(err.contains("scale[1]") && err.contains("is 0"), "{err}");
        p.scale = [1.0, 1.0];
        p.elastic = Some(ElasticParams {
            alpha: 1.0,
            sigma: 0.0,
            seed: 0,
        });
        let err = aug.apply(&mask, &p).unwrap_err().to_string();
        assert!(err.contains("elastic.sigma"), "{err}");
    }
}
