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
//!   scale 0 holds only zero codes, and any other holds its largest magnitude, 1.0,
//!   exactly (for `u`; an `m` block's largest code may have been capped); each block's
//!   scales keep the bound, `scale(m) <= c * scale(u)`, and each element's decoded
//!   moments keep it too.
//!
//! Why the scales keep it: a block's largest decoded `|m|` is at most its scale, and its
//! largest `u` decodes to its scale exactly (the code 1.0), so the recursion of the
//! derivation holds for the scales as for the elements. The elements of 8-bit moments
//! are held to it as well: the encoder caps each `m` code so that its decoded value is
//! within the bound of its element's decoded `u` (`lowbit::encode_moments`).

use super::refuse;
use crate::state::parts::{Data, Part, View};
use crate::{
    error::{Error, Result},
    spec::lowbit::{Blockwise8, Code, EXP_AVG_CODE, EXP_INF_CODE, QBLOCK},
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
            "tensor {tensor}: exp_avg[{j}] = {} is beyond {:.6} x exp_inf[{j}] = {}; AdaMax keeps |exp_avg| <= (1 - beta1) / (1 - beta1 / beta2) x exp_inf, so that no step moves a weight by more than about lr / (1 - beta1^t), and no run reaches this state (moments swapped or edited?)",
            m[j], bound.ratio, u[j]
        ))),
        None => Ok(()),
    }
}

/// Refuses 8-bit blocks the encoder never writes: nonzero codes in a block of scale 0,
/// and a `u` block of another scale without a code at magnitude 1.0 (the encoder stores
/// each `u` block's largest magnitude exactly; an `m` block's largest may have been
/// capped by the moment bound, `lowbit::encode_moments`).
pub(super) fn check_blocks(
    tensor: usize,
    codes_part: Part,
    codes: &[u8],
    scales: &[f32],
) -> Result<()> {
    let code = code_of(codes_part)?;
    for (b, (block, &scale)) in codes.chunks(QBLOCK).zip(scales).enumerate() {
        let name = codes_part.name();
        if scale == 0.0 {
            if let Some(j) = block.iter().position(|&c| c != 0) {
                return Err(refuse(format!(
                    "tensor {tensor}: block {b} of {name} has scale 0 but code {} at element {}; a block of scale 0 holds zeros only",
                    block[j],
                    b * QBLOCK + j
                )));
            }
        } else if codes_part == Part::ExpInfCodes
            && !block
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

/// Refuses 8-bit blocks whose scales are beyond AdaMax's bound (see the module docs).
pub(super) fn check_block_scales(
    tensor: usize,
    bound: Option<MomentBound>,
    m_scales: &[f32],
    u_scales: &[f32],
) -> Result<()> {
    let Some(bound) = bound else { return Ok(()) };
    match bound.first_beyond(m_scales, u_scales) {
        Some(b) => Err(refuse(format!(
            "tensor {tensor}: block {b} has exp_avg_q8_scale {} beyond {:.6} x exp_inf_q8_scale {}; a block's largest |exp_avg| stays within AdaMax's bound of its largest exp_inf, and no run reaches this state",
            m_scales[b], bound.ratio, u_scales[b]
        ))),
        None => Ok(()),
    }
}

/// Refuses 8-bit moments whose decoded values are beyond AdaMax's bound: the encoder
/// keeps `|m| <= c * u` in the values it stores (`lowbit::encode_moments`), so no run
/// reaches such a state, and a step from it could move a weight further than the bound
/// allows. (8-bit files written before the encoder kept the bound may hold such states.)
pub(super) fn check_q8_moments(
    tensor: usize,
    bound: Option<MomentBound>,
    m: &Blockwise8,
    u: &Blockwise8,
) -> Result<()> {
    let Some(bound) = bound else { return Ok(()) };
    // Decoded one element at a time, so that checking a tensor allocates nothing.
    let pairs = m.values(EXP_AVG_CODE).zip(u.values(EXP_INF_CODE));
    match pairs.enumerate().find(|&(_, (mv, uv))| !bound.holds(mv, uv)) {
        Some((j, (mv, uv))) => Err(refuse(format!(
            "tensor {tensor}: exp_avg_q8[{j}] decodes to {mv} beyond {:.6} x exp_inf_q8[{j}] = {uv}; the 8-bit encoder keeps |exp_avg| <= (1 - beta1) / (1 - beta1 / beta2) x exp_inf in the values it stores, and no run reaches this state (a file of an older encoder, or edited?)",
            bound.ratio
        ))),
        None => Ok(()),
    }
}

/// The checks of parts that hold together, for parts that come one at a time (the
/// streamed save, in file order: `exp_avg` before `exp_inf`, a moment's codes before
/// its scales, `m`'s scales before `u`'s): the first of a pair is held, as a copy,
/// until its partner comes.
pub(super) struct Pairs {
    bound: Option<MomentBound>,
    held: Option<(usize, Part, Data)>,
    /// `m`'s codes and block scales, until `u`'s come.
    m_blocks: Option<(usize, Blockwise8)>,
}

impl Pairs {
    pub(super) fn new(bound: Option<MomentBound>) -> Self {
        Self {
            bound,
            held: None,
            m_blocks: None,
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
                let blocks = Blockwise8 {
                    codes,
                    scales: scales.to_vec(),
                };
                if part == Part::ExpAvgScales {
                    self.m_blocks = Some((tensor, blocks));
                    return Ok(());
                }
                match self.m_blocks.take() {
                    Some((t, m)) if t == tensor => {
                        check_block_scales(tensor, self.bound, &m.scales, scales)?;
                        check_q8_moments(tensor, self.bound, &m, &blocks)
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
