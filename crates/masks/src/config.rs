//! [`MaskAugmentConfig`]: every range of the mask generator (spec §2), with the GenSeg reference
//! values as defaults, and its validation.
//!
//! Fractions are relative to the mask's side (imgaug calls them `percent`, but `0.1` means 10 %),
//! angles are in degrees, a range `[lo, hi]` is sampled uniformly and `[v, v]` always gives `v`.
//! A step is turned off by leaving it out of [`MaskAugmentConfig::augmenters`] (or by giving it
//! the zero-width identity range, e.g. `scale_x = [1.0, 1.0]`).

use serde::{Deserialize, Serialize};

use crate::error::{MaskError, Result};

/// Largest elastic smoothing sigma accepted, in pixels: the Gaussian kernel has `4 sigma + 1`
/// taps, so this bounds the cost of one deformation.
pub const MAX_ELASTIC_SIGMA: f64 = 1000.0;

/// One augmenter of the imgaug `Sequential` of the reference (spec §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Augmenter {
    /// Mirror left-right with probability [`MaskAugmentConfig::horizontal_flip_probability`].
    HorizontalFlip,
    /// Mirror top-bottom with probability [`MaskAugmentConfig::vertical_flip_probability`]
    /// (commented out in the reference, so not in the default list).
    VerticalFlip,
    /// imgaug `CropAndPad(percent=..., sample_independently=True, keep_size=True)`: each side is
    /// padded (positive fraction, zeros) or cropped (negative), then the mask is resized back.
    CropAndPad,
    /// imgaug `Affine(scale={"x": .., "y": ..})` about the centre.
    Scale,
    /// imgaug `Affine(translate_percent={"x": .., "y": ..})`.
    Translate,
    /// imgaug `Affine(rotate=..)` about the centre.
    Rotate,
    /// imgaug `Affine(shear=..)`: a shear along x about the centre.
    Shear,
    /// Elastic deformation (not in the reference): a random displacement field, smoothed by a
    /// Gaussian of sigma [`MaskAugmentConfig::elastic_sigma`] and scaled by
    /// [`MaskAugmentConfig::elastic_alpha`] pixels.
    Elastic,
}

impl Augmenter {
    /// The augmenters of the GenSeg reference pipeline, in its listing order (spec §2).
    pub const REFERENCE: [Augmenter; 6] = [
        Augmenter::HorizontalFlip,
        Augmenter::CropAndPad,
        Augmenter::Scale,
        Augmenter::Translate,
        Augmenter::Rotate,
        Augmenter::Shear,
    ];
}

/// Configuration of the mask generator; `Default` is the GenSeg reference pipeline (spec §2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaskAugmentConfig {
    /// The augmenters of the sequence; each at most once. Leave one out to turn it off.
    pub augmenters: Vec<Augmenter>,
    /// Apply the augmenters in a fresh random order for every mask, as the reference does;
    /// `false` applies them in the order listed.
    pub random_order: bool,
    /// Probability of a left-right mirror.
    pub horizontal_flip_probability: f64,
    /// Probability of a top-bottom mirror (0.5, as on the reference's commented-out line).
    pub vertical_flip_probability: f64,
    /// Pad (positive) or crop (negative) fraction of the side, drawn independently for each of
    /// the four sides; within (-0.5, 1].
    pub crop_and_pad_fraction: [f64; 2],
    /// Horizontal scale factor; positive.
    pub scale_x: [f64; 2],
    /// Vertical scale factor, drawn independently of `scale_x`; positive.
    pub scale_y: [f64; 2],
    /// Horizontal shift as a fraction of the width.
    pub translate_x_fraction: [f64; 2],
    /// Vertical shift as a fraction of the height.
    pub translate_y_fraction: [f64; 2],
    /// Rotation in degrees (positive turns clockwise on screen, y pointing down).
    pub rotate_degrees: [f64; 2],
    /// Shear angle along x in degrees; within (-90, 90).
    pub shear_degrees: [f64; 2],
    /// Elastic displacement scale in pixels; non-negative. The default (34 px with sigma 4 px) is
    /// the setting of Simard et al. (2003).
    pub elastic_alpha: [f64; 2],
    /// Elastic smoothing sigma in pixels; within (0, [`MAX_ELASTIC_SIGMA`]].
    pub elastic_sigma: [f64; 2],
    /// After all steps the mask (values in [0, 1]) is foreground where it exceeds this; in [0, 1).
    pub binarize_threshold: f64,
}

impl Default for MaskAugmentConfig {
    fn default() -> Self {
        Self {
            augmenters: Augmenter::REFERENCE.to_vec(),
            random_order: true,
            horizontal_flip_probability: 0.5,
            vertical_flip_probability: 0.5,
            crop_and_pad_fraction: [0.0, 0.1],
            scale_x: [0.8, 1.2],
            scale_y: [0.8, 1.2],
            translate_x_fraction: [-0.1, 0.1],
            translate_y_fraction: [-0.1, 0.1],
            rotate_degrees: [-15.0, 15.0],
            shear_degrees: [-8.0, 8.0],
            elastic_alpha: [34.0, 34.0],
            elastic_sigma: [4.0, 4.0],
            binarize_threshold: 0.1,
        }
    }
}

