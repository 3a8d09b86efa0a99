//! Searchable cells: [`MixedUpConv`] (the reference's `Cell_upconv`) and [`MixedDownConv`]
//! (`Cell_conv`), and the architecture weights α they read ([`ArchWeights`]).
//!
//! A cell mixes the three [`CANDIDATES`] — (kernel, stride, padding) = (4, 2, 1), (6, 2, 2),
//! (8, 2, 3) — with the softmax of its row of the α table (spec §3):
//! `out = Σ_k softmax(α[row])_k · op_k(x)`, where `op_k` is a transposed convolution in the
//! up cell and a convolution in the down cell. Every candidate has its own kernel (and bias);
//! α is shared by all cells of a table, one row per cell (`layer_index`, innermost = 0).
//!
//! # Fused form
//!
//! The candidates are linear and aligned, so the mixture is itself one 8×8 stride-2
//! (transposed) convolution with padding 3, whose kernel is the α-weighted sum of the three
//! kernels zero-padded to 8×8 and centred, and whose bias is the α-weighted sum of the biases.
//! [`MixedForm::Fused`] computes that single convolution (a third of the work of
//! [`MixedForm::Branches`], which runs the three candidates); both forms hold the same
//! parameters and give the same values and gradients (tested in f64). The fused kernel is
//! built by [`genseg_nn::ops::weighted_centred_sum`], whose graph keeps one partial sum per
//! kernel size instead of every padded and weighted copy (4.3 GB less peak memory for the
//! ngf-64 generator's training step).
//!
//! Alignment. In a stride-2 transposed convolution with padding `p`, input pixel `i` reaches
//! output pixel `o = 2i + j - p` through kernel tap `j ∈ [0, k)`. Every candidate has
//! `p = (k - 2) / 2`, so `o - 2i = j - k/2 + 1` spans `[-k/2 + 1, k/2]`: the footprints share
//! a centre. Tap `j` of a `k × k` kernel therefore lands on tap `j' = j + (8 - k) / 2` of the
//! 8×8 kernel with padding 3, since `j' - 3 = j - p`. The offset is 2 for k = 4, 1 for k = 6
//! and 0 for k = 8 ([`Candidate::fused_offset`]). All candidates give the same output size:
//! `2(H - 1) - 2p + k = 2H`. A strided convolution reads input `2o + j - p`, the same index
//! map read backwards, so the same offsets fuse the down cell (output `⌊(H - 2)/2⌋ + 1`
//! for every candidate, since `2p - k = -2`).

use candle_core::{D, Result, Tensor};
use candle_nn::{Conv2dConfig, ConvTranspose2dConfig, Init, VarBuilder};
use genseg_nn::init::{InitScheme, conv_transpose2d, conv2d};
use serde::{Deserialize, Serialize};

/// One candidate operation of a searchable cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    /// Square kernel side.
    pub kernel: usize,
    /// Stride (2 for every candidate: each cell halves or doubles the resolution).
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
}

impl Candidate {
    /// Where this candidate's kernel sits inside the fused kernel: `(8 - k) / 2` taps from
    /// each border (see the module docs for the derivation).
    pub fn fused_offset(&self) -> usize {
        (FUSED_KERNEL - self.kernel) / 2
    }
}

/// The candidates of the reference (`PRIMITIVES_upconv` / `PRIMITIVES_conv` in
/// `architecture_pix2pix/genotypes.py`), in the order of the α columns.
pub const CANDIDATES: [Candidate; 3] = [
    Candidate {
        kernel: 4,
        stride: 2,
        padding: 1,
    },
    Candidate {
        kernel: 6,
        stride: 2,
        padding: 2,
    },
    Candidate {
        kernel: 8,
        stride: 2,
        padding: 3,
    },
];

/// Kernel side of the fused form (the largest candidate).
pub const FUSED_KERNEL: usize = 8;
/// Padding of the fused form (that of the largest candidate).
pub const FUSED_PADDING: usize = 3;
/// Standard deviation of the α initialisation: `1e-3 · N(0, 1)` as in the reference.
pub const ALPHA_INIT_STD: f64 = 1e-3;

