//! The in-memory dataset: every pair decoded once (in parallel), preprocessed, kept as 8-bit
//! planes, and served as candle tensors by [`Dataset::batch`].
//!
//! The datasets of the ultra-low-data regime are tiny (and even a thousand 256x256 RGB pairs are
//! ~260 MB as bytes), so the cache is simply all of it. Pixels are stored as `u8` because the
//! reference's PIL pipeline is 8-bit throughout (resize output included); conversion to f32 in
//! [0, 1] happens per batch.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::{DynamicImage, GrayImage};
use rayon::prelude::*;

use crate::error::{DataError, Result};
use crate::layout::{Layout, LayoutChoice, SamplePair, discover};
use crate::preprocess::{
    ChannelPolicy, ImageFilter, MaskRule, colour_channels, decode, equalize, gamma,
    read_binary_mask, resize_image, resize_mask, to_channels,
};

/// A width x height pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageSize {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

impl ImageSize {
    /// A square size, e.g. the reference's 256 x 256.
    pub fn square(side: u32) -> Self {
        ImageSize {
            width: side,
            height: side,
        }
    }
}

/// How a dataset folder is read and preprocessed.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// The layout, detected by default.
    pub layout: LayoutChoice,
    /// Target size of images and masks; `None` keeps the files' size, which must then be uniform.
    pub size: Option<ImageSize>,
    /// Interpolation for images (masks always use nearest).
    pub image_filter: ImageFilter,
    /// How channel counts are unified.
    pub channels: ChannelPolicy,
    /// How masks are binarised; `None` uses [`MaskRule::default_for`] the layout.
    pub mask_rule: Option<MaskRule>,
    /// `Some(g)`: histogram equalisation then gamma `g` on images before resizing (the reference's
    /// X-ray preprocessing uses 0.5, spec §5).
    pub equalize_gamma: Option<f32>,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            layout: LayoutChoice::Auto,
            size: None,
            image_filter: ImageFilter::Bicubic,
            channels: ChannelPolicy::Strict,
            mask_rule: None,
            equalize_gamma: None,
        }
    }
}

/// One preprocessed example.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The example's id (file stem or nnU-Net case).
    pub id: String,
    /// Image values, channel-major `[C, H, W]`.
    pub image: Vec<u8>,
    /// Mask values in {0, 1}, `[H, W]`.
    pub mask: Vec<u8>,
    /// The files it was read from (`None` for generated samples).
    pub source: Option<SamplePair>,
}

/// A labelled dataset held in memory, all samples of one size and channel count.
#[derive(Debug, Clone)]
pub struct Dataset {
    root: Option<PathBuf>,
    layout: Option<Layout>,
    /// The rule the masks were binarised by (None for samples built in memory).
    mask_rule: Option<MaskRule>,
    channels: usize,
    size: ImageSize,
    samples: Vec<Sample>,
}

/// A decoded pair before the dataset-wide checks (channels, size).
struct Decoded {
    channels: usize,
    width: u32,
    height: u32,
    sample: Sample,
}

/// Decodes and preprocesses one pair; `channels` is the target count (None keeps the native one).
fn load_pair(
    pair: &SamplePair,
    config: &DataConfig,
    rule: MaskRule,
    channels: Option<usize>,
) -> Result<Decoded> {
    let image = decode(&pair.image)?;
    let mut mask_image = read_binary_mask(&pair.mask, rule)?;
    if mask_image.dimensions() != (image.width(), image.height()) {
        return Err(DataError::MaskSizeMismatch {
            mask: pair.mask.clone(),
            image: pair.image.clone(),
            mask_w: mask_image.width(),
            mask_h: mask_image.height(),
            image_w: image.width(),
            image_h: image.height(),
        });
    }
    let channels = channels.unwrap_or_else(|| colour_channels(&image));
    let (image, width, height) = preprocess_image(&image, config, channels);
    if let Some(size) = config.size {
        mask_image = resize_mask(&mask_image, size.width, size.height);
    }
    Ok(Decoded {
        channels,
        width,
        height,
        sample: Sample {
            id: pair.id.clone(),
            image,
            mask: mask_image.into_raw(),
            source: Some(pair.clone()),
        },
    })
}

