//! DeepLabV3 (Chen et al. 2017) as the GenSeg reference uses it — torchvision's
//! `deeplabv3_resnet50`, no auxiliary head (spec §4) — and the DeepLabV3+ decoder
//! (Chen et al. 2018), on ResNet-18, -34 or -50 encoders.
//!
//! Encoder (torchvision's ResNet, v1.5: the stride of a bottleneck is in its 3x3 conv):
//! conv 7x7 s2 → BN → ReLU → max-pool 3x3 s2 → `layer1..layer4`. For an output stride of 8
//! the strides of layers 3 and 4 become dilations 2 and 4 (16: layer 4 only, dilation 2),
//! with torchvision's rule that the first block of a dilated layer keeps the previous
//! dilation. (torchvision refuses dilated BasicBlocks; ours dilate both 3x3 convs, so
//! ResNet-18/34 serve as CPU-sized encoders.) 1-channel images are repeated to 3 channels,
//! as the reference does, so an ImageNet stem fits.
//!
//! Head, `decoder = "v3"`: ASPP (1x1 conv; three 3x3 convs dilated 12/24/36 at output
//! stride 8, 6/12/18 at 16; image pooling → 1x1 conv), each with BN + ReLU, concatenated,
//! projected by 1x1 conv + BN + ReLU + dropout 0.5, then 3x3 conv + BN + ReLU and a 1x1
//! conv to the logits, upsampled bilinearly (`align_corners = false`) to the input size.
//! `decoder = "v3_plus"`: the ASPP output upsampled to layer 1's size, concatenated with
//! layer 1 reduced to 48 channels (1x1 conv + BN + ReLU), two 3x3 conv + BN + ReLU, a 1x1
//! conv, upsampled to the input size (plain convolutions where the paper uses separable
//! ones).
//!
//! Parameter names are torchvision's (`backbone.layer3.0.conv2.weight`,
//! `classifier.0.convs.1.0.weight`, ...), so its checkpoints load by name (see
//! [`crate::pretrained`]). Dropout masks are drawn from a stream seeded by a hash of the
//! input batch, so a run stays a pure function of its seed (resume is exact) without an
//! RNG in [`SegModel::forward_t`].
//!
//! Initialisation as torchvision: encoder convs Kaiming-normal (fan out, ReLU gain), head
//! convs PyTorch's default, BatchNorm weight 1 and bias 0. `deeplabv3_resnet50` with one
//! logit channel has 39,633,729 parameters, as torchvision's.

use candle_core::{D, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, Init, VarBuilder};
use genseg_nn::batch_norm::{BatchNorm2d, BatchNormConfig};
use genseg_nn::conv::Conv2d;
use genseg_nn::init::{InitScheme, conv2d};
use genseg_nn::ops::{max_pool2d, resize_bilinear};
use genseg_nn::rng::{SeededRng, dropout, seeded_by};
use serde::{Deserialize, Serialize};

use crate::SegModel;

/// The ResNet encoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Encoder {
    /// BasicBlocks `[2, 2, 2, 2]`, 512 output channels.
    Resnet18,
    /// BasicBlocks `[3, 4, 6, 3]`, 512 output channels.
    Resnet34,
    /// Bottlenecks `[3, 4, 6, 3]`, 2048 output channels (the reference).
    #[default]
    Resnet50,
}

impl Encoder {
    fn blocks(self) -> [usize; 4] {
        match self {
            Self::Resnet18 => [2, 2, 2, 2],
            Self::Resnet34 | Self::Resnet50 => [3, 4, 6, 3],
        }
    }

    /// Output channels per input "plane" of a block.
    fn expansion(self) -> usize {
        match self {
            Self::Resnet50 => 4,
            Self::Resnet18 | Self::Resnet34 => 1,
        }
    }

    /// Channels of layer `i` (1..=4).
    fn layer_channels(self, i: usize) -> usize {
        (64 << (i - 1)) * self.expansion()
    }
}

/// The decoder on top of the encoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Decoder {
    /// ASPP + 3x3 conv head (torchvision's DeepLabHead; the reference).
    #[default]
    V3,
    /// ASPP, then a decoder that fuses layer 1's features (DeepLabV3+).
    V3Plus,
}

