//! Checkpoints: the optimizer's whole state as a safetensors file. The parameters are
//! not in it: save them with the model. For 16-bit parameters kept with a master, the
//! master weights are in it, and [`Checkpoint::params`] rounds them to the parameters a
//! resumed run continues from bit for bit.
//!
//! Tensor names follow PyTorch's `torch.optim.Adamax` `state_dict()["state"]`, so state
//! moves between the two: `state.{i}.exp_avg` and `state.{i}.exp_inf` (f32, of the
//! tensor's shape: its parameter's, as PyTorch's `state_dict` has it, when the optimizer
//! was given it with [`Optimizer::set_tensor_shape`](crate::Optimizer::set_tensor_shape), else `[n]`; [`Checkpoint::shapes`])
//! and `state.{i}.step` (an f32 scalar, PyTorch's own type for it), for tensor
//! `i` in parameter order; 16-bit parameters add their f32 master weights as
//! `master.{i}` (of the tensor's shape). With [`StateFormat::Blockwise8`] the moments are saved as stored:
//! `state.{i}.exp_avg_q8` and `state.{i}.exp_inf_q8` (U8 codes, of the tensor's shape) and
//! `state.{i}.exp_avg_q8_scale` and `state.{i}.exp_inf_q8_scale` (f32, one per block of
//! [`QBLOCK`](crate::spec::lowbit::QBLOCK), shape `[ceil(n / QBLOCK)]`), in place of
//! `exp_avg` and `exp_inf`; [`ParamMode::Stochastic`] has no `master.{i}`.
//! [`Checkpoint::convert_state`] maps 8-bit state to PyTorch's f32 names (`m` decoded
//! as its stored ratio times `u`, or `u + eps`) and back. The metadata holds the configuration and the exact step count
//! (f32 counts exactly only to 2^24):
//!
//! | key | value |
//! | --- | --- |
//! | `format` | `adamax-cuda/3` (files written by scripts/torch_checkpoint.py and scripts/torch_model.py say `torch.optim.Adamax`; files of `adamax-cuda/2`, before 8-bit state stored `m` as a ratio, load with their 8-bit state converted: `src/checkpoint/legacy.rs`) |
//! | `storage` | `f32`, `f16` or `bf16` |
//! | `step`, `tensors` | decimal integers |
//! | `lr`, `beta1`, `beta2`, `eps`, `weight_decay` | decimal numbers, round-trip exact |
//! | `eps_mode` | `inside_max` or `denominator` |
//! | `weight_decay_mode` | `coupled` or `decoupled` |
//! | `maximize` | `true` or `false` |
//! | `param_mode` | `stochastic` for [`ParamMode::Stochastic`]; absent for the default, `master` |
//! | `state_format`, `state_block` | `blockwise8` and `256` for 8-bit state; absent for f32 state |
//! | `min_8bit_len` | [`Precision::min_8bit_len`], with 8-bit state, and with f32 state when not the default (4096); an 8-bit file without it, from before it, reads as 0 (every tensor in 8 bits) |
//! | `tensor.{i}.state_format` | `f32` for a tensor kept in f32 state in an 8-bit checkpoint ([`Checkpoint::state_formats`]); absent otherwise |
//! | `seed` | the stochastic rounding seed, when a mode rounds stochastically |
//! | `tensor.{i}.lr_scale`, `tensor.{i}.weight_decay` | per-tensor hyperparameters (parameter groups); absent in PyTorch's files, where the config's apply |
//! | `tensor.{i}.name` | tensor `i`'s name ([`Checkpoint::names`]), when it has one; in PyTorch's files, its group's `param_names` (an optimizer built from `named_parameters()`) |
//! | `tensor.{i}.step` | tensor `i`'s own step count, when it differs from `step` (the tensor was skipped in some steps for lack of a gradient); in PyTorch's files, a `state.{i}.step` that differs from `step` is that count |
//! | `options.inv_scale`, `options.max_norm` | the [`StepOptions`] in force, when set |
//! | `options.skip_nonfinite` | `true` or `false` |
//! | `scaler.scale`, `scaler.min_scale`, `scaler.growth_factor`, `scaler.backoff_factor`, `scaler.growth_interval`, `scaler.growth_tracker` | the [`LossScaler`]'s state, when one is enabled (a file without `scaler.min_scale`, from before the floor, reads as [`LossScaler::NO_FLOOR`]) |
//! | `checksum` | `xxh3-64:` and 16 hex digits: the integrity check below |
//!
//! # Integrity
//!
//! Files of this crate carry an XXH3-64 checksum over their content: the metadata
//! (every key but `checksum`, in key order) and every tensor (name, dtype, shape and
//! little-endian bytes, in name order). A file whose checksum does not match is
//! refused, so a flipped bit in a tensor or an edited digit in the header is an error
//! rather than different state. Files written by PyTorch (format `torch.optim.Adamax`)
//! carry none: their structure and values are validated, and they may hold only the
//! keys PyTorch's writer gives them. The same state always gives the same bytes.
//!
//! # What is refused
//!
//! Loading checks everything before an optimizer's state is touched: the checksum, the
//! format, the metadata keys (only those its writer writes: a file in PyTorch's format,
//! which carries no checksum, may hold only PyTorch's), every tensor's presence, type
//! and shape (a tensor's per-element entries share one shape, its block scales are
//! 1-D), counts against what the file holds (before anything is sized from them),
//! the configuration and per-tensor settings, and the state itself, which must be one a
//! run can reach (`src/checkpoint/valid.rs`): finite moments and scales, `exp_inf >=
//! 0`, zero moments before a tensor's first step, AdaMax's bound `|exp_avg| <= c *
//! exp_inf` (`c * (exp_inf + eps)` with eps in the denominator) with `c = (1 - beta1) /
//! (1 - beta1 / beta2)` for f32 moments (derived, with its rounding slack, in
//! `src/state/bound.rs`), 8-bit blocks as the encoder writes them, each 8-bit ratio
//! block's scale within `c` and small enough that the moments it stands for are finite,
//! at least one tensor. A file that fails is an [`Error::Checkpoint`] (an
//! [`Error::Config`] for a configuration out of range, naming its field) and the live
//! state stays as it was. Saving runs the same validation first, and plans the header
//! (at most 100 MB, what `load` reads) before it creates a file, so `save` never writes
//! a file that `load` refuses.
//! `load` reads regular files only (not a FIFO or `/dev/zero`), and no more than the
//! header declares.
//!
//! # Sharded runs
//!
//! The optimizer state of a run sharded over GPUs (ZeRO-1) is one [`ShardCheckpoint`]
//! per rank, in files of their own format; they gather into this checkpoint and split
//! from it at any world size (`src/checkpoint/shard.rs`).
//!
//! ```no_run
//! use adamax_cuda::{cpu::CpuAdamax, AdamaxConfig, Checkpoint, Optimizer};
//! let mut weights = vec![0.5f32; 1000];
//! let mut opt = CpuAdamax::<f32>::new(AdamaxConfig::default(), &[&weights])?;
//! opt.step(&mut [&mut weights], &[&vec![0.01; 1000]])?;
//! opt.checkpoint()?.save("adamax.safetensors")?; // `weights` is not in it: save them too
//! // Later, or in another process: a corrupt or mismatched file is refused here.
//! opt.restore(&Checkpoint::load("adamax.safetensors")?)?;
//! # Ok::<(), adamax_cuda::Error>(())
//! ```

