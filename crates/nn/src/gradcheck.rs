//! Gradient checking: analytic gradients from `Tensor::backward` against central finite
//! differences, and a guard against parameters that silently receive no gradient.
//!
//! candle does not error when an op on the path to the loss lacks a backward (fused
//! `softmax_last_dim`, `LayerNorm`): the affected variables are simply absent from the
//! `GradStore`, and training quietly stops updating them. Two tools defend against that:
//!
//! * [`check_gradients`] evaluates a scalar function of several inputs in f64, compares the
//!   backward pass with `(f(x + eps) - f(x - eps)) / 2 eps` element by element, and returns a
//!   [`GradCheckReport`]; [`GradCheckReport::ensure`] turns it into a pass/fail with the worst
//!   element named. Every custom op and hand-written backward in the workspace is tested this way.
//! * [`assert_all_params_receive_gradient`] (and [`assert_grad_store_covers_params`] for a
//!   `GradStore` already computed) lists every named variable whose gradient is missing,
//!   all zero or non-finite.
//!
//! Nothing here depends on test-only crates, so other crates' tests use it directly.

use anyhow::{Context, bail, ensure};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use std::fmt;

/// Settings for [`check_gradients`].
#[derive(Clone, Debug)]
pub struct GradCheckOptions {
    /// Central-difference step. 1e-6 balances truncation error (`eps²`) against f64 rounding
    /// (`1e-16 / eps`) for functions of order one.
    pub eps: f64,
    /// Check at most this many elements per input (evenly spaced, always including the first
    /// and last); `None` checks all. Each checked element costs two evaluations of `f`.
    pub max_elements_per_input: Option<usize>,
}

impl Default for GradCheckOptions {
    fn default() -> Self {
        Self {
            eps: 1e-6,
            max_elements_per_input: None,
        }
    }
}

/// The element of one input whose analytic and numerical gradients disagree most.
#[derive(Clone, Debug, PartialEq)]
pub struct WorstElement {
    /// Position in the input's row-major flattening.
    pub flat_index: usize,
    /// Multi-dimensional position in the input.
    pub index: Vec<usize>,
    /// Gradient from `backward` (0 when no gradient was returned).
    pub analytic: f64,
    /// Gradient from central differences.
    pub numerical: f64,
    /// `|analytic - numerical| / (1 + |numerical|)`: an absolute error for small gradients and
    /// a relative one for large gradients; this is what [`GradCheckReport::ensure`] compares.
    pub scaled_error: f64,
}

/// Comparison result for one input of the checked function.
#[derive(Clone, Debug, PartialEq)]
pub struct InputGradCheck {
    /// Position of the input in the slice given to [`check_gradients`].
    pub input: usize,
    /// The input's shape.
    pub shape: Vec<usize>,
    /// Number of elements compared (fewer than the input's size when sampling).
    pub checked_elements: usize,
    /// True when `backward` returned no gradient at all for this input.
    pub gradient_missing: bool,
    /// Largest `|analytic - numerical|`.
    pub max_abs_error: f64,
    /// Largest `|analytic - numerical| / max(|analytic|, |numerical|)` (0 where both are 0).
    pub max_rel_error: f64,
    /// The element with the largest scaled error; `None` for an empty input.
    pub worst: Option<WorstElement>,
}

impl InputGradCheck {
    /// Largest scaled error of this input (NaN counts as infinitely bad).
    pub fn max_scaled_error(&self) -> f64 {
        self.worst
            .as_ref()
            .map_or(0.0, |w| nan_as_inf(w.scaled_error))
    }
}

/// Per-input outcome of [`check_gradients`].
#[derive(Clone, Debug, PartialEq)]
pub struct GradCheckReport {
    /// One entry per input, in input order.
    pub inputs: Vec<InputGradCheck>,
}

impl GradCheckReport {
    /// Errors unless every checked element satisfies
    /// `|analytic - numerical| <= tol * (1 + |numerical|)`; the message names the input,
    /// the worst element's index and both gradient values.
    pub fn ensure(&self, tol: f64) -> anyhow::Result<()> {
        for r in &self.inputs {
            let err = r.max_scaled_error();
            if err <= tol {
                continue;
            }
            let w = r
                .worst
                .as_ref()
                .context("gradcheck: failing input without elements")?;
            let missing = if r.gradient_missing {
                " (backward returned no gradient for this input)"
            } else {
                ""
            };
            bail!(
                "gradient check failed for input {} (shape {:?}){missing}: element {:?} has \
                 analytic {:e} vs numerical {:e}, scaled error {:e} > tolerance {:e}",
                r.input,
                r.shape,
                w.index,
                w.analytic,
                w.numerical,
                w.scaled_error,
                tol
            );
        }
        Ok(())
    }

