//! Crash-safe checkpoints and the file primitives under them.
//!
//! A [`Checkpoint`] is everything needed to resume training exactly: the step, all
//! weights and buffers, each optimizer's state, each random generator's position, the
//! run's configuration and free-form extra state. On disk it is a directory:
//!
//! ```text
//! <dir>/weights.safetensors      parameters and buffers
//! <dir>/optim-<name>.safetensors one per optimizer (kind/step/lr in the metadata)
//! <dir>/config.toml              the configuration, verbatim
//! <dir>/state.json               step, rng states, extra; written last
//! ```
//!
//! [`Checkpoint::save`] never modifies `<dir>` in place. It writes a complete sibling
//! `<dir>.tmp` (every file fsynced, `state.json` last so its presence marks completeness),
//! moves the old `<dir>` aside to `<dir>.old`, renames `<dir>.tmp` to `<dir>` and only then
//! deletes `<dir>.old`. A crash at any point therefore leaves a complete checkpoint under
//! `<dir>`, `<dir>.old` or `<dir>.tmp`; the next save or load recovers it (see
//! [`recover`]). One directory must not be saved by two processes at once.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, bail};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::optim::OptimizerState;
use crate::rng::RngState;

/// File holding parameters and buffers inside a checkpoint directory.
pub const WEIGHTS_FILE: &str = "weights.safetensors";
/// File holding step, rng states and extra state; written last.
pub const STATE_FILE: &str = "state.json";
/// File holding the run configuration.
pub const CONFIG_FILE: &str = "config.toml";
const FORMAT_VERSION: u32 = 1;

/// Everything needed to resume a training run exactly.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The global training step the checkpoint was taken after.
    pub step: u64,
    /// Parameters and buffers by name (as from `ParamStore::named_tensors`).
    pub weights: BTreeMap<String, Tensor>,
    /// Optimizer states by name (e.g. `segmenter`, `generator`, `arch`).
    pub optimizers: BTreeMap<String, OptimizerState>,
    /// Random generator positions by name.
    pub rng: BTreeMap<String, RngState>,
    /// The run's configuration as TOML text.
    pub config_toml: String,
    /// Any further state (epoch, best score, schedules...).
    pub extra: serde_json::Value,
}

/// Checks that every value of `weights` is finite; the error counts the values that are
/// not and names the first tensor holding one.
pub fn check_finite(weights: &BTreeMap<String, Tensor>) -> anyhow::Result<()> {
    let (mut bad, mut total, mut first) = (0usize, 0usize, None);
    for (name, t) in weights {
        let values = t
            .flatten_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_vec1::<f64>()?;
        let n = values.iter().filter(|v| !v.is_finite()).count();
        if n > 0 && first.is_none() {
            first = Some(name.as_str());
        }
        bad += n;
        total += values.len();
    }
    match first {
        None => Ok(()),
        Some(name) => bail!("{bad} of {total} weights are not finite (first in {name})"),
    }
}

