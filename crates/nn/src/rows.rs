//! Activations seen as rows of their last dimension (`[.., K]` as `R` rows of `K`): the CPU
//! kernels of a transformer's per-token ops: the bias of a linear layer, LayerNorm and
//! softmax, each forward and backward in one or two parallel passes.
//!
//! Composed from candle ops, each of them is several full passes plus, in the backward, a
//! sum over the leading dimensions (the gradient of a broadcast weight or bias) that candle
//! runs single-threaded with a division per element. On SwinUnet's training step those
//! reductions and the elementwise passes of LayerNorm and softmax cost more than its matrix
//! products. Off the CPU (or for other dtypes) every op here is candle's composition.

use std::mem::MaybeUninit;

use candle_core::{CustomOp1, CustomOp2, CustomOp3, D, Layout, Module, Result, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use crate::channels::lane_sums;
use crate::conv::kernels::{all_threads, matmul, transposed, view};
use crate::storage::{
    Element, Kernel, cast, kernel_cpu_fwd, on_cpu_kernels, par_written, written_by,
};

/// `[.., K]` as `count` contiguous rows of `len`.
#[derive(Debug, Clone, Copy)]
struct Rows {
    count: usize,
    len: usize,
}

impl Rows {
    fn of(layout: &Layout) -> Result<Self> {
        let len = layout.shape().dims().last().copied().unwrap_or(1);
        let total = layout.shape().elem_count();
        Ok(Self {
            count: total.checked_div(len).unwrap_or(0),
            len,
        })
    }

    /// Rows per parallel chunk: about 16 Ki elements, at least one row.
    fn per_chunk(&self) -> usize {
        (16 * 1024 / self.len.max(1)).max(1)
    }
}

/// The sum of the rows of `x` (`r.count` rows of `r.len`): per block of rows (about 16 Ki
/// elements) in parallel, accumulated in f64.
fn row_sums<T: Element>(x: &[T], r: Rows) -> Vec<T> {
    let block = r.per_chunk();
    let partials = (0..r.count.div_ceil(block))
        .into_par_iter()
        .map(|b| {
            let mut sums = vec![0.0f64; r.len];
            let rows = b * block..((b + 1) * block).min(r.count);
            for row in x[rows.start * r.len..rows.end * r.len].chunks(r.len) {
                for (s, &v) in sums.iter_mut().zip(row) {
                    *s += v.to_f64();
                }
            }
            sums
        })
        .collect();
    sum_in_order(partials, r.len)
        .into_iter()
        .map(cast)
        .collect()
}

/// The sum of per-task partial sums (each `len` long), added in the tasks' order: the
/// tasks run in parallel, but the float sum does not depend on how rayon shared them out,
/// and so not on the thread count.
pub(crate) fn sum_in_order(partials: Vec<Vec<f64>>, len: usize) -> Vec<f64> {
    partials
        .into_iter()
        .fold(vec![0.0f64; len], |mut sum, part| {
            for (s, p) in sum.iter_mut().zip(&part) {
                *s += p;
            }
            sum
        })
}

/// Softmax of one row in place: `exp(v - max) / sum`, the sum in f64.
pub(crate) fn softmax_in_place<T: Element>(row: &mut [T]) {
    let max = row.iter().fold(T::neg_infinity(), |m, &v| Float::max(m, v));
    let mut sum = 0.0f64;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += v.to_f64();
    }
    let inv = cast::<T>(1.0 / sum);
    // `Element` has no `MulAssign`.
    #[allow(clippy::assign_op_pattern)]
    for v in row.iter_mut() {
        *v = *v * inv;
    }
}

/// `x + bias`, with `bias [K]` added to every row of `x [.., K]`: a linear layer's bias, or
/// a bias over all trailing dimensions once `x` is reshaped to `[R, K]` (the relative
/// position bias of window attention).
///
/// On the CPU (f32, f64) the bias gradient is a parallel column sum; candle's
/// `broadcast_add` backward reduces over the leading dimensions one element at a time.
pub fn add_row_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let k = x.dim(D::Minus1)?;
    if bias.dims() != [k] {
        candle_core::bail!(
            "add_row_bias: bias must be [{k}] for input {:?}, got shape {:?}",
            x.dims(),
            bias.dims()
        );
    }
    if on_cpu_kernels(&[x, bias]) {
        x.contiguous()?.apply_op2(&bias.contiguous()?, AddRowBias)
    } else {
        x.broadcast_add(bias)
    }
}