impl MaskAugmentConfig {
    /// A configuration that changes nothing: no augmenters.
    pub fn identity() -> Self {
        Self {
            augmenters: Vec::new(),
            ..Self::default()
        }
    }

    /// Checks every field; the error names the field and the numbers.
    pub fn validate(&self) -> Result<()> {
        for (i, a) in self.augmenters.iter().enumerate() {
            if self.augmenters[..i].contains(a) {
                return Err(MaskError::invalid(
                    "augmenters",
                    format!("lists {a:?} twice ({:?})", self.augmenters),
                ));
            }
        }
        check_probability(
            "horizontal_flip_probability",
            self.horizontal_flip_probability,
        )?;
        check_probability("vertical_flip_probability", self.vertical_flip_probability)?;
        check_range(
            "crop_and_pad_fraction",
            self.crop_and_pad_fraction,
            Limit::Above(-0.5),
            Limit::AtMost(1.0),
        )?;
        for (field, r) in [("scale_x", self.scale_x), ("scale_y", self.scale_y)] {
            check_range(field, r, Limit::Above(0.0), Limit::None)?;
        }
        for (field, r) in [
            ("translate_x_fraction", self.translate_x_fraction),
            ("translate_y_fraction", self.translate_y_fraction),
            ("rotate_degrees", self.rotate_degrees),
        ] {
            check_range(field, r, Limit::None, Limit::None)?;
        }
        check_range(
            "shear_degrees",
            self.shear_degrees,
            Limit::Above(-90.0),
            Limit::Below(90.0),
        )?;
        check_range(
            "elastic_alpha",
            self.elastic_alpha,
            Limit::AtLeast(0.0),
            Limit::None,
        )?;
        check_range(
            "elastic_sigma",
            self.elastic_sigma,
            Limit::Above(0.0),
            Limit::AtMost(MAX_ELASTIC_SIGMA),
        )?;
        let t = self.binarize_threshold;
        if !(0.0..1.0).contains(&t) {
            return Err(MaskError::invalid(
                "binarize_threshold",
                format!("is {t}, expected a value in [0, 1)"),
            ));
        }
        Ok(())
    }
}

/// A bound on the values of a range; `Above`/`Below` exclude the bound itself.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Limit {
    None,
    Above(f64),
    AtLeast(f64),
    Below(f64),
    AtMost(f64),
}

impl Limit {
    fn admits(self, v: f64) -> bool {
        match self {
            Limit::None => true,
            Limit::Above(b) => v > b,
            Limit::AtLeast(b) => v >= b,
            Limit::Below(b) => v < b,
            Limit::AtMost(b) => v <= b,
        }
    }

    fn describe(self) -> String {
        match self {
            Limit::None => String::new(),
            Limit::Above(b) => format!("above {b}"),
            Limit::AtLeast(b) => format!("at least {b}"),
            Limit::Below(b) => format!("below {b}"),
            Limit::AtMost(b) => format!("at most {b}"),
        }
    }
}

fn check_probability(field: &str, p: f64) -> Result<()> {
    if (0.0..=1.0).contains(&p) {
        Ok(())
    } else {
        Err(MaskError::invalid(
            field,
            format!("is {p}, expected a probability in [0, 1]"),
        ))
    }
}

/// Checks that `[lo, hi]` is finite, ordered and within the limits.
pub(crate) fn check_range(field: &str, r: [f64; 2], low: Limit, high: Limit) -> Result<()> {
    let [lo, hi] = r;
    if !lo.is_finite() || !hi.is_finite() {
        return Err(MaskError::invalid(
            field,
            format!("is [{lo}, {hi}], expected finite numbers"),
        ));
    }
    if lo > hi {
        return Err(MaskError::invalid(
            field,
            format!("is [{lo}, {hi}], its lower bound exceeds its upper bound"),
        ));
    }
    if check_value(field, lo, low, high).is_err() || check_value(field, hi, low, high).is_err() {
        return Err(MaskError::invalid(
            field,
            format!("is [{lo}, {hi}], expected values {}", describe(low, high)),
        ));
    }
    Ok(())
}

fn describe(low: Limit, high: Limit) -> String {
    let limits: Vec<String> = [low.describe(), high.describe()]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect();
    limits.join(" and ")
}