/// The tensors of `weights` under `prefix.`: one network of a checkpoint that holds several
/// (each network's store is built under its own prefix, e.g. `netG`, `netD`).
pub fn with_prefix(weights: &BTreeMap<String, Tensor>, prefix: &str) -> BTreeMap<String, Tensor> {
    let dotted = format!("{prefix}.");
    weights
        .iter()
        .filter(|(k, _)| k.starts_with(&dotted))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The tensors of `weights` under none of `prefixes` (the rest of a checkpoint once the
/// networks stored under those prefixes are taken out).
pub fn without_prefixes(
    weights: &BTreeMap<String, Tensor>,
    prefixes: &[&str],
) -> BTreeMap<String, Tensor> {
    let dotted: Vec<String> = prefixes.iter().map(|p| format!("{p}.")).collect();
    weights
        .iter()
        .filter(|(k, _)| !dotted.iter().any(|p| k.starts_with(p.as_str())))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[derive(Serialize, Deserialize)]
struct StateJson {
    format_version: u32,
    step: u64,
    optimizers: Vec<String>,
    rng: BTreeMap<String, RngState>,
    extra: serde_json::Value,
    /// CRC-32 of every file of the checkpoint but this one, by file name (absent in
    /// checkpoints written before checksums existed: they are not verified).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    checksums: BTreeMap<String, u32>,
}

/// The CRC-32 of the file at `path`.
fn file_crc(path: &Path) -> anyhow::Result<u32> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(crc32fast::hash(&bytes))
}

fn optim_file(name: &str) -> String {
    format!("optim-{name}.safetensors")
}

// Optimizer names become file names: keep them portable and unambiguous.
fn check_optimizer_name(name: &str) -> anyhow::Result<()> {
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !valid {
        bail!("optimizer name {name:?} must be non-empty ASCII letters, digits, '_' or '-'");
    }
    Ok(())
}

impl Checkpoint {
    /// Loads the optimizer state saved under `name` into `opt`; a missing entry or a state
    /// that does not fit `opt` is an error naming the optimizer.
    pub fn restore_optimizer(
        &self,
        name: &str,
        opt: &mut dyn crate::optim::Optimizer,
    ) -> anyhow::Result<()> {
        let state = self
            .optimizers
            .get(name)
            .with_context(|| format!("the checkpoint has no {name} optimizer state"))?;
        opt.load_state(state)
            .with_context(|| format!("restoring the {name} optimizer"))
    }

    /// Writes the checkpoint to `dir` atomically (see the module docs), replacing any
    /// checkpoint already there.
    ///
    /// Weights that are not all finite (a diverged run) are refused, so the checkpoint
    /// already at `dir` — the last good state — stays.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        for name in self.optimizers.keys() {
            check_optimizer_name(name)?;
        }
        check_finite(&self.weights).with_context(|| {
            format!(
                "step {}: training diverged, so it is not saved ({} keeps the last good state)",
                self.step,
                dir.display()
            )
        })?;
        let paths = SwapPaths::new(dir)?;
        recover(dir)?;
        refuse_non_checkpoint(dir)?;
        if paths.tmp.exists() {
            // An interrupted save that never reached the swap: incomplete or superseded.
            fs::remove_dir_all(&paths.tmp)
                .with_context(|| format!("removing stale {}", paths.tmp.display()))?;
        }
        fs::create_dir_all(&paths.tmp)
            .with_context(|| format!("creating {}", paths.tmp.display()))?;
        self.write_files(&paths.tmp)?;
        sync_dir(&paths.tmp)?;

        if dir.exists() {
            fs::rename(dir, &paths.old).with_context(|| {
                format!("moving {} aside to {}", dir.display(), paths.old.display())
            })?;
            sync_dir(&paths.parent)?;
        }
        fs::rename(&paths.tmp, dir)
            .with_context(|| format!("renaming {} to {}", paths.tmp.display(), dir.display()))?;
        sync_dir(&paths.parent)?;
        if paths.old.exists() {
            fs::remove_dir_all(&paths.old)
                .with_context(|| format!("removing {}", paths.old.display()))?;
        }
        Ok(())
    }

    fn write_files(&self, dir: &Path) -> anyhow::Result<()> {
        write_safetensors(&dir.join(WEIGHTS_FILE), &self.weights, None)?;
        for (name, state) in &self.optimizers {
            state.save(dir.join(optim_file(name)))?;
        }
        write_atomic(&dir.join(CONFIG_FILE), self.config_toml.as_bytes())?;
        let mut files = vec![WEIGHTS_FILE.to_string(), CONFIG_FILE.to_string()];
        files.extend(self.optimizers.keys().map(|n| optim_file(n)));
        let checksums = files
            .into_iter()
            .map(|f| Ok((f.clone(), file_crc(&dir.join(&f))?)))
            .collect::<anyhow::Result<_>>()?;
        let state = StateJson {
            format_version: FORMAT_VERSION,
            step: self.step,
            optimizers: self.optimizers.keys().cloned().collect(),
            rng: self.rng.clone(),
            extra: self.extra.clone(),
            checksums,
        };
        let json = serde_json::to_vec_pretty(&state).context("serialising state.json")?;
        // Last: its presence marks the directory as complete.
        write_atomic(&dir.join(STATE_FILE), &json)
    }

    /// Reads a checkpoint written by [`Checkpoint::save`]; tensors are loaded on the CPU
    /// (`ParamStore::load_named_tensors` and `Optimizer::load_state` move them to their
    /// vars' device). An interrupted save is recovered first.
    pub fn load(dir: &Path) -> anyhow::Result<Checkpoint> {
        recover(dir)?;
        let state_path = dir.join(STATE_FILE);
        let state_bytes = fs::read(&state_path)
            .with_context(|| format!("reading checkpoint file {}", state_path.display()))?;
        let state: StateJson = serde_json::from_slice(&state_bytes)
            .with_context(|| format!("parsing checkpoint file {}", state_path.display()))?;
        if state.format_version != FORMAT_VERSION {
            bail!(
                "{}: checkpoint format version {} is not supported (expected {FORMAT_VERSION})",
                state_path.display(),
                state.format_version
            );
        }
        for (file, expected) in &state.checksums {
            let path = dir.join(file);
            let actual = file_crc(&path)?;
            if actual != *expected {
                bail!(
                    "{} is damaged: its checksum is {actual:08x}, state.json recorded \
                     {expected:08x} (the file changed after the checkpoint was written)",
                    path.display()
                );
            }
        }
        let (weights, _) = read_safetensors(&dir.join(WEIGHTS_FILE), &Device::Cpu)?;
        check_finite(&weights).with_context(|| {
            format!("checkpoint {} is damaged", dir.join(WEIGHTS_FILE).display())
        })?;
        let mut optimizers = BTreeMap::new();
        for name in state.optimizers {
            check_optimizer_name(&name).with_context(|| format!("in {}", state_path.display()))?;
            let optim = OptimizerState::load(dir.join(optim_file(&name)))?;
            optimizers.insert(name, optim);
        }
        let config_path = dir.join(CONFIG_FILE);
        let config_toml = fs::read_to_string(&config_path)
            .with_context(|| format!("reading checkpoint file {}", config_path.display()))?;
        Ok(Checkpoint {
            step: state.step,
            weights,
            optimizers,
            rng: state.rng,
            config_toml,
            extra: state.extra,
        })
    }
}

