//! Scoring a model on a dataset: one [`CaseResult`] per case (eval mode, predictions at
//! probability 0.5, compared at the resolution `MetricOptions::resolution` names: the
//! working size by default). Validation during training and `genseg evaluate` both use
//! it, so they cannot disagree.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use genseg_data::dataset::Dataset;
use genseg_data::preprocess::resize_mask;
use genseg_nn::ops::resize_bilinear;

use crate::SegModel;
use crate::metrics::{
    BinaryMask, MetricOptions, ScoreResolution, binarize_logits, binarize_targets, case_metrics,
};
use crate::report::CaseResult;

/// Scores `model` on every case of `data`, `batch` cases per forward pass. Away from the
/// working size the truth is read from each case's mask file (an error names a case built
/// in memory, which has none).
pub fn score_cases(
    model: &dyn SegModel,
    data: &Dataset,
    batch: usize,
    opts: &MetricOptions,
    device: &Device,
) -> Result<Vec<CaseResult>> {
    let ids = data.ids();
    let indices: Vec<usize> = (0..data.len()).collect();
    let mut cases = Vec::with_capacity(data.len());
    for chunk in indices.chunks(batch.max(1)) {
        let (x, y) = data.batch(chunk, device)?;
        let logits = model.forward_t(&x, false)?;
        let (preds, truths) = match opts.resolution {
            ScoreResolution::Working => (binarize_logits(&logits)?, binarize_targets(&y)?),
            at => compare_at(&logits, data, chunk, at)?,
        };
        for ((&i, p), t) in chunk.iter().zip(&preds).zip(&truths) {
            cases.push(CaseResult {
                id: ids[i].clone(),
                metrics: case_metrics(p, t, opts)?,
            });
        }
    }
    Ok(cases)
}

/// Predictions and truth of the cases `indices` (whose logits are `logits`) at `at`: each
/// case's logits resized bilinearly to its truth's size, then thresholded, so a prediction
/// is never made at one size and stretched as a mask to another.
fn compare_at(
    logits: &Tensor,
    data: &Dataset,
    indices: &[usize],
    at: ScoreResolution,
) -> Result<(Vec<BinaryMask>, Vec<BinaryMask>)> {
    let mut preds = Vec::with_capacity(indices.len());
    let mut truths = Vec::with_capacity(indices.len());
    for (k, &i) in indices.iter().enumerate() {
        let mut truth = data
            .source_mask(i)
            .with_context(|| format!("scoring at resolution {at}"))?;
        if let ScoreResolution::Square(side) = at {
            truth = resize_mask(&truth, side, side);
        }
        let (w, h) = (truth.width() as usize, truth.height() as usize);
        let case = resize_bilinear(&logits.narrow(0, k, 1)?, h, w, false)?;
        preds.extend(binarize_logits(&case)?);
        truths.push(BinaryMask {
            height: h,
            width: w,
            pixels: truth.pixels().map(|p| p.0[0] > 0).collect(),
        });
    }
    Ok((preds, truths))
}