    /// Panicking form of [`GradCheckReport::ensure`] for tests.
    ///
    /// # Panics
    /// When the check fails, with the message of `ensure`.
    pub fn assert_ok(&self, tol: f64) {
        if let Err(e) = self.ensure(tol) {
            panic!("{e}");
        }
    }
}

impl fmt::Display for GradCheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for r in &self.inputs {
            writeln!(
                f,
                "input {} {:?}: {} elements, max abs {:e}, max rel {:e}, max scaled {:e}{}",
                r.input,
                r.shape,
                r.checked_elements,
                r.max_abs_error,
                r.max_rel_error,
                r.max_scaled_error(),
                if r.gradient_missing {
                    " (no gradient)"
                } else {
                    ""
                }
            )?;
        }
        Ok(())
    }
}

fn nan_as_inf(x: f64) -> f64 {
    if x.is_nan() { f64::INFINITY } else { x }
}

fn scalar_value(t: &Tensor) -> anyhow::Result<f64> {
    ensure!(
        t.elem_count() == 1,
        "gradcheck: the checked function must return a scalar, got shape {:?}",
        t.dims()
    );
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0])
}

/// Evenly spaced element positions, including the first and the last.
fn sample_positions(n: usize, max: Option<usize>) -> Vec<usize> {
    match max {
        Some(m) if m < n && m >= 2 => (0..m).map(|i| i * (n - 1) / (m - 1)).collect(),
        Some(m) if m < n => vec![0; m],
        _ => (0..n).collect(),
    }
}

fn unravel(mut flat: usize, dims: &[usize]) -> Vec<usize> {
    let mut index = vec![0; dims.len()];
    for (slot, &d) in index.iter_mut().zip(dims).rev() {
        *slot = flat % d;
        flat /= d;
    }
    index
}

/// Compares the gradient of the scalar function `f` computed by `backward` with central finite
/// differences, for every element of every input.
///
/// Each input is copied to f64 on its own device; `f` receives these copies (as variables for
/// the analytic pass, as plain tensors for the numerical one) and must return a tensor with a
/// single element. `f` must be deterministic and should be smooth at the inputs (e.g. use
/// inputs without ties for max-like ops, away from kinks by more than `eps`).
pub fn check_gradients<F>(
    f: F,
    inputs: &[Tensor],
    opts: GradCheckOptions,
) -> anyhow::Result<GradCheckReport>
where
    F: Fn(&[Tensor]) -> candle_core::Result<Tensor>,
{
    ensure!(
        opts.eps > 0.0,
        "gradcheck: eps must be positive, got {}",
        opts.eps
    );
    let base: Vec<Tensor> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            t.to_dtype(DType::F64)
                .with_context(|| format!("gradcheck: input {i} to f64"))
        })
        .collect::<anyhow::Result<_>>()?;
    let vars = base
        .iter()
        .map(Var::from_tensor)
        .collect::<candle_core::Result<Vec<_>>>()?;
    let var_tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&var_tensors).context("gradcheck: evaluating f on the inputs")?;
    scalar_value(&out)?;
    let grads = out.backward().context("gradcheck: backward")?;

    let mut inputs_report = Vec::with_capacity(base.len());
    for (i, (x, var)) in base.iter().zip(&vars).enumerate() {
        let values = x.flatten_all()?.to_vec1::<f64>()?;
        let analytic = match grads.get(var.as_tensor()) {
            Some(g) => Some(g.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?),
            None => None,
        };
        if let Some(a) = &analytic {
            ensure!(
                a.len() == values.len(),
                "gradcheck: gradient of input {i} has {} elements, input has {}",
                a.len(),
                values.len()
            );
        }
        let mut report = InputGradCheck {
            input: i,
            shape: x.dims().to_vec(),
            checked_elements: 0,
            gradient_missing: analytic.is_none(),
            max_abs_error: 0.0,
            max_rel_error: 0.0,
            worst: None,
        };
        let mut args = base.clone();
        for k in sample_positions(values.len(), opts.max_elements_per_input) {
            let mut eval_at = |delta: f64| -> anyhow::Result<f64> {
                let mut shifted = values.clone();
                shifted[k] += delta;
                args[i] = Tensor::from_vec(shifted, x.shape(), x.device())?;
                let y = f(&args).with_context(|| {
                    format!("gradcheck: evaluating f with input {i} element {k} shifted")
                })?;
                scalar_value(&y)
            };
            let numerical = (eval_at(opts.eps)? - eval_at(-opts.eps)?) / (2.0 * opts.eps);
            let a = analytic.as_ref().map_or(0.0, |a| a[k]);
            let abs_err = (a - numerical).abs();
            let denom = a.abs().max(numerical.abs());
            let rel_err = if denom > 0.0 { abs_err / denom } else { 0.0 };
            let scaled = abs_err / (1.0 + numerical.abs());
            report.checked_elements += 1;
            report.max_abs_error = report.max_abs_error.max(nan_as_inf(abs_err));
            report.max_rel_error = report.max_rel_error.max(nan_as_inf(rel_err));
            let worse = report
                .worst
                .as_ref()
                .is_none_or(|w| nan_as_inf(scaled) > nan_as_inf(w.scaled_error));
            if worse {
                report.worst = Some(WorstElement {
                    flat_index: k,
                    index: unravel(k, x.dims()),
                    analytic: a,
                    numerical,
                    scaled_error: scaled,
                });
            }
        }
        args[i] = x.clone();
        inputs_report.push(report);
    }
    Ok(GradCheckReport {
        inputs: inputs_report,
    })
}