/// How a mixed cell computes its output; both forms hold the same parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MixedForm {
    /// One 8×8 (transposed) convolution with the α-weighted, centre-aligned kernel.
    #[default]
    Fused,
    /// The reference's three candidate (transposed) convolutions, weighted and summed.
    Branches,
}

impl MixedForm {
    /// Kernel taps a cell convolves with per pair of input and output channels: 8·8 fused,
    /// 4·4 + 6·6 + 8·8 as branches (the cost of the form).
    pub fn kernel_taps(self) -> usize {
        match self {
            MixedForm::Fused => FUSED_KERNEL * FUSED_KERNEL,
            MixedForm::Branches => CANDIDATES.iter().map(|c| c.kernel * c.kernel).sum(),
        }
    }
}

/// The architecture weights α: `[rows, 3]` tables of logits, one row per searchable cell,
/// innermost first (the last row is the outermost cell, which paints the output image).
///
/// They are ordinary `Var`s of the parameter store (names `<prefix>.upconv` and
/// `<prefix>.conv`), so checkpoints save them with the weights, while their own name prefix
/// keeps them out of the weight optimizer (see
/// [`crate::generator::Pix2PixGenerator::param_groups`]).
#[derive(Debug, Clone)]
pub struct ArchWeights {
    upconv: Option<Tensor>,
    conv: Option<Tensor>,
}

impl ArchWeights {
    /// Creates (or fetches) the tables with `rows` rows: `upconv` when `searchable_up`,
    /// `conv` when `searchable_down`, each initialised `1e-3 · N(0, 1)` from the store's seed.
    pub fn new(
        rows: usize,
        searchable_up: bool,
        searchable_down: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        if rows == 0 {
            candle_core::bail!("arch weights {}: need at least one row", vb.prefix());
        }
        let init = Init::Randn {
            mean: 0.0,
            stdev: ALPHA_INIT_STD,
        };
        let table = |name: &str| vb.get_with_hints((rows, CANDIDATES.len()), name, init);
        Ok(Self {
            upconv: searchable_up.then(|| table("upconv")).transpose()?,
            conv: searchable_down.then(|| table("conv")).transpose()?,
        })
    }

    /// The up-cell table `[rows, 3]`, if the up-convolutions are searchable.
    pub fn upconv(&self) -> Option<&Tensor> {
        self.upconv.as_ref()
    }

    /// The down-cell table `[rows, 3]`, if the down-convolutions are searchable.
    pub fn conv(&self) -> Option<&Tensor> {
        self.conv.as_ref()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Up,
    Down,
}

/// The shared machinery of both cells.
#[derive(Debug, Clone)]
struct MixedCell {
    direction: Direction,
    in_channels: usize,
    out_channels: usize,
    kernels: Vec<Tensor>,
    biases: Option<Vec<Tensor>>,
    alphas: Tensor,
    layer_index: usize,
    form: MixedForm,
}

impl MixedCell {
    #[allow(clippy::too_many_arguments)]
    fn new(
        direction: Direction,
        in_channels: usize,
        out_channels: usize,
        bias: bool,
        alphas: &Tensor,
        layer_index: usize,
        form: MixedForm,
        init: InitScheme,
        vb: VarBuilder,
    ) -> Result<Self> {
        let (rows, cols) = alphas.dims2().map_err(|_| {
            candle_core::Error::Msg(format!(
                "mixed cell {}: alpha table must be [rows, {}], got shape {:?}",
                vb.prefix(),
                CANDIDATES.len(),
                alphas.dims()
            ))
        })?;
        if cols != CANDIDATES.len() || layer_index >= rows {
            candle_core::bail!(
                "mixed cell {}: alpha table {:?} has no row {layer_index} with {} columns",
                vb.prefix(),
                alphas.dims(),
                CANDIDATES.len()
            );
        }
        // Parameter paths of the reference: Cell._ops (MixedOp) ._ops (ModuleList) .k .op.
        let vb = vb.pp("_ops").pp("_ops");
        let mut kernels = Vec::with_capacity(CANDIDATES.len());
        let mut biases = Vec::with_capacity(CANDIDATES.len());
        for (k, c) in CANDIDATES.iter().enumerate() {
            let vb_k = vb.pp(k.to_string()).pp("op");
            let (weight, b) = match direction {
                Direction::Up => {
                    let cfg = ConvTranspose2dConfig {
                        padding: c.padding,
                        stride: c.stride,
                        ..Default::default()
                    };
                    let layer = conv_transpose2d(
                        in_channels,
                        out_channels,
                        c.kernel,
                        cfg,
                        bias,
                        init,
                        vb_k,
                    )?;
                    (layer.weight().clone(), layer.bias().cloned())
                }
                Direction::Down => {
                    let cfg = Conv2dConfig {
                        padding: c.padding,
                        stride: c.stride,
                        ..Default::default()
                    };
                    let layer = conv2d(in_channels, out_channels, c.kernel, cfg, bias, init, vb_k)?;
                    (layer.weight().clone(), layer.bias().cloned())
                }
            };
            kernels.push(weight);
            if let Some(b) = b {
                biases.push(b);
            }
        }
        Ok(Self {
            direction,
            in_channels,
            out_channels,
            kernels,
            biases: bias.then_some(biases),
            alphas: alphas.clone(),
            layer_index,
            form,
        })
    }

