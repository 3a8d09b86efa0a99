//! Project automation and experiment recipes: `cargo xtask <recipe>`.
//!
//! Each recipe builds the `genseg` binary in release mode and drives it, so a
//! recipe is exactly what a user could type by hand, written down once.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "GenSeg project recipes")]
struct Cli {
    #[command(subcommand)]
    recipe: Recipe,
}

#[derive(Subcommand)]
enum Recipe {
    /// The main job on built-in synthetic data: lung phantoms are generated,
    /// checked, a baseline UNet is trained on 7 + 2 of them, evaluated on a
    /// shifted phantom domain, and used to segment new images.
    Demo {
        /// Where the demo writes its datasets and split files.
        #[arg(long, default_value = "demo-out")]
        out: PathBuf,
    },
    /// Runs `genseg data check` on every dataset folder under a directory.
    CheckDatasets {
        /// The folder holding one sub-folder per dataset.
        #[arg(long, default_value = "../shared/data")]
        data: PathBuf,
    },
}

fn main() -> Result<()> {
    let root = workspace_root();
    match Cli::parse().recipe {
        Recipe::Demo { out } => demo(&root, &root.join(out)),
        Recipe::CheckDatasets { data } => check_datasets(&root, &root.join(data)),
    }
}

fn workspace_root() -> PathBuf {
    // xtask/Cargo.toml sits one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// Builds the release binary once and returns its path.
fn build_genseg(root: &Path) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(root)
        .args(["build", "--release", "--bin", "genseg"])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --release --bin genseg failed ({status})");
    }
    Ok(root.join("target/release/genseg"))
}

fn genseg(bin: &Path, args: &[&str]) -> Result<()> {
    eprintln!("$ genseg {}", args.join(" "));
    let status = Command::new(bin)
        .args(args)
        .status()
        .with_context(|| format!("starting {}", bin.display()))?;
    if !status.success() {
        bail!("`genseg {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn demo(root: &Path, out: &Path) -> Result<()> {
    let bin = build_genseg(root)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let path = |name: &str| out.join(name).to_string_lossy().into_owned();
    let (lungs, shifted, run) = (path("lungs"), path("lungs-shifted"), path("run-baseline"));
    // A labelled pool of phantoms, validated and split like real data.
    genseg(
        &bin,
        &[
            "data", "phantoms", "--kind", "lungs", "--n", "60", "--size", "96", "--out", &lungs,
        ],
    )?;
    genseg(
        &bin,
        &[
            "data",
            "phantoms",
            "--kind",
            "lungs",
            "--n",
            "20",
            "--size",
            "96",
            "--shifted",
            "--seed",
            "1",
            "--out",
            &shifted,
        ],
    )?;
    genseg(&bin, &["data", "check", &lungs])?;
    if Path::new(&run).exists() {
        std::fs::remove_dir_all(&run)
            .with_context(|| format!("removing the previous demo run {run}"))?;
    }
    // The ultra-low-data regime: 7 training + 2 validation images.
    genseg(
        &bin,
        &[
            "train",
            "--method",
            "baseline",
            "--data",
            &lungs,
            "--n-train",
            "7",
            "--n-val",
            "2",
            "--seed",
            "0",
            "--out",
            &run,
            "--set",
            "data.size=96",
            "--set",
            "train.iterations=150",
        ],
    )?;
    genseg(&bin, &["evaluate", "--run", &run, "--data", &shifted])?;
    genseg(
        &bin,
        &[
            "predict",
            "--run",
            &run,
            "--input",
            &format!("{shifted}/images"),
            "--out",
            &path("predictions"),
        ],
    )?;
    eprintln!(
        "demo finished: run folder {run} (progress.png, eval-*/summary.json), predictions in {}",
        path("predictions")
    );
    Ok(())
}

fn check_datasets(root: &Path, data: &Path) -> Result<()> {
    let bin = build_genseg(root)?;
    let mut entries: Vec<PathBuf> = std::fs::read_dir(data)
        .with_context(|| format!("reading dataset folder {}", data.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    entries.sort();
    if entries.is_empty() {
        bail!("no dataset folders under {}", data.display());
    }
    let mut failed = Vec::new();
    for dir in &entries {
        if genseg(&bin, &["data", "check", &dir.to_string_lossy()]).is_err() {
            failed.push(dir.display().to_string());
        }
    }
    if !failed.is_empty() {
        bail!("datasets that failed the check: {}", failed.join(", "));
    }
    Ok(())
}
