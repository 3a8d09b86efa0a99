//! `cargo xtask bench-vs-nnunet`: our strong recipe and nnU-Net v2 on the same split of the
//! same images, scored by the same metrics.
//!
//! Per seed: `genseg data split` draws the split; `genseg train --recipe strong` trains on
//! it (with `--set` overrides on our side only, e.g. nnU-Net's SGD); xtask/bench/nnunet_run.py converts the same cases (resized to `--size`) into an
//! nnU-Net raw dataset, plans, trains `nnUNetTrainer_50epochs` on fold 0 of that split on
//! the CPU and predicts the test cases (and every case of `--ood`) with its mirroring TTA;
//! `genseg score` scores those predictions. nnunetv2 comes from PyPI into
//! `target/bench-venv` on first use; the recipe refuses to run in CI. Layout of `--out`:
//! `split-s<seed>.json`, `ours-s<seed>/` (a run folder), `nnunet-s<seed>/` (nnU-Net's
//! folders, `nnunet.log`, `score-*`), `results.md`.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::bench_vs_torch::ensure_venv;
use crate::experiment::{
    Study, loop_seconds, mean_dice, mean_std, read_json, s, table_head, train_or_resume,
};
use crate::{build_genseg, genseg};

/// The nnU-Net release the comparison was measured with.
const NNUNET: &str = "nnunetv2==2.8.1";

/// One seed's numbers: `(test Dice, out-of-domain Dice, training seconds)` per side.
struct SeedResult {
    seed: u64,
    ours: (f64, Option<f64>, f64),
    nnunet: (f64, Option<f64>, f64),
}

