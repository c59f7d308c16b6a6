//! The GPU path: NVRTC compilation ([`mod@compile`]), device access, and [`CudaAdamax`].
//!
//! Nothing here needs CUDA at build time: the driver and NVRTC are loaded when first
//! used, and their absence is an [`Error`](crate::Error), not a panic.
//!
//! Get streams through [`default_stream`] (or [`borrow_stream`] for another stack's),
//! and check for a driver with [`ensure_driver`]: they return errors. The re-exported
//! [`cudarc`] is the same crate underneath, but some of its calls panic when the driver
//! library is missing (`cudarc::driver::CudaContext::new(0)` on a machine without one),
//! so call them only once one of ours has succeeded.

mod args;
pub mod cache;
pub mod compile;
mod control;
#[doc(hidden)]
pub mod cubin;
mod device;
mod entry;
mod launch;
mod layout;
mod libs;
mod module;
#[cfg(feature = "nccl")]
pub mod nccl;
mod optimizer;
mod state;
mod table;

pub use cache::{compile_cached, CacheOutcome};
#[doc(hidden)]
pub use compile::{compile, compile_source};
pub use compile::{nvrtc_version, supported_archs, Arch, Compiled};
pub use cudarc;
pub use device::{borrow_stream, default_stream, device_count, ensure_driver};
#[doc(hidden)]
pub use entry::EntryPoint;
pub use layout::{FlatLayout, FLAT_ALIGN};
pub use optimizer::{CudaAdamax, GpuStorage, RawParam, RawTensor};
