//! `cargo xtask bench-vs-torch`: one training step (forward, backward, Adam step; f32) of
//! the same networks in genseg and in PyTorch, measured in one invocation.
//!
//! Per config, `genseg bench-step` and its PyTorch twin `xtask/bench/torch_step.py` run
//! alternately, `--runs` times each, every run its own process (so peak memory is per
//! run), both on the same number of threads. The recipe fails when the two sides disagree
//! on the parameter or FLOP count: then they are not timing the same network.
//!
//! PyTorch comes from PyPI into `target/bench-venv` on first use, so the recipe refuses to
//! run in CI.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::build_genseg;

/// One benchmarked workload; the flags are those of `genseg bench-step`.
#[derive(Debug)]
struct BenchConfig {
    name: &'static str,
    model: &'static str,
    base: usize,
    channels: usize,
    size: usize,
    batch: usize,
}

/// The configs of the issues: the paper UNet, the cpu-profile UNet, the reference
/// generator, and the reference DeepLabV3 and Swin-Unet backbones at their paper sizes.
const CONFIGS: [BenchConfig; 5] = [
    BenchConfig {
        name: "unet-b64-3x256-b4",
        model: "unet",
        base: 64,
        channels: 3,
        size: 256,
        batch: 4,
    },
    BenchConfig {
        name: "unet-b16-1x128-b8",
        model: "unet",
        base: 16,
        channels: 1,
        size: 128,
        batch: 8,
    },
    BenchConfig {
        name: "pix2pix-ngf64-256-b2",
        model: "pix2pix",
        base: 64,
        channels: 1,
        size: 256,
        batch: 2,
    },
    BenchConfig {
        name: "deeplabv3-r50-3x256-b2",
        model: "deeplabv3_r50",
        base: 0,
        channels: 3,
        size: 256,
        batch: 2,
    },
    BenchConfig {
        name: "swin_unet-3x224-b2",
        model: "swin_unet",
        base: 0,
        channels: 3,
        size: 224,
        batch: 2,
    },
];

fn config_names() -> Vec<&'static str> {
    CONFIGS.iter().map(|c| c.name).collect()
}

/// What to run.
pub struct Plan {
    /// Config names; empty means all.
    pub configs: Vec<String>,
    pub runs: usize,
    pub steps: usize,
    pub warmup: usize,
    /// Compute threads of each side.
    pub threads: usize,
    /// The markdown table.
    pub out: PathBuf,
}

/// The JSON line one run prints.
struct RunReport {
    params: u64,
    threads: u64,
    step_seconds: Vec<f64>,
    peak_rss_bytes: u64,
    /// `None` where the side does not count (genseg's DeepLab and Swin-Unet).
    gflop_per_step: Option<f64>,
    torch_version: Option<String>,
}

impl RunReport {
    fn parse(stdout: &str) -> Result<Self> {
        let line = stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .context("no output")?;
        let v: Value = serde_json::from_str(line).with_context(|| format!("parsing `{line}`"))?;
        let number = |key: &str| {
            v[key]
                .as_f64()
                .with_context(|| format!("no {key} in `{line}`"))
        };
        let step_seconds = v["step_seconds"]
            .as_array()
            .with_context(|| format!("no step_seconds in `{line}`"))?
            .iter()
            .map(|s| s.as_f64().context("a step time is not a number"))
            .collect::<Result<Vec<_>>>()?;
        ensure!(!step_seconds.is_empty(), "no step times in `{line}`");
        Ok(Self {
            params: number("params")? as u64,
            threads: number("threads")? as u64,
            step_seconds,
            peak_rss_bytes: number("peak_rss_bytes")? as u64,
            gflop_per_step: v["gflop_per_step"].as_f64(),
            torch_version: v["torch_version"].as_str().map(str::to_string),
        })
    }
}

/// One side's runs of one config, pooled.
#[derive(Default)]
struct SideResult {
    step_seconds: Vec<f64>,
    /// The largest peak over the runs.
    peak_rss_bytes: u64,
    params: u64,
    gflop_per_step: Option<f64>,
}