/// Every hyperparameter of a [`DeepLab`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeepLabConfig {
    /// Image channels (1 is repeated to 3).
    pub in_channels: usize,
    /// Logit channels (1 for binary segmentation).
    pub out_channels: usize,
    /// ResNet depth.
    pub encoder: Encoder,
    /// V3 or V3+.
    pub decoder: Decoder,
    /// Input side / encoder output side: 8 (V3's reference) or 16 (V3+'s).
    pub output_stride: usize,
    /// Channels of the ASPP branches and of the head.
    pub aspp_channels: usize,
    /// Dropout after the ASPP projection (torchvision: 0.5).
    pub dropout: f32,
}

impl Default for DeepLabConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 1,
            encoder: Encoder::Resnet50,
            decoder: Decoder::V3,
            output_stride: 8,
            aspp_channels: 256,
            dropout: 0.5,
        }
    }
}

/// Smallest input side accepted: the encoder's output is then at least 2x2 at output
/// stride 16.
pub const MIN_INPUT_SIZE: usize = 32;

impl DeepLabConfig {
    /// Checks the numbers before any weight is allocated.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.in_channels > 0, "deeplab: in_channels must be > 0");
        anyhow::ensure!(self.out_channels > 0, "deeplab: out_channels must be > 0");
        anyhow::ensure!(
            matches!(self.output_stride, 8 | 16),
            "deeplab: output_stride {} must be 8 or 16",
            self.output_stride
        );
        anyhow::ensure!(self.aspp_channels > 0, "deeplab: aspp_channels must be > 0");
        anyhow::ensure!(
            (0.0..1.0).contains(&self.dropout),
            "deeplab: dropout {} must be in [0, 1)",
            self.dropout
        );
        Ok(())
    }

    /// The ASPP's three atrous rates for the output stride.
    pub fn atrous_rates(&self) -> [usize; 3] {
        match self.output_stride {
            8 => [12, 24, 36],
            _ => [6, 12, 18],
        }
    }

    /// Channels the stem convolves: 1-channel images are repeated to 3.
    fn stem_channels(&self) -> usize {
        if self.in_channels == 1 {
            3
        } else {
            self.in_channels
        }
    }
}

backbone_config!(DeepLabConfig => DeepLab {
    fn check(&self, size: usize) -> anyhow::Result<()> {
        anyhow::ensure!(
            size >= MIN_INPUT_SIZE,
            "data.size {size} is smaller than DeepLab's minimum {MIN_INPUT_SIZE} (any side from \
             {MIN_INPUT_SIZE} up is accepted: the logits are resized to the input)"
        );
        self.validate()
    }

    fn pretrained_names(&self) -> Option<crate::pretrained::NameMapping> {
        Some(crate::pretrained::torchvision_deeplab)
    }
});

/// `(c_in, c_out, kernel)` of a convolution.
type ConvShape = (usize, usize, usize);
/// `(stride, padding, dilation)` of a convolution.
type ConvGeometry = (usize, usize, usize);

/// A convolution without bias, Kaiming-normal (fan out, ReLU gain) as torchvision's ResNet.
fn resnet_conv(
    (c_in, c_out, kernel): ConvShape,
    (stride, padding, dilation): ConvGeometry,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let stdev = (2.0 / (c_out * kernel * kernel) as f64).sqrt();
    let weight = vb.get_with_hints(
        (c_out, c_in, kernel, kernel),
        "weight",
        Init::Randn { mean: 0.0, stdev },
    )?;
    let cfg = Conv2dConfig {
        stride,
        padding,
        dilation,
        ..Default::default()
    };
    Ok(Conv2d::new(weight, None, cfg))
}

/// A head convolution (PyTorch's default init), `padding = dilation` for 3x3.
fn head_conv(
    (c_in, c_out, kernel): (usize, usize, usize),
    dilation: usize,
    bias: bool,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: if kernel == 3 { dilation } else { 0 },
        dilation,
        ..Default::default()
    };
    conv2d(c_in, c_out, kernel, cfg, bias, InitScheme::TorchDefault, vb)
}

fn batch_norm(channels: usize, vb: VarBuilder) -> Result<BatchNorm2d> {
    BatchNorm2d::new(
        channels,
        BatchNormConfig::default(),
        InitScheme::TorchDefault,
        vb,
    )
}

/// Conv → BN → ReLU.
#[derive(Debug)]
struct ConvBnRelu {
    conv: Conv2d,
    bn: BatchNorm2d,
}

impl ConvBnRelu {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.bn.forward_relu_t(&self.conv.forward(x)?, train)
    }
}

