//! Differentiable bilinear resizing with PyTorch `F.interpolate(mode="bilinear")` semantics.
//!
//! Candle's `upsample_bilinear2d` has no backward. Bilinear resizing is separable and linear,
//! so it equals `A_h · X · A_wᵀ` with small interpolation matrices `A_h` `[out_h, in_h]` and
//! `A_w` `[out_w, in_w]` (at most two non-zeros per row). Expressing it as two matmuls makes
//! the backward candle's own matmul backward, on every device.

use candle_core::{Result, Tensor, bail};

/// Row-major `[out_size, in_size]` matrix whose row `d` holds the weights that PyTorch's
/// bilinear kernel gives to each source index for destination index `d`.
fn interpolation_matrix(in_size: usize, out_size: usize, align_corners: bool) -> Vec<f64> {
    let mut m = vec![0.0; out_size * in_size];
    for dst in 0..out_size {
        let src = if align_corners {
            if out_size > 1 {
                dst as f64 * (in_size - 1) as f64 / (out_size - 1) as f64
            } else {
                0.0
            }
        } else {
            // Half-pixel centres; PyTorch clamps negative source coordinates to 0.
            ((dst as f64 + 0.5) * in_size as f64 / out_size as f64 - 0.5).max(0.0)
        };
        let i0 = (src.floor() as usize).min(in_size - 1);
        let i1 = (i0 + 1).min(in_size - 1);
        let frac = (src - i0 as f64).clamp(0.0, 1.0);
        m[dst * in_size + i0] += 1.0 - frac;
        m[dst * in_size + i1] += frac;
    }
    m
}

