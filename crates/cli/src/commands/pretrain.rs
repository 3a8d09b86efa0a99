//! `genseg pretrain-generator`: start or resume a pix2pix pre-training run.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use anyhow::{Result, bail};
use candle_core::Device;
use clap::Args;
use genseg::progress::Terminal;
use genseg_pipelines::config::Profile;
use genseg_pipelines::overrides::layered;

use super::run_flags::RunFlags;
use genseg_pipelines::config::RunConfig;

/// Arguments of `genseg pretrain-generator`.
#[derive(Args, Debug)]
pub struct PretrainArgs {
    #[command(flatten)]
    run: RunFlags,
    /// The run folder to create.
    #[arg(long, required_unless_present = "resume")]
    out: Option<PathBuf>,
    /// Starting configuration.
    #[arg(long, value_parser = genseg::choice::<Profile>(genseg::names::PROFILE), default_value = "cpu")]
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
    fn resolve(&self) -> Result<RunConfig> {
        let mut cfg = layered(
            &RunConfig::pix2pix(self.profile),
            self.config.as_deref(),
            &self.sets,
        )?;
        self.run.apply(&mut cfg.data, &mut cfg.seed)?;
        Ok(cfg)
    }
}

/// Runs `genseg pretrain-generator`.
pub fn run(args: PretrainArgs, device: &Device, stop: &AtomicBool) -> Result<()> {
    let outcome = match &args.resume {
        Some(run) => {
            genseg_pipelines::methods::pix2pix::resume(run, device, stop, &mut Terminal::default())?
        }
        None => {
            let cfg = args.resolve()?;
            let out = args
                .out
                .as_ref()
                .expect("clap requires --out without --resume");
            genseg_pipelines::methods::pix2pix::pretrain(
                cfg,
                out,
                device,
                stop,
                &mut Terminal::default(),
            )?
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
        let run = args.resume.as_ref().or(args.out.as_ref());
        bail!(
            "interrupted: resume with `genseg pretrain-generator --resume {}`",
            run.map_or("<run>".into(), |r| r.display().to_string())
        );
    }
    Ok(())
}
