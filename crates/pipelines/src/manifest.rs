//! Experiment manifests: one fully resolved run per JSON line, run by `genseg run --manifest
//! <file> --index <i>` on a laptop or as one task of a cluster job array.
//!
//! A [`RunSpec`] names what it is (dataset, regime, method, backbone, seed: the labels the
//! aggregation groups by), its folder, the `genseg` commands that make it ([`Step`]s: a
//! generator pre-training, the training run, an out-of-domain evaluation) and where each
//! test set's `summary.json` will be. Each step is skipped when its `done` file exists and
//! resumed when its run folder was started, so running a line again finishes what an
//! interrupted attempt left and redoes nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// One run of an experiment: a line of a manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// `dataset/regime/backbone/method/s<seed>` (`/f<fold>` after it for folds > 0), unique
    /// within the manifest.
    pub id: String,
    /// Dataset name (the recipe's).
    pub dataset: String,
    /// Labelled-set regime, e.g. `7+2`.
    pub regime: String,
    /// Training pairs of the regime.
    pub n_train: usize,
    /// Validation pairs of the regime.
    pub n_val: usize,
    /// Method as the recipe names it (`baseline`, `strong`, `strong-genseg`, ...).
    pub method: String,
    /// Segmentation backbone (`model.kind`).
    pub backbone: String,
    /// Seed of the split and of every random draw.
    pub seed: u64,
    /// Validation fold of the seed's labelled pool (`data.fold`; 0 = the standard split,
    /// the one the test tables report; the others only add cross-validated validation Dice).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub fold: usize,
    /// The run's folder (the segmentation run; a generator pre-training lives inside it).
    pub dir: PathBuf,
    /// The commands that make the run, in order.
    pub steps: Vec<Step>,
    /// Test set name -> the `summary.json` its evaluation writes (`test` for the run's own
    /// test split).
    pub scores: BTreeMap<String, PathBuf>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// One `genseg` command of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// The arguments after `genseg`, e.g. `["train", "--method", "baseline", ...]`.
    pub args: Vec<String>,
    /// A run folder this step creates: once it holds `config.toml`, the step is
    /// `genseg <args[0]> --resume <resume>` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<PathBuf>,
    /// The step is finished when this file exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done: Option<PathBuf>,
}

/// What to do for a step now.
#[derive(Debug, PartialEq)]
pub enum Action {
    /// Its `done` file exists.
    Skip,
    /// Run these `genseg` arguments (the step's, or a resume of its run folder).
    Run(Vec<String>),
}

impl Step {
    /// Skip it, resume it or start it, from what is on disk.
    pub fn action(&self) -> Action {
        if self.done.as_deref().is_some_and(Path::exists) {
            return Action::Skip;
        }
        match (&self.resume, self.args.first()) {
            (Some(run), Some(command)) if run.join("config.toml").exists() => Action::Run(vec![
                command.clone(),
                "--resume".into(),
                run.display().to_string(),
            ]),
            _ => Action::Run(self.args.clone()),
        }
    }
}

/// Writes `runs` as a manifest, one JSON line each (atomically: a reader never sees half).
pub fn write(path: &Path, runs: &[RunSpec]) -> Result<()> {
    let mut text = String::new();
    for run in runs {
        text += &serde_json::to_string(run)?;
        text.push('\n');
    }
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Every run of the manifest at `path`.
pub fn read(path: &Path) -> Result<Vec<RunSpec>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading manifest {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).with_context(|| {
                format!(
                    "manifest {} line {}: not a run of this genseg version",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
}

/// Run `index` (0-based, as a Slurm array task id) of the manifest at `path`.
pub fn read_index(path: &Path, index: usize) -> Result<RunSpec> {
    let mut runs = read(path)?;
    anyhow::ensure!(
        index < runs.len(),
        "manifest {} has {} runs (indices 0..={}), no index {index}",
        path.display(),
        runs.len(),
        runs.len().saturating_sub(1)
    );
    Ok(runs.swap_remove(index))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path) -> RunSpec {
        RunSpec {
            id: "montgomery/7+2/unet/strong/s0".into(),
            dataset: "montgomery".into(),
            regime: "7+2".into(),
            n_train: 7,
            n_val: 2,
            method: "strong".into(),
            backbone: "unet".into(),
            seed: 0,
            fold: 0,
            dir: dir.to_path_buf(),
            steps: vec![Step {
                args: vec!["train".into(), "--out".into(), dir.display().to_string()],
                resume: Some(dir.to_path_buf()),
                done: Some(dir.join("eval-test/summary.json")),
            }],
            scores: BTreeMap::from([("test".into(), dir.join("eval-test/summary.json"))]),
        }
    }

    #[test]
    fn a_step_starts_then_resumes_then_is_skipped() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let run = tmp.path().join("run");
        let step = &spec(&run).steps[0];
        assert_eq!(step.action(), Action::Run(step.args.clone()));
        std::fs::create_dir_all(run.join("eval-test"))?;
        std::fs::write(run.join("config.toml"), "")?;
        assert_eq!(
            step.action(),
            Action::Run(vec![
                "train".into(),
                "--resume".into(),
                run.display().to_string()
            ])
        );
        std::fs::write(run.join("eval-test/summary.json"), "{}")?;
        assert_eq!(step.action(), Action::Skip);
        Ok(())
    }

    #[test]
    fn manifests_round_trip_and_name_a_bad_index_or_line() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let path = tmp.path().join("runs.jsonl");
        let runs = vec![spec(&tmp.path().join("a")), spec(&tmp.path().join("b"))];
        write(&path, &runs)?;
        assert_eq!(read(&path)?, runs);
        assert_eq!(read_index(&path, 1)?, runs[1]);
        let err = read_index(&path, 2).unwrap_err().to_string();
        assert!(
            err.contains("has 2 runs (indices 0..=1), no index 2"),
            "{err}"
        );
        std::fs::write(&path, "{\"id\": 3}\n")?;
        let err = format!("{:#}", read(&path).unwrap_err());
        assert!(err.contains("runs.jsonl line 1"), "{err}");
        Ok(())
    }
}
