//! [`BatchNorm2d`] with PyTorch's train/eval semantics and running statistics.
//!
//! candle_nn's `BatchNorm` does not match `torch.nn.BatchNorm2d` closely enough for
//! GenSeg's networks (pix2pix generator, U-Net / DeepLab segmenters), so this one does,
//! explicitly:
//! - training: normalise with the batch mean and *biased* variance over `(N, H, W)`, and
//!   update `running = (1 - momentum) * running + momentum * batch_stat`, with the
//!   *unbiased* variance for `running_var`;
//! - evaluation: normalise with the running statistics.
//!
//! Parameters are named as in PyTorch (`weight` = gamma, `bias` = beta, `running_mean`,
//! `running_var`) and created through the `VarBuilder`, so with a
//! [`crate::params::ParamStore`] the running statistics are buffers: saved and loaded with
//! the weights, never handed to an optimizer. Gradients flow to the input, `weight` and
//! `bias` through ordinary candle ops.

use candle_core::{DType, Result, Tensor, Var};
use candle_nn::{ModuleT, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::init::InitScheme;

mod fused;

/// Every channel of `x` `[N, C, H, W]` normalised by its own statistics over `(N, H, W)`
/// (biased variance), then `· gamma + beta` (`[C]` each, both differentiable): training-mode
/// batch normalisation without running statistics, on the fused CPU kernels (`x` must be
/// on the CPU in f32 or f64). Instance normalisation runs on it with the planes as
/// channels.
pub(crate) fn normalise_by_own_statistics(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let stats = x.apply_op1_no_bwd(&fused::ChannelStats)?;
    let affine = Tensor::stack(&[gamma.to_dtype(x.dtype())?, beta.to_dtype(x.dtype())?], 0)?;
    x.apply_op3(&affine, &stats, fused::BatchNormTrain { eps, relu: false })
}

/// Hyperparameters of [`BatchNorm2d`]; defaults are PyTorch's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BatchNormConfig {
    /// Added to the variance before the square root (`1e-5`).
    pub eps: f64,
    /// Weight of the current batch in the running statistics (`0.1`).
    pub momentum: f64,
    /// Whether to learn a per-channel scale and shift (`true`).
    pub affine: bool,
}

impl Default for BatchNormConfig {
    fn default() -> Self {
        Self {
            eps: 1e-5,
            momentum: 0.1,
            affine: true,
        }
    }
}

/// Batch normalisation over the channels of `[N, C, H, W]` inputs.
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    num_features: usize,
    config: BatchNormConfig,
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    running_mean: Var,
    running_var: Var,
}

impl BatchNorm2d {
    /// A BatchNorm over `num_features` channels; `scheme` initialises `weight` (gamma).
    ///
    /// The running statistics are the `VarBuilder`'s vars when it hands out vars (as
    /// `ParamStore` does), so updating them here updates what gets saved. With a backend
    /// of plain tensors (e.g. loaded for inference) they are private copies instead.
    pub fn new(
        num_features: usize,
        config: BatchNormConfig,
        scheme: InitScheme,
        vb: VarBuilder,
    ) -> Result<Self> {
        if num_features == 0 {
            candle_core::bail!("batch_norm {}: num_features must be positive", vb.prefix());
        }
        if !config.eps.is_finite() || config.eps < 0.0 {
            candle_core::bail!(
                "batch_norm {}: eps must be finite and >= 0, got {}",
                vb.prefix(),
                config.eps
            );
        }
        if !(0.0..=1.0).contains(&config.momentum) {
            candle_core::bail!(
                "batch_norm {}: momentum must be in [0, 1], got {}",
                vb.prefix(),
                config.momentum
            );
        }
        let (weight, bias) = if config.affine {
            (
                Some(vb.get_with_hints(num_features, "weight", scheme.batch_norm_weight())?),
                Some(vb.get_with_hints(num_features, "bias", scheme.batch_norm_bias())?),
            )
        } else {
            (None, None)
        };
        let running_mean = Var::from_tensor(&vb.get_with_hints(
            num_features,
            "running_mean",
            candle_nn::init::ZERO,
        )?)?;
        let running_var = Var::from_tensor(&vb.get_with_hints(
            num_features,
            "running_var",
            candle_nn::init::ONE,
        )?)?;
        Ok(Self {
            num_features,
            config,
            weight,
            bias,
            running_mean,
            running_var,
        })
    }

