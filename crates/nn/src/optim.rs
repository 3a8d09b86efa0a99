//! Optimizers with PyTorch semantics and saveable state.
//!
//! Each optimizer steps an explicit, named list of [`Var`]s (typically
//! `ParamStore::trainable_vars_with_prefix("segmenter")`), reading their gradients from a
//! candle [`GradStore`]. As in PyTorch, a var with no gradient in the store is skipped for
//! that step: its weights and its state (including Adam's per-parameter step count, which
//! drives bias correction) are left untouched.
//!
//! - [`Adam`]: `torch.optim.Adam` (coupled L2 weight decay) or `torch.optim.AdamW`
//!   (decoupled) depending on [`AdamConfig::decoupled_weight_decay`].
//! - [`RmsProp`]: `torch.optim.RMSprop`, optionally centered and with momentum.
//! - [`Sgd`]: `torch.optim.SGD` with momentum, dampening and Nesterov.
//!
//! [`Optimizer::state`] captures everything needed to continue bit-exactly as an
//! [`OptimizerState`]: deep-copied state tensors keyed `"<var name>.<slot>"` (for example
//! `seg.conv.weight.exp_avg_sq`), plus kind, step count and learning rate, which
//! [`OptimizerState::save`] puts into the safetensors metadata.

mod adam;
mod adam_kernel;
mod rmsprop;
mod sgd;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use anyhow::Context;
use candle_core::backprop::GradStore;
use candle_core::{Device, Result, Tensor, Var};

pub use adam::{Adam, AdamConfig};
pub use rmsprop::{RmsProp, RmsPropConfig};
pub use sgd::{Sgd, SgdConfig};

use crate::checkpoint::{read_safetensors, write_safetensors};

/// A gradient-based optimizer over a fixed list of named vars.
pub trait Optimizer {
    /// Applies one update to every var that has a gradient in `grads`.
    fn step(&mut self, grads: &GradStore) -> Result<()>;
    /// The current learning rate.
    fn learning_rate(&self) -> f64;
    /// Changes the learning rate (for schedules); state is unaffected.
    fn set_learning_rate(&mut self, lr: f64);
    /// A deep copy of the optimizer's state.
    fn state(&self) -> Result<OptimizerState>;
    /// Restores a state captured by [`Optimizer::state`] from an optimizer of the same kind
    /// over vars of the same names and shapes (the learning rate and step count too).
    fn load_state(&mut self, state: &OptimizerState) -> anyhow::Result<()>;
    /// The vars this optimizer updates, in order.
    fn vars(&self) -> &[(String, Var)];
    /// How many times [`Optimizer::step`] has been called.
    fn step_count(&self) -> u64;
}

/// A saveable snapshot of an optimizer.
#[derive(Debug, Clone)]
pub struct OptimizerState {
    /// Which optimizer wrote it (`"adam"`, `"rmsprop"`, `"sgd"`).
    pub kind: String,
    /// Number of `step` calls made.
    pub step: u64,
    /// Learning rate at the time of the snapshot.
    pub lr: f64,
    /// Per-var state tensors keyed `"<var name>.<slot>"`.
    pub tensors: BTreeMap<String, Tensor>,
}

const META_FORMAT: &str = "format";
const META_FORMAT_VALUE: &str = "genseg-optimizer-state-v1";
const META_KIND: &str = "kind";
const META_STEP: &str = "step";
const META_LR: &str = "lr";

impl OptimizerState {
    /// Writes the state to a safetensors file atomically; kind, step and lr go in the
    /// metadata (`lr` printed with Rust's shortest round-trip formatting, so it reloads exactly).
    pub fn save(&self, path: impl AsRef<Path>) -> anyhow::Result<()> {
        let metadata = HashMap::from([
            (META_FORMAT.to_string(), META_FORMAT_VALUE.to_string()),
            (META_KIND.to_string(), self.kind.clone()),
            (META_STEP.to_string(), self.step.to_string()),
            (META_LR.to_string(), self.lr.to_string()),
        ]);
        write_safetensors(path.as_ref(), &self.tensors, Some(metadata))
    }

