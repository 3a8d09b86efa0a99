//! End-to-end tests of the generator pipelines on built-in phantoms: pix2pix pre-training
//! learns (validation L1 clearly below the untrained generator's) and resumes bit-identically
//! after SIGKILL; `train --method separate` runs; `generate` writes datasets that
//! `genseg data check` and genseg-data accept in both layouts; bad inputs are named errors.

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::Device;
use genseg_data::dataset::{DataConfig, Dataset};
use genseg_data::layout::LayoutChoice;

use crate::support::{self, command, fails, metrics, ok, run_args, s};

/// The lung phantoms of these tests (seed 3).
fn lung_phantoms(dir: &Path, n: usize) {
    support::phantoms(dir, "lungs", n, 3, &[]);
}

/// `pretrain-generator` arguments for a tiny, fast generator at 32 px.
fn pretrain_args(data: &Path, out: &Path, iterations: u64, extra: &[&str]) -> Vec<String> {
    let sets = [
        "data.size=32",
        "generator.ngf=8",
        "discriminator.ndf=8",
        "train.batch_size=4",
        "train.val_every=20",
        "train.checkpoint_every=10",
    ];
    let command = ["pretrain-generator"];
    run_args(&command, data, (12, 4, 2), out, &sets, iterations, extra)
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
    // Ten pairs of seed 4 from the dataset's masks into `out`, with `norm` statistics.
    let generate_ten = |out: &Path, norm: &str| {
        ok(&[
            "generate",
            "--generator",
            &s(&gen_run),
            "--masks",
            &s(&data),
            "--n",
            "10",
            "--seed",
            "4",
            "--generator-norm",
            norm,
            "--out",
            &s(out),
        ])
    };
    let folder = tmp.path().join("syn-folder");
    let line = generate_ten(&folder, "batch");
    assert!(line.contains("10 synthetic pair(s)"), "{line}");
    let check = ok(&["data", "check", &s(&folder)]);
    assert!(check.contains("10"), "{check}");
    assert!(
        !folder.join(".lock").exists(),
        "generate released its claim"
    );
    // Running BatchNorm statistics paint other images from the same masks and noise, and
    // the provenance says which statistics made them.
    let running = tmp.path().join("syn-running");
    generate_ten(&running, "running");
    let provenance = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("generated.json")).unwrap()).unwrap()
    };
    assert_eq!(provenance(&folder)["generator_norm"], "batch");
    assert_eq!(provenance(&running)["generator_norm"], "running");
    let images = |dir: &Path| {
        Dataset::load(dir, &DataConfig::default())
            .unwrap()
            .samples()
            .iter()
            .map(|s| (s.mask.clone(), s.image.clone()))
            .collect::<Vec<_>>()
    };
    let (batch_pairs, running_pairs) = (images(&folder), images(&running));
    assert!(
        batch_pairs
            .iter()
            .zip(&running_pairs)
            .all(|(b, r)| b.0 == r.0),
        "the same augmented masks"
    );
    assert!(
        batch_pairs
            .iter()
            .zip(&running_pairs)
            .any(|(b, r)| b.1 != r.1),
        "other images"
    );
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
    assert_pretrain_resume_is_bit_identical(&[]);
}

/// Plain pre-training on the phantoms of [`assert_pretrain_resume_is_bit_identical`], for
/// a variant to differ from: the data folder and the run's metrics.
fn plain_pretrain(dir: &Path) -> (std::path::PathBuf, Vec<serde_json::Value>) {
    let data = dir.join("lungs");
    lung_phantoms(&data, 20);
    let plain = dir.join("plain");
    ok(&pretrain_args(&data, &plain, 60, &[]));
    (data, metrics(&plain))
}

#[test]
fn pretrain_on_spatially_transformed_pairs_resumes_bit_identically_and_differs() {
    let augmented = assert_pretrain_resume_is_bit_identical(&["--set", "train.transforms=true"]);
    let tmp = tempfile::tempdir().unwrap();
    let (_, plain) = plain_pretrain(tmp.path());
    let l1 = |lines: &[serde_json::Value]| -> Vec<f64> {
        lines
            .iter()
            .filter(|l| l.get("val_l1").is_some())
            .map(|l| number(l, "val_l1"))
            .collect()
    };
    let (a, p) = (l1(&augmented), l1(&plain));
    assert_eq!(
        (a[0], a.len()),
        (p[0], p.len()),
        "the untrained generator is the same"
    );
    assert!(
        a[1..] != p[1..],
        "train.transforms left pre-training unchanged: {a:?}"
    );
}

