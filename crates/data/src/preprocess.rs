//! Decoding and preprocessing of one image/mask pair: the explicit policies of the crate.
//!
//! * Channels ([`ChannelPolicy`]): grayscale stays one channel, RGB three, an alpha channel is
//!   dropped; a dataset mixing channel counts is an error ([`ChannelPolicy::Strict`]) or converted
//!   to one or three channels.
//! * Masks ([`MaskRule`]): decoded to raw integer values ([`MaskValues`]) and binarised to {0, 1}
//!   by a documented rule: strictly binary masks (at most two distinct values, foreground = non-zero),
//!   a threshold on the value scaled to [0, 1], one nnU-Net label, or any non-zero label.
//! * Resizing ([`ImageFilter`]): bilinear or bicubic for images, nearest for masks, always after
//!   binarisation so a mask stays binary.
//! * X-ray preprocessing ([`equalize`], [`gamma`]): PIL's `ImageOps.equalize` then gamma, as the
//!   reference's JSRT loader does (spec §5), on 8-bit values, as PIL does.

use std::collections::BTreeMap;
use std::path::Path;

use image::{DynamicImage, GrayImage, ImageBuffer, Pixel, imageops::FilterType};

use crate::error::{DataError, Result};
use crate::layout::Layout;

/// How images of different channel counts are brought to one count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelPolicy {
    /// Keep each image's own count (1 for gray, 3 for colour; alpha dropped); an error naming the
    /// file when the dataset mixes counts.
    #[default]
    Strict,
    /// Convert every image to one channel (luma).
    Gray,
    /// Convert every image to three channels (gray replicated).
    Rgb,
}

impl std::str::FromStr for ChannelPolicy {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "strict" => Ok(ChannelPolicy::Strict),
            "gray" | "grey" => Ok(ChannelPolicy::Gray),
            "rgb" => Ok(ChannelPolicy::Rgb),
            _ => Err(format!(
                "unknown channel policy {s:?} (expected strict, gray or rgb)"
            )),
        }
    }
}

/// Interpolation used to resize images (masks always use nearest neighbour).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFilter {
    /// Bilinear (triangle filter).
    Bilinear,
    /// Bicubic (Catmull-Rom), PIL's default for the reference's resize.
    #[default]
    Bicubic,
}

impl ImageFilter {
    fn filter_type(self) -> FilterType {
        match self {
            ImageFilter::Bilinear => FilterType::Triangle,
            ImageFilter::Bicubic => FilterType::CatmullRom,
        }
    }
}

/// How a decoded mask becomes a binary {0, 1} mask.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MaskRule {
    /// At most two distinct values (0/255, 0/1, ...), foreground = non-zero; more values are an
    /// error naming the file. The default of the folder and GenSeg layouts.
    #[default]
    Binary,
    /// Foreground = value / max > t, with max the largest value of the file's bit depth (255 for
    /// 8-bit files), t in [0, 1). Any number of distinct values is accepted.
    Threshold(f32),
    /// Foreground = value == label (nnU-Net label maps).
    Label(u16),
    /// Foreground = value > 0, any number of values (the nnU-Net default: all labels but background).
    NonZero,
}

impl MaskRule {
    /// The rule used when none is configured: [`MaskRule::NonZero`] for nnU-Net label maps,
    /// [`MaskRule::Binary`] otherwise.
    pub fn default_for(layout: Layout) -> Self {
        match layout {
            Layout::NnUnet => MaskRule::NonZero,
            Layout::Folder | Layout::GenSeg => MaskRule::Binary,
        }
    }

    /// Checks that a threshold lies in [0, 1).
    pub fn validate(self) -> Result<Self> {
        match self {
            MaskRule::Threshold(t) if !(0.0..1.0).contains(&t) => Err(DataError::Config(format!(
                "mask threshold {t} is outside [0, 1) (it applies to the value scaled to [0, 1])"
            ))),
            rule => Ok(rule),
        }
    }
}

/// Decodes any supported image file, guessing the format from its content.
pub fn decode(path: &Path) -> Result<DynamicImage> {
    let decode_err = |source| DataError::Decode {
        path: path.to_path_buf(),
        source,
    };
    image::ImageReader::open(path)
        .map_err(|e| DataError::io(path, e))?
        .with_guessed_format()
        .map_err(|e| DataError::io(path, e))?
        .decode()
        .map_err(decode_err)
}

/// Number of colour channels of an image, alpha not counted (1 or 3).
pub fn colour_channels(image: &DynamicImage) -> usize {
    if image.color().has_color() { 3 } else { 1 }
}

