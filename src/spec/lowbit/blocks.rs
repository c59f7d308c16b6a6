//! A block of 8-bit moments: its scale's reciprocal ([`BlockScale`]), the encoding of
//! both moments together under AdaMax's bound ([`encode_moments`]), and a moment stored
//! in blocks ([`Blockwise8`]). See the parent module for the format.

use super::{exp_avg_bits, exp_inf_bits, Code, EXP_AVG_CODE, EXP_INF_CODE, QBLOCK};

/// The random bits that make [`Code::encode_magnitude`] round down (truncate): it rounds
/// up when `frac * 2^24 > r`, never for `r = 2^24 - 1`.
#[doc(hidden)]
pub const ROUND_DOWN: u32 = 0xFF_FFFF;

/// Encodes one block of both moments, `m` and `u` (as long as each other and as their
/// codes), drawing element `j`'s rounding bits from `bits(j)` ([`exp_avg_bits`] and
/// [`exp_inf_bits`] of its draw), and returns the block's scales `(m, u)`: `u` as
/// [`Code::encode_block`] encodes it, then `m` the same way with each code's magnitude
/// capped so that the values stored keep `|m| <= ratio * u` (see the module docs; no cap
/// for an infinite `ratio`).
pub fn encode_moments(
    m: &[f32],
    u: &[f32],
    m_codes: &mut [u8],
    u_codes: &mut [u8],
    ratio: f32,
    bits: impl Fn(usize) -> u64,
) -> (f32, f32) {
    let scale_u = EXP_INF_CODE.encode_block(u, u_codes, |j| exp_inf_bits(bits(j)));
    let scale_m = EXP_AVG_CODE.encode_block(m, m_codes, |j| exp_avg_bits(bits(j)));
    let coded = scale_m.is_finite() && scale_m != 0.0;
    if coded && ratio < f32::INFINITY {
        let s = BlockScale::of(scale_m);
        for (c, &uc) in m_codes.iter_mut().zip(u_codes.iter()).take(m.len()) {
            let limit = ratio * EXP_INF_CODE.decode(uc, scale_u);
            let cap = EXP_AVG_CODE.encode_magnitude(s.scaled(limit), ROUND_DOWN);
            *c = EXP_AVG_CODE.cap(*c, cap);
        }
    }
    (scale_m, scale_u)
}

/// A block's scale and its reciprocal, taken once per block, so that a value's fraction
/// of the scale is a multiply, not a division: `fraction(a) = f32(f32(a * factor) *
/// inv)` with `inv = f32(1 / f32(scale * factor))`, where `factor` is 2^64 for a scale
/// below f32's normal range (whose reciprocal would overflow) and 1 otherwise (both
/// products by `factor` are exact); a value at or above the scale (the block's largest)
/// is 1 exactly, so a block's largest magnitude is stored without error whatever the
/// rounding of the reciprocal.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockScale {
    scale: f32,
    factor: f32,
    inv: f32,
}

impl BlockScale {
    /// The reciprocal of a finite, positive `scale`.
    pub fn of(scale: f32) -> Self {
        let factor = if scale < f32::MIN_POSITIVE {
            18_446_744_073_709_551_616.0 // 2^64
        } else {
            1.0
        };
        Self {
            scale,
            factor,
            inv: 1.0 / (scale * factor),
        }
    }

    /// `a`'s fraction of the scale (`a >= 0`; 1 at or above it).
    pub fn fraction(&self, a: f32) -> f32 {
        if a >= self.scale {
            1.0
        } else {
            self.scaled(a)
        }
    }

    /// `f32(f32(a * factor) * inv)`, without the cap at 1 (for the moment bound's limit,
    /// which [`Code::encode_magnitude`] clamps).
    pub fn scaled(&self, a: f32) -> f32 {
        (a * self.factor) * self.inv
    }
}

/// One moment stored in 8 bits: a code per element, a scale per block of [`QBLOCK`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Blockwise8 {
    /// One code per element.
    pub codes: Vec<u8>,
    /// One scale per block: `ceil(len / QBLOCK)` of them.
    pub scales: Vec<f32>,
}

impl Blockwise8 {
    /// A zero moment of `len` elements.
    pub fn zeros(len: usize) -> Self {
        Self {
            codes: vec![0; len],
            scales: vec![0.0; len.div_ceil(QBLOCK)],
        }
    }

    /// Quantizes f32 values with round-to-nearest (ties down), the deterministic
    /// conversion used to bring f32 state (a PyTorch checkpoint) into 8 bits.
    pub fn from_f32(code: Code, values: &[f32]) -> Self {
        let mut q = Self::zeros(values.len());
        for (b, block) in values.chunks(QBLOCK).enumerate() {
            let codes = &mut q.codes[b * QBLOCK..b * QBLOCK + block.len()];
            q.scales[b] = code.encode_block(block, codes, |_| 0x80_0000);
        }
        q
    }

    /// The values the codes stand for (exact decoding, one rounding per element), one
    /// per code; a block without a scale (an inconsistent value built by hand) reads as
    /// NaN.
    pub fn to_f32(&self, code: Code) -> Vec<f32> {
        self.values(code).collect()
    }

    /// [`Blockwise8::to_f32`]'s values one at a time, without allocating.
    pub fn values(&self, code: Code) -> impl Iterator<Item = f32> + '_ {
        self.codes
            .chunks(QBLOCK)
            .enumerate()
            .flat_map(move |(b, block)| {
                let scale = self.scales.get(b).copied().unwrap_or(f32::NAN);
                block.iter().map(move |&c| code.decode(c, scale))
            })
    }
}
