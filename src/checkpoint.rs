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
//! | `format` | `adamax-cuda/1` (files written by scripts/torch_checkpoint.py say `torch.optim.Adamax`) |
//! | `storage` | `f32`, `f16` or `bf16` |
//! | `step`, `tensors` | decimal integers |
//! | `lr`, `beta1`, `beta2`, `eps`, `weight_decay` | decimal numbers, round-trip exact |
//! | `eps_mode` | `inside_max` or `denominator` |
//! | `weight_decay_mode` | `coupled` or `decoupled` |
//! | `maximize` | `true` or `false` |
//! | `tensor.{i}.lr_scale`, `tensor.{i}.weight_decay` | per-tensor hyperparameters (parameter groups); absent in PyTorch's files, where the config's apply |
//!
//! Loading validates everything (format, every tensor's presence, type and shape, the
//! configuration) before an optimizer's state is touched: a truncated, mismatched or
//! corrupt file is an [`Error::Checkpoint`] and the live state stays as it was.

use std::{borrow::Cow, collections::HashMap, path::Path};

use safetensors::{tensor::TensorView, Dtype, SafeTensors, View};

use crate::{
    config::{AdamaxConfig, EpsilonMode, TensorHyper, WeightDecayMode},
    cpu::TensorState,
    error::{Error, Result},
};

/// The format written in the metadata.
pub const FORMAT: &str = "adamax-cuda/1";
/// The format of files made by PyTorch through scripts/torch_checkpoint.py.
pub const TORCH_FORMAT: &str = "torch.optim.Adamax";

/// An optimizer's whole state on the host: what a checkpoint file holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// The configuration in force.
    pub config: AdamaxConfig,
    /// Steps taken.
    pub step: u64,
    /// Parameter storage type: `"f32"`, `"f16"` or `"bf16"`.
    pub storage: String,
    /// Per-tensor state, in parameter order (masters empty for f32).
    pub tensors: Vec<TensorState>,
    /// Per-tensor hyperparameters, in parameter order.
    pub hypers: Vec<TensorHyper>,
}

fn refuse(reason: impl Into<String>) -> Error {
    Error::Checkpoint {
        reason: reason.into(),
    }
}

/// An f32 tensor borrowed for serialisation.
struct F32s<'a> {
    shape: Vec<usize>,
    data: &'a [f32],
}

impl View for F32s<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        4 * self.data.len()
    }
}

