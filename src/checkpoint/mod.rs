//! Checkpoints: the whole optimizer state as a safetensors file.
//!
//! Tensor names follow PyTorch's `torch.optim.Adamax` `state_dict()["state"]`, so state
//! moves between the two: `state.{i}.exp_avg` and `state.{i}.exp_inf` (f32, shape
//! `[n]`) and `state.{i}.step` (an f32 scalar, PyTorch's own type for it), for tensor
//! `i` in parameter order; 16-bit parameters add their f32 master weights as
//! `master.{i}`. The metadata holds the configuration and the exact step count (f32
//! counts exactly only to 2^24):
//!
//! | key | value |
//! | --- | --- |
//! | `format` | `adamax-cuda/2` (files written by scripts/torch_checkpoint.py say `torch.optim.Adamax`) |
//! | `storage` | `f32`, `f16` or `bf16` |
//! | `step`, `tensors` | decimal integers |
//! | `lr`, `beta1`, `beta2`, `eps`, `weight_decay` | decimal numbers, round-trip exact |
//! | `eps_mode` | `inside_max` or `denominator` |
//! | `weight_decay_mode` | `coupled` or `decoupled` |
//! | `maximize` | `true` or `false` |
//! | `tensor.{i}.lr_scale`, `tensor.{i}.weight_decay` | per-tensor hyperparameters (parameter groups); absent in PyTorch's files, where the config's apply |
//! | `tensor.{i}.step` | tensor `i`'s own step count, when it differs from `step` (the tensor was skipped in some steps for lack of a gradient); in PyTorch's files, a `state.{i}.step` that differs from `step` is that count |
//! | `options.inv_scale`, `options.max_norm` | the [`StepOptions`] in force, when set |
//! | `options.skip_nonfinite` | `true` or `false` |
//! | `scaler.scale`, `scaler.growth_factor`, `scaler.backoff_factor`, `scaler.growth_interval`, `scaler.growth_tracker` | the [`LossScaler`]'s state, when one is enabled |
//! | `checksum` | `xxh3-64:` and 16 hex digits: the integrity check below |
//!
//! # Integrity
//!
//! Files of this crate carry an XXH3-64 checksum over their content: the metadata
//! (every key but `checksum`, in key order) and every tensor (name, dtype, shape and
//! little-endian bytes, in name order). A file whose checksum does not match is
//! refused, so a flipped bit in a tensor or an edited digit in the header is an error
//! rather than different state. Files written by PyTorch (format `torch.optim.Adamax`)
//! carry none and are accepted unchecked: only their structure and values are
//! validated. The same state always gives the same bytes.
//!
//! # What is refused
//!
//! Loading checks everything before an optimizer's state is touched: the checksum, the
//! format, every tensor's presence, type and shape, counts against what the file holds
//! (before anything is sized from them), the configuration and per-tensor settings, and
//! the invariant `exp_inf >= 0` (so NaN too). A file that fails is an
//! [`Error::Checkpoint`] and the live state stays as it was. Saving runs the same
//! validation first, so `save` never writes a file that `load` refuses. `load` reads
//! regular files only (not a FIFO or `/dev/zero`), and no more than the header declares.
//!
//! ```no_run
//! use adamax_cuda::{cpu::CpuAdamax, AdamaxConfig, Checkpoint, Optimizer};
//! let mut weights = vec![0.5f32; 1000];
//! let mut opt = CpuAdamax::<f32>::new(AdamaxConfig::default(), &[&weights])?;
//! opt.step(&mut [&mut weights], &[&vec![0.01; 1000]])?;
//! opt.checkpoint()?.save("adamax.safetensors")?;
//! // Later, or in another process: a corrupt or mismatched file is refused here.
//! opt.restore(&Checkpoint::load("adamax.safetensors")?)?;
//! # Ok::<(), adamax_cuda::Error>(())
//! ```

mod file;
mod head;
mod parse;

pub(crate) use head::{save_streamed, Head, Part};

use std::{collections::BTreeMap, path::Path};