impl SideResult {
    fn add(&mut self, run: RunReport) {
        self.step_seconds.extend(run.step_seconds);
        self.peak_rss_bytes = self.peak_rss_bytes.max(run.peak_rss_bytes);
        self.params = run.params;
        self.gflop_per_step = run.gflop_per_step;
    }

    fn median_seconds(&self) -> f64 {
        median(&self.step_seconds)
    }

    /// `median (min-max)`: the spread shows how noisy the machine was.
    fn seconds_cell(&self) -> String {
        let min = self
            .step_seconds
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min);
        let max = self.step_seconds.iter().copied().fold(0.0, f64::max);
        format!("{:.3} ({min:.3}-{max:.3})", self.median_seconds())
    }

    /// Throughput at `gflop` per step.
    fn gflop_per_second(&self, gflop: f64) -> f64 {
        gflop / self.median_seconds()
    }

    fn peak_mib(&self) -> f64 {
        self.peak_rss_bytes as f64 / (1024.0 * 1024.0)
    }
}

struct ConfigResult {
    name: &'static str,
    genseg: SideResult,
    torch: SideResult,
}

impl ConfigResult {
    /// GFLOP per step for the throughput columns: genseg's convolution count, or for
    /// networks it does not count PyTorch's count of every op, marked `*`.
    fn gflop(&self) -> (f64, &'static str) {
        match (self.genseg.gflop_per_step, self.torch.gflop_per_step) {
            (Some(g), _) => (g, ""),
            (None, Some(t)) => (t, "*"),
            (None, None) => (f64::NAN, ""),
        }
    }
}

/// Runs the plan and prints two lines per config (see the module docs).
pub fn run(root: &Path, plan: &Plan) -> Result<()> {
    if std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false") {
        bail!("bench-vs-torch installs PyTorch from PyPI and takes minutes; it does not run in CI");
    }
    ensure!(
        plan.runs > 0 && plan.steps > 0 && plan.threads > 0,
        "--runs, --steps and --threads must be positive"
    );
    let configs = select(&plan.configs)?;
    let python = ensure_venv(
        root,
        "import torch, torchvision, numpy",
        &["torch", "torchvision", "numpy"],
    )?;
    let genseg = build_genseg(root)?;
    let script = root.join("xtask/bench/torch_step.py");
    let threads = plan.threads.to_string();

    let mut results = Vec::new();
    let mut torch_version = None;
    for cfg in configs {
        let args = bench_args(cfg, plan);
        let mut result = ConfigResult {
            name: cfg.name,
            genseg: SideResult::default(),
            torch: SideResult::default(),
        };
        for run in 1..=plan.runs {
            eprintln!("{}: run {run}/{}", cfg.name, plan.runs);
            let mut genseg_cmd = Command::new(&genseg);
            genseg_cmd
                .arg("bench-step")
                .args(&args)
                .env("RAYON_NUM_THREADS", &threads);
            let g = run_side(genseg_cmd, plan.threads)
                .with_context(|| format!("{}: genseg bench-step", cfg.name))?;
            let mut torch_cmd = Command::new(&python);
            torch_cmd
                .arg(&script)
                .args(&args)
                .args(["--threads", &threads])
                .env("OMP_NUM_THREADS", &threads)
                .env("MKL_NUM_THREADS", &threads);
            let t = run_side(torch_cmd, plan.threads)
                .with_context(|| format!("{}: torch_step.py", cfg.name))?;
            check_same_network(cfg.name, &g, &t)?;
            torch_version = t.torch_version.clone();
            result.genseg.add(g);
            result.torch.add(t);
        }
        for line in summary_lines(&result) {
            println!("{line}");
        }
        results.push(result);
    }
    let table = markdown(&results, plan, torch_version.as_deref().unwrap_or("?"));
    if let Some(dir) = plan.out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&plan.out, table).with_context(|| format!("writing {}", plan.out.display()))?;
    eprintln!("wrote {}", plan.out.display());
    Ok(())
}