    /// Number of channels.
    pub fn num_features(&self) -> usize {
        self.num_features
    }

    /// The hyperparameters.
    pub fn config(&self) -> &BatchNormConfig {
        &self.config
    }

    /// The scale gamma (`None` without `affine`).
    pub fn weight(&self) -> Option<&Tensor> {
        self.weight.as_ref()
    }

    /// The shift beta (`None` without `affine`).
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The running mean `[C]` used in evaluation.
    pub fn running_mean(&self) -> &Var {
        &self.running_mean
    }

    /// The running (unbiased) variance `[C]` used in evaluation.
    pub fn running_var(&self) -> &Var {
        &self.running_var
    }

    /// Normalises `x` `[N, C, H, W]`: with batch statistics (updating the running ones)
    /// when `train`, with the running statistics otherwise.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.normalise(x, train, false)
    }

    /// `relu(forward_t(x, train))`; in training on the CPU the ReLU runs inside the
    /// normalisation's own pass (and its backward), saving two passes over the activation.
    pub fn forward_relu_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.normalise(x, train, true)
    }

    fn normalise(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        let fused = train && crate::storage::on_cpu_kernels(&[x]);
        self.normalise_with(x, train, relu, fused)
    }

    fn normalise_with(&self, x: &Tensor, train: bool, relu: bool, fused: bool) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4().map_err(|_| {
            candle_core::Error::Msg(format!(
                "batch_norm: expected a [N, C, H, W] input, got shape {:?}",
                x.dims()
            ))
        })?;
        if c != self.num_features {
            candle_core::bail!(
                "batch_norm: input has {c} channels, the layer {} (shape {:?})",
                self.num_features,
                x.dims()
            );
        }
        let stat_dtype = self.running_mean.dtype();
        if train && n * h * w < 2 {
            // PyTorch refuses too: the unbiased variance of one value is undefined.
            candle_core::bail!(
                "batch_norm: training needs more than one value per channel, got input shape {:?}",
                x.dims()
            );
        }
        if fused {
            return self.normalise_fused(x, relu, stat_dtype);
        }
        let x_hat = if train {
            let count = n * h * w;
            // [N, C, H, W] -> [1, C, 1, 1]
            let mean = x.mean_keepdim((0, 2, 3))?;
            let centered = x.broadcast_sub(&mean)?;
            let var = centered.sqr()?.mean_keepdim((0, 2, 3))?;
            self.update_running_stats(&mean, &var, count, stat_dtype)?;
            centered.broadcast_div(&(var + self.config.eps)?.sqrt()?)?
        } else {
            let shape = (1, c, 1, 1);
            let mean = self
                .running_mean
                .as_detached_tensor()
                .to_dtype(x.dtype())?
                .reshape(shape)?;
            let std = (self.running_var.as_detached_tensor().to_dtype(x.dtype())?
                + self.config.eps)?
                .sqrt()?
                .reshape(shape)?;
            x.broadcast_sub(&mean)?.broadcast_div(&std)?
        };
        let y = match (&self.weight, &self.bias) {
            (Some(weight), Some(bias)) => {
                let weight = weight.to_dtype(x.dtype())?.reshape((1, c, 1, 1))?;
                let bias = bias.to_dtype(x.dtype())?.reshape((1, c, 1, 1))?;
                x_hat.broadcast_mul(&weight)?.broadcast_add(&bias)?
            }
            _ => x_hat,
        };
        if relu { y.relu() } else { Ok(y) }
    }

    /// Training mode on the CPU: batch statistics and normalisation as custom ops.
    fn normalise_fused(&self, x: &Tensor, relu: bool, stat_dtype: DType) -> Result<Tensor> {
        let x = x.contiguous()?;
        let (n, c, h, w) = x.dims4()?;
        let stats = x.apply_op1_no_bwd(&fused::ChannelStats)?;
        self.update_running_stats(&stats.get(0)?, &stats.get(1)?, n * h * w, stat_dtype)?;
        let affine = match (&self.weight, &self.bias) {
            (Some(weight), Some(bias)) => {
                Tensor::stack(&[weight.to_dtype(x.dtype())?, bias.to_dtype(x.dtype())?], 0)?
            }
            _ => Tensor::stack(
                &[
                    Tensor::ones(c, x.dtype(), x.device())?,
                    Tensor::zeros(c, x.dtype(), x.device())?,
                ],
                0,
            )?,
        };
        let op = fused::BatchNormTrain {
            eps: self.config.eps,
            relu,
        };
        x.apply_op3(&affine, &stats, op)
    }

    fn update_running_stats(
        &self,
        batch_mean: &Tensor,
        batch_var: &Tensor,
        count: usize,
        dtype: DType,
    ) -> Result<()> {
        let m = self.config.momentum;
        let unbiased = count as f64 / (count - 1) as f64;
        // [1, C, 1, 1] -> [C], out of the autograd graph.
        let batch_mean = batch_mean.detach().flatten_all()?.to_dtype(dtype)?;
        let batch_var = (batch_var.detach().flatten_all()? * unbiased)?.to_dtype(dtype)?;
        let new_mean = (self
            .running_mean
            .as_detached_tensor()
            .affine(1.0 - m, 0.0)?
            + batch_mean.affine(m, 0.0)?)?;
        let new_var = (self.running_var.as_detached_tensor().affine(1.0 - m, 0.0)?
            + batch_var.affine(m, 0.0)?)?;
        self.running_mean.set(&new_mean)?;
        self.running_var.set(&new_var)
    }
}