/// Resizes `x` (`[B, C, H, W]`) to `[B, C, out_h, out_w]` by bilinear interpolation, exactly
/// as PyTorch's `F.interpolate(x, size=(out_h, out_w), mode="bilinear",
/// align_corners=align_corners)`; differentiable with respect to `x`.
///
/// Matching sizes return `x` unchanged (both modes are the identity then).
pub fn resize_bilinear(
    x: &Tensor,
    out_h: usize,
    out_w: usize,
    align_corners: bool,
) -> Result<Tensor> {
    let (b, c, in_h, in_w) = match x.dims() {
        &[b, c, h, w] => (b, c, h, w),
        dims => bail!("resize_bilinear: expected a [B, C, H, W] tensor, got shape {dims:?}"),
    };
    if in_h == 0 || in_w == 0 || out_h == 0 || out_w == 0 {
        bail!("resize_bilinear: cannot resize {in_h}x{in_w} to {out_h}x{out_w} (zero size)");
    }
    if !x.dtype().is_float() {
        bail!(
            "resize_bilinear: expected a float tensor, got {:?}",
            x.dtype()
        );
    }
    let matrix = |in_size, out_size| -> Result<Tensor> {
        let m = interpolation_matrix(in_size, out_size, align_corners);
        Tensor::from_vec(m, (out_size, in_size), x.device())?.to_dtype(x.dtype())
    };
    let mut y = x.clone();
    if out_w != in_w {
        let a_w = matrix(in_w, out_w)?;
        // [B*C*H, W] · [W, out_w] -> [B, C, H, out_w]
        y = y
            .reshape((b * c * in_h, in_w))?
            .matmul(&a_w.t()?)?
            .reshape((b, c, in_h, out_w))?;
    }
    if out_h != in_h {
        let a_h = matrix(in_h, out_h)?;
        // [B, C, H, W'] -> [B*C*W', H] · [H, out_h] -> [B, C, out_h, W']
        y = y
            .transpose(2, 3)?
            .reshape((b * c * out_w, in_h))?
            .matmul(&a_h.t()?)?
            .reshape((b, c, out_w, out_h))?
            .transpose(2, 3)?
            .contiguous()?;
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{GradCheckOptions, check_gradients};
    use crate::ops::test_inputs::{uniform, weighted_sum};
    use candle_core::{DType, Device};

    fn close(got: &Tensor, want: &[f64], tol: f64) -> anyhow::Result<()> {
        let got = got.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tol, "element {i}: {g} vs {w}\n{got:?}");
        }
        Ok(())
    }

    fn grid_2x2() -> anyhow::Result<Tensor> {
        Ok(Tensor::new(&[[[[1f32, 2.0], [3.0, 4.0]]]], &Device::Cpu)?)
    }

    /// PyTorch, align_corners=False, [[1,2],[3,4]] -> 4x4. Source coordinate per output index
    /// d: max((d + 0.5) * 2/4 - 0.5, 0) = [0, 0.25, 0.75, 1.25 -> clamped to index 1], so the
    /// 1-D weights on (a0, a1) are [1,0], [.75,.25], [.25,.75], [0,1]. The input is
    /// 1 + col + 2*row, hence out[r][c] = 1 + f[c] + 2*f[r] with f = [0, .25, .75, 1]:
    /// [[1, 1.25, 1.75, 2], [1.5, 1.75, 2.25, 2.5], [2.5, 2.75, 3.25, 3.5], [3, 3.25, 3.75, 4]],
    /// which is what `F.interpolate(torch.tensor([[[[1.,2],[3,4]]]]), size=4,
    /// mode="bilinear", align_corners=False)` prints.
    #[test]
    fn upsample_2x2_to_4x4_half_pixel() -> anyhow::Result<()> {
        let y = resize_bilinear(&grid_2x2()?, 4, 4, false)?;
        assert_eq!(y.dims(), [1, 1, 4, 4]);
        #[rustfmt::skip]
        let want = [
            1.0, 1.25, 1.75, 2.0,
            1.5, 1.75, 2.25, 2.5,
            2.5, 2.75, 3.25, 3.5,
            3.0, 3.25, 3.75, 4.0,
        ];
        close(&y, &want, 1e-6)
    }

    /// PyTorch, align_corners=True, [[1,2],[3,4]] -> 4x4: source coordinate d * (2-1)/(4-1)
    /// = [0, 1/3, 2/3, 1], so out[r][c] = 1 + c/3 + 2r/3.
    #[test]
    fn upsample_2x2_to_4x4_align_corners() -> anyhow::Result<()> {
        let y = resize_bilinear(&grid_2x2()?, 4, 4, true)?;
        let t = 1.0 / 3.0;
        #[rustfmt::skip]
        let want = [
            1.0,           1.0 + t,       1.0 + 2.0 * t, 2.0,
            1.0 + 2.0 * t, 2.0,           2.0 + t,       2.0 + 2.0 * t,
            2.0 + t,       2.0 + 2.0 * t, 3.0,           3.0 + t,
            3.0,           3.0 + t,       3.0 + 2.0 * t, 4.0,
        ];
        close(&y, &want, 1e-6)
    }

    /// Non-linear rows so the numbers are not just the linear ramp:
    /// - 3 -> 5, align_corners=False: sources max((d + .5) * .6 - .5, 0) = [0, .4, 1, 1.6, 2.2],
    ///   2.2 uses index 2 only (clamped), so [0, 1, 4] -> [0, .4, 1, .4*1 + .6*4, 4].
    /// - 4 -> 2, align_corners=False: sources [.5, 2.5], so [0, 1, 4, 9] -> [.5, 6.5].
    /// - 4 -> 3, align_corners=True: sources [0, 1.5, 3], so [0, 1, 4, 9] -> [0, 2.5, 9].
    /// - 3 -> 1, align_corners=True: output size 1 takes index 0.
    #[test]
    fn non_integer_factors_downsampling_and_single_output() -> anyhow::Result<()> {
        let row3 = Tensor::new(&[0f64, 1.0, 4.0], &Device::Cpu)?.reshape((1, 1, 1, 3))?;
        let row4 = Tensor::new(&[0f64, 1.0, 4.0, 9.0], &Device::Cpu)?.reshape((1, 1, 1, 4))?;
        close(
            &resize_bilinear(&row3, 1, 5, false)?,
            &[0.0, 0.4, 1.0, 2.8, 4.0],
            1e-12,
        )?;
        close(&resize_bilinear(&row4, 1, 2, false)?, &[0.5, 6.5], 1e-12)?;
        close(
            &resize_bilinear(&row4, 1, 3, true)?,
            &[0.0, 2.5, 9.0],
            1e-12,
        )?;
        close(&resize_bilinear(&row3, 1, 1, true)?, &[0.0], 1e-12)?;
        // The same along the height axis.
        let col4 = row4.reshape((1, 1, 4, 1))?;
        close(&resize_bilinear(&col4, 2, 1, false)?, &[0.5, 6.5], 1e-12)?;
        close(
            &resize_bilinear(&col4, 3, 1, true)?,
            &[0.0, 2.5, 9.0],
            1e-12,
        )
    }

    #[test]
    fn identity_when_sizes_match_and_rows_sum_to_one() -> anyhow::Result<()> {
        let x = uniform(1, &[2, 3, 5, 4], 1.0)?;
        for align in [false, true] {
            let y = resize_bilinear(&x, 5, 4, align)?;
            let d = (y - &x)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert_eq!(d, 0.0);
            for (i, o) in [(5, 4), (4, 9), (1, 3), (7, 7)] {
                let m = interpolation_matrix(i, o, align);
                for row in m.chunks(i) {
                    assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12, "{i}->{o}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn gradcheck_both_modes_several_shapes() -> anyhow::Result<()> {
        let cases: [(&[usize], usize, usize); 5] = [
            (&[1, 1, 2, 2], 4, 4),
            (&[1, 3, 3, 5], 7, 2),
            (&[2, 1, 5, 3], 2, 6),
            (&[1, 1, 4, 4], 4, 9),
            (&[2, 3, 3, 3], 1, 5),
        ];
        for (seed, (dims, oh, ow)) in cases.into_iter().enumerate() {
            let x = uniform(seed as u64, dims, 1.0)?;
            for align in [false, true] {
                check_gradients(
                    |v| weighted_sum(&resize_bilinear(&v[0], oh, ow, align)?, 77),
                    std::slice::from_ref(&x),
                    GradCheckOptions::default(),
                )?
                .ensure(1e-6)?;
            }
        }
        Ok(())
    }

    #[test]
    fn keeps_f32_dtype_and_rejects_bad_shapes() -> anyhow::Result<()> {
        let y = resize_bilinear(&grid_2x2()?, 3, 5, false)?;
        assert_eq!((y.dtype(), y.dims()), (DType::F32, &[1usize, 1, 3, 5][..]));
        let x3 = Tensor::zeros((1, 2, 2), DType::F32, &Device::Cpu)?;
        let err = resize_bilinear(&x3, 4, 4, false).unwrap_err().to_string();
        assert!(err.contains("[1, 2, 2]"), "{err}");
        let err = resize_bilinear(&grid_2x2()?, 0, 4, true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("2x2 to 0x4"), "{err}");
        Ok(())
    }
}
