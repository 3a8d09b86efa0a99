//! The weighted sum of kernels of different sizes, each zero-padded to the largest and
//! centred: `Σ_k w_k · centre(K_k)`. This is how a searchable cell of the generator fuses
//! its candidate convolutions into one (`genseg_generator::mixed`).
//!
//! Composed from candle ops (two `pad_with_zeros`, a `broadcast_mul` and an add per
//! kernel) the graph keeps about eight largest-kernel-sized buffers alive until the
//! backward pass, plus the zero blocks of every padding: for the 272 M-parameter pix2pix
//! generator that is about 4.5 GB. On the CPU (f32, f64) it is instead a chain of custom ops
//! `acc_k = centre(acc_{k-1}) + w_k · K_k`, whose backward needs only its inputs (the
//! kernels, which are parameters anyway, and the previous partial sum), so the graph keeps
//! one partial sum per kernel size.

use candle_core::{CustomOp3, DType, Layout, Result, Tensor, bail};
use rayon::prelude::*;

use crate::storage::{Element, Kernel, kernel_cpu_fwd, on_cpu_kernels};

/// `Σ_k weights[k] · centre(kernels[k])`.
///
/// `kernels` are `[.., s_k, s_k]` with equal leading dims and square trailing sides that
/// ascend in steps of 2 (so each centres exactly inside the next); `weights` is `[K]`.
/// Differentiable in the weights and every kernel.
pub fn weighted_centred_sum(kernels: &[Tensor], weights: &Tensor) -> Result<Tensor> {
    check(kernels, weights)?;
    let tensors: Vec<&Tensor> = std::iter::once(weights).chain(kernels).collect();
    if kernels.len() < 2 || !on_cpu_kernels(&tensors) {
        return composed(kernels, weights);
    }
    let weights = weights.contiguous()?;
    let mut acc = kernels[0].contiguous()?.apply_op3(
        &kernels[1].contiguous()?,
        &weights,
        CentredStep {
            inner_weight: Some(0),
            outer_weight: 1,
        },
    )?;
    for (k, kernel) in kernels.iter().enumerate().skip(2) {
        acc = acc.apply_op3(
            &kernel.contiguous()?,
            &weights,
            CentredStep {
                inner_weight: None,
                outer_weight: k,
            },
        )?;
    }
    Ok(acc)
}

fn check(kernels: &[Tensor], weights: &Tensor) -> Result<()> {
    let op = "weighted_centred_sum";
    if kernels.is_empty() {
        bail!("{op}: no kernels");
    }
    if weights.dims() != [kernels.len()] {
        bail!(
            "{op}: weights must be [{}] (one per kernel), got shape {:?}",
            kernels.len(),
            weights.dims()
        );
    }
    let dims = kernels[0].dims();
    if dims.len() < 2 {
        bail!("{op}: kernels need two trailing dims, got shape {dims:?}");
    }
    let lead = &dims[..dims.len() - 2];
    let mut previous: Option<usize> = None;
    for kernel in kernels {
        let d = kernel.dims();
        let square = d.len() == dims.len() && d[d.len() - 1] == d[d.len() - 2];
        if !square || &d[..d.len() - 2] != lead {
            bail!(
                "{op}: kernels must be [{lead:?}.., s, s] with the same leading dims, got shapes \
                 {:?}",
                kernels
                    .iter()
                    .map(|k| k.dims().to_vec())
                    .collect::<Vec<_>>()
            );
        }
        let side = d[d.len() - 1];
        if let Some(p) = previous
            && (side < p || (side - p) % 2 != 0)
        {
            bail!("{op}: kernel sides must ascend in steps of 2 to centre, got {p} then {side}");
        }
        previous = Some(side);
    }
    Ok(())
}

