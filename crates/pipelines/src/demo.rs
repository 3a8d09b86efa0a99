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
    /// The one seed.
    pub seed: u64,
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
            pretrain_iterations: 150,
            iterations: 120,
            seed: 0,
        }
    }
}

/// One method's line of the table.
#[derive(Debug, Clone)]
pub struct DemoRow {
    /// The method.
    pub method: Method,
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
    /// Baseline, Separate, GenSeg.
    pub rows: Vec<DemoRow>,
    /// Wall time of the generator pre-training.
    pub pretrain_seconds: f64,
    /// Wall time of the whole demo.
    pub seconds: f64,
    /// The printed table.
    pub table: String,
}

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
    let mut phantoms = PhantomConfig::new(PhantomKind::Lungs, cfg.size, cfg.seed);
    write_phantoms(&pool, &phantoms, cfg.pool)?;
    phantoms.seed = cfg.seed + 1;
    phantoms.shifted = true;
    write_phantoms(&shifted, &phantoms, cfg.shifted)?;
    let report = check_dataset(&pool, &CheckOptions::default())?;
    anyhow::ensure!(
        report.is_ok(),
        "the phantom pool failed its check:\n{report}"
    );
    tracing::info!(
        "demo: {} lung phantoms ({} px) in {}, {} shifted in {}",
        cfg.pool,
        cfg.size,
        pool.display(),
        cfg.shifted,
        shifted.display()
    );

    let mut pcfg = RunConfig::pix2pix(Profile::Cpu);
    pcfg.seed = cfg.seed;
    use_pool(&mut pcfg.data, cfg, &pool);
    pcfg.train.iterations = cfg.pretrain_iterations;
    pcfg.train.val_every = cfg.pretrain_iterations.div_ceil(3).max(1);
    let generator = runs.join("pix2pix");
    let pre = crate::methods::pix2pix::pretrain(pcfg, &generator, device, stop, observer)?;
    if pre.interrupted {
        return Ok(None);
    }

    let mut rows = Vec::new();
    for method in [Method::Baseline, Method::Separate, Method::Genseg] {
        let mut rc = RunConfig::profile(Profile::Cpu);
        rc.method = method;
        rc.seed = cfg.seed;
        use_pool(&mut rc.data, cfg, &pool);
        rc.train.iterations = cfg.iterations;
        rc.train.val_every = cfg.iterations.div_ceil(6).max(1);
        rc.train.checkpoint_every = cfg.iterations;
        rc.separate.generator = generator.clone();
        rc.genseg.generator = generator.clone();
        let run = runs.join(method.to_string());
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
            &run.join("eval-shifted"),
            device,
        )?;
        rows.push(DemoRow {
            method,
            dice_in_domain: in_domain.metrics["dice"].mean,
            dice_shifted: ood.metrics["dice"].mean,
            seconds: outcome.seconds,
            run,
        });
    }
    let genseg_run = &rows.last().expect("three methods ran").run;
    let predictions = cfg.out.join("predictions");
    recreate(&predictions)?;
    crate::predict::predict(
        genseg_run,
        Which::Best,
        &shifted.join("images"),
        &predictions,
        device,
    )?;

    let mut table = format!(
        "GenSeg demo: lung phantoms at {} px, {} train + {} val labelled, {} iterations per \
         method, seed {}\n\n| method | Dice in domain ({} cases) | Dice shifted domain ({} cases) | train time |\n|---|---|---|---|\n",
        cfg.size,
        cfg.n_train,
        cfg.n_val,
        cfg.iterations,
        cfg.seed,
        cfg.pool - cfg.n_train - cfg.n_val,
        cfg.shifted
    );
    for r in &rows {
        writeln!(
            table,
            "| {} | {:.3} | {:.3} | {:.0} s |",
            r.method, r.dice_in_domain, r.dice_shifted, r.seconds
        )?;
    }
    let seconds = started.elapsed().as_secs_f64();
    writeln!(
        table,
        "\nGenerator pre-training: {:.0} s ({} iterations, validation L1 {:.3} -> {:.3}). \
         Whole demo: {:.0} s.\nRun folders (progress.png, alpha.png, samples/, eval-*/) in {}; \
         GenSeg's masks and overlays of the shifted images in {}.\nOne seed on phantoms: a \
         demonstration of the pipeline, not a comparison (docs/results.md has those).",
        pre.seconds,
        pre.iterations,
        pre.initial_val_l1,
        pre.best_val_l1,
        seconds,
        runs.display(),
        predictions.display()
    )?;
    std::fs::write(cfg.out.join("summary.md"), &table)
        .with_context(|| format!("writing {}", cfg.out.join("summary.md").display()))?;
    Ok(Some(DemoReport {
        rows,
        pretrain_seconds: pre.seconds,
        seconds,
        table,
    }))
}
