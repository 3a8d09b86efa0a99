//! Built-in synthetic phantoms, so the demo and the tests need no downloaded data.
//!
//! * [`PhantomKind::Lungs`]: X-ray-like grayscale images: a bright body on a black background,
//!   two dark lung-like lobes (the right one notched by the heart), a bright spine, curved ribs
//!   and noise; the mask is the two lobes.
//! * [`PhantomKind::Skin`]: dermoscopy-like RGB images: a shaded skin-coloured background with
//!   mottling and a few hairs, and one irregular dark blob lesion; the mask is the lesion.
//!
//! Phantom `i` of seed `s` is drawn from a [`ChaCha8Rng`] seeded with `s` on stream `i`, so it does
//! not depend on how many phantoms are generated. The "shifted domain" ([`PhantomConfig::shifted`])
//! keeps every random draw, hence the very same masks, and changes only appearance (contrast,
//! brightness, noise, colour), for out-of-domain tests.

use std::f32::consts::PI;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use image::{DynamicImage, GrayImage, Luma, Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use rayon::prelude::*;

use crate::dataset::{Dataset, ImageSize, Sample};
use crate::error::{DataError, Result};
use crate::writer::{write_image, write_mask_png};

/// Which phantom to draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PhantomKind {
    /// Grayscale chest X-ray-like images with two lung lobes.
    Lungs,
    /// RGB dermoscopy-like images with one skin lesion.
    Skin,
}

impl PhantomKind {
    /// Channels of this kind's images.
    pub fn channels(self) -> usize {
        match self {
            PhantomKind::Lungs => 1,
            PhantomKind::Skin => 3,
        }
    }
}

impl fmt::Display for PhantomKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PhantomKind::Lungs => "lungs",
            PhantomKind::Skin => "skin",
        })
    }
}

impl FromStr for PhantomKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "lungs" | "lung" => Ok(PhantomKind::Lungs),
            "skin" => Ok(PhantomKind::Skin),
            _ => Err(format!(
                "unknown phantom kind {s:?} (expected lungs or skin)"
            )),
        }
    }
}

/// What phantoms to draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PhantomConfig {
    /// Lungs or skin.
    pub kind: PhantomKind,
    /// Side of the square images, in pixels (at least 16).
    pub size: u32,
    /// Seed of the whole set.
    pub seed: u64,
    /// Draw the shifted (out-of-domain) appearance; masks are unchanged.
    pub shifted: bool,
}

impl PhantomConfig {
    /// In-domain phantoms of `kind`, `size` x `size`, from `seed`.
    pub fn new(kind: PhantomKind, size: u32, seed: u64) -> Self {
        PhantomConfig {
            kind,
            size,
            seed,
            shifted: false,
        }
    }

    fn validate(&self) -> Result<()> {
        if !(16..=4096).contains(&self.size) {
            return Err(DataError::Config(format!(
                "phantom size {} is outside 16..=4096",
                self.size
            )));
        }
        Ok(())
    }
}

/// One phantom: its id, image (8-bit luma for lungs, RGB for skin) and {0, 1} mask.
#[derive(Debug, Clone, PartialEq)]
pub struct Phantom {
    /// `lungs_0003`, `skin_0000`, ...
    pub id: String,
    /// The image.
    pub image: DynamicImage,
    /// The mask, values 0 and 1.
    pub mask: GrayImage,
}

/// A closed blob in normalised coordinates: centre, radii and a radial Fourier perturbation.
struct Blob {
    cx: f32,
    cy: f32,
    rx: f32,
    ry: f32,
    /// (harmonic k, amplitude, phase).
    harmonics: Vec<(f32, f32, f32)>,
}

impl Blob {
    fn random(rng: &mut ChaCha8Rng, [cx, cy, rx, ry]: [f32; 4], max_amp: f32) -> Self {
        let harmonics = (2..=5)
            .map(|k| {
                let amp = rng.random_range(0.0..max_amp) / (k as f32).sqrt();
                (k as f32, amp, rng.random_range(0.0..2.0 * PI))
            })
            .collect();
        Blob {
            cx,
            cy,
            rx,
            ry,
            harmonics,
        }
    }

