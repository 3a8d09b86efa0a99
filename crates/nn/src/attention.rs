//! Multi-head self-attention over windows of tokens with an additive bias, as one op.
//!
//! Composed from candle ops, attention is about fifteen graph nodes (reshape, permute,
//! three narrows, three copies, scale, transpose, two matrix products, bias and mask adds,
//! softmax, transpose, copy), and candle's backward of every one of them is a zero fill and
//! an add over the whole activation (a narrow's, a zero-padded concatenation three times
//! the size). On the CPU this op is a single node: per window and head, `softmax(q·kᵀ·s +
//! bias + mask)·v` with the scores in a scratch buffer, and a backward that recomputes
//! them (as FlashAttention does) instead of keeping them alive.

use candle_core::{CustomOp3, D, IndexOp, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::conv::kernels::{matmul_scaled, transposed, view};
use crate::rows::{softmax_in_place, sum_in_order};
use crate::storage::{Element, Kernel, cast, kernel_cpu_fwd, on_cpu_kernels, par_written};

/// Windows per parallel task of the backward pass: each task keeps one `[heads, n, n]`
/// bias-gradient sum, so few windows per task would cost memory, many would leave threads idle.
const WINDOWS_PER_TASK: usize = 4;

/// Self-attention of `heads` heads within each window.
///
/// - `qkv`: `[windows, n, 3·C]`, each token's query, key and value (in that order, each
///   `C = heads · head_dim` with heads outermost, PyTorch's `reshape(B, N, 3, heads, hd)`);
/// - `bias`: `[heads, n, n]`, added to every window's scores (a relative position bias);
/// - `mask`: `[m, n, n]` with `windows` a multiple of `m`, added to the scores of window
///   `w` as `mask[w % m]` (the shifted-window mask), or none.
///
/// Returns `[windows, n, C]`: `softmax(q·kᵀ / √head_dim + bias + mask) · v` with the heads
/// concatenated. Gradients flow to `qkv` and `bias`; the mask is a constant.
pub fn windowed_attention(
    qkv: &Tensor,
    heads: usize,
    bias: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (windows, n, c3) = qkv.dims3()?;
    if heads == 0 || c3 % (3 * heads) != 0 {
        candle_core::bail!(
            "windowed_attention: qkv has {c3} features per token, not 3 x {heads} heads x a head dim"
        );
    }
    if bias.dims() != [heads, n, n] {
        candle_core::bail!(
            "windowed_attention: bias must be [{heads}, {n}, {n}], got {:?}",
            bias.dims()
        );
    }
    let mask = match mask {
        Some(m) => {
            let (mw, a, b) = m.dims3()?;
            if a != n || b != n || mw == 0 || windows % mw != 0 {
                candle_core::bail!(
                    "windowed_attention: mask must be [m, {n}, {n}] with m dividing {windows} windows, got {:?}",
                    m.dims()
                );
            }
            m.to_dtype(qkv.dtype())?
        }
        None => Tensor::zeros((1, n, n), qkv.dtype(), qkv.device())?,
    };
    let scale = ((c3 / (3 * heads)) as f64).powf(-0.5);
    if on_cpu_kernels(&[qkv, bias, &mask]) {
        return qkv.contiguous()?.apply_op3(
            &bias.contiguous()?,
            &mask.contiguous()?,
            WindowAttention { heads, scale },
        );
    }
    composite(qkv, heads, scale, bias, &mask)
}

/// [`windowed_attention`] from candle's ops (any device and dtype).
fn composite(
    qkv: &Tensor,
    heads: usize,
    scale: f64,
    bias: &Tensor,
    mask: &Tensor,
) -> Result<Tensor> {
    let (windows, n, c3) = qkv.dims3()?;
    let (c, m) = (c3 / 3, mask.dim(0)?);
    let qkv = qkv
        .reshape((windows, n, 3, heads, c / heads))?
        .permute((2, 0, 3, 1, 4))?;
    let q = (qkv.i(0)?.contiguous()? * scale)?;
    let k = qkv.i(1)?.contiguous()?;
    let v = qkv.i(2)?.contiguous()?;
    let scores = q
        .matmul(&k.t()?)?
        .broadcast_add(&bias.unsqueeze(0)?)?
        .reshape((windows / m, m, heads, n, n))?
        .broadcast_add(&mask.unsqueeze(1)?.unsqueeze(0)?)?
        .reshape((windows, heads, n, n))?;
    crate::ops::softmax(&scores, D::Minus1)?
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape((windows, n, c))
}

/// The CPU op: `(qkv, bias, mask) -> attention output`.
#[derive(Debug, Clone, Copy)]
struct WindowAttention {
    heads: usize,
    scale: f64,
}

/// Sizes of one call: windows, tokens per window, features per section, head dim, mask
/// windows.
#[derive(Debug, Clone, Copy)]
struct Dims {
    windows: usize,
    n: usize,
    c: usize,
    hd: usize,
    m: usize,
}

impl WindowAttention {
    fn dims(&self, qkv: &Layout, mask_windows: usize) -> Result<Dims> {
        let (windows, n, c3) = qkv.shape().dims3()?;
        Ok(Dims {
            windows,
            n,
            c: c3 / 3,
            hd: c3 / 3 / self.heads,
            m: mask_windows,
        })
    }

    /// The probabilities `P = softmax(s·q·kᵀ + additive)` of window `w`, head `h` into `p`
    /// (`n x n`); `additive` is the `n x n` bias (+ mask) of that head and window.
    ///
    /// # Safety
    /// `qkv` must be the whole `[windows, n, 3C]` buffer and `w`, `h` in range.
    unsafe fn probabilities<T: Element>(
        &self,
        d: Dims,
        qkv: &[T],
        (w, h): (usize, usize),
        additive: impl Fn(usize) -> T,
        p: &mut [T],
    ) {
        for (i, v) in p.iter_mut().enumerate() {
            *v = additive(i);
        }
        let q = &qkv[w * d.n * 3 * d.c + h * d.hd..];
        let k = &q[d.c..];
        // SAFETY: q and k are n x hd views with row stride 3C inside `qkv`; p is n x n.
        unsafe {
            matmul_scaled(
                (d.n, d.n, d.hd),
                p.as_mut_ptr(),
                d.n,
                true,
                cast(self.scale),
                view(q.as_ptr(), 3 * d.c),
                transposed(k.as_ptr(), 3 * d.c),
                gemm::Parallelism::None,
            )
        };
        p.chunks_mut(d.n).for_each(softmax_in_place);
    }
}

impl Kernel<3> for WindowAttention {
    fn run<T: Element>(
        &self,
        [qkv, bias, mask]: [&[T]; 3],
        [l, _, lm]: [&Layout; 3],
    ) -> Result<Vec<T>> {
        let d = self.dims(l, lm.dims()[0])?;
        let nn = d.n * d.n;
        // SAFETY: each chunk is one window's [n, C] output; every head writes its hd
        // columns of every row (beta 0).
        Ok(unsafe {
            par_written(d.windows * d.n * d.c, d.n * d.c, |w, out| {
                let out = out.as_mut_ptr().cast::<T>();
                let mut p = vec![T::zero(); nn];
                let mask = &mask[(w % d.m) * nn..][..nn];
                for h in 0..self.heads {
                    let bias = &bias[h * nn..][..nn];
                    self.probabilities(d, qkv, (w, h), |i| bias[i] + mask[i], &mut p);
                    let v = &qkv[w * d.n * 3 * d.c + 2 * d.c + h * d.hd..];
                    matmul_scaled(
                        (d.n, d.hd, d.n),
                        out.add(h * d.hd),
                        d.c,
                        false,
                        T::one(),
                        view(p.as_ptr(), d.n),
                        view(v.as_ptr(), 3 * d.c),
                        gemm::Parallelism::None,
                    );
                }
            })
        })
    }
}

impl CustomOp3 for WindowAttention {
    fn name(&self) -> &'static str {
        "genseg-window-attention"
    }

    kernel_cpu_fwd!(|self, l1, _l2, _l3| {
        let (windows, n, c3) = l1.shape().dims3()?;
        Shape::from((windows, n, c3 / 3))
    });

    fn bwd(
        &self,
        qkv: &Tensor,
        bias: &Tensor,
        mask: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Bias and mask summed once per (mask window, head): [m, heads, n, n], detached so
        // that the gradient store keeps no graph alive.
        let additive = bias
            .detach()
            .unsqueeze(0)?
            .broadcast_add(&mask.detach().unsqueeze(1)?)?
            .contiguous()?;
        let flat = qkv.apply_op3_no_bwd(
            &grad.contiguous()?,
            &additive,
            &WindowAttentionBackward(*self),
        )?;
        let n = qkv.elem_count();
        let dqkv = flat.narrow(0, 0, n)?.reshape(qkv.shape())?;
        let dbias = flat
            .narrow(0, n, bias.elem_count())?
            .reshape(bias.shape())?;
        Ok((Some(dqkv), Some(dbias), None))
    }
}

