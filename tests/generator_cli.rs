//! End-to-end tests of the generator pipelines on built-in phantoms: pix2pix pre-training
//! learns (validation L1 clearly below the untrained generator's) and resumes bit-identically
//! after SIGKILL; `train --method separate` runs; `generate` writes datasets that
//! `genseg data check` and genseg-data accept in both layouts; bad inputs are named errors.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use genseg_data::dataset::{DataConfig, Dataset};
use genseg_data::layout::LayoutChoice;

use crate::support::genseg_bin;

/// The binary with one compute thread (the tests run in parallel).
fn command() -> Command {
    let mut cmd = Command::new(genseg_bin());
    cmd.env("CANDLE_NUM_THREADS", "1")
        .env("RAYON_NUM_THREADS", "1");
    cmd
}

fn genseg<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    command()
        .args(args)
        .output()
        .expect("the genseg binary runs")
}

fn ok<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    let out = genseg(args);
    assert!(
        out.status.success(),
        "genseg {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    let out = genseg(args);
    assert!(!out.status.success(), "genseg {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn lung_phantoms(dir: &Path, n: usize) {
    ok(&[
        "data",
        "phantoms",
        "--kind",
        "lungs",
        "--n",
        &n.to_string(),
        "--size",
        "64",
        "--seed",
        "3",
        "--out",
        &s(dir),
    ]);
}

/// `pretrain-generator` arguments for a tiny, fast generator at 32 px.
fn pretrain_args(data: &Path, out: &Path, iterations: u64, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "pretrain-generator",
        "--data",
        &s(data),
        "--n-train",
        "12",
        "--n-val",
        "4",
        "--seed",
        "2",
        "--out",
        &s(out),
        "--set",
        "data.size=32",
        "--set",
        "generator.ngf=8",
        "--set",
        "discriminator.ndf=8",
        "--set",
        "train.batch_size=4",
        "--set",
        "train.val_every=20",
        "--set",
        "train.checkpoint_every=10",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.extend(["--set".into(), format!("train.iterations={iterations}")]);
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .expect("metrics.jsonl exists")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

#[test]
fn pretrained_generator_learns_and_feeds_separate_and_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("lungs");
    lung_phantoms(&data, 24);
    let gen_run = tmp.path().join("gen");
    ok(&pretrain_args(&data, &gen_run, 80, &[]));
    for f in [
        "config.toml",
        "split.json",
        "train.log",
        "metrics.jsonl",
        "progress.png",
        "best/weights.safetensors",
        "last/optim-generator.safetensors",
        "last/optim-discriminator.safetensors",
        "samples/iter_000000.png",
        "samples/iter_000080.png",
    ] {
        assert!(gen_run.join(f).exists(), "pre-training run lacks {f}");
    }
    // The grid: 4 validation rows of mask | real | generated, 32 px tiles, 2 px padding.
    let grid = image::open(gen_run.join("samples/iter_000080.png")).unwrap();
    assert_eq!(
        (grid.width(), grid.height()),
        (3 * 32 + 4 * 2, 4 * 32 + 5 * 2)
    );

    // The untrained generator (iteration 0) against the best pre-trained one, on the same
    // validation pairs.
    let lines = metrics(&gen_run);
    let val = |l: &serde_json::Value| l.get("val_l1").and_then(|v| v.as_f64());
    let untrained = val(&lines[0]).expect("iteration 0 is validated");
    assert_eq!(lines[0]["iteration"], 0);
    let best = lines.iter().filter_map(val).fold(f64::INFINITY, f64::min);
    assert!(
        best < 0.6 * untrained,
        "pre-training did not pay: validation L1 {untrained:.4} untrained, best {best:.4}"
    );
    let ssim_first = lines[0]["val_ssim"].as_f64().unwrap();
    let ssim_last = lines.last().unwrap()["val_ssim"].as_f64().unwrap();
    assert!(ssim_last > ssim_first, "SSIM {ssim_first} -> {ssim_last}");

    // Separate: segmentation on real + synthetic pairs.
    let seg_run = tmp.path().join("separate");
    let seg_args = |out: &Path, size: &str| -> Vec<String> {
        [
            "train",
            "--method",
            "separate",
            "--generator",
            &s(&gen_run),
            "--data",
            &s(&data),
            "--n-train",
            "12",
            "--n-val",
            "4",
            "--seed",
            "1",
            "--out",
            &s(out),
            "--set",
            &format!("data.size={size}"),
            "--set",
            "model.unet.base_width=4",
            "--set",
            "model.unet.depth=3",
            "--set",
            "train.iterations=6",
            "--set",
            "train.val_every=3",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    ok(&seg_args(&seg_run, "32"));
    for f in [
        "config.toml",
        "metrics.jsonl",
        "best/weights.safetensors",
        "last/state.json",
    ] {
        assert!(seg_run.join(f).exists(), "separate run lacks {f}");
    }
    let config = std::fs::read_to_string(seg_run.join("config.toml")).unwrap();
    let canonical = std::fs::canonicalize(&gen_run).unwrap();
    assert!(
        config.contains(&s(&canonical)),
        "the generator run is not recorded: {config}"
    );
    let seg_lines = metrics(&seg_run);
    assert!(
        seg_lines
            .iter()
            .any(|l| l["loss_synthetic"].as_f64().is_some_and(f64::is_finite)),
        "no synthetic loss logged"
    );
    // Resuming (from another working directory) finds the generator from the config.
    let out = command()
        .current_dir(tmp.path().join("lungs"))
        .args(["train", "--resume", &s(&seg_run)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A generator made for 32 px does not fit 64 px data: both sizes are named.
    let err = fails(&seg_args(&tmp.path().join("mismatch"), "64"));
    assert!(
        err.contains("32 px") && err.contains("data.size is 64"),
        "{err}"
    );

    // Generate in both layouts, from a dataset folder and from a folder of masks.
    let folder = tmp.path().join("syn-folder");
    let line = ok(&[
        "generate",
        "--generator",
        &s(&gen_run),
        "--masks",
        &s(&data),
        "--n",
        "10",
        "--seed",
        "4",
        "--out",
        &s(&folder),
    ]);
    assert!(line.contains("10 synthetic pair(s)"), "{line}");
    let check = ok(&["data", "check", &s(&folder)]);
    assert!(check.contains("10"), "{check}");
    let nnunet = tmp.path().join("syn-nnunet");
    ok(&[
        "generate",
        "--generator",
        &s(&gen_run),
        "--masks",
        &s(&data.join("masks")),
        "--n",
        "6",
        "--layout",
        "nnunet",
        "--out",
        &s(&nnunet),
    ]);
    ok(&["data", "check", &s(&nnunet), "--layout", "nnunet"]);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(nnunet.join("dataset.json")).unwrap())
            .unwrap();
    assert_eq!(json["numTraining"], 6);
    assert_eq!(json["file_ending"], ".png");
    assert_eq!(json["labels"]["foreground"], 1);
    let ds = Dataset::load(
        &nnunet,
        &DataConfig {
            layout: LayoutChoice::NnUnet,
            ..DataConfig::default()
        },
    )
    .unwrap();
    assert_eq!((ds.len(), ds.channels()), (6, 1));
    assert!(ds.samples().iter().all(|s| s.mask.contains(&1)));
    // The synthetic images are not blank: their grey levels spread.
    let img = &ds.samples()[0].image;
    let (lo, hi) = (img.iter().min().unwrap(), img.iter().max().unwrap());
    assert!(hi - lo > 100, "flat synthetic image ({lo}..{hi})");
    // Refuses to write into a non-empty folder.
    let err = fails(&[
        "generate",
        "--generator",
        &s(&gen_run),
        "--masks",
        &s(&data),
        "--out",
        &s(&nnunet),
    ]);
    assert!(err.contains("not empty"), "{err}");
}

/// A safetensors file as (header, tensor bytes): the header is compared as JSON because
/// the order of its metadata keys is not fixed from one write to the next.
fn safetensors_content(path: &Path) -> (serde_json::Value, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

/// Starts the run of `args` (writing to `run`), SIGKILLs it once `last/` holds step
/// `at_least` or later, and returns that step (checked to be before `total`).
fn run_and_kill(args: &[String], run: &Path, at_least: u64, total: u64) -> u64 {
    let mut child = command()
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let state = run.join("last/state.json");
    let step = |p: &Path| -> Option<u64> {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()?;
        v["step"].as_u64()
    };
    let started = Instant::now();
    while step(&state).is_none_or(|s| s < at_least) {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no checkpoint at step {at_least} in time"
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
    at_kill
}

#[test]
fn pretrain_resume_after_sigkill_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("lungs");
    lung_phantoms(&data, 20);
    let total = 60;
    let straight = tmp.path().join("straight");
    ok(&pretrain_args(&data, &straight, total, &[]));

    let killed = tmp.path().join("killed");
    let at_kill = run_and_kill(
        &pretrain_args(&data, &killed, total, &[]),
        &killed,
        20,
        total,
    );
    ok(&["pretrain-generator", "--resume", &s(&killed)]);
    for f in [
        "last/weights.safetensors",
        "last/optim-generator.safetensors",
        "last/optim-discriminator.safetensors",
        "best/weights.safetensors",
    ] {
        let a = safetensors_content(&straight.join(f));
        let b = safetensors_content(&killed.join(f));
        assert!(
            a == b,
            "{f} differs between the uninterrupted and the resumed run (killed at step {at_kill})"
        );
    }
    let strip = |run: &Path| -> Vec<serde_json::Value> {
        metrics(run)
            .into_iter()
            .map(|mut l| {
                let o = l.as_object_mut().unwrap();
                o.remove("seconds");
                o.remove("step_seconds");
                l
            })
            .collect()
    };
    assert_eq!(strip(&straight), strip(&killed), "metrics.jsonl differ");
}

#[test]
fn separate_resume_after_sigkill_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("lungs");
    lung_phantoms(&data, 20);
    let gen_run = tmp.path().join("gen");
    ok(&pretrain_args(&data, &gen_run, 5, &[]));
    let total = 100;
    let args = |out: &Path| -> Vec<String> {
        [
            "train",
            "--method",
            "separate",
            "--generator",
            &s(&gen_run),
            "--data",
            &s(&data),
            "--n-train",
            "12",
            "--n-val",
            "4",
            "--seed",
            "1",
            "--out",
            &s(out),
            "--set",
            "data.size=32",
            "--set",
            "model.unet.base_width=4",
            "--set",
            "model.unet.depth=3",
            "--set",
            &format!("train.iterations={total}"),
            "--set",
            "train.val_every=10",
            "--set",
            "train.checkpoint_every=10",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let straight = tmp.path().join("straight");
    ok(&args(&straight));
    let killed = tmp.path().join("killed");
    let at_kill = run_and_kill(&args(&killed), &killed, 20, total);
    ok(&["train", "--resume", &s(&killed)]);
    for f in ["last/weights.safetensors", "best/weights.safetensors"] {
        assert!(
            safetensors_content(&straight.join(f)) == safetensors_content(&killed.join(f)),
            "{f} differs between the uninterrupted and the resumed run (killed at step {at_kill})"
        );
    }
}

#[test]
fn bad_generator_inputs_are_named_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("lungs");
    lung_phantoms(&data, 8);
    let missing = tmp.path().join("no-such-run");
    let err = fails(&[
        "generate",
        "--generator",
        &s(&missing),
        "--masks",
        &s(&data),
        "--out",
        &s(&tmp.path().join("o")),
    ]);
    assert!(err.contains("no-such-run"), "{err}");
    let err = fails(&[
        "train",
        "--method",
        "separate",
        "--generator",
        &s(&missing),
        "--data",
        &s(&data),
        "--out",
        &s(&tmp.path().join("r")),
    ]);
    assert!(err.contains("no-such-run"), "{err}");
    let err = fails(&[
        "train",
        "--method",
        "separate",
        "--data",
        &s(&data),
        "--out",
        &s(&tmp.path().join("r2")),
    ]);
    assert!(err.contains("--generator"), "{err}");
    // A segmentation run is not a generator run.
    let seg = tmp.path().join("seg");
    ok(&[
        "train",
        "--data",
        &s(&data),
        "--n-train",
        "4",
        "--n-val",
        "2",
        "--out",
        &s(&seg),
        "--set",
        "data.size=32",
        "--set",
        "model.unet.base_width=4",
        "--set",
        "model.unet.depth=2",
        "--set",
        "train.iterations=1",
    ]);
    let err = fails(&[
        "generate",
        "--generator",
        &s(&seg),
        "--masks",
        &s(&data),
        "--out",
        &s(&tmp.path().join("o2")),
    ]);
    assert!(err.contains("not a generator pre-training run"), "{err}");
    let err = fails(&[
        "pretrain-generator",
        "--data",
        &s(&data),
        "--out",
        &s(&tmp.path().join("p")),
        "--set",
        "generator.ngff=3",
    ]);
    assert!(
        err.contains("generator.ngff") && err.contains("generator.ngf"),
        "{err}"
    );
}
