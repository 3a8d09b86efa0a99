//! The segmenter's side of every segmentation run: building the configured backbone,
//! scoring it (validation Dice, reports), and what a run reports at its end.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use genseg_backbones::SegModel;
use genseg_backbones::evaluate::{mean_dice, score_cases};
use genseg_backbones::metrics::binarize_logits;
use genseg_backbones::report::{Summary, write_reports};
use genseg_backbones::tta::MirrorTta;
use genseg_data::dataset::Dataset;
use genseg_data::intensity::Normalisation;
use genseg_data::writer::{OverlayStyle, image_grid, overlay, write_image};
use genseg_generator::pix2pix::{DISCRIMINATOR_PREFIX, GENERATOR_PREFIX};
use genseg_nn::checkpoint::{Checkpoint, without_prefixes};
use genseg_nn::params::ParamStore;
use image::{DynamicImage, GrayImage, RgbImage};

use crate::config::RunConfig;
use crate::learner::LoopEnd;
use crate::run_dir::{RunDir, Which};
use crate::seeding::{Purpose, seed_for};

/// Checkpoint name of the segmenter's optimizer.
pub const SEGMENTER_OPTIMIZER: &str = "segmenter";

/// What a finished (or interrupted) training run reports.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// Iterations completed.
    pub iterations: u64,
    /// Best validation Dice.
    pub best_val_dice: f64,
    /// The iteration of `best/`.
    pub best_iteration: u64,
    /// `true` when stopped by Ctrl-C before the last iteration.
    pub interrupted: bool,
    /// Test-split evaluation of `best/` (when the split has test cases).
    pub test: Option<Summary>,
    /// Wall time of this invocation.
    pub seconds: f64,
}

/// The configured backbone behind the run's input normalisation and, when configured,
/// mirroring TTA in eval mode: what every pipeline, `evaluate` and `predict` run, so that
/// they all see the same function of the image.
pub struct Segmenter {
    model: Box<dyn SegModel>,
    normalisation: Normalisation,
}

impl Segmenter {
    /// Deep-supervision outputs (see [`SegModel::forward_deep_t`]) of images that are
    /// already normalised (the training pipeline normalises before augmenting, as nnU-Net).
    pub fn forward_deep_normalised(
        &self,
        images: &Tensor,
        train: bool,
    ) -> candle_core::Result<Vec<Tensor>> {
        self.model.forward_deep_t(images, train)
    }

    /// The normalisation in front of the backbone.
    pub fn normalisation(&self) -> Normalisation {
        self.normalisation
    }
}

impl SegModel for Segmenter {
    fn forward_t(&self, images: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.model
            .forward_t(&self.normalisation.apply(images)?, train)
    }

    fn forward_deep_t(&self, images: &Tensor, train: bool) -> candle_core::Result<Vec<Tensor>> {
        self.model
            .forward_deep_t(&self.normalisation.apply(images)?, train)
    }

    fn param_groups(&self) -> Vec<(&'static str, String)> {
        self.model.param_groups()
    }
}

/// Builds the configured segmenter in a fresh store seeded from the run's seed.
pub fn build_model(cfg: &RunConfig, device: &Device) -> Result<(ParamStore, Segmenter)> {
    let store = ParamStore::new(
        seed_for(cfg.seed, Purpose::Weights),
        candle_core::DType::F32,
        device,
    );
    let segmenter = segmenter_on(cfg, store.var_builder())?;
    Ok((store, segmenter))
}

/// A segmenter on a copy of `store`'s current weights held as constants, not `Var`s: a
/// backward pass through it (the consistency term of pix2pix pre-training) computes the
/// gradient of its input only, and no later change to `store` reaches it.
pub fn frozen_model(cfg: &RunConfig, store: &ParamStore) -> Result<Segmenter> {
    let weights = store.named_tensors()?.into_iter().collect();
    let vb = candle_nn::VarBuilder::from_tensors(weights, store.dtype(), store.device());
    segmenter_on(cfg, vb)
}

