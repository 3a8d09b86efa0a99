//! `genseg score`: score another tool's predicted masks with genseg's metrics.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use genseg_data::split::{read_split_file, select_fold};
use genseg_pipelines::evaluate::{SplitChoice, score_predictions};

/// Arguments of `genseg score`.
#[derive(Args, Debug)]
pub struct ScoreArgs {
    /// Folder of predicted masks, `<id>.png` per case (non-zero = foreground).
    #[arg(long)]
    predictions: PathBuf,
    /// The dataset folder holding the truth masks.
    #[arg(long)]
    data: PathBuf,
    /// Side in pixels at which predictions and truth are compared.
    #[arg(long, default_value_t = 256)]
    size: u32,
    /// A split file (`genseg data split`, or nnU-Net's splits_final.json); with `--split`,
    /// only those cases are scored.
    #[arg(long)]
    split_file: Option<PathBuf>,
    /// Which cases of `--split-file` (fold 0).
    #[arg(long, value_parser = genseg::choice::<SplitChoice>(genseg::names::SPLIT), default_value = "test", requires = "split_file")]
    split: SplitChoice,
    /// Report folder (per_case.csv, summary.json).
    #[arg(long)]
    out: PathBuf,
}

/// Runs `genseg score`.
pub fn run(args: ScoreArgs) -> Result<()> {
    let ids = match &args.split_file {
        Some(file) => {
            let splits = read_split_file(file)?;
            let s = select_fold(&splits, 0)?;
            let ids = match args.split {
                SplitChoice::Test => s.test.clone(),
                SplitChoice::Val => s.val.clone(),
                SplitChoice::All => [&s.train[..], &s.val, &s.test].concat(),
            };
            anyhow::ensure!(
                !ids.is_empty(),
                "{}: the {:?} split is empty",
                file.display(),
                args.split
            );
            Some(ids)
        }
        None => None,
    };
    let s = score_predictions(
        &args.predictions,
        &args.data,
        args.size,
        ids.as_deref(),
        &args.out,
    )
    .with_context(|| format!("scoring {}", args.predictions.display()))?;
    println!(
        "{} cases: Dice {:.4} ± {:.4}  IoU {:.4} -> {}",
        s.n_cases,
        s.metrics["dice"].mean,
        s.metrics["dice"].std,
        s.metrics["iou"].mean,
        args.out.display()
    );
    Ok(())
}
