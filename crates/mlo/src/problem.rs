//! One level of a multi-level optimization: its vars, its optimizer and its loss.
//!
//! A [`Problem`] knows nothing about data: its loss is a closure over "the current state",
//! which reads whatever vars it needs (its own and those of the levels it depends on)
//! straight from the shared [`Var`]s. Perturbing or stepping a var is therefore seen by
//! every closure that reads it, which is what the hypergradient relies on.

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};
use genseg_nn::optim::{Adam, Optimizer};

/// The loss of a level, evaluated at the current values of all vars; must be a scalar.
pub type LossFn = Box<dyn FnMut() -> Result<Tensor>>;

/// The optimizer of a level; Adam is kept concrete so its state can precondition hypergradients.
enum LevelOptimizer {
    Adam(Adam),
    Other(Box<dyn Optimizer>),
}

impl LevelOptimizer {
    fn as_dyn(&self) -> &dyn Optimizer {
        match self {
            Self::Adam(a) => a,
            Self::Other(o) => o.as_ref(),
        }
    }

    fn as_dyn_mut(&mut self) -> &mut dyn Optimizer {
        match self {
            Self::Adam(a) => a,
            Self::Other(o) => o.as_mut(),
        }
    }
}

/// One level: named vars it optimizes, their optimizer, its loss and the extra state
/// (e.g. BatchNorm running statistics) that evaluating the loss mutates.
pub struct Problem {
    name: String,
    vars: Vec<(String, Var)>,
    optimizer: LevelOptimizer,
    loss: LossFn,
    buffers: Vec<(String, Var)>,
}

