//! What both optimizers and the checkpoint share: the per-tensor state, the schedule
//! (configuration and per-tensor settings), and the checks of a step's arguments, so
//! that the CPU reference and the GPU refuse exactly the same inputs; below them, the
//! table of storage modes ([`modes`]) and the parts a tensor's state is made of
//! ([`parts`]).

mod bound;
pub(crate) mod modes;
pub(crate) mod parts;

pub(crate) use bound::MomentBound;
pub(crate) use modes::Mode;

#[cfg(doc)]
use crate::config::ParamMode;
use crate::{
    config::{AdamaxConfig, Precision, StateFormat, TensorHyper},
    error::{Error, Result},
    spec::lowbit::Blockwise8,
    storage::Storage,
};

/// The optimizer state of one tensor: its step count, `m`, `u`, and the f32 master copy
/// of a 16-bit parameter (empty for f32 parameters). Which fields are in use follows the
/// [`Precision`]: `exp_avg`/`exp_inf` with f32 state, `exp_avg_q8`/`exp_inf_q8` with
/// 8-bit state; the unused ones are empty.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TensorState {
    /// Steps this tensor took (PyTorch's per-parameter `state["step"]`): a tensor without
    /// a gradient in a step is skipped and does not count it, and its bias correction
    /// uses this count.
    pub step: u64,
    /// First moment `m` (PyTorch's `exp_avg`).
    pub exp_avg: Vec<f32>,
    /// Infinity norm `u` (PyTorch's `exp_inf`); never negative.
    pub exp_inf: Vec<f32>,
    /// f32 master weights; empty for f32 parameters, which are their own master, and
    /// for [`ParamMode::Stochastic`].
    pub master: Vec<f32>,
    /// `m` in 8 bits ([`StateFormat::Blockwise8`]), as its ratio to the step's
    /// denominator (`m / u`, or `m / (u + eps)` with eps in the denominator; decode with
    /// [`Blockwise8::decode_state`]); empty otherwise.
    pub exp_avg_q8: Blockwise8,
    /// `u` in 8 bits ([`StateFormat::Blockwise8`]); empty otherwise.
    pub exp_inf_q8: Blockwise8,
}

impl TensorState {
    /// Zeroed moments for a tensor in the default precision, with the master copy
    /// initialised from `param` when `T` is a 16-bit type.
    pub fn new<T: Storage>(param: &[T]) -> Self {
        Self::with_precision(param, &Precision::default())
    }

    /// Zeroed moments in the state format `precision` gives a tensor of `param`'s
    /// length ([`Precision::tensor_state`]: f32 below [`Precision::min_8bit_len`]),
    /// with a master copy initialised from `param` when `T` is a 16-bit type kept with
    /// [`ParamMode::Master`]. (A parameter mode the type does not have, which the
    /// optimizers refuse, is taken as [`ParamMode::Master`].)
    pub fn with_precision<T: Storage>(param: &[T], precision: &Precision) -> Self {
        let n = param.len();
        let mut state = Self::default();
        for &part in Mode::or_master(T::TYPE, &precision.for_len(n)).parts {
            let values = if part == parts::Part::Master {
                parts::Data::F32(param.iter().map(|x| x.to_f32()).collect())
            } else {
                part.zeros(n)
            };
            // Cannot fail: `zeros` gives each part its own type.
            let _ = part.store(&mut state, values);
        }
        state
    }

    /// Replaces the moments by zeroed ones in `precision`'s state format, keeping the
    /// step count and the master (for a tensor whose format is chosen before its first
    /// step).
    pub(crate) fn reset_moments(
        &mut self,
        storage: crate::storage::StorageType,
        n: usize,
        precision: &Precision,
    ) {
        let parts = Mode::or_master(storage, precision).parts;
        for part in parts::Part::ALL {
            if part == parts::Part::Master {
                continue;
            }
            let values = if parts.contains(&part) {
                part.zeros(n)
            } else {
                parts::Data::empty(part.elem())
            };
            // Cannot fail: `zeros` and `empty` give each part its own type.
            let _ = part.store(self, values);
        }
    }

