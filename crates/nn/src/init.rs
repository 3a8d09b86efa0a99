//! Weight initialisation with PyTorch semantics, drawn from our seeded generator.
//!
//! [`InitScheme`] names the two schemes GenSeg's networks use:
//! - [`InitScheme::TorchDefault`]: what `torch.nn` layers do on construction. Weights are
//!   `kaiming_uniform_(a = sqrt(5))`, which reduces to `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`,
//!   biases `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`, BatchNorm `gamma = 1`, `beta = 0`.
//! - [`InitScheme::Pix2Pix`]: `init_weights(net, 'normal', 0.02)` of the pix2pix code base
//!   that GenSeg's mask-to-image generator and discriminator come from: conv/linear weights
//!   `N(0, 0.02)`, biases `0`, BatchNorm `gamma ~ N(1, 0.02)`, `beta = 0`.
//!
//! PyTorch computes `fan_in` as `weight.size(1) * receptive_field`. For `ConvTranspose2d` the
//! weight is laid out `[in, out, k, k]`, so its `fan_in` is `out * k * k` — a subtlety that
//! candle's own constructors and [`conv_transpose2d`] here both follow.
//!
//! The layer constructors ([`conv2d`], [`conv_transpose2d`], [`linear`]) return candle_nn
//! layers (whose ops have backward passes) with parameters named `weight` and `bias`, and
//! express their initialisation as [`candle_nn::Init`] hints so that any `VarBuilder`
//! backend works; with a [`crate::params::ParamStore`] the hints are sampled by
//! [`sample_init`] from the store's seeded generator.

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::init::NormalOrUniform;
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::rng::{self, SeededRng};

/// Standard deviation of pix2pix's `normal` initialisation (`init_gain`).
pub const PIX2PIX_STD: f64 = 0.02;

/// How a network's parameters are initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitScheme {
    /// PyTorch's per-layer defaults (`reset_parameters`).
    #[default]
    TorchDefault,
    /// pix2pix's `init_weights(..., init_type='normal', init_gain=0.02)`.
    #[serde(rename = "pix2pix")]
    Pix2Pix,
}

impl InitScheme {
    /// Initialisation of a conv / transposed-conv / linear weight with the given `fan_in`.
    pub fn weight(self, fan_in: usize) -> Init {
        match self {
            // kaiming_uniform(a = sqrt(5)): gain = sqrt(2 / (1 + 5)), bound = gain * sqrt(3 / fan_in)
            // = 1 / sqrt(fan_in); written directly to avoid the rounding of the product.
            InitScheme::TorchDefault => symmetric_uniform(torch_bound(fan_in)),
            InitScheme::Pix2Pix => Init::Randn {
                mean: 0.0,
                stdev: PIX2PIX_STD,
            },
        }
    }

    /// Initialisation of a conv / transposed-conv / linear bias whose weight has `fan_in`.
    pub fn bias(self, fan_in: usize) -> Init {
        match self {
            InitScheme::TorchDefault => symmetric_uniform(torch_bound(fan_in)),
            InitScheme::Pix2Pix => Init::Const(0.0),
        }
    }

    /// Initialisation of a BatchNorm scale (`gamma`, PyTorch's `weight`).
    pub fn batch_norm_weight(self) -> Init {
        match self {
            InitScheme::TorchDefault => Init::Const(1.0),
            InitScheme::Pix2Pix => Init::Randn {
                mean: 1.0,
                stdev: PIX2PIX_STD,
            },
        }
    }

    /// Initialisation of a BatchNorm shift (`beta`, PyTorch's `bias`): zero in both schemes.
    pub fn batch_norm_bias(self) -> Init {
        Init::Const(0.0)
    }
}

// PyTorch uses a zero bound when fan_in is 0 (zero-element weights) instead of dividing by 0.
fn torch_bound(fan_in: usize) -> f64 {
    if fan_in == 0 {
        0.0
    } else {
        1.0 / (fan_in as f64).sqrt()
    }
}