/// The image half of the loader's preprocessing, for images without masks (prediction): converts
/// to `channels` (1 or 3), applies equalisation + gamma and resizing as `config` says, and returns
/// the `[C, H, W]` bytes with the resulting width and height.
pub fn preprocess_image(
    image: &DynamicImage,
    config: &DataConfig,
    channels: usize,
) -> (Vec<u8>, u32, u32) {
    let mut image = to_channels(image, channels);
    if let Some(g) = config.equalize_gamma {
        // to_channels returns 8-bit luma or RGB, so exactly one branch applies.
        if let Some(b) = image.as_mut_luma8() {
            equalize(b);
            gamma(b, g);
        }
        if let Some(b) = image.as_mut_rgb8() {
            equalize(b);
            gamma(b, g);
        }
    }
    if let Some(size) = config.size {
        image = resize_image(&image, size.width, size.height, config.image_filter);
    }
    let (width, height) = (image.width(), image.height());
    let channels = colour_channels(&image);
    (hwc_to_chw(image.as_bytes(), channels), width, height)
}

/// `[H, W, C]` interleaved bytes -> `[C, H, W]` planes.
fn hwc_to_chw(hwc: &[u8], channels: usize) -> Vec<u8> {
    if channels == 1 {
        return hwc.to_vec();
    }
    let pixels = hwc.len() / channels;
    let mut chw = vec![0u8; hwc.len()];
    for (p, px) in hwc.chunks_exact(channels).enumerate() {
        for (c, &v) in px.iter().enumerate() {
            chw[c * pixels + p] = v;
        }
    }
    chw
}

impl Dataset {
    /// Reads, pairs, decodes (in parallel) and preprocesses every pair of a dataset folder.
    ///
    /// Fails on the first problem in id order (missing mask, undecodable file, size mismatch,
    /// non-binary mask, mixed channels or sizes), naming the file.
    pub fn load(dir: &Path, config: &DataConfig) -> Result<Self> {
        let discovery = discover(dir, config.layout)?;
        let layout = discovery.layout;
        let pairs = discovery.into_pairs()?;
        let mut dataset = Self::from_pairs(&pairs, config, MaskRule::default_for(layout))?;
        dataset.root = Some(dir.to_path_buf());
        dataset.layout = Some(layout);
        tracing::debug!(
            dir = %dir.display(),
            %layout,
            pairs = dataset.len(),
            channels = dataset.channels,
            width = dataset.size.width,
            height = dataset.size.height,
            "dataset loaded"
        );
        Ok(dataset)
    }

    /// Decodes and preprocesses the given pairs; `default_rule` binarises masks when
    /// `config.mask_rule` is `None`.
    pub fn from_pairs(
        pairs: &[SamplePair],
        config: &DataConfig,
        default_rule: MaskRule,
    ) -> Result<Self> {
        if let Some(size) = config.size
            && (size.width == 0 || size.height == 0)
        {
            return Err(DataError::Config(format!(
                "target size {}x{} has a zero side",
                size.width, size.height
            )));
        }
        if let Some(g) = config.equalize_gamma
            && !(g.is_finite() && g > 0.0)
        {
            return Err(DataError::Config(format!(
                "gamma {g} must be a positive number"
            )));
        }
        let rule = config.mask_rule.unwrap_or(default_rule).validate()?;
        let target = match config.channels {
            ChannelPolicy::Strict => None,
            ChannelPolicy::Gray => Some(1),
            ChannelPolicy::Rgb => Some(3),
        };
        let decoded: Vec<Result<Decoded>> = pairs
            .par_iter()
            .map(|pair| load_pair(pair, config, rule, target))
            .collect();
        let decoded = decoded.into_iter().collect::<Result<Vec<_>>>()?;
        let Some(first) = decoded.first() else {
            return Err(DataError::Config("no pairs to load".into()));
        };
        let (channels, width, height) = (first.channels, first.width, first.height);
        let first_path = pairs[0].image.clone();
        for (d, pair) in decoded.iter().zip(pairs) {
            if d.channels != channels {
                return Err(DataError::MixedChannels {
                    path: pair.image.clone(),
                    channels: d.channels,
                    first: first_path,
                    expected: channels,
                });
            }
            if (d.width, d.height) != (width, height) {
                return Err(DataError::MixedSizes {
                    path: pair.image.clone(),
                    width: d.width,
                    height: d.height,
                    first: first_path,
                    expected_w: width,
                    expected_h: height,
                });
            }
        }
        let mut dataset = Self::from_samples(
            decoded.into_iter().map(|d| d.sample).collect(),
            channels,
            ImageSize { width, height },
        )?;
        dataset.mask_rule = Some(rule);
        Ok(dataset)
    }

