//! The mask-to-image generator: pix2pix's U-Net ("unet_256") with searchable up-convolution
//! cells, as in GenSeg's `models_pix2pix/networks.py` (spec §3).
//!
//! The U-Net is a chain of skip blocks, level 0 outermost. Level `i` maps its input `x_i` to
//! `cat[x_i, up(sub(down(x_i)))]`; the outermost level returns `tanh(up(...))` instead:
//!
//! | level | down path | up path |
//! | --- | --- | --- |
//! | 0 (outermost) | Conv 4×4 s2 p1, `in → ngf` | ReLU → up(`2·ngf → out`, bias) → Tanh |
//! | 1 ..= depth-2 | LeakyReLU 0.2 → Conv → BN | ReLU → up(`2·inner → outer`) → BN (→ Dropout 0.5 at levels ≥ 4) |
//! | depth-1 (innermost) | LeakyReLU 0.2 → Conv (no norm) | ReLU → up(`inner → outer`) → BN |
//!
//! Level `i` has `inner = ngf · 2^min(i, 3)` channels below it and `outer = ngf · 2^min(i-1, 3)`
//! above it, so at depth 8 (256 px) the widths are 64, 128, 256, 512, 512, 512, 512, 512 and
//! the dropout levels are 4, 5, 6 — "the three innermost-but-one" of the reference; depth 7
//! (128 px) has two. `up` is a [`MixedUpConv`] (the GenSeg change) or, with
//! `searchable_up = false`, one plain transposed convolution: pix2pix's `ConvTranspose2d(4, 2,
//! 1)`, or another of the cells' candidates (`up_candidate`: α fixed one-hot, the ablation
//! of whether the searched architecture matters); `down` is a plain
//! `Conv2d(4, 2, 1)` (the released code) or, with `searchable_down`, a [`MixedDownConv`].
//! Convolutions carry no bias (BatchNorm follows) except the outermost up-convolution.
//!
//! Reference quirk kept on purpose (`skip_after_leaky_relu`): the reference's down
//! LeakyReLU is in place, so the tensor it concatenates as the skip has already been through
//! the LeakyReLU; the skip of every level but the outermost carries `lrelu(x_i)`, not `x_i`.
//!
//! The row of the α table read by level `i` is `depth - 1 - i` (the reference's
//! `layer_index`: innermost 0). Parameter names follow the reference's module paths
//! (`model.model.0.weight`, `model.model.1.model.5._ops._ops.2.op.weight`, ...); the α
//! tables are `arch.upconv` and `arch.conv`.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, ConvTranspose2dConfig, VarBuilder};
use genseg_nn::batch_norm::{BatchNorm2d, BatchNormConfig};
use genseg_nn::conv::{Conv2d, ConvTranspose2d};
use genseg_nn::init::{InitScheme, conv_transpose2d, conv2d};
use genseg_nn::ops::leaky_relu;
use genseg_nn::rng::{SeededRng, dropout};
use serde::{Deserialize, Serialize};

use crate::mixed::{ArchWeights, CANDIDATES, Candidate, MixedDownConv, MixedForm, MixedUpConv};

/// The statistics the generator's BatchNorm layers normalise with when it synthesises.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormStatistics {
    /// The batch's own (train mode, the reference's synthesis; updates the running ones). At
    /// the innermost 1 × 1 level a batch of two normalises each channel to ±1, so an image
    /// depends on the batch it is painted in.
    #[default]
    Batch,
    /// The running statistics accumulated in training (eval-mode BatchNorm): an image depends
    /// on its mask and dropout noise only, whatever the batch size.
    Running,
}

/// Every hyperparameter of a [`Pix2PixGenerator`]; defaults are the reference's unet_256.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeneratorConfig {
    /// Channels of the conditioning mask (1).
    pub in_channels: usize,
    /// Channels of the synthesised image (1 for X-ray / ultrasound, 3 for photographs).
    pub out_channels: usize,
    /// Width of the outermost level (`--ngf`, 64).
    pub ngf: usize,
    /// Side of the images the generator is built for (256); sets the depth when `num_downs`
    /// is `None`.
    pub image_size: usize,
    /// Number of down-samplings (levels); `None` means `log2(image_size)`, which takes the
    /// innermost level to 1×1 (8 for 256 px, 7 for 128 px).
    pub num_downs: Option<usize>,
    /// Dropout probability of the dropout levels (0.5; 0 is the reference's `--no_dropout`).
    pub dropout: f32,
    /// Whether up-convolutions are searchable [`MixedUpConv`] cells (GenSeg) or pix2pix's
    /// plain transposed convolution.
    pub searchable_up: bool,
    /// The candidate of [`CANDIDATES`] the plain up-convolutions use when `searchable_up` is
    /// off: 0 is pix2pix's 4×4 (the default), 1 the 6×6, 2 the 8×8. A generator built with
    /// candidate `i` computes what a searchable one computes with α one-hot on `i`.
    pub up_candidate: usize,
    /// Whether down-convolutions are searchable [`MixedDownConv`] cells (the paper's figure;
    /// off in the released 2-D code).
    pub searchable_down: bool,
    /// How mixed cells compute (fused 8×8 kernel or three branches; same parameters).
    pub mixed_form: MixedForm,
    /// Concatenate `lrelu(x)` rather than `x` as the skip (the reference's in-place quirk).
    pub skip_after_leaky_relu: bool,
    /// Weight initialisation (`N(0, 0.02)` in the reference).
    pub init: InitScheme,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self {
            in_channels: 1,
            out_channels: 1,
            ngf: 64,
            image_size: 256,
            num_downs: None,
            dropout: 0.5,
            searchable_up: true,
            up_candidate: 0,
            searchable_down: false,
            mixed_form: MixedForm::Fused,
            skip_after_leaky_relu: true,
            init: InitScheme::Pix2Pix,
        }
    }
}

