//! UNet (Ronneberger et al. 2015) as in the GenSeg reference code, which uses
//! the milesial Pytorch-UNet (`unet/unet_model.py`, `unet/unet_parts.py`;
//! spec §4).
//!
//! Encoder: `DoubleConv(in -> w)`, then `depth` times `MaxPool 2 -> DoubleConv`
//! doubling the width. Decoder: per level an up-sampling step (2x2 stride-2
//! transposed conv halving the channels, the reference default, or bilinear x2
//! with `align_corners = true`), zero padding to the skip's size, concat
//! `[skip, up]`, `DoubleConv`. A final 1x1 conv gives the logits.
//! `DoubleConv = (Conv 3x3 p1 no-bias -> BatchNorm -> ReLU) x 2`.
//! At base width 64, depth 4, 3 input channels, 1 output: 31,037,633
//! parameters, like the reference.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, ConvTranspose2dConfig, VarBuilder};
use genseg_nn::batch_norm::{BatchNorm2d, BatchNormConfig};
use genseg_nn::conv::{Conv2d, ConvTranspose2d};
use genseg_nn::init::{InitScheme, conv_transpose2d, conv2d};
use genseg_nn::ops::{max_pool2d, resize_bilinear};
use serde::{Deserialize, Serialize};

use crate::SegModel;

/// How the decoder doubles the spatial size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Upsampling {
    /// 2x2 stride-2 transposed convolution (the reference's default).
    #[default]
    TransposedConv,
    /// Bilinear x2 (`align_corners = true`) with the reference's narrower
    /// bottleneck (`factor = 2`).
    Bilinear,
}

/// Every hyperparameter of a [`UNet`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UNetConfig {
    /// Image channels (1 for X-ray, 3 for photographs).
    pub in_channels: usize,
    /// Logit channels (1 for binary segmentation).
    pub out_channels: usize,
    /// Width of the first level; level `i` has `base_width * 2^i` channels.
    pub base_width: usize,
    /// Number of down-sampling steps (4 in the reference).
    pub depth: usize,
    /// Decoder up-sampling.
    pub upsampling: Upsampling,
    /// Weight initialisation (PyTorch defaults in the reference).
    pub init: InitScheme,
}

impl Default for UNetConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 1,
            base_width: 64,
            depth: 4,
            upsampling: Upsampling::TransposedConv,
            init: InitScheme::TorchDefault,
        }
    }
}

impl UNetConfig {
    /// Checks the numbers before any weight is allocated.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.in_channels > 0, "unet: in_channels must be > 0");
        anyhow::ensure!(self.out_channels > 0, "unet: out_channels must be > 0");
        anyhow::ensure!(
            (1..=8).contains(&self.depth),
            "unet: depth {} is outside 1..=8",
            self.depth
        );
        anyhow::ensure!(
            self.base_width >= 2 && self.base_width % 2 == 0,
            "unet: base_width {} must be even and >= 2 (the decoder halves widths)",
            self.base_width
        );
        Ok(())
    }

    /// The smallest input side that survives `depth` 2x poolings.
    pub fn min_input_size(&self) -> usize {
        1 << self.depth
    }
}

/// `(Conv 3x3 -> BN -> ReLU) x 2`.
#[derive(Debug)]
struct DoubleConv {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
}

impl DoubleConv {
    fn new(
        c_in: usize,
        c_out: usize,
        c_mid: usize,
        init: InitScheme,
        vb: VarBuilder,
    ) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let bn = BatchNormConfig::default();
        // Parameter paths follow the reference's nn.Sequential indices.
        let vb = vb.pp("double_conv");
        Ok(Self {
            conv1: conv2d(c_in, c_mid, 3, cfg, false, init, vb.pp("0"))?,
            bn1: BatchNorm2d::new(c_mid, bn, init, vb.pp("1"))?,
            conv2: conv2d(c_mid, c_out, 3, cfg, false, init, vb.pp("3"))?,
            bn2: BatchNorm2d::new(c_out, bn, init, vb.pp("4"))?,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = self.bn1.forward_relu_t(&self.conv1.forward(x)?, train)?;
        self.bn2.forward_relu_t(&self.conv2.forward(&x)?, train)
    }
}

#[derive(Debug)]
struct Up {
    /// `None` for bilinear up-sampling (no weights).
    transposed: Option<ConvTranspose2d>,
    conv: DoubleConv,
}

impl Up {
    fn new(
        c_in: usize,
        c_out: usize,
        up: Upsampling,
        init: InitScheme,
        vb: VarBuilder,
    ) -> Result<Self> {
        match up {
            Upsampling::TransposedConv => {
                let cfg = ConvTranspose2dConfig {
                    stride: 2,
                    ..Default::default()
                };
                Ok(Self {
                    transposed: Some(conv_transpose2d(
                        c_in,
                        c_in / 2,
                        2,
                        cfg,
                        true,
                        init,
                        vb.pp("up"),
                    )?),
                    conv: DoubleConv::new(c_in, c_out, c_out, init, vb.pp("conv"))?,
                })
            }
            Upsampling::Bilinear => Ok(Self {
                transposed: None,
                conv: DoubleConv::new(c_in, c_out, c_in / 2, init, vb.pp("conv"))?,
            }),
        }
    }