impl std::fmt::Debug for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Problem")
            .field("name", &self.name)
            .field(
                "vars",
                &self.vars.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field(
                "buffers",
                &self.buffers.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Problem {
    /// A level optimized by any optimizer (no hypergradient preconditioning).
    pub fn new(
        name: impl Into<String>,
        vars: Vec<(String, Var)>,
        optimizer: Box<dyn Optimizer>,
        loss: LossFn,
    ) -> Self {
        Self {
            name: name.into(),
            vars,
            optimizer: LevelOptimizer::Other(optimizer),
            loss,
            buffers: Vec::new(),
        }
    }

    /// A level optimized by Adam, whose state can precondition hypergradient vectors
    /// (Betty's "adam"-named rule, [`Problem::precondition`]).
    pub fn with_adam(
        name: impl Into<String>,
        vars: Vec<(String, Var)>,
        adam: Adam,
        loss: LossFn,
    ) -> Self {
        Self {
            name: name.into(),
            vars,
            optimizer: LevelOptimizer::Adam(adam),
            loss,
            buffers: Vec::new(),
        }
    }

    /// Registers state that evaluating the loss mutates (BatchNorm running statistics);
    /// hypergradient hops through this level restore it bit-exactly.
    pub fn with_buffers(mut self, buffers: Vec<(String, Var)>) -> Self {
        self.buffers.extend(buffers);
        self
    }

    /// The level's name (used in error messages).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The vars this level optimizes.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// The registered extra state.
    pub fn buffers(&self) -> &[(String, Var)] {
        &self.buffers
    }

    /// The level's optimizer.
    pub fn optimizer(&self) -> &dyn Optimizer {
        self.optimizer.as_dyn()
    }

    /// The level's optimizer, mutably (learning-rate schedules, state loading).
    pub fn optimizer_mut(&mut self) -> &mut dyn Optimizer {
        self.optimizer.as_dyn_mut()
    }

    /// The level's Adam optimizer, when it has one.
    pub fn adam(&self) -> Option<&Adam> {
        match &self.optimizer {
            LevelOptimizer::Adam(a) => Some(a),
            LevelOptimizer::Other(_) => None,
        }
    }

    /// Evaluates the loss at the current state; errors unless it is a single element.
    pub fn loss(&mut self) -> Result<Tensor> {
        let loss = (self.loss)()?;
        if loss.elem_count() != 1 {
            candle_core::bail!(
                "problem {}: the loss must be a scalar, got shape {:?}",
                self.name,
                loss.dims()
            );
        }
        Ok(loss)
    }

    /// One first-order optimizer step on the loss; returns the loss before the step.
    pub fn step(&mut self) -> Result<f64> {
        let loss = self.loss()?;
        let grads = loss.backward()?;
        self.optimizer.as_dyn_mut().step(&grads)?;
        scalar_value(&loss)
    }

    /// Gradients of the loss w.r.t. `wrt` (zeros for vars the loss does not reach),
    /// together with the loss value.
    pub fn gradient(&mut self, wrt: &[(String, Var)]) -> Result<(f64, Vec<Tensor>)> {
        let loss = self.loss()?;
        let grads = loss.backward()?;
        Ok((scalar_value(&loss)?, collect_grads(&grads, wrt)?))
    }

    /// Betty's preconditioning of a vector over this level's vars (spec §1.5 step 2): with
    /// Adam, each tensor is divided by `(sqrt(mean(beta2 * exp_avg_sq)) + eps) /
    /// sqrt(1 - beta2^t)`, `t` that var's step count; tensors of vars that have not
    /// stepped yet (where Betty 0.2.0 divides by `eps / 0` and so zeroes them), and every
    /// tensor under another optimizer, are returned unchanged.
    pub fn precondition(&self, v: &[Tensor]) -> Result<Vec<Tensor>> {
        check_matches(&self.name, &self.vars, v)?;
        let Some(adam) = self.adam() else {
            return Ok(v.to_vec());
        };
        let c = adam.config();
        self.vars
            .iter()
            .zip(v)
            .map(|((name, _), v)| {
                let (Some(sq), Some(steps)) = (adam.exp_avg_sq(name), adam.param_steps(name))
                else {
                    return Ok(v.clone());
                };
                if steps == 0 {
                    return Ok(v.clone());
                }
                let mean = sq.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?;
                let d =
                    ((c.beta2 * mean).sqrt() + c.eps) / (1.0 - c.beta2.powf(steps as f64)).sqrt();
                v.affine(1.0 / d, 0.0)
            })
            .collect()
    }
}

/// The value of a single-element tensor as f64.
pub(crate) fn scalar_value(t: &Tensor) -> Result<f64> {
    t.flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?
        .first()
        .copied()
        .ok_or_else(|| {
            candle_core::Error::Msg(format!("expected a scalar, got shape {:?}", t.dims()))
        })
}

/// The gradient of each var of `wrt` in `grads`, zeros where the loss does not reach it.
pub(crate) fn collect_grads(grads: &GradStore, wrt: &[(String, Var)]) -> Result<Vec<Tensor>> {
    wrt.iter()
        .map(|(name, var)| match grads.get(var.as_tensor()) {
            Some(g) if g.shape() != var.shape() => candle_core::bail!(
                "gradient of {name} has shape {:?}, the var {:?}",
                g.dims(),
                var.dims()
            ),
            Some(g) => Ok(g.detach()),
            None => var.as_tensor().zeros_like(),
        })
        .collect()
}

/// Errors unless `v` has one tensor per var with the var's shape.
pub(crate) fn check_matches(what: &str, vars: &[(String, Var)], v: &[Tensor]) -> Result<()> {
    if vars.len() != v.len() {
        candle_core::bail!(
            "{what}: expected {} tensors (one per var), got {}",
            vars.len(),
            v.len()
        );
    }
    for ((name, var), t) in vars.iter().zip(v) {
        if var.shape() != t.shape() {
            candle_core::bail!(
                "{what}: tensor for var {name} has shape {:?}, the var {:?}",
                t.dims(),
                var.dims()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use genseg_nn::optim::{AdamConfig, Sgd, SgdConfig};

    fn named(name: &str, values: &[f64]) -> Result<(String, Var)> {
        Ok((
            name.to_string(),
            Var::from_slice(values, values.len(), &Device::Cpu)?,
        ))
    }

    #[test]
    fn preconditioning_matches_hand_computation() -> Result<()> {
        let (beta2, eps) = (0.99, 1e-8);
        let w = named("w", &[0.5, -1.0, 2.0])?;
        let cfg = AdamConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2,
            eps,
            ..AdamConfig::default()
        };
        let mut adam = Adam::new(vec![w.clone()], cfg)?;
        let g1 = [1.0, -2.0, 0.5];
        let g2 = [0.3, 0.1, -0.7];
        for g in [g1, g2] {
            let mut store = GradStore::default();
            store.insert(w.1.as_tensor(), Tensor::new(&g, &Device::Cpu)?);
            adam.step(&store)?;
        }
        let loss: LossFn = Box::new(|| Tensor::new(0.0f64, &Device::Cpu));
        let problem = Problem::with_adam("lower", vec![w], adam, loss);
        let v = [Tensor::new(&[2.0f64, -4.0, 1.0], &Device::Cpu)?];
        let got = problem.precondition(&v)?[0].to_vec1::<f64>()?;

        // exp_avg_sq after two steps: b2 (1 - b2) g1^2 + (1 - b2) g2^2, elementwise.
        let sq: Vec<f64> = (0..3)
            .map(|i| beta2 * (1.0 - beta2) * g1[i] * g1[i] + (1.0 - beta2) * g2[i] * g2[i])
            .collect();
        let mean = sq.iter().sum::<f64>() / 3.0;
        let d = ((beta2 * mean).sqrt() + eps) / (1.0 - beta2 * beta2).sqrt();
        for (i, want) in [2.0 / d, -4.0 / d, 1.0 / d].iter().enumerate() {
            assert!(
                (got[i] - want).abs() <= 1e-12 * want.abs(),
                "{i}: {} vs {want}",
                got[i]
            );
        }
        Ok(())
    }

    #[test]
    fn non_adam_levels_and_unstepped_adam_are_not_preconditioned() -> Result<()> {
        let w = named("w", &[1.0, 2.0])?;
        let v = [Tensor::new(&[3.0f64, -1.0], &Device::Cpu)?];
        let sgd = Sgd::new(vec![w.clone()], SgdConfig::default())?;
        let p = Problem::new(
            "sgd",
            vec![w.clone()],
            Box::new(sgd),
            Box::new(|| Tensor::new(0.0f64, &Device::Cpu)),
        );
        assert_eq!(p.precondition(&v)?[0].to_vec1::<f64>()?, vec![3.0, -1.0]);
        let adam = Adam::new(vec![w.clone()], AdamConfig::default())?;
        let p = Problem::with_adam(
            "adam",
            vec![w],
            adam,
            Box::new(|| Tensor::new(0.0f64, &Device::Cpu)),
        );
        assert_eq!(p.precondition(&v)?[0].to_vec1::<f64>()?, vec![3.0, -1.0]);
        Ok(())
    }

    #[test]
    fn non_scalar_loss_and_mismatched_vectors_are_errors() -> Result<()> {
        let w = named("w", &[1.0, 2.0])?;
        let sgd = Sgd::new(vec![w.clone()], SgdConfig::default())?;
        let wt = w.1.clone();
        let mut p = Problem::new(
            "bad",
            vec![w],
            Box::new(sgd),
            Box::new(move || Ok(wt.as_tensor().clone())),
        );
        let err = p.loss().unwrap_err().to_string();
        assert!(err.contains("problem bad") && err.contains("[2]"), "{err}");
        let err = p.precondition(&[]).unwrap_err().to_string();
        assert!(err.contains("expected 1 tensors"), "{err}");
        Ok(())
    }
}