impl ModuleT for BatchNorm2d {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        BatchNorm2d::forward_t(self, xs, train)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{GradCheckOptions, check_gradients};
    use crate::params::ParamStore;
    use crate::rng::{SeededRng, normal};
    use candle_core::Device;
    use std::collections::HashMap;

    fn vec1(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// x for 2 channels, N = 2, H = 1, W = 2: channel 0 holds 1, 2, 3, 6; channel 1 holds 0, 0, 4, 4.
    fn small_input(dtype: DType) -> Tensor {
        Tensor::new(
            &[
                [[[1.0f64, 2.0]], [[0.0, 0.0]]],
                [[[3.0, 6.0]], [[4.0, 4.0]]],
            ],
            &Device::Cpu,
        )
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
    }

    #[test]
    fn train_normalises_and_updates_running_stats_by_hand() {
        for dtype in [DType::F32, DType::F64] {
            let store = ParamStore::new(0, dtype, &Device::Cpu);
            let bn = BatchNorm2d::new(
                2,
                BatchNormConfig::default(),
                InitScheme::TorchDefault,
                store.var_builder().pp("bn"),
            )
            .unwrap();
            let y = bn.forward_t(&small_input(dtype), true).unwrap();
            assert_eq!(y.dtype(), dtype);
            // Channel 0: mean 3, biased var (4 + 1 + 0 + 9) / 4 = 3.5, unbiased 14 / 3.
            // Channel 1: mean 2, biased var 4, unbiased 16 / 3.
            let s0 = (3.5f64 + 1e-5).sqrt();
            let s1 = (4.0f64 + 1e-5).sqrt();
            let want = [
                -2.0 / s0,
                -1.0 / s0,
                -2.0 / s1,
                -2.0 / s1,
                0.0,
                3.0 / s0,
                2.0 / s1,
                2.0 / s1,
            ];
            let tol = if dtype == DType::F32 { 1e-6 } else { 1e-12 };
            for (g, w) in vec1(&y).iter().zip(want) {
                assert!((g - w).abs() < tol, "{dtype:?}: {g} vs {w}");
            }
            let rm = vec1(&store.get("bn.running_mean").unwrap());
            let rv = vec1(&store.get("bn.running_var").unwrap());
            let want_rm = [0.1 * 3.0, 0.1 * 2.0];
            let want_rv = [0.9 + 0.1 * 14.0 / 3.0, 0.9 + 0.1 * 16.0 / 3.0];
            for (g, w) in rm.iter().chain(&rv).zip(want_rm.iter().chain(&want_rv)) {
                assert!((g - w).abs() < tol, "{dtype:?}: running {g} vs {w}");
            }

            // A second batch compounds the momentum average.
            bn.forward_t(&small_input(dtype), true).unwrap();
            let rm = vec1(&store.get("bn.running_mean").unwrap());
            assert!((rm[0] - (0.9 * 0.3 + 0.3)).abs() < tol, "{rm:?}");
        }
    }

    #[test]
    fn eval_uses_running_stats_and_leaves_them_alone() {
        let store = ParamStore::new(0, DType::F64, &Device::Cpu);
        let bn = BatchNorm2d::new(
            2,
            BatchNormConfig::default(),
            InitScheme::TorchDefault,
            store.var_builder(),
        )
        .unwrap();
        bn.running_mean()
            .set(&Tensor::new(&[1.0f64, -1.0], &Device::Cpu).unwrap())
            .unwrap();
        bn.running_var()
            .set(&Tensor::new(&[4.0f64, 0.25], &Device::Cpu).unwrap())
            .unwrap();
        store
            .get("weight")
            .unwrap()
            .set(&Tensor::new(&[2.0f64, 3.0], &Device::Cpu).unwrap())
            .unwrap();
        store
            .get("bias")
            .unwrap()
            .set(&Tensor::new(&[0.5f64, -0.5], &Device::Cpu).unwrap())
            .unwrap();
        let y = vec1(&bn.forward_t(&small_input(DType::F64), false).unwrap());
        let s0 = (4.0f64 + 1e-5).sqrt();
        let s1 = (0.25f64 + 1e-5).sqrt();
        let f0 = |x: f64| 2.0 * (x - 1.0) / s0 + 0.5;
        let f1 = |x: f64| 3.0 * (x + 1.0) / s1 - 0.5;
        let want = [
            f0(1.0),
            f0(2.0),
            f1(0.0),
            f1(0.0),
            f0(3.0),
            f0(6.0),
            f1(4.0),
            f1(4.0),
        ];
        for (g, w) in y.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{g} vs {w}");
        }
        assert_eq!(vec1(bn.running_mean()), [1.0, -1.0]);
        assert_eq!(vec1(bn.running_var()), [4.0, 0.25]);
    }

