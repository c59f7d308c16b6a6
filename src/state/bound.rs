//! The moment bound AdaMax keeps, checked on every state a checkpoint holds.

use crate::config::AdamaxConfig;

/// The bound AdaMax keeps between its moments: `|m| <= c * u`, so that no step moves a
/// weight by more than about `c * lr / (1 - beta1^t)` (plus its decay). With eps in the
/// denominator it is checked as `|m| <= c * (u + eps)`, the bound on the step `m / (u +
/// eps)` itself: 8-bit state stores the step's ratio to `u + eps`, and the moments it
/// stands for keep that form of the bound (`spec::lowbit`, "Why the ratio").
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
    /// `eps` with eps in the denominator, else 0: added to `u`.
    eps: f64,
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
        let eps = match config.eps_mode {
            crate::config::EpsilonMode::InsideMax => 0.0,
            crate::config::EpsilonMode::Denominator => f64::from(config.eps as f32),
        };
        Some(Self {
            ratio,
            absolute: (2.0 + ratio) * 2f64.powi(-147) / (1.0 - kept),
            eps,
        })
    }

    /// Whether `m` and `u` (finite, `u >= 0`) are within the bound.
    pub(crate) fn holds(&self, m: f32, u: f32) -> bool {
        f64::from(m).abs() <= self.ratio * (f64::from(u) + self.eps) + self.absolute
    }

    /// Whether a ratio `m / den` is within the bound, `|ratio| <= c`.
    pub(crate) fn holds_ratio(&self, ratio: f32) -> bool {
        f64::from(ratio).abs() <= self.ratio
    }

    /// The first index where `m[j]` is beyond the bound of `u[j]`.
    pub(crate) fn first_beyond(&self, m: &[f32], u: &[f32]) -> Option<usize> {
        m.iter().zip(u).position(|(&m, &u)| !self.holds(m, u))
    }
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
