//! The structural similarity index (SSIM) of Wang, Bovik, Sheikh and Simoncelli (2004),
//! used to score a pre-trained generator's images against the real ones.
//!
//! The standard definition: local means, variances and covariance under an 11×11 Gaussian
//! window with σ = 1.5 (computed separably), `C1 = (0.01 L)²`, `C2 = (0.03 L)²` with the data
//! range `L = 1`, and the mean of the SSIM map over the positions where the window fits
//! entirely inside the image ("valid" filtering, as the authors' reference `ssim.m`).

use candle_core::{DType, Result, Tensor};

/// Side of the Gaussian window.
pub const WINDOW: usize = 11;
/// Standard deviation of the Gaussian window in pixels.
pub const SIGMA: f64 = 1.5;
const K1: f64 = 0.01;
const K2: f64 = 0.03;

/// The normalised 1-D Gaussian of [`WINDOW`] taps.
fn gaussian() -> [f64; WINDOW] {
    let mut g = [0.0; WINDOW];
    let c = (WINDOW / 2) as f64;
    for (i, v) in g.iter_mut().enumerate() {
        let d = i as f64 - c;
        *v = (-d * d / (2.0 * SIGMA * SIGMA)).exp();
    }
    let sum: f64 = g.iter().sum();
    g.iter_mut().for_each(|v| *v /= sum);
    g
}

/// Valid separable filtering of an `h × w` plane: `(h - 10) × (w - 10)` outputs.
fn filter(plane: &[f64], h: usize, w: usize, g: &[f64; WINDOW]) -> Vec<f64> {
    let (oh, ow) = (h + 1 - WINDOW, w + 1 - WINDOW);
    let mut rows = vec![0.0; h * ow];
    for y in 0..h {
        for x in 0..ow {
            rows[y * ow + x] = (0..WINDOW).map(|k| g[k] * plane[y * w + x + k]).sum();
        }
    }
    let mut out = vec![0.0; oh * ow];
    for y in 0..oh {
        for x in 0..ow {
            out[y * ow + x] = (0..WINDOW).map(|k| g[k] * rows[(y + k) * ow + x]).sum();
        }
    }
    out
}

