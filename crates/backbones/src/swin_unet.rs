//! Swin-Unet (Cao et al. 2021) as the GenSeg reference configures it (spec §4):
//! `SwinTransformerSys` with patch 4, embed 96, depths `[2, 2, 2, 2]` (the decoder mirrors
//! them), heads `[3, 6, 12, 24]`, window 7, MLP ratio 4, qkv bias, drop-path 0.2, no
//! absolute position embedding, patch norm, and the "expand_first" head (a x4 patch expand
//! and a 1x1 conv without bias); input 224. 1-channel images are repeated to 3.
//!
//! Encoder: patch embedding (4x4 stride-4 conv + LayerNorm), then per stage Swin blocks
//! (window attention with a learned relative position bias; every second block shifts
//! the windows by half a window, with the attention mask that keeps shifted regions
//! apart) and patch merging (2x2 neighbours concatenated, LayerNorm, linear 4C → 2C).
//! Decoder: patch expanding (linear C → 2C, rearranged to 2x the side at C/2, LayerNorm),
//! per stage the skip concatenated and projected back (linear 2C → C), Swin blocks, patch
//! expanding; LayerNorm, then x4 expanding to the input side and a 1x1 conv. A stage
//! whose side is not larger than the window uses one window of its whole side and no
//! shift, as the reference does.
//!
//! Every LayerNorm and softmax is genseg-nn's (candle_nn's fused ones return no
//! gradient); GELU is the exact (erf) one, as `nn.GELU`. Parameter names are the
//! reference's (`layers.0.blocks.1.attn.relative_position_bias_table`, `layers_up.1...`,
//! `concat_back_dim.1`, `up.expand`, `output`), so a Swin-T ImageNet checkpoint maps onto
//! the encoder and, mirrored, the decoder ([`swin_checkpoint`]). Stochastic depth draws
//! from a stream seeded by the input batch (see [`genseg_nn::rng::seeded_by`]).
//! Initialisation as the reference: linear weights and the bias tables normal(0, 0.02)
//! (its truncation at ±2 never binds at that deviation), biases 0, LayerNorm 1 / 0.

use candle_core::{D, Device, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, Init, VarBuilder};
use genseg_nn::attention::windowed_attention;
use genseg_nn::conv::Conv2d;
use genseg_nn::init::{InitScheme, conv2d};
use genseg_nn::ops::{LayerNorm, gelu};
use genseg_nn::rng::{SeededRng, drop_path, seeded_by};
use genseg_nn::rows::Linear;
use serde::{Deserialize, Serialize};

use crate::SegModel;

/// Every hyperparameter of a [`SwinUnet`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SwinUnetConfig {
    /// Image channels (1 is repeated to 3).
    pub in_channels: usize,
    /// Logit channels (1 for binary segmentation).
    pub out_channels: usize,
    /// Input side the network is built for (224 in the reference).
    pub image_size: usize,
    /// Side of the square patches embedded as tokens.
    pub patch_size: usize,
    /// Token width of the first stage; stage `i` has `embed_dim · 2^i`.
    pub embed_dim: usize,
    /// Swin blocks per stage (the decoder mirrors them).
    pub depths: Vec<usize>,
    /// Attention heads per stage.
    pub num_heads: Vec<usize>,
    /// Side of the attention windows.
    pub window_size: usize,
    /// MLP hidden width / token width.
    pub mlp_ratio: usize,
    /// Largest stochastic-depth rate (linearly from 0 over the encoder's blocks).
    pub drop_path: f32,
}

impl Default for SwinUnetConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 1,
            image_size: 224,
            patch_size: 4,
            embed_dim: 96,
            depths: vec![2, 2, 2, 2],
            num_heads: vec![3, 6, 12, 24],
            window_size: 7,
            mlp_ratio: 4,
            drop_path: 0.2,
        }
    }
}

/// LayerNorm epsilon (PyTorch's default).
const LN_EPS: f64 = 1e-5;
/// Standard deviation of the reference's `trunc_normal_` initialisation.
const INIT_STD: f64 = 0.02;
/// What the shifted-window mask adds to attention between different regions.
const MASKED: f32 = -100.0;

impl SwinUnetConfig {
    fn stages(&self) -> usize {
        self.depths.len()
    }

    /// Token-grid side of stage `i`.
    fn resolution(&self, stage: usize) -> usize {
        (self.image_size / self.patch_size) >> stage
    }

    /// `(window, shift)` of block `j` of stage `i` (no shift, one window, on grids not
    /// larger than the window).
    fn window(&self, stage: usize, block: usize) -> (usize, usize) {
        let r = self.resolution(stage);
        if r <= self.window_size {
            (r, 0)
        } else if block % 2 == 1 {
            (self.window_size, self.window_size / 2)
        } else {
            (self.window_size, 0)
        }
    }