/// Slope of the down path's LeakyReLU.
const LEAKY_SLOPE: f64 = 0.2;
/// The first level with dropout (the reference's `num_downs - 5` intermediate blocks start
/// below the last width-doubling level 3).
const FIRST_DROPOUT_LEVEL: usize = 4;

impl GeneratorConfig {
    /// The number of levels: `num_downs`, or `log2(image_size)`.
    pub fn depth(&self) -> anyhow::Result<usize> {
        match self.num_downs {
            Some(d) => Ok(d),
            None => {
                anyhow::ensure!(
                    self.image_size.is_power_of_two(),
                    "generator: image_size {} is not a power of two; set num_downs explicitly",
                    self.image_size
                );
                Ok(self.image_size.trailing_zeros() as usize)
            }
        }
    }

    /// Checks the numbers before any weight is allocated.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.in_channels > 0, "generator: in_channels must be > 0");
        anyhow::ensure!(self.out_channels > 0, "generator: out_channels must be > 0");
        anyhow::ensure!(self.ngf > 0, "generator: ngf must be > 0");
        let depth = self.depth()?;
        anyhow::ensure!(
            (2..=16).contains(&depth),
            "generator: depth (num_downs) {depth} is outside 2..=16"
        );
        anyhow::ensure!(
            self.image_size >= 1 << depth && self.image_size % (1 << depth) == 0,
            "generator: image_size {} is not a multiple of 2^{depth} = {}",
            self.image_size,
            1usize << depth
        );
        anyhow::ensure!(
            self.dropout.is_finite() && (0.0..1.0).contains(&self.dropout),
            "generator: dropout {} is outside [0, 1)",
            self.dropout
        );
        anyhow::ensure!(
            self.up_candidate < CANDIDATES.len(),
            "generator: up_candidate {} is not one of the {} candidates (0: 4x4, 1: 6x6, 2: 8x8)",
            self.up_candidate,
            CANDIDATES.len()
        );
        anyhow::ensure!(
            !self.searchable_up || self.up_candidate == 0,
            "generator: up_candidate = {} fixes the up-convolutions, but searchable_up is on; \
             set generator.searchable_up = false to use it",
            self.up_candidate
        );
        Ok(())
    }

    /// The plain up-convolution's shape (kernel, stride, padding) when `searchable_up` is off.
    fn plain_up(&self) -> Candidate {
        CANDIDATES[self.up_candidate]
    }

    /// Inputs must have sides that are multiples of this (`2^depth`).
    pub fn size_multiple(&self) -> anyhow::Result<usize> {
        Ok(1 << self.depth()?)
    }

    /// Multiply-accumulates of the forward pass's convolutions and transposed convolutions
    /// for one `height × width` mask (sides multiples of `2^depth`), counting the
    /// convolutions the cells actually run: one 8×8 kernel per fused cell, three per
    /// branch-form cell. BatchNorm, activations, dropout, concatenation and building the
    /// fused kernels are not counted.
    pub fn conv_macs(&self, height: usize, width: usize) -> anyhow::Result<u64> {
        let depth = self.depth()?;
        let taps = |searchable: bool, plain: usize| {
            if searchable {
                self.mixed_form.kernel_taps()
            } else {
                plain * plain
            }
        };
        let down_taps = taps(self.searchable_down, PLAIN_DOWN.kernel);
        let up_taps = taps(self.searchable_up, self.plain_up().kernel);
        Ok((0..depth)
            .map(|level| {
                let ch = self.level_channels(level, depth);
                // The down conv's output grid is the up conv's input grid (side / 2^(level+1));
                // a transposed conv's work is counted per input pixel.
                let pixels = ((height >> (level + 1)) * (width >> (level + 1))) as u64;
                let per_pixel =
                    ch.down_in * ch.down_out * down_taps + ch.up_in * ch.up_out * up_taps;
                pixels * per_pixel as u64
            })
            .sum())
    }

    /// The channels of level `level`'s convolutions (the module docs' table).
    fn level_channels(&self, level: usize, depth: usize) -> LevelChannels {
        let inner = self.ngf << level.min(3);
        let outer = if level == 0 {
            self.out_channels
        } else {
            self.ngf << (level - 1).min(3)
        };
        LevelChannels {
            down_in: if level == 0 { self.in_channels } else { outer },
            down_out: inner,
            // Below the innermost level there is no skip to concatenate.
            up_in: if level == depth - 1 { inner } else { 2 * inner },
            up_out: outer,
        }
    }
}

