//! The optimizer's configuration: AdaMax's settings, parameter groups, and the fused
//! step options.

use std::{fmt, sync::Arc};

use adamax_cuda::{AdamaxConfig, LossScaler, StateFormat, StepOptions, TensorHyper};
use candle_core::Var;

/// What [`Adamax`](crate::Adamax) is built with: `candle_nn::Optimizer::Config`.
///
/// `ParamsAdamax::default()` is PyTorch's `torch.optim.Adamax` (lr 2e-3, betas 0.9 and
/// 0.999, eps 1e-8 inside the max, no weight decay) with every `Var` in one group.
#[derive(Clone, Debug, Default)]
pub struct ParamsAdamax {
    /// AdaMax's settings and precision mode, as adamax-cuda documents them
    /// ([`AdamaxConfig`]): learning rate, betas, eps and its convention, weight decay
    /// (coupled or decoupled), `maximize`, and the precision (f32 state, 8-bit state,
    /// master weights or stochastic rounding for 16-bit `Var`s).
    pub config: AdamaxConfig,
    /// Parameter groups: a `Var` takes the settings of the first group that selects it,
    /// and the config's learning rate and weight decay otherwise.
    pub groups: Vec<ParamGroup>,
    /// State formats chosen by hand, with 8-bit state
    /// ([`StateFormat::Blockwise8`]): a `Var` takes the format of the first rule that
    /// selects it, and otherwise the size rule's ([`Precision::min_8bit_len`]: f32 for
    /// `Var`s under 4,096 elements by default), for instance f32 for the embeddings.
    ///
    /// [`Precision::min_8bit_len`]: adamax_cuda::Precision::min_8bit_len
    pub state_formats: Vec<(Select, StateFormat)>,
    /// Fused gradient clipping, unscaling and overflow skip, applied inside the step's
    /// launch ([`StepOptions`]).
    pub options: StepOptions,
    /// Dynamic loss scaling, when set: [`Adamax::backward_step`] multiplies the loss
    /// by the current scale, and the step unscales, skips on overflow and updates the
    /// scale on the device.
    ///
    /// [`Adamax::backward_step`]: candle_nn::Optimizer::backward_step
    pub loss_scaler: Option<LossScaler>,
}

impl From<AdamaxConfig> for ParamsAdamax {
    fn from(config: AdamaxConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }
}

impl ParamsAdamax {
    /// PyTorch's defaults with learning rate `lr`.
    pub fn with_lr(lr: f64) -> Self {
        AdamaxConfig {
            lr,
            ..AdamaxConfig::default()
        }
        .into()
    }

    /// Adds a group that takes no weight decay for `Var`s of at most one dimension
    /// (biases, norm gains and shifts), the usual rule for transformers and CNNs.
    pub fn no_decay_for_vectors(mut self) -> Self {
        self.groups.push(ParamGroup {
            select: Select::MaxRank(1),
            hyper: TensorHyper {
                lr_scale: 1.0,
                weight_decay: 0.0,
            },
        });
        self
    }

    /// Adds a rule that keeps the `Var`s `select` picks in `format`, whatever their
    /// size (see [`ParamsAdamax::state_formats`]).
    pub fn with_state_format(mut self, select: Select, format: StateFormat) -> Self {
        self.state_formats.push((select, format));
        self
    }
}

/// A parameter group: the `Var`s `select` picks take `hyper`'s learning-rate scale
/// (times the config's learning rate) and weight decay.
#[derive(Clone, Debug)]
pub struct ParamGroup {
    /// Which `Var`s belong to the group.
    pub select: Select,
    /// Their learning-rate scale and weight decay.
    pub hyper: TensorHyper,
}

/// How a [`ParamGroup`] picks its `Var`s.
#[derive(Clone)]
pub enum Select {
    /// `Var`s of at most this many dimensions (1: biases and norm parameters).
    MaxRank(usize),
    /// `Var`s whose `VarMap` name is one of these. Needs the names: build with
    /// [`Adamax::from_varmap`](crate::Adamax::from_varmap).
    Names(Vec<String>),
    /// `Var`s whose `VarMap` name contains one of these (`"bias"`, `"norm"`). Needs the
    /// names: build with [`Adamax::from_varmap`](crate::Adamax::from_varmap).
    NameContains(Vec<String>),
    /// Any rule, given the `Var`'s `VarMap` name (`None` when built from a plain list)
    /// and the `Var`.
    Rule(VarRule),
}

/// A rule of [`Select::Rule`]: given a `Var`'s `VarMap` name (`None` when it has none)
/// and the `Var`, whether the group takes it.
pub type VarRule = Arc<dyn Fn(Option<&str>, &Var) -> bool + Send + Sync>;

impl fmt::Debug for Select {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Select::MaxRank(n) => f.debug_tuple("MaxRank").field(n).finish(),
            Select::Names(n) => f.debug_tuple("Names").field(n).finish(),
            Select::NameContains(n) => f.debug_tuple("NameContains").field(n).finish(),
            Select::Rule(_) => f.write_str("Rule(..)"),
        }
    }
}

impl Select {
    /// Whether the rule needs the `Var`s' names.
    pub(crate) fn needs_names(&self) -> bool {
        matches!(self, Select::Names(_) | Select::NameContains(_))
    }

    pub(crate) fn picks(&self, name: Option<&str>, var: &Var) -> bool {
        match self {
            Select::MaxRank(n) => var.rank() <= *n,
            Select::Names(names) => name.is_some_and(|x| names.iter().any(|n| n == x)),
            Select::NameContains(parts) => {
                name.is_some_and(|x| parts.iter().any(|p| x.contains(p.as_str())))
            }
            Select::Rule(rule) => rule(name, var),
        }
    }
}
