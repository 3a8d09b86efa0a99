//! `genseg bench-step`: the JSON line that `cargo xtask bench-vs-torch` reads.

use crate::support::{fails, ok};

fn bench(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["bench-step", "--base", "2", "--size", "16", "--batch", "2"];
    all.extend_from_slice(args);
    serde_json::from_str(ok(&all).trim()).expect("one JSON line")
}

#[test]
fn bench_step_prints_one_json_line_per_model() {
    for model in ["unet", "pix2pix"] {
        let report = bench(&["--model", model, "--steps", "3", "--warmup", "0"]);
        assert_eq!(report["side"], "genseg");
        assert_eq!(report["config"]["model"], model);
        assert_eq!(report["step_seconds"].as_array().map(Vec::len), Some(3));
        assert_eq!(report["threads"], 1, "support::command sets one thread");
        assert!(report["params"].as_u64() > Some(0));
        assert!(report["peak_rss_bytes"].as_u64() > Some(0));
        assert!(report["gflop_per_step"].as_f64() > Some(0.0));
    }
    // UNet base 2 (widths 2..32), 1 channel, 16 px: each encoder DoubleConv is 13,824
    // MACs, each decoder level (ConvT + DoubleConv) 29,696, outc 512; x 2 FLOP x 3 x batch 2.
    let unet = bench(&["--model", "unet"]);
    assert_eq!(unet["params"], 30_715);
    let macs = 5.0 * 13_824.0 + 4.0 * 29_696.0 + 512.0;
    assert!((unet["gflop_per_step"].as_f64().unwrap() - 12.0 * macs * 1e-9).abs() < 1e-12);
}

#[test]
fn bench_step_rejects_an_empty_batch() {
    let err = fails(&["bench-step", "--model", "unet", "--batch", "0"]);
    assert!(err.contains("batch (0)"), "{err}");
}
