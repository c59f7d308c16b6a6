//! The kernel's argument layout, mirrored in `kernels/adamax.cu`.
//!
//! # NOTE: one source for every layout fact
//!
//! Each struct here is declared through [`mirrored!`], which records its size and the
//! offset of every field. [`layout_defines`] turns those records into `static_assert`s
//! that NVRTC compiles into the kernel (`-DADAMAX_LAYOUT_CHECKS=...`), so a field
//! added, removed, resized or reordered on either side fails the compile with the name
//! of the field instead of corrupting memory. The chunk and block sizes and the mode
//! values reach the kernel the same way, as `-D` defines generated from the constants
//! below; the kernel has no copy of them.

use cudarc::driver::DeviceRepr;

use crate::{
    config::{AdamaxConfig, EpsilonMode, WeightDecayMode},
    spec::StepScalars,
};

/// Elements per chunk: the unit of work a block takes from the tensor list, and the
/// unit of the reduction's partial sums (`crate::fused::CHUNK` is this value). A
/// multiple of 8 so that every chunk of every storage type starts on a 16-byte boundary.
pub(crate) const CHUNK: u64 = crate::fused::CHUNK as u64;
/// Threads per block of every entry point but the 8-bit-state updates ([`Q8_BLOCK`]):
/// their `__launch_bounds__`, and the reduction's order (`crate::fused::THREADS`).
pub(crate) const BLOCK: u32 = crate::fused::THREADS as u32;

/// Threads per block of the 8-bit-state updates (the kernel's NOTE: [register budget]):
/// 4 warps, each stepping one block of state at a time, so that 5 blocks of 96
/// registers a thread fit a multiprocessor where 2 of 256 threads did.
pub(crate) const Q8_BLOCK: u32 = 128;

const _: () = assert!(
    CHUNK.is_multiple_of(8) && BLOCK == 256 && Q8_BLOCK.is_multiple_of(32) && Q8_BLOCK <= BLOCK
);

