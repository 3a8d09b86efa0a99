//! Convolutions that train fast on a CPU: `conv2d` and `conv_transpose2d` as candle custom
//! ops with our own forward and backward kernels (`kernels.rs`), used by every model here.
//!
//! On other devices, other dtypes (f16, bf16) or grouped convolutions the functions defer
//! to candle's own ops (cuDNN on CUDA), so a model written against this module runs
//! everywhere. Values and gradients equal candle's to float rounding (tests below and in
//! `tests/conv_ops.rs`).

mod geometry;
pub(crate) mod kernels;

use candle_core::{CustomOp2, Layout, Module, Result, Shape, Tensor, bail};
pub use candle_nn::{Conv2dConfig, ConvTranspose2dConfig};

use crate::storage::{Element, Kernel, kernel_cpu_fwd, on_cpu_kernels};
use geometry::ConvGeometry;
pub(crate) use kernels::Real;

/// Which of the three passes of one convolution a custom op computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// `(x, w) -> y`
    Forward,
    /// `(dy, w) -> dx`, also the transposed convolution's forward pass.
    InputGradient,
    /// `(x, dy) -> dw`
    WeightGradient,
}

/// One pass of the convolution `geometry`, with the candle graph hooks: the forward and
/// input-gradient passes are each other's adjoints, so their backward passes are each
/// other plus a weight gradient.
#[derive(Debug, Clone, Copy)]
struct ConvOp {
    geometry: ConvGeometry,
    pass: Pass,
}

impl Kernel<2> for ConvOp {
    fn run<T: Element>(&self, [a, b]: [&[T]; 2], _: [&Layout; 2]) -> Result<Vec<T>> {
        let g = &self.geometry;
        Ok(match self.pass {
            Pass::Forward => kernels::forward(g, a, b),
            Pass::InputGradient => kernels::input_gradient(g, a, b),
            Pass::WeightGradient => kernels::weight_gradient(g, a, b),
        })
    }
}

impl ConvOp {
    fn output_dims(&self) -> [usize; 4] {
        let g = &self.geometry;
        match self.pass {
            Pass::Forward => g.output_dims(),
            Pass::InputGradient => g.input_dims(),
            Pass::WeightGradient => g.weight_dims(),
        }
    }

    fn with(self, pass: Pass) -> Self {
        Self { pass, ..self }
    }
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        match self.pass {
            Pass::Forward => "genseg-conv2d",
            Pass::InputGradient => "genseg-conv2d-input-gradient",
            Pass::WeightGradient => "genseg-conv2d-weight-gradient",
        }
    }

    kernel_cpu_fwd!(|self, _l1, _l2| Shape::from(self.output_dims().to_vec()));

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        // Only the gradients candle will use: an input that is data (no graph behind it,
        // like a batch of images) or a frozen weight needs none.
        let needed = |t: &Tensor, pass: Pass, x: &Tensor, y: &Tensor| -> Result<Option<Tensor>> {
            if t.track_op() {
                Ok(Some(x.apply_op2_no_bwd(y, &self.with(pass))?))
            } else {
                Ok(None)
            }
        };
        match self.pass {
            // (x, w) -> y: dx = adjoint(dy, w), dw = weight_gradient(x, dy)
            Pass::Forward => Ok((
                needed(a, Pass::InputGradient, &grad, b)?,
                needed(b, Pass::WeightGradient, a, &grad)?,
            )),
            // (dy, w) -> dx (transposed conv of dy): d(dy) = forward(d(dx), w),
            // dw = weight_gradient(d(dx), dy)
            Pass::InputGradient => Ok((
                needed(a, Pass::Forward, &grad, b)?,
                needed(b, Pass::WeightGradient, &grad, a)?,
            )),
            Pass::WeightGradient => bail!("{}: no second-order gradient", self.name()),
        }
    }
}

