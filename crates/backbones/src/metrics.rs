//! Per-case segmentation metrics on binarised predictions (spec §4):
//! Dice, IoU, precision, recall and, opt-in, HD95 in pixels.
//!
//! Predictions are binarised at probability 0.5 (logit > 0). Ratios are exact
//! (`2TP / (2TP + FP + FN)` etc.); a `0/0` that is not the both-empty case
//! counts as 0. The both-empty case (no foreground in truth nor prediction)
//! follows an explicit [`EmptyPolicy`]. HD95 follows medpy: the 95th
//! percentile (linear interpolation) of the pooled distances from each mask's
//! border pixels to the other mask's border; undefined (excluded) when
//! either mask is empty.

use candle_core::{DType, Result, Tensor};
use image::{GrayImage, Luma};
use imageproc::distance_transform::euclidean_squared_distance_transform;
use serde::{Deserialize, Serialize};

/// What a case with empty truth and empty prediction scores.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmptyPolicy {
    /// Both empty is a perfect prediction: every overlap metric is 1
    /// (the GenSeg reference, `util/dice_score.py`).
    #[default]
    CountAsOne,
    /// Both empty is excluded from the metric (nnU-Net's convention).
    Exclude,
}

impl std::fmt::Display for EmptyPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EmptyPolicy::CountAsOne => "count_as_one",
            EmptyPolicy::Exclude => "exclude",
        })
    }
}

/// The resolution at which predictions are compared with the truth.
///
/// Written as `"working"`, `"native"` or a side in pixels (`256`) in configs and on the
/// command line. Thin structures (vessels) lose most of their pixels when the truth is
/// shrunk to a small working size, so their scores depend on it: compare methods trained
/// at different sizes at `"native"` or one common side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ResolutionRepr", into = "ResolutionRepr")]
pub enum ScoreResolution {
    /// The working size (`data.size`), against the truth resized to it (nearest).
    #[default]
    Working,
    /// Each image's own size: the logits resized (bilinear) to the mask file's size.
    Native,
    /// One square side for every case: the logits resized (bilinear), the truth file
    /// resized (nearest), as `genseg score --size` does.
    Square(u32),
}

/// The config form of [`ScoreResolution`]: a name or a side in pixels.
#[derive(Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum ResolutionRepr {
    Side(u32),
    Name(String),
}

impl TryFrom<ResolutionRepr> for ScoreResolution {
    type Error = String;
    fn try_from(repr: ResolutionRepr) -> std::result::Result<Self, String> {
        match repr {
            ResolutionRepr::Side(side) => format!("{side}").parse(),
            ResolutionRepr::Name(name) => name.parse(),
        }
    }
}

impl From<ScoreResolution> for ResolutionRepr {
    fn from(r: ScoreResolution) -> Self {
        match r {
            ScoreResolution::Square(side) => ResolutionRepr::Side(side),
            other => ResolutionRepr::Name(other.to_string()),
        }
    }
}

impl std::str::FromStr for ScoreResolution {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "working" => Ok(ScoreResolution::Working),
            "native" => Ok(ScoreResolution::Native),
            _ => match s.parse::<u32>() {
                Ok(side) if side > 0 => Ok(ScoreResolution::Square(side)),
                _ => Err(format!(
                    "score resolution {s:?}: expected \"working\", \"native\" or a side in pixels (> 0)"
                )),
            },
        }
    }
}

impl std::fmt::Display for ScoreResolution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScoreResolution::Working => f.write_str("working"),
            ScoreResolution::Native => f.write_str("native"),
            ScoreResolution::Square(side) => write!(f, "{side}"),
        }
    }
}

/// A binary mask of `height * width` pixels, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BinaryMask {
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// `true` = foreground.
    pub pixels: Vec<bool>,
}

impl BinaryMask {
    /// Foreground pixel count.
    pub fn area(&self) -> usize {
        self.pixels.iter().filter(|&&p| p).count()
    }
}

/// Splits `[B, 1, H, W]` logits into per-image masks, foreground where the
/// sigmoid exceeds 0.5 (logit > 0).
pub fn binarize_logits(logits: &Tensor) -> Result<Vec<BinaryMask>> {
    binarize(logits, 0.0)
}

/// Splits `[B, 1, H, W]` `{0, 1}` target masks into per-image masks.
pub fn binarize_targets(targets: &Tensor) -> Result<Vec<BinaryMask>> {
    binarize(targets, 0.5)
}

fn binarize(t: &Tensor, above: f32) -> Result<Vec<BinaryMask>> {
    let (b, c, h, w) = t.dims4()?;
    if c != 1 {
        candle_core::bail!("binarize: expected 1 channel, got {c}");
    }
    // [B, 1, H, W] -> [B, H*W]
    let rows = t
        .to_dtype(DType::F32)?
        .reshape((b, h * w))?
        .to_vec2::<f32>()?;
    Ok(rows
        .into_iter()
        .map(|row| BinaryMask {
            height: h,
            width: w,
            pixels: row.into_iter().map(|v| v > above).collect(),
        })
        .collect())
}

