//! What a checkpoint's state must satisfy to be one a run can reach, checked by `load`,
//! `save`, the streamed save and `restore` alike (through `Checkpoint::validate` or
//! [`Pairs`]):
//!
//! - every moment and scale is finite (a NaN or infinite gradient that reached the state
//!   made the parameters NaN too, and no run resumes from it), and `u` and the scales
//!   are never negative;
//! - a tensor that took no step has zero moments;
//! - f32 moments keep AdaMax's bound `|m| <= c * u` ([`MomentBound`]: swapped or edited
//!   moments would move a weight far more than `lr` in the next step);
//! - 8-bit blocks are as the encoder writes them: codes no larger than 1.0, a block of
//!   scale 0 holds only zero codes, any other scale is an f32 normal and its block holds
//!   its largest magnitude, 1.0, exactly (`lowbit::BlockScale`);
//! - 8-bit state stores `m` as its ratio to the step's denominator, and the step a state
//!   makes is that ratio (`spec::lowbit`, "Why the ratio"): each block's ratio scale (its
//!   largest `|m / den|`) keeps AdaMax's bound, `scale <= c` ([`MomentBound`]), and then
//!   every element does.

use super::refuse;
use crate::state::parts::{Data, Part, View};
use crate::{
    config::EpsilonMode,
    error::{Error, Result},
    spec::lowbit::{ratio_scale_limit, Code, EXP_AVG_CODE, EXP_INF_CODE, QBLOCK},
    state::MomentBound,
};

/// Refuses values of one part of tensor `tensor` (which took `step` steps) that no run
/// produces alone: non-finite moments or scales, a negative `u` or scale, a code above
/// 1.0, anything but zero before the tensor's first step. Masters may hold any value.
pub(super) fn check_part(tensor: usize, step: u64, part: Part, values: View<'_>) -> Result<()> {
    let name = part.name();
    match values {
        View::F32(v) if part != Part::Master => {
            if let Some(j) = v.iter().position(|x| !x.is_finite()) {
                return Err(refuse(format!(
                    "tensor {tensor}: {name}[{j}] is {}: a NaN or infinite gradient reached the state (its parameters are NaN too), and no run resumes from it; turn on StepOptions::skip_nonfinite or a LossScaler to skip such steps, and resume from an earlier checkpoint",
                    v[j]
                )));
            }
            if part != Part::ExpAvg {
                if let Some(j) = v.iter().position(|x| *x < 0.0) {
                    let what = if part == Part::ExpInf {
                        "the infinity norm is never negative"
                    } else {
                        "a block's scale is its largest magnitude, never negative"
                    };
                    return Err(refuse(format!(
                        "tensor {tensor}: {name}[{j}] is {}; {what}",
                        v[j]
                    )));
                }
            }
            if step == 0 {
                if let Some(j) = v.iter().position(|x| *x != 0.0) {
                    return Err(before_first_step(tensor, name, j, v[j]));
                }
            }
        }
        View::U8(v) => {
            let code = code_of(part)?;
            if let Some(j) = v.iter().position(|&c| !code.is_valid(c)) {
                return Err(refuse(format!(
                    "tensor {tensor}: {name}[{j}] is code {}, above the magnitude 1.0 (code {}) that the encoder never exceeds",
                    v[j],
                    code.max_magnitude_code()
                )));
            }
            if step == 0 {
                if let Some(j) = v.iter().position(|&c| c != 0) {
                    return Err(before_first_step(tensor, name, j, v[j]));
                }
            }
        }
        View::F32(_) => {}
    }
    Ok(())
}

fn before_first_step(tensor: usize, name: &str, j: usize, v: impl std::fmt::Display) -> Error {
    refuse(format!(
        "tensor {tensor} took no step but its {name}[{j}] is {v}; a tensor's state is zero until its first step"
    ))
}

fn code_of(part: Part) -> Result<Code> {
    match part {
        Part::ExpAvgCodes => Ok(EXP_AVG_CODE),
        Part::ExpInfCodes => Ok(EXP_INF_CODE),
        _ => Err(Error::Internal {
            what: "8-bit codes checked as a part that holds none",
        }),
    }
}

/// Refuses f32 moments outside AdaMax's bound (each part already checked alone).
pub(super) fn check_moments(
    tensor: usize,
    bound: Option<MomentBound>,
    m: &[f32],
    u: &[f32],
) -> Result<()> {
    let Some(bound) = bound else { return Ok(()) };
    match bound.first_beyond(m, u) {
        Some(j) => Err(refuse(format!(
            "tensor {tensor}: exp_avg[{j}] = {} is beyond {:.6} x exp_inf[{j}] = {} (plus eps with eps in the denominator); AdaMax keeps |exp_avg| <= (1 - beta1) / (1 - beta1 / beta2) x exp_inf, so that no step moves a weight by more than about lr / (1 - beta1^t), and no run reaches this state (moments swapped or edited?)",
            m[j], bound.ratio, u[j]
        ))),
        None => Ok(()),
    }
}