/// The backward of [`WindowAttention`]: `(qkv, dy [windows, n, C], additive [m, heads, n,
/// n])` -> flat `[dqkv, dbias]`. Per window and head, with `P` recomputed:
/// `dP = dy·vᵀ`, `dS = P ⊙ (dP - rowsum(dP ⊙ P))`, `dq = s·dS·k`, `dk = s·dSᵀ·q`,
/// `dv = Pᵀ·dy`, `dbias += dS`.
#[derive(Debug, Clone, Copy)]
struct WindowAttentionBackward(WindowAttention);

impl Kernel<3> for WindowAttentionBackward {
    fn run<T: Element>(
        &self,
        [qkv, dy, additive]: [&[T]; 3],
        [l, _, la]: [&Layout; 3],
    ) -> Result<Vec<T>> {
        let a = &self.0;
        let d = a.dims(l, la.dims()[0])?;
        let (nn, heads) = (d.n * d.n, a.heads);
        let len = qkv.len();
        let mut out: Vec<T> = Vec::with_capacity(len + heads * nn);
        let dqkv = out.as_mut_ptr() as usize;
        let scale = cast::<T>(a.scale);
        // One window's gradients; dbias, and the scratch p and ds, carried from window to
        // window.
        let window = |(mut dbias, mut p, mut ds): (Vec<f64>, Vec<T>, Vec<T>), w: usize| {
            let dqkv = dqkv as *mut T;
            let base = w * d.n * 3 * d.c;
            for h in 0..heads {
                let add = &additive[((w % d.m) * heads + h) * nn..][..nn];
                // SAFETY: every view is an n x hd or n x n block inside its buffer;
                // window w's rows of dqkv are written by this task alone.
                unsafe {
                    a.probabilities(d, qkv, (w, h), |i| add[i], &mut p);
                    let q = qkv.as_ptr().add(base + h * d.hd);
                    let k = q.add(d.c);
                    let v = q.add(2 * d.c);
                    let dyw = dy.as_ptr().add(w * d.n * d.c + h * d.hd);
                    // dP = dy · vᵀ
                    matmul_scaled(
                        (d.n, d.n, d.hd),
                        ds.as_mut_ptr(),
                        d.n,
                        false,
                        T::one(),
                        view(dyw, d.c),
                        transposed(v, 3 * d.c),
                        gemm::Parallelism::None,
                    );
                    for (ds, p) in ds.chunks_mut(d.n).zip(p.chunks(d.n)) {
                        let dot = ds.iter().zip(p).fold(T::zero(), |s, (&g, &p)| s + g * p);
                        for (g, &p) in ds.iter_mut().zip(p) {
                            *g = p * (*g - dot);
                        }
                    }
                    for (acc, &g) in dbias[h * nn..][..nn].iter_mut().zip(&ds) {
                        *acc += g.to_f64();
                    }
                    let dq = dqkv.add(base + h * d.hd);
                    // dq = s·dS·k, dk = s·dSᵀ·q, dv = Pᵀ·dy
                    matmul_scaled(
                        (d.n, d.hd, d.n),
                        dq,
                        3 * d.c,
                        false,
                        scale,
                        view(ds.as_ptr(), d.n),
                        view(k, 3 * d.c),
                        gemm::Parallelism::None,
                    );
                    matmul_scaled(
                        (d.n, d.hd, d.n),
                        dq.add(d.c),
                        3 * d.c,
                        false,
                        scale,
                        transposed(ds.as_ptr(), d.n),
                        view(q, 3 * d.c),
                        gemm::Parallelism::None,
                    );
                    matmul_scaled(
                        (d.n, d.hd, d.n),
                        dq.add(2 * d.c),
                        3 * d.c,
                        false,
                        T::one(),
                        transposed(p.as_ptr(), d.n),
                        view(dyw, d.c),
                        gemm::Parallelism::None,
                    );
                }
            }
            (dbias, p, ds)
        };
        // Fixed groups of windows whose sums are added in order: dbias does not depend on
        // how rayon shares the groups among threads.
        let partials = (0..d.windows.div_ceil(WINDOWS_PER_TASK))
            .into_par_iter()
            .map(|g| {
                let fresh = (
                    vec![0.0f64; heads * nn],
                    vec![T::zero(); nn],
                    vec![T::zero(); nn],
                );
                let windows = g * WINDOWS_PER_TASK..((g + 1) * WINDOWS_PER_TASK).min(d.windows);
                windows.fold(fresh, &window).0
            })
            .collect();
        let dbias = sum_in_order(partials, heads * nn);
        // SAFETY: the tasks wrote all of dqkv (every window, head and section, beta 0);
        // dbias fills the rest.
        unsafe {
            let tail = out.as_mut_ptr().add(len);
            for (i, &v) in dbias.iter().enumerate() {
                tail.add(i).write(cast(v));
            }
            out.set_len(len + heads * nn);
        }
        Ok(out)
    }
}