fn symmetric_uniform(bound: f64) -> Init {
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// Draws a tensor for a [`candle_nn::Init`] hint from `rng`, with the same formulas as
/// `Init::var` (including Kaiming's `std = gain / sqrt(fan)`, uniform bound `sqrt(3) * std`)
/// but reproducible.
pub fn sample_init(
    init: &Init,
    shape: &Shape,
    rng: &mut SeededRng,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    match *init {
        Init::Const(value) => Tensor::ones(shape, dtype, device)?.affine(0.0, value),
        Init::Randn { mean, stdev } => rng::normal(rng, shape, mean, stdev, dtype, device),
        Init::Uniform { lo, up } => rng::uniform(rng, shape, lo, up, dtype, device),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            if shape.elem_count() == 0 {
                return Tensor::zeros(shape, dtype, device);
            }
            let fan = fan.for_shape(shape);
            let std = non_linearity.gain() / (fan as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    rng::uniform(rng, shape, -bound, bound, dtype, device)
                }
                NormalOrUniform::Normal => rng::normal(rng, shape, 0.0, std, dtype, device),
            }
        }
    }
}

/// A 2-d convolution with weight `[out_c, in_c / groups, k, k]` (named `weight`) and an
/// optional bias `[out_c]` (named `bias`), initialised by `scheme`.
pub fn conv2d(
    in_c: usize,
    out_c: usize,
    kernel: usize,
    cfg: candle_nn::Conv2dConfig,
    bias: bool,
    scheme: InitScheme,
    vb: VarBuilder,
) -> Result<crate::conv::Conv2d> {
    let groups = cfg.groups;
    if in_c == 0 || out_c == 0 || kernel == 0 {
        candle_core::bail!(
            "conv2d {}: channels and kernel must be positive, got in {in_c} out {out_c} kernel {kernel}",
            vb.prefix()
        );
    }
    if groups == 0 || in_c % groups != 0 || out_c % groups != 0 {
        candle_core::bail!(
            "conv2d {}: groups {groups} must divide in channels {in_c} and out channels {out_c}",
            vb.prefix()
        );
    }
    if cfg.stride == 0 || cfg.dilation == 0 {
        candle_core::bail!(
            "conv2d {}: stride {} and dilation {} must be positive",
            vb.prefix(),
            cfg.stride,
            cfg.dilation
        );
    }
    let fan_in = in_c / groups * kernel * kernel;
    let weight = vb.get_with_hints(
        (out_c, in_c / groups, kernel, kernel),
        "weight",
        scheme.weight(fan_in),
    )?;
    let bias = if bias {
        Some(vb.get_with_hints(out_c, "bias", scheme.bias(fan_in))?)
    } else {
        None
    };
    Ok(crate::conv::Conv2d::new(weight, bias, cfg))
}

/// A 2-d transposed convolution with weight `[in_c, out_c, k, k]` (named `weight`) and an
/// optional bias `[out_c]`, initialised by `scheme` with PyTorch's `fan_in = out_c * k * k`.
pub fn conv_transpose2d(
    in_c: usize,
    out_c: usize,
    kernel: usize,
    cfg: candle_nn::ConvTranspose2dConfig,
    bias: bool,
    scheme: InitScheme,
    vb: VarBuilder,
) -> Result<crate::conv::ConvTranspose2d> {
    if in_c == 0 || out_c == 0 || kernel == 0 {
        candle_core::bail!(
            "conv_transpose2d {}: channels and kernel must be positive, got in {in_c} out {out_c} kernel {kernel}",
            vb.prefix()
        );
    }
    if cfg.stride == 0 || cfg.dilation == 0 {
        candle_core::bail!(
            "conv_transpose2d {}: stride {} and dilation {} must be positive",
            vb.prefix(),
            cfg.stride,
            cfg.dilation
        );
    }
    // weight.size(1) is out_c for a transposed convolution.
    let fan_in = out_c * kernel * kernel;
    let weight = vb.get_with_hints(
        (in_c, out_c, kernel, kernel),
        "weight",
        scheme.weight(fan_in),
    )?;
    let bias = if bias {
        Some(vb.get_with_hints(out_c, "bias", scheme.bias(fan_in))?)
    } else {
        None
    };
    Ok(crate::conv::ConvTranspose2d::new(weight, bias, cfg))
}