    /// Builds a dataset from samples already in memory (e.g. phantoms), checking every buffer's
    /// length against `channels` and `size`, and that masks hold only 0 and 1.
    pub fn from_samples(samples: Vec<Sample>, channels: usize, size: ImageSize) -> Result<Self> {
        if channels != 1 && channels != 3 {
            return Err(DataError::Config(format!(
                "{channels} channels; expected 1 or 3"
            )));
        }
        let pixels = size.width as usize * size.height as usize;
        for s in &samples {
            if s.image.len() != channels * pixels || s.mask.len() != pixels {
                return Err(DataError::Config(format!(
                    "sample {:?}: image has {} values and mask {}, expected {} and {} for {channels}x{}x{}",
                    s.id,
                    s.image.len(),
                    s.mask.len(),
                    channels * pixels,
                    pixels,
                    size.height,
                    size.width
                )));
            }
            if s.mask.iter().any(|&v| v > 1) {
                return Err(DataError::Config(format!(
                    "sample {:?}: mask values must be 0 or 1",
                    s.id
                )));
            }
        }
        Ok(Dataset {
            root: None,
            layout: None,
            mask_rule: None,
            channels,
            size,
            samples,
        })
    }

    /// The folder it was loaded from, if any.
    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// The layout it was loaded with, if loaded from disk.
    pub fn layout(&self) -> Option<Layout> {
        self.layout
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Channels of every image (1 or 3).
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Size of every image and mask.
    pub fn size(&self) -> ImageSize {
        self.size
    }

    /// All samples, sorted by id for datasets read from disk.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// The ids, in sample order.
    pub fn ids(&self) -> Vec<String> {
        self.samples.iter().map(|s| s.id.clone()).collect()
    }

    /// The sample indices of `ids` (e.g. a split's train list); an error names an unknown id.
    pub fn indices_of(&self, ids: &[String]) -> Result<Vec<usize>> {
        let by_id: std::collections::HashMap<&str, usize> = self
            .samples
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.as_str(), i))
            .collect();
        ids.iter()
            .map(|id| {
                by_id.get(id.as_str()).copied().ok_or_else(|| {
                    DataError::Split(format!(
                        "id {id:?} is not in the dataset{}",
                        self.root
                            .as_ref()
                            .map(|r| format!(" {}", r.display()))
                            .unwrap_or_default()
                    ))
                })
            })
            .collect()
    }

    /// A new dataset holding the samples at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Result<Dataset> {
        let samples = indices
            .iter()
            .map(|&i| {
                self.samples.get(i).cloned().ok_or_else(|| {
                    DataError::Config(format!(
                        "sample index {i} out of range for a dataset of {}",
                        self.len()
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Dataset {
            root: self.root.clone(),
            layout: self.layout,
            mask_rule: self.mask_rule,
            channels: self.channels,
            size: self.size,
            samples,
        })
    }

    /// The samples at `indices` as tensors: images `[B, C, H, W]` f32 in [0, 1] and masks
    /// `[B, 1, H, W]` f32 in {0, 1}.
    pub fn batch(
        &self,
        indices: &[usize],
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (images, masks) = self.batch_values(indices)?;
        self.batch_tensors(images, masks, device)
    }

    /// The values of [`Dataset::batch`] before they become tensors (for CPU-side
    /// augmentation): images `[B, C, H, W]` in [0, 1], masks `[B, H, W]` in {0, 1}.
    pub fn batch_values(&self, indices: &[usize]) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
        if indices.is_empty() {
            candle_core::bail!("batch: no sample indices given");
        }
        let (c, h, w) = self.chw();
        let mut images = Vec::with_capacity(indices.len() * c * h * w);
        let mut masks = Vec::with_capacity(indices.len() * h * w);
        for &i in indices {
            let Some(s) = self.samples.get(i) else {
                candle_core::bail!(
                    "batch: sample index {i} out of range for a dataset of {}",
                    self.len()
                );
            };
            images.extend(s.image.iter().map(|&v| f32::from(v) / 255.0));
            masks.extend(s.mask.iter().map(|&v| f32::from(v)));
        }
        Ok((images, masks))
    }

    /// Batch values of this dataset's shape (from [`Dataset::batch_values`]) as tensors.
    pub fn batch_tensors(
        &self,
        images: Vec<f32>,
        masks: Vec<f32>,
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (c, h, w) = self.chw();
        let b = masks.len() / (h * w).max(1);
        Ok((
            Tensor::from_vec(images, (b, c, h, w), device)?,
            Tensor::from_vec(masks, (b, 1, h, w), device)?,
        ))
    }

    /// Sample `i`'s image as RGB (a gray image repeated to three channels), for figures.
    pub fn rgb_image(&self, i: usize) -> Result<image::RgbImage> {
        let s = self.sample(i)?;
        let (c, h, w) = self.chw();
        let plane = h * w;
        Ok(image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
            let p = y as usize * w + x as usize;
            image::Rgb(std::array::from_fn(|k| s.image[k.min(c - 1) * plane + p]))
        }))
    }

    /// Sample `i`'s mask as a {0, 255} gray image, for figures.
    pub fn mask_image(&self, i: usize) -> Result<GrayImage> {
        let s = self.sample(i)?;
        GrayImage::from_raw(
            self.size.width,
            self.size.height,
            s.mask
                .iter()
                .map(|&v| if v > 0 { 255 } else { 0 })
                .collect(),
        )
        .ok_or_else(|| DataError::Config(format!("sample {}: mask does not match the size", s.id)))
    }

    /// Sample `i`'s truth as its mask file holds it, at the file's own size (before any
    /// resizing), binarised to {0, 1} by the rule the dataset was loaded with: what a score at
    /// the image's own resolution compares against.
    pub fn source_mask(&self, i: usize) -> Result<GrayImage> {
        let s = self.sample(i)?;
        match (&s.source, self.mask_rule) {
            (Some(pair), Some(rule)) => read_binary_mask(&pair.mask, rule),
            _ => Err(DataError::Config(format!(
                "sample {}: built in memory, so it has no mask file at its own size",
                s.id
            ))),
        }
    }

    fn sample(&self, i: usize) -> Result<&Sample> {
        self.samples.get(i).ok_or_else(|| {
            DataError::Config(format!(
                "sample index {i} out of range for a dataset of {}",
                self.len()
            ))
        })
    }

    /// `(channels, height, width)` of every image.
    pub fn chw(&self) -> (usize, usize, usize) {
        (
            self.channels,
            self.size.height as usize,
            self.size.width as usize,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{DynamicImage, GrayImage, Luma, Rgb, RgbImage, Rgba, RgbaImage};

    fn save(path: &Path, image: &DynamicImage) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image.save(path).unwrap();
    }

    fn gray(w: u32, h: u32, f: impl Fn(u32, u32) -> u8) -> DynamicImage {
        DynamicImage::ImageLuma8(GrayImage::from_fn(w, h, |x, y| Luma([f(x, y)])))
    }

    /// Left half foreground, values 0/255.
    fn half_mask(w: u32, h: u32) -> DynamicImage {
        gray(w, h, |x, _| if x < w / 2 { 255 } else { 0 })
    }

    #[test]
    fn folder_layout_loads_gray_images_and_binary_masks_as_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for id in ["b", "a"] {
            save(
                &d.join(format!("images/{id}.png")),
                &gray(4, 3, |x, y| (10 * x + y) as u8),
            );
            save(&d.join(format!("masks/{id}.png")), &half_mask(4, 3));
        }
        let data = Dataset::load(d, &DataConfig::default()).unwrap();
        assert_eq!(data.ids(), ["a", "b"]);
        assert_eq!(
            (data.channels(), data.size()),
            (
                1,
                ImageSize {
                    width: 4,
                    height: 3
                }
            )
        );
        let (images, masks) = data.batch(&[1, 0, 1], &Device::Cpu).unwrap();
        assert_eq!(images.dims(), &[3, 1, 3, 4]);
        assert_eq!(masks.dims(), &[3, 1, 3, 4]);
        let px = images
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(px[2][3], 32.0 / 255.0);
        let m = masks
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(m[0], [1.0, 1.0, 0.0, 0.0]);
        assert!(
            data.batch(&[2], &Device::Cpu)
                .unwrap_err()
                .to_string()
                .contains("out of range")
        );
        assert!(data.batch(&[], &Device::Cpu).is_err());
        assert_eq!(data.indices_of(&["b".into()]).unwrap(), [1]);
        assert!(
            data.indices_of(&["zz".into()])
                .unwrap_err()
                .to_string()
                .contains("zz")
        );
        assert_eq!(data.subset(&[1]).unwrap().ids(), ["b"]);
    }

    #[test]
    fn rgba_drops_alpha_and_channel_layout_is_chw() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let rgba = RgbaImage::from_pixel(2, 2, Rgba([10, 20, 30, 0]));
        save(&d.join("images/x.png"), &DynamicImage::ImageRgba8(rgba));
        save(&d.join("masks/x.png"), &half_mask(2, 2));
        let data = Dataset::load(d, &DataConfig::default()).unwrap();
        assert_eq!(data.channels(), 3);
        assert_eq!(
            data.samples()[0].image,
            [10, 10, 10, 10, 20, 20, 20, 20, 30, 30, 30, 30]
        );
    }

    #[test]
    fn mixed_channels_are_an_error_or_converted_as_configured() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        save(&d.join("images/a.png"), &gray(3, 3, |_, _| 100));
        let rgb = RgbImage::from_pixel(3, 3, Rgb([200, 100, 0]));
        save(&d.join("images/b.png"), &DynamicImage::ImageRgb8(rgb));
        for id in ["a", "b"] {
            save(&d.join(format!("masks/{id}.png")), &half_mask(3, 3));
        }
        let err = Dataset::load(d, &DataConfig::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("b.png") && err.contains("mixes channel counts"),
            "{err}"
        );
        let gray_cfg = DataConfig {
            channels: ChannelPolicy::Gray,
            ..DataConfig::default()
        };
        assert_eq!(Dataset::load(d, &gray_cfg).unwrap().channels(), 1);
        let rgb_cfg = DataConfig {
            channels: ChannelPolicy::Rgb,
            ..DataConfig::default()
        };
        let data = Dataset::load(d, &rgb_cfg).unwrap();
        assert_eq!(data.channels(), 3);
        assert_eq!(data.samples()[0].image[..9], [100; 9]);
    }

    #[test]
    fn resizing_unifies_sizes_and_keeps_masks_binary() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        save(&d.join("images/a.png"), &gray(10, 6, |x, _| (x * 25) as u8));
        save(&d.join("masks/a.png"), &half_mask(10, 6));
        save(&d.join("images/b.png"), &gray(4, 4, |_, y| (y * 60) as u8));
        save(&d.join("masks/b.png"), &half_mask(4, 4));
        let err = Dataset::load(d, &DataConfig::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("b.png") && err.contains("set a target size"),
            "{err}"
        );
        for filter in [ImageFilter::Bilinear, ImageFilter::Bicubic] {
            let cfg = DataConfig {
                size: Some(ImageSize::square(8)),
                image_filter: filter,
                ..DataConfig::default()
            };
            let data = Dataset::load(d, &cfg).unwrap();
            assert_eq!(data.size(), ImageSize::square(8));
            for s in data.samples() {
                assert_eq!(s.mask.len(), 64);
                assert!(s.mask.iter().all(|&v| v <= 1));
                assert_eq!(s.mask.iter().filter(|&&v| v == 1).count(), 32);
            }
            // The truth at each file's own size survives the resize, and a subset keeps it.
            let b = data.subset(&[1]).unwrap().source_mask(0).unwrap();
            assert_eq!(b.dimensions(), (4, 4));
            assert_eq!(b.as_raw()[..4], [1, 1, 0, 0]);
            assert_eq!(data.source_mask(0).unwrap().dimensions(), (10, 6));
        }
        let built = Dataset::from_samples(
            vec![Sample {
                id: "mem".into(),
                image: vec![0; 4],
                mask: vec![0; 4],
                source: None,
            }],
            1,
            ImageSize::square(2),
        )
        .unwrap();
        let err = built.source_mask(0).unwrap_err().to_string();
        assert!(err.contains("mem") && err.contains("own size"), "{err}");
    }

    #[test]
    fn genseg_layout_reads_gif_masks_and_jpeg_images() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let rgb = RgbImage::from_fn(8, 8, |x, y| Rgb([(x * 30) as u8, (y * 30) as u8, 90]));
        save(&d.join("Images/ISIC_1.jpg"), &DynamicImage::ImageRgb8(rgb));
        // GIF stores palette colours: the decoder returns RGBA, reduced to luma for masks.
        let gif = DynamicImage::ImageRgba8(half_mask(8, 8).to_rgba8());
        save(&d.join("Masks/ISIC_1_segmentation.gif"), &gif);
        let data = Dataset::load(d, &DataConfig::default()).unwrap();
        assert_eq!(data.layout(), Some(Layout::GenSeg));
        assert_eq!(data.channels(), 3);
        let mask = &data.samples()[0].mask;
        assert_eq!(mask.iter().filter(|&&v| v == 1).count(), 32);
        assert_eq!(mask[..8], [1, 1, 1, 1, 0, 0, 0, 0]);
    }

    #[test]
    fn nnunet_labels_are_foreground_above_zero_unless_one_is_chosen() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("dataset.json"),
            r#"{"channel_names": {"0": "xray"}, "labels": {"background": 0, "left": 1, "right": 2}, "numTraining": 1, "file_ending": ".png"}"#,
        )
        .unwrap();
        save(&d.join("imagesTr/c1_0000.png"), &gray(3, 1, |_, _| 50));
        save(&d.join("labelsTr/c1.png"), &gray(3, 1, |x, _| x as u8));
        let data = Dataset::load(d, &DataConfig::default()).unwrap();
        assert_eq!(data.samples()[0].mask, [0, 1, 1]);
        let cfg = DataConfig {
            mask_rule: Some(MaskRule::Label(2)),
            ..DataConfig::default()
        };
        let one_label = Dataset::load(d, &cfg).unwrap();
        assert_eq!(one_label.samples()[0].mask, [0, 0, 1]);
        // The truth at the file's own size is binarised by the same rule.
        assert_eq!(one_label.source_mask(0).unwrap().into_raw(), [0, 0, 1]);
    }

    #[test]
    fn non_binary_masks_need_a_threshold() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        save(&d.join("images/a.png"), &gray(3, 1, |_, _| 50));
        save(
            &d.join("masks/a.png"),
            &gray(3, 1, |x, _| [0, 20, 200][x as usize]),
        );
        let err = Dataset::load(d, &DataConfig::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("masks/a.png") && err.contains("non-binary"),
            "{err}"
        );
        let cfg = DataConfig {
            mask_rule: Some(MaskRule::Threshold(0.1)),
            ..DataConfig::default()
        };
        assert_eq!(Dataset::load(d, &cfg).unwrap().samples()[0].mask, [0, 0, 1]);
    }

    #[test]
    fn equalize_gamma_is_applied_before_batching() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // 32x32 with two gray levels: equalisation spreads them, gamma 0.5 brightens.
        save(
            &d.join("images/a.png"),
            &gray(32, 32, |x, _| if x < 16 { 60 } else { 70 }),
        );
        save(&d.join("masks/a.png"), &half_mask(32, 32));
        let plain = Dataset::load(d, &DataConfig::default()).unwrap();
        let cfg = DataConfig {
            equalize_gamma: Some(0.5),
            ..DataConfig::default()
        };
        let eq = Dataset::load(d, &cfg).unwrap();
        assert_eq!(plain.samples()[0].image[0], 60);
        // PIL: step = (1024 - 512) / 256 = 2, lut[60] = 1 / 2 = 0, lut[70] = (1 + 512) / 2 = 256 -> 255.
        assert_eq!(eq.samples()[0].image[0], 0);
        assert_eq!(eq.samples()[0].image[31], 255);
    }

    #[test]
    fn truncated_and_mismatched_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        save(&d.join("images/a.png"), &gray(4, 4, |_, _| 1));
        save(&d.join("masks/a.png"), &half_mask(5, 4));
        let err = Dataset::load(d, &DataConfig::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("masks/a.png") && err.contains("5x4") && err.contains("4x4"),
            "{err}"
        );
        let bytes = std::fs::read(d.join("images/a.png")).unwrap();
        std::fs::write(d.join("images/a.png"), &bytes[..bytes.len() / 2]).unwrap();
        let err = Dataset::load(d, &DataConfig::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("images/a.png") && err.contains("cannot decode"),
            "{err}"
        );
    }

    #[test]
    fn from_samples_checks_buffer_lengths_and_mask_values() {
        let s = Sample {
            id: "x".into(),
            image: vec![0; 4],
            mask: vec![0, 1, 2, 0],
            source: None,
        };
        let size = ImageSize {
            width: 2,
            height: 2,
        };
        assert!(
            Dataset::from_samples(vec![s.clone()], 1, size)
                .unwrap_err()
                .to_string()
                .contains("0 or 1")
        );
        assert!(Dataset::from_samples(vec![s.clone()], 3, size).is_err());
        assert!(Dataset::from_samples(vec![s], 2, size).is_err());
    }

    #[test]
    fn figures_show_a_sample_as_rgb_and_its_mask_as_0_or_255() {
        let size = ImageSize {
            width: 3,
            height: 2,
        };
        let s = Sample {
            id: "x".into(),
            image: vec![0, 10, 20, 30, 40, 50],
            mask: vec![0, 1, 1, 0, 0, 1],
            source: None,
        };
        let data = Dataset::from_samples(vec![s], 1, size).unwrap();
        let rgb = data.rgb_image(0).unwrap();
        assert_eq!(rgb.dimensions(), (3, 2));
        assert_eq!(rgb.get_pixel(1, 1).0, [40, 40, 40]);
        let mask = data.mask_image(0).unwrap();
        assert_eq!(mask.as_raw(), &vec![0, 255, 255, 0, 0, 255]);
        let err = data.rgb_image(1).unwrap_err().to_string();
        assert!(err.contains("index 1 out of range"), "{err}");
        let colour = Sample {
            id: "c".into(),
            image: (0..18).collect(),
            mask: vec![0; 6],
            source: None,
        };
        let data = Dataset::from_samples(vec![colour], 3, size).unwrap();
        assert_eq!(data.rgb_image(0).unwrap().get_pixel(2, 0).0, [2, 8, 14]);
    }
}