use crate::{
    config::{AdamaxConfig, EpsilonMode, TensorHyper, WeightDecayMode},
    error::{Error, Result},
    fused::{LossScaler, StepOptions},
    state::TensorState,
    storage::StorageType,
};

/// The format this crate writes.
pub const FORMAT: &str = "adamax-cuda/2";
/// The format of files made by PyTorch through scripts/torch_checkpoint.py.
pub const TORCH_FORMAT: &str = "torch.optim.Adamax";

/// An optimizer's whole state on the host: what a checkpoint file holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// The configuration in force.
    pub config: AdamaxConfig,
    /// Steps taken.
    pub step: u64,
    /// Parameter storage type.
    pub storage: StorageType,
    /// Per-tensor state, in parameter order (masters empty for f32).
    pub tensors: Vec<TensorState>,
    /// Per-tensor hyperparameters, in parameter order.
    pub hypers: Vec<TensorHyper>,
    /// The step options in force (default in PyTorch's files).
    pub options: StepOptions,
    /// The loss scaler's state, when one is enabled, so a mixed-precision run resumes
    /// with the scale it had (`None` in PyTorch's files, which keep GradScaler apart).
    pub scaler: Option<LossScaler>,
}

pub(crate) fn refuse(reason: impl Into<String>) -> Error {
    Error::Checkpoint {
        reason: reason.into(),
    }
}

/// The entries of tensor `i` in a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    ExpAvg,
    ExpInf,
    Step,
    Master,
}

impl Entry {
    /// The entry's name for tensor `i`: PyTorch's state names, and `master.{i}`.
    fn name(self, i: usize) -> String {
        match self {
            Entry::ExpAvg => format!("state.{i}.exp_avg"),
            Entry::ExpInf => format!("state.{i}.exp_inf"),
            Entry::Step => format!("state.{i}.step"),
            Entry::Master => format!("master.{i}"),
        }
    }

    /// The entries of one tensor of `storage`.
    fn of(storage: StorageType) -> &'static [Entry] {
        if storage.has_master() {
            &[Entry::ExpAvg, Entry::ExpInf, Entry::Step, Entry::Master]
        } else {
            &[Entry::ExpAvg, Entry::ExpInf, Entry::Step]
        }
    }
}

/// How [`EpsilonMode`] and [`WeightDecayMode`] are spelled in the metadata.
trait MetaName: Sized + Copy + 'static {
    const ALL: &'static [Self];
    fn meta_name(self) -> &'static str;
    fn from_meta(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|m| m.meta_name() == s)
    }
}

impl MetaName for EpsilonMode {
    const ALL: &'static [Self] = &[EpsilonMode::InsideMax, EpsilonMode::Denominator];
    fn meta_name(self) -> &'static str {
        match self {
            EpsilonMode::InsideMax => "inside_max",
            EpsilonMode::Denominator => "denominator",
        }
    }
}

impl MetaName for WeightDecayMode {
    const ALL: &'static [Self] = &[WeightDecayMode::Coupled, WeightDecayMode::Decoupled];
    fn meta_name(self) -> &'static str {
        match self {
            WeightDecayMode::Coupled => "coupled",
            WeightDecayMode::Decoupled => "decoupled",
        }
    }
}

impl Checkpoint {
    /// Checks that the checkpoint is whole and consistent: a valid configuration and
    /// per-tensor settings, one setting and one state per tensor, `exp_avg`, `exp_inf`
    /// and (for 16-bit storage only) `master` of equal lengths, `exp_inf >= 0`
    /// everywhere (NaN is refused), and no tensor with more steps than the optimizer.
    /// `save` and `load` both run it.
    pub fn validate(&self) -> Result<()> {
        let steps: Vec<u64> = self.tensors.iter().map(|t| t.step).collect();
        self.head(&steps).validate()?;
        for (i, t) in self.tensors.iter().enumerate() {
            let n = t.exp_avg.len();
            let master = if self.storage.has_master() { n } else { 0 };
            if t.exp_inf.len() != n || t.master.len() != master {
                return Err(refuse(format!(
                    "tensor {i} has {n} exp_avg, {} exp_inf and {} master values; {} storage needs {n}, {n} and {master}",
                    t.exp_inf.len(),
                    t.master.len(),
                    self.storage
                )));
            }
            if let Some(j) = t.exp_inf.iter().position(|u| u.is_nan() || *u < 0.0) {
                return Err(refuse(format!(
                    "exp_inf[{j}] of tensor {i} is {}; the infinity norm is never negative or NaN",
                    t.exp_inf[j]
                )));
            }
        }
        Ok(())
    }