struct AddRowBias;

impl Kernel<2> for AddRowBias {
    fn run<T: Element>(&self, [x, bias]: [&[T]; 2], [l, _]: [&Layout; 2]) -> Result<Vec<T>> {
        let r = Rows::of(l)?;
        // SAFETY: each chunk is whole rows, written element by element.
        Ok(unsafe {
            par_written(x.len(), r.per_chunk() * r.len, |i, out| {
                let x = &x[i * r.per_chunk() * r.len..];
                for (out, x) in out.chunks_mut(r.len).zip(x.chunks(r.len)) {
                    for ((o, &v), &b) in out.iter_mut().zip(x).zip(bias) {
                        o.write(v + b);
                    }
                }
            })
        })
    }
}

impl CustomOp2 for AddRowBias {
    fn name(&self) -> &'static str {
        "genseg-add-row-bias"
    }

    kernel_cpu_fwd!(|self, l1, _l2| l1.shape().clone());

    fn bwd(
        &self,
        _x: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let sums = grad.contiguous()?.apply_op1_no_bwd(&RowSum)?;
        Ok((Some(grad.clone()), Some(sums)))
    }
}

/// `x [.., K] -> [K]`: the sum of the rows.
struct RowSum;

impl Kernel<1> for RowSum {
    fn run<T: Element>(&self, [x]: [&[T]; 1], [l]: [&Layout; 1]) -> Result<Vec<T>> {
        Ok(row_sums(x, Rows::of(l)?))
    }
}

impl CustomOp1 for RowSum {
    fn name(&self) -> &'static str {
        "genseg-row-sum"
    }

    kernel_cpu_fwd!(|self, l| Shape::from(Rows::of(l)?.len));
}

/// A fully connected layer `x·Wᵀ + b` over the last dimension, with the bias through
/// [`add_row_bias`]; weight `[out, in]`, bias `[out]` (PyTorch's and candle_nn's names and
/// shapes, so checkpoints load unchanged).
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// The layer of `weight [out, in]` and an optional `bias [out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// The weight, `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, `[out]`, if the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, k) = self.weight.dims2()?;
        if x.rank() == 0 || x.dim(D::Minus1)? != k {
            candle_core::bail!(
                "linear: input {:?} does not end in the weight's {k} input features",
                x.dims()
            );
        }
        let bias = match &self.bias {
            Some(b) => b.clone(),
            None => Tensor::zeros(n, x.dtype(), x.device())?,
        };
        if on_cpu_kernels(&[x, &self.weight, &bias]) {
            // One node in the graph: no reshapes, transposes or bias add whose backward
            // candle runs as a zero fill and an add over the whole activation each.
            return x.contiguous()?.apply_op3(
                &self.weight.contiguous()?,
                &bias.contiguous()?,
                LinearRows,
            );
        }
        let mut out_dims = x.dims().to_vec();
        let rows = x.reshape(((), k))?;
        let y = add_row_bias(&rows.matmul(&self.weight.t()?)?, &bias)?;
        *out_dims.last_mut().expect("rank checked above") = n;
        y.reshape(out_dims)
    }
}

/// `(x [.., K], weight [N, K], bias [N]) -> x·weightᵀ + bias` as one GEMM into rows
/// that start as the bias.
#[derive(Debug, Clone, Copy)]
struct LinearRows;

impl Kernel<3> for LinearRows {
    fn run<T: Element>(&self, [x, w, b]: [&[T]; 3], [l, lw, _]: [&Layout; 3]) -> Result<Vec<T>> {
        let r = Rows::of(l)?;
        let n = lw.dims()[0];
        // SAFETY: each chunk is whole rows, written element by element.
        let mut y = unsafe {
            par_written(r.count * n, r.per_chunk() * n, |_, out| {
                for row in out.chunks_mut(n) {
                    for (o, &b) in row.iter_mut().zip(b) {
                        o.write(b);
                    }
                }
            })
        };
        // SAFETY: `x` is [count, K], `w` [N, K] and `y` [count, N], all live and distinct.
        unsafe {
            matmul(
                (r.count, n, r.len),
                y.as_mut_ptr(),
                n,
                true,
                view(x.as_ptr(), r.len),
                transposed(w.as_ptr(), r.len),
                all_threads(),
            )
        };
        Ok(y)
    }
}