    /// Reads a state written by [`OptimizerState::save`] (tensors on the CPU).
    pub fn load(path: impl AsRef<Path>) -> anyhow::Result<Self> {
        let path = path.as_ref();
        let (tensors, metadata) = read_safetensors(path, &Device::Cpu)?;
        let field = |key: &str| {
            metadata.get(key).with_context(|| {
                format!(
                    "{} is not an optimizer state: metadata has no {key:?}",
                    path.display()
                )
            })
        };
        let format = field(META_FORMAT)?;
        if format != META_FORMAT_VALUE {
            anyhow::bail!(
                "{}: unsupported optimizer state format {format:?} (expected {META_FORMAT_VALUE:?})",
                path.display()
            );
        }
        let step = field(META_STEP)?
            .parse()
            .with_context(|| format!("{}: metadata step is not an integer", path.display()))?;
        let lr = field(META_LR)?
            .parse()
            .with_context(|| format!("{}: metadata lr is not a number", path.display()))?;
        Ok(Self {
            kind: field(META_KIND)?.clone(),
            step,
            lr,
            tensors,
        })
    }
}

/// Rejects duplicate names (two slots for one var would corrupt state keys) and
/// non-float vars.
fn check_vars(kind: &str, vars: &[(String, Var)]) -> Result<()> {
    let mut seen = BTreeSet::new();
    for (name, var) in vars {
        if !seen.insert(name.as_str()) {
            candle_core::bail!("{kind}: var {name} is listed twice");
        }
        if !var.dtype().is_float() {
            candle_core::bail!("{kind}: var {name} has non-float dtype {:?}", var.dtype());
        }
    }
    Ok(())
}

fn check_finite_non_negative(kind: &str, what: &str, value: f64) -> Result<()> {
    if !value.is_finite() || value < 0.0 {
        candle_core::bail!("{kind}: {what} must be finite and >= 0, got {value}");
    }
    Ok(())
}

/// The gradient of `var` as a graph-free tensor, or `None` when it has none this step.
fn gradient(grads: &GradStore, name: &str, var: &Var) -> Result<Option<Tensor>> {
    match grads.get(var.as_tensor()) {
        None => Ok(None),
        Some(g) if g.shape() != var.shape() => candle_core::bail!(
            "gradient of {name} has shape {:?}, the var {:?}",
            g.dims(),
            var.dims()
        ),
        Some(g) => Ok(Some(g.detach())),
    }
}

fn deep_copy(t: &Tensor) -> Result<Tensor> {
    t.detach().copy()
}

