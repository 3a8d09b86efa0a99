//! The conditional PatchGAN discriminator of pix2pix ("basic", 70×70 receptive field;
//! `NLayerDiscriminator` in `models_pix2pix/networks.py`, spec §3).
//!
//! Input: `concat(mask, image)` along the channels (2 channels for grey images, 4 for RGB).
//! Layers, for `n_layers = 3` and `ndf = 64`:
//! `Conv 4×4 s2 p1 (→64, bias) → LReLU 0.2`, then `Conv s2 (→128) → BN → LReLU`,
//! `Conv s2 (→256) → BN → LReLU`, `Conv s1 (→512) → BN → LReLU`, `Conv 4×4 s1 p1 (→1, bias)`.
//! Widths grow as `ndf · min(2^n, 8)`. A 256×256 input gives a 30×30 map of logits, one per
//! overlapping 70×70 patch. Parameters are named like the reference's `nn.Sequential`
//! (`model.0.weight`, `model.2.weight`, `model.3.running_mean`, ...).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use genseg_nn::batch_norm::{BatchNorm2d, BatchNormConfig};
use genseg_nn::conv::Conv2d;
use genseg_nn::init::{InitScheme, conv2d};
use genseg_nn::ops::leaky_relu;
use serde::{Deserialize, Serialize};

/// Every hyperparameter of a [`PatchDiscriminator`]; defaults are the reference's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscriminatorConfig {
    /// Channels of `concat(mask, image)`: mask channels + image channels (2 or 4).
    pub in_channels: usize,
    /// Width of the first layer (`--ndf`, 64).
    pub ndf: usize,
    /// Number of stride-2 convolutions (3 for the 70×70 PatchGAN).
    pub n_layers: usize,
    /// Weight initialisation (`N(0, 0.02)` in the reference).
    pub init: InitScheme,
}

impl Default for DiscriminatorConfig {
    fn default() -> Self {
        Self {
            in_channels: 2,
            ndf: 64,
            n_layers: 3,
            init: InitScheme::Pix2Pix,
        }
    }
}

impl DiscriminatorConfig {
    /// Checks the numbers before any weight is allocated.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.in_channels > 0,
            "discriminator: in_channels must be > 0"
        );
        anyhow::ensure!(self.ndf > 0, "discriminator: ndf must be > 0");
        anyhow::ensure!(
            (1..=8).contains(&self.n_layers),
            "discriminator: n_layers {} is outside 1..=8",
            self.n_layers
        );
        Ok(())
    }

    /// Side of the logit map for an input side `size` (`None` if the input is too small):
    /// `n_layers` stride-2 convolutions (`⌊size/2⌋` each), then two stride-1 ones (`-1` each).
    pub fn output_size(&self, size: usize) -> Option<usize> {
        let mut s = size;
        for _ in 0..self.n_layers {
            // floor((s + 2 - 4) / 2) + 1, defined for s >= 2
            s = (s.checked_sub(2)?) / 2 + 1;
        }
        for _ in 0..2 {
            s = s.checked_sub(1)?;
        }
        (s > 0).then_some(s)
    }
}

const LEAKY_SLOPE: f64 = 0.2;

#[derive(Debug, Clone)]
struct Layer {
    conv: Conv2d,
    norm: Option<BatchNorm2d>,
    activation: bool,
}

/// The conditional PatchGAN discriminator (see the module docs).
#[derive(Debug, Clone)]
pub struct PatchDiscriminator {
    cfg: DiscriminatorConfig,
    prefix: String,
    dtype: candle_core::DType,
    layers: Vec<Layer>,
}

