//! [`ParamStore`]: the deterministic home of every network parameter and buffer.
//!
//! Models are written against candle's [`VarBuilder`]; [`ParamStore::var_builder`] returns
//! one backed by the store. The first request for a name creates a [`Var`] by sampling the
//! layer's [`candle_nn::Init`] hint (see [`crate::init::sample_init`]); later requests return
//! the same `Var`, so a model built twice shares its parameters.
//!
//! Determinism: the values of a tensor depend only on the store's seed, the tensor's
//! full name, its shape and its init hint. Each name draws from its own ChaCha stream (the
//! stream number is a fixed hash of the name), so building networks in a different order,
//! or adding a layer, leaves every other tensor's initial values unchanged. Names are kept
//! sorted (a `BTreeMap`, unlike `VarMap`'s `HashMap`), so parameter lists, optimizer
//! state and saved files always come out in the same order.
//!
//! Buffers (BatchNorm's `running_mean` / `running_var`, PyTorch's `num_batches_tracked`)
//! live in the store so they are saved and loaded with the weights, but
//! [`ParamStore::trainable_vars`] leaves them out so no optimizer steps them.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use anyhow::Context;
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

use crate::checkpoint::{read_safetensors, write_safetensors};
use crate::init::sample_init;
use crate::rng::SeededRng;

/// Last path segments that mark a tensor as a buffer (state, not a trainable parameter).
pub const BUFFER_NAMES: [&str; 3] = ["running_mean", "running_var", "num_batches_tracked"];

/// Whether `name` is a buffer: its last `.`-separated segment is one of [`BUFFER_NAMES`].
pub fn is_buffer(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    BUFFER_NAMES.contains(&last)
}

/// A seeded, sorted store of named [`Var`]s that backs candle `VarBuilder`s.
///
/// Cloning is cheap and yields a handle to the same store.
#[derive(Clone)]
pub struct ParamStore {
    inner: Arc<Inner>,
}

struct Inner {
    seed: u64,
    dtype: DType,
    device: Device,
    vars: Mutex<BTreeMap<String, Var>>,
}

impl std::fmt::Debug for ParamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParamStore")
            .field("seed", &self.inner.seed)
            .field("dtype", &self.inner.dtype)
            .field("device", &self.inner.device.location())
            .field("tensors", &self.len())
            .finish()
    }
}

