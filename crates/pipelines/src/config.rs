//! The resolved configuration of a run: everything needed to repeat it.
//!
//! A run starts from a [`Profile`] (`paper` = the reference's settings,
//! `cpu` = a configuration sized by measurement for a 2-core CPU), then a
//! config file and `--set dotted.key=value` overrides are layered on top
//! (see [`crate::overrides`]). The result is written to the run folder as
//! `config.toml`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::Var;
use genseg_backbones::BackboneConfig;
use genseg_backbones::SegModel;
use genseg_backbones::deeplab::DeepLabConfig;
use genseg_backbones::foundation::FoundationConfig;
use genseg_backbones::loss::SegLoss;
use genseg_backbones::metrics::MetricOptions;
use genseg_backbones::swin_unet::SwinUnetConfig;
use genseg_backbones::unet::{Activation, Norm, UNetConfig};
use genseg_data::dataset::{DataConfig, ImageSize};
use genseg_data::intensity::Normalisation;
use genseg_data::layout::LayoutChoice;
use genseg_data::preprocess::{ChannelPolicy, ImageFilter, MaskRule};
use genseg_data::transforms::TransformConfig;
use genseg_generator::discriminator::DiscriminatorConfig;
use genseg_generator::generator::GeneratorConfig;
pub use genseg_generator::generator::NormStatistics;
use genseg_generator::loss::LossConfig;
use genseg_generator::postprocess::{GradientPath, PostProcessConfig, PostStep};
use genseg_nn::optim::{Adam, AdamConfig, Optimizer, RmsProp, RmsPropConfig, Sgd, SgdConfig};
use serde::{Deserialize, Serialize};

use crate::run_dir::Which;

/// The training recipe layered on a profile (before a config file and `--set`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Recipe {
    /// The profile as it is (the reference's training).
    #[default]
    Plain,
    /// nnU-Net's recipe (see [`RunConfig::strong`]).
    Strong,
}

/// The shortest run of the strong recipe.
const STRONG_MIN_ITERATIONS: u64 = 4000;

/// The largest image side a run accepts (`data.size`).
pub const MAX_SIZE: u32 = 4096;
/// The largest batch a run accepts (`train.batch_size`).
pub const MAX_BATCH: usize = 1024;

/// Starting points for a run's configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Profile {
    /// The reference's settings: 256 px, UNet base 64, RMSprop lr 1e-4
    /// momentum 0.9 wd 1e-8, batch 2, 5000 iterations, validation every 10.
    Paper,
    /// Small enough to train a useful lung model in minutes on 2 CPU cores
    /// (docs/results.md has the measurements behind it).
    #[default]
    Cpu,
    /// What the science study compares on (issue 17): the `cpu` profile under the strong
    /// recipe (nnU-Net's, [`RunConfig::strong`]), and GenSeg with its hypergradient every
    /// [`STUDY_ARCH_EVERY`] and level 1 every [`STUDY_GENERATOR_EVERY`] iterations, so
    /// that a whole GenSeg run (pre-training included) fits in 30 minutes on 2 cores
    /// (docs/results.md has the measurements behind it).
    Study,
}

/// `genseg.arch_every` of the `study` profile: 32 brings a GenSeg iteration to 2.8x a
/// baseline one (16: 3.0x); on ISIC 32 + 8 the two tie on validation Dice and differ by
/// −1.2 ± 1.3 (test) and +0.5 ± 1.0 (PH2) points, 3 seeds (docs/results.md).
pub const STUDY_ARCH_EVERY: u64 = 32;
/// `genseg.generator_every` of the `study` profile.
pub const STUDY_GENERATOR_EVERY: u64 = 4;

/// How the segmentation model is trained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Real pairs only.
    Baseline,
    /// + a loss term on a horizontally flipped copy of the real batch.
    Flip,
    /// + a loss term on a rotated copy (`augment.rotate_degrees`).
    Rotate,
    /// + a loss term on a translated copy (`augment.translate_fraction`).
    Translate,
    /// + a loss term on a copy flipped, rotated and translated.
    Combine,
    /// + a loss term on synthetic pairs from a frozen generator (the paper's "Separate").
    Separate,
    /// GenSeg end to end: generator, segmenter and the generator's architecture trained
    /// together by multi-level optimisation (`[genseg]`, docs/method.md).
    Genseg,
    /// pix2pix pre-training of the mask-to-image generator (`genseg pretrain-generator`):
    /// `[generator]`, `[discriminator]` and `[gan]` trained by `[train]` (Adam).
    Pix2pix,
}

impl Method {
    /// Every method, in the order of the docs.
    pub const ALL: [Method; 8] = [
        Method::Baseline,
        Method::Flip,
        Method::Rotate,
        Method::Translate,
        Method::Combine,
        Method::Separate,
        Method::Genseg,
        Method::Pix2pix,
    ];

    /// The name used on the command line and in config files.
    pub fn name(self) -> &'static str {
        match self {
            Method::Baseline => "baseline",
            Method::Flip => "flip",
            Method::Rotate => "rotate",
            Method::Translate => "translate",
            Method::Combine => "combine",
            Method::Separate => "separate",
            Method::Genseg => "genseg",
            Method::Pix2pix => "pix2pix",
        }
    }

    /// Whether the method uses a pre-trained generator (`separate`, `genseg`).
    pub fn uses_generator(self) -> bool {
        matches!(self, Method::Separate | Method::Genseg)
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Parses the snake_case name of a config enum (`separate`, `min_max`, `best`, ...), the
/// spelling config files use; the error lists what `what` accepts.
pub fn parse_name<T: serde::de::DeserializeOwned>(s: &str, what: &str) -> Result<T> {
    use serde::de::IntoDeserializer;
    let de: serde::de::value::StrDeserializer<'_, serde::de::value::Error> = s.into_deserializer();
    T::deserialize(de).map_err(|e| anyhow::anyhow!("{what} `{s}`: {e}"))
}

/// `[data]`: where the labelled pool is and how it is read and split.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// The dataset folder (any supported layout).
    pub path: PathBuf,
    /// `auto`, `folder`, `genseg` or `nnunet`.
    pub layout: LayoutChoice,
    /// Images and masks are resized to `size x size`.
    pub size: u32,
    /// Image interpolation (`bicubic` or `bilinear`; masks use nearest).
    pub image_filter: ImageFilter,
    /// `strict`, `gray` or `rgb`.
    pub channels: ChannelPolicy,
    /// `auto` (the layout's default), `binary`, `nonzero`, `threshold=T`, `label=L`.
    pub mask_rule: String,
    /// Histogram equalisation + gamma before resizing (the reference's X-ray
    /// preprocessing); 0 disables it, the reference uses 0.5.
    pub equalize_gamma: f32,
    /// Training images drawn from the pool.
    pub n_train: usize,
    /// Validation images drawn from the pool (model selection).
    pub n_val: usize,
    /// A split file (ours or nnU-Net's `splits_final.json`) to use instead of
    /// drawing one; empty = draw with the run's seed.
    pub split_file: PathBuf,
    /// Which split of `split_file` to use; without a split file, which validation fold of the
    /// drawn labelled pool (0 = the standard split; the others keep its test cases and
    /// validate on other `n_val` labelled cases, for choosing settings on more images).
    pub fold: usize,
    /// Per-image intensity normalisation in front of the segmenter (`none` or `z_score`,
    /// nnU-Net's); applied to every image the segmenter sees, real or synthetic.
    #[serde(default)]
    pub normalisation: Normalisation,
}

