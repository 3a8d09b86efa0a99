//! 8-bit photometric operations on image planes, with the semantics of the libraries the
//! reference calls (spec §2): PIL's `ImageOps.equalize` (the same algorithm as torchvision's
//! tensor `equalize`), and torchvision's tensor `posterize`, `adjust_sharpness`,
//! `autocontrast` and `adjust_saturation`.
//!
//! A *plane* is one channel of one image, `H·W` bytes in row-major order. torchvision
//! computes blends in `f32` and casts back to `u8` by truncation, and so do these functions,
//! so the results match the reference byte for byte (up to the order of `f32` operations).

pub use genseg_data::preprocess::{equalize_lut, gamma_lut};

/// Histogram equalisation of one plane in place ([`equalize_lut`]).
pub fn equalize(plane: &mut [u8]) {
    let mut histogram = [0u64; 256];
    for &v in plane.iter() {
        histogram[usize::from(v)] += 1;
    }
    let lut = equalize_lut(&histogram);
    for v in plane.iter_mut() {
        *v = lut[usize::from(*v)];
    }
}

/// Keeps the `bits` most significant bits of every value (`bits` in 1..=8).
pub fn posterize(plane: &mut [u8], bits: u8) {
    let mask = if bits >= 8 {
        0xFF
    } else {
        !(0xFFu8 >> bits.max(1))
    };
    for v in plane.iter_mut() {
        *v &= mask;
    }
}

/// `(ratio · a + (1 − ratio) · b)` clamped to `[0, 255]` and truncated, in `f32` as
/// torchvision's `_blend`.
fn blend(a: u8, b: f32, ratio: f32, one_minus_ratio: f32) -> u8 {
    (ratio * f32::from(a) + one_minus_ratio * b).clamp(0.0, 255.0) as u8
}

/// torchvision's `adjust_sharpness` on one `h × w` plane: blend the image with a blurred
/// copy (kernel `[[1,1,1],[1,5,1],[1,1,1]] / 13`, rounded; the one-pixel border keeps its
/// values) by `factor` (< 1 blurs, > 1 sharpens). Planes with a side ≤ 2 are unchanged.
pub fn adjust_sharpness(plane: &mut [u8], h: usize, w: usize, factor: f64) {
    if h <= 2 || w <= 2 || plane.len() != h * w {
        return;
    }
    let src = plane.to_vec();
    let mut degenerate: Vec<f32> = src.iter().map(|&v| f32::from(v)).collect();
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            let mut sum = 0u32;
            for dy in 0..3 {
                for dx in 0..3 {
                    sum += u32::from(src[(y + dy - 1) * w + x + dx - 1]);
                }
            }
            // The centre weighs 5: it was counted once above.
            sum += 4 * u32::from(src[y * w + x]);
            degenerate[y * w + x] = (f64::from(sum) / 13.0).round() as f32;
        }
    }
    let ratio = factor as f32;
    let rest = (1.0 - factor) as f32;
    for (v, d) in plane.iter_mut().zip(degenerate) {
        *v = blend(*v, d, ratio, rest);
    }
}

/// torchvision's `autocontrast` on one plane: stretch `[min, max]` to `[0, 255]`
/// (unchanged when the plane is constant).
pub fn autocontrast(plane: &mut [u8]) {
    let (Some(&lo), Some(&hi)) = (plane.iter().min(), plane.iter().max()) else {
        return;
    };
    if lo == hi {
        return;
    }
    let lo = f32::from(lo);
    let scale = 255.0f32 / (f32::from(hi) - lo);
    for v in plane.iter_mut() {
        *v = ((f32::from(*v) - lo) * scale).clamp(0.0, 255.0) as u8;
    }
}