/// The chosen configs in table order; an unknown name is an error that lists the known ones.
fn select(names: &[String]) -> Result<Vec<&'static BenchConfig>> {
    for name in names {
        if !CONFIGS.iter().any(|c| c.name == name) {
            bail!(
                "unknown config {name}; known: {}",
                config_names().join(", ")
            );
        }
    }
    Ok(CONFIGS
        .iter()
        .filter(|c| names.is_empty() || names.iter().any(|n| n == c.name))
        .collect())
}

/// `target/bench-venv`'s python, created and given `packages` from PyPI when the `check`
/// import fails.
pub(crate) fn ensure_venv(root: &Path, check: &str, packages: &[&str]) -> Result<PathBuf> {
    let venv = root.join("target/bench-venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        eprintln!("creating {}", venv.display());
        check_status(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    let installed = Command::new(&python)
        .args(["-c", check])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        eprintln!("installing {} into {}", packages.join(" "), venv.display());
        check_status(
            Command::new(&python)
                .args(["-m", "pip", "install"])
                .args(packages),
        )?;
    }
    Ok(python)
}

fn check_status(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed ({status})");
    Ok(())
}

/// The flags both `genseg bench-step` and `torch_step.py` take.
fn bench_args(cfg: &BenchConfig, plan: &Plan) -> Vec<String> {
    [
        ("--model", cfg.model.to_string()),
        ("--base", cfg.base.to_string()),
        ("--channels", cfg.channels.to_string()),
        ("--size", cfg.size.to_string()),
        ("--batch", cfg.batch.to_string()),
        ("--steps", plan.steps.to_string()),
        ("--warmup", plan.warmup.to_string()),
    ]
    .into_iter()
    .flat_map(|(flag, value)| [flag.to_string(), value])
    .collect()
}

/// Runs one side to completion (its log on our stderr) and parses its JSON line.
fn run_side(mut cmd: Command, threads: usize) -> Result<RunReport> {
    let output = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("starting {cmd:?}"))?;
    ensure!(
        output.status.success(),
        "{cmd:?} failed ({})",
        output.status
    );
    let report = RunReport::parse(&String::from_utf8_lossy(&output.stdout))?;
    if report.threads != threads as u64 {
        eprintln!(
            "warning: {cmd:?} used {} threads, not {threads}",
            report.threads
        );
    }
    Ok(report)
}

/// Different parameter or FLOP counts mean the PyTorch mirror is another network.
fn check_same_network(name: &str, genseg: &RunReport, torch: &RunReport) -> Result<()> {
    if genseg.params != torch.params {
        bail!(
            "{name}: PARAMETER COUNTS DIFFER: genseg {} vs torch {}; \
             xtask/bench/torch_step.py does not mirror the genseg network",
            genseg.params,
            torch.params
        );
    }
    // genseg counts only the UNet's and the generator's convolutions; for the other
    // networks the parameter counts are the check.
    let (Some(g), Some(t)) = (genseg.gflop_per_step, torch.gflop_per_step) else {
        return Ok(());
    };
    if (g - t).abs() > 1e-6 * g.max(t) {
        bail!(
            "{name}: FLOP COUNTS DIFFER: genseg {g} vs torch {t} GFLOP per step; \
             the two sides do not run the same convolutions"
        );
    }
    Ok(())
}

/// `<config>: genseg <median> s, torch <median> s, ratio <genseg/torch>`, then memory and
/// throughput.
fn summary_lines(r: &ConfigResult) -> [String; 2] {
    let (g, t) = (&r.genseg, &r.torch);
    let (gflop, mark) = r.gflop();
    [
        format!(
            "{}: genseg {:.3} s, torch {:.3} s, ratio {:.2}",
            r.name,
            g.median_seconds(),
            t.median_seconds(),
            g.median_seconds() / t.median_seconds()
        ),
        format!(
            "  peak memory: genseg {:.0} MiB, torch {:.0} MiB, ratio {:.2}; \
             GFLOP/s: genseg {:.1}, torch {:.1} ({gflop:.1}{mark} GFLOP per step, {} \
             parameters)",
            g.peak_mib(),
            t.peak_mib(),
            g.peak_mib() / t.peak_mib(),
            g.gflop_per_second(gflop),
            t.gflop_per_second(gflop),
            g.params
        ),
    ]
}

