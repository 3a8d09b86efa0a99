//! `genseg run`: one line of an experiment manifest, its steps skipped when done and
//! resumed when started; bad indices and failing steps are named.

use std::collections::BTreeMap;
use std::path::Path;

use genseg_pipelines::manifest::{RunSpec, Step, write};

use crate::support::{fails, genseg, ok, phantoms, run_args, s};

/// A run of the manifest: a short baseline on `data`, then an evaluation on `ood`.
fn spec(data: &Path, ood: &Path, dir: &Path) -> RunSpec {
    let test = dir.join("eval-test/summary.json");
    let shifted = dir.join("eval-shifted/summary.json");
    let train = run_args(
        &["train", "--method", "baseline"],
        data,
        (6, 2, 0),
        dir,
        &[
            "model.unet.base_width=8",
            "model.unet.depth=3",
            "train.val_every=3",
        ],
        6,
        &[],
    );
    let evaluate: Vec<String> = [
        "evaluate",
        "--run",
        &s(dir),
        "--data",
        &s(ood),
        "--out",
        &s(&dir.join("eval-shifted")),
    ]
    .map(String::from)
    .to_vec();
    RunSpec {
        id: "lungs/6+2/unet/baseline/s0".into(),
        dataset: "lungs".into(),
        regime: "6+2".into(),
        n_train: 6,
        n_val: 2,
        method: "baseline".into(),
        backbone: "unet".into(),
        seed: 0,
        fold: 0,
        dir: dir.to_path_buf(),
        steps: vec![
            Step {
                args: train,
                resume: Some(dir.to_path_buf()),
                done: Some(test.clone()),
            },
            Step {
                args: evaluate,
                resume: None,
                done: Some(shifted.clone()),
            },
        ],
        scores: BTreeMap::from([("test".into(), test), ("shifted".into(), shifted)]),
    }
}

#[test]
fn a_manifest_line_runs_its_steps_once_and_names_what_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, ood) = (tmp.path().join("lungs"), tmp.path().join("other"));
    phantoms(&data, "lungs", 16, 1, &[]);
    phantoms(&ood, "lungs", 16, 2, &[]);
    let manifest = tmp.path().join("runs.jsonl");
    let run = tmp.path().join("runs/a");
    let mut broken = spec(
        &tmp.path().join("missing"),
        &ood,
        &tmp.path().join("runs/b"),
    );
    broken.id = "missing/6+2/unet/baseline/s0".into();
    write(&manifest, &[spec(&data, &ood, &run), broken]).unwrap();
    let m = s(&manifest);

    ok(&["run", "--manifest", &m, "--index", "0"]);
    for summary in ["eval-test/summary.json", "eval-shifted/summary.json"] {
        assert!(run.join(summary).is_file(), "{summary} missing");
    }
    let metrics = std::fs::read(run.join("metrics.jsonl")).unwrap();

    // Again: nothing is redone.
    let again = genseg(&["run", "--manifest", &m, "--index", "0"]);
    assert!(again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert_eq!(stderr.matches("done already").count(), 2, "{stderr}");
    assert_eq!(std::fs::read(run.join("metrics.jsonl")).unwrap(), metrics);

    let err = fails(&["run", "--manifest", &m, "--index", "1"]);
    assert!(err.contains("missing/6+2/unet/baseline/s0"), "{err}");
    assert!(
        err.contains("running the same command again resumes it"),
        "{err}"
    );
    let err = fails(&["run", "--manifest", &m, "--index", "2"]);
    assert!(
        err.contains("has 2 runs (indices 0..=1), no index 2"),
        "{err}"
    );
}