/// A residual block: BasicBlock (two 3x3) or Bottleneck (1x1, 3x3, 1x1).
#[derive(Debug)]
struct Block {
    convs: Vec<(Conv2d, BatchNorm2d)>,
    downsample: Option<(Conv2d, BatchNorm2d)>,
}

impl Block {
    fn new(
        encoder: Encoder,
        (c_in, planes): (usize, usize),
        (stride, dilation): (usize, usize),
        vb: VarBuilder,
    ) -> Result<Self> {
        let c_out = planes * encoder.expansion();
        let shapes: Vec<(ConvShape, ConvGeometry)> = match encoder {
            Encoder::Resnet50 => vec![
                ((c_in, planes, 1), (1, 0, 1)),
                ((planes, planes, 3), (stride, dilation, dilation)),
                ((planes, c_out, 1), (1, 0, 1)),
            ],
            Encoder::Resnet18 | Encoder::Resnet34 => vec![
                ((c_in, planes, 3), (stride, dilation, dilation)),
                ((planes, c_out, 3), (1, dilation, dilation)),
            ],
        };
        let convs = shapes
            .into_iter()
            .enumerate()
            .map(|(i, (shape, geometry))| {
                Ok((
                    resnet_conv(shape, geometry, vb.pp(format!("conv{}", i + 1)))?,
                    batch_norm(shape.1, vb.pp(format!("bn{}", i + 1)))?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let downsample = if stride != 1 || c_in != c_out {
            Some((
                resnet_conv((c_in, c_out, 1), (stride, 0, 1), vb.pp("downsample.0"))?,
                batch_norm(c_out, vb.pp("downsample.1"))?,
            ))
        } else {
            None
        };
        Ok(Self { convs, downsample })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let last = self.convs.len() - 1;
        let mut y = x.clone();
        for (i, (conv, bn)) in self.convs.iter().enumerate() {
            y = conv.forward(&y)?;
            y = if i == last {
                bn.forward_t(&y, train)?
            } else {
                bn.forward_relu_t(&y, train)?
            };
        }
        let identity = match &self.downsample {
            Some((conv, bn)) => bn.forward_t(&conv.forward(x)?, train)?,
            None => x.clone(),
        };
        (y + identity)?.relu()
    }
}

/// torchvision's ResNet without its classifier.
#[derive(Debug)]
struct ResNet {
    stem: ConvBnRelu,
    layers: Vec<Vec<Block>>,
}

impl ResNet {
    fn new(cfg: &DeepLabConfig, vb: VarBuilder) -> Result<Self> {
        let encoder = cfg.encoder;
        let stem = ConvBnRelu {
            conv: resnet_conv((cfg.stem_channels(), 64, 7), (2, 3, 1), vb.pp("conv1"))?,
            bn: batch_norm(64, vb.pp("bn1"))?,
        };
        // Layers 3 and 4 (output stride 8) or layer 4 (16) trade their stride for dilation.
        let dilate = |layer: usize| match cfg.output_stride {
            8 => layer >= 3,
            _ => layer == 4,
        };
        let (mut c_in, mut dilation) = (64, 1);
        let mut layers = Vec::with_capacity(4);
        for (i, &n) in encoder.blocks().iter().enumerate() {
            let layer = i + 1;
            let planes = 64 << i;
            let mut stride = if layer == 1 { 1 } else { 2 };
            let previous = dilation;
            if dilate(layer) {
                dilation *= stride;
                stride = 1;
            }
            let vb_layer = vb.pp(format!("layer{layer}"));
            let mut blocks = Vec::with_capacity(n);
            for b in 0..n {
                let (s, d) = if b == 0 {
                    (stride, previous)
                } else {
                    (1, dilation)
                };
                blocks.push(Block::new(
                    encoder,
                    (c_in, planes),
                    (s, d),
                    vb_layer.pp(b.to_string()),
                )?);
                c_in = planes * encoder.expansion();
            }
            layers.push(blocks);
        }
        Ok(Self { stem, layers })
    }

    /// Layer 1's and layer 4's outputs.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let x = self.stem.forward_t(x, train)?;
        let mut x = max_pool2d(&x, 3, 2, 1)?;
        let mut low_level = None;
        for (i, layer) in self.layers.iter().enumerate() {
            for block in layer {
                x = block.forward_t(&x, train)?;
            }
            if i == 0 {
                low_level = Some(x.clone());
            }
        }
        Ok((low_level.expect("four layers"), x))
    }
}

/// Atrous spatial pyramid pooling (torchvision's `ASPP`).
#[derive(Debug)]
struct Aspp {
    branches: Vec<ConvBnRelu>,
    pooling: ConvBnRelu,
    project: ConvBnRelu,
    dropout: f32,
}

impl Aspp {
    fn new(c_in: usize, cfg: &DeepLabConfig, vb: VarBuilder) -> Result<Self> {
        let c = cfg.aspp_channels;
        let vb_convs = vb.pp("convs");
        let branch = |kernel, dilation, i: usize| -> Result<ConvBnRelu> {
            let vb = vb_convs.pp(i.to_string());
            Ok(ConvBnRelu {
                conv: head_conv((c_in, c, kernel), dilation, false, vb.pp("0"))?,
                bn: batch_norm(c, vb.pp("1"))?,
            })
        };
        let mut branches = vec![branch(1, 1, 0)?];
        for (i, rate) in cfg.atrous_rates().into_iter().enumerate() {
            branches.push(branch(3, rate, i + 1)?);
        }
        // torchvision's ASPPPooling: [AdaptiveAvgPool, conv, BN, ReLU].
        let vb_pool = vb_convs.pp("4");
        let pooling = ConvBnRelu {
            conv: head_conv((c_in, c, 1), 1, false, vb_pool.pp("1"))?,
            bn: batch_norm(c, vb_pool.pp("2"))?,
        };
        let project = ConvBnRelu {
            conv: head_conv((5 * c, c, 1), 1, false, vb.pp("project.0"))?,
            bn: batch_norm(c, vb.pp("project.1"))?,
        };
        Ok(Self {
            branches,
            pooling,
            project,
            dropout: cfg.dropout,
        })
    }

    /// `rng` is the dropout stream of a train-mode pass; `None` is evaluation.
    fn forward_t(&self, x: &Tensor, rng: Option<&mut SeededRng>) -> Result<Tensor> {
        let train = rng.is_some();
        let mut outs = self
            .branches
            .iter()
            .map(|b| b.forward_t(x, train))
            .collect::<Result<Vec<_>>>()?;
        let pooled = x.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2)?;
        // Bilinear upsampling of a 1x1 map is a broadcast.
        let pooled = self.pooling.forward_t(&pooled, train)?;
        outs.push(pooled.broadcast_as(outs[0].shape())?.contiguous()?);
        let y = self.project.forward_t(&Tensor::cat(&outs, 1)?, train)?;
        match rng {
            Some(rng) => dropout(&y, self.dropout, rng),
            None => Ok(y),
        }
    }
}

/// The layers after the ASPP.
#[derive(Debug)]
enum Head {
    /// torchvision's DeepLabHead after its ASPP: 3x3 conv + BN + ReLU, 1x1 conv.
    V3 { conv: ConvBnRelu, out: Conv2d },
    /// Low-level reduction, fusion convs, 1x1 conv.
    V3Plus(Box<PlusDecoder>),
}

/// DeepLabV3+'s decoder after the ASPP.
#[derive(Debug)]
struct PlusDecoder {
    low_level: ConvBnRelu,
    fuse: [ConvBnRelu; 2],
    out: Conv2d,
}

/// DeepLabV3 or V3+ (see the module docs).
#[derive(Debug)]
pub struct DeepLab {
    cfg: DeepLabConfig,
    prefix: String,
    backbone: ResNet,
    aspp: Aspp,
    head: Head,
}

/// Channels layer 1's features are reduced to in the V3+ decoder.
const LOW_LEVEL_CHANNELS: usize = 48;

impl DeepLab {
    /// Builds the network; parameters are created (or fetched) through `vb` with
    /// torchvision's names (`backbone.*`, `classifier.*`; V3+'s decoder under `decoder.*`).
    pub fn new(cfg: &DeepLabConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        cfg.validate()?;
        let backbone = ResNet::new(cfg, vb.pp("backbone"))?;
        let c = cfg.aspp_channels;
        let encoder_out = cfg.encoder.layer_channels(4);
        let classifier = vb.pp("classifier");
        let aspp = Aspp::new(encoder_out, cfg, classifier.pp("0"))?;
        let head = match cfg.decoder {
            Decoder::V3 => Head::V3 {
                conv: ConvBnRelu {
                    conv: head_conv((c, c, 3), 1, false, classifier.pp("1"))?,
                    bn: batch_norm(c, classifier.pp("2"))?,
                },
                out: head_conv((c, cfg.out_channels, 1), 1, true, classifier.pp("4"))?,
            },
            Decoder::V3Plus => {
                let vb = vb.pp("decoder");
                let fuse = |c_in, i: usize| -> Result<ConvBnRelu> {
                    Ok(ConvBnRelu {
                        conv: head_conv((c_in, c, 3), 1, false, vb.pp(format!("fuse.{i}.0")))?,
                        bn: batch_norm(c, vb.pp(format!("fuse.{i}.1")))?,
                    })
                };
                let low = cfg.encoder.layer_channels(1);
                Head::V3Plus(Box::new(PlusDecoder {
                    low_level: ConvBnRelu {
                        conv: head_conv(
                            (low, LOW_LEVEL_CHANNELS, 1),
                            1,
                            false,
                            vb.pp("low_level.0"),
                        )?,
                        bn: batch_norm(LOW_LEVEL_CHANNELS, vb.pp("low_level.1"))?,
                    },
                    fuse: [fuse(c + LOW_LEVEL_CHANNELS, 0)?, fuse(c, 1)?],
                    out: head_conv((c, cfg.out_channels, 1), 1, true, vb.pp("out"))?,
                }))
            }
        };
        Ok(Self {
            cfg: cfg.clone(),
            prefix: vb.prefix(),
            backbone,
            aspp,
            head,
        })
    }

    /// The configuration the network was built from.
    pub fn config(&self) -> &DeepLabConfig {
        &self.cfg
    }
}

impl SegModel for DeepLab {
    fn forward_t(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        let (_, c, h, w) = images.dims4()?;
        if c != self.cfg.in_channels {
            candle_core::bail!(
                "deeplab: expected {} input channels, got {c}",
                self.cfg.in_channels
            );
        }
        if h < MIN_INPUT_SIZE || w < MIN_INPUT_SIZE {
            candle_core::bail!(
                "deeplab: input {h}x{w} is smaller than {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}"
            );
        }
        let x = if c == 1 {
            images.repeat((1, 3, 1, 1))?
        } else {
            images.clone()
        };
        // The input's hash seeds dropout; an evaluation pass needs neither.
        let mut rng = if train {
            Some(seeded_by(images)?)
        } else {
            None
        };
        let (low_level, features) = self.backbone.forward_t(&x, train)?;
        let x = self.aspp.forward_t(&features, rng.as_mut())?;
        let logits = match &self.head {
            Head::V3 { conv, out } => out.forward(&conv.forward_t(&x, train)?)?,
            Head::V3Plus(plus) => {
                let PlusDecoder {
                    low_level: reduce,
                    fuse,
                    out,
                } = plus.as_ref();
                let low = reduce.forward_t(&low_level, train)?;
                let (_, _, lh, lw) = low.dims4()?;
                let x = resize_bilinear(&x, lh, lw, false)?;
                let x = Tensor::cat(&[&x, &low], 1)?;
                let x = fuse[1].forward_t(&fuse[0].forward_t(&x, train)?, train)?;
                out.forward(&x)?
            }
        };
        resize_bilinear(&logits, h, w, false)
    }

    fn param_groups(&self) -> Vec<(&'static str, String)> {
        vec![("weights", self.prefix.clone())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BackboneConfig;
    use candle_core::{DType, Device};
    use genseg_nn::params::ParamStore;

    fn trainable_count(store: &ParamStore) -> usize {
        store
            .trainable_vars()
            .iter()
            .map(|(_, v)| v.as_tensor().elem_count())
            .sum()
    }

    /// Parameters of torchvision's ResNet without its `fc` (ImageNet totals 11,689,512,
    /// 21,797,672 and 25,557,032, less the 512·1000 + 1000 or 2048·1000 + 1000 of `fc`).
    fn resnet_trunk(encoder: Encoder) -> usize {
        match encoder {
            Encoder::Resnet18 => 11_689_512 - 513_000,
            Encoder::Resnet34 => 21_797_672 - 513_000,
            Encoder::Resnet50 => 25_557_032 - 2_049_000,
        }
    }

    /// The head's parameters, counted from its layer list.
    fn head_params(cfg: &DeepLabConfig) -> usize {
        let c = cfg.aspp_channels;
        let c4 = cfg.encoder.layer_channels(4);
        let bn = 2 * c;
        let aspp = (c4 * c + bn) + 3 * (9 * c4 * c + bn) + (c4 * c + bn) + (5 * c * c + bn);
        let out = c * cfg.out_channels + cfg.out_channels;
        match cfg.decoder {
            Decoder::V3 => aspp + (9 * c * c + bn) + out,
            Decoder::V3Plus => {
                let low =
                    cfg.encoder.layer_channels(1) * LOW_LEVEL_CHANNELS + 2 * LOW_LEVEL_CHANNELS;
                aspp + low + (9 * (c + LOW_LEVEL_CHANNELS) * c + bn) + (9 * c * c + bn) + out
            }
        }
    }

    #[test]
    fn parameter_counts_match_torchvision() -> anyhow::Result<()> {
        for encoder in [Encoder::Resnet18, Encoder::Resnet34, Encoder::Resnet50] {
            for decoder in [Decoder::V3, Decoder::V3Plus] {
                let cfg = DeepLabConfig {
                    encoder,
                    decoder,
                    ..DeepLabConfig::default()
                };
                let store = ParamStore::new(0, DType::F32, &Device::Cpu);
                DeepLab::new(&cfg, store.var_builder().pp("seg"))?;
                assert_eq!(
                    trainable_count(&store),
                    resnet_trunk(encoder) + head_params(&cfg),
                    "{encoder:?} {decoder:?}"
                );
            }
        }
        // The reference: torchvision's deeplabv3_resnet50 lists 42,004,074 parameters (21
        // classes, with the auxiliary FCNHead(1024, 21)); without the aux head and with one
        // logit channel instead of 21:
        let aux = (9 * 1024 * 256 + 2 * 256) + (256 * 21 + 21);
        let fewer_classes = 20 * (256 + 1);
        let reference = 42_004_074 - aux - fewer_classes;
        assert_eq!(reference, 39_633_729);
        let store = ParamStore::new(0, DType::F32, &Device::Cpu);
        DeepLab::new(&DeepLabConfig::default(), store.var_builder())?;
        assert_eq!(trainable_count(&store), reference);
        Ok(())
    }

    fn small(encoder: Encoder, decoder: Decoder, in_channels: usize) -> DeepLabConfig {
        DeepLabConfig {
            in_channels,
            encoder,
            decoder,
            output_stride: if decoder == Decoder::V3 { 8 } else { 16 },
            aspp_channels: 8,
            ..DeepLabConfig::default()
        }
    }

    #[test]
    fn output_size_equals_input_size_and_every_parameter_gets_a_gradient() -> anyhow::Result<()> {
        for (encoder, decoder, channels, side) in [
            (Encoder::Resnet18, Decoder::V3, 1, 40),
            (Encoder::Resnet18, Decoder::V3Plus, 3, 33),
            (Encoder::Resnet50, Decoder::V3Plus, 1, 32),
        ] {
            let cfg = small(encoder, decoder, channels);
            let store = ParamStore::new(1, DType::F32, &Device::Cpu);
            let model = DeepLab::new(&cfg, store.var_builder())?;
            let x = Tensor::rand(0f32, 1.0, (2, channels, side, side), &Device::Cpu)?;
            let y = model.forward_t(&x, true)?;
            assert_eq!(y.dims(), &[2, 1, side, side]);
            genseg_nn::gradcheck::assert_all_params_receive_gradient(
                &y.sqr()?.mean_all()?,
                &store.trainable_vars(),
            )?;
            // Evaluation: no dropout, running statistics, same size.
            assert_eq!(model.forward_t(&x, false)?.dims(), &[2, 1, side, side]);
        }
        Ok(())
    }

    #[test]
    fn dropout_depends_on_the_batch_only() -> anyhow::Result<()> {
        let cfg = small(Encoder::Resnet18, Decoder::V3, 3);
        let store = ParamStore::new(2, DType::F32, &Device::Cpu);
        let model = DeepLab::new(&cfg, store.var_builder())?;
        let x = Tensor::rand(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu)?;
        let a = model.forward_t(&x, true)?.flatten_all()?.to_vec1::<f32>()?;
        let b = model.forward_t(&x, true)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(a, b, "the same batch draws the same masks");
        Ok(())
    }

    #[test]
    fn small_inputs_and_bad_settings_are_named() {
        let err = DeepLabConfig::default().check(16).unwrap_err().to_string();
        assert!(err.contains("16") && err.contains("32"), "{err}");
        let cfg = DeepLabConfig {
            output_stride: 4,
            ..DeepLabConfig::default()
        };
        assert!(
            cfg.check(64)
                .unwrap_err()
                .to_string()
                .contains("output_stride 4")
        );
    }
}
