//! `genseg evaluate`: scores a trained run's checkpoint on any dataset folder
//! (in-domain test split, or a whole out-of-domain set) and writes
//! `per_case.csv`, `summary.json` and `cases.png` (the first cases as image | truth |
//! prediction).
//!
//! Predictions and masks are compared at the run's working resolution
//! (`data.size`), as the reference does at 256 px, unless `eval.resolution` (or
//! `--resolution`) says each image's own size or one common side.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;
pub use genseg_backbones::metrics::ScoreResolution;
use genseg_backbones::report::Summary;
use genseg_data::preprocess::ChannelPolicy;
use genseg_data::split::{read_split_file, select_fold};
use genseg_nn::checkpoint::Checkpoint;
use genseg_nn::params::ParamStore;

use crate::config::RunConfig;
use crate::run_dir::{RunDir, Which};
use crate::segmenter::{Segmenter, build_model, evaluate_model, segmenter_weights};

/// Which cases of the dataset to score.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitChoice {
    /// The run's test split (only meaningful on the training dataset).
    Test,
    /// The run's validation split.
    Val,
    /// Every case of the folder (out-of-domain sets).
    All,
}

/// A trained model restored from a run folder.
pub struct LoadedRun {
    /// The run's configuration.
    pub cfg: RunConfig,
    /// The model with the checkpoint's weights.
    pub model: Segmenter,
    /// The store holding those weights (see [`crate::segmenter::frozen_model`]).
    pub store: ParamStore,
    /// The checkpoint folder it came from.
    pub checkpoint: PathBuf,
}

/// Restores the model of `run_dir` from its `which` checkpoint.
pub fn load_run(run_dir: &Path, which: Which, device: &Device) -> Result<LoadedRun> {
    let run = RunDir::open(run_dir)?;
    let cfg: RunConfig = run.read_config()?;
    let (store, model) = build_model(&cfg, device)?;
    let dir = run.checkpoint(which);
    let ckpt =
        Checkpoint::load(&dir).with_context(|| format!("loading checkpoint {}", dir.display()))?;
    store
        .load_named_tensors(&segmenter_weights(&ckpt.weights), true)
        .with_context(|| {
            format!(
                "checkpoint {} does not match the run's model",
                dir.display()
            )
        })?;
    Ok(LoadedRun {
        cfg,
        model,
        store,
        checkpoint: dir,
    })
}

/// `genseg score`: scores predicted masks from another tool (a PNG per case named by its
/// id, any non-zero value foreground) against the truth of `data_dir` at `size` px, with
/// the metrics `genseg evaluate` uses; `ids` restricts the cases (e.g. a split's test
/// list). A missing prediction is an error naming the file.
pub fn score_predictions(
    pred_dir: &Path,
    data_dir: &Path,
    size: u32,
    ids: Option<&[String]>,
    out: &Path,
) -> Result<Summary> {
    use genseg_backbones::metrics::{BinaryMask, MetricOptions, case_metrics};
    use genseg_backbones::report::{CaseResult, write_reports};
    use genseg_data::preprocess::{MaskRule, read_binary_mask, resize_mask};
    let config = genseg_data::DataConfig {
        size: Some(genseg_data::ImageSize::square(size)),
        ..Default::default()
    };
    let mut data = genseg_data::Dataset::load(data_dir, &config)
        .with_context(|| format!("loading dataset {}", data_dir.display()))?;
    if let Some(ids) = ids {
        data = data.subset(&data.indices_of(ids)?)?;
    }
    let side = size as usize;
    let opts = MetricOptions {
        resolution: ScoreResolution::Square(size),
        ..Default::default()
    };
    let mut cases = Vec::with_capacity(data.len());
    for sample in data.samples() {
        let path = pred_dir.join(format!("{}.png", sample.id));
        anyhow::ensure!(
            path.is_file(),
            "no prediction for case {}: {} is missing",
            sample.id,
            path.display()
        );
        let mask = resize_mask(&read_binary_mask(&path, MaskRule::NonZero)?, size, size);
        let pred = BinaryMask {
            height: side,
            width: side,
            pixels: mask.pixels().map(|p| p.0[0] > 0).collect(),
        };
        let truth = BinaryMask {
            height: side,
            width: side,
            pixels: sample.mask.iter().map(|&v| v > 0).collect(),
        };
        cases.push(CaseResult {
            id: sample.id.clone(),
            metrics: case_metrics(&pred, &truth, &opts)
                .with_context(|| format!("scoring {}", path.display()))?,
        });
    }
    write_reports(
        out,
        &cases,
        &opts,
        &data_dir.display().to_string(),
        &pred_dir.display().to_string(),
    )
}

/// `genseg evaluate`: returns the summary written to `out`. `resolution` replaces the
/// run's `eval.resolution` (where predictions and truth are compared).
pub fn evaluate_run(
    run_dir: &Path,
    which: Which,
    data_dir: Option<&Path>,
    split: SplitChoice,
    resolution: Option<ScoreResolution>,
    out: &Path,
    device: &Device,
) -> Result<Summary> {
    let loaded = load_run(run_dir, which, device)?;
    let mut cfg = loaded.cfg.clone();
    if let Some(resolution) = resolution {
        cfg.eval.resolution = resolution;
    }
    let data_dir = data_dir
        .map(Path::to_path_buf)
        .unwrap_or_else(|| cfg.data.path.clone());
    // Another domain may have another channel count: convert it to the model's.
    cfg.data.channels = if cfg.model.in_channels() == 1 {
        ChannelPolicy::Gray
    } else {
        ChannelPolicy::Rgb
    };
    let data = cfg.data.load(&data_dir)?;
    let data = match split {
        SplitChoice::All => data,
        SplitChoice::Test | SplitChoice::Val => {
            let splits = read_split_file(&RunDir::open(run_dir)?.split_path())?;
            let s = select_fold(&splits, 0)?;
            let ids = if split == SplitChoice::Test {
                &s.test
            } else {
                &s.val
            };
            anyhow::ensure!(
                !ids.is_empty(),
                "the run's {split:?} split is empty; use --split all"
            );
            let indices = data.indices_of(ids).with_context(|| {
                format!(
                    "{} does not hold the run's split (pass --split all for another dataset)",
                    data_dir.display()
                )
            })?;
            data.subset(&indices)?
        }
    };
    let summary = evaluate_model(
        &loaded.model,
        &data,
        &cfg,
        device,
        out,
        &data_dir.display().to_string(),
        &loaded.checkpoint.display().to_string(),
    )?;
    Ok(summary)
}