/// The configured backbone (behind mirroring TTA when configured) on the weights of `vb`.
fn segmenter_on(cfg: &RunConfig, vb: candle_nn::VarBuilder) -> Result<Segmenter> {
    let mut model = cfg.model.build(vb)?;
    if cfg.model.mirror_tta {
        model = Box::new(MirrorTta(model));
    }
    Ok(Segmenter {
        model,
        normalisation: cfg.data.normalisation,
    })
}

/// Fills a fresh segmenter's `store` from `model.pretrained` when set (a run's start only:
/// resumes load their checkpoint), logging what was loaded, or that it starts from scratch.
pub fn start_from_pretrained(cfg: &RunConfig, store: &ParamStore) -> Result<()> {
    let path = &cfg.model.pretrained;
    if path.as_os_str().is_empty() {
        tracing::info!("segmenter: starts from scratch (no model.pretrained)");
        return Ok(());
    }
    let mapping = cfg.model.backbone().pretrained_names().with_context(|| {
        format!(
            "model.pretrained: the {:?} backbone takes no pretrained weights",
            cfg.model.kind
        )
    })?;
    let report = genseg_backbones::pretrained::load_pretrained(store, "", path, mapping)?;
    tracing::info!("segmenter: pretrained weights {}: {report}", path.display());
    Ok(())
}

/// Mean per-case Dice of `model` on `data` (eval mode), as `genseg evaluate` scores it.
pub fn validation_dice(
    model: &dyn SegModel,
    data: &Dataset,
    cfg: &RunConfig,
    device: &Device,
) -> Result<f64> {
    let cases = score_cases(model, data, cfg.train.batch_size, &cfg.eval, device)?;
    Ok(mean_dice(&cases))
}

/// The segmentation model's tensors of a checkpoint: a GenSeg checkpoint also holds the
/// generator's and discriminator's, under their prefixes.
pub fn segmenter_weights(weights: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    without_prefixes(weights, &[GENERATOR_PREFIX, DISCRIMINATOR_PREFIX])
}

/// Scores `model` on every case of `data` and writes the reports to `out`.
pub fn evaluate_model(
    model: &dyn SegModel,
    data: &Dataset,
    cfg: &RunConfig,
    device: &Device,
    out: &Path,
    dataset_label: &str,
    checkpoint_label: &str,
) -> Result<Summary> {
    let cases = score_cases(model, data, cfg.train.batch_size, &cfg.eval, device)?;
    let summary = write_reports(out, &cases, &cfg.eval, dataset_label, checkpoint_label)?;
    write_case_figure(model, data, device, out)?;
    Ok(summary)
}

/// Cases drawn into every evaluation's `cases.png`: the first ones of the evaluated set,
/// so that every method's runs on one split show the same cases.
pub const FIGURE_CASES: usize = 4;

/// Draws the first [`FIGURE_CASES`] cases of `data` into `out/cases.png`, one row each:
/// image | truth (green) | prediction (red).
pub fn write_case_figure(
    model: &dyn SegModel,
    data: &Dataset,
    device: &Device,
    out: &Path,
) -> Result<()> {
    let indices: Vec<usize> = (0..data.len().min(FIGURE_CASES)).collect();
    if indices.is_empty() {
        return Ok(());
    }
    let (x, _) = data.batch(&indices, device)?;
    let predictions = binarize_logits(&model.forward_t(&x, false)?)?;
    let truth_style = OverlayStyle::Fill {
        color: [0, 190, 0],
        alpha: 0.45,
    };
    let rows = indices
        .iter()
        .zip(&predictions)
        .map(|(&i, p)| -> Result<Vec<RgbImage>> {
            let image = data.rgb_image(i)?;
            let truth = data.mask_image(i)?;
            let predicted = GrayImage::from_raw(
                p.width as u32,
                p.height as u32,
                p.pixels.iter().map(|&f| if f { 255 } else { 0 }).collect(),
            )
            .context("a prediction has the image's size")?;
            let truth = overlay(&image, &truth, truth_style)?;
            let predicted = overlay(&image, &predicted, OverlayStyle::default())?;
            Ok(vec![image, truth, predicted])
        })
        .collect::<Result<Vec<_>>>()?;
    write_image(
        &out.join("cases.png"),
        &DynamicImage::ImageRgb8(image_grid(&rows, 2)?),
    )?;
    Ok(())
}