/// Pre-trains straight and killed-then-resumed with `extra` arguments, checks both end
/// bit-identical, and returns the straight run's metrics.
fn assert_pretrain_resume_is_bit_identical(extra: &[&str]) -> Vec<serde_json::Value> {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("lungs");
    lung_phantoms(&data, 20);
    let total = 60;
    let straight = tmp.path().join("straight");
    ok(&pretrain_args(&data, &straight, total, extra));

    let killed = tmp.path().join("killed");
    let at_kill = run_and_kill(
        &pretrain_args(&data, &killed, total, extra),
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
    metrics(&straight)
}

#[test]
fn separate_resume_after_sigkill_is_bit_identical() {
    assert_separate_resume_after_sigkill_is_bit_identical(100, &[], |_| {});
}

/// On the strong recipe with `separate.transforms`, the synthetic pairs go through the real
/// pairs' chain (its own seeded draws): still bit-exact after a kill.
#[test]
fn strong_separate_with_transformed_synthetic_pairs_resumes_bit_identically() {
    assert_separate_resume_after_sigkill_is_bit_identical(
        40,
        &["--recipe", "strong", "--set", "separate.transforms=true"],
        |run| {
            let synthetic: Vec<f64> = metrics(run)
                .iter()
                .filter_map(|l| l["loss_synthetic"].as_f64())
                .collect();
            assert!(!synthetic.is_empty() && synthetic.iter().all(|v| v.is_finite()));
        },
    );
}

/// A tiny segmentation run at `size` px on lung phantoms, for the consistency term to load.
fn tiny_segmenter(dir: &Path, size: u32) -> std::path::PathBuf {
    let data = dir.join("seg-lungs");
    lung_phantoms(&data, 8);
    let run = dir.join(format!("seg-{size}"));
    let size = format!("data.size={size}");
    ok(&run_args(
        &["train"],
        &data,
        (5, 2, 0),
        &run,
        &[&size, "model.unet.base_width=4", "model.unet.depth=2"],
        4,
        &[],
    ));
    run
}

/// The mask-consistency term joins the generator's objective (logged, changes the run),
/// and the run still resumes bit-identically after a kill; a segmenter of another size is
/// refused by name.
#[test]
fn pretrain_with_a_consistency_segmenter_resumes_bit_identically_and_differs() {
    let tmp = tempfile::tempdir().unwrap();
    let segmenter = tiny_segmenter(tmp.path(), 32);
    let run = format!("consistency.run={:?}", s(&segmenter));
    let with =
        assert_pretrain_resume_is_bit_identical(&["--set", &run, "--set", "consistency.weight=5"]);
    let terms: Vec<f64> = with
        .iter()
        .filter_map(|l| l["loss_g_consistency"].as_f64())
        .collect();
    assert!(
        !terms.is_empty() && terms.iter().all(|t| t.is_finite() && *t > 0.0),
        "{terms:?}"
    );
    let (data, plain_lines) = plain_pretrain(tmp.path());
    let l1 = |lines: &[serde_json::Value]| -> Vec<f64> {
        lines
            .iter()
            .filter_map(|l| l["loss_g_l1"].as_f64())
            .collect()
    };
    assert!(
        plain_lines
            .iter()
            .all(|l| l.get("loss_g_consistency").is_none()),
        "a run without consistency.run logs no consistency term"
    );
    assert_ne!(
        l1(&with),
        l1(&plain_lines),
        "the term left training unchanged"
    );

    let other = tiny_segmenter(tmp.path(), 16);
    let run = format!("consistency.run={:?}", s(&other));
    let err = fails(&pretrain_args(
        &data,
        &tmp.path().join("wrong"),
        5,
        &["--set", &run],
    ));
    assert!(
        err.contains("consistency.run") && err.contains("16 px") && err.contains("32 px"),
        "{err}"
    );
}

/// Trains Separate for `total` iterations straight, and killed then resumed; `check` looks
/// at the straight run's folder.
fn assert_separate_resume_after_sigkill_is_bit_identical(
    total: u64,
    extra: &[&str],
    check: impl Fn(&Path),
) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("lungs");
    lung_phantoms(&data, 20);
    let gen_run = tmp.path().join("gen");
    ok(&pretrain_args(&data, &gen_run, 5, &[]));
    let args = |out: &Path| -> Vec<String> {
        let mut args: Vec<String> = [
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
        .collect();
        args.extend(extra.iter().map(|a| a.to_string()));
        args
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
    check(&straight);
}

#[test]
fn bad_generator_inputs_are_named_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("lungs");
    lung_phantoms(&data, 8);
    let missing = tmp.path().join("no-such-run");
    let generate_from_missing = |out: &Path| {
        fails(&[
            "generate",
            "--generator",
            &s(&missing),
            "--masks",
            &s(&data),
            "--out",
            &s(out),
        ])
    };
    let err = generate_from_missing(&tmp.path().join("o"));
    assert!(err.contains("no-such-run"), "{err}");
    assert!(
        !tmp.path().join("o").exists(),
        "a failed generate left its --out"
    );
    // An --out that another process is writing into is refused (the claim names its PID).
    let busy = tmp.path().join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join(".lock"), format!("{}\n", std::process::id())).unwrap();
    let err = generate_from_missing(&busy);
    assert!(
        err.contains("in use") && err.contains(&std::process::id().to_string()),
        "{err}"
    );
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

/// `train --method genseg` arguments: a tiny segmenter at 32 px on the generator run `generator`,
/// every iteration logged and checkpointed.
fn genseg_args(
    data: &Path,
    generator: &Path,
    out: &Path,
    iterations: u64,
    extra: &[&str],
) -> Vec<String> {
    let sets = [
        "data.size=32",
        "model.unet.base_width=4",
        "model.unet.depth=3",
        "train.log_every=1",
        "train.val_every=4",
        "train.checkpoint_every=1",
    ];
    let generator = s(generator);
    let command = ["train", "--method", "genseg", "--generator", &generator];
    run_args(&command, data, (12, 4, 2), out, &sets, iterations, extra)
}

/// One tensor of a checkpoint's weights.
fn weight(checkpoint: &Path, name: &str) -> Vec<f32> {
    let tensors =
        candle_core::safetensors::load(checkpoint.join("weights.safetensors"), &Device::Cpu)
            .unwrap();
    tensors
        .get(name)
        .unwrap_or_else(|| panic!("{name} not in {}", checkpoint.display()))
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn number(line: &serde_json::Value, key: &str) -> f64 {
    line[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

#[test]
fn genseg_tunes_alpha_through_the_generator_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("lungs");
    lung_phantoms(&data, 20);
    let generator = tmp.path().join("pix2pix");
    ok(&pretrain_args(&data, &generator, 10, &[]));
    let alpha = "netG.arch.upconv";
    let first_conv = "netG.model.model.0.weight";
    let alpha0 = weight(&generator.join("best"), alpha);

    // The paper's method: the segmentation loss on validation images reaches the generator
    // weights (hop 1) and from there α (hop 2), and α moves.
    let total = 8;
    let straight = tmp.path().join("straight");
    ok(&genseg_args(&data, &generator, &straight, total, &[]));
    let lines = metrics(&straight);
    assert_eq!(
        lines.len(),
        total as usize + 1,
        "α at iteration 0, then one line per iteration"
    );
    assert_eq!(lines[0]["iteration"], 0);
    for line in &lines[1..] {
        assert!(number(line, "norm_val_grad") > 0.0, "{line}");
        assert!(number(line, "norm_generator_signal") > 0.0, "{line}");
        assert!(number(line, "norm_arch_grad") > 0.0, "{line}");
        assert_eq!(line["alpha_softmax"].as_array().unwrap().len(), 5);
    }
    let alpha_end = weight(&straight.join("last"), alpha);
    assert_eq!(alpha_end.len(), alpha0.len());
    let moved = alpha_end
        .iter()
        .zip(&alpha0)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(moved > 1e-4, "α moved by at most {moved}");
    assert_ne!(
        weight(&straight.join("last"), first_conv),
        weight(&generator.join("best"), first_conv),
        "W_G trains"
    );
    for f in [
        "alpha.png",
        "progress.png",
        "samples/iter_000004.png",
        "eval-test/summary.json",
    ] {
        assert!(straight.join(f).is_file(), "{f} missing");
    }
    let out = ok(&["evaluate", "--run", &s(&straight)]);
    assert!(out.contains("Dice"), "{out}");

    // Exact resume of the whole multi-level state after SIGKILL.
    let killed = tmp.path().join("killed");
    let args = genseg_args(&data, &generator, &killed, total, &[]);
    let at_kill = run_and_kill(&args, &killed, 3, total);
    ok(&["train", "--resume", &s(&killed)]);
    for f in [
        "last/weights.safetensors",
        "last/optim-segmenter.safetensors",
        "last/optim-generator.safetensors",
        "last/optim-discriminator.safetensors",
        "last/optim-arch.safetensors",
        "best/weights.safetensors",
    ] {
        assert!(
            safetensors_content(&straight.join(f)) == safetensors_content(&killed.join(f)),
            "{f} differs after a resume from step {at_kill}"
        );
    }
    assert_eq!(metrics(&killed).len(), lines.len());

    // The reference's wiring (spec §1.4 F2): detached synthetic images carry no signal to
    // the generator, so α stays exactly where pre-training left it; W_G still trains.
    let detached = tmp.path().join("detached");
    ok(&genseg_args(
        &data,
        &generator,
        &detached,
        3,
        &["--set", "genseg.detach_synthetic=true"],
    ));
    for line in &metrics(&detached)[1..] {
        assert!(number(line, "norm_val_grad") > 0.0, "{line}");
        assert_eq!(number(line, "norm_generator_signal"), 0.0, "{line}");
        assert_eq!(number(line, "norm_arch_grad"), 0.0, "{line}");
    }
    assert_eq!(weight(&detached.join("last"), alpha), alpha0);
    assert_ne!(
        weight(&detached.join("last"), first_conv),
        weight(&generator.join("best"), first_conv)
    );

    // Without --generator, one is pre-trained first into <run>/pretrain on the run's split.
    let auto = tmp.path().join("auto");
    let mut args = genseg_args(
        &data,
        &generator,
        &auto,
        2,
        &["--set", "genseg.pretrain_iterations=3"],
    );
    let at = args.iter().position(|a| a == "--generator").unwrap();
    args.drain(at..at + 2);
    ok(&args);
    assert!(auto.join("pretrain/best/weights.safetensors").is_file());
    assert_eq!(
        std::fs::read_to_string(auto.join("split.json")).unwrap(),
        std::fs::read_to_string(auto.join("pretrain/split.json")).unwrap(),
        "the generator is pre-trained on the run's own split"
    );
    assert_eq!(metrics(&auto).len(), 3);

    // A generator of another size, and a folder that is not a generator run.
    let err = fails(&genseg_args(
        &data,
        &generator,
        &tmp.path().join("size"),
        2,
        &["--set", "data.size=64"],
    ));
    assert!(err.contains("32 px") && err.contains("data.size"), "{err}");
    let err = fails(&genseg_args(
        &data,
        &straight,
        &tmp.path().join("notgen"),
        2,
        &[],
    ));
    assert!(err.contains("not a generator pre-training run"), "{err}");
}

/// DeepLab (V3 and V3+, the CPU-sized ResNet-18 encoder) in every method and SwinUnet in
/// the baseline and GenSeg, then evaluate and predict from a run, and pretrained weights.
#[test]
fn new_backbones_train_in_every_method_and_their_runs_evaluate_and_predict() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("lungs");
    lung_phantoms(&data, 16);
    let gen_run = tmp.path().join("gen");
    ok(&pretrain_args(&data, &gen_run, 2, &[]));
    let generator = s(&gen_run);
    let methods: [(&str, &[&str]); 5] = [
        ("baseline", &[]),
        ("combine", &[]),
        ("separate", &["--generator", &generator]),
        ("genseg", &["--generator", &generator]),
        ("baseline", &["--recipe", "strong"]),
    ];
    for (i, (method, extra)) in methods.into_iter().enumerate() {
        let decoder = if i % 2 == 0 { "v3" } else { "v3_plus" };
        let run = tmp.path().join(format!("{method}-{i}"));
        let sets = [
            "data.size=32",
            "model.kind=\"deeplab\"",
            "model.deeplab.encoder=\"resnet18\"",
            "model.deeplab.aspp_channels=8",
            &format!("model.deeplab.decoder=\"{decoder}\""),
            "train.val_every=2",
            "train.checkpoint_every=2",
        ];
        let line = train_two_steps(method, &data, (8, 2), &run, &sets, extra);
        assert!(line.contains("test Dice"), "{method}: {line}");
    }
    // SwinUnet, a few channels wide with 4x4 windows at 32 px, in the end-to-end method.
    for (method, extra) in [
        ("baseline", &[][..]),
        ("genseg", &["--generator", &generator][..]),
    ] {
        let run = tmp.path().join(format!("swin-{method}"));
        let sets = [
            "data.size=32",
            "model.kind=\"swin_unet\"",
            "model.swin_unet.image_size=32",
            "model.swin_unet.embed_dim=8",
            "model.swin_unet.depths=[2, 2, 2]",
            "model.swin_unet.num_heads=[1, 2, 4]",
            "model.swin_unet.window_size=4",
            "train.val_every=2",
        ];
        let line = train_two_steps(method, &data, (8, 2), &run, &sets, extra);
        assert!(line.contains("test Dice"), "swin {method}: {line}");
    }
    let run = tmp.path().join("baseline-0");
    let log = std::fs::read_to_string(run.join("train.log")).unwrap();
    assert!(log.contains("starts from scratch"), "{log}");
    // A run's weights carry torchvision's names: a second run starts from them.
    let weights = run.join("best/weights.safetensors");
    let warm = tmp.path().join("warm");
    let sets = [
        "data.size=32",
        "model.kind=\"deeplab\"",
        "model.deeplab.encoder=\"resnet18\"",
        "model.deeplab.aspp_channels=8",
        &format!("model.pretrained=\"{}\"", s(&weights)),
    ];
    let args = run_args(&["train"], &data, (8, 2, 0), &warm, &sets, 1, &[]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&refs);
    let log = std::fs::read_to_string(warm.join("train.log")).unwrap();
    assert!(
        log.contains("tensor(s) loaded, 0 kept as initialised"),
        "{log}"
    );
    // UNet takes no pretrained weights: refused before the run starts.
    let args = run_args(
        &["train"],
        &data,
        (8, 2, 0),
        &tmp.path().join("unet"),
        &sets[4..],
        1,
        &[],
    );
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = fails(&refs);
    assert!(err.contains("model.pretrained"), "{err}");
    let line = ok(&["evaluate", "--run", &s(&run)]);
    assert!(line.contains("Dice"), "{line}");
    let out = tmp.path().join("pred");
    ok(&[
        "predict",
        "--run",
        &s(&run),
        "--input",
        &s(&data.join("images")),
        "--out",
        &s(&out),
    ]);
    assert_eq!(std::fs::read_dir(out.join("masks")).unwrap().count(), 16);
}

/// The frozen DINOv2 encoder (a one-block, 24-wide one with random weights, written as the
/// released checkpoints are named): trains its decoder in the baseline, Separate and GenSeg
/// (whose architecture gradient flows back through the frozen encoder), and evaluates.
#[test]
fn the_frozen_foundation_encoder_trains_in_every_method() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("lungs");
    lung_phantoms(&data, 16);
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &Device::Cpu);
    candle_transformers::models::dinov2::DinoVisionTransformer::new(vb, 1, 24, 2).unwrap();
    let weights = tmp.path().join("dino.safetensors");
    varmap.save(&weights).unwrap();
    let gen_run = tmp.path().join("gen");
    ok(&pretrain_args(&data, &gen_run, 2, &[]));
    let generator = s(&gen_run);
    let weights_set = format!("model.foundation.weights=\"{}\"", s(&weights));
    let sets = [
        "data.size=32",
        "model.kind=\"foundation\"",
        &weights_set,
        "model.foundation.num_heads=2",
        "model.foundation.input_size=28",
        "model.foundation.decoder_width=8",
        "train.val_every=2",
    ];
    for (method, extra) in [
        ("baseline", &[][..]),
        ("separate", &["--generator", &generator][..]),
        ("genseg", &["--generator", &generator][..]),
    ] {
        let run = tmp.path().join(method);
        let line = train_two_steps(method, &data, (6, 2), &run, &sets, extra);
        assert!(line.contains("test Dice"), "{method}: {line}");
    }
    // α's gradient reached through the frozen encoder.
    for line in &metrics(&tmp.path().join("genseg"))[1..] {
        assert!(number(line, "norm_arch_grad") > 0.0, "{line}");
    }
    ok(&["evaluate", "--run", &s(&tmp.path().join("genseg"))]);
}

/// Trains `method` for two iterations with `sets` (and `extra` arguments); its summary line.
fn train_two_steps(
    method: &str,
    data: &Path,
    (n_train, n_val): (usize, usize),
    run: &Path,
    sets: &[&str],
    extra: &[&str],
) -> String {
    let args = run_args(
        &["train", "--method", method],
        data,
        (n_train, n_val, 0),
        run,
        sets,
        2,
        extra,
    );
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&refs)
}