    /// Elements of the tensor.
    pub fn len(&self) -> usize {
        self.exp_avg.len().max(self.exp_avg_q8.codes.len())
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The configuration and per-tensor hyperparameters of an optimizer, validated
/// together on every change. Shared by both optimizers so that they accept the same
/// settings. (Step counting is each optimizer's own: the GPU keeps its count on the
/// device, where skips are decided.)
#[derive(Clone, Debug)]
pub(crate) struct Schedule {
    config: AdamaxConfig,
    hypers: Vec<TensorHyper>,
    /// Each tensor's shape for checkpoints (`[len]` unless set); its element count is
    /// always the tensor's.
    shapes: Vec<Vec<usize>>,
    /// Each tensor's name for checkpoints (`None` unless set), unique among the named.
    names: Vec<Option<String>>,
    /// Which tensor each name names: what `set_name` checks a new name against (a scan
    /// of every name made naming a list of n tensors take n^2 / 2 comparisons).
    named: std::collections::HashMap<String, usize>,
    /// Each tensor's state format: the config's rule ([`Precision::tensor_state`])
    /// unless chosen by hand before the first step.
    formats: Vec<StateFormat>,
}

impl Schedule {
    /// The config's own hyperparameters and 1-D shapes for tensors of `lens`; refuses
    /// an invalid `config`.
    pub(crate) fn new(config: AdamaxConfig, lens: &[usize]) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            hypers: vec![TensorHyper::from_config(&config); lens.len()],
            shapes: lens.iter().map(|&n| vec![n]).collect(),
            names: vec![None; lens.len()],
            named: std::collections::HashMap::new(),
            formats: lens
                .iter()
                .map(|&n| config.precision.tensor_state(n))
                .collect(),
        })
    }

    pub(crate) fn formats(&self) -> &[StateFormat] {
        &self.formats
    }

    /// Tensor `i`'s precision: the config's, in the tensor's state format.
    pub(crate) fn precision_of(&self, i: usize) -> Precision {
        self.config.precision.with_state(self.formats[i])
    }

    /// Keeps tensor `i`'s moments in `format`; refuses 8 bits in an optimizer of f32
    /// state, and any change once `fixed` says why formats can no longer change. Returns
    /// whether the format changed.
    pub(crate) fn set_format(
        &mut self,
        i: usize,
        format: StateFormat,
        fixed: Option<&str>,
    ) -> Result<bool> {
        let count = self.formats.len();
        let current = *self
            .formats
            .get(i)
            .ok_or(Error::TensorIndexOutOfRange { index: i, count })?;
        if format == current {
            return Ok(false);
        }
        let refuse = |reason: String| Error::StateFormat {
            tensor: i,
            format: format_name(format),
            reason,
        };
        if self.config.precision.state == StateFormat::F32 {
            return Err(refuse(
                "this optimizer keeps f32 state; build it with StateFormat::Blockwise8 (and a min_8bit_len) to keep some tensors in 8 bits".into(),
            ));
        }
        if let Some(why) = fixed {
            return Err(refuse(format!(
                "{why}; state formats are chosen before the first step (build a new optimizer, or convert a checkpoint with Checkpoint::convert_state)"
            )));
        }
        self.formats[i] = format;
        Ok(true)
    }

    /// Every tensor's format at once, as [`Schedule::set_format`] checks each: all or
    /// nothing. Returns the tensors whose format changed.
    pub(crate) fn set_formats(
        &mut self,
        formats: &[StateFormat],
        fixed: Option<&str>,
    ) -> Result<Vec<usize>> {
        if formats.len() != self.formats.len() {
            return Err(Error::TensorCountMismatch {
                what: "state formats",
                expected: self.formats.len(),
                found: formats.len(),
            });
        }
        let before = self.formats.clone();
        let mut changed = Vec::new();
        for (i, &f) in formats.iter().enumerate() {
            match self.set_format(i, f, fixed) {
                Ok(true) => changed.push(i),
                Ok(false) => {}
                Err(e) => {
                    self.formats = before;
                    return Err(e);
                }
            }
        }
        Ok(changed)
    }

    pub(crate) fn names(&self) -> &[Option<String>] {
        &self.names
    }

    /// Names tensor `i` (or, with `None`, takes its name away); refuses a name that
    /// [`check_names`] refuses, the optimizer's other names included.
    pub(crate) fn set_name(&mut self, i: usize, name: Option<&str>) -> Result<()> {
        let count = self.names.len();
        if i >= count {
            return Err(Error::TensorIndexOutOfRange { index: i, count });
        }
        if let Some(name) = name {
            check_name(i, name)?;
            if let Some(&other) = self.named.get(name).filter(|&&j| j != i) {
                return Err(name_taken(i, name, other));
            }
        }
        if let Some(old) = self.names[i].take() {
            self.named.remove(&old);
        }
        if let Some(name) = name {
            self.named.insert(name.to_owned(), i);
        }
        self.names[i] = name.map(str::to_owned);
        Ok(())
    }

    pub(crate) fn shapes(&self) -> &[Vec<usize>] {
        &self.shapes
    }

    /// Sets tensor `i`'s shape, whose product must be its element count.
    pub(crate) fn set_shape(&mut self, i: usize, shape: &[usize]) -> Result<()> {
        let count = self.shapes.len();
        let slot = self
            .shapes
            .get_mut(i)
            .ok_or(Error::TensorIndexOutOfRange { index: i, count })?;
        check_shape(i, shape, tensor_len(slot)?)?;
        *slot = shape.to_vec();
        Ok(())
    }

    pub(crate) fn config(&self) -> &AdamaxConfig {
        &self.config
    }

    pub(crate) fn hypers(&self) -> &[TensorHyper] {
        &self.hypers
    }

    /// Sets tensor `i`'s hyperparameters after validating them with the config.
    pub(crate) fn set_hyper(&mut self, i: usize, hyper: TensorHyper) -> Result<()> {
        hyper.validate()?;
        self.config.check_scalars(&hyper)?;
        let count = self.hypers.len();
        let slot = self
            .hypers
            .get_mut(i)
            .ok_or(Error::TensorIndexOutOfRange { index: i, count })?;
        *slot = hyper;
        Ok(())
    }

    /// Changes the learning rate after checking it with every tensor's settings.
    pub(crate) fn set_lr(&mut self, lr: f64) -> Result<()> {
        let config = AdamaxConfig { lr, ..self.config };
        check_pairs(&config, &self.hypers)?;
        self.config = config;
        Ok(())
    }

    /// Replaces configuration, settings and shapes, after the same checks, and takes
    /// the checkpoint's names where the optimizer has none (for a restore): a tensor
    /// named on both sides must have the same name ([`Error::NameMismatch`]).
    pub(crate) fn replace(
        &mut self,
        config: AdamaxConfig,
        hypers: &[TensorHyper],
        shapes: &[Vec<usize>],
        names: &[Option<String>],
        formats: &[StateFormat],
    ) -> Result<()> {
        for (what, found) in [
            ("hyperparameters", hypers.len()),
            ("shapes", shapes.len()),
            ("names", names.len()),
            ("state formats", formats.len()),
        ] {
            if found != self.hypers.len() {
                return Err(Error::TensorCountMismatch {
                    what,
                    expected: self.hypers.len(),
                    found,
                });
            }
        }
        check_pairs(&config, hypers)?;
        for (i, (new, old)) in shapes.iter().zip(&self.shapes).enumerate() {
            check_shape(i, new, tensor_len(old)?)?;
        }
        let mut merged = Vec::with_capacity(names.len());
        for (i, (ours, theirs)) in self.names.iter().zip(names).enumerate() {
            merged.push(match (ours, theirs) {
                (Some(a), Some(b)) if a != b => {
                    return Err(Error::NameMismatch {
                        tensor: i,
                        expected: a.clone(),
                        found: b.clone(),
                    })
                }
                (Some(a), _) => Some(a.clone()),
                (None, b) => b.clone(),
            });
        }
        check_names(&merged)?;
        check_formats(&self.formats, formats)?;
        self.config = config;
        self.hypers = hypers.to_vec();
        self.shapes = shapes.to_vec();
        self.named = merged
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.clone().map(|n| (n, i)))
            .collect();
        self.names = merged;
        Ok(())
    }
}

