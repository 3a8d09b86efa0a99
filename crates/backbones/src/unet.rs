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
//!
//! nnU-Net's choices are options: `norm = "instance"` (affine InstanceNorm, the same
//! function in training and evaluation), `activation = "leaky_relu"` (slope 0.01), and
//! `deep_supervision`, which adds a 1x1 logit head to every decoder level but the
//! deepest; [`SegModel::forward_deep_t`] then returns the full-resolution logits followed
//! by the coarser ones (see [`crate::loss::SegLoss::forward_deep`]).
//! At base width 64, depth 4, 3 input channels, 1 output: 31,037,633
//! parameters, like the reference. [`UNetConfig::conv_macs`] counts the
//! forward's convolution work from the same widths the constructor uses.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, ConvTranspose2dConfig, VarBuilder};
use genseg_nn::batch_norm::{BatchNorm2d, BatchNormConfig};
use genseg_nn::conv::{Conv2d, ConvTranspose2d};
use genseg_nn::init::{InitScheme, conv_transpose2d, conv2d};
use genseg_nn::ops::{InstanceNorm2d, leaky_relu, max_pool2d, resize_bilinear};
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

/// The normalisation after each 3x3 convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Norm {
    /// BatchNorm with running statistics (the reference).
    #[default]
    Batch,
    /// Affine InstanceNorm, eps 1e-5 (nnU-Net).
    Instance,
}

/// The non-linearity after each normalisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// ReLU (the reference).
    #[default]
    Relu,
    /// LeakyReLU with slope 0.01 (nnU-Net).
    LeakyRelu,
}

/// LeakyReLU slope of nnU-Net's networks (`negative_slope = 1e-2`).
const LEAKY_SLOPE: f64 = 0.01;

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
    /// Normalisation layers.
    pub norm: Norm,
    /// Non-linearity.
    pub activation: Activation,
    /// Extra logit heads on the coarser decoder levels, for a deeply supervised loss.
    pub deep_supervision: bool,
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
            norm: Norm::Batch,
            activation: Activation::Relu,
            deep_supervision: false,
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

    /// Multiply-accumulates of the forward pass's convolutions and transposed
    /// convolutions for one `height x width` image (BatchNorm, ReLU, pooling,
    /// padding and concatenation are not counted). Exact for any size: pooling
    /// floors and the decoder pads to the skip, so level `i` runs at `side >> i`.
    pub fn conv_macs(&self, height: usize, width: usize) -> u64 {
        let pixels = |level: usize| ((height >> level) * (width >> level)) as u64;
        let double_conv = |w: DoubleConvWidths, level: usize| {
            9 * pixels(level) * (w.c_in * w.c_mid + w.c_mid * w.c_out) as u64
        };
        let mut macs = 0;
        for (level, widths) in self.encoder_widths().into_iter().enumerate() {
            macs += double_conv(widths, level);
        }
        for (level, (c_in, c_out)) in (1..=self.depth).rev().zip(self.decoder_widths()) {
            if self.upsampling == Upsampling::TransposedConv {
                // 2x2 taps per input pixel of the coarser level.
                macs += 4 * pixels(level) * (c_in * (c_in / 2)) as u64;
            }
            macs += double_conv(
                Up::double_conv_widths(c_in, c_out, self.upsampling),
                level - 1,
            );
        }
        macs + pixels(0) * (self.level_width(0) * self.out_channels) as u64
    }

    fn level_width(&self, level: usize) -> usize {
        self.base_width << level
    }

    /// The encoder's `DoubleConv`s, `inc` (level 0) first; level `i` runs at
    /// `1 / 2^i` of the input side.
    fn encoder_widths(&self) -> Vec<DoubleConvWidths> {
        // Bilinear decoders halve the bottleneck (the reference's `factor`).
        let factor = self.bottleneck_factor();
        let mut widths = vec![DoubleConvWidths::plain(
            self.in_channels,
            self.level_width(0),
        )];
        for level in 1..=self.depth {
            let c_out = if level == self.depth {
                self.level_width(level) / factor
            } else {
                self.level_width(level)
            };
            widths.push(DoubleConvWidths::plain(self.level_width(level - 1), c_out));
        }
        widths
    }

    /// `(c_in, c_out)` of each decoder `Up`, deepest first: the one reading
    /// level `i` writes at level `i - 1`.
    fn decoder_widths(&self) -> Vec<(usize, usize)> {
        let factor = self.bottleneck_factor();
        (1..=self.depth)
            .rev()
            .map(|level| {
                let c_out = if level == 1 {
                    self.level_width(0)
                } else {
                    self.level_width(level - 1) / factor
                };
                (self.level_width(level), c_out)
            })
            .collect()
    }

    fn bottleneck_factor(&self) -> usize {
        match self.upsampling {
            Upsampling::TransposedConv => 1,
            Upsampling::Bilinear => 2,
        }
    }
}

/// Channel widths of one `DoubleConv`: `c_in -> c_mid -> c_out`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DoubleConvWidths {
    c_in: usize,
    c_mid: usize,
    c_out: usize,
}

