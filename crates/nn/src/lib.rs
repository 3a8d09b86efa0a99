//! # genseg-nn: candle building blocks that are correct by test
//!
//! candle 0.11 has traps that silently break training (ops that return no
//! gradient, a BCE that overflows, an RNG that cannot be seeded, detached
//! tensors that share storage with their Var). This crate gives GenSeg's
//! models the pieces they need, each checked against finite differences or
//! hand-derived values:
//!
//! - [`params::ParamStore`]: a deterministic, seeded parameter store that
//!   plugs into `candle_nn::VarBuilder`; every parameter's initial value is a
//!   function of (seed, name, shape, init), and parameters are kept in sorted
//!   order so optimizer state and checkpoints are reproducible.
//! - [`init`]: PyTorch-default and pix2pix initialisers and the layer
//!   constructors that use them ([`init::conv2d`], [`init::conv_transpose2d`],
//!   [`init::linear`]).
//! - [`batch_norm::BatchNorm2d`]: train/eval modes with PyTorch's running
//!   statistics (stored as buffers in the ParamStore).
//! - [`conv`]: `conv2d` / `conv_transpose2d` on our own GEMM kernels, several times
//!   faster than candle's on a CPU, and the layers built on them.
//! - [`ops`]: stable BCE-with-logits, softmax and LayerNorm with gradients,
//!   bilinear resize and max-pool with backward, reflection padding, and the
//!   weighted sum of centred kernels that fuses a searchable cell.
//! - [`channels`]: the per-channel bias of a convolution, with a fast gradient.
//! - [`attention`]: multi-head attention within windows (bias and mask added to the
//!   scores) as one op with a recomputing backward.
//! - [`rows`]: per-token ops over the last dimension on the CPU (a linear layer's bias,
//!   LayerNorm, softmax) with one-pass kernels forward and backward.
//! - [`optim`]: Adam (coupled L2) / AdamW, RMSprop, SGD with PyTorch semantics
//!   and state that saves to safetensors and resumes bit-identically.
//! - [`checkpoint`]: atomic checkpoint folders (weights, optimizer states, step,
//!   RNG states, config), never half-written.
//! - [`rng`]: the seeded ChaCha8 generator used for init and dropout.
//! - [`snapshot::Snapshot`]: bit-exact capture and restore of vars, and
//!   [`params::ParamStore::without_buffer_updates`], a train-mode pass that leaves the
//!   BatchNorm running statistics as they were.
//! - [`gradcheck`]: the central-finite-difference checker every crate's tests
//!   use, and the guard that every parameter receives a gradient.
//! - [`device`]: `cpu` / `cuda:N` selection.
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::Conv2dConfig;
//! use genseg_nn::init::{InitScheme, conv2d};
//! use genseg_nn::optim::{Adam, AdamConfig, Optimizer};
//! use genseg_nn::params::ParamStore;
//!
//! let store = ParamStore::new(0, DType::F32, &Device::Cpu);
//! let conv = conv2d(1, 4, 3, Conv2dConfig::default(), true, InitScheme::TorchDefault, store.var_builder().pp("conv"))?;
//! let mut opt = Adam::new(store.trainable_vars(), AdamConfig::default())?;
//! let x = Tensor::ones((2, 1, 8, 8), DType::F32, &Device::Cpu)?;
//! let loss = genseg_nn::ops::bce_with_logits(&conv.forward(&x)?, &Tensor::zeros((2, 4, 6, 6), DType::F32, &Device::Cpu)?)?;
//! opt.step(&loss.backward()?)?;
//! assert_eq!(opt.step_count(), 1);
//! # Ok::<(), anyhow::Error>(())
//! ```

#![warn(missing_docs)]

pub mod attention;
pub mod batch_norm;
pub mod channels;
pub mod checkpoint;
pub mod conv;
pub mod device;
pub mod gradcheck;
pub mod init;
pub mod ops;
pub mod optim;
pub mod params;
pub mod rng;
pub mod rows;
pub mod snapshot;
mod storage;
