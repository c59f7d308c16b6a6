//! What both optimizers and the checkpoint share: the per-tensor state, the schedule
//! (configuration and per-tensor settings), and the checks of a step's arguments, so
//! that the CPU reference and the GPU refuse exactly the same inputs.

use crate::{
    config::{AdamaxConfig, ParamMode, Precision, StateFormat, TensorHyper},
    cpu::lowbit::Blockwise8,
    error::{Error, Result},
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
    /// `m` in 8 bits ([`StateFormat::Blockwise8`]); empty otherwise.
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

    /// Zeroed moments in `precision`'s format, with a master copy initialised from
    /// `param` when `T` is a 16-bit type kept with [`ParamMode::Master`].
    pub fn with_precision<T: Storage>(param: &[T], precision: &Precision) -> Self {
        let n = param.len();
        let (f32_len, q8_len) = match precision.state {
            StateFormat::F32 => (n, None),
            StateFormat::Blockwise8 => (0, Some(n)),
        };
        let q8 = || q8_len.map_or_else(Blockwise8::default, Blockwise8::zeros);
        Self {
            step: 0,
            exp_avg: vec![0.0; f32_len],
            exp_inf: vec![0.0; f32_len],
            master: if has_master(T::TYPE, precision) {
                param.iter().map(|x| x.to_f32()).collect()
            } else {
                Vec::new()
            },
            exp_avg_q8: q8(),
            exp_inf_q8: q8(),
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

/// The bound AdaMax keeps between its moments: `|m| <= c * u`, so that no step moves a
/// weight by more than about `c * lr / (1 - beta1^t)` (plus its decay).
///
/// # Derivation
///
/// With `u_t = max(beta2 * u_{t-1}, |g_t| + eps) >= |g_t|` (or `max(beta2 * u_{t-1},
/// |g_t|)` with eps in the denominator) and `m_t = beta1 * m_{t-1} + (1 - beta1) * g_t`,
/// suppose `|m_{t-1}| <= c * u_{t-1}`. Since `u_{t-1} <= u_t / beta2`,
///
/// ```text
/// |m_t| <= beta1 * c * u_{t-1} + (1 - beta1) * |g_t| <= (beta1 * c / beta2 + 1 - beta1) * u_t
/// ```
///
/// which is `c * u_t` for `c = (1 - beta1) / (1 - beta1 / beta2)`; with `m_0 = u_0 = 0`
/// the bound holds at every step (about 1.009 for PyTorch's defaults; 1 for `beta1 =
/// 0`). Weight decay, unscaling and clipping only change the gradient both moments see.
/// When `beta1 >= beta2` no such `c` exists (`u` may decay faster than `m`), and
/// nothing is checked.
///
/// In f32 every operation rounds: the ratio is taken with f32's betas and a slack of
/// 2^-20 per operation (PyTorch's `lerp` rounds differently from the crate's fused
/// multiply-add), and below f32's normal range, where rounding is absolute, a few units
/// of 2^-149 per step, summed over the steps the bound contracts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct MomentBound {
    /// `c`, with the relative slack.
    pub ratio: f64,
    /// The absolute slack.
    absolute: f64,
}

impl MomentBound {
    /// The bound of `config`'s betas; `None` when `beta1 >= beta2` (in f32, with slack).
    pub(crate) fn of(config: &AdamaxConfig) -> Option<Self> {
        let slack = 2f64.powi(-20);
        let beta1 = f64::from(config.beta1 as f32);
        let beta2 = f64::from(config.beta2 as f32);
        let one_minus_beta1 = f64::from((1.0 - config.beta1) as f32);
        // How much of the last bound survives a step: beta1 / beta2, rounded up (none
        // with beta1 = 0, whatever beta2: then m is the gradient itself).
        let kept = if beta1 == 0.0 {
            0.0
        } else {
            beta1 * (1.0 + slack) / (beta2 * (1.0 - slack))
        };
        if !kept.is_finite() || kept >= 1.0 {
            return None;
        }
        let ratio = one_minus_beta1 * (1.0 + slack).powi(2) / (1.0 - kept);
        Some(Self {
            ratio,
            absolute: (2.0 + ratio) * 2f64.powi(-147) / (1.0 - kept),
        })
    }

    /// Whether `m` and `u` (finite, `u >= 0`) are within the bound.
    pub(crate) fn holds(&self, m: f32, u: f32) -> bool {
        f64::from(m).abs() <= self.ratio * f64::from(u) + self.absolute
    }

    /// The first index where `m[j]` is beyond the bound of `u[j]`.
    pub(crate) fn first_beyond(&self, m: &[f32], u: &[f32]) -> Option<usize> {
        m.iter().zip(u).position(|(&m, &u)| !self.holds(m, u))
    }
}

/// Whether parameters of `storage` kept in `precision` carry an f32 master copy.
pub(crate) fn has_master(storage: crate::storage::StorageType, precision: &Precision) -> bool {
    storage.has_master() && precision.params == ParamMode::Master
}

/// The configuration and per-tensor hyperparameters of an optimizer, validated
/// together on every change. Shared by both optimizers so that they accept the same
/// settings. (Step counting is each optimizer's own: the GPU keeps its count on the
/// device, where skips are decided.)
#[derive(Clone, Debug)]
pub(crate) struct Schedule {
    config: AdamaxConfig,
    hypers: Vec<TensorHyper>,
}

impl Schedule {
    /// The config's own hyperparameters for `tensors` tensors; refuses an invalid
    /// `config`.
    pub(crate) fn new(config: AdamaxConfig, tensors: usize) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            hypers: vec![TensorHyper::from_config(&config); tensors],
        })
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

    /// Replaces both, after the same checks (for a restore).
    pub(crate) fn replace(&mut self, config: AdamaxConfig, hypers: &[TensorHyper]) -> Result<()> {
        if hypers.len() != self.hypers.len() {
            return Err(Error::TensorCountMismatch {
                what: "hyperparameters",
                expected: self.hypers.len(),
                found: hypers.len(),
            });
        }
        check_pairs(&config, hypers)?;
        self.config = config;
        self.hypers = hypers.to_vec();
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_moment_bound_is_the_papers_ratio_with_rounding_slack() {
        let c = |beta1, beta2| {
            MomentBound::of(&AdamaxConfig {
                beta1,
                beta2,
                ..AdamaxConfig::default()
            })
            .map(|b| b.ratio)
        };
        // (1 - 0.9) / (1 - 0.9 / 0.999) = 1.00908...
        let defaults = c(0.9, 0.999).unwrap();
        assert!((defaults - 1.009_09).abs() < 1e-4, "{defaults}");
        // beta1 = 0: m is the gradient, and u >= |g|, whatever beta2.
        for beta2 in [0.0, 0.5, 0.999] {
            let r = c(0.0, beta2).unwrap();
            assert!((1.0..1.0 + 1e-5).contains(&r), "{beta2}: {r}");
        }
        // No bound where u may decay faster than m.
        assert_eq!(c(0.9, 0.9), None);
        assert_eq!(c(0.999, 0.5), None);
        assert_eq!(c(0.5, 0.0), None);
    }
}
