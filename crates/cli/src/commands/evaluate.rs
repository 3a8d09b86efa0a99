//! `genseg evaluate`: score a run's checkpoint on a dataset folder.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;
use clap::Args;
use genseg_pipelines::evaluate::{ScoreResolution, SplitChoice, evaluate_run};
use genseg_pipelines::run_dir::Which;

/// Arguments of `genseg evaluate`.
#[derive(Args, Debug)]
pub struct EvaluateArgs {
    /// The run folder.
    #[arg(long)]
    run: PathBuf,
    /// Which checkpoint.
    #[arg(long, value_parser = genseg::choice::<Which>(genseg::names::CHECKPOINT), default_value = "best")]
    checkpoint: Which,
    /// Dataset folder; default: the run's training dataset.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Cases to score; default: `test` on the run's dataset, `all` on another.
    #[arg(long, value_parser = genseg::choice::<SplitChoice>(genseg::names::SPLIT))]
    split: Option<SplitChoice>,
    /// Where predictions and truth are compared: `working` (the run's `data.size`),
    /// `native` (each image's own size) or a side in pixels; default: the run's
    /// `eval.resolution`.
    #[arg(long)]
    resolution: Option<ScoreResolution>,
    /// Report folder; default: `<run>/eval-<dataset>-<split>`.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Runs `genseg evaluate`.
pub fn run(args: EvaluateArgs, device: &Device) -> Result<()> {
    let split = args.split.unwrap_or(if args.data.is_some() {
        SplitChoice::All
    } else {
        SplitChoice::Test
    });
    let out = args.out.clone().unwrap_or_else(|| {
        let name = args
            .data
            .as_ref()
            .and_then(|d| d.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "train-data".into());
        args.run.join(format!(
            "eval-{name}-{}",
            format!("{split:?}").to_lowercase()
        ))
    });
    let s = evaluate_run(
        &args.run,
        args.checkpoint,
        args.data.as_deref(),
        split,
        args.resolution,
        &out,
        device,
    )?;
    let stat = |k: &str| {
        s.metrics
            .get(k)
            .map(|m| format!("{:.4} ± {:.4}", m.mean, m.std))
            .unwrap_or_default()
    };
    println!(
        "{} cases: Dice {}  IoU {}  precision {}  recall {}{}  -> {}",
        s.n_cases,
        stat("dice"),
        stat("iou"),
        stat("precision"),
        stat("recall"),
        s.metrics
            .get("hd95")
            .map(|m| format!("  HD95 {:.2} px (n={})", m.mean, m.n))
            .unwrap_or_default(),
        out.display()
    );
    Ok(())
}
