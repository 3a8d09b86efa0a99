//! The GenSeg orchestrator: pipelines that compose the library crates
//! (data IO, models, generators, multi-level optimisation) into runs.
//! The `genseg` binary is a thin command-line layer over this library.
//!
//! - [`config`]: the resolved run configuration and its profiles;
//!   [`overrides`] layers config files and `--set key=value` on top.
//! - [`train`]: supervised training (baseline and augmentation baselines)
//!   with validation, best/last checkpoints and exact resume.
//! - [`pretrain`]: pix2pix pre-training of the mask-to-image generator; [`synth`] loads
//!   it and turns augmented masks into post-processed synthetic images (the `separate`
//!   method and [`generate`]); [`ssim`] scores its images.
//! - [`evaluate`] and [`predict`]: scoring and inference from a run folder.
//! - [`run_dir`]: the run folder layout; [`plot`]: `progress.png`.
//! - [`bench_step`]: timed training steps on random data (`genseg bench-step`).

pub mod augment;
pub mod bench_step;
pub mod config;
pub mod demo;
pub mod driver;
pub mod end_to_end;
pub mod evaluate;
pub mod generate;
pub mod overrides;
pub mod plot;
pub mod predict;
pub mod pretrain;
pub mod run_dir;
pub mod seeding;
pub mod ssim;
pub mod synth;
pub mod train;

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// The run's log file, once a run folder exists.
static LOG_FILE: Mutex<Option<File>> = Mutex::new(None);

/// Writes log lines to stderr and, once set, to the run's log file.
struct TeeWriter;

impl Write for TeeWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stderr().write_all(buf)?;
        if let Some(file) = LOG_FILE.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            file.write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if let Some(file) = LOG_FILE.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            file.flush()?;
        }
        std::io::stderr().flush()
    }
}

struct Tee;

impl<'a> MakeWriter<'a> for Tee {
    type Writer = TeeWriter;
    fn make_writer(&'a self) -> Self::Writer {
        TeeWriter
    }
}

/// Installs the global tracing subscriber (stderr, plus the run's log file
/// once [`log_to_file`] is called).
///
/// `RUST_LOG` wins when set; otherwise `verbosity` picks the level for the
/// genseg crates (0: info, 1: debug, 2+: trace) and dependencies stay at warn.
pub fn init_logging(verbosity: u8) {
    let level = match verbosity {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let default = format!(
        "warn,genseg={level},genseg_nn={level},genseg_data={level},genseg_generator={level},genseg_masks={level}"
    );
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // A second call (tests) keeps the first subscriber; that is not an error.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Tee)
        .with_ansi(false)
        .with_target(false)
        .try_init();
}

/// Appends all further log lines to `path` as well.
pub fn log_to_file(path: &Path) -> anyhow::Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening log file {}", path.display()))?;
    *LOG_FILE.lock().unwrap_or_else(|e| e.into_inner()) = Some(file);
    Ok(())
}
