//! Validation of a dataset folder: [`check_dataset`] decodes every pair (in parallel) and returns a
//! [`CheckReport`] with the dataset's statistics (pairs, image sizes, channels, mask value
//! histogram, empty masks, foreground ratio) and every problem found, each naming its file:
//! missing mask, unmatched mask, undecodable or truncated file, mask size differing from its image,
//! non-binary mask, undeclared nnU-Net label, mixed channel counts, empty dataset. The report's
//! `Display` is the table `genseg data check` prints.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::error::{DataError, Result};
use crate::layout::{Layout, LayoutChoice, NnUnetInfo, SamplePair, discover};
use crate::preprocess::{ChannelPolicy, MaskRule, MaskValues, colour_channels, decode, non_binary};

/// What [`check_dataset`] accepts.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CheckOptions {
    /// The layout, detected by default.
    pub layout: LayoutChoice,
    /// Binarise masks at this threshold (value scaled to [0, 1]) instead of requiring binary masks.
    pub threshold: Option<f32>,
    /// nnU-Net: the label counted as foreground (default: every label > 0).
    pub label: Option<u16>,
    /// Whether mixed channel counts are a problem ([`ChannelPolicy::Strict`]) or will be converted.
    pub channels: ChannelPolicy,
}

/// Minimum, mean and maximum of a per-mask quantity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Smallest value.
    pub min: f64,
    /// Mean value.
    pub mean: f64,
    /// Largest value.
    pub max: f64,
}

/// The result of [`check_dataset`].
#[derive(Debug)]
pub struct CheckReport {
    /// The dataset folder.
    pub root: PathBuf,
    /// The layout used.
    pub layout: Layout,
    /// The mask rule used to count foreground.
    pub mask_rule: MaskRule,
    /// Number of matched image/mask pairs.
    pub pairs: usize,
    /// Number of images per (width, height), over decodable images.
    pub image_sizes: BTreeMap<(u32, u32), usize>,
    /// Number of images per channel count (alpha not counted).
    pub channels: BTreeMap<usize, usize>,
    /// Pixel count of each raw mask value, over all decodable masks.
    pub mask_values: BTreeMap<u16, u64>,
    /// Ids of masks without foreground.
    pub empty_masks: Vec<String>,
    /// Foreground fraction of the masks that passed.
    pub foreground_ratio: Option<Summary>,
    /// Every problem found, in id order; each names its file.
    pub problems: Vec<DataError>,
}