/// Input and output channels of one level's down and up convolutions.
#[derive(Debug, Clone, Copy)]
struct LevelChannels {
    down_in: usize,
    down_out: usize,
    up_in: usize,
    up_out: usize,
}

/// pix2pix's plain (non-searchable) down-convolution, `Conv2d(4, 2, 1)`: the shape of the
/// first candidate.
const PLAIN_DOWN: Candidate = CANDIDATES[0];

#[derive(Debug, Clone)]
enum DownConv {
    Plain(Conv2d),
    Mixed(MixedDownConv),
}

impl DownConv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            DownConv::Plain(c) => c.forward(x),
            DownConv::Mixed(c) => c.forward(x),
        }
    }
}

#[derive(Debug, Clone)]
enum UpConv {
    Plain(ConvTranspose2d),
    Mixed(MixedUpConv),
}

impl UpConv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            UpConv::Plain(c) => c.forward(x),
            UpConv::Mixed(c) => c.forward(x),
        }
    }
}

/// One skip block (`UnetSkipConnectionBlock`).
#[derive(Debug, Clone)]
struct Block {
    down: DownConv,
    down_norm: Option<BatchNorm2d>,
    up: UpConv,
    up_norm: Option<BatchNorm2d>,
    dropout: bool,
}

/// pix2pix's U-Net generator with GenSeg's searchable cells (see the module docs).
#[derive(Debug, Clone)]
pub struct Pix2PixGenerator {
    cfg: GeneratorConfig,
    prefix: String,
    dtype: DType,
    arch: ArchWeights,
    /// Level 0 (outermost) first.
    blocks: Vec<Block>,
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

impl Pix2PixGenerator {
    /// Builds the generator; parameters are created (or fetched) through `vb` with the
    /// reference's paths under `model` and the α tables under `arch`.
    pub fn new(cfg: &GeneratorConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        cfg.validate()?;
        let depth = cfg.depth()?;
        let init = cfg.init;
        let bn = BatchNormConfig::default();
        let arch = ArchWeights::new(depth, cfg.searchable_up, cfg.searchable_down, vb.pp("arch"))?;
        let mut blocks = Vec::with_capacity(depth);
        let mut path = vb.pp("model").pp("model");
        for level in 0..depth {
            if level == 1 {
                path = path.pp("1").pp("model");
            } else if level > 1 {
                path = path.pp("3").pp("model");
            }
            let outermost = level == 0;
            let innermost = level == depth - 1;
            let ch = cfg.level_channels(level, depth);
            // Indices of the reference's nn.Sequential for this kind of block.
            let (down_idx, up_idx) = match (outermost, innermost) {
                (true, _) => (0, 3),
                (false, true) => (1, 3),
                (false, false) => (1, 5),
            };
            let row = depth - 1 - level;
            let down_vb = path.pp(down_idx.to_string());
            let down = match arch.conv() {
                Some(table) => DownConv::Mixed(MixedDownConv::new(
                    ch.down_in,
                    ch.down_out,
                    false,
                    table,
                    row,
                    cfg.mixed_form,
                    init,
                    down_vb,
                )?),
                None => {
                    let c = Conv2dConfig {
                        padding: PLAIN_DOWN.padding,
                        stride: PLAIN_DOWN.stride,
                        ..Default::default()
                    };
                    DownConv::Plain(conv2d(
                        ch.down_in,
                        ch.down_out,
                        PLAIN_DOWN.kernel,
                        c,
                        false,
                        init,
                        down_vb,
                    )?)
                }
            };
            let down_norm = if outermost || innermost {
                None
            } else {
                Some(BatchNorm2d::new(ch.down_out, bn, init, path.pp("2"))?)
            };
            let up_vb = path.pp(up_idx.to_string());
            let up = match arch.upconv() {
                Some(table) => UpConv::Mixed(MixedUpConv::new(
                    ch.up_in,
                    ch.up_out,
                    outermost,
                    table,
                    row,
                    cfg.mixed_form,
                    init,
                    up_vb,
                )?),
                None => {
                    let shape = cfg.plain_up();
                    let c = ConvTranspose2dConfig {
                        padding: shape.padding,
                        stride: shape.stride,
                        ..Default::default()
                    };
                    UpConv::Plain(conv_transpose2d(
                        ch.up_in,
                        ch.up_out,
                        shape.kernel,
                        c,
                        outermost,
                        init,
                        up_vb,
                    )?)
                }
            };
            let up_norm = if outermost {
                None
            } else {
                Some(BatchNorm2d::new(
                    ch.up_out,
                    bn,
                    init,
                    path.pp((up_idx + 1).to_string()),
                )?)
            };
            let dropout = !outermost && !innermost && level >= FIRST_DROPOUT_LEVEL;
            blocks.push(Block {
                down,
                down_norm,
                up,
                up_norm,
                dropout,
            });
        }
        Ok(Self {
            cfg: cfg.clone(),
            prefix: vb.prefix(),
            dtype: vb.dtype(),
            arch,
            blocks,
        })
    }