/// Checks one finite value against the limits (used for drawn parameters too).
pub(crate) fn check_value(field: &str, v: f64, low: Limit, high: Limit) -> Result<()> {
    if v.is_finite() && low.admits(v) && high.admits(v) {
        Ok(())
    } else {
        let expected = format!("a finite number {}", describe(low, high));
        let expected = expected.trim_end();
        Err(MaskError::invalid(
            field,
            format!("is {v}, expected {expected}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(cfg: &MaskAugmentConfig) -> String {
        cfg.validate().unwrap_err().to_string()
    }

    #[test]
    fn the_default_is_the_reference_pipeline_of_spec_2() {
        let cfg = MaskAugmentConfig::default();
        cfg.validate().unwrap();
        assert_eq!(cfg.augmenters, Augmenter::REFERENCE);
        assert!(cfg.random_order);
        assert_eq!(cfg.horizontal_flip_probability, 0.5);
        assert_eq!(cfg.crop_and_pad_fraction, [0.0, 0.1]);
        assert_eq!((cfg.scale_x, cfg.scale_y), ([0.8, 1.2], [0.8, 1.2]));
        assert_eq!(cfg.translate_x_fraction, [-0.1, 0.1]);
        assert_eq!(cfg.translate_y_fraction, [-0.1, 0.1]);
        assert_eq!(cfg.rotate_degrees, [-15.0, 15.0]);
        assert_eq!(cfg.shear_degrees, [-8.0, 8.0]);
        assert_eq!(cfg.binarize_threshold, 0.1);
        MaskAugmentConfig::identity().validate().unwrap();
    }

    #[test]
    fn serde_fills_defaults_rejects_unknown_fields_and_round_trips() {
        let cfg: MaskAugmentConfig = serde_json::from_str(
            r#"{"augmenters": ["scale", "elastic"], "scale_x": [0.9, 1.1], "elastic_alpha": [5, 10]}"#,
        )
        .unwrap();
        assert_eq!(cfg.augmenters, [Augmenter::Scale, Augmenter::Elastic]);
        assert_eq!(cfg.scale_x, [0.9, 1.1]);
        assert_eq!(cfg.elastic_alpha, [5.0, 10.0]);
        assert_eq!(cfg.scale_y, MaskAugmentConfig::default().scale_y);
        let text = serde_json::to_string(&cfg).unwrap();
        assert_eq!(
            serde_json::from_str::<MaskAugmentConfig>(&text).unwrap(),
            cfg
        );
        let err = serde_json::from_str::<MaskAugmentConfig>(r#"{"rotation": [0, 1]}"#).unwrap_err();
        assert!(
            err.to_string().contains("unknown field `rotation`"),
            "{err}"
        );
        let err =
            serde_json::from_str::<MaskAugmentConfig>(r#"{"augmenters": ["zoom"]}"#).unwrap_err();
        assert!(err.to_string().contains("unknown variant `zoom`"), "{err}");
    }

    #[test]
    fn invalid_ranges_name_the_field_and_the_numbers() {
        let base = MaskAugmentConfig::default();
        let cases: Vec<(MaskAugmentConfig, &str)> = vec![
            (
                MaskAugmentConfig {
                    scale_x: [1.2, 0.8],
                    ..base.clone()
                },
                "`scale_x` is [1.2, 0.8], its lower bound exceeds its upper bound",
            ),
            (
                MaskAugmentConfig {
                    scale_y: [0.0, 1.0],
                    ..base.clone()
                },
                "`scale_y` is [0, 1], expected values above 0",
            ),
            (
                MaskAugmentConfig {
                    crop_and_pad_fraction: [-0.5, 0.1],
                    ..base.clone()
                },
                "`crop_and_pad_fraction` is [-0.5, 0.1], expected values above -0.5 and at most 1",
            ),
            (
                MaskAugmentConfig {
                    shear_degrees: [-8.0, 90.0],
                    ..base.clone()
                },
                "`shear_degrees` is [-8, 90], expected values above -90 and below 90",
            ),
            (
                MaskAugmentConfig {
                    elastic_sigma: [0.0, 4.0],
                    ..base.clone()
                },
                "`elastic_sigma` is [0, 4], expected values above 0 and at most 1000",
            ),
            (
                MaskAugmentConfig {
                    elastic_alpha: [-1.0, 4.0],
                    ..base.clone()
                },
                "`elastic_alpha` is [-1, 4], expected values at least 0",
            ),
            (
                MaskAugmentConfig {
                    rotate_degrees: [f64::NAN, 4.0],
                    ..base.clone()
                },
                "`rotate_degrees` is [NaN, 4], expected finite numbers",
            ),
            (
                MaskAugmentConfig {
                    horizontal_flip_probability: 1.5,
                    ..base.clone()
                },
                "`horizontal_flip_probability` is 1.5, expected a probability in [0, 1]",
            ),
            (
                MaskAugmentConfig {
                    binarize_threshold: 1.0,
                    ..base.clone()
                },
                "`binarize_threshold` is 1, expected a value in [0, 1)",
            ),
            (
                MaskAugmentConfig {
                    augmenters: vec![Augmenter::Rotate, Augmenter::Scale, Augmenter::Rotate],
                    ..base.clone()
                },
                "`augmenters` lists Rotate twice",
            ),
        ];
        for (cfg, expected) in cases {
            let message = problem(&cfg);
            assert!(message.contains(expected), "{message:?} lacks {expected:?}");
        }
    }
}