    /// Input sides this configuration accepts near `size` (for error messages).
    fn accepted_sizes_near(&self, size: usize) -> Vec<usize> {
        let valid = |s: usize| {
            Self {
                image_size: s,
                ..self.clone()
            }
            .grid_problem()
            .is_none()
        };
        let unit = self.patch_size << (self.stages().saturating_sub(1));
        let mut out: Vec<usize> = (1..=4 * size / unit.max(1) + 4)
            .map(|k| k * unit)
            .filter(|&s| valid(s))
            .collect();
        out.sort_by_key(|&s| s.abs_diff(size));
        out.truncate(3);
        out.sort();
        out
    }

    /// Why the token grids do not fit, if they do not.
    fn grid_problem(&self) -> Option<String> {
        let unit = self.patch_size << (self.stages().saturating_sub(1));
        if unit == 0 || self.image_size % unit != 0 {
            return Some(format!(
                "the side must be a multiple of {unit} (patch {} x 2^{} merges)",
                self.patch_size,
                self.stages().saturating_sub(1)
            ));
        }
        (0..self.stages()).find_map(|i| {
            let r = self.resolution(i);
            (r > self.window_size && r % self.window_size != 0).then(|| {
                format!(
                    "stage {i}'s {r}x{r} token grid is not a whole number of {w}x{w} windows",
                    w = self.window_size
                )
            })
        })
    }

    /// Checks the numbers before any weight is allocated.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.in_channels > 0, "swin_unet: in_channels must be > 0");
        anyhow::ensure!(self.out_channels > 0, "swin_unet: out_channels must be > 0");
        anyhow::ensure!(
            !self.depths.is_empty() && self.depths.len() == self.num_heads.len(),
            "swin_unet: depths {:?} and num_heads {:?} must be non-empty and of one length",
            self.depths,
            self.num_heads
        );
        for (i, &heads) in self.num_heads.iter().enumerate() {
            let dim = self.embed_dim << i;
            anyhow::ensure!(
                heads > 0 && dim % heads == 0,
                "swin_unet: stage {i}'s width {dim} is not divisible by its {heads} heads"
            );
        }
        anyhow::ensure!(
            self.patch_size > 0 && self.window_size > 0 && self.mlp_ratio > 0,
            "swin_unet: patch_size, window_size and mlp_ratio must be > 0"
        );
        anyhow::ensure!(
            (0.0..1.0).contains(&self.drop_path),
            "swin_unet: drop_path {} must be in [0, 1)",
            self.drop_path
        );
        if let Some(problem) = self.grid_problem() {
            anyhow::bail!(
                "swin_unet: image_size {}: {problem}; sizes that work: {:?}",
                self.image_size,
                self.accepted_sizes_near(self.image_size)
            );
        }
        Ok(())
    }

    /// Stochastic-depth rate of every encoder block, in order (the decoder reuses them).
    fn drop_path_rates(&self) -> Vec<f32> {
        let n: usize = self.depths.iter().sum();
        (0..n)
            .map(|i| {
                if n > 1 {
                    self.drop_path * i as f32 / (n - 1) as f32
                } else {
                    0.0
                }
            })
            .collect()
    }
}

backbone_config!(SwinUnetConfig => SwinUnet {
    fn check(&self, size: usize) -> anyhow::Result<()> {
        anyhow::ensure!(
            size == self.image_size,
            "data.size {size} differs from model.swin_unet.image_size {}: the network is \
             built for one input side (set model.swin_unet.image_size = {size} if that side \
             works; sizes that work near it: {:?})",
            self.image_size,
            self.accepted_sizes_near(size)
        );
        self.validate()
    }

    fn pretrained_names(&self) -> Option<crate::pretrained::NameMapping> {
        Some(swin_checkpoint)
    }
});

/// A Swin-T ImageNet checkpoint's names (Microsoft's or timm's `layers.{i}...`,
/// `patch_embed.*`, `norm.*`) or Swin-Unet's own (`swin_unet.` prefix dropped), mapped to
/// ours. As the reference's `load_from` does, the blocks of encoder stage `i` initialise
/// decoder stage `3 - i` too (`layers_up.{3 - i}.blocks...`, the reference's four stages);
/// the ImageNet head and the buffers (`relative_position_index`, `attn_mask`) are not used.
pub fn swin_checkpoint(name: &str) -> Vec<String> {
    const STAGES: usize = 4;
    let name = name.strip_prefix("swin_unet.").unwrap_or(name);
    if name.starts_with("head.")
        || name.ends_with("relative_position_index")
        || name.ends_with("attn_mask")
    {
        return Vec::new();
    }
    let mut names = vec![name.to_string()];
    if let Some((stage, tail)) = name
        .strip_prefix("layers.")
        .and_then(|rest| rest.split_once('.'))
        && let Ok(stage) = stage.parse::<usize>()
        && stage < STAGES
        && tail.starts_with("blocks.")
    {
        names.push(format!("layers_up.{}.{tail}", STAGES - 1 - stage));
    }
    names
}