impl CustomOp3 for LinearRows {
    fn name(&self) -> &'static str {
        "genseg-linear"
    }

    kernel_cpu_fwd!(|self, l1, l2, _l3| {
        let mut dims = l1.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = l2.dims()[0];
        }
        Shape::from(dims)
    });

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let flat = x.apply_op3_no_bwd(&grad.contiguous()?, weight, &LinearBackward)?;
        let (nx, nw, nb) = (x.elem_count(), weight.elem_count(), bias.elem_count());
        let dx = flat.narrow(0, 0, nx)?.reshape(x.shape())?;
        let dw = flat.narrow(0, nx, nw)?.reshape(weight.shape())?;
        let db = flat.narrow(0, nx + nw, nb)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// The backward of [`LinearRows`]: `(x [R, K], dy [R, N], weight [N, K])` -> flat
/// `[dx = dy·weight, dweight = dyᵀ·x, dbias = Σ_rows dy]`.
#[derive(Debug, Clone, Copy)]
struct LinearBackward;

impl Kernel<3> for LinearBackward {
    fn run<T: Element>(&self, [x, dy, w]: [&[T]; 3], [l, _, lw]: [&Layout; 3]) -> Result<Vec<T>> {
        let r = Rows::of(l)?;
        let (rows, k, n) = (r.count, r.len, lw.dims()[0]);
        let db = row_sums(
            dy,
            Rows {
                count: rows,
                len: n,
            },
        );
        let (nx, nw) = (rows * k, n * k);
        // SAFETY: the two GEMMs (beta 0) write all of dx and dweight, the copy all of dbias;
        // the views cover x [R, K], dy [R, N] and w [N, K].
        Ok(unsafe {
            written_by(nx + nw + n, |out: *mut T| {
                matmul(
                    (rows, k, n),
                    out,
                    k,
                    false,
                    view(dy.as_ptr(), n),
                    view(w.as_ptr(), k),
                    all_threads(),
                );
                matmul(
                    (n, k, rows),
                    out.add(nx),
                    k,
                    false,
                    transposed(dy.as_ptr(), n),
                    view(x.as_ptr(), k),
                    all_threads(),
                );
                std::ptr::copy_nonoverlapping(db.as_ptr(), out.add(nx + nw), n);
            })
        })
    }
}

impl CustomOp3 for LinearBackward {
    fn name(&self) -> &'static str {
        "genseg-linear-backward"
    }

    kernel_cpu_fwd!(|self, l1, _l2, l3| Shape::from(
        l1.shape().elem_count() + l3.shape().elem_count() + l3.dims()[0]
    ));
}

/// LayerNorm over the last dimension on the CPU kernels: `x [.., K]`, `weight [K]`,
/// `bias [K]` (all f32 or all f64 on the CPU; see [`crate::ops::layer_norm`], which
/// dispatches here).
pub(crate) fn layer_norm_rows(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNormRows { eps },
    )
}

/// `(x [.., K], weight [K], bias [K]) -> (x - mean) / sqrt(var + eps) · weight + bias`, per
/// row, biased variance.
#[derive(Debug, Clone, Copy)]
struct LayerNormRows {
    eps: f64,
}

impl LayerNormRows {
    /// The row's mean and `1 / sqrt(var + eps)` (two passes, so no cancellation).
    fn stats<T: Float>(&self, row: &[T]) -> (T, T) {
        let n = row.len().max(1) as f64;
        let mean = lane_sums(row, row, |v, _| (v, T::zero())).0 / n;
        let mean_t = cast::<T>(mean);
        let var = lane_sums(row, row, |v, _| {
            let d = v - mean_t;
            (d * d, T::zero())
        })
        .0 / n;
        (mean_t, cast(1.0 / (var + self.eps).sqrt()))
    }
}

impl Kernel<3> for LayerNormRows {
    fn run<T: Element>(&self, [x, w, b]: [&[T]; 3], [l, _, _]: [&Layout; 3]) -> Result<Vec<T>> {
        let r = Rows::of(l)?;
        // SAFETY: each chunk is whole rows, written element by element.
        Ok(unsafe {
            par_written(x.len(), r.per_chunk() * r.len, |i, out| {
                let x = &x[i * r.per_chunk() * r.len..];
                for (out, x) in out.chunks_mut(r.len).zip(x.chunks(r.len)) {
                    let (mean, inv_std) = self.stats(x);
                    for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(w).zip(b) {
                        o.write((v - mean) * inv_std * w + b);
                    }
                }
            })
        })
    }
}

