//! `genseg generate`: a synthetic dataset from a pre-trained generator.
//!
//! Sample `i` takes mask `i mod n_masks` of the source (any dataset folder, whose masks are
//! used, or a folder of mask images), resized to the generator's size (nearest), augments it
//! with the reference's mask augmentation drawn from the stream `(seed, MaskAugment, i)` and
//! lets the generator paint its image (train mode, as GenSeg synthesises; batches of
//! `batch_size`, post-processed together). The pairs are written in the folder layout
//! (`images/`, `masks/` with 0/255 masks) or nnU-Net v2's raw layout (`imagesTr/<id>_0000.png`,
//! `labelsTr/<id>.png` with label values 0/1, `dataset.json`), plus `generated.json`
//! recording where they came from.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::Device;
use genseg_data::layout::{IMAGE_EXTENSIONS, Layout, LayoutChoice, detect_layout, discover};
use genseg_data::preprocess::{MaskRule, MaskValues, resize_mask};
use genseg_data::writer::{images_from_tensor, write_image, write_mask_png};
use image::{DynamicImage, GrayImage};
use serde_json::json;

use genseg_data::writer::masks_to_tensor;

use crate::config::{NormStatistics, PostChoice};
use crate::learner::Observer;
use crate::methods::separate::{Synthesizer, load_generator};
use crate::run_dir::{RunLock, Which};
use crate::seeding::{Purpose, rng_for};

/// Where the synthetic pairs go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputLayout {
    /// `images/<id>.png` + `masks/<id>.png` (0/255).
    Folder,
    /// nnU-Net v2 raw: `dataset.json`, `imagesTr/<id>_0000.png`, `labelsTr/<id>.png` (0/1).
    Nnunet,
}

/// What `genseg generate` needs.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct GenerateOptions {
    /// The pre-training run of the generator.
    pub generator: PathBuf,
    /// Which of its checkpoints.
    pub checkpoint: Which,
    /// The source of masks: a dataset folder or a folder of mask images.
    pub masks: PathBuf,
    /// Number of pairs to write.
    pub n: usize,
    /// Seed of the augmentations and dropout masks.
    pub seed: u64,
    /// The output folder (must not exist or be empty).
    pub out: PathBuf,
    /// Output layout.
    pub layout: OutputLayout,
    /// Images synthesised (and min-max normalised) together.
    pub batch_size: usize,
    /// Post-processing of the images.
    pub postprocess: PostChoice,
    /// The generator's BatchNorm statistics: the batch's own or the running ones.
    #[serde(default)]
    pub generator_norm: NormStatistics,
    /// Augment the masks (the GenSeg way) or paint them as they are.
    pub augment: bool,
}

/// Reads every mask of `dir` as `{0, 1}` images: the masks of a dataset folder (any layout
/// genseg-data detects) or, failing detection, every image file directly in `dir`.
pub fn read_masks(dir: &Path) -> Result<Vec<(String, GrayImage)>> {
    anyhow::ensure!(
        dir.is_dir(),
        "mask source {} is not a folder",
        dir.display()
    );
    let files: Vec<(String, PathBuf, MaskRule)> = match detect_layout(dir) {
        Ok(layout) => discover(dir, LayoutChoice::Auto)?
            .into_pairs()?
            .into_iter()
            .map(|p| (p.id, p.mask, MaskRule::default_for(layout)))
            .collect(),
        Err(_) => {
            let mut files = Vec::new();
            for entry in std::fs::read_dir(dir)
                .with_context(|| format!("listing mask folder {}", dir.display()))?
            {
                let path = entry
                    .with_context(|| format!("listing mask folder {}", dir.display()))?
                    .path();
                let ext = path
                    .extension()
                    .and_then(|e| e.to_str())
                    .map(str::to_ascii_lowercase);
                let stem = path.file_stem().and_then(|s| s.to_str()).map(String::from);
                if let (Some(ext), Some(stem)) = (ext, stem)
                    && path.is_file()
                    && IMAGE_EXTENSIONS.contains(&ext.as_str())
                {
                    files.push((stem, path, MaskRule::NonZero));
                }
            }
            files.sort_by(|a, b| a.1.cmp(&b.1));
            files
        }
    };
    anyhow::ensure!(
        !files.is_empty(),
        "{} holds no masks (neither a dataset folder nor a folder of mask images: {})",
        dir.display(),
        IMAGE_EXTENSIONS.join(", ")
    );
    files
        .into_iter()
        .map(|(id, path, rule)| {
            let values = MaskValues::read(&path)?;
            let binary = values.binarise(rule, &path)?;
            let image =
                GrayImage::from_raw(values.width, values.height, binary).with_context(|| {
                    format!("{}: mask buffer does not match its size", path.display())
                })?;
            Ok((id, image))
        })
        .collect()
}

