//! # genseg-masks: the mask generator of GenSeg
//!
//! GenSeg (generative data augmentation for medical image segmentation in ultra-low-data
//! regimes) makes new training pairs by augmenting a real segmentation mask geometrically and
//! letting a mask-to-image generator paint an image for it. This crate is the first half: the
//! random geometric augmentation of binary masks (spec §2).
//!
//! The principal type is [`MaskAugmenter`], built from a serde [`MaskAugmentConfig`] whose
//! `Default` is the reference pipeline, an imgaug `Sequential` applied **in random order** per
//! mask:
//!
//! | step ([`Augmenter`]) | reference range |
//! |---|---|
//! | `horizontal_flip` | probability 0.5 |
//! | `crop_and_pad` | each side independently U(0, 0.1) of its side, padded with 0, resized back |
//! | `scale` | x and y independently U(0.8, 1.2), about the centre |
//! | `translate` | x, y independently U(-0.1, 0.1) of width / height |
//! | `rotate` | U(-15°, 15°), about the centre |
//! | `shear` | U(-8°, 8°) along x, about the centre |
//!
//! then the mask, carried as floats in [0, 1] through every step (bilinear resampling, zero
//! fill), is binarised at > 0.1. A vertical flip (commented out in the reference) and an elastic
//! deformation (not in the reference) are available but off: add `vertical_flip` or `elastic` to
//! [`MaskAugmentConfig::augmenters`]. Leaving a step out of that list turns it off.
//!
//! How the pieces meet:
//! * [`MaskAugmenter::draw_params`] draws everything random about one mask into an
//!   [`AugmentParams`] (the step order and each step's values), and [`MaskAugmenter::apply`]
//!   applies it; [`MaskAugmenter::augment`] does both. Inspecting the parameters is how the tests
//!   check the sampled ranges.
//! * [`MaskAugmenter::augment_batch`] augments each mask independently, drawing from one RNG
//!   mask after mask, so a seed reproduces the batch.
//! * Masks are [`image::GrayImage`]s (or raw `[H, W]` buffers, [`MaskAugmenter::augment_values`])
//!   of any size; non-zero pixels are foreground. Outputs keep the input's size and convention:
//!   foreground takes the input's largest value (1 for {0, 1} masks, 255 for {0, 255}).
//!
//! Departures from the reference, on purpose or by necessity:
//! * The reference skips augmentation when the batch holds a single mask (`batch_size > 1`);
//!   this crate always augments and leaves that choice to the caller.
//! * The resize of `crop_and_pad` is bicubic like imgaug's default (`cv2.INTER_CUBIC`), but with
//!   imageproc's Catmull-Rom kernel (a = -0.5) rather than OpenCV's a = -0.75.
//! * The shear is `x' = x - tan(angle) * y` about the centre, which preserves area; imgaug's
//!   shear matrix varies between versions (skimage's `AffineTransform` convention in early ones).
//!
//! Errors ([`MaskError`]) name the configuration field and the numbers. Nothing here prints.
//!
//! ```
//! use genseg_masks::{MaskAugmentConfig, MaskAugmenter};
//! use image::{GrayImage, Luma};
//! use rand::SeedableRng;
//! use rand_chacha::ChaCha8Rng;
//!
//! # fn main() -> Result<(), genseg_masks::MaskError> {
//! // A {0, 255} mask: a 24x16 rectangle on a 64x48 canvas.
//! let mask = GrayImage::from_fn(64, 48, |x, y| {
//!     Luma([if (20..44).contains(&x) && (16..32).contains(&y) { 255 } else { 0 }])
//! });
//! let augmenter = MaskAugmenter::new(MaskAugmentConfig::default())?;
//!
//! let mut rng = ChaCha8Rng::seed_from_u64(7);
//! let params = augmenter.draw_params(64, 48, &mut rng);
//! assert!((0.8..=1.2).contains(&params.scale[0]));
//! let augmented = augmenter.apply(&mask, &params)?;
//! assert_eq!(augmented.dimensions(), (64, 48));
//! assert!(augmented.pixels().all(|p| p.0[0] == 0 || p.0[0] == 255));
//!
//! // The same seed gives the same masks.
//! let batch = [mask.clone(), mask];
//! let a = augmenter.augment_batch(&batch, &mut ChaCha8Rng::seed_from_u64(1));
//! let b = augmenter.augment_batch(&batch, &mut ChaCha8Rng::seed_from_u64(1));
//! assert_eq!(a, b);
//!
//! // Out-of-range settings are refused with the field's name.
//! let bad = MaskAugmentConfig { scale_x: [1.2, 0.8], ..MaskAugmentConfig::default() };
//! assert!(MaskAugmenter::new(bad).unwrap_err().to_string().contains("scale_x"));
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod augment;
pub mod config;
pub mod error;
pub mod pair;

pub use augment::{AugmentParams, ElasticParams, MaskAugmenter, Sides};
pub use config::{Augmenter, MAX_ELASTIC_SIGMA, MaskAugmentConfig};
pub use error::{MaskError, Result};
pub use pair::{Geometry, PairKinds};