mod convert;
mod file;
mod head;
mod legacy;
mod parse;
mod shard;
mod valid;

pub(crate) use head::{save_streamed, Head};
pub use shard::ShardCheckpoint;

use std::{collections::BTreeMap, path::Path};

use crate::{
    config::{
        AdamaxConfig, EpsilonMode, ParamMode, Precision, StateFormat, TensorHyper, WeightDecayMode,
    },
    error::{Error, Result},
    fused::{LossScaler, StepOptions},
    state::{
        parts::{Data, Elem, Part},
        Mode, MomentBound, Schedule, TensorState,
    },
    storage::StorageType,
};

/// The format this crate writes.
#[doc(hidden)]
pub const FORMAT: &str = "adamax-cuda/3";
/// The format of files made by PyTorch through scripts/torch_checkpoint.py.
#[doc(hidden)]
pub const TORCH_FORMAT: &str = "torch.optim.Adamax";

/// An optimizer's whole state on the host, without the parameters: what a checkpoint
/// file holds.
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
    /// Each tensor's shape, in parameter order, as its parameter has it (PyTorch's
    /// `param.shape`; `[n]` unless set with [`Optimizer::set_tensor_shape`]): the shape of
    /// its per-element entries in the file (moments, codes, master). The product of a
    /// shape is its tensor's element count (`[]`, a scalar, holds one).
    ///
    /// [`Optimizer::set_tensor_shape`]: crate::Optimizer::set_tensor_shape
    pub shapes: Vec<Vec<usize>>,
    /// Each tensor's name, in parameter order (its parameter's name in the model, set
    /// with [`Optimizer::set_tensor_name`]; `None` for an unnamed tensor and in
    /// PyTorch's files). [`Checkpoint::reordered`] goes by them.
    ///
    /// [`Optimizer::set_tensor_name`]: crate::Optimizer::set_tensor_name
    pub names: Vec<Option<String>>,
    /// Each tensor's state format, in parameter order
    /// ([`Optimizer::tensor_state_formats`]): with 8-bit state, the tensors kept in f32
    /// (below [`Precision::min_8bit_len`], or chosen) hold `exp_avg` and `exp_inf`, the
    /// others the 8-bit codes and scales; all [`StateFormat::F32`] with f32 state.
    ///
    /// [`Optimizer::tensor_state_formats`]: crate::Optimizer::tensor_state_formats
    pub state_formats: Vec<StateFormat>,
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
    Step,
    Part(Part),
}