    /// Normalised radius of (u, v): < 1 inside, 1 on the boundary.
    fn rho(&self, u: f32, v: f32) -> f32 {
        let (dx, dy) = ((u - self.cx) / self.rx, (v - self.cy) / self.ry);
        let theta = dy.atan2(dx);
        let boundary: f32 = 1.0
            + self
                .harmonics
                .iter()
                .map(|(k, a, p)| a * (k * theta + p).cos())
                .sum::<f32>();
        (dx * dx + dy * dy).sqrt() / boundary.max(0.2)
    }
}

/// 0 well inside a boundary, 1 well outside, smooth over about one pixel, so image edges are
/// anti-aliased while the mask (rho < 1) stays exact.
fn soft_outside(rho: f32, pixel_rho: f32) -> f32 {
    ((rho - 1.0) / pixel_rho + 0.5).clamp(0.0, 1.0)
}

fn to_u8(v: f32) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0).round() as u8
}

/// Draws phantom number `index` of `config`.
pub fn phantom(config: &PhantomConfig, index: u64) -> Result<Phantom> {
    config.validate()?;
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    rng.set_stream(index);
    let (image, mask) = match config.kind {
        PhantomKind::Lungs => lungs(&mut rng, config.size, config.shifted),
        PhantomKind::Skin => skin(&mut rng, config.size, config.shifted),
    };
    Ok(Phantom {
        id: format!("{}_{index:04}", config.kind),
        image,
        mask,
    })
}

/// Draws phantoms `0..n` of `config` (in parallel).
pub fn phantoms(config: &PhantomConfig, n: usize) -> Result<Vec<Phantom>> {
    (0..n as u64)
        .into_par_iter()
        .map(|i| phantom(config, i))
        .collect()
}

/// `n` phantoms as an in-memory [`Dataset`].
pub fn phantom_dataset(config: &PhantomConfig, n: usize) -> Result<Dataset> {
    let samples = phantoms(config, n)?
        .into_iter()
        .map(|p| {
            let image = match config.kind {
                PhantomKind::Lungs => p.image.to_luma8().into_raw(),
                PhantomKind::Skin => {
                    let rgb = p.image.to_rgb8();
                    let plane = rgb.pixels().count();
                    let mut chw = vec![0u8; 3 * plane];
                    for (i, px) in rgb.pixels().enumerate() {
                        for c in 0..3 {
                            chw[c * plane + i] = px.0[c];
                        }
                    }
                    chw
                }
            };
            Sample {
                id: p.id,
                image,
                mask: p.mask.into_raw(),
                source: None,
            }
        })
        .collect();
    Dataset::from_samples(
        samples,
        config.kind.channels(),
        ImageSize::square(config.size),
    )
}

/// Writes `n` phantoms to `dir` in the folder layout (`images/<id>.png`, `masks/<id>.png` with
/// 0/255 masks) and returns their ids.
pub fn write_phantoms(dir: &Path, config: &PhantomConfig, n: usize) -> Result<Vec<String>> {
    let all = phantoms(config, n)?;
    all.par_iter().try_for_each(|p| {
        write_image(&dir.join("images").join(format!("{}.png", p.id)), &p.image)?;
        write_mask_png(&dir.join("masks").join(format!("{}.png", p.id)), &p.mask)
    })?;
    Ok(all.into_iter().map(|p| p.id).collect())
}