impl ParamStore {
    /// An empty store; tensors are created on `device` in `dtype` unless a `VarBuilder`
    /// asks for another dtype.
    pub fn new(seed: u64, dtype: DType, device: &Device) -> Self {
        Self {
            inner: Arc::new(Inner {
                seed,
                dtype,
                device: device.clone(),
                vars: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    /// The seed all initial values are derived from.
    pub fn seed(&self) -> u64 {
        self.inner.seed
    }

    /// The default dtype of created tensors.
    pub fn dtype(&self) -> DType {
        self.inner.dtype
    }

    /// The device tensors live on.
    pub fn device(&self) -> &Device {
        &self.inner.device
    }

    /// A `VarBuilder` that creates (or returns) this store's vars.
    pub fn var_builder(&self) -> VarBuilder<'static> {
        VarBuilder::from_backend(
            Box::new(self.clone()),
            self.inner.dtype,
            self.inner.device.clone(),
        )
    }

    // A panic elsewhere while holding the lock cannot leave the map half-updated (every
    // mutation is a single insert), so a poisoned lock is still safe to use.
    fn vars(&self) -> MutexGuard<'_, BTreeMap<String, Var>> {
        self.inner
            .vars
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The var called `name`, if it has been created.
    pub fn get(&self, name: &str) -> Option<Var> {
        self.vars().get(name).cloned()
    }

    /// All names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.vars().keys().cloned().collect()
    }

    /// Number of tensors (parameters and buffers).
    pub fn len(&self) -> usize {
        self.vars().len()
    }

    /// Whether no tensor has been created yet.
    pub fn is_empty(&self) -> bool {
        self.vars().is_empty()
    }

    /// Every trainable parameter (everything except buffers), sorted by name.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.trainable_vars_with_prefix("")
    }

    /// The trainable parameters under `prefix`, sorted by name.
    ///
    /// Matching is by whole path segments: prefix `gen` selects `gen` and `gen.conv.weight`
    /// but not `generator.weight`. An empty prefix selects everything.
    pub fn trainable_vars_with_prefix(&self, prefix: &str) -> Vec<(String, Var)> {
        self.vars()
            .iter()
            .filter(|(name, _)| !is_buffer(name) && has_prefix(name, prefix))
            .map(|(name, var)| (name.clone(), var.clone()))
            .collect()
    }

    /// The buffers (see [`is_buffer`]), sorted by name.
    pub fn buffers(&self) -> Vec<(String, Var)> {
        self.vars()
            .iter()
            .filter(|(name, _)| is_buffer(name))
            .map(|(name, var)| (name.clone(), var.clone()))
            .collect()
    }

    /// Runs `f` and then puts every buffer (BatchNorm running statistics) back to its value
    /// before the call, so a train-mode pass for validation, sampling or a hypergradient
    /// probe leaves no trace in the model. The buffers are restored whether `f` fails or not.
    pub fn without_buffer_updates<T, E: From<candle_core::Error>>(
        &self,
        f: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let saved = crate::snapshot::Snapshot::capture(&self.buffers())?;
        let out = f();
        saved.restore()?;
        out
    }

    /// Total number of scalar trainable parameters.
    pub fn num_trainable_params(&self) -> usize {
        self.vars()
            .iter()
            .filter(|(name, _)| !is_buffer(name))
            .map(|(_, var)| var.elem_count())
            .sum()
    }

    /// Deep copies of every tensor (parameters and buffers), detached from any graph.
    ///
    /// A plain `detach()` would still share storage with the `Var`, so a later optimizer
    /// step would silently change a "backup"; these copies own their storage.
    pub fn named_tensors(&self) -> candle_core::Result<BTreeMap<String, Tensor>> {
        self.vars()
            .iter()
            .map(|(name, var)| Ok((name.clone(), var.as_tensor().detach().copy()?)))
            .collect()
    }

    /// Overwrites vars in place (so models holding them see the new values) from `tensors`.
    ///
    /// Values are converted to each var's dtype and device. A shape mismatch is always an
    /// error; with `strict`, names in the store but not in `tensors` (missing) and names in
    /// `tensors` but not in the store (unexpected) are errors too, otherwise they are
    /// skipped. Everything is validated before any var is written, so a failed load
    /// changes nothing.
    pub fn load_named_tensors(
        &self,
        tensors: &BTreeMap<String, Tensor>,
        strict: bool,
    ) -> anyhow::Result<()> {
        let vars = self.vars();
        let mut mismatched = Vec::new();
        let mut unexpected = Vec::new();
        let mut updates = Vec::new();
        for (name, tensor) in tensors {
            match vars.get(name) {
                Some(var) if var.shape() != tensor.shape() => mismatched.push(format!(
                    "{name}: store {:?} vs given {:?}",
                    var.dims(),
                    tensor.dims()
                )),
                Some(var) => updates.push((name, var, tensor)),
                None => unexpected.push(name.clone()),
            }
        }
        let missing: Vec<String> = vars
            .keys()
            .filter(|name| !tensors.contains_key(*name))
            .cloned()
            .collect();
        let mut problems = Vec::new();
        if !mismatched.is_empty() {
            problems.push(format!("shape mismatch: {}", mismatched.join("; ")));
        }
        if strict && !missing.is_empty() {
            problems.push(format!("missing: {}", missing.join(", ")));
        }
        if strict && !unexpected.is_empty() {
            problems.push(format!("unexpected: {}", unexpected.join(", ")));
        }
        if !problems.is_empty() {
            anyhow::bail!("cannot load parameters: {}", problems.join(" | "));
        }
        for (name, var, tensor) in updates {
            tensor
                .to_device(var.device())
                .and_then(|t| t.to_dtype(var.dtype()))
                .and_then(|t| var.set(&t))
                .with_context(|| format!("setting parameter {name}"))?;
        }
        Ok(())
    }

    /// Writes every tensor to a safetensors file (atomically: temp file + rename).
    pub fn save_safetensors(&self, path: impl AsRef<Path>) -> anyhow::Result<()> {
        let path = path.as_ref();
        let tensors = self
            .named_tensors()
            .with_context(|| format!("copying parameters for {}", path.display()))?;
        write_safetensors(path, &tensors, None)
    }

    /// Loads every tensor from a safetensors file written by [`ParamStore::save_safetensors`]
    /// (strict: names and shapes must match the store exactly).
    pub fn load_safetensors(&self, path: impl AsRef<Path>) -> anyhow::Result<()> {
        let path = path.as_ref();
        let (tensors, _) = read_safetensors(path, &self.inner.device)?;
        self.load_named_tensors(&tensors, true)
            .with_context(|| format!("loading {}", path.display()))
    }
}

fn has_prefix(name: &str, prefix: &str) -> bool {
    prefix.is_empty()
        || name
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// A stable 64-bit FNV-1a hash: it must never change between versions, since it picks
/// the random stream each tensor's initial values come from.
fn stream_for_name(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl SimpleBackend for ParamStore {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut vars = self.vars();
        if let Some(var) = vars.get(name) {
            if var.shape() != &shape {
                candle_core::bail!(
                    "parameter {name}: requested shape {:?} but it exists with shape {:?}",
                    shape.dims(),
                    var.dims()
                );
            }
            if var.dtype() != dtype {
                candle_core::bail!(
                    "parameter {name}: requested dtype {dtype:?} but it exists as {:?}",
                    var.dtype()
                );
            }
            return Ok(var.as_tensor().clone());
        }
        let mut rng = SeededRng::new(self.inner.seed).with_stream(stream_for_name(name));
        let value = sample_init(&init, &shape, &mut rng, dtype, device)?;
        let var = Var::from_tensor(&value)?;
        let tensor = var.as_tensor().clone();
        vars.insert(name.to_string(), var);
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        match self.vars().get(name) {
            Some(var) => var.as_tensor().to_dtype(dtype)?.to_device(device),
            None => Err(candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.vars().contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::Init;

    fn store() -> ParamStore {
        ParamStore::new(42, DType::F64, &Device::Cpu)
    }

    fn vals(t: &Tensor) -> Vec<f64> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn randn() -> Init {
        Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        }
    }

    #[test]
    fn same_seed_same_values_regardless_of_creation_order() {
        let a = store();
        let b = store();
        let vb_a = a.var_builder();
        let vb_b = b.var_builder();
        let a1 = vb_a
            .pp("x")
            .get_with_hints((3, 4), "weight", randn())
            .unwrap();
        let a2 = vb_a.pp("y").get_with_hints(5, "weight", randn()).unwrap();
        let b2 = vb_b.pp("y").get_with_hints(5, "weight", randn()).unwrap();
        let b1 = vb_b
            .pp("x")
            .get_with_hints((3, 4), "weight", randn())
            .unwrap();
        assert_eq!(vals(&a1), vals(&b1));
        assert_eq!(vals(&a2), vals(&b2));
        assert_ne!(
            vals(&a1)[..5],
            vals(&a2)[..],
            "names draw from distinct streams"
        );

        let c = ParamStore::new(43, DType::F64, &Device::Cpu);
        let c1 = c
            .var_builder()
            .pp("x")
            .get_with_hints((3, 4), "weight", randn())
            .unwrap();
        assert_ne!(vals(&a1), vals(&c1));
    }

    #[test]
    fn values_are_pinned_for_a_seed() {
        // Guards the stream derivation (seed + FNV-1a of the name): changing it would
        // silently change every model's initial weights.
        let s = store();
        let t = s
            .var_builder()
            .get_with_hints(3, "w", Init::Uniform { lo: 0.0, up: 1.0 })
            .unwrap();
        let mut rng = SeededRng::new(42).with_stream(stream_for_name("w"));
        let expected =
            crate::rng::uniform(&mut rng, 3, 0.0, 1.0, DType::F64, &Device::Cpu).unwrap();
        assert_eq!(vals(&t), vals(&expected));
        assert_eq!(stream_for_name(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stream_for_name("a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn second_request_returns_same_var_and_shape_mismatch_names_tensor() {
        let s = store();
        let vb = s.var_builder().pp("enc");
        let first = vb.get_with_hints((2, 2), "weight", randn()).unwrap();
        let again = vb
            .get_with_hints((2, 2), "weight", Init::Const(7.0))
            .unwrap();
        assert_eq!(first.id(), again.id());
        assert!(first.is_variable());
        let err = vb
            .get_with_hints((2, 3), "weight", randn())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("enc.weight") && err.contains("[2, 3]"),
            "{err}"
        );
        assert!(vb.contains_tensor("weight"));
        assert!(vb.get_unchecked("missing").is_err());
    }

    #[test]
    fn trainable_vars_exclude_buffers_and_respect_prefix() {
        let s = store();
        let vb = s.var_builder();
        for name in [
            "gen.conv.weight",
            "gen.bn.weight",
            "gen.bn.running_mean",
            "gen.bn.running_var",
            "generator.weight",
            "seg.weight",
        ] {
            vb.get_with_hints(2, name, Init::Const(1.0)).unwrap();
        }
        let names = |v: Vec<(String, Var)>| v.into_iter().map(|(n, _)| n).collect::<Vec<_>>();
        assert_eq!(
            names(s.trainable_vars()),
            [
                "gen.bn.weight",
                "gen.conv.weight",
                "generator.weight",
                "seg.weight"
            ]
        );
        assert_eq!(
            names(s.trainable_vars_with_prefix("gen")),
            ["gen.bn.weight", "gen.conv.weight"]
        );
        assert_eq!(
            names(s.buffers()),
            ["gen.bn.running_mean", "gen.bn.running_var"]
        );
        assert_eq!(s.num_trainable_params(), 8);
        assert_eq!(s.len(), 6);
    }

    #[test]
    fn named_tensors_are_deep_copies() {
        let s = store();
        s.var_builder()
            .get_with_hints(3, "w", Init::Const(1.0))
            .unwrap();
        let backup = s.named_tensors().unwrap();
        let var = s.get("w").unwrap();
        var.set(&Tensor::new(&[5.0f64, 6.0, 7.0], &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(vals(&backup["w"]), [1.0, 1.0, 1.0]);
        assert!(!backup["w"].is_variable());
    }

    #[test]
    fn load_round_trip_through_safetensors_updates_vars_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let a = store();
        a.var_builder()
            .pp("l")
            .get_with_hints((2, 3), "weight", randn())
            .unwrap();
        a.var_builder()
            .pp("bn")
            .get_with_hints(3, "running_var", Init::Const(1.0))
            .unwrap();
        a.save_safetensors(&path).unwrap();

        let b = ParamStore::new(7, DType::F64, &Device::Cpu);
        let held = b
            .var_builder()
            .pp("l")
            .get_with_hints((2, 3), "weight", randn())
            .unwrap();
        b.var_builder()
            .pp("bn")
            .get_with_hints(3, "running_var", Init::Const(0.0))
            .unwrap();
        assert_ne!(vals(&held), vals(&a.get("l.weight").unwrap()));
        b.load_safetensors(&path).unwrap();
        // The tensor a model already holds sees the loaded values.
        assert_eq!(vals(&held), vals(&a.get("l.weight").unwrap()));
        assert_eq!(vals(&b.get("bn.running_var").unwrap()), [1.0, 1.0, 1.0]);
    }

    #[test]
    fn load_converts_dtype() {
        let s = store();
        s.var_builder()
            .get_with_hints(2, "w", Init::Const(0.0))
            .unwrap();
        let mut map = BTreeMap::new();
        map.insert(
            "w".to_string(),
            Tensor::new(&[0.5f32, 2.0], &Device::Cpu).unwrap(),
        );
        s.load_named_tensors(&map, true).unwrap();
        assert_eq!(vals(&s.get("w").unwrap()), [0.5, 2.0]);
    }

    #[test]
    fn load_mismatches_are_listed_and_change_nothing() {
        let s = store();
        let vb = s.var_builder();
        vb.get_with_hints(2, "a", Init::Const(0.0)).unwrap();
        vb.get_with_hints(2, "b", Init::Const(0.0)).unwrap();
        let mut map = BTreeMap::new();
        map.insert(
            "a".to_string(),
            Tensor::ones(2, DType::F64, &Device::Cpu).unwrap(),
        );
        map.insert(
            "extra".to_string(),
            Tensor::ones(1, DType::F64, &Device::Cpu).unwrap(),
        );
        let err = s.load_named_tensors(&map, true).unwrap_err().to_string();
        assert!(
            err.contains("missing: b") && err.contains("unexpected: extra"),
            "{err}"
        );
        assert_eq!(
            vals(&s.get("a").unwrap()),
            [0.0, 0.0],
            "failed load must not write"
        );

        s.load_named_tensors(&map, false).unwrap();
        assert_eq!(vals(&s.get("a").unwrap()), [1.0, 1.0]);

        map.insert(
            "b".to_string(),
            Tensor::ones(3, DType::F64, &Device::Cpu).unwrap(),
        );
        let err = s.load_named_tensors(&map, false).unwrap_err().to_string();
        assert!(err.contains("b: store [2] vs given [3]"), "{err}");
    }

    #[test]
    fn load_safetensors_error_names_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broken.safetensors");
        std::fs::write(&path, b"not a safetensors file").unwrap();
        let err = format!("{:#}", store().load_safetensors(&path).unwrap_err());
        assert!(err.contains("broken.safetensors"), "{err}");
    }
}