impl PatchDiscriminator {
    /// Builds the discriminator; parameters are created (or fetched) through `vb` under
    /// `model.<index>` as in the reference.
    pub fn new(cfg: &DiscriminatorConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        cfg.validate()?;
        let init = cfg.init;
        let bn = BatchNormConfig::default();
        let vb_model = vb.pp("model");
        let conv_cfg = |stride| Conv2dConfig {
            padding: 1,
            stride,
            ..Default::default()
        };
        let width = |n: usize| cfg.ndf * (1usize << n.min(3));
        let mut layers = Vec::with_capacity(cfg.n_layers + 2);
        // Index into the reference's nn.Sequential (activations take an index too).
        let mut idx = 0;
        layers.push(Layer {
            conv: conv2d(
                cfg.in_channels,
                cfg.ndf,
                4,
                conv_cfg(2),
                true,
                init,
                vb_model.pp(idx.to_string()),
            )?,
            norm: None,
            activation: true,
        });
        idx += 2;
        for n in 1..=cfg.n_layers {
            // The last of these keeps the resolution (stride 1).
            let stride = if n == cfg.n_layers { 1 } else { 2 };
            let conv = conv2d(
                width(n - 1),
                width(n),
                4,
                conv_cfg(stride),
                false,
                init,
                vb_model.pp(idx.to_string()),
            )?;
            let norm = BatchNorm2d::new(width(n), bn, init, vb_model.pp((idx + 1).to_string()))?;
            layers.push(Layer {
                conv,
                norm: Some(norm),
                activation: true,
            });
            idx += 3;
        }
        layers.push(Layer {
            conv: conv2d(
                width(cfg.n_layers),
                1,
                4,
                conv_cfg(1),
                true,
                init,
                vb_model.pp(idx.to_string()),
            )?,
            norm: None,
            activation: false,
        });
        Ok(Self {
            cfg: cfg.clone(),
            prefix: vb.prefix(),
            dtype: vb.dtype(),
            layers,
        })
    }

    /// The configuration the discriminator was built from.
    pub fn config(&self) -> &DiscriminatorConfig {
        &self.cfg
    }

    /// The parameter groups as `(group, name prefix)`: one group, `"weights"`.
    pub fn param_groups(&self) -> Vec<(&'static str, String)> {
        vec![(
            "weights",
            if self.prefix.is_empty() {
                "model".to_string()
            } else {
                format!("{}.model", self.prefix)
            },
        )]
    }

    /// Patch logits `[B, 1, h, w]` for masks `[B, Cm, H, W]` and images `[B, Ci, H, W]`,
    /// judged together as `concat(mask, image)` (pix2pix's `cat((real_A, fake_B), 1)`).
    /// `train` selects BatchNorm batch statistics.
    pub fn forward_t(&self, mask: &Tensor, image: &Tensor, train: bool) -> Result<Tensor> {
        let dtype = self.dtype;
        let pair =
            Tensor::cat(&[&mask.to_dtype(dtype)?, &image.to_dtype(dtype)?], 1).map_err(|e| {
                candle_core::Error::Msg(format!(
                    "discriminator: cannot concatenate mask {:?} and image {:?}: {e}",
                    mask.dims(),
                    image.dims()
                ))
            })?;
        self.forward_pair_t(&pair, train)
    }

