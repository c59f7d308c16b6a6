//! The kernel's entry points: one update per row of the modes table
//! (`crate::state::modes::MODES`), and per storage type a reduction and a master-weight
//! initialisation, plus the decision pass.
//!
//! # NOTE: the names come from here
//!
//! `kernels/adamax.cu` writes what each kind of entry point does once, as a macro over
//! a name and a storage type (`ADAMAX_STEP(name, T, P, S)`, ...), and defines no entry
//! point itself: NVRTC gets the list `-DADAMAX_ENTRY_POINTS=ADAMAX_STEP(adamax_step_f32,
//! float, ParamMode::Master, StateFormat::F32) ...` built from [`EntryPoint::all`] below. So the names the CUBIN exports
//! and the names the loader looks up are the same strings, from the modes table and this
//! module.

use super::args::{BLOCK, Q8_BLOCK};
#[cfg(test)]
use crate::config::ParamMode;
use crate::{
    config::{Precision, StateFormat},
    state::{modes::MODES, Mode},
    storage::StorageType,
};

/// One `extern "C"` entry point of the kernel source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryPoint {
    /// The update of one storage mode: its row in the crate's modes table.
    Step(usize),
    /// The overflow check and per-chunk sums of squares of gradients of a type.
    Reduce(StorageType),
    /// The one-block decision pass: skip, clip coefficient, step count, loss scale.
    Finalize,
    /// Master weights from 16-bit parameters of a type.
    InitMaster(StorageType),
}

/// Storage types with master weights, in [`StorageType::ALL`]'s order.
const MASTERED: [StorageType; 2] = [StorageType::F16, StorageType::Bf16];

impl EntryPoint {
    /// Every entry point, in the order the loader keeps them ([`EntryPoint::index`]).
    pub fn all() -> impl Iterator<Item = EntryPoint> {
        (0..MODES.len())
            .map(EntryPoint::Step)
            .chain(StorageType::ALL.map(EntryPoint::Reduce))
            .chain([EntryPoint::Finalize])
            .chain(MASTERED.map(EntryPoint::InitMaster))
    }

    /// How many there are.
    pub const COUNT: usize = MODES.len() + StorageType::ALL.len() + 1 + MASTERED.len();

    /// The update of parameters of `storage` kept in `precision`; `None` for a mode
    /// the type does not have (stochastic rounding of f32 or f16).
    pub fn step(storage: StorageType, precision: &Precision) -> Option<Self> {
        Mode::of(storage, precision).map(|m| EntryPoint::Step(m.index()))
    }

    /// The reduction over gradients of `storage`.
    pub const fn reduce(storage: StorageType) -> Self {
        EntryPoint::Reduce(storage)
    }

    /// The master-weight initialisation of `storage`; `None` for f32, which has none.
    pub const fn init_master(storage: StorageType) -> Option<Self> {
        if storage.has_master() {
            Some(EntryPoint::InitMaster(storage))
        } else {
            None
        }
    }

    /// The symbol the kernel exports.
    pub fn name(self) -> &'static str {
        use StorageType as S;
        match self {
            EntryPoint::Step(i) => MODES.get(i).map_or("adamax_step_unknown", |m| m.entry),
            EntryPoint::Reduce(S::F32) => "adamax_reduce_f32",
            EntryPoint::Reduce(S::F16) => "adamax_reduce_f16",
            EntryPoint::Reduce(S::Bf16) => "adamax_reduce_bf16",
            EntryPoint::Finalize => "adamax_finalize_step",
            EntryPoint::InitMaster(S::F16) => "adamax_init_master_f16",
            EntryPoint::InitMaster(S::Bf16) => "adamax_init_master_bf16",
            // No such kernel: f32 parameters are their own master.
            EntryPoint::InitMaster(S::F32) => "adamax_init_master_f32",
        }
    }

    /// Threads per block it is compiled for and launched with: [`Q8_BLOCK`] for the
    /// updates of 8-bit state, [`BLOCK`] for every other.
    pub(crate) fn threads(self) -> u32 {
        match self {
            EntryPoint::Step(i)
                if MODES
                    .get(i)
                    .is_some_and(|m| m.state == StateFormat::Blockwise8) =>
            {
                Q8_BLOCK
            }
            _ => BLOCK,
        }
    }

    /// Position in [`EntryPoint::all`].
    pub(crate) fn index(self) -> usize {
        let position =
            |t: StorageType, list: &[StorageType]| list.iter().position(|&x| x == t).unwrap_or(0);
        let modes = MODES.len();
        let types = StorageType::ALL.len();
        match self {
            EntryPoint::Step(i) => i,
            EntryPoint::Reduce(t) => modes + position(t, &StorageType::ALL),
            EntryPoint::Finalize => modes + types,
            EntryPoint::InitMaster(t) => modes + types + 1 + position(t, &MASTERED),
        }
    }

    /// Its definition in the kernel's list: the macro, the storage type in CUDA, and
    /// (for an update) the parameter mode and state format as the kernel's template
    /// arguments, spelled as the Rust enums are.
    fn definition(self) -> String {
        let cuda = |t: StorageType| match t {
            StorageType::F32 => "float",
            StorageType::F16 => "f16",
            StorageType::Bf16 => "bf16",
        };
        let name = self.name();
        match self {
            EntryPoint::Step(i) => {
                let Some(m) = MODES.get(i) else {
                    return String::new();
                };
                format!(
                    "ADAMAX_STEP({name}, {}, ParamMode::{:?}, StateFormat::{:?})",
                    cuda(m.storage),
                    m.params,
                    m.state
                )
            }
            EntryPoint::Reduce(t) => format!("ADAMAX_REDUCE({name}, {})", cuda(t)),
            EntryPoint::Finalize => format!("ADAMAX_FINALIZE({name})"),
            EntryPoint::InitMaster(t) => format!("ADAMAX_INIT_MASTER({name}, {})", cuda(t)),
        }
    }
}

/// The `-D` define that makes the kernel source export every entry point.
pub(crate) fn entry_points_define() -> String {
    let list: Vec<String> = EntryPoint::all().map(EntryPoint::definition).collect();
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
                        min_8bit_len: 0,
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
        let all: Vec<EntryPoint> = EntryPoint::all().collect();
        assert_eq!(all.len(), EntryPoint::COUNT);
        for (i, e) in all.iter().enumerate() {
            assert_eq!(e.index(), i, "{e:?}");
        }
        let mut names: Vec<&str> = all.iter().map(|e| e.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), EntryPoint::COUNT, "every name is its own");
        for t in StorageType::ALL {
            let step = EntryPoint::step(t, &Precision::default());
            assert!(step.is_some_and(|e| e.name().ends_with(t.as_str())));
            assert!(EntryPoint::reduce(t).name().ends_with(t.as_str()));
            assert_eq!(EntryPoint::init_master(t).is_some(), t.has_master());
            if let Some(e) = EntryPoint::init_master(t) {
                assert!(e.name().ends_with(t.as_str()));
            }
        }
        let d = entry_points_define();
        assert!(
            d.contains("ADAMAX_STEP(adamax_step_bf16, bf16, ParamMode::Master, StateFormat::F32)"),
            "{d}"
        );
        assert!(
            d.contains(
                "ADAMAX_STEP(adamax_step_bf16_sr_q8, bf16, ParamMode::Stochastic, StateFormat::Blockwise8)"
            ),
            "{d}"
        );
        assert!(d.contains("ADAMAX_FINALIZE(adamax_finalize_step)"), "{d}");
    }
}