impl Entry {
    /// The entry's name for tensor `i`: PyTorch's state names, `master.{i}`, and the
    /// 8-bit state's codes and scales.
    fn name(self, i: usize) -> String {
        match self {
            Entry::Step => format!("state.{i}.step"),
            Entry::Part(Part::Master) => format!("master.{i}"),
            Entry::Part(p) => format!("state.{i}.{}", p.name()),
        }
    }

    /// The entries of one tensor of `storage` in `precision` (its own state format's).
    fn of(storage: StorageType, precision: &Precision) -> Vec<Entry> {
        let mut all: Vec<Entry> = Mode::or_master(storage, precision)
            .parts
            .iter()
            .copied()
            .map(Entry::Part)
            .collect();
        all.push(Entry::Step);
        all
    }

    /// Values held for a tensor of `n` elements.
    fn len(self, n: usize) -> usize {
        match self {
            Entry::Step => 1,
            Entry::Part(p) => p.len(n),
        }
    }

    fn elem(self) -> Elem {
        match self {
            Entry::Step => Elem::F32,
            Entry::Part(p) => p.elem(),
        }
    }

    fn part(self) -> Option<Part> {
        match self {
            Entry::Step => None,
            Entry::Part(p) => Some(p),
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

impl MetaName for ParamMode {
    const ALL: &'static [Self] = &[ParamMode::Master, ParamMode::Stochastic];
    fn meta_name(self) -> &'static str {
        match self {
            ParamMode::Master => "master",
            ParamMode::Stochastic => "stochastic",
        }
    }
}

impl MetaName for StateFormat {
    const ALL: &'static [Self] = &[StateFormat::F32, StateFormat::Blockwise8];
    fn meta_name(self) -> &'static str {
        match self {
            StateFormat::F32 => "f32",
            StateFormat::Blockwise8 => "blockwise8",
        }
    }
}

/// Up to eight names of a checkpoint, for a message.
fn list_names(names: &[Option<String>]) -> String {
    let shown: Vec<String> = names
        .iter()
        .flatten()
        .take(8)
        .map(|n| format!("{n:?}"))
        .collect();
    let more = names.len().saturating_sub(shown.len());
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

impl Checkpoint {
    /// Checks that the checkpoint is whole, consistent and reachable by a run: a valid
    /// configuration and per-tensor settings, at least one tensor, one setting and one
    /// state per tensor, every part of the state of the length its modes need, no
    /// tensor with more steps than the optimizer, and state that a run can reach (the
    /// module's "What is refused"). `save`, `load` and `restore` all run it.
    pub fn validate(&self) -> Result<()> {
        self.validate_any(false)
    }

    /// [`Checkpoint::validate`], where `allow_empty` lets a list of no tensors pass (the
    /// pieces of a rank's shard that holds none).
    pub(super) fn validate_any(&self, allow_empty: bool) -> Result<()> {
        let steps: Vec<u64> = self.tensors.iter().map(|t| t.step).collect();
        self.head(&steps).validate_any(allow_empty)?;
        let bound = MomentBound::of(&self.config);
        // (The head's validation, above, has checked one shape, name and state format
        // per tensor.)
        for (i, t) in self.tensors.iter().enumerate() {
            let precision = &self.config.precision.with_state(self.state_formats[i]);
            let entries = Entry::of(self.storage, precision);
            let n = t.len();
            if crate::state::shape_len(&self.shapes[i]) != Some(n) {
                return Err(refuse(format!(
                    "tensor {i} has {n} elements but its shape {:?} holds {}",
                    self.shapes[i],
                    crate::state::shape_len(&self.shapes[i])
                        .map_or("more than an address can count".to_owned(), |k| k
                            .to_string())
                )));
            }
            for part in Part::ALL {
                let expected = if entries.contains(&Entry::Part(part)) {
                    part.len(n)
                } else {
                    0
                };
                let values = part.view(t);
                if values.len() != expected {
                    return Err(refuse(format!(
                        "tensor {i} of {n} elements has {} values of `{}`; {} parameters with {} state and {} need {expected}",
                        values.len(),
                        part.name(),
                        self.storage,
                        precision.state.meta_name(),
                        precision.params.meta_name(),
                    )));
                }
                valid::check_part(i, t.step, part, values)?;
            }
            valid::check_moments(i, bound, &t.exp_avg, &t.exp_inf)?;
            for (codes_part, m) in [
                (Part::ExpAvgCodes, &t.exp_avg_q8),
                (Part::ExpInfCodes, &t.exp_inf_q8),
            ] {
                valid::check_blocks(i, codes_part, &m.codes, &m.scales)?;
            }
            valid::check_ratio_scales(
                i,
                bound,
                (self.config.eps as f32, self.config.eps_mode),
                &t.exp_avg_q8.scales,
                &t.exp_inf_q8.scales,
            )?;
        }
        Ok(())
    }

    /// The same checkpoint with its tensors in the order of `names`: tensor `i` of the
    /// result is the one named `names[i]` here (state, shape, name and settings move
    /// together). This is how a checkpoint follows a model whose parameters come in
    /// another order than when it was saved (a candle `VarMap` lists its variables in
    /// no fixed order): pass the names in the optimizer's order, then
    /// [`Optimizer::restore`](crate::Optimizer::restore). Every tensor must be named
    /// here and named exactly once in `names`; otherwise nothing is returned but an
    /// [`Error::Checkpoint`] that says which name is missing or extra.
    ///
    /// ```
    /// use adamax_cuda::{cpu::CpuAdamax, AdamaxConfig, Optimizer};
    /// let (mut w, mut b) = (vec![0.5f32; 6], vec![0.0f32; 2]);
    /// let mut opt = CpuAdamax::new(AdamaxConfig::default(), &[&w, &b])?;
    /// opt.set_tensor_name(0, Some("fc.weight"))?;
    /// opt.set_tensor_name(1, Some("fc.bias"))?;
    /// opt.step(&mut [&mut w, &mut b], &[&[0.1; 6], &[0.2; 2]])?;
    /// let ck = opt.checkpoint()?;
    ///
    /// // The same model, its parameters listed the other way round.
    /// let mut other = CpuAdamax::new(AdamaxConfig::default(), &[&b, &w])?;
    /// other.set_tensor_name(0, Some("fc.bias"))?;
    /// other.set_tensor_name(1, Some("fc.weight"))?;
    /// assert!(other.restore(&ck).is_err()); // names differ at each index
    /// other.restore(&ck.reordered(&["fc.bias", "fc.weight"])?)?;
    /// assert_eq!(other.state()?[0], opt.state()?[1]);
    /// # Ok::<(), adamax_cuda::Error>(())
    /// ```
    pub fn reordered<S: AsRef<str>>(&self, names: &[S]) -> Result<Self> {
        self.validate()?;
        let mut index = std::collections::HashMap::with_capacity(self.names.len());
        for (i, name) in self.names.iter().enumerate() {
            let Some(name) = name else {
                return Err(refuse(format!(
                    "tensor {i} has no name, so it cannot be found by name; save checkpoints from an optimizer whose tensors are named (Optimizer::set_tensor_name)"
                )));
            };
            index.insert(name.as_str(), i);
        }
        if names.len() != self.names.len() {
            return Err(refuse(format!(
                "it holds {} tensors but {} names were given; give every tensor's name once",
                self.names.len(),
                names.len()
            )));
        }
        let mut order = Vec::with_capacity(names.len());
        for name in names {
            let name = name.as_ref();
            match index.remove(name) {
                Some(i) => order.push(i),
                None if self.names.iter().flatten().any(|n| n == name) => {
                    return Err(refuse(format!(
                        "the name {name:?} was given twice; give every tensor's name once"
                    )))
                }
                None => {
                    return Err(refuse(format!(
                        "it holds no tensor named {name:?}; it holds {}",
                        list_names(&self.names)
                    )))
                }
            }
        }
        Ok(Self {
            tensors: order.iter().map(|&i| self.tensors[i].clone()).collect(),
            shapes: order.iter().map(|&i| self.shapes[i].clone()).collect(),
            names: order.iter().map(|&i| self.names[i].clone()).collect(),
            state_formats: order.iter().map(|&i| self.state_formats[i]).collect(),
            hypers: order.iter().map(|&i| self.hypers[i]).collect(),
            config: self.config,
            step: self.step,
            storage: self.storage,
            options: self.options,
            scaler: self.scaler,
        })
    }

    /// Checks that this checkpoint is valid and fits an optimizer over tensors of
    /// `lens` with storage `storage` kept in `precision`, before anything is restored.
    fn check_fits(
        &self,
        storage: StorageType,
        precision: &Precision,
        lens: &[usize],
    ) -> Result<()> {
        // An optimizer over no tensors is a rank's shard that holds no piece.
        self.validate_any(lens.is_empty())?;
        self.check_precision(precision)?;
        if self.storage != storage {
            return Err(refuse(format!(
                "it holds the state of {} parameters; this optimizer steps {storage}; {}",
                self.storage,
                if self.storage.has_master() && storage.has_master() {
                    "a master-weight run's state does not depend on the 16-bit type: set the checkpoint's `storage` to the optimizer's and restore"
                } else {
                    "restore it into an optimizer of the checkpoint's storage type"
                }
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
            if t.len() != n {
                return Err(refuse(format!(
                    "tensor {i} has {} elements in the file and {n} in the optimizer",
                    t.len()
                )));
            }
        }
        Ok(())
    }

    /// The schedule an optimizer with `schedule` over tensors of `lens` and `storage`
    /// takes from this checkpoint on a restore: everything checked ([`Self::check_fits`],
    /// and the settings, shapes, names and state formats with the optimizer's), nothing
    /// changed.
    pub(crate) fn schedule_for(
        &self,
        storage: StorageType,
        schedule: &Schedule,
        lens: &[usize],
    ) -> Result<Schedule> {
        self.check_fits(storage, &schedule.config().precision, lens)?;
        let mut next = schedule.clone();
        next.replace(
            self.config,
            &self.hypers,
            &self.shapes,
            &self.names,
            &self.state_formats,
        )?;
        Ok(next)
    }

    /// Checks that the checkpoint's storage modes are `precision`'s (the state's
    /// layout depends on them); [`Checkpoint::convert_state`] changes the state format.
    fn check_precision(&self, precision: &Precision) -> Result<()> {
        let have = &self.config.precision;
        if have.params != precision.params || have.state != precision.state {
            return Err(refuse(format!(
                "it holds {} state with {} parameters; this optimizer keeps {} state with {} parameters (Checkpoint::convert_state converts the state format)",
                have.state.meta_name(),
                have.params.meta_name(),
                precision.state.meta_name(),
                precision.params.meta_name()
            )));
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
            shapes: &self.shapes,
            names: &self.names,
            formats: &self.state_formats,
            hypers: &self.hypers,
            options: &self.options,
            scaler: self.scaler.as_ref(),
        }
    }

    /// Serialises to safetensors bytes (after [`Checkpoint::validate`]). A header
    /// larger than [`Checkpoint::load`] reads (100 MB, about 300,000 tensors) is
    /// refused.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        file_bytes(self, file::plan(self)?)
    }

    /// Parses and validates safetensors bytes written by this crate or by
    /// scripts/torch_checkpoint.py.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Self::from_raw(read_bytes(bytes)?)
    }

    /// Writes the checkpoint to `path` atomically (after [`Checkpoint::validate`]): to
    /// a temporary file beside it, then renamed over it, so a crash leaves either the
    /// old file or the new one. Tensors are written as they are encoded, without a
    /// copy of the whole file in memory. What [`Checkpoint::load`] would refuse (an
    /// invalid state, a header larger than it reads) is refused before any file is
    /// created.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        save_file(self, file::plan(self)?, path.as_ref())
    }

    /// Reads and validates a checkpoint file: a regular file, read no further than its
    /// header declares.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_raw(read_path(path.as_ref())?)
    }
}

/// The file of `plan` with `ck`'s tensors, in memory.
fn file_bytes(ck: &Checkpoint, plan: file::Plan) -> Result<Vec<u8>> {
    let mut out = std::io::Cursor::new(Vec::new());
    file::write(ck, plan, &mut out).map_err(|e| match e {
        file::WriteError::Invalid(e) => e,
        file::WriteError::Io(e) => refuse(format!("cannot serialise: {e}")),
    })?;
    Ok(out.into_inner())
}

/// The file of `plan` with `ck`'s tensors, written to `path` atomically.
fn save_file(ck: &Checkpoint, plan: file::Plan, path: &Path) -> Result<()> {
    crate::fsutil::write_atomically_with(path, |w| {
        file::write(ck, plan, w).map_err(|e| match e {
            file::WriteError::Invalid(_) => std::io::Error::other(e.to_string()),
            file::WriteError::Io(e) => e,
        })
    })
}

/// Reads a file's bytes, no further than its header declares; nothing validated yet.
fn read_bytes(bytes: &[u8]) -> Result<file::RawFile> {
    file::read(&mut &bytes[..], bytes.len() as u64).map_err(|e| match e {
        file::ReadError::Refused(e) => e,
        file::ReadError::Io(e) => refuse(format!("unreadable ({e})")),
    })
}

/// Reads a file of this crate's or PyTorch's: a regular file, read no further than its
/// header declares; nothing validated yet.
fn read_path(path: &Path) -> Result<file::RawFile> {
    let io = |source| Error::io("reading", path, source);
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
    file::read(&mut std::io::BufReader::new(&mut f), meta.len()).map_err(|e| match e {
        file::ReadError::Refused(e) => e,
        file::ReadError::Io(source) => io(source),
    })
}
