//! Multi-level optimization for GenSeg, independent of images and models.
//!
//! GenSeg (spec §1.1) is a three-level problem: the generator weights W_G minimise the
//! pix2pix loss given the architecture A; the segmenter weights W_S minimise the real +
//! synthetic segmentation loss given W_G; A minimises the validation loss of W_S. This
//! crate supplies the machinery, over plain candle [`Var`](candle_core::Var)s:
//!
//! - [`Problem`]: one level — named vars, an optimizer (`Box<dyn Optimizer>`, or a concrete
//!   [`Adam`](genseg_nn::optim::Adam) whose state can precondition hypergradients), a loss
//!   closure over the current state, and registered buffers (BatchNorm statistics).
//! - [`Snapshot`]: deep copies of a var list, restored bit for bit.
//! - [`Hypergradient`]: Betty's "darts" finite-difference hop (spec §1.5), `≈ −H·v`, with
//!   `ε = r/‖v‖`, optional Adam preconditioning, a zero-vector guard and exact restoration.
//! - [`Engine`]: one iteration — first-order steps of the inner levels lowest first, the
//!   chained hypergradient of the upper objective, the upper optimizer step.
//!
//! Wiring the three GenSeg levels: `levels = [G (loss reads W_G and A), S (loss reads W_S
//! and W_G, synthetic images not detached)]`, `upper = A (loss: validation loss reading
//! W_S)`. The engine then computes, after the G and S steps, `v = ∇_{W_S} L_V`, the hop
//! through S w.r.t. W_G, the hop through G w.r.t. A, and adds `∂L_V/∂A`.
//!
//! A bilevel example (inner `0.5‖w − 2λ‖²`, outer `0.5‖w − 1‖²`):
//!
//! ```
//! use candle_core::{Device, Result, Tensor, Var};
//! use genseg_mlo::{Engine, Hypergradient, Problem};
//! use genseg_nn::optim::{Sgd, SgdConfig};
//!
//! # fn main() -> Result<()> {
//! let (w, lam) = (Var::new(&[0.0f64], &Device::Cpu)?, Var::new(&[0.0f64], &Device::Cpu)?);
//! let named = |n: &str, v: &Var| vec![(n.to_string(), v.clone())];
//! let (wi, li) = (w.clone(), lam.clone());
//! let inner = Problem::new(
//!     "inner",
//!     named("w", &w),
//!     Box::new(Sgd::new(named("w", &w), SgdConfig { lr: 0.5, ..SgdConfig::default() })?),
//!     Box::new(move || ((wi.as_tensor() - (li.as_tensor() * 2.0)?)?.sqr()?.sum_all()? * 0.5)),
//! );
//! let wo = w.clone();
//! let outer = Problem::new(
//!     "outer",
//!     named("lambda", &lam),
//!     Box::new(Sgd::new(named("lambda", &lam), SgdConfig { lr: 0.1, ..SgdConfig::default() })?),
//!     Box::new(move || ((wo.as_tensor() - 1.0)?.sqr()?.sum_all()? * 0.5)),
//! );
//! let mut engine = Engine::new(vec![inner], outer, Hypergradient::default())?;
//! for _ in 0..200 {
//!     engine.iterate()?;
//! }
//! // The outer optimum puts w* = 2λ at 1.
//! let lam = lam.as_tensor().to_vec1::<f64>()?[0];
//! assert!((lam - 0.5).abs() < 1e-3, "{lam}");
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod engine;
pub mod hypergradient;
pub mod problem;

pub use engine::{Engine, IterationReport, UpperGradient};
/// Re-exported from genseg-nn, where every crate can reach it.
pub use genseg_nn::snapshot::Snapshot;
pub use hypergradient::{DEFAULT_RADIUS, Hypergradient, l2_norm};
pub use problem::{LossFn, Problem};