    /// The configuration the generator was built from.
    pub fn config(&self) -> &GeneratorConfig {
        &self.cfg
    }

    /// Number of levels (down-samplings).
    pub fn depth(&self) -> usize {
        self.blocks.len()
    }

    /// The levels with dropout, outermost = 0 (4, 5, 6 at depth 8).
    pub fn dropout_levels(&self) -> Vec<usize> {
        (0..self.blocks.len())
            .filter(|&i| self.blocks[i].dropout)
            .collect()
    }

    /// The architecture weights α.
    pub fn arch_weights(&self) -> &ArchWeights {
        &self.arch
    }

    /// `softmax` of every row of the up-cell α table, `[depth, 3]` (`None` when the
    /// up-convolutions are plain): the current mixture of each cell, for logging.
    pub fn upconv_mixing_weights(&self) -> Result<Option<Tensor>> {
        self.arch
            .upconv()
            .map(|t| genseg_nn::ops::softmax(t, candle_core::D::Minus1))
            .transpose()
    }

    /// The parameter groups as `(group, name prefix in the ParamStore)`: `"weights"` (every
    /// convolution and BatchNorm) and, when a cell is searchable, `"arch"` (the α tables),
    /// so the two levels of GenSeg's optimisation can step them separately.
    pub fn param_groups(&self) -> Vec<(&'static str, String)> {
        let mut groups = vec![("weights", join(&self.prefix, "model"))];
        if self.arch.upconv().is_some() || self.arch.conv().is_some() {
            groups.push(("arch", join(&self.prefix, "arch")));
        }
        groups
    }

    /// Synthesises images `[B, out, H, W]` in `(-1, 1)` from masks `[B, in, H, W]`.
    ///
    /// `train` selects BatchNorm batch statistics (updating the running ones) and enables
    /// dropout, whose masks are drawn from `rng`; GenSeg synthesises in train mode (spec §2).
    /// `H` and `W` must be multiples of `2^depth`. The mask is cast to the parameters' dtype.
    pub fn forward_t(&self, mask: &Tensor, train: bool, rng: &mut SeededRng) -> Result<Tensor> {
        let norm = if train {
            NormStatistics::Batch
        } else {
            NormStatistics::Running
        };
        self.synthesize(mask, norm, train, rng)
    }

    /// [`Self::forward_t`] with the BatchNorm statistics and dropout chosen apart, e.g. running
    /// statistics with dropout on: a frozen generator that paints each mask independently of
    /// its batch while keeping dropout as its noise source.
    pub fn synthesize(
        &self,
        mask: &Tensor,
        norm: NormStatistics,
        dropout_on: bool,
        rng: &mut SeededRng,
    ) -> Result<Tensor> {
        let batch_statistics = norm == NormStatistics::Batch;
        let (_, c, h, w) = mask.dims4().map_err(|_| {
            candle_core::Error::Msg(format!(
                "generator: expected a [B, C, H, W] mask, got shape {:?}",
                mask.dims()
            ))
        })?;
        if c != self.cfg.in_channels {
            candle_core::bail!(
                "generator: mask has {c} channels, the generator expects {} (shape {:?})",
                self.cfg.in_channels,
                mask.dims()
            );
        }
        let multiple = 1usize << self.blocks.len();
        if h % multiple != 0 || w % multiple != 0 || h == 0 || w == 0 {
            candle_core::bail!(
                "generator: mask {h}x{w} is not a multiple of 2^{} = {multiple} (depth {})",
                self.blocks.len(),
                self.blocks.len()
            );
        }
        let mask = mask.to_dtype(self.dtype)?;
        // Down path; skips[i] is what level i concatenates (level 0 concatenates nothing).
        let mut skips: Vec<Option<Tensor>> = Vec::with_capacity(self.blocks.len());
        let mut x = mask;
        for (level, block) in self.blocks.iter().enumerate() {
            let activated = if level == 0 {
                skips.push(None);
                x
            } else {
                let a = leaky_relu(&x, LEAKY_SLOPE)?;
                skips.push(Some(if self.cfg.skip_after_leaky_relu {
                    a.clone()
                } else {
                    x
                }));
                a
            };
            x = block.down.forward(&activated)?;
            if let Some(norm) = &block.down_norm {
                x = norm.forward_t(&x, batch_statistics)?;
            }
        }
        // Up path, innermost first; x is the innermost down output, then each level's concat.
        for (block, skip) in self.blocks.iter().zip(skips).rev() {
            let mut y = block.up.forward(&x.relu()?)?;
            let Some(skip) = skip else {
                return y.tanh();
            };
            if let Some(norm) = &block.up_norm {
                y = norm.forward_t(&y, batch_statistics)?;
            }
            if block.dropout && dropout_on {
                y = dropout(&y, self.cfg.dropout, rng)?;
            }
            // [B, outer, h, w] ++ [B, outer, h, w] -> [B, 2·outer, h, w]
            x = Tensor::cat(&[&skip, &y], 1)?;
        }
        candle_core::bail!("generator: no levels")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::var_builder::SimpleBackend;
    use genseg_nn::params::{ParamStore, is_buffer};
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    /// A VarBuilder backend that records names and shapes and hands out zero-strided
    /// broadcasts of a single zero, so even the 272M-parameter reference generator is built
    /// without allocating its weights.
    #[derive(Clone, Default)]
    struct ShapeRecorder {
        shapes: Arc<Mutex<BTreeMap<String, Vec<usize>>>>,
    }

    impl SimpleBackend for ShapeRecorder {
        fn get(
            &self,
            shape: candle_core::Shape,
            name: &str,
            _: candle_nn::Init,
            dtype: DType,
            dev: &Device,
        ) -> Result<Tensor> {
            self.shapes
                .lock()
                .expect("recorder lock")
                .insert(name.to_string(), shape.dims().to_vec());
            Tensor::zeros((), dtype, dev)?.broadcast_as(shape)
        }

        fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
            Err(candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            })
        }

