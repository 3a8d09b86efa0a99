//! Stochastic gradient descent (`torch.optim.SGD`).

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::{
    Optimizer, OptimizerState, check_finite_non_negative, check_vars, deep_copy, gradient,
    load_slots,
};

const MOMENTUM_BUFFER: &str = "momentum_buffer";

/// Hyperparameters of [`Sgd`]; defaults are PyTorch's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SgdConfig {
    /// Learning rate (`1e-3`).
    pub lr: f64,
    /// Momentum factor (`0`).
    pub momentum: f64,
    /// Dampening of the gradient added to the momentum buffer (`0`).
    pub dampening: f64,
    /// L2 penalty added to the gradient (`0`).
    pub weight_decay: f64,
    /// Nesterov momentum (needs `momentum > 0` and `dampening = 0`).
    pub nesterov: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        }
    }
}

/// SGD; per step and var with gradient `g` (PyTorch's algorithm):
///
/// ```text
/// g += wd * w
/// momentum > 0: buf = g on the var's first step, else buf = mu * buf + (1 - dampening) * g
///               g = nesterov ? g + mu * buf : buf
/// w -= lr * g
/// ```
#[derive(Debug)]
pub struct Sgd {
    vars: Vec<(String, Var)>,
    momentum_buffers: Vec<Option<Tensor>>,
    config: SgdConfig,
    step: u64,
}

impl Sgd {
    /// An SGD optimizer over `vars`; rejects invalid hyperparameters and duplicate names.
    pub fn new(vars: Vec<(String, Var)>, config: SgdConfig) -> Result<Self> {
        check_vars("sgd", &vars)?;
        check_finite_non_negative("sgd", "lr", config.lr)?;
        check_finite_non_negative("sgd", "momentum", config.momentum)?;
        check_finite_non_negative("sgd", "dampening", config.dampening)?;
        check_finite_non_negative("sgd", "weight_decay", config.weight_decay)?;
        if config.nesterov && (config.momentum <= 0.0 || config.dampening != 0.0) {
            candle_core::bail!(
                "sgd: nesterov needs momentum > 0 and dampening = 0, got momentum {} dampening {}",
                config.momentum,
                config.dampening
            );
        }
        let momentum_buffers = vec![None; vars.len()];
        Ok(Self {
            vars,
            momentum_buffers,
            config,
            step: 0,
        })
    }

    /// The hyperparameters (with the current learning rate).
    pub fn config(&self) -> &SgdConfig {
        &self.config
    }
}