/// Reads back an [`OptimizerState`]: checks the kind, that every key belongs to a known
/// `(var, slot)` pair and that each tensor has its var's shape, and converts tensors to the
/// var's dtype and device. Returns one map of slot name to tensor per var, in var order.
fn load_slots(
    kind: &str,
    state: &OptimizerState,
    vars: &[(String, Var)],
    slot_names: &[&str],
) -> anyhow::Result<Vec<BTreeMap<String, Tensor>>> {
    if state.kind != kind {
        anyhow::bail!(
            "cannot load a {:?} optimizer state into a {kind:?} optimizer",
            state.kind
        );
    }
    let mut used = BTreeSet::new();
    let mut problems = Vec::new();
    let mut out = Vec::with_capacity(vars.len());
    for (name, var) in vars {
        let mut slots = BTreeMap::new();
        for slot in slot_names {
            let key = format!("{name}.{slot}");
            let Some(t) = state.tensors.get(&key) else {
                continue;
            };
            used.insert(key.clone());
            // The per-var step counter is a one-element integer tensor, not var-shaped.
            let expected = if *slot == adam::STEP_SLOT {
                vec![1]
            } else {
                var.dims().to_vec()
            };
            if t.dims() != expected.as_slice() {
                problems.push(format!(
                    "{key}: shape {:?}, expected {expected:?}",
                    t.dims()
                ));
                continue;
            }
            let dtype = if *slot == adam::STEP_SLOT {
                t.dtype()
            } else {
                var.dtype()
            };
            let t = t
                .to_device(var.device())
                .and_then(|t| t.to_dtype(dtype))
                .and_then(|t| deep_copy(&t))
                .with_context(|| format!("optimizer state tensor {key}"))?;
            slots.insert((*slot).to_string(), t);
        }
        out.push(slots);
    }
    let unexpected: Vec<&String> = state
        .tensors
        .keys()
        .filter(|k| !used.contains(*k))
        .collect();
    if !unexpected.is_empty() {
        problems.push(format!(
            "unexpected tensors (no such var or slot): {}",
            unexpected
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !problems.is_empty() {
        anyhow::bail!(
            "cannot load {kind} optimizer state: {}",
            problems.join("; ")
        );
    }
    Ok(out)
}

#[cfg(test)]
mod test_support {
    //! Shared fixtures: a quadratic loss whose gradient is known in closed form.
    use candle_core::backprop::GradStore;
    use candle_core::{DType, Device, Tensor, Var};

    /// Coefficients `c` of the loss `sum(c * w^2) / 2 + sum(d * w)`, gradient `c * w + d`.
    pub const C: [f64; 3] = [1.0, -2.0, 0.5];
    pub const D: [f64; 3] = [0.3, 0.1, -0.7];
    pub const W0: [f64; 3] = [0.5, -1.0, 2.0];

    pub fn var(values: &[f64]) -> Var {
        Var::from_slice(values, values.len(), &Device::Cpu).unwrap()
    }

    pub fn grad_of(w: &[f64]) -> Vec<f64> {
        w.iter()
            .zip(C)
            .zip(D)
            .map(|((w, c), d)| c * w + d)
            .collect()
    }

    /// Backpropagates the quadratic loss through `w` only (other vars get no gradient).
    pub fn grads(w: &Var) -> GradStore {
        let c = Tensor::new(&C, &Device::Cpu).unwrap();
        let d = Tensor::new(&D, &Device::Cpu).unwrap();
        let loss = ((w.as_tensor().sqr().unwrap() * c).unwrap() * 0.5)
            .unwrap()
            .add(&(w.as_tensor() * d).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        loss.backward().unwrap()
    }

    pub fn values(v: &Var) -> Vec<f64> {
        v.as_tensor()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    pub fn assert_close(got: &[f64], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tol, "element {i}: got {g}, want {w}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    fn run(opt: &mut dyn Optimizer, w: &Var, steps: usize) {
        for _ in 0..steps {
            opt.step(&grads(w)).unwrap();
        }
    }

    /// Save after 3 steps, restore into fresh vars and a fresh optimizer, continue 3 more:
    /// identical bits to 6 uninterrupted steps.
    fn check_resume(make: &dyn Fn(Vec<(String, Var)>) -> Box<dyn Optimizer>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opt.safetensors");

        let w = var(&W0);
        let mut straight = make(vec![("w".into(), w.clone())]);
        run(straight.as_mut(), &w, 6);

        let w1 = var(&W0);
        let mut first = make(vec![("w".into(), w1.clone())]);
        first.set_learning_rate(first.learning_rate());
        run(first.as_mut(), &w1, 3);
        first.state().unwrap().save(&path).unwrap();

        let w2 = var(&values(&w1));
        let mut resumed = make(vec![("w".into(), w2.clone())]);
        resumed
            .load_state(&OptimizerState::load(&path).unwrap())
            .unwrap();
        assert_eq!(resumed.step_count(), 3);
        run(resumed.as_mut(), &w2, 3);
        assert_eq!(values(&w2), values(&w), "resumed run diverged");
        assert_eq!(resumed.step_count(), straight.step_count());
    }

    #[test]
    fn adam_resume_is_bit_identical() {
        check_resume(&|vars| {
            Box::new(
                Adam::new(
                    vars,
                    AdamConfig {
                        lr: 0.05,
                        weight_decay: 0.1,
                        ..Default::default()
                    },
                )
                .unwrap(),
            )
        });
    }

    #[test]
    fn rmsprop_resume_is_bit_identical() {
        check_resume(&|vars| {
            Box::new(
                RmsProp::new(
                    vars,
                    RmsPropConfig {
                        momentum: 0.9,
                        centered: true,
                        ..Default::default()
                    },
                )
                .unwrap(),
            )
        });
    }

    #[test]
    fn sgd_resume_is_bit_identical() {
        check_resume(&|vars| {
            Box::new(
                Sgd::new(
                    vars,
                    SgdConfig {
                        lr: 0.1,
                        momentum: 0.9,
                        nesterov: true,
                        ..Default::default()
                    },
                )
                .unwrap(),
            )
        });
    }

    #[test]
    fn state_is_a_deep_copy_and_metadata_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.safetensors");
        let w = var(&W0);
        let mut opt = Adam::new(
            vec![("w".into(), w.clone())],
            AdamConfig {
                lr: 0.1 + 0.2, // not exactly representable in decimal: tests exact round trip
                ..Default::default()
            },
        )
        .unwrap();
        opt.step(&grads(&w)).unwrap();
        let state = opt.state().unwrap();
        let before: Vec<f64> = state.tensors["w.exp_avg"].to_vec1().unwrap();
        opt.step(&grads(&w)).unwrap();
        assert_eq!(state.tensors["w.exp_avg"].to_vec1::<f64>().unwrap(), before);

        state.save(&path).unwrap();
        let loaded = OptimizerState::load(&path).unwrap();
        assert_eq!(loaded.kind, "adam");
        assert_eq!(loaded.step, 1);
        assert_eq!(loaded.lr, 0.1 + 0.2);
        assert_eq!(
            loaded.tensors.keys().collect::<Vec<_>>(),
            ["w.exp_avg", "w.exp_avg_sq", "w.step"]
        );
    }

    #[test]
    fn load_state_rejects_wrong_kind_shape_and_names() {
        let w = var(&W0);
        let mut adam = Adam::new(vec![("w".into(), w.clone())], AdamConfig::default()).unwrap();
        adam.step(&grads(&w)).unwrap();
        let state = adam.state().unwrap();

        let mut sgd = Sgd::new(vec![("w".into(), w.clone())], SgdConfig::default()).unwrap();
        let err = sgd.load_state(&state).unwrap_err().to_string();
        assert!(err.contains("\"adam\"") && err.contains("\"sgd\""), "{err}");

        let other = var(&[1.0, 2.0]);
        let mut wrong_shape = Adam::new(vec![("w".into(), other)], AdamConfig::default()).unwrap();
        let err = wrong_shape.load_state(&state).unwrap_err().to_string();
        assert!(err.contains("w.exp_avg: shape [3], expected [2]"), "{err}");

        let mut renamed = Adam::new(vec![("v".into(), var(&W0))], AdamConfig::default()).unwrap();
        let err = renamed.load_state(&state).unwrap_err().to_string();
        assert!(
            err.contains("unexpected tensors") && err.contains("w.exp_avg"),
            "{err}"
        );
        assert_eq!(
            renamed.step_count(),
            0,
            "a failed load must not change the optimizer"
        );
    }

    #[test]
    fn load_rejects_files_without_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plain.safetensors");
        write_safetensors(&path, &BTreeMap::new(), None).unwrap();
        let err = OptimizerState::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("plain.safetensors") && err.contains("format"),
            "{err}"
        );
    }

    #[test]
    fn duplicate_and_non_float_vars_are_rejected() {
        let w = var(&W0);
        let err = Sgd::new(
            vec![("w".into(), w.clone()), ("w".into(), w.clone())],
            SgdConfig::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("w is listed twice"), "{err}");
        let ints = Var::from_slice(&[1u32, 2], 2, &Device::Cpu).unwrap();
        assert!(Sgd::new(vec![("i".into(), ints)], SgdConfig::default()).is_err());
    }
}
