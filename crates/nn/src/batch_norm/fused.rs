//! Training-mode BatchNorm (optionally followed by ReLU) as CPU custom ops: one pass for
//! the statistics, one for the output, two for the whole backward.
//!
//! Composed from candle ops, a BatchNorm forward and backward is about fifteen full passes
//! over the activation, among them strided reductions over `(N, H, W)` that candle runs
//! element by element; on the UNet's 256 px layers that cost more than the convolutions.
//! Here each pass is parallel over channels (statistics, gradient sums) or contiguous
//! `H·W` planes (output, input gradient), with per-channel sums in f64.

use candle_core::{CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use crate::channels::{Planes, lane_sums};
use crate::storage::{Element, Kernel, cast, kernel_cpu_fwd, par_written};

/// Per-channel scale and shift of the normalised, affine output: `y = x·scale + shift`.
fn scale_shift(gamma: f64, beta: f64, mean: f64, var: f64, eps: f64) -> (f64, f64, f64) {
    let inv_std = 1.0 / (var + eps).sqrt();
    let scale = gamma * inv_std;
    (scale, beta - mean * scale, inv_std)
}

/// `x [N, C, H, W] -> [2, C]`: the batch mean and biased variance of each channel (two
/// passes, so no cancellation).
#[derive(Debug, Clone, Copy)]
pub(super) struct ChannelStats;

impl ChannelStats {
    fn stats<T: Float + Send + Sync>(x: &[T], p: Planes) -> Vec<T> {
        let m = p.per_channel() as f64;
        let stats: Vec<(f64, f64)> = (0..p.channels)
            .into_par_iter()
            .map(|c| {
                let mean = p
                    .of_channel(x, c)
                    .map(|plane| lane_sums(plane, plane, |v, _| (v, T::zero())).0)
                    .sum::<f64>()
                    / m;
                let mean_t = cast::<T>(mean);
                // Centred on the f32-rounded mean: the variance is shift-invariant.
                let var = p
                    .of_channel(x, c)
                    .map(|plane| {
                        lane_sums(plane, plane, |v, _| {
                            let d = v - mean_t;
                            (d * d, T::zero())
                        })
                        .0
                    })
                    .sum::<f64>()
                    / m;
                (mean, var)
            })
            .collect();
        stats
            .iter()
            .map(|s| cast(s.0))
            .chain(stats.iter().map(|s| cast(s.1)))
            .collect()
    }
}

impl CustomOp1 for ChannelStats {
    fn name(&self) -> &'static str {
        "genseg-batch-norm-stats"
    }

    kernel_cpu_fwd!(|self, l| Shape::from((2, Planes::of(l)?.channels)));
}

impl Kernel<1> for ChannelStats {
    fn run<T: Element>(&self, [x]: [&[T]; 1], [l]: [&Layout; 1]) -> Result<Vec<T>> {
        Ok(Self::stats(x, Planes::of(l)?))
    }
}

/// `(x [N, C, H, W], affine [2, C] = (gamma, beta), stats [2, C] = (mean, var)) -> y`,
/// `y = (x - mean) / sqrt(var + eps) · gamma + beta`, then ReLU when `relu`.
///
/// Its backward treats `stats` as the batch statistics of `x` (their dependence on `x` is
/// in the input gradient) and returns no gradient for `stats` itself.
#[derive(Debug, Clone, Copy)]
pub(super) struct BatchNormTrain {
    pub eps: f64,
    pub relu: bool,
}

/// Per-channel `(gamma, beta, mean, var)` from `[2, C]` affine and `[2, C]` stats.
fn channel_params<T: Float>(affine: &[T], stats: &[T], c: usize, channels: usize) -> [f64; 4] {
    let f = |v: T| v.to_f64().unwrap_or(f64::NAN);
    [
        f(affine[c]),
        f(affine[channels + c]),
        f(stats[c]),
        f(stats[channels + c]),
    ]
}

impl BatchNormTrain {
    fn forward<T: Float + Send + Sync>(
        &self,
        x: &[T],
        affine: &[T],
        stats: &[T],
        p: Planes,
    ) -> Vec<T> {
        // SAFETY: each chunk is one plane, written element by element below.
        unsafe {
            par_written(x.len(), p.plane, |i, y| {
                let x = &x[i * p.plane..][..y.len()];
                let [gamma, beta, mean, var] =
                    channel_params(affine, stats, i % p.channels, p.channels);
                let (scale, shift, _) = scale_shift(gamma, beta, mean, var, self.eps);
                let (scale, shift) = (cast::<T>(scale), cast::<T>(shift));
                // Two loops, so each vectorises without a branch inside.
                if self.relu {
                    for (y, &x) in y.iter_mut().zip(x) {
                        let v = x * scale + shift;
                        y.write(if v > T::zero() { v } else { T::zero() });
                    }
                } else {
                    for (y, &x) in y.iter_mut().zip(x) {
                        y.write(x * scale + shift);
                    }
                }
            })
        }
    }

    /// `(x, dy, params [4, C] = (gamma, beta, mean, var))` -> `dx` followed by `dgamma [C]`
    /// and `dbeta [C]`, flat.
    fn backward<T: Float + Send + Sync>(
        &self,
        x: &[T],
        dy: &[T],
        params: &[T],
        p: Planes,
    ) -> Vec<T> {
        // One monomorphised copy per case, so that the loops hold no branch on `relu`; with
        // ReLU the gradient passes where the recomputed output is positive (a select, which
        // vectorises; a branch mispredicts on half the elements).
        if self.relu {
            self.backward_gated(x, dy, params, p, |x, dy, scale, shift| {
                if x * scale + shift > T::zero() {
                    dy
                } else {
                    T::zero()
                }
            })
        } else {
            self.backward_gated(x, dy, params, p, |_, dy, _, _| dy)
        }
    }