/// Mean SSIM of two `h × w` planes with data range 1. Errors when the planes differ in length
/// from `h · w` or are smaller than the window.
pub fn ssim_plane(a: &[f32], b: &[f32], h: usize, w: usize) -> anyhow::Result<f64> {
    anyhow::ensure!(
        a.len() == h * w && b.len() == h * w,
        "ssim: planes of {} and {} values for a {h}x{w} image",
        a.len(),
        b.len()
    );
    anyhow::ensure!(
        h >= WINDOW && w >= WINDOW,
        "ssim: a {h}x{w} image is smaller than the {WINDOW}x{WINDOW} window"
    );
    let g = gaussian();
    let a: Vec<f64> = a.iter().map(|&v| f64::from(v)).collect();
    let b: Vec<f64> = b.iter().map(|&v| f64::from(v)).collect();
    let prod = |p: &[f64], q: &[f64]| p.iter().zip(q).map(|(x, y)| x * y).collect::<Vec<_>>();
    let mu_a = filter(&a, h, w, &g);
    let mu_b = filter(&b, h, w, &g);
    let aa = filter(&prod(&a, &a), h, w, &g);
    let bb = filter(&prod(&b, &b), h, w, &g);
    let ab = filter(&prod(&a, &b), h, w, &g);
    let (c1, c2) = (K1 * K1, K2 * K2);
    let n = mu_a.len();
    let total: f64 = (0..n)
        .map(|i| {
            let (ma, mb) = (mu_a[i], mu_b[i]);
            let (va, vb, cov) = (aa[i] - ma * ma, bb[i] - mb * mb, ab[i] - ma * mb);
            ((2.0 * ma * mb + c1) * (2.0 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
        })
        .sum();
    Ok(total / n as f64)
}

/// Mean SSIM over every image and channel of two `[B, C, H, W]` batches with values in
/// `[0, 1]` (data range 1).
pub fn ssim(a: &Tensor, b: &Tensor) -> anyhow::Result<f64> {
    anyhow::ensure!(
        a.dims() == b.dims(),
        "ssim: batches of shape {:?} and {:?} differ",
        a.dims(),
        b.dims()
    );
    let (n, c, h, w) = a.dims4()?;
    let flat =
        |t: &Tensor| -> Result<Vec<f32>> { t.to_dtype(DType::F32)?.flatten_all()?.to_vec1() };
    let (va, vb) = (flat(a)?, flat(b)?);
    let plane = h * w;
    let mut sum = 0.0;
    for k in 0..n * c {
        let r = k * plane..(k + 1) * plane;
        sum += ssim_plane(&va[r.clone()], &vb[r], h, w)?;
    }
    Ok(sum / (n * c) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn textured(h: usize, w: usize) -> Vec<f32> {
        (0..h * w)
            .map(|i| {
                let (y, x) = ((i / w) as f32, (i % w) as f32);
                0.5 + 0.3 * (x / 3.0).sin() * (y / 5.0).cos()
            })
            .collect()
    }

    #[test]
    fn window_is_normalised_and_symmetric() {
        let g = gaussian();
        assert!((g.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert_eq!(g[0], g[10]);
        assert!(g[5] > g[4] && g[4] > g[0]);
    }

    #[test]
    fn identical_images_score_one_and_noise_lowers_the_score() -> anyhow::Result<()> {
        let (h, w) = (32, 40);
        let x = textured(h, w);
        assert!((ssim_plane(&x, &x, h, w)? - 1.0).abs() < 1e-9);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let noise: Vec<f32> = (0..h * w).map(|_| rng.random::<f32>() - 0.5).collect();
        let mut last = 1.0;
        for sigma in [0.02f32, 0.1, 0.3, 1.0] {
            let noisy: Vec<f32> = x.iter().zip(&noise).map(|(v, n)| v + sigma * n).collect();
            let s = ssim_plane(&x, &noisy, h, w)?;
            assert!(s < last, "SSIM {s} at noise {sigma} is not below {last}");
            last = s;
        }
        assert!(last < 0.5, "heavy noise still scores {last}");
        Ok(())
    }

    /// The separable filter against the direct 2-D windowed sums of the definition.
    #[test]
    fn separable_filtering_equals_the_direct_window() -> anyhow::Result<()> {
        let (h, w) = (14, 13);
        let a = textured(h, w);
        let b: Vec<f32> = a
            .iter()
            .enumerate()
            .map(|(i, v)| v * v + 0.01 * (i % 7) as f32)
            .collect();
        let g = gaussian();
        let (c1, c2) = (K1 * K1, K2 * K2);
        let mut total = 0.0;
        let mut count = 0;
        for y0 in 0..=h - WINDOW {
            for x0 in 0..=w - WINDOW {
                let (mut ma, mut mb, mut aa, mut bb, mut ab) = (0.0, 0.0, 0.0, 0.0, 0.0);
                for dy in 0..WINDOW {
                    for dx in 0..WINDOW {
                        let k = g[dy] * g[dx];
                        let i = (y0 + dy) * w + x0 + dx;
                        let (p, q) = (f64::from(a[i]), f64::from(b[i]));
                        ma += k * p;
                        mb += k * q;
                        aa += k * p * p;
                        bb += k * q * q;
                        ab += k * p * q;
                    }
                }
                let (va, vb, cov) = (aa - ma * ma, bb - mb * mb, ab - ma * mb);
                total += ((2.0 * ma * mb + c1) * (2.0 * cov + c2))
                    / ((ma * ma + mb * mb + c1) * (va + vb + c2));
                count += 1;
            }
        }
        let want = total / f64::from(count);
        let got = ssim_plane(&a, &b, h, w)?;
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        assert!(got < 0.99);
        Ok(())
    }

    #[test]
    fn constant_images_follow_the_luminance_term() -> anyhow::Result<()> {
        // Zero variance everywhere: SSIM = (2 μa μb + C1) / (μa² + μb² + C1).
        let (a, b) = (vec![0.2f32; 144], vec![0.6f32; 144]);
        let (ma, mb, c1) = (0.2f64, 0.6f64, K1 * K1);
        let want = (2.0 * ma * mb + c1) / (ma * ma + mb * mb + c1);
        let got = ssim_plane(&a, &b, 12, 12)?;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        Ok(())
    }

    #[test]
    fn batches_average_planes_and_bad_shapes_are_errors() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::from_vec(textured(16, 16), (1, 1, 16, 16), &dev)?;
        let batch = Tensor::cat(&[&x, &x.zeros_like()?], 0)?;
        let s = ssim(&batch, &Tensor::cat(&[&x, &x], 0)?)?;
        let half = ssim_plane(&vec![0.0; 256], &textured(16, 16), 16, 16)?;
        assert!((s - (1.0 + half) / 2.0).abs() < 1e-9);
        assert!(ssim(&x, &batch).is_err());
        let small = Tensor::zeros((1, 1, 8, 8), DType::F32, &dev)?;
        let err = ssim(&small, &small).unwrap_err().to_string();
        assert!(err.contains("8x8"), "{err}");
        Ok(())
    }
}
