//! 2-D max pooling with PyTorch semantics and a backward for any kernel/stride/padding.
//!
//! Candle's `max_pool2d_with_stride` has no padding and refuses to backpropagate when
//! `kernel != stride` (the 3x3/stride-2/pad-1 stem pool of ResNet-style encoders is exactly
//! that case). [`max_pool2d`] matches `torch.nn.functional.max_pool2d(x, kernel, stride,
//! padding)`: padding counts as `-inf`, the output size rounds down, and the gradient of each
//! output goes to the *first* maximum of its window in row-major scan order (PyTorch's
//! argmax), never split over ties.
//!
//! On the CPU (f32, f64) it is a candle `CustomOp1`: the forward scans each window once; the
//! backward (a second custom op) scans the windows again and adds each output's gradient to
//! its window's maximum; both run planes in parallel. Other devices and dtypes use a
//! composition of candle primitives
//! (`-inf` padding by `cat`, one `index_select` pair per kernel offset, `argmax` + `gather`
//! over the stacked windows) whose backward candle derives; it costs `kernel²` copies of the
//! output, and it inherits that device's `argmax` tie-breaking and NaN handling.

use candle_core::{CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType, bail};

use crate::storage::{Element, Kernel, kernel_cpu_fwd, on_cpu_kernels, par_written};
use rayon::prelude::*;

/// Pooling window parameters and the resulting shapes, validated like PyTorch does.
#[derive(Clone, Copy, Debug)]
struct PoolGeometry {
    kernel: usize,
    stride: usize,
    padding: usize,
    dims: [usize; 4],
    out_h: usize,
    out_w: usize,
}

impl PoolGeometry {
    fn new(dims: &[usize], kernel: usize, stride: usize, padding: usize) -> Result<Self> {
        let dims: [usize; 4] = match dims {
            &[b, c, h, w] => [b, c, h, w],
            _ => bail!("max_pool2d: expected a [B, C, H, W] tensor, got shape {dims:?}"),
        };
        if kernel == 0 || stride == 0 {
            bail!("max_pool2d: kernel ({kernel}) and stride ({stride}) must be positive");
        }
        // PyTorch's rule; it guarantees every window holds at least one real element.
        if 2 * padding > kernel {
            bail!("max_pool2d: padding {padding} must be at most half the kernel size {kernel}");
        }
        let [_, _, h, w] = dims;
        if h == 0 || w == 0 {
            bail!("max_pool2d: empty input {dims:?}");
        }
        if h + 2 * padding < kernel || w + 2 * padding < kernel {
            bail!(
                "max_pool2d: kernel {kernel} is larger than the padded input {}x{} \
                 (input {h}x{w}, padding {padding})",
                h + 2 * padding,
                w + 2 * padding
            );
        }
        Ok(Self {
            kernel,
            stride,
            padding,
            dims,
            out_h: (h + 2 * padding - kernel) / stride + 1,
            out_w: (w + 2 * padding - kernel) / stride + 1,
        })
    }

    fn out_shape(&self) -> Shape {
        let [b, c, _, _] = self.dims;
        Shape::from((b, c, self.out_h, self.out_w))
    }

    /// Input indices `0..size` covered by output position `o` (the in-bounds part of the window).
    fn window(&self, o: usize, size: usize) -> std::ops::Range<usize> {
        let start = (o * self.stride) as isize - self.padding as isize;
        let end = (start + self.kernel as isize).min(size as isize);
        start.max(0) as usize..end as usize
    }

    /// Visits the window maximum of every output of one `H x W` plane, in output order:
    /// `visit(output index, input index, value)`, both indices within the plane. Ties keep
    /// the first element in row-major order; a NaN wins, as in PyTorch.
    fn scan_plane<T: WithDType>(&self, plane: &[T], mut visit: impl FnMut(usize, usize, T)) {
        let [_, _, h, w] = self.dims;
        let neg_inf = T::from_f64(f64::NEG_INFINITY);
        for oy in 0..self.out_h {
            let rows = self.window(oy, h);
            for ox in 0..self.out_w {
                let cols = self.window(ox, w);
                let mut best = neg_inf;
                let mut best_idx = rows.start * w + cols.start;
                for iy in rows.clone() {
                    for ix in cols.clone() {
                        let v = plane[iy * w + ix];
                        // `partial_cmp` is `None` only for a NaN.
                        if v > best || v.partial_cmp(&v).is_none() {
                            best = v;
                            best_idx = iy * w + ix;
                        }
                    }
                }
                visit(oy * self.out_w + ox, best_idx, best);
            }
        }
    }

