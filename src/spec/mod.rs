//! The crate's specification: the AdaMax rule exactly as computed, the scalars of a step,
//! and ([`lowbit`]) the random stream and the codes of the modes that move fewer bytes.
//! It imports nothing above the configuration: [`crate::cpu::CpuAdamax`] and the CUDA
//! kernel are its users, and `kernels/adamax.cu` repeats every function here with the
//! same IEEE operations.
//!
//! # The rule, exactly as computed
//!
//! One step `t` (counted from 1) of one element, all in f32, with `p` the f32 parameter
//! (the master weight for 16-bit storage) and `g` the gradient widened to f32:
//!
//! ```text
//! g = maximize ? -g : g
//! if weight decay is coupled:    g = fma(wd, p, g)
//! m = fma(beta1, m, one_minus_beta1 * g)                           one_minus_beta1 = f32(1 - beta1)
//! eps inside the max:  u = max(beta2 * u, |g| + eps);  den = u
//! eps in denominator:  u = max(beta2 * u, |g|);        den = u + eps
//! update = den == 0 ? 0 : m / den
//! no decoupled decay:   p = fma(-step_size, update, p)             step_size = f32(lr / (1 - beta1^t))
//! decoupled decay:      p = p - fma(lr_wd, p, step_size * update)  lr_wd = f32(lr * wd)
//! ```
//!
//! The scalars in the right-hand column are computed per step and tensor in f64 and
//! rounded to f32 ([`StepScalars::for_tensor`]); with per-tensor hyperparameters
//! ([`TensorHyper`]) `lr` is `lr * lr_scale` and `wd` the tensor's
//! own. `t` is the tensor's own step count plus one ([`TensorState::step`]; a tensor
//! without a gradient in a step does not count it, as PyTorch's per-parameter step). The
//! GPU kernel derives them with the same f64 operations, so it uses exactly these
//! values.
//!
//! **Fused multiply-add.** The `fma`s above are single-rounding fused operations
//! ([`f32::mul_add`] here, `__fmaf_rn` in the kernel); every other operation rounds on its
//! own, and the kernel is compiled with `--fmad=false` and uses the IEEE intrinsics
//! (`__fmul_rn`, `__fadd_rn`, `__fdiv_rn`) so that NVRTC contracts nothing behind our back.
//! Leaving contraction to the compiler would make the bits depend on its choices; pinning
//! it makes every f32 result of the GPU identical to this module's. The fused forms were
//! chosen where they save a rounding on the values that accumulate over steps (`m`, `p`)
//! and in the coupled decay, where PyTorch's `grad.add(param, alpha=wd)` is a multiply-add.
//! Decoupled decay is folded into the small update term (as optax's `adamaxw` does) so the
//! parameter is rounded once per step at its own scale, not twice (as `p *= 1 - lr*wd`
//! followed by the update would): against optax's float64 run this halves the drift.
//!
//! **Zero history.** When `den == 0` the update is 0 rather than `0/0`: with any epsilon
//! (including 0, which both conventions allow), any storage type and any valid
//! configuration, a history of zero gradients leaves the parameter unchanged (apart
//! from weight decay) instead of producing NaN.
//!
//! **NaN and infinity.** `max` propagates NaN (like `torch.maximum`), so a NaN gradient
//! makes `m`, `u` and the parameter NaN, and an infinite gradient makes the update
//! `inf/inf = NaN`: the same as PyTorch. To skip such steps instead, as
//! `torch.amp.GradScaler` does, turn on [`StepOptions::skip_nonfinite`] (or unscaling, or
//! a [`LossScaler`]): the check runs over every tensor before anything is written.
//!
//! **Range.** Validation refuses configurations whose f32 scalars (the step size at
//! step 1, `lr * wd`, `wd`, `eps`) would be infinite, and decoupled decay with `lr_wd >=
//! 1`, whose factor `1 - lr_wd` would flip or grow the weights
//! ([`AdamaxConfig::check_scalars`]); with those, a zero gradient never turns into NaN
//! through an `inf * 0`, and decoupled decay only shrinks the weights. Beyond that the
//! arithmetic is IEEE f32, as in the peers: a value that leaves f32's range during a
//! step (a weight decay times a parameter near `f32::MAX`) becomes infinite.
//!
//! **16-bit parameters.** With [`ParamMode::Master`] the f32 master weight is stepped;
//! the 16-bit parameter is then overwritten with its round-to-nearest-even. The 16-bit
//! value read before the step is ignored: the master is the source of truth. With
//! [`ParamMode::Stochastic`] there is no master: `p` is the bf16 parameter widened, and
//! the result is rounded back with [`lowbit::round_bf16_stochastic`].
//!
//! **8-bit state.** With [`StateFormat::Blockwise8`] a step works a block of
//! [`lowbit::QBLOCK`] elements at a time: it decodes the block's `u` and the ratio
//! `update = m / den` stored for `m` ([`lowbit::exp_avg_of`]), applies the rule above to
//! each element in f32 (the parameter moves by the f32 values), then encodes the new `u`
//! and the new `update` ([`lowbit::encode_moments`]). [`lowbit`] gives the format, the
//! codes and the random stream the roundings draw from.