        fn contains_tensor(&self, name: &str) -> bool {
            self.shapes
                .lock()
                .expect("recorder lock")
                .contains_key(name)
        }
    }

    /// Builds `cfg` shape-only and returns the trainable parameter count and the names.
    fn shape_only_count(cfg: &GeneratorConfig) -> (usize, Vec<String>) {
        let recorder = ShapeRecorder::default();
        let vb = VarBuilder::from_backend(Box::new(recorder.clone()), DType::F32, Device::Cpu);
        Pix2PixGenerator::new(cfg, vb).expect("shape-only build");
        let shapes = recorder.shapes.lock().expect("recorder lock");
        let count = shapes
            .iter()
            .filter(|(n, _)| !is_buffer(n))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        (count, shapes.keys().cloned().collect())
    }

    /// The layer formula of pix2pix's unet (`networks.py`), written independently of the
    /// implementation. `up_areas` lists the kernel areas of the up-convolution's candidates:
    /// `[16]` for pix2pix's plain 4×4 transposed convolution, `[16, 36, 64]` for a mixed cell
    /// (each candidate has its own kernel and, at the outermost level, its own bias).
    fn formula(in_c: usize, out_c: usize, ngf: usize, depth: usize, up_areas: &[usize]) -> usize {
        let inner = |i: usize| ngf * (1 << i.min(3));
        let outer = |i: usize| {
            if i == 0 {
                out_c
            } else {
                ngf * (1 << (i - 1).min(3))
            }
        };
        let area: usize = up_areas.iter().sum();
        let mut n = 0;
        for i in 0..depth {
            let input = if i == 0 { in_c } else { outer(i) };
            n += input * inner(i) * 16; // down conv 4x4, no bias
            let innermost = i == depth - 1;
            if i != 0 && !innermost {
                n += 2 * inner(i); // down BatchNorm
            }
            let up_in = if innermost { inner(i) } else { 2 * inner(i) };
            n += up_in * outer(i) * area;
            n += if i == 0 {
                out_c * up_areas.len() // outermost up-conv biases
            } else {
                2 * outer(i) // up BatchNorm
            };
        }
        n
    }

    fn small(ngf: usize, size: usize, out: usize) -> GeneratorConfig {
        GeneratorConfig {
            ngf,
            image_size: size,
            out_channels: out,
            ..Default::default()
        }
    }

    #[test]
    fn reference_parameter_counts() {
        // Standard pix2pix unet_256 (input 3, output 3): 54,413,955, which pix2pix's
        // print_networks reports as "54.414 M".
        let plain = GeneratorConfig {
            in_channels: 3,
            out_channels: 3,
            searchable_up: false,
            ..Default::default()
        };
        assert_eq!(formula(3, 3, 64, 8, &[16]), 54_413_955);
        assert_eq!(shape_only_count(&plain).0, 54_413_955);

        // GenSeg's reference generator (mask in, grey image out, three-candidate up cells):
        // the ≈272 M of spec §3, plus the 8 × 3 α table.
        let genseg = GeneratorConfig::default();
        let expected = formula(1, 1, 64, 8, &[16, 36, 64]) + 8 * 3;
        assert_eq!(expected, 272_327_835, "the formula itself");
        let (count, names) = shape_only_count(&genseg);
        assert_eq!(count, expected);
        // Reference module paths.
        for name in [
            "model.model.0.weight",
            "model.model.3._ops._ops.0.op.bias",
            "model.model.1.model.1.weight",
            "model.model.1.model.2.running_var",
            "model.model.1.model.5._ops._ops.2.op.weight",
            "model.model.1.model.3.model.3.model.3.model.3.model.3.model.3.model.4.weight",
            "arch.upconv",
        ] {
            assert!(names.iter().any(|n| n == name), "{name} missing");
        }
        assert!(!names.iter().any(|n| n == "arch.conv"));
        assert!(
            !names
                .iter()
                .any(|n| n == "model.model.1.model.5._ops._ops.0.op.bias")
        );

        // A small real build agrees with the same formula (in 1, out 3, 128 px).
        let cfg = small(3, 128, 3);
        let store = ParamStore::new(0, DType::F32, &Device::Cpu);
        Pix2PixGenerator::new(&cfg, store.var_builder()).unwrap();
        assert_eq!(
            store.num_trainable_params(),
            formula(1, 3, 3, 7, &[16, 36, 64]) + 7 * 3
        );
    }