impl DataSection {
    /// Loads the dataset folder `path` with this section's preprocessing.
    pub fn load(&self, path: &std::path::Path) -> Result<genseg_data::dataset::Dataset> {
        genseg_data::dataset::Dataset::load(path, &self.data_config()?)
            .with_context(|| format!("loading dataset {}", path.display()))
    }

    /// The run's split of the pool `ids`: read from `split_file` (fold `fold`), or drawn
    /// with `seed` (`n_train` + `n_val`, the rest test; validation fold `fold` of those
    /// labelled cases); checked against `ids`.
    pub fn split(&self, ids: &[String], seed: u64) -> Result<genseg_data::split::Split> {
        use genseg_data::split::{Split, read_split_file, select_fold};
        let split = if self.split_file.as_os_str().is_empty() {
            Split::low_data_fold(ids, self.n_train, self.n_val, self.fold, seed)?
        } else {
            let splits = read_split_file(&self.split_file)?;
            select_fold(&splits, self.fold)?.clone()
        };
        split.validate(ids)?;
        Ok(split)
    }

    /// The genseg-data reading options.
    pub fn data_config(&self) -> Result<DataConfig> {
        let mask_rule = parse_mask_rule(&self.mask_rule)?;
        Ok(DataConfig {
            layout: self.layout,
            size: Some(ImageSize::square(self.size)),
            image_filter: self.image_filter,
            channels: self.channels,
            mask_rule,
            equalize_gamma: (self.equalize_gamma > 0.0).then_some(self.equalize_gamma),
        })
    }
}

/// Parses `auto`, `binary`, `nonzero`, `threshold=T`, `label=L`.
pub fn parse_mask_rule(s: &str) -> Result<Option<MaskRule>> {
    let rule = match s.split_once('=') {
        None if s == "auto" => return Ok(None),
        None if s == "binary" => MaskRule::Binary,
        None if s == "nonzero" => MaskRule::NonZero,
        Some(("threshold", t)) => MaskRule::Threshold(
            t.parse()
                .map_err(|_| anyhow::anyhow!("mask_rule: `{t}` is not a number"))?,
        ),
        Some(("label", l)) => MaskRule::Label(
            l.parse()
                .map_err(|_| anyhow::anyhow!("mask_rule: `{l}` is not a label value"))?,
        ),
        _ => bail!("mask_rule `{s}`: expected auto, binary, nonzero, threshold=T or label=L"),
    };
    Ok(Some(rule))
}

/// Which backbone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// [`genseg_backbones::unet::UNet`], configured by `[model.unet]`.
    Unet,
    /// [`genseg_backbones::deeplab::DeepLab`] (V3 or V3+ on a ResNet), configured by
    /// `[model.deeplab]`.
    Deeplab,
    /// [`genseg_backbones::swin_unet::SwinUnet`], configured by `[model.swin_unet]`.
    SwinUnet,
    /// [`genseg_backbones::foundation::FrozenDino`] (a frozen DINOv2 encoder under a
    /// trainable decoder), configured by `[model.foundation]`.
    Foundation,
    /// A backbone registered at run time with [`register_backbone`], configured by
    /// `[model.registered]`.
    Registered,
}

/// Builds a registered backbone from its input channels, its options and a `VarBuilder`.
pub type BackboneBuilder =
    fn(usize, &toml::Table, candle_nn::VarBuilder) -> Result<Box<dyn SegModel>>;

static REGISTRY: std::sync::Mutex<std::collections::BTreeMap<String, BackboneBuilder>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Makes a backbone of your own available to every pipeline (training, evaluation and
/// prediction of its runs) as `model.kind = "registered"` with `model.registered.name =
/// "<name>"`, without touching the pipelines. Registering a name again replaces its
/// builder.
pub fn register_backbone(name: &str, builder: BackboneBuilder) {
    REGISTRY
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(name.to_string(), builder);
}

/// `[model.registered]`: a backbone registered with [`register_backbone`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegisteredBackbone {
    /// The name it was registered under.
    pub name: String,
    /// Input channels (set from the data).
    pub in_channels: usize,
    /// Its settings, passed to its builder as they are.
    pub options: toml::Table,
}

impl RegisteredBackbone {
    fn builder(&self) -> Result<BackboneBuilder> {
        let registry = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
        registry.get(&self.name).copied().ok_or_else(|| {
            anyhow::anyhow!(
                "model.registered.name: no backbone registered as `{}` (registered: [{}])",
                self.name,
                registry.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })
    }
}

impl BackboneConfig for RegisteredBackbone {
    fn build(&self, vb: candle_nn::VarBuilder) -> Result<Box<dyn SegModel>> {
        self.builder()?(self.in_channels, &self.options, vb)
    }

    fn in_channels(&self) -> usize {
        self.in_channels
    }

    fn set_in_channels(&mut self, channels: usize) {
        self.in_channels = channels;
    }

