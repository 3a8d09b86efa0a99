//! Evaluation reports, nnU-Net style: `per_case.csv` (one row per case) and
//! `summary.json` ({mean, std, median, min, max, n} per metric).
//!
//! Statistics skip excluded values (`None`); `n` says how many were used.
//! `std` is the population standard deviation (numpy's default, ddof 0).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::metrics::{
    CaseMetrics, EmptyPolicy, METRIC_NAMES, MetricOptions, ScoreResolution, percentile,
};

/// One evaluated case.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaseResult {
    /// The case id (file stem).
    pub id: String,
    /// Its scores.
    pub metrics: CaseMetrics,
}

/// Aggregate of one metric over the cases where it is defined.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricStats {
    /// Mean (NaN when `n` is 0).
    pub mean: f64,
    /// Population standard deviation.
    pub std: f64,
    /// Median.
    pub median: f64,
    /// Minimum.
    pub min: f64,
    /// Maximum.
    pub max: f64,
    /// Number of cases that entered the statistics.
    pub n: usize,
}

impl MetricStats {
    /// Statistics of `values`; all NaN with `n = 0` when empty.
    pub fn of(values: &[f64]) -> Self {
        let n = values.len();
        if n == 0 {
            return Self {
                mean: f64::NAN,
                std: f64::NAN,
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
                n,
            };
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
        let mut sorted = values.to_vec();
        let median = percentile(&mut sorted, 50.0).unwrap_or(f64::NAN);
        Self {
            mean,
            std: var.sqrt(),
            median,
            min: sorted[0],
            max: sorted[n - 1],
            n,
        }
    }
}

/// Mean and sample standard deviation (n − 1; 0 for a single value) of a few values, e.g.
/// one score per seed.
pub fn mean_and_sample_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// `summary.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Statistics per metric (`dice`, `iou`, `precision`, `recall`, and
    /// `hd95` when computed), flattened into the top level.
    #[serde(flatten)]
    pub metrics: BTreeMap<String, MetricStats>,
    /// Number of evaluated cases.
    pub n_cases: usize,
    /// The evaluated dataset (folder).
    pub dataset: String,
    /// The checkpoint that produced the predictions.
    pub checkpoint: String,
    /// How both-empty cases were scored.
    pub empty_policy: EmptyPolicy,
    /// The resolution predictions and truth were compared at.
    #[serde(default)]
    pub resolution: ScoreResolution,
}

/// Aggregates per-case results.
pub fn summarize(
    cases: &[CaseResult],
    opts: &MetricOptions,
    dataset: &str,
    checkpoint: &str,
) -> Summary {
    let mut metrics = BTreeMap::new();
    for name in METRIC_NAMES {
        if name == "hd95" && !opts.hd95 {
            continue;
        }
        let values: Vec<f64> = cases.iter().filter_map(|c| c.metrics.get(name)).collect();
        metrics.insert(name.to_string(), MetricStats::of(&values));
    }
    Summary {
        metrics,
        n_cases: cases.len(),
        dataset: dataset.to_string(),
        checkpoint: checkpoint.to_string(),
        empty_policy: opts.empty_policy,
        resolution: opts.resolution,
    }
}

/// Writes `per_case.csv` and `summary.json` into `dir` (created if needed)
/// and returns the summary. Excluded values are empty CSV cells.
pub fn write_reports(
    dir: &Path,
    cases: &[CaseResult],
    opts: &MetricOptions,
    dataset: &str,
    checkpoint: &str,
) -> anyhow::Result<Summary> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating report folder {}", dir.display()))?;
    let names: Vec<&str> = METRIC_NAMES
        .iter()
        .copied()
        .filter(|n| *n != "hd95" || opts.hd95)
        .collect();
    // Both files are built in memory and written atomically: a full disk leaves the
    // previous report (or none), never a truncated one.
    let csv_path = dir.join("per_case.csv");
    let mut csv = csv::Writer::from_writer(Vec::new());
    let mut header = vec!["id"];
    header.extend(&names);
    csv.write_record(&header)?;
    for case in cases {
        let mut row = vec![case.id.clone()];
        row.extend(names.iter().map(|n| {
            case.metrics
                .get(n)
                .map(|v| format!("{v:.6}"))
                .unwrap_or_default()
        }));
        csv.write_record(&row)?;
    }
    let table = csv
        .into_inner()
        .map_err(|e| anyhow::anyhow!("{}: {e}", csv_path.display()))?;
    genseg_nn::checkpoint::write_atomic(&csv_path, &table)?;
    let summary = summarize(cases, opts, dataset, checkpoint);
    let json_path = dir.join("summary.json");
    let json = serde_json::to_string_pretty(&summary)?;
    genseg_nn::checkpoint::write_atomic(&json_path, (json + "\n").as_bytes())?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(id: &str, dice: Option<f64>) -> CaseResult {
        CaseResult {
            id: id.into(),
            metrics: CaseMetrics {
                dice,
                iou: dice,
                precision: dice,
                recall: dice,
                hd95: None,
            },
        }
    }

    #[test]
    fn mean_and_sample_std_of_one_and_of_several() {
        assert_eq!(mean_and_sample_std(&[0.5]), (0.5, 0.0));
        let (m, s) = mean_and_sample_std(&[1.0, 2.0, 3.0]);
        assert!(
            (m - 2.0).abs() < 1e-12 && (s - 1.0).abs() < 1e-12,
            "{m} {s}"
        );
    }

    #[test]
    fn stats_by_hand() {
        let s = MetricStats::of(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(
            (s.mean, s.median, s.min, s.max, s.n),
            (2.5, 2.5, 1.0, 4.0, 4)
        );
        assert!((s.std - 1.25f64.sqrt()).abs() < 1e-12);
        assert_eq!(MetricStats::of(&[]).n, 0);
    }

    #[test]
    fn reports_on_disk() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let cases = [case("a", Some(0.5)), case("b", None), case("c", Some(1.0))];
        let opts = MetricOptions {
            empty_policy: EmptyPolicy::Exclude,
            hd95: false,
            resolution: ScoreResolution::Square(256),
        };
        let summary = write_reports(dir.path(), &cases, &opts, "phantoms", "best")?;
        assert_eq!(summary.metrics["dice"].n, 2);
        assert_eq!(summary.metrics["dice"].mean, 0.75);
        assert!(!summary.metrics.contains_key("hd95"));
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("summary.json"))?)?;
        for key in [
            "dice",
            "iou",
            "precision",
            "recall",
            "n_cases",
            "dataset",
            "checkpoint",
            "empty_policy",
        ] {
            assert!(json.get(key).is_some(), "summary.json lacks {key}");
        }
        assert_eq!(json["empty_policy"], "exclude");
        assert_eq!(json["resolution"], 256);
        assert_eq!(json["dice"]["median"], 0.75);
        let csv = std::fs::read_to_string(dir.path().join("per_case.csv"))?;
        assert_eq!(csv.lines().next(), Some("id,dice,iou,precision,recall"));
        assert_eq!(csv.lines().nth(2), Some("b,,,,"));
        Ok(())
    }
}
