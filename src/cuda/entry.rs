//! The kernel's entry points, in one table.
//!
//! # NOTE: the names come from here
//!
//! `kernels/adamax.cu` writes what each kind of entry point does once, as a macro over
//! a name, a storage type and, for an update, its [`ParamMode`] and [`StateFormat`]
//! (`ADAMAX_STEP(name, T, P, S)`, ...), and defines no entry point itself: NVRTC gets the
//! list `-DADAMAX_ENTRY_POINTS=ADAMAX_STEP(adamax_step_f32, float, ParamMode::Master,
//! StateFormat::F32) ...` built from [`EntryPoint::ALL`] below. So the names the CUBIN exports and the
//! names the loader looks up are the same strings, from this table.

use crate::{
    config::{ParamMode, Precision, StateFormat},
    storage::StorageType,
};

/// One `extern "C"` entry point of the kernel source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryPoint {
    /// The update of f32 parameters.
    StepF32,
    /// The update of f16 parameters with f32 masters.
    StepF16,
    /// The update of bf16 parameters with f32 masters.
    StepBf16,
    /// bf16 parameters rounded stochastically, no master ([`ParamMode::Stochastic`]).
    StepBf16Sr,
    /// f32 parameters, 8-bit moments ([`StateFormat::Blockwise8`]).
    StepF32Q8,
    /// f16 parameters with f32 masters, 8-bit moments.
    StepF16Q8,
    /// bf16 parameters with f32 masters, 8-bit moments.
    StepBf16Q8,
    /// bf16 parameters rounded stochastically, 8-bit moments: the 10-byte step.
    StepBf16SrQ8,
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
    pub const ALL: [EntryPoint; 14] = [
        EntryPoint::StepF32,
        EntryPoint::StepF16,
        EntryPoint::StepBf16,
        EntryPoint::StepBf16Sr,
        EntryPoint::StepF32Q8,
        EntryPoint::StepF16Q8,
        EntryPoint::StepBf16Q8,
        EntryPoint::StepBf16SrQ8,
        EntryPoint::ReduceF32,
        EntryPoint::ReduceF16,
        EntryPoint::ReduceBf16,
        EntryPoint::Finalize,
        EntryPoint::InitMasterF16,
        EntryPoint::InitMasterBf16,
    ];

    /// The update of parameters of `storage` kept in `precision`; `None` for a mode
    /// the type does not have (stochastic rounding of f32 or f16).
    pub const fn step(storage: StorageType, precision: &Precision) -> Option<Self> {
        use {EntryPoint as E, StorageType as S};
        Some(match (storage, precision.params, precision.state) {
            (S::F32, ParamMode::Master, StateFormat::F32) => E::StepF32,
            (S::F16, ParamMode::Master, StateFormat::F32) => E::StepF16,
            (S::Bf16, ParamMode::Master, StateFormat::F32) => E::StepBf16,
            (S::Bf16, ParamMode::Stochastic, StateFormat::F32) => E::StepBf16Sr,
            (S::F32, ParamMode::Master, StateFormat::Blockwise8) => E::StepF32Q8,
            (S::F16, ParamMode::Master, StateFormat::Blockwise8) => E::StepF16Q8,
            (S::Bf16, ParamMode::Master, StateFormat::Blockwise8) => E::StepBf16Q8,
            (S::Bf16, ParamMode::Stochastic, StateFormat::Blockwise8) => E::StepBf16SrQ8,
            (S::F32 | S::F16, ParamMode::Stochastic, _) => return None,
        })
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
            EntryPoint::StepBf16Sr => "adamax_step_bf16_sr",
            EntryPoint::StepF32Q8 => "adamax_step_f32_q8",
            EntryPoint::StepF16Q8 => "adamax_step_f16_q8",
            EntryPoint::StepBf16Q8 => "adamax_step_bf16_q8",
            EntryPoint::StepBf16SrQ8 => "adamax_step_bf16_sr_q8",
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

    /// The kernel macro that defines it, its storage type in CUDA (if any), and (for
    /// an update) its parameter mode and state format, as the kernel's enums name them.
    const fn definition(
        self,
    ) -> (
        &'static str,
        Option<&'static str>,
        Option<(&'static str, &'static str)>,
    ) {
        use EntryPoint as E;
        const MASTER: &str = "ParamMode::Master";
        const SR: &str = "ParamMode::Stochastic";
        const F32: &str = "StateFormat::F32";
        const Q8: &str = "StateFormat::Blockwise8";
        match self {
            E::StepF32 => ("ADAMAX_STEP", Some("float"), Some((MASTER, F32))),
            E::StepF16 => ("ADAMAX_STEP", Some("f16"), Some((MASTER, F32))),
            E::StepBf16 => ("ADAMAX_STEP", Some("bf16"), Some((MASTER, F32))),
            E::StepBf16Sr => ("ADAMAX_STEP", Some("bf16"), Some((SR, F32))),
            E::StepF32Q8 => ("ADAMAX_STEP", Some("float"), Some((MASTER, Q8))),
            E::StepF16Q8 => ("ADAMAX_STEP", Some("f16"), Some((MASTER, Q8))),
            E::StepBf16Q8 => ("ADAMAX_STEP", Some("bf16"), Some((MASTER, Q8))),
            E::StepBf16SrQ8 => ("ADAMAX_STEP", Some("bf16"), Some((SR, Q8))),
            E::ReduceF32 => ("ADAMAX_REDUCE", Some("float"), None),
            E::ReduceF16 => ("ADAMAX_REDUCE", Some("f16"), None),
            E::ReduceBf16 => ("ADAMAX_REDUCE", Some("bf16"), None),
            E::Finalize => ("ADAMAX_FINALIZE", None, None),
            E::InitMasterF16 => ("ADAMAX_INIT_MASTER", Some("f16"), None),
            E::InitMasterBf16 => ("ADAMAX_INIT_MASTER", Some("bf16"), None),
        }
    }
}

