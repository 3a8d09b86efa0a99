//! # genseg-pipelines: GenSeg's training runs, as a library
//!
//! The pipelines compose the library crates (data IO, backbones, the mask and image
//! generators, multi-level optimisation) into runs that can be resumed, evaluated and
//! repeated from their folder. The `genseg` binary is argument parsing, a progress bar and
//! plots over this crate; everything it runs is reachable from here.
//!
//! - [`config`]: [`config::RunConfig`], the resolved configuration of a run, with its
//!   profiles; [`overrides`] layers a TOML file and `--set key=value` on top.
//! - [`learner`]: the one training loop ([`learner::Learner`]) that runs any
//!   [`learner::Pipeline`], with typed checkpoint metadata and an [`learner::Observer`]
//!   for progress and plots.
//! - [`methods`]: one module per method — baseline, augment, separate, genseg, pix2pix —
//!   ([`methods::train`], [`methods::resume`]).
//! - [`run`]: creating and reopening run folders, the path every method shares;
//!   [`run_dir`]: the run folder and its metrics log; [`seeding`]: the labelled random
//!   streams every draw comes from (and the batch order); [`logging`]: stderr + `train.log`.
//! - [`segmenter`]: the configured backbone, its validation and evaluation, a run's
//!   outcome.
//! - [`evaluate`], [`predict`], [`generate`]: scoring, inference and synthetic datasets
//!   from run folders; [`demo`]: the whole method on phantoms; [`bench_step`]: timed
//!   training steps.
//! - [`manifest`]: experiment manifests, one fully resolved run per JSON line (`genseg run`).
//!
//! ```no_run
//! use std::sync::atomic::AtomicBool;
//! use genseg_pipelines::config::{Method, Profile, RunConfig};
//! use genseg_pipelines::learner::Silent;
//!
//! let mut cfg = RunConfig::profile(Profile::Cpu);
//! cfg.method = Method::Baseline;
//! cfg.data.path = "../shared/data/montgomery".into();
//! let outcome = genseg_pipelines::methods::train(
//!     cfg,
//!     "runs/mont-baseline".as_ref(),
//!     &candle_core::Device::Cpu,
//!     &AtomicBool::new(false),
//!     &mut Silent,
//! )?;
//! println!("best validation Dice {:.4}", outcome.best_val_dice);
//! # Ok::<(), anyhow::Error>(())
//! ```

#![warn(missing_docs)]

pub mod bench_step;
pub mod config;
pub mod demo;
pub mod evaluate;
pub mod generate;
pub mod learner;
pub mod logging;
pub mod manifest;
pub mod methods;
pub mod overrides;
pub mod predict;
pub mod run;
pub mod run_dir;
pub mod seeding;
pub mod segmenter;
