//! Scoring a model on a dataset: one [`CaseResult`] per case (eval mode, predictions at
//! probability 0.5, compared at the dataset's working resolution). Validation during
//! training and `genseg evaluate` both use it, so they cannot disagree.

use anyhow::Result;
use candle_core::Device;
use genseg_data::dataset::Dataset;

use crate::SegModel;
use crate::metrics::{MetricOptions, binarize_logits, binarize_targets, case_metrics};
use crate::report::CaseResult;

/// Scores `model` on every case of `data`, `batch` cases per forward pass.
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
        let preds = binarize_logits(&logits)?;
        let truths = binarize_targets(&y)?;
        for ((&i, p), t) in chunk.iter().zip(&preds).zip(&truths) {
            cases.push(CaseResult {
                id: ids[i].clone(),
                metrics: case_metrics(p, t, opts)?,
            });
        }
    }
    Ok(cases)
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
}