/// Runs `backward` on `loss` and errors, listing every offender, if any named variable gets
/// no gradient, an all-zero gradient or a non-finite one: the guard against ops that silently
/// drop gradients.
pub fn assert_all_params_receive_gradient(
    loss: &Tensor,
    vars: &[(String, Var)],
) -> anyhow::Result<()> {
    let grads = loss
        .backward()
        .context("assert_all_params_receive_gradient: backward")?;
    assert_grad_store_covers_params(&grads, vars)
}

/// The check of [`assert_all_params_receive_gradient`] on an already computed `GradStore`
/// (e.g. the one a training step is about to apply).
pub fn assert_grad_store_covers_params(
    grads: &GradStore,
    vars: &[(String, Var)],
) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    for (name, var) in vars {
        let Some(g) = grads.get(var.as_tensor()) else {
            problems.push(format!("{name}: no gradient"));
            continue;
        };
        let abs = g.to_dtype(DType::F64)?.abs()?;
        let total = abs.sum_all()?.to_scalar::<f64>()?;
        if !total.is_finite() {
            problems.push(format!(
                "{name}: non-finite gradient (sum of |g| = {total})"
            ));
        } else if abs.max_all()?.to_scalar::<f64>()? == 0.0 {
            problems.push(format!("{name}: gradient is all zero"));
        }
    }
    if !problems.is_empty() {
        bail!(
            "{} of {} parameters receive no usable gradient:\n  {}",
            problems.len(),
            vars.len(),
            problems.join("\n  ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_inputs::uniform;
    use candle_core::{D, Device};

    #[test]
    fn correct_gradients_pass_with_tiny_error() -> anyhow::Result<()> {
        let x = uniform(1, &[2, 3], 1.0)?;
        let w = uniform(2, &[3, 4], 1.0)?;
        let report = check_gradients(
            |v| v[0].matmul(&v[1])?.tanh()?.sqr()?.sum_all(),
            &[x, w],
            GradCheckOptions::default(),
        )?;
        report.ensure(1e-7)?;
        report.assert_ok(1e-7);
        assert_eq!(report.inputs.len(), 2);
        assert_eq!(report.inputs[1].checked_elements, 12);
        assert!(
            report
                .inputs
                .iter()
                .all(|r| !r.gradient_missing && r.max_abs_error < 1e-8)
        );
        assert!(report.to_string().contains("input 1 [3, 4]: 12 elements"));
        Ok(())
    }

    /// A backward that is off by a factor must fail, and the message must locate it.
    #[test]
    fn wrong_backward_is_reported_with_input_and_element() -> anyhow::Result<()> {
        struct WrongSquare;
        impl candle_core::CustomOp1 for WrongSquare {
            fn name(&self) -> &'static str {
                "wrong-square"
            }
            fn cpu_fwd(
                &self,
                s: &candle_core::CpuStorage,
                l: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                let v = s.as_slice::<f64>()?;
                let (a, b) = l.contiguous_offsets().expect("contiguous test input");
                let out = v[a..b].iter().map(|x| x * x).collect();
                Ok((candle_core::CpuStorage::F64(out), l.shape().clone()))
            }
            fn bwd(
                &self,
                arg: &Tensor,
                _res: &Tensor,
                grad: &Tensor,
            ) -> candle_core::Result<Option<Tensor>> {
                // d(x²)/dx is 2x; 3x is deliberately wrong.
                Ok(Some((grad * (arg * 3.0)?)?))
            }
        }
        let ok = uniform(3, &[3], 1.0)?;
        let x = Tensor::new(&[[0.5f64, -1.0], [2.0, 0.0]], &Device::Cpu)?;
        let report = check_gradients(
            |v| v[0].sum_all()? + v[1].apply_op1(WrongSquare)?.sum_all()?,
            &[ok, x],
            GradCheckOptions::default(),
        )?;
        assert!(report.inputs[0].max_abs_error < 1e-8);
        let worst = report.inputs[1].worst.clone().expect("worst element");
        assert_eq!(worst.index, vec![1, 0]); // x = 2: analytic 6 vs numerical 4
        assert!((worst.analytic - 6.0).abs() < 1e-12 && (worst.numerical - 4.0).abs() < 1e-6);
        let err = report.ensure(1e-6).unwrap_err().to_string();
        assert!(err.contains("input 1") && err.contains("[1, 0]"), "{err}");
        Ok(())
    }

    #[test]
    fn missing_gradient_is_flagged_and_fails() -> anyhow::Result<()> {
        let x = uniform(4, &[2, 3], 1.0)?;
        let report = check_gradients(
            |v| crate::ops::test_inputs::weighted_sum(&candle_nn::ops::softmax_last_dim(&v[0])?, 1),
            &[x],
            GradCheckOptions::default(),
        )?;
        assert!(report.inputs[0].gradient_missing);
        let err = report.ensure(1e-3).unwrap_err().to_string();
        assert!(err.contains("no gradient"), "{err}");
        Ok(())
    }

    #[test]
    fn sampling_limits_work_and_non_scalar_output_is_an_error() -> anyhow::Result<()> {
        assert_eq!(sample_positions(10, Some(3)), vec![0, 4, 9]);
        assert_eq!(sample_positions(10, Some(1)), vec![0]);
        assert_eq!(sample_positions(4, Some(9)), vec![0, 1, 2, 3]);
        assert_eq!(unravel(7, &[2, 2, 3]), vec![1, 0, 1]);
        let x = uniform(5, &[50], 1.0)?;
        let opts = GradCheckOptions {
            max_elements_per_input: Some(5),
            ..Default::default()
        };
        let report = check_gradients(|v| v[0].exp()?.sum_all(), std::slice::from_ref(&x), opts)?;
        assert_eq!(report.inputs[0].checked_elements, 5);
        report.ensure(1e-7)?;
        let err = check_gradients(|v| v[0].exp(), &[x], GradCheckOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("scalar") && err.contains("[50]"), "{err}");
        Ok(())
    }

    #[test]
    fn f32_inputs_are_checked_in_f64() -> anyhow::Result<()> {
        let x = uniform(6, &[4], 2.0)?.to_dtype(DType::F32)?;
        let report = check_gradients(
            |v| {
                assert_eq!(v[0].dtype(), DType::F64);
                crate::ops::log_softmax(&v[0], D::Minus1)?
                    .narrow(0, 1, 1)?
                    .sum_all()
            },
            &[x],
            GradCheckOptions::default(),
        )?;
        report.ensure(1e-7)
    }

    #[test]
    fn guard_lists_missing_zero_and_non_finite_gradients() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let used = Var::new(&[1f64, 2.0], &dev)?;
        let unused = Var::new(&[3f64], &dev)?;
        let zeroed = Var::new(&[4f64, 5.0], &dev)?;
        let blown = Var::new(&[0f64], &dev)?;
        let loss = (used.as_tensor().sqr()?.sum_all()?
            + (zeroed.as_tensor() * Tensor::zeros(2, DType::F64, &dev)?)?.sum_all()?
            + blown.as_tensor().sqrt()?.sum_all()?)?;
        let vars = vec![
            ("used".to_string(), used.clone()),
            ("unused".to_string(), unused),
            ("zeroed".to_string(), zeroed),
            ("blown".to_string(), blown),
        ];
        let err = assert_all_params_receive_gradient(&loss, &vars)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("3 of 4"), "{err}");
        assert!(err.contains("unused: no gradient"), "{err}");
        assert!(err.contains("zeroed: gradient is all zero"), "{err}");
        assert!(err.contains("blown: non-finite"), "{err}");
        assert!(!err.contains("\n  used:"), "{err}");
        assert_all_params_receive_gradient(&loss, &vars[..1])?;
        Ok(())
    }
}
