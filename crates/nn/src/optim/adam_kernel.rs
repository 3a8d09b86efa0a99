//! Adam's update on the CPU in two in-place passes, with no allocation.
//!
//! Composed from candle ops the update is about fourteen elementwise passes, each into a
//! fresh buffer the size of the parameter; for the 272 M-parameter generator that is
//! gigabytes of page faults per step, and old and new moments alive together. Here the
//! moments (`[2, n]`, one buffer) and then the weights are updated where they are.

use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result};

use crate::storage::{Element, InplaceKernel, cast, run_inplace_kernel};
use rayon::prelude::*;

/// Elements per parallel chunk: large enough to amortise scheduling, small enough to
/// share a parameter between both threads.
const CHUNK: usize = 1 << 16;

/// `moments [2, n] = (m, v)`, updated in place from the gradient `g [n]` (plus
/// `l2 · w [n]` for coupled weight decay): `m = b1·m + (1 - b1)·g`, `v = b2·v + (1 - b2)·g²`.
/// A parameter's first step starts from zero moments.
#[derive(Debug, Clone, Copy)]
pub(super) struct MomentsUpdate {
    pub beta1: f64,
    pub beta2: f64,
    /// Coupled (L2) weight decay added to the gradient; 0 for none or decoupled.
    pub l2: f64,
}

impl InplaceKernel<2> for MomentsUpdate {
    fn run<T: Element>(&self, moments: &mut [T], [g, w]: [&[T]; 2]) {
        let n = g.len();
        let (b1, b2, l2) = (
            cast::<T>(self.beta1),
            cast::<T>(self.beta2),
            cast::<T>(self.l2),
        );
        let (c1, c2) = (cast::<T>(1.0 - self.beta1), cast::<T>(1.0 - self.beta2));
        let (m, v) = moments.split_at_mut(n);
        m.par_chunks_mut(CHUNK)
            .zip(v.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(k, (m, v))| {
                let start = k * CHUNK;
                let (g, w) = (&g[start..start + m.len()], &w[start..start + m.len()]);
                for i in 0..m.len() {
                    let gi = if self.l2 != 0.0 {
                        g[i] + l2 * w[i]
                    } else {
                        g[i]
                    };
                    m[i] = b1 * m[i] + c1 * gi;
                    v[i] = b2 * v[i] + c2 * (gi * gi);
                }
            });
    }
}

impl InplaceOp3 for MomentsUpdate {
    fn name(&self) -> &'static str {
        "genseg-adam-moments"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        run_inplace_kernel(self, self.name(), (s1, l1), [(s2, l2), (s3, l3)])
    }
}

/// `w [n]`, updated in place from `moments [2, n]`:
/// `w = decay · w - step_size · m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.
#[derive(Debug, Clone, Copy)]
pub(super) struct WeightUpdate {
    /// `1 - lr · weight_decay` for decoupled decay (AdamW), else 1.
    pub decay: f64,
    /// `lr / (1 - b1^t)`.
    pub step_size: f64,
    /// `sqrt(1 - b2^t)`.
    pub bias_correction2_sqrt: f64,
    pub eps: f64,
}

impl InplaceKernel<1> for WeightUpdate {
    fn run<T: Element>(&self, w: &mut [T], [moments]: [&[T]; 1]) {
        let (m, v) = moments.split_at(w.len());
        let decay = cast::<T>(self.decay);
        let step = cast::<T>(self.step_size);
        let bc2 = cast::<T>(self.bias_correction2_sqrt);
        let eps = cast::<T>(self.eps);
        w.par_chunks_mut(CHUNK).enumerate().for_each(|(k, w)| {
            let start = k * CHUNK;
            for (i, w) in w.iter_mut().enumerate() {
                let j = start + i;
                *w = decay * *w - step * (m[j] / (v[j].sqrt() / bc2 + eps));
            }
        });
    }
}

impl InplaceOp2 for WeightUpdate {
    fn name(&self) -> &'static str {
        "genseg-adam-weights"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        run_inplace_kernel(self, self.name(), (s1, l1), [(s2, l2)])
    }
}