/// A chest X-ray-like phantom; shape draws first, appearance draws after (see module docs).
fn lungs(rng: &mut ChaCha8Rng, size: u32, shifted: bool) -> (DynamicImage, GrayImage) {
    // Shape.
    let body_geom = [
        0.5,
        0.56,
        rng.random_range(0.42..0.47),
        rng.random_range(0.48..0.53),
    ];
    let body = Blob::random(rng, body_geom, 0.03);
    let sep = rng.random_range(0.17..0.21);
    let lobe_y = rng.random_range(0.47..0.53);
    let right_geom = [
        0.5 - sep,
        lobe_y,
        rng.random_range(0.11..0.14),
        rng.random_range(0.25..0.3),
    ];
    let right = Blob::random(rng, right_geom, 0.08);
    let left_geom = [
        0.5 + sep,
        lobe_y + rng.random_range(-0.02..0.02),
        rng.random_range(0.1..0.13),
        rng.random_range(0.23..0.28),
    ];
    let left = Blob::random(rng, left_geom, 0.08);
    let heart_geom = [
        0.5 + rng.random_range(0.04..0.08),
        lobe_y + rng.random_range(0.13..0.18),
        rng.random_range(0.11..0.14),
        rng.random_range(0.09..0.12),
    ];
    let heart = Blob::random(rng, heart_geom, 0.05);
    // Appearance.
    let body_level = rng.random_range(0.6..0.72);
    let lung_level = rng.random_range(0.2..0.3);
    let rib_period = rng.random_range(0.075..0.09);
    let rib_phase = rng.random_range(0.0..1.0);
    let rib_curve = rng.random_range(0.6..1.0);
    let (contrast, brightness, sigma) = if shifted {
        (1.8, 0.1, 0.06)
    } else {
        (1.0, 0.0, 0.02)
    };
    let px = 1.0 / size as f32;
    let mut image = GrayImage::new(size, size);
    let mut mask = GrayImage::new(size, size);
    for y in 0..size {
        for x in 0..size {
            let (u, v) = ((x as f32 + 0.5) * px, (y as f32 + 0.5) * px);
            let body_rho = body.rho(u, v);
            let in_body = 1.0 - soft_outside(body_rho, px / body.rx);
            let heart_out = soft_outside(heart.rho(u, v), px / heart.rx);
            let lobe_in = (1.0 - soft_outside(right.rho(u, v), px / right.rx))
                .max(1.0 - soft_outside(left.rho(u, v), px / left.rx))
                * heart_out;
            let lung_mask = (right.rho(u, v) < 1.0 || left.rho(u, v) < 1.0)
                && heart.rho(u, v) >= 1.0
                && body_rho < 1.0;
            // Soft tissue thins towards the body's edge; the spine is a bright column.
            let tissue = body_level * (1.0 - 0.35 * body_rho.min(1.0).powi(4));
            let spine = 0.12 * (-((u - 0.5) / 0.035).powi(2)).exp();
            let ribs = 0.1
                * (2.0 * PI * ((v + rib_curve * (u - 0.5).powi(2)) / rib_period + rib_phase))
                    .sin()
                    .max(0.0)
                    .powi(3);
            let inside = tissue + spine + ribs;
            let lung = lung_level + ribs + 0.05 * (v - lobe_y);
            let value = in_body * (inside * (1.0 - lobe_in) + lung * lobe_in) + 0.02;
            let value = (value.clamp(0.0, 1.0).powf(contrast) + brightness + gaussian(rng, sigma))
                .clamp(0.0, 1.0);
            image.put_pixel(x, y, Luma([to_u8(value)]));
            mask.put_pixel(x, y, Luma([u8::from(lung_mask)]));
        }
    }
    (DynamicImage::ImageLuma8(image), mask)
}