/// Which metrics to compute and how to score empty cases.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricOptions {
    /// Compute HD95 (slower: two distance transforms per case).
    pub hd95: bool,
    /// The both-empty policy.
    pub empty_policy: EmptyPolicy,
    /// Where predictions and truth are compared (evaluation and validation alike).
    pub resolution: ScoreResolution,
}

/// One case's scores; `None` means excluded (policy or undefined).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CaseMetrics {
    /// `2TP / (2TP + FP + FN)`.
    pub dice: Option<f64>,
    /// `TP / (TP + FP + FN)`.
    pub iou: Option<f64>,
    /// `TP / (TP + FP)`.
    pub precision: Option<f64>,
    /// `TP / (TP + FN)`.
    pub recall: Option<f64>,
    /// 95th-percentile symmetric border distance in pixels (opt-in).
    pub hd95: Option<f64>,
}

/// The metric names, in report order.
pub const METRIC_NAMES: [&str; 5] = ["dice", "iou", "precision", "recall", "hd95"];

impl CaseMetrics {
    /// The value of a metric by name (see [`METRIC_NAMES`]).
    pub fn get(&self, name: &str) -> Option<f64> {
        match name {
            "dice" => self.dice,
            "iou" => self.iou,
            "precision" => self.precision,
            "recall" => self.recall,
            "hd95" => self.hd95,
            _ => None,
        }
    }
}

/// Scores one predicted mask against its truth.
pub fn case_metrics(
    pred: &BinaryMask,
    truth: &BinaryMask,
    opts: &MetricOptions,
) -> anyhow::Result<CaseMetrics> {
    anyhow::ensure!(
        pred.height == truth.height
            && pred.width == truth.width
            && pred.pixels.len() == truth.pixels.len(),
        "metrics: prediction {}x{} and truth {}x{} differ in size",
        pred.height,
        pred.width,
        truth.height,
        truth.width
    );
    let (mut tp, mut fp, mut fn_) = (0usize, 0usize, 0usize);
    for (&p, &t) in pred.pixels.iter().zip(&truth.pixels) {
        match (p, t) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, true) => fn_ += 1,
            (false, false) => {}
        }
    }
    let hd95 = if opts.hd95 { hd95(pred, truth) } else { None };
    if tp + fp + fn_ == 0 {
        let both_empty = match opts.empty_policy {
            EmptyPolicy::CountAsOne => Some(1.0),
            EmptyPolicy::Exclude => None,
        };
        return Ok(CaseMetrics {
            dice: both_empty,
            iou: both_empty,
            precision: both_empty,
            recall: both_empty,
            hd95,
        });
    }
    let ratio = |num: usize, den: usize| {
        if den == 0 {
            0.0
        } else {
            num as f64 / den as f64
        }
    };
    Ok(CaseMetrics {
        dice: Some(ratio(2 * tp, 2 * tp + fp + fn_)),
        iou: Some(ratio(tp, tp + fp + fn_)),
        precision: Some(ratio(tp, tp + fp)),
        recall: Some(ratio(tp, tp + fn_)),
        hd95,
    })
}

/// Foreground pixels with a 4-neighbour outside the mask (or on the image
/// edge): `mask XOR erosion(mask)` with a cross structuring element and zero
/// border, as medpy does.
fn border(mask: &BinaryMask) -> Vec<bool> {
    let (h, w) = (mask.height, mask.width);
    let at = |y: isize, x: isize| {
        y >= 0
            && x >= 0
            && (y as usize) < h
            && (x as usize) < w
            && mask.pixels[y as usize * w + x as usize]
    };
    let mut out = vec![false; h * w];
    for y in 0..h as isize {
        for x in 0..w as isize {
            if at(y, x) && !(at(y - 1, x) && at(y + 1, x) && at(y, x - 1) && at(y, x + 1)) {
                out[y as usize * w + x as usize] = true;
            }
        }
    }
    out
}

/// Distances from each `from` pixel to the nearest `to` pixel.
fn directed_distances(from: &[bool], to: &[bool], h: usize, w: usize) -> Vec<f64> {
    let img = GrayImage::from_fn(w as u32, h as u32, |x, y| {
        Luma([if to[y as usize * w + x as usize] {
            255
        } else {
            0
        }])
    });
    let dt = euclidean_squared_distance_transform(&img);
    from.iter()
        .enumerate()
        .filter(|(_, f)| **f)
        .map(|(i, _)| dt.get_pixel((i % w) as u32, (i / w) as u32)[0].sqrt())
        .collect()
}

