//! `genseg train`: start or resume a training run.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use anyhow::{Result, bail};
use candle_core::Device;
use clap::Args;
use genseg::progress::Terminal;
use genseg_pipelines::config::{Method, Profile, Recipe, RunConfig};
use genseg_pipelines::overrides::layered;

use super::run_flags::RunFlags;

/// Arguments of `genseg train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Training method (overrides `method` of the config).
    #[arg(long, value_parser = genseg::choice::<Method>(genseg::names::METHOD))]
    method: Option<Method>,
    #[command(flatten)]
    run: RunFlags,
    /// `--method separate|genseg`: the generator's pre-training run (sets
    /// `separate.generator` or `genseg.generator`; genseg pre-trains one when absent).
    #[arg(long)]
    generator: Option<PathBuf>,
    /// The run folder to create.
    #[arg(long, required_unless_present = "resume")]
    out: Option<PathBuf>,
    /// Starting configuration.
    #[arg(long, value_parser = genseg::choice::<Profile>(genseg::names::PROFILE), default_value = "cpu")]
    profile: Profile,
    /// The training recipe layered on the profile: `strong` is nnU-Net's (z-score
    /// normalisation, on-the-fly augmentation, InstanceNorm + LeakyReLU UNet with deep
    /// supervision, mirroring TTA) with RMSprop, which validation chose over its SGD.
    #[arg(long, value_parser = genseg::choice::<Recipe>(genseg::names::RECIPE), default_value = "plain")]
    recipe: Recipe,
    /// A TOML file layered over the profile and recipe.
    #[arg(long)]
    config: Option<PathBuf>,
    /// `dotted.key=value` overrides, e.g. `--set train.iterations=2`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Continue the run in this folder from its last checkpoint.
    #[arg(long, conflicts_with_all = ["method", "recipe", "data", "n_train", "n_val", "seed", "generator", "out", "config", "sets"])]
    resume: Option<PathBuf>,
}

impl TrainArgs {
    /// Profile -> recipe -> config file -> `--set` -> explicit flags.
    fn resolve(&self) -> Result<RunConfig> {
        let mut cfg = layered(
            &RunConfig::profile(self.profile).with_recipe(self.recipe),
            self.config.as_deref(),
            &self.sets,
        )?;
        if let Some(m) = self.method {
            cfg.method = m;
        }
        self.run.apply(&mut cfg.data, &mut cfg.seed)?;
        if let Some(g) = &self.generator {
            match cfg.method {
                Method::Separate => cfg.separate.generator = g.clone(),
                Method::Genseg => cfg.genseg.generator = g.clone(),
                other => bail!(
                    "--generator is used by --method separate and genseg only (the method is \
                     {other})"
                ),
            }
        }
        Ok(cfg)
    }
}

/// Runs `genseg train`.
pub fn run(args: TrainArgs, device: &Device, stop: &AtomicBool) -> Result<()> {
    let outcome = match &args.resume {
        Some(run) => {
            genseg_pipelines::methods::resume(run, device, stop, &mut Terminal::default())?
        }
        None => {
            let cfg = args.resolve()?;
            let out = args
                .out
                .as_ref()
                .expect("clap requires --out without --resume");
            genseg_pipelines::methods::train(cfg, out, device, stop, &mut Terminal::default())?
        }
    };
    let mut line = format!(
        "{} iterations in {:.1} s, best validation Dice {:.4} (iteration {})",
        outcome.iterations, outcome.seconds, outcome.best_val_dice, outcome.best_iteration
    );
    if let Some(t) = &outcome.test {
        line += &format!(
            "; test Dice {:.4} ± {:.4} over {} cases",
            t.metrics["dice"].mean, t.metrics["dice"].std, t.n_cases
        );
    }
    println!("{line}");
    if outcome.interrupted {
        let run = args.resume.as_ref().or(args.out.as_ref());
        bail!(
            "interrupted: resume with `genseg train --resume {}`",
            run.map_or("<run>".into(), |r| r.display().to_string())
        );
    }
    Ok(())
}