/// A dermoscopy-like phantom; shape draws first, appearance draws after (see module docs).
fn skin(rng: &mut ChaCha8Rng, size: u32, shifted: bool) -> (DynamicImage, GrayImage) {
    // Shape.
    let radius = rng.random_range(0.12..0.26);
    let geom = [
        rng.random_range(0.38..0.62),
        rng.random_range(0.38..0.62),
        radius * rng.random_range(0.8..1.2),
        radius * rng.random_range(0.8..1.2),
    ];
    let lesion = Blob::random(rng, geom, 0.25);
    // Appearance.
    let skin_rgb = [
        rng.random_range(0.82..0.92),
        rng.random_range(0.6..0.72),
        rng.random_range(0.5..0.62),
    ];
    let lesion_rgb = [
        rng.random_range(0.35..0.5),
        rng.random_range(0.2..0.3),
        rng.random_range(0.12..0.22),
    ];
    let mottling: Vec<(f32, f32, f32)> = (0..3)
        .map(|_| {
            (
                rng.random_range(2.0..6.0),
                rng.random_range(0.0..2.0 * PI),
                rng.random_range(0.0..2.0 * PI),
            )
        })
        .collect();
    // Hairs: lines u cos(a) + v sin(a) = d.
    let hairs: Vec<(f32, f32)> = (0..rng.random_range(0..4))
        .map(|_| (rng.random_range(0.0..PI), rng.random_range(0.1..0.9)))
        .collect();
    let (cast, lesion_mix, brightness, sigma) = if shifted {
        ([0.9, 1.0, 1.15], 0.35, 0.06, 0.04)
    } else {
        ([1.0, 1.0, 1.0], 0.0, 0.0, 0.015)
    };
    let px = 1.0 / size as f32;
    let mut image = RgbImage::new(size, size);
    let mut mask = GrayImage::new(size, size);
    for y in 0..size {
        for x in 0..size {
            let (u, v) = ((x as f32 + 0.5) * px, (y as f32 + 0.5) * px);
            let r2 = (u - 0.5).powi(2) + (v - 0.5).powi(2);
            let vignette = 1.0 - 0.6 * r2;
            let mottle: f32 = mottling
                .iter()
                .map(|(f, p, q)| {
                    0.015 * (2.0 * PI * f * u + p).sin() * (2.0 * PI * f * v + q).cos()
                })
                .sum();
            let rho = lesion.rho(u, v);
            let outside = soft_outside(rho, px / lesion.rx);
            let hair = hairs
                .iter()
                .any(|(a, d)| (u * a.cos() + v * a.sin() - d).abs() < 0.6 * px);
            let mut rgb = [0u8; 3];
            for c in 0..3 {
                // The lesion darkens towards its centre; the shifted domain pulls it towards skin.
                let dark = lesion_rgb[c] * (0.75 + 0.25 * rho.min(1.0));
                let dark = dark * (1.0 - lesion_mix) + skin_rgb[c] * lesion_mix;
                let mut value = (skin_rgb[c] + mottle) * outside + dark * (1.0 - outside);
                if hair {
                    value *= 0.35;
                }
                value = value * vignette * cast[c] + brightness + gaussian(rng, sigma);
                rgb[c] = to_u8(value);
            }
            image.put_pixel(x, y, Rgb(rgb));
            mask.put_pixel(x, y, Luma([u8::from(rho < 1.0)]));
        }
    }
    (DynamicImage::ImageRgb8(image), mask)
}

