//! DINOv2's vision transformer (Oquab et al. 2023), as candle-transformers' `dinov2` runs
//! it, rebuilt on ops whose backward is complete: genseg-nn's LayerNorm and softmax
//! (candle_nn's fused ones return no gradient), so that a gradient reaches the input
//! images through the frozen encoder. GenSeg needs that: its architecture gradient flows
//! from the segmenter's loss back into the synthetic images.
//!
//! Same weights (the released checkpoints' names), same numbers as candle-transformers'
//! model (checked in the tests on random weights): patch embedding (14 x 14, stride 14),
//! class token, position embedding resized by nearest neighbour to the patch grid, pre-norm
//! blocks (LayerNorm, multi-head self-attention, LayerScale; LayerNorm, MLP with GELU
//! (tanh form), LayerScale), final LayerNorm. Like candle's port it departs from the
//! PyTorch original in three places: LayerNorm eps 1e-5 (1e-6), GELU's tanh approximation
//! (exact erf) and nearest-neighbour (bicubic) resizing of the position embedding.
//! Unlike it, a batch may hold more than one image.
//!
//! Every weight is a constant tensor (loaded, never a parameter of a run): the encoder is
//! frozen, only what flows through it is differentiated.

use candle_core::{D, IndexOp, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use genseg_nn::conv::Conv2d;
use genseg_nn::init::{InitScheme, conv2d, linear};
use genseg_nn::ops::{LayerNorm, softmax};
use genseg_nn::rows::Linear;

/// DINOv2's patch side.
pub const PATCH: usize = 14;
/// The position embedding's grid side in the released checkpoints (518 px / 14).
const GRID: usize = 37;
/// candle-transformers' LayerNorm eps (the PyTorch original's is 1e-6).
const LN_EPS: f64 = 1e-5;

/// One pre-norm transformer block.
#[derive(Debug)]
struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    ls1: Tensor,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    ls2: Tensor,
    heads: usize,
}

impl Block {
    fn new(width: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        let init = InitScheme::TorchDefault;
        let attn = vb.pp("attn");
        let mlp = vb.pp("mlp");
        Ok(Self {
            norm1: LayerNorm::new(width, LN_EPS, vb.pp("norm1"))?,
            qkv: linear(width, 3 * width, true, init, attn.pp("qkv"))?,
            proj: linear(width, width, true, init, attn.pp("proj"))?,
            ls1: vb.pp("ls1").get(width, "gamma")?,
            norm2: LayerNorm::new(width, LN_EPS, vb.pp("norm2"))?,
            fc1: linear(width, 4 * width, true, init, mlp.pp("fc1"))?,
            fc2: linear(4 * width, width, true, init, mlp.pp("fc2"))?,
            ls2: vb.pp("ls2").get(width, "gamma")?,
            heads,
        })
    }

    /// Multi-head self-attention over all tokens of `x` `[B, N, C]`.
    fn attention(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let hd = c / self.heads;
        // [B, N, 3, H, hd] -> [3, B, H, N, hd]
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((b, n, 3, self.heads, hd))?
            .permute((2, 0, 3, 1, 4))?;
        let q = (qkv.i(0)? * (hd as f64).powf(-0.5))?.contiguous()?;
        let k = qkv.i(1)?.contiguous()?;
        let v = qkv.i(2)?.contiguous()?;
        let scores = q.matmul(&k.t()?.contiguous()?)?;
        let attn = softmax(&scores, D::Minus1)?.matmul(&v)?;
        self.proj
            .forward(&attn.transpose(1, 2)?.reshape((b, n, c))?)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.attention(&self.norm1.forward(x)?)?;
        let x = (x + a.broadcast_mul(&self.ls1)?)?;
        let m = self.fc1.forward(&self.norm2.forward(&x)?)?.gelu()?;
        let m = self.fc2.forward(&m)?;
        x + m.broadcast_mul(&self.ls2)?
    }
}

/// The encoder: DINOv2's blocks under its patch and position embeddings.
#[derive(Debug)]
pub struct Dinov2 {
    patch_embed: Conv2d,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    width: usize,
}

impl Dinov2 {
    /// Reads `depth` blocks of `width` channels and `heads` heads from `vb` (constant
    /// tensors, e.g. `VarBuilder::from_tensors` over a checkpoint).
    pub fn new(depth: usize, width: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        if heads == 0 || width % heads != 0 {
            candle_core::bail!("dinov2: width {width} is not divisible by {heads} heads");
        }
        let patch_cfg = Conv2dConfig {
            stride: PATCH,
            ..Default::default()
        };
        let init = InitScheme::TorchDefault;
        let blocks = vb.pp("blocks");
        Ok(Self {
            patch_embed: conv2d(
                3,
                width,
                PATCH,
                patch_cfg,
                true,
                init,
                vb.pp("patch_embed.proj"),
            )?,
            cls_token: vb.get((1, 1, width), "cls_token")?,
            pos_embed: vb.get((1, GRID * GRID + 1, width), "pos_embed")?,
            blocks: (0..depth)
                .map(|i| Block::new(width, heads, blocks.pp(i.to_string())))
                .collect::<Result<_>>()?,
            norm: LayerNorm::new(width, LN_EPS, vb.pp("norm"))?,
            width,
        })
    }

    /// Channels of the features.
    pub fn width(&self) -> usize {
        self.width
    }

