//! Adam and AdamW (`torch.optim.Adam` / `torch.optim.AdamW`).

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::adam_kernel;
use super::{
    Optimizer, OptimizerState, check_finite_non_negative, check_vars, deep_copy, gradient,
    load_slots,
};

pub(super) const STEP_SLOT: &str = "step";
const EXP_AVG: &str = "exp_avg";
const EXP_AVG_SQ: &str = "exp_avg_sq";

/// Hyperparameters of [`Adam`]; defaults are PyTorch's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamConfig {
    /// Learning rate (`1e-3`).
    pub lr: f64,
    /// Decay of the first moment (`0.9`).
    pub beta1: f64,
    /// Decay of the second moment (`0.999`).
    pub beta2: f64,
    /// Added to `sqrt(v_hat)` for stability (`1e-8`).
    pub eps: f64,
    /// Weight decay coefficient (`0`).
    pub weight_decay: f64,
    /// `false`: L2 penalty added to the gradient (Adam); `true`: weights shrunk by
    /// `lr * weight_decay` before the update (AdamW).
    pub decoupled_weight_decay: bool,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled_weight_decay: false,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Moments {
    exp_avg: Option<Tensor>,
    exp_avg_sq: Option<Tensor>,
    /// `[2, n]`: `exp_avg` and `exp_avg_sq` flat in one buffer (they are views of it),
    /// which the CPU update changes in place; `None` until that update first runs.
    packed: Option<Tensor>,
    /// Steps this var took: bias correction is per parameter, as in PyTorch.
    steps: u64,
}

/// Adam with bias correction; per step and var with gradient `g` (PyTorch's algorithm):
///
/// ```text
/// AdamW: w -= lr * wd * w          Adam: g += wd * w
/// m = b1 * m + (1 - b1) * g        v = b2 * v + (1 - b2) * g^2
/// w -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
/// ```
#[derive(Debug)]
pub struct Adam {
    vars: Vec<(String, Var)>,
    moments: Vec<Moments>,
    config: AdamConfig,
    step: u64,
}

impl Adam {
    /// An Adam optimizer over `vars`; rejects out-of-range hyperparameters and duplicate names.
    pub fn new(vars: Vec<(String, Var)>, config: AdamConfig) -> Result<Self> {
        check_vars("adam", &vars)?;
        check_finite_non_negative("adam", "lr", config.lr)?;
        check_finite_non_negative("adam", "eps", config.eps)?;
        check_finite_non_negative("adam", "weight_decay", config.weight_decay)?;
        for (what, beta) in [("beta1", config.beta1), ("beta2", config.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                candle_core::bail!("adam: {what} must be in [0, 1), got {beta}");
            }
        }
        let moments = vec![Moments::default(); vars.len()];
        Ok(Self {
            vars,
            moments,
            config,
            step: 0,
        })
    }

    /// The hyperparameters (with the current learning rate).
    pub fn config(&self) -> &AdamConfig {
        &self.config
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.vars.iter().position(|(n, _)| n == name)
    }

    /// A copy of the first moment `m` of var `name`; `None` before its first step. (The
    /// CPU update works in place, so the optimizer's own tensor changes every step.)
    pub fn exp_avg(&self, name: &str) -> Option<Tensor> {
        self.index(name)
            .and_then(|i| self.moments[i].exp_avg.as_ref().map(deep_copy))
            .and_then(Result::ok)
    }

    /// A copy of the second moment `v` of var `name`; `None` before its first step.
    pub fn exp_avg_sq(&self, name: &str) -> Option<Tensor> {
        self.index(name)
            .and_then(|i| self.moments[i].exp_avg_sq.as_ref().map(deep_copy))
            .and_then(Result::ok)
    }

    /// How many steps var `name` has taken (its bias-correction `t`); `None` for an unknown name.
    pub fn param_steps(&self, name: &str) -> Option<u64> {
        self.index(name).map(|i| self.moments[i].steps)
    }

    /// The elementwise denominator `sqrt(v / (1 - b2^t)) + eps` of var `name`'s last
    /// update: the diagonal preconditioner that unrolled (multi-level) updates reuse.
    /// `None` before the var's first step.
    pub fn preconditioner(&self, name: &str) -> Result<Option<Tensor>> {
        let Some(i) = self.index(name) else {
            return Ok(None);
        };
        let m = &self.moments[i];
        match &m.exp_avg_sq {
            Some(v) => Ok(Some(self.denominator(v, m.steps)?)),
            None => Ok(None),
        }
    }

