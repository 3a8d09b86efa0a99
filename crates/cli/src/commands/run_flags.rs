//! The flags `genseg train` and `genseg pretrain-generator` share: which data
//! and which regime, applied over the layered configuration.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use genseg_pipelines::config::DataSection;

/// Dataset, regime and seed flags (they win over config file and `--set`).
#[derive(Args, Debug)]
pub struct RunFlags {
    /// Dataset folder (folder pairs, GenSeg Images/Masks, or nnU-Net raw).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Training pairs drawn from the labelled pool.
    #[arg(long)]
    pub n_train: Option<usize>,
    /// Validation pairs drawn from the labelled pool (they choose best/).
    #[arg(long)]
    pub n_val: Option<usize>,
    /// The run's one seed.
    #[arg(long)]
    pub seed: Option<u64>,
}

impl RunFlags {
    /// Applies the given flags; a run without a dataset is an error.
    pub fn apply(&self, data: &mut DataSection, seed: &mut u64) -> Result<()> {
        if let Some(d) = &self.data {
            data.path = d.clone();
        }
        if let Some(n) = self.n_train {
            data.n_train = n;
        }
        if let Some(n) = self.n_val {
            data.n_val = n;
        }
        if let Some(s) = self.seed {
            *seed = s;
        }
        if data.path.as_os_str().is_empty() {
            bail!("no dataset: pass --data <dir> or set data.path");
        }
        Ok(())
    }
}
