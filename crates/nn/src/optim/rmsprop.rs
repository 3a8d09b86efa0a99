//! RMSprop (`torch.optim.RMSprop`).

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::{
    Optimizer, OptimizerState, check_finite_non_negative, check_vars, deep_copy, gradient,
    load_slots,
};

const SQUARE_AVG: &str = "square_avg";
const GRAD_AVG: &str = "grad_avg";
const MOMENTUM_BUFFER: &str = "momentum_buffer";

/// Hyperparameters of [`RmsProp`]; defaults are PyTorch's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RmsPropConfig {
    /// Learning rate (`1e-2`).
    pub lr: f64,
    /// Smoothing constant of the squared-gradient average (`0.99`).
    pub alpha: f64,
    /// Added to the root mean square (`1e-8`).
    pub eps: f64,
    /// Momentum factor (`0`: no momentum buffer).
    pub momentum: f64,
    /// L2 penalty added to the gradient (`0`).
    pub weight_decay: f64,
    /// Normalise by an estimate of the gradient's variance instead of its second moment.
    pub centered: bool,
}

impl Default for RmsPropConfig {
    fn default() -> Self {
        Self {
            lr: 1e-2,
            alpha: 0.99,
            eps: 1e-8,
            momentum: 0.0,
            weight_decay: 0.0,
            centered: false,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Slots {
    square_avg: Option<Tensor>,
    grad_avg: Option<Tensor>,
    momentum_buffer: Option<Tensor>,
}

/// RMSprop; per step and var with gradient `g` (PyTorch's algorithm, all state starting at 0):
///
/// ```text
/// g += wd * w
/// v = a * v + (1 - a) * g^2
/// centered: ga = a * ga + (1 - a) * g;  d = sqrt(v - ga^2) + eps   else  d = sqrt(v) + eps
/// momentum > 0: buf = mu * buf + g / d;  w -= lr * buf             else  w -= lr * g / d
/// ```
#[derive(Debug)]
pub struct RmsProp {
    vars: Vec<(String, Var)>,
    slots: Vec<Slots>,
    config: RmsPropConfig,
    step: u64,
}

impl RmsProp {
    /// An RMSprop optimizer over `vars`; rejects out-of-range hyperparameters and duplicate names.
    pub fn new(vars: Vec<(String, Var)>, config: RmsPropConfig) -> Result<Self> {
        check_vars("rmsprop", &vars)?;
        check_finite_non_negative("rmsprop", "lr", config.lr)?;
        check_finite_non_negative("rmsprop", "eps", config.eps)?;
        check_finite_non_negative("rmsprop", "momentum", config.momentum)?;
        check_finite_non_negative("rmsprop", "weight_decay", config.weight_decay)?;
        check_finite_non_negative("rmsprop", "alpha", config.alpha)?;
        let slots = vec![Slots::default(); vars.len()];
        Ok(Self {
            vars,
            slots,
            config,
            step: 0,
        })
    }

    /// The hyperparameters (with the current learning rate).
    pub fn config(&self) -> &RmsPropConfig {
        &self.config
    }

    /// The running average of squared gradients of var `name`; `None` before its first step.
    pub fn square_avg(&self, name: &str) -> Option<Tensor> {
        let i = self.vars.iter().position(|(n, _)| n == name)?;
        self.slots[i].square_avg.clone()
    }
}

// PyTorch keeps these buffers from zeros; `b * 0 + x` is `x` exactly, so starting from
// the first increment is bit-identical and skips allocating zeros.
fn decay_add(prev: Option<&Tensor>, decay: f64, increment: Tensor) -> Result<Tensor> {
    match prev {
        Some(p) => p.affine(decay, 0.0)? + increment,
        None => Ok(increment),
    }
}

impl Optimizer for RmsProp {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let c = self.config;
        for (i, (name, var)) in self.vars.iter().enumerate() {
            let Some(mut g) = gradient(grads, name, var)? else {
                continue;
            };
            let w = var.as_tensor().detach();
            if c.weight_decay != 0.0 {
                g = (g + w.affine(c.weight_decay, 0.0)?)?;
            }
            let s = &self.slots[i];
            let square_avg = decay_add(
                s.square_avg.as_ref(),
                c.alpha,
                g.sqr()?.affine(1.0 - c.alpha, 0.0)?,
            )?;
            let (grad_avg, avg) = if c.centered {
                let ga = decay_add(s.grad_avg.as_ref(), c.alpha, g.affine(1.0 - c.alpha, 0.0)?)?;
                let avg = (square_avg.sub(&ga.sqr()?)?.sqrt()? + c.eps)?;
                (Some(ga), avg)
            } else {
                (None, (square_avg.sqrt()? + c.eps)?)
            };
            let scaled = g.div(&avg)?;
            let (momentum_buffer, update) = if c.momentum > 0.0 {
                let buf = decay_add(s.momentum_buffer.as_ref(), c.momentum, scaled)?;
                let update = buf.affine(c.lr, 0.0)?;
                (Some(buf), update)
            } else {
                (None, scaled.affine(c.lr, 0.0)?)
            };
            var.set(&(w - update)?)?;
            self.slots[i] = Slots {
                square_avg: Some(square_avg),
                grad_avg,
                momentum_buffer,
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
        let mut tensors = BTreeMap::new();
        for ((name, _), s) in self.vars.iter().zip(&self.slots) {
            for (slot, t) in [
                (SQUARE_AVG, &s.square_avg),
                (GRAD_AVG, &s.grad_avg),
                (MOMENTUM_BUFFER, &s.momentum_buffer),
            ] {
                if let Some(t) = t {
                    tensors.insert(format!("{name}.{slot}"), deep_copy(t)?);
                }
            }
        }
        Ok(OptimizerState {
            kind: "rmsprop".into(),
            step: self.step,
            lr: self.config.lr,
            tensors,
        })
    }

    fn load_state(&mut self, state: &OptimizerState) -> anyhow::Result<()> {
        let c = self.config;
        let loaded = load_slots(
            "rmsprop",
            state,
            &self.vars,
            &[SQUARE_AVG, GRAD_AVG, MOMENTUM_BUFFER],
        )?;
        let mut slots = Vec::with_capacity(loaded.len());
        for ((name, _), mut s) in self.vars.iter().zip(loaded) {
            let slot = Slots {
                square_avg: s.remove(SQUARE_AVG),
                grad_avg: s.remove(GRAD_AVG),
                momentum_buffer: s.remove(MOMENTUM_BUFFER),
            };
            // A var that stepped has exactly the buffers this configuration creates.
            if slot.square_avg.is_some() {
                if slot.grad_avg.is_some() != c.centered
                    || slot.momentum_buffer.is_some() != (c.momentum > 0.0)
                {
                    anyhow::bail!(
                        "rmsprop state for {name} does not match the configuration \
                         (centered {}, momentum {}): has grad_avg {}, momentum_buffer {}",
                        c.centered,
                        c.momentum,
                        slot.grad_avg.is_some(),
                        slot.momentum_buffer.is_some()
                    );
                }
            } else if slot.grad_avg.is_some() || slot.momentum_buffer.is_some() {
                anyhow::bail!("rmsprop state for {name} has buffers but no {SQUARE_AVG}");
            }
            slots.push(slot);
        }
        self.slots = slots;
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
    fn reference(cfg: RmsPropConfig, steps: usize) -> Vec<f64> {
        let mut w = W0.to_vec();
        let mut v = [0.0; 3];
        let mut ga = [0.0; 3];
        let mut buf = [0.0; 3];
        for _ in 0..steps {
            let g = grad_of(&w);
            for i in 0..3 {
                let gi = g[i] + cfg.weight_decay * w[i];
                v[i] = cfg.alpha * v[i] + (1.0 - cfg.alpha) * gi * gi;
                let denom = if cfg.centered {
                    ga[i] = cfg.alpha * ga[i] + (1.0 - cfg.alpha) * gi;
                    (v[i] - ga[i] * ga[i]).sqrt() + cfg.eps
                } else {
                    v[i].sqrt() + cfg.eps
                };
                if cfg.momentum > 0.0 {
                    buf[i] = cfg.momentum * buf[i] + gi / denom;
                    w[i] -= cfg.lr * buf[i];
                } else {
                    w[i] -= cfg.lr * gi / denom;
                }
            }
        }
        w
    }

    fn run(cfg: RmsPropConfig, steps: usize) -> Vec<f64> {
        let w = var(&W0);
        let mut opt = RmsProp::new(vec![("w".into(), w.clone())], cfg).unwrap();
        for _ in 0..steps {
            opt.step(&grads(&w)).unwrap();
        }
        values(&w)
    }

    #[test]
    fn first_step_by_hand() {
        // v = (1 - a) g^2, so the step is lr * g / (sqrt(1 - a) |g|) = lr / sqrt(0.01) * sign(g).
        let cfg = RmsPropConfig {
            lr: 0.01,
            eps: 0.0,
            ..Default::default()
        };
        assert_close(&run(cfg, 1), &[0.4, -1.1, 1.9], 1e-12);
    }

    #[test]
    fn three_steps_match_hand_computation() {
        let base = RmsPropConfig {
            lr: 0.01,
            alpha: 0.9,
            eps: 1e-3,
            ..Default::default()
        };
        for cfg in [
            base,
            RmsPropConfig {
                momentum: 0.9,
                ..base
            },
            RmsPropConfig {
                centered: true,
                weight_decay: 0.1,
                ..base
            },
            RmsPropConfig {
                centered: true,
                momentum: 0.5,
                ..base
            },
        ] {
            assert_close(&run(cfg, 3), &reference(cfg, 3), 1e-12);
        }
    }

    #[test]
    fn load_state_rejects_buffers_of_another_configuration() {
        let w = var(&W0);
        let mut with_momentum = RmsProp::new(
            vec![("w".into(), w.clone())],
            RmsPropConfig {
                momentum: 0.9,
                ..Default::default()
            },
        )
        .unwrap();
        with_momentum.step(&grads(&w)).unwrap();
        let state = with_momentum.state().unwrap();
        let mut plain = RmsProp::new(vec![("w".into(), w)], RmsPropConfig::default()).unwrap();
        let err = plain.load_state(&state).unwrap_err().to_string();
        assert!(err.contains("momentum_buffer true"), "{err}");
    }
}