impl CheckReport {
    /// Whether no problem was found.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// What one pair contributes to the report.
#[derive(Default)]
struct PairCheck {
    size: Option<(u32, u32)>,
    channels: Option<usize>,
    histogram: BTreeMap<u16, u64>,
    foreground: Option<f64>,
    problems: Vec<DataError>,
}

fn check_pair(pair: &SamplePair, rule: MaskRule, nnunet: Option<&NnUnetInfo>) -> PairCheck {
    let mut out = PairCheck::default();
    let image = match decode(&pair.image) {
        Ok(image) => Some(image),
        Err(e) => {
            out.problems.push(e);
            None
        }
    };
    let mask = match MaskValues::read(&pair.mask) {
        Ok(mask) => Some(mask),
        Err(e) => {
            out.problems.push(e);
            None
        }
    };
    if let Some(image) = &image {
        out.size = Some((image.width(), image.height()));
        out.channels = Some(colour_channels(image));
    }
    let Some(mask) = mask else { return out };
    out.histogram = mask.histogram();
    if let Some(image) = &image
        && (image.width(), image.height()) != (mask.width, mask.height)
    {
        out.problems.push(DataError::MaskSizeMismatch {
            mask: pair.mask.clone(),
            image: pair.image.clone(),
            mask_w: mask.width,
            mask_h: mask.height,
            image_w: image.width(),
            image_h: image.height(),
        });
    }
    if let Some(info) = nnunet {
        let declared = info.label_values();
        if let Some(&value) = out.histogram.keys().find(|v| !declared.contains(v)) {
            out.problems.push(DataError::UndeclaredLabel {
                path: pair.mask.clone(),
                value,
                declared: declared
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    }
    let foreground = if rule == MaskRule::Binary {
        // Same rule as the loader, without a second pass over the pixels.
        if out.histogram.len() > 2 {
            out.problems.push(non_binary(&pair.mask, &out.histogram));
            None
        } else {
            Some(
                out.histogram
                    .iter()
                    .filter(|(v, _)| **v > 0)
                    .map(|(_, c)| *c)
                    .sum::<u64>(),
            )
        }
    } else {
        mask.binarise(rule, &pair.mask)
            .ok()
            .map(|b| b.iter().map(|&v| u64::from(v)).sum())
    };
    let pixels = mask.values.len().max(1) as f64;
    // A broken pair would distort the statistics of the dataset.
    if out.problems.is_empty() {
        out.foreground = foreground.map(|f| f as f64 / pixels);
    }
    out
}

/// Validates a dataset folder. Fails only when the folder cannot be used at all (missing,
/// unreadable, no or ambiguous layout, invalid `dataset.json`, invalid options); every other
/// problem is listed in the report.
pub fn check_dataset(dir: &Path, options: &CheckOptions) -> Result<CheckReport> {
    let discovery = discover(dir, options.layout)?;
    let rule = match (options.threshold, options.label) {
        (Some(_), Some(_)) => {
            return Err(DataError::Config(
                "give either a threshold or a label, not both".into(),
            ));
        }
        (Some(t), None) => MaskRule::Threshold(t),
        (None, Some(l)) => MaskRule::Label(l),
        (None, None) => MaskRule::default_for(discovery.layout),
    }
    .validate()?;
    let nnunet = discovery.nnunet.as_ref();
    let checks: Vec<PairCheck> = discovery
        .pairs
        .par_iter()
        .map(|pair| check_pair(pair, rule, nnunet))
        .collect();

    let mut report = CheckReport {
        root: dir.to_path_buf(),
        layout: discovery.layout,
        mask_rule: rule,
        pairs: discovery.pairs.len(),
        image_sizes: BTreeMap::new(),
        channels: BTreeMap::new(),
        mask_values: BTreeMap::new(),
        empty_masks: Vec::new(),
        foreground_ratio: None,
        problems: discovery.problems,
    };
    if discovery.pairs.is_empty() {
        report.problems.push(DataError::EmptyDataset {
            dir: dir.to_path_buf(),
        });
    }
    let mut first_channels: Option<(usize, &Path)> = None;
    let mut mixed_reported = false;
    let (mut sum, mut n, mut min, mut max) = (0.0, 0usize, f64::INFINITY, f64::NEG_INFINITY);
    for (pair, check) in discovery.pairs.iter().zip(checks) {
        if let Some(size) = check.size {
            *report.image_sizes.entry(size).or_default() += 1;
        }
        if let Some(c) = check.channels {
            *report.channels.entry(c).or_default() += 1;
            match first_channels {
                None => first_channels = Some((c, &pair.image)),
                Some((expected, first))
                    if c != expected
                        && options.channels == ChannelPolicy::Strict
                        && !mixed_reported =>
                {
                    report.problems.push(DataError::MixedChannels {
                        path: pair.image.clone(),
                        channels: c,
                        first: first.to_path_buf(),
                        expected,
                    });
                    mixed_reported = true;
                }
                Some(_) => {}
            }
        }
        for (v, c) in check.histogram {
            *report.mask_values.entry(v).or_default() += c;
        }
        if let Some(f) = check.foreground {
            if f == 0.0 {
                report.empty_masks.push(pair.id.clone());
            }
            sum += f;
            n += 1;
            min = min.min(f);
            max = max.max(f);
        }
        report.problems.extend(check.problems);
    }
    if n > 0 {
        report.foreground_ratio = Some(Summary {
            min,
            mean: sum / n as f64,
            max,
        });
    }
    Ok(report)
}

/// `a: n, b: m` with at most `limit` entries.
fn join_counts<K: fmt::Display, V: fmt::Display>(
    entries: impl ExactSizeIterator<Item = (K, V)>,
    limit: usize,
) -> String {
    let total = entries.len();
    let mut parts: Vec<String> = entries
        .take(limit)
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    if total > limit {
        parts.push(format!("... ({total} distinct)"));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let row =
            |f: &mut fmt::Formatter<'_>, key: &str, value: String| writeln!(f, "{key:<18} {value}");
        row(f, "dataset", self.root.display().to_string())?;
        row(f, "layout", self.layout.to_string())?;
        let rule = match self.mask_rule {
            MaskRule::Binary => "binary (at most two values, foreground = non-zero)".to_string(),
            MaskRule::Threshold(t) => format!("threshold (foreground = value / max > {t})"),
            MaskRule::Label(l) => format!("label {l}"),
            MaskRule::NonZero => "non-zero labels".to_string(),
        };
        row(f, "mask rule", rule)?;
        row(f, "pairs", self.pairs.to_string())?;
        row(
            f,
            "image sizes",
            join_counts(
                self.image_sizes
                    .iter()
                    .map(|((w, h), n)| (format!("{w}x{h}"), n)),
                6,
            ),
        )?;
        row(f, "channels", join_counts(self.channels.iter(), 4))?;
        let total: u64 = self.mask_values.values().sum();
        row(
            f,
            "mask values (px)",
            join_counts(
                self.mask_values.iter().map(|(v, c)| {
                    (
                        v,
                        format!("{c} ({:.1}%)", 100.0 * *c as f64 / total.max(1) as f64),
                    )
                }),
                6,
            ),
        )?;
        let mut empty = self.empty_masks.len().to_string();
        if !self.empty_masks.is_empty() {
            let shown: Vec<&str> = self
                .empty_masks
                .iter()
                .take(5)
                .map(String::as_str)
                .collect();
            empty += &format!(
                " ({}{})",
                shown.join(", "),
                if self.empty_masks.len() > 5 {
                    ", ..."
                } else {
                    ""
                }
            );
        }
        row(f, "empty masks", empty)?;
        row(
            f,
            "foreground ratio",
            match self.foreground_ratio {
                Some(s) => format!("min {:.4}  mean {:.4}  max {:.4}", s.min, s.mean, s.max),
                None => "-".into(),
            },
        )?;
        row(f, "problems", self.problems.len().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phantom::{PhantomConfig, PhantomKind, write_phantoms};
    use image::{DynamicImage, GrayImage, Luma};

    fn phantom_dir(n: usize) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write_phantoms(
            dir.path(),
            &PhantomConfig::new(PhantomKind::Lungs, 24, 0),
            n,
        )
        .unwrap();
        dir
    }

    fn save_mask(path: &Path, w: u32, h: u32, f: impl Fn(u32) -> u8) {
        DynamicImage::ImageLuma8(GrayImage::from_fn(w, h, |x, _| Luma([f(x)])))
            .save(path)
            .unwrap();
    }

    #[test]
    fn clean_dataset_reports_statistics_and_no_problem() {
        let dir = phantom_dir(3);
        let report = check_dataset(dir.path(), &CheckOptions::default()).unwrap();
        assert!(report.is_ok(), "{:?}", report.problems);
        assert_eq!(report.pairs, 3);
        assert_eq!(report.image_sizes, BTreeMap::from([((24, 24), 3)]));
        assert_eq!(report.channels, BTreeMap::from([(1, 3)]));
        assert_eq!(
            report.mask_values.keys().copied().collect::<Vec<_>>(),
            [0, 255]
        );
        assert_eq!(report.mask_values.values().sum::<u64>(), 3 * 24 * 24);
        let ratio = report.foreground_ratio.unwrap();
        assert!(ratio.min > 0.0 && ratio.min <= ratio.mean && ratio.mean <= ratio.max);
        let table = report.to_string();
        for key in [
            "pairs",
            "image sizes",
            "24x24: 3",
            "mask values",
            "empty masks",
            "foreground ratio",
        ] {
            assert!(table.contains(key), "{key} missing in\n{table}");
        }
    }

    #[test]
    fn every_broken_file_is_named() {
        let dir = phantom_dir(6);
        let d = dir.path();
        let (i, m) = (d.join("images"), d.join("masks"));
        // Truncated image.
        let bytes = std::fs::read(i.join("lungs_0000.png")).unwrap();
        std::fs::write(i.join("lungs_0000.png"), &bytes[..bytes.len() / 3]).unwrap();
        // Mask of another size.
        save_mask(&m.join("lungs_0001.png"), 20, 24, |_| 0);
        // Three-valued mask.
        save_mask(&m.join("lungs_0002.png"), 24, 24, |x| {
            [0, 128, 255][(x % 3) as usize]
        });
        // Missing mask and unmatched mask.
        std::fs::rename(m.join("lungs_0003.png"), m.join("orphan.png")).unwrap();
        // Empty mask: not a problem, but reported.
        save_mask(&m.join("lungs_0004.png"), 24, 24, |_| 0);
        let report = check_dataset(d, &CheckOptions::default()).unwrap();
        let messages: Vec<String> = report.problems.iter().map(ToString::to_string).collect();
        assert_eq!(messages.len(), 5, "{messages:#?}");
        let expect = [
            ("images/lungs_0000.png", "cannot decode"),
            ("masks/lungs_0001.png", "differs from image size"),
            ("masks/lungs_0002.png", "non-binary"),
            ("images/lungs_0003.png", "missing mask"),
            ("masks/orphan.png", "unmatched mask"),
        ];
        for (file, what) in expect {
            assert!(
                messages
                    .iter()
                    .any(|msg| msg.contains(file) && msg.contains(what)),
                "no problem naming {file} ({what}) in {messages:#?}"
            );
        }
        assert_eq!(report.empty_masks, ["lungs_0004"]);
        // A threshold accepts the three-valued mask.
        let thresholded = CheckOptions {
            threshold: Some(0.5),
            ..CheckOptions::default()
        };
        let report = check_dataset(d, &thresholded).unwrap();
        assert!(
            report
                .problems
                .iter()
                .all(|p| !p.to_string().contains("non-binary"))
        );
    }

    #[test]
    fn empty_folders_and_mixed_channels_are_problems() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["images", "masks"] {
            std::fs::create_dir_all(dir.path().join(f)).unwrap();
        }
        let report = check_dataset(dir.path(), &CheckOptions::default()).unwrap();
        assert!(report.problems[0].to_string().contains("empty dataset"));
        assert!(check_dataset(&dir.path().join("nope"), &CheckOptions::default()).is_err());

        let dir = phantom_dir(2);
        let rgb = image::RgbImage::from_pixel(24, 24, image::Rgb([1, 2, 3]));
        DynamicImage::ImageRgb8(rgb)
            .save(dir.path().join("images/lungs_0001.png"))
            .unwrap();
        let report = check_dataset(dir.path(), &CheckOptions::default()).unwrap();
        assert_eq!(report.problems.len(), 1);
        assert!(report.problems[0].to_string().contains("lungs_0001.png"));
        let converting = CheckOptions {
            channels: ChannelPolicy::Rgb,
            ..CheckOptions::default()
        };
        assert!(check_dataset(dir.path(), &converting).unwrap().is_ok());
    }

    #[test]
    fn nnunet_labels_must_be_declared() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("dataset.json"),
            r#"{"channel_names": {"0": "xray"}, "labels": {"background": 0, "lung": 1}, "numTraining": 1, "file_ending": ".png"}"#,
        )
        .unwrap();
        for f in ["imagesTr", "labelsTr"] {
            std::fs::create_dir_all(d.join(f)).unwrap();
        }
        save_mask(&d.join("imagesTr/c1_0000.png"), 3, 1, |_| 9);
        save_mask(&d.join("labelsTr/c1.png"), 3, 1, |x| x as u8);
        let report = check_dataset(d, &CheckOptions::default()).unwrap();
        assert_eq!(report.problems.len(), 1);
        let msg = report.problems[0].to_string();
        assert!(
            msg.contains("labelsTr/c1.png") && msg.contains("label value 2"),
            "{msg}"
        );
        let both = CheckOptions {
            threshold: Some(0.5),
            label: Some(1),
            ..CheckOptions::default()
        };
        assert!(check_dataset(d, &both).is_err());
    }
}
