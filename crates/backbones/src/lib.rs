//! genseg-backbones: the segmentation side of GenSeg.
//!
//! - [`SegModel`] is the one trait every backbone implements: a forward pass
//!   with a train flag (BatchNorm, dropout) that maps images `[B, C, H, W]` to
//!   logits `[B, 1, H, W]`, plus the names of its parameter groups.
//! - [`unet::UNet`] is the reference backbone (milesial Pytorch-UNet, spec §4),
//!   built from a serde [`unet::UNetConfig`] and a candle `VarBuilder`.
//! - [`loss`] holds the segmentation losses of both reference families
//!   (BCE + batch-wide Dice for lungs, BCE + per-image Jaccard for skin).
//! - [`metrics`] scores binarised predictions per case (Dice, IoU, precision,
//!   recall, HD95) and [`report`] aggregates them into `per_case.csv` and
//!   `summary.json`; [`evaluate`] scores a model on a dataset, for validation and
//!   evaluation alike.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use genseg_backbones::{SegModel, unet::{UNet, UNetConfig}};
//! use genseg_nn::params::ParamStore;
//!
//! let store = ParamStore::new(0, DType::F32, &Device::Cpu);
//! let cfg = UNetConfig { in_channels: 1, base_width: 4, depth: 2, ..UNetConfig::default() };
//! let unet = UNet::new(&cfg, store.var_builder().pp("seg"))?;
//! let x = Tensor::zeros((2, 1, 32, 32), DType::F32, &Device::Cpu)?;
//! let logits = unet.forward_t(&x, true)?;
//! assert_eq!(logits.dims(), &[2, 1, 32, 32]);
//! # Ok::<(), anyhow::Error>(())
//! ```

#![warn(missing_docs)]

/// Implements [`BackboneConfig`] for `$config` (a struct with an `in_channels` field) whose
/// model is built by `$model::new(&config, vb)`; the remaining items (at least `check`) are
/// given in the braces.
macro_rules! backbone_config {
    ($config:ty => $model:ident { $($items:tt)* }) => {
        impl $crate::BackboneConfig for $config {
            fn build(
                &self,
                vb: candle_nn::VarBuilder,
            ) -> anyhow::Result<Box<dyn $crate::SegModel>> {
                Ok(Box::new($model::new(self, vb)?))
            }

            fn in_channels(&self) -> usize {
                self.in_channels
            }

            fn set_in_channels(&mut self, channels: usize) {
                self.in_channels = channels;
            }

            $($items)*
        }
    };
}

pub mod deeplab;
pub mod dinov2;
pub mod evaluate;
pub mod foundation;
pub mod loss;
pub mod metrics;
pub mod pretrained;
pub mod report;
pub mod swin_unet;
pub mod tta;
pub mod unet;

use candle_core::{Result, Tensor};

/// A segmentation network: images in, one foreground logit per pixel out.
pub trait SegModel: Send + Sync {
    /// `[B, C, H, W]` images in `[0, 1]` -> `[B, 1, H, W]` logits.
    /// `train` selects batch statistics (and updates running statistics) in
    /// BatchNorm layers.
    fn forward_t(&self, images: &Tensor, train: bool) -> Result<Tensor>;

    /// The logits at full resolution followed by the deep-supervision outputs, each half
    /// the side of the one before. Models without deep supervision return `[forward_t]`.
    fn forward_deep_t(&self, images: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        Ok(vec![self.forward_t(images, train)?])
    }

    /// The variable-name prefixes of the model's parameter groups, as
    /// `(group name, prefix in the ParamStore)`. Backbones have one group,
    /// `"weights"`.
    fn param_groups(&self) -> Vec<(&'static str, String)>;
}

/// A backbone's configuration: all the pipelines need to build and check any backbone.
/// A new backbone is its model (a [`SegModel`]) and a serde config implementing this.
pub trait BackboneConfig {
    /// Builds the model (fresh parameters from `vb`).
    fn build(&self, vb: candle_nn::VarBuilder) -> anyhow::Result<Box<dyn SegModel>>;
    /// Input channels the model is built for.
    fn in_channels(&self) -> usize;
    /// Sets the input channels (from the data).
    fn set_in_channels(&mut self, channels: usize);
    /// Checks the settings, for square inputs of side `size`; the error names the sizes
    /// the architecture accepts.
    fn check(&self, size: usize) -> anyhow::Result<()>;
    /// How a pretrained checkpoint's tensor names map to the model's; `None` (the
    /// default) when the backbone takes no pretrained weights.
    fn pretrained_names(&self) -> Option<pretrained::NameMapping> {
        None
    }
}