    fn plane_sizes(&self) -> (usize, usize) {
        let [_, _, h, w] = self.dims;
        (h * w, self.out_h * self.out_w)
    }

    /// The window maxima, planes in parallel.
    fn forward<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let (input, output) = self.plane_sizes();
        // SAFETY: each chunk is one output plane, whose every window the scan visits.
        unsafe {
            par_written(x.len() / input * output, output, |i, y| {
                self.scan_plane(&x[i * input..][..input], |o, _, v| {
                    y[o].write(v);
                })
            })
        }
    }

    /// The input gradient: each output's gradient added to its window's maximum.
    fn backward<T: WithDType>(&self, x: &[T], dy: &[T]) -> Vec<T> {
        let (input, output) = self.plane_sizes();
        let mut dx = vec![T::zero(); x.len()];
        if output > 0 {
            dx.par_chunks_mut(input)
                .zip(x.par_chunks(input).zip(dy.par_chunks(output)))
                .for_each(|(dx, (x, dy))| self.scan_plane(x, |o, i, _| dx[i] += dy[o]));
        }
        dx
    }
}

/// Forward custom op: the window maxima.
struct MaxPool2dOp(PoolGeometry);

/// The backward of [`MaxPool2dOp`]: `(x, dy) -> dx`, recomputing each window's maximum.
struct MaxPool2dBackwardOp(PoolGeometry);

impl Kernel<1> for MaxPool2dOp {
    fn run<T: Element>(&self, [x]: [&[T]; 1], _: [&Layout; 1]) -> Result<Vec<T>> {
        Ok(self.0.forward(x))
    }
}

impl Kernel<2> for MaxPool2dBackwardOp {
    fn run<T: Element>(&self, [x, dy]: [&[T]; 2], _: [&Layout; 2]) -> Result<Vec<T>> {
        Ok(self.0.backward(x, dy))
    }
}

impl CustomOp1 for MaxPool2dOp {
    fn name(&self) -> &'static str {
        "genseg-max-pool2d"
    }

    kernel_cpu_fwd!(|self, _l| self.0.out_shape());

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let dx = arg.apply_op2_no_bwd(&grad_res.contiguous()?, &MaxPool2dBackwardOp(self.0))?;
        Ok(Some(dx))
    }
}

impl CustomOp2 for MaxPool2dBackwardOp {
    fn name(&self) -> &'static str {
        "genseg-max-pool2d-backward"
    }

    kernel_cpu_fwd!(|self, l1, _l2| l1.shape().clone());
}

/// Max pooling over `kernel x kernel` windows of `x` (`[B, C, H, W]`) moved by `stride`, with
/// `padding` rows/columns of `-inf` on each side: PyTorch's
/// `F.max_pool2d(x, kernel, stride, padding)` (floor mode, dilation 1), differentiable for any
/// kernel/stride/padding. See the module docs for the gradient convention and devices.
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let geometry = PoolGeometry::new(x.dims(), kernel, stride, padding)?;
    if !x.dtype().is_float() {
        bail!("max_pool2d: expected a float tensor, got {:?}", x.dtype());
    }
    if on_cpu_kernels(&[x]) {
        x.contiguous()?.apply_op1(MaxPool2dOp(geometry))
    } else {
        max_pool2d_composed(x, &geometry)
    }
}