    fn check(&self, _size: usize) -> Result<()> {
        self.builder().map(|_| ())
    }
}

/// `[model]`: the segmentation backbone. A new backbone is a file in genseg-backbones (its
/// model and a config implementing [`BackboneConfig`]), a [`ModelKind`] variant with its
/// section here, and its arms in [`ModelSection::backbone`] / [`ModelSection::backbone_mut`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// The backbone.
    pub kind: ModelKind,
    /// `[model.unet]`; `in_channels` is set from the data.
    pub unet: UNetConfig,
    /// `[model.deeplab]`; `in_channels` is set from the data (absent from configs written
    /// before it existed: defaults).
    #[serde(default)]
    pub deeplab: DeepLabConfig,
    /// `[model.swin_unet]`; `in_channels` is set from the data, `image_size` must equal
    /// `data.size` (absent from configs written before it existed: defaults).
    #[serde(default)]
    pub swin_unet: SwinUnetConfig,
    /// `[model.foundation]`; `in_channels` is set from the data, `weights` stored absolute
    /// (absent from configs written before it existed: defaults).
    #[serde(default)]
    pub foundation: FoundationConfig,
    /// `[model.registered]` (absent from configs written before it existed: defaults).
    #[serde(default)]
    pub registered: RegisteredBackbone,
    /// Mirroring test-time augmentation in validation, evaluation and prediction.
    #[serde(default)]
    pub mirror_tta: bool,
    /// A local safetensors file the segmenter starts from (names mapped by the backbone,
    /// e.g. torchvision's for DeepLab); empty = from scratch. Read once, when a run starts;
    /// stored absolute.
    #[serde(default)]
    pub pretrained: PathBuf,
}

impl ModelSection {
    /// The configuration of the selected backbone.
    pub fn backbone(&self) -> &dyn BackboneConfig {
        match self.kind {
            ModelKind::Unet => &self.unet,
            ModelKind::Deeplab => &self.deeplab,
            ModelKind::SwinUnet => &self.swin_unet,
            ModelKind::Foundation => &self.foundation,
            ModelKind::Registered => &self.registered,
        }
    }

    /// The configuration of the selected backbone, to fit it to the data.
    pub fn backbone_mut(&mut self) -> &mut dyn BackboneConfig {
        match self.kind {
            ModelKind::Unet => &mut self.unet,
            ModelKind::Deeplab => &mut self.deeplab,
            ModelKind::SwinUnet => &mut self.swin_unet,
            ModelKind::Foundation => &mut self.foundation,
            ModelKind::Registered => &mut self.registered,
        }
    }

    /// Builds the configured backbone (already fitted to the data) from `vb`.
    pub fn build(&self, vb: candle_nn::VarBuilder) -> Result<Box<dyn SegModel>> {
        self.backbone().build(vb)
    }

    /// Sets what follows from the data: the input channels.
    pub fn fit_to_data(&mut self, channels: usize) {
        self.backbone_mut().set_in_channels(channels);
    }

    /// Input channels the backbone was built for.
    pub fn in_channels(&self) -> usize {
        self.backbone().in_channels()
    }

    /// Checks the backbone's settings against the image side `size`.
    pub fn validate(&self, size: u32) -> Result<()> {
        anyhow::ensure!(
            self.pretrained.as_os_str().is_empty() || self.backbone().pretrained_names().is_some(),
            "model.pretrained: the {:?} backbone takes no pretrained weights (deeplab and \
             swin_unet do)",
            self.kind
        );
        self.backbone().check(size as usize)
    }
}

/// Optimizer families.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// RMSprop (alpha 0.99, eps 1e-8 after the square root).
    Rmsprop,
    /// Adam with coupled L2 weight decay.
    Adam,
    /// Adam with decoupled weight decay.
    Adamw,
    /// SGD with momentum.
    Sgd,
}

/// How the learning rate changes over a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// `train.lr` throughout.
    #[default]
    Constant,
    /// nnU-Net's polynomial decay: `lr · (1 - t / iterations)^0.9` at iteration `t`.
    Poly,
}

impl Schedule {
    /// The learning rate of iteration `t` (0-based) of `iterations`.
    pub fn lr(self, base: f64, t: u64, iterations: u64) -> f64 {
        match self {
            Schedule::Constant => base,
            Schedule::Poly => {
                let done = (t as f64 / iterations.max(1) as f64).min(1.0);
                base * (1.0 - done).powf(0.9)
            }
        }
    }
}

/// `[train]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Optimizer steps.
    pub iterations: u64,
    /// Images per step.
    pub batch_size: usize,
    /// The optimizer.
    pub optimizer: OptimizerKind,
    /// Learning rate.
    pub lr: f64,
    /// Momentum (RMSprop, SGD).
    pub momentum: f64,
    /// L2 weight decay (decoupled for AdamW).
    pub weight_decay: f64,
    /// Adam's beta1.
    pub beta1: f64,
    /// Adam's beta2.
    pub beta2: f64,
    /// The segmentation loss terms.
    pub loss: SegLoss,
    /// λ, the weight of the second loss term of every method that has one: the augmented
    /// copy (flip, rotate, translate, combine) or the synthetic pairs (separate, genseg).
    /// 1 in the reference.
    pub lambda: f64,
    /// Validate (and keep the best checkpoint) every this many iterations.
    pub val_every: u64,
    /// Write a line to metrics.jsonl every this many iterations.
    pub log_every: u64,
    /// Refresh the `last/` checkpoint every this many iterations.
    pub checkpoint_every: u64,
    /// Nesterov momentum (SGD).
    #[serde(default)]
    pub nesterov: bool,
    /// The learning-rate schedule.
    #[serde(default)]
    pub schedule: Schedule,
    /// Augment the real training pairs on the fly with the `[transforms]` chain (prepared
    /// on a background thread while the previous step runs). In a pix2pix pre-training
    /// run: the chain's spatial part only, on image and mask alike.
    #[serde(default)]
    pub transforms: bool,
    /// The fractions of the run between which λ fades linearly to 0; after the second,
    /// the steps train on the real pairs alone and skip the second term's work (for
    /// GenSeg: synthesis, the generator's step and the hypergradient). `[1, 1]` keeps λ
    /// to the end (the reference); `[0.5, 0.75]` trains on synthetic pairs first, then
    /// fine-tunes on real ones.
    #[serde(default = "no_fade")]
    pub lambda_fade: [f64; 2],
}

