//! `cargo xtask aggregate` on a hand-made experiment folder: the tables, the plots, and
//! results.html opened in a real headless Chromium, which must load every figure with no
//! console message. A copy of the page with one damaged figure must be caught. Without
//! a Chromium on PATH the browser part is skipped, except when `GENSEG_CHROMIUM=required`
//! (set by .ci/run, which installs Debian's chromium), where it fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use genseg_pipelines::manifest::{self, RunSpec, Step};

fn png(path: &Path, w: u32, h: u32, shade: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([shade, (x * 3) as u8, (y * 3) as u8])
    })
    .save(path)
    .unwrap();
}

fn summary(path: &Path, dice: f64) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let json = serde_json::json!({"dice": {"mean": dice}, "iou": {"mean": dice - 0.1}});
    std::fs::write(path, json.to_string()).unwrap();
}

/// lungs, regimes 4+2 and 8+2, baseline and separate, seeds 0 and 1, scored on `test`
/// and `shifted`; separate pre-trains a generator whose samples/ holds two grids.
fn experiment(exp: &Path) -> Vec<RunSpec> {
    let mut runs = Vec::new();
    for seed in [0u64, 1] {
        for n_train in [4usize, 8] {
            for method in ["baseline", "separate"] {
                let name = format!("lungs-{n_train}+2-unet-{method}-s{seed}");
                let dir = exp.join("runs").join(&name);
                let generator = exp.join("runs").join(format!("{name}.generator"));
                let mut scores = BTreeMap::new();
                for (set, shift) in [("test", 0.0), ("shifted", -0.2)] {
                    let path = dir.join(format!("eval-{set}/summary.json"));
                    let gain = if method == "separate" { 0.02 } else { 0.0 };
                    let dice = 0.7 + 0.02 * n_train as f64 + gain + shift + 0.004 * seed as f64;
                    summary(&path, dice);
                    // One run's case figure is missing: the page says so.
                    if !(seed == 0 && n_train == 8 && method == "baseline" && set == "test") {
                        png(&path.with_file_name("cases.png"), 200, 266, 40);
                    }
                    scores.insert(set.to_string(), path);
                }
                std::fs::write(
                    dir.join("metrics.jsonl"),
                    "{\"seconds\":40.0}\n{\"seconds\":100.0}\n",
                )
                .unwrap();
                let mut steps = Vec::new();
                if method == "separate" {
                    std::fs::create_dir_all(&generator).unwrap();
                    std::fs::write(generator.join("metrics.jsonl"), "{\"seconds\":50.0}\n")
                        .unwrap();
                    png(&generator.join("samples/iter_000010.png"), 200, 130, 10);
                    png(&generator.join("samples/iter_000020.png"), 200, 130, 200);
                    steps.push(Step {
                        args: vec!["pretrain-generator".into()],
                        resume: Some(generator),
                        done: None,
                    });
                }
                steps.push(Step {
                    args: vec!["train".into()],
                    resume: Some(dir.clone()),
                    done: None,
                });
                runs.push(RunSpec {
                    id: format!("lungs/{n_train}+2/unet/{method}/s{seed}"),
                    dataset: "lungs".into(),
                    regime: format!("{n_train}+2"),
                    n_train,
                    n_val: 2,
                    method: method.into(),
                    backbone: "unet".into(),
                    seed,
                    fold: 0,
                    dir,
                    steps,
                    scores,
                });
            }
        }
    }
    manifest::write(&exp.join("runs.jsonl"), &runs).unwrap();
    runs
}

fn chromium() -> Option<PathBuf> {
    let found = ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(PathBuf::from);
    if found.is_none() && std::env::var("GENSEG_CHROMIUM").as_deref() == Ok("required") {
        panic!("GENSEG_CHROMIUM=required but no chromium on PATH (apt-get install chromium)");
    }
    found
}

/// Opens `page` headless; returns the DOM after the load event and the console lines.
fn open_in_browser(browser: &Path, page: &Path, profile: &Path) -> (String, Vec<String>) {
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=3000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("chromium starts");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "chromium failed:\n{stderr}");
    let console = stderr
        .lines()
        .filter(|l| l.contains("CONSOLE"))
        .map(str::to_string)
        .collect();
    (String::from_utf8_lossy(&out.stdout).into_owned(), console)
}

#[test]
fn aggregate_writes_tables_plots_and_a_page_that_a_browser_shows_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let exp = tmp.path().join("exp");
    let runs = experiment(&exp);
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("aggregate")
        .arg(&exp)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let md = std::fs::read_to_string(exp.join("results.md")).unwrap();
    // 4 runs of 100 s, 4 of 100 s + 50 s of generator pre-training: 1000 s.
    assert!(
        md.contains("8 of 8 runs finished, 17 min of training"),
        "{md}"
    );
    assert!(
        md.contains("| 4+2 | unet | separate | 0,1 | 0.802 ± 0.003 |"),
        "{md}"
    );
    assert!(md.contains("+2.0 ± 0.0 pt | — | 150 s |"), "{md}");
    assert!(md.contains("| — | — | 100 s |"), "{md}");
    for plot in [
        "lungs-test-dice",
        "lungs-test-efficiency",
        "lungs-shifted-dice",
        "lungs-shifted-efficiency",
    ] {
        let file = format!("plots/{plot}.png");
        assert!(md.contains(&format!("]({file})")), "{md}");
        let img = image::open(exp.join(&file)).unwrap();
        assert!(img.width() >= 560 && img.height() >= 400, "{file}");
    }

    let html = std::fs::read_to_string(exp.join("results.html")).unwrap();
    // 4 plots, per test set 4 case figures of seed 0 less the missing one, 2 generator
    // grids (the separate runs of seed 0), each with the newest samples/ grid.
    let images = html.matches("<img ").count();
    assert_eq!(images, 4 + 2 * 4 - 1 + 2, "{html}");
    assert_eq!(html.matches("class=\"missing\"").count(), 1);
    assert!(!html.contains("src=\"file:") && !html.contains("http"));
    let newest = std::fs::read(
        runs[1].steps[0]
            .resume
            .as_ref()
            .unwrap()
            .join("samples/iter_000020.png"),
    )
    .unwrap();
    use base64::Engine as _;
    assert!(html.contains(&base64::engine::general_purpose::STANDARD.encode(newest)));

    let Some(browser) = chromium() else {
        eprintln!("skipping the browser check: no chromium on PATH");
        return;
    };
    let (dom, console) =
        open_in_browser(&browser, &exp.join("results.html"), &tmp.path().join("p1"));
    assert!(console.is_empty(), "console messages: {console:#?}");
    assert!(
        dom.contains(&format!("data-figures=\"{images}\"")),
        "{dom:.2000}"
    );
    assert!(dom.contains("data-broken-figures=\"0\""), "{dom:.2000}");

    // The check catches a figure the browser cannot decode.
    let start = html.find("base64,").unwrap() + "base64,".len();
    let mut broken = html.clone();
    broken.replace_range(start..start + 40, &"A".repeat(40));
    let page = exp.join("broken.html");
    std::fs::write(&page, broken).unwrap();
    let (dom, console) = open_in_browser(&browser, &page, &tmp.path().join("p2"));
    assert!(dom.contains("data-broken-figures=\"1\""), "{dom:.2000}");
    assert!(
        console.iter().any(|l| l.contains("figure failed to load")),
        "{console:#?}"
    );
}
