//! Layer and instance normalisation from differentiable primitives.
//!
//! `candle_nn::LayerNorm` dispatches contiguous inputs to a fused custom op without backward,
//! so weights and inputs get no gradient and no error is raised. [`layer_norm`] computes the
//! same function (PyTorch `F.layer_norm` over the last dimension, biased variance) with ops
//! whose backward candle implements.

use candle_core::{D, Module, Result, Tensor, bail};
use candle_nn::{Init, VarBuilder};

use crate::storage::on_cpu_kernels;

fn check_affine(x: &Tensor, p: Option<&Tensor>, what: &str) -> Result<()> {
    if let Some(p) = p {
        let last = x.dim(D::Minus1)?;
        if p.dims() != [last] {
            bail!(
                "layer_norm: {what} has shape {:?}, expected [{last}] for input shape {:?}",
                p.dims(),
                x.dims()
            );
        }
    }
    Ok(())
}

/// Normalises `x` over its last dimension to zero mean and unit (biased) variance, then
/// applies the optional per-feature `weight` and `bias` (each of shape `[last_dim]`).
pub fn layer_norm(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    check_affine(x, weight, "weight")?;
    check_affine(x, bias, "bias")?;
    if on_cpu_kernels(&[x]) {
        // One pass forward, one backward (crate::rows), instead of eight ops and theirs.
        let k = x.dim(D::Minus1)?;
        let affine = |p: Option<&Tensor>, fill: f64| match p {
            Some(p) => p.to_dtype(x.dtype()),
            None => Tensor::full(fill, k, x.device())?.to_dtype(x.dtype()),
        };
        return crate::rows::layer_norm_rows(x, &affine(weight, 1.0)?, &affine(bias, 0.0)?, eps);
    }
    layer_norm_composite(x, weight, bias, eps)
}

/// [`layer_norm`] from candle's ops (any device and dtype).
pub(crate) fn layer_norm_composite(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    let scaled = match weight {
        Some(w) => normed.broadcast_mul(w)?,
        None => normed,
    };
    match bias {
        Some(b) => scaled.broadcast_add(b),
        None => Ok(scaled),
    }
}

/// Instance normalisation of `[N, C, H, W]` (PyTorch `F.instance_norm` without running
/// statistics): each `(n, c)` plane normalised to zero mean and unit (biased) variance, then
/// the optional per-channel `weight` and `bias` (each `[C]`). The same function in training and
/// evaluation, which is why nnU-Net uses it at batch size 2.
pub fn instance_norm(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4().map_err(|_| {
        candle_core::Error::Msg(format!(
            "instance_norm: expected a [N, C, H, W] input, got shape {:?}",
            x.dims()
        ))
    })?;
    for (p, what) in [(weight, "weight"), (bias, "bias")] {
        if let Some(p) = p
            && p.dims() != [c]
        {
            bail!(
                "instance_norm: {what} has shape {:?}, expected [{c}] for input shape {:?}",
                p.dims(),
                x.dims()
            );
        }
    }
    if on_cpu_kernels(&[x]) {
        // The fused batch-norm kernels with every (n, c) plane as its own channel: two
        // passes over the data instead of the eight ops below (and their backward).
        let planes = x.reshape((1, n * c, h, w))?;
        let per_plane = |p: Option<&Tensor>, fill: f64| -> Result<Tensor> {
            match p {
                Some(p) => p.to_dtype(x.dtype())?.repeat(n),
                None => Tensor::full(fill, n * c, x.device())?.to_dtype(x.dtype()),
            }
        };
        let y = crate::batch_norm::normalise_by_own_statistics(
            &planes,
            &per_plane(weight, 1.0)?,
            &per_plane(bias, 0.0)?,
            eps,
        )?;
        return y.reshape((n, c, h, w));
    }
    instance_norm_composite(x, weight, bias, eps)
}

/// [`instance_norm`] from candle's ops (any device and dtype).
fn instance_norm_composite(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let planes = x.reshape((n, c, h * w))?;
    let centered = planes.broadcast_sub(&planes.mean_keepdim(D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    let scaled = match weight {
        Some(w) => normed.broadcast_mul(&w.reshape((1, c, 1))?)?,
        None => normed,
    };
    let shifted = match bias {
        Some(b) => scaled.broadcast_add(&b.reshape((1, c, 1))?)?,
        None => scaled,
    };
    shifted.reshape((n, c, h, w))
}

/// An affine instance-norm layer over `channels` (`weight` initialised to 1, `bias` to 0,
/// eps `1e-5`: `torch.nn.InstanceNorm2d(c, affine=True)`, nnU-Net's norm).
#[derive(Clone, Debug)]
pub struct InstanceNorm2d {
    /// Per-channel scale, shape `[C]`.
    pub weight: Tensor,
    /// Per-channel shift, shape `[C]`.
    pub bias: Tensor,
    /// Added to the variance before the square root.
    pub eps: f64,
}

impl InstanceNorm2d {
    /// Creates (or loads) `weight` and `bias` of size `channels` under `vb`.
    pub fn new(channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(channels, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }
}

impl Module for InstanceNorm2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        instance_norm(xs, Some(&self.weight), Some(&self.bias), self.eps)
    }
}

/// A layer-norm layer with learnable `weight` (initialised to 1) and `bias` (initialised to 0)
/// over the last dimension; a drop-in replacement for `candle_nn::LayerNorm` that trains.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    /// Per-feature scale, shape `[dim]`.
    pub weight: Tensor,
    /// Per-feature shift, shape `[dim]`.
    pub bias: Tensor,
    /// Added to the variance before the square root.
    pub eps: f64,
}

