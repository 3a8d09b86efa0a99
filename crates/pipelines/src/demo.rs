//! `genseg demo`: the whole method on built-in phantoms, nothing to download.
//!
//! Writes a pool of lung phantoms and a shifted-appearance set, checks the pool like real
//! data, pre-trains a generator on a tiny labelled split (7 + 2), trains the baseline,
//! Separate and GenSeg from that split, scores each on the rest of the pool (in domain) and
//! on the shifted set, segments the shifted images with the GenSeg model, and prints a table
//! (also written to `summary.md`). Sized to finish in minutes on 2 CPU cores.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use genseg_data::check::{CheckOptions, check_dataset};
use genseg_data::phantom::{PhantomConfig, PhantomKind, write_phantoms};

use crate::config::{DataSection, Method, Profile, RunConfig};
use crate::evaluate::{SplitChoice, evaluate_run};
use crate::learner::Observer;
use crate::run_dir::Which;
use genseg_backbones::report::mean_and_sample_std as mean_std;

/// The demo's sizes.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DemoConfig {
    /// Everything goes here (replaced on each run).
    pub out: PathBuf,
    /// Image side in pixels (a power of two, at least 32).
    pub size: u32,
    /// Phantoms in the labelled pool (train + val + in-domain test).
    pub pool: usize,
    /// Phantoms in the shifted-appearance set.
    pub shifted: usize,
    /// Labelled training pairs.
    pub n_train: usize,
    /// Labelled validation pairs.
    pub n_val: usize,
    /// Iterations of the generator pre-training.
    pub pretrain_iterations: u64,
    /// Iterations of each segmentation run.
    pub iterations: u64,
    /// GenSeg's hypergradient interval (`genseg.arch_every`).
    pub arch_every: u64,
    /// The seeds: each draws its own split, initialisations and generator; the phantoms
    /// are the same for every seed.
    pub seeds: Vec<u64>,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            out: PathBuf::from("demo-out"),
            size: 32,
            pool: 60,
            shifted: 30,
            n_train: 7,
            n_val: 2,
            pretrain_iterations: 100,
            iterations: 120,
            arch_every: 8,
            seeds: vec![0, 1, 2],
        }
    }
}

/// One method's run on one seed.
#[derive(Debug, Clone)]
pub struct DemoRow {
    /// The method.
    pub method: Method,
    /// The seed.
    pub seed: u64,
    /// Mean Dice on the rest of the pool.
    pub dice_in_domain: f64,
    /// Mean Dice on the shifted set.
    pub dice_shifted: f64,
    /// Wall time of its training (pre-training not included).
    pub seconds: f64,
    /// The run folder.
    pub run: PathBuf,
}

/// The demo's results.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// Baseline, Separate, GenSeg on every seed, seed by seed.
    pub rows: Vec<DemoRow>,
    /// Wall time of the generator pre-trainings, all seeds together.
    pub pretrain_seconds: f64,
    /// Wall time of the whole demo.
    pub seconds: f64,
    /// The printed table.
    pub table: String,
}

const METHODS: [Method; 3] = [Method::Baseline, Method::Separate, Method::Genseg];

fn recreate(dir: &Path) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("removing the previous demo output {}", dir.display()))?;
    }
    Ok(())
}

/// Points a run's `[data]` at the phantom pool with the demo's size and regime.
fn use_pool(data: &mut DataSection, cfg: &DemoConfig, pool: &Path) {
    data.path = pool.to_path_buf();
    data.size = cfg.size;
    data.n_train = cfg.n_train;
    data.n_val = cfg.n_val;
}