    #[test]
    fn running_stats_are_buffers_of_the_store() {
        let store = ParamStore::new(0, DType::F32, &Device::Cpu);
        BatchNorm2d::new(
            4,
            BatchNormConfig::default(),
            InitScheme::Pix2Pix,
            store.var_builder().pp("bn"),
        )
        .unwrap();
        let names = |v: Vec<(String, Var)>| v.into_iter().map(|(n, _)| n).collect::<Vec<_>>();
        assert_eq!(names(store.trainable_vars()), ["bn.bias", "bn.weight"]);
        assert_eq!(
            names(store.buffers()),
            ["bn.running_mean", "bn.running_var"]
        );
        assert_eq!(vec1(&store.get("bn.running_var").unwrap()), [1.0; 4]);
        // Pix2Pix: gamma ~ N(1, 0.02), beta = 0.
        let gamma = vec1(&store.get("bn.weight").unwrap());
        assert!(gamma.iter().all(|g| (g - 1.0).abs() < 0.1) && gamma.iter().any(|g| *g != 1.0));
        assert_eq!(vec1(&store.get("bn.bias").unwrap()), [0.0; 4]);
    }

    #[test]
    fn without_affine_there_are_no_parameters() {
        let store = ParamStore::new(0, DType::F64, &Device::Cpu);
        let cfg = BatchNormConfig {
            affine: false,
            ..Default::default()
        };
        let bn = BatchNorm2d::new(2, cfg, InitScheme::TorchDefault, store.var_builder()).unwrap();
        assert!(bn.weight().is_none() && bn.bias().is_none());
        assert_eq!(store.num_trainable_params(), 0);
        let y = bn.forward_t(&small_input(DType::F64), true).unwrap();
        // Normalised per channel: zero mean.
        let m: Vec<f64> = vec1(&y.mean_keepdim((0, 2, 3)).unwrap());
        assert!(m.iter().all(|v| v.abs() < 1e-12), "{m:?}");
    }