fn linear(c_in: usize, c_out: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get_with_hints(
        (c_out, c_in),
        "weight",
        Init::Randn {
            mean: 0.0,
            stdev: INIT_STD,
        },
    )?;
    let bias = match bias {
        true => Some(vb.get_with_hints(c_out, "bias", Init::Const(0.0))?),
        false => None,
    };
    Ok(Linear::new(weight, bias))
}

fn layer_norm(dim: usize, vb: VarBuilder) -> Result<LayerNorm> {
    LayerNorm::new(dim, LN_EPS, vb)
}

/// The token order of the (shifted) windows of an `r x r` grid: entry `j` is the grid token
/// (row-major) that becomes token `j % ws²` of window `j / ws²` (windows row-major) after
/// the grid is rolled by `-shift` on both axes, the reference's `torch.roll` then
/// `window_partition`. One gather per image instead of two rolls, a permute and a copy
/// (and their backward, the inverse gather).
pub fn window_order(r: usize, ws: usize, shift: usize) -> Vec<u32> {
    let (n, per_side) = (ws * ws, r / ws);
    (0..r * r)
        .map(|j| {
            let (w, t) = (j / n, j % n);
            let y = (w / per_side) * ws + t / ws;
            let x = (w % per_side) * ws + t % ws;
            (((y + shift) % r) * r + (x + shift) % r) as u32
        })
        .collect()
}

/// The inverse permutation of `order`.
fn inverse_order(order: &[u32]) -> Vec<u32> {
    let mut inverse = vec![0u32; order.len()];
    for (j, &src) in order.iter().enumerate() {
        inverse[src as usize] = j as u32;
    }
    inverse
}

/// The shifted-window attention mask `[nW, N, N]` of an `r x r` grid (0 within a region,
/// -100 across regions), as the reference computes it.
pub fn shifted_window_mask(r: usize, ws: usize, shift: usize) -> Vec<f32> {
    let bounds = [0, r - ws, r - shift, r];
    let region = |i: usize| {
        (0..3)
            .find(|&k| i < bounds[k + 1])
            .expect("inside the grid")
    };
    let n = ws * ws;
    let per_side = r / ws;
    let mut mask = Vec::with_capacity(per_side * per_side * n * n);
    for wy in 0..per_side {
        for wx in 0..per_side {
            let ids: Vec<usize> = (0..n)
                .map(|t| {
                    let (y, x) = (wy * ws + t / ws, wx * ws + t % ws);
                    region(y) * 3 + region(x)
                })
                .collect();
            for &a in &ids {
                for &b in &ids {
                    mask.push(if a == b { 0.0 } else { MASKED });
                }
            }
        }
    }
    mask
}

/// Window multi-head self-attention with a relative position bias.
#[derive(Debug)]
struct WindowAttention {
    heads: usize,
    window: usize,
    qkv: Linear,
    proj: Linear,
    bias_table: Tensor,
    /// `[N · N]` indices into the bias table.
    bias_index: Tensor,
}

impl WindowAttention {
    fn new(dim: usize, heads: usize, window: usize, vb: VarBuilder) -> Result<Self> {
        let side = 2 * window - 1;
        let bias_table = vb.get_with_hints(
            (side * side, heads),
            "relative_position_bias_table",
            Init::Randn {
                mean: 0.0,
                stdev: INIT_STD,
            },
        )?;
        let n = window * window;
        let mut index = Vec::with_capacity(n * n);
        for a in 0..n {
            for b in 0..n {
                let dy = (a / window) as isize - (b / window) as isize + window as isize - 1;
                let dx = (a % window) as isize - (b % window) as isize + window as isize - 1;
                index.push((dy as usize * side + dx as usize) as u32);
            }
        }
        Ok(Self {
            heads,
            window,
            qkv: linear(dim, 3 * dim, true, vb.pp("qkv"))?,
            proj: linear(dim, dim, true, vb.pp("proj"))?,
            bias_table,
            bias_index: Tensor::from_vec(index, n * n, &Device::Cpu)?,
        })
    }