fn no_fade() -> [f64; 2] {
    [1.0, 1.0]
}

impl TrainSection {
    /// λ at iteration `it` of the run, after `lambda_fade`.
    pub fn lambda_at(&self, it: u64) -> f64 {
        let [start, end] = self.lambda_fade;
        let done = it as f64 / self.iterations.max(1) as f64;
        if done < start {
            self.lambda
        } else if done >= end {
            0.0
        } else {
            self.lambda * (end - done) / (end - start)
        }
    }

    /// Builds the configured optimizer over `vars`.
    pub fn build_optimizer(&self, vars: Vec<(String, Var)>) -> Result<Box<dyn Optimizer>> {
        Ok(match self.optimizer {
            OptimizerKind::Rmsprop => Box::new(RmsProp::new(
                vars,
                RmsPropConfig {
                    lr: self.lr,
                    momentum: self.momentum,
                    weight_decay: self.weight_decay,
                    ..Default::default()
                },
            )?),
            OptimizerKind::Adam | OptimizerKind::Adamw => Box::new(Adam::new(
                vars,
                AdamConfig {
                    lr: self.lr,
                    beta1: self.beta1,
                    beta2: self.beta2,
                    weight_decay: self.weight_decay,
                    decoupled_weight_decay: self.optimizer == OptimizerKind::Adamw,
                    ..Default::default()
                },
            )?),
            OptimizerKind::Sgd => Box::new(Sgd::new(
                vars,
                SgdConfig {
                    lr: self.lr,
                    momentum: self.momentum,
                    weight_decay: self.weight_decay,
                    nesterov: self.nesterov,
                    ..Default::default()
                },
            )?),
        })
    }
}

/// `[augment]`: the augmentation baselines (spec §6).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AugmentSection {
    /// Rotation angle in degrees, applied with a random sign.
    pub rotate_degrees: f64,
    /// Translation as a fraction of the image side, per axis, with random
    /// signs. (The reference passes 0.1 as *pixels*, which rounds to no
    /// shift; we shift for real.)
    pub translate_fraction: f64,
}

/// How synthetic images are post-processed before use (spec §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PostChoice {
    /// `xray` with the data's gamma when the data is 1-channel and `data.equalize_gamma > 0`
    /// (the real images are equalised then), otherwise `min_max`.
    #[default]
    Auto,
    /// Batch min-max to `[0, 1]` only.
    MinMax,
    /// Min-max, histogram equalisation, gamma 0.5 (the reference's JSRT chain).
    Xray,
    /// Min-max, then torchvision's photometric chain (the reference's ISIC chain).
    Rgb,
}

impl PostChoice {
    /// The post-processing steps for images of `channels` channels whose real counterparts were
    /// equalised with gamma `equalize_gamma` (0 = not equalised). Always detached.
    pub fn config(self, channels: usize, equalize_gamma: f32) -> PostProcessConfig {
        let mut cfg = match self {
            PostChoice::Auto if channels == 1 && equalize_gamma > 0.0 => PostProcessConfig {
                steps: vec![
                    PostStep::MinMax,
                    PostStep::Equalize { p: 1.0 },
                    PostStep::Gamma {
                        gamma: f64::from(equalize_gamma),
                    },
                ],
                gradient: GradientPath::Detach,
            },
            PostChoice::Auto | PostChoice::MinMax => PostProcessConfig::default(),
            PostChoice::Xray => PostProcessConfig::xray(),
            PostChoice::Rgb => PostProcessConfig::rgb(),
        };
        cfg.gradient = GradientPath::Detach;
        cfg
    }
}

/// `[consistency]`: a mask-consistency term in the generator's pre-training. A frozen
/// segmenter trained on the real pairs segments each painted image, and its BCE against
/// the mask the image was painted for joins the pix2pix objective, weighted: the generator
/// is asked to paint what the mask says (thin vessels included), not only to look like the
/// real images in L1 and to the discriminator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsistencySection {
    /// A segmentation run (any method) whose `best/` checkpoint judges the painted images;
    /// empty = no consistency term. Stored absolute.
    pub run: PathBuf,
    /// Weight of the term beside GAN + λ_L1·L1.
    pub weight: f64,
}

impl Default for ConsistencySection {
    fn default() -> Self {
        Self {
            run: PathBuf::new(),
            weight: 1.0,
        }
    }
}

/// `[separate]`: the synthetic data of `--method separate`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SeparateSection {
    /// The generator's pre-training run (`genseg pretrain-generator --out`); stored
    /// absolute so that `--resume` finds it from anywhere.
    pub generator: PathBuf,
    /// Which of its checkpoints: `best` (lowest validation L1) or `last`.
    pub checkpoint: Which,
    /// Post-processing of synthetic images: `auto`, `min_max`, `xray` or `rgb`.
    pub postprocess: PostChoice,
    /// With `train.transforms`: the synthetic pairs go through the real pairs' chain too
    /// (normalised, augmented by `[transforms]`, deeply supervised), so they are trained
    /// exactly as the real ones; otherwise they are only normalised.
    pub transforms: bool,
    /// The generator's BatchNorm statistics at synthesis: `batch` (the reference's train
    /// mode: each batch of masks normalised by its own statistics) or `running` (those
    /// accumulated in pre-training, so an image does not depend on its batch; dropout stays).
    pub generator_norm: NormStatistics,
    /// Paint each synthetic batch among at least this many masks (the batch's masks
    /// augmented again to fill it; those images are dropped), so that batch statistics are
    /// taken over as many images as in pre-training (its `train.batch_size`, 4 in the `cpu`
    /// profile). 0 = the segmenter's batch alone (the reference).
    pub synthesis_batch: usize,
}

impl Default for SeparateSection {
    fn default() -> Self {
        Self {
            generator: PathBuf::new(),
            checkpoint: Which::Best,
            postprocess: PostChoice::Auto,
            transforms: false,
            generator_norm: NormStatistics::Batch,
            synthesis_batch: 0,
        }
    }
}