/// Gaussian noise of standard deviation `sigma`.
fn gaussian(rng: &mut ChaCha8Rng, sigma: f32) -> f32 {
    let z: f32 = rng.sample(StandardNormal);
    z * sigma
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::DataConfig;

    /// Mean of luma inside and outside the mask, over pixels where `keep` holds.
    fn means(p: &Phantom, keep: impl Fn(u8) -> bool) -> (f64, f64) {
        let luma = p.image.to_luma8();
        let (mut sin, mut nin, mut sout, mut nout) = (0.0, 0.0, 0.0, 0.0);
        for (v, m) in luma.pixels().zip(p.mask.pixels()) {
            if m.0[0] == 1 {
                sin += f64::from(v.0[0]);
                nin += 1.0;
            } else if keep(v.0[0]) {
                sout += f64::from(v.0[0]);
                nout += 1.0;
            }
        }
        (sin / nin, sout / nout)
    }

    fn fraction(mask: &GrayImage) -> f64 {
        mask.pixels().filter(|p| p.0[0] == 1).count() as f64 / mask.pixels().count() as f64
    }

    #[test]
    fn phantoms_are_seeded_and_independent_of_the_count() {
        for kind in [PhantomKind::Lungs, PhantomKind::Skin] {
            let cfg = PhantomConfig::new(kind, 48, 7);
            let a = phantoms(&cfg, 3).unwrap();
            assert_eq!(a, phantoms(&cfg, 3).unwrap());
            assert_eq!(a[..2], phantoms(&cfg, 2).unwrap()[..]);
            assert_ne!(a[0], a[1]);
            assert_ne!(a[0], phantom(&PhantomConfig::new(kind, 48, 8), 0).unwrap());
            assert_eq!(a[2].id, format!("{kind}_0002"));
        }
    }

    #[test]
    fn lung_phantoms_have_two_dark_lobes_in_a_brighter_body() {
        let cfg = PhantomConfig::new(PhantomKind::Lungs, 64, 1);
        for p in phantoms(&cfg, 4).unwrap() {
            assert_eq!(p.image.color(), image::ColorType::L8);
            let f = fraction(&p.mask);
            assert!((0.08..0.4).contains(&f), "lung fraction {f}");
            // Both halves hold a lobe.
            let left = p
                .mask
                .enumerate_pixels()
                .filter(|(x, _, m)| *x < 32 && m.0[0] == 1)
                .count();
            let right = p
                .mask
                .enumerate_pixels()
                .filter(|(x, _, m)| *x >= 32 && m.0[0] == 1)
                .count();
            assert!(left > 50 && right > 50, "{left} {right}");
            // Lobes are darker than the body around them (background excluded by its darkness).
            let (lung, body) = means(&p, |v| v > 60);
            assert!(lung + 40.0 < body, "lung {lung} body {body}");
        }
    }

    #[test]
    fn skin_phantoms_have_one_dark_lesion_on_skin() {
        let cfg = PhantomConfig::new(PhantomKind::Skin, 64, 2);
        for p in phantoms(&cfg, 4).unwrap() {
            assert_eq!(p.image.color(), image::ColorType::Rgb8);
            let f = fraction(&p.mask);
            assert!((0.02..0.4).contains(&f), "lesion fraction {f}");
            let (lesion, skin) = means(&p, |_| true);
            assert!(lesion + 40.0 < skin, "lesion {lesion} skin {skin}");
            // The lesion stays inside the image.
            let (w, h) = p.mask.dimensions();
            assert!(
                p.mask
                    .enumerate_pixels()
                    .all(|(x, y, m)| m.0[0] == 0 || (x > 0 && y > 0 && x < w - 1 && y < h - 1))
            );
        }
    }

    #[test]
    fn shifted_domain_keeps_masks_and_changes_appearance() {
        for kind in [PhantomKind::Lungs, PhantomKind::Skin] {
            let cfg = PhantomConfig::new(kind, 48, 3);
            let shifted = PhantomConfig {
                shifted: true,
                ..cfg
            };
            let (a, b) = (phantom(&cfg, 0).unwrap(), phantom(&shifted, 0).unwrap());
            assert_eq!(a.mask, b.mask);
            let mean = |p: &Phantom| {
                let raw = p.image.as_bytes();
                raw.iter().map(|&v| f64::from(v)).sum::<f64>() / raw.len() as f64
            };
            assert!(
                (mean(&a) - mean(&b)).abs() > 5.0,
                "{} vs {}",
                mean(&a),
                mean(&b)
            );
        }
    }

    #[test]
    fn written_phantoms_load_back_as_the_in_memory_dataset() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = PhantomConfig::new(PhantomKind::Skin, 32, 5);
        let ids = write_phantoms(dir.path(), &cfg, 3).unwrap();
        assert_eq!(ids, ["skin_0000", "skin_0001", "skin_0002"]);
        let loaded = Dataset::load(dir.path(), &DataConfig::default()).unwrap();
        let memory = phantom_dataset(&cfg, 3).unwrap();
        assert_eq!(loaded.ids(), memory.ids());
        for (l, m) in loaded.samples().iter().zip(memory.samples()) {
            assert_eq!(l.image, m.image);
            assert_eq!(l.mask, m.mask);
        }
        assert!(phantom(&PhantomConfig::new(PhantomKind::Skin, 4, 0), 0).is_err());
        assert_eq!("lungs".parse::<PhantomKind>().unwrap(), PhantomKind::Lungs);
        assert!("liver".parse::<PhantomKind>().is_err());
    }
}