/// Why state formats can no longer be chosen ([`Schedule::set_format`]).
pub(crate) const FIXED_BY_STEP: &str =
    "a step was called on this optimizer (one skipped for a non-finite gradient counts too)";
pub(crate) const FIXED_BY_RESTORE: &str = "the optimizer has restored a checkpoint";
pub(crate) const FIXED_BY_SHARD: &str = "this optimizer steps one rank's shard, whose pieces keep their whole tensors' formats (the configuration's min_8bit_len) on every rank";

/// `f32` or `8-bit`, for messages.
pub(crate) const fn format_name(format: StateFormat) -> &'static str {
    match format {
        StateFormat::F32 => "f32",
        StateFormat::Blockwise8 => "8-bit",
    }
}

/// Checks that a checkpoint's tensors keep the state formats an optimizer's do: a
/// restore copies state, it does not convert it.
pub(crate) fn check_formats(ours: &[StateFormat], theirs: &[StateFormat]) -> Result<()> {
    match ours.iter().zip(theirs).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(i) => Err(Error::StateFormat {
            tensor: i,
            format: format_name(theirs[i]),
            reason: format!(
                "the checkpoint keeps it in {} state and this optimizer in {}; convert the checkpoint to this optimizer's formats (ck.with_state_formats(opt.tensor_state_formats())), or restore into a new optimizer, not yet stepped, built with the checkpoint's config (Checkpoint::config, whose min_8bit_len gives the same formats unless some were chosen by hand) and given the checkpoint's formats with set_tensor_state_format (Checkpoint::state_formats)",
                format_name(theirs[i]),
                format_name(ours[i])
            ),
        }),
    }
}