/// Converts an image to 8-bit luma (`channels == 1`) or RGB (`channels == 3`), dropping alpha.
pub fn to_channels(image: &DynamicImage, channels: usize) -> DynamicImage {
    match (channels, image) {
        (1, DynamicImage::ImageLuma8(_)) | (3, DynamicImage::ImageRgb8(_)) => image.clone(),
        (1, _) => DynamicImage::ImageLuma8(image.to_luma8()),
        _ => DynamicImage::ImageRgb8(image.to_rgb8()),
    }
}

/// A decoded mask: raw integer values (row-major) and the largest value of its bit depth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskValues {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// One value per pixel, row-major.
    pub values: Vec<u16>,
    /// 255 for 8-bit files, 65535 for 16-bit ones.
    pub max: u16,
}

impl MaskValues {
    /// Takes the values of a decoded mask: gray files keep their raw values (so nnU-Net labels stay
    /// 0, 1, 2, ...), colour files (GIF, palette PNG, RGB) are reduced to luma.
    pub fn from_image(image: &DynamicImage) -> Self {
        let (width, height) = (image.width(), image.height());
        let (values, max) = match image {
            DynamicImage::ImageLuma8(b) => {
                (b.as_raw().iter().map(|&v| u16::from(v)).collect(), 255)
            }
            DynamicImage::ImageLumaA8(b) => (b.pixels().map(|p| u16::from(p.0[0])).collect(), 255),
            DynamicImage::ImageLuma16(b) => (b.as_raw().clone(), u16::MAX),
            DynamicImage::ImageLumaA16(b) => (b.pixels().map(|p| p.0[0]).collect(), u16::MAX),
            DynamicImage::ImageRgb16(_) | DynamicImage::ImageRgba16(_) => {
                (image.to_luma16().into_raw(), u16::MAX)
            }
            _ => (
                image
                    .to_luma8()
                    .as_raw()
                    .iter()
                    .map(|&v| u16::from(v))
                    .collect(),
                255,
            ),
        };
        MaskValues {
            width,
            height,
            values,
            max,
        }
    }

    /// Decodes a mask file.
    pub fn read(path: &Path) -> Result<Self> {
        Ok(Self::from_image(&decode(path)?))
    }

    /// Pixel count of each distinct value.
    pub fn histogram(&self) -> BTreeMap<u16, u64> {
        let mut counts =
            vec![
                0u64;
                usize::from(self.max.max(self.values.iter().copied().max().unwrap_or(0))) + 1
            ];
        for &v in &self.values {
            counts[usize::from(v)] += 1;
        }
        counts
            .into_iter()
            .enumerate()
            .filter(|&(_, c)| c > 0)
            .map(|(v, c)| (v as u16, c))
            .collect()
    }

    /// Binarises to {0, 1} by `rule`; `path` names the file in the error of a non-binary mask.
    pub fn binarise(&self, rule: MaskRule, path: &Path) -> Result<Vec<u8>> {
        let fg = |keep: bool| u8::from(keep);
        Ok(match rule {
            MaskRule::Binary => {
                let histogram = self.histogram();
                if histogram.len() > 2 {
                    return Err(non_binary(path, &histogram));
                }
                self.values.iter().map(|&v| fg(v > 0)).collect()
            }
            MaskRule::Threshold(t) => {
                let max = f32::from(self.max);
                self.values
                    .iter()
                    .map(|&v| fg(f32::from(v) / max > t))
                    .collect()
            }
            MaskRule::Label(label) => self.values.iter().map(|&v| fg(v == label)).collect(),
            MaskRule::NonZero => self.values.iter().map(|&v| fg(v > 0)).collect(),
        })
    }
}

/// Reads a mask file at its own size and binarises it by `rule`: a gray image of {0, 1}.
pub fn read_binary_mask(path: &Path, rule: MaskRule) -> Result<GrayImage> {
    let values = MaskValues::read(path)?;
    let binary = values.binarise(rule, path)?;
    GrayImage::from_raw(values.width, values.height, binary).ok_or_else(|| {
        DataError::Config(format!(
            "{}: mask buffer does not match its size",
            path.display()
        ))
    })
}

/// The error for a mask with more than two distinct values.
pub(crate) fn non_binary(path: &Path, histogram: &BTreeMap<u16, u64>) -> DataError {
    let mut examples: Vec<String> = histogram.keys().take(5).map(u16::to_string).collect();
    if histogram.len() > 5 {
        examples.push("...".into());
    }
    DataError::NonBinaryMask {
        path: path.to_path_buf(),
        distinct: histogram.len(),
        examples: examples.join(", "),
    }
}

