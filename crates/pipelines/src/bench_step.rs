//! Wall time of full training steps (forward, loss, backward, optimizer step) on random
//! data, for comparisons with other frameworks: `genseg bench-step`, which
//! `cargo xtask bench-vs-torch` runs next to its PyTorch twin (`xtask/bench/torch_step.py`,
//! which mirrors everything below).
//!
//! Workloads, f32:
//! - [`BenchModel::Unet`]: [`UNet`] at depth 4 with transposed-conv up-sampling, base width
//!   `base`, `channels` input channels, on uniform `[0, 1)` images and random binary masks,
//!   with the reference lungs loss (BCE + batch Dice, [`SegLoss::lungs`]).
//! - [`BenchModel::Deeplabv3R50`]: [`DeepLab`] with its default (reference) configuration,
//!   torchvision's `deeplabv3_resnet50` (ResNet-50, output stride 8, no auxiliary head),
//!   `channels` input channels (1 is repeated to 3), with the lungs loss.
//! - [`BenchModel::SwinUnet`]: [`SwinUnet`] with its default (reference) configuration
//!   built for `size` px (the reference's 224), with the lungs loss.
//! - [`BenchModel::Pix2pix`]: the mask-to-image [`Pix2PixGenerator`] with its default
//!   searchable (fused) up cells, `ngf = base`, built for `size` px, mapping a random binary
//!   mask to a `channels`-channel image, in train mode (BatchNorm batch statistics, dropout
//!   0.5). Loss: L1 to a uniform `[-1, 1)` target image, the L1 half of pix2pix's generator
//!   loss; the discriminator is left out so the step times the generator alone.
//!
//! Both step [`Adam`] (PyTorch defaults, lr 1e-4) over every trainable parameter (α
//! included).
//!
//! FLOP convention: `2 ×` the multiply-accumulates of the forward's convolutions and
//! transposed convolutions ([`UNetConfig::conv_macs`], [`GeneratorConfig::conv_macs`]),
//! `× 3` for forward plus backward (input and weight gradients), per step. BatchNorm,
//! activations, pooling, the loss and the optimizer are not counted. DeepLab and
//! Swin-Unet report no count (`None`): the comparison checks their parameter counts only.

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use genseg_backbones::SegModel;
use genseg_backbones::deeplab::{DeepLab, DeepLabConfig};
use genseg_backbones::loss::SegLoss;
use genseg_backbones::swin_unet::{SwinUnet, SwinUnetConfig};
use genseg_backbones::unet::{UNet, UNetConfig};
use genseg_generator::generator::{GeneratorConfig, Pix2PixGenerator};
use genseg_nn::optim::{Adam, AdamConfig, Optimizer};
use genseg_nn::params::ParamStore;
use genseg_nn::rng::{SeededRng, uniform};
use serde::Serialize;

/// Adam's learning rate on both sides (any small value: only the time is measured).
pub const LEARNING_RATE: f64 = 1e-4;

/// Which network a step trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BenchModel {
    /// The segmentation UNet.
    Unet,
    /// The pix2pix mask-to-image generator.
    Pix2pix,
    /// DeepLabV3 on ResNet-50 (torchvision's `deeplabv3_resnet50`).
    #[serde(rename = "deeplabv3_r50")]
    Deeplabv3R50,
    /// Swin-Unet (Swin-T).
    SwinUnet,
}

/// What to time (see the module docs).
#[derive(Clone, Debug, Serialize)]
pub struct StepBenchConfig {
    /// The network trained.
    pub model: BenchModel,
    /// UNet base width, or the generator's `ngf` (unused by DeepLab and Swin-Unet).
    pub base: usize,
    /// The segmenter's input channels, or the generator's output (image) channels; its
    /// input is a one-channel mask.
    pub channels: usize,
    /// Square image side in pixels.
    pub size: usize,
    /// Images per step.
    pub batch: usize,
    /// Timed steps.
    pub steps: usize,
    /// Untimed steps first (allocator and caches warm up).
    pub warmup: usize,
    /// Seeds the weights, the data and the dropout masks.
    pub seed: u64,
}