/// `[genseg]`: the end-to-end method (`--method genseg`; spec §1.1, §1.5, §1.6).
///
/// Per iteration: a discriminator step, a generator step (level 1, pix2pix loss, α fixed), a
/// segmenter step on real + `weight` · synthetic pairs (level 2), and every `arch_every`
/// iterations an α step (level 3) along the finite-difference hypergradient of the
/// segmentation loss on a validation batch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GensegSection {
    /// A generator pre-training run (`genseg pretrain-generator --out`) to start from; empty =
    /// pre-train one first, into `<run>/pretrain`. Stored absolute.
    pub generator: PathBuf,
    /// Which of its checkpoints: `best` or `last`.
    pub checkpoint: Which,
    /// Profile of the automatic pre-training (when `generator` is empty).
    pub pretrain_profile: Profile,
    /// Iterations of the automatic pre-training; 0 = the profile's.
    pub pretrain_iterations: u64,
    /// Post-processing of synthetic images (`auto`, `min_max`, `xray`, `rgb`); the gradient
    /// passes straight through its 8-bit steps unless `detach_synthetic`.
    pub postprocess: PostChoice,
    /// Adam learning rate of the generator and discriminator weights (betas 0.5, 0.999).
    pub generator_lr: f64,
    /// Adam learning rate of α (DARTS: 3e-4; the reference passes 1e-6).
    pub arch_lr: f64,
    /// Adam beta1 of α (DARTS: 0.5).
    pub arch_beta1: f64,
    /// Adam beta2 of α (DARTS: 0.999).
    pub arch_beta2: f64,
    /// L2 weight decay of α (DARTS: 1e-3).
    pub arch_weight_decay: f64,
    /// Hypergradient and α step every this many iterations (1 in the reference).
    pub arch_every: u64,
    /// Level 1 (the discriminator and generator steps) every this many iterations (1 in the
    /// reference); the segmenter's step and the synthesis run every iteration. Cheapens an
    /// iteration: levels 1 and 2 cost ~3.8 baseline iterations at 64 px.
    pub generator_every: u64,
    /// Finite-difference radius `r`: each hop moves the weights by exactly `r` (Betty 0.01).
    pub radius: f64,
    /// Betty's Adam preconditioning of the vector entering the generator hop (on in Betty).
    pub precondition: bool,
    /// Adam's beta1 of the generator and discriminator (copied from the pre-training run).
    pub generator_beta1: f64,
    /// Adam's beta2 of the generator and discriminator (copied from the pre-training run).
    pub generator_beta2: f64,
    /// Detach synthetic images from the generator, as the released 2-D scripts do (spec
    /// §1.4 F2): no segmentation signal reaches the generator and α never moves.
    pub detach_synthetic: bool,
    /// Use the released JSRT script's learning rates (spec §1.3): generator and
    /// discriminator 2e-6, α 1e-6, segmenter 1e-4; they replace `generator_lr`, `arch_lr`
    /// and `train.lr`.
    pub reference_lrs: bool,
}

impl Default for GensegSection {
    fn default() -> Self {
        Self {
            generator: PathBuf::new(),
            checkpoint: Which::Best,
            pretrain_profile: Profile::Cpu,
            pretrain_iterations: 0,
            postprocess: PostChoice::Auto,
            generator_lr: 2e-4,
            generator_beta1: 0.5,
            generator_beta2: 0.999,
            arch_lr: 3e-4,
            arch_beta1: 0.5,
            arch_beta2: 0.999,
            arch_weight_decay: 1e-3,
            arch_every: 1,
            generator_every: 1,
            radius: genseg_mlo::DEFAULT_RADIUS,
            precondition: true,
            detach_synthetic: false,
            reference_lrs: false,
        }
    }
}

/// The learning rates a GenSeg run uses (after `reference_lrs`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GensegRates {
    /// Generator and discriminator weights.
    pub generator: f64,
    /// α.
    pub arch: f64,
    /// The segmentation model.
    pub segmenter: f64,
}

/// The whole configuration of a training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The training method.
    pub method: Method,
    /// The one seed: weights, splits, batches and augmentations derive from it.
    pub seed: u64,
    /// `[data]`.
    pub data: DataSection,
    /// `[model]`.
    pub model: ModelSection,
    /// `[train]`.
    pub train: TrainSection,
    /// `[augment]`.
    pub augment: AugmentSection,
    /// `[separate]` (absent from configs written before it existed: defaults).
    #[serde(default)]
    pub separate: SeparateSection,
    /// `[genseg]` (absent from configs written before it existed: defaults).
    #[serde(default)]
    pub genseg: GensegSection,
    /// `[generator]`: the mask-to-image generator (trained by `pix2pix`, used by `separate`
    /// and `genseg`, which copy it from their pre-training run); `image_size` and the
    /// channels are set from the data.
    pub generator: GeneratorConfig,
    /// `[discriminator]`: the PatchGAN; `in_channels` is set from the data.
    pub discriminator: DiscriminatorConfig,
    /// `[gan]`: the GAN mode and λ_L1 of the generator's objective.
    pub gan: LossConfig,
    /// `[eval]`: metric options for validation and evaluation.
    pub eval: MetricOptions,
    /// `[transforms]`: the on-the-fly augmentation chain used when `train.transforms` is
    /// on (nnU-Net's by default).
    #[serde(default)]
    pub transforms: TransformConfig,
    /// `[consistency]`: the mask-consistency term of generator pre-training (off unless
    /// `consistency.run` names a segmentation run).
    #[serde(default)]
    pub consistency: ConsistencySection,
}