    fn denominator(&self, exp_avg_sq: &Tensor, steps: u64) -> Result<Tensor> {
        let bias_correction2 = 1.0 - self.config.beta2.powf(steps as f64);
        (exp_avg_sq.sqrt()? / bias_correction2.sqrt())? + self.config.eps
    }
}

/// One Adam step of `var` on the CPU with the in-place kernels ([`adam_kernel`]): the
/// same update as the composed path, in two passes over the moments and the weights.
fn fused_step(
    c: &AdamConfig,
    var: &Var,
    g: &Tensor,
    state: &Moments,
    steps: u64,
) -> Result<Moments> {
    let shape = var.shape().clone();
    let n = shape.elem_count();
    let w = var.as_tensor().flatten_all()?;
    let g = g.to_dtype(var.dtype())?.flatten_all()?.contiguous()?;
    let packed = match (&state.packed, &state.exp_avg, &state.exp_avg_sq) {
        (Some(packed), _, _) => packed.clone(),
        (None, Some(m), Some(v)) => Tensor::stack(&[m.flatten_all()?, v.flatten_all()?], 0)?,
        _ => Tensor::zeros((2, n), var.dtype(), var.device())?,
    };
    let moments = adam_kernel::MomentsUpdate {
        beta1: c.beta1,
        beta2: c.beta2,
        l2: if c.decoupled_weight_decay {
            0.0
        } else {
            c.weight_decay
        },
    };
    packed.inplace_op3(&g, &w, &moments)?;
    let weights = adam_kernel::WeightUpdate {
        decay: if c.decoupled_weight_decay {
            1.0 - c.lr * c.weight_decay
        } else {
            1.0
        },
        step_size: c.lr / (1.0 - c.beta1.powf(steps as f64)),
        bias_correction2_sqrt: (1.0 - c.beta2.powf(steps as f64)).sqrt(),
        eps: c.eps,
    };
    w.inplace_op2(&packed, &weights)?;
    Ok(Moments {
        exp_avg: Some(packed.get(0)?.reshape(&shape)?),
        exp_avg_sq: Some(packed.get(1)?.reshape(&shape)?),
        packed: Some(packed),
        steps,
    })
}

