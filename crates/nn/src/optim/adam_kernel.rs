//! Adam's update on the CPU in two passes and two allocations per parameter.
//!
//! Composed from candle ops the update is about fourteen elementwise passes, each into a
//! fresh buffer the size of the parameter; for the 272 M-parameter generator that is
//! gigabytes of page faults per step and twice PyTorch's peak memory. The results are the
//! same tensors the composed path builds (new moments, never mutated in place, so earlier
//! snapshots of them stay valid).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, bail};
use num_traits::Float;
use rayon::prelude::*;

/// Elements per parallel chunk: large enough to amortise scheduling, small enough to
/// share a parameter between both threads.
const CHUNK: usize = 1 << 16;

fn slice<'a, T>(data: &'a [T], layout: &Layout, op: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: inputs must be contiguous"),
    }
}

fn cast<T: Float>(v: f64) -> T {
    T::from(v).unwrap_or_else(T::nan)
}

/// `(g [n], w [n], previous [2, n] = (m, v)) -> [2, n]`: the new first and second moments
/// of a gradient `g` (plus `weight_decay · w` for coupled decay). On a parameter's first
/// step the previous moments are zero and the third input is ignored.
#[derive(Debug, Clone, Copy)]
pub(super) struct MomentsUpdate {
    pub beta1: f64,
    pub beta2: f64,
    /// Coupled (L2) weight decay added to the gradient; 0 for none or decoupled.
    pub l2: f64,
    pub first: bool,
}

impl MomentsUpdate {
    fn run<T: Float + Send + Sync>(&self, g: &[T], w: &[T], prev: &[T]) -> Vec<T> {
        let n = g.len();
        let (b1, b2, l2) = (
            cast::<T>(self.beta1),
            cast::<T>(self.beta2),
            cast::<T>(self.l2),
        );
        let (c1, c2) = (cast::<T>(1.0 - self.beta1), cast::<T>(1.0 - self.beta2));
        let mut out = vec![T::zero(); 2 * n];
        let (m_out, v_out) = out.split_at_mut(n);
        m_out
            .par_chunks_mut(CHUNK)
            .zip(v_out.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(k, (m_out, v_out))| {
                let start = k * CHUNK;
                let end = start + m_out.len();
                let (g, w) = (&g[start..end], &w[start..end]);
                for i in 0..m_out.len() {
                    let gi = if self.l2 != 0.0 {
                        g[i] + l2 * w[i]
                    } else {
                        g[i]
                    };
                    let (m, v) = if self.first {
                        (T::zero(), T::zero())
                    } else {
                        (prev[start + i], prev[n + start + i])
                    };
                    m_out[i] = b1 * m + c1 * gi;
                    v_out[i] = b2 * v + c2 * (gi * gi);
                }
            });
        out
    }
}

impl CustomOp3 for MomentsUpdate {
    fn name(&self) -> &'static str {
        "genseg-adam-moments"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = l1.shape().elem_count();
        let name = self.name();
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(g), CpuStorage::F32(w), CpuStorage::F32(p)) => {
                CpuStorage::F32(self.run(
                    slice(g, l1, name)?,
                    slice(w, l2, name)?,
                    slice(p, l3, name)?,
                ))
            }
            (CpuStorage::F64(g), CpuStorage::F64(w), CpuStorage::F64(p)) => {
                CpuStorage::F64(self.run(
                    slice(g, l1, name)?,
                    slice(w, l2, name)?,
                    slice(p, l3, name)?,
                ))
            }
            _ => bail!("{name}: runs on f32 or f64 inputs of one dtype"),
        };
        Ok((out, Shape::from((2, n))))
    }
}

/// `(w [n], moments [2, n]) -> w'`:
/// `w' = decay · w - step_size · m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.
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

impl WeightUpdate {
    fn run<T: Float + Send + Sync>(&self, w: &[T], mv: &[T]) -> Vec<T> {
        let n = w.len();
        let (m, v) = mv.split_at(n);
        let decay = cast::<T>(self.decay);
        let step = cast::<T>(self.step_size);
        let bc2 = cast::<T>(self.bias_correction2_sqrt);
        let eps = cast::<T>(self.eps);
        let mut out = vec![T::zero(); n];
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(k, out)| {
            let start = k * CHUNK;
            for (i, o) in out.iter_mut().enumerate() {
                let j = start + i;
                *o = decay * w[j] - step * (m[j] / (v[j].sqrt() / bc2 + eps));
            }
        });
        out
    }
}

impl CustomOp2 for WeightUpdate {
    fn name(&self) -> &'static str {
        "genseg-adam-weights"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let out = match (s1, s2) {
            (CpuStorage::F32(w), CpuStorage::F32(mv)) => {
                CpuStorage::F32(self.run(slice(w, l1, name)?, slice(mv, l2, name)?))
            }
            (CpuStorage::F64(w), CpuStorage::F64(mv)) => {
                CpuStorage::F64(self.run(slice(w, l1, name)?, slice(mv, l2, name)?))
            }
            _ => bail!("{name}: runs on f32 or f64 inputs of one dtype"),
        };
        Ok((out, l1.shape().clone()))
    }
}