/// Refuses 8-bit blocks the encoder never writes: nonzero codes in a block of scale 0,
/// a nonzero scale below f32's normal range, and a block of another scale without a
/// code at magnitude 1.0 (the encoder stores each block's largest magnitude exactly).
pub(super) fn check_blocks(
    tensor: usize,
    codes_part: Part,
    codes: &[u8],
    scales: &[f32],
) -> Result<()> {
    let code = code_of(codes_part)?;
    let name = codes_part.name();
    for (b, (block, &scale)) in codes.chunks(QBLOCK).zip(scales).enumerate() {
        if scale == 0.0 {
            if let Some(j) = block.iter().position(|&c| c != 0) {
                return Err(refuse(format!(
                    "tensor {tensor}: block {b} of {name} has scale 0 but code {} at element {}; a block of scale 0 holds zeros only",
                    block[j],
                    b * QBLOCK + j
                )));
            }
        } else if scale < f32::MIN_POSITIVE {
            return Err(refuse(format!(
                "tensor {tensor}: block {b} of {name} has scale {scale:e}, below f32's normal range; the encoder stores such a block as scale 0"
            )));
        } else if !block
            .iter()
            .any(|&c| code.magnitude(c) == code.max_magnitude_code())
        {
            return Err(refuse(format!(
                "tensor {tensor}: block {b} of {name} has scale {scale} but no code at magnitude 1.0; the encoder stores each block's largest magnitude exactly"
            )));
        }
    }
    Ok(())
}

/// The ratio a conversion to 8-bit state clamps ratios to (`f32::INFINITY` without a
/// bound): the checker's bound, rounded down to f32, less 2^-20 of it, room for the
/// roundings of decoding them back (`ratio * f32(u + eps)`), so that the state made
/// validates in 8 bits and decoded to f32 alike.
pub(super) fn ratio_limit(bound: Option<MomentBound>) -> f32 {
    bound.map_or(f32::INFINITY, |b| {
        let r = (b.ratio * (1.0 - 1.0 / 1_048_576.0)) as f32;
        if f64::from(r) > b.ratio {
            r.next_down()
        } else {
            r
        }
    })
}

/// Refuses 8-bit ratio blocks whose scale, the largest `|m / den|` of the block, is beyond
/// AdaMax's bound `c` (the step a state makes is its ratio, and no run reaches a ratio
/// beyond `c`; see the module docs) or beyond the largest whose `m` stays finite beside
/// its `u` block's scale (`lowbit::ratio_scale_limit`, which the encoder keeps).
pub(super) fn check_ratio_scales(
    tensor: usize,
    bound: Option<MomentBound>,
    (eps, eps_mode): (f32, EpsilonMode),
    ratio_scales: &[f32],
    u_scales: &[f32],
) -> Result<()> {
    if let Some(bound) = bound {
        if let Some(b) = ratio_scales.iter().position(|&s| !bound.holds_ratio(s)) {
            return Err(refuse(format!(
                "tensor {tensor}: block {b} has exp_avg_q8_scale {} beyond {:.6}; it is the block's largest |exp_avg| / (exp_inf or exp_inf + eps), which AdaMax keeps within (1 - beta1) / (1 - beta1 / beta2), and no run reaches this state (edited?)",
                ratio_scales[b], bound.ratio
            )));
        }
    }
    for (b, (&s, &su)) in ratio_scales.iter().zip(u_scales).enumerate() {
        let limit = ratio_scale_limit(su, eps, eps_mode);
        if s > limit {
            return Err(refuse(format!(
                "tensor {tensor}: block {b} has exp_avg_q8_scale {s} beside exp_inf_q8_scale {su:e}, above {limit}, the largest whose exp_avg (the ratio times exp_inf, or exp_inf + eps) stays finite; the encoder keeps it there, and no run reaches this state (edited?)"
            )));
        }
    }
    Ok(())
}

/// The checks of parts that hold together, for parts that come one at a time (the
/// streamed save, in file order: `exp_avg` before `exp_inf`, a moment's codes before
/// its scales, the ratio's scales before `u`'s): the first of a pair is held, as a copy,
/// until its partner comes.
pub(super) struct Pairs {
    bound: Option<MomentBound>,
    eps: (f32, EpsilonMode),
    held: Option<(usize, Part, Data)>,
    /// The ratio's block scales, until `u`'s come.
    ratio_scales: Option<(usize, Vec<f32>)>,
}

impl Pairs {
    pub(super) fn new(config: &crate::config::AdamaxConfig) -> Self {
        Self {
            bound: MomentBound::of(config),
            eps: (config.eps as f32, config.eps_mode),
            held: None,
            ratio_scales: None,
        }
    }

    /// Checks `values`, part `part` of tensor `tensor`, with the part it pairs with.
    pub(super) fn next(&mut self, tensor: usize, part: Part, values: View<'_>) -> Result<()> {
        let first = matches!(part, Part::ExpAvg | Part::ExpAvgCodes | Part::ExpInfCodes);
        if first {
            let mut copy = match values {
                View::F32(_) => Data::F32(Vec::new()),
                View::U8(_) => Data::U8(Vec::new()),
            };
            copy.extend(values)?;
            self.held = Some((tensor, part, copy));
            return Ok(());
        }
        let held = self.held.take();
        match (part, held, values) {
            (Part::ExpInf, Some((t, Part::ExpAvg, Data::F32(m))), View::F32(u)) if t == tensor => {
                check_moments(tensor, self.bound, &m, u)
            }
            (
                Part::ExpAvgScales | Part::ExpInfScales,
                Some((t, codes_part, Data::U8(codes))),
                View::F32(scales),
            ) if t == tensor && codes_part.scales() == Some(part) => {
                check_blocks(tensor, codes_part, &codes, scales)?;
                if part == Part::ExpAvgScales {
                    self.ratio_scales = Some((tensor, scales.to_vec()));
                    return Ok(());
                }
                match self.ratio_scales.take() {
                    Some((t, ratio)) if t == tensor => {
                        check_ratio_scales(tensor, self.bound, self.eps, &ratio, scales)
                    }
                    _ => Err(Error::Internal {
                        what: "a checkpoint's exp_inf scales came before its exp_avg scales",
                    }),
                }
            }
            (Part::Master, held, _) => {
                self.held = held;
                Ok(())
            }
            _ => Err(Error::Internal {
                what: "a checkpoint's parts came in another order than the file's",
            }),
        }
    }
}