/// A `repr(C)` struct that the kernel declares too, with its layout for the checks.
pub(crate) trait Mirrored {
    /// The struct's name in the kernel.
    const NAME: &'static str;
    /// `(field, byte offset)` of every field, in declaration order.
    fn fields() -> Vec<(&'static str, usize)>;
}

/// Declares a `#[repr(C)]` struct mirrored in the kernel and records its layout.
macro_rules! mirrored {
    ($(#[$meta:meta])* struct $name:ident { $($(#[$fmeta:meta])* $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, PartialEq)]
        pub(crate) struct $name { $($(#[$fmeta])* pub $field: $ty),* }

        impl Mirrored for $name {
            const NAME: &'static str = stringify!($name);
            fn fields() -> Vec<(&'static str, usize)> {
                vec![$((stringify!($field), std::mem::offset_of!($name, $field))),*]
            }
        }
    };
}

mirrored! {
    /// One tensor of a launch (`TensorDesc` in the kernel).
    #[derive(Default)]
    struct TensorDesc {
        param: u64,
        grad: u64,
        exp_avg: u64,
        exp_inf: u64,
        master: u64,
        exp_avg_scale: u64,
        exp_inf_scale: u64,
        len: u64,
        chunk_begin: u64,
        unit_begin: u64,
        has_grad: u64,
        blockwise8: u64,
        stream_tensor: u64,
        element_base: u64,
        partial_begin: u64,
        lr_scale: f64,
        weight_decay: f64,
    }
}

mirrored! {
    /// The launch's arguments (`AdamaxArgs` in the kernel), passed by value.
    struct AdamaxArgs {
        tensors: u64,
        num_tensors: u64,
        num_chunks: u64,
        num_partials: u64,
        num_units: u64,
        unit_len: u64,
        control: u64,
        partials: u64,
        tensor_steps: u64,
        seed: u64,
        beta1: f32,
        one_minus_beta1: f32,
        beta2: f32,
        eps: f32,
        eps_mode: u32,
        decay_mode: u32,
        maximize: u32,
        /// `ControlParams::generation` when these values were current: a captured launch
        /// replayed after a restore changed them is stale (see the kernel's NOTE:
        /// [stale launches]).
        generation: u32,
    }
}

mirrored! {
    /// Arguments of the master-weight initialisation (`InitArgs` in the kernel).
    struct InitArgs {
        param: u64,
        master: u64,
        len: u64,
    }
}

mirrored! {
    /// What the host decides (`ControlParams`): written whole, in one copy, whenever a
    /// setting changes. The kernels only read it.
    #[derive(Default)]
    struct ControlParams {
        lr: f64,
        beta1: f64,
        growth_factor: f64,
        backoff_factor: f64,
        /// The fixed inverse loss scale of `StepOptions::inv_scale` (1 when unset);
        /// with a loss scaler the inverse of `ScalerState::scale` is used instead.
        inv_scale: f32,
        max_norm: f32,
        growth_interval: u32,
        flags: u32,
        /// The loss scaler's floor (`LossScaler::min_scale`).
        min_scale: f32,
        /// Counts the changes of the by-value arguments (`AdamaxArgs::generation`).
        generation: u32,
    }
}

mirrored! {
    /// The dynamic loss scale (`ScalerState`): updated by the device after every step;
    /// the host writes it only when a scaler is set or state is restored.
    #[derive(Default)]
    struct ScalerState {
        scale: f32,
        growth_tracker: u32,
    }
}

mirrored! {
    /// The step counter and what the decision pass leaves for the update (`StepState`).
    #[derive(Default)]
    struct StepState {
        /// Steps taken (skipped steps are not counted); the update's last block counts.
        step: u64,
        /// The inverse scale this step's gradients are unscaled by, captured before
        /// the scaler moves to the next step's scale.
        step_inv_scale: f32,
        clip_coef: f32,
        total_norm: f32,
        found_inf: u32,
        /// `SKIP_*`: why the step in flight changes nothing, or 0.
        skipped: u32,
        /// Blocks of the update that have finished (the last one resets it).
        blocks_done: u32,
        /// 1 when the last step computed `total_norm` and `clip_coef` (clipping on, the
        /// step taken), else 0: what the report shows.
        clipped: u32,
    }
}

mirrored! {
    /// The optimizer state that lives on the device (`Control` in the kernel): what
    /// makes a step independent of host values, so that it can be captured in a CUDA
    /// graph. Three parts, so that the host can write its settings without racing the
    /// fields the kernels own.
    #[derive(Default)]
    struct Control {
        params: ControlParams,
        scaler: ScalerState,
        state: StepState,
    }
}

/// `ControlParams::flags` bits.
pub(crate) const FLAG_UNSCALE: u32 = 1;
pub(crate) const FLAG_CLIP: u32 = 2;
pub(crate) const FLAG_CHECK: u32 = 4;
pub(crate) const FLAG_SCALER: u32 = 8;
/// `StepState::skipped`: a non-finite gradient (the overflow check).
pub(crate) const SKIP_NONFINITE: u32 = 1;
/// `StepState::skipped`: the step counter is at `u64::MAX` (a replayed graph; an eager
/// step is refused on the host first).
pub(crate) const SKIP_COUNTER_FULL: u32 = 2;
/// `StepState::skipped`: a launch whose by-value arguments predate a restore that
/// changed them (a replayed graph; an eager step always carries the current ones).
pub(crate) const SKIP_STALE_GRAPH: u32 = 3;

/// `AdamaxArgs::eps_mode` of an [`EpsilonMode`].
pub(crate) const fn eps_mode_value(mode: EpsilonMode) -> u32 {
    match mode {
        EpsilonMode::InsideMax => 0,
        EpsilonMode::Denominator => 1,
    }
}

/// `AdamaxArgs::decay_mode` of a [`WeightDecayMode`] (0 is "none", per tensor).
pub(crate) const fn decay_mode_value(mode: WeightDecayMode) -> u32 {
    match mode {
        WeightDecayMode::Coupled => 1,
        WeightDecayMode::Decoupled => 2,
    }
}

// SAFETY (all five): plain-old-data `repr(C)` structs of integers and floats whose
// layout the kernel checks field by field at compile time (`layout_defines`).
unsafe impl DeviceRepr for TensorDesc {}
// SAFETY: as above.
unsafe impl DeviceRepr for AdamaxArgs {}
// SAFETY: as above.
unsafe impl DeviceRepr for InitArgs {}
// SAFETY: as above.
unsafe impl DeviceRepr for Control {}
// SAFETY: as above.
unsafe impl DeviceRepr for ControlParams {}
// SAFETY: all fields are integers or floats, for which all-zero bits are valid.
unsafe impl cudarc::driver::ValidAsZeroBits for TensorDesc {}

impl AdamaxArgs {
    /// The arguments of a step of `config` with the control block at `control` in
    /// `generation` (see [`AdamaxArgs::generation`]): everything the launch carries by
    /// value, and no tensor table yet.
    pub(crate) fn for_config(config: &AdamaxConfig, control: u64, generation: u32) -> Self {
        Self {
            seed: config.precision.seed,
            generation,
            ..Self::new(
                &StepScalars::new(config, 1),
                config.weight_decay_mode,
                control,
            )
        }
    }

    /// The kernel arguments with the device [`Control`] block at `control`, the
    /// tensor-independent scalars from `s` (any tensor's [`StepScalars`]: the kernel
    /// derives each tensor's step size and decay from the control block as
    /// `StepScalars::for_tensor` does), and no tensor table yet (the launch plan fills
    /// in the table, the partial sums and the counts).
    pub(crate) fn new(s: &StepScalars, decay_mode: WeightDecayMode, control: u64) -> Self {
        Self {
            tensors: 0,
            num_tensors: 0,
            num_chunks: 0,
            num_partials: 0,
            num_units: 0,
            unit_len: 0,
            control,
            partials: 0,
            tensor_steps: 0,
            seed: 0,
            beta1: s.beta1,
            one_minus_beta1: s.one_minus_beta1,
            beta2: s.beta2,
            eps: s.eps,
            eps_mode: eps_mode_value(s.eps_mode),
            decay_mode: decay_mode_value(decay_mode),
            maximize: u32::from(s.maximize),
            generation: 0,
        }
    }
}

/// `static_assert`s of `T`'s size and of every field's offset, in CUDA.
fn checks_of<T: Mirrored>() -> String {
    let name = T::NAME;
    let mut s = format!(
        "static_assert(sizeof({name}) == {}, \"{name}: size differs from src/cuda/args.rs\");",
        std::mem::size_of::<T>()
    );
    for (field, offset) in T::fields() {
        s.push_str(&format!(
            "static_assert(ADAMAX_OFFSETOF({name}, {field}) == {offset}, \"{name}.{field}: offset differs from src/cuda/args.rs\");"
        ));
    }
    s
}

/// The `-D` defines that give the kernel its layout constants and checks.
pub(crate) fn layout_defines() -> Vec<String> {
    let checks = [
        checks_of::<TensorDesc>(),
        checks_of::<AdamaxArgs>(),
        checks_of::<InitArgs>(),
        checks_of::<ControlParams>(),
        checks_of::<ScalerState>(),
        checks_of::<StepState>(),
        checks_of::<Control>(),
    ]
    .concat();
    let values = [
        ("ADAMAX_CHUNK", CHUNK),
        ("ADAMAX_BLOCK", u64::from(BLOCK)),
        ("ADAMAX_QBLOCK", crate::spec::lowbit::QBLOCK as u64),
        ("ADAMAX_Q8_THREADS", u64::from(Q8_BLOCK)),
        ("ADAMAX_FLAG_UNSCALE", u64::from(FLAG_UNSCALE)),
        ("ADAMAX_FLAG_CLIP", u64::from(FLAG_CLIP)),
        ("ADAMAX_FLAG_CHECK", u64::from(FLAG_CHECK)),
        ("ADAMAX_FLAG_SCALER", u64::from(FLAG_SCALER)),
        ("ADAMAX_SKIP_NONFINITE", u64::from(SKIP_NONFINITE)),
        ("ADAMAX_SKIP_COUNTER_FULL", u64::from(SKIP_COUNTER_FULL)),
        ("ADAMAX_SKIP_STALE_GRAPH", u64::from(SKIP_STALE_GRAPH)),
        (
            "ADAMAX_EPS_INSIDE_MAX",
            u64::from(eps_mode_value(EpsilonMode::InsideMax)),
        ),
        (
            "ADAMAX_EPS_DENOMINATOR",
            u64::from(eps_mode_value(EpsilonMode::Denominator)),
        ),
        (
            "ADAMAX_DECAY_COUPLED",
            u64::from(decay_mode_value(WeightDecayMode::Coupled)),
        ),
        (
            "ADAMAX_DECAY_DECOUPLED",
            u64::from(decay_mode_value(WeightDecayMode::Decoupled)),
        ),
    ];
    let mut defines: Vec<String> = values.iter().map(|(k, v)| format!("-D{k}={v}")).collect();
    defines.push(format!("-DADAMAX_LAYOUT_CHECKS={checks}"));
    defines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_checks_name_every_field_with_its_offset() {
        let c = checks_of::<Control>();
        assert!(c.contains("sizeof(Control) == 104"), "{c}");
        assert!(c.contains("ADAMAX_OFFSETOF(Control, scaler) == 56"), "{c}");
        assert!(c.contains("ADAMAX_OFFSETOF(Control, state) == 64"), "{c}");
        let s = checks_of::<StepState>();
        assert!(
            s.contains("ADAMAX_OFFSETOF(StepState, skipped) == 24"),
            "{s}"
        );
    }
}