impl LayerNorm {
    /// Creates (or loads) the parameters `weight` and `bias` of size `dim` under `vb`.
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        layer_norm(xs, Some(&self.weight), Some(&self.bias), self.eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{GradCheckOptions, assert_all_params_receive_gradient, check_gradients};
    use crate::ops::test_inputs::{uniform, weighted_sum};
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn values_match_hand_computed() -> anyhow::Result<()> {
        // Row [1, 2, 3, 4]: mean 2.5, biased variance 1.25, so (x - 2.5) / sqrt(1.25 + eps).
        let x = Tensor::new(&[[1f64, 2.0, 3.0, 4.0]], &Device::Cpu)?;
        let w = Tensor::new(&[1f64, 2.0, 1.0, 1.0], &Device::Cpu)?;
        let b = Tensor::new(&[0f64, 0.0, 0.0, 10.0], &Device::Cpu)?;
        let y = layer_norm(&x, Some(&w), Some(&b), 0.0)?.to_vec2::<f64>()?;
        let s = 1.25f64.sqrt();
        let want = [-1.5 / s, 2.0 * -0.5 / s, 0.5 / s, 1.5 / s + 10.0];
        for (g, w) in y[0].iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{y:?}");
        }
        Ok(())
    }

    #[test]
    fn agrees_with_candle_nn_forward() -> anyhow::Result<()> {
        let x = uniform(3, &[2, 3, 5], 2.0)?.to_dtype(DType::F32)?;
        let w = uniform(4, &[5], 1.0)?.to_dtype(DType::F32)?;
        let b = uniform(5, &[5], 1.0)?.to_dtype(DType::F32)?;
        let ours = layer_norm(&x, Some(&w), Some(&b), 1e-5)?;
        let theirs = candle_nn::LayerNorm::new(w, b, 1e-5).forward(&x)?;
        let diff = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "max diff {diff}");
        Ok(())
    }

    /// Why this module exists: candle_nn's LayerNorm silently drops the gradient.
    #[test]
    fn guard_catches_candle_nn_layer_norm_dropping_gradients() -> anyhow::Result<()> {
        // candle_nn's fused layer norm only supports f32/f16/bf16.
        let w = candle_core::Var::from_tensor(&uniform(4, &[5], 1.0)?.to_dtype(DType::F32)?)?;
        let x = candle_core::Var::from_tensor(&uniform(3, &[2, 5], 1.0)?.to_dtype(DType::F32)?)?;
        let vars = vec![
            ("input".to_string(), x.clone()),
            ("weight".to_string(), w.clone()),
        ];
        let b = Tensor::zeros(5, DType::F32, &Device::Cpu)?;
        let theirs = candle_nn::LayerNorm::new(w.as_tensor().clone(), b.clone(), 1e-5);
        let loss = weighted_sum(&theirs.forward(x.as_tensor())?, 2)?;
        let err = assert_all_params_receive_gradient(&loss, &vars)
            .expect_err("candle_nn LayerNorm was expected to drop the gradient")
            .to_string();
        assert!(err.contains("input") && err.contains("weight"), "{err}");
        let ours = layer_norm(x.as_tensor(), Some(w.as_tensor()), Some(&b), 1e-5)?;
        assert_all_params_receive_gradient(&weighted_sum(&ours, 2)?, &vars)?;
        Ok(())
    }

    #[test]
    fn gradcheck_input_weight_bias() -> anyhow::Result<()> {
        for (seed, dims) in [(1u64, vec![7usize]), (2, vec![3, 4]), (3, vec![2, 1, 3, 5])] {
            let last = *dims.last().unwrap_or(&1);
            let x = uniform(seed, &dims, 2.0)?;
            let w = uniform(seed + 10, &[last], 1.5)?;
            let b = uniform(seed + 20, &[last], 1.0)?;
            check_gradients(
                |v| weighted_sum(&layer_norm(&v[0], Some(&v[1]), Some(&v[2]), 1e-5)?, seed),
                &[x.clone(), w, b],
                GradCheckOptions::default(),
            )?
            .ensure(1e-6)?;
            check_gradients(
                |v| weighted_sum(&layer_norm(&v[0], None, None, 1e-3)?, seed),
                &[x],
                GradCheckOptions::default(),
            )?
            .ensure(1e-6)?;
        }
        Ok(())
    }

    #[test]
    fn instance_norm_normalises_each_plane() -> anyhow::Result<()> {
        // Plane (0, 1) is [1, 2, 3, 4]: mean 2.5, biased variance 1.25.
        let x = uniform(1, &[2, 3, 2, 2], 3.0)?;
        let x = x.slice_assign(
            &[0..1, 1..2, 0..2, 0..2],
            &Tensor::new(&[[[[1f64, 2.0], [3.0, 4.0]]]], &Device::Cpu)?,
        )?;
        let w = Tensor::new(&[1f64, 2.0, 1.0], &Device::Cpu)?;
        let b = Tensor::new(&[0f64, 10.0, 0.0], &Device::Cpu)?;
        let y = instance_norm(&x, Some(&w), Some(&b), 0.0)?;
        let plane = y.get(0)?.get(1)?.flatten_all()?.to_vec1::<f64>()?;
        let s = 1.25f64.sqrt();
        for (g, want) in plane.iter().zip([-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s]) {
            assert!((g - (2.0 * want + 10.0)).abs() < 1e-12, "{plane:?}");
        }
        // Every plane without affine: mean 0, variance 1.
        let y = instance_norm(&x, None, None, 0.0)?.reshape((6, 4))?;
        let mean = y.mean_keepdim(1)?.abs()?.max_all()?.to_scalar::<f64>()?;
        let var = y.sqr()?.mean_keepdim(1)?.flatten_all()?.to_vec1::<f64>()?;
        assert!(
            mean < 1e-12 && var.iter().all(|v| (v - 1.0).abs() < 1e-9),
            "{var:?}"
        );
        assert!(instance_norm(&x, Some(&b.narrow(0, 0, 2)?), None, 0.0).is_err());
        Ok(())
    }

    #[test]
    fn the_fused_instance_norm_equals_the_composite_one_with_its_gradients() -> anyhow::Result<()> {
        let x = uniform(11, &[2, 3, 4, 5], 2.0)?.to_dtype(DType::F32)?;
        let w = uniform(12, &[3], 1.5)?.to_dtype(DType::F32)?;
        let b = uniform(13, &[3], 1.0)?.to_dtype(DType::F32)?;
        let vars: Vec<candle_core::Var> = [&x, &w, &b]
            .iter()
            .map(|t| candle_core::Var::from_tensor(t))
            .collect::<candle_core::Result<_>>()?;
        let run = |f: fn(&Tensor, Option<&Tensor>, Option<&Tensor>, f64) -> Result<Tensor>| {
            let y = f(
                vars[0].as_tensor(),
                Some(vars[1].as_tensor()),
                Some(vars[2].as_tensor()),
                1e-5,
            )?;
            let grads = weighted_sum(&y.to_dtype(DType::F64)?, 3)?.backward()?;
            let mut out = vec![y.flatten_all()?.to_vec1::<f32>()?];
            for v in &vars {
                out.push(
                    grads
                        .get(v.as_tensor())
                        .expect("gradient")
                        .flatten_all()?
                        .to_vec1::<f32>()?,
                );
            }
            Ok::<_, candle_core::Error>(out)
        };
        let fused = run(instance_norm)?;
        let composite = run(instance_norm_composite)?;
        for (f, c) in fused.iter().zip(&composite) {
            let diff = f
                .iter()
                .zip(c)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-4, "fused vs composite differ by {diff}");
        }
        Ok(())
    }

    #[test]
    fn gradcheck_instance_norm() -> anyhow::Result<()> {
        let x = uniform(4, &[2, 3, 3, 2], 2.0)?;
        let w = uniform(5, &[3], 1.5)?;
        let b = uniform(6, &[3], 1.0)?;
        check_gradients(
            |v| weighted_sum(&instance_norm(&v[0], Some(&v[1]), Some(&v[2]), 1e-5)?, 7),
            &[x, w, b],
            GradCheckOptions::default(),
        )?
        .ensure(1e-6)?;
        Ok(())
    }

    #[test]
    fn module_initialises_and_trains_all_params() -> anyhow::Result<()> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
        let ln = LayerNorm::new(4, 1e-5, vb.pp("norm"))?;
        assert_eq!(ln.weight.to_vec1::<f64>()?, vec![1.0; 4]);
        assert_eq!(ln.bias.to_vec1::<f64>()?, vec![0.0; 4]);
        let x = uniform(7, &[3, 4], 1.0)?;
        let loss = weighted_sum(&ln.forward(&x)?, 8)?;
        let vars: Vec<(String, candle_core::Var)> = varmap
            .data()
            .lock()
            .map_err(|e| anyhow::anyhow!("varmap lock poisoned: {e}"))?
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut names: Vec<&str> = vars.iter().map(|(k, _)| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["norm.bias", "norm.weight"]);
        assert_all_params_receive_gradient(&loss, &vars)?;
        Ok(())
    }

    #[test]
    fn wrong_affine_shape_is_an_error() -> anyhow::Result<()> {
        let x = Tensor::zeros((2, 4), DType::F32, &Device::Cpu)?;
        let w = Tensor::ones(3, DType::F32, &Device::Cpu)?;
        let err = layer_norm(&x, Some(&w), None, 1e-5)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("weight") && err.contains("[3]") && err.contains("[4]"),
            "{err}"
        );
        Ok(())
    }
}