impl Optimizer for Sgd {
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
            if c.momentum > 0.0 {
                let buf = match &self.momentum_buffers[i] {
                    None => g.clone(),
                    Some(b) => (b.affine(c.momentum, 0.0)? + g.affine(1.0 - c.dampening, 0.0)?)?,
                };
                g = if c.nesterov {
                    (g + buf.affine(c.momentum, 0.0)?)?
                } else {
                    buf.clone()
                };
                self.momentum_buffers[i] = Some(buf);
            }
            var.set(&(w - g.affine(c.lr, 0.0)?)?)?;
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
        for ((name, _), buf) in self.vars.iter().zip(&self.momentum_buffers) {
            if let Some(buf) = buf {
                tensors.insert(format!("{name}.{MOMENTUM_BUFFER}"), deep_copy(buf)?);
            }
        }
        Ok(OptimizerState {
            kind: "sgd".into(),
            step: self.step,
            lr: self.config.lr,
            tensors,
        })
    }

    fn load_state(&mut self, state: &OptimizerState) -> anyhow::Result<()> {
        let loaded = load_slots("sgd", state, &self.vars, &[MOMENTUM_BUFFER])?;
        self.momentum_buffers = loaded
            .into_iter()
            .map(|mut s| s.remove(MOMENTUM_BUFFER))
            .collect();
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
    fn reference(cfg: SgdConfig, steps: usize) -> Vec<f64> {
        let mut w = W0.to_vec();
        let mut buf: Option<Vec<f64>> = None;
        for _ in 0..steps {
            let g: Vec<f64> = grad_of(&w)
                .iter()
                .zip(&w)
                .map(|(g, w)| g + cfg.weight_decay * w)
                .collect();
            let d = if cfg.momentum > 0.0 {
                let b: Vec<f64> = match &buf {
                    None => g.clone(),
                    Some(b) => b
                        .iter()
                        .zip(&g)
                        .map(|(b, g)| cfg.momentum * b + (1.0 - cfg.dampening) * g)
                        .collect(),
                };
                let d = if cfg.nesterov {
                    g.iter()
                        .zip(&b)
                        .map(|(g, b)| g + cfg.momentum * b)
                        .collect()
                } else {
                    b.clone()
                };
                buf = Some(b);
                d
            } else {
                g
            };
            for i in 0..3 {
                w[i] -= cfg.lr * d[i];
            }
        }
        w
    }

    fn run(cfg: SgdConfig, steps: usize) -> Vec<f64> {
        let w = var(&W0);
        let mut opt = Sgd::new(vec![("w".into(), w.clone())], cfg).unwrap();
        for _ in 0..steps {
            opt.step(&grads(&w)).unwrap();
        }
        values(&w)
    }

    #[test]
    fn plain_sgd_by_hand() {
        // g = c * w + d; w1 = w0 - 0.1 * [0.8, 2.1, 0.3]
        let cfg = SgdConfig {
            lr: 0.1,
            ..Default::default()
        };
        assert_close(&run(cfg, 1), &[0.42, -1.21, 1.97], 1e-12);
        // Second step: g(w1) = [0.72, 2.52, 0.285].
        assert_close(&run(cfg, 2), &[0.348, -1.462, 1.9415], 1e-12);
    }

    #[test]
    fn first_momentum_step_uses_the_gradient_undampened() {
        let cfg = SgdConfig {
            lr: 0.1,
            momentum: 0.9,
            dampening: 0.5,
            ..Default::default()
        };
        assert_close(&run(cfg, 1), &[0.42, -1.21, 1.97], 1e-12);
    }

    #[test]
    fn three_steps_match_hand_computation() {
        let base = SgdConfig {
            lr: 0.1,
            ..Default::default()
        };
        for cfg in [
            SgdConfig {
                momentum: 0.9,
                ..base
            },
            SgdConfig {
                momentum: 0.9,
                dampening: 0.3,
                weight_decay: 0.05,
                ..base
            },
            SgdConfig {
                momentum: 0.8,
                nesterov: true,
                ..base
            },
        ] {
            assert_close(&run(cfg, 3), &reference(cfg, 3), 1e-12);
        }
    }

    #[test]
    fn nesterov_requires_momentum_without_dampening() {
        let vars = || vec![("w".to_string(), var(&W0))];
        let no_momentum = SgdConfig {
            nesterov: true,
            ..Default::default()
        };
        assert!(Sgd::new(vars(), no_momentum).is_err());
        let dampened = SgdConfig {
            nesterov: true,
            momentum: 0.9,
            dampening: 0.1,
            ..Default::default()
        };
        let err = Sgd::new(vars(), dampened).unwrap_err().to_string();
        assert!(err.contains("dampening 0.1"), "{err}");
    }

    #[test]
    fn var_without_gradient_keeps_weights_and_no_buffer() {
        let w = var(&W0);
        let idle = var(&[1.0, 2.0]);
        let mut opt = Sgd::new(
            vec![("w".into(), w.clone()), ("idle".into(), idle.clone())],
            SgdConfig {
                lr: 0.1,
                momentum: 0.9,
                ..Default::default()
            },
        )
        .unwrap();
        opt.step(&grads(&w)).unwrap();
        assert_eq!(values(&idle), [1.0, 2.0]);
        let state = opt.state().unwrap();
        assert_eq!(
            state.tensors.keys().collect::<Vec<_>>(),
            ["w.momentum_buffer"]
        );
    }
}
