//! DARTS / Betty "darts" first-order finite-difference hypergradients (spec §1.5).
//!
//! candle has no double-backward, so the mixed second derivative of a level's loss is
//! applied to a vector by central differences of first-order gradients: perturb the
//! level's vars by ±ε·v, differentiate its loss w.r.t. the vars it depends on at both
//! points, and return `(g− − g+) / (2ε)` ≈ `−H·v` with `H = ∂²L/∂x∂w` (Betty's sign: the
//! inverse Hessian of the level is approximated by the identity). The perturbed vars, and
//! any buffers the level registered, are restored bit-exactly through a [`Snapshot`].

use candle_core::{DType, Result, Tensor, Var};

use crate::problem::{Problem, check_matches};
use genseg_nn::snapshot::Snapshot;

/// Betty's default finite-difference radius (`darts_alpha`).
pub const DEFAULT_RADIUS: f64 = 0.01;

/// Settings of the finite-difference hop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hypergradient {
    /// Perturbation radius `r`: `ε = r / ‖v‖`, so the weights move by exactly `r`.
    pub radius: f64,
    /// Whether to apply Betty's Adam preconditioning to `v` before each hop
    /// (only levels built with [`Problem::with_adam`] are affected).
    pub precondition: bool,
}

impl Default for Hypergradient {
    fn default() -> Self {
        Self {
            radius: DEFAULT_RADIUS,
            precondition: false,
        }
    }
}

impl Hypergradient {
    /// One hop through `level`: `≈ −∂²L_level/∂x∂w · v`, where `w` are the level's vars
    /// (`v` lives in their space) and `x` are the vars `wrt` its loss depends on.
    ///
    /// A zero `v` gives zeros without evaluating the loss (the reference's ε·0 no-op);
    /// a non-finite `v` is an error.
    pub fn hop(
        &self,
        level: &mut Problem,
        v: &[Tensor],
        wrt: &[(String, Var)],
    ) -> Result<Vec<Tensor>> {
        if !(self.radius.is_finite() && self.radius > 0.0) {
            candle_core::bail!(
                "hypergradient: radius must be finite and > 0, got {}",
                self.radius
            );
        }
        check_matches(
            &format!("hypergradient through {}", level.name()),
            level.vars(),
            v,
        )?;
        let v = if self.precondition {
            level.precondition(v)?
        } else {
            v.to_vec()
        };
        let norm = l2_norm(&v)?;
        if !norm.is_finite() {
            candle_core::bail!(
                "hypergradient through {}: vector norm is {norm}",
                level.name()
            );
        }
        if norm == 0.0 {
            return wrt
                .iter()
                .map(|(_, var)| var.as_tensor().zeros_like())
                .collect();
        }
        let eps = self.radius / norm;
        let mut state = level.vars().to_vec();
        state.extend(level.buffers().iter().cloned());
        let snapshot = Snapshot::capture(&state)?;
        let result = perturbed_difference(level, &snapshot, &v, eps, wrt);
        // Restore even when a loss evaluation failed, so an error never leaves weights displaced.
        snapshot.restore()?;
        result
    }

    /// Chains hops from the top: `v` is the gradient of the upper objective w.r.t. the
    /// vars of `levels[last]`; hop `k` goes through `levels[k]` w.r.t. the vars of
    /// `levels[k − 1]`, and hop 0 w.r.t. `upper_vars`. Returns a vector over `upper_vars`.
    pub fn chain(
        &self,
        levels: &mut [Problem],
        upper_vars: &[(String, Var)],
        v: Vec<Tensor>,
    ) -> Result<Vec<Tensor>> {
        Ok(self.chain_traced(levels, upper_vars, v)?.0)
    }

    /// [`Hypergradient::chain`], also returning the norm of the vector that entered each
    /// level (indexed like `levels`): entry `k − 1` is the signal that reached `levels[k − 1]`'s
    /// vars through `levels[k]` — zero when nothing flows between them.
    pub fn chain_traced(
        &self,
        levels: &mut [Problem],
        upper_vars: &[(String, Var)],
        v: Vec<Tensor>,
    ) -> Result<(Vec<Tensor>, Vec<f64>)> {
        let mut norms = vec![0.0; levels.len()];
        let mut v = v;
        for k in (0..levels.len()).rev() {
            norms[k] = l2_norm(&v)?;
            let wrt = if k == 0 {
                upper_vars.to_vec()
            } else {
                levels[k - 1].vars().to_vec()
            };
            v = self.hop(&mut levels[k], &v, &wrt)?;
        }
        Ok((v, norms))
    }
}

