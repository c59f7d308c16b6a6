//! The table of storage modes: one row per (parameter storage type, parameter mode,
//! state format) the crate steps. Everything that depends on the mode reads its row:
//! the parts a tensor's state holds (and so the CPU reference's length checks, the
//! checkpoint's entries and the device buffers), whether it keeps a master and draws
//! random bits, the bytes it keeps and moves, and the kernel entry point that steps it
//! (`src/cuda/entry.rs` builds the kernel's list from this table). Adding a mode is one
//! row here plus its arithmetic (`crate::spec`, `kernels/adamax.cu`).

use crate::{
    config::{ParamMode, Precision, StateFormat},
    error::ConfigError,
    storage::StorageType,
};

use super::parts::Part;

/// One storage mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Mode {
    pub storage: StorageType,
    pub params: ParamMode,
    pub state: StateFormat,
    /// The parts of a tensor's state, in the order a file lists them.
    pub parts: &'static [Part],
    /// The kernel's update entry point.
    pub entry: &'static str,
}

const F32_MOMENTS: &[Part] = &[Part::ExpAvg, Part::ExpInf];
const F32_MOMENTS_MASTER: &[Part] = &[Part::ExpAvg, Part::ExpInf, Part::Master];
const Q8_MOMENTS: &[Part] = &[
    Part::ExpAvgCodes,
    Part::ExpAvgScales,
    Part::ExpInfCodes,
    Part::ExpInfScales,
];
const Q8_MOMENTS_MASTER: &[Part] = &[
    Part::ExpAvgCodes,
    Part::ExpAvgScales,
    Part::ExpInfCodes,
    Part::ExpInfScales,
    Part::Master,
];

const fn row(
    storage: StorageType,
    params: ParamMode,
    state: StateFormat,
    parts: &'static [Part],
    entry: &'static str,
) -> Mode {
    Mode {
        storage,
        params,
        state,
        parts,
        entry,
    }
}

/// Every mode. f32 parameters are their own master; stochastic rounding is for bf16
/// parameters only (f16 keeps a master: the README says why).
#[rustfmt::skip]
pub(crate) const MODES: [Mode; 8] = {
    use {ParamMode as P, StateFormat as S, StorageType as T};
    [
        // storage  parameters     moments        parts of the state  update entry point
        row(T::F32,  P::Master,     S::F32,        F32_MOMENTS,        "adamax_step_f32"),
        row(T::F16,  P::Master,     S::F32,        F32_MOMENTS_MASTER, "adamax_step_f16"),
        row(T::Bf16, P::Master,     S::F32,        F32_MOMENTS_MASTER, "adamax_step_bf16"),
        row(T::Bf16, P::Stochastic, S::F32,        F32_MOMENTS,        "adamax_step_bf16_sr"),
        row(T::F32,  P::Master,     S::Blockwise8, Q8_MOMENTS,         "adamax_step_f32_q8"),
        row(T::F16,  P::Master,     S::Blockwise8, Q8_MOMENTS_MASTER,  "adamax_step_f16_q8"),
        row(T::Bf16, P::Master,     S::Blockwise8, Q8_MOMENTS_MASTER,  "adamax_step_bf16_q8"),
        row(T::Bf16, P::Stochastic, S::Blockwise8, Q8_MOMENTS,         "adamax_step_bf16_sr_q8"),
    ]
};

impl Mode {
    /// The row of parameters of `storage` kept in `precision`; `None` for a combination
    /// the crate does not step.
    pub(crate) fn of(storage: StorageType, precision: &Precision) -> Option<&'static Mode> {
        MODES.iter().find(|m| {
            (m.storage, m.params, m.state) == (storage, precision.params, precision.state)
        })
    }

    /// The row of `precision`, or of [`ParamMode::Master`] where `storage` does not have
    /// `precision`'s parameter mode (for callers that have not validated it).
    pub(crate) fn or_master(storage: StorageType, precision: &Precision) -> &'static Mode {
        let master = Precision {
            params: ParamMode::Master,
            ..*precision
        };
        Self::of(storage, precision)
            .or_else(|| Self::of(storage, &master))
            .unwrap_or(&MODES[0])
    }

    /// Its position in [`MODES`].
    pub(crate) fn index(&self) -> usize {
        MODES.iter().position(|m| m == self).unwrap_or(0)
    }

    /// Whether the state holds an f32 master copy of the parameters.
    pub(crate) fn has_master(&self) -> bool {
        self.parts.contains(&Part::Master)
    }

    /// Bytes of state kept for a tensor of `n` elements (saturating at `u64::MAX`).
    pub(crate) fn state_bytes(&self, n: usize) -> u64 {
        saturate(self.state_bytes_exact(n))
    }

    /// Bytes a step of a tensor of `n` elements moves: the gradient read; the
    /// parameter read and written (only written when a master is the source of truth);
    /// the state read and written (saturating at `u64::MAX`).
    pub(crate) fn bytes_moved(&self, n: usize) -> u64 {
        let size = self.storage.size() as u128;
        let param = if self.has_master() { size } else { 2 * size };
        saturate((param + size) * n as u128 + 2 * self.state_bytes_exact(n))
    }

    fn state_bytes_exact(&self, n: usize) -> u128 {
        self.parts
            .iter()
            .map(|p| p.len(n) as u128 * p.elem().size() as u128)
            .sum()
    }
}