// Saving replaces `dir` wholesale; never let that delete a directory of other files
// that merely happens to be at the checkpoint path.
fn refuse_non_checkpoint(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() || dir.join(STATE_FILE).exists() {
        return Ok(());
    }
    let non_empty = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .next()
        .is_some();
    if non_empty || !dir.is_dir() {
        bail!(
            "refusing to replace {}: it exists but is not a checkpoint (no {STATE_FILE})",
            dir.display()
        );
    }
    Ok(())
}

struct SwapPaths {
    parent: PathBuf,
    tmp: PathBuf,
    old: PathBuf,
}

impl SwapPaths {
    fn new(dir: &Path) -> anyhow::Result<Self> {
        let name = dir
            .file_name()
            .with_context(|| format!("checkpoint path {} has no final component", dir.display()))?;
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let sibling = |suffix: &str| {
            let mut n = name.to_os_string();
            n.push(suffix);
            parent.join(n)
        };
        Ok(Self {
            tmp: sibling(".tmp"),
            old: sibling(".old"),
            parent,
        })
    }
}

/// Repairs what an interrupted [`Checkpoint::save`] left behind at `dir`.
///
/// - `<dir>` present: it is complete (only ever created by a rename of a finished
///   directory); a leftover `<dir>.old` is deleted. A leftover `<dir>.tmp` is left for the
///   next save to delete, so a read-only load never destroys anything it need not.
/// - `<dir>` missing (crash between the two renames): a complete `<dir>.tmp` (it has
///   `state.json`) is the newest checkpoint and is renamed into place; otherwise
///   `<dir>.old` is restored.
pub fn recover(dir: &Path) -> anyhow::Result<()> {
    let paths = SwapPaths::new(dir)?;
    if !dir.exists() {
        if paths.tmp.join(STATE_FILE).exists() {
            tracing::warn!(dir = %dir.display(), "completing an interrupted checkpoint save");
            fs::rename(&paths.tmp, dir).with_context(|| {
                format!("recovering {} from {}", dir.display(), paths.tmp.display())
            })?;
        } else if paths.old.exists() {
            tracing::warn!(dir = %dir.display(), "restoring the previous checkpoint");
            fs::rename(&paths.old, dir).with_context(|| {
                format!("recovering {} from {}", dir.display(), paths.old.display())
            })?;
        } else {
            return Ok(());
        }
        sync_dir(&paths.parent)?;
    }
    if paths.old.exists() {
        fs::remove_dir_all(&paths.old)
            .with_context(|| format!("removing stale {}", paths.old.display()))?;
    }
    Ok(())
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` atomically: a temp file in the same directory is written,
/// fsynced and renamed over `path`, so readers see the old or the new content, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // Unique per process and call, so concurrent writers never share a temp file.
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(
        ".{}.{}.tmp",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = parent.join(tmp_name);
    let result = (|| {
        let mut file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        file.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        file.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    })();
    if result.is_err() {
        // Best effort: the original error is the one worth reporting.
        let _ = fs::remove_file(&tmp);
    }
    result?;
    sync_dir(&parent)
}

/// Makes renames and creations inside `dir` durable. Only Unix can open directories
/// for syncing; elsewhere renames are as durable as the platform makes them.
fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Serialises `tensors` (with optional string `metadata`) to a safetensors file, atomically.
pub fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: Option<HashMap<String, String>>,
) -> anyhow::Result<()> {
    // Tensor's `View::data` would panic on a conversion failure, so convert up front.
    let mut host = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let t = tensor
            .to_device(&Device::Cpu)
            .and_then(|t| t.contiguous())
            .with_context(|| format!("preparing tensor {name} for {}", path.display()))?;
        host.push((name.as_str(), t));
    }
    let bytes = safetensors::serialize(host.iter().map(|(n, t)| (*n, t)), metadata)
        .with_context(|| format!("serialising {}", path.display()))?;
    write_atomic(path, &sorted_header(bytes)?)
}

/// The same safetensors bytes with the JSON header's keys sorted: safetensors writes its
/// metadata `HashMap` in a random order, so two saves of one state would differ. Sorting
/// keeps every key and value (the data offsets are explicit), and the header's length.
fn sorted_header(mut bytes: Vec<u8>) -> anyhow::Result<Vec<u8>> {
    let n = u64::from_le_bytes(bytes[..8].try_into()?) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n])?;
    let value: serde_json::Value = serde_json::from_str(header)?;
    let sorted = serde_json::to_string(&value)?;
    anyhow::ensure!(
        sorted.len() <= n,
        "re-serialised safetensors header grew from {n} to {} bytes",
        sorted.len()
    );
    // Padded with spaces by hand: a format width (`{:<n$}`) panics above 65535, and a
    // large model's optimizer state has a longer header than that.
    let mut padded = sorted.into_bytes();
    padded.resize(n, b' ');
    bytes[8..8 + n].copy_from_slice(&padded);
    Ok(bytes)
}

/// Reads every tensor of a safetensors file onto `device`, with the file's metadata.
pub fn read_safetensors(
    path: &Path,
    device: &Device,
) -> anyhow::Result<(BTreeMap<String, Tensor>, HashMap<String, String>)> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
    let mut tensors = BTreeMap::new();
    for (name, view) in file.tensors() {
        let dtype = candle_core::DType::try_from(view.dtype())
            .with_context(|| format!("tensor {name} in {}", path.display()))?;
        let tensor = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), device)
            .with_context(|| format!("loading tensor {name} from {}", path.display()))?;
        tensors.insert(name, tensor);
    }
    Ok((tensors, header.metadata().clone().unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SeededRng;
    use candle_core::DType;
    use rand::RngCore;

    fn sample(step: u64, fill: f64) -> Checkpoint {
        let weights = BTreeMap::from([
            (
                "seg.weight".to_string(),
                Tensor::full(fill, (2, 3), &Device::Cpu).unwrap(),
            ),
            (
                "seg.bn.running_var".to_string(),
                Tensor::new(&[1.5f32, 2.5], &Device::Cpu).unwrap(),
            ),
        ]);
        let optim = OptimizerState {
            kind: "adam".into(),
            step,
            lr: 2e-4,
            tensors: BTreeMap::from([(
                "seg.weight.exp_avg".to_string(),
                Tensor::full(fill / 10.0, (2, 3), &Device::Cpu).unwrap(),
            )]),
        };
        let mut rng = SeededRng::new(step);
        rng.next_u32();
        Checkpoint {
            step,
            weights,
            optimizers: BTreeMap::from([("segmenter".to_string(), optim)]),
            rng: BTreeMap::from([("data".to_string(), rng.state())]),
            config_toml: format!("seed = {step}\n"),
            extra: serde_json::json!({ "best_dice": 0.5, "epoch": step }),
        }
    }

    fn weight_value(ckpt: &Checkpoint) -> f64 {
        ckpt.weights["seg.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()[0]
    }

    fn entries(parent: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(parent)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn round_trip_preserves_everything() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ckpt");
        let original = sample(7, 0.25);
        original.save(&dir).unwrap();
        assert_eq!(
            entries(&dir),
            [
                CONFIG_FILE,
                "optim-segmenter.safetensors",
                STATE_FILE,
                WEIGHTS_FILE
            ]
        );
        let loaded = Checkpoint::load(&dir).unwrap();
        assert_eq!(loaded.step, 7);
        assert_eq!(loaded.config_toml, original.config_toml);
        assert_eq!(loaded.extra, original.extra);
        assert_eq!(loaded.rng, original.rng);
        assert_eq!(loaded.weights.len(), 2);
        assert_eq!(loaded.weights["seg.bn.running_var"].dtype(), DType::F32);
        assert_eq!(
            loaded.weights["seg.bn.running_var"]
                .to_vec1::<f32>()
                .unwrap(),
            [1.5, 2.5]
        );
        assert_eq!(weight_value(&loaded), 0.25);
        let optim = &loaded.optimizers["segmenter"];
        assert_eq!(
            (optim.kind.as_str(), optim.step, optim.lr),
            ("adam", 7, 2e-4)
        );
        assert_eq!(optim.tensors.len(), 1);
        // Nothing but the checkpoint itself is left beside it.
        assert_eq!(entries(root.path()), ["ckpt"]);
    }

    #[test]
    fn non_finite_weights_are_neither_saved_nor_loaded() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("last");
        sample(3, 0.5).save(&dir).unwrap();
        let mut diverged = sample(4, f64::NAN);
        let err = format!("{:#}", diverged.save(&dir).unwrap_err());
        assert!(
            err.contains("diverged") && err.contains("not finite") && err.contains("seg.weight"),
            "{err}"
        );
        // The last good checkpoint stays.
        assert_eq!(Checkpoint::load(&dir).unwrap().step, 3);
        // A file whose values turned non-finite (damaged on disk) is refused on load.
        diverged.weights.insert(
            "seg.weight".into(),
            Tensor::full(f64::INFINITY, (2, 3), &Device::Cpu).unwrap(),
        );
        let (host, _) = read_safetensors(&dir.join(WEIGHTS_FILE), &Device::Cpu).unwrap();
        let mut damaged = host.clone();
        damaged.insert("seg.weight".into(), diverged.weights["seg.weight"].clone());
        write_safetensors(&dir.join(WEIGHTS_FILE), &damaged, None).unwrap();
        let err = format!("{:#}", Checkpoint::load(&dir).unwrap_err());
        assert!(err.contains("damaged") && err.contains("checksum"), "{err}");
    }

    #[test]
    fn a_changed_byte_in_any_file_is_caught_by_its_checksum() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("best");
        sample(5, 0.75).save(&dir).unwrap();
        for file in [WEIGHTS_FILE, "optim-segmenter.safetensors", CONFIG_FILE] {
            let path = dir.join(file);
            let good = fs::read(&path).unwrap();
            let mut bad = good.clone();
            let last = bad.len() - 1;
            bad[last] ^= 0x01;
            fs::write(&path, &bad).unwrap();
            let err = format!("{:#}", Checkpoint::load(&dir).unwrap_err());
            assert!(err.contains(file) && err.contains("checksum"), "{err}");
            fs::write(&path, &good).unwrap();
        }
        assert_eq!(Checkpoint::load(&dir).unwrap().step, 5);
    }

    #[test]
    fn saving_again_replaces_the_whole_directory() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ckpt");
        sample(1, 1.0).save(&dir).unwrap();
        let mut second = sample(2, 2.0);
        second.optimizers.clear();
        second.save(&dir).unwrap();
        let loaded = Checkpoint::load(&dir).unwrap();
        assert_eq!((loaded.step, weight_value(&loaded)), (2, 2.0));
        assert!(loaded.optimizers.is_empty());
        assert!(
            !dir.join("optim-segmenter.safetensors").exists(),
            "stale file survived"
        );
        assert_eq!(entries(root.path()), ["ckpt"]);
    }

    #[test]
    fn crash_while_writing_temp_dir_keeps_old_checkpoint() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ckpt");
        let tmp = root.path().join("ckpt.tmp");
        sample(1, 1.0).save(&dir).unwrap();
        // A save that died before writing state.json: partial files only.
        fs::create_dir(&tmp).unwrap();
        fs::write(tmp.join(WEIGHTS_FILE), b"half a fi").unwrap();

        let loaded = Checkpoint::load(&dir).unwrap();
        assert_eq!(loaded.step, 1);
        sample(2, 2.0).save(&dir).unwrap();
        assert_eq!(Checkpoint::load(&dir).unwrap().step, 2);
        assert_eq!(entries(root.path()), ["ckpt"]);
    }

    #[test]
    fn crash_between_renames_recovers_newest_complete_checkpoint() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ckpt");
        let tmp = root.path().join("ckpt.tmp");
        let old = root.path().join("ckpt.old");
        // Old moved aside, new complete but not yet renamed into place.
        sample(1, 1.0).save(&old).unwrap();
        sample(2, 2.0).save(&tmp).unwrap();
        let loaded = Checkpoint::load(&dir).unwrap();
        assert_eq!((loaded.step, weight_value(&loaded)), (2, 2.0));
        assert_eq!(entries(root.path()), ["ckpt"]);
    }

    #[test]
    fn crash_after_moving_old_aside_with_incomplete_new_restores_old() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ckpt");
        let tmp = root.path().join("ckpt.tmp");
        let old = root.path().join("ckpt.old");
        sample(1, 1.0).save(&old).unwrap();
        sample(2, 2.0).save(&tmp).unwrap();
        fs::remove_file(tmp.join(STATE_FILE)).unwrap();
        assert_eq!(Checkpoint::load(&dir).unwrap().step, 1);
        // The incomplete new one is removed by the next save, not by the load.
        assert_eq!(entries(root.path()), ["ckpt", "ckpt.tmp"]);
        sample(3, 3.0).save(&dir).unwrap();
        assert_eq!(entries(root.path()), ["ckpt"]);
    }

    #[test]
    fn crash_before_deleting_old_is_cleaned_up() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ckpt");
        sample(1, 1.0).save(&root.path().join("ckpt.old")).unwrap();
        sample(2, 2.0).save(&dir).unwrap();
        assert_eq!(entries(root.path()), ["ckpt"]);
        sample(1, 1.0).save(&root.path().join("ckpt.old")).unwrap();
        assert_eq!(Checkpoint::load(&dir).unwrap().step, 2);
        assert_eq!(entries(root.path()), ["ckpt"]);
    }

    #[test]
    fn corrupt_or_missing_files_are_named() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ckpt");
        sample(1, 1.0).save(&dir).unwrap();

        let weights = dir.join(WEIGHTS_FILE);
        let bytes = fs::read(&weights).unwrap();
        fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
        let err = format!("{:#}", Checkpoint::load(&dir).unwrap_err());
        assert!(err.contains(WEIGHTS_FILE), "{err}");

        sample(1, 1.0).save(&dir).unwrap();
        fs::remove_file(dir.join("optim-segmenter.safetensors")).unwrap();
        let err = format!("{:#}", Checkpoint::load(&dir).unwrap_err());
        assert!(err.contains("optim-segmenter.safetensors"), "{err}");

        sample(1, 1.0).save(&dir).unwrap();
        fs::write(dir.join(STATE_FILE), b"{ not json").unwrap();
        let err = format!("{:#}", Checkpoint::load(&dir).unwrap_err());
        assert!(err.contains(STATE_FILE), "{err}");

        let err = format!(
            "{:#}",
            Checkpoint::load(&root.path().join("absent")).unwrap_err()
        );
        assert!(err.contains("absent") && err.contains(STATE_FILE), "{err}");
    }

    #[test]
    fn never_replaces_a_directory_that_is_not_a_checkpoint() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("run");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("train.log"), b"precious").unwrap();
        let err = sample(1, 1.0).save(&dir).unwrap_err().to_string();
        assert!(err.contains("not a checkpoint"), "{err}");
        assert_eq!(fs::read(dir.join("train.log")).unwrap(), b"precious");

        let empty = root.path().join("empty");
        fs::create_dir(&empty).unwrap();
        sample(1, 1.0).save(&empty).unwrap();
        assert_eq!(Checkpoint::load(&empty).unwrap().step, 1);
    }

    #[test]
    fn optimizer_names_must_be_file_safe() {
        let root = tempfile::tempdir().unwrap();
        let mut ckpt = sample(1, 1.0);
        let state = ckpt.optimizers.remove("segmenter").unwrap();
        ckpt.optimizers.insert("../escape".into(), state);
        let err = ckpt
            .save(&root.path().join("ckpt"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("../escape"), "{err}");
        assert!(
            entries(root.path()).is_empty(),
            "nothing written on a rejected save"
        );
    }

    #[test]
    fn safetensors_files_are_byte_identical_across_saves_with_sorted_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let tensors = BTreeMap::from([
            (
                "b".to_string(),
                Tensor::ones((2, 2), DType::F32, &Device::Cpu).unwrap(),
            ),
            (
                "a".to_string(),
                Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
            ),
        ]);
        let metadata = || -> HashMap<String, String> {
            (0..12)
                .map(|i| (format!("key{i:02}"), i.to_string()))
                .collect()
        };
        let first = dir.path().join("first.safetensors");
        write_safetensors(&first, &tensors, Some(metadata())).unwrap();
        let expected = fs::read(&first).unwrap();
        for k in 0..8 {
            let path = dir.path().join(format!("{k}.safetensors"));
            write_safetensors(&path, &tensors, Some(metadata())).unwrap();
            assert_eq!(fs::read(&path).unwrap(), expected, "save {k} differs");
        }
        let header = String::from_utf8_lossy(&expected[8..]).to_string();
        let keys: Vec<usize> = (0..12)
            .map(|i| header.find(&format!("\"key{i:02}\"")).unwrap())
            .collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "{header}");
        let (read, meta) = read_safetensors(&first, &Device::Cpu).unwrap();
        assert_eq!(meta, metadata());
        assert_eq!(read["b"].to_vec2::<f32>().unwrap(), vec![vec![1.0; 2]; 2]);
    }

    /// A SwinUnet's Adam state has a header longer than 65535 bytes, the largest width a
    /// format string takes (it panicked there).
    #[test]
    fn a_header_longer_than_a_format_width_saves_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let tensors: BTreeMap<String, Tensor> = (0..1500)
            .map(|i| {
                let name = format!(
                    "decoder.layers_up.{i}.blocks.0.attn.relative_position_bias_table.exp_avg_sq"
                );
                (name, Tensor::full(i as f32, 2, &Device::Cpu).unwrap())
            })
            .collect();
        let path = dir.path().join("big.safetensors");
        write_safetensors(&path, &tensors, None).unwrap();
        let bytes = fs::read(&path).unwrap();
        assert!(u64::from_le_bytes(bytes[..8].try_into().unwrap()) > 65_535);
        let (read, _) = read_safetensors(&path, &Device::Cpu).unwrap();
        assert_eq!(read.len(), 1500);
        let key = "decoder.layers_up.1499.blocks.0.attn.relative_position_bias_table.exp_avg_sq";
        assert_eq!(read[key].to_vec1::<f32>().unwrap(), vec![1499.0; 2]);
    }

    #[test]
    fn write_atomic_replaces_content_and_leaves_no_temp_files() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("metrics.json");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        assert_eq!(entries(root.path()), ["metrics.json"]);
        let err = format!(
            "{:#}",
            write_atomic(&root.path().join("no/such/dir/x"), b"").unwrap_err()
        );
        assert!(err.contains("no/such/dir"), "{err}");
    }
}