    /// `softmax(α[layer_index])`, shape `[3]`.
    fn mixing_weights(&self) -> Result<Tensor> {
        let row = self.alphas.narrow(0, self.layer_index, 1)?;
        genseg_nn::ops::softmax(&row, D::Minus1)?.reshape(CANDIDATES.len())
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        let (_, c, h, w) = x.dims4().map_err(|_| {
            candle_core::Error::Msg(format!(
                "mixed cell: expected a [N, C, H, W] input, got shape {:?}",
                x.dims()
            ))
        })?;
        if c != self.in_channels {
            candle_core::bail!(
                "mixed cell: input has {c} channels, the cell expects {} (shape {:?})",
                self.in_channels,
                x.dims()
            );
        }
        if self.direction == Direction::Down && (h < 2 || w < 2) {
            candle_core::bail!("mixed down cell: input {h}x{w} is smaller than 2x2");
        }
        Ok(())
    }

    fn convolve(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        padding: usize,
        stride: usize,
    ) -> Result<Tensor> {
        match self.direction {
            Direction::Up => genseg_nn::conv::conv_transpose2d(x, kernel, padding, 0, stride, 1),
            Direction::Down => genseg_nn::conv::conv2d(x, kernel, padding, stride, 1, 1),
        }
    }

    fn forward_with(&self, x: &Tensor, form: MixedForm) -> Result<Tensor> {
        self.check_input(x)?;
        let weights = self.mixing_weights()?.to_dtype(x.dtype())?;
        // [3] -> one [1, 1, 1, 1] factor per candidate, broadcast over maps or kernels.
        let w = |k: usize| weights.narrow(0, k, 1)?.reshape((1, 1, 1, 1));
        let out = match form {
            MixedForm::Branches => {
                let mut acc: Option<Tensor> = None;
                for (k, (c, kernel)) in CANDIDATES.iter().zip(&self.kernels).enumerate() {
                    let y = self
                        .convolve(x, kernel, c.padding, c.stride)?
                        .broadcast_mul(&w(k)?)?;
                    acc = Some(match acc {
                        None => y,
                        Some(a) => (a + y)?,
                    });
                }
                acc.ok_or_else(|| candle_core::Error::Msg("mixed cell: no candidates".into()))?
            }
            MixedForm::Fused => {
                let kernel = self.fused_kernel_with(&weights)?;
                self.convolve(x, &kernel, FUSED_PADDING, CANDIDATES[0].stride)?
            }
        };
        match self.mixed_bias_with(&weights)? {
            // [C_out] -> [1, C_out, 1, 1]
            Some(b) => out.broadcast_add(&b.reshape((1, self.out_channels, 1, 1))?),
            None => Ok(out),
        }
    }