    /// `x`: `[B · nW, N, C]`; `mask`: `[nW, N, N]`.
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let n = x.dim(1)?;
        debug_assert_eq!(self.window * self.window, n);
        let index = self.bias_index.to_device(x.device())?;
        let bias = self
            .bias_table
            .index_select(&index, 0)?
            .reshape((n, n, self.heads))?
            .permute((2, 0, 1))?
            .contiguous()?;
        let y = windowed_attention(&self.qkv.forward(x)?, self.heads, &bias, mask)?;
        self.proj.forward(&y)
    }
}

/// A Swin Transformer block (pre-norm attention and MLP, each residual).
#[derive(Debug)]
struct SwinBlock {
    resolution: usize,
    window: usize,
    drop_path: f32,
    norm1: LayerNorm,
    attn: WindowAttention,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    /// `[nW, N, N]` when the windows are shifted.
    mask: Option<Tensor>,
    /// `[L]`: [`window_order`] of this block's grid, window and shift, and its inverse.
    order: Tensor,
    inverse: Tensor,
}

impl SwinBlock {
    fn new(
        cfg: &SwinUnetConfig,
        (stage, block): (usize, usize),
        drop_path: f32,
        vb: VarBuilder,
    ) -> Result<Self> {
        let dim = cfg.embed_dim << stage;
        let resolution = cfg.resolution(stage);
        let (window, shift) = cfg.window(stage, block);
        let mask = (shift > 0)
            .then(|| {
                let windows = (resolution / window).pow(2);
                let n = window * window;
                Tensor::from_vec(
                    shifted_window_mask(resolution, window, shift),
                    (windows, n, n),
                    vb.device(),
                )
            })
            .transpose()?;
        let hidden = dim * cfg.mlp_ratio;
        let order = window_order(resolution, window, shift);
        let inverse = inverse_order(&order);
        let l = order.len();
        Ok(Self {
            order: Tensor::from_vec(order, l, vb.device())?,
            inverse: Tensor::from_vec(inverse, l, vb.device())?,
            resolution,
            window,
            drop_path,
            norm1: layer_norm(dim, vb.pp("norm1"))?,
            attn: WindowAttention::new(dim, cfg.num_heads[stage], window, vb.pp("attn"))?,
            norm2: layer_norm(dim, vb.pp("norm2"))?,
            fc1: linear(dim, hidden, true, vb.pp("mlp.fc1"))?,
            fc2: linear(hidden, dim, true, vb.pp("mlp.fc2"))?,
            mask,
        })
    }

    /// `x`: `[B, L, C]` tokens of the `resolution²` grid.
    fn forward_t(&self, x: &Tensor, rng: Option<&mut SeededRng>) -> Result<Tensor> {
        let (b, l, c) = x.dims3()?;
        let r = self.resolution;
        debug_assert_eq!(l, r * r);
        let n = self.window * self.window;
        let windows = self
            .norm1
            .forward(x)?
            .index_select(&self.order, 1)?
            .reshape((b * l / n, n, c))?;
        let attended = self.attn.forward(&windows, self.mask.as_ref())?;
        let y = attended
            .reshape((b, l, c))?
            .index_select(&self.inverse, 1)?;
        let mlp = |t: &Tensor| -> Result<Tensor> {
            self.fc2
                .forward(&gelu(&self.fc1.forward(&self.norm2.forward(t)?)?)?)
        };
        match rng {
            Some(rng) if self.drop_path > 0.0 => {
                let x = (x + drop_path(&y, self.drop_path, rng)?)?;
                &x + drop_path(&mlp(&x)?, self.drop_path, rng)?
            }
            _ => {
                let x = (x + y)?;
                &x + mlp(&x)?
            }
        }
    }
}

/// 2x2 neighbouring tokens concatenated (`[x(0,0), x(1,0), x(0,1), x(1,1)]`), LayerNorm,
/// linear 4C → 2C.
#[derive(Debug)]
struct PatchMerging {
    resolution: usize,
    norm: LayerNorm,
    reduction: Linear,
}