    /// The position embedding for an `h x w` patch grid: the class token's, then the
    /// checkpoint's grid resized by nearest neighbour (candle-transformers' choice). A
    /// constant: candle's nearest resize by a non-integer factor has no backward.
    fn position_embedding(&self, h: usize, w: usize) -> Result<Tensor> {
        let pos_embed = self.pos_embed.detach();
        if h == GRID && w == GRID {
            return Ok(pos_embed);
        }
        let class = pos_embed.i((.., ..1))?;
        let grid = pos_embed
            .i((.., 1..))?
            .reshape((1, GRID, GRID, self.width))?
            .permute((0, 3, 1, 2))?
            .upsample_nearest2d(h, w)?
            .permute((0, 2, 3, 1))?
            .reshape((1, h * w, self.width))?;
        Tensor::cat(&[&class, &grid], 1)
    }

    /// The last block's patch tokens, LayerNorm'd, as a feature map: `[B, C, H/14, W/14]`
    /// for images `[B, 3, H, W]` (sides multiples of 14, normalised as DINOv2 expects).
    pub fn features(&self, images: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = images.dims4()?;
        if c != 3 || h % PATCH != 0 || w % PATCH != 0 || h == 0 || w == 0 {
            candle_core::bail!(
                "dinov2: expected [B, 3, H, W] with H and W multiples of {PATCH}, got {:?}",
                images.dims()
            );
        }
        let (gh, gw) = (h / PATCH, w / PATCH);
        let patches = self
            .patch_embed
            .forward(images)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let cls = self.cls_token.broadcast_as((b, 1, self.width))?;
        let mut x = Tensor::cat(&[&cls.to_dtype(patches.dtype())?, &patches], 1)?
            .broadcast_add(&self.position_embedding(gh, gw)?)?;
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        self.norm
            .forward(&x)?
            .i((.., 1..))?
            .reshape((b, gh, gw, self.width))?
            .permute((0, 3, 1, 2))?
            .contiguous()
    }
}

/// Depth and width of the DINOv2 checkpoint `tensors` (names as released).
pub fn shape_of(tensors: &std::collections::HashMap<String, Tensor>) -> Option<(usize, usize)> {
    let width = *tensors.get("cls_token")?.dims().last()?;
    let depth = tensors
        .keys()
        .filter_map(|k| {
            k.strip_prefix("blocks.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()?
        + 1;
    Some((depth, width))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_transformers::models::dinov2::DinoVisionTransformer;
    use std::collections::HashMap;

    /// Random weights under the released names (candle-transformers' model, saved from a
    /// VarMap, LayerScale and biases randomised so that no term vanishes).
    fn random_checkpoint(
        depth: usize,
        width: usize,
        heads: usize,
    ) -> Result<HashMap<String, Tensor>> {
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        DinoVisionTransformer::new(vb, depth, width, heads)?;
        let data = varmap.data().lock().expect("the varmap");
        data.iter()
            .map(|(k, v)| {
                let t = v.as_tensor();
                let t = if k.ends_with("gamma") || k.ends_with("bias") || k.contains("norm") {
                    Tensor::rand(-1f32, 1.0, t.shape(), &Device::Cpu)?
                } else {
                    t.detach()
                };
                Ok((k.clone(), t))
            })
            .collect()
    }

    #[test]
    fn features_match_candle_transformers_and_gradients_reach_the_images() -> anyhow::Result<()> {
        let (depth, width, heads) = (2, 24, 2);
        let tensors = random_checkpoint(depth, width, heads)?;
        assert_eq!(shape_of(&tensors), Some((depth, width)));
        let theirs = DinoVisionTransformer::new(
            VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu),
            depth,
            width,
            heads,
        )?;
        let ours = Dinov2::new(
            depth,
            width,
            heads,
            VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
        )?;
        // Two images (candle's model takes one at a time), at the checkpoint's own grid
        // (no resizing) and at a smaller one (nearest-neighbour position embedding).
        for side in [GRID * PATCH, 4 * PATCH] {
            let x = Var::from_tensor(&Tensor::rand(-2f32, 2.0, (2, 3, side, side), &Device::Cpu)?)?;
            let got = ours.features(x.as_tensor())?;
            for i in 0..2 {
                let want = theirs
                    .get_intermediate_layers(
                        &x.as_tensor().i(i..i + 1)?,
                        &[depth - 1],
                        true,
                        false,
                        true,
                    )?
                    .squeeze(0)?;
                let diff = (got.i(i..i + 1)? - want)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f32>()?;
                assert!(diff < 1e-4, "side {side} image {i}: max difference {diff}");
            }
            let grads = got.sqr()?.sum_all()?.backward()?;
            let g = grads.get(x.as_tensor()).expect("a gradient for the images");
            assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        }
        Ok(())
    }

    #[test]
    fn the_input_gradient_matches_finite_differences() -> anyhow::Result<()> {
        let tensors = random_checkpoint(1, 8, 2)?;
        let model = Dinov2::new(
            1,
            8,
            2,
            VarBuilder::from_tensors(tensors, DType::F64, &Device::Cpu),
        )?;
        let x = Tensor::rand(-1f64, 1.0, (1, 3, 28, 28), &Device::Cpu)?;
        genseg_nn::gradcheck::check_gradients(
            |xs| model.features(&xs[0])?.sqr()?.mean_all(),
            &[x],
            genseg_nn::gradcheck::GradCheckOptions {
                max_elements_per_input: Some(64),
                ..Default::default()
            },
        )?
        .ensure(1e-5)?;
        Ok(())
    }

    #[test]
    fn bad_shapes_are_named() -> anyhow::Result<()> {
        let tensors = random_checkpoint(1, 8, 2)?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let model = Dinov2::new(1, 8, 2, vb.clone())?;
        let err = model
            .features(&Tensor::zeros((1, 3, 30, 28), DType::F32, &Device::Cpu)?)
            .unwrap_err()
            .to_string();
        assert!(err.contains("multiples of 14"), "{err}");
        let err = Dinov2::new(1, 8, 3, vb).unwrap_err().to_string();
        assert!(err.contains("not divisible by 3 heads"), "{err}");
        Ok(())
    }
}
