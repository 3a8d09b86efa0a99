//! A frozen foundation encoder under a small trainable decoder: DINOv2 (Oquab et al.
//! 2023), run frozen, its last block's patch features decoded to one logit per pixel. What
//! a handful of labels can train is the decoder; the encoder brings what it learnt from
//! 142M images.
//!
//! Encoder ([`crate::dinov2`]): images (1 channel repeated to 3) resized bilinearly to
//! `input_size` (a multiple of the patch side 14), normalised with ImageNet's mean and
//! deviation, then DINOv2's last block, LayerNorm'd: `[B, D, input_size/14,
//! input_size/14]`. Its weights come from a local safetensors file (`dinov2_vits14` and the
//! larger ones, as released; the depth and width are read from the file, the heads are `D /
//! 64` as in every released DINOv2 unless set); nothing is downloaded, and nothing of the
//! encoder is a parameter of the run. Images that carry no gradient (real pairs, frozen
//! generators' outputs) have their features cached per image (keyed by the image's values),
//! so an un-augmented training set costs the encoder once; images that do (GenSeg's
//! synthetic pairs, whose architecture gradient flows back through the segmenter) run
//! through the encoder with their graph, so the gradient reaches them.
//!
//! Decoder (trainable): 1x1 conv D → `decoder_width` + BN + ReLU, bilinear x4, 3x3 conv +
//! BN + ReLU, 1x1 conv to the logits, resized bilinearly to the input size.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use genseg_nn::batch_norm::{BatchNorm2d, BatchNormConfig};
use genseg_nn::conv::Conv2d;
use genseg_nn::init::{InitScheme, conv2d};
use genseg_nn::ops::resize_bilinear;
use serde::{Deserialize, Serialize};

use crate::SegModel;
use crate::dinov2::{Dinov2, PATCH, shape_of};
/// ImageNet's per-channel mean and standard deviation (DINOv2's input normalisation).
const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Every setting of a [`FrozenDino`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FoundationConfig {
    /// Image channels (1 is repeated to 3).
    pub in_channels: usize,
    /// Logit channels (1 for binary segmentation).
    pub out_channels: usize,
    /// The DINOv2 safetensors file (required; stored absolute by the pipelines).
    pub weights: PathBuf,
    /// Attention heads; 0 = width / 64, as every released DINOv2.
    pub num_heads: usize,
    /// Side the images are resized to for the encoder (a multiple of 14).
    pub input_size: usize,
    /// Channels of the decoder.
    pub decoder_width: usize,
    /// Images whose features are kept in memory (0: no cache).
    pub cache_size: usize,
}

impl Default for FoundationConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 1,
            weights: PathBuf::new(),
            num_heads: 0,
            input_size: 224,
            decoder_width: 64,
            cache_size: 2048,
        }
    }
}

impl FoundationConfig {
    /// Checks the settings (not the file) before anything is allocated.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.weights.as_os_str().is_empty(),
            "model.foundation.weights: the frozen encoder needs a DINOv2 safetensors file"
        );
        anyhow::ensure!(
            self.in_channels == 1 || self.in_channels == 3,
            "foundation: DINOv2 reads RGB; {} input channels are neither 1 nor 3",
            self.in_channels
        );
        anyhow::ensure!(
            self.input_size >= PATCH && self.input_size % PATCH == 0,
            "foundation: input_size {} must be a positive multiple of DINOv2's patch {PATCH} \
             (e.g. 224)",
            self.input_size
        );
        anyhow::ensure!(
            self.out_channels > 0 && self.decoder_width > 0,
            "foundation: out_channels and decoder_width must be > 0"
        );
        Ok(())
    }
}

backbone_config!(FoundationConfig => FrozenDino {
    fn check(&self, size: usize) -> anyhow::Result<()> {
        anyhow::ensure!(
            size >= 16,
            "data.size {size} is below 16 px, too small to segment"
        );
        self.validate()
    }
});

/// The encoder, loaded from `path`.
fn load_dino(
    path: &Path,
    num_heads: usize,
    device: &candle_core::Device,
) -> anyhow::Result<Dinov2> {
    let tensors = candle_core::safetensors::load(path, device)
        .with_context(|| format!("reading the DINOv2 weights {}", path.display()))?;
    let (depth, width) = shape_of(&tensors).with_context(|| {
        format!(
            "{} is not a DINOv2 checkpoint (no cls_token tensor or no blocks)",
            path.display()
        )
    })?;
    let heads = if num_heads == 0 {
        width / 64
    } else {
        num_heads
    };
    anyhow::ensure!(
        heads > 0 && width % heads == 0,
        "{}: width {width} is not divisible by {heads} heads (set model.foundation.num_heads)",
        path.display()
    );
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    Dinov2::new(depth, width, heads, vb)
        .with_context(|| format!("building DINOv2 from {}", path.display()))
}

