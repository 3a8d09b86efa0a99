//! `cargo xtask exp --emit-slurm` against Slurm itself: a two-run recipe submitted as a job
//! array with its aggregation as a dependent job, on the one-node cluster that
//! `.ci/slurm-up` starts. Without `sbatch` on PATH the test is skipped, except when
//! `GENSEG_SLURM=required` (set by .ci/run), where it fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn have_slurm() -> bool {
    let up = Command::new("sinfo")
        .args(["-h", "-o", "%T"])
        .output()
        .is_ok_and(|o| o.status.success() && !o.stdout.is_empty());
    if !up && std::env::var("GENSEG_SLURM").as_deref() == Ok("required") {
        panic!("GENSEG_SLURM=required but no Slurm cluster answers `sinfo` (run .ci/slurm-up)");
    }
    up
}

/// The `genseg` binary of the same build (`cargo test --workspace` builds it).
fn genseg_bin() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_xtask")).with_file_name("genseg");
    assert!(
        bin.is_file(),
        "{} is missing: build it first (`cargo build --bin genseg`, or `cargo test --workspace`)",
        bin.display()
    );
    bin
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("the command starts");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_two_run_recipe_runs_as_a_slurm_job_array_and_aggregates_after_it() {
    if !have_slurm() {
        eprintln!("skipping: no Slurm cluster (.ci/slurm-up starts one)");
        return;
    }
    let genseg = genseg_bin();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("lungs");
    run(Command::new(&genseg)
        .args(["data", "phantoms", "--kind", "lungs", "--n", "12"])
        .args([
            "--size",
            "64",
            "--seed",
            "3",
            "--out",
            &data.display().to_string(),
        ]));
    let recipe = tmp.path().join("two.toml");
    std::fs::write(
        &recipe,
        r#"description = "two runs on Slurm"
seeds = [0]
methods = ["baseline", "combine"]
sets = ["model.unet.base_width=8", "model.unet.depth=3", "train.iterations=4", "train.val_every=2"]
[[datasets]]
name = "lungs"
path = "lungs"
[[regimes]]
n_train = 6
n_val = 2
"#,
    )
    .unwrap();
    let exp = tmp.path().join("exp");
    run(Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args([
            "exp",
            &recipe.display().to_string(),
            "--emit-slurm",
            "--slurm-cpus",
            "1",
        ])
        .args(["--data-root", &tmp.path().display().to_string()])
        .args(["--out", &exp.display().to_string()])
        .args(["--genseg-bin", &genseg.display().to_string()])
        .env("RAYON_NUM_THREADS", "1"));
    let submitted = run(Command::new("bash").arg(exp.join("slurm/submit.sh")));
    let aggregate_job = submitted
        .trim()
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    assert!(!aggregate_job.is_empty(), "submit.sh printed no job id");

    // The aggregation job runs only after both array tasks succeeded; wait for it to leave
    // the queue.
    let start = Instant::now();
    loop {
        let queued = run(Command::new("squeue").args(["-h", "-j", &aggregate_job]));
        if queued.trim().is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "job {aggregate_job} still queued after 10 minutes:\n{queued}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    for method in ["baseline", "combine"] {
        let summary = exp.join(format!(
            "runs/lungs-6+2-unet-{method}-s0/eval-test/summary.json"
        ));
        assert!(summary.is_file(), "{} missing", summary.display());
    }
    let results = std::fs::read_to_string(exp.join("results.md")).unwrap_or_else(|e| {
        let log = std::fs::read_to_string(exp.join("logs/aggregate.log")).unwrap_or_default();
        panic!("results.md: {e}; aggregate.log:\n{log}")
    });
    assert!(results.starts_with("2 of 2 runs finished"), "{results}");
    assert!(
        results.contains("| 6+2 | unet | combine | 0 |"),
        "{results}"
    );
    // The report and what it shows: the plot and each run's test cases.
    assert!(exp.join("results.html").is_file());
    assert!(exp.join("plots/lungs-test-dice.png").is_file());
    for method in ["baseline", "combine"] {
        let cases = exp.join(format!(
            "runs/lungs-6+2-unet-{method}-s0/eval-test/cases.png"
        ));
        assert!(cases.is_file(), "{} missing", cases.display());
    }
}
