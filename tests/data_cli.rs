//! End-to-end tests of `genseg data`: `check` accepts every real dataset and names the file of
//! each kind of breakage, `phantoms` writes datasets that pass `check`, `split` writes valid,
//! reproducible split files.

use std::path::Path;
use std::process::{Command, Output};

use genseg_data::phantom::{PhantomConfig, PhantomKind, write_phantoms};
use genseg_data::split::read_split_file;
use image::{DynamicImage, GrayImage, Luma};

use crate::support::{genseg_bin, shared_data_dir};

fn genseg(args: &[&str]) -> Output {
    Command::new(genseg_bin())
        .args(args)
        .output()
        .expect("the genseg binary runs")
}

fn path(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// Runs `genseg data check <dir>` and expects success; returns stdout.
fn check_passes(dir: &Path) -> String {
    let out = genseg(&["data", "check", path(dir)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "check failed on {}:\n{stderr}",
        dir.display()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `genseg data check <dir>` and expects failure with `needles` in stderr.
fn check_fails_naming(dir: &Path, needles: &[&str]) {
    let out = genseg(&["data", "check", path(dir)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "check should fail on {}",
        dir.display()
    );
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "stderr does not mention {needle:?}:\n{stderr}"
        );
    }
}

/// The value printed on the report's `key` row.
fn row<'a>(report: &'a str, key: &str) -> &'a str {
    report
        .lines()
        .find_map(|l| {
            l.strip_prefix(key)
                .filter(|rest| rest.starts_with(' '))
                .map(str::trim)
        })
        .unwrap_or_else(|| panic!("no {key:?} row in\n{report}"))
}

fn check_shared(name: &str, pairs: usize, channels: &str) {
    let Some(root) = shared_data_dir() else {
        return;
    };
    let report = check_passes(&root.join(name));
    assert_eq!(row(&report, "pairs"), pairs.to_string(), "{report}");
    assert_eq!(row(&report, "layout"), "folder");
    assert_eq!(row(&report, "image sizes"), format!("256x256: {pairs}"));
    assert_eq!(row(&report, "channels"), format!("{channels}: {pairs}"));
    assert_eq!(row(&report, "problems"), "0");
}

#[test]
fn check_passes_on_montgomery() {
    check_shared("montgomery", 138, "1");
}

#[test]
fn check_passes_on_isic2017_subset() {
    check_shared("isic2017_subset", 98, "3");
}

#[test]
fn check_passes_on_ph2() {
    check_shared("ph2", 200, "3");
}

#[test]
fn check_passes_on_fuseg() {
    check_shared("fuseg", 1010, "3");
}

#[test]
fn check_passes_on_drive() {
    check_shared("drive", 40, "3");
}

/// Three 32x32 lung phantoms, ids lungs_0000..lungs_0002.
fn phantom_dataset(dir: &Path) {
    write_phantoms(dir, &PhantomConfig::new(PhantomKind::Lungs, 32, 0), 3)
        .expect("phantoms are written");
}

fn save_gray(path: &Path, w: u32, h: u32, f: impl Fn(u32) -> u8) {
    DynamicImage::ImageLuma8(GrayImage::from_fn(w, h, |x, _| Luma([f(x)])))
        .save(path)
        .expect("test mask is written");
}

#[test]
fn check_names_a_truncated_png() {
    let dir = tempfile::tempdir().unwrap();
    phantom_dataset(dir.path());
    let file = dir.path().join("images/lungs_0001.png");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    check_fails_naming(dir.path(), &["images/lungs_0001.png", "truncated"]);
}

#[test]
fn check_names_a_mask_of_another_size() {
    let dir = tempfile::tempdir().unwrap();
    phantom_dataset(dir.path());
    save_gray(&dir.path().join("masks/lungs_0002.png"), 16, 32, |x| {
        if x < 8 { 255 } else { 0 }
    });
    check_fails_naming(dir.path(), &["masks/lungs_0002.png", "16x32", "32x32"]);
}

#[test]
fn check_names_a_three_valued_mask_unless_a_threshold_is_given() {
    let dir = tempfile::tempdir().unwrap();
    phantom_dataset(dir.path());
    save_gray(&dir.path().join("masks/lungs_0000.png"), 32, 32, |x| {
        [0, 128, 255][(x % 3) as usize]
    });
    check_fails_naming(
        dir.path(),
        &["masks/lungs_0000.png", "non-binary", "3 distinct"],
    );
    let out = genseg(&["data", "check", path(dir.path()), "--threshold", "0.5"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_names_a_missing_mask_and_an_unmatched_one() {
    let dir = tempfile::tempdir().unwrap();
    phantom_dataset(dir.path());
    std::fs::remove_file(dir.path().join("masks/lungs_0001.png")).unwrap();
    check_fails_naming(dir.path(), &["images/lungs_0001.png", "missing mask"]);
    std::fs::remove_file(dir.path().join("images/lungs_0001.png")).unwrap();
    std::fs::copy(
        dir.path().join("masks/lungs_0000.png"),
        dir.path().join("masks/stray.png"),
    )
    .unwrap();
    check_fails_naming(dir.path(), &["masks/stray.png", "unmatched mask"]);
}

#[test]
fn check_fails_on_empty_folders() {
    let dir = tempfile::tempdir().unwrap();
    check_fails_naming(dir.path(), &[path(dir.path()), "no dataset layout"]);
    for sub in ["images", "masks"] {
        std::fs::create_dir(dir.path().join(sub)).unwrap();
    }
    check_fails_naming(dir.path(), &[path(dir.path()), "empty dataset"]);
}

#[test]
fn check_names_a_truncated_copy_of_real_data() {
    let Some(root) = shared_data_dir() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let src = root.join("ph2");
    for sub in ["images", "masks"] {
        std::fs::create_dir(dir.path().join(sub)).unwrap();
        for id in ["IMD002", "IMD003", "IMD004"] {
            let name = format!("{sub}/{id}.png");
            std::fs::copy(src.join(&name), dir.path().join(&name)).unwrap();
        }
    }
    check_passes(dir.path());
    let file = dir.path().join("masks/IMD003.png");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 40]).unwrap();
    check_fails_naming(dir.path(), &["masks/IMD003.png", "cannot decode"]);
}

#[test]
fn phantoms_pass_check_with_the_expected_channels() {
    let dir = tempfile::tempdir().unwrap();
    for (kind, channels, shifted) in [("lungs", "1", false), ("skin", "3", true)] {
        let out_dir = dir.path().join(kind);
        let mut args = vec![
            "data",
            "phantoms",
            "--kind",
            kind,
            "--n",
            "5",
            "--size",
            "48",
            "--seed",
            "3",
            "--out",
            path(&out_dir),
        ];
        if shifted {
            args.push("--shifted");
        }
        let out = genseg(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report = check_passes(&out_dir);
        assert_eq!(row(&report, "pairs"), "5");
        assert_eq!(row(&report, "channels"), format!("{channels}: 5"));
        assert_eq!(row(&report, "image sizes"), "48x48: 5");
        assert_eq!(row(&report, "empty masks"), "0");
    }
}

#[test]
fn split_writes_a_valid_reproducible_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_phantoms(&data, &PhantomConfig::new(PhantomKind::Skin, 24, 1), 12).unwrap();
    let split_args = |out: &Path| {
        genseg(&[
            "data",
            "split",
            path(&data),
            "--n-train",
            "7",
            "--n-val",
            "2",
            "--seed",
            "0",
            "--out",
            path(out),
        ])
    };
    let (a, b) = (dir.path().join("a.json"), dir.path().join("b.json"));
    for out in [&a, &b] {
        let run = split_args(out);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
    }
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let splits = read_split_file(&a).unwrap();
    assert_eq!(splits.len(), 1);
    let ids: Vec<String> = (0..12).map(|i| format!("skin_{i:04}")).collect();
    splits[0].validate(&ids).unwrap();
    let s = &splits[0];
    assert_eq!((s.train.len(), s.val.len(), s.test.len()), (7, 2, 3));

    let folds = dir.path().join("folds.json");
    let run = genseg(&[
        "data",
        "split",
        path(&data),
        "--k-fold",
        "3",
        "--out",
        path(&folds),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let folds = read_split_file(&folds).unwrap();
    assert_eq!(folds.len(), 3);
    assert!(folds.iter().all(|f| f.val.len() == 4 && f.train.len() == 8));

    // Validation folds of the drawn labelled pool: fold 0 is the standard split, every
    // fold keeps its test cases, 9 labelled cases give four disjoint folds of 2.
    let pool_folds = dir.path().join("pool-folds.json");
    let pool_args = |k: &str, out: &Path| {
        genseg(&[
            "data",
            "split",
            path(&data),
            "--n-train",
            "7",
            "--n-val",
            "2",
            "--k-fold",
            k,
            "--out",
            path(out),
        ])
    };
    let run = pool_args("4", &pool_folds);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let pool_folds = read_split_file(&pool_folds).unwrap();
    assert_eq!(pool_folds.len(), 4);
    assert_eq!(&pool_folds[0], s);
    assert!(
        pool_folds
            .iter()
            .all(|f| f.test == s.test && f.train.len() == 7)
    );
    let run = pool_args("5", &dir.path().join("z.json"));
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("4 disjoint validation fold(s)"));

    let run = genseg(&[
        "data",
        "split",
        path(&data),
        "--k-fold",
        "13",
        "--out",
        path(&dir.path().join("x.json")),
    ]);
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("at least 13 cases"));
    let run = genseg(&[
        "data",
        "split",
        path(&data),
        "--n-train",
        "11",
        "--n-val",
        "2",
        "--out",
        path(&dir.path().join("y.json")),
    ]);
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("exceeds the 12 labelled cases"));
}

#[test]
fn split_of_montgomery_draws_the_papers_nine_cases() {
    let Some(root) = shared_data_dir() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("split.json");
    let run = genseg(&[
        "data",
        "split",
        path(&root.join("montgomery")),
        "--n-train",
        "7",
        "--n-val",
        "2",
        "--seed",
        "0",
        "--out",
        path(&out),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let s = &read_split_file(&out).unwrap()[0];
    assert_eq!((s.train.len(), s.val.len(), s.test.len()), (7, 2, 129));
}
