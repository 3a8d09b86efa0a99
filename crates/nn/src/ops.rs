//! Differentiable tensor ops that candle 0.11 either lacks or gets silently wrong.
//!
//! Every op here is built so that `Tensor::backward` produces a correct gradient, and every
//! op is checked against central finite differences in f64 (see [`crate::gradcheck`]).
//! The candle traps they replace (measured on candle 0.11.1):
//!
//! | candle op | problem | replacement |
//! |---|---|---|
//! | `candle_nn::ops::softmax_last_dim` | no gradient, no error | [`softmax`], [`log_softmax`] |
//! | `candle_nn::LayerNorm` (contiguous input) | no gradient, no error | [`layer_norm`], [`LayerNorm`] |
//! | `candle_nn::loss::binary_cross_entropy_with_logit` | `inf` at \|logit\| = 100 | [`bce_with_logits`] |
//! | `Tensor::upsample_bilinear2d` | backward errors | [`resize_bilinear`] |
//! | `Tensor::max_pool2d_with_stride` (kernel != stride) | backward errors | [`max_pool2d`] |
//! | `Tensor::gelu_erf` backward | nine passes over the activation | [`gelu`] |
//! | (none) | instance norm, leaky ReLU | [`instance_norm`], [`InstanceNorm2d`], [`leaky_relu`] |
//! | (none) | reflection padding | [`reflection_pad2d`], [`replication_pad2d`] |
//! | `pad_with_zeros` + `broadcast_mul` + add | keeps ~8 padded kernel copies alive | [`weighted_centred_sum`] |
//!
//! All ops follow PyTorch semantics (the GenSeg reference code is PyTorch), so
//! hyperparameters and shapes carry over unchanged.

mod centred_sum;
mod gelu;
mod loss;
mod norm;
mod pad;
mod pool;
mod resize;
mod softmax;

pub use centred_sum::weighted_centred_sum;
pub use gelu::{erf_f32, exp_f32, gelu};
pub use loss::{bce_with_logits, bce_with_logits_per_element, bce_with_logits_sum};
#[cfg(test)]
pub(crate) use norm::layer_norm_composite;
pub use norm::{InstanceNorm2d, LayerNorm, instance_norm, layer_norm};

/// `LeakyReLU(slope)` for `0 <= slope <= 1` as `(1 - slope)·relu(x) + slope·x`: two cheap
/// differentiable ops (the gradient at 0 is `slope`, as in PyTorch).
pub fn leaky_relu(x: &candle_core::Tensor, slope: f64) -> candle_core::Result<candle_core::Tensor> {
    x.relu()?.affine(1.0 - slope, 0.0)? + x.affine(slope, 0.0)?
}
pub use pad::{reflection_pad2d, replication_pad2d};
pub use pool::max_pool2d;
pub use resize::resize_bilinear;
#[cfg(test)]
pub(crate) use softmax::softmax_composite;
pub use softmax::{log_softmax, softmax};

/// Seeded random inputs shared by the op tests.
#[cfg(test)]
pub(crate) mod test_inputs {
    use candle_core::{Device, Result, Tensor};
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Uniform values in [-scale, scale] as an f64 CPU tensor.
    pub(crate) fn uniform(seed: u64, dims: &[usize], scale: f64) -> Result<Tensor> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n = dims.iter().product::<usize>();
        let data: Vec<f64> = (0..n).map(|_| rng.random_range(-scale..=scale)).collect();
        Tensor::from_vec(data, dims, &Device::Cpu)
    }

    /// Pairwise distinct values (a shuffled grid with spacing 0.1), so that max-pool has no
    /// ties and a finite-difference step of 1e-6 never changes which element is the maximum.
    pub(crate) fn distinct(seed: u64, dims: &[usize]) -> Result<Tensor> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n = dims.iter().product::<usize>();
        let mut data: Vec<f64> = (0..n).map(|i| i as f64 * 0.1 - n as f64 * 0.05).collect();
        data.shuffle(&mut rng);
        Tensor::from_vec(data, dims, &Device::Cpu)
    }

    /// The largest absolute difference of two tensors of one shape, in f64.
    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
        (a - b)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()
    }

    /// Fixed random weights, so that a gradient check of `sum(w * op(x))` exercises every
    /// output element with a different upstream gradient.
    pub(crate) fn weighted_sum(y: &Tensor, seed: u64) -> Result<Tensor> {
        let w = uniform(seed, y.dims(), 1.0)?.to_dtype(y.dtype())?;
        (y * w)?.sum_all()
    }
}
