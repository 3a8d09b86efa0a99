//! `genseg bench-step`: time training steps and print one JSON line.

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Args;
use genseg_pipelines::bench_step::{BenchModel, StepBenchConfig, bench_step};

/// Arguments of `genseg bench-step`.
#[derive(Args, Debug)]
pub struct BenchStepArgs {
    /// The network to train.
    #[arg(long, value_parser = genseg::choice::<BenchModel>(genseg::names::BENCH_MODEL))]
    model: BenchModel,
    /// UNet base width, or the generator's ngf.
    #[arg(long, default_value_t = 64)]
    base: usize,
    /// UNet input channels, or the generator's image channels (its input is a 1-channel mask).
    #[arg(long, default_value_t = 1)]
    channels: usize,
    /// Square image side in pixels.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Images per step.
    #[arg(long, default_value_t = 2)]
    batch: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Untimed steps before them.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Seed of the weights, data and dropout masks.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Runs `genseg bench-step`.
pub fn run(args: BenchStepArgs, device: &Device) -> Result<()> {
    let cfg = StepBenchConfig {
        model: args.model,
        base: args.base,
        channels: args.channels,
        size: args.size,
        batch: args.batch,
        steps: args.steps,
        warmup: args.warmup,
        seed: args.seed,
    };
    let report = bench_step(&cfg, device)?;
    println!(
        "{}",
        serde_json::to_string(&report).context("serialising the report")?
    );
    Ok(())
}