/// Runs the demo; `None` when interrupted (Ctrl-C).
pub fn demo(
    cfg: &DemoConfig,
    device: &Device,
    stop: &AtomicBool,
    observer: &mut dyn Observer,
) -> Result<Option<DemoReport>> {
    anyhow::ensure!(!cfg.seeds.is_empty(), "the demo needs at least one seed");
    let started = Instant::now();
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("creating {}", cfg.out.display()))?;
    let (pool, shifted) = (
        cfg.out.join("data/lungs"),
        cfg.out.join("data/lungs-shifted"),
    );
    let runs = cfg.out.join("runs");
    for dir in [&pool, &shifted, &runs] {
        recreate(dir)?;
    }
    let mut phantoms = PhantomConfig::new(PhantomKind::Lungs, cfg.size, 0);
    write_phantoms(&pool, &phantoms, cfg.pool)?;
    phantoms.seed = 1;
    phantoms.shifted = true;
    write_phantoms(&shifted, &phantoms, cfg.shifted)?;
    let report = check_dataset(&pool, &CheckOptions::default())?;
    anyhow::ensure!(
        report.is_ok(),
        "the phantom pool failed its check:\n{report}"
    );
    tracing::info!(
        "demo: {} lung phantoms ({} px) in {}, {} shifted in {}, seeds {:?}",
        cfg.pool,
        cfg.size,
        pool.display(),
        cfg.shifted,
        shifted.display(),
        cfg.seeds
    );

    let mut rows = Vec::new();
    let mut pretrains = Vec::new();
    for &seed in &cfg.seeds {
        let seed_runs = runs.join(format!("s{seed}"));
        let mut pcfg = RunConfig::pix2pix(Profile::Cpu);
        pcfg.seed = seed;
        use_pool(&mut pcfg.data, cfg, &pool);
        pcfg.train.iterations = cfg.pretrain_iterations;
        pcfg.train.val_every = cfg.pretrain_iterations.div_ceil(3).max(1);
        let generator = seed_runs.join("pix2pix");
        let pre = crate::methods::pix2pix::pretrain(pcfg, &generator, device, stop, observer)?;
        if pre.interrupted {
            return Ok(None);
        }
        pretrains.push(pre);
        for method in METHODS {
            let mut rc = RunConfig::profile(Profile::Cpu);
            rc.method = method;
            rc.seed = seed;
            use_pool(&mut rc.data, cfg, &pool);
            rc.train.iterations = cfg.iterations;
            rc.train.val_every = cfg.iterations.div_ceil(6).max(1);
            rc.train.checkpoint_every = cfg.iterations;
            rc.separate.generator = generator.clone();
            rc.genseg.generator = generator.clone();
            rc.genseg.arch_every = cfg.arch_every;
            let run = seed_runs.join(method.to_string());
            let outcome = crate::methods::train(rc, &run, device, stop, observer)?;
            if outcome.interrupted {
                return Ok(None);
            }
            let in_domain = outcome
                .test
                .context("the demo split has in-domain test cases")?;
            let ood = evaluate_run(
                &run,
                Which::Best,
                Some(&shifted),
                SplitChoice::All,
                None,
                &run.join("eval-shifted"),
                device,
            )?;
            rows.push(DemoRow {
                method,
                seed,
                dice_in_domain: in_domain.metrics["dice"].mean,
                dice_shifted: ood.metrics["dice"].mean,
                seconds: outcome.seconds,
                run,
            });
        }
    }
    let genseg_run = &rows
        .iter()
        .find(|r| r.method == Method::Genseg)
        .expect("GenSeg ran")
        .run;
    let predictions = cfg.out.join("predictions");
    recreate(&predictions)?;
    crate::predict::predict(
        genseg_run,
        Which::Best,
        &shifted.join("images"),
        &predictions,
        device,
    )?;

    let pretrain_seconds = pretrains.iter().map(|p| p.seconds).sum();
    let seconds = started.elapsed().as_secs_f64();
    let mut table = results_table(cfg, &rows)?;
    let (l1_start, l1_best) = pretrains
        .iter()
        .map(|p| (p.initial_val_l1, p.best_val_l1))
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let n = pretrains.len() as f64;
    writeln!(
        table,
        "\nGenerator pre-training: {pretrain_seconds:.0} s for {} seed(s) ({} iterations, mean \
         validation L1 {:.3} -> {:.3}). Whole demo: {seconds:.0} s.\nRun folders \
         (progress.png, alpha.png, samples/, eval-*/) in {}; the first seed's GenSeg masks and \
         overlays of the shifted images in {}.\nPhantoms, a few seeds and short runs: a check of \
         the pipeline, not evidence about the methods on real data (docs/results.md has that).",
        pretrains.len(),
        cfg.pretrain_iterations,
        l1_start / n,
        l1_best / n,
        runs.display(),
        predictions.display()
    )?;
    std::fs::write(cfg.out.join("summary.md"), &table)
        .with_context(|| format!("writing {}", cfg.out.join("summary.md").display()))?;
    Ok(Some(DemoReport {
        rows,
        pretrain_seconds,
        seconds,
        table,
    }))
}

