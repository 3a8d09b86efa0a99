//! Seeded, resumable randomness for everything GenSeg draws: weight initialisation,
//! dropout masks and data augmentation.
//!
//! candle's CPU random number generator cannot be seeded, so a run that used it could
//! never be reproduced. [`SeededRng`] wraps [`ChaCha8Rng`], a named algorithm whose
//! output is stable across crate versions and platforms, and exposes its full position
//! as a serialisable [`RngState`], so a checkpointed run resumes bit-exactly.
//!
//! The tensor helpers ([`normal`], [`uniform`], [`dropout`]) always draw `f64` samples
//! on the host and convert afterwards, so the values (up to rounding) and the amount of
//! randomness consumed do not depend on the dtype or device of the result.

use candle_core::{DType, Device, Result, Shape, Tensor};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

/// A seeded ChaCha8 random number generator whose position can be saved and restored.
///
/// Implements [`RngCore`], so every `rand::Rng` method (`random`, `random_range`, ...)
/// and every `rand_distr` distribution works on it directly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeededRng {
    inner: ChaCha8Rng,
}

/// The complete position of a [`SeededRng`]: key, stream and word offset.
///
/// Stored as strings/integers that JSON represents exactly (a `u128` would not survive
/// most JSON readers), so a `state.json` written by a checkpoint is portable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The 256-bit ChaCha key as 64 lowercase hex digits.
    pub key: String,
    /// The ChaCha stream (nonce); 2^64 independent streams exist per key.
    pub stream: u64,
    /// Offset from the start of the stream in 32-bit words, as a decimal `u128`.
    pub word_pos: String,
}

impl SeededRng {
    /// A generator whose key is derived from `seed` (via `SeedableRng::seed_from_u64`).
    pub fn new(seed: u64) -> Self {
        Self {
            inner: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// The same key, switched to ChaCha stream `stream` at its start: streams of one key
    /// are independent, which lets a seed feed many labelled, reproducible generators.
    pub fn with_stream(mut self, stream: u64) -> Self {
        self.inner.set_stream(stream);
        self.inner.set_word_pos(0);
        self
    }

    /// The current position, enough to continue the exact same sequence later.
    pub fn state(&self) -> RngState {
        let key: String = self
            .inner
            .get_seed()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        RngState {
            key,
            stream: self.inner.get_stream(),
            word_pos: self.inner.get_word_pos().to_string(),
        }
    }

    /// Restores a generator saved with [`SeededRng::state`]; it continues exactly where
    /// the saved one stopped.
    pub fn from_state(state: &RngState) -> anyhow::Result<Self> {
        let key = parse_key(&state.key)?;
        let word_pos: u128 = state.word_pos.parse().map_err(|e| {
            anyhow::anyhow!(
                "rng state: word_pos {:?} is not a decimal u128: {e}",
                state.word_pos
            )
        })?;
        let mut inner = ChaCha8Rng::from_seed(key);
        inner.set_stream(state.stream);
        inner.set_word_pos(word_pos);
        Ok(Self { inner })
    }

    /// Splits off an independent child generator.
    ///
    /// The child's key is drawn from `self` (so the parent advances and two forks never
    /// coincide) and `stream` selects the child's ChaCha stream, letting callers label
    /// children (e.g. one per data-loader worker) while staying deterministic.
    pub fn fork(&mut self, stream: u64) -> SeededRng {
        let mut key = [0u8; 32];
        self.inner.fill_bytes(&mut key);
        let mut inner = ChaCha8Rng::from_seed(key);
        inner.set_stream(stream);
        SeededRng { inner }
    }
}

fn parse_key(hex: &str) -> anyhow::Result<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        anyhow::bail!(
            "rng state: key must be 64 hex digits, got {} characters",
            hex.len()
        );
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        let digits = &hex[2 * i..2 * i + 2];
        *byte = u8::from_str_radix(digits, 16).map_err(|e| {
            anyhow::anyhow!("rng state: key has invalid hex {digits:?} at byte {i}: {e}")
        })?;
    }
    Ok(key)
}

