//! Every kernel of genseg-nn gives the same bits whatever the number of compute threads, so
//! a run's numbers do not depend on the machine's core count or on how many runs share it
//! (`xtask exp -j N` gives each run fewer threads).

use candle_core::{D, DType, Device, Module, Result, Tensor, Var};
use genseg_nn::attention::windowed_attention;
use genseg_nn::conv::{conv_transpose2d, conv2d};
use genseg_nn::ops::{gelu, instance_norm, layer_norm, max_pool2d, softmax};
use genseg_nn::rows::Linear;

/// `len` values in [-1, 1) from a fixed linear congruential sequence.
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn var(dims: &[usize], seed: u64) -> Result<Var> {
    let len = dims.iter().product();
    Var::from_tensor(&Tensor::from_vec(values(len, seed), dims, &Device::Cpu)?)
}

/// The output of `f` on the inputs and the gradients of `sum(r * f(..))` with respect to
/// each, all flattened, computed on a pool of `threads` threads.
fn outputs(
    threads: usize,
    inputs: &[&[usize]],
    f: &(dyn Fn(&[Tensor]) -> Result<Tensor> + Sync),
) -> Vec<Vec<f32>> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a thread pool");
    pool.install(|| -> Result<Vec<Vec<f32>>> {
        let vars = inputs
            .iter()
            .enumerate()
            .map(|(i, dims)| var(dims, i as u64 + 1))
            .collect::<Result<Vec<_>>>()?;
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&tensors)?;
        let r = Tensor::from_vec(values(y.elem_count(), 99), y.dims(), y.device())?;
        let grads = (&y * &r)?.sum_all()?.backward()?;
        let flat = |t: &Tensor| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>();
        let mut out = vec![flat(&y)?];
        for v in &vars {
            let g = grads
                .get(v.as_tensor())
                .ok_or_else(|| candle_core::Error::Msg("an input got no gradient".into()))?;
            out.push(flat(g)?);
        }
        Ok(out)
    })
    .expect("the op runs")
}

/// Asserts that 1, 2 and 5 threads give the same bits for `f`.
fn same_bits(name: &str, inputs: &[&[usize]], f: impl Fn(&[Tensor]) -> Result<Tensor> + Sync) {
    let one = outputs(1, inputs, &f);
    for threads in [2, 5] {
        let many = outputs(threads, inputs, &f);
        for (k, (a, b)) in one.iter().zip(&many).enumerate() {
            let differ = a
                .iter()
                .zip(b)
                .filter(|(x, y)| x.to_bits() != y.to_bits())
                .count();
            assert_eq!(
                differ,
                0,
                "{name}: {differ} of {} values of output {k} differ between 1 and {threads} threads",
                a.len()
            );
        }
    }
}

#[test]
fn convolutions_ignore_the_thread_count() {
    // Batch 4 at 48 px: several tiles per image, so the weight gradient sums many tasks.
    same_bits("conv 3x3", &[&[4, 8, 48, 48], &[16, 8, 3, 3]], |t| {
        conv2d(&t[0], &t[1], 1, 1, 1, 1)
    });
    same_bits(
        "conv 4x4 stride 2",
        &[&[4, 8, 48, 48], &[16, 8, 4, 4]],
        |t| conv2d(&t[0], &t[1], 1, 2, 1, 1),
    );
    same_bits("pointwise conv", &[&[4, 32, 40, 40], &[8, 32, 1, 1]], |t| {
        conv2d(&t[0], &t[1], 0, 1, 1, 1)
    });
    same_bits(
        "conv_transpose 4x4 stride 2",
        &[&[4, 16, 24, 24], &[16, 8, 4, 4]],
        |t| conv_transpose2d(&t[0], &t[1], 1, 0, 2, 1),
    );
    // The shapes where the `gemm` crate changes how it sums (see the weight gradient's
    // blocks): one output channel (a discriminator's last layer), more than 128 output
    // channels, and the 8 x 8 up-convolution of a generator's innermost 2 x 2 plane.
    same_bits(
        "conv to one channel",
        &[&[4, 64, 7, 7], &[1, 64, 4, 4]],
        |t| conv2d(&t[0], &t[1], 1, 1, 1, 1),
    );
    same_bits(
        "conv to 256 channels",
        &[&[2, 128, 8, 8], &[256, 128, 3, 3]],
        |t| conv2d(&t[0], &t[1], 1, 1, 1, 1),
    );
    same_bits(
        "conv_transpose 8x8 on 2 x 2",
        &[&[4, 256, 2, 2], &[256, 128, 8, 8]],
        |t| conv_transpose2d(&t[0], &t[1], 3, 0, 2, 1),
    );
}

#[test]
fn normalisations_and_pooling_ignore_the_thread_count() {
    same_bits("instance norm", &[&[4, 16, 40, 40], &[16], &[16]], |t| {
        instance_norm(&t[0], Some(&t[1]), Some(&t[2]), 1e-5)
    });
    same_bits("max pool", &[&[4, 16, 40, 40]], |t| {
        max_pool2d(&t[0], 3, 2, 1)
    });
}

#[test]
fn transformer_ops_ignore_the_thread_count() {
    // 4096 tokens of 96 features: the row reductions split into many chunks.
    same_bits("linear", &[&[4096, 96], &[48, 96], &[48]], |t| {
        Linear::new(t[1].clone(), Some(t[2].clone())).forward(&t[0])
    });
    same_bits("layer norm", &[&[4096, 96], &[96], &[96]], |t| {
        layer_norm(&t[0], Some(&t[1]), Some(&t[2]), 1e-5)
    });
    same_bits("softmax", &[&[4096, 49]], |t| softmax(&t[0], D::Minus1));
    same_bits("gelu", &[&[4096, 96]], |t| gelu(&t[0]));
    // 64 windows of 7 x 7 tokens, 3 heads of 32.
    same_bits("window attention", &[&[64, 49, 288], &[3, 49, 49]], |t| {
        windowed_attention(&t[0], 3, &t[1], None)
    });
}
