//! `genseg predict`: segment new images with a trained run.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;
use clap::Args;
use genseg_pipelines::run_dir::Which;

/// Arguments of `genseg predict`.
#[derive(Args, Debug)]
pub struct PredictArgs {
    /// The run folder.
    #[arg(long)]
    run: PathBuf,
    /// Which checkpoint.
    #[arg(long, value_parser = genseg::choice::<Which>(genseg::names::CHECKPOINT), default_value = "best")]
    checkpoint: Which,
    /// An image file or a folder of images.
    #[arg(long)]
    input: PathBuf,
    /// Output folder (masks/ and overlays/ are created in it).
    #[arg(long)]
    out: PathBuf,
}

/// Runs `genseg predict`.
pub fn run(args: PredictArgs, device: &Device) -> Result<()> {
    let n = genseg_pipelines::predict::predict(
        &args.run,
        args.checkpoint,
        &args.input,
        &args.out,
        device,
    )?;
    println!(
        "segmented {n} image(s) -> {}/masks, {}/overlays",
        args.out.display(),
        args.out.display()
    );
    Ok(())
}