fn markdown(results: &[ConfigResult], plan: &Plan, torch_version: &str) -> String {
    let mut md = String::from("# genseg vs PyTorch: one training step\n\n");
    let _ = writeln!(
        md,
        "`cargo xtask bench-vs-torch --runs {} --steps {} --warmup {} --threads {}`; \
         PyTorch {torch_version}; f32, {} threads each side. Forward, backward and Adam \
         step; step times are medians over runs x steps (min-max in brackets), peak \
         memory the largest peak resident set of the runs, GFLOP 2 x the convolutions' \
         multiply-accumulates of the forward x 3 (marked *: PyTorch's FlopCounterMode count \
         of every op of the forward x 3, where genseg does not count).\n",
        plan.runs, plan.steps, plan.warmup, plan.threads, plan.threads
    );
    md.push_str(
        "| config | parameters | GFLOP/step | genseg s | torch s | ratio | genseg MiB | \
         torch MiB | memory ratio | genseg GFLOP/s | torch GFLOP/s |\n",
    );
    md.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in results {
        let (g, t) = (&r.genseg, &r.torch);
        let (gflop, mark) = r.gflop();
        let _ = writeln!(
            md,
            "| {} | {} | {gflop:.1}{mark} | {} | {} | {:.2} | {:.0} | {:.0} | {:.2} | {:.1} | {:.1} |",
            r.name,
            g.params,
            g.seconds_cell(),
            t.seconds_cell(),
            g.median_seconds() / t.median_seconds(),
            g.peak_mib(),
            t.peak_mib(),
            g.peak_mib() / t.peak_mib(),
            g.gflop_per_second(gflop),
            t.gflop_per_second(gflop)
        );
    }
    md
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    #[test]
    fn configs_are_selected_in_table_order_and_unknown_names_fail() {
        let names = |v: Vec<&BenchConfig>| v.iter().map(|c| c.name).collect::<Vec<_>>();
        let picked = select(&["pix2pix-ngf64-256-b2".into(), "unet-b64-3x256-b4".into()]);
        assert_eq!(
            names(picked.unwrap()),
            ["unet-b64-3x256-b4", "pix2pix-ngf64-256-b2"]
        );
        assert_eq!(select(&[]).unwrap().len(), CONFIGS.len());
        let err = select(&["unet".into()]).unwrap_err().to_string();
        assert!(err.contains("unet-b16-1x128-b8"), "{err}");
    }

    #[test]
    fn a_report_line_parses_and_mismatched_networks_fail() {
        let line = r#"{"side":"genseg","params":10,"threads":2,"step_seconds":[1.0,2.0],
            "peak_rss_bytes":2048,"gflop_per_step":3.5}"#
            .replace('\n', "");
        let g = RunReport::parse(&format!("log\n{line}\n")).unwrap();
        assert_eq!((g.params, g.step_seconds.len()), (10, 2));
        let t = RunReport::parse(&line.replace("\"params\":10", "\"params\":11")).unwrap();
        let err = check_same_network("x", &g, &t).unwrap_err().to_string();
        assert!(err.contains("PARAMETER COUNTS DIFFER"), "{err}");
        assert!(check_same_network("x", &g, &g).is_ok());
        let t = RunReport::parse(&line.replace("3.5", "3.6")).unwrap();
        let err = check_same_network("x", &g, &t).unwrap_err().to_string();
        assert!(err.contains("FLOP COUNTS DIFFER"), "{err}");
        // A side that does not count FLOPs leaves the parameter count as the check.
        let uncounted = RunReport::parse(&line.replace("3.5", "null")).unwrap();
        assert_eq!(uncounted.gflop_per_step, None);
        assert!(check_same_network("x", &uncounted, &t).is_ok());
    }
}