    fn fused_kernel_with(&self, weights: &Tensor) -> Result<Tensor> {
        // CANDIDATES ascend 4, 6, 8, so each kernel centres inside the next.
        let kernels = self
            .kernels
            .iter()
            .map(|k| k.to_dtype(weights.dtype()))
            .collect::<Result<Vec<_>>>()?;
        genseg_nn::ops::weighted_centred_sum(&kernels, weights)
    }

    fn mixed_bias_with(&self, weights: &Tensor) -> Result<Option<Tensor>> {
        let Some(biases) = &self.biases else {
            return Ok(None);
        };
        // [3, C_out] weighted by [3, 1], summed over the candidates.
        let stacked = Tensor::stack(biases, 0)?.to_dtype(weights.dtype())?;
        let mixed = stacked
            .broadcast_mul(&weights.reshape((CANDIDATES.len(), 1))?)?
            .sum(0)?;
        Ok(Some(mixed))
    }
}

macro_rules! mixed_cell_api {
    ($name:ident) => {
        impl $name {
            /// The cell's form (fused or three branches).
            pub fn form(&self) -> MixedForm {
                self.cell.form
            }

            /// The row of the α table this cell reads.
            pub fn layer_index(&self) -> usize {
                self.cell.layer_index
            }

            /// The candidate kernels, in [`CANDIDATES`] order.
            pub fn kernels(&self) -> &[Tensor] {
                &self.cell.kernels
            }

            /// The candidate biases, in [`CANDIDATES`] order (`None` for a bias-free cell).
            pub fn biases(&self) -> Option<&[Tensor]> {
                self.cell.biases.as_deref()
            }

            /// `softmax(α[layer_index])`, shape `[3]`: the weight of each candidate.
            pub fn mixing_weights(&self) -> Result<Tensor> {
                self.cell.mixing_weights()
            }

            /// The fused 8×8 kernel `Σ_k softmax(α)_k · pad(W_k)` (differentiable in α and
            /// every `W_k`).
            pub fn fused_kernel(&self) -> Result<Tensor> {
                self.cell.fused_kernel_with(&self.cell.mixing_weights()?)
            }

            /// The cell's output in its configured form.
            pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
                self.cell.forward_with(x, self.cell.form)
            }

            /// The cell's output in the given form, whatever the configured one.
            pub fn forward_with(&self, x: &Tensor, form: MixedForm) -> Result<Tensor> {
                self.cell.forward_with(x, form)
            }
        }

        impl candle_core::Module for $name {
            fn forward(&self, x: &Tensor) -> Result<Tensor> {
                $name::forward(self, x)
            }
        }
    };
}

/// The searchable up-convolution cell (`Cell_upconv`): `[N, C_in, H, W] -> [N, C_out, 2H, 2W]`.
#[derive(Debug, Clone)]
pub struct MixedUpConv {
    cell: MixedCell,
}

impl MixedUpConv {
    /// A cell with one `ConvTranspose2d(in, out, k, 2, p)` per candidate (named
    /// `_ops._ops.<k>.op.{weight,bias}` as in the reference) that reads row `layer_index` of
    /// `alphas` (`[rows, 3]`, usually [`ArchWeights::upconv`]).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        bias: bool,
        alphas: &Tensor,
        layer_index: usize,
        form: MixedForm,
        init: InitScheme,
        vb: VarBuilder,
    ) -> Result<Self> {
        let cell = MixedCell::new(
            Direction::Up,
            in_channels,
            out_channels,
            bias,
            alphas,
            layer_index,
            form,
            init,
            vb,
        )?;
        Ok(Self { cell })
    }
}

mixed_cell_api!(MixedUpConv);

/// The searchable down-convolution cell (`Cell_conv`): `[N, C_in, H, W] -> [N, C_out, H/2, W/2]`.
#[derive(Debug, Clone)]
pub struct MixedDownConv {
    cell: MixedCell,
}

