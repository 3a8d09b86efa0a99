//! End-to-end training tests on built-in phantoms: the baseline learns,
//! resume after SIGKILL is bit-identical, evaluate and predict work, and bad
//! inputs give named errors.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use genseg_backbones::metrics::{BinaryMask, MetricOptions, case_metrics};
use genseg_data::dataset::{DataConfig, Dataset, ImageSize};

use crate::support::{self, command, fails, ok, run_args, s};

/// The phantoms of these tests (seed 5).
fn phantoms(dir: &Path, kind: &str, n: usize, extra: &[&str]) {
    support::phantoms(dir, kind, n, 5, extra);
}

/// A small, fast configuration for tests.
const SMALL: &[&str] = &[
    "data.size=64",
    "model.unet.base_width=8",
    "model.unet.depth=3",
    "train.batch_size=4",
    "train.lr=0.003",
    "train.val_every=20",
];

fn train(data: &Path, out: &Path, iterations: u64, extra: &[&str]) -> Vec<String> {
    run_args(&["train"], data, (12, 4, 1), out, SMALL, iterations, extra)
}

fn run_train(args: &[String]) -> String {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&refs)
}

fn summary(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("summary.json exists"))
        .expect("valid JSON")
}

#[test]
fn baseline_beats_the_mean_mask_and_evaluate_predict_work() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("skin");
    phantoms(&data, "skin", 40, &[]);
    let run = tmp.path().join("run");
    run_train(&train(&data, &run, 200, &[]));
    for f in [
        "config.toml",
        "split.json",
        "train.log",
        "metrics.jsonl",
        "progress.png",
        "best/weights.safetensors",
        "last/state.json",
    ] {
        assert!(run.join(f).exists(), "run folder lacks {f}");
    }
    let test = summary(&run.join("eval-test/summary.json"));
    let model_dice = test["dice"]["mean"].as_f64().unwrap();

    // The trivial predictor: the mean training mask, thresholded at 0.5.
    let cfg = DataConfig {
        size: Some(ImageSize::square(64)),
        ..DataConfig::default()
    };
    let ds = Dataset::load(&data, &cfg).unwrap();
    let split: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("split.json")).unwrap()).unwrap();
    let ids = |key: &str| -> Vec<String> {
        split[0][key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let (train_ids, test_ids) = (ids("train"), ids("test"));
    let mut mean = vec![0f64; 64 * 64];
    for i in ds.indices_of(&train_ids).unwrap() {
        for (m, &v) in mean.iter_mut().zip(&ds.samples()[i].mask) {
            *m += v as f64 / train_ids.len() as f64;
        }
    }
    let trivial = BinaryMask {
        height: 64,
        width: 64,
        pixels: mean.iter().map(|&v| v > 0.5).collect(),
    };
    let test_idx = ds.indices_of(&test_ids).unwrap();
    let trivial_dice: f64 = test_idx
        .iter()
        .map(|&i| {
            let truth = BinaryMask {
                height: 64,
                width: 64,
                pixels: ds.samples()[i].mask.iter().map(|&v| v > 0).collect(),
            };
            case_metrics(&trivial, &truth, &MetricOptions::default())
                .unwrap()
                .dice
                .unwrap()
        })
        .sum::<f64>()
        / test_idx.len() as f64;
    assert!(
        model_dice > trivial_dice + 0.15,
        "model test Dice {model_dice:.3} is not clearly above the mean-mask predictor's {trivial_dice:.3}"
    );

    // Out-of-domain evaluation on a shifted phantom domain.
    let shifted = tmp.path().join("shifted");
    phantoms(&shifted, "skin", 6, &["--shifted"]);
    let eval_out = tmp.path().join("eval");
    let line = ok(&[
        "evaluate",
        "--run",
        &s(&run),
        "--data",
        &s(&shifted),
        "--out",
        &s(&eval_out),
    ]);
    assert!(line.contains("6 cases"), "{line}");
    let ood = summary(&eval_out.join("summary.json"));
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
        assert!(ood.get(key).is_some(), "summary.json lacks {key}");
    }
    assert_eq!(
        std::fs::read_to_string(eval_out.join("per_case.csv"))
            .unwrap()
            .lines()
            .count(),
        7
    );
    // The figure of the first four cases: rows of image | truth | prediction, 64 px tiles
    // with 2 px padding.
    let figure = image::open(eval_out.join("cases.png")).unwrap();
    assert_eq!(
        (figure.width(), figure.height()),
        (3 * 64 + 4 * 2, 4 * 64 + 5 * 2)
    );

    // Predict writes masks at the input's original size.
    let big = tmp.path().join("big");
    let pred = tmp.path().join("pred");
    ok(&[
        "data",
        "phantoms",
        "--kind",
        "skin",
        "--n",
        "2",
        "--size",
        "80",
        "--seed",
        "9",
        "--out",
        &s(&big),
    ]);
    let line = ok(&[
        "predict",
        "--run",
        &s(&run),
        "--input",
        &s(&big.join("images")),
        "--out",
        &s(&pred),
    ]);
    assert!(line.contains("2 image(s)"), "{line}");
    let masks: Vec<PathBuf> = std::fs::read_dir(pred.join("masks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(masks.len(), 2);
    let m = image::open(&masks[0]).unwrap().to_luma8();
    assert_eq!(m.dimensions(), (80, 80));
    assert!(m.pixels().all(|p| p.0[0] == 0 || p.0[0] == 255));
    assert_eq!(std::fs::read_dir(pred.join("overlays")).unwrap().count(), 2);

    // Scoring at each image's own size (80 px, the run works at 64) is `predict` followed
    // by `score` at that size: two paths, one number.
    let native = tmp.path().join("eval-native");
    ok(&[
        "evaluate",
        "--run",
        &s(&run),
        "--data",
        &s(&big),
        "--resolution",
        "native",
        "--out",
        &s(&native),
    ]);
    let scored = tmp.path().join("score-80");
    ok(&[
        "score",
        "--predictions",
        &s(&pred.join("masks")),
        "--data",
        &s(&big),
        "--size",
        "80",
        "--out",
        &s(&scored),
    ]);
    let (native, scored) = (
        summary(&native.join("summary.json")),
        summary(&scored.join("summary.json")),
    );
    assert_eq!(native["resolution"], "native");
    assert_eq!(scored["resolution"], 80);
    for metric in ["dice", "iou", "precision", "recall"] {
        let (a, b) = (
            native[metric]["mean"].as_f64().unwrap(),
            scored[metric]["mean"].as_f64().unwrap(),
        );
        assert!((a - b).abs() < 1e-9, "{metric}: evaluate {a} vs score {b}");
    }
    let err = fails(&["evaluate", "--run", &s(&run), "--resolution", "full"]);
    assert!(err.contains("full") && err.contains("native"), "{err}");

    // A corrupt checkpoint is a named error, not a panic.
    std::fs::write(
        run.join("best/weights.safetensors"),
        b"not a safetensors file",
    )
    .unwrap();
    let err = fails(&["evaluate", "--run", &s(&run)]);
    assert!(err.contains("weights.safetensors"), "{err}");
}

#[test]
fn resume_after_sigkill_is_bit_identical() {
    assert_resume_after_sigkill_is_bit_identical(120, &["--method", "flip"]);
}

/// The strong recipe's batches come from a prefetch thread (and here its learning rate from
/// nnU-Net's schedule): a killed and resumed run must still match an uninterrupted one bit
/// for bit.
#[test]
fn strong_recipe_resume_after_sigkill_is_bit_identical() {
    let (_tmp, run) = assert_resume_after_sigkill_is_bit_identical(
        60,
        &["--recipe", "strong", "--set", "train.schedule=\"poly\""],
    );
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    for key in [
        "normalisation = \"z_score\"",
        "norm = \"instance\"",
        "deep_supervision = true",
        "optimizer = \"rmsprop\"",
        "schedule = \"poly\"",
        "transforms = true",
        "mirror_tta = true",
    ] {
        assert!(config.contains(key), "{key} missing from config.toml");
    }
    let s = summary(&run.join("eval-test/summary.json"));
    let dice = s["dice"]["mean"].as_f64().unwrap();
    assert!(dice.is_finite() && dice > 0.0, "test Dice {dice}");
}

/// Trains `total` iterations straight and again killed (SIGKILL) after its checkpoint at
/// step 30 then resumed; asserts identical weights and logs; returns the resumed run.
fn assert_resume_after_sigkill_is_bit_identical(
    total: u64,
    extra: &[&str],
) -> (tempfile::TempDir, PathBuf) {
    let tmp_dir = tempfile::tempdir().unwrap();
    let tmp = tmp_dir.path();
    let data = tmp.join("lungs");
    phantoms(&data, "lungs", 20, &[]);
    let mut every = vec!["--set", "train.checkpoint_every=10"];
    every.extend(extra);

    let straight = tmp.join("straight");
    run_train(&train(&data, &straight, total, &every));

    let killed = tmp.join("killed");
    let args = train(&data, &killed, total, &every);
    let mut child = command()
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let state = killed.join("last/state.json");
    let started = Instant::now();
    let step = |p: &Path| -> Option<u64> {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()?;
        v["step"].as_u64()
    };
    while step(&state).is_none_or(|s| s < 30) {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no checkpoint at step 30 in time"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let at_kill = step(&state).unwrap();
    assert!(at_kill < total, "killed after the end ({at_kill})");

    ok(&["train", "--resume", &s(&killed)]);
    for f in ["last/weights.safetensors", "best/weights.safetensors"] {
        let a = std::fs::read(straight.join(f)).unwrap();
        let b = std::fs::read(killed.join(f)).unwrap();
        assert!(
            a == b,
            "{f} differs between the uninterrupted and the resumed run (killed at step {at_kill})"
        );
    }
    let lines = |p: &Path| {
        std::fs::read_to_string(p.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count()
    };
    assert_eq!(
        lines(&straight),
        lines(&killed),
        "metrics.jsonl has one line per logged step after resume"
    );
    (tmp_dir, killed)
}

#[test]
fn bad_inputs_are_named_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    phantoms(&data, "lungs", 8, &[]);
    let run = tmp.path().join("r");
    let mut args = train(&data, &run, 2, &[]);
    args.extend(["--set".into(), "train.lrr=1".into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = fails(&refs);
    assert!(
        err.contains("train.lrr") && err.contains("train.iterations"),
        "{err}"
    );
    let err = fails(&[
        "train",
        "--data",
        &s(&tmp.path().join("missing")),
        "--out",
        &s(&run),
    ]);
    assert!(err.contains("missing"), "{err}");
    let err = fails(&["train", "--resume", &s(&tmp.path().join("nothing"))]);
    assert!(err.contains("not a run folder"), "{err}");
    // No validation pairs: nothing could choose best/, so the run is refused up front.
    let err = fails(&[
        "train",
        "--data",
        &s(&data),
        "--n-train",
        "7",
        "--n-val",
        "0",
        "--out",
        &s(&tmp.path().join("no-val")),
    ]);
    assert!(err.contains("data.n_val must be > 0"), "{err}");
    assert!(!tmp.path().join("no-val").exists());
    // A runaway size is refused before anything is allocated.
    let mut args = train(&data, &tmp.path().join("huge"), 2, &[]);
    args.extend(["--set".into(), "data.size=100000".into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = fails(&refs);
    assert!(err.contains("data.size 100000"), "{err}");
    let err = fails(&[
        "train",
        "--data",
        &s(&data),
        "--n-train",
        "7",
        "--n-val",
        "4",
        "--out",
        &s(&run),
    ]);
    assert!(
        err.contains('7') || err.contains("11"),
        "split larger than the pool: {err}"
    );
    // Each of these failed before the run started: no half-made run folder is left.
    assert!(!run.exists(), "a failed start left {}", run.display());
    // An image that does not decode: the error names it, and the start is withdrawn
    // without touching what the user had in the folder.
    let images = data.join("images");
    let first = std::fs::read_dir(&images)
        .unwrap()
        .map(|e| e.unwrap().path())
        .min()
        .unwrap();
    std::fs::write(&first, b"not a png").unwrap();
    std::fs::create_dir(&run).unwrap();
    std::fs::write(run.join("notes.txt"), "mine").unwrap();
    let args = train(&data, &run, 2, &[]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = fails(&refs);
    let name = first.file_name().unwrap().to_string_lossy().into_owned();
    assert!(err.contains(&name), "{err}");
    let left: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["notes.txt"]);
}

#[test]
fn score_rates_external_masks_with_our_metrics_and_names_a_missing_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("lungs");
    phantoms(&data, "lungs", 6, &[]);
    let out = tmp.path().join("score");
    let args = |pred: &Path| {
        vec![
            "score".to_string(),
            "--predictions".into(),
            s(pred),
            "--data".into(),
            s(&data),
            "--size".into(),
            "32".into(),
            "--out".into(),
            s(&out),
        ]
    };
    // The truth itself, at another size than it is stored at: Dice 1 on every case.
    run_train(&args(&data.join("masks")));
    let truth = summary(&out.join("summary.json"));
    assert_eq!(truth["n_cases"].as_u64(), Some(6));
    assert_eq!(truth["dice"]["min"].as_f64(), Some(1.0));
    // Empty predictions score 0.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    for entry in std::fs::read_dir(data.join("masks")).unwrap() {
        let name = entry.unwrap().file_name();
        image::GrayImage::new(64, 64)
            .save(empty.join(&name))
            .unwrap();
    }
    run_train(&args(&empty));
    assert_eq!(
        summary(&out.join("summary.json"))["dice"]["max"].as_f64(),
        Some(0.0)
    );
    let first = std::fs::read_dir(&empty)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::remove_file(&first).unwrap();
    let err = fails(&args(&empty));
    assert!(err.contains(&s(&first)) && err.contains("missing"), "{err}");
}
