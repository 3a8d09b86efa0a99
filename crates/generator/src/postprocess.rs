//! Post-processing of synthetic images before they reach the segmentation model (spec §2).
//!
//! A [`PostProcessor`] runs a configurable list of [`PostStep`]s on a batch `[B, C, H, W]`:
//!
//! - [`PostStep::MinMax`]: `(x − min) / (max − min)` with the min and max of the **whole
//!   batch** (not per image) — differentiable;
//! - 8-bit steps, run after quantising to `u8` (`⌊255·x + 0.5⌋`, clamped): histogram
//!   equalisation (PIL), gamma, posterize, sharpness, autocontrast, saturation jitter
//!   (see [`crate::photometric`]) — not differentiable. The result comes back as `v / 255`.
//!
//! Presets: [`PostProcessConfig::xray`] (min-max, equalise, gamma 0.5: the JSRT family) and
//! [`PostProcessConfig::rgb`] (min-max, then torchvision's photometric chain: equalise p 0.5,
//! posterize 4 bits, sharpness 0.3 p 0.5, autocontrast p 0.5, saturation jitter 0.5: the ISIC
//! family). Random decisions are drawn once per call from the caller's [`SeededRng`] and
//! shared by the whole batch, as torchvision does on a batch tensor; each random step draws
//! exactly one number whatever its probability, so the stream consumed depends only on the
//! list of steps.
//!
//! Gradient path ([`GradientPath`]): the reference detaches the synthetic image
//! ([`GradientPath::Detach`]). For the paper's intended end-to-end gradient,
//! [`GradientPath::StraightThrough`] returns the value of the full chain with the gradient
//! of its differentiable prefix: `out = p + stopgrad(full − p)` where `p` is the output of
//! the leading differentiable steps, i.e. the 8-bit suffix is treated as the identity in
//! the backward pass. With no 8-bit steps this is the exact gradient. Differentiable steps
//! must therefore come first; [`PostProcessor::new`] rejects a list where one follows an
//! 8-bit step.

use candle_core::{DType, Device, Result, Tensor};
use genseg_nn::rng::SeededRng;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::photometric;

/// Smallest `max − min` the min-max step divides by: a constant batch maps to 0 instead of
/// the reference's `0 / 0`.
pub const MIN_MAX_EPS: f64 = 1e-12;

/// One post-processing step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum PostStep {
    /// Batch-global min-max normalisation to `[0, 1]` (differentiable).
    MinMax,
    /// Histogram equalisation of every channel of every image (PIL), with probability `p`.
    Equalize {
        /// Probability of applying the step to the batch.
        p: f64,
    },
    /// Gamma correction `v ↦ round(255 (v/255)^gamma)`, always applied.
    Gamma {
        /// The exponent (0.5 in the reference).
        gamma: f64,
    },
    /// Keep the `bits` most significant bits, with probability `p`.
    Posterize {
        /// Bits kept, 1..=8 (4 in the reference).
        bits: u8,
        /// Probability of applying the step (1 in the reference).
        p: f64,
    },
    /// torchvision's `adjust_sharpness(factor)`, with probability `p`.
    Sharpness {
        /// Sharpness factor (0.3 in the reference: a mild blur).
        factor: f64,
        /// Probability of applying the step.
        p: f64,
    },
    /// torchvision's `autocontrast`, with probability `p`.
    Autocontrast {
        /// Probability of applying the step.
        p: f64,
    },
    /// `ColorJitter(saturation = strength)`: a saturation factor drawn uniformly from
    /// `[max(0, 1 − strength), 1 + strength]`; single-channel images are left unchanged.
    SaturationJitter {
        /// Jitter strength (0.5 in the reference).
        strength: f64,
    },
}

impl PostStep {
    /// Whether gradients flow through the step (only [`PostStep::MinMax`]).
    pub fn differentiable(&self) -> bool {
        matches!(self, PostStep::MinMax)
    }