/// One timed run; serialised as the one JSON line of `genseg bench-step`.
#[derive(Debug, Serialize)]
pub struct StepBenchReport {
    /// `"genseg"` (the PyTorch script writes `"torch"`).
    pub side: &'static str,
    /// What was timed.
    pub config: StepBenchConfig,
    /// Trainable parameters (BatchNorm running statistics excluded).
    pub params: usize,
    /// Compute threads candle uses (`RAYON_NUM_THREADS`).
    pub threads: usize,
    /// Wall time of each timed step.
    pub step_seconds: Vec<f64>,
    /// The process's peak resident memory (`VmHWM`), where the OS reports it.
    pub peak_rss_bytes: Option<u64>,
    /// Convolution GFLOP per step (module docs); `None` where not counted.
    pub gflop_per_step: Option<f64>,
}

/// A network with its fixed batch.
enum Workload {
    Segmenter {
        model: Box<dyn SegModel>,
        images: Tensor,
        masks: Tensor,
        loss: SegLoss,
    },
    Pix2pix {
        model: Box<Pix2PixGenerator>,
        masks: Tensor,
        targets: Tensor,
        /// Draws the dropout masks, fresh each step.
        rng: Box<SeededRng>,
    },
}

impl Workload {
    /// Builds the network into `store` and draws its batch; also returns the forward's
    /// convolution multiply-accumulates for the whole batch, where counted.
    fn new(
        cfg: &StepBenchConfig,
        store: &ParamStore,
        rng: &mut SeededRng,
    ) -> Result<(Self, Option<u64>)> {
        let device = store.device();
        let (b, c, s) = (cfg.batch, cfg.channels, cfg.size);
        let binary_mask = |rng: &mut SeededRng| -> Result<Tensor> {
            Ok(uniform(rng, (b, 1, s, s), 0.0, 1.0, DType::F32, device)?
                .ge(0.5)?
                .to_dtype(DType::F32)?)
        };
        let segmenter = |model: Box<dyn SegModel>, rng: &mut SeededRng| -> Result<Self> {
            Ok(Self::Segmenter {
                model,
                images: uniform(rng, (b, c, s, s), 0.0, 1.0, DType::F32, device)?,
                masks: binary_mask(rng)?,
                loss: SegLoss::lungs(),
            })
        };
        match cfg.model {
            BenchModel::Unet => {
                let unet_cfg = UNetConfig {
                    in_channels: c,
                    base_width: cfg.base,
                    ..UNetConfig::default()
                };
                let macs = unet_cfg.conv_macs(s, s);
                let model = Box::new(UNet::new(&unet_cfg, store.var_builder())?);
                Ok((segmenter(model, rng)?, Some(macs * b as u64)))
            }
            BenchModel::Deeplabv3R50 => {
                let deeplab_cfg = DeepLabConfig {
                    in_channels: c,
                    ..DeepLabConfig::default()
                };
                let model = Box::new(DeepLab::new(&deeplab_cfg, store.var_builder())?);
                Ok((segmenter(model, rng)?, None))
            }
            BenchModel::SwinUnet => {
                let swin_cfg = SwinUnetConfig {
                    in_channels: c,
                    image_size: s,
                    ..SwinUnetConfig::default()
                };
                let model = Box::new(SwinUnet::new(&swin_cfg, store.var_builder())?);
                Ok((segmenter(model, rng)?, None))
            }
            BenchModel::Pix2pix => {
                let gen_cfg = GeneratorConfig {
                    out_channels: c,
                    ngf: cfg.base,
                    image_size: s,
                    ..GeneratorConfig::default()
                };
                let macs = gen_cfg.conv_macs(s, s)?;
                let workload = Self::Pix2pix {
                    model: Box::new(Pix2PixGenerator::new(&gen_cfg, store.var_builder())?),
                    masks: binary_mask(rng)?,
                    targets: uniform(rng, (b, c, s, s), -1.0, 1.0, DType::F32, device)?,
                    rng: Box::new(rng.fork(1)),
                };
                Ok((workload, Some(macs * b as u64)))
            }
        }
    }