fn dims4(t: &Tensor, op: &str, what: &str) -> Result<(usize, usize, usize, usize)> {
    t.dims4().map_err(|_| {
        candle_core::Error::Msg(format!(
            "{op}: {what} must be 4-d, got shape {:?}",
            t.dims()
        ))
    })
}

/// `conv2d` with candle's signature (`x: [batch, c_in, h, w]`, `w: [c_out, c_in / groups,
/// kh, kw]`), on our kernels on the CPU.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
) -> Result<Tensor> {
    if groups != 1 || !on_cpu_kernels(&[x, w]) {
        return x.conv2d(w, padding, stride, dilation, groups);
    }
    let geometry = ConvGeometry::forward(
        dims4(x, "conv2d", "input")?,
        dims4(w, "conv2d", "weight")?,
        padding,
        stride,
        dilation,
    )?;
    let op = ConvOp {
        geometry,
        pass: Pass::Forward,
    };
    x.contiguous()?.apply_op2(&w.contiguous()?, op)
}

/// `conv_transpose2d` with candle's signature (`x: [batch, c_in, h, w]`, `w: [c_in,
/// c_out, kh, kw]`), on our kernels on the CPU.
pub fn conv_transpose2d(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    output_padding: usize,
    stride: usize,
    dilation: usize,
) -> Result<Tensor> {
    if !on_cpu_kernels(&[x, w]) {
        return x.conv_transpose2d(w, padding, output_padding, stride, dilation);
    }
    let geometry = ConvGeometry::transposed(
        dims4(x, "conv_transpose2d", "input")?,
        dims4(w, "conv_transpose2d", "weight")?,
        padding,
        output_padding,
        stride,
        dilation,
    )?;
    let op = ConvOp {
        geometry,
        pass: Pass::InputGradient,
    };
    x.contiguous()?.apply_op2(&w.contiguous()?, op)
}

fn add_bias(y: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match bias {
        None => Ok(y),
        Some(b) => crate::channels::add_channel_bias(&y, b),
    }
}

/// A 2-d convolution layer (weight `[c_out, c_in / groups, kh, kw]`, optional bias
/// `[c_out]`), the drop-in for `candle_nn::Conv2d` that runs on [`conv2d`].
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    config: Conv2dConfig,
}

impl Conv2d {
    /// The layer of `weight`, `bias` and `config` (tensors are used as they are).
    pub fn new(weight: Tensor, bias: Option<Tensor>, config: Conv2dConfig) -> Self {
        Self {
            weight,
            bias,
            config,
        }
    }

    /// The kernel.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Padding, stride, dilation (and output padding, groups).
    pub fn config(&self) -> &Conv2dConfig {
        &self.config
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let y = conv2d(x, &self.weight, c.padding, c.stride, c.dilation, c.groups)?;
        add_bias(y, self.bias.as_ref())
    }
}

/// A 2-d transposed convolution layer (weight `[c_in, c_out, kh, kw]`, optional bias
/// `[c_out]`), the drop-in for `candle_nn::ConvTranspose2d` that runs on
/// [`conv_transpose2d`].
#[derive(Debug, Clone)]
pub struct ConvTranspose2d {
    weight: Tensor,
    bias: Option<Tensor>,
    config: ConvTranspose2dConfig,
}

impl ConvTranspose2d {
    /// The layer of `weight`, `bias` and `config` (tensors are used as they are).
    pub fn new(weight: Tensor, bias: Option<Tensor>, config: ConvTranspose2dConfig) -> Self {
        Self {
            weight,
            bias,
            config,
        }
    }

    /// The kernel.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Padding, stride, dilation (and output padding, groups).
    pub fn config(&self) -> &ConvTranspose2dConfig {
        &self.config
    }
}

impl Module for ConvTranspose2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let y = conv_transpose2d(
            x,
            &self.weight,
            c.padding,
            c.output_padding,
            c.stride,
            c.dilation,
        )?;
        add_bias(y, self.bias.as_ref())
    }
}

#[cfg(test)]
mod tests;
