//! The public configuration: hyperparameters and the conventions on which AdaMax
//! implementations differ.

use crate::error::ConfigError;

/// Where epsilon enters the rule. The peers disagree; both are supported.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum EpsilonMode {
    /// `u = max(beta2 * u, |g| + eps)`, update `m / u`: PyTorch `torch.optim.Adamax` and
    /// optax `adamax`. The default.
    #[default]
    InsideMax,
    /// `u = max(beta2 * u, |g|)`, update `m / (u + eps)`: Keras `Adamax` and the seed
    /// write-up.
    Denominator,
}

/// How weight decay is applied when `weight_decay > 0`.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum WeightDecayMode {
    /// L2 regularisation added to the gradient, `g += weight_decay * theta`, before the
    /// moments see it: PyTorch `torch.optim.Adamax`. The default.
    #[default]
    Coupled,
    /// Decoupled decay of the weights by `lr * weight_decay * theta`, separate from the
    /// moments: Keras `Adamax(weight_decay=..)` and optax `adamaxw`. It is folded into
    /// the update term, `theta = theta - fma(lr * wd, theta, step_size * update)`, so that
    /// the parameter is rounded once per step (see [`crate::cpu`]); Keras applies
    /// `theta *= 1 - lr * wd` first, which rounds twice.
    Decoupled,
}

/// How 16-bit parameters are kept between steps.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ParamMode {
    /// An f32 master copy is stepped and the 16-bit parameter is its round-to-nearest
    /// (4 more bytes of state per parameter for f16 and bf16). The default; the only
    /// mode of f32 parameters, which are their own master.
    #[default]
    Master,
    /// No master copy: the 16-bit parameter is widened, stepped in f32, and rounded
    /// back **stochastically**, up or down with probabilities that make the rounding
    /// unbiased, from a counter-based random stream keyed by
    /// ([`Precision::seed`], step, tensor, element) (see [`crate::spec::lowbit`]). An
    /// update below half a unit in the last place still moves the parameter on average,
    /// where round-to-nearest would lose it. bf16 parameters only.
    Stochastic,
}

/// How the moments `m` and `u` are stored between steps.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum StateFormat {
    /// f32, 8 bytes per parameter: PyTorch's `exp_avg` and `exp_inf`. The default.
    #[default]
    F32,
    /// 8 bits per moment and element, with an f32 scale per block of
    /// [`crate::spec::lowbit::QBLOCK`] elements (about 2.03 bytes per parameter): `u`,
    /// and `m` as its ratio to the step's denominator (so AdaMax's step bound holds by
    /// construction), each as small floats relative to the block's largest magnitude,
    /// rounded stochastically (see [`crate::spec::lowbit`]). Each step decodes, updates in
    /// f32, and encodes again; the update of the step itself uses the f32 values.
    Blockwise8,
}

/// Storage modes: what a step keeps between steps, and so how many bytes it moves
/// ([`Precision::bytes_moved`]) and keeps ([`Precision::state_bytes`]); the README's
/// table lists every mode. Moving fewer bytes is the way past a copy's speed, since the
/// step is memory-bound: f32 moves 28 bytes per parameter, bf16 rounded stochastically
/// with 8-bit state about 10.
///
/// ```
/// use adamax_cuda::{AdamaxConfig, ParamMode, Precision, StateFormat};
/// let lean = AdamaxConfig {
///     precision: Precision {
///         params: ParamMode::Stochastic,
///         state: StateFormat::Blockwise8,
///         seed: 7,
///         ..Precision::default()
///     },
///     ..AdamaxConfig::default()
/// };
/// lean.validate()?;
/// # Ok::<(), adamax_cuda::ConfigError>(())
/// ```
///
/// Two precisions are equal when they store alike: the seed counts only for a mode that
/// draws from it ([`Precision::is_random`]), so a checkpoint of a deterministic mode
/// reads back equal whatever seed its configuration held.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Copy, Debug)]
pub struct Precision {
    /// How 16-bit parameters are kept. Default [`ParamMode::Master`].
    pub params: ParamMode,
    /// How `m` and `u` are stored. Default [`StateFormat::F32`].
    pub state: StateFormat,
    /// Seed of the random stream that stochastic rounding draws from; a run with the
    /// same seed, data and settings gives the same bits on the CPU and the GPU.
    /// Unused (and any value is fine) when nothing is rounded stochastically.
    pub seed: u64,
    /// With [`StateFormat::Blockwise8`], tensors of fewer elements keep f32 moments, in
    /// the same launch: biases, norm gains and other small tensors, whose 8-bit state
    /// would save little memory and whose updates the quantisation would disturb most
    /// (bitsandbytes' `min_8bit_size`, torchao's fallback). Default
    /// [`DEFAULT_MIN_8BIT_LEN`]; 0 puts every tensor in 8 bits. A tensor's format can
    /// also be chosen by hand before the first step
    /// ([`Optimizer::set_tensor_state_format`](crate::Optimizer::set_tensor_state_format)).
    /// Unused with f32 state. (Absent from a serialized config, it is the default.)
    #[cfg_attr(feature = "serde", serde(default = "default_min_8bit_len"))]
    pub min_8bit_len: usize,
}

