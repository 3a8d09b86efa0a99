//! One module per top-level subcommand: clap arguments and the calls into the
//! library crates that do the work.

pub mod bench_step;
pub mod data;
pub mod demo;
pub mod evaluate;
pub mod generate;
pub mod predict;
pub mod pretrain;
pub mod run;
pub mod run_flags;
pub mod score;
pub mod train;