impl Checkpoint {
    /// Serialises to safetensors bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        // f32 counts integers exactly up to 2^24; the metadata keeps the exact value.
        let steps: Vec<f32> = vec![self.step as f32; self.tensors.len()];
        let mut views: Vec<(String, F32s<'_>)> = Vec::new();
        for (i, t) in self.tensors.iter().enumerate() {
            let n = t.exp_avg.len();
            views.push((
                format!("state.{i}.exp_avg"),
                F32s {
                    shape: vec![n],
                    data: &t.exp_avg,
                },
            ));
            views.push((
                format!("state.{i}.exp_inf"),
                F32s {
                    shape: vec![n],
                    data: &t.exp_inf,
                },
            ));
            views.push((
                format!("state.{i}.step"),
                F32s {
                    shape: vec![],
                    data: &steps[i..i + 1],
                },
            ));
            if self.storage != "f32" {
                views.push((
                    format!("master.{i}"),
                    F32s {
                        shape: vec![n],
                        data: &t.master,
                    },
                ));
            }
        }
        let c = &self.config;
        let mut meta: HashMap<String, String> = [
            ("format", FORMAT.to_owned()),
            ("storage", self.storage.clone()),
            ("step", self.step.to_string()),
            ("tensors", self.tensors.len().to_string()),
            ("lr", c.lr.to_string()),
            ("beta1", c.beta1.to_string()),
            ("beta2", c.beta2.to_string()),
            ("eps", c.eps.to_string()),
            ("weight_decay", c.weight_decay.to_string()),
            (
                "eps_mode",
                match c.eps_mode {
                    EpsilonMode::InsideMax => "inside_max",
                    EpsilonMode::Denominator => "denominator",
                }
                .to_owned(),
            ),
            (
                "weight_decay_mode",
                match c.weight_decay_mode {
                    WeightDecayMode::Coupled => "coupled",
                    WeightDecayMode::Decoupled => "decoupled",
                }
                .to_owned(),
            ),
            ("maximize", c.maximize.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (i, h) in self.hypers.iter().enumerate() {
            meta.insert(format!("tensor.{i}.lr_scale"), h.lr_scale.to_string());
            meta.insert(
                format!("tensor.{i}.weight_decay"),
                h.weight_decay.to_string(),
            );
        }
        safetensors::serialize(views, Some(meta))
            .map_err(|e| refuse(format!("cannot serialise: {e}")))
    }

    /// Parses and validates safetensors bytes written by this crate or by
    /// scripts/torch_checkpoint.py.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| refuse(format!("not a readable safetensors file ({e})")))?;
        let (_, header) = SafeTensors::read_metadata(bytes)
            .map_err(|e| refuse(format!("unreadable header ({e})")))?;
        let meta = header
            .metadata()
            .clone()
            .ok_or_else(|| refuse("no metadata: not an AdaMax checkpoint"))?;
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
        let storage = get("storage")?.to_owned();
        if !["f32", "f16", "bf16"].contains(&storage.as_str()) {
            return Err(refuse(format!("unknown storage `{storage}`")));
        }
        let config = AdamaxConfig {
            lr: num("lr")?,
            beta1: num("beta1")?,
            beta2: num("beta2")?,
            eps: num("eps")?,
            weight_decay: num("weight_decay")?,
            eps_mode: match get("eps_mode")? {
                "inside_max" => EpsilonMode::InsideMax,
                "denominator" => EpsilonMode::Denominator,
                other => return Err(refuse(format!("unknown eps_mode `{other}`"))),
            },
            weight_decay_mode: match get("weight_decay_mode")? {
                "coupled" => WeightDecayMode::Coupled,
                "decoupled" => WeightDecayMode::Decoupled,
                other => return Err(refuse(format!("unknown weight_decay_mode `{other}`"))),
            },
            maximize: match get("maximize")? {
                "true" => true,
                "false" => false,
                other => return Err(refuse(format!("maximize is `{other}`"))),
            },
        };
        config.validate()?;
        let step = count("step")?;
        let n_tensors =
            usize::try_from(count("tensors")?).map_err(|_| refuse("tensor count too large"))?;
        let expected_names = n_tensors * if storage == "f32" { 3 } else { 4 };
        if st.len() != expected_names {
            return Err(refuse(format!(
                "{} tensors in the file; {n_tensors} parameters of {storage} need {expected_names}",
                st.len()
            )));
        }
        let mut tensors = Vec::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let exp_avg = f32_vector(&st, &format!("state.{i}.exp_avg"), None)?;
            let n = exp_avg.len();
            let exp_inf = f32_vector(&st, &format!("state.{i}.exp_inf"), Some(n))?;
            let master = if storage == "f32" {
                Vec::new()
            } else {
                f32_vector(&st, &format!("master.{i}"), Some(n))?
            };
            let name = format!("state.{i}.step");
            let step_view = st
                .tensor(&name)
                .map_err(|_| refuse(format!("`{name}` is missing")))?;
            let s = f32_values(&name, &step_view, &[])?;
            // The scalar is what PyTorch reads; it must agree with the exact count.
            if s.first().copied() != Some(step as f32) {
                return Err(refuse(format!(
                    "`{name}` is {s:?} but the metadata says step {step}"
                )));
            }
            tensors.push(TensorState {
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
                h.validate()?;
            }
        }
        Ok(Self {
            config,
            step,
            storage,
            tensors,
            hypers,
        })
    }

    /// Writes the checkpoint to `path` atomically: to a temporary file beside it, then
    /// renamed over it, so a crash leaves either the old file or the new one.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_bytes()?;
        crate::fsutil::write_atomically(path, &bytes)
    }

    /// Reads and validates a checkpoint file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_bytes(&bytes)
    }

    /// Checks that this checkpoint fits an optimizer over tensors of `lens` with
    /// storage `storage`, before anything is restored.
    pub(crate) fn check_fits(&self, storage: &str, lens: &[usize]) -> Result<()> {
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
            let master_ok = if storage == "f32" {
                t.master.is_empty()
            } else {
                t.master.len() == n
            };
            if t.exp_avg.len() != n || t.exp_inf.len() != n || !master_ok {
                return Err(refuse(format!(
                    "tensor {i} has {} elements in the file and {n} in the optimizer",
                    t.exp_avg.len()
                )));
            }
        }
        if self.hypers.len() != lens.len() {
            return Err(refuse(format!(
                "it holds hyperparameters for {} tensors; this optimizer has {}",
                self.hypers.len(),
                lens.len()
            )));
        }
        for h in &self.hypers {
            h.validate()?;
        }
        self.config.validate()?;
        Ok(())
    }
}

fn f32_values(name: &str, view: &TensorView<'_>, shape: &[usize]) -> Result<Vec<f32>> {
    if view.dtype() != Dtype::F32 {
        return Err(refuse(format!(
            "`{name}` is {:?}, expected F32",
            view.dtype()
        )));
    }
    if view.shape() != shape {
        return Err(refuse(format!(
            "`{name}` has shape {:?}, expected {shape:?}",
            view.shape()
        )));
    }
    Ok(view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// The 1-D f32 tensor `name`, of length `len` when given.
fn f32_vector(st: &SafeTensors<'_>, name: &str, len: Option<usize>) -> Result<Vec<f32>> {
    let view = st
        .tensor(name)
        .map_err(|_| refuse(format!("`{name}` is missing")))?;
    let n = match (len, view.shape()) {
        (Some(n), _) => n,
        (None, [n]) => *n,
        (None, s) => return Err(refuse(format!("`{name}` has shape {s:?}, expected 1-D"))),
    };
    f32_values(name, &view, &[n])
}