/// The default [`Precision::min_8bit_len`]: 4096 elements, bitsandbytes' and torchao's
/// threshold (a model moved from them keeps the same tensors in 32 bits). In GPT-2
/// small it keeps every bias and norm gain in f32 state: 121,344 parameters (0.098%),
/// 724,272 bytes (0.29%) more state than 8 bits (`tests/per_tensor_state.rs` computes
/// it). A norm gain of exactly 4096 elements (Llama's) stays in 8 bits, as in
/// bitsandbytes: choose f32 for it by name, or raise the threshold. The README's
/// section on per-tensor state gives the measurements behind it.
pub const DEFAULT_MIN_8BIT_LEN: usize = 4096;

#[cfg(feature = "serde")]
fn default_min_8bit_len() -> usize {
    DEFAULT_MIN_8BIT_LEN
}

impl Default for Precision {
    fn default() -> Self {
        Self {
            params: ParamMode::default(),
            state: StateFormat::default(),
            seed: 0,
            min_8bit_len: DEFAULT_MIN_8BIT_LEN,
        }
    }
}

impl PartialEq for Precision {
    fn eq(&self, other: &Self) -> bool {
        (self.params, self.state) == (other.params, other.state)
            && (!self.is_random() || self.seed == other.seed)
            && (!self.is_8bit() || self.min_8bit_len == other.min_8bit_len)
    }
}

impl Eq for Precision {}

impl std::hash::Hash for Precision {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        (self.params, self.state).hash(h);
        if self.is_random() {
            self.seed.hash(h);
        }
        if self.is_8bit() {
            self.min_8bit_len.hash(h);
        }
    }
}

impl Precision {
    /// Whether any rounding draws from the random stream.
    pub const fn is_random(&self) -> bool {
        matches!(self.params, ParamMode::Stochastic)
            || matches!(self.state, StateFormat::Blockwise8)
    }

    /// Whether tensors may keep 8-bit state ([`StateFormat::Blockwise8`]).
    const fn is_8bit(&self) -> bool {
        matches!(self.state, StateFormat::Blockwise8)
    }

    /// The state format a tensor of `len` elements gets when none is chosen for it:
    /// f32 for f32 state, and for a tensor below [`Precision::min_8bit_len`]; else 8
    /// bits.
    ///
    /// ```
    /// use adamax_cuda::{Precision, StateFormat};
    /// let p = Precision { state: StateFormat::Blockwise8, ..Precision::default() };
    /// assert_eq!(p.tensor_state(768), StateFormat::F32); // a bias
    /// assert_eq!(p.tensor_state(768 * 768), StateFormat::Blockwise8);
    /// ```
    pub const fn tensor_state(&self, len: usize) -> StateFormat {
        match self.state {
            StateFormat::Blockwise8 if len >= self.min_8bit_len => StateFormat::Blockwise8,
            _ => StateFormat::F32,
        }
    }

    /// This precision for one tensor kept in `state` whatever its size (the parameter
    /// mode and seed are the optimizer's; the threshold is 0, so that
    /// [`Precision::tensor_state`] gives `state`).
    pub(crate) const fn with_state(self, state: StateFormat) -> Precision {
        Precision {
            state,
            min_8bit_len: 0,
            ..self
        }
    }

    /// This precision for a tensor of `len` elements: in the state format
    /// [`Precision::tensor_state`] gives it.
    pub(crate) const fn for_len(self, len: usize) -> Precision {
        self.with_state(self.tensor_state(len))
    }
    // `check_storage`, `state_bytes` and `bytes_moved` read the modes table:
    // src/state/modes.rs.
}