    /// Checks the step's numbers.
    pub fn validate(&self) -> anyhow::Result<()> {
        let prob = |p: f64| {
            anyhow::ensure!(
                (0.0..=1.0).contains(&p),
                "post-processing {self:?}: probability {p} is outside [0, 1]"
            );
            Ok(())
        };
        match *self {
            PostStep::MinMax => Ok(()),
            PostStep::Equalize { p } | PostStep::Autocontrast { p } => prob(p),
            PostStep::Gamma { gamma } => {
                anyhow::ensure!(
                    gamma.is_finite() && gamma > 0.0,
                    "post-processing gamma: exponent {gamma} must be finite and > 0"
                );
                Ok(())
            }
            PostStep::Posterize { bits, p } => {
                anyhow::ensure!(
                    (1..=8).contains(&bits),
                    "post-processing posterize: bits {bits} is outside 1..=8"
                );
                prob(p)
            }
            PostStep::Sharpness { factor, p } => {
                anyhow::ensure!(
                    factor.is_finite() && factor >= 0.0,
                    "post-processing sharpness: factor {factor} must be finite and >= 0"
                );
                prob(p)
            }
            PostStep::SaturationJitter { strength } => {
                anyhow::ensure!(
                    strength.is_finite() && strength >= 0.0,
                    "post-processing saturation jitter: strength {strength} must be finite and >= 0"
                );
                Ok(())
            }
        }
    }
}

/// What the gradient of the post-processed batch is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GradientPath {
    /// No gradient: the output is detached (the reference's `.detach()`).
    #[default]
    Detach,
    /// Value of the full chain, gradient of the differentiable prefix (see the module docs).
    StraightThrough,
}

/// The steps and the gradient path of a [`PostProcessor`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostProcessConfig {
    /// Applied in order.
    pub steps: Vec<PostStep>,
    /// What the output's gradient is.
    pub gradient: GradientPath,
}

impl Default for PostProcessConfig {
    /// Min-max only, detached: the part every reference chain shares.
    fn default() -> Self {
        Self {
            steps: vec![PostStep::MinMax],
            gradient: GradientPath::Detach,
        }
    }
}

impl PostProcessConfig {
    /// Grey images (JSRT, breast, cell): min-max, equalisation, gamma 0.5 — the loader's
    /// processing of real images.
    pub fn xray() -> Self {
        Self {
            steps: vec![
                PostStep::MinMax,
                PostStep::Equalize { p: 1.0 },
                PostStep::Gamma { gamma: 0.5 },
            ],
            gradient: GradientPath::Detach,
        }
    }

    /// RGB images (ISIC): min-max, then torchvision's photometric chain.
    pub fn rgb() -> Self {
        Self {
            steps: vec![
                PostStep::MinMax,
                PostStep::Equalize { p: 0.5 },
                PostStep::Posterize { bits: 4, p: 1.0 },
                PostStep::Sharpness {
                    factor: 0.3,
                    p: 0.5,
                },
                PostStep::Autocontrast { p: 0.5 },
                PostStep::SaturationJitter { strength: 0.5 },
            ],
            gradient: GradientPath::Detach,
        }
    }

    /// No processing, gradient kept: the raw Tanh output of the history DeepLab scripts
    /// (spec §1.4, F2 exception).
    pub fn raw() -> Self {
        Self {
            steps: Vec::new(),
            gradient: GradientPath::StraightThrough,
        }
    }
}

/// Runs a validated [`PostProcessConfig`] on batches.
#[derive(Debug, Clone)]
pub struct PostProcessor {
    cfg: PostProcessConfig,
    /// Number of leading differentiable steps.
    prefix: usize,
}

/// A random decision of one 8-bit step, drawn before any pixel is touched.
#[derive(Debug, Clone, Copy)]
enum Decision {
    Skip,
    Apply,
    Saturation(f64),
}

impl PostProcessor {
    /// Validates the steps (numbers, and differentiable steps only before 8-bit ones).
    pub fn new(cfg: PostProcessConfig) -> anyhow::Result<Self> {
        for step in &cfg.steps {
            step.validate()?;
        }
        let prefix = cfg.steps.iter().take_while(|s| s.differentiable()).count();
        if let Some(late) = cfg.steps[prefix..].iter().find(|s| s.differentiable()) {
            anyhow::bail!(
                "post-processing: differentiable step {late:?} follows the 8-bit step {:?}; \
                 differentiable steps must come first",
                cfg.steps[prefix]
            );
        }
        Ok(Self { cfg, prefix })
    }

    /// The configuration.
    pub fn config(&self) -> &PostProcessConfig {
        &self.cfg
    }