impl Optimizer for Adam {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let c = self.config;
        for (i, (name, var)) in self.vars.iter().enumerate() {
            let Some(mut g) = gradient(grads, name, var)? else {
                continue;
            };
            if crate::storage::on_cpu_kernels(&[var.as_tensor()]) {
                let state = &self.moments[i];
                self.moments[i] = fused_step(&c, var, &g, state, state.steps + 1)?;
                continue;
            }
            let mut w = var.as_tensor().detach();
            if c.weight_decay != 0.0 {
                if c.decoupled_weight_decay {
                    w = w.affine(1.0 - c.lr * c.weight_decay, 0.0)?;
                } else {
                    g = (g + w.affine(c.weight_decay, 0.0)?)?;
                }
            }
            let state = &self.moments[i];
            let steps = state.steps + 1;
            let m = match &state.exp_avg {
                Some(m) => (m.affine(c.beta1, 0.0)? + g.affine(1.0 - c.beta1, 0.0)?)?,
                None => g.affine(1.0 - c.beta1, 0.0)?,
            };
            let g2 = g.sqr()?;
            let v = match &state.exp_avg_sq {
                Some(v) => (v.affine(c.beta2, 0.0)? + g2.affine(1.0 - c.beta2, 0.0)?)?,
                None => g2.affine(1.0 - c.beta2, 0.0)?,
            };
            let step_size = c.lr / (1.0 - c.beta1.powf(steps as f64));
            let denom = self.denominator(&v, steps)?;
            let w = (w - (m.div(&denom)? * step_size)?)?;
            var.set(&w)?;
            self.moments[i] = Moments {
                exp_avg: Some(m),
                exp_avg_sq: Some(v),
                packed: None,
                steps,
            };
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.config.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    fn state(&self) -> Result<OptimizerState> {
        let mut tensors = std::collections::BTreeMap::new();
        for ((name, _), m) in self.vars.iter().zip(&self.moments) {
            if let (Some(avg), Some(sq)) = (&m.exp_avg, &m.exp_avg_sq) {
                tensors.insert(format!("{name}.{EXP_AVG}"), deep_copy(avg)?);
                tensors.insert(format!("{name}.{EXP_AVG_SQ}"), deep_copy(sq)?);
                let steps = i64::try_from(m.steps).map_err(|_| {
                    candle_core::Error::Msg(format!("adam: step count of {name} overflows i64"))
                })?;
                tensors.insert(
                    format!("{name}.{STEP_SLOT}"),
                    Tensor::from_vec(vec![steps], 1, &Device::Cpu)?,
                );
            }
        }
        Ok(OptimizerState {
            kind: "adam".into(),
            step: self.step,
            lr: self.config.lr,
            tensors,
        })
    }

    fn load_state(&mut self, state: &OptimizerState) -> anyhow::Result<()> {
        let slots = load_slots("adam", state, &self.vars, &[EXP_AVG, EXP_AVG_SQ, STEP_SLOT])?;
        let mut moments = Vec::with_capacity(slots.len());
        for ((name, _), mut s) in self.vars.iter().zip(slots) {
            let m = match (s.remove(EXP_AVG), s.remove(EXP_AVG_SQ), s.remove(STEP_SLOT)) {
                (None, None, None) => Moments::default(),
                (Some(exp_avg), Some(exp_avg_sq), Some(step)) => {
                    if step.dtype() != DType::I64 {
                        anyhow::bail!(
                            "adam state {name}.{STEP_SLOT}: dtype {:?}, expected I64",
                            step.dtype()
                        );
                    }
                    let steps = step.to_vec1::<i64>()?[0];
                    let steps = u64::try_from(steps).map_err(|_| {
                        anyhow::anyhow!("adam state {name}.{STEP_SLOT}: negative step {steps}")
                    })?;
                    Moments {
                        exp_avg: Some(exp_avg),
                        exp_avg_sq: Some(exp_avg_sq),
                        packed: None,
                        steps,
                    }
                }
                _ => anyhow::bail!(
                    "adam state for {name} is incomplete: need {EXP_AVG}, {EXP_AVG_SQ} and {STEP_SLOT} together"
                ),
            };
            moments.push(m);
        }
        self.moments = moments;
        self.step = state.step;
        self.config.lr = state.lr;
        Ok(())
    }

    fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    fn step_count(&self) -> u64 {
        self.step
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    /// The update rule written out on scalars, independently of the tensor code.
    fn reference(cfg: AdamConfig, steps: usize) -> Vec<f64> {
        let mut w = W0.to_vec();
        let mut m = [0.0; 3];
        let mut v = [0.0; 3];
        for t in 1..=steps {
            let g = grad_of(&w);
            for i in 0..3 {
                let mut gi = g[i];
                if cfg.decoupled_weight_decay {
                    w[i] *= 1.0 - cfg.lr * cfg.weight_decay;
                } else {
                    gi += cfg.weight_decay * w[i];
                }
                m[i] = cfg.beta1 * m[i] + (1.0 - cfg.beta1) * gi;
                v[i] = cfg.beta2 * v[i] + (1.0 - cfg.beta2) * gi * gi;
                let m_hat = m[i] / (1.0 - cfg.beta1.powi(t as i32));
                let v_hat = v[i] / (1.0 - cfg.beta2.powi(t as i32));
                w[i] -= cfg.lr * m_hat / (v_hat.sqrt() + cfg.eps);
            }
        }
        w
    }

    fn run(cfg: AdamConfig, steps: usize) -> (Adam, Var) {
        let w = var(&W0);
        let mut opt = Adam::new(vec![("w".into(), w.clone())], cfg).unwrap();
        for _ in 0..steps {
            opt.step(&grads(&w)).unwrap();
        }
        (opt, w)
    }

    #[test]
    fn first_step_moves_each_weight_by_lr_against_the_gradient_sign() {
        // With bias correction, m_hat = g and v_hat = g^2 at t = 1: the step is lr * g / (|g| + eps).
        let cfg = AdamConfig {
            lr: 0.1,
            eps: 0.0,
            ..Default::default()
        };
        let (_, w) = run(cfg, 1);
        // g = c * w0 + d = [0.8, 2.1, 0.3]
        assert_close(&values(&w), &[0.4, -1.1, 1.9], 1e-12);
    }

    #[test]
    fn three_steps_match_hand_computation() {
        for cfg in [
            AdamConfig {
                lr: 0.05,
                ..Default::default()
            },
            AdamConfig {
                lr: 0.05,
                beta1: 0.8,
                beta2: 0.9,
                eps: 1e-3,
                weight_decay: 0.2,
                decoupled_weight_decay: false,
            },
            AdamConfig {
                lr: 0.05,
                weight_decay: 0.2,
                decoupled_weight_decay: true,
                ..Default::default()
            },
        ] {
            let (opt, w) = run(cfg, 3);
            assert_close(&values(&w), &reference(cfg, 3), 1e-12);
            assert_eq!(opt.step_count(), 3);
            assert_eq!(opt.param_steps("w"), Some(3));
        }
    }

    #[test]
    fn coupled_and_decoupled_weight_decay_differ() {
        let base = AdamConfig {
            lr: 0.05,
            weight_decay: 0.5,
            ..Default::default()
        };
        let (_, adam) = run(base, 3);
        let (_, adamw) = run(
            AdamConfig {
                decoupled_weight_decay: true,
                ..base
            },
            3,
        );
        assert_ne!(values(&adam), values(&adamw));
    }

    #[test]
    fn var_without_gradient_is_skipped_and_bias_correction_is_per_var() {
        let w = var(&W0);
        let late = var(&W0);
        let cfg = AdamConfig {
            lr: 0.1,
            eps: 0.0,
            ..Default::default()
        };
        let mut opt = Adam::new(
            vec![("w".into(), w.clone()), ("late".into(), late.clone())],
            cfg,
        )
        .unwrap();
        opt.step(&grads(&w)).unwrap();
        opt.step(&grads(&w)).unwrap();
        assert_eq!(values(&late), W0.to_vec(), "no gradient, no update");
        assert!(opt.exp_avg("late").is_none());
        assert_eq!(opt.param_steps("late"), Some(0));

        // Its first update uses t = 1 even though the optimizer is at step 3.
        opt.step(&grads(&late)).unwrap();
        assert_close(&values(&late), &[0.4, -1.1, 1.9], 1e-12);
        assert_eq!(opt.param_steps("late"), Some(1));
        assert_eq!(opt.param_steps("w"), Some(2));
    }

    #[test]
    fn moment_accessors_and_preconditioner() {
        let cfg = AdamConfig {
            lr: 0.1,
            beta2: 0.9,
            eps: 0.25,
            ..Default::default()
        };
        let (opt, _) = run(cfg, 1);
        let g = grad_of(&W0);
        let m: Vec<f64> = opt.exp_avg("w").unwrap().to_vec1().unwrap();
        let v: Vec<f64> = opt.exp_avg_sq("w").unwrap().to_vec1().unwrap();
        let p: Vec<f64> = opt.preconditioner("w").unwrap().unwrap().to_vec1().unwrap();
        let want_m: Vec<f64> = g.iter().map(|g| 0.1 * g).collect();
        let want_v: Vec<f64> = g.iter().map(|g| 0.1 * g * g).collect();
        let want_p: Vec<f64> = g.iter().map(|g| g.abs() + 0.25).collect();
        assert_close(&m, &want_m, 1e-14);
        assert_close(&v, &want_v, 1e-14);
        assert_close(&p, &want_p, 1e-12);
        assert!(opt.exp_avg("nope").is_none());
        assert!(opt.preconditioner("nope").unwrap().is_none());
    }

    #[test]
    fn f32_matches_f64() {
        let run_in = |dtype: DType| {
            let w = Var::from_tensor(
                &Tensor::new(&W0, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let mut opt = Adam::new(
                vec![("w".into(), w.clone())],
                AdamConfig {
                    lr: 0.05,
                    ..Default::default()
                },
            )
            .unwrap();
            for _ in 0..3 {
                let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap();
                opt.step(&loss.backward().unwrap()).unwrap();
            }
            assert_eq!(w.dtype(), dtype);
            values(&w)
        };
        let single = run_in(DType::F32);
        let double = run_in(DType::F64);
        assert_ne!(double, W0.to_vec());
        assert_close(&single, &double, 1e-6);
    }

    #[test]
    fn invalid_config_is_rejected() {
        let bad = [
            AdamConfig {
                beta1: 1.0,
                ..Default::default()
            },
            AdamConfig {
                lr: -1.0,
                ..Default::default()
            },
            AdamConfig {
                eps: f64::NAN,
                ..Default::default()
            },
        ];
        for cfg in bad {
            assert!(
                Adam::new(vec![("w".into(), var(&W0))], cfg).is_err(),
                "{cfg:?}"
            );
        }
    }
}
