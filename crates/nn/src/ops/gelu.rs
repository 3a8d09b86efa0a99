//! GELU (the exact, erf form) with a one-pass backward on the CPU.
//!
//! candle's `gelu_erf` calls libm's scalar `erff` per element and its backward is nine
//! tensor ops over the activation (square, negate, exp, scale, erf, ...); on a transformer's
//! MLP, the widest activation of the network, the two were about a seventh of SwinUnet's
//! training step. Here forward and backward are one pass each, and for f32 `erf` and `exp`
//! are branch-free approximations the compiler vectorises (as PyTorch's own vectorised
//! `erf` is an approximation): the output is within 2e-6 of candle's. f64 uses libm and is
//! bit-identical to candle's. The backward is `dy · (Φ(x) + x · φ(x))`,
//! `Φ(x) = (1 + erf(x/√2)) / 2`, `φ(x) = exp(-x²/2) / √(2π)`.

use candle_core::{CustomOp1, CustomOp2, Layout, Result, Tensor};

use crate::storage::{Element, Kernel, cast, kernel_cpu_fwd, on_cpu_kernels, par_written};

/// Elements per parallel chunk.
const CHUNK: usize = 16 * 1024;

/// `x · Φ(x)` elementwise (PyTorch's `F.gelu`, `approximate='none'`).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if on_cpu_kernels(&[x]) {
        x.contiguous()?.apply_op1(Gelu)
    } else {
        x.gelu_erf()
    }
}

/// `erf(x)` in f32 without a branch or a libm call, so that a loop of it vectorises:
/// Eigen's rational approximation `x·P(x²) / Q(x²)` on `x` clamped to ±4 (beyond which
/// `erf` is ±1 in f32); absolute error below 5e-7 (4 ulp near ±1).
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    const ALPHA: [f32; 7] = [
        -2.726_142_3e-10,
        2.770_681_4e-8,
        -2.101_024e-6,
        -5.692_506_4e-5,
        -7.349_906_3e-4,
        -2.954_6e-3,
        -1.609_603_3e-2,
    ];
    const BETA: [f32; 5] = [
        -1.456_607_2e-5,
        -2.133_740_6e-4,
        -1.682_827e-3,
        -7.373_329e-3,
        -1.426_474e-2,
    ];
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = ALPHA.iter().fold(0.0f32, |p, &a| p * x2 + a) * x;
    let q = BETA.iter().fold(0.0f32, |q, &b| q * x2 + b);
    p / q
}

/// `e^x` in f32 without a branch or a libm call: `x = n·ln2 + r`, `|r| <= ln2/2`, a
/// degree-6 Taylor polynomial of `e^r` scaled by `2^n` through the exponent bits; `x`
/// clamped to [-87, 88] (the normal range); relative error below 3e-7.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer (no `round` call).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ]
    .iter()
    .fold(0.0f32, |p, &c| p * r + c);
    p * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

struct Gelu;

impl Kernel<1> for Gelu {
    fn run<T: Element>(&self, [x]: [&[T]; 1], _: [&Layout; 1]) -> Result<Vec<T>> {
        let (half, frac_1_sqrt_2) = (cast::<T>(0.5), cast::<T>(std::f64::consts::FRAC_1_SQRT_2));
        // SAFETY: each chunk is written element by element.
        Ok(unsafe {
            par_written(x.len(), CHUNK, |i, out| {
                for (o, &v) in out.iter_mut().zip(&x[i * CHUNK..]) {
                    o.write(((v * frac_1_sqrt_2).erf() + T::one()) * half * v);
                }
            })
        })
    }
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "genseg-gelu"
    }

    kernel_cpu_fwd!(|self, l| l.shape().clone());

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            x.apply_op2_no_bwd(&grad.contiguous()?, &GeluBackward)?,
        ))
    }
}

/// `(x, dy) -> dy · (Φ(x) + x · φ(x))`.
struct GeluBackward;