    #[test]
    fn bad_inputs_error_with_shapes() {
        let store = ParamStore::new(0, DType::F64, &Device::Cpu);
        let bn = BatchNorm2d::new(
            3,
            BatchNormConfig::default(),
            InitScheme::TorchDefault,
            store.var_builder(),
        )
        .unwrap();
        let err = bn
            .forward_t(&small_input(DType::F64), true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("2 channels") && err.contains("3"), "{err}");
        let flat = Tensor::zeros((2, 3), DType::F64, &Device::Cpu).unwrap();
        assert!(
            bn.forward_t(&flat, false)
                .unwrap_err()
                .to_string()
                .contains("[2, 3]")
        );
        let single = Tensor::zeros((1, 3, 1, 1), DType::F64, &Device::Cpu).unwrap();
        assert!(bn.forward_t(&single, true).is_err());
        assert!(
            bn.forward_t(&single, false).is_ok(),
            "eval works on one value"
        );
        let bad_momentum = BatchNormConfig {
            momentum: 1.5,
            ..Default::default()
        };
        assert!(
            BatchNorm2d::new(
                3,
                bad_momentum,
                InitScheme::TorchDefault,
                store.var_builder().pp("x")
            )
            .is_err()
        );
    }

    /// Builds the layer from plain tensors so `check_gradients` can perturb gamma and beta.
    fn bn_loss(v: &[Tensor], train: bool) -> Result<Tensor> {
        let c = v[1].dim(0)?;
        let tensors = HashMap::from([
            ("weight".to_string(), v[1].clone()),
            ("bias".to_string(), v[2].clone()),
            (
                "running_mean".to_string(),
                Tensor::new(&[0.5f64, -0.2, 0.1], &Device::Cpu)?,
            ),
            (
                "running_var".to_string(),
                Tensor::new(&[1.5f64, 0.7, 2.0], &Device::Cpu)?,
            ),
        ]);
        let vb = VarBuilder::from_tensors(tensors, DType::F64, &Device::Cpu);
        let bn = BatchNorm2d::new(c, BatchNormConfig::default(), InitScheme::TorchDefault, vb)?;
        let y = bn.forward_t(&v[0], train)?;
        // A non-uniform weighting: the plain sum of a normalised output has zero gradient in x.
        (y * &v[3])?.sum_all()
    }

