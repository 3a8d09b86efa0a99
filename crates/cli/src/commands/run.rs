//! `genseg run`: one run of an experiment manifest (`cargo xtask exp`), e.g. as the task
//! `$SLURM_ARRAY_TASK_ID` of a cluster job array.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Args;
use genseg_pipelines::manifest::{self, Action};

/// Arguments of `genseg run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The manifest (JSON lines, one run each).
    #[arg(long)]
    manifest: PathBuf,
    /// Which run, counted from 0 (a Slurm array task id).
    #[arg(long)]
    index: usize,
}

/// Runs line `index` of the manifest: each step in its own `genseg` process (the same
/// binary, on the same `--device`), skipped when done, resumed when started.
pub fn run(args: RunArgs, device: &str) -> Result<()> {
    let spec = manifest::read_index(&args.manifest, args.index)?;
    let exe = std::env::current_exe().context("locating the genseg binary")?;
    eprintln!(
        "run {} of {}: {}",
        args.index,
        args.manifest.display(),
        spec.id
    );
    for step in &spec.steps {
        let argv = match step.action() {
            Action::Skip => {
                eprintln!("  done already: genseg {}", step.args.join(" "));
                continue;
            }
            Action::Run(argv) => argv,
        };
        eprintln!("$ genseg {}", argv.join(" "));
        let status = Command::new(&exe)
            .arg("--device")
            .arg(device)
            .args(&argv)
            .status()
            .with_context(|| format!("starting {}", exe.display()))?;
        if !status.success() {
            bail!(
                "run {} of {} ({}): `genseg {}` failed ({status}); running the same command \
                 again resumes it",
                args.index,
                args.manifest.display(),
                spec.id,
                argv.join(" ")
            );
        }
    }
    Ok(())
}
