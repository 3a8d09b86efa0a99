//! Our convolutions against candle's ops (values and gradients, f32, over random shapes)
//! and against central finite differences (f64, on the shapes the models use).

use candle_core::{DType, Device, Result, Tensor, Var};
use proptest::prelude::*;

use super::{conv_transpose2d, conv2d};
use crate::gradcheck::{GradCheckOptions, check_gradients};
use crate::ops::test_inputs::{uniform, weighted_sum};

/// A convolution's settings: (padding, stride, dilation, output padding).
type Settings = (usize, usize, usize, usize);

fn apply(
    x: &Tensor,
    w: &Tensor,
    (p, s, d, op): Settings,
    transposed: bool,
    ours: bool,
) -> Result<Tensor> {
    match (transposed, ours) {
        (false, true) => conv2d(x, w, p, s, d, 1),
        (false, false) => x.conv2d(w, p, s, d, 1),
        (true, true) => conv_transpose2d(x, w, p, op, s, d),
        (true, false) => x.conv_transpose2d(w, p, op, s, d),
    }
}

/// The output and the gradients of `sum(r * conv(x, w))` with respect to x and w.
fn value_and_grads(
    x: &Tensor,
    w: &Tensor,
    settings: Settings,
    transposed: bool,
    ours: bool,
) -> Result<[Vec<f32>; 3]> {
    let (xv, wv) = (Var::from_tensor(x)?, Var::from_tensor(w)?);
    let y = apply(xv.as_tensor(), wv.as_tensor(), settings, transposed, ours)?;
    let grads = weighted_sum(&y, 7)?.backward()?;
    let flat = |t: &Tensor| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>();
    let missing = || candle_core::Error::Msg("no gradient".into());
    Ok([
        flat(&y)?,
        flat(grads.get(xv.as_tensor()).ok_or_else(missing)?)?,
        flat(grads.get(wv.as_tensor()).ok_or_else(missing)?)?,
    ])
}

/// Largest |a - b| / (1 + max |b|) over the three tensors; f32 sums of up to a few hundred
/// terms of order one stay well under 1e-5.
fn max_error(ours: &[Vec<f32>; 3], theirs: &[Vec<f32>; 3]) -> f32 {
    ours.iter()
        .zip(theirs)
        .map(|(a, b)| {
            assert_eq!(a.len(), b.len());
            let scale = 1.0 + b.iter().fold(0f32, |m, v| m.max(v.abs()));
            a.iter()
                .zip(b)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
        })
        .fold(0.0, f32::max)
}

/// The largest relative error of our output and gradients against candle's. Where
/// candle's own backward fails (its conv2d gradient has the wrong shape when the stride
/// leaves input rows unread), the output is compared with candle's and the gradients are
/// checked against finite differences instead (also where it panics).
fn compare_with_candle(
    xd: [usize; 4],
    wd: [usize; 4],
    settings: Settings,
    transposed: bool,
) -> anyhow::Result<f32> {
    let x = uniform(1, &xd, 1.0)?.to_dtype(DType::F32)?;
    let w = uniform(2, &wd, 0.5)?.to_dtype(DType::F32)?;
    let ours = value_and_grads(&x, &w, settings, transposed, true)?;
    // candle's backward errors on some of these shapes and panics (capacity overflow) on
    // others; either way it gives no reference.
    let theirs = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        value_and_grads(&x, &w, settings, transposed, false)
    }));
    match theirs {
        Ok(Ok(theirs)) => Ok(max_error(&ours, &theirs)),
        _ => {
            let y = apply(&x, &w, settings, transposed, false)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            finite_differences(xd, wd, settings, transposed, 0)?;
            Ok(max_error(
                &[ours[0].clone(), vec![], vec![]],
                &[y, vec![], vec![]],
            ))
        }
    }
}

/// Our gradients against central finite differences in f64.
fn finite_differences(
    xd: [usize; 4],
    wd: [usize; 4],
    settings: Settings,
    transposed: bool,
    seed: u64,
) -> anyhow::Result<()> {
    let inputs = [uniform(10 + seed, &xd, 1.0)?, uniform(40 + seed, &wd, 0.5)?];
    check_gradients(
        |v| weighted_sum(&apply(&v[0], &v[1], settings, transposed, true)?, 3),
        &inputs,
        GradCheckOptions::default(),
    )?
    .ensure(1e-6)
    .map_err(|e| anyhow::anyhow!("{xd:?} {wd:?} {settings:?} transposed {transposed}: {e}"))
}

