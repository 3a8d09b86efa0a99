//! The run folder: everything a run writes, in one place.
//!
//! ```text
//! <run>/config.toml     the resolved configuration (all that is needed to repeat the run)
//! <run>/split.json      the ids of train / val / test
//! <run>/train.log       the log
//! <run>/metrics.jsonl   one JSON line per logged step
//! <run>/progress.png    loss and validation Dice curves
//! <run>/best/ <run>/last/  checkpoints (best validation Dice; most recent)
//! <run>/eval-<name>/    per_case.csv, summary.json and cases.png (image | truth |
//!                       prediction of the first cases) of evaluations
//! ```

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Which checkpoint of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Which {
    /// Best validation Dice.
    Best,
    /// Most recent.
    Last,
}

impl Which {
    /// The folder name.
    pub fn name(self) -> &'static str {
        match self {
            Which::Best => "best",
            Which::Last => "last",
        }
    }
}

/// Paths of a run folder.
#[derive(Clone, Debug)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// Creates a new run folder; refuses one that already holds a run.
    pub fn create(root: &Path) -> Result<Self> {
        let run = Self {
            root: root.to_path_buf(),
        };
        let leftovers: Vec<String> = [
            "best", "last", "best.tmp", "last.tmp", "best.old", "last.old",
        ]
        .iter()
        .filter(|name| root.join(name).exists())
        .map(|name| format!("{name}/"))
        .collect();
        if !run.config_path().exists() && !leftovers.is_empty() {
            bail!(
                "{} holds checkpoints ({}) but no config.toml: it is not a run this version can \
                 continue, and a new run would overwrite them; choose another --out",
                root.display(),
                leftovers.join(", ")
            );
        }
        if run.config_path().exists() {
            bail!(
                "{} already holds a run (config.toml exists): continue it with `genseg train --resume {}` or choose another --out",
                root.display(),
                root.display()
            );
        }
        std::fs::create_dir_all(root)
            .with_context(|| format!("creating run folder {}", root.display()))?;
        Ok(run)
    }

    /// Opens an existing run folder.
    pub fn open(root: &Path) -> Result<Self> {
        let run = Self {
            root: root.to_path_buf(),
        };
        if !run.config_path().is_file() {
            bail!("{} is not a run folder (no config.toml)", root.display());
        }
        Ok(run)
    }

    /// The folder itself.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// `config.toml`.
    pub fn config_path(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    /// `split.json`.
    pub fn split_path(&self) -> PathBuf {
        self.root.join("split.json")
    }
    /// `train.log`.
    pub fn log_path(&self) -> PathBuf {
        self.root.join("train.log")
    }
    /// `metrics.jsonl`.
    pub fn metrics_path(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }
    /// `progress.png`.
    pub fn progress_path(&self) -> PathBuf {
        self.root.join("progress.png")
    }
    /// A checkpoint folder.
    pub fn checkpoint(&self, which: Which) -> PathBuf {
        self.root.join(which.name())
    }

    /// Writes `ckpt` as the run's `which` checkpoint (atomically).
    pub fn save_checkpoint(
        &self,
        which: Which,
        ckpt: &genseg_nn::checkpoint::Checkpoint,
    ) -> Result<()> {
        let dir = self.checkpoint(which);
        ckpt.save(&dir)
            .with_context(|| format!("saving checkpoint {}", dir.display()))
    }

    /// Writes a config as TOML (atomically).
    pub fn write_config<T: Serialize>(&self, cfg: &T) -> Result<()> {
        let text = toml::to_string_pretty(cfg).context("serialising the run configuration")?;
        genseg_nn::checkpoint::write_atomic(&self.config_path(), text.as_bytes())
    }

    /// The run's split (fold 0 of `split.json`), checked against `ids`.
    pub fn split(&self, ids: &[String]) -> Result<genseg_data::split::Split> {
        let splits = genseg_data::split::read_split_file(&self.split_path())?;
        let split = genseg_data::split::select_fold(&splits, 0)?.clone();
        split.validate(ids)?;
        Ok(split)
    }

    /// The `which` checkpoint, or `None` when the run has not written one. A save that a
    /// crash interrupted is recovered first (a complete `<which>.tmp` or `<which>.old`), so
    /// nothing that reached the disk is lost.
    pub fn load_checkpoint(
        &self,
        which: Which,
    ) -> Result<Option<genseg_nn::checkpoint::Checkpoint>> {
        let dir = self.checkpoint(which);
        genseg_nn::checkpoint::recover(&dir)
            .with_context(|| format!("recovering checkpoint {}", dir.display()))?;
        if !dir.join(genseg_nn::checkpoint::STATE_FILE).is_file() {
            return Ok(None);
        }
        let ckpt = genseg_nn::checkpoint::Checkpoint::load(&dir)
            .with_context(|| format!("loading checkpoint {}", dir.display()))?;
        Ok(Some(ckpt))
    }

    /// The `last/` checkpoint (recovered as [`RunDir::load_checkpoint`] does), or `None`
    /// (with a warning) when the run has not written one yet.
    pub fn last_checkpoint(&self) -> Result<Option<genseg_nn::checkpoint::Checkpoint>> {
        let ckpt = self.load_checkpoint(Which::Last)?;
        if ckpt.is_none() {
            tracing::warn!(
                "{} has no last/ checkpoint yet: starting from iteration 0",
                self.root.display()
            );
        }
        Ok(ckpt)
    }

    /// Reads the config back.
    pub fn read_config<T: DeserializeOwned>(&self) -> Result<T> {
        let path = self.config_path();
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// An exclusive claim on a run folder while a process trains in it: the file `.lock`
/// holding the owner's PID, removed when the claim is dropped. A lock whose process is
/// gone (killed) is stale and taken over.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
    /// For a run being started: what to withdraw if it never gets its config.toml.
    new_run: Option<NewRun>,
}

/// A run folder being started by this process.
#[derive(Debug)]
struct NewRun {
    root: PathBuf,
    /// Whether this process made the folder (then an empty one is removed too).
    created_folder: bool,
}

impl NewRun {
    /// A start that failed before config.toml was written leaves nothing that looks like
    /// a run: its train.log and split.json go, and the folder when this process made it.
    fn withdraw_if_unstarted(&self) {
        if self.root.join("config.toml").exists() {
            return;
        }
        crate::logging::stop_logging_to_file();
        for name in ["train.log", "split.json"] {
            let _ = std::fs::remove_file(self.root.join(name));
        }
        if self.created_folder {
            // Only when empty: never removes anything this process did not write.
            let _ = std::fs::remove_dir(&self.root);
        }
    }
}

impl RunLock {
    /// Claims the folder of a run being started; `created_folder` says whether this
    /// process made it. Dropped before the run's config.toml exists (the start failed),
    /// the claim also removes what the start wrote.
    pub fn acquire_new(root: &Path, created_folder: bool) -> Result<Self> {
        let mut lock = Self::acquire(root)?;
        lock.new_run = Some(NewRun {
            root: root.to_path_buf(),
            created_folder,
        });
        Ok(lock)
    }

    /// Claims `root`; an error names the process that holds it.
    pub fn acquire(root: &Path) -> Result<Self> {
        let path = root.join(".lock");
        loop {
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut file) => {
                    writeln!(file, "{}", std::process::id())
                        .with_context(|| format!("writing {}", path.display()))?;
                    return Ok(Self {
                        path,
                        new_run: None,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let owner = std::fs::read_to_string(&path)
                        .ok()
                        .and_then(|s| s.trim().parse::<u32>().ok());
                    match owner {
                        Some(pid) if process_alive(pid) => bail!(
                            "{} is in use by process {pid} (see its .lock): wait for that run \
                             to finish or stop it first",
                            root.display()
                        ),
                        _ => {
                            tracing::warn!(
                                "{}: taking over a stale lock (its process is gone)",
                                root.display()
                            );
                            std::fs::remove_file(&path)
                                .with_context(|| format!("removing stale {}", path.display()))?;
                        }
                    }
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("creating {}", path.display()));
                }
            }
        }
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Nothing to do if it is already gone; a failure leaves a lock that is stale by PID.
        let _ = std::fs::remove_file(&self.path);
        if let Some(new_run) = &self.new_run {
            new_run.withdraw_if_unstarted();
        }
    }
}