/// Logs the end of a segmentation run and, unless interrupted, scores `best/` on the test
/// split into `eval-test/`.
#[allow(clippy::too_many_arguments)]
pub fn finish_training(
    run: &RunDir,
    cfg: &RunConfig,
    store: &ParamStore,
    model: &dyn SegModel,
    test_set: Option<&Dataset>,
    device: &Device,
    iterations: u64,
    end: LoopEnd,
) -> Result<TrainOutcome> {
    let best = end.best;
    if end.interrupted {
        tracing::warn!(
            "interrupted at iteration {iterations}: last/ saved; continue with `genseg train --resume {}`",
            run.root().display()
        );
    }
    tracing::info!(
        "trained {iterations} iterations in {:.1} s; best validation Dice {:.4} at iteration {}",
        end.seconds,
        best.score,
        best.iteration
    );
    let test = match (test_set, end.interrupted) {
        (Some(test_set), false) => {
            let best_dir = run.checkpoint(Which::Best);
            let ckpt = Checkpoint::load(&best_dir)
                .with_context(|| format!("loading {}", best_dir.display()))?;
            store.load_named_tensors(&segmenter_weights(&ckpt.weights), true)?;
            let out = run.root().join("eval-test");
            let summary = evaluate_model(
                model,
                test_set,
                cfg,
                device,
                &out,
                &cfg.data.path.display().to_string(),
                &best_dir.display().to_string(),
            )?;
            tracing::info!(
                "test split ({} cases): Dice {:.4} ± {:.4}, IoU {:.4} -> {}",
                summary.n_cases,
                summary.metrics["dice"].mean,
                summary.metrics["dice"].std,
                summary.metrics["iou"].mean,
                out.display()
            );
            Some(summary)
        }
        _ => None,
    };
    Ok(TrainOutcome {
        iterations,
        best_val_dice: best.score,
        best_iteration: best.iteration,
        interrupted: end.interrupted,
        test,
        seconds: end.seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Profile;
    use candle_core::Var;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?)
    }

    #[test]
    fn a_frozen_segmenter_gives_its_input_the_same_gradient_and_computes_no_weight_gradient()
    -> Result<()> {
        let device = Device::Cpu;
        let mut cfg = RunConfig::profile(Profile::Cpu);
        cfg.model.fit_to_data(1);
        let (store, live) = build_model(&cfg, &device)?;
        let frozen = frozen_model(&cfg, &store)?;
        let image = Var::from_tensor(&Tensor::rand(0f32, 1., (1, 1, 32, 32), &device)?)?;
        let image = image.as_tensor();
        let live_out = live.forward_t(image, false)?;
        let frozen_out = frozen.forward_t(image, false)?;
        assert_eq!(max_abs_diff(&live_out, &frozen_out)?, 0.0);
        let live_grads = live_out.sqr()?.mean_all()?.backward()?;
        let frozen_grads = frozen_out.sqr()?.mean_all()?.backward()?;
        let (Some(a), Some(b)) = (live_grads.get(image), frozen_grads.get(image)) else {
            anyhow::bail!("the image got no gradient");
        };
        assert_eq!(max_abs_diff(a, b)?, 0.0);
        // The live pass stores a gradient for every weight; the frozen one skips at least
        // those of the convolutions.
        let count = |g: &candle_core::backprop::GradStore| g.get_ids().count();
        let convs = store
            .trainable_vars()
            .iter()
            .filter(|(_, v)| v.rank() == 4)
            .count();
        assert!(convs > 0);
        assert!(
            count(&frozen_grads) + convs <= count(&live_grads),
            "{} gradients frozen, {} live, {convs} conv weights",
            count(&frozen_grads),
            count(&live_grads)
        );
        // A later change to the store (an optimizer step of its run) does not reach it.
        for (_, var) in store.trainable_vars() {
            var.set(&var.as_tensor().affine(0.5, 0.1)?)?;
        }
        assert_eq!(
            max_abs_diff(&frozen.forward_t(image, false)?, &frozen_out)?,
            0.0
        );
        assert!(max_abs_diff(&live.forward_t(image, false)?, &frozen_out)? > 0.0);
        Ok(())
    }
}
