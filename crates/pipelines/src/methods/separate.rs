//! Synthetic pairs from a pre-trained generator: the part shared by `genseg train --method
//! separate` and `genseg generate`.
//!
//! A [`Synthesizer`] holds a frozen generator loaded from a pre-training run
//! ([`load_generator`]), the reference's mask augmentation ([`MaskAugmenter`] with its default
//! configuration) and a [`PostProcessor`]. [`Synthesizer::synthesize`] augments each mask,
//! lets the generator paint an image for it in train mode (as the reference synthesises:
//! dropout on, BatchNorm batch statistics) and post-processes the batch, detached.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use genseg_data::writer::masks_from_tensor;
use genseg_generator::generator::{NormStatistics, Pix2PixGenerator};
use genseg_generator::postprocess::{PostProcessConfig, PostProcessor};
use genseg_masks::{MaskAugmentConfig, MaskAugmenter};
use genseg_nn::params::ParamStore;
use genseg_nn::rng::SeededRng;

use genseg_data::writer::masks_to_tensor;
use genseg_generator::pix2pix::{GENERATOR_PREFIX, build_generator};
use genseg_nn::checkpoint::with_prefix;

use super::baseline::ExtraTerm;
use crate::config::RunConfig;
use crate::run::{generator_checkpoint, read_generator_run};
use crate::run_dir::{RunDir, Which};
use crate::seeding::{Purpose, rng_for, seed_for};

/// A generator loaded from a pre-training run.
pub struct LoadedGenerator {
    /// The pre-training run's configuration.
    pub config: RunConfig,
    /// The checkpoint folder the weights came from.
    pub checkpoint: PathBuf,
    /// Holds the generator's tensors.
    pub store: ParamStore,
    /// The generator.
    pub generator: Pix2PixGenerator,
}

impl LoadedGenerator {
    /// Side of the images the generator makes.
    pub fn image_size(&self) -> usize {
        self.config.generator.image_size
    }
    /// Channels of the images the generator makes.
    pub fn channels(&self) -> usize {
        self.config.generator.out_channels
    }
}

/// Loads the generator of the pre-training run `run` from its `which` checkpoint.
pub fn load_generator(run: &Path, which: Which, device: &Device) -> Result<LoadedGenerator> {
    let dir =
        RunDir::open(run).with_context(|| format!("opening generator run {}", run.display()))?;
    let config = read_generator_run(&dir)?;
    let ckpt_dir = dir.checkpoint(which);
    let ckpt = generator_checkpoint(run, which)?;
    let (store, generator) = build_generator(
        &config.generator,
        seed_for(config.seed, Purpose::GeneratorWeights),
        device,
    )?;
    store
        .load_named_tensors(&with_prefix(&ckpt.weights, GENERATOR_PREFIX), true)
        .with_context(|| format!("loading the generator from {}", ckpt_dir.display()))?;
    Ok(LoadedGenerator {
        config,
        checkpoint: ckpt_dir,
        store,
        generator,
    })
}

/// A frozen generator with the mask augmentation and post-processing around it.
pub struct Synthesizer {
    /// The generator and where it came from.
    pub loaded: LoadedGenerator,
    norm: NormStatistics,
    paint_batch: usize,
    augmenter: MaskAugmenter,
    post: PostProcessor,
}

/// One synthetic batch.
pub struct SyntheticBatch {
    /// The augmented masks `[B, 1, H, W]` in `{0, 1}`.
    pub masks: Tensor,
    /// The post-processed images `[B, C, H, W]` in `[0, 1]`, detached.
    pub images: Tensor,
}

impl Synthesizer {
    /// Wraps `loaded` with the reference mask augmentation and the post-processing `post`;
    /// the generator normalises with the BatchNorm statistics `norm` and paints each batch
    /// among at least `paint_batch` masks (0 or 1: the batch alone).
    pub fn new(
        loaded: LoadedGenerator,
        post: PostProcessConfig,
        norm: NormStatistics,
        paint_batch: usize,
    ) -> Result<Self> {
        Ok(Self {
            loaded,
            norm,
            paint_batch,
            augmenter: MaskAugmenter::new(MaskAugmentConfig::default())?,
            post: PostProcessor::new(post)?,
        })
    }

    /// The post-processing in use.
    pub fn post_config(&self) -> &PostProcessConfig {
        self.post.config()
    }

    /// Augments `masks` (`[B, 1, H, W]`, foreground > 0.5) with `augment_rng` (or not, when
    /// `None`), synthesises their images with dropout masks from `dropout_rng` and
    /// post-processes them with `post_rng`. A batch smaller than `paint_batch` is painted
    /// beside more augmentations of its own masks (drawn after its own, so its masks do not
    /// change), whose images are dropped.
    pub fn synthesize(
        &self,
        masks: &Tensor,
        augment_rng: Option<&mut SeededRng>,
        dropout_rng: &mut SeededRng,
        post_rng: &mut SeededRng,
    ) -> Result<SyntheticBatch> {
        let device = masks.device().clone();
        let b = masks.dim(0)?;
        let painted = b.max(self.paint_batch);
        let masks = match augment_rng {
            Some(rng) => {
                let mut sources = masks_from_tensor(masks, 0.5)?;
                for i in b..painted {
                    let companion = sources[i % b].clone();
                    sources.push(companion);
                }
                masks_to_tensor(&self.augmenter.augment_batch(&sources, rng), &device)?
            }
            None => {
                let binary = masks.ge(0.5)?.to_dtype(DType::F32)?;
                if painted > b {
                    let rows: Vec<u32> = (0..painted).map(|i| (i % b) as u32).collect();
                    binary.index_select(&Tensor::new(rows.as_slice(), &device)?, 0)?
                } else {
                    binary
                }
            }
        };
        let raw = self
            .loaded
            .generator
            .synthesize(&masks, self.norm, true, dropout_rng)?
            .narrow(0, 0, b)?
            .detach();
        let masks = masks.narrow(0, 0, b)?;
        let images = self.post.apply(&raw, post_rng)?.detach();
        Ok(SyntheticBatch { masks, images })
    }
}