impl MixedDownConv {
    /// A cell with one `Conv2d(in, out, k, 2, p)` per candidate (named
    /// `_ops._ops.<k>.op.{weight,bias}`) that reads row `layer_index` of `alphas`
    /// (`[rows, 3]`, usually [`ArchWeights::conv`]).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        bias: bool,
        alphas: &Tensor,
        layer_index: usize,
        form: MixedForm,
        init: InitScheme,
        vb: VarBuilder,
    ) -> Result<Self> {
        let cell = MixedCell::new(
            Direction::Down,
            in_channels,
            out_channels,
            bias,
            alphas,
            layer_index,
            form,
            init,
            vb,
        )?;
        Ok(Self { cell })
    }
}

mixed_cell_api!(MixedDownConv);

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use genseg_nn::gradcheck::{GradCheckOptions, check_gradients};
    use genseg_nn::params::ParamStore;
    use genseg_nn::rng::{SeededRng, normal};

    fn vec(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.dims(), b.dims());
        vec(&(a - b).unwrap().abs().unwrap())
            .into_iter()
            .fold(0.0, f64::max)
    }

    /// A cell's forward pass in a chosen form, boxed so both directions share one test.
    type CellForward = Box<dyn Fn(&Tensor, MixedForm) -> Result<Tensor>>;

    /// A store with α drawn large enough that the three candidates get clearly different weights.
    fn cell_store(seed: u64) -> ParamStore {
        let store = ParamStore::new(seed, DType::F64, &Device::Cpu);
        ArchWeights::new(4, true, true, store.var_builder().pp("arch")).unwrap();
        let mut rng = SeededRng::new(seed + 1);
        let big = normal(&mut rng, (4, 3), 0.0, 1.0, DType::F64, &Device::Cpu).unwrap();
        store.get("arch.upconv").unwrap().set(&big).unwrap();
        store.get("arch.conv").unwrap().set(&big).unwrap();
        store
    }

    #[test]
    fn candidate_offsets_and_sizes_agree() {
        assert_eq!(
            CANDIDATES.map(|c| c.fused_offset()),
            [2, 1, 0],
            "(8 - k) / 2"
        );
        for c in CANDIDATES {
            // p = (k - 2) / 2 and j' - 3 = j - p for j' = j + offset.
            assert_eq!(c.padding, (c.kernel - 2) / 2);
            assert_eq!(c.fused_offset() + c.padding, FUSED_PADDING);
        }
    }

    /// The central claim of the fused form: equal values and equal gradients w.r.t. the input,
    /// every kernel, every bias and α, in f64, for both directions.
    #[test]
    fn fused_equals_branches_in_values_and_gradients() -> anyhow::Result<()> {
        for down in [false, true] {
            let store = cell_store(3);
            let alphas = store
                .get(if down { "arch.conv" } else { "arch.upconv" })
                .unwrap();
            let vb = store.var_builder().pp("cell");
            let (h, w) = if down { (6, 8) } else { (3, 4) };
            let fwd: CellForward = if down {
                let cell = MixedDownConv::new(
                    3,
                    2,
                    true,
                    alphas.as_tensor(),
                    2,
                    MixedForm::Fused,
                    InitScheme::Pix2Pix,
                    vb,
                )?;
                Box::new(move |x, f| cell.forward_with(x, f))
            } else {
                let cell = MixedUpConv::new(
                    3,
                    2,
                    true,
                    alphas.as_tensor(),
                    2,
                    MixedForm::Fused,
                    InitScheme::Pix2Pix,
                    vb,
                )?;
                Box::new(move |x, f| cell.forward_with(x, f))
            };
            let mut rng = SeededRng::new(9);
            let x = Var::from_tensor(&normal(
                &mut rng,
                (2, 3, h, w),
                0.0,
                1.0,
                DType::F64,
                &Device::Cpu,
            )?)?;
            // A fixed random projection, so every output element carries its own gradient.
            let mut outs = Vec::new();
            let mut grads = Vec::new();
            for form in [MixedForm::Fused, MixedForm::Branches] {
                let y = fwd(x.as_tensor(), form)?;
                let expected = if down {
                    (2, 2, h / 2, w / 2)
                } else {
                    (2, 2, 2 * h, 2 * w)
                };
                assert_eq!(y.dims4()?, expected);
                let proj = normal(
                    &mut SeededRng::new(11),
                    y.shape(),
                    0.0,
                    1.0,
                    DType::F64,
                    &Device::Cpu,
                )?;
                let loss = (&y * &proj)?.sum_all()?;
                grads.push(loss.backward()?);
                outs.push(y);
            }
            assert!(
                max_abs_diff(&outs[0], &outs[1]) < 1e-12,
                "values differ (down {down})"
            );
            let mut checked = vec![("x".to_string(), x.clone())];
            checked.extend(store.trainable_vars());
            assert_eq!(
                checked.len(),
                1 + 2 + 6,
                "x, two α tables, 3 kernels + 3 biases"
            );
            for (name, var) in &checked {
                let ga = grads[0].get(var.as_tensor());
                let gb = grads[1].get(var.as_tensor());
                let unused_table = name == if down { "arch.upconv" } else { "arch.conv" };
                if unused_table {
                    assert!(ga.is_none() && gb.is_none(), "{name} should be untouched");
                    continue;
                }
                let (ga, gb) = (ga.expect(name), gb.expect(name));
                let scale = vec(&gb.abs()?).into_iter().fold(0.0, f64::max);
                assert!(scale > 0.0, "{name}: zero gradient");
                assert!(
                    max_abs_diff(ga, gb) < 1e-10 * (1.0 + scale),
                    "{name}: fused and branch gradients differ (down {down})"
                );
            }
        }
        Ok(())
    }

    /// The gradients both forms agree on are also right: finite differences on the input,
    /// a kernel, the bias and α (candle's transposed-convolution backward is exercised here).
    #[test]
    fn gradcheck_up_and_down_cells() -> anyhow::Result<()> {
        let mut rng = SeededRng::new(21);
        let dev = Device::Cpu;
        let x = normal(&mut rng, (1, 2, 3, 3), 0.0, 1.0, DType::F64, &dev)?;
        let x_down = normal(&mut rng, (1, 2, 6, 6), 0.0, 1.0, DType::F64, &dev)?;
        let alphas = normal(&mut rng, (2, 3), 0.0, 1.0, DType::F64, &dev)?;
        let k4 = normal(&mut rng, (2, 2, 4, 4), 0.0, 0.5, DType::F64, &dev)?;
        let k6 = normal(&mut rng, (2, 2, 6, 6), 0.0, 0.5, DType::F64, &dev)?;
        let k8 = normal(&mut rng, (2, 2, 8, 8), 0.0, 0.5, DType::F64, &dev)?;
        let b = normal(&mut rng, (3, 2), 0.0, 0.5, DType::F64, &dev)?;
        for (down, input) in [(false, &x), (true, &x_down)] {
            for form in [MixedForm::Fused, MixedForm::Branches] {
                let f = |v: &[Tensor]| -> Result<Tensor> {
                    let cell = MixedCell {
                        direction: if down { Direction::Down } else { Direction::Up },
                        in_channels: 2,
                        out_channels: 2,
                        kernels: vec![v[2].clone(), v[3].clone(), v[4].clone()],
                        biases: Some(vec![v[5].get(0)?, v[5].get(1)?, v[5].get(2)?]),
                        alphas: v[1].clone(),
                        layer_index: 1,
                        form,
                    };
                    let y = cell.forward_with(&v[0], form)?;
                    let proj = Tensor::arange(0.0f64, y.elem_count() as f64, &Device::Cpu)?
                        .reshape(y.shape())?
                        .affine(0.37, 0.0)?
                        .sin()?;
                    (y * proj)?.sum_all()
                };
                check_gradients(
                    f,
                    &[
                        input.clone(),
                        alphas.clone(),
                        k4.clone(),
                        k6.clone(),
                        k8.clone(),
                        b.clone(),
                    ],
                    GradCheckOptions::default(),
                )?
                .ensure(1e-6)?;
            }
        }
        Ok(())
    }

    #[test]
    fn fused_kernel_places_candidates_centred() -> anyhow::Result<()> {
        let store = ParamStore::new(0, DType::F64, &Device::Cpu);
        let arch = ArchWeights::new(1, true, false, store.var_builder().pp("arch"))?;
        // α = (ln 1, ln 2, ln 5): softmax = (0.125, 0.25, 0.625).
        let logits = Tensor::new(&[[0.0f64, 2f64.ln(), 5f64.ln()]], &Device::Cpu)?;
        store.get("arch.upconv").unwrap().set(&logits)?;
        let cell = MixedUpConv::new(
            1,
            1,
            false,
            arch.upconv().unwrap(),
            0,
            MixedForm::Fused,
            InitScheme::Pix2Pix,
            store.var_builder().pp("up"),
        )?;
        let w = vec(&cell.mixing_weights()?);
        for (g, e) in w.iter().zip([0.125, 0.25, 0.625]) {
            assert!((g - e).abs() < 1e-12, "{w:?}");
        }
        // All-ones kernels: the fused kernel is the sum of the weights on each footprint.
        for k in 0..3 {
            let name = format!("up._ops._ops.{k}.op.weight");
            let var = store.get(&name).unwrap();
            var.set(&var.ones_like()?)?;
        }
        let fused = cell.fused_kernel()?.reshape((8, 8))?.to_vec2::<f64>()?;
        for (i, row) in fused.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                let inside = |k: usize| {
                    let o = (8 - k) / 2;
                    (o..o + k).contains(&i) && (o..o + k).contains(&j)
                };
                let want = [(4, 0.125), (6, 0.25), (8, 0.625)]
                    .iter()
                    .filter(|(k, _)| inside(*k))
                    .map(|(_, w)| w)
                    .sum::<f64>();
                assert!(
                    (v - want).abs() < 1e-12,
                    "fused[{i}][{j}] = {v}, want {want}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn alpha_init_is_small_normal_and_seeded() -> anyhow::Result<()> {
        let table = |seed| -> anyhow::Result<Vec<f64>> {
            let store = ParamStore::new(seed, DType::F64, &Device::Cpu);
            let arch = ArchWeights::new(200, true, false, store.var_builder().pp("arch"))?;
            assert!(arch.conv().is_none());
            Ok(vec(arch.upconv().unwrap()))
        };
        let a = table(5)?;
        assert_eq!(a, table(5)?, "same seed, same α");
        assert_ne!(a, table(6)?);
        let n = a.len() as f64;
        let mean = a.iter().sum::<f64>() / n;
        let std = (a.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(mean.abs() < 2e-4, "mean {mean}");
        assert!((std - ALPHA_INIT_STD).abs() < 1e-4, "std {std}");
        Ok(())
    }

    #[test]
    fn bad_tables_and_inputs_are_named_errors() -> anyhow::Result<()> {
        let store = ParamStore::new(0, DType::F32, &Device::Cpu);
        let vb = store.var_builder();
        let table = Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?;
        let err = MixedUpConv::new(
            4,
            2,
            false,
            &table,
            2,
            MixedForm::Fused,
            InitScheme::Pix2Pix,
            vb.pp("a"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("no row 2"), "{err}");
        let flat = Tensor::zeros(3, DType::F32, &Device::Cpu)?;
        assert!(
            MixedUpConv::new(
                4,
                2,
                false,
                &flat,
                0,
                MixedForm::Fused,
                InitScheme::Pix2Pix,
                vb.pp("b")
            )
            .is_err()
        );
        let cell = MixedUpConv::new(
            4,
            2,
            false,
            &table,
            1,
            MixedForm::Fused,
            InitScheme::Pix2Pix,
            vb.pp("c"),
        )?;
        let x = Tensor::zeros((1, 3, 2, 2), DType::F32, &Device::Cpu)?;
        let err = cell.forward(&x).unwrap_err().to_string();
        assert!(
            err.contains("3 channels") && err.contains("expects 4"),
            "{err}"
        );
        assert!(ArchWeights::new(0, true, false, vb.pp("arch")).is_err());
        Ok(())
    }
}