impl CustomOp3 for LayerNormRows {
    fn name(&self) -> &'static str {
        "genseg-layer-norm"
    }

    kernel_cpu_fwd!(|self, l1, _l2, _l3| l1.shape().clone());

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let flat = x.apply_op3_no_bwd(&grad.contiguous()?, weight, &LayerNormBackward(*self))?;
        let (n, k) = (x.elem_count(), weight.elem_count());
        let dx = flat.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = flat.narrow(0, n, k)?;
        let db = flat.narrow(0, n + k, k)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// The backward of [`LayerNormRows`]: `(x, dy, weight)` -> flat `[dx, dweight, dbias]`.
#[derive(Debug, Clone, Copy)]
struct LayerNormBackward(LayerNormRows);

impl Kernel<3> for LayerNormBackward {
    fn run<T: Element>(&self, [x, dy, w]: [&[T]; 3], [l, _, _]: [&Layout; 3]) -> Result<Vec<T>> {
        let r = Rows::of(l)?;
        let n = x.len();
        let mut out: Vec<T> = Vec::with_capacity(n + 2 * r.len);
        let (dx, _) = out.spare_capacity_mut().split_at_mut(n);
        let chunk = r.per_chunk() * r.len;
        let k = r.len as f64;
        // Per chunk of rows: dx written, and its partial sums of dy·x_hat and dy.
        let sums = dx
            .par_chunks_mut(chunk.max(1))
            .enumerate()
            .map(|(i, dx)| {
                let mut sums = vec![0.0f64; 2 * r.len];
                let (dw, db) = sums.split_at_mut(r.len);
                let (x, dy) = (&x[i * chunk..], &dy[i * chunk..]);
                for ((dx, x), dy) in dx
                    .chunks_mut(r.len)
                    .zip(x.chunks(r.len))
                    .zip(dy.chunks(r.len))
                {
                    let (mean, inv_std) = self.0.stats(x);
                    // dx = inv_std · (g - mean(g) - x_hat · mean(g · x_hat)), g = dy · w.
                    let (sum_g, sum_g_xhat) = {
                        let (mut s, mut sx) = (0.0f64, 0.0f64);
                        for ((&x, &dy), &w) in x.iter().zip(dy).zip(w) {
                            let g = (dy * w).to_f64();
                            s += g;
                            sx += g * ((x - mean) * inv_std).to_f64();
                        }
                        (s / k, sx / k)
                    };
                    let (mg, mgx) = (cast::<T>(sum_g), cast::<T>(sum_g_xhat));
                    for ((((d, &x), &dy), &w), (dw, db)) in dx
                        .iter_mut()
                        .zip(x)
                        .zip(dy)
                        .zip(w)
                        .zip(dw.iter_mut().zip(db.iter_mut()))
                    {
                        let x_hat = (x - mean) * inv_std;
                        d.write(inv_std * (dy * w - mg - x_hat * mgx));
                        *dw += (dy * x_hat).to_f64();
                        *db += dy.to_f64();
                    }
                }
                sums
            })
            .collect();
        let sums = sum_in_order(sums, 2 * r.len);
        let tail = &mut out.spare_capacity_mut()[n..n + 2 * r.len];
        for (t, &s) in tail.iter_mut().zip(&sums) {
            *t = MaybeUninit::new(cast(s));
        }
        // SAFETY: the chunks wrote all `n` elements of dx, the loop above the `2·K` sums.
        unsafe { out.set_len(n + 2 * r.len) };
        Ok(out)
    }
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "genseg-layer-norm-backward"
    }

    kernel_cpu_fwd!(|self, l1, _l2, _l3| {
        let r = Rows::of(l1)?;
        Shape::from(l1.shape().elem_count() + 2 * r.len)
    });
}

/// Softmax over the last dimension on the CPU kernels (see [`crate::ops::softmax`], which
/// dispatches here).
pub(crate) fn softmax_rows(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(SoftmaxRows)
}

/// `x [.., K] -> exp(x - max) / sum(exp(x - max))` per row.
#[derive(Debug, Clone, Copy)]
struct SoftmaxRows;