    #[test]
    fn conv_macs_by_hand_for_each_cell_form() -> anyhow::Result<()> {
        // ngf 2, 8 px (depth 3), 1 -> 1 channel, plain 4x4 convs; per level
        // (pixels of side / 2^(level+1)) x (down in·out + up in·out) x 16 taps:
        // level 0: 16 x (1·2 + 4·1), level 1: 4 x (2·4 + 8·2), level 2: 1 x (4·8 + 8·4).
        let plain = GeneratorConfig {
            searchable_up: false,
            ..small(2, 8, 1)
        };
        let hand = 16 * (16 * 6 + 4 * 24 + 64);
        assert_eq!(plain.conv_macs(8, 8)?, hand);
        // Fused cells run one 8x8 kernel (4x the taps), branches 4² + 6² + 8² = 116 taps.
        let up_macs = 16 * (16 * 4 + 4 * 16 + 32);
        assert_eq!(small(2, 8, 1).conv_macs(8, 8)?, hand + 3 * up_macs);
        let branches = GeneratorConfig {
            mixed_form: MixedForm::Branches,
            searchable_down: true,
            ..small(2, 8, 1)
        };
        assert_eq!(branches.conv_macs(8, 8)?, hand * 116 / 16);
        Ok(())
    }

    #[test]
    fn shapes_for_256_128_64_and_depth_from_size() -> anyhow::Result<()> {
        for (size, depth, out, dropout_levels) in [
            (256, 8, 1, vec![4, 5, 6]),
            (128, 7, 3, vec![4, 5]),
            (64, 6, 1, vec![4]),
        ] {
            let store = ParamStore::new(1, DType::F32, &Device::Cpu);
            let cfg = small(2, size, out);
            let g = Pix2PixGenerator::new(&cfg, store.var_builder().pp("netG"))?;
            assert_eq!(g.depth(), depth);
            assert_eq!(g.dropout_levels(), dropout_levels);
            let mask = Tensor::rand(0f32, 1., (2, 1, size, size), &Device::Cpu)?.ge(0.5)?;
            let mut rng = SeededRng::new(0);
            for train in [true, false] {
                let y = g.forward_t(&mask, train, &mut rng)?;
                assert_eq!(y.dims(), &[2, out, size, size]);
                let v: Vec<f32> = y.flatten_all()?.to_vec1()?;
                assert!(v.iter().all(|p| p.abs() < 1.0), "tanh range");
            }
            let mix = g.upconv_mixing_weights()?.expect("searchable");
            assert_eq!(mix.dims(), &[depth, 3]);
        }
        // A bigger image at a fixed depth: the bottleneck is 2x2 rather than 1x1.
        let store = ParamStore::new(1, DType::F32, &Device::Cpu);
        let cfg = GeneratorConfig {
            ngf: 2,
            image_size: 64,
            num_downs: Some(5),
            ..Default::default()
        };
        let g = Pix2PixGenerator::new(&cfg, store.var_builder())?;
        let mask = Tensor::zeros((1, 1, 64, 96), DType::F32, &Device::Cpu)?;
        assert_eq!(
            g.forward_t(&mask, false, &mut SeededRng::new(0))?.dims(),
            &[1, 1, 64, 96]
        );
        Ok(())
    }

    #[test]
    fn train_mode_is_stochastic_through_the_passed_rng_only() -> anyhow::Result<()> {
        let store = ParamStore::new(2, DType::F32, &Device::Cpu);
        let g = Pix2PixGenerator::new(&small(2, 64, 1), store.var_builder())?;
        let mask = Tensor::rand(0f32, 1., (2, 1, 64, 64), &Device::Cpu)?.ge(0.5)?;
        let run = |seed| -> anyhow::Result<Vec<f32>> {
            Ok(g.forward_t(&mask, true, &mut SeededRng::new(seed))?
                .flatten_all()?
                .to_vec1()?)
        };
        assert_eq!(run(7)?, run(7)?);
        assert_ne!(run(7)?, run(8)?, "dropout masks come from the rng");
        let eval = |seed| -> anyhow::Result<Vec<f32>> {
            Ok(g.forward_t(&mask, false, &mut SeededRng::new(seed))?
                .flatten_all()?
                .to_vec1()?)
        };
        assert_eq!(eval(7)?, eval(8)?, "no dropout in eval mode");
        Ok(())
    }

