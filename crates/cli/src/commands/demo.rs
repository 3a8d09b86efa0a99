//! `genseg demo`: baseline, Separate and GenSeg on built-in phantoms.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use anyhow::{Result, bail};
use candle_core::Device;
use clap::Args;
use genseg::progress::Terminal;
use genseg_pipelines::demo::{DemoConfig, demo};

/// Arguments of `genseg demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Output folder (its data/, runs/ and predictions/ are replaced).
    #[arg(long, default_value = "demo-out")]
    out: PathBuf,
    /// Image side in pixels (a power of two, at least 32).
    #[arg(long, default_value_t = DemoConfig::default().size)]
    size: u32,
    /// Iterations of each segmentation run.
    #[arg(long, default_value_t = DemoConfig::default().iterations)]
    iterations: u64,
    /// Iterations of the generator pre-training.
    #[arg(long, default_value_t = DemoConfig::default().pretrain_iterations)]
    pretrain_iterations: u64,
    /// GenSeg's hypergradient interval (`genseg.arch_every`).
    #[arg(long, default_value_t = DemoConfig::default().arch_every)]
    arch_every: u64,
    /// Seeds, comma-separated: each draws its own split, initialisations and generator.
    #[arg(long, value_delimiter = ',', default_values_t = DemoConfig::default().seeds)]
    seeds: Vec<u64>,
}

/// Runs `genseg demo` and prints its table.
pub fn run(args: DemoArgs, device: &Device, stop: &AtomicBool) -> Result<()> {
    let cfg = DemoConfig {
        out: args.out,
        size: args.size,
        iterations: args.iterations,
        pretrain_iterations: args.pretrain_iterations,
        arch_every: args.arch_every,
        seeds: args.seeds,
        ..DemoConfig::default()
    };
    match demo(&cfg, device, stop, &mut Terminal::default())? {
        Some(report) => {
            println!("{}", report.table);
            Ok(())
        }
        None => bail!("interrupted: run `genseg demo` again (it starts afresh)"),
    }
}