impl DoubleConvWidths {
    /// A `DoubleConv` whose middle width is its output width.
    fn plain(c_in: usize, c_out: usize) -> Self {
        Self {
            c_in,
            c_mid: c_out,
            c_out,
        }
    }
}

/// A normalisation followed by the non-linearity.
#[derive(Debug)]
enum NormAct {
    /// BatchNorm + ReLU run as one fused kernel on the CPU.
    BatchRelu(BatchNorm2d),
    Other {
        norm: NormLayer,
        activation: Activation,
    },
}

#[derive(Debug)]
enum NormLayer {
    Batch(BatchNorm2d),
    Instance(InstanceNorm2d),
}

impl NormAct {
    fn new(
        channels: usize,
        cfg: (Norm, Activation),
        init: InitScheme,
        vb: VarBuilder,
    ) -> Result<Self> {
        let norm = match cfg.0 {
            Norm::Batch => {
                let bn = BatchNorm2d::new(channels, BatchNormConfig::default(), init, vb)?;
                if cfg.1 == Activation::Relu {
                    return Ok(Self::BatchRelu(bn));
                }
                NormLayer::Batch(bn)
            }
            Norm::Instance => NormLayer::Instance(InstanceNorm2d::new(channels, 1e-5, vb)?),
        };
        Ok(Self::Other {
            norm,
            activation: cfg.1,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Self::BatchRelu(bn) => bn.forward_relu_t(x, train),
            Self::Other { norm, activation } => {
                let x = match norm {
                    NormLayer::Batch(bn) => bn.forward_t(x, train)?,
                    NormLayer::Instance(n) => n.forward(x)?,
                };
                match activation {
                    Activation::Relu => x.relu(),
                    Activation::LeakyRelu => leaky_relu(&x, LEAKY_SLOPE),
                }
            }
        }
    }
}

/// `(Conv 3x3 -> norm -> activation) x 2`.
#[derive(Debug)]
struct DoubleConv {
    conv1: Conv2d,
    norm1: NormAct,
    conv2: Conv2d,
    norm2: NormAct,
}

impl DoubleConv {
    fn new(
        widths: DoubleConvWidths,
        layers: (Norm, Activation),
        init: InitScheme,
        vb: VarBuilder,
    ) -> Result<Self> {
        let DoubleConvWidths { c_in, c_mid, c_out } = widths;
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        // Parameter paths follow the reference's nn.Sequential indices.
        let vb = vb.pp("double_conv");
        Ok(Self {
            conv1: conv2d(c_in, c_mid, 3, cfg, false, init, vb.pp("0"))?,
            norm1: NormAct::new(c_mid, layers, init, vb.pp("1"))?,
            conv2: conv2d(c_mid, c_out, 3, cfg, false, init, vb.pp("3"))?,
            norm2: NormAct::new(c_out, layers, init, vb.pp("4"))?,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = self.norm1.forward_t(&self.conv1.forward(x)?, train)?;
        self.norm2.forward_t(&self.conv2.forward(&x)?, train)
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
        (c_in, c_out): (usize, usize),
        up: Upsampling,
        layers: (Norm, Activation),
        init: InitScheme,
        vb: VarBuilder,
    ) -> Result<Self> {
        let transposed = match up {
            Upsampling::TransposedConv => {
                let cfg = ConvTranspose2dConfig {
                    stride: 2,
                    ..Default::default()
                };
                Some(conv_transpose2d(
                    c_in,
                    c_in / 2,
                    2,
                    cfg,
                    true,
                    init,
                    vb.pp("up"),
                )?)
            }
            Upsampling::Bilinear => None,
        };
        let widths = Self::double_conv_widths(c_in, c_out, up);
        Ok(Self {
            transposed,
            conv: DoubleConv::new(widths, layers, init, vb.pp("conv"))?,
        })
    }

    /// The `DoubleConv` after the concat, which has `c_in` channels either way:
    /// the bilinear variant narrows in the middle like the reference.
    fn double_conv_widths(c_in: usize, c_out: usize, up: Upsampling) -> DoubleConvWidths {
        match up {
            Upsampling::TransposedConv => DoubleConvWidths::plain(c_in, c_out),
            Upsampling::Bilinear => DoubleConvWidths {
                c_in,
                c_mid: c_in / 2,
                c_out,
            },
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
    /// Deep-supervision heads, finest first: the one of decoder level `l` (1..depth-1)
    /// reads the output of the `Up` writing that level.
    heads: Vec<Conv2d>,
}

backbone_config!(UNetConfig => UNet {
    fn check(&self, size: usize) -> anyhow::Result<()> {
        anyhow::ensure!(
            size >= self.min_input_size(),
            "data.size {size} is smaller than the UNet's minimum {} (depth {})",
            self.min_input_size(),
            self.depth
        );
        self.validate()
    }
});

impl UNet {
    /// Builds the network; parameters are created (or fetched) through `vb`
    /// with paths like the reference (`inc`, `down1`, ..., `up1`, ..., `outc`).
    pub fn new(cfg: &UNetConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        cfg.validate()?;
        let init = cfg.init;
        let layers = (cfg.norm, cfg.activation);
        let mut encoder = cfg.encoder_widths().into_iter();
        let inc_widths = encoder.next().expect("the encoder starts with inc");
        let inc = DoubleConv::new(inc_widths, layers, init, vb.pp("inc"))?;
        let downs = encoder
            .enumerate()
            .map(|(i, widths)| {
                let vb_down = vb.pp(format!("down{}", i + 1)).pp("maxpool_conv").pp("1");
                DoubleConv::new(widths, layers, init, vb_down)
            })
            .collect::<Result<Vec<_>>>()?;
        let decoder = cfg.decoder_widths();
        let ups = decoder
            .iter()
            .enumerate()
            .map(|(i, &widths)| {
                let vb_up = vb.pp(format!("up{}", i + 1));
                Up::new(widths, cfg.upsampling, layers, init, vb_up)
            })
            .collect::<Result<Vec<_>>>()?;
        let head = |c_in: usize, vb: VarBuilder| {
            conv2d(
                c_in,
                cfg.out_channels,
                1,
                Conv2dConfig::default(),
                true,
                init,
                vb,
            )
        };
        let outc = head(cfg.level_width(0), vb.pp("outc").pp("conv"))?;
        // decoder[i] writes level depth-1-i; heads on levels 1..depth-1, finest first.
        let heads = match cfg.deep_supervision {
            true => (1..cfg.depth)
                .map(|level| {
                    head(
                        decoder[cfg.depth - 1 - level].1,
                        vb.pp(format!("ds{level}")),
                    )
                })
                .collect::<Result<Vec<_>>>()?,
            false => Vec::new(),
        };
        Ok(Self {
            cfg: cfg.clone(),
            prefix: vb.prefix(),
            inc,
            downs,
            ups,
            outc,
            heads,
        })
    }

    /// The configuration the network was built from.
    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }
}

impl UNet {
    /// The decoder's outputs from level `depth - 1` down to level 0 (full resolution).
    fn decoder_levels(&self, images: &Tensor, train: bool) -> Result<Vec<Tensor>> {
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
        let mut levels = Vec::with_capacity(self.ups.len());
        for (up, skip) in self.ups.iter().zip(skips.iter().rev()) {
            x = up.forward_t(&x, skip, train)?;
            levels.push(x.clone());
        }
        Ok(levels)
    }
}

impl SegModel for UNet {
    fn forward_t(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        let levels = self.decoder_levels(images, train)?;
        self.outc.forward(levels.last().expect("depth >= 1"))
    }

    fn forward_deep_t(&self, images: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let levels = self.decoder_levels(images, train)?;
        let depth = self.cfg.depth;
        let mut out = vec![self.outc.forward(&levels[depth - 1])?];
        for (i, head) in self.heads.iter().enumerate() {
            // Head i reads level i + 1, written by decoder step depth - 2 - i.
            out.push(head.forward(&levels[depth - 2 - i])?);
        }
        Ok(out)
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
    fn conv_macs_match_the_issue_figures_and_a_hand_count() {
        // Training step = 3 x forward, 2 FLOP per multiply-accumulate.
        let step_flop =
            |cfg: &UNetConfig, side: usize, batch: u64| 6 * batch * cfg.conv_macs(side, side);
        // UNet base 64, 3x256x256, batch 4: 1.16 TFLOP per step.
        let paper = UNetConfig::default();
        assert_eq!(
            (step_flop(&paper, 256, 4) as f64 / 1e12 * 100.0).round(),
            116.0
        );
        // UNet base 16, 1x128x128, batch 8: 36 GFLOP per step.
        let cpu = UNetConfig {
            in_channels: 1,
            base_width: 16,
            ..Default::default()
        };
        assert_eq!((step_flop(&cpu, 128, 8) as f64 / 1e9).round(), 36.0);

        // Depth 1, base 2, 1 -> 1 channel, 4x4 input (level 1 is 2x2), written out:
        // inc 9*16*(1*2 + 2*2), down1 9*4*(2*4 + 4*4), up ConvT 4*4*(4*2),
        // up DoubleConv 9*16*(4*2 + 2*2), outc 16*2.
        let tiny = UNetConfig {
            in_channels: 1,
            base_width: 2,
            depth: 1,
            ..Default::default()
        };
        let hand = 9 * 16 * 6 + 9 * 4 * 24 + 4 * 4 * 8 + 9 * 16 * 12 + 16 * 2;
        assert_eq!(tiny.conv_macs(4, 4), hand);
        // Bilinear: no ConvT, the bottleneck halves (down1 2 -> 2 -> 2) and the
        // up DoubleConv narrows in the middle (4 -> 2 -> 2).
        let bilinear = UNetConfig {
            upsampling: Upsampling::Bilinear,
            ..tiny
        };
        let hand = 9 * 16 * 6 + 9 * 4 * 8 + 9 * 16 * 12 + 16 * 2;
        assert_eq!(bilinear.conv_macs(4, 4), hand);
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