/// Device-generic max pooling from candle primitives (see the module docs).
fn max_pool2d_composed(x: &Tensor, g: &PoolGeometry) -> Result<Tensor> {
    let [b, c, h, w] = g.dims;
    let p = g.padding;
    let mut xp = x.clone();
    if p > 0 {
        let side =
            Tensor::full(f64::NEG_INFINITY, (b, c, h, p), x.device())?.to_dtype(x.dtype())?;
        xp = Tensor::cat(&[&side, &xp, &side], 3)?;
        let band = Tensor::full(f64::NEG_INFINITY, (b, c, p, w + 2 * p), x.device())?
            .to_dtype(x.dtype())?;
        xp = Tensor::cat(&[&band, &xp, &band], 2)?;
    }
    let offsets = |n_out: usize, k: usize| -> Result<Tensor> {
        let idx: Vec<u32> = (0..n_out).map(|o| (o * g.stride + k) as u32).collect();
        Tensor::from_vec(idx, n_out, x.device())
    };
    let mut windows = Vec::with_capacity(g.kernel * g.kernel);
    // Row-major (ky, kx) order, so argmax's first-maximum rule matches the CPU scan.
    for ky in 0..g.kernel {
        let rows = xp.index_select(&offsets(g.out_h, ky)?, 2)?;
        for kx in 0..g.kernel {
            windows.push(rows.index_select(&offsets(g.out_w, kx)?, 3)?);
        }
    }
    // [B, C, out_h, out_w, kernel²] -> [B, C, out_h, out_w]
    let stacked = Tensor::stack(&windows, 4)?;
    let argmax = stacked.argmax_keepdim(4)?;
    stacked.gather(&argmax, 4)?.squeeze(4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{GradCheckOptions, check_gradients};
    use crate::ops::test_inputs::{distinct, weighted_sum};
    use candle_core::{DType, Device, Var};

    fn pooled_grad(
        x: &Tensor,
        k: usize,
        s: usize,
        p: usize,
        composed: bool,
    ) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
        let v = Var::from_tensor(x)?;
        let y = if composed {
            max_pool2d_composed(v.as_tensor(), &PoolGeometry::new(x.dims(), k, s, p)?)?
        } else {
            max_pool2d(v.as_tensor(), k, s, p)?
        };
        let grads = weighted_sum(&y, 3)?.backward()?;
        let g = grads
            .get(v.as_tensor())
            .ok_or_else(|| anyhow::anyhow!("no gradient"))?;
        Ok((
            y.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?,
            g.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?,
        ))
    }

    #[test]
    fn stem_pool_3x3_s2_p1_values() -> anyhow::Result<()> {
        // arange(16).view(4, 4): output 2x2, windows cover rows/cols {0,1} and {1,2,3},
        // so out = 4 * max_row + max_col = [[5, 7], [13, 15]].
        let x = Tensor::arange(0f32, 16.0, &Device::Cpu)?.reshape((1, 1, 4, 4))?;
        let y = max_pool2d(&x, 3, 2, 1)?;
        assert_eq!(y.dims(), [1, 1, 2, 2]);
        assert_eq!(
            y.flatten_all()?.to_vec1::<f32>()?,
            vec![5.0, 7.0, 13.0, 15.0]
        );
        // arange(25).view(5, 5): output 3x3, window maxima at rows/cols [1, 3, 4].
        let x = Tensor::arange(0f64, 25.0, &Device::Cpu)?.reshape((1, 1, 5, 5))?;
        let y = max_pool2d(&x, 3, 2, 1)?.flatten_all()?.to_vec1::<f64>()?;
        assert_eq!(y, vec![6.0, 8.0, 9.0, 16.0, 18.0, 19.0, 21.0, 23.0, 24.0]);
        Ok(())
    }

    #[test]
    fn padding_is_negative_infinity_not_zero() -> anyhow::Result<()> {
        let x = (Tensor::ones((1, 1, 3, 3), DType::F32, &Device::Cpu)? * -5.0)?;
        let y = max_pool2d(&x, 3, 2, 1)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(y, vec![-5.0; 4]);
        Ok(())
    }

    #[test]
    fn nan_propagates_like_pytorch() -> anyhow::Result<()> {
        let x = Tensor::new(&[[[[1f32, f32::NAN], [3.0, 2.0]]]], &Device::Cpu)?;
        let y = max_pool2d(&x, 2, 2, 0)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(y[0].is_nan(), "{y:?}");
        Ok(())
    }

    #[test]
    fn matches_candle_when_kernel_equals_stride_including_odd_sizes() -> anyhow::Result<()> {
        for (seed, dims) in [
            (1u64, [1usize, 1, 4, 4]),
            (2, [2, 3, 5, 7]),
            (3, [1, 3, 6, 3]),
        ] {
            let x = distinct(seed, &dims)?.to_dtype(DType::F32)?;
            let ours = max_pool2d(&x, 2, 2, 0)?;
            let theirs = x.max_pool2d_with_stride(2, 2)?;
            assert_eq!(ours.dims(), theirs.dims());
            let d = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(d, 0.0);
        }
        Ok(())
    }

    #[test]
    fn gradient_goes_to_first_maximum_of_each_window() -> anyhow::Result<()> {
        // Constant 3x3 input, 3x3/s2/p1: windows (rows, cols) {0,1}x{0,1}, {0,1}x{1,2},
        // {1,2}x{0,1}, {1,2}x{1,2}; PyTorch routes each output's gradient to the window's
        // top-left real element: (0,0), (0,1), (1,0), (1,1).
        let x = Tensor::ones((1, 1, 3, 3), DType::F64, &Device::Cpu)?;
        for composed in [false, true] {
            let v = Var::from_tensor(&x)?;
            let y = if composed {
                max_pool2d_composed(v.as_tensor(), &PoolGeometry::new(x.dims(), 3, 2, 1)?)?
            } else {
                max_pool2d(v.as_tensor(), 3, 2, 1)?
            };
            let grads = y.sum_all()?.backward()?;
            let g = grads
                .get(v.as_tensor())
                .expect("gradient")
                .flatten_all()?
                .to_vec1::<f64>()?;
            assert_eq!(
                g,
                vec![1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0],
                "composed={composed}"
            );
        }
        // Overlapping windows (3x3/s1) accumulate on a shared maximum.
        let x = Tensor::new(
            &[[[
                [0f64, 0.0, 0.0, 0.0],
                [0.0, 9.0, 0.0, 0.0],
                [0.0, 0.0, 0.0, 0.0],
            ]]],
            &Device::Cpu,
        )?;
        let v = Var::from_tensor(&x)?;
        let grads = max_pool2d(v.as_tensor(), 3, 1, 0)?.sum_all()?.backward()?;
        let g = grads
            .get(v.as_tensor())
            .expect("gradient")
            .flatten_all()?
            .to_vec1::<f64>()?;
        assert_eq!(g[5], 2.0);
        assert_eq!(g.iter().sum::<f64>(), 2.0);
        Ok(())
    }

    #[test]
    fn gradcheck_pool_configurations() -> anyhow::Result<()> {
        let cases: [(&[usize], usize, usize, usize); 6] = [
            (&[1, 1, 4, 4], 3, 2, 1),
            (&[2, 3, 7, 5], 3, 2, 1),
            (&[1, 1, 6, 6], 2, 2, 0),
            (&[1, 3, 5, 7], 2, 2, 0),
            (&[1, 1, 5, 5], 3, 1, 1),
            (&[2, 1, 5, 4], 2, 1, 1),
        ];
        for (seed, (dims, k, s, p)) in cases.into_iter().enumerate() {
            let x = distinct(seed as u64, dims)?;
            check_gradients(
                |v| weighted_sum(&max_pool2d(&v[0], k, s, p)?, 11),
                std::slice::from_ref(&x),
                GradCheckOptions::default(),
            )?
            .ensure(1e-6)?;
            let g = PoolGeometry::new(dims, k, s, p)?;
            check_gradients(
                |v| weighted_sum(&max_pool2d_composed(&v[0], &g)?, 11),
                &[x],
                GradCheckOptions::default(),
            )?
            .ensure(1e-6)?;
        }
        Ok(())
    }

    #[test]
    fn custom_op_and_composition_agree_on_f32_and_strided_input() -> anyhow::Result<()> {
        let x = distinct(21, &[2, 3, 9, 8])?.to_dtype(DType::F32)?;
        let xt = x.transpose(2, 3)?; // non-contiguous [2, 3, 8, 9]
        for input in [&x, &xt] {
            for (k, s, p) in [(3, 2, 1), (2, 2, 0), (3, 3, 0), (2, 1, 1)] {
                let (va, ga) = pooled_grad(input, k, s, p, false)?;
                let (vb, gb) = pooled_grad(input, k, s, p, true)?;
                assert_eq!(va, vb, "k={k} s={s} p={p} dims={:?}", input.dims());
                // Overlapping windows sum gradients in a different order: f32 rounding only.
                for (a, b) in ga.iter().zip(&gb) {
                    assert!((a - b).abs() < 1e-6, "k={k} s={s} p={p}: {a} vs {b}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn invalid_configurations_are_errors() -> anyhow::Result<()> {
        let x = Tensor::zeros((1, 1, 4, 4), DType::F32, &Device::Cpu)?;
        let msg = |r: Result<Tensor>| r.map(|_| ()).unwrap_err().to_string();
        assert!(msg(max_pool2d(&x, 2, 2, 2)).contains("padding 2"));
        assert!(msg(max_pool2d(&x, 0, 1, 0)).contains("kernel (0)"));
        assert!(msg(max_pool2d(&x, 5, 1, 0)).contains("larger than the padded input 4x4"));
        assert!(msg(max_pool2d(&x.squeeze(0)?, 2, 2, 0)).contains("[1, 4, 4]"));
        let xi = Tensor::zeros((1, 1, 4, 4), DType::U32, &Device::Cpu)?;
        assert!(msg(max_pool2d(&xi, 2, 2, 0)).contains("float"));
        Ok(())
    }
}
