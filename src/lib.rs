//! # adamax-cuda
//!
//! The AdaMax optimizer (Kingma & Ba 2015, sec. 7.1) as a fused CUDA step, compiled at
//! run time by NVRTC, for f32 parameters and for f16/bf16 parameters with f32 master
//! weights, plus a CPU reference that is the crate's specification.
//!
//! ```
//! use adamax_cuda::{cpu::CpuAdamax, AdamaxConfig, Optimizer};
//!
//! let (mut w, mut b) = (vec![0.5f32; 6], vec![0.0f32; 3]);
//! let (gw, gb) = (vec![0.1f32; 6], vec![-0.2f32; 3]); // from your backward pass
//! // PyTorch's torch.optim.Adamax defaults; the same calls work on cuda::CudaAdamax.
//! let mut opt = CpuAdamax::new(AdamaxConfig::default(), &[&w, &b])?;
//! opt.step(&mut [&mut w, &mut b], &[&gw, &gb])?;
//! assert!(w[0] < 0.5 && b[0] > 0.0);
//! # Ok::<(), adamax_cuda::Error>(())
//! ```
//!
//! ## How do I
//!
//! - **step on the GPU**: [`cuda::CudaAdamax::new`] with cudarc buffers and a stream from
//!   [`cuda::default_stream`] (example on [`cuda::CudaAdamax`]); it needs an NVIDIA
//!   driver and NVRTC at run time, not at build time.
//! - **train bf16 (or f16) parameters with f32 master weights**: `CudaAdamax::<bf16>`
//!   (or `CpuAdamax::<bf16>`) with the default [`Precision`] ([`ParamMode::Master`]); the
//!   optimizer keeps the masters and writes their rounding to your parameters.
//! - **clip gradients, skip overflowing steps, scale the loss**: settings kept between
//!   steps, [`Optimizer::set_options`] with [`StepOptions`] and
//!   [`Optimizer::set_loss_scaler`] with a [`LossScaler`]; [`Optimizer::last_report`]
//!   says what a step did. There is no `zero_grad`: a step only reads your gradients.
//! - **give biases no weight decay** (parameter groups): [`Optimizer::set_tensor_hyper`]
//!   with [`TensorHyper::no_decay`], by tensor index.
//! - **follow a learning-rate schedule**: [`Optimizer::set_lr`] between steps.
//! - **checkpoint and resume**: [`Optimizer::save_checkpoint`], then [`Checkpoint::load`]
//!   and [`Optimizer::restore`]. The parameters are not in a checkpoint: save them with
//!   your model, or, for 16-bit parameters with masters, rebuild them with
//!   [`Checkpoint::params`].
//! - **step many tensors in one flat buffer**: [`cuda::FlatLayout`] and
//!   [`cuda::CudaAdamax::new_flat`].
//! - **use it with candle**: the `adamax-cuda-candle` crate (`integrations/` in the
//!   repository) is a `candle_nn::Optimizer` that steps every `Var` in one launch on
//!   candle's stream, through [`cuda::CudaAdamax::new_raw`] and
//!   [`cuda::CudaAdamax::step_some_raw`] (candle hands out read access to its buffers
//!   only, so their addresses go to the raw entry points).
//! - **see a whole training program**: `examples/newcomer.rs` (CPU: an MLP with parameter
//!   groups, clipping, a schedule and a checkpoint resumed bit for bit); the README
//!   covers installation and the CUDA version features.
//!
//! ## The rule
//!
//! Step `t = 1, 2, ...` of each element:
//!
//! ```text
//! m = beta1 * m + (1 - beta1) * g
//! u = max(beta2 * u, |g| + eps)          (PyTorch / optax; or |g| with m / (u + eps): Keras)
//! theta -= lr / (1 - beta1^t) * m / u
//! ```
//!
//! with coupled (L2) or decoupled weight decay and `maximize`; see [`AdamaxConfig`] for
//! the conventions and [`spec`] for the exact arithmetic, which is the crate's spec.
//!
//! ## What is in it
//!
//! - [`Optimizer`]: the trait both optimizers implement with the same signatures.
//! - [`cuda::CudaAdamax`]: the GPU optimizer. A step of a whole list of tensors is one
//!   kernel launch, which also counts the step on the device; with clipping or the
//!   overflow check (and always in a step captured in a CUDA graph, so that settings
//!   changed after the capture act on replay), a reduction and a one-block decision pass
//!   run before it. Tensors
//!   may also live in one flat buffer ([`cuda::FlatLayout`]), so that a step's host
//!   work does not grow with their number.
//! - [`cpu::CpuAdamax`]: the spec applied on the host: the reference the GPU is compared
//!   with, usable as a CPU fallback.
//! - [`AdamaxConfig`]: hyperparameters; [`Default`] is PyTorch's `torch.optim.Adamax`.
//! - [`Precision`]: storage modes that move fewer bytes: bf16 parameters rounded
//!   stochastically without a master ([`ParamMode::Stochastic`]) and 8-bit blockwise
//!   moments ([`StateFormat::Blockwise8`]), specified in [`spec::lowbit`]. They matched
//!   the CPU reference bit for bit on an NVIDIA H200 (2026-11-27), the 8-bit ones then
//!   no faster than f32 state; the 8-bit state of today (v2: `m` as its ratio to the
//!   step's denominator, under half the instructions) and the random stream of one
//!   hash per 8 elements (every stochastic rounding) have run only in the host emulation,
//!   and two sm_80 instructions in none: the rule's `max.NaN.f32` (every update) and
//!   the paired narrowing of 16-bit parameters with a master (BENCHMARKS.md).
//! - [`Checkpoint`]: the optimizer's state (not the parameters) as a checksummed
//!   safetensors file with PyTorch's names.
//!
//! **Exactness.** The kernel is written to give the CPU reference's f32 results bit for
//! bit (same operations, same order, no contraction; see [`spec`]). Where that was
//! verified: on an NVIDIA H200 (2026-11-27, commit 3e05135 and the 8-bit kernel of
//! 56209e8) for every storage mode across every configuration in `tests/gpu.rs` (120
//! tests: clipping, the loss scaler, graphs, flat buffers, missing gradients), after a
//! first run on an H100 (2026-11-24, commit 6b9d566) whose loss-scaler failure is fixed
//! since (BENCHMARKS.md keeps the record); every kernel change since then has been
//! checked in the host emulation only (`tests/kernel_host.rs`). The CPU reference
//! itself replays PyTorch, optax and Keras trajectories within their own f32 spread.
//!
//! Nothing CUDA is needed to build: the driver and NVRTC are loaded at run time, and
//! their absence is an [`Error`], not a panic.
//!
//! **Layout**, lowest floor first (`tests/layers.rs` checks that no module imports one
//! above it): the configuration and storage types; [`spec`], the rule and the low-bit
//! codec; the state of a tensor, its parts and the table of storage modes
//! (`src/state`); [`fused`], the training-loop features and their reduction order;
//! [`checkpoint`], the file format; the [`Optimizer`] trait; [`cpu`]; and [`cuda`], the
//! GPU path, one job per module (NVRTC, cache, driver, device memory, control block,
//! tensor table, launches, the optimizer). `kernels/adamax.cu` is CUDA only; its struct
//! layouts and entry-point names come from `src/cuda/args.rs` and the modes table.

