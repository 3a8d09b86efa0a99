//! `[N, C, H, W]` activations seen per channel: the plane layout and lane sums the CPU
//! kernels share (BatchNorm, the convolutions' bias), and the per-channel bias op.

use candle_core::{CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use crate::storage::{Element, Kernel, cast, kernel_cpu_fwd, on_cpu_kernels, par_written};

/// `[N, C, H, W]` seen as `N·C` contiguous planes of `H·W`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Planes {
    pub channels: usize,
    pub plane: usize,
    pub count: usize,
}

impl Planes {
    pub fn of(layout: &Layout) -> Result<Self> {
        let (n, c, h, w) = layout.shape().dims4()?;
        Ok(Self {
            channels: c,
            plane: h * w,
            count: n * c,
        })
    }

    /// Values per channel (`N·H·W`).
    pub fn per_channel(&self) -> usize {
        self.count / self.channels * self.plane
    }

    /// The planes of channel `c`.
    pub fn of_channel<'a, T>(&self, data: &'a [T], c: usize) -> impl Iterator<Item = &'a [T]> {
        (c..self.count)
            .step_by(self.channels)
            .map(move |i| &data[i * self.plane..(i + 1) * self.plane])
    }
}

/// Lanes of the per-plane partial sums: independent accumulators the compiler keeps in
/// vector registers (a single running sum is a serial chain of scalar adds).
const LANES: usize = 16;

/// `(Σ f(a_i, b_i).0, Σ f(a_i, b_i).1)` over two equal-length slices, summed in [`LANES`]
/// lanes of `T`, returned in f64.
#[inline]
pub(crate) fn lane_sums<T: Float>(a: &[T], b: &[T], f: impl Fn(T, T) -> (T, T)) -> (f64, f64) {
    let (mut s0, mut s1) = ([T::zero(); LANES], [T::zero(); LANES]);
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (ca, cb) in ca.zip(cb) {
        for l in 0..LANES {
            let (u, v) = f(ca[l], cb[l]);
            s0[l] = s0[l] + u;
            s1[l] = s1[l] + v;
        }
    }
    for (l, (&x, &y)) in ra.iter().zip(rb).enumerate() {
        let (u, v) = f(x, y);
        s0[l] = s0[l] + u;
        s1[l] = s1[l] + v;
    }
    let total = |s: [T; LANES]| {
        s.iter()
            .map(|v| v.to_f64().unwrap_or(f64::NAN))
            .sum::<f64>()
    };
    (total(s0), total(s1))
}

/// `y + bias`, with `bias [C]` added to every plane of its channel of `y [N, C, H, W]`.
///
/// On the CPU (f32, f64) the bias gradient is a per-channel lane sum; candle's
/// `broadcast_add` backward sums over `(N, H, W)` with a strided reduction that visits
/// elements one by one (about 5% of a small UNet's training step). Elsewhere it is
/// candle's `broadcast_add`.
pub fn add_channel_bias(y: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (_, c, _, _) = y.dims4()?;
    if bias.dims() != [c] {
        candle_core::bail!(
            "add_channel_bias: bias must be [{c}] for input {:?}, got shape {:?}",
            y.dims(),
            bias.dims()
        );
    }
    if on_cpu_kernels(&[y, bias]) {
        y.contiguous()?
            .apply_op2(&bias.contiguous()?, AddChannelBias)
    } else {
        y.broadcast_add(&bias.reshape((1, c, 1, 1))?)
    }
}

struct AddChannelBias;

impl Kernel<2> for AddChannelBias {
    fn run<T: Element>(&self, [y, bias]: [&[T]; 2], [l, _]: [&Layout; 2]) -> Result<Vec<T>> {
        let p = Planes::of(l)?;
        // SAFETY: each chunk is one plane, written element by element.
        Ok(unsafe {
            par_written(y.len(), p.plane, |i, out| {
                let b = bias[i % p.channels];
                for (o, &v) in out.iter_mut().zip(&y[i * p.plane..]) {
                    o.write(v + b);
                }
            })
        })
    }
}

impl CustomOp2 for AddChannelBias {
    fn name(&self) -> &'static str {
        "genseg-add-channel-bias"
    }

    kernel_cpu_fwd!(|self, l1, _l2| l1.shape().clone());

    fn bwd(
        &self,
        _y: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let sums = grad.contiguous()?.apply_op1_no_bwd(&ChannelSums)?;
        Ok((Some(grad.clone()), Some(sums)))
    }
}

/// `x [N, C, H, W] -> [C]`: the sum of each channel.
struct ChannelSums;

impl Kernel<1> for ChannelSums {
    fn run<T: Element>(&self, [x]: [&[T]; 1], [l]: [&Layout; 1]) -> Result<Vec<T>> {
        let p = Planes::of(l)?;
        Ok((0..p.channels)
            .into_par_iter()
            .map(|c| {
                let sum: f64 = p
                    .of_channel(x, c)
                    .map(|plane| lane_sums(plane, plane, |v, _| (v, T::zero())).0)
                    .sum();
                cast(sum)
            })
            .collect())
    }
}

impl CustomOp1 for ChannelSums {
    fn name(&self) -> &'static str {
        "genseg-channel-sums"
    }

    kernel_cpu_fwd!(|self, l| Shape::from(Planes::of(l)?.channels));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{GradCheckOptions, check_gradients};
    use crate::ops::test_inputs::{uniform, weighted_sum};

    #[test]
    fn channel_bias_matches_broadcast_add_and_finite_differences() -> anyhow::Result<()> {
        for (seed, dims) in [[2usize, 3, 4, 5], [1, 1, 1, 1], [3, 2, 7, 1]]
            .into_iter()
            .enumerate()
        {
            let seed = seed as u64;
            let y = uniform(seed, &dims, 1.0)?;
            let bias = uniform(seed + 50, &[dims[1]], 1.0)?;
            let want = y.broadcast_add(&bias.reshape((1, dims[1], 1, 1))?)?;
            let got = add_channel_bias(&y, &bias)?;
            let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff == 0.0, "{dims:?}: differs by {diff}");
            check_gradients(
                |v| weighted_sum(&add_channel_bias(&v[0], &v[1])?, seed + 9),
                &[y, bias],
                GradCheckOptions::default(),
            )?
            .ensure(1e-6)?;
        }
        Ok(())
    }

    #[test]
    fn channel_bias_of_the_wrong_size_is_an_error() -> anyhow::Result<()> {
        let y = uniform(0, &[1, 3, 2, 2], 1.0)?;
        let err = add_channel_bias(&y, &uniform(1, &[2], 1.0)?).unwrap_err();
        assert!(err.to_string().contains("bias must be [3]"), "{err}");
        Ok(())
    }
}