/// PIL's `ImageOps.equalize` on one 8-bit channel: the lookup table maps each value through the
/// cumulative histogram, ignoring the last occupied bin, as PIL does.
pub fn equalize_lut(histogram: &[u64; 256]) -> [u8; 256] {
    let identity: [u8; 256] = std::array::from_fn(|i| i as u8);
    let occupied: Vec<u64> = histogram.iter().copied().filter(|&c| c > 0).collect();
    if occupied.len() <= 1 {
        return identity;
    }
    let total: u64 = occupied.iter().sum();
    // PIL: `step = (sum(histo) - histo[-1]) // 255`.
    let step = (total - occupied[occupied.len() - 1]) / 255;
    if step == 0 {
        return identity;
    }
    let mut lut = [0u8; 256];
    let mut n = step / 2;
    for (i, out) in lut.iter_mut().enumerate() {
        *out = (n / step).min(255) as u8;
        n += histogram[i];
    }
    lut
}

/// Histogram equalisation of every channel of an 8-bit image separately (PIL semantics).
pub fn equalize<P>(image: &mut ImageBuffer<P, Vec<u8>>)
where
    P: Pixel<Subpixel = u8>,
{
    let channels = usize::from(P::CHANNEL_COUNT);
    let raw: &mut [u8] = image;
    for c in 0..channels {
        let mut histogram = [0u64; 256];
        for v in raw.iter().skip(c).step_by(channels) {
            histogram[usize::from(*v)] += 1;
        }
        let lut = equalize_lut(&histogram);
        for v in raw.iter_mut().skip(c).step_by(channels) {
            *v = lut[usize::from(*v)];
        }
    }
}

/// Gamma correction of 8-bit values: v -> round(255 (v / 255)^gamma).
pub fn gamma<P>(image: &mut ImageBuffer<P, Vec<u8>>, gamma: f32)
where
    P: Pixel<Subpixel = u8>,
{
    let lut = gamma_lut(f64::from(gamma));
    let raw: &mut [u8] = image;
    for v in raw.iter_mut() {
        *v = lut[usize::from(*v)];
    }
}

/// The gamma lookup table `round(255 · (v / 255)^gamma)`.
pub fn gamma_lut(gamma: f64) -> [u8; 256] {
    std::array::from_fn(|v| {
        (255.0 * (v as f64 / 255.0).powf(gamma))
            .round()
            .clamp(0.0, 255.0) as u8
    })
}

/// Resizes a binary {0, 1} mask with nearest-neighbour sampling, so it stays binary.
pub fn resize_mask(mask: &GrayImage, width: u32, height: u32) -> GrayImage {
    if mask.dimensions() == (width, height) {
        return mask.clone();
    }
    image::imageops::resize(mask, width, height, FilterType::Nearest)
}

