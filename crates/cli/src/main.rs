//! The `genseg` command-line tool: a thin layer that parses flags and calls
//! the library crates. No algorithm lives here.

mod commands;

/// Keeps freed memory in the process for reuse. Training frees and re-allocates the same
/// activation-sized buffers every step; glibc serves each from a fresh `mmap` and returns
/// it with `munmap`, and the page faults and TLB shootdowns that follow cost 15-20% of a
/// training step (docs/performance.md). The heap grows to the step's working set once and
/// stays there (peak memory +6% on the big UNet).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only changes allocator tunables; called before any other thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Parser, Subcommand};

/// GenSeg: generative data for medical image segmentation in ultra low-data regimes.
#[derive(Parser, Debug)]
#[command(name = "genseg", version, about, long_about = None)]
struct Cli {
    /// Compute device: `cpu`, or `cuda` / `cuda:N` (needs a build with `--features cuda`).
    #[arg(long, global = true, default_value = "cpu")]
    device: String,

    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides this.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand, Debug)]
enum Commands {
    /// Baseline, Separate and GenSeg on built-in phantoms, in minutes (nothing to download).
    Demo(commands::demo::DemoArgs),
    /// Inspect, split and synthesise datasets.
    Data {
        #[command(subcommand)]
        cmd: commands::data::DataCommand,
    },
    /// Pre-train the mask-to-image generator with pix2pix (or resume a run).
    PretrainGenerator(commands::pretrain::PretrainArgs),
    /// Train a segmentation model (or resume a run).
    Train(commands::train::TrainArgs),
    /// Write a synthetic dataset with a pre-trained generator.
    Generate(commands::generate::GenerateArgs),
    /// Score a run's checkpoint on a dataset folder.
    Evaluate(commands::evaluate::EvaluateArgs),
    /// Segment new images with a trained run.
    Predict(commands::predict::PredictArgs),
    /// Score another tool's predicted masks (e.g. nnU-Net's) with genseg's metrics.
    Score(commands::score::ScoreArgs),
    /// One run of an experiment manifest (`cargo xtask exp`): its steps in order, each
    /// skipped when done and resumed when started.
    Run(commands::run::RunArgs),
    /// Time training steps of the UNet or the generator on random data (one JSON line).
    BenchStep(commands::bench_step::BenchStepArgs),
}

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    genseg_pipelines::logging::init(cli.verbose);
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", genseg::error_message(&err));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Ctrl-C (or SIGTERM) asks a training loop to stop after the current step; it then
/// writes last/ so nothing computed is lost. A second one exits at once: the last
/// complete checkpoint stays (checkpoints are written atomically).
fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("second interrupt: exiting now; the last complete checkpoint stays");
            std::process::exit(130);
        }
        eprintln!("interrupt: stopping after the current step (again to exit at once)");
    })?;
    Ok(stop)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let device = genseg_nn::device::parse_device(&cli.device)?;
    tracing::debug!(device = %genseg_nn::device::device_label(&device), "device selected");
    match cli.command {
        Commands::Data { cmd } => commands::data::run(cmd),
        Commands::Demo(args) => {
            let stop = stop_flag()?;
            commands::demo::run(args, &device, &stop)
        }
        Commands::Train(args) => {
            let stop = stop_flag()?;
            commands::train::run(args, &device, &stop)
        }
        Commands::PretrainGenerator(args) => {
            let stop = stop_flag()?;
            commands::pretrain::run(args, &device, &stop)
        }
        Commands::Generate(args) => commands::generate::run(args, &device),
        Commands::Evaluate(args) => commands::evaluate::run(args, &device),
        Commands::Predict(args) => commands::predict::run(args, &device),
        Commands::Score(args) => commands::score::run(args),
        Commands::BenchStep(args) => commands::bench_step::run(args, &device),
        Commands::Run(args) => commands::run::run(args, &cli.device),
    }
}