/// AdaMax hyperparameters (Kingma & Ba 2015, sec. 7.1) and conventions.
///
/// [`Default`] gives PyTorch's `torch.optim.Adamax` defaults: `lr = 2e-3`,
/// `beta1 = 0.9`, `beta2 = 0.999`, `eps = 1e-8`, no weight decay, epsilon inside the max,
/// minimising. Values are `f64`, like Python floats in the peers; the step derives the
/// `f32` scalars the arithmetic uses (see [`crate::spec::StepScalars`]).
///
/// ```
/// use adamax_cuda::{AdamaxConfig, EpsilonMode, WeightDecayMode};
/// let keras = AdamaxConfig {
///     lr: 1e-3,
///     eps: 1e-7,
///     eps_mode: EpsilonMode::Denominator,
///     weight_decay: 0.004,
///     weight_decay_mode: WeightDecayMode::Decoupled,
///     ..AdamaxConfig::default()
/// };
/// keras.validate()?;
/// # Ok::<(), adamax_cuda::ConfigError>(())
/// ```
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamaxConfig {
    /// Learning rate (alpha in the paper), `>= 0`. Default `2e-3` (PyTorch).
    pub lr: f64,
    /// Decay of the first moment `m`, in `[0, 1)`. Default `0.9`.
    pub beta1: f64,
    /// Decay of the infinity norm `u`, in `[0, 1)`. Default `0.999`.
    pub beta2: f64,
    /// Numerical stabiliser, `>= 0` (0 is allowed: a zero history still gives a zero
    /// update). Default `1e-8` (PyTorch, optax; Keras uses `1e-7`).
    pub eps: f64,
    /// Where `eps` enters the rule. Default [`EpsilonMode::InsideMax`] (PyTorch).
    pub eps_mode: EpsilonMode,
    /// Weight decay factor, `>= 0`; `0` disables it. Default `0`.
    pub weight_decay: f64,
    /// How weight decay is applied. Default [`WeightDecayMode::Coupled`] (PyTorch).
    pub weight_decay_mode: WeightDecayMode,
    /// Ascend the objective instead of descending it (PyTorch's `maximize`).
    pub maximize: bool,
    /// How parameters and moments are stored: f32 state and f32 master weights by
    /// default; see [`Precision`] for the modes that move fewer bytes. (Absent from a
    /// serialized config, it is the default.)
    #[cfg_attr(feature = "serde", serde(default))]
    pub precision: Precision,
}

impl Default for AdamaxConfig {
    fn default() -> Self {
        Self {
            lr: 2e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            eps_mode: EpsilonMode::InsideMax,
            weight_decay: 0.0,
            weight_decay_mode: WeightDecayMode::Coupled,
            maximize: false,
            precision: Precision::default(),
        }
    }
}

impl AdamaxConfig {
    /// Checks every field, returning the first one that is out of range.
    ///
    /// Refused: non-finite values, a negative learning rate or epsilon, betas outside
    /// `[0, 1)`, a negative weight decay, values whose f32 scalars (see
    /// [`AdamaxConfig::check_scalars`]) would be infinite, and with 8-bit state and eps in
    /// the denominator, an eps above 1e30 (`u + eps` must stay finite).
    pub fn validate(&self) -> Result<(), ConfigError> {
        check("lr", self.lr, 0.0, None, "lr >= 0")?;
        check("beta1", self.beta1, 0.0, Some(1.0), "0 <= beta1 < 1")?;
        check("beta2", self.beta2, 0.0, Some(1.0), "0 <= beta2 < 1")?;
        check("eps", self.eps, 0.0, None, "eps >= 0")?;
        check_weight_decay(self.weight_decay)?;
        // 8-bit state stores m as its ratio to u + eps, which must stay finite for every u:
        // below half a unit in the last place of f32's largest value (2^103), u + eps
        // rounds to at most f32::MAX.
        if self.precision.state == StateFormat::Blockwise8
            && self.eps_mode == EpsilonMode::Denominator
            && self.eps > 1e30
        {
            return Err(ConfigError::OutOfRange {
                field: "eps",
                value: self.eps,
                allowed: "eps <= 1e30 with 8-bit state and eps in the denominator, where m is stored as its ratio to u + eps",
            });
        }
        self.check_scalars(&TensorHyper::from_config(self))
    }

