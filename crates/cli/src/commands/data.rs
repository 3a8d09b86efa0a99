//! `genseg data`: inspect, split and synthesise datasets (the work is done by genseg-data).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use genseg_data::check::{CheckOptions, check_dataset};
use genseg_data::layout::{LayoutChoice, discover};
use genseg_data::phantom::{PhantomConfig, PhantomKind, write_phantoms};
use genseg_data::preprocess::ChannelPolicy;
use genseg_data::split::{Split, write_split_file};

/// The `genseg data` subcommands.
#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Validate a dataset folder: print its statistics, and fail naming every broken file.
    Check {
        /// The dataset folder.
        dir: PathBuf,
        /// Layout: auto, folder (images/ + masks/), genseg (Images/ + Masks/) or nnunet.
        #[arg(long, default_value = "auto")]
        layout: LayoutChoice,
        /// Binarise masks at this threshold on values scaled to [0, 1] (foreground = value > T),
        /// instead of requiring masks with at most two values.
        #[arg(long)]
        threshold: Option<f32>,
        /// nnU-Net: the label counted as foreground (default: every label > 0).
        #[arg(long, conflicts_with = "threshold")]
        label: Option<u16>,
        /// Channel policy: strict (mixed channel counts are a problem), gray or rgb (converted).
        #[arg(long, default_value = "strict")]
        channels: ChannelPolicy,
    },
    /// Write a seeded split file (nnU-Net splits_final.json format plus a "test" list).
    Split {
        /// The dataset folder.
        dir: PathBuf,
        /// Layout: auto, folder, genseg or nnunet.
        #[arg(long, default_value = "auto")]
        layout: LayoutChoice,
        /// Training cases drawn from the labelled pool (the rest, after validation, is test).
        #[arg(long, required_unless_present = "k_fold")]
        n_train: Option<usize>,
        /// Validation cases drawn after the training cases.
        #[arg(long, default_value_t = 0)]
        n_val: usize,
        /// Write K cross-validation folds: of the whole dataset (no test cases), or with
        /// --n-train of the drawn labelled pool (K validation folds of --n-val cases each,
        /// the first the standard split, every fold with the same test cases).
        #[arg(long)]
        k_fold: Option<usize>,
        /// Seed of the shuffle.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The split file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a synthetic phantom dataset (images/ + masks/ layout).
    Phantoms {
        /// lungs (grayscale X-ray-like) or skin (RGB lesion).
        #[arg(long)]
        kind: PhantomKind,
        /// Number of pairs.
        #[arg(long)]
        n: usize,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Side of the square images in pixels.
        #[arg(long, default_value_t = 128)]
        size: u32,
        /// Seed of the set.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Draw the shifted (out-of-domain) appearance; masks are unchanged.
        #[arg(long)]
        shifted: bool,
    },
}

/// Runs a `genseg data` subcommand.
pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Check {
            dir,
            layout,
            threshold,
            label,
            channels,
        } => {
            let options = CheckOptions {
                layout,
                threshold,
                label,
                channels,
            };
            let report = check_dataset(&dir, &options)
                .with_context(|| format!("checking {}", dir.display()))?;
            print!("{report}");
            for problem in &report.problems {
                eprintln!("error: {problem}");
            }
            if !report.is_ok() {
                bail!(
                    "{} problem(s) found in {}",
                    report.problems.len(),
                    dir.display()
                );
            }
            Ok(())
        }
        DataCommand::Split {
            dir,
            layout,
            n_train,
            n_val,
            k_fold,
            seed,
            out,
        } => {
            let ids = discover(&dir, layout)?.into_pairs()?;
            let ids: Vec<String> = ids.into_iter().map(|p| p.id).collect();
            let splits = match (k_fold, n_train) {
                (Some(k), Some(n_train)) => (0..k)
                    .map(|fold| Split::low_data_fold(&ids, n_train, n_val, fold, seed))
                    .collect::<Result<Vec<_>, _>>()?,
                (Some(k), None) => Split::k_fold(&ids, k, seed)?,
                (None, Some(n_train)) => vec![Split::low_data(&ids, n_train, n_val, seed)?],
                (None, None) => bail!("give --n-train (with --n-val) or --k-fold"),
            };
            write_split_file(&out, &splits)?;
            let s = &splits[0];
            println!(
                "{}: {} case(s), {} split(s) (first: train {}, val {}, test {}) -> {}",
                dir.display(),
                ids.len(),
                splits.len(),
                s.train.len(),
                s.val.len(),
                s.test.len(),
                out.display()
            );
            Ok(())
        }
        DataCommand::Phantoms {
            kind,
            n,
            out,
            size,
            seed,
            shifted,
        } => {
            if n == 0 {
                bail!("--n must be at least 1");
            }
            let config = PhantomConfig {
                kind,
                size,
                seed,
                shifted,
            };
            let ids = write_phantoms(&out, &config, n)?;
            println!(
                "{} {kind} phantom(s) of {size}x{size}{} -> {}",
                ids.len(),
                if shifted { " (shifted domain)" } else { "" },
                out.display()
            );
            Ok(())
        }
    }
}
