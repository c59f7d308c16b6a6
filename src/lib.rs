//! # adamax-cuda
//!
//! The AdaMax optimizer (Kingma & Ba 2015, sec. 7.1) as one fused CUDA kernel, compiled
//! at run time by NVRTC, for f32 parameters and for f16/bf16 parameters with f32 master
//! weights, plus a CPU reference that the GPU matches bit for bit on f32.
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
//! the conventions and [`cpu`] for the exact arithmetic, which is the crate's spec.
//!
//! - [`cuda::CudaAdamax`]: the GPU optimizer, one launch per step for a whole list of
//!   tensors.
//! - [`cpu::CpuAdamax`]: the reference, usable as a CPU fallback.
//! - [`AdamaxConfig`]: hyperparameters; [`Default`] is PyTorch's `torch.optim.Adamax`.
//!
//! Nothing CUDA is needed to build: the driver and NVRTC are loaded at run time, and
//! their absence is an [`Error`], not a panic.

#![deny(missing_docs)]

pub mod checkpoint;
mod config;
pub mod cpu;
pub mod cuda;
mod error;
mod fnv;
mod fsutil;
pub mod fused;
mod storage;

pub use checkpoint::Checkpoint;
pub use config::{AdamaxConfig, EpsilonMode, TensorHyper, WeightDecayMode};
pub use error::{ConfigError, Error, Result};
pub use fused::{LossScaler, StepOptions, StepReport};
pub use half::{bf16, f16};
pub use storage::Storage;

/// CUDA sources embedded by build.rs.
mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}
