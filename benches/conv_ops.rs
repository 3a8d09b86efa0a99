//! Per-op convolution speed on this machine's CPU: our kernels (`genseg_nn::conv`) against
//! candle's own ops, forward alone and forward + backward (input and weight gradients), on
//! the layer shapes of the UNet (base 64, 256 px, batch 4) and the pix2pix generator's
//! up-sampling candidates.
//!
//! `cargo bench --bench conv_ops` (all) or `cargo bench --bench conv_ops -- 3x3`.

use std::time::Duration;

use candle_core::{Device, Tensor, Var};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// (label, input dims, weight dims, padding, stride, transposed)
type Case = (&'static str, [usize; 4], [usize; 4], usize, usize, bool);

const CASES: &[Case] = &[
    (
        "3x3-64to64-256px-b4",
        [4, 64, 256, 256],
        [64, 64, 3, 3],
        1,
        1,
        false,
    ),
    (
        "3x3-3to64-256px-b4",
        [4, 3, 256, 256],
        [64, 3, 3, 3],
        1,
        1,
        false,
    ),
    (
        "3x3-256to256-64px-b4",
        [4, 256, 64, 64],
        [256, 256, 3, 3],
        1,
        1,
        false,
    ),
    (
        "3x3-1024to1024-16px-b4",
        [4, 1024, 16, 16],
        [1024, 1024, 3, 3],
        1,
        1,
        false,
    ),
    (
        "1x1-64to1-256px-b4",
        [4, 64, 256, 256],
        [1, 64, 1, 1],
        0,
        1,
        false,
    ),
    (
        "4x4s2-64to128-128px-b2",
        [2, 64, 128, 128],
        [128, 64, 4, 4],
        1,
        2,
        false,
    ),
    (
        "7x7s2-3to64-256px-b2",
        [2, 3, 256, 256],
        [64, 3, 7, 7],
        3,
        2,
        false,
    ),
    (
        "up2x2s2-128to64-128px-b4",
        [4, 128, 128, 128],
        [128, 64, 2, 2],
        0,
        2,
        true,
    ),
    (
        "up4x4s2-256to64-64px-b2",
        [2, 256, 64, 64],
        [256, 64, 4, 4],
        1,
        2,
        true,
    ),
    (
        "up6x6s2-256to64-64px-b2",
        [2, 256, 64, 64],
        [256, 64, 6, 6],
        2,
        2,
        true,
    ),
    (
        "up8x8s2-256to64-64px-b2",
        [2, 256, 64, 64],
        [256, 64, 8, 8],
        3,
        2,
        true,
    ),
];

fn run(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    transposed: bool,
    ours: bool,
) -> Tensor {
    let y = match (transposed, ours) {
        (false, true) => genseg_nn::conv::conv2d(x, w, padding, stride, 1, 1),
        (false, false) => x.conv2d(w, padding, stride, 1, 1),
        (true, true) => genseg_nn::conv::conv_transpose2d(x, w, padding, 0, stride, 1),
        (true, false) => x.conv_transpose2d(w, padding, 0, stride, 1),
    };
    y.expect("convolution")
}

fn bench_convs(c: &mut Criterion) {
    let device = Device::Cpu;
    for &(label, xd, wd, padding, stride, transposed) in CASES {
        let x =
            Var::from_tensor(&Tensor::randn(0f32, 1.0, &xd, &device).expect("input")).expect("var");
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.05, &wd, &device).expect("weight"))
            .expect("var");
        let y = run(&x, &w, padding, stride, transposed, true);
        // Multiply-adds of one pass: every output element sums over its receptive field
        // (the input elements for a transposed convolution).
        let (out_or_in, taps) = if transposed {
            (x.elem_count(), wd[1] * wd[2] * wd[3])
        } else {
            (y.elem_count(), wd[1] * wd[2] * wd[3])
        };
        let flops = 2 * (out_or_in * taps) as u64;
        let mut group = c.benchmark_group(format!("conv/{label}"));
        group.sample_size(10);
        group.measurement_time(Duration::from_secs(8));
        group.warm_up_time(Duration::from_secs(1));
        for (side, ours) in [("genseg", true), ("candle", false)] {
            group.throughput(Throughput::Elements(flops));
            group.bench_function(format!("{side}/forward"), |b| {
                b.iter(|| run(&x, &w, padding, stride, transposed, ours))
            });
            group.throughput(Throughput::Elements(3 * flops));
            group.bench_function(format!("{side}/forward+backward"), |b| {
                b.iter(|| {
                    let y = run(&x, &w, padding, stride, transposed, ours);
                    y.sum_all().and_then(|s| s.backward()).expect("backward")
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench_convs);
criterion_main!(benches);
