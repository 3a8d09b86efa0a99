//! Bounded fuzzing of every loader a user's files reach: real files of each format (a PNG
//! image and mask, an nnU-Net dataset.json, a split file, a run config, a checkpoint's
//! safetensors and optimizer state) with random bytes overwritten, inserted or cut off.
//! Each loader must return `Ok` or a named error, never panic. proptest runs a fixed
//! number of cases per loader (no regression files are written).

use std::path::Path;

use candle_core::{Device, Tensor};
use genseg_data::layout::read_dataset_json;
use genseg_data::preprocess::decode;
use genseg_data::split::{Split, read_split_file, write_split_file};
use genseg_data::writer::write_image;
use genseg_data::{PhantomConfig, PhantomKind, phantoms};
use genseg_nn::checkpoint::{read_safetensors, write_safetensors};
use genseg_nn::optim::{Optimizer, OptimizerState, Sgd, SgdConfig};
use genseg_pipelines::config::{Profile, RunConfig};
use genseg_pipelines::overrides::layered;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// One mutation of a seed file.
#[derive(Debug, Clone)]
enum Edit {
    /// Overwrite the byte at (position mod length).
    Set(usize, u8),
    /// Insert a byte.
    Insert(usize, u8),
    /// Keep only the first (position mod length) bytes.
    Truncate(usize),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        6 => (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Edit::Set(p, b)),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Edit::Insert(p, b)),
        1 => any::<usize>().prop_map(Edit::Truncate),
    ];
    prop::collection::vec(edit, 1..8)
}

fn mutate(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for edit in edits {
        let n = bytes.len().max(1);
        match *edit {
            Edit::Set(p, b) if !bytes.is_empty() => bytes[p % n] = b,
            Edit::Insert(p, b) => bytes.insert(p % (bytes.len() + 1), b),
            Edit::Truncate(p) => bytes.truncate(p % n),
            _ => {}
        }
    }
    bytes
}

/// Runs `load` on `cases` mutations of `seed` written to `path`; a panic fails the test
/// with the mutation that caused it.
fn fuzz(path: &Path, seed: &[u8], cases: u32, load: impl Fn(&Path)) {
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new_with_rng(
        config,
        proptest::test_runner::TestRng::deterministic_rng(
            proptest::test_runner::RngAlgorithm::ChaCha,
        ),
    );
    runner
        .run(&edits(), |edits| {
            std::fs::write(path, mutate(seed, &edits)).unwrap();
            load(path);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

#[test]
fn image_and_mask_decoders_never_panic_on_damaged_pngs() {
    let dir = tempfile::tempdir().unwrap();
    let sample = &phantoms(&PhantomConfig::new(PhantomKind::Skin, 24, 0), 1).unwrap()[0];
    for (name, image) in [
        (
            "image.png",
            image::DynamicImage::ImageRgb8(sample.image.to_rgb8()),
        ),
        (
            "mask.png",
            image::DynamicImage::ImageLuma8(sample.mask.clone()),
        ),
    ] {
        let path = dir.path().join(name);
        write_image(&path, &image).unwrap();
        let seed = std::fs::read(&path).unwrap();
        fuzz(&path, &seed, 300, |p| {
            let _ = decode(p);
        });
    }
}

#[test]
fn dataset_json_and_split_file_readers_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("dataset.json");
    let seed = br#"{"channel_names": {"0": "xray"}, "labels": {"background": 0, "lung": 1, "both": [1, 2]}, "numTraining": 2, "file_ending": ".png"}"#;
    fuzz(&json, seed, 400, |p| {
        let _ = read_dataset_json(p);
    });
    let split = dir.path().join("splits.json");
    write_split_file(
        &split,
        &[Split {
            train: vec!["a".into(), "b".into()],
            val: vec!["c".into()],
            test: vec!["d".into()],
        }],
    )
    .unwrap();
    let seed = std::fs::read(&split).unwrap();
    fuzz(&split, &seed, 400, |p| {
        let _ = read_split_file(p);
    });
}

#[test]
fn run_config_files_never_panic_and_invalid_values_are_refused_by_validate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    let defaults = RunConfig::profile(Profile::Cpu);
    let seed = toml::to_string(&defaults).unwrap();
    fuzz(&path, seed.as_bytes(), 300, |p| {
        if let Ok(cfg) = layered(&defaults, Some(p), &[]) {
            let _ = cfg.validate();
        }
    });
}

#[test]
fn safetensors_and_optimizer_state_readers_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let device = Device::Cpu;
    let weights = std::collections::BTreeMap::from([
        (
            "a.weight".to_string(),
            Tensor::arange(0f32, 12.0, &device)
                .unwrap()
                .reshape((3, 4))
                .unwrap(),
        ),
        (
            "b.bias".to_string(),
            Tensor::ones(5, candle_core::DType::F32, &device).unwrap(),
        ),
    ]);
    let path = dir.path().join("weights.safetensors");
    write_safetensors(&path, &weights, None).unwrap();
    let seed = std::fs::read(&path).unwrap();
    fuzz(&path, &seed, 400, |p| {
        let _ = read_safetensors(p, &Device::Cpu);
    });

    let var = candle_core::Var::from_tensor(&weights["a.weight"]).unwrap();
    let mut sgd = Sgd::new(
        vec![("a.weight".to_string(), var.clone())],
        SgdConfig {
            lr: 0.1,
            momentum: 0.9,
            ..SgdConfig::default()
        },
    )
    .unwrap();
    let grads = var
        .as_tensor()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    sgd.step(&grads).unwrap();
    let state: OptimizerState = sgd.state().unwrap();
    let path = dir.path().join("optimizer.safetensors");
    state.save(&path).unwrap();
    let seed = std::fs::read(&path).unwrap();
    fuzz(&path, &seed, 300, |p| {
        let _ = OptimizerState::load(p);
    });
}