impl RunConfig {
    /// The defaults of a profile.
    pub fn profile(profile: Profile) -> Self {
        let paper = Self {
            method: Method::Baseline,
            seed: 0,
            data: DataSection {
                path: PathBuf::new(),
                layout: LayoutChoice::Auto,
                size: 256,
                image_filter: ImageFilter::Bicubic,
                channels: ChannelPolicy::Strict,
                mask_rule: "auto".into(),
                equalize_gamma: 0.0,
                n_train: 7,
                n_val: 2,
                split_file: PathBuf::new(),
                fold: 0,
                normalisation: Normalisation::None,
            },
            model: ModelSection {
                kind: ModelKind::Unet,
                unet: UNetConfig::default(),
                deeplab: DeepLabConfig::default(),
                swin_unet: SwinUnetConfig::default(),
                foundation: FoundationConfig::default(),
                registered: RegisteredBackbone::default(),
                mirror_tta: false,
                pretrained: PathBuf::new(),
            },
            train: TrainSection {
                iterations: 5000,
                batch_size: 2,
                optimizer: OptimizerKind::Rmsprop,
                lr: 1e-4,
                momentum: 0.9,
                weight_decay: 1e-8,
                beta1: 0.9,
                beta2: 0.999,
                loss: SegLoss::lungs(),
                lambda: 1.0,
                val_every: 10,
                log_every: 10,
                checkpoint_every: 100,
                nesterov: false,
                schedule: Schedule::Constant,
                transforms: false,
                lambda_fade: no_fade(),
            },
            augment: AugmentSection {
                rotate_degrees: 8.0,
                translate_fraction: 0.1,
            },
            separate: SeparateSection::default(),
            genseg: GensegSection {
                pretrain_profile: Profile::Paper,
                // The released JSRT script's generator rate (spec §1.3).
                generator_lr: 2e-6,
                ..GensegSection::default()
            },
            generator: GeneratorConfig::default(),
            discriminator: DiscriminatorConfig::default(),
            gan: LossConfig::default(),
            eval: MetricOptions::default(),
            transforms: TransformConfig::default(),
            consistency: ConsistencySection::default(),
        };
        match profile {
            Profile::Paper => paper,
            Profile::Cpu => {
                let mut cpu = paper;
                // 64 px, the size the cpu generator is pre-trained at, so every method
                // runs on the same images. Measured (docs/results.md): Montgomery 7+2
                // test Dice 0.925 at 64 px vs 0.907 at 128 px, validation Dice plateaus
                // after ~150 iterations.
                cpu.data.size = 64;
                cpu.model.unet.base_width = 16;
                cpu.generator.ngf = 16;
                cpu.discriminator.ndf = 16;
                cpu.genseg = GensegSection::default();
                cpu.train.iterations = 300;
                cpu.train.batch_size = 2;
                cpu.train.lr = 1e-3;
                cpu.train.val_every = 25;
                cpu.train.checkpoint_every = 50;
                cpu
            }
            Profile::Study => {
                let mut study = Self::profile(Profile::Cpu).with_recipe(Recipe::Strong);
                study.genseg.arch_every = STUDY_ARCH_EVERY;
                study.genseg.generator_every = STUDY_GENERATOR_EVERY;
                study
            }
        }
    }

    /// This configuration with `recipe` applied.
    pub fn with_recipe(mut self, recipe: Recipe) -> Self {
        if recipe == Recipe::Strong {
            self.strong();
        }
        self
    }

    /// nnU-Net's training recipe (v2, 2D), read from its source, with the optimizer that
    /// validation chose: per-image z-score normalisation; the on-the-fly augmentation chain
    /// of [`TransformConfig`]; an InstanceNorm + LeakyReLU U-Net with deep supervision;
    /// BCE + batch Dice (nnU-Net's CE + Dice for one foreground class); mirroring TTA. At
    /// least 4000 iterations (nnU-Net's 50-epoch run is 12,500), validated every 200.
    ///
    /// The optimizer is RMSprop at a constant lr 1e-3 (momentum 0.9, weight decay 1e-8),
    /// not nnU-Net's SGD (Nesterov momentum 0.99, lr 0.01, weight decay 3e-5, polynomial
    /// decay): RMSprop had the higher validation Dice on every Montgomery 7 + 2 seed and on
    /// the ISIC 32 + 8 mean (docs/results.md, issue 16). Tables measured before that choice
    /// pin SGD with `train.optimizer="sgd"`, `train.lr=0.01`, `train.momentum=0.99`,
    /// `train.weight_decay=3e-5`, `train.nesterov=true`, `train.schedule="poly"`. The network
    /// keeps the profile's width (nnU-Net's planner picks 32; the `cpu` profile's 16 runs a
    /// step in 0.14 s instead of 0.37 s at 64 px on 2 cores).
    ///
    /// A second loss term (synthetic pairs, augmented copies) fades out over `[0.5, 0.75]`
    /// of the run, so the last quarter trains on real pairs alone: under GenSeg that had the
    /// higher validation Dice than λ held to the end on all four datasets (docs/results.md,
    /// hypothesis 12).
    pub fn strong(&mut self) {
        self.data.normalisation = Normalisation::ZScore;
        self.model.mirror_tta = true;
        let unet = &mut self.model.unet;
        unet.norm = Norm::Instance;
        unet.activation = Activation::LeakyRelu;
        unet.deep_supervision = true;
        let t = &mut self.train;
        t.optimizer = OptimizerKind::Rmsprop;
        (t.lr, t.momentum, t.weight_decay, t.nesterov) = (1e-3, 0.9, 1e-8, false);
        t.schedule = Schedule::Constant;
        t.loss = SegLoss::lungs();
        t.transforms = true;
        t.lambda_fade = [0.5, 0.75];
        self.transforms = TransformConfig::default();
        t.iterations = t.iterations.max(STRONG_MIN_ITERATIONS);
        (t.val_every, t.checkpoint_every) = (200, 500);
    }

    /// The defaults of a generator pre-training run (`method = "pix2pix"`): the profile's
    /// data and networks, trained by Adam with pix2pix's betas (0.5, 0.999).
    ///
    /// `paper`: 256 px, ngf = ndf = 64, batch 2, lr 2e-5, 800 iterations (≈ 200 epochs of a
    /// 7-image split, the reference's epoch count). `cpu`: measured on 2 cores
    /// (docs/method.md): 64 px, ngf = ndf = 16, batch 4, lr 2e-4 (pix2pix's default; at
    /// 2e-5 the lung phantoms' validation L1 after 50 iterations is 0.36 instead of 0.07),
    /// 200 iterations (it plateaus by then). `study` pre-trains as `cpu` does.
    pub fn pix2pix(profile: Profile) -> Self {
        let profile = match profile {
            Profile::Study => Profile::Cpu,
            p => p,
        };
        let mut cfg = Self::profile(profile);
        cfg.method = Method::Pix2pix;
        let t = &mut cfg.train;
        t.optimizer = OptimizerKind::Adam;
        t.momentum = 0.0;
        t.weight_decay = 0.0;
        t.beta1 = 0.5;
        t.beta2 = 0.999;
        t.log_every = 10;
        match profile {
            Profile::Paper => {
                (t.iterations, t.batch_size, t.lr) = (800, 2, 2e-5);
                (t.val_every, t.checkpoint_every) = (100, 100);
            }
            Profile::Cpu | Profile::Study => {
                (t.iterations, t.batch_size, t.lr) = (200, 4, 2e-4);
                (t.val_every, t.checkpoint_every) = (50, 50);
            }
        }
        cfg
    }