    fn forward_t(&self, x: &Tensor, skip: &Tensor, train: bool) -> Result<Tensor> {
        let up = match &self.transposed {
            Some(t) => t.forward(x)?,
            None => {
                let (_, _, h, w) = x.dims4()?;
                resize_bilinear(x, 2 * h, 2 * w, true)?
            }
        };
        // Odd skip sizes: zero-pad the up-sampled map to the skip's size,
        // splitting the difference like the reference (floor left, rest right).
        let (_, _, sh, sw) = skip.dims4()?;
        let (_, _, uh, uw) = up.dims4()?;
        let (dh, dw) = (sh.saturating_sub(uh), sw.saturating_sub(uw));
        let up = if dh > 0 || dw > 0 {
            up.pad_with_zeros(2, dh / 2, dh - dh / 2)?
                .pad_with_zeros(3, dw / 2, dw - dw / 2)?
        } else {
            up
        };
        // [B, C_skip + C_up, H, W]
        let x = Tensor::cat(&[skip, &up], 1)?;
        self.conv.forward_t(&x, train)
    }
}

/// The reference segmentation network (see the module docs).
#[derive(Debug)]
pub struct UNet {
    cfg: UNetConfig,
    prefix: String,
    inc: DoubleConv,
    downs: Vec<DoubleConv>,
    ups: Vec<Up>,
    outc: Conv2d,
}

impl UNet {
    /// Builds the network; parameters are created (or fetched) through `vb`
    /// with paths like the reference (`inc`, `down1`, ..., `up1`, ..., `outc`).
    pub fn new(cfg: &UNetConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        cfg.validate()?;
        let init = cfg.init;
        let width = |level: usize| cfg.base_width << level;
        // Bilinear decoders halve the bottleneck (the reference's `factor`).
        let factor = match cfg.upsampling {
            Upsampling::TransposedConv => 1,
            Upsampling::Bilinear => 2,
        };
        let inc = DoubleConv::new(cfg.in_channels, width(0), width(0), init, vb.pp("inc"))?;
        let mut downs = Vec::with_capacity(cfg.depth);
        for level in 1..=cfg.depth {
            let c_out = if level == cfg.depth {
                width(level) / factor
            } else {
                width(level)
            };
            let vb_down = vb.pp(format!("down{level}")).pp("maxpool_conv").pp("1");
            downs.push(DoubleConv::new(
                width(level - 1),
                c_out,
                c_out,
                init,
                vb_down,
            )?);
        }
        let mut ups = Vec::with_capacity(cfg.depth);
        for (i, level) in (1..=cfg.depth).rev().enumerate() {
            let c_out = if level == 1 {
                width(0)
            } else {
                width(level - 1) / factor
            };
            ups.push(Up::new(
                width(level),
                c_out,
                cfg.upsampling,
                init,
                vb.pp(format!("up{}", i + 1)),
            )?);
        }
        let outc_cfg = Conv2dConfig::default();
        let outc = conv2d(
            width(0),
            cfg.out_channels,
            1,
            outc_cfg,
            true,
            init,
            vb.pp("outc").pp("conv"),
        )?;
        Ok(Self {
            cfg: cfg.clone(),
            prefix: vb.prefix(),
            inc,
            downs,
            ups,
            outc,
        })
    }

    /// The configuration the network was built from.
    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }
}

impl SegModel for UNet {
    fn forward_t(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        let (_, c, h, w) = images.dims4()?;
        if c != self.cfg.in_channels {
            candle_core::bail!(
                "unet: expected {} input channels, got {c}",
                self.cfg.in_channels
            );
        }
        let min = self.cfg.min_input_size();
        if h < min || w < min {
            candle_core::bail!(
                "unet: input {h}x{w} is smaller than {min}x{min} (depth {})",
                self.cfg.depth
            );
        }
        let mut skips = Vec::with_capacity(self.cfg.depth + 1);
        let mut x = self.inc.forward_t(images, train)?;
        for down in &self.downs {
            skips.push(x.clone());
            x = down.forward_t(&max_pool2d(&x, 2, 2, 0)?, train)?;
        }
        for (up, skip) in self.ups.iter().zip(skips.iter().rev()) {
            x = up.forward_t(&x, skip, train)?;
        }
        self.outc.forward(&x)
    }