    /// Patch logits for an already concatenated `[B, in_channels, H, W]` input.
    pub fn forward_pair_t(&self, pair: &Tensor, train: bool) -> Result<Tensor> {
        let (_, c, h, w) = pair.dims4().map_err(|_| {
            candle_core::Error::Msg(format!(
                "discriminator: expected a [B, C, H, W] input, got shape {:?}",
                pair.dims()
            ))
        })?;
        if c != self.cfg.in_channels {
            candle_core::bail!(
                "discriminator: input has {c} channels, expected {} (mask + image)",
                self.cfg.in_channels
            );
        }
        if self.cfg.output_size(h).is_none() || self.cfg.output_size(w).is_none() {
            candle_core::bail!(
                "discriminator: input {h}x{w} is too small for {} layers",
                self.cfg.n_layers
            );
        }
        let mut x = pair.to_dtype(self.dtype)?;
        for layer in &self.layers {
            x = layer.conv.forward(&x)?;
            if let Some(norm) = &layer.norm {
                x = norm.forward_t(&x, train)?;
            }
            if layer.activation {
                x = leaky_relu(&x, LEAKY_SLOPE)?;
            }
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use genseg_nn::params::ParamStore;

    fn formula(in_c: usize, ndf: usize) -> usize {
        let conv = |i: usize, o: usize, bias: bool| i * o * 16 + if bias { o } else { 0 };
        conv(in_c, ndf, true)
            + conv(ndf, 2 * ndf, false)
            + 2 * 2 * ndf
            + conv(2 * ndf, 4 * ndf, false)
            + 2 * 4 * ndf
            + conv(4 * ndf, 8 * ndf, false)
            + 2 * 8 * ndf
            + conv(8 * ndf, 1, true)
    }

    #[test]
    fn reference_size_and_names() -> anyhow::Result<()> {
        // ndf 64, mask + RGB: the ≈2.8 M of spec §3.
        assert_eq!(formula(4, 64), 2_766_657);
        let store = ParamStore::new(0, DType::F32, &Device::Cpu);
        let cfg = DiscriminatorConfig {
            in_channels: 4,
            ..Default::default()
        };
        PatchDiscriminator::new(&cfg, store.var_builder().pp("netD"))?;
        assert_eq!(store.num_trainable_params(), formula(4, 64));
        for name in [
            "netD.model.0.bias",
            "netD.model.2.weight",
            "netD.model.3.running_mean",
            "netD.model.8.weight",
            "netD.model.9.weight",
            "netD.model.11.bias",
        ] {
            assert!(store.get(name).is_some(), "{name} missing");
        }
        assert!(
            store.get("netD.model.2.bias").is_none(),
            "no bias before BatchNorm"
        );
        Ok(())
    }

    #[test]
    fn patch_map_is_30x30_for_256_px() -> anyhow::Result<()> {
        let cfg = DiscriminatorConfig {
            ndf: 2,
            ..Default::default()
        };
        assert_eq!(cfg.output_size(256), Some(30));
        assert_eq!(cfg.output_size(64), Some(6));
        assert_eq!(cfg.output_size(16), None);
        let store = ParamStore::new(1, DType::F32, &Device::Cpu);
        let d = PatchDiscriminator::new(&cfg, store.var_builder())?;
        let mask = Tensor::zeros((2, 1, 256, 256), DType::F32, &Device::Cpu)?;
        let image = Tensor::rand(0f32, 1., (2, 1, 256, 256), &Device::Cpu)?;
        assert_eq!(d.forward_t(&mask, &image, true)?.dims(), &[2, 1, 30, 30]);
        assert_eq!(d.forward_t(&mask, &image, false)?.dims(), &[2, 1, 30, 30]);
        assert_eq!(d.param_groups(), vec![("weights", "model".to_string())]);
        Ok(())
    }

    #[test]
    fn every_parameter_receives_gradient() -> anyhow::Result<()> {
        let cfg = DiscriminatorConfig {
            in_channels: 4,
            ndf: 2,
            ..Default::default()
        };
        let store = ParamStore::new(2, DType::F32, &Device::Cpu);
        let d = PatchDiscriminator::new(&cfg, store.var_builder())?;
        let mask = Tensor::rand(0f32, 1., (2, 1, 32, 32), &Device::Cpu)?;
        let image = Tensor::rand(0f32, 1., (2, 3, 32, 32), &Device::Cpu)?;
        let logits = d.forward_t(&mask, &image, true)?;
        let loss = crate::loss::gan_loss(&logits, true, crate::loss::GanMode::Vanilla)?;
        genseg_nn::gradcheck::assert_all_params_receive_gradient(&loss, &store.trainable_vars())
    }

    #[test]
    fn bad_inputs_are_named_errors() -> anyhow::Result<()> {
        let store = ParamStore::new(3, DType::F32, &Device::Cpu);
        let bad = DiscriminatorConfig {
            n_layers: 0,
            ..Default::default()
        };
        assert!(PatchDiscriminator::new(&bad, store.var_builder()).is_err());
        let d = PatchDiscriminator::new(
            &DiscriminatorConfig {
                ndf: 2,
                ..Default::default()
            },
            store.var_builder(),
        )?;
        let m = Tensor::zeros((1, 1, 32, 32), DType::F32, &Device::Cpu)?;
        let rgb = Tensor::zeros((1, 3, 32, 32), DType::F32, &Device::Cpu)?;
        let e = d.forward_t(&m, &rgb, false).unwrap_err().to_string();
        assert!(e.contains("4 channels") && e.contains("expected 2"), "{e}");
        let other = Tensor::zeros((1, 1, 16, 32), DType::F32, &Device::Cpu)?;
        assert!(
            d.forward_t(&m, &other, false)
                .unwrap_err()
                .to_string()
                .contains("cannot concatenate")
        );
        let tiny = Tensor::zeros((1, 1, 16, 16), DType::F32, &Device::Cpu)?;
        assert!(
            d.forward_t(&tiny, &tiny, false)
                .unwrap_err()
                .to_string()
                .contains("too small")
        );
        Ok(())
    }
}