const TOLERANCE: f32 = 1e-5;

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn conv2d_matches_candle(
        batch in 1usize..=3, c_in in 1usize..=4, c_out in 1usize..=4,
        h in 1usize..=13, w in 1usize..=13, k in 1usize..=5,
        stride in 1usize..=3, padding in 0usize..=3, dilation in 1usize..=2,
    ) {
        // Only shapes where the kernel fits the padded input.
        prop_assume!(h + 2 * padding > dilation * (k - 1) && w + 2 * padding > dilation * (k - 1));
        let err = compare_with_candle([batch, c_in, h, w], [c_out, c_in, k, k], (padding, stride, dilation, 0), false).unwrap();
        prop_assert!(err <= TOLERANCE, "error {err}");
    }

    #[test]
    fn conv_transpose2d_matches_candle(
        batch in 1usize..=3, c_in in 1usize..=4, c_out in 1usize..=4,
        h in 1usize..=9, w in 1usize..=9, k in 1usize..=6,
        stride in 1usize..=3, padding in 0usize..=3, output_padding in 0usize..=2,
    ) {
        prop_assume!(output_padding < stride);
        prop_assume!((h - 1) * stride + k + output_padding > 2 * padding && (w - 1) * stride + k + output_padding > 2 * padding);
        let err = compare_with_candle([batch, c_in, h, w], [c_in, c_out, k, k], (padding, stride, 1, output_padding), true).unwrap();
        prop_assert!(err <= TOLERANCE, "error {err}");
    }
}

/// The layer shapes the models use, checked element by element against central finite
/// differences in f64: (input, weight, settings, transposed).
const MODEL_SHAPES: &[([usize; 4], [usize; 4], Settings, bool)] = &[
    ([2, 3, 7, 9], [4, 3, 3, 3], (1, 1, 1, 0), false), // UNet 3x3, odd size
    ([1, 1, 8, 8], [3, 1, 3, 3], (1, 1, 1, 0), false), // batch 1, one channel
    ([2, 4, 5, 6], [1, 4, 1, 1], (0, 1, 1, 0), false), // UNet output 1x1
    ([1, 3, 10, 8], [4, 3, 4, 4], (1, 2, 1, 0), false), // pix2pix down 4x4 s2
    ([1, 3, 13, 11], [2, 3, 7, 7], (3, 2, 1, 0), false), // 7x7 s2 stem
    ([2, 3, 9, 9], [2, 3, 3, 3], (2, 1, 2, 0), false), // dilation 2
    ([2, 4, 3, 5], [4, 2, 2, 2], (0, 2, 1, 0), true),  // UNet up 2x2 s2
    ([1, 3, 4, 3], [3, 2, 4, 4], (1, 2, 1, 0), true),  // MixedUp 4x4 s2 p1
    ([1, 3, 4, 4], [3, 2, 6, 6], (2, 2, 1, 0), true),  // MixedUp 6x6 s2 p2
    ([1, 1, 3, 4], [1, 3, 8, 8], (3, 2, 1, 0), true),  // MixedUp 8x8 s2 p3
    ([1, 2, 3, 3], [2, 2, 3, 3], (1, 2, 1, 1), true),  // output padding
];

#[test]
fn gradients_match_finite_differences() -> anyhow::Result<()> {
    for (n, &(xd, wd, settings, transposed)) in MODEL_SHAPES.iter().enumerate() {
        finite_differences(xd, wd, settings, transposed, n as u64)?;
    }
    Ok(())
}

#[test]
fn model_shapes_match_candle() -> anyhow::Result<()> {
    for &(xd, wd, settings, transposed) in MODEL_SHAPES {
        let err = compare_with_candle(xd, wd, settings, transposed)?;
        assert!(err <= TOLERANCE, "{xd:?} {wd:?} {settings:?}: error {err}");
    }
    Ok(())
}

#[test]
fn grouped_convolutions_fall_back_to_candle() -> Result<()> {
    let x = uniform(5, &[2, 4, 6, 6], 1.0)?.to_dtype(DType::F32)?;
    let w = uniform(6, &[4, 2, 3, 3], 0.5)?.to_dtype(DType::F32)?;
    let ours = conv2d(&x, &w, 1, 1, 1, 2)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let theirs = x.conv2d(&w, 1, 1, 1, 2)?.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(ours, theirs);
    Ok(())
}

#[test]
fn layers_add_their_bias() -> Result<()> {
    let device = Device::Cpu;
    let x = uniform(8, &[1, 2, 5, 5], 1.0)?.to_dtype(DType::F32)?;
    let w = uniform(9, &[3, 2, 3, 3], 0.5)?.to_dtype(DType::F32)?;
    let b = Tensor::new(&[1f32, -2.0, 0.5], &device)?;
    let cfg = super::Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let layer = super::Conv2d::new(w.clone(), Some(b.clone()), cfg);
    let want = x
        .conv2d(&w, 1, 1, 1, 1)?
        .broadcast_add(&b.reshape((1, 3, 1, 1))?)?;
    let got = candle_core::Module::forward(&layer, &x)?;
    let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff < 1e-5, "{diff}");
    Ok(())
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let x = Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::zeros((4, 2, 3, 3), DType::F32, &Device::Cpu).unwrap();
    let e = conv2d(&x, &w, 1, 1, 1, 1).unwrap_err().to_string();
    assert!(e.contains("3 channels"), "{e}");
    let flat = Tensor::zeros((3, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let e = conv2d(&flat, &w, 1, 1, 1, 1).unwrap_err().to_string();
    assert!(e.contains("must be 4-d"), "{e}");
}
