//! Softmax and log-softmax from differentiable primitives.
//!
//! `candle_nn::ops::softmax_last_dim` is a custom op applied without a backward, so a loss
//! built on it leaves its inputs without gradient (and no error). These versions use only
//! `exp`, `log`, `sum` and broadcasting, whose backward candle implements, or (softmax over
//! the last dimension on the CPU) a fused op with its own backward.

use candle_core::shape::Dim;
use candle_core::{D, Result, Tensor};

/// Subtracts the row maximum for overflow safety. The maximum is detached: softmax is
/// shift-invariant, so the true gradient through the shift is zero, and detaching also avoids
/// candle's max backward, which spreads gradient over ties.
fn shifted(x: &Tensor, dim: D) -> Result<Tensor> {
    let max = x.max_keepdim(dim)?.detach();
    x.broadcast_sub(&max)
}

/// Softmax along `dim`: `exp(x_i) / sum_j exp(x_j)`, stable for large logits. Along the
/// last dimension on the CPU it is one fused pass forward and one backward (crate::rows).
pub fn softmax(x: &Tensor, dim: D) -> Result<Tensor> {
    let last = x.rank().checked_sub(1);
    if Some(dim.to_index(x.shape(), "softmax")?) == last && crate::storage::on_cpu_kernels(&[x]) {
        return crate::rows::softmax_rows(x);
    }
    softmax_composite(x, dim)
}

/// [`softmax`] from candle's ops (any device, dtype and dimension).
pub(crate) fn softmax_composite(x: &Tensor, dim: D) -> Result<Tensor> {
    let e = shifted(x, dim)?.exp()?;
    let sum = e.sum_keepdim(dim)?;
    e.broadcast_div(&sum)
}

/// Log-softmax along `dim`: `x_i - log(sum_j exp(x_j))`, computed without forming `log(0)`
/// for very negative logits.
pub fn log_softmax(x: &Tensor, dim: D) -> Result<Tensor> {
    let s = shifted(x, dim)?;
    let log_sum = s.exp()?.sum_keepdim(dim)?.log()?;
    s.broadcast_sub(&log_sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{GradCheckOptions, assert_all_params_receive_gradient, check_gradients};
    use crate::ops::test_inputs::{uniform, weighted_sum};
    use candle_core::{Device, Var};

    #[test]
    fn values_match_hand_computed_and_survive_huge_logits() -> anyhow::Result<()> {
        let x = Tensor::new(&[[1f32, 2.0, 3.0], [1000.0, 1000.0, -1000.0]], &Device::Cpu)?;
        let p = softmax(&x, D::Minus1)?.to_vec2::<f32>()?;
        // e / sum(e) for [1, 2, 3]: [0.09003057, 0.24472847, 0.66524096].
        for (got, want) in p[0]
            .iter()
            .zip([0.090_030_57f32, 0.244_728_47, 0.665_240_96])
        {
            assert!((got - want).abs() < 1e-6, "{p:?}");
        }
        assert_eq!(p[1], vec![0.5, 0.5, 0.0]);
        let lp = log_softmax(&x, D::Minus1)?.to_vec2::<f32>()?;
        assert!((lp[1][0] - (-std::f32::consts::LN_2)).abs() < 1e-6);
        assert!(
            (lp[1][2] + 2000.0 + std::f32::consts::LN_2).abs() < 1e-2,
            "{lp:?}"
        );
        Ok(())
    }

    #[test]
    fn softmax_along_channel_dim_of_nchw() -> anyhow::Result<()> {
        let x = uniform(5, &[2, 3, 2, 2], 3.0)?;
        let sums = softmax(&x, D::Minus(3))?
            .sum(1)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-12), "{sums:?}");
        let lse = log_softmax(&x, D::Minus(3))?.exp()?;
        let p = softmax(&x, D::Minus(3))?;
        let diff = (lse - p)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12);
        Ok(())
    }

    #[test]
    fn gradcheck_softmax_and_log_softmax() -> anyhow::Result<()> {
        let cases: [(u64, &[usize], D); 4] = [
            (1, &[5], D::Minus1),
            (2, &[3, 4], D::Minus1),
            (3, &[2, 3, 2, 3], D::Minus(3)),
            (4, &[1, 1, 3, 5], D::Minus1),
        ];
        for (seed, dims, dim) in cases {
            let x = uniform(seed, dims, 4.0)?;
            check_gradients(
                |v| weighted_sum(&softmax(&v[0], dim)?, seed),
                std::slice::from_ref(&x),
                GradCheckOptions::default(),
            )?
            .ensure(1e-6)?;
            check_gradients(
                |v| weighted_sum(&log_softmax(&v[0], dim)?, seed),
                &[x],
                GradCheckOptions::default(),
            )?
            .ensure(1e-6)?;
        }
        Ok(())
    }

    /// Why this module exists: candle_nn's fused softmax silently drops the gradient.
    #[test]
    fn guard_catches_candle_softmax_last_dim_dropping_the_gradient() -> anyhow::Result<()> {
        let x = Var::from_tensor(&uniform(9, &[2, 4], 1.0)?)?;
        let vars = vec![("logits".to_string(), x.clone())];

        let candle_loss = weighted_sum(&candle_nn::ops::softmax_last_dim(x.as_tensor())?, 1)?;
        let err = assert_all_params_receive_gradient(&candle_loss, &vars)
            .expect_err("candle_nn softmax_last_dim was expected to drop the gradient");
        assert!(err.to_string().contains("logits"), "{err}");

        let our_loss = weighted_sum(&softmax(x.as_tensor(), D::Minus1)?, 1)?;
        assert_all_params_receive_gradient(&our_loss, &vars)?;
        Ok(())
    }
}