#![deny(missing_docs)]
// Examples that warn (an unused import, say) fail `cargo test --doc`, the README's too.
#![doc(test(attr(deny(warnings))))]

/// The README's Rust blocks, compiled (and the CPU ones run) by `cargo test --doc`.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub mod checkpoint;
mod config;
pub mod cpu;
pub mod cuda;
mod error;
mod fnv;
mod fsutil;
pub mod fused;
mod optimizer;
pub mod shard;
pub mod spec;
mod state;
mod storage;

pub use checkpoint::{Checkpoint, ShardCheckpoint};
pub use config::{
    AdamaxConfig, EpsilonMode, ParamMode, Precision, StateFormat, TensorHyper, WeightDecayMode,
    DEFAULT_MIN_8BIT_LEN,
};
pub use error::{ConfigError, Error, Result};
pub use fused::{LossScaler, StepOptions, StepReport};
pub use half::{bf16, f16};
pub use optimizer::Optimizer;
pub use state::TensorState;
pub use storage::{Storage, StorageType};

/// A `tracing` event when the feature is on; nothing otherwise.
macro_rules! trace {
    ($level:ident, $($arg:tt)*) => {{
        #[cfg(feature = "tracing")]
        {
            tracing::$level!(target: "adamax_cuda", $($arg)*);
        }
    }};
}
pub(crate) use trace;

/// CUDA sources embedded by build.rs.
mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}
