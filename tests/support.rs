//! Helpers shared by the end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The real datasets, `../shared/data` next to the repository. When absent the caller skips its
/// test, except in CI (`CI=true`), where these tests are mandatory and a missing folder fails.
pub fn shared_data_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    if dir.is_dir() {
        return Some(dir);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "{} not found: the real-data tests are mandatory in CI (CI=true)",
            dir.display()
        );
    }
    eprintln!("skipping: ../shared/data not found");
    None
}

/// The `genseg` binary built for these tests.
pub fn genseg_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_genseg"))
}

/// The binary with one compute thread: the tests run in parallel, and candle's spinning
/// thread pool would otherwise fight over the cores.
pub fn command() -> Command {
    let mut cmd = Command::new(genseg_bin());
    cmd.env("CANDLE_NUM_THREADS", "1")
        .env("RAYON_NUM_THREADS", "1");
    cmd
}

/// Runs `genseg args`.
pub fn genseg<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    command()
        .args(args)
        .output()
        .expect("the genseg binary runs")
}

/// Runs `genseg args`, which must succeed; its stdout.
pub fn ok<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    let out = genseg(args);
    assert!(
        out.status.success(),
        "genseg {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `genseg args`, which must fail; its stderr.
pub fn fails<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    let out = genseg(args);
    assert!(!out.status.success(), "genseg {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Writes `n` 64 px phantoms of `kind` (`lungs`, `skin`) drawn with `seed` into `dir`;
/// `extra` are more `genseg data phantoms` flags (e.g. `--shifted`).
pub fn phantoms(dir: &Path, kind: &str, n: usize, seed: u64, extra: &[&str]) {
    let (n, seed, out) = (n.to_string(), seed.to_string(), s(dir));
    let mut args = vec![
        "data", "phantoms", "--kind", kind, "--n", &n, "--size", "64", "--seed", &seed, "--out",
        &out,
    ];
    args.extend(extra);
    ok(&args);
}

/// A path as an argument.
pub fn s(p: &Path) -> String {
    p.display().to_string()
}

/// The lines of a run's metrics.jsonl.
pub fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .expect("metrics.jsonl exists")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// The arguments of a training command: `command` (e.g. `["train", "--method", "flip"]`),
/// the regime `--data --n-train --n-val --seed --out`, each `sets` entry as `--set`,
/// `train.iterations`, then `extra`.
pub fn run_args(
    command: &[&str],
    data: &Path,
    (n_train, n_val, seed): (usize, usize, u64),
    out: &Path,
    sets: &[&str],
    iterations: u64,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = command.iter().map(|a| a.to_string()).collect();
    for (flag, value) in [
        ("--data", s(data)),
        ("--n-train", n_train.to_string()),
        ("--n-val", n_val.to_string()),
        ("--seed", seed.to_string()),
        ("--out", s(out)),
    ] {
        args.extend([flag.to_string(), value]);
    }
    for kv in sets {
        args.extend(["--set".to_string(), kv.to_string()]);
    }
    args.extend(["--set".into(), format!("train.iterations={iterations}")]);
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}