    /// [`Self::backward`] with the upstream gradient gated by `gated(x, dy, scale, shift)`.
    fn backward_gated<T: Float + Send + Sync>(
        &self,
        x: &[T],
        dy: &[T],
        params: &[T],
        p: Planes,
        gated: impl Fn(T, T, T, T) -> T + Sync,
    ) -> Vec<T> {
        let (affine, stats) = params.split_at(2 * p.channels);
        let m = p.per_channel() as f64;
        // Per channel: sum(dy') and sum(dy' · x_hat).
        let sums: Vec<(f64, f64)> = (0..p.channels)
            .into_par_iter()
            .map(|c| {
                let [gamma, beta, mean, var] = channel_params(affine, stats, c, p.channels);
                let (scale, shift, inv_std) = scale_shift(gamma, beta, mean, var, self.eps);
                let (scale_t, shift_t, mean_t) =
                    (cast::<T>(scale), cast::<T>(shift), cast::<T>(mean));
                let (mut sum_dy, mut sum_dy_xc) = (0.0, 0.0);
                for (xs, dys) in p.of_channel(x, c).zip(p.of_channel(dy, c)) {
                    let (a, b) = lane_sums(xs, dys, |x, dy| {
                        let g = gated(x, dy, scale_t, shift_t);
                        (g, g * (x - mean_t))
                    });
                    sum_dy += a;
                    sum_dy_xc += b;
                }
                (sum_dy, sum_dy_xc * inv_std)
            })
            .collect();
        let dparams: Vec<T> = sums
            .iter()
            .map(|s| cast(s.1))
            .chain(sums.iter().map(|s| cast(s.0)))
            .collect();
        let chunk = p.plane.max(1);
        let planes = x.len() / chunk;
        // SAFETY: chunks below `planes` are the planes of dx, each written element by
        // element; the rest cover `dparams` (2·C values) in order, copied whole.
        unsafe {
            par_written(x.len() + dparams.len(), chunk, |i, dx| {
                if i >= planes {
                    let start = (i - planes) * chunk;
                    for (d, &v) in dx.iter_mut().zip(&dparams[start..]) {
                        d.write(v);
                    }
                    return;
                }
                let (x, dy) = (
                    &x[i * p.plane..][..dx.len()],
                    &dy[i * p.plane..][..dx.len()],
                );
                let c = i % p.channels;
                let [gamma, beta, mean, var] = channel_params(affine, stats, c, p.channels);
                let (scale, shift, inv_std) = scale_shift(gamma, beta, mean, var, self.eps);
                let (sum_dy, sum_dy_xhat) = sums[c];
                // dx = scale·(dy' - sum_dy/M - x_hat·sum_dy_xhat/M) = a·dy' + b·x + d
                let a = scale;
                let b = -a * inv_std * sum_dy_xhat / m;
                let d = -a * sum_dy / m - b * mean;
                let (a, b, d) = (cast::<T>(a), cast::<T>(b), cast::<T>(d));
                let (scale_t, shift_t) = (cast::<T>(scale), cast::<T>(shift));
                for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
                    dx.write(a * gated(x, dy, scale_t, shift_t) + b * x + d);
                }
            })
        }
    }
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "genseg-batch-norm-train"
    }

    kernel_cpu_fwd!(|self, l1, _l2, _l3| l1.shape().clone());

    fn bwd(
        &self,
        x: &Tensor,
        affine: &Tensor,
        stats: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let params = Tensor::cat(&[affine, stats], 0)?;
        let flat = x.apply_op3_no_bwd(&grad.contiguous()?, &params, &BatchNormBackward(*self))?;
        let n = x.elem_count();
        let dx = flat.narrow(0, 0, n)?.reshape(x.shape())?;
        let daffine = flat
            .narrow(0, n, affine.elem_count())?
            .reshape(affine.shape())?;
        Ok((Some(dx), Some(daffine), None))
    }
}

impl Kernel<3> for BatchNormTrain {
    fn run<T: Element>(&self, [x, a, s]: [&[T]; 3], [l, _, _]: [&Layout; 3]) -> Result<Vec<T>> {
        Ok(self.forward(x, a, s, Planes::of(l)?))
    }
}

/// The backward kernel of [`BatchNormTrain`]: `(x, dy, params [4, C])` -> flat
/// `[dx, dgamma, dbeta]`.
#[derive(Debug, Clone, Copy)]
struct BatchNormBackward(BatchNormTrain);

impl CustomOp3 for BatchNormBackward {
    fn name(&self) -> &'static str {
        "genseg-batch-norm-train-backward"
    }

    // Flat `[dx, dgamma, dbeta]`.
    kernel_cpu_fwd!(|self, l1, _l2, _l3| Shape::from(
        l1.shape().elem_count() + 2 * Planes::of(l1)?.channels
    ));
}

impl Kernel<3> for BatchNormBackward {
    fn run<T: Element>(&self, [x, dy, q]: [&[T]; 3], [l, _, _]: [&Layout; 3]) -> Result<Vec<T>> {
        Ok(self.0.backward(x, dy, q, Planes::of(l)?))
    }
}
