//! The kernel's argument layout, mirrored in `kernels/adamax.cu`. The kernel is compiled
//! with the sizes below passed as `-D` defines and `static_assert`s them against its own
//! structs, so a field added on one side only fails the compile instead of corrupting
//! memory; the asserts here pin the Rust side.

use cudarc::driver::{DeviceRepr, ValidAsZeroBits};

use crate::{
    config::{EpsilonMode, WeightDecayMode},
    cpu::StepScalars,
};

/// Elements per chunk: the unit of work a block takes from the tensor list. A multiple
/// of 8 so that every chunk of every storage type starts on a 16-byte boundary.
pub(crate) const CHUNK: u64 = 8192;
/// Threads per block (the kernel's `__launch_bounds__`).
pub(crate) const BLOCK: u32 = 256;

/// One tensor of a launch (`TensorDesc` in the kernel).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct TensorDesc {
    pub param: u64,
    pub grad: u64,
    pub exp_avg: u64,
    pub exp_inf: u64,
    pub master: u64,
    pub len: u64,
    pub chunk_begin: u64,
    pub lr_scale: f64,
    pub weight_decay: f64,
}

/// The launch's arguments (`AdamaxArgs` in the kernel), passed by value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct AdamaxArgs {
    pub tensors: u64,
    pub num_tensors: u64,
    pub num_chunks: u64,
    pub control: u64,
    pub partials: u64,
    pub beta1: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub eps_mode: u32,
    pub decay_mode: u32,
    pub maximize: u32,
    pub reserved: u32,
}

/// Arguments of the master-weight initialisation (`InitArgs` in the kernel).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct InitArgs {
    pub param: u64,
    pub master: u64,
    pub len: u64,
}

/// The optimizer state that lives on the device (`Control` in the kernel): what makes a
/// step independent of host values, so it can be captured in a CUDA graph.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Control {
    pub lr: f64,
    pub beta1: f64,
    pub bias_correction: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub step: u64,
    pub inv_scale: f32,
    pub max_norm: f32,
    pub clip_coef: f32,
    pub total_norm: f32,
    pub scale: f32,
    pub growth_tracker: u32,
    pub growth_interval: u32,
    pub flags: u32,
    pub found_inf: u32,
    pub skipped: u32,
}

/// `Control::flags` bits.
pub(crate) const FLAG_UNSCALE: u32 = 1;
pub(crate) const FLAG_CLIP: u32 = 2;
pub(crate) const FLAG_CHECK: u32 = 4;
pub(crate) const FLAG_SCALER: u32 = 8;

const _: () = assert!(std::mem::size_of::<Control>() == 88);
const _: () = assert!(std::mem::size_of::<InitArgs>() == 24);
const _: () = assert!(std::mem::size_of::<TensorDesc>() == 72);
const _: () = assert!(std::mem::size_of::<AdamaxArgs>() == 72);

// SAFETY: plain-old-data `repr(C)` structs of integers and floats, with no padding
// (sizes asserted above), laid out exactly as the kernel's structs (checked by the
// kernel's static_asserts against the sizes passed at compile time).
unsafe impl DeviceRepr for TensorDesc {}
// SAFETY: all fields are integers or floats, for which all-zero bits are valid.
unsafe impl ValidAsZeroBits for TensorDesc {}
// SAFETY: as above.
unsafe impl DeviceRepr for AdamaxArgs {}
// SAFETY: as above.
unsafe impl DeviceRepr for InitArgs {}
// SAFETY: as above (no padding: 5 x f64, u64, 10 x 4-byte fields = 88 bytes, asserted).
unsafe impl DeviceRepr for Control {}
// SAFETY: all fields are integers or floats, for which all-zero bits are valid.
unsafe impl ValidAsZeroBits for Control {}

impl AdamaxArgs {
    /// The kernel arguments over a table of `num_tensors` descriptors at device address
    /// `tensors`, with the device [`Control`] block at `control` and `num_chunks` f32
    /// partial sums at `partials`; the tensor-independent scalars come from `s` (any
    /// tensor's [`StepScalars`]: the kernel derives each tensor's step size and decay
    /// from the control block as `StepScalars::for_tensor` does).
    pub(crate) fn new(
        s: &StepScalars,
        decay_mode: WeightDecayMode,
        control: u64,
        partials: u64,
        tensors: u64,
        num_tensors: u64,
        num_chunks: u64,
    ) -> Self {
        Self {
            tensors,
            num_tensors,
            num_chunks,
            control,
            partials,
            beta1: s.beta1,
            one_minus_beta1: s.one_minus_beta1,
            beta2: s.beta2,
            eps: s.eps,
            eps_mode: match s.eps_mode {
                EpsilonMode::InsideMax => 0,
                EpsilonMode::Denominator => 1,
            },
            decay_mode: match decay_mode {
                WeightDecayMode::Coupled => 1,
                WeightDecayMode::Decoupled => 2,
            },
            maximize: u32::from(s.maximize),
            reserved: 0,
        }
    }
}

/// The `-D` defines that tell the kernel the layout it must match.
pub(crate) fn layout_defines() -> [String; 6] {
    [
        format!("-DADAMAX_CONTROL_SIZE={}", std::mem::size_of::<Control>()),
        format!("-DADAMAX_INIT_SIZE={}", std::mem::size_of::<InitArgs>()),
        format!("-DADAMAX_ARGS_SIZE={}", std::mem::size_of::<AdamaxArgs>()),
        format!("-DADAMAX_TENSOR_SIZE={}", std::mem::size_of::<TensorDesc>()),
        format!("-DADAMAX_CHUNK={CHUNK}"),
        format!("-DADAMAX_BLOCK={BLOCK}"),
    ]
}
