//! `genseg predict`: segments new images with a trained run. Each image is
//! preprocessed exactly as in training, the logits are resized (bilinear)
//! back to the image's original size and thresholded at probability 0.5;
//! the result is written as a 0/255 PNG mask plus an overlay.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use genseg_backbones::SegModel;
use genseg_data::dataset::preprocess_image;
use genseg_data::layout::IMAGE_EXTENSIONS;
use genseg_data::preprocess::decode;
use genseg_data::writer::{OverlayStyle, overlay, write_image, write_mask_png};
use genseg_nn::ops::resize_bilinear;
use image::{DynamicImage, GrayImage};

use crate::evaluate::load_run;
use crate::run_dir::Which;

/// The image files to segment: `input` itself, or the supported images in it
/// (sorted by name).
pub fn input_files(input: &Path) -> Result<Vec<PathBuf>> {
    if input.is_file() {
        return Ok(vec![input.to_path_buf()]);
    }
    let entries =
        std::fs::read_dir(input).with_context(|| format!("reading input {}", input.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!(
            "{} holds no image files ({})",
            input.display(),
            IMAGE_EXTENSIONS.join(", ")
        );
    }
    Ok(files)
}

/// The output name of each input file: its stem, or — where two inputs share a stem
/// (`a.png`, `a.jpg`) — its whole file name with the dot replaced (`a_png`, `a_jpg`), so
/// no prediction overwrites another.
pub fn output_names(files: &[PathBuf]) -> Vec<String> {
    let stem = |f: &PathBuf| {
        f.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into())
    };
    let mut count = std::collections::BTreeMap::<String, usize>::new();
    for f in files {
        *count.entry(stem(f)).or_default() += 1;
    }
    files
        .iter()
        .map(|f| {
            let s = stem(f);
            if count[&s] > 1 {
                f.file_name()
                    .map(|n| n.to_string_lossy().replace('.', "_"))
                    .unwrap_or(s)
            } else {
                s
            }
        })
        .collect()
}

/// Segments every image of `input` into `out/masks` and `out/overlays`;
/// returns the number of images.
pub fn predict(
    run_dir: &Path,
    which: Which,
    input: &Path,
    out: &Path,
    device: &Device,
) -> Result<usize> {
    let loaded = load_run(run_dir, which, device)?;
    let data_cfg = loaded.cfg.data.data_config()?;
    let channels = loaded.cfg.model.in_channels();
    let files = input_files(input)?;
    let names = output_names(&files);
    for (file, name) in files.iter().zip(&names) {
        let image = decode(file)?;
        let mask = segment(&loaded.model, &image, &data_cfg, channels, device)
            .with_context(|| format!("segmenting {}", file.display()))?;
        write_mask_png(&out.join("masks").join(format!("{name}.png")), &mask)?;
        let drawn = overlay(&image.to_rgb8(), &mask, OverlayStyle::default())?;
        write_image(
            &out.join("overlays").join(format!("{name}.png")),
            &DynamicImage::ImageRgb8(drawn),
        )?;
    }
    Ok(files.len())
}

/// The binary mask (0/255) of one decoded image at its original size.
pub fn segment(
    model: &dyn SegModel,
    image: &DynamicImage,
    data_cfg: &genseg_data::dataset::DataConfig,
    channels: usize,
    device: &Device,
) -> Result<GrayImage> {
    let (w0, h0) = (image.width(), image.height());
    let (chw, w, h) = preprocess_image(image, data_cfg, channels);
    // [C*H*W] bytes -> [1, C, H, W] in [0, 1]
    let x = (Tensor::from_vec(chw, (1, channels, h as usize, w as usize), device)?
        .to_dtype(DType::F32)?
        / 255.0)?;
    let logits = model.forward_t(&x, false)?;
    let logits = resize_bilinear(&logits, h0 as usize, w0 as usize, false)?;
    let values = logits.flatten_all()?.to_vec1::<f32>()?;
    let pixels = values
        .into_iter()
        .map(|v| if v > 0.0 { 255u8 } else { 0 })
        .collect();
    GrayImage::from_raw(w0, h0, pixels).context("mask buffer size")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_sharing_a_stem_get_distinct_outputs() {
        let files: Vec<PathBuf> = ["x/a.png", "x/a.jpg", "x/b.png"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(output_names(&files), ["a_png", "a_jpg", "b"]);
    }
}
