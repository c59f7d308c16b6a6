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

use std::{collections::BTreeMap, path::Path};

use crate::{
    config::{AdamaxConfig, EpsilonMode, TensorHyper, WeightDecayMode},
    error::{Error, Result},
    fused::{LossScaler, StepOptions},
    state::{check_pairs, TensorState},
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
        check_pairs(&self.config, &self.hypers)?;
        self.options.validate()?;
        if let Some(s) = &self.scaler {
            s.validate()?;
        }
        if self.hypers.len() != self.tensors.len() {
            return Err(refuse(format!(
                "it holds hyperparameters for {} tensors and state for {}",
                self.hypers.len(),
                self.tensors.len()
            )));
        }
        for (i, t) in self.tensors.iter().enumerate() {
            if t.step > self.step {
                return Err(refuse(format!(
                    "tensor {i} took {} steps but the optimizer only {}",
                    t.step, self.step
                )));
            }
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
        let c = &self.config;
        let mut meta: BTreeMap<String, String> = [
            ("format", FORMAT.to_owned()),
            ("storage", self.storage.as_str().to_owned()),
            ("step", self.step.to_string()),
            ("tensors", self.tensors.len().to_string()),
            ("lr", c.lr.to_string()),
            ("beta1", c.beta1.to_string()),
            ("beta2", c.beta2.to_string()),
            ("eps", c.eps.to_string()),
            ("weight_decay", c.weight_decay.to_string()),
            ("eps_mode", c.eps_mode.meta_name().to_owned()),
            (
                "weight_decay_mode",
                c.weight_decay_mode.meta_name().to_owned(),
            ),
            ("maximize", c.maximize.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (i, t) in self.tensors.iter().enumerate() {
            if t.step != self.step {
                meta.insert(format!("tensor.{i}.step"), t.step.to_string());
            }
        }
        let o = &self.options;
        for (k, v) in [("inv_scale", o.inv_scale), ("max_norm", o.max_norm)] {
            if let Some(v) = v {
                meta.insert(format!("options.{k}"), v.to_string());
            }
        }
        meta.insert(
            "options.skip_nonfinite".into(),
            o.skip_nonfinite.to_string(),
        );
        if let Some(s) = &self.scaler {
            for (k, v) in [
                ("scale", s.scale.to_string()),
                ("growth_factor", s.growth_factor.to_string()),
                ("backoff_factor", s.backoff_factor.to_string()),
                ("growth_interval", s.growth_interval.to_string()),
                ("growth_tracker", s.growth_tracker.to_string()),
            ] {
                meta.insert(format!("scaler.{k}"), v);
            }
        }
        for (i, h) in self.hypers.iter().enumerate() {
            meta.insert(format!("tensor.{i}.lr_scale"), h.lr_scale.to_string());
            meta.insert(
                format!("tensor.{i}.weight_decay"),
                h.weight_decay.to_string(),
            );
        }
        meta
    }

    /// Serialises to safetensors bytes (after [`Checkpoint::validate`]).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        file::write(self, &mut out).map_err(|e| match e {
            file::WriteError::Invalid(e) => e,
            file::WriteError::Io(e) => refuse(format!("cannot serialise: {e}")),
        })?;
        Ok(out)
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

    /// Validates what [`file::read`] found and builds the checkpoint from it.
    fn from_raw(raw: file::RawFile) -> Result<Self> {
        if let Some(stored) = raw.meta.get(file::CHECKSUM_KEY) {
            file::verify_checksum(&raw, stored)?;
        }
        let file::RawFile {
            meta,
            tensors: mut entries_in_file,
        } = raw;
        let get = |k: &str| {
            meta.get(k)
                .map(String::as_str)
                .ok_or_else(|| refuse(format!("metadata has no `{k}`")))
        };
        let format = get("format")?;
        if format != FORMAT && format != TORCH_FORMAT {
            return Err(refuse(format!(
                "format `{format}`; expected `{FORMAT}` or `{TORCH_FORMAT}`"
            )));
        }
        if format == FORMAT && !meta.contains_key(file::CHECKSUM_KEY) {
            return Err(refuse(format!(
                "it has no `{}`; files of format {FORMAT} always carry one",
                file::CHECKSUM_KEY
            )));
        }
        let num = |k: &str| -> Result<f64> {
            get(k)?
                .parse::<f64>()
                .map_err(|_| refuse(format!("metadata `{k}` is not a number")))
        };
        let count = |k: &str| -> Result<u64> {
            get(k)?
                .parse::<u64>()
                .map_err(|_| refuse(format!("metadata `{k}` is not a count")))
        };
        fn mode<M: MetaName>(key: &str, value: &str) -> Result<M> {
            M::from_meta(value).ok_or_else(|| refuse(format!("unknown {key} `{value}`")))
        }
        let storage: StorageType = get("storage")?.parse().map_err(refuse)?;
        let config = AdamaxConfig {
            lr: num("lr")?,
            beta1: num("beta1")?,
            beta2: num("beta2")?,
            eps: num("eps")?,
            weight_decay: num("weight_decay")?,
            eps_mode: mode("eps_mode", get("eps_mode")?)?,
            weight_decay_mode: mode("weight_decay_mode", get("weight_decay_mode")?)?,
            maximize: match get("maximize")? {
                "true" => true,
                "false" => false,
                other => return Err(refuse(format!("maximize is `{other}`"))),
            },
        };
        config.validate()?;
        let step = count("step")?;
        // The count is checked against the entries the file holds before anything is
        // sized from it.
        let entries = Entry::of(storage);
        let n_tensors = usize::try_from(count("tensors")?)
            .ok()
            .filter(|n| n.checked_mul(entries.len()) == Some(entries_in_file.len()))
            .ok_or_else(|| {
                refuse(format!(
                    "metadata says {} tensors of {storage}, but the file holds {} entries ({} per tensor)",
                    meta.get("tensors").map_or("?", String::as_str),
                    entries_in_file.len(),
                    entries.len()
                ))
            })?;
        let mut take = |entry: Entry, i: usize, shape: Option<&[usize]>| -> Result<Vec<f32>> {
            let name = entry.name(i);
            let t = entries_in_file
                .remove(&name)
                .ok_or_else(|| refuse(format!("`{name}` is missing")))?;
            let ok = match shape {
                Some(s) => t.shape == s,
                None => t.shape.len() == 1,
            };
            if !ok {
                return Err(refuse(format!(
                    "`{name}` has shape {:?}, expected {}",
                    t.shape,
                    shape.map_or("1-D".to_owned(), |s| format!("{s:?}"))
                )));
            }
            Ok(t.data)
        };
        let mut tensors = Vec::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let exp_avg = take(Entry::ExpAvg, i, None)?;
            let n = [exp_avg.len()];
            let exp_inf = take(Entry::ExpInf, i, Some(&n))?;
            let master = if storage.has_master() {
                take(Entry::Master, i, Some(&n))?
            } else {
                Vec::new()
            };
            // The scalar is what PyTorch reads; it must agree with the exact count:
            // the metadata's for this tensor, else the optimizer's, else (a PyTorch file
            // whose tensors took different numbers of steps) the scalar itself when it
            // is a whole number that f32 holds exactly.
            let s = take(Entry::Step, i, Some(&[]))?
                .first()
                .copied()
                .unwrap_or(f32::NAN);
            let tensor_step = match meta.get(&format!("tensor.{i}.step")) {
                Some(v) => v
                    .parse::<u64>()
                    .map_err(|_| refuse(format!("metadata `tensor.{i}.step` is not a count")))?,
                None if s == step as f32 => step,
                None if s.fract() == 0.0 && (0.0..=16_777_216.0).contains(&s) => s as u64,
                None => {
                    return Err(refuse(format!(
                        "`{}` is {s} but the metadata says step {step}",
                        Entry::Step.name(i)
                    )))
                }
            };
            if s != tensor_step as f32 {
                return Err(refuse(format!(
                    "`{}` is {s} but tensor {i} took {tensor_step} steps",
                    Entry::Step.name(i)
                )));
            }
            tensors.push(TensorState {
                step: tensor_step,
                exp_avg,
                exp_inf,
                master,
            });
        }
        let mut hypers = vec![TensorHyper::from_config(&config); n_tensors];
        for (i, h) in hypers.iter_mut().enumerate() {
            let (scale, wd) = (
                format!("tensor.{i}.lr_scale"),
                format!("tensor.{i}.weight_decay"),
            );
            if meta.contains_key(&scale) || meta.contains_key(&wd) {
                *h = TensorHyper {
                    lr_scale: num(&scale)?,
                    weight_decay: num(&wd)?,
                };
            }
        }
        let parse = |k: &str| -> Result<Option<&str>> { Ok(meta.get(k).map(String::as_str)) };
        let number = |k: &str| -> Result<Option<f32>> {
            parse(k)?
                .map(|v| {
                    v.parse::<f32>()
                        .map_err(|_| refuse(format!("metadata `{k}` is not a number")))
                })
                .transpose()
        };
        let options = StepOptions {
            inv_scale: number("options.inv_scale")?,
            max_norm: number("options.max_norm")?,
            skip_nonfinite: match parse("options.skip_nonfinite")? {
                None | Some("false") => false,
                Some("true") => true,
                Some(other) => return Err(refuse(format!("options.skip_nonfinite is `{other}`"))),
            },
        };
        let scaler = match number("scaler.scale")? {
            None => None,
            Some(scale) => {
                let whole = |k: &str| -> Result<u32> {
                    get(k)?
                        .parse::<u32>()
                        .map_err(|_| refuse(format!("metadata `{k}` is not a count")))
                };
                Some(LossScaler {
                    scale,
                    growth_factor: num("scaler.growth_factor")?,
                    backoff_factor: num("scaler.backoff_factor")?,
                    growth_interval: whole("scaler.growth_interval")?,
                    growth_tracker: whole("scaler.growth_tracker")?,
                })
            }
        };
        let ck = Self {
            config,
            step,
            storage,
            tensors,
            hypers,
            options,
            scaler,
        };
        ck.validate()?;
        Ok(ck)
    }
}
