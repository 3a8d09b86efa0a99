//! One GenSeg-style iteration over a chain of levels (spec §1.6, intended mode).
//!
//! The [`Engine`] holds the inner levels in dependency order, lowest first (GenSeg: the
//! generator weights W_G, then the segmenter weights W_S), each level's loss depending on
//! the vars of the level before it (the first level's on the upper vars), and the upper
//! problem (the architecture weights A, objective = validation loss of the last level's
//! vars). An iteration takes one first-order step per inner level, then computes the
//! hypergradient of the upper objective by chained finite-difference hops and steps
//! the upper optimizer with it.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor};

use crate::hypergradient::Hypergradient;
use crate::problem::{Problem, check_matches, collect_grads, scalar_value};

/// What one [`Engine::iterate`] computed.
#[derive(Debug, Clone)]
pub struct IterationReport {
    /// Loss of each inner level before its step, lowest level first.
    pub level_losses: Vec<f64>,
    /// Upper objective at the stepped inner vars, before the upper step.
    pub upper_loss: f64,
    /// Hypergradient applied to the upper vars (direct gradient + chained hops).
    pub hypergradient: Vec<Tensor>,
    /// Norm of the vector that entered each inner level's hop (see [`UpperGradient`]).
    pub entering_norms: Vec<f64>,
}

/// The upper objective and its hypergradient at the current state.
#[derive(Debug, Clone)]
pub struct UpperGradient {
    /// The upper objective.
    pub loss: f64,
    /// Direct gradient + chained hops, one tensor per upper var.
    pub grad: Vec<Tensor>,
    /// `entering_norms[k]`: norm of the vector over `levels[k]`'s vars that entered its hop
    /// (for the last level, `‖∇ L_upper‖` w.r.t. its vars; below, what the hop above passed
    /// down). Zero means no signal reached that level.
    pub entering_norms: Vec<f64>,
}

/// A chain of inner levels and the upper problem they serve.
#[derive(Debug)]
pub struct Engine {
    levels: Vec<Problem>,
    upper: Problem,
    hypergradient: Hypergradient,
}

impl Engine {
    /// An engine over `levels` (lowest first, at least one) and `upper`.
    pub fn new(levels: Vec<Problem>, upper: Problem, hypergradient: Hypergradient) -> Result<Self> {
        if levels.is_empty() {
            candle_core::bail!(
                "engine: upper problem {} needs at least one inner level",
                upper.name()
            );
        }
        Ok(Self {
            levels,
            upper,
            hypergradient,
        })
    }

    /// The inner levels, lowest first.
    pub fn levels(&self) -> &[Problem] {
        &self.levels
    }

    /// The inner levels, mutably (learning-rate schedules).
    pub fn levels_mut(&mut self) -> &mut [Problem] {
        &mut self.levels
    }

    /// The upper problem.
    pub fn upper(&self) -> &Problem {
        &self.upper
    }

    /// The upper problem, mutably.
    pub fn upper_mut(&mut self) -> &mut Problem {
        &mut self.upper
    }

    /// The hop settings.
    pub fn settings(&self) -> Hypergradient {
        self.hypergradient
    }

    /// One first-order step of every inner level in dependency order; their losses.
    pub fn step_levels(&mut self) -> Result<Vec<f64>> {
        self.levels.iter_mut().map(Problem::step).collect()
    }

    /// One first-order step of the inner level `index` alone (a level stepped less often
    /// than the others); its loss before the step.
    pub fn step_level(&mut self, index: usize) -> Result<f64> {
        let count = self.levels.len();
        match self.levels.get_mut(index) {
            Some(level) => level.step(),
            None => candle_core::bail!("engine: no inner level {index} (it has {count})"),
        }
    }

    /// The upper objective and its hypergradient w.r.t. the upper vars at the current
    /// state: the direct gradient plus the hops chained from `∇ L_upper` w.r.t. the last
    /// level's vars down to the upper vars. Leaves every var as it found it.
    pub fn upper_hypergradient(&mut self) -> Result<UpperGradient> {
        let last = self.levels.len() - 1;
        let loss = self.upper.loss()?;
        let grads = loss.backward()?;
        let v = collect_grads(&grads, self.levels[last].vars())?;
        let direct = collect_grads(&grads, self.upper.vars())?;
        let upper_vars = self.upper.vars().to_vec();
        let (chained, entering_norms) =
            self.hypergradient
                .chain_traced(&mut self.levels, &upper_vars, v)?;
        let grad = direct
            .iter()
            .zip(&chained)
            .map(|(d, c)| d + c)
            .collect::<Result<Vec<_>>>()?;
        Ok(UpperGradient {
            loss: scalar_value(&loss)?,
            grad,
            entering_norms,
        })
    }

