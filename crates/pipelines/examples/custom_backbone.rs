//! Plug a segmentation backbone of your own into every pipeline: implement
//! `genseg_backbones::SegModel`, register a builder under a name, and select it with
//! `model.kind = "registered"` and `model.registered.name = "<name>"`. Training, evaluation and prediction then use
//! it like the built-in UNet.
//!
//! ```sh
//! cargo run --release -p genseg-pipelines --example custom_backbone
//! ```

use std::sync::atomic::AtomicBool;

use anyhow::Result;
use candle_core::{Device, Module, Tensor};
use candle_nn::Conv2dConfig;
use genseg_backbones::SegModel;
use genseg_data::phantom::{PhantomConfig, PhantomKind, write_phantoms};
use genseg_nn::conv::Conv2d;
use genseg_nn::init::{InitScheme, conv2d};
use genseg_pipelines::config::{Method, ModelKind, Profile, RunConfig, register_backbone};
use genseg_pipelines::learner::Silent;

/// Two 3x3 convolutions with a ReLU between them: `width` hidden channels.
struct TwoConv {
    hidden: Conv2d,
    out: Conv2d,
}

impl SegModel for TwoConv {
    fn forward_t(&self, images: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
        self.out.forward(&self.hidden.forward(images)?.relu()?)
    }

    fn param_groups(&self) -> Vec<(&'static str, String)> {
        vec![("weights", "two_conv".into())]
    }
}

/// Reads `width` from `model.options` (default 8).
fn build(
    in_channels: usize,
    options: &toml::Table,
    vb: candle_nn::VarBuilder,
) -> Result<Box<dyn SegModel>> {
    let width = options
        .get("width")
        .and_then(toml::Value::as_integer)
        .unwrap_or(8) as usize;
    let same = Conv2dConfig {
        padding: 1,
        ..Conv2dConfig::default()
    };
    let vb = vb.pp("two_conv");
    let scheme = InitScheme::TorchDefault;
    Ok(Box::new(TwoConv {
        hidden: conv2d(in_channels, width, 3, same, true, scheme, vb.pp("hidden"))?,
        out: conv2d(width, 1, 3, same, true, scheme, vb.pp("out"))?,
    }))
}

fn main() -> Result<()> {
    register_backbone("two_conv", build);
    let dir = tempfile::tempdir()?;
    let pool = dir.path().join("lungs");
    write_phantoms(&pool, &PhantomConfig::new(PhantomKind::Lungs, 32, 0), 20)?;

    let mut cfg = RunConfig::profile(Profile::Cpu);
    cfg.method = Method::Combine;
    cfg.data.path = pool;
    cfg.data.size = 32;
    cfg.model.kind = ModelKind::Registered;
    cfg.model.registered.name = "two_conv".into();
    cfg.model
        .registered
        .options
        .insert("width".into(), toml::Value::Integer(12));
    cfg.train.iterations = 40;
    cfg.train.val_every = 20;
    let outcome = genseg_pipelines::methods::train(
        cfg,
        &dir.path().join("run"),
        &Device::Cpu,
        &AtomicBool::new(false),
        &mut Silent,
    )?;
    println!(
        "two_conv with flip + rotate + translate: best validation Dice {:.3}",
        outcome.best_val_dice
    );
    Ok(())
}
