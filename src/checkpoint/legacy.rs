//! Files of format `adamax-cuda/2` (and shard files `adamax-cuda-shard/1`), written
//! before the 8-bit state stored `m` as its ratio to the step's denominator (issue #19):
//! their 8-bit `m` codes are `m` itself as a fraction of its block's scale, in codes
//! whose magnitudes are `f * 2^(emin - M)` below `2^emin` and
//! `(2^M + f) * 2^(e - 1 + emin - M)` above it (`emin = 2 - 2^E`). Such a file loads as
//! the state it stands for: its 8-bit tensors' codes, scales and blocks are checked as
//! that format's loader checked them, and their decoded moments as f32 moments are
//! (finite, `u` not negative, AdaMax's bound on the step, which with eps in the
//! denominator is `|m| <= c (u + eps)`, a little looser than that loader's `c u`); then
//! they are encoded into today's
//! ([`Blockwise8::encode_state`]), once, deterministically. Files of f32 state are the
//! same in both formats. A run resumed from such a file continues from the same moments
//! up to one 8-bit rounding; it does not continue the old run's random stream bit for
//! bit.

use super::{valid, Checkpoint};
use crate::{
    config::StateFormat,
    error::Result,
    spec::lowbit::{Blockwise8, QBLOCK},
    state::{parts::Part, MomentBound},
};

/// The format of this crate's files before the ratio codec.
pub(super) const FORMAT_2: &str = "adamax-cuda/2";

/// The value of code `code` (sign in bit 7 when `signed`) in a block of scale `scale`, in
/// the first 8-bit format's codes of `exp_bits` and `man_bits`.
fn decode_v1(signed: bool, exp_bits: u32, man_bits: u32, code: u8, scale: f32) -> f32 {
    let magnitude = if signed {
        u32::from(code & 0x7F)
    } else {
        u32::from(code)
    };
    let emin = 2 - (1i32 << exp_bits);
    let (e, f) = (magnitude >> man_bits, magnitude & ((1 << man_bits) - 1));
    let (mant, exp) = if e == 0 {
        (f, emin - man_bits as i32)
    } else {
        (f + (1 << man_bits), e as i32 - 1 + emin - man_bits as i32)
    };
    let v = mant as f32 * f32::from_bits(((exp + 127) as u32) << 23) * scale;
    if signed && code & 0x80 != 0 {
        -v
    } else {
        v
    }
}

/// The f32 values of one moment in the first 8-bit format.
fn values_v1(q: &Blockwise8, signed: bool, exp_bits: u32, man_bits: u32) -> Vec<f32> {
    q.codes
        .chunks(QBLOCK)
        .zip(&q.scales)
        .flat_map(|(block, &scale)| {
            block
                .iter()
                .map(move |&c| decode_v1(signed, exp_bits, man_bits, c, scale))
        })
        .collect()
}

/// The first format's block checks: a block of scale 0 holds zero codes, and a block of
/// another scale holds its largest magnitude exactly (`top`: the code 1.0, for `u`; `m`'s
/// largest could be capped in that format).
fn check_blocks_v1(tensor: usize, q: &Blockwise8, name: &str, top: Option<u8>) -> Result<()> {
    for (b, (block, &scale)) in q.codes.chunks(QBLOCK).zip(&q.scales).enumerate() {
        let refused = if scale == 0.0 {
            block.iter().any(|&c| c != 0)
        } else {
            top.is_some_and(|top| !block.contains(&top))
        };
        if refused {
            return Err(super::refuse(format!(
                "tensor {tensor}: block {b} of {name} (format {FORMAT_2}) has scale {scale} but codes its encoder never wrote with it (zeros only for scale 0, the largest magnitude stored exactly otherwise)"
            )));
        }
    }
    Ok(())
}

/// Brings the 8-bit tensors of a checkpoint read from a file of the first 8-bit format
/// into today's, refusing what that format's loader refused (the module docs).
pub(super) fn upgrade(ck: &mut Checkpoint) -> Result<()> {
    let bound = MomentBound::of(&ck.config);
    let (eps, eps_mode) = (ck.config.eps as f32, ck.config.eps_mode);
    let limit = valid::ratio_limit(bound);
    for (i, (t, &format)) in ck.tensors.iter_mut().zip(&ck.state_formats).enumerate() {
        if format != StateFormat::Blockwise8 {
            continue;
        }
        for part in [
            Part::ExpAvgCodes,
            Part::ExpAvgScales,
            Part::ExpInfCodes,
            Part::ExpInfScales,
        ] {
            valid::check_part(i, t.step, part, part.view(t))?;
        }
        if t.exp_avg_q8.scales.len() != t.exp_avg_q8.codes.len().div_ceil(QBLOCK)
            || t.exp_inf_q8.scales.len() != t.exp_inf_q8.codes.len().div_ceil(QBLOCK)
        {
            // The lengths are checked by the validation that follows; nothing to decode.
            continue;
        }
        check_blocks_v1(i, &t.exp_avg_q8, "exp_avg_q8", None)?;
        check_blocks_v1(i, &t.exp_inf_q8, "exp_inf_q8", Some(240))?;
        let m = values_v1(&t.exp_avg_q8, true, 4, 3);
        let u = values_v1(&t.exp_inf_q8, false, 4, 4);
        valid::check_moments(i, bound, &m, &u)?;
        (t.exp_avg_q8, t.exp_inf_q8) = Blockwise8::encode_state(&m, &u, eps, eps_mode, limit);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_formats_codes_decode_as_it_documented() {
        // m: sign, E4, M3, emin = -14: code 1 is 2^-17 of the scale, the top code 1.0.
        assert_eq!(decode_v1(true, 4, 3, 1, 1.0), 2f32.powi(-17));
        assert_eq!(decode_v1(true, 4, 3, 0x81, 2.0), -(2f32.powi(-16)));
        assert_eq!(decode_v1(true, 4, 3, 15 << 3, 3.0), 3.0);
        // Code 8 is the first normal: (8 + 0) * 2^(1 - 1 - 14 - 3) = 2^-14.
        assert_eq!(decode_v1(true, 4, 3, 8, 1.0), 2f32.powi(-14));
        // u: E4, M4: code 1 is 2^-18, the top 1.0.
        assert_eq!(decode_v1(false, 4, 4, 1, 1.0), 2f32.powi(-18));
        assert_eq!(decode_v1(false, 4, 4, 15 << 4, 0.5), 0.5);
    }
}