    /// The training-mode forward pass and its scalar loss.
    fn loss(&mut self) -> Result<Tensor> {
        Ok(match self {
            Self::Segmenter {
                model,
                images,
                masks,
                loss,
            } => loss.forward(&model.forward_t(images, true)?, masks)?,
            Self::Pix2pix {
                model,
                masks,
                targets,
                rng,
            } => (model.forward_t(masks, true, rng)? - &*targets)?
                .abs()?
                .mean_all()?,
        })
    }
}

/// Runs `cfg.warmup` untimed and `cfg.steps` timed training steps on `device`.
pub fn bench_step(cfg: &StepBenchConfig, device: &Device) -> Result<StepBenchReport> {
    anyhow::ensure!(
        cfg.batch > 0 && cfg.steps > 0,
        "bench-step: batch ({}) and steps ({}) must be positive",
        cfg.batch,
        cfg.steps
    );
    let store = ParamStore::new(cfg.seed, DType::F32, device);
    let mut rng = SeededRng::new(cfg.seed);
    let (mut workload, batch_macs) = Workload::new(cfg, &store, &mut rng)?;
    let mut optimizer = Adam::new(
        store.trainable_vars(),
        AdamConfig {
            lr: LEARNING_RATE,
            ..AdamConfig::default()
        },
    )?;
    let mut step = || -> Result<f64> {
        let start = Instant::now();
        let loss = workload.loss()?;
        optimizer.step(&loss.backward()?)?;
        // GPU work is asynchronous: the step ends when the device is done.
        device.synchronize()?;
        Ok(start.elapsed().as_secs_f64())
    };
    for i in 0..cfg.warmup {
        let seconds = step().with_context(|| format!("warm-up step {i}"))?;
        tracing::debug!(seconds, "warm-up step");
    }
    let step_seconds = (0..cfg.steps)
        .map(|i| step().with_context(|| format!("timed step {i}")))
        .collect::<Result<Vec<_>>>()?;
    Ok(StepBenchReport {
        side: "genseg",
        config: cfg.clone(),
        params: store.num_trainable_params(),
        threads: candle_core::utils::get_num_threads(),
        step_seconds,
        peak_rss_bytes: peak_rss_bytes(),
        gflop_per_step: batch_macs.map(|macs| 3.0 * 2.0 * macs as f64 / 1e9),
    })
}

/// The process's peak resident set size: `VmHWM` of `/proc/self/status` (Linux only).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_hwm(&status)
}

/// `VmHWM:   123456 kB` -> bytes.
fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_hwm_is_read_in_bytes() {
        let status = "Name:\tgenseg\nVmPeak:\t  999 kB\nVmHWM:\t   2048 kB\nVmRSS:\t 1 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(2048 * 1024));
        assert_eq!(parse_vm_hwm("Name:\tgenseg\n"), None);
    }

    #[test]
    fn tiny_runs_time_every_step_and_count_parameters() -> Result<()> {
        for model in [BenchModel::Unet, BenchModel::Pix2pix] {
            let cfg = StepBenchConfig {
                model,
                base: 2,
                channels: 1,
                size: 16,
                batch: 2,
                steps: 2,
                warmup: 1,
                seed: 0,
            };
            let report = bench_step(&cfg, &Device::Cpu)?;
            assert_eq!(report.step_seconds.len(), 2);
            assert!(report.step_seconds.iter().all(|s| *s > 0.0));
            assert!(report.params > 0 && report.gflop_per_step.is_some_and(|g| g > 0.0));
        }
        Ok(())
    }

    #[test]
    fn the_reference_backbones_have_torchvisions_and_swin_unets_parameter_counts() -> Result<()> {
        // DeepLab's image-pooling BatchNorm needs two images in train mode (as PyTorch's).
        for (model, size, batch, params) in [
            (BenchModel::Deeplabv3R50, 32, 2, 39_633_729),
            (BenchModel::SwinUnet, 224, 1, 27_168_132),
        ] {
            let cfg = StepBenchConfig {
                model,
                base: 0,
                channels: 1,
                size,
                batch,
                steps: 1,
                warmup: 0,
                seed: 0,
            };
            let report = bench_step(&cfg, &Device::Cpu)?;
            assert_eq!(report.params, params, "{model:?}");
            assert_eq!(report.gflop_per_step, None);
        }
        Ok(())
    }
}