    #[test]
    fn running_statistics_paint_each_mask_independently_of_its_batch() -> anyhow::Result<()> {
        let store = ParamStore::new(4, DType::F32, &Device::Cpu);
        let g = Pix2PixGenerator::new(&small(2, 64, 1), store.var_builder())?;
        let pair = Tensor::rand(0f32, 1., (2, 1, 64, 64), &Device::Cpu)?.ge(0.5)?;
        let first = pair.narrow(0, 0, 1)?;
        let paint = |mask: &Tensor, norm, dropout_on, seed| -> anyhow::Result<Vec<f32>> {
            Ok(
                g.synthesize(mask, norm, dropout_on, &mut SeededRng::new(seed))?
                    .narrow(0, 0, 1)?
                    .flatten_all()?
                    .to_vec1()?,
            )
        };
        use NormStatistics::{Batch, Running};
        assert_eq!(
            paint(&first, Running, false, 0)?,
            paint(&pair, Running, false, 0)?
        );
        assert_ne!(
            paint(&first, Batch, false, 0)?,
            paint(&pair, Batch, false, 0)?,
            "batch statistics couple the images of a batch"
        );
        assert_ne!(
            paint(&pair, Running, true, 7)?,
            paint(&pair, Running, true, 8)?,
            "dropout stays on with running statistics"
        );
        let eval: Vec<f32> = g
            .forward_t(&first, false, &mut SeededRng::new(0))?
            .flatten_all()?
            .to_vec1()?;
        assert_eq!(eval, paint(&first, Running, false, 0)?);
        Ok(())
    }

    #[test]
    fn groups_split_weights_and_alphas() -> anyhow::Result<()> {
        let store = ParamStore::new(3, DType::F32, &Device::Cpu);
        let cfg = GeneratorConfig {
            searchable_down: true,
            ..small(2, 64, 1)
        };
        let g = Pix2PixGenerator::new(&cfg, store.var_builder().pp("netG"))?;
        let groups = g.param_groups();
        assert_eq!(
            groups,
            vec![
                ("weights", "netG.model".to_string()),
                ("arch", "netG.arch".to_string())
            ]
        );
        let arch: Vec<String> = store
            .trainable_vars_with_prefix("netG.arch")
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(arch, ["netG.arch.conv", "netG.arch.upconv"]);
        let weights = store.trainable_vars_with_prefix("netG.model").len();
        assert_eq!(
            weights + 2,
            store.trainable_vars().len(),
            "groups cover everything"
        );
        assert!(
            store
                .get("netG.model.model.0._ops._ops.1.op.weight")
                .is_some()
        );

        let plain = GeneratorConfig {
            searchable_up: false,
            ..small(2, 64, 1)
        };
        let store = ParamStore::new(3, DType::F32, &Device::Cpu);
        let g = Pix2PixGenerator::new(&plain, store.var_builder())?;
        assert_eq!(g.param_groups(), vec![("weights", "model".to_string())]);
        assert!(g.upconv_mixing_weights()?.is_none());
        assert!(store.get("model.model.3.weight").is_some());
        Ok(())
    }

    /// The whole generator in fused and branch form: same output, same gradients.
    #[test]
    fn fused_and_branch_generators_agree_in_f64() -> anyhow::Result<()> {
        let mask = Tensor::rand(0f64, 1., (2, 1, 32, 32), &Device::Cpu)?.ge(0.5)?;
        let mut outs = Vec::new();
        for form in [MixedForm::Fused, MixedForm::Branches] {
            let store = ParamStore::new(4, DType::F64, &Device::Cpu);
            let cfg = GeneratorConfig {
                mixed_form: form,
                searchable_down: true,
                ..small(2, 32, 1)
            };
            let g = Pix2PixGenerator::new(&cfg, store.var_builder())?;
            let y = g.forward_t(&mask, true, &mut SeededRng::new(5))?;
            let grads = y.sqr()?.sum_all()?.backward()?;
            let alpha = store.get("arch.upconv").unwrap();
            let g_alpha: Vec<f64> = grads
                .get(alpha.as_tensor())
                .unwrap()
                .flatten_all()?
                .to_vec1()?;
            outs.push((y.flatten_all()?.to_vec1::<f64>()?, g_alpha));
        }
        for (a, b) in outs[0].0.iter().zip(&outs[1].0) {
            assert!((a - b).abs() < 1e-10, "{a} vs {b}");
        }
        for (a, b) in outs[0].1.iter().zip(&outs[1].1) {
            assert!(
                (a - b).abs() < 1e-8 * (1.0 + b.abs()),
                "alpha grad {a} vs {b}"
            );
        }
        Ok(())
    }