pub mod lowbit;

use crate::config::{AdamaxConfig, EpsilonMode, TensorHyper, WeightDecayMode};

#[cfg(doc)]
use crate::{
    config::{ParamMode, StateFormat},
    fused::{LossScaler, StepOptions},
    state::TensorState,
};

/// Weight decay as the element update applies it; `None` when the factor is 0.
#[derive(Clone, Copy, Debug, PartialEq)]
#[doc(hidden)]
pub enum Decay {
    /// No weight decay.
    None,
    /// `g = fma(weight_decay, p, g)`.
    Coupled {
        /// The weight decay factor.
        weight_decay: f32,
    },
    /// `p = p - fma(lr_wd, p, step_size * update)` with `lr_wd = f32(lr * weight_decay)`.
    Decoupled {
        /// `f32(lr * weight_decay)`, computed in f64.
        lr_wd: f32,
    },
}

/// The f32 scalars of one step, derived once from the config and the step number.
///
/// Both the CPU reference and the GPU kernel use exactly these values.
#[derive(Clone, Copy, Debug, PartialEq)]
#[doc(hidden)]
pub struct StepScalars {
    /// `f32(beta1)`.
    pub beta1: f32,
    /// `f32(1 - beta1)`, computed in f64.
    pub one_minus_beta1: f32,
    /// `f32(beta2)` (+0.0 for -0.0).
    pub beta2: f32,
    /// `f32(eps)`.
    pub eps: f32,
    /// Where eps enters.
    pub eps_mode: EpsilonMode,
    /// `f32(lr / (1 - beta1^t))`, computed in f64.
    pub step_size: f32,
    /// Weight decay, resolved.
    pub decay: Decay,
    /// Negate the gradient.
    pub maximize: bool,
}

/// `base^exp` by repeated squaring: only IEEE multiplications, so a device that
/// computes it the same way gets the same bits (unlike `powf`, whose last bit differs
/// between math libraries).
#[doc(hidden)]
pub fn powi_exact(base: f64, mut exp: u64) -> f64 {
    let (mut acc, mut b) = (1.0f64, base);
    while exp > 0 {
        if exp & 1 == 1 {
            acc *= b;
        }
        b *= b;
        exp >>= 1;
    }
    acc
}

/// `1 - beta1^t`, the bias correction of step `t`, in f64 (the kernel computes it the
/// same way when the step count lives on the device).
#[doc(hidden)]
pub fn bias_correction(beta1: f64, t: u64) -> f64 {
    1.0 - powi_exact(beta1, t)
}

impl StepScalars {
    /// Scalars for step `t` (the first step is `t = 1`) of a tensor with the config's
    /// own learning rate and weight decay. `config` must be valid.
    pub fn new(config: &AdamaxConfig, t: u64) -> Self {
        Self::for_tensor(
            config,
            config.lr,
            bias_correction(config.beta1, t),
            &TensorHyper::from_config(config),
        )
    }