/// Conv → BN → ReLU.
#[derive(Debug)]
struct ConvBnRelu {
    conv: Conv2d,
    bn: BatchNorm2d,
}

impl ConvBnRelu {
    fn new(c_in: usize, c_out: usize, kernel: usize, vb: VarBuilder) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: kernel / 2,
            ..Default::default()
        };
        let init = InitScheme::TorchDefault;
        Ok(Self {
            conv: conv2d(c_in, c_out, kernel, cfg, false, init, vb.pp("conv"))?,
            bn: BatchNorm2d::new(c_out, BatchNormConfig::default(), init, vb.pp("bn"))?,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.bn.forward_relu_t(&self.conv.forward(x)?, train)
    }
}

/// The frozen DINOv2 encoder and its trainable decoder (see the module docs).
pub struct FrozenDino {
    cfg: FoundationConfig,
    prefix: String,
    encoder: Dinov2,
    cache: Mutex<HashMap<u64, Tensor>>,
    reduce: ConvBnRelu,
    refine: ConvBnRelu,
    out: Conv2d,
}

impl std::fmt::Debug for FrozenDino {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrozenDino")
            .field("cfg", &self.cfg)
            .field("width", &self.encoder.width())
            .finish_non_exhaustive()
    }
}

impl FrozenDino {
    /// Loads the encoder from `cfg.weights` and creates the decoder through `vb`.
    pub fn new(cfg: &FoundationConfig, vb: VarBuilder) -> anyhow::Result<Self> {
        cfg.validate()?;
        let encoder = load_dino(&cfg.weights, cfg.num_heads, vb.device())?;
        let (width, w) = (encoder.width(), cfg.decoder_width);
        Ok(Self {
            cfg: cfg.clone(),
            prefix: vb.prefix(),
            encoder,
            cache: Mutex::new(HashMap::new()),
            reduce: ConvBnRelu::new(width, w, 1, vb.pp("decoder.reduce"))?,
            refine: ConvBnRelu::new(w, w, 3, vb.pp("decoder.refine"))?,
            out: conv2d(
                w,
                cfg.out_channels,
                1,
                Conv2dConfig::default(),
                true,
                InitScheme::TorchDefault,
                vb.pp("decoder.out"),
            )?,
        })
    }

    /// The encoder's features of `images` `[B, 3, S, S]` (already resized and normalised):
    /// with their graph when a gradient is to reach them, else from the cache where present.
    fn features(&self, images: &Tensor) -> Result<Tensor> {
        if images.track_op() {
            return self.encoder.features(images);
        }
        let b = images.dim(0)?;
        let keys = (0..b)
            .map(|i| genseg_nn::rng::content_hash(&images.get(i)?))
            .collect::<Result<Vec<u64>>>()?;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let missing: Vec<usize> = (0..b).filter(|&i| !cache.contains_key(&keys[i])).collect();
        let mut fresh = HashMap::new();
        if !missing.is_empty() {
            let index = Tensor::new(
                missing.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                images.device(),
            )?;
            let features = self.encoder.features(&images.index_select(&index, 0)?)?;
            for (row, &i) in missing.iter().enumerate() {
                fresh.insert(keys[i], features.get(row)?.detach());
            }
        }
        let rows = keys
            .iter()
            .map(|k| match fresh.get(k) {
                Some(t) => Ok(t.clone()),
                None => Ok(cache[k].clone()),
            })
            .collect::<Result<Vec<_>>>()?;
        for (k, t) in fresh {
            if cache.len() < self.cfg.cache_size {
                cache.insert(k, t);
            }
        }
        Tensor::stack(&rows, 0)
    }
}

impl SegModel for FrozenDino {
    fn forward_t(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        let (_, c, h, w) = images.dims4()?;
        if c != self.cfg.in_channels {
            candle_core::bail!(
                "foundation: expected {} input channels, got {c}",
                self.cfg.in_channels
            );
        }
        let x = if c == 1 {
            images.repeat((1, 3, 1, 1))?
        } else {
            images.clone()
        };
        let s = self.cfg.input_size;
        let x = resize_bilinear(&x, s, s, false)?;
        let device = x.device();
        let mean = Tensor::new(&IMAGENET_MEAN, device)?.reshape((1, 3, 1, 1))?;
        let std = Tensor::new(&IMAGENET_STD, device)?.reshape((1, 3, 1, 1))?;
        let x = x.broadcast_sub(&mean)?.broadcast_div(&std)?;
        let features = self.features(&x)?;
        let (_, _, fh, fw) = features.dims4()?;
        let y = self.reduce.forward_t(&features, train)?;
        let y = resize_bilinear(&y, 4 * fh, 4 * fw, false)?;
        let y = self.out.forward(&self.refine.forward_t(&y, train)?)?;
        resize_bilinear(&y, h, w, false)
    }