/// numpy's `percentile(values, q)` with linear interpolation.
pub fn percentile(values: &mut [f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let pos = q / 100.0 * (values.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    Some(values[lo] + (values[hi] - values[lo]) * (pos - lo as f64))
}

/// HD95 in pixels; `None` when either mask is empty.
pub fn hd95(pred: &BinaryMask, truth: &BinaryMask) -> Option<f64> {
    if pred.area() == 0 || truth.area() == 0 {
        return None;
    }
    let (h, w) = (pred.height, pred.width);
    let (bp, bt) = (border(pred), border(truth));
    let mut all = directed_distances(&bp, &bt, h, w);
    all.extend(directed_distances(&bt, &bp, h, w));
    percentile(&mut all, 95.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn mask(h: usize, w: usize, f: impl Fn(usize, usize) -> bool) -> BinaryMask {
        BinaryMask {
            height: h,
            width: w,
            pixels: (0..h * w).map(|i| f(i / w, i % w)).collect(),
        }
    }

    #[test]
    fn counts_by_hand() -> anyhow::Result<()> {
        // Truth: left half of a 4x4 (8 px). Prediction: first three columns (12 px).
        let truth = mask(4, 4, |_, x| x < 2);
        let pred = mask(4, 4, |_, x| x < 3);
        let m = case_metrics(&pred, &truth, &MetricOptions::default())?;
        // TP 8, FP 4, FN 0.
        assert_eq!(m.dice, Some(16.0 / 20.0));
        assert_eq!(m.iou, Some(8.0 / 12.0));
        assert_eq!(m.precision, Some(8.0 / 12.0));
        assert_eq!(m.recall, Some(1.0));
        assert_eq!(m.hd95, None, "hd95 is opt-in");
        Ok(())
    }

    #[test]
    fn empty_policies() -> anyhow::Result<()> {
        let empty = mask(3, 3, |_, _| false);
        let one = case_metrics(&empty, &empty, &MetricOptions::default())?;
        assert_eq!(
            (one.dice, one.iou, one.precision, one.recall),
            (Some(1.0), Some(1.0), Some(1.0), Some(1.0))
        );
        let opts = MetricOptions {
            empty_policy: EmptyPolicy::Exclude,
            hd95: true,
            ..Default::default()
        };
        let ex = case_metrics(&empty, &empty, &opts)?;
        assert_eq!(ex, CaseMetrics::default());
        // A missed object is a 0, not an exclusion, under both policies.
        let full = mask(3, 3, |_, _| true);
        let missed = case_metrics(&empty, &full, &opts)?;
        assert_eq!(
            (missed.dice, missed.precision, missed.recall, missed.hd95),
            (Some(0.0), Some(0.0), Some(0.0), None)
        );
        Ok(())
    }

    #[test]
    fn hd95_by_hand() {
        // Two single-pixel masks 3 columns apart: every distance is 3.
        let a = mask(5, 7, |y, x| y == 2 && x == 1);
        let b = mask(5, 7, |y, x| y == 2 && x == 4);
        assert_eq!(hd95(&a, &b), Some(3.0));
        assert_eq!(hd95(&a, &a), Some(0.0));
        // Percentile interpolation like numpy: percentile([0,1,2,3,4], 95) = 3.8.
        assert!((percentile(&mut [4.0, 0.0, 2.0, 1.0, 3.0], 95.0).unwrap() - 3.8).abs() < 1e-12);
    }

    #[test]
    fn size_mismatch_is_an_error() {
        let a = mask(2, 2, |_, _| true);
        let b = mask(2, 3, |_, _| true);
        assert!(case_metrics(&a, &b, &MetricOptions::default()).is_err());
    }

    #[test]
    fn binarize_thresholds_at_half_probability() -> Result<()> {
        let logits = Tensor::new(&[[[[-0.1f32, 0.0], [0.1, 5.0]]]], &candle_core::Device::Cpu)?;
        assert_eq!(
            binarize_logits(&logits)?[0].pixels,
            vec![false, false, true, true]
        );
        Ok(())
    }

    proptest! {
        #[test]
        fn metrics_are_bounded_and_symmetric(bits_a in proptest::collection::vec(any::<bool>(), 36),
                                             bits_b in proptest::collection::vec(any::<bool>(), 36)) {
            let a = BinaryMask { height: 6, width: 6, pixels: bits_a };
            let b = BinaryMask { height: 6, width: 6, pixels: bits_b };
            let opts = MetricOptions { hd95: true, ..Default::default() };
            let ab = case_metrics(&a, &b, &opts).unwrap();
            let ba = case_metrics(&b, &a, &opts).unwrap();
            for m in [ab.dice, ab.iou, ab.precision, ab.recall].into_iter().flatten() {
                prop_assert!((0.0..=1.0).contains(&m));
            }
            prop_assert_eq!(ab.dice, ba.dice);
            prop_assert_eq!(ab.iou, ba.iou);
            prop_assert_eq!(ab.precision, ba.recall);
            prop_assert_eq!(ab.hd95, ba.hd95);
            // Dice and IoU are tied: D = 2J / (1 + J).
            if let (Some(d), Some(j)) = (ab.dice, ab.iou) {
                prop_assert!((d - 2.0 * j / (1.0 + j)).abs() < 1e-12);
            }
            let self_m = case_metrics(&a, &a, &opts).unwrap();
            prop_assert_eq!(self_m.dice, Some(1.0));
        }
    }
}
