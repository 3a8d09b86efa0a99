//! Numerically stable binary cross-entropy on logits.
//!
//! `candle_nn::loss::binary_cross_entropy_with_logit` computes `log(sigmoid(x))`, which is
//! `-inf` once `sigmoid` rounds to 0 (|x| around 100 in f32). The form used here,
//! `max(x, 0) - x*y + log(1 + exp(-|x|))`, never exponentiates a positive number, so it is
//! finite for any finite logit, and its gradient is exactly `sigmoid(x) - y`.

use candle_core::{Result, Tensor, bail};

/// Per-element binary cross-entropy between `logits` and `targets` (same shape), without
/// reduction: `max(x, 0) - x*y + log(1 + exp(-|x|))`.
///
/// Useful for masked or weighted losses; [`bce_with_logits`] is the usual mean.
pub fn bce_with_logits_per_element(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if logits.shape() != targets.shape() {
        bail!(
            "bce_with_logits: logits shape {:?} != targets shape {:?}",
            logits.dims(),
            targets.dims()
        );
    }
    let targets = targets.to_dtype(logits.dtype())?;
    // candle's backward takes relu'(0) = 1 and abs'(0) = 1, which gives the exact
    // sigmoid(0) - y = 0.5 - y at x = 0 (pinned by a test).
    let log_term = logits.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
    let linear = (logits.relu()? - (logits * &targets)?)?;
    linear + log_term
}

/// Mean binary cross-entropy on logits over all elements (PyTorch's
/// `BCEWithLogitsLoss(reduction="mean")`); the gradient is `(sigmoid(x) - y) / N`.
pub fn bce_with_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    bce_with_logits_per_element(logits, targets)?.mean_all()
}

/// Summed binary cross-entropy on logits (PyTorch's `reduction="sum"`).
pub fn bce_with_logits_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    bce_with_logits_per_element(logits, targets)?.sum_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{GradCheckOptions, check_gradients};
    use crate::ops::test_inputs::uniform;
    use candle_core::{DType, Device};

    fn bce_reference(x: f64, y: f64) -> f64 {
        let p = 1.0 / (1.0 + (-x).exp());
        -(y * p.ln() + (1.0 - y) * (1.0 - p).ln())
    }

    #[test]
    fn matches_textbook_formula_for_moderate_logits() -> anyhow::Result<()> {
        let xs = [-3.0, -0.5, 0.0, 0.7, 4.0];
        let ys = [0.0, 1.0, 0.3, 1.0, 0.0];
        let x = Tensor::new(&xs, &Device::Cpu)?;
        let y = Tensor::new(&ys, &Device::Cpu)?;
        let got = bce_with_logits_per_element(&x, &y)?.to_vec1::<f64>()?;
        for i in 0..xs.len() {
            let want = bce_reference(xs[i], ys[i]);
            assert!(
                (got[i] - want).abs() < 1e-12,
                "x={} y={}: {} vs {want}",
                xs[i],
                ys[i],
                got[i]
            );
        }
        let mean = bce_with_logits(&x, &y)?.to_scalar::<f64>()?;
        let sum = bce_with_logits_sum(&x, &y)?.to_scalar::<f64>()?;
        assert!((mean * 5.0 - sum).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn finite_values_and_gradients_at_extreme_logits_in_f32() -> anyhow::Result<()> {
        let x = candle_core::Var::new(&[-1e4f32, -100.0, 100.0, 1e4], &Device::Cpu)?;
        let y = Tensor::new(&[1f32, 0.0, 0.0, 1.0], &Device::Cpu)?;
        let loss = bce_with_logits_per_element(x.as_tensor(), &y)?;
        // Confident wrong predictions cost |x|, confident right ones cost ~0.
        let values = loss.to_vec1::<f32>()?;
        assert_eq!(values, vec![1e4, 0.0, 100.0, 0.0]);
        let grads = loss.sum_all()?.backward()?;
        let g = grads
            .get(x.as_tensor())
            .expect("gradient")
            .to_vec1::<f32>()?;
        // sigmoid(x) - y, saturated (exp(-100) survives as an f32 subnormal, hence approx).
        for (got, want) in g.iter().zip([-1.0f32, 0.0, 1.0, 0.0]) {
            assert!((got - want).abs() < 1e-6, "{g:?}");
        }
        Ok(())
    }

    /// Why this module exists: candle_nn's version goes through log(sigmoid(x)).
    #[test]
    fn candle_nn_bce_overflows_where_ours_does_not() -> anyhow::Result<()> {
        let x = Tensor::new(&[100f32, -100.0], &Device::Cpu)?;
        let y = Tensor::new(&[0f32, 1.0], &Device::Cpu)?;
        let theirs =
            candle_nn::loss::binary_cross_entropy_with_logit(&x, &y)?.to_scalar::<f32>()?;
        assert!(
            !theirs.is_finite(),
            "candle_nn BCE was expected to overflow, got {theirs}"
        );
        let ours = bce_with_logits(&x, &y)?.to_scalar::<f32>()?;
        assert!((ours - 100.0).abs() < 1e-4, "{ours}");
        Ok(())
    }

    #[test]
    fn gradient_is_sigmoid_minus_target_over_n_including_zero_logit() -> anyhow::Result<()> {
        let xs = [0.0f64, 1.5, -2.0, 0.0];
        let ys = [0.0f64, 1.0, 0.25, 1.0];
        let x = candle_core::Var::new(&xs, &Device::Cpu)?;
        let y = Tensor::new(&ys, &Device::Cpu)?;
        let grads = bce_with_logits(x.as_tensor(), &y)?.backward()?;
        let g = grads
            .get(x.as_tensor())
            .expect("gradient")
            .to_vec1::<f64>()?;
        for i in 0..xs.len() {
            let want = (1.0 / (1.0 + (-xs[i]).exp()) - ys[i]) / xs.len() as f64;
            assert!(
                (g[i] - want).abs() < 1e-12,
                "x={}: {} vs {want}",
                xs[i],
                g[i]
            );
        }
        Ok(())
    }

    #[test]
    fn gradcheck_logits_and_targets() -> anyhow::Result<()> {
        for (seed, dims) in [
            (1u64, vec![7usize]),
            (2, vec![2, 1, 3, 5]),
            (3, vec![1, 3, 4, 4]),
        ] {
            let x = uniform(seed, &dims, 6.0)?;
            let y = (uniform(seed + 100, &dims, 0.5)? + 0.5)?;
            check_gradients(
                |v| bce_with_logits(&v[0], &v[1]),
                &[x.clone(), y.clone()],
                GradCheckOptions::default(),
            )?
            .ensure(1e-6)?;
            check_gradients(
                |v| bce_with_logits_sum(&v[0], &v[1]),
                &[x, y],
                GradCheckOptions::default(),
            )?
            .ensure(1e-6)?;
        }
        Ok(())
    }

    #[test]
    fn integer_targets_are_accepted_and_shape_mismatch_is_an_error() -> anyhow::Result<()> {
        let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?;
        let y = Tensor::ones((2, 3), DType::U8, &Device::Cpu)?;
        let loss = bce_with_logits(&x, &y)?.to_scalar::<f32>()?;
        assert!((loss - std::f32::consts::LN_2).abs() < 1e-6);
        let bad = Tensor::ones((3, 2), DType::F32, &Device::Cpu)?;
        let err = bce_with_logits(&x, &bad).unwrap_err().to_string();
        assert!(err.contains("[2, 3]") && err.contains("[3, 2]"), "{err}");
        Ok(())
    }
}