/// A fully connected layer with weight `[out, in]` (named `weight`) and an optional bias
/// `[out]`, initialised by `scheme` with `fan_in = in`.
pub fn linear(
    in_features: usize,
    out_features: usize,
    bias: bool,
    scheme: InitScheme,
    vb: VarBuilder,
) -> Result<crate::rows::Linear> {
    if in_features == 0 || out_features == 0 {
        candle_core::bail!(
            "linear {}: features must be positive, got in {in_features} out {out_features}",
            vb.prefix()
        );
    }
    let weight = vb.get_with_hints(
        (out_features, in_features),
        "weight",
        scheme.weight(in_features),
    )?;
    let bias = if bias {
        Some(vb.get_with_hints(out_features, "bias", scheme.bias(in_features))?)
    } else {
        None
    };
    Ok(crate::rows::Linear::new(weight, bias))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::ParamStore;
    use candle_nn::Module;

    fn values(store: &ParamStore, name: &str) -> Vec<f64> {
        store
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn max_abs(v: &[f64]) -> f64 {
        v.iter().fold(0.0, |m, x| m.max(x.abs()))
    }

    fn mean_std(v: &[f64]) -> (f64, f64) {
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt())
    }

    /// Samples inside `(-bound, bound)` that also reach close to it (so a too-small bound fails).
    fn assert_fills_bound(v: &[f64], bound: f64) {
        let m = max_abs(v);
        assert!(m <= bound, "max |w| {m} exceeds bound {bound}");
        assert!(m > 0.9 * bound, "max |w| {m} far below bound {bound}");
    }

    #[test]
    fn torch_default_conv2d_bounds() {
        let store = ParamStore::new(1, DType::F64, &Device::Cpu);
        let vb = store.var_builder();
        let cfg = candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv = conv2d(8, 16, 3, cfg, true, InitScheme::TorchDefault, vb.pp("c")).unwrap();
        let bound = 1.0 / ((8 * 3 * 3) as f64).sqrt();
        assert_fills_bound(&values(&store, "c.weight"), bound);
        let b = values(&store, "c.bias");
        assert_eq!(b.len(), 16);
        assert!(max_abs(&b) <= bound);
        let x = Tensor::ones((1, 8, 5, 5), DType::F64, &Device::Cpu).unwrap();
        assert_eq!(conv.forward(&x).unwrap().dims(), &[1, 16, 5, 5]);
    }

    #[test]
    fn torch_default_conv_transpose_uses_out_channels_for_fan_in() {
        let store = ParamStore::new(2, DType::F64, &Device::Cpu);
        let cfg = candle_nn::ConvTranspose2dConfig {
            stride: 2,
            padding: 1,
            ..Default::default()
        };
        // in 64, out 4: fan_in = 4 * 16 = 64 (bound 0.125), not 64 * 16 = 1024 (bound 0.03125).
        conv_transpose2d(
            64,
            4,
            4,
            cfg,
            true,
            InitScheme::TorchDefault,
            store.var_builder().pp("up"),
        )
        .unwrap();
        let w = values(&store, "up.weight");
        assert_eq!(store.get("up.weight").unwrap().dims(), &[64, 4, 4, 4]);
        assert_fills_bound(&w, 0.125);
        assert!(max_abs(&values(&store, "up.bias")) <= 0.125);
    }

    #[test]
    fn torch_default_linear_bounds_and_no_bias() {
        let store = ParamStore::new(3, DType::F64, &Device::Cpu);
        let lin = linear(25, 40, false, InitScheme::TorchDefault, store.var_builder()).unwrap();
        assert!(lin.bias().is_none());
        assert!(store.get("bias").is_none());
        assert_fills_bound(&values(&store, "weight"), 0.2);
    }

    #[test]
    fn pix2pix_weights_normal_biases_zero() {
        let store = ParamStore::new(4, DType::F64, &Device::Cpu);
        conv2d(
            32,
            64,
            4,
            Default::default(),
            true,
            InitScheme::Pix2Pix,
            store.var_builder(),
        )
        .unwrap();
        let (mean, std) = mean_std(&values(&store, "weight"));
        assert!(mean.abs() < 0.001, "mean {mean}");
        assert!((std - PIX2PIX_STD).abs() < 0.001, "std {std}");
        assert!(values(&store, "bias").iter().all(|b| *b == 0.0));
    }

    #[test]
    fn conv2d_without_bias_and_with_groups() {
        let store = ParamStore::new(5, DType::F32, &Device::Cpu);
        let cfg = candle_nn::Conv2dConfig {
            groups: 4,
            ..Default::default()
        };
        let conv = conv2d(
            8,
            4,
            3,
            cfg,
            false,
            InitScheme::TorchDefault,
            store.var_builder(),
        )
        .unwrap();
        assert!(conv.bias().is_none());
        assert_eq!(store.names(), vec!["weight".to_string()]);
        assert_eq!(conv.weight().dims(), &[4, 2, 3, 3]);
        let bound = 1.0 / ((2 * 9) as f64).sqrt();
        let w: Vec<f32> = conv.weight().flatten_all().unwrap().to_vec1().unwrap();
        assert!(w.iter().all(|v| f64::from(v.abs()) <= bound));
    }

    #[test]
    fn invalid_layer_shapes_error_with_numbers() {
        let store = ParamStore::new(6, DType::F32, &Device::Cpu);
        let cfg = candle_nn::Conv2dConfig {
            groups: 3,
            ..Default::default()
        };
        let err = conv2d(
            8,
            6,
            3,
            cfg,
            true,
            InitScheme::TorchDefault,
            store.var_builder().pp("enc"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("enc") && err.contains("groups 3"), "{err}");
        assert!(linear(0, 3, true, InitScheme::TorchDefault, store.var_builder()).is_err());
        assert!(store.is_empty());
    }

    #[test]
    fn kaiming_hint_follows_formula() {
        let mut rng = SeededRng::new(8);
        let shape = Shape::from((50, 20, 3, 3));
        let t = sample_init(
            &candle_nn::init::DEFAULT_KAIMING_NORMAL,
            &shape,
            &mut rng,
            DType::F64,
            &Device::Cpu,
        )
        .unwrap();
        let (_, std) = mean_std(&t.flatten_all().unwrap().to_vec1().unwrap());
        let expected = 2f64.sqrt() / 180f64.sqrt();
        assert!(
            (std - expected).abs() < 0.03 * expected,
            "{std} vs {expected}"
        );

        let t = sample_init(
            &candle_nn::init::DEFAULT_KAIMING_UNIFORM,
            &shape,
            &mut rng,
            DType::F64,
            &Device::Cpu,
        )
        .unwrap();
        let v: Vec<f64> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert_fills_bound(&v, 3f64.sqrt() * expected);

        let c = sample_init(
            &Init::Const(0.5),
            &shape,
            &mut rng,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let v: Vec<f32> = c.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| *x == 0.5));
    }

    #[test]
    fn scheme_serde_names() {
        assert_eq!(
            serde_json::to_string(&InitScheme::Pix2Pix).unwrap(),
            "\"pix2pix\""
        );
        let s: InitScheme = serde_json::from_str("\"torch_default\"").unwrap();
        assert_eq!(s, InitScheme::TorchDefault);
        assert!(matches!(
            InitScheme::TorchDefault.batch_norm_weight(),
            Init::Const(v) if v == 1.0
        ));
    }
}