    /// Post-processes `images` `[B, C, H, W]` (any float dtype and device; the result has the
    /// same). Random decisions come from `rng`.
    pub fn apply(&self, images: &Tensor, rng: &mut SeededRng) -> Result<Tensor> {
        let (b, c, h, w) = images.dims4().map_err(|_| {
            candle_core::Error::Msg(format!(
                "post-processing: expected a [B, C, H, W] batch, got shape {:?}",
                images.dims()
            ))
        })?;
        let mut x = images.clone();
        for step in &self.cfg.steps[..self.prefix] {
            x = match step {
                PostStep::MinMax => min_max(&x)?,
                other => candle_core::bail!("post-processing: {other:?} is not differentiable"),
            };
        }
        let suffix = &self.cfg.steps[self.prefix..];
        if suffix.is_empty() {
            return Ok(match self.cfg.gradient {
                GradientPath::Detach => x.detach(),
                GradientPath::StraightThrough => x,
            });
        }
        if suffix
            .iter()
            .any(|s| matches!(s, PostStep::SaturationJitter { .. }))
            && c != 1
            && c != 3
        {
            candle_core::bail!(
                "post-processing: saturation jitter needs 1 or 3 channels, got {c} (shape {:?})",
                images.dims()
            );
        }
        let decisions: Vec<Decision> = suffix.iter().map(|s| draw(s, rng)).collect();
        let mut bytes = quantise(&x)?;
        let plane = h * w;
        for (step, decision) in suffix.iter().zip(decisions) {
            if matches!(decision, Decision::Skip) {
                continue;
            }
            for image in bytes.chunks_mut(c * plane) {
                apply_u8(step, decision, image, c, h, w);
            }
        }
        // Divided on the host in f64, so 255 maps to exactly 1 in every dtype.
        let full = Tensor::from_vec(
            bytes
                .into_iter()
                .map(|v| f64::from(v) / 255.0)
                .collect::<Vec<_>>(),
            (b, c, h, w),
            &Device::Cpu,
        )?
        .to_dtype(x.dtype())?
        .to_device(x.device())?;
        match self.cfg.gradient {
            GradientPath::Detach => Ok(full),
            GradientPath::StraightThrough => {
                let correction = (full - &x)?.detach();
                x + correction
            }
        }
    }
}

/// `(x − min) / max(max − min, ε)` over the whole batch; gradients flow through `x`, `min`
/// and `max` as in the reference's tensor expression.
pub fn min_max(x: &Tensor) -> Result<Tensor> {
    let min = x.min_all()?;
    let max = x.max_all()?;
    let range = (max - &min)?.maximum(MIN_MAX_EPS)?;
    x.broadcast_sub(&min)?.broadcast_div(&range)
}

fn coin(p: f64, rng: &mut SeededRng) -> Decision {
    // torchvision's `torch.rand(1) < p`: one draw per step and call.
    if rng.random::<f64>() < p {
        Decision::Apply
    } else {
        Decision::Skip
    }
}

fn draw(step: &PostStep, rng: &mut SeededRng) -> Decision {
    match *step {
        PostStep::MinMax | PostStep::Gamma { .. } => Decision::Apply,
        PostStep::Equalize { p }
        | PostStep::Posterize { p, .. }
        | PostStep::Sharpness { p, .. }
        | PostStep::Autocontrast { p } => coin(p, rng),
        PostStep::SaturationJitter { strength } => {
            let lo = (1.0 - strength).max(0.0);
            let hi = 1.0 + strength;
            Decision::Saturation(lo + (hi - lo) * rng.random::<f64>())
        }
    }
}

/// `[B, C, H, W]` floats in `[0, 1]` -> bytes `⌊255·x + 0.5⌋` (clamped; NaN -> 0).
fn quantise(x: &Tensor) -> Result<Vec<u8>> {
    let values = x
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    // `as u8` saturates and maps NaN to 0.
    Ok(values
        .into_iter()
        .map(|v| (v * 255.0 + 0.5).floor() as u8)
        .collect())
}