/// The element count of a tensor of `shape` (1 for `[]`, a scalar), multiplied in
/// order; `None` when a product overflows (so `[2^40, 2^40, 0]` is refused everywhere,
/// although its product is 0: one rule for the optimizers and the files).
pub(crate) fn shape_len(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

/// The element count of a shape the schedule holds (checked when it was set).
fn tensor_len(shape: &[usize]) -> Result<usize> {
    shape_len(shape).ok_or(Error::Internal {
        what: "a tensor shape whose element count overflows passed its check",
    })
}

/// Checks that `shape` holds `expected` elements (tensor `tensor`'s count).
pub(crate) fn check_shape(tensor: usize, shape: &[usize], expected: usize) -> Result<()> {
    let found = shape_len(shape);
    if found != Some(expected) {
        return Err(Error::ShapeMismatch {
            tensor,
            shape: shape.to_vec(),
            expected,
            found,
        });
    }
    Ok(())
}

/// The longest tensor name, in bytes (PyTorch's and candle's parameter names are dotted
/// paths of a few dozen).
pub(crate) const MAX_NAME_BYTES: usize = 1024;

/// Checks tensor names: each one as [`check_name`] does, and no name given to two
/// tensors.
pub(crate) fn check_names(names: &[Option<String>]) -> Result<()> {
    let mut seen = std::collections::HashMap::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let Some(name) = name else { continue };
        check_name(i, name)?;
        if let Some(other) = seen.insert(name.as_str(), i) {
            return Err(name_taken(i, name, other));
        }
    }
    Ok(())
}

/// Checks tensor `i`'s name: non-empty, at most [`MAX_NAME_BYTES`] long, without
/// control characters (names go into error messages and file headers).
fn check_name(i: usize, name: &str) -> Result<()> {
    let refuse = |reason: String| Error::TensorName {
        tensor: i,
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(refuse(
            "is empty; give a name of at least one character, or none".into(),
        ));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(refuse(format!(
            "is {} bytes long; a name holds at most {MAX_NAME_BYTES}",
            name.len()
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(refuse(
            "holds a control character; use printable characters only".into(),
        ));
    }
    Ok(())
}

/// Tensor `i`'s name is tensor `other`'s already.
fn name_taken(i: usize, name: &str, other: usize) -> Error {
    Error::TensorName {
        tensor: i,
        name: name.to_owned(),
        reason: format!("is tensor {other}'s already; every name names one tensor"),
    }
}

/// Validates `config` and every per-tensor setting with it.
pub(crate) fn check_pairs(config: &AdamaxConfig, hypers: &[TensorHyper]) -> Result<()> {
    config.validate()?;
    for h in hypers {
        h.validate()?;
        config.check_scalars(h)?;
    }
    Ok(())
}

/// Checks that the parameter and gradient lists have one entry per tensor and that
/// every length matches the tensor's (a missing gradient, `None`, is fine: that tensor
/// is skipped); allocates nothing.
pub(crate) fn check_lists(
    expected: &[usize],
    params: impl ExactSizeIterator<Item = usize>,
    grads: impl ExactSizeIterator<Item = Option<usize>>,
) -> Result<()> {
    check_list(expected, "params", "param", params.map(Some))?;
    check_list(expected, "grads", "grad", grads)
}

fn check_list(
    expected: &[usize],
    list: &'static str,
    what: &'static str,
    lens: impl ExactSizeIterator<Item = Option<usize>>,
) -> Result<()> {
    if lens.len() != expected.len() {
        return Err(Error::TensorCountMismatch {
            what: list,
            expected: expected.len(),
            found: lens.len(),
        });
    }
    for (tensor, (&e, found)) in expected.iter().zip(lens).enumerate() {
        let Some(found) = found else { continue };
        if e != found {
            return Err(Error::LengthMismatch {
                what,
                tensor,
                expected: e,
                found,
            });
        }
    }
    Ok(())
}