/// Resizes an 8-bit image with the configured filter (8-bit output, as PIL's resize gives).
pub fn resize_image(
    image: &DynamicImage,
    width: u32,
    height: u32,
    filter: ImageFilter,
) -> DynamicImage {
    if image.width() == width && image.height() == height {
        return image.clone();
    }
    image.resize_exact(width, height, filter.filter_type())
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Luma, Rgba, RgbaImage};

    #[test]
    fn alpha_is_dropped_and_gray_stays_one_channel() {
        let rgba = DynamicImage::ImageRgba8(RgbaImage::from_pixel(2, 2, Rgba([10, 20, 30, 40])));
        assert_eq!(colour_channels(&rgba), 3);
        let rgb = to_channels(&rgba, 3);
        assert_eq!(rgb.as_rgb8().unwrap().get_pixel(0, 0).0, [10, 20, 30]);
        let gray = DynamicImage::ImageLumaA8(ImageBuffer::from_pixel(2, 2, image::LumaA([7, 0])));
        assert_eq!(colour_channels(&gray), 1);
        assert_eq!(
            to_channels(&gray, 1).as_luma8().unwrap().get_pixel(1, 1).0,
            [7]
        );
        assert_eq!(
            to_channels(&gray, 3).as_rgb8().unwrap().get_pixel(1, 1).0,
            [7, 7, 7]
        );
    }

    fn mask(values: &[u16], max: u16) -> MaskValues {
        MaskValues {
            width: values.len() as u32,
            height: 1,
            values: values.to_vec(),
            max,
        }
    }

    #[test]
    fn binary_rule_accepts_two_values_and_names_file_otherwise() {
        let p = Path::new("m.png");
        assert_eq!(
            mask(&[0, 255, 255], 255)
                .binarise(MaskRule::Binary, p)
                .unwrap(),
            [0, 1, 1]
        );
        assert_eq!(
            mask(&[0, 1, 0], 255).binarise(MaskRule::Binary, p).unwrap(),
            [0, 1, 0]
        );
        let err = mask(&[0, 128, 255], 255)
            .binarise(MaskRule::Binary, p)
            .unwrap_err()
            .to_string();
        assert!(err.contains("m.png") && err.contains("3 distinct"), "{err}");
    }

    #[test]
    fn threshold_label_and_nonzero_rules() {
        let p = Path::new("m.png");
        let m = mask(&[0, 20, 26, 128, 255], 255);
        assert_eq!(
            m.binarise(MaskRule::Threshold(0.1), p).unwrap(),
            [0, 0, 1, 1, 1]
        );
        assert_eq!(
            m.binarise(MaskRule::Threshold(0.5), p).unwrap(),
            [0, 0, 0, 1, 1]
        );
        let labels = mask(&[0, 1, 2, 2, 0], 65535);
        assert_eq!(
            labels.binarise(MaskRule::NonZero, p).unwrap(),
            [0, 1, 1, 1, 0]
        );
        assert_eq!(
            labels.binarise(MaskRule::Label(2), p).unwrap(),
            [0, 0, 1, 1, 0]
        );
        assert!(MaskRule::Threshold(1.5).validate().is_err());
        assert!(MaskRule::Threshold(0.1).validate().is_ok());
    }

    #[test]
    fn sixteen_bit_masks_keep_raw_labels() {
        let img = DynamicImage::ImageLuma16(ImageBuffer::from_raw(3, 1, vec![0u16, 1, 2]).unwrap());
        let m = MaskValues::from_image(&img);
        assert_eq!((m.values.clone(), m.max), (vec![0, 1, 2], u16::MAX));
        assert_eq!(m.histogram(), BTreeMap::from([(0, 1), (1, 1), (2, 1)]));
    }

    #[test]
    fn equalize_matches_pil_on_a_small_histogram() {
        // PIL's algorithm: occupied bins [4, 2, 1, 1], step = (8 - 1) // 255 = 0 -> identity.
        let mut tiny = GrayImage::from_raw(8, 1, vec![0, 0, 0, 0, 100, 100, 200, 250]).unwrap();
        equalize(&mut tiny);
        assert_eq!(tiny.as_raw(), &[0, 0, 0, 0, 100, 100, 200, 250]);
        // 1024 pixels, values 10 (512), 20 (256), 30 (256): step = (1024 - 256) // 255 = 3,
        // lut[v] = n / 3 with n starting at 1 and growing by the histogram below v.
        let mut values = vec![10u8; 512];
        values.extend([20u8; 256]);
        values.extend([30u8; 256]);
        let mut img = GrayImage::from_raw(1024, 1, values).unwrap();
        equalize(&mut img);
        assert_eq!(img.get_pixel(0, 0).0, [0]);
        assert_eq!(img.get_pixel(600, 0).0, [171]); // (1 + 512) / 3
        assert_eq!(img.get_pixel(900, 0).0, [255]); // (1 + 768) / 3 = 256, clamped
        // Where // 255 and // 256 differ: 0 (255 px), 1 (255 px), 2 (1 px): step = 510 // 255 = 2,
        // n starts at 1: lut[1] = (1 + 255) // 2 = 128 (a // 256 step of 1 would give 255).
        let mut values = vec![0u8; 255];
        values.extend([1u8; 255]);
        values.push(2);
        let mut img = GrayImage::from_raw(511, 1, values).unwrap();
        equalize(&mut img);
        assert_eq!(
            (
                img.get_pixel(0, 0).0,
                img.get_pixel(300, 0).0,
                img.get_pixel(510, 0).0
            ),
            ([0], [128], [255])
        );
    }

    #[test]
    fn gamma_half_brightens_mid_tones_and_keeps_ends() {
        let mut img = GrayImage::from_raw(3, 1, vec![0, 64, 255]).unwrap();
        gamma(&mut img, 0.5);
        assert_eq!(img.as_raw(), &[0, 128, 255]);
    }

    #[test]
    fn resizing_keeps_masks_binary_and_images_in_range() {
        let mut m = GrayImage::new(5, 5);
        m.put_pixel(2, 2, Luma([1]));
        let r = resize_mask(&m, 10, 10);
        assert_eq!(r.dimensions(), (10, 10));
        assert!(r.pixels().all(|p| p.0[0] <= 1));
        assert_eq!(r.pixels().filter(|p| p.0[0] == 1).count(), 4);
        let img =
            DynamicImage::ImageLuma8(GrayImage::from_fn(16, 16, |x, _| Luma([(x * 16) as u8])));
        for filter in [ImageFilter::Bilinear, ImageFilter::Bicubic] {
            let r = resize_image(&img, 8, 4, filter);
            assert_eq!((r.width(), r.height()), (8, 4));
            assert!(r.as_luma8().is_some());
        }
    }
}