/// One 8-bit step on one image (`c` planes of `h × w`).
fn apply_u8(step: &PostStep, decision: Decision, image: &mut [u8], c: usize, h: usize, w: usize) {
    let plane = h * w;
    match *step {
        PostStep::MinMax => {}
        PostStep::Equalize { .. } => image.chunks_mut(plane).for_each(photometric::equalize),
        PostStep::Gamma { gamma } => {
            let lut = photometric::gamma_lut(gamma);
            image.iter_mut().for_each(|v| *v = lut[usize::from(*v)]);
        }
        PostStep::Posterize { bits, .. } => photometric::posterize(image, bits),
        PostStep::Sharpness { factor, .. } => image
            .chunks_mut(plane)
            .for_each(|p| photometric::adjust_sharpness(p, h, w, factor)),
        PostStep::Autocontrast { .. } => {
            image.chunks_mut(plane).for_each(photometric::autocontrast)
        }
        PostStep::SaturationJitter { .. } => {
            if let (Decision::Saturation(factor), 3) = (decision, c) {
                let (r, rest) = image.split_at_mut(plane);
                let (g, b) = rest.split_at_mut(plane);
                photometric::adjust_saturation(r, g, b, factor);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;
    use genseg_nn::gradcheck::{GradCheckOptions, check_gradients};

    fn vals(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn min_max_uses_the_whole_batch() -> anyhow::Result<()> {
        // Image 0 spans [-0.5, 0.5], image 1 spans [0, 1.5]: one range [-0.5, 1.5] for both.
        let x = Tensor::new(&[[[[-0.5f64, 0.5]]], [[[0.0, 1.5]]]], &Device::Cpu)?;
        assert_eq!(vals(&min_max(&x)?), vec![0.0, 0.5, 0.25, 1.0]);
        let flat = Tensor::full(0.3f32, (1, 1, 2, 2), &Device::Cpu)?;
        assert_eq!(vals(&min_max(&flat)?), vec![0.0; 4], "constant batch -> 0");
        Ok(())
    }

    #[test]
    fn gradcheck_min_max() -> anyhow::Result<()> {
        // Distinct values: the min and max elements stay put under the finite-difference step.
        let x = Tensor::new(
            &[[[[0.3f64, -0.2], [0.9, 0.1]]], [[[0.45, -0.7], [0.2, 0.6]]]],
            &Device::Cpu,
        )?;
        check_gradients(
            |v| {
                let y = min_max(&v[0])?;
                let w = Tensor::arange(1.0f64, 9.0, &Device::Cpu)?.reshape(y.shape())?;
                (y * w)?.sum_all()
            },
            &[x],
            GradCheckOptions::default(),
        )?
        .ensure(1e-7)
    }

    #[test]
    fn xray_chain_by_hand() -> anyhow::Result<()> {
        // Three levels of 255 pixels each in one 15x51 image: min-max takes them to 0, 0.25
        // and 1 -> bytes 0, 64, 255; equalisation -> 0, 128, 255 (see photometric's test);
        // gamma 0.5 -> 0, round(255 · sqrt(128/255)) = 181, 255.
        let levels = [-1.0f32, -0.5, 1.0];
        let data: Vec<f32> = levels.iter().flat_map(|&v| [v; 255]).collect();
        let x = Tensor::from_vec(data, (1, 1, 15, 51), &Device::Cpu)?;
        let pp = PostProcessor::new(PostProcessConfig::xray())?;
        let y = vals(&pp.apply(&x, &mut SeededRng::new(0))?);
        let want = [0.0, 181.0 / 255.0, 1.0];
        for (i, w) in want.iter().enumerate() {
            assert!(
                y[i * 255..(i + 1) * 255]
                    .iter()
                    .all(|v| (v - w).abs() < 1e-6),
                "level {i}"
            );
        }
        Ok(())
    }

    #[test]
    fn random_decisions_are_shared_seeded_and_fair() -> anyhow::Result<()> {
        let cfg = PostProcessConfig {
            steps: vec![PostStep::MinMax, PostStep::Autocontrast { p: 0.5 }],
            gradient: GradientPath::Detach,
        };
        let pp = PostProcessor::new(cfg)?;
        // Two images in [0, 0.5] and [0.25, 1]: autocontrast stretches both or neither.
        let x = Tensor::new(&[[[[0.0f32, 0.5]]], [[[0.25, 1.0]]]], &Device::Cpu)?;
        let mut applied = 0;
        for seed in 0..200 {
            let y = vals(&pp.apply(&x, &mut SeededRng::new(seed))?);
            // Stretched, image 0 goes [0, 128] -> [0, 255]; image 1 [64, 255] -> [0, 254]
            // (torchvision's f32 scale 255/191 truncates the top to 254).
            let first = y[1] == 1.0;
            let second = y[2] == 0.0;
            assert!(!second || (y[3] - 254.0 / 255.0).abs() < 1e-6, "{y:?}");
            assert_eq!(first, second, "seed {seed}: decision not shared: {y:?}");
            applied += usize::from(first);
            assert_eq!(y, vals(&pp.apply(&x, &mut SeededRng::new(seed))?), "seeded");
        }
        assert!(
            (70..130).contains(&applied),
            "applied {applied} of 200 at p = 0.5"
        );
        Ok(())
    }

    #[test]
    fn rgb_chain_runs_and_stays_in_range() -> anyhow::Result<()> {
        let pp = PostProcessor::new(PostProcessConfig::rgb())?;
        let x = Tensor::rand(-1f32, 1., (2, 3, 8, 8), &Device::Cpu)?;
        let mut rng = SeededRng::new(3);
        let y = pp.apply(&x, &mut rng)?;
        assert_eq!(y.dims(), &[2, 3, 8, 8]);
        let v = vals(&y);
        assert!(v.iter().all(|p| (0.0..=1.0).contains(p)));
        // Posterize (p = 1) keeps 4 bits: every byte is a multiple of 16 unless a later
        // step moved it; with all random steps skipped it must be.
        let only_posterize = PostProcessor::new(PostProcessConfig {
            steps: vec![PostStep::MinMax, PostStep::Posterize { bits: 4, p: 1.0 }],
            gradient: GradientPath::Detach,
        })?;
        let v = vals(&only_posterize.apply(&x, &mut rng)?);
        assert!(v.iter().all(|p| ((p * 255.0).round() as u32) % 16 == 0));
        let grey = Tensor::rand(0f32, 1., (1, 2, 4, 4), &Device::Cpu)?;
        let e = pp.apply(&grey, &mut rng).unwrap_err().to_string();
        assert!(e.contains("2"), "{e}");
        Ok(())
    }

    #[test]
    fn straight_through_value_of_chain_gradient_of_min_max() -> anyhow::Result<()> {
        let x = Var::new(&[[[[0.3f64, -0.2], [0.9, 0.1]]]], &Device::Cpu)?;
        let detach = PostProcessor::new(PostProcessConfig::xray())?;
        let st = PostProcessor::new(PostProcessConfig {
            gradient: GradientPath::StraightThrough,
            ..PostProcessConfig::xray()
        })?;
        let y_detach = detach.apply(x.as_tensor(), &mut SeededRng::new(1))?;
        let y_st = st.apply(x.as_tensor(), &mut SeededRng::new(1))?;
        let (a, b) = (vals(&y_detach), vals(&y_st));
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() < 1e-12, "values: {a:?} vs {b:?}");
        }
        assert!(
            y_detach.sum_all()?.backward()?.get(x.as_tensor()).is_none(),
            "detached"
        );
        let w = Tensor::new(&[[[[1.0f64, -2.0], [0.5, 3.0]]]], &Device::Cpu)?;
        let g_st = vals(
            (&y_st * &w)?
                .sum_all()?
                .backward()?
                .get(x.as_tensor())
                .expect("grad"),
        );
        let g_mm = vals(
            (min_max(x.as_tensor())? * &w)?
                .sum_all()?
                .backward()?
                .get(x.as_tensor())
                .expect("grad"),
        );
        assert_eq!(g_st, g_mm);
        assert!(g_st.iter().any(|g| *g != 0.0));

        // Raw: identity with gradient.
        let raw = PostProcessor::new(PostProcessConfig::raw())?;
        let y = raw.apply(x.as_tensor(), &mut SeededRng::new(0))?;
        assert_eq!(vals(&y), vals(x.as_tensor()));
        assert!(y.sum_all()?.backward()?.get(x.as_tensor()).is_some());
        Ok(())
    }

    #[test]
    fn marks_validation_and_serde() -> anyhow::Result<()> {
        assert!(PostStep::MinMax.differentiable());
        assert!(!PostStep::Equalize { p: 1.0 }.differentiable());
        assert!(!PostStep::Gamma { gamma: 0.5 }.differentiable());
        let bad = |steps: Vec<PostStep>| {
            PostProcessor::new(PostProcessConfig {
                steps,
                gradient: GradientPath::Detach,
            })
            .unwrap_err()
            .to_string()
        };
        assert!(bad(vec![PostStep::Equalize { p: 1.5 }]).contains("probability 1.5"));
        assert!(bad(vec![PostStep::Posterize { bits: 0, p: 1.0 }]).contains("bits 0"));
        assert!(bad(vec![PostStep::Gamma { gamma: 0.0 }]).contains("exponent 0"));
        let e = bad(vec![PostStep::Equalize { p: 1.0 }, PostStep::MinMax]);
        assert!(e.contains("must come first"), "{e}");

        let json = r#"{"steps": [{"op": "min_max"}, {"op": "sharpness", "factor": 0.3, "p": 0.5}],
                       "gradient": "straight_through"}"#;
        let cfg: PostProcessConfig = serde_json::from_str(json)?;
        assert_eq!(
            cfg.steps[1],
            PostStep::Sharpness {
                factor: 0.3,
                p: 0.5
            }
        );
        assert_eq!(cfg.gradient, GradientPath::StraightThrough);
        let back: PostProcessConfig =
            serde_json::from_str(&serde_json::to_string(&PostProcessConfig::rgb())?)?;
        assert_eq!(back, PostProcessConfig::rgb());
        Ok(())
    }
}