/// The `-D` define that makes the kernel source export every entry point.
pub(crate) fn entry_points_define() -> String {
    let list: Vec<String> = EntryPoint::ALL
        .iter()
        .map(|e| match e.definition() {
            (m, Some(t), Some((p, s))) => format!("{m}({}, {t}, {p}, {s})", e.name()),
            (m, Some(t), None) => format!("{m}({}, {t})", e.name()),
            (m, None, _) => format!("{m}({})", e.name()),
        })
        .collect();
    format!("-DADAMAX_ENTRY_POINTS={}", list.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_storage_mode_has_an_update_where_the_type_allows_it() {
        for t in StorageType::ALL {
            for params in [ParamMode::Master, ParamMode::Stochastic] {
                for state in [StateFormat::F32, StateFormat::Blockwise8] {
                    let p = Precision {
                        params,
                        state,
                        seed: 0,
                    };
                    let e = EntryPoint::step(t, &p);
                    assert_eq!(e.is_some(), p.check_storage(t).is_ok(), "{t} {p:?}");
                    if let Some(e) = e {
                        assert!(e.name().starts_with(&format!("adamax_step_{t}")));
                        assert_eq!(e.name().contains("_q8"), state == StateFormat::Blockwise8);
                        assert_eq!(e.name().contains("_sr"), params == ParamMode::Stochastic);
                    }
                }
            }
        }
    }

    #[test]
    fn the_table_is_in_index_order_and_every_storage_type_has_its_entry_points() {
        for (i, e) in EntryPoint::ALL.iter().enumerate() {
            assert_eq!(e.index(), i, "{e:?}");
        }
        for t in StorageType::ALL {
            let step = EntryPoint::step(t, &Precision::default());
            assert!(step.is_some_and(|e| e.name().ends_with(t.as_str())));
            assert!(EntryPoint::reduce(t).name().ends_with(t.as_str()));
            assert_eq!(EntryPoint::init_master(t).is_some(), t.has_master());
        }
        let d = entry_points_define();
        assert!(
            d.contains("ADAMAX_STEP(adamax_step_bf16, bf16, ParamMode::Master, StateFormat::F32)"),
            "{d}"
        );
        assert!(
            d.contains("ADAMAX_STEP(adamax_step_bf16_sr_q8, bf16, ParamMode::Stochastic, StateFormat::Blockwise8)"),
            "{d}"
        );
        assert!(d.contains("ADAMAX_FINALIZE(adamax_finalize_step)"), "{d}");
    }
}