impl RngCore for SeededRng {
    fn next_u32(&mut self) -> u32 {
        self.inner.next_u32()
    }

    fn next_u64(&mut self) -> u64 {
        self.inner.next_u64()
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        self.inner.fill_bytes(dst)
    }
}

/// A tensor of independent `N(mean, std²)` samples drawn from `rng`.
pub fn normal<S: Into<Shape>>(
    rng: &mut SeededRng,
    shape: S,
    mean: f64,
    std: f64,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let shape = shape.into();
    if !mean.is_finite() || !std.is_finite() || std < 0.0 {
        candle_core::bail!(
            "normal: need finite mean and std >= 0, got mean {mean} std {std} for shape {shape:?}"
        );
    }
    // Standard normal scaled afterwards: the stream consumed is independent of mean/std.
    let data: Vec<f64> = (0..shape.elem_count())
        .map(|_| mean + std * rng.sample::<f64, _>(StandardNormal))
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)
}

/// A tensor of independent samples uniform on `[lo, hi)` drawn from `rng`.
pub fn uniform<S: Into<Shape>>(
    rng: &mut SeededRng,
    shape: S,
    lo: f64,
    hi: f64,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let shape = shape.into();
    if !lo.is_finite() || !hi.is_finite() || lo > hi {
        candle_core::bail!("uniform: need finite lo <= hi, got [{lo}, {hi}) for shape {shape:?}");
    }
    let width = hi - lo;
    let data: Vec<f64> = (0..shape.elem_count())
        .map(|_| lo + width * rng.random::<f64>())
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)
}

/// Train-time inverted dropout: zeroes each element with probability `p` and scales the
/// survivors by `1 / (1 - p)`, so evaluation needs no rescaling (PyTorch's `F.dropout`).
///
/// The mask is drawn from `rng` rather than candle's unseedable generator. `p = 0` returns
/// `x` unchanged without consuming randomness; `p` outside `[0, 1)` is an error.
/// Gradients flow to `x` through the multiplication by the (constant) mask.
pub fn dropout(x: &Tensor, p: f32, rng: &mut SeededRng) -> Result<Tensor> {
    if !p.is_finite() || !(0.0..1.0).contains(&p) {
        candle_core::bail!("dropout: probability must be in [0, 1), got {p}");
    }
    if p == 0.0 {
        return Ok(x.clone());
    }
    let p = f64::from(p);
    let scale = 1.0 / (1.0 - p);
    let mask: Vec<f64> = (0..x.elem_count())
        .map(|_| if rng.random::<f64>() < p { 0.0 } else { scale })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), &Device::Cpu)?
        .to_dtype(x.dtype())?
        .to_device(x.device())?;
    x.mul(&mask)
}

/// Stochastic depth (`timm`'s `DropPath`): zeroes whole samples (dimension 0) with
/// probability `p` and scales the kept ones by `1 / (1 - p)`; `p = 0` returns `x`.
pub fn drop_path(x: &Tensor, p: f32, rng: &mut SeededRng) -> Result<Tensor> {
    if !p.is_finite() || !(0.0..1.0).contains(&p) {
        candle_core::bail!("drop_path: probability must be in [0, 1), got {p}");
    }
    if p == 0.0 {
        return Ok(x.clone());
    }
    let p = f64::from(p);
    let scale = 1.0 / (1.0 - p);
    let batch = x.dim(0)?;
    let keep: Vec<f32> = (0..batch)
        .map(|_| {
            if rng.random::<f64>() < p {
                0.0
            } else {
                scale as f32
            }
        })
        .collect();
    let mut shape = vec![1; x.rank()];
    shape[0] = batch;
    let keep = Tensor::from_vec(keep, shape, &Device::Cpu)?
        .to_dtype(x.dtype())?
        .to_device(x.device())?;
    x.broadcast_mul(&keep)
}