pub fn run(root: &Path, plan: &Study, size: u32, sets: &[String]) -> Result<()> {
    if std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false") {
        bail!("bench-vs-nnunet installs nnU-Net from PyPI and trains for hours; not in CI");
    }
    let check = format!(
        "import importlib.metadata as m; assert 'nnunetv2==' + m.version('nnunetv2') == '{NNUNET}'"
    );
    let python = ensure_venv(root, &check, &[NNUNET])?;
    let bin = match &plan.genseg_bin {
        Some(b) => b.clone(),
        None => build_genseg(root)?,
    };
    std::fs::create_dir_all(&plan.out)
        .with_context(|| format!("creating {}", plan.out.display()))?;
    let size_arg = size.to_string();
    let mut results = Vec::new();
    for &seed in &plan.seeds {
        let split = plan.out.join(format!("split-s{seed}.json"));
        genseg(
            &bin,
            &[
                "data",
                "split",
                &s(&plan.data),
                "--n-train",
                &plan.n_train.to_string(),
                "--n-val",
                &plan.n_val.to_string(),
                "--seed",
                &seed.to_string(),
                "--out",
                &s(&split),
            ],
        )?;

        // Ours.
        let ours = plan.out.join(format!("ours-s{seed}"));
        let mut args: Vec<String> = [
            "--recipe",
            "strong",
            "--data",
            &s(&plan.data),
            "--seed",
            &seed.to_string(),
            "--set",
            &format!("data.split_file=\"{}\"", s(&split)),
            "--set",
            &format!("data.size={size}"),
            "--out",
            &s(&ours),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        for kv in sets {
            args.extend(["--set".into(), kv.clone()]);
        }
        let summary = ours.join("eval-test/summary.json");
        train_or_resume(&bin, "train", &ours, Some(&summary), &args)?;
        let ours_ood = match &plan.ood {
            Some(ood) => {
                let out = ours.join("eval-ood");
                if !out.join("summary.json").exists() {
                    genseg(
                        &bin,
                        &[
                            "evaluate",
                            "--run",
                            &s(&ours),
                            "--data",
                            &s(ood),
                            "--out",
                            &s(&out),
                        ],
                    )?;
                }
                Some(mean_dice(&out.join("summary.json"))?)
            }
            None => None,
        };
        let ours_result = (mean_dice(&summary)?, ours_ood, loop_seconds(&ours)?);

        // nnU-Net.
        let work = plan.out.join(format!("nnunet-s{seed}"));
        let times = work.join("times.json");
        if !times.exists() {
            let mut cmd = Command::new(&python);
            cmd.arg(root.join("xtask/bench/nnunet_run.py"))
                .args(["--data", &s(&plan.data), "--split-file", &s(&split)])
                .args(["--size", &size_arg, "--work", &s(&work)])
                .args(["--dataset-id", &(500 + seed).to_string()]);
            if let Some(ood) = &plan.ood {
                cmd.args(["--ood", &s(ood)]);
            }
            // A fresh start: nnU-Net's own folders are not resumable across our runs.
            let _ = std::fs::remove_dir_all(&work);
            let output = cmd.output().context("running nnunet_run.py")?;
            if !output.status.success() {
                bail!(
                    "nnunet_run.py failed ({}); see {}/nnunet.log\n{}",
                    output.status,
                    work.display(),
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            let line = String::from_utf8_lossy(&output.stdout);
            let last = line
                .lines()
                .last()
                .context("nnunet_run.py printed nothing")?;
            std::fs::write(&times, last)?;
        }
        let t = read_json(&times)?;
        let score = |label: &str, data: &Path, test_only: bool| -> Result<f64> {
            let pred = t["predictions"][label]
                .as_str()
                .with_context(|| format!("{} has no predictions.{label}", times.display()))?;
            let out = work.join(format!("score-{label}"));
            let mut args = vec![
                "score".to_string(),
                "--predictions".into(),
                pred.into(),
                "--data".into(),
                s(data),
                "--size".into(),
                size_arg.clone(),
                "--out".into(),
                s(&out),
            ];
            if test_only {
                args.extend(["--split-file".into(), s(&split)]);
            }
            genseg(&bin, &args.iter().map(String::as_str).collect::<Vec<_>>())?;
            mean_dice(&out.join("summary.json"))
        };
        let nn_test = score("test", &plan.data, true)?;
        let nn_ood = match &plan.ood {
            Some(ood) => {
                let label = ood.file_name().map(|n| n.to_string_lossy().into_owned());
                Some(score(
                    &label.context("--ood has no folder name")?,
                    ood,
                    false,
                )?)
            }
            None => None,
        };
        let nn_seconds = t["train_seconds"].as_f64().context("no train_seconds")?;
        results.push(SeedResult {
            seed,
            ours: ours_result,
            nnunet: (nn_test, nn_ood, nn_seconds),
        });
        let table = markdown(plan, size, &results);
        std::fs::write(plan.out.join("results.md"), &table)?;
    }
    print!("{}", std::fs::read_to_string(plan.out.join("results.md"))?);
    Ok(())
}

fn markdown(plan: &Study, size: u32, rows: &[SeedResult]) -> String {
    let mut md = format!(
        "Strong recipe vs nnU-Net v2 ({NNUNET}, 2d, nnUNetTrainer_50epochs, CPU) on {} \
         ({} train + {} val, {size} px); Dice mean over cases, then mean ± sample std over \
         seeds. Training wall time per run.\n\n{}",
        plan.data.display(),
        plan.n_train,
        plan.n_val,
        table_head("side", plan.ood.is_some(), &["train time"]),
    );
    let seeds: Vec<String> = rows.iter().map(|r| r.seed.to_string()).collect();
    for (name, side) in [
        (
            "genseg --recipe strong",
            rows.iter().map(|r| r.ours).collect::<Vec<_>>(),
        ),
        ("nnU-Net", rows.iter().map(|r| r.nnunet).collect()),
    ] {
        let (test, test_sd) = mean_std(&side.iter().map(|r| r.0).collect::<Vec<_>>());
        let (secs, _) = mean_std(&side.iter().map(|r| r.2).collect::<Vec<_>>());
        let ood = if plan.ood.is_some() {
            let v: Vec<f64> = side.iter().filter_map(|r| r.1).collect();
            let (m, sd) = mean_std(&v);
            format!("{m:.3} ± {sd:.3} | ")
        } else {
            String::new()
        };
        let _ = writeln!(
            md,
            "| {name} | {} | {test:.3} ± {test_sd:.3} | {ood}{secs:.0} s |",
            seeds.join(",")
        );
    }
    md
}