    /// A plain generator built with `up_candidate = i` computes what the searchable one
    /// computes with α one-hot on candidate `i`, given the same weights.
    #[test]
    fn fixed_up_candidate_is_the_one_hot_alpha() -> anyhow::Result<()> {
        let mask = Tensor::rand(0f64, 1., (2, 1, 32, 32), &Device::Cpu)?.ge(0.5)?;
        for candidate in 0..CANDIDATES.len() {
            let searched = ParamStore::new(8, DType::F64, &Device::Cpu);
            let g_searched = Pix2PixGenerator::new(&small(2, 32, 1), searched.var_builder())?;
            // Logits -1000 off the candidate: their softmax weights are exactly 0 in f64.
            let alpha = searched.get("arch.upconv").expect("searchable");
            let (rows, n) = alpha.dims2()?;
            let one_hot: Vec<f64> = (0..rows * n)
                .map(|j| if j % n == candidate { 0.0 } else { -1e3 })
                .collect();
            alpha.set(&Tensor::from_vec(one_hot, (rows, n), &Device::Cpu)?)?;

            let plain_cfg = GeneratorConfig {
                searchable_up: false,
                up_candidate: candidate,
                ..small(2, 32, 1)
            };
            let plain = ParamStore::new(9, DType::F64, &Device::Cpu);
            let g_plain = Pix2PixGenerator::new(&plain_cfg, plain.var_builder())?;
            for name in plain.names() {
                let var = plain.get(&name).expect("listed");
                let source = searched.get(&name).or_else(|| {
                    // model...<up_idx>.weight -> model...<up_idx>._ops._ops.<candidate>.op.weight
                    let (cell, leaf) = name.rsplit_once('.')?;
                    searched.get(&format!("{cell}._ops._ops.{candidate}.op.{leaf}"))
                });
                let source = source.unwrap_or_else(|| panic!("{name} has no searchable twin"));
                assert_eq!(var.dims(), source.dims(), "{name}");
                var.set(source.as_tensor())?;
            }
            let run = |g: &Pix2PixGenerator| -> anyhow::Result<Vec<f64>> {
                Ok(g.forward_t(&mask, false, &mut SeededRng::new(0))?
                    .flatten_all()?
                    .to_vec1()?)
            };
            let (a, b) = (run(&g_searched)?, run(&g_plain)?);
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-12, "candidate {candidate}: {x} vs {y}");
            }
        }
        Ok(())
    }

    #[test]
    fn skip_quirk_changes_the_output() -> anyhow::Result<()> {
        let mask = Tensor::rand(0f32, 1., (2, 1, 32, 32), &Device::Cpu)?;
        let mut outs = Vec::new();
        for quirk in [true, false] {
            let store = ParamStore::new(6, DType::F32, &Device::Cpu);
            let cfg = GeneratorConfig {
                skip_after_leaky_relu: quirk,
                ..small(2, 32, 1)
            };
            let g = Pix2PixGenerator::new(&cfg, store.var_builder())?;
            outs.push(
                g.forward_t(&mask, false, &mut SeededRng::new(0))?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            );
        }
        assert_ne!(outs[0], outs[1]);
        Ok(())
    }

    #[test]
    fn bad_configs_and_inputs_are_named_errors() -> anyhow::Result<()> {
        let store = ParamStore::new(0, DType::F32, &Device::Cpu);
        let err = |cfg: GeneratorConfig| {
            Pix2PixGenerator::new(&cfg, store.var_builder())
                .unwrap_err()
                .to_string()
        };
        let bad = [
            (small(2, 100, 1), "image_size 100"),
            (
                GeneratorConfig {
                    num_downs: Some(6),
                    ..small(2, 96, 1)
                },
                "2^6",
            ),
            (
                GeneratorConfig {
                    dropout: 1.0,
                    ..small(2, 64, 1)
                },
                "dropout 1",
            ),
            (
                GeneratorConfig {
                    searchable_up: false,
                    up_candidate: 3,
                    ..small(2, 64, 1)
                },
                "up_candidate 3",
            ),
            (
                GeneratorConfig {
                    up_candidate: 1,
                    ..small(2, 64, 1)
                },
                "searchable_up = false",
            ),
        ];
        for (cfg, expected) in bad {
            let e = err(cfg);
            assert!(e.contains(expected), "{expected}: {e}");
        }
        assert!(store.is_empty(), "nothing allocated for invalid configs");

        let g = Pix2PixGenerator::new(&small(2, 64, 1), store.var_builder())?;
        let mut rng = SeededRng::new(0);
        let e = g
            .forward_t(
                &Tensor::zeros((1, 2, 64, 64), DType::F32, &Device::Cpu)?,
                true,
                &mut rng,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 channels"), "{e}");
        let e = g
            .forward_t(
                &Tensor::zeros((1, 1, 64, 48), DType::F32, &Device::Cpu)?,
                true,
                &mut rng,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("64x48") && e.contains("64"), "{e}");
        Ok(())
    }
}