impl Kernel<2> for GeluBackward {
    fn run<T: Element>(&self, [x, dy]: [&[T]; 2], _: [&Layout; 2]) -> Result<Vec<T>> {
        let half = cast::<T>(0.5);
        let frac_1_sqrt_2 = cast::<T>(std::f64::consts::FRAC_1_SQRT_2);
        let frac_1_sqrt_2pi =
            cast::<T>(0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2);
        // SAFETY: each chunk is written element by element.
        Ok(unsafe {
            par_written(x.len(), CHUNK, |i, out| {
                let (x, dy) = (&x[i * CHUNK..], &dy[i * CHUNK..]);
                for ((o, &v), &g) in out.iter_mut().zip(x).zip(dy) {
                    let cdf = ((v * frac_1_sqrt_2).erf() + T::one()) * half;
                    let pdf = (-(v * v) * half).exp_fast() * frac_1_sqrt_2pi;
                    o.write(g * (cdf + v * pdf));
                }
            })
        })
    }
}

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "genseg-gelu-backward"
    }

    kernel_cpu_fwd!(|self, l1, _l2| l1.shape().clone());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{GradCheckOptions, check_gradients};
    use crate::ops::test_inputs::{uniform, weighted_sum};
    use candle_core::{DType, Device, Var};

    fn max_abs(t: Tensor) -> anyhow::Result<f64> {
        Ok(t.abs()?
            .flatten_all()?
            .max(0)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?)
    }

    #[test]
    fn the_f32_approximations_are_within_their_stated_error() {
        let (mut erf_err, mut exp_err) = (0.0f64, 0.0f64);
        for i in -600_000..=600_000 {
            let x = i as f32 * 1e-5;
            erf_err = erf_err.max((erf_f32(x) as f64 - libm_erf(x as f64)).abs());
            let arg = x * 14.5;
            let want = (arg as f64).exp();
            exp_err = exp_err.max(((exp_f32(arg) as f64 - want) / want).abs());
        }
        assert!(erf_err < 5e-7, "erf {erf_err}");
        assert!(exp_err < 3e-7, "exp {exp_err}");
        assert!((erf_f32(-30.0) + 1.0).abs() < 2e-7 && erf_f32(30.0) == -erf_f32(-30.0));
        assert_eq!(exp_f32(-200.0), exp_f32(-87.0));
    }

    fn libm_erf(x: f64) -> f64 {
        candle_core::cpu::erf::erf_f64(x)
    }

    #[test]
    fn values_match_candle_gelu_erf_and_the_gradient_finite_differences() -> anyhow::Result<()> {
        // More than one chunk.
        let x = uniform(1, &[3, 20_000], 6.0)?;
        assert_eq!(
            max_abs((gelu(&x)? - x.gelu_erf()?)?)?,
            0.0,
            "f64 is candle's"
        );
        let x32 = x.to_dtype(DType::F32)?;
        let diff = max_abs((gelu(&x32)? - x32.gelu_erf()?)?)?;
        assert!(diff < 2e-6, "f32 differs from candle's by {diff}");
        check_gradients(
            |v| weighted_sum(&gelu(&v[0])?, 2),
            &[uniform(3, &[4, 9], 4.0)?],
            GradCheckOptions::default(),
        )?
        .ensure(1e-6)?;
        Ok(())
    }

    #[test]
    fn the_f32_gradient_matches_the_f64_one() -> anyhow::Result<()> {
        let x = uniform(4, &[50_000], 6.0)?;
        let grad = |x: &Tensor| -> anyhow::Result<Tensor> {
            let v = Var::from_tensor(x)?;
            let g = weighted_sum(&gelu(v.as_tensor())?, 5)?.backward()?;
            Ok(g.get(v.as_tensor())
                .expect("gradient")
                .to_dtype(DType::F64)?)
        };
        let diff = max_abs((grad(&x.to_dtype(DType::F32)?)? - grad(&x)?)?)?;
        assert!(diff < 2e-6, "{diff}");
        let _ = Device::Cpu;
        Ok(())
    }
}