/// Whether process `pid` exists (on Linux, by /proc; elsewhere a lock is never stale).
fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}

/// Appends one JSON object per line to `metrics.jsonl`, flushed each time so
/// a crash loses nothing already logged.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens for appending; with `keep_up_to = Some(i)`, first drops lines of
    /// iterations after `i` (they are redone after a resume) and a line cut by a crash.
    /// Kept lines keep their bytes: a resumed log reads exactly as it was written.
    pub fn open(path: &Path, keep_up_to: Option<u64>) -> Result<Self> {
        if let (Some(limit), true) = (keep_up_to, path.exists()) {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let text: String = text
                .lines()
                .filter(|line| {
                    serde_json::from_str::<serde_json::Value>(line).is_ok_and(|v| {
                        v.get("iteration")
                            .and_then(|i| i.as_u64())
                            .is_none_or(|i| i <= limit)
                    })
                })
                .map(|line| format!("{line}\n"))
                .collect();
            genseg_nn::checkpoint::write_atomic(path, text.as_bytes())?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends one record.
    pub fn append(&mut self, record: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{record}")
            .and_then(|_| self.file.flush())
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// All records of a metrics.jsonl file.
pub fn read_lines(path: &Path) -> Result<Vec<serde_json::Value>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        // A line cut by a crash mid-write is dropped, not fatal.
        match serde_json::from_str(&line) {
            Ok(v) => out.push(v),
            Err(e) => tracing::warn!(
                "{}:{}: skipping unreadable line ({e})",
                path.display(),
                n + 1
            ),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn create_refuses_an_existing_run() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let run = RunDir::create(dir.path())?;
        run.write_config(&json!({"seed": 1}))?;
        let err = RunDir::create(dir.path()).unwrap_err().to_string();
        assert!(err.contains("--resume"), "{err}");
        assert!(RunDir::open(dir.path()).is_ok());
        assert!(RunDir::open(&dir.path().join("nope")).is_err());
        // Checkpoints without a config are not overwritten either.
        let orphan = dir.path().join("orphan");
        std::fs::create_dir_all(orphan.join("best"))?;
        let err = RunDir::create(&orphan).unwrap_err().to_string();
        assert!(
            err.contains("best/") && err.contains("no config.toml"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn a_checkpoint_left_as_tmp_or_old_by_a_crash_is_recovered() -> Result<()> {
        use genseg_nn::checkpoint::Checkpoint;
        let dir = tempfile::tempdir()?;
        let run = RunDir::create(dir.path())?;
        run.write_config(&json!({"seed": 1}))?;
        assert!(run.last_checkpoint()?.is_none());
        let ckpt = Checkpoint {
            step: 30,
            weights: Default::default(),
            optimizers: Default::default(),
            rng: Default::default(),
            config_toml: String::new(),
            extra: json!({}),
        };
        run.save_checkpoint(Which::Last, &ckpt)?;
        for suffix in ["last.tmp", "last.old"] {
            std::fs::rename(run.checkpoint(Which::Last), dir.path().join(suffix))?;
            let back = run.last_checkpoint()?.expect("recovered");
            assert_eq!(back.step, 30, "from {suffix}");
            assert!(run.checkpoint(Which::Last).join("state.json").is_file());
        }
        Ok(())
    }

    #[test]
    fn a_run_folder_is_locked_while_in_use_and_stale_locks_are_taken_over() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let lock = RunLock::acquire(dir.path())?;
        let err = RunLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(&std::process::id().to_string()) && err.contains("in use"),
            "{err}"
        );
        drop(lock);
        assert!(!dir.path().join(".lock").exists());
        // A lock left by a process that is gone (PIDs this large are never assigned).
        std::fs::write(dir.path().join(".lock"), "4294967295\n")?;
        let _lock = RunLock::acquire(dir.path())?;
        Ok(())
    }

    #[test]
    fn a_start_that_fails_before_its_config_leaves_nothing_behind() -> Result<()> {
        let dir = tempfile::tempdir()?;
        // A folder this process made: removed with what the start wrote.
        let made = dir.path().join("made");
        std::fs::create_dir(&made)?;
        let lock = RunLock::acquire_new(&made, true)?;
        std::fs::write(made.join("train.log"), "started\n")?;
        std::fs::write(made.join("split.json"), "[]")?;
        drop(lock);
        assert!(!made.exists());
        // A folder the user made, holding a file of theirs: only the start's files go.
        let theirs = dir.path().join("theirs");
        std::fs::create_dir(&theirs)?;
        std::fs::write(theirs.join("notes.txt"), "mine")?;
        let lock = RunLock::acquire_new(&theirs, false)?;
        std::fs::write(theirs.join("train.log"), "started\n")?;
        drop(lock);
        let left: Vec<_> = std::fs::read_dir(&theirs)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()?;
        assert_eq!(left, vec![std::ffi::OsString::from("notes.txt")]);
        // Once config.toml exists the run has started: everything stays.
        let started = dir.path().join("started");
        std::fs::create_dir(&started)?;
        let lock = RunLock::acquire_new(&started, true)?;
        std::fs::write(started.join("train.log"), "started\n")?;
        std::fs::write(started.join("config.toml"), "")?;
        drop(lock);
        assert!(started.join("train.log").is_file());
        Ok(())
    }

    #[test]
    fn metrics_log_truncates_on_resume() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::open(&path, None)?;
        for i in [10, 20, 30] {
            log.append(&json!({"iteration": i}))?;
        }
        drop(log);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)?
            .write_all(b"{\"iterat")?;
        let mut log = MetricsLog::open(&path, Some(20))?;
        log.append(&json!({"iteration": 21}))?;
        let its: Vec<u64> = read_lines(&path)?
            .iter()
            .map(|v| v["iteration"].as_u64().unwrap())
            .collect();
        assert_eq!(its, vec![10, 20, 21]);
        drop(log);
        // Kept lines keep their bytes, whatever serde_json would print for them.
        let odd = "{\"iteration\": 5, \"val_dice\": 0.91200000000000003}\n";
        std::fs::write(&path, odd)?;
        MetricsLog::open(&path, Some(20))?;
        assert_eq!(std::fs::read_to_string(&path)?, odd);
        Ok(())
    }
}
