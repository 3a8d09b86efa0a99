//! GenSeg end to end through the library API: pre-train the mask-to-image generator
//! (pix2pix), then train generator, segmenter and the architecture weights α together by
//! multi-level optimisation, and read α back from the checkpoint.
//!
//! ```sh
//! cargo run --release -p genseg-pipelines --example genseg_end_to_end
//! ```

use std::sync::atomic::AtomicBool;

use anyhow::Result;
use candle_core::Device;
use genseg_data::phantom::{PhantomConfig, PhantomKind, write_phantoms};
use genseg_nn::checkpoint::Checkpoint;
use genseg_pipelines::config::{Method, Profile, RunConfig};
use genseg_pipelines::learner::{CheckpointMeta, Silent};
use genseg_pipelines::methods::{pix2pix, train};

fn main() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pool = dir.path().join("lungs");
    write_phantoms(&pool, &PhantomConfig::new(PhantomKind::Lungs, 32, 0), 30)?;
    let (device, stop) = (Device::Cpu, AtomicBool::new(false));

    // 1. The generator's warm-up: a `method = "pix2pix"` run.
    let mut pre = RunConfig::pix2pix(Profile::Cpu);
    pre.data.path = pool.clone();
    pre.data.size = 32;
    pre.train.iterations = 40;
    pre.train.val_every = 20;
    let generator = dir.path().join("pix2pix");
    let p = pix2pix::pretrain(pre, &generator, &device, &stop, &mut Silent)?;
    println!(
        "generator: validation L1 {:.3} -> {:.3}",
        p.initial_val_l1, p.best_val_l1
    );

    // 2. GenSeg from that generator (its sections are copied into this run's config).
    let mut cfg = RunConfig::profile(Profile::Cpu);
    cfg.method = Method::Genseg;
    cfg.data.path = pool;
    cfg.data.size = 32;
    cfg.genseg.generator = generator;
    cfg.train.iterations = 20;
    cfg.train.val_every = 10;
    let run = dir.path().join("genseg");
    let outcome = train(cfg, &run, &device, &stop, &mut Silent)?;
    println!(
        "GenSeg: best validation Dice {:.3}, test Dice {:.3}",
        outcome.best_val_dice,
        outcome.test.map_or(f64::NAN, |t| t.metrics["dice"].mean)
    );

    // 3. Where α went: softmax(α) per searchable up cell, from the last checkpoint.
    let meta = CheckpointMeta::of(&Checkpoint::load(&run.join("last"))?)?;
    for (cell, weights) in meta.alpha_softmax.unwrap_or_default().iter().enumerate() {
        println!("up cell {cell}: softmax(α) = {weights:.4?}");
    }
    Ok(())
}