fn saturate(bytes: u128) -> u64 {
    u64::try_from(bytes).unwrap_or(u64::MAX)
}

impl Precision {
    /// Checks the modes against the parameters' storage type: stochastic rounding is
    /// for bf16 parameters only (f32 parameters have no narrower copy to round to; f16
    /// keeps a master, see the crate's README for why).
    pub fn check_storage(&self, storage: StorageType) -> Result<(), ConfigError> {
        self.mode(storage).map(|_| ())
    }

    /// Bytes of optimizer state kept for a tensor of `len` parameters of `storage`: the
    /// moments (or their codes and block scales) and the master weights, if any
    /// (saturating at `u64::MAX`, more than any device holds), in the state format the
    /// tensor gets ([`Precision::tensor_state`]: f32 below
    /// [`Precision::min_8bit_len`]), unless chosen by hand.
    ///
    /// ```
    /// use adamax_cuda::{Precision, StorageType};
    /// assert_eq!(Precision::default().state_bytes(StorageType::Bf16, 1000)?, 12_000);
    /// # Ok::<(), adamax_cuda::ConfigError>(())
    /// ```
    pub fn state_bytes(&self, storage: StorageType, len: usize) -> Result<u64, ConfigError> {
        // (A mode's rows exist for both state formats, so the tensor's decides alone.)
        Ok(self.for_len(len).mode(storage)?.state_bytes(len))
    }

    /// Bytes of device memory one step of a tensor of `len` parameters of `storage`
    /// reads and writes: the step is memory-bound, so this over a copy's bandwidth is
    /// the fastest it can be (saturating at `u64::MAX`), in the state format the tensor
    /// gets, as [`Precision::state_bytes`] says.
    pub fn bytes_moved(&self, storage: StorageType, len: usize) -> Result<u64, ConfigError> {
        Ok(self.for_len(len).mode(storage)?.bytes_moved(len))
    }

    fn mode(&self, storage: StorageType) -> Result<&'static Mode, ConfigError> {
        Mode::of(storage, self).ok_or_else(|| ConfigError::Unsupported {
            what: match self.params {
                ParamMode::Master => "ParamMode::Master",
                ParamMode::Stochastic => "ParamMode::Stochastic",
            },
            storage: storage.as_str(),
            allowed: MODES
                .iter()
                .filter(|m| (m.params, m.state) == (self.params, self.state))
                .map(|m| m.storage.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_is_a_distinct_mode_whose_parts_follow_its_formats() {
        for (i, m) in MODES.iter().enumerate() {
            assert_eq!(m.index(), i);
            let precision = Precision {
                params: m.params,
                state: m.state,
                seed: 0,
                min_8bit_len: 0,
            };
            assert_eq!(Mode::of(m.storage, &precision), Some(m));
            assert_eq!(
                m.has_master(),
                m.storage.has_master() && m.params == ParamMode::Master,
                "{m:?}"
            );
            let codes = m.parts.iter().any(|p| p.is_codes());
            assert_eq!(codes, m.state == StateFormat::Blockwise8, "{m:?}");
            let name = format!(
                "adamax_step_{}{}{}",
                m.storage,
                if m.params == ParamMode::Stochastic {
                    "_sr"
                } else {
                    ""
                },
                if codes { "_q8" } else { "" }
            );
            assert_eq!(m.entry, name);
        }
    }

    #[test]
    fn byte_counts_of_any_length_saturate_instead_of_overflowing() {
        for m in &MODES {
            assert_eq!(m.bytes_moved(usize::MAX), u64::MAX, "{m:?}");
            assert!(m.state_bytes(usize::MAX) >= usize::MAX as u64 / 4, "{m:?}");
            assert_eq!((m.bytes_moved(0), m.state_bytes(0)), (0, 0));
        }
    }

    /// The README's table of bytes is this table's: each mode's row, with the bytes it
    /// moves and keeps per parameter, appears there as written.
    #[test]
    fn the_readmes_bytes_table_is_the_modes_table() {
        let readme = include_str!("../../README.md");
        for m in &MODES {
            let n = 1 << 20;
            let per = |b: u64| {
                let v = b as f64 / n as f64;
                let s = format!("{v:.2}");
                s.trim_end_matches('0').trim_end_matches('.').to_owned()
            };
            let row = format!(
                "| {} | {} | {} | {} | {} |",
                m.storage,
                match m.params {
                    ParamMode::Master if m.has_master() => "f32 master",
                    ParamMode::Master => "–",
                    ParamMode::Stochastic => "stochastic rounding",
                },
                match m.state {
                    StateFormat::F32 => "f32",
                    StateFormat::Blockwise8 => "8-bit blocks",
                },
                per(m.bytes_moved(n)),
                per(m.state_bytes(n)),
            );
            assert!(readme.contains(&row), "README.md lacks the row\n{row}");
        }
    }
}