    #[test]
    fn gradients_match_finite_differences_in_train_and_eval() {
        let mut rng = SeededRng::new(17);
        let dev = Device::Cpu;
        let x = normal(&mut rng, (2, 3, 3, 2), 0.5, 2.0, DType::F64, &dev).unwrap();
        let gamma = normal(&mut rng, 3, 1.0, 0.3, DType::F64, &dev).unwrap();
        let beta = normal(&mut rng, 3, 0.0, 0.3, DType::F64, &dev).unwrap();
        let r = normal(&mut rng, (2, 3, 3, 2), 0.0, 1.0, DType::F64, &dev).unwrap();
        for train in [true, false] {
            let report = check_gradients(
                |v| bn_loss(v, train),
                &[x.clone(), gamma.clone(), beta.clone(), r.clone()],
                GradCheckOptions::default(),
            )
            .unwrap();
            report.ensure(1e-6).unwrap();
        }
    }

    /// The fused CPU path against the composed candle ops it replaces: outputs, running
    /// statistics and gradients (x, gamma, beta), with and without ReLU, f32.
    #[test]
    fn fused_training_path_matches_composed_ops() {
        for (relu, dims) in [
            (false, [2usize, 3, 5, 7]),
            (true, [1, 4, 6, 6]),
            (true, [3, 1, 2, 9]),
        ] {
            let mut results = Vec::new();
            for fused in [true, false] {
                let store = ParamStore::new(3, DType::F32, &Device::Cpu);
                let bn = BatchNorm2d::new(
                    dims[1],
                    BatchNormConfig::default(),
                    InitScheme::Pix2Pix,
                    store.var_builder(),
                )
                .unwrap();
                let mut rng = SeededRng::new(9);
                let x = Var::from_tensor(
                    &normal(&mut rng, &dims[..], 0.5, 2.0, DType::F32, &Device::Cpu).unwrap(),
                )
                .unwrap();
                let y = bn.normalise_with(x.as_tensor(), true, relu, fused).unwrap();
                let weights =
                    normal(&mut rng, &dims[..], 0.0, 1.0, DType::F32, &Device::Cpu).unwrap();
                let grads = (&y * &weights)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let mut got = vec![
                    vec1(&y),
                    vec1(bn.running_mean().as_tensor()),
                    vec1(bn.running_var().as_tensor()),
                ];
                got.push(vec1(grads.get(x.as_tensor()).unwrap()));
                got.push(vec1(grads.get(bn.weight().unwrap()).unwrap()));
                got.push(vec1(grads.get(bn.bias().unwrap()).unwrap()));
                results.push(got);
            }
            for (k, (a, b)) in results[0].iter().zip(&results[1]).enumerate() {
                for (u, v) in a.iter().zip(b) {
                    assert!(
                        (u - v).abs() <= 1e-4 * (1.0 + v.abs()),
                        "relu {relu} {dims:?} tensor {k}: {u} vs {v}"
                    );
                }
            }
        }
    }

    #[test]
    fn fused_gradients_match_finite_differences() {
        for relu in [false, true] {
            let store = ParamStore::new(4, DType::F64, &Device::Cpu);
            let bn = BatchNorm2d::new(
                3,
                BatchNormConfig::default(),
                InitScheme::Pix2Pix,
                store.var_builder(),
            )
            .unwrap();
            let mut rng = SeededRng::new(5);
            let x = normal(&mut rng, (2, 3, 3, 4), 0.3, 1.5, DType::F64, &Device::Cpu).unwrap();
            let weights =
                normal(&mut rng, (2, 3, 3, 4), 0.0, 1.0, DType::F64, &Device::Cpu).unwrap();
            let gamma = bn.weight().unwrap().clone();
            let beta = bn.bias().unwrap().clone();
            check_gradients(
                |v| {
                    let affine = Tensor::stack(&[&v[1], &v[2]], 0)?;
                    let stats = v[0].apply_op1_no_bwd(&fused::ChannelStats)?;
                    let y =
                        v[0].apply_op3(&affine, &stats, fused::BatchNormTrain { eps: 1e-5, relu })?;
                    (y * &weights)?.sum_all()
                },
                &[x, gamma, beta],
                GradCheckOptions::default(),
            )
            .unwrap()
            .assert_ok(1e-6);
        }
    }
}