/// torchvision's `adjust_saturation` on one RGB image given as three planes: blend with its
/// grey version `(0.2989 r + 0.587 g + 0.114 b)` (truncated) by `factor` (0 gives grey,
/// 1 the original).
pub fn adjust_saturation(r: &mut [u8], g: &mut [u8], b: &mut [u8], factor: f64) {
    let ratio = factor as f32;
    let rest = (1.0 - factor) as f32;
    for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
        let grey = (0.2989f32 * f32::from(*r) + 0.587 * f32::from(*g) + 0.114 * f32::from(*b))
            .clamp(0.0, 255.0) as u8;
        let grey = f32::from(grey);
        *r = blend(*r, grey, ratio, rest);
        *g = blend(*g, grey, ratio, rest);
        *b = blend(*b, grey, ratio, rest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equalize_three_levels_by_hand() {
        // 255 pixels each of 0, 50 and 200: step = (765 − 255) // 255 = 2, n starts at 1;
        // lut[0] = 0, lut[1..=50] = (1 + 255) // 2 = 128, lut[51..=200] = (1 + 510) // 2 = 255.
        let mut plane: Vec<u8> = [0u8, 50, 200].iter().flat_map(|&v| [v; 255]).collect();
        equalize(&mut plane);
        assert!(plane[..255].iter().all(|&v| v == 0));
        assert!(plane[255..510].iter().all(|&v| v == 128));
        assert!(plane[510..].iter().all(|&v| v == 255));
    }

    #[test]
    fn equalize_leaves_flat_and_sparse_planes_alone() {
        let mut flat = vec![7u8; 1000];
        equalize(&mut flat);
        assert!(flat.iter().all(|&v| v == 7));
        // Fewer than 255 pixels outside the top value: step 0, identity.
        let mut sparse: Vec<u8> = (0..200).map(|i| i as u8).collect();
        let before = sparse.clone();
        equalize(&mut sparse);
        assert_eq!(sparse, before);
    }

    #[test]
    fn gamma_and_posterize_by_hand() {
        let lut = gamma_lut(0.5);
        // 255 · sqrt(64 / 255) = 127.75.
        assert_eq!((lut[0], lut[64], lut[255]), (0, 128, 255));
        let mut p = vec![0b1011_0111u8, 0x0F, 0xFF];
        posterize(&mut p, 4);
        assert_eq!(p, vec![0b1011_0000, 0x00, 0xF0]);
        let mut p = vec![0b1011_0111u8];
        posterize(&mut p, 8);
        assert_eq!(p, vec![0b1011_0111]);
        posterize(&mut p, 1);
        assert_eq!(p, vec![0b1000_0000]);
    }

    #[test]
    fn sharpness_by_hand() {
        // 3x3, only the centre lit: blurred centre = round(5 · 100 / 13) = round(38.46) = 38;
        // 0.3 · 100 + 0.7 · 38 = 56.6 -> 56. The border is kept (and zero stays zero).
        let mut p = vec![0u8, 0, 0, 0, 100, 0, 0, 0, 0];
        adjust_sharpness(&mut p, 3, 3, 0.3);
        assert_eq!(p, vec![0, 0, 0, 0, 56, 0, 0, 0, 0]);
        // A side of 2 is left alone.
        let mut small = vec![1u8, 2, 3, 4];
        adjust_sharpness(&mut small, 2, 2, 0.3);
        assert_eq!(small, vec![1, 2, 3, 4]);
    }

    #[test]
    fn autocontrast_by_hand() {
        // scale 255 / 100: 50 -> 0, 100 -> 127.5 -> 127, 150 -> 255.
        let mut p = vec![50u8, 100, 150];
        autocontrast(&mut p);
        assert_eq!(p, vec![0, 127, 255]);
        let mut flat = vec![9u8; 4];
        autocontrast(&mut flat);
        assert_eq!(flat, vec![9; 4]);
    }

    #[test]
    fn saturation_by_hand() {
        // grey = 0.2989 · 200 + 0.587 · 100 = 118.48 -> 118; factor 1.5: 1.5 v − 0.5 · 118.
        let (mut r, mut g, mut b) = (vec![200u8], vec![100u8], vec![0u8]);
        adjust_saturation(&mut r, &mut g, &mut b, 1.5);
        assert_eq!((r[0], g[0], b[0]), (241, 91, 0));
        let (mut r, mut g, mut b) = (vec![200u8], vec![100u8], vec![0u8]);
        adjust_saturation(&mut r, &mut g, &mut b, 0.0);
        assert_eq!((r[0], g[0], b[0]), (118, 118, 118));
    }
}