impl PatchMerging {
    fn new(dim: usize, resolution: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            resolution,
            norm: layer_norm(4 * dim, vb.pp("norm"))?,
            reduction: linear(4 * dim, 2 * dim, false, vb.pp("reduction"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, c) = x.dims3()?;
        let (r, h) = (self.resolution, self.resolution / 2);
        // [B, h, 2 (row parity), h, 2 (column parity), C]
        let x = x.reshape((b, h, 2, h, 2, c))?;
        let part = |dy: usize, dx: usize| -> Result<Tensor> {
            x.narrow(2, dy, 1)?.narrow(4, dx, 1)?.reshape((b, h * h, c))
        };
        let merged = Tensor::cat(&[part(0, 0)?, part(1, 0)?, part(0, 1)?, part(1, 1)?], 2)?;
        debug_assert_eq!(r, 2 * h);
        self.reduction.forward(&self.norm.forward(&merged)?)
    }
}

/// Linear C → scale² · C / scale... rearranged to `scale`x the side: the reference's
/// `PatchExpand` (scale 2, output C / 2) and `FinalPatchExpand_X4` (scale 4, output C).
#[derive(Debug)]
struct PatchExpand {
    resolution: usize,
    scale: usize,
    out_dim: usize,
    expand: Linear,
    norm: LayerNorm,
}

impl PatchExpand {
    fn new(dim: usize, resolution: usize, scale: usize, vb: VarBuilder) -> Result<Self> {
        let out_dim = if scale == 2 { dim / 2 } else { dim };
        Ok(Self {
            resolution,
            scale,
            out_dim,
            expand: linear(dim, scale * scale * out_dim, false, vb.pp("expand"))?,
            norm: layer_norm(out_dim, vb.pp("norm"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, _) = x.dims3()?;
        let (r, s, c) = (self.resolution, self.scale, self.out_dim);
        // 'b h w (p1 p2 c) -> b (h p1) (w p2) c'
        let x = self
            .expand
            .forward(x)?
            .reshape((b, r, r, s, s, c))?
            .permute((0, 1, 3, 2, 4, 5))?
            .reshape((b, r * s * r * s, c))?;
        self.norm.forward(&x)
    }
}

/// Swin-Unet (see the module docs).
#[derive(Debug)]
pub struct SwinUnet {
    cfg: SwinUnetConfig,
    prefix: String,
    patch_embed: Conv2d,
    patch_norm: LayerNorm,
    /// Per stage: its blocks and the merging after it (none after the last).
    encoder: Vec<(Vec<SwinBlock>, Option<PatchMerging>)>,
    norm: LayerNorm,
    /// `layers_up.0`: the first expansion.
    first_up: PatchExpand,
    /// `layers_up.1..`: skip projection, blocks, expansion (none after the last).
    decoder: Vec<(Linear, Vec<SwinBlock>, Option<PatchExpand>)>,
    norm_up: LayerNorm,
    up: PatchExpand,
    output: Conv2d,
}

impl SwinUnet {
    /// Builds the network; parameters are created (or fetched) through `vb` with the
    /// reference's names.
    pub fn new(cfg: &SwinUnetConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        cfg.validate()?;
        let stages = cfg.stages();
        let stem_channels = if cfg.in_channels == 1 {
            3
        } else {
            cfg.in_channels
        };
        let patch_embed = conv2d(
            stem_channels,
            cfg.embed_dim,
            cfg.patch_size,
            Conv2dConfig {
                stride: cfg.patch_size,
                ..Default::default()
            },
            true,
            InitScheme::TorchDefault,
            vb.pp("patch_embed.proj"),
        )?;
        let patch_norm = layer_norm(cfg.embed_dim, vb.pp("patch_embed.norm"))?;
        let rates = cfg.drop_path_rates();
        let first_block = |stage: usize| cfg.depths[..stage].iter().sum::<usize>();
        let blocks = |stage: usize, vb: VarBuilder| -> Result<Vec<SwinBlock>> {
            (0..cfg.depths[stage])
                .map(|j| {
                    let rate = rates[first_block(stage) + j];
                    SwinBlock::new(cfg, (stage, j), rate, vb.pp(format!("blocks.{j}")))
                })
                .collect()
        };
        let mut encoder = Vec::with_capacity(stages);
        for i in 0..stages {
            let vb_layer = vb.pp(format!("layers.{i}"));
            let merge = (i + 1 < stages)
                .then(|| {
                    PatchMerging::new(
                        cfg.embed_dim << i,
                        cfg.resolution(i),
                        vb_layer.pp("downsample"),
                    )
                })
                .transpose()?;
            encoder.push((blocks(i, vb_layer.clone())?, merge));
        }
        let deepest = stages - 1;
        let norm = layer_norm(cfg.embed_dim << deepest, vb.pp("norm"))?;
        let first_up = PatchExpand::new(
            cfg.embed_dim << deepest,
            cfg.resolution(deepest),
            2,
            vb.pp("layers_up.0"),
        )?;
        let mut decoder = Vec::with_capacity(stages - 1);
        for i in 1..stages {
            let stage = deepest - i;
            let dim = cfg.embed_dim << stage;
            let vb_layer = vb.pp(format!("layers_up.{i}"));
            let concat = linear(2 * dim, dim, true, vb.pp(format!("concat_back_dim.{i}")))?;
            let expand = (i + 1 < stages)
                .then(|| PatchExpand::new(dim, cfg.resolution(stage), 2, vb_layer.pp("upsample")))
                .transpose()?;
            decoder.push((concat, blocks(stage, vb_layer.clone())?, expand));
        }
        let norm_up = layer_norm(cfg.embed_dim, vb.pp("norm_up"))?;
        let up = PatchExpand::new(
            cfg.embed_dim,
            cfg.resolution(0),
            cfg.patch_size,
            vb.pp("up"),
        )?;
        let output = conv2d(
            cfg.embed_dim,
            cfg.out_channels,
            1,
            Conv2dConfig::default(),
            false,
            InitScheme::TorchDefault,
            vb.pp("output"),
        )?;
        Ok(Self {
            cfg: cfg.clone(),
            prefix: vb.prefix(),
            patch_embed,
            patch_norm,
            encoder,
            norm,
            first_up,
            decoder,
            norm_up,
            up,
            output,
        })
    }

    /// The configuration the network was built from.
    pub fn config(&self) -> &SwinUnetConfig {
        &self.cfg
    }
}

impl SegModel for SwinUnet {
    fn forward_t(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        let (b, c, h, w) = images.dims4()?;
        let side = self.cfg.image_size;
        if c != self.cfg.in_channels || h != side || w != side {
            candle_core::bail!(
                "swin_unet: expected [B, {}, {side}, {side}] images, got [{b}, {c}, {h}, {w}]",
                self.cfg.in_channels
            );
        }
        let x = if c == 1 {
            images.repeat((1, 3, 1, 1))?
        } else {
            images.clone()
        };
        let mut rng = if train {
            Some(seeded_by(images)?)
        } else {
            None
        };
        // [B, E, h, w] -> [B, h·w, E]
        let x = self
            .patch_embed
            .forward(&x)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let mut x = self.patch_norm.forward(&x.contiguous()?)?;
        let mut skips = Vec::with_capacity(self.encoder.len());
        for (blocks, merge) in &self.encoder {
            skips.push(x.clone());
            for block in blocks {
                x = block.forward_t(&x, rng.as_mut())?;
            }
            if let Some(merge) = merge {
                x = merge.forward(&x)?;
            }
        }
        let mut x = self.first_up.forward(&self.norm.forward(&x)?)?;
        for (i, (concat, blocks, expand)) in self.decoder.iter().enumerate() {
            let skip = &skips[skips.len() - 2 - i];
            x = concat.forward(&Tensor::cat(&[&x, skip], D::Minus1)?)?;
            for block in blocks {
                x = block.forward_t(&x, rng.as_mut())?;
            }
            if let Some(expand) = expand {
                x = expand.forward(&x)?;
            }
        }
        let x = self.up.forward(&self.norm_up.forward(&x)?)?;
        let e = self.cfg.embed_dim;
        let x = x
            .reshape((b, side, side, e))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        self.output.forward(&x)
    }

    fn param_groups(&self) -> Vec<(&'static str, String)> {
        vec![("weights", self.prefix.clone())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BackboneConfig;
    use candle_core::DType;
    use genseg_nn::params::ParamStore;

    /// Parameters of the reference configuration, from its layer list.
    fn reference_count(cfg: &SwinUnetConfig, stem_channels: usize) -> usize {
        let e = cfg.embed_dim;
        let ln = |d: usize| 2 * d;
        let lin = |i: usize, o: usize, bias: bool| i * o + if bias { o } else { 0 };
        let block = |stage: usize| {
            let d = e << stage;
            let ws = cfg.window(stage, 0).0;
            let table = (2 * ws - 1) * (2 * ws - 1) * cfg.num_heads[stage];
            ln(d)
                + table
                + lin(d, 3 * d, true)
                + lin(d, d, true)
                + ln(d)
                + lin(d, 4 * d, true)
                + lin(4 * d, d, true)
        };
        let stages = cfg.depths.len();
        let mut n = stem_channels * e * 16 + e + ln(e);
        for i in 0..stages {
            n += cfg.depths[i] * block(i);
            if i + 1 < stages {
                let d = e << i;
                n += ln(4 * d) + lin(4 * d, 2 * d, false);
            }
        }
        n += ln(e << (stages - 1));
        // layers_up.0: expand C -> 2C, norm C/2.
        let deep = e << (stages - 1);
        n += lin(deep, 2 * deep, false) + ln(deep / 2);
        for i in 1..stages {
            let stage = stages - 1 - i;
            let d = e << stage;
            n += lin(2 * d, d, true) + cfg.depths[stage] * block(stage);
            if i + 1 < stages {
                n += lin(d, 2 * d, false) + ln(d / 2);
            }
        }
        n + ln(e) + lin(e, 16 * e, false) + ln(e) + e * cfg.out_channels
    }

    fn count(store: &ParamStore) -> usize {
        store
            .trainable_vars()
            .iter()
            .map(|(_, v)| v.as_tensor().elem_count())
            .sum()
    }

    #[test]
    fn the_reference_configuration_has_the_reference_parameter_count() -> anyhow::Result<()> {
        let cfg = SwinUnetConfig::default();
        let expected = reference_count(&cfg, 3);
        // The Swin-Unet paper reports 27.17M parameters (Synapse, 9 classes: 8 · 96 more
        // in the output conv than our one logit channel).
        assert_eq!(expected + 8 * 96, 27_168_900);
        let store = ParamStore::new(0, candle_core::DType::F32, &Device::Cpu);
        SwinUnet::new(&cfg, store.var_builder())?;
        assert_eq!(count(&store), expected);
        Ok(())
    }

    fn tiny(in_channels: usize) -> SwinUnetConfig {
        SwinUnetConfig {
            in_channels,
            image_size: 32,
            embed_dim: 8,
            depths: vec![2, 2, 2],
            num_heads: vec![1, 2, 4],
            window_size: 4,
            ..SwinUnetConfig::default()
        }
    }

    #[test]
    fn output_size_equals_input_size_and_every_parameter_gets_a_gradient() -> anyhow::Result<()> {
        for channels in [1, 3] {
            // Without stochastic depth: with it, a batch may drop a whole block (and its
            // parameters' gradients) by chance.
            let cfg = SwinUnetConfig {
                drop_path: 0.0,
                ..tiny(channels)
            };
            let store = ParamStore::new(3, candle_core::DType::F32, &Device::Cpu);
            let model = SwinUnet::new(&cfg, store.var_builder())?;
            assert_eq!(count(&store), reference_count(&cfg, 3));
            let x = Tensor::rand(0f32, 1.0, (2, channels, 32, 32), &Device::Cpu)?;
            let y = model.forward_t(&x, true)?;
            assert_eq!(y.dims(), &[2, 1, 32, 32]);
            genseg_nn::gradcheck::assert_all_params_receive_gradient(
                &y.sqr()?.mean_all()?,
                &store.trainable_vars(),
            )?;
            assert_eq!(model.forward_t(&x, false)?.dims(), &[2, 1, 32, 32]);
        }
        Ok(())
    }

    #[test]
    fn stochastic_depth_is_a_function_of_the_batch() -> anyhow::Result<()> {
        let store = ParamStore::new(4, candle_core::DType::F32, &Device::Cpu);
        let model = SwinUnet::new(&tiny(3), store.var_builder())?;
        let x = Tensor::rand(0f32, 1.0, (4, 3, 32, 32), &Device::Cpu)?;
        let values = |t: Tensor| t.flatten_all()?.to_vec1::<f32>();
        let a = values(model.forward_t(&x, true)?)?;
        assert_eq!(a, values(model.forward_t(&x, true)?)?);
        Ok(())
    }

    /// A 4x4 grid, windows of 2, shift 1: regions split each axis as [0, 2) [2, 3) [3, 4),
    /// after the cyclic shift. Written out by hand.
    /// The reference's `torch.roll(x, -shift)` then `window_partition`, by candle's ops.
    #[test]
    fn the_window_order_is_the_references_roll_then_partition() -> anyhow::Result<()> {
        for (r, ws, shift) in [(8usize, 4usize, 0usize), (8, 4, 2), (14, 7, 3), (6, 3, 1)] {
            let grid = Tensor::arange(0u32, (r * r) as u32, &Device::Cpu)?
                .to_dtype(DType::F32)?
                .reshape((1, r, r, 1))?;
            let s = shift as i32;
            let rolled = grid.roll(-s, 1)?.roll(-s, 2)?;
            let partitioned = rolled
                .reshape((1, r / ws, ws, r / ws, ws, 1))?
                .permute((0, 1, 3, 2, 4, 5))?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let order = window_order(r, ws, shift);
            let want: Vec<u32> = partitioned.iter().map(|&v| v as u32).collect();
            assert_eq!(order, want, "r {r} ws {ws} shift {shift}");
            let inverse = inverse_order(&order);
            assert!((0..r * r).all(|i| order[inverse[i] as usize] as usize == i));
        }
        Ok(())
    }

    #[test]
    fn the_shifted_window_mask_matches_a_hand_count() {
        let mask = shifted_window_mask(4, 2, 1);
        assert_eq!(mask.len(), 4 * 4 * 4);
        let window = |w: usize| -> Vec<Vec<bool>> {
            (0..4)
                .map(|a| (0..4).map(|b| mask[w * 16 + a * 4 + b] == 0.0).collect())
                .collect()
        };
        // Window 0 (rows 0-1, cols 0-1): all four tokens in region (0, 0).
        assert!(window(0).iter().flatten().all(|&same| same));
        // Window 1 (rows 0-1, cols 2-3): column 2 is region 1, column 3 region 2:
        // tokens 0 (0,2), 1 (0,3), 2 (1,2), 3 (1,3).
        let expect = [
            [true, false, true, false],
            [false, true, false, true],
            [true, false, true, false],
            [false, true, false, true],
        ];
        assert_eq!(window(1), expect.map(|r| r.to_vec()).to_vec());
        // Window 2 (rows 2-3, cols 0-1): split by rows.
        let expect = [
            [true, true, false, false],
            [true, true, false, false],
            [false, false, true, true],
            [false, false, true, true],
        ];
        assert_eq!(window(2), expect.map(|r| r.to_vec()).to_vec());
        // Window 3 (rows 2-3, cols 2-3): four regions, each token alone.
        for (a, row) in window(3).iter().enumerate() {
            for (b, &same) in row.iter().enumerate() {
                assert_eq!(same, a == b);
            }
        }
        assert!(mask.iter().all(|&v| v == 0.0 || v == MASKED));
    }

    #[test]
    fn sizes_that_do_not_fit_the_windows_are_named_with_ones_that_do() {
        let cfg = SwinUnetConfig::default();
        let err = cfg.check(256).unwrap_err().to_string();
        assert!(err.contains("256") && err.contains("224"), "{err}");
        let cfg = SwinUnetConfig {
            image_size: 256,
            ..SwinUnetConfig::default()
        };
        let err = cfg.check(256).unwrap_err().to_string();
        assert!(err.contains("not a whole number of 7x7 windows"), "{err}");
        assert!(err.contains("224"), "{err}");
        assert!(tiny(1).check(32).is_ok());
    }

    /// A checkpoint named as Swin-T's (encoder only, with an ImageNet head) fills the
    /// encoder and, mirrored, the decoder's blocks; the rest stays as initialised.
    #[test]
    fn a_swin_t_checkpoint_fills_the_encoder_and_the_mirrored_decoder() -> anyhow::Result<()> {
        let cfg = SwinUnetConfig {
            image_size: 64,
            embed_dim: 8,
            num_heads: vec![1, 2, 4, 8],
            window_size: 4,
            ..SwinUnetConfig::default()
        };
        let source = ParamStore::new(7, candle_core::DType::F32, &Device::Cpu);
        SwinUnet::new(&cfg, source.var_builder())?;
        let mut file: std::collections::HashMap<String, Tensor> = source
            .named_tensors()?
            .into_iter()
            .filter(|(n, _)| {
                n.starts_with("layers.")
                    || n.starts_with("patch_embed.")
                    || n == "norm.weight"
                    || n == "norm.bias"
            })
            .collect();
        file.insert(
            "head.weight".into(),
            Tensor::zeros((1000, 64), candle_core::DType::F32, &Device::Cpu)?,
        );
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("swin_t.safetensors");
        candle_core::safetensors::save(&file, &path)?;
        let store = ParamStore::new(1, candle_core::DType::F32, &Device::Cpu);
        SwinUnet::new(&cfg, store.var_builder())?;
        let report = crate::pretrained::load_pretrained(&store, "", &path, swin_checkpoint)?;
        assert_eq!(report.skipped, ["head.weight (not part of the model)"]);
        let loaded = store.named_tensors()?;
        let same = |a: &str, b: &Tensor| -> anyhow::Result<bool> {
            Ok((&loaded[a] - b)?.abs()?.max_all()?.to_scalar::<f32>()? == 0.0)
        };
        let q = "blocks.1.attn.qkv.weight";
        assert!(same(
            &format!("layers.1.{q}"),
            &file[&format!("layers.1.{q}")]
        )?);
        assert!(same(
            &format!("layers_up.2.{q}"),
            &file[&format!("layers.1.{q}")]
        )?);
        assert!(same(
            &format!("layers_up.3.{q}"),
            &file[&format!("layers.0.{q}")]
        )?);
        assert!(report.kept_fresh.iter().all(|n| !n.starts_with("layers.")));
        assert!(report.kept_fresh.contains(&"output.weight".to_string()));
        Ok(())
    }

    #[test]
    fn a_swin_t_checkpoint_maps_to_the_encoder_and_its_mirror() {
        assert_eq!(
            swin_checkpoint("layers.1.blocks.0.attn.qkv.weight"),
            [
                "layers.1.blocks.0.attn.qkv.weight",
                "layers_up.2.blocks.0.attn.qkv.weight"
            ]
        );
        assert_eq!(
            swin_checkpoint("swin_unet.layers.1.downsample.norm.weight"),
            ["layers.1.downsample.norm.weight"]
        );
        assert!(swin_checkpoint("head.weight").is_empty());
        assert!(swin_checkpoint("layers.0.blocks.1.attn_mask").is_empty());
    }
}
