//! Train the UNet baseline on synthetic lung phantoms through the library API, then score
//! the best checkpoint on an out-of-split set — the same steps as `genseg train` and
//! `genseg evaluate`, with no command line in between.
//!
//! ```sh
//! cargo run --release -p genseg-pipelines --example baseline_phantoms
//! ```

use std::sync::atomic::AtomicBool;

use anyhow::Result;
use candle_core::Device;
use genseg_data::phantom::{PhantomConfig, PhantomKind, write_phantoms};
use genseg_pipelines::config::{Method, Profile, RunConfig};
use genseg_pipelines::evaluate::{SplitChoice, evaluate_run};
use genseg_pipelines::learner::Silent;
use genseg_pipelines::run_dir::Which;

fn main() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pool = dir.path().join("lungs");
    write_phantoms(&pool, &PhantomConfig::new(PhantomKind::Lungs, 32, 0), 30)?;

    // The `cpu` profile, sized down for a quick run: 7 + 2 labelled phantoms at 32 px.
    let mut cfg = RunConfig::profile(Profile::Cpu);
    cfg.method = Method::Baseline;
    cfg.data.path = pool;
    cfg.data.size = 32;
    cfg.train.iterations = 60;
    cfg.train.val_every = 20;

    let run = dir.path().join("run");
    let device = Device::Cpu;
    let outcome =
        genseg_pipelines::methods::train(cfg, &run, &device, &AtomicBool::new(false), &mut Silent)?;
    println!(
        "best validation Dice {:.3} at iteration {}",
        outcome.best_val_dice, outcome.best_iteration
    );
    if let Some(test) = &outcome.test {
        println!(
            "test split: Dice {:.3} over {} cases",
            test.metrics["dice"].mean, test.n_cases
        );
    }

    // A shifted domain, scored from the run folder alone.
    let shifted = dir.path().join("shifted");
    let mut phantoms = PhantomConfig::new(PhantomKind::Lungs, 32, 1);
    phantoms.shifted = true;
    write_phantoms(&shifted, &phantoms, 10)?;
    let ood = evaluate_run(
        &run,
        Which::Best,
        Some(&shifted),
        SplitChoice::All,
        None,
        &run.join("eval-shifted"),
        &device,
    )?;
    println!("shifted domain: Dice {:.3}", ood.metrics["dice"].mean);
    Ok(())
}