/// The mean Dice over the cases that have one (NaN when none has: no foreground anywhere).
pub fn mean_dice(cases: &[CaseResult]) -> f64 {
    let dice: Vec<f64> = cases.iter().filter_map(|c| c.metrics.dice).collect();
    if dice.is_empty() {
        f64::NAN
    } else {
        dice.iter().sum::<f64>() / dice.len() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unet::{UNet, UNetConfig};
    use genseg_data::{DataConfig, PhantomConfig, PhantomKind, write_phantoms};
    use genseg_nn::params::ParamStore;

    #[test]
    fn every_case_is_scored_whatever_the_batch() -> Result<()> {
        let dir = tempfile::tempdir()?;
        write_phantoms(
            dir.path(),
            &PhantomConfig::new(PhantomKind::Lungs, 32, 0),
            5,
        )?;
        let data = Dataset::load(dir.path(), &DataConfig::default())?;
        let store = ParamStore::new(0, candle_core::DType::F32, &Device::Cpu);
        let cfg = UNetConfig {
            in_channels: data.channels(),
            base_width: 2,
            depth: 2,
            ..UNetConfig::default()
        };
        let unet = UNet::new(&cfg, store.var_builder())?;
        let opts = MetricOptions::default();
        let one = score_cases(&unet, &data, 1, &opts, &Device::Cpu)?;
        let three = score_cases(&unet, &data, 3, &opts, &Device::Cpu)?;
        assert_eq!(one.len(), 5);
        assert_eq!(
            one.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
            data.ids()
        );
        let (a, b) = (mean_dice(&one), mean_dice(&three));
        assert!(
            (a - b).abs() < 1e-6 || (a.is_nan() && b.is_nan()),
            "{a} vs {b}"
        );
        assert!(mean_dice(&[]).is_nan());
        Ok(())
    }

    /// Foreground everywhere: its Dice against a truth is `2|T| / (|T| + N)`, which tells
    /// which truth (and at which size) it was compared with.
    struct AllForeground;

    impl SegModel for AllForeground {
        fn forward_t(&self, images: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
            images.narrow(1, 0, 1)?.ones_like()
        }

        fn param_groups(&self) -> Vec<(&'static str, String)> {
            Vec::new()
        }
    }

    fn all_foreground_dice(truth: &image::GrayImage) -> f64 {
        let t = truth.pixels().filter(|p| p.0[0] > 0).count() as f64;
        2.0 * t / (t + truth.len() as f64)
    }

    #[test]
    fn scores_at_the_working_size_each_files_own_size_or_one_common_side() -> Result<()> {
        let dir = tempfile::tempdir()?;
        // Two sizes, thin foreground (two columns): shrinking the truth changes its share.
        let mut truths = Vec::new();
        for (id, w, h) in [("a", 12u32, 10u32), ("b", 9, 7)] {
            let mask = image::GrayImage::from_fn(w, h, |x, _| image::Luma([255 * u8::from(x < 2)]));
            let path = dir.path().join(format!("masks/{id}.png"));
            std::fs::create_dir_all(path.parent().unwrap())?;
            mask.save(&path)?;
            let img = image::GrayImage::from_pixel(w, h, image::Luma([90]));
            std::fs::create_dir_all(dir.path().join("images"))?;
            img.save(dir.path().join(format!("images/{id}.png")))?;
            truths.push(mask);
        }
        let config = genseg_data::DataConfig {
            size: Some(genseg_data::ImageSize::square(4)),
            ..Default::default()
        };
        let data = Dataset::load(dir.path(), &config)?;
        let at = |resolution| -> Result<Vec<f64>> {
            let opts = MetricOptions {
                resolution,
                ..Default::default()
            };
            Ok(score_cases(&AllForeground, &data, 2, &opts, &Device::Cpu)?
                .iter()
                .map(|c| c.metrics.dice.unwrap())
                .collect())
        };
        let close = |got: Vec<f64>, want: Vec<f64>| {
            assert!(
                got.iter().zip(&want).all(|(g, w)| (g - w).abs() < 1e-12),
                "{got:?} vs {want:?}"
            );
        };
        let working: Vec<f64> = truths
            .iter()
            .map(|t| all_foreground_dice(&resize_mask(t, 4, 4)))
            .collect();
        close(at(ScoreResolution::Working)?, working.clone());
        let native: Vec<f64> = truths.iter().map(all_foreground_dice).collect();
        close(at(ScoreResolution::Native)?, native.clone());
        assert_ne!(
            working, native,
            "the test needs sizes where the share changes"
        );
        let side: Vec<f64> = truths
            .iter()
            .map(|t| all_foreground_dice(&resize_mask(t, 6, 6)))
            .collect();
        close(at(ScoreResolution::Square(6))?, side);

        // Samples built in memory have no file to score against: a clear error.
        let phantoms =
            genseg_data::phantom_dataset(&PhantomConfig::new(PhantomKind::Lungs, 16, 0), 2)?;
        let opts = MetricOptions {
            resolution: ScoreResolution::Native,
            ..Default::default()
        };
        let err = score_cases(&AllForeground, &phantoms, 2, &opts, &Device::Cpu).unwrap_err();
        assert!(format!("{err:#}").contains("own size"), "{err:#}");
        Ok(())
    }

    #[test]
    fn the_resolution_reads_as_a_name_or_a_side() {
        let parse = |s: &str| s.parse::<ScoreResolution>();
        assert_eq!(parse("working"), Ok(ScoreResolution::Working));
        assert_eq!(parse("native"), Ok(ScoreResolution::Native));
        assert_eq!(parse("256"), Ok(ScoreResolution::Square(256)));
        for bad in ["0", "-3", "full", ""] {
            assert!(parse(bad).unwrap_err().contains("expected"), "{bad}");
        }
        #[derive(serde::Deserialize)]
        struct Eval {
            eval: MetricOptions,
        }
        let read = |text: &str| toml::from_str::<Eval>(text).map(|e| e.eval.resolution);
        assert_eq!(
            read("[eval]\nresolution = 256").unwrap(),
            ScoreResolution::Square(256)
        );
        assert_eq!(
            read("[eval]\nresolution = \"native\"").unwrap(),
            ScoreResolution::Native
        );
        assert_eq!(read("[eval]").unwrap(), ScoreResolution::Working);
        let err = read("[eval]\nresolution = \"full\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("full") && err.contains("native"), "{err}");
        for r in [ScoreResolution::Working, ScoreResolution::Square(64)] {
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<ScoreResolution>(&json).unwrap(), r);
        }
    }
}