/// The table over seeds (mean ± std, and each seed) and, per generative method, a sentence
/// on its paired difference to the baseline, whichever way it goes.
fn results_table(cfg: &DemoConfig, rows: &[DemoRow]) -> Result<String> {
    let seeds = cfg
        .seeds
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let mut table = format!(
        "GenSeg demo: lung phantoms at {} px, {} train + {} val labelled, {} iterations per \
         method (GenSeg: α step every {}), seeds {seeds}; Dice mean ± std over the seeds, then \
         each seed\n\n| method | Dice in domain ({} cases) | Dice shifted domain ({} cases) | \
         train time per seed |\n|---|---|---|---|\n",
        cfg.size,
        cfg.n_train,
        cfg.n_val,
        cfg.iterations,
        cfg.arch_every,
        cfg.pool - cfg.n_train - cfg.n_val,
        cfg.shifted
    );
    let of = |method: Method, value: fn(&DemoRow) -> f64| -> Vec<f64> {
        rows.iter()
            .filter(|r| r.method == method)
            .map(value)
            .collect()
    };
    let in_domain: fn(&DemoRow) -> f64 = |r| r.dice_in_domain;
    let shifted: fn(&DemoRow) -> f64 = |r| r.dice_shifted;
    for method in METHODS {
        let (di, si) = mean_std(&of(method, in_domain));
        let (ds, ss) = mean_std(&of(method, shifted));
        let (time, _) = mean_std(&of(method, |r| r.seconds));
        let each = |v: Vec<f64>| {
            v.iter()
                .map(|x| format!("{x:.3}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(
            table,
            "| {method} | {di:.3} ± {si:.3} ({}) | {ds:.3} ± {ss:.3} ({}) | {time:.0} s |",
            each(of(method, in_domain)),
            each(of(method, shifted)),
        )?;
    }
    writeln!(table)?;
    for method in [Method::Separate, Method::Genseg] {
        let mut parts = Vec::new();
        for (name, value) in [("in domain", in_domain), ("on the shifted domain", shifted)] {
            let deltas: Vec<f64> = of(method, value)
                .iter()
                .zip(of(Method::Baseline, value))
                .map(|(m, b)| 100.0 * (m - b))
                .collect();
            let (mean, std) = mean_std(&deltas);
            let above = deltas.iter().filter(|d| **d > 0.0).count();
            let word = if mean >= 0.0 { "above" } else { "below" };
            parts.push(format!(
                "{:.1} ± {std:.1} points {word} the baseline {name} (higher on {above} of {} \
                 seeds)",
                mean.abs(),
                deltas.len()
            ));
        }
        writeln!(table, "{method}: {}.", parts.join(", "))?;
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_demo_reports_every_method_on_every_seed() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let cfg = DemoConfig {
            out: tmp.path().join("demo"),
            pool: 14,
            shifted: 4,
            pretrain_iterations: 4,
            iterations: 4,
            seeds: vec![3, 5],
            ..DemoConfig::default()
        };
        let report = demo(
            &cfg,
            &Device::Cpu,
            &AtomicBool::new(false),
            &mut crate::learner::Silent,
        )?
        .expect("not interrupted");
        let runs: Vec<(Method, u64)> = report.rows.iter().map(|r| (r.method, r.seed)).collect();
        assert_eq!(
            runs,
            [3, 5]
                .into_iter()
                .flat_map(|s| METHODS.map(|m| (m, s)))
                .collect::<Vec<_>>()
        );
        for r in &report.rows {
            assert!((0.0..=1.0).contains(&r.dice_in_domain), "{r:?}");
            assert!(r.run.join("eval-shifted/summary.json").exists(), "{r:?}");
        }
        // The seeds draw different splits of one pool.
        let split = |s: u64| {
            std::fs::read_to_string(cfg.out.join(format!("runs/s{s}/baseline/split.json")))
        };
        assert_ne!(split(3)?, split(5)?);
        let summary = std::fs::read_to_string(cfg.out.join("summary.md"))?;
        assert_eq!(summary, report.table);
        for line in [
            "| baseline |",
            "| separate |",
            "| genseg |",
            "seeds 3, 5",
            "separate: ",
            "genseg: ",
        ] {
            assert!(summary.contains(line), "{line} missing:\n{summary}");
        }
        assert!(cfg.out.join("predictions").read_dir()?.next().is_some());
        Ok(())
    }
}