impl Kernel<1> for SoftmaxRows {
    fn run<T: Element>(&self, [x]: [&[T]; 1], [l]: [&Layout; 1]) -> Result<Vec<T>> {
        let r = Rows::of(l)?;
        let mut y = x.to_vec();
        y.par_chunks_mut((r.per_chunk() * r.len).max(1))
            .for_each(|rows| rows.chunks_mut(r.len.max(1)).for_each(softmax_in_place));
        Ok(y)
    }
}

impl CustomOp1 for SoftmaxRows {
    fn name(&self) -> &'static str {
        "genseg-softmax"
    }

    kernel_cpu_fwd!(|self, l| l.shape().clone());

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward)?,
        ))
    }
}

/// The backward of [`SoftmaxRows`]: `(y, dy) -> y · (dy - sum(dy · y))` per row.
#[derive(Debug, Clone, Copy)]
struct SoftmaxBackward;

impl Kernel<2> for SoftmaxBackward {
    fn run<T: Element>(&self, [y, dy]: [&[T]; 2], [l, _]: [&Layout; 2]) -> Result<Vec<T>> {
        let r = Rows::of(l)?;
        let chunk = r.per_chunk() * r.len;
        // SAFETY: each chunk is whole rows, written element by element.
        Ok(unsafe {
            par_written(y.len(), chunk, |i, out| {
                let (y, dy) = (&y[i * chunk..], &dy[i * chunk..]);
                for ((out, y), dy) in out
                    .chunks_mut(r.len)
                    .zip(y.chunks(r.len))
                    .zip(dy.chunks(r.len))
                {
                    let dot = cast::<T>(lane_sums(y, dy, |y, dy| (y * dy, T::zero())).0);
                    for ((o, &y), &dy) in out.iter_mut().zip(y).zip(dy) {
                        o.write(y * (dy - dot));
                    }
                }
            })
        })
    }
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "genseg-softmax-backward"
    }

    kernel_cpu_fwd!(|self, l1, _l2| l1.shape().clone());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{GradCheckOptions, check_gradients};
    use crate::ops::test_inputs::{max_diff, uniform, weighted_sum};

    #[test]
    fn row_bias_matches_broadcast_add_and_finite_differences() -> anyhow::Result<()> {
        for (seed, dims) in [vec![2usize, 3, 4], vec![1, 1], vec![7, 5]]
            .into_iter()
            .enumerate()
        {
            let seed = seed as u64;
            let x = uniform(seed, &dims, 1.0)?;
            let bias = uniform(seed + 50, &[*dims.last().unwrap()], 1.0)?;
            let got = add_row_bias(&x, &bias)?;
            assert_eq!(max_diff(&got, &x.broadcast_add(&bias)?)?, 0.0, "{dims:?}");
            check_gradients(
                |v| weighted_sum(&add_row_bias(&v[0], &v[1])?, seed + 9),
                &[x, bias],
                GradCheckOptions::default(),
            )?
            .ensure(1e-6)?;
        }
        let err = add_row_bias(&uniform(0, &[2, 3], 1.0)?, &uniform(1, &[2], 1.0)?).unwrap_err();
        assert!(err.to_string().contains("bias must be [3]"), "{err}");
        Ok(())
    }

    /// Many rows, so that the column sums run over several parallel blocks.
    #[test]
    fn row_bias_gradient_sums_every_block() -> anyhow::Result<()> {
        let x = uniform(3, &[5000, 7], 1.0)?.to_dtype(candle_core::DType::F32)?;
        let bias = candle_core::Var::from_tensor(
            &uniform(4, &[7], 1.0)?.to_dtype(candle_core::DType::F32)?,
        )?;
        let grads = add_row_bias(&x, bias.as_tensor())?.sum_all()?.backward()?;
        let db = grads
            .get(bias.as_tensor())
            .expect("bias gradient")
            .to_vec1::<f32>()?;
        assert!(db.iter().all(|&v| v == 5000.0), "{db:?}");
        Ok(())
    }

    #[test]
    fn linear_equals_candle_nn_linear_with_its_gradients() -> anyhow::Result<()> {
        // 3000 rows: several blocks of the bias gradient's column sums.
        for dims in [vec![2usize, 3, 4], vec![3000, 4]] {
            let x = candle_core::Var::from_tensor(&uniform(1, &dims, 1.0)?)?;
            let w = candle_core::Var::from_tensor(&uniform(2, &[5, 4], 1.0)?)?;
            let b = candle_core::Var::from_tensor(&uniform(3, &[5], 1.0)?)?;
            let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
            for bias in [Some(bt.clone()), None] {
                let ours = Linear::new(wt.clone(), bias.clone()).forward(xt)?;
                let theirs = candle_nn::Linear::new(wt.clone(), bias.clone()).forward(xt)?;
                let mut want = dims.clone();
                *want.last_mut().unwrap() = 5;
                assert_eq!(ours.dims(), want.as_slice());
                assert!(max_diff(&ours, &theirs)? < 1e-12);
                let g_ours = weighted_sum(&ours, 4)?.backward()?;
                let g_theirs = weighted_sum(&theirs, 4)?.backward()?;
                for v in [xt, wt, bt] {
                    match (g_ours.get(v), g_theirs.get(v)) {
                        (Some(a), Some(b)) => assert!(max_diff(a, b)? < 1e-10, "{dims:?}"),
                        (None, None) => {}
                        (a, b) => panic!("{dims:?}: gradient on one side only ({a:?}, {b:?})"),
                    }
                }
            }
        }
        check_gradients(
            |v| {
                weighted_sum(
                    &Linear::new(v[1].clone(), Some(v[2].clone())).forward(&v[0])?,
                    6,
                )
            },
            &[
                uniform(7, &[2, 3, 4], 1.0)?,
                uniform(8, &[5, 4], 1.0)?,
                uniform(9, &[5], 1.0)?,
            ],
            GradCheckOptions::default(),
        )?
        .ensure(1e-6)?;
        let err = Linear::new(uniform(2, &[5, 4], 1.0)?, None)
            .forward(&uniform(1, &[2, 3], 1.0)?)
            .unwrap_err();
        assert!(err.to_string().contains("4 input features"), "{err}");
        Ok(())
    }

    #[test]
    fn fused_layer_norm_and_softmax_equal_the_composite_ones_with_their_gradients()
    -> anyhow::Result<()> {
        // Enough rows for several parallel chunks (K = 96: 170 rows per chunk).
        for dims in [[3usize, 200, 96], [2, 3, 5], [4, 1, 1]] {
            let k = dims[2];
            let x = candle_core::Var::from_tensor(&uniform(5, &dims, 3.0)?)?;
            let w = candle_core::Var::from_tensor(&uniform(6, &[k], 1.0)?)?;
            let b = candle_core::Var::from_tensor(&uniform(7, &[k], 1.0)?)?;
            let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
            let pairs = [
                (
                    layer_norm_rows(xt, wt, bt, 1e-5)?,
                    crate::ops::layer_norm_composite(xt, Some(wt), Some(bt), 1e-5)?,
                ),
                (
                    softmax_rows(xt)?,
                    crate::ops::softmax_composite(xt, D::Minus1)?,
                ),
            ];
            for (fused, composite) in pairs {
                assert!(max_diff(&fused, &composite)? < 1e-12, "{dims:?}");
                let g_fused = weighted_sum(&fused, 8)?.backward()?;
                let g_composite = weighted_sum(&composite, 8)?.backward()?;
                for v in [xt, wt, bt] {
                    match (g_fused.get(v), g_composite.get(v)) {
                        (Some(a), Some(b)) => assert!(max_diff(a, b)? < 1e-10, "{dims:?}"),
                        (None, None) => {}
                        (a, b) => panic!(
                            "{dims:?}: gradient only on one side ({} vs {})",
                            a.is_some(),
                            b.is_some()
                        ),
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn gradcheck_fused_layer_norm_and_softmax() -> anyhow::Result<()> {
        let x = uniform(11, &[3, 6], 2.0)?;
        let w = uniform(12, &[6], 1.0)?;
        let b = uniform(13, &[6], 1.0)?;
        check_gradients(
            |v| weighted_sum(&layer_norm_rows(&v[0], &v[1], &v[2], 1e-5)?, 14),
            &[x.clone(), w, b],
            GradCheckOptions::default(),
        )?
        .ensure(1e-6)?;
        check_gradients(
            |v| weighted_sum(&softmax_rows(&v[0])?, 15),
            &[x],
            GradCheckOptions::default(),
        )?
        .ensure(1e-6)?;
        Ok(())
    }
}
