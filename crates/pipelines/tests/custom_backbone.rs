//! A backbone written outside the pipelines (here, in this test) trains, evaluates and
//! predicts through them once registered: the seam a new backbone plugs into.

use std::sync::atomic::AtomicBool;

use anyhow::Result;
use candle_core::{Device, Module, Tensor};
use candle_nn::Conv2dConfig;
use genseg_backbones::SegModel;
use genseg_data::phantom::{PhantomConfig, PhantomKind, write_phantoms};
use genseg_nn::init::{InitScheme, conv2d};
use genseg_pipelines::config::{Method, ModelKind, Profile, RunConfig, register_backbone};
use genseg_pipelines::evaluate::{SplitChoice, evaluate_run};
use genseg_pipelines::learner::Silent;
use genseg_pipelines::run_dir::Which;

/// One 3x3 convolution from the image to a logit per pixel.
struct Tiny {
    conv: genseg_nn::conv::Conv2d,
}

impl SegModel for Tiny {
    fn forward_t(&self, images: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
        self.conv.forward(images)
    }
    fn param_groups(&self) -> Vec<(&'static str, String)> {
        vec![("weights", "tiny".to_string())]
    }
}

fn build_tiny(
    in_channels: usize,
    options: &toml::Table,
    vb: candle_nn::VarBuilder,
) -> Result<Box<dyn SegModel>> {
    assert_eq!(options.get("kernel").and_then(|v| v.as_integer()), Some(3));
    let cfg = Conv2dConfig {
        padding: 1,
        ..Conv2dConfig::default()
    };
    let conv = conv2d(
        in_channels,
        1,
        3,
        cfg,
        true,
        InitScheme::TorchDefault,
        vb.pp("tiny"),
    )?;
    Ok(Box::new(Tiny { conv }))
}

#[test]
fn a_registered_backbone_trains_evaluates_and_predicts() -> Result<()> {
    register_backbone("tiny", build_tiny);
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    write_phantoms(&data, &PhantomConfig::new(PhantomKind::Lungs, 32, 0), 12)?;
    let mut cfg = RunConfig::profile(Profile::Cpu);
    cfg.method = Method::Flip;
    cfg.data.path = data.clone();
    cfg.data.size = 32;
    cfg.model.kind = ModelKind::Registered;
    cfg.model.registered.name = "tiny".into();
    cfg.model
        .registered
        .options
        .insert("kernel".into(), toml::Value::Integer(3));
    cfg.train.iterations = 6;
    cfg.train.val_every = 3;
    let run = dir.path().join("run");
    let device = Device::Cpu;
    let outcome =
        genseg_pipelines::methods::train(cfg, &run, &device, &AtomicBool::new(false), &mut Silent)?;
    assert_eq!(outcome.iterations, 6);
    let test = outcome.test.expect("the split has test cases");
    assert_eq!(test.n_cases, 3);
    // The resolved config names the backbone, so evaluate and predict rebuild it.
    let text = std::fs::read_to_string(run.join("config.toml"))?;
    assert!(text.contains("name = \"tiny\""), "{text}");
    let again = evaluate_run(
        &run,
        Which::Best,
        None,
        SplitChoice::Test,
        None,
        &dir.path().join("eval"),
        &device,
    )?;
    assert_eq!(again.metrics["dice"].mean, test.metrics["dice"].mean);
    let n = genseg_pipelines::predict::predict(
        &run,
        Which::Best,
        &data.join("images"),
        &dir.path().join("pred"),
        &device,
    )?;
    assert_eq!(n, 12);
    assert!(dir.path().join("pred/masks").read_dir()?.count() == 12);
    Ok(())
}