    /// Scalars of one tensor: learning rate `lr * hyper.lr_scale`, weight decay
    /// `hyper.weight_decay`, with `bias_correction` from [`bias_correction`]. Every
    /// f64 operation here is one the kernel repeats with the same IEEE rounding.
    pub fn for_tensor(
        config: &AdamaxConfig,
        lr: f64,
        bias_correction: f64,
        hyper: &TensorHyper,
    ) -> Self {
        let lr = lr * hyper.lr_scale;
        let decay = if hyper.weight_decay == 0.0 {
            Decay::None
        } else {
            match config.weight_decay_mode {
                WeightDecayMode::Coupled => Decay::Coupled {
                    weight_decay: hyper.weight_decay as f32,
                },
                WeightDecayMode::Decoupled => Decay::Decoupled {
                    lr_wd: (lr * hyper.weight_decay) as f32,
                },
            }
        };
        // A beta2 of -0.0 (which validation takes as 0) is +0.0 here, so that u is never
        // -0.0: 8-bit state takes its block maximum on u's bits.
        let (beta1, one_minus_beta1, beta2) = (
            config.beta1 as f32,
            (1.0 - config.beta1) as f32,
            (config.beta2 as f32).abs(),
        );
        Self {
            beta1,
            one_minus_beta1,
            beta2,
            eps: config.eps as f32,
            eps_mode: config.eps_mode,
            step_size: (lr / bias_correction) as f32,
            decay,
            maximize: config.maximize,
        }
    }
}

/// One element's state after a step.
#[derive(Clone, Copy, Debug, PartialEq)]
#[doc(hidden)]
pub struct Element {
    /// Parameter (or master weight).
    pub param: f32,
    /// First moment `m` (PyTorch's `exp_avg`).
    pub exp_avg: f32,
    /// Infinity norm `u` (PyTorch's `exp_inf`).
    pub exp_inf: f32,
    /// The update `m / den` (0 where `den = 0`): what 8-bit state stores for `m`.
    pub ratio: f32,
}

/// `max` that returns NaN when either side is NaN, like `torch.maximum`, and orders
/// +0.0 above -0.0 (IEEE 754-2019's `maximum`, and PTX's `max.NaN.f32`, which the kernel
/// uses on sm_80 and later): equal values give their common bits, and the AND of +0.0's
/// and -0.0's is +0.0's. (A -0.0 `u` comes only from a file, e.g. one written before
/// the spec took `beta2 = -0.0` as +0.0; the step makes it +0.0.)
#[inline(always)]
pub(crate) fn max_propagating_nan(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else if a == b {
        f32::from_bits(a.to_bits() & b.to_bits())
    } else if a > b {
        a
    } else {
        b
    }
}

/// The AdaMax update of one element: the rule of this crate, in one place.
/// `kernels/adamax.cu`'s `adamax_update` is its line-by-line twin.
#[inline(always)]
#[doc(hidden)]
pub fn update(s: &StepScalars, param: f32, grad: f32, exp_avg: f32, exp_inf: f32) -> Element {
    let mut g = if s.maximize { -grad } else { grad };
    let p = param;
    if let Decay::Coupled { weight_decay } = s.decay {
        g = weight_decay.mul_add(p, g);
    }
    let m = s.beta1.mul_add(exp_avg, s.one_minus_beta1 * g);
    let decayed = s.beta2 * exp_inf;
    let (u, den) = match s.eps_mode {
        EpsilonMode::InsideMax => {
            let u = max_propagating_nan(decayed, g.abs() + s.eps);
            (u, u)
        }
        EpsilonMode::Denominator => {
            let u = max_propagating_nan(decayed, g.abs());
            (u, u + s.eps)
        }
    };
    let step = if den == 0.0 { 0.0 } else { m / den };
    let param = match s.decay {
        Decay::Decoupled { lr_wd } => p - lr_wd.mul_add(p, s.step_size * step),
        _ => (-s.step_size).mul_add(step, p),
    };
    Element {
        param,
        exp_avg: m,
        exp_inf: u,
        ratio: step,
    }
}