impl CustomOp3 for WindowAttentionBackward {
    fn name(&self) -> &'static str {
        "genseg-window-attention-backward"
    }

    kernel_cpu_fwd!(|self, l1, _l2, l3| {
        let (_, _, n, _) = l3.shape().dims4()?;
        Shape::from(l1.shape().elem_count() + self.0.heads * n * n)
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{GradCheckOptions, check_gradients};
    use crate::ops::test_inputs::{max_diff, uniform, weighted_sum};
    use candle_core::{DType, Var};

    /// A -100 / 0 mask like the shifted-window one.
    fn mask(seed: u64, m: usize, n: usize) -> anyhow::Result<Tensor> {
        Ok((uniform(seed, &[m, n, n], 1.0)?
            .ge(0.0)?
            .to_dtype(DType::F64)?
            * -100.0)?)
    }

    #[test]
    fn equals_the_composite_attention_with_its_gradients() -> anyhow::Result<()> {
        // (windows, n, heads, head dim, mask windows)
        for (windows, n, heads, hd, m) in [
            (6usize, 4usize, 2usize, 3usize, Some(3usize)),
            (2, 9, 3, 2, None),
            (4, 1, 1, 1, Some(1)),
        ] {
            let qkv = Var::from_tensor(&uniform(1, &[windows, n, 3 * heads * hd], 1.5)?)?;
            let bias = Var::from_tensor(&uniform(2, &[heads, n, n], 1.0)?)?;
            let mask = m.map(|m| mask(3, m, n)).transpose()?;
            let fused =
                windowed_attention(qkv.as_tensor(), heads, bias.as_tensor(), mask.as_ref())?;
            let scale = (hd as f64).powf(-0.5);
            let zeros = Tensor::zeros((1, n, n), DType::F64, &candle_core::Device::Cpu)?;
            let reference = composite(
                qkv.as_tensor(),
                heads,
                scale,
                bias.as_tensor(),
                mask.as_ref().unwrap_or(&zeros),
            )?;
            assert_eq!(fused.dims(), [windows, n, heads * hd]);
            assert!(
                max_diff(&fused, &reference)? < 1e-12,
                "{windows} {n} {heads}"
            );
            let g_fused = weighted_sum(&fused, 4)?.backward()?;
            let g_reference = weighted_sum(&reference, 4)?.backward()?;
            for v in [qkv.as_tensor(), bias.as_tensor()] {
                let (a, b) = (
                    g_fused.get(v).expect("fused gradient"),
                    g_reference.get(v).expect("gradient"),
                );
                assert!(max_diff(a, b)? < 1e-10, "{windows} {n} {heads}");
            }
        }
        Ok(())
    }

    #[test]
    fn gradcheck_qkv_and_bias() -> anyhow::Result<()> {
        let m = mask(7, 2, 4)?;
        check_gradients(
            |v| weighted_sum(&windowed_attention(&v[0], 2, &v[1], Some(&m))?, 8),
            &[uniform(5, &[4, 4, 12], 1.0)?, uniform(6, &[2, 4, 4], 1.0)?],
            GradCheckOptions::default(),
        )?
        .ensure(1e-6)?;
        Ok(())
    }

    #[test]
    fn wrong_shapes_are_errors_that_name_them() -> anyhow::Result<()> {
        let qkv = uniform(1, &[4, 4, 12], 1.0)?;
        let bias = uniform(2, &[2, 4, 4], 1.0)?;
        let err = windowed_attention(&qkv, 5, &bias, None).unwrap_err();
        assert!(err.to_string().contains("3 x 5 heads"), "{err}");
        let err = windowed_attention(&qkv, 2, &uniform(2, &[2, 3, 4], 1.0)?, None).unwrap_err();
        assert!(err.to_string().contains("bias must be [2, 4, 4]"), "{err}");
        let err = windowed_attention(&qkv, 2, &bias, Some(&mask(3, 3, 4)?)).unwrap_err();
        assert!(err.to_string().contains("dividing 4 windows"), "{err}");
        Ok(())
    }
}