    /// Sets what follows from the data's channels: the backbone's input, the generator's
    /// image size and channels and the discriminator's input.
    pub fn fit_to_data(&mut self, channels: usize) {
        self.model.fit_to_data(channels);
        self.generator.image_size = self.data.size as usize;
        self.generator.in_channels = 1;
        self.generator.out_channels = channels;
        self.discriminator.in_channels = 1 + channels;
    }

    /// Checks the numbers that the sections cannot check alone (for the run's method).
    pub fn validate(&self) -> Result<()> {
        let t = &self.train;
        anyhow::ensure!(t.iterations > 0, "train.iterations must be > 0");
        anyhow::ensure!(t.batch_size > 0, "train.batch_size must be > 0");
        // Checked before anything is allocated: a typo such as data.size=100000 would
        // otherwise ask for tens of gigabytes per batch and hold the process in one step.
        anyhow::ensure!(
            (1..=MAX_SIZE).contains(&self.data.size),
            "data.size {} is outside 1..={MAX_SIZE} pixels",
            self.data.size
        );
        anyhow::ensure!(
            t.batch_size <= MAX_BATCH,
            "train.batch_size {} is larger than {MAX_BATCH}",
            t.batch_size
        );
        anyhow::ensure!(
            t.lr > 0.0 && t.lr.is_finite(),
            "train.lr {} must be a positive number",
            t.lr
        );
        anyhow::ensure!(
            t.val_every > 0 && t.log_every > 0 && t.checkpoint_every > 0,
            "train.val_every, log_every and checkpoint_every must be > 0"
        );
        anyhow::ensure!(self.data.n_train > 0, "data.n_train must be > 0");
        anyhow::ensure!(
            !t.nesterov || t.optimizer == OptimizerKind::Sgd,
            "train.nesterov is an SGD option (train.optimizer is {:?})",
            t.optimizer
        );
        self.transforms.validate()?;
        self.data.data_config()?;
        if self.method == Method::Pix2pix {
            return self.validate_generator();
        }
        anyhow::ensure!(
            !t.loss.terms.is_empty(),
            "train.loss needs at least one term"
        );
        anyhow::ensure!(
            self.data.n_val > 0 || !self.data.split_file.as_os_str().is_empty(),
            "data.n_val must be > 0: validation pairs choose best/ (pass --n-val N)"
        );
        self.model.validate(self.data.size)?;
        anyhow::ensure!(
            t.lambda.is_finite() && t.lambda >= 0.0,
            "train.lambda {} must be a number >= 0",
            t.lambda
        );
        let [start, end] = t.lambda_fade;
        anyhow::ensure!(
            (0.0..=1.0).contains(&start) && (start..=1.0).contains(&end),
            "train.lambda_fade {:?} must be two fractions of the run, 0 <= start <= end <= 1",
            t.lambda_fade
        );
        if self.method == Method::Separate {
            anyhow::ensure!(
                !self.separate.generator.as_os_str().is_empty(),
                "--method separate needs a pre-trained generator: pass --generator <run> \
                 (separate.generator)"
            );
        }
        if self.method == Method::Genseg {
            let g = &self.genseg;
            for (key, v) in [
                ("genseg.generator_lr", g.generator_lr),
                ("genseg.arch_lr", g.arch_lr),
                ("genseg.radius", g.radius),
            ] {
                anyhow::ensure!(
                    v > 0.0 && v.is_finite(),
                    "{key} {v} must be a positive number"
                );
            }
            anyhow::ensure!(g.arch_every > 0, "genseg.arch_every must be > 0");
            anyhow::ensure!(g.generator_every > 0, "genseg.generator_every must be > 0");
        }
        Ok(())
    }

    /// The checks of a generator pre-training run.
    fn validate_generator(&self) -> Result<()> {
        anyhow::ensure!(
            self.data.n_val > 0 || !self.data.split_file.as_os_str().is_empty(),
            "data.n_val must be > 0: validation pairs choose the best generator"
        );
        let mut g = self.generator.clone();
        g.image_size = self.data.size as usize;
        g.validate()
            .with_context(|| format!("data.size {} for the generator", self.data.size))?;
        self.discriminator.validate()?;
        anyhow::ensure!(
            self.discriminator
                .output_size(self.data.size as usize)
                .is_some(),
            "data.size {} is too small for the discriminator's {} stride-2 layers",
            self.data.size,
            self.discriminator.n_layers
        );
        let w = self.consistency.weight;
        anyhow::ensure!(
            w.is_finite() && w >= 0.0,
            "consistency.weight {w} must be a number >= 0"
        );
        Ok(())
    }

    /// Takes the networks of the generator pre-training run `pre` (made by `pix2pix`):
    /// `[generator]`, `[discriminator]`, `[gan]` and the Adam betas, so this run's resolved
    /// config says everything it uses.
    pub fn adopt_generator(&mut self, pre: &RunConfig) {
        self.generator = pre.generator.clone();
        self.discriminator = pre.discriminator.clone();
        self.gan = pre.gan;
        self.genseg.generator_beta1 = pre.train.beta1;
        self.genseg.generator_beta2 = pre.train.beta2;
    }