    /// Checks that every f32 scalar a step of a tensor with `hyper` derives is finite:
    /// `f32(eps)`, `f32(weight_decay)`, the largest step size `f32(lr * lr_scale / (1 -
    /// beta1))` (step 1; later bias corrections only shrink it) and, for decoupled decay,
    /// `f32(lr * lr_scale * weight_decay)`. A configuration that passes cannot turn a
    /// finite, zero or tiny gradient into an infinite scalar (`lr = 1e38` with a zero
    /// gradient would otherwise step by `inf * 0 = NaN`). The fields themselves must be
    /// valid (see [`AdamaxConfig::validate`]).
    ///
    /// With decoupled decay, each step also multiplies the weights by `1 - f32(lr *
    /// lr_scale * weight_decay)`: a factor at or below 0 means nothing (at -1 and below
    /// the weights grow without bound, to infinity and NaN on zero gradients), so that
    /// product must be below 1 ([`ConfigError::DecayFactor`]). A schedule that raises `lr`
    /// is checked against it too ([`Optimizer::set_lr`](crate::Optimizer::set_lr)).
    pub fn check_scalars(&self, hyper: &TensorHyper) -> Result<(), ConfigError> {
        let finite = |field: &'static str, value: f64, scalar: &'static str, x: f64| {
            if (x as f32).is_finite() {
                Ok(())
            } else {
                Err(ConfigError::NotRepresentable {
                    field,
                    value,
                    scalar,
                })
            }
        };
        finite("eps", self.eps, "eps", self.eps)?;
        finite(
            "weight_decay",
            hyper.weight_decay,
            "weight_decay",
            hyper.weight_decay,
        )?;
        let lr = self.lr * hyper.lr_scale;
        let lr_field = if hyper.lr_scale == 1.0 {
            ("lr", self.lr)
        } else {
            ("lr_scale", hyper.lr_scale)
        };
        finite(
            lr_field.0,
            lr_field.1,
            "step size lr * lr_scale / (1 - beta1)",
            lr / (1.0 - self.beta1),
        )?;
        if self.weight_decay_mode == WeightDecayMode::Decoupled {
            finite(
                "weight_decay",
                hyper.weight_decay,
                "lr * lr_scale * weight_decay",
                lr * hyper.weight_decay,
            )?;
            // The f32 factor the step uses: each step takes lr_wd * theta off theta.
            let lr_wd = (lr * hyper.weight_decay) as f32;
            if lr_wd >= 1.0 {
                return Err(ConfigError::DecayFactor {
                    lr: self.lr,
                    lr_scale: hyper.lr_scale,
                    weight_decay: hyper.weight_decay,
                    product: f64::from(lr_wd),
                });
            }
        }
        Ok(())
    }
}

fn check_weight_decay(value: f64) -> Result<(), ConfigError> {
    check("weight_decay", value, 0.0, None, "weight_decay >= 0")
}

/// `value` must be finite, `>= min`, and `< max_exclusive` when given.
fn check(
    field: &'static str,
    value: f64,
    min: f64,
    max_exclusive: Option<f64>,
    allowed: &'static str,
) -> Result<(), ConfigError> {
    if !value.is_finite() {
        return Err(ConfigError::NotFinite { field, value });
    }
    if value < min || max_exclusive.is_some_and(|max| value >= max) {
        return Err(ConfigError::OutOfRange {
            field,
            value,
            allowed,
        });
    }
    Ok(())
}

/// Per-tensor hyperparameters, PyTorch's parameter groups: the tensor's learning rate is
/// `lr_scale * config.lr` (so a schedule that changes `lr` moves every group alike), and
/// its weight decay replaces `config.weight_decay` (0 for biases and norms, typically).
///
/// Tensors are named by their index in the list the optimizer was built with; a group
/// is the indices you give the same settings, for instance every bias and norm gain:
///
/// ```
/// use adamax_cuda::{cpu::CpuAdamax, AdamaxConfig, Optimizer, TensorHyper};
/// let (w, b) = (vec![0.5f32; 6], vec![0.0f32; 3]);
/// let config = AdamaxConfig { weight_decay: 0.01, ..AdamaxConfig::default() };
/// let mut opt = CpuAdamax::new(config, &[&w, &b])?;
/// let no_decay = [1]; // the bias
/// for i in no_decay {
///     opt.set_tensor_hyper(i, TensorHyper::no_decay())?;
/// }
/// # Ok::<(), adamax_cuda::Error>(())
/// ```
///
/// There is no `Default`: `TensorHyper { lr_scale: 0.1, ..Default::default() }` would
/// drop the config's weight decay unseen; start from [`TensorHyper::from_config`] or
/// [`TensorHyper::no_decay`].
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TensorHyper {
    /// Multiplier of the global learning rate, `>= 0`.
    pub lr_scale: f64,
    /// Weight decay of this tensor, `>= 0`, applied in the config's mode.
    pub weight_decay: f64,
}

impl TensorHyper {
    /// The global learning rate and no weight decay: for biases and norm gains.
    pub const fn no_decay() -> Self {
        Self {
            lr_scale: 1.0,
            weight_decay: 0.0,
        }
    }

    /// What a tensor gets when nothing is set: the global learning rate and decay.
    pub fn from_config(config: &AdamaxConfig) -> Self {
        Self {
            lr_scale: 1.0,
            weight_decay: config.weight_decay,
        }
    }

    /// Refuses non-finite or negative values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check("lr_scale", self.lr_scale, 0.0, None, "lr_scale >= 0")?;
        check_weight_decay(self.weight_decay)
    }
}
