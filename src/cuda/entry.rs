//! The kernel's entry points, in one table.
//!
//! # NOTE: the names come from here
//!
//! `kernels/adamax.cu` writes what each kind of entry point does once, as a macro over
//! a name and a storage type (`ADAMAX_STEP(name, T)`, ...), and defines no entry point
//! itself: NVRTC gets the list `-DADAMAX_ENTRY_POINTS=ADAMAX_STEP(adamax_step_f32, float)
//! ...` built from [`EntryPoint::ALL`] below. So the names the CUBIN exports and the
//! names the loader looks up are the same strings, from this table.

use crate::storage::StorageType;

/// One `extern "C"` entry point of the kernel source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryPoint {
    /// The update of f32 parameters.
    StepF32,
    /// The update of f16 parameters with f32 masters.
    StepF16,
    /// The update of bf16 parameters with f32 masters.
    StepBf16,
    /// The overflow check and per-chunk sums of squares of f32 gradients.
    ReduceF32,
    /// The same for f16 gradients.
    ReduceF16,
    /// The same for bf16 gradients.
    ReduceBf16,
    /// The one-block decision pass: skip, clip coefficient, step count, loss scale.
    Finalize,
    /// Master weights from f16 parameters.
    InitMasterF16,
    /// Master weights from bf16 parameters.
    InitMasterBf16,
}

impl EntryPoint {
    /// Every entry point, in the order the loader keeps them.
    pub const ALL: [EntryPoint; 9] = [
        EntryPoint::StepF32,
        EntryPoint::StepF16,
        EntryPoint::StepBf16,
        EntryPoint::ReduceF32,
        EntryPoint::ReduceF16,
        EntryPoint::ReduceBf16,
        EntryPoint::Finalize,
        EntryPoint::InitMasterF16,
        EntryPoint::InitMasterBf16,
    ];

    /// The update of parameters of `storage`.
    pub const fn step(storage: StorageType) -> Self {
        match storage {
            StorageType::F32 => EntryPoint::StepF32,
            StorageType::F16 => EntryPoint::StepF16,
            StorageType::Bf16 => EntryPoint::StepBf16,
        }
    }

    /// The reduction over gradients of `storage`.
    pub const fn reduce(storage: StorageType) -> Self {
        match storage {
            StorageType::F32 => EntryPoint::ReduceF32,
            StorageType::F16 => EntryPoint::ReduceF16,
            StorageType::Bf16 => EntryPoint::ReduceBf16,
        }
    }

    /// The master-weight initialisation of `storage`; `None` for f32, which has none.
    pub const fn init_master(storage: StorageType) -> Option<Self> {
        match storage {
            StorageType::F32 => None,
            StorageType::F16 => Some(EntryPoint::InitMasterF16),
            StorageType::Bf16 => Some(EntryPoint::InitMasterBf16),
        }
    }

    /// The symbol the kernel exports.
    pub const fn name(self) -> &'static str {
        match self {
            EntryPoint::StepF32 => "adamax_step_f32",
            EntryPoint::StepF16 => "adamax_step_f16",
            EntryPoint::StepBf16 => "adamax_step_bf16",
            EntryPoint::ReduceF32 => "adamax_reduce_f32",
            EntryPoint::ReduceF16 => "adamax_reduce_f16",
            EntryPoint::ReduceBf16 => "adamax_reduce_bf16",
            EntryPoint::Finalize => "adamax_finalize_step",
            EntryPoint::InitMasterF16 => "adamax_init_master_f16",
            EntryPoint::InitMasterBf16 => "adamax_init_master_bf16",
        }
    }

    /// Position in [`EntryPoint::ALL`].
    pub(crate) const fn index(self) -> usize {
        self as usize
    }

    /// The kernel macro that defines it, and its storage type in CUDA (if any).
    const fn definition(self) -> (&'static str, Option<&'static str>) {
        match self {
            EntryPoint::StepF32 => ("ADAMAX_STEP", Some("float")),
            EntryPoint::StepF16 => ("ADAMAX_STEP", Some("f16")),
            EntryPoint::StepBf16 => ("ADAMAX_STEP", Some("bf16")),
            EntryPoint::ReduceF32 => ("ADAMAX_REDUCE", Some("float")),
            EntryPoint::ReduceF16 => ("ADAMAX_REDUCE", Some("f16")),
            EntryPoint::ReduceBf16 => ("ADAMAX_REDUCE", Some("bf16")),
            EntryPoint::Finalize => ("ADAMAX_FINALIZE", None),
            EntryPoint::InitMasterF16 => ("ADAMAX_INIT_MASTER", Some("f16")),
            EntryPoint::InitMasterBf16 => ("ADAMAX_INIT_MASTER", Some("bf16")),
        }
    }
}

/// The `-D` define that makes the kernel source export every entry point.
pub(crate) fn entry_points_define() -> String {
    let list: Vec<String> = EntryPoint::ALL
        .iter()
        .map(|e| match e.definition() {
            (m, Some(t)) => format!("{m}({}, {t})", e.name()),
            (m, None) => format!("{m}({})", e.name()),
        })
        .collect();
    format!("-DADAMAX_ENTRY_POINTS={}", list.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_in_index_order_and_every_storage_type_has_its_entry_points() {
        for (i, e) in EntryPoint::ALL.iter().enumerate() {
            assert_eq!(e.index(), i, "{e:?}");
        }
        for t in StorageType::ALL {
            assert!(EntryPoint::step(t).name().ends_with(t.as_str()));
            assert!(EntryPoint::reduce(t).name().ends_with(t.as_str()));
            assert_eq!(EntryPoint::init_master(t).is_some(), t.has_master());
        }
        let d = entry_points_define();
        assert!(d.contains("ADAMAX_STEP(adamax_step_bf16, bf16)"), "{d}");
        assert!(d.contains("ADAMAX_FINALIZE(adamax_finalize_step)"), "{d}");
    }
}