    /// Steps the upper optimizer with `grad` (one tensor per upper var).
    pub fn step_upper(&mut self, grad: &[Tensor]) -> Result<()> {
        let what = format!("upper problem {}", self.upper.name());
        check_matches(&what, self.upper.vars(), grad)?;
        let mut store = GradStore::default();
        for ((_, var), g) in self.upper.vars().iter().zip(grad) {
            store.insert(var.as_tensor(), g.clone());
        }
        self.upper.optimizer_mut().step(&store)
    }

    /// One iteration: inner steps, hypergradient, upper step.
    pub fn iterate(&mut self) -> Result<IterationReport> {
        let level_losses = self.step_levels()?;
        let upper = self.upper_hypergradient()?;
        self.step_upper(&upper.grad)?;
        Ok(IterationReport {
            level_losses,
            upper_loss: upper.loss,
            hypergradient: upper.grad,
            entering_norms: upper.entering_norms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use genseg_nn::optim::{Sgd, SgdConfig};

    const DEV: Device = Device::Cpu;
    // Upper a ∈ R², level 1 g ∈ R³, level 2 s ∈ R².
    const P: [[f64; 3]; 3] = [[1.2, 0.1, 0.0], [0.1, 0.8, -0.2], [0.0, -0.2, 1.5]];
    const B: [[f64; 2]; 3] = [[0.7, -0.3], [0.2, 1.1], [-0.9, 0.4]];
    const Q: [[f64; 2]; 2] = [[0.9, 0.2], [0.2, 1.3]];
    const C: [[f64; 3]; 2] = [[0.5, -1.0, 0.3], [0.8, 0.2, -0.6]];
    const T: [f64; 2] = [1.0, -2.0];
    const MU: f64 = 0.3;
    const A0: [f64; 2] = [0.4, -0.7];
    const G0: [f64; 3] = [0.2, -0.5, 1.0];
    const S0: [f64; 2] = [-0.3, 0.6];

    fn mv<const R: usize, const K: usize>(m: &[[f64; K]; R], x: &[f64]) -> Vec<f64> {
        m.iter()
            .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum())
            .collect()
    }

    /// The unrolled objective: one unit-lr SGD step of G, then of S, then the upper loss.
    fn unrolled(a: &[f64]) -> (f64, Vec<f64>, Vec<f64>) {
        let (pg, ba) = (mv(&P, &G0), mv(&B, a));
        let g: Vec<f64> = (0..3).map(|i| G0[i] - (pg[i] - ba[i])).collect();
        let (qs, cg) = (mv(&Q, &S0), mv(&C, &g));
        let s: Vec<f64> = (0..2).map(|i| S0[i] - (qs[i] - cg[i])).collect();
        let f = 0.5 * (0..2).map(|i| (s[i] - T[i]).powi(2)).sum::<f64>()
            + 0.5 * MU * a.iter().map(|x| x * x).sum::<f64>();
        (f, g, s)
    }

    fn vec_var(name: &str, x: &[f64]) -> Result<(String, Var)> {
        Ok((name.to_string(), Var::from_slice(x, x.len(), &DEV)?))
    }

    fn sgd(v: &(String, Var), lr: f64) -> Result<Box<Sgd>> {
        Ok(Box::new(Sgd::new(
            vec![v.clone()],
            SgdConfig {
                lr,
                ..SgdConfig::default()
            },
        )?))
    }

    /// `0.5 xᵀMx − xᵀN y` as a candle scalar.
    fn quad_bilinear(x: &Tensor, m: &Tensor, n: &Tensor, y: &Tensor) -> Result<Tensor> {
        let xc = x.unsqueeze(1)?;
        let q = (xc.t()?.matmul(&m.matmul(&xc)?)? * 0.5)?;
        let b = xc.t()?.matmul(&n.matmul(&y.unsqueeze(1)?)?)?;
        (q - b)?.sum_all()
    }

    fn three_levels(upper_lr: f64) -> Result<(Engine, Var, Var, Var)> {
        let (a, g, s) = (
            vec_var("alpha", &A0)?,
            vec_var("w_g", &G0)?,
            vec_var("w_s", &S0)?,
        );
        let (p, b) = (Tensor::new(&P, &DEV)?, Tensor::new(&B, &DEV)?);
        let (q, c, t) = (
            Tensor::new(&Q, &DEV)?,
            Tensor::new(&C, &DEV)?,
            Tensor::new(&T, &DEV)?,
        );
        let (gv, av) = (g.1.clone(), a.1.clone());
        let generator = Problem::new(
            "generator",
            vec![g.clone()],
            sgd(&g, 1.0)?,
            Box::new(move || quad_bilinear(gv.as_tensor(), &p, &b, av.as_tensor())),
        );
        let (sv, gv) = (s.1.clone(), g.1.clone());
        let seg = Problem::new(
            "segmenter",
            vec![s.clone()],
            sgd(&s, 1.0)?,
            Box::new(move || quad_bilinear(sv.as_tensor(), &q, &c, gv.as_tensor())),
        );
        let (sv, av) = (s.1.clone(), a.1.clone());
        let arch = Problem::new(
            "architecture",
            vec![a.clone()],
            sgd(&a, upper_lr)?,
            Box::new(move || {
                let fit = ((sv.as_tensor() - &t)?.sqr()?.sum_all()? * 0.5)?;
                fit + (av.as_tensor().sqr()?.sum_all()? * (0.5 * MU))?
            }),
        );
        let engine = Engine::new(vec![generator, seg], arch, Hypergradient::default())?;
        Ok((engine, a.1, g.1, s.1))
    }

    #[test]
    fn three_level_chain_matches_brute_force_unrolled_gradient() -> Result<()> {
        let (mut engine, _, _, _) = three_levels(0.1)?;
        engine.step_levels()?;
        let upper = engine.upper_hypergradient()?;
        let (loss, hg) = (upper.loss, upper.grad[0].to_vec1::<f64>()?);
        assert!(upper.entering_norms.iter().all(|n| *n > 0.0));
        assert!((loss - unrolled(&A0).0).abs() < 1e-12, "{loss}");
        let h = 1e-6;
        for j in 0..2 {
            let (mut up, mut down) = (A0, A0);
            up[j] += h;
            down[j] -= h;
            let want = (unrolled(&up).0 - unrolled(&down).0) / (2.0 * h);
            // The losses are bilinear in the coupled vars, so the hops are exact up to
            // rounding; the brute-force central difference carries ~1e-9 of error.
            assert!(
                (hg[j] - want).abs() < 1e-6,
                "component {j}: {} vs {want}",
                hg[j]
            );
            assert!(
                want.abs() > 1e-2,
                "the test must exercise a non-trivial gradient"
            );
        }
        Ok(())
    }

    #[test]
    fn iterate_steps_levels_then_upper_with_the_hypergradient() -> Result<()> {
        let lr = 0.1;
        let (mut engine, a, g, s) = three_levels(lr)?;
        let report = engine.iterate()?;
        let (_, g1, s1) = unrolled(&A0);
        for (var, want) in [(&g, &g1), (&s, &s1)] {
            let got = var.as_tensor().to_vec1::<f64>()?;
            for (x, y) in got.iter().zip(want.iter()) {
                assert!((x - y).abs() < 1e-12, "{got:?} vs {want:?}");
            }
        }
        let hg = report.hypergradient[0].to_vec1::<f64>()?;
        let a1 = a.as_tensor().to_vec1::<f64>()?;
        for j in 0..2 {
            assert!((a1[j] - (A0[j] - lr * hg[j])).abs() < 1e-15);
        }
        assert_eq!(report.level_losses.len(), 2);
        Ok(())
    }

    #[test]
    fn step_level_moves_that_level_alone() -> Result<()> {
        let (mut engine, a, g, s) = three_levels(0.1)?;
        let loss = engine.step_level(1)?;
        // The segmenter's unit-lr step at G0: s = S0 − (Q·S0 − C·G0); g and a untouched.
        let (qs, cg) = (mv(&Q, &S0), mv(&C, &G0));
        let want: Vec<f64> = (0..2).map(|i| S0[i] - (qs[i] - cg[i])).collect();
        let got = s.as_tensor().to_vec1::<f64>()?;
        for (x, y) in got.iter().zip(&want) {
            assert!((x - y).abs() < 1e-12, "{got:?} vs {want:?}");
        }
        let quad = 0.5 * (0..2).map(|i| S0[i] * qs[i]).sum::<f64>()
            - (0..2).map(|i| S0[i] * cg[i]).sum::<f64>();
        assert!((loss - quad).abs() < 1e-12, "{loss} vs {quad}");
        assert_eq!(g.as_tensor().to_vec1::<f64>()?, G0.to_vec());
        assert_eq!(a.as_tensor().to_vec1::<f64>()?, A0.to_vec());
        let err = engine.step_level(2).unwrap_err().to_string();
        assert!(err.contains("no inner level 2 (it has 2)"), "{err}");
        Ok(())
    }

    #[test]
    fn engine_rejects_empty_chain_and_bad_upper_gradients() -> Result<()> {
        let (mut engine, _, _, _) = three_levels(0.1)?;
        let err = engine.step_upper(&[]).unwrap_err().to_string();
        assert!(err.contains("upper problem architecture"), "{err}");
        let a = vec_var("alpha", &A0)?;
        let upper = Problem::new(
            "u",
            vec![a.clone()],
            sgd(&a, 0.1)?,
            Box::new(|| Tensor::new(0.0f64, &DEV)),
        );
        assert!(Engine::new(Vec::new(), upper, Hypergradient::default()).is_err());
        Ok(())
    }
}