/// The candle composition, for other devices and dtypes (and the tests' reference).
fn composed(kernels: &[Tensor], weights: &Tensor) -> Result<Tensor> {
    let side = |k: &Tensor| k.dims()[k.rank() - 1];
    let largest = kernels.iter().map(side).max().unwrap_or(0);
    let rank = kernels[0].rank();
    let mut acc: Option<Tensor> = None;
    for (k, kernel) in kernels.iter().enumerate() {
        let off = (largest - side(kernel)) / 2;
        let factor = weights.narrow(0, k, 1)?.reshape(vec![1; rank])?;
        let placed = kernel
            .to_dtype(weights.dtype())?
            .pad_with_zeros(rank - 2, off, off)?
            .pad_with_zeros(rank - 1, off, off)?
            .broadcast_mul(&factor)?;
        acc = Some(match acc {
            None => placed,
            Some(a) => (a + placed)?,
        });
    }
    acc.ok_or_else(|| candle_core::Error::Msg("weighted_centred_sum: no kernels".into()))
}

/// `(inner [.., a, a], outer [.., b, b], weights [K]) -> s · centre(inner) + w_o · outer`,
/// with `s = weights[inner_weight]` (or 1 when `None`) and `w_o = weights[outer_weight]`.
#[derive(Debug, Clone, Copy)]
struct CentredStep {
    inner_weight: Option<usize>,
    outer_weight: usize,
}

/// Sides `(a, b)` of inner and outer (their last dims) and the offset `(b - a) / 2` of inner
/// in outer.
fn sides(inner: &[usize], outer: &[usize]) -> (usize, usize, usize) {
    let (a, b) = (inner[inner.len() - 1], outer[outer.len() - 1]);
    (a, b, (b - a) / 2)
}

impl Kernel<3> for CentredStep {
    fn run<T: Element>(
        &self,
        [inner, outer, weights]: [&[T]; 3],
        [li, lo, _]: [&Layout; 3],
    ) -> Result<Vec<T>> {
        let (a, b, off) = sides(li.dims(), lo.dims());
        let s = self.inner_weight.map_or(T::one(), |i| weights[i]);
        let w = weights[self.outer_weight];
        let mut out = vec![T::zero(); outer.len()];
        out.par_chunks_mut(b * b)
            .zip(outer.par_chunks(b * b).zip(inner.par_chunks(a * a)))
            .for_each(|(out, (outer, inner))| {
                for (o, &v) in out.iter_mut().zip(outer) {
                    *o = w * v;
                }
                for (r, row) in inner.chunks_exact(a).enumerate() {
                    let start = (off + r) * b + off;
                    for (o, &v) in out[start..start + a].iter_mut().zip(row) {
                        *o += s * v;
                    }
                }
            });
        Ok(out)
    }
}

