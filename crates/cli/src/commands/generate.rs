//! `genseg generate`: write a synthetic dataset with a pre-trained generator.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;
use clap::Args;
use genseg::progress::Terminal;
use genseg_pipelines::config::{NormStatistics, PostChoice};
use genseg_pipelines::generate::{GenerateOptions, OutputLayout, generate};
use genseg_pipelines::run_dir::Which;

/// Arguments of `genseg generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// The generator's pre-training run (`genseg pretrain-generator --out`).
    #[arg(long)]
    generator: PathBuf,
    /// Which of its checkpoints.
    #[arg(long, value_parser = genseg::choice::<Which>(genseg::names::CHECKPOINT), default_value = "best")]
    checkpoint: Which,
    /// Source of masks: any dataset folder (its masks are used) or a folder of mask images.
    #[arg(long)]
    masks: PathBuf,
    /// Number of pairs to write.
    #[arg(long, default_value_t = 200)]
    n: usize,
    /// Seed of the mask augmentations and dropout masks.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder (must not exist or be empty).
    #[arg(long)]
    out: PathBuf,
    /// Output layout.
    #[arg(long, value_parser = genseg::choice::<OutputLayout>(genseg::names::LAYOUT), default_value = "folder")]
    layout: OutputLayout,
    /// Images synthesised (and min-max normalised) together.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Post-processing: auto (equalise + gamma when the generator's data was), min_max, xray, rgb.
    #[arg(long, value_parser = genseg::choice::<PostChoice>(genseg::names::POSTPROCESS), default_value = "auto")]
    postprocess: PostChoice,
    /// The generator's BatchNorm statistics: batch (the reference's train mode) or running
    /// (those of pre-training, so an image does not depend on the rest of its batch).
    #[arg(long, value_parser = genseg::choice::<NormStatistics>(genseg::names::GENERATOR_NORM), default_value = "batch")]
    generator_norm: NormStatistics,
    /// Paint the masks as they are instead of augmenting them first.
    #[arg(long)]
    no_augment: bool,
}

/// Runs `genseg generate`.
pub fn run(args: GenerateArgs, device: &Device) -> Result<()> {
    let opts = GenerateOptions {
        generator: args.generator,
        checkpoint: args.checkpoint,
        masks: args.masks,
        n: args.n,
        seed: args.seed,
        out: args.out,
        layout: args.layout,
        batch_size: args.batch_size,
        postprocess: args.postprocess,
        generator_norm: args.generator_norm,
        augment: !args.no_augment,
    };
    let outcome = generate(&opts, device, &mut Terminal::default())?;
    println!(
        "{} synthetic pair(s) of {}x{} ({} channel(s)) from {} mask(s) -> {}",
        outcome.n,
        outcome.size,
        outcome.size,
        outcome.channels,
        outcome.source_masks,
        opts.out.display()
    );
    Ok(())
}