fn perturbed_difference(
    level: &mut Problem,
    snapshot: &Snapshot,
    v: &[Tensor],
    eps: f64,
    wrt: &[(String, Var)],
) -> Result<Vec<Tensor>> {
    let originals: Vec<Tensor> = snapshot.values().take(v.len()).cloned().collect();
    let vars = level.vars().to_vec();
    let mut at = |sign: f64| -> Result<Vec<Tensor>> {
        for (((_, var), w0), v) in vars.iter().zip(&originals).zip(v) {
            var.set(&(w0 + v.affine(sign * eps, 0.0)?)?)?;
        }
        Ok(level.gradient(wrt)?.1)
    };
    let plus = at(1.0)?;
    let minus = at(-1.0)?;
    minus
        .iter()
        .zip(&plus)
        .map(|(m, p)| (m - p)?.affine(1.0 / (2.0 * eps), 0.0))
        .collect()
}

/// Euclidean norm of a list of tensors taken as one vector, in f64.
pub fn l2_norm(v: &[Tensor]) -> Result<f64> {
    let mut sum = 0.0;
    for t in v {
        sum += t
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    Ok(sum.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use genseg_nn::optim::{Sgd, SgdConfig};
    use std::cell::Cell;
    use std::rc::Rc;

    const DEV: Device = Device::Cpu;

    fn var(values: &[f64]) -> Result<Var> {
        Var::from_slice(values, values.len(), &DEV)
    }

    fn bits(v: &Var) -> Result<Vec<u64>> {
        Ok(v.as_tensor()
            .to_vec1::<f64>()?
            .iter()
            .map(|x| x.to_bits())
            .collect())
    }

    /// Inner loss `0.5‖w − Aλ‖² + (c·λ)·Σ w³/3`, with `w` ∈ R³ inner and `λ` ∈ R² outer.
    /// Mixed derivative: `∂²L/∂λ_j∂w_i = −A_ij + c_j w_i²`, so the hop is
    /// `−H·v = Aᵀv − c (Σ_i w_i² v_i)`.
    const A: [[f64; 2]; 3] = [[1.0, -0.5], [0.25, 2.0], [-1.5, 0.75]];
    const C: [f64; 2] = [0.3, -0.8];

    fn inner(w: &Var, lam: &Var, calls: Rc<Cell<usize>>, buffer: Option<Var>) -> Result<Problem> {
        let a = Tensor::new(&A, &DEV)?;
        let c = Tensor::new(&C, &DEV)?;
        let (wt, lt) = (w.clone(), lam.clone());
        let loss = Box::new(move || {
            calls.set(calls.get() + 1);
            let w = wt.as_tensor();
            let lam = lt.as_tensor();
            if let Some(b) = &buffer {
                // A BatchNorm-like running statistic mutated by every forward pass.
                b.set(&((b.as_tensor() * 0.9)? + (w * 0.1)?)?)?;
            }
            let a_lam = a.matmul(&lam.unsqueeze(1)?)?.squeeze(1)?;
            let quad = ((w - a_lam)?.sqr()?.sum_all()? * 0.5)?;
            let cubic = ((c.mul(lam)?.sum_all()? * w.powf(3.0)?.sum_all()?)? / 3.0)?;
            quad + cubic
        });
        let sgd = Sgd::new(vec![("w".into(), w.clone())], SgdConfig::default())?;
        Ok(Problem::new(
            "inner",
            vec![("w".into(), w.clone())],
            Box::new(sgd),
            loss,
        ))
    }

    #[test]
    fn hop_equals_closed_form_mixed_derivative() -> Result<()> {
        let w0 = [0.4, -1.2, 0.7];
        let (w, lam) = (var(&w0)?, var(&[0.6, -0.3])?);
        let mut p = inner(&w, &lam, Rc::new(Cell::new(0)), None)?;
        let v = [0.5, 1.5, -2.0];
        let got = Hypergradient::default().hop(
            &mut p,
            &[Tensor::new(&v, &DEV)?],
            &[("lam".into(), lam.clone())],
        )?[0]
            .to_vec1::<f64>()?;
        let s: f64 = (0..3).map(|i| w0[i] * w0[i] * v[i]).sum();
        let cube: f64 = v.iter().map(|x| x * x * x).sum();
        let eps = DEFAULT_RADIUS / v.iter().map(|x| x * x).sum::<f64>().sqrt();
        for j in 0..2 {
            let minus_hv = (0..3).map(|i| A[i][j] * v[i]).sum::<f64>() - C[j] * s;
            // Central differences are exact on the quadratic part; on the cubic part they
            // carry the truncation term −c_j ε² Σv³ / 3 (|·| ≈ 1.9e-5 here), which must be
            // all that separates the hop from −H·v.
            let truncation = -C[j] * eps * eps * cube / 3.0;
            assert!(
                (got[j] - (minus_hv + truncation)).abs() < 1e-10,
                "component {j}: {} vs {minus_hv} + {truncation}",
                got[j]
            );
            assert!((got[j] - minus_hv).abs() < 3e-5, "component {j}");
        }
        Ok(())
    }

    #[test]
    fn restore_is_bit_exact_including_buffers() -> Result<()> {
        let (w, lam) = (var(&[0.1 + 0.2, -1.0 / 3.0, 7.0e-9])?, var(&[0.6, -0.3])?);
        let buffer = var(&[0.25, -0.125, 1.0 / 7.0])?;
        let calls = Rc::new(Cell::new(0));
        let mut p = inner(&w, &lam, calls.clone(), Some(buffer.clone()))?
            .with_buffers(vec![("bn.running_mean".into(), buffer.clone())]);
        let before = (bits(&w)?, bits(&lam)?, bits(&buffer)?);
        let v = [Tensor::new(&[0.3f64, -0.7, 1.1], &DEV)?];
        let hop = Hypergradient {
            radius: 0.37,
            precondition: false,
        };
        hop.hop(&mut p, &v, &[("lam".into(), lam.clone())])?;
        assert_eq!(calls.get(), 2, "the loss ran at both perturbed points");
        assert_eq!((bits(&w)?, bits(&lam)?, bits(&buffer)?), before);
        Ok(())
    }

    #[test]
    fn zero_vector_gives_zeros_and_touches_nothing() -> Result<()> {
        let (w, lam) = (var(&[0.4, -1.2, 0.7])?, var(&[0.6, -0.3])?);
        let calls = Rc::new(Cell::new(0));
        let mut p = inner(&w, &lam, calls.clone(), None)?;
        let before = (bits(&w)?, bits(&lam)?);
        let zero = [Tensor::zeros(3, DType::F64, &DEV)?];
        let out = Hypergradient {
            radius: 0.01,
            precondition: true,
        }
        .hop(&mut p, &zero, &[("lam".into(), lam.clone())])?;
        assert_eq!(out[0].to_vec1::<f64>()?, vec![0.0, 0.0]);
        assert_eq!(calls.get(), 0);
        assert_eq!((bits(&w)?, bits(&lam)?), before);
        Ok(())
    }

    #[test]
    fn preconditioned_hop_perturbs_along_the_preconditioned_vector() -> Result<()> {
        use candle_core::backprop::GradStore;
        use genseg_nn::optim::{Adam, AdamConfig, Optimizer};
        let (w, lam) = (var(&[0.4, -1.2, 0.7])?, var(&[0.6, -0.3])?);
        let mut adam = Adam::new(vec![("w".into(), w.clone())], AdamConfig::default())?;
        let mut store = GradStore::default();
        store.insert(w.as_tensor(), Tensor::new(&[0.5f64, -3.0, 2.0], &DEV)?);
        adam.step(&store)?;
        let b = Tensor::new(&A, &DEV)?;
        let (wt, lt) = (w.clone(), lam.clone());
        let loss: crate::LossFn = Box::new(move || {
            let b_lam = b.matmul(&lt.as_tensor().unsqueeze(1)?)?.squeeze(1)?;
            (wt.as_tensor() * b_lam)?.sum_all()
        });
        let mut p = Problem::with_adam("adam level", vec![("w".into(), w.clone())], adam, loss);
        let wrt = [("lam".to_string(), lam.clone())];
        let v = [Tensor::new(&[1.0f64, 2.0, -0.5], &DEV)?];
        let pre = Hypergradient {
            radius: 0.01,
            precondition: true,
        }
        .hop(&mut p, &v, &wrt)?;
        let by_hand = p.precondition(&v)?;
        assert!(
            (l2_norm(&by_hand)? / l2_norm(&v)? - 1.0).abs() > 0.1,
            "Adam state must rescale v"
        );
        let plain = Hypergradient::default().hop(&mut p, &by_hand, &wrt)?;
        let (pre, plain) = (pre[0].to_vec1::<f64>()?, plain[0].to_vec1::<f64>()?);
        for j in 0..2 {
            assert!(
                (pre[j] - plain[j]).abs() <= 1e-9 * plain[j].abs().max(1.0),
                "{pre:?} vs {plain:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn bad_inputs_are_errors() -> Result<()> {
        let (w, lam) = (var(&[0.4, -1.2, 0.7])?, var(&[0.6, -0.3])?);
        let mut p = inner(&w, &lam, Rc::new(Cell::new(0)), None)?;
        let wrt = [("lam".to_string(), lam.clone())];
        let nan = [Tensor::new(&[f64::NAN, 0.0, 1.0], &DEV)?];
        assert!(Hypergradient::default().hop(&mut p, &nan, &wrt).is_err());
        let short = [Tensor::zeros(2, DType::F64, &DEV)?];
        let err = Hypergradient::default()
            .hop(&mut p, &short, &wrt)
            .unwrap_err()
            .to_string();
        assert!(err.contains("var w has shape [2], the var [3]"), "{err}");
        let ok = [Tensor::ones(3, DType::F64, &DEV)?];
        let zero_r = Hypergradient {
            radius: 0.0,
            precondition: false,
        };
        assert!(zero_r.hop(&mut p, &ok, &wrt).is_err());
        Ok(())
    }
}