/// The extra loss term of `--method separate`: the batch's masks augmented afresh and
/// painted by the frozen generator of `separate.generator`.
pub struct SyntheticTerm {
    synth: Synthesizer,
    seed: u64,
}

impl SyntheticTerm {
    /// Loads the generator of `cfg.separate` and checks it against the data: same image size
    /// and channels.
    pub fn new(cfg: &RunConfig, channels: usize, device: &Device) -> Result<Self> {
        let s = &cfg.separate;
        let loaded = load_generator(&s.generator, s.checkpoint, device)?;
        anyhow::ensure!(
            loaded.image_size() == cfg.data.size as usize,
            "generator run {} makes {} px images but data.size is {}: pre-train at the same \
             size or set data.size={}",
            s.generator.display(),
            loaded.image_size(),
            cfg.data.size,
            loaded.image_size()
        );
        anyhow::ensure!(
            loaded.channels() == channels,
            "generator run {} makes {}-channel images but {} has {} channel(s)",
            s.generator.display(),
            loaded.channels(),
            cfg.data.path.display(),
            channels
        );
        let post = s.postprocess.config(channels, cfg.data.equalize_gamma);
        tracing::info!(
            "separate: generator {} (iteration {}), {:?} BatchNorm statistics, post-processing {:?}",
            loaded.checkpoint.display(),
            loaded.config.train.iterations,
            s.generator_norm,
            post.steps
        );
        Ok(Self {
            synth: Synthesizer::new(loaded, post, s.generator_norm, s.synthesis_batch)?,
            seed: cfg.seed,
        })
    }
}

impl ExtraTerm for SyntheticTerm {
    fn key(&self) -> &'static str {
        "loss_synthetic"
    }

    fn label(&self) -> &'static str {
        "synthetic"
    }

    fn batch(&self, _images: &Tensor, masks: &Tensor, it: u64) -> Result<(Tensor, Tensor)> {
        let seed = self.seed;
        let batch = self.synth.synthesize(
            masks,
            Some(&mut rng_for(seed, Purpose::MaskAugment, it)),
            &mut rng_for(seed, Purpose::GeneratorDropout, it),
            &mut rng_for(seed, Purpose::PostProcess, it),
        )?;
        Ok((batch.images, batch.masks))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Profile;

    /// An untrained 32 px generator, as if loaded from a pre-training run.
    fn untrained(norm: NormStatistics, paint_batch: usize) -> Result<Synthesizer> {
        let mut config = RunConfig::pix2pix(Profile::Cpu);
        config.data.size = 32;
        config.generator.ngf = 2;
        config.fit_to_data(1);
        let (store, generator) = build_generator(&config.generator, 0, &Device::Cpu)?;
        let loaded = LoadedGenerator {
            config,
            checkpoint: PathBuf::new(),
            store,
            generator,
        };
        Synthesizer::new(loaded, PostProcessConfig::default(), norm, paint_batch)
    }

    fn paint(synth: &Synthesizer, masks: &Tensor, augment: bool) -> Result<(Tensor, Vec<f32>)> {
        let mut augment_rng = rng_for(0, Purpose::MaskAugment, 3);
        let batch = synth.synthesize(
            masks,
            augment.then_some(&mut augment_rng),
            &mut rng_for(0, Purpose::GeneratorDropout, 3),
            &mut rng_for(0, Purpose::PostProcess, 3),
        )?;
        Ok((batch.masks, batch.images.flatten_all()?.to_vec1()?))
    }

    #[test]
    fn a_wider_paint_batch_keeps_the_batch_masks_and_changes_their_images() -> Result<()> {
        let masks = Tensor::rand(0f32, 1., (2, 1, 32, 32), &Device::Cpu)?
            .ge(0.5)?
            .to_dtype(DType::F32)?;
        for augment in [true, false] {
            let (own_masks, own) = paint(&untrained(NormStatistics::Batch, 0)?, &masks, augment)?;
            let (wide_masks, wide) = paint(&untrained(NormStatistics::Batch, 4)?, &masks, augment)?;
            assert_eq!(wide_masks.dims(), &[2, 1, 32, 32]);
            let diff = (&own_masks - &wide_masks)?
                .abs()?
                .sum_all()?
                .to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "the batch's own masks (augment {augment})");
            assert_eq!(own.len(), wide.len());
            // Two more augmentations change the batch statistics; two copies of the batch
            // (nothing to augment) have the same mean and variance as the batch itself.
            assert_eq!(own != wide, augment, "augment {augment}");
            // Running statistics do not see the companions at all.
            let running = |n| paint(&untrained(NormStatistics::Running, n)?, &masks, augment);
            assert!(running(0)?.1 == running(4)?.1, "augment {augment}");
        }
        Ok(())
    }
}