/// A generator that is a pure function of the values of `x` (FNV-1a of their bits): the
/// masks of a train-mode forward pass then depend on its input batch only, which keeps a
/// run reproducible (and its resume exact) without an RNG in the model's signature.
pub fn seeded_by(x: &Tensor) -> Result<SeededRng> {
    Ok(SeededRng::new(content_hash(x)?))
}

/// FNV-1a of the bits of `x`'s values (as f32), in row-major order: equal for equal
/// values, whatever the tensor's layout.
pub fn content_hash(x: &Tensor) -> Result<u64> {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for v in x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()? {
        hash = (hash ^ u64::from(v.to_bits())).wrapping_mul(0x0000_0100_0000_01b3);
    }
    Ok(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_path_drops_whole_samples_and_seeded_by_follows_the_values() -> Result<()> {
        let x = Tensor::ones((64, 3, 2), DType::F32, &Device::Cpu)?;
        let y = drop_path(&x, 0.5, &mut SeededRng::new(1))?;
        let per_sample: Vec<Vec<f32>> = y.flatten_from(1)?.to_vec2()?;
        assert!(per_sample.iter().all(|s| s.iter().all(|&v| v == s[0])));
        assert!(per_sample.iter().all(|s| s[0] == 0.0 || s[0] == 2.0));
        let dropped = per_sample.iter().filter(|s| s[0] == 0.0).count();
        assert!((16..=48).contains(&dropped), "{dropped} of 64");
        let a = seeded_by(&x)?.next_u64();
        assert_eq!(a, seeded_by(&x.copy()?)?.next_u64());
        assert_ne!(a, seeded_by(&(x * 2.0)?)?.next_u64());
        Ok(())
    }

    fn draws(rng: &mut SeededRng, n: usize) -> Vec<u64> {
        (0..n).map(|_| rng.next_u64()).collect()
    }

    #[test]
    fn same_seed_same_stream_different_seed_differs() {
        let a = draws(&mut SeededRng::new(7), 16);
        let b = draws(&mut SeededRng::new(7), 16);
        let c = draws(&mut SeededRng::new(8), 16);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn state_round_trip_continues_identically() {
        let mut rng = SeededRng::new(3);
        // An odd number of u32 draws leaves the position mid-block and mid-u64.
        for _ in 0..37 {
            rng.next_u32();
        }
        let state = rng.state();
        let json = serde_json::to_string(&state).unwrap();
        let restored_state: RngState = serde_json::from_str(&json).unwrap();
        let mut restored = SeededRng::from_state(&restored_state).unwrap();
        assert_eq!(draws(&mut rng, 50), draws(&mut restored, 50));
    }

    #[test]
    fn from_state_rejects_bad_key_and_word_pos() {
        let mut state = SeededRng::new(1).state();
        state.key.truncate(10);
        let err = SeededRng::from_state(&state).unwrap_err().to_string();
        assert!(err.contains("64 hex digits"), "{err}");

        let mut state = SeededRng::new(1).state();
        state.key.replace_range(0..2, "zz");
        let err = SeededRng::from_state(&state).unwrap_err().to_string();
        assert!(err.contains("invalid hex"), "{err}");

        let mut state = SeededRng::new(1).state();
        state.word_pos = "-4".into();
        let err = SeededRng::from_state(&state).unwrap_err().to_string();
        assert!(err.contains("word_pos"), "{err}");
    }

    #[test]
    fn forks_are_independent_and_deterministic() {
        let mut parent = SeededRng::new(11);
        let before = parent.state();
        let mut child_a = parent.fork(0);
        let mut child_b = parent.fork(0);
        assert_ne!(parent.state(), before, "forking must advance the parent");
        let a = draws(&mut child_a, 8);
        let b = draws(&mut child_b, 8);
        let p = draws(&mut parent, 8);
        assert_ne!(a, b);
        assert_ne!(a, p);
        assert_ne!(b, p);

        let mut parent2 = SeededRng::new(11);
        assert_eq!(draws(&mut parent2.fork(0), 8), a);
        // The stream label changes the child even for the same key.
        let mut parent3 = SeededRng::new(11);
        assert_ne!(draws(&mut parent3.fork(1), 8), a);
    }

    fn moments(t: &Tensor) -> (f64, f64) {
        let v: Vec<f64> = t.flatten_all().unwrap().to_vec1().unwrap();
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt())
    }

    #[test]
    fn normal_and_uniform_moments() {
        let mut rng = SeededRng::new(5);
        let n = normal(&mut rng, (100, 100), 2.0, 0.5, DType::F64, &Device::Cpu).unwrap();
        let (mean, std) = moments(&n);
        assert!((mean - 2.0).abs() < 0.02, "mean {mean}");
        assert!((std - 0.5).abs() < 0.02, "std {std}");

        let u = uniform(&mut rng, 10_000, -1.0, 3.0, DType::F64, &Device::Cpu).unwrap();
        let (mean, std) = moments(&u);
        assert!((mean - 1.0).abs() < 0.05, "mean {mean}");
        // std of U(a, b) is (b - a) / sqrt(12).
        assert!((std - 4.0 / 12f64.sqrt()).abs() < 0.03, "std {std}");
        let v: Vec<f64> = u.to_vec1().unwrap();
        assert!(v.iter().all(|x| (-1.0..3.0).contains(x)));
    }

    #[test]
    fn dtype_does_not_change_values_or_stream() {
        let t64 = normal(
            &mut SeededRng::new(9),
            32,
            0.0,
            1.0,
            DType::F64,
            &Device::Cpu,
        )
        .unwrap();
        let t32 = normal(
            &mut SeededRng::new(9),
            32,
            0.0,
            1.0,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let diff = (t64 - t32.to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(diff < 1e-6, "{diff}");
    }

    #[test]
    fn invalid_distribution_parameters_error() {
        let mut rng = SeededRng::new(0);
        assert!(normal(&mut rng, 3, 0.0, -1.0, DType::F32, &Device::Cpu).is_err());
        assert!(uniform(&mut rng, 3, 1.0, 0.0, DType::F32, &Device::Cpu).is_err());
    }

    #[test]
    fn dropout_masks_and_scales() {
        let mut rng = SeededRng::new(21);
        let x = Tensor::ones(10_000, DType::F32, &Device::Cpu).unwrap();
        let y: Vec<f32> = dropout(&x, 0.25, &mut rng).unwrap().to_vec1().unwrap();
        let kept = y.iter().filter(|v| **v != 0.0).count() as f64 / y.len() as f64;
        assert!((kept - 0.75).abs() < 0.02, "kept fraction {kept}");
        assert!(
            y.iter()
                .all(|v| *v == 0.0 || (*v - 1.0 / 0.75).abs() < 1e-6)
        );

        let state = rng.state();
        let same = dropout(&x, 0.0, &mut rng).unwrap();
        assert_eq!(rng.state(), state, "p = 0 must not consume randomness");
        assert_eq!(same.to_vec1::<f32>().unwrap(), x.to_vec1::<f32>().unwrap());

        assert!(dropout(&x, 1.0, &mut rng).is_err());
        assert!(dropout(&x, -0.1, &mut rng).is_err());
        assert!(dropout(&x, f32::NAN, &mut rng).is_err());
    }

    #[test]
    fn dropout_is_reproducible_and_carries_gradient() {
        let x = candle_core::Var::ones((4, 5), DType::F64, &Device::Cpu).unwrap();
        let y1 = dropout(&x, 0.5, &mut SeededRng::new(4)).unwrap();
        let y2 = dropout(&x, 0.5, &mut SeededRng::new(4)).unwrap();
        let v1: Vec<Vec<f64>> = y1.to_vec2().unwrap();
        assert_eq!(v1, y2.to_vec2::<f64>().unwrap());
        let grads = y1.sum_all().unwrap().backward().unwrap();
        let g: Vec<Vec<f64>> = grads.get(&x).unwrap().to_vec2().unwrap();
        assert_eq!(
            g, v1,
            "d(sum(x * mask))/dx is the mask, which equals y for x = 1"
        );
    }
}