/// What `generate` wrote.
#[derive(Debug, Clone)]
pub struct GenerateOutcome {
    /// Pairs written.
    pub n: usize,
    /// Masks read from the source.
    pub source_masks: usize,
    /// Side of the images.
    pub size: usize,
    /// Channels of the images.
    pub channels: usize,
}

/// Writes the synthetic dataset of `opts`.
pub fn generate(
    opts: &GenerateOptions,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<GenerateOutcome> {
    anyhow::ensure!(opts.n > 0, "--n must be at least 1");
    anyhow::ensure!(opts.batch_size > 0, "--batch-size must be at least 1");
    let created = !opts.out.exists();
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let outcome = generate_into(opts, device, observer);
    if outcome.is_err() && created {
        // A failure before anything was written leaves no empty --out behind (only when
        // empty: pairs already written stay, without generated.json).
        let _ = std::fs::remove_dir(&opts.out);
    }
    outcome
}

/// [`generate`] into the existing folder `opts.out`, claimed while it writes.
fn generate_into(
    opts: &GenerateOptions,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<GenerateOutcome> {
    // Claimed before the emptiness check, so two generates into one --out cannot both pass.
    let _lock = RunLock::acquire(&opts.out)?;
    let lock_name = std::ffi::OsStr::new(".lock");
    let mut entries =
        std::fs::read_dir(&opts.out).with_context(|| format!("reading {}", opts.out.display()))?;
    if entries.any(|e| e.is_ok_and(|e| e.file_name() != lock_name)) {
        bail!(
            "{} exists and is not empty: choose another --out",
            opts.out.display()
        );
    }
    let loaded = load_generator(&opts.generator, opts.checkpoint, device)?;
    let (size, channels) = (loaded.image_size(), loaded.channels());
    let generator_cfg = loaded.config.clone();
    let post = opts
        .postprocess
        .config(channels, generator_cfg.data.equalize_gamma);
    let synth = Synthesizer::new(loaded, post, opts.generator_norm, 0)?;
    let masks: Vec<GrayImage> = read_masks(&opts.masks)?
        .into_iter()
        .map(|(_, m)| resize_mask(&m, size as u32, size as u32))
        .collect();
    tracing::info!(
        "generating {} pair(s) of {size} px from {} mask(s) of {}",
        opts.n,
        masks.len(),
        opts.masks.display()
    );
    let width = opts.n.to_string().len().max(4);
    let id = |i: usize| format!("syn_{i:0width$}");
    let (image_dir, mask_dir) = match opts.layout {
        OutputLayout::Folder => Layout::Folder.folders(),
        OutputLayout::Nnunet => Layout::NnUnet.folders(),
    };
    let augmenter = genseg_masks::MaskAugmenter::new(genseg_masks::MaskAugmentConfig::default())?;
    observer.started(opts.n as u64, 0);
    let indices: Vec<usize> = (0..opts.n).collect();
    for (b, chunk) in indices.chunks(opts.batch_size).enumerate() {
        // Per-sample augmentation streams: a sample's mask does not depend on the batch size.
        let batch_masks: Vec<GrayImage> = chunk
            .iter()
            .map(|&i| {
                let m = &masks[i % masks.len()];
                if opts.augment {
                    augmenter.augment(m, &mut rng_for(opts.seed, Purpose::MaskAugment, i as u64))
                } else {
                    m.clone()
                }
            })
            .collect();
        let mask_tensor = masks_to_tensor(&batch_masks, device)?;
        let batch = synth.synthesize(
            &mask_tensor,
            None,
            &mut rng_for(opts.seed, Purpose::GeneratorDropout, b as u64),
            &mut rng_for(opts.seed, Purpose::PostProcess, b as u64),
        )?;
        let images = images_from_tensor(&batch.images)?;
        for ((&i, image), mask) in chunk.iter().zip(images).zip(&batch_masks) {
            let image = if channels == 1 {
                DynamicImage::ImageLuma8(DynamicImage::ImageRgb8(image).to_luma8())
            } else {
                DynamicImage::ImageRgb8(image)
            };
            let name = id(i);
            match opts.layout {
                OutputLayout::Folder => {
                    write_image(
                        &opts.out.join(image_dir).join(format!("{name}.png")),
                        &image,
                    )?;
                    write_mask_png(&opts.out.join(mask_dir).join(format!("{name}.png")), mask)?;
                }
                OutputLayout::Nnunet => {
                    write_image(
                        &opts.out.join(image_dir).join(format!("{name}_0000.png")),
                        &image,
                    )?;
                    let labels = GrayImage::from_fn(mask.width(), mask.height(), |x, y| {
                        image::Luma([u8::from(mask.get_pixel(x, y).0[0] > 0)])
                    });
                    write_image(
                        &opts.out.join(mask_dir).join(format!("{name}.png")),
                        &DynamicImage::ImageLuma8(labels),
                    )?;
                }
            }
        }
        observer.advanced(chunk.last().map_or(0, |&i| i as u64 + 1));
    }
    observer.finished();
    if opts.layout == OutputLayout::Nnunet {
        // One channel entry: the image is one PNG (grey or RGB), as genseg-data reads it.
        let dataset = json!({
            "channel_names": {"0": if channels == 1 { "gray" } else { "rgb" }},
            "labels": {"background": 0, "foreground": 1},
            "numTraining": opts.n,
            "file_ending": ".png",
            "name": "genseg-synthetic",
        });
        genseg_nn::checkpoint::write_atomic(
            &opts.out.join("dataset.json"),
            serde_json::to_string_pretty(&dataset)?.as_bytes(),
        )?;
    }
    let absolute = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let provenance = json!({
        "generator": absolute(&opts.generator),
        "checkpoint": absolute(&synth.loaded.checkpoint),
        "masks": absolute(&opts.masks),
        "n": opts.n,
        "seed": opts.seed,
        "augment": opts.augment,
        "batch_size": opts.batch_size,
        "postprocess": synth.post_config(),
        "generator_norm": opts.generator_norm,
        "size": size,
        "channels": channels,
    });
    genseg_nn::checkpoint::write_atomic(
        &opts.out.join("generated.json"),
        serde_json::to_string_pretty(&provenance)?.as_bytes(),
    )?;
    Ok(GenerateOutcome {
        n: opts.n,
        source_masks: masks.len(),
        size,
        channels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_come_from_datasets_or_plain_folders() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let plain = dir.path().join("plain");
        let mut m = GrayImage::new(6, 5);
        m.put_pixel(2, 2, image::Luma([255]));
        write_mask_png(&plain.join("b.png"), &m)?;
        write_mask_png(&plain.join("a.png"), &GrayImage::new(6, 5))?;
        let read = read_masks(&plain)?;
        assert_eq!(
            read.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(read[1].1.get_pixel(2, 2).0, [1]);

        let data = dir.path().join("data");
        genseg_data::phantom::write_phantoms(
            &data,
            &genseg_data::phantom::PhantomConfig::new(
                genseg_data::phantom::PhantomKind::Lungs,
                32,
                0,
            ),
            3,
        )?;
        let read = read_masks(&data)?;
        assert_eq!(read.len(), 3);
        assert!(read.iter().all(|(_, m)| m.pixels().all(|p| p.0[0] <= 1)));

        let err = read_masks(&dir.path().join("none"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("none"), "{err}");
        std::fs::create_dir(dir.path().join("empty"))?;
        assert!(read_masks(&dir.path().join("empty")).is_err());
        Ok(())
    }
}