    fn param_groups(&self) -> Vec<(&'static str, String)> {
        vec![("weights", self.prefix.clone())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use genseg_nn::params::ParamStore;

    fn conv_params(c_in: usize, c_out: usize, k: usize, bias: bool) -> usize {
        c_in * c_out * k * k + if bias { c_out } else { 0 }
    }

    /// Parameters of DoubleConv(in, out, mid): two bias-free 3x3 convs, two
    /// BatchNorms with weight and bias.
    fn double_conv_params(c_in: usize, c_out: usize, c_mid: usize) -> usize {
        conv_params(c_in, c_mid, 3, false)
            + 2 * c_mid
            + conv_params(c_mid, c_out, 3, false)
            + 2 * c_out
    }

    #[test]
    fn reference_parameter_count() -> anyhow::Result<()> {
        // Layer formula of milesial's UNet(n_channels=3, n_classes=1, bilinear=False).
        let mut expected = double_conv_params(3, 64, 64);
        for (c_in, c_out) in [(64, 128), (128, 256), (256, 512), (512, 1024)] {
            expected += double_conv_params(c_in, c_out, c_out);
        }
        for (c_in, c_out) in [(1024, 512), (512, 256), (256, 128), (128, 64)] {
            // ConvTranspose2d(c_in, c_in/2, 2, stride 2) with bias, then DoubleConv(c_in, c_out).
            expected += c_in * (c_in / 2) * 4 + c_in / 2 + double_conv_params(c_in, c_out, c_out);
        }
        expected += conv_params(64, 1, 1, true);
        assert_eq!(expected, 31_037_633, "the layer formula itself");

        // Build lazily-sized: the store only allocates; no forward needed.
        let store = ParamStore::new(0, DType::F32, &Device::Cpu);
        UNet::new(&UNetConfig::default(), store.var_builder())?;
        assert_eq!(store.num_trainable_params(), expected);
        Ok(())
    }

    #[test]
    fn shapes_odd_sizes_and_both_upsamplings() -> anyhow::Result<()> {
        for upsampling in [Upsampling::TransposedConv, Upsampling::Bilinear] {
            let store = ParamStore::new(1, DType::F32, &Device::Cpu);
            let cfg = UNetConfig {
                in_channels: 1,
                base_width: 4,
                depth: 3,
                upsampling,
                ..Default::default()
            };
            let unet = UNet::new(&cfg, store.var_builder())?;
            for (h, w) in [(16, 16), (19, 23), (8, 9)] {
                let x = Tensor::rand(0f32, 1., (2, 1, h, w), &Device::Cpu)?;
                assert_eq!(unet.forward_t(&x, true)?.dims(), &[2, 1, h, w]);
                assert_eq!(unet.forward_t(&x, false)?.dims(), &[2, 1, h, w]);
            }
        }
        Ok(())
    }

    #[test]
    fn every_parameter_receives_gradient() -> anyhow::Result<()> {
        for upsampling in [Upsampling::TransposedConv, Upsampling::Bilinear] {
            let store = ParamStore::new(2, DType::F32, &Device::Cpu);
            let cfg = UNetConfig {
                in_channels: 3,
                base_width: 4,
                depth: 2,
                upsampling,
                ..Default::default()
            };
            let unet = UNet::new(&cfg, store.var_builder())?;
            let x = Tensor::rand(0f32, 1., (2, 3, 12, 12), &Device::Cpu)?;
            let y = Tensor::rand(0f32, 1., (2, 1, 12, 12), &Device::Cpu)?
                .ge(0.5)?
                .to_dtype(DType::F32)?;
            let loss = genseg_nn::ops::bce_with_logits(&unet.forward_t(&x, true)?, &y)?;
            genseg_nn::gradcheck::assert_all_params_receive_gradient(
                &loss,
                &store.trainable_vars(),
            )?;
        }
        Ok(())
    }

    #[test]
    fn bad_configs_and_inputs_are_named_errors() -> anyhow::Result<()> {
        let store = ParamStore::new(0, DType::F32, &Device::Cpu);
        let bad = UNetConfig {
            base_width: 3,
            ..Default::default()
        };
        let err = UNet::new(&bad, store.var_builder())
            .unwrap_err()
            .to_string();
        assert!(err.contains("base_width 3"), "{err}");
        let cfg = UNetConfig {
            in_channels: 1,
            base_width: 2,
            depth: 3,
            ..Default::default()
        };
        let unet = UNet::new(&cfg, store.var_builder().pp("small"))?;
        let x = Tensor::zeros((1, 3, 16, 16), DType::F32, &Device::Cpu)?;
        assert!(
            unet.forward_t(&x, false)
                .unwrap_err()
                .to_string()
                .contains("input channels")
        );
        let x = Tensor::zeros((1, 1, 4, 16), DType::F32, &Device::Cpu)?;
        assert!(
            unet.forward_t(&x, false)
                .unwrap_err()
                .to_string()
                .contains("smaller than 8x8")
        );
        Ok(())
    }
}
