//! `genseg pretrain-generator`: start or resume a pix2pix pre-training run.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use anyhow::{Result, bail};
use candle_core::Device;
use clap::Args;
use genseg::config::Profile;
use genseg::overrides::layered;
use genseg::pretrain::PretrainConfig;

/// Arguments of `genseg pretrain-generator`.
#[derive(Args, Debug)]
pub struct PretrainArgs {
    /// Dataset folder (folder pairs, GenSeg Images/Masks, or nnU-Net raw).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Training pairs drawn from the labelled pool.
    #[arg(long)]
    n_train: Option<usize>,
    /// Validation pairs drawn from the labelled pool (they choose best/).
    #[arg(long)]
    n_val: Option<usize>,
    /// The run's one seed.
    #[arg(long)]
    seed: Option<u64>,
    /// The run folder to create.
    #[arg(long, required_unless_present = "resume")]
    out: Option<PathBuf>,
    /// Starting configuration.
    #[arg(long, value_enum, default_value_t = Profile::Cpu)]
    profile: Profile,
    /// A TOML file layered over the profile.
    #[arg(long)]
    config: Option<PathBuf>,
    /// `dotted.key=value` overrides, e.g. `--set generator.ngf=8`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Continue the run in this folder from its last checkpoint.
    #[arg(long, conflicts_with_all = ["data", "n_train", "n_val", "seed", "out", "config", "sets"])]
    resume: Option<PathBuf>,
}

impl PretrainArgs {
    /// Profile -> config file -> `--set` -> explicit flags.
    fn resolve(&self) -> Result<PretrainConfig> {
        let mut cfg = layered(
            &PretrainConfig::profile(self.profile),
            self.config.as_deref(),
            &self.sets,
        )?;
        if let Some(d) = &self.data {
            cfg.data.path = d.clone();
        }
        if let Some(n) = self.n_train {
            cfg.data.n_train = n;
        }
        if let Some(n) = self.n_val {
            cfg.data.n_val = n;
        }
        if let Some(s) = self.seed {
            cfg.seed = s;
        }
        if cfg.data.path.as_os_str().is_empty() {
            bail!("no dataset: pass --data <dir> or set data.path");
        }
        Ok(cfg)
    }
}

/// Runs `genseg pretrain-generator`.
pub fn run(args: PretrainArgs, device: &Device, stop: &AtomicBool) -> Result<()> {
    let outcome = match &args.resume {
        Some(run) => genseg::pretrain::resume(run, device, stop)?,
        None => {
            let cfg = args.resolve()?;
            let out = args
                .out
                .as_ref()
                .expect("clap requires --out without --resume");
            genseg::pretrain::pretrain(cfg, out, device, stop)?
        }
    };
    println!(
        "{} iterations in {:.1} s, validation L1 {:.4} untrained -> best {:.4} (iteration {})",
        outcome.iterations,
        outcome.seconds,
        outcome.initial_val_l1,
        outcome.best_val_l1,
        outcome.best_iteration
    );
    if outcome.interrupted {
        bail!("interrupted: resume with `genseg pretrain-generator --resume <run>`");
    }
    Ok(())
}