    /// Checks that this checkpoint is valid and fits an optimizer over tensors of
    /// `lens` with storage `storage`, before anything is restored.
    pub(crate) fn check_fits(&self, storage: StorageType, lens: &[usize]) -> Result<()> {
        self.validate()?;
        if self.storage != storage {
            return Err(refuse(format!(
                "it holds {} parameters; this optimizer steps {storage}",
                self.storage
            )));
        }
        if self.tensors.len() != lens.len() {
            return Err(refuse(format!(
                "it holds {} tensors; this optimizer has {}",
                self.tensors.len(),
                lens.len()
            )));
        }
        for (i, (t, &n)) in self.tensors.iter().zip(lens).enumerate() {
            if t.exp_avg.len() != n {
                return Err(refuse(format!(
                    "tensor {i} has {} elements in the file and {n} in the optimizer",
                    t.exp_avg.len()
                )));
            }
        }
        Ok(())
    }

    /// The metadata of the file, without the checksum.
    fn metadata(&self) -> BTreeMap<String, String> {
        let steps: Vec<u64> = self.tensors.iter().map(|t| t.step).collect();
        self.head(&steps).metadata()
    }

    fn head<'a>(&'a self, tensor_steps: &'a [u64]) -> Head<'a> {
        Head {
            config: &self.config,
            step: self.step,
            storage: self.storage,
            tensor_steps,
            hypers: &self.hypers,
            options: &self.options,
            scaler: self.scaler.as_ref(),
        }
    }

    /// Serialises to safetensors bytes (after [`Checkpoint::validate`]).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = std::io::Cursor::new(Vec::new());
        file::write(self, &mut out).map_err(|e| match e {
            file::WriteError::Invalid(e) => e,
            file::WriteError::Io(e) => refuse(format!("cannot serialise: {e}")),
        })?;
        Ok(out.into_inner())
    }

    /// Parses and validates safetensors bytes written by this crate or by
    /// scripts/torch_checkpoint.py.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let raw = file::read(&mut &bytes[..], bytes.len() as u64).map_err(|e| match e {
            file::ReadError::Refused(e) => e,
            file::ReadError::Io(e) => refuse(format!("unreadable ({e})")),
        })?;
        Self::from_raw(raw)
    }

    /// Writes the checkpoint to `path` atomically (after [`Checkpoint::validate`]): to
    /// a temporary file beside it, then renamed over it, so a crash leaves either the
    /// old file or the new one. Tensors are written as they are encoded, without a
    /// copy of the whole file in memory.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        self.validate()?;
        crate::fsutil::write_atomically_with(path.as_ref(), |w| {
            file::write(self, w).map_err(|e| match e {
                file::WriteError::Invalid(_) => std::io::Error::other(e.to_string()),
                file::WriteError::Io(e) => e,
            })
        })
    }

    /// Reads and validates a checkpoint file: a regular file, read no further than its
    /// header declares.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let io = |source| Error::Io {
            path: path.to_owned(),
            source,
        };
        let not_regular = || {
            refuse(format!(
                "{} is not a regular file; pass the path of a checkpoint file",
                path.display()
            ))
        };
        // Checked before opening, so that a FIFO is refused instead of blocking.
        if !std::fs::metadata(path).map_err(io)?.is_file() {
            return Err(not_regular());
        }
        let mut f = std::fs::File::open(path).map_err(io)?;
        let meta = f.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(not_regular());
        }
        let raw =
            file::read(&mut std::io::BufReader::new(&mut f), meta.len()).map_err(|e| match e {
                file::ReadError::Refused(e) => e,
                file::ReadError::Io(source) => io(source),
            })?;
        Self::from_raw(raw)
    }
}
