//! Log lines go to stderr and, once a run folder exists, to its `train.log` as well. The
//! binary installs the subscriber ([`init`]); pipelines call [`log_to_file`] when they open
//! a run folder.

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

/// Installs the global tracing subscriber (stderr, plus the run's log file once
/// [`log_to_file`] is called).
///
/// `RUST_LOG` wins when set; otherwise `verbosity` picks the level for the genseg crates
/// (0: info, 1: debug, 2+: trace) and dependencies stay at warn.
pub fn init(verbosity: u8) {
    let level = match verbosity {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let default = format!(
        "warn,genseg={level},genseg_pipelines={level},genseg_nn={level},genseg_data={level},\
         genseg_generator={level},genseg_masks={level}"
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

/// Stops writing log lines to the run's log file (its run folder is being withdrawn).
pub fn stop_logging_to_file() {
    *LOG_FILE.lock().unwrap_or_else(|e| e.into_inner()) = None;
}