    /// The learning rates of a GenSeg run.
    pub fn genseg_rates(&self) -> GensegRates {
        if self.genseg.reference_lrs {
            GensegRates {
                generator: 2e-6,
                arch: 1e-6,
                segmenter: 1e-4,
            }
        } else {
            GensegRates {
                generator: self.genseg.generator_lr,
                arch: self.genseg.arch_lr,
                segmenter: self.train.lr,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overrides::{layered, leaf_keys, to_table};

    #[test]
    fn auto_post_processing_follows_the_real_images() {
        let auto = PostChoice::Auto.config(1, 0.5);
        assert_eq!(auto, PostProcessConfig::xray());
        assert_eq!(
            PostChoice::Auto.config(1, 0.0),
            PostProcessConfig::default()
        );
        assert_eq!(
            PostChoice::Auto.config(3, 0.5),
            PostProcessConfig::default()
        );
        assert_eq!(PostChoice::Rgb.config(3, 0.0), PostProcessConfig::rgb());
        let custom = PostChoice::Auto.config(1, 0.8);
        assert_eq!(
            custom.steps[2],
            PostStep::Gamma {
                gamma: 0.8f32 as f64
            }
        );
    }

    /// `data.fold` without a split file picks a validation fold of the drawn labelled pool:
    /// fold 0 is the standard split, the others keep its test cases.
    #[test]
    fn data_fold_picks_a_validation_fold_of_the_drawn_pool() -> Result<()> {
        let ids: Vec<String> = (0..20).map(|i| format!("case_{i:02}")).collect();
        let mut data = RunConfig::profile(Profile::Cpu).data;
        (data.n_train, data.n_val) = (7, 2);
        let standard = data.split(&ids, 3)?;
        assert_eq!(
            standard,
            genseg_data::split::Split::low_data(&ids, 7, 2, 3)?
        );
        data.fold = 2;
        let other = data.split(&ids, 3)?;
        assert_eq!(other.test, standard.test);
        assert!(other.val.iter().all(|id| standard.train.contains(id)));
        data.fold = 4;
        let err = format!("{:#}", data.split(&ids, 3).unwrap_err());
        assert!(err.contains("4 disjoint validation fold(s)"), "{err}");
        Ok(())
    }

    #[test]
    fn profiles_round_trip_through_toml() -> Result<()> {
        for p in [Profile::Paper, Profile::Cpu, Profile::Study] {
            let cfg = RunConfig::profile(p);
            let text = toml::to_string(&cfg)?;
            let back: RunConfig = toml::from_str(&text)?;
            assert_eq!(back, cfg);
        }
        Ok(())
    }

    /// `study` is `cpu` under the strong recipe with GenSeg's cheaper cadences, and
    /// pre-trains its generator as `cpu` does.
    #[test]
    fn study_profile_is_the_strong_cpu_recipe_with_genseg_cadences() -> Result<()> {
        let study = RunConfig::profile(Profile::Study);
        let mut want = RunConfig::profile(Profile::Cpu).with_recipe(Recipe::Strong);
        assert_ne!(study, want);
        want.genseg.arch_every = STUDY_ARCH_EVERY;
        want.genseg.generator_every = STUDY_GENERATOR_EVERY;
        assert_eq!(study, want);
        assert!(study.train.transforms && study.train.iterations >= STRONG_MIN_ITERATIONS);
        assert_eq!(study.genseg.pretrain_profile, Profile::Cpu);
        assert_eq!(
            RunConfig::pix2pix(Profile::Study),
            RunConfig::pix2pix(Profile::Cpu)
        );
        assert_eq!(parse_name::<Profile>("study", "profile")?, Profile::Study);
        Ok(())
    }

    #[test]
    fn paper_profile_is_the_reference() {
        let cfg = RunConfig::profile(Profile::Paper);
        assert_eq!(
            (
                cfg.data.size,
                cfg.model.unet.base_width,
                cfg.train.batch_size,
                cfg.train.iterations
            ),
            (256, 64, 2, 5000)
        );
        assert_eq!(
            (
                cfg.train.optimizer,
                cfg.train.lr,
                cfg.train.momentum,
                cfg.train.weight_decay
            ),
            (OptimizerKind::Rmsprop, 1e-4, 0.9, 1e-8)
        );
        assert_eq!(cfg.train.val_every, 10);
    }

    #[test]
    fn issue_examples_of_set_work() -> Result<()> {
        let sets: Vec<String> = [
            "train.iterations=2",
            "model.kind=unet",
            "data.size=128",
            "train.lr=1e-4",
            "model.unet.upsampling=bilinear",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let cfg = layered(&RunConfig::profile(Profile::Cpu), None, &sets)?;
        assert_eq!(
            (cfg.train.iterations, cfg.data.size, cfg.train.lr),
            (2, 128, 1e-4)
        );
        let keys = leaf_keys(&to_table(&cfg)?);
        assert!(
            keys.contains(&"train.loss".to_string())
                && keys.contains(&"model.unet.depth".to_string())
        );
        Ok(())
    }

    #[test]
    fn lambda_fades_between_its_fractions_and_bad_fractions_are_refused() -> Result<()> {
        let cpu = RunConfig::profile(Profile::Cpu);
        let last = cpu.train.iterations - 1;
        assert_eq!(
            cpu.train.lambda_at(last),
            cpu.train.lambda,
            "no fade by default"
        );
        let sets = [
            "train.iterations=100",
            "train.lambda=2",
            "train.lambda_fade=[0.5, 0.75]",
        ];
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let cfg = layered(&cpu, None, &sets)?;
        cfg.validate()?;
        let at: Vec<f64> = [0, 49, 50, 60, 74, 75, 99]
            .iter()
            .map(|&it| cfg.train.lambda_at(it))
            .collect();
        let want = [2.0, 2.0, 2.0, 1.2, 0.08, 0.0, 0.0];
        assert!(
            at.iter().zip(want).all(|(a, w)| (a - w).abs() < 1e-12),
            "{at:?}"
        );
        for bad in [[0.8, 0.5], [-0.1, 0.5], [0.5, 1.5], [f64::NAN, 1.0]] {
            let mut c = cfg.clone();
            c.train.lambda_fade = bad;
            let e = c.validate().expect_err("a bad fade is refused").to_string();
            assert!(e.contains("train.lambda_fade"), "{e}");
        }
        Ok(())
    }

    #[test]
    fn mask_rules_parse() -> Result<()> {
        assert_eq!(parse_mask_rule("auto")?, None);
        assert_eq!(
            parse_mask_rule("threshold=0.5")?,
            Some(MaskRule::Threshold(0.5))
        );
        assert_eq!(parse_mask_rule("label=2")?, Some(MaskRule::Label(2)));
        assert!(parse_mask_rule("label=x").is_err() && parse_mask_rule("fuzzy").is_err());
        Ok(())
    }
}