impl CustomOp3 for CentredStep {
    fn name(&self) -> &'static str {
        "genseg-weighted-centred-sum"
    }

    kernel_cpu_fwd!(|self, _l1, l2, _l3| l2.shape().clone());

    fn bwd(
        &self,
        inner: &Tensor,
        outer: &Tensor,
        weights: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Detached: a gradient computed from graph tensors carries their graph, and candle
        // keeps every stored gradient's graph (with its temporaries) until the GradStore
        // is dropped; for the pix2pix generator that was 2.8 GB.
        let (inner, outer, weights) = (inner.detach(), outer.detach(), weights.detach());
        let rank = outer.rank();
        let (a, _, off) = sides(inner.dims(), outer.dims());
        let crop = grad.narrow(rank - 2, off, a)?.narrow(rank - 1, off, a)?;
        let weight = |k: usize| weights.narrow(0, k, 1)?.reshape(vec![1; rank]);
        let d_outer = grad.broadcast_mul(&weight(self.outer_weight)?)?;
        let d_inner = match self.inner_weight {
            Some(i) => crop.broadcast_mul(&weight(i)?)?,
            None => crop.contiguous()?,
        };
        // dL/dw_o = <grad, outer>, dL/dw_i = <crop(grad), inner>, zero for the others.
        let dot =
            |u: &Tensor, v: &Tensor| (u * v)?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>();
        let mut d_weights = vec![0f64; weights.elem_count()];
        d_weights[self.outer_weight] = dot(grad, &outer)?;
        if let Some(i) = self.inner_weight {
            d_weights[i] = dot(&crop, &inner)?;
        }
        let d_weights = Tensor::new(d_weights, weights.device())?.to_dtype(weights.dtype())?;
        Ok((Some(d_inner), Some(d_outer), Some(d_weights)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{GradCheckOptions, check_gradients};
    use crate::ops::test_inputs::{uniform, weighted_sum};
    use candle_core::DType;

    fn inputs(seed: u64, lead: &[usize], sides: &[usize]) -> Result<(Vec<Tensor>, Tensor)> {
        let kernels = sides
            .iter()
            .enumerate()
            .map(|(k, &s)| {
                let dims: Vec<usize> = lead.iter().copied().chain([s, s]).collect();
                uniform(seed + k as u64, &dims, 1.0)
            })
            .collect::<Result<Vec<_>>>()?;
        let weights = uniform(seed + 100, &[sides.len()], 1.0)?;
        Ok((kernels, weights))
    }

    #[test]
    fn matches_the_composition_in_value_and_gradient() -> anyhow::Result<()> {
        let cases: [(&[usize], &[usize]); 4] = [
            (&[3, 2], &[4, 6, 8]),
            (&[1, 1], &[2, 4]),
            (&[2, 3], &[3, 3, 5, 9]),
            (&[5], &[1, 7]),
        ];
        for (seed, (lead, sides)) in cases.into_iter().enumerate() {
            let (kernels, weights) = inputs(seed as u64 * 10, lead, sides)?;
            let mut vars = kernels.clone();
            vars.push(weights);
            let n = kernels.len();
            let fused = |v: &[Tensor]| weighted_centred_sum(&v[..n], &v[n]);
            let reference = |v: &[Tensor]| composed(&v[..n], &v[n]);
            let (y, want) = (fused(&vars)?, reference(&vars)?);
            assert_eq!(y.dims(), want.dims());
            let diff = (y - want)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-12, "case {seed}: values differ by {diff}");
            check_gradients(
                |v| weighted_sum(&fused(v)?, 7),
                &vars,
                GradCheckOptions::default(),
            )?
            .ensure(1e-6)?;
        }
        Ok(())
    }

    #[test]
    fn runs_in_f32() -> anyhow::Result<()> {
        let (kernels, weights) = inputs(3, &[4, 3], &[4, 6, 8])?;
        let f32s = |t: &Tensor| t.to_dtype(DType::F32);
        let kernels32 = kernels.iter().map(f32s).collect::<Result<Vec<_>>>()?;
        let y = weighted_centred_sum(&kernels32, &f32s(&weights)?)?;
        let want = composed(&kernels, &weights)?;
        let diff = (y.to_dtype(DType::F64)? - want)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(diff < 1e-5, "f32 differs by {diff}");
        Ok(())
    }

    #[test]
    fn gradients_carry_no_graph() -> anyhow::Result<()> {
        // A stored gradient that tracks ops keeps its graph (kernel-sized temporaries) alive
        // as long as the GradStore.
        let (kernels, weights) = inputs(5, &[2, 3], &[4, 6, 8])?;
        let vars = kernels
            .iter()
            .chain([&weights])
            .map(candle_core::Var::from_tensor)
            .collect::<Result<Vec<_>>>()?;
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        // Weights that come out of a graph, as the cells' softmax(α) do.
        let weights = crate::ops::softmax(&tensors[3], candle_core::D::Minus1)?;
        let grads = weighted_sum(&weighted_centred_sum(&tensors[..3], &weights)?, 3)?.backward()?;
        for (k, var) in vars.iter().enumerate() {
            let grad = grads
                .get(var.as_tensor())
                .expect("every input gets a gradient");
            assert!(!grad.track_op(), "gradient {k} tracks a graph");
        }
        Ok(())
    }

    #[test]
    fn bad_shapes_are_named_errors() -> anyhow::Result<()> {
        let (kernels, weights) = inputs(0, &[2, 2], &[4, 6])?;
        let err = |k: &[Tensor], w: &Tensor| weighted_centred_sum(k, w).unwrap_err().to_string();
        assert!(err(&kernels, &weights.narrow(0, 0, 1)?).contains("weights must be [2]"));
        let (odd, _) = inputs(0, &[2, 2], &[4, 5])?;
        assert!(err(&odd, &weights).contains("steps of 2"));
        let (other, _) = inputs(0, &[2, 3], &[6])?;
        assert!(err(&[kernels[0].clone(), other[0].clone()], &weights).contains("same leading"));
        assert!(err(&[], &weights).contains("no kernels"));
        Ok(())
    }
}
