//! End-to-end tests: they run the real `genseg` binary on small data.

mod bench_cli;
mod data_cli;
mod fuzz_loaders;
mod generator_cli;
mod manifest_cli;
mod support;
mod train_cli;