    fn param_groups(&self) -> Vec<(&'static str, String)> {
        vec![("weights", self.prefix.clone())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BackboneConfig;
    use candle_core::{Device, Var};
    use candle_transformers::models::dinov2::DinoVisionTransformer;
    use genseg_nn::params::ParamStore;

    /// A DINOv2 of one block, 24 wide, with random weights, written the way the released
    /// checkpoints are named (candle's own model, saved from a VarMap).
    fn tiny_dino(dir: &Path, with_head: bool) -> anyhow::Result<PathBuf> {
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        DinoVisionTransformer::new(vb, 1, 24, 2)?;
        let path = dir.join("dino.safetensors");
        let mut tensors: HashMap<String, Tensor> = varmap
            .data()
            .lock()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        if !with_head {
            tensors.retain(|k, _| !k.starts_with("head."));
        }
        candle_core::safetensors::save(&tensors, &path)?;
        Ok(path)
    }

    fn config(weights: PathBuf, in_channels: usize) -> FoundationConfig {
        FoundationConfig {
            in_channels,
            weights,
            num_heads: 2,
            input_size: 28,
            decoder_width: 8,
            ..FoundationConfig::default()
        }
    }

    #[test]
    fn only_the_decoder_trains_and_features_are_cached_per_image() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = tiny_dino(dir.path(), false)?;
        let store = ParamStore::new(0, DType::F32, &Device::Cpu);
        let model = FrozenDino::new(&config(path, 1), store.var_builder())?;
        assert!(
            store
                .trainable_vars()
                .iter()
                .all(|(n, _)| n.starts_with("decoder.")),
            "the encoder is not a parameter of the run"
        );
        let x = Tensor::rand(0f32, 1.0, (2, 1, 40, 40), &Device::Cpu)?;
        let y = model.forward_t(&x, true)?;
        assert_eq!(y.dims(), &[2, 1, 40, 40]);
        genseg_nn::gradcheck::assert_all_params_receive_gradient(
            &y.sqr()?.mean_all()?,
            &store.trainable_vars(),
        )?;
        assert_eq!(model.cache.lock().unwrap().len(), 2);
        // The same images again (one of them in a new batch) hit the cache.
        let again = Tensor::cat(&[x.get(1)?.unsqueeze(0)?, x.get(0)?.unsqueeze(0)?], 0)?;
        let y2 = model.forward_t(&again, false)?;
        assert_eq!(model.cache.lock().unwrap().len(), 2);
        assert_eq!(y2.dims(), &[2, 1, 40, 40]);
        Ok(())
    }

    /// GenSeg's synthetic images carry a graph: their gradient flows back through the
    /// frozen encoder, and they are not cached (their values change every step).
    #[test]
    fn a_gradient_reaches_images_that_carry_one() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = tiny_dino(dir.path(), false)?;
        let store = ParamStore::new(0, DType::F32, &Device::Cpu);
        let model = FrozenDino::new(&config(path, 3), store.var_builder())?;
        let x = Var::from_tensor(&Tensor::rand(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu)?)?;
        let y = model.forward_t(x.as_tensor(), true)?;
        let grads = y.sqr()?.mean_all()?.backward()?;
        let g = grads.get(x.as_tensor()).expect("a gradient for the images");
        for i in 0..2 {
            let g = g.get(i)?.abs()?.sum_all()?.to_scalar::<f32>()?;
            assert!(g > 0.0, "image {i} receives no gradient");
        }
        assert_eq!(model.cache.lock().unwrap().len(), 0);
        // The same values without a graph: cached, and the same output.
        let y2 = model.forward_t(&x.as_tensor().detach(), true)?;
        assert_eq!(model.cache.lock().unwrap().len(), 2);
        let diff = (y - y2)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "cached features differ by {diff}");
        Ok(())
    }

    #[test]
    fn bad_weights_and_settings_are_named() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let store = ParamStore::new(0, DType::F32, &Device::Cpu);
        let missing = dir.path().join("none.safetensors");
        let err = format!(
            "{:#}",
            FrozenDino::new(&config(missing, 3), store.var_builder()).unwrap_err()
        );
        assert!(err.contains("none.safetensors"), "{err}");
        let other = dir.path().join("other.safetensors");
        let mut t = HashMap::new();
        t.insert(
            "fc.weight".to_string(),
            Tensor::zeros(2, DType::F32, &Device::Cpu)?,
        );
        candle_core::safetensors::save(&t, &other)?;
        let err = format!(
            "{:#}",
            FrozenDino::new(&config(other, 3), store.var_builder()).unwrap_err()
        );
        assert!(err.contains("not a DINOv2 checkpoint"), "{err}");
        let mut cfg = config(tiny_dino(dir.path(), true)?, 3);
        cfg.input_size = 30;
        assert!(
            cfg.check(64)
                .unwrap_err()
                .to_string()
                .contains("multiple of")
        );
        Ok(())
    }
}
