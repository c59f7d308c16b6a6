//! A block of 8-bit state: its scale's reciprocal ([`BlockScale`]), the encoding of a
//! block's ratios and infinity norms ([`encode_moments`]), the first moment they stand
//! for ([`exp_avg_of`]), and a moment stored in blocks ([`Blockwise8`]). See the parent
//! module for the format.

use super::{exp_avg_bits, exp_inf_bits, Code, EXP_AVG_CODE, EXP_INF_CODE, QBLOCK};
use crate::config::EpsilonMode;

/// The random bits that make [`Code::encode_magnitude`] round to nearest (ties up): half
/// of the dropped bits' range.
#[doc(hidden)]
pub const ROUND_NEAREST: u32 = 0x8000;

/// The random bits that make [`Code::encode_magnitude`] round up, unless the dropped
/// bits are below 2^-16 of the code's step.
const ROUND_UP: u32 = 0xFFFF;

/// Encodes one block of 8-bit state, drawing element `j`'s rounding bits from `bits(j)`
/// ([`exp_avg_bits`] and [`exp_inf_bits`] of its draw): the infinity norms in
/// [`EXP_INF_CODE`] ([`Code::encode_block`]), then the ratios `m / den` of the step in
/// [`EXP_AVG_CODE`] against their block's scale, their largest magnitude lowered to
/// [`ratio_scale_limit`] where it is above (its ratios then saturate at the code 1.0);
/// returns the block's scales `(ratio, u)`. The slices are as long as each other.
pub fn encode_moments(
    ratios: &[f32],
    u: &[f32],
    ratio_codes: &mut [u8],
    u_codes: &mut [u8],
    eps: f32,
    eps_mode: EpsilonMode,
    bits: impl Fn(usize) -> u64,
) -> (f32, f32) {
    let scale_u = EXP_INF_CODE.encode_block(u, u_codes, |j| exp_inf_bits(bits(j)));
    let scale_r = encode_ratios(
        EXP_AVG_CODE,
        ratios,
        ratio_codes,
        scale_u,
        (eps, eps_mode),
        |j| exp_avg_bits(bits(j)),
    );
    (scale_r, scale_u)
}

/// Encodes a block of ratios in `code` beside a `u` block of scale `scale_u` (eps and
/// its mode as the configuration's): against their largest magnitude, lowered to
/// [`ratio_scale_limit`] where it is above (a NaN scale stays NaN), drawing value `j`'s
/// 16 rounding bits from `bits(j)`; returns the block's scale. `codes` as in
/// [`Code::encode_block`].
#[doc(hidden)]
pub fn encode_ratios(
    code: Code,
    ratios: &[f32],
    codes: &mut [u8],
    scale_u: f32,
    (eps, eps_mode): (f32, EpsilonMode),
    bits: impl Fn(usize) -> u32,
) -> f32 {
    let limit = ratio_scale_limit(scale_u, eps, eps_mode);
    let mut scale = Code::block_scale(ratios);
    if scale > limit {
        scale = limit;
    }
    code.encode_with_scale(ratios, codes, scale, bits);
    scale
}

/// The largest ratio scale a block may store next to a `u` block of scale `scale_u`, so
/// that no `m` it stands for overflows: with `den` the denominator of `scale_u`
/// ([`exp_avg_of`]; every element's is at most it) in the binade `[2^e, 2^(e + 1))`, the
/// float just below `2^(127 - e)`, or f32's largest value where that is not an f32 (`e
/// <= -1`). Then `|ratio * den| < 2^128 (1 - 2^-24) = f32::MAX` for every element: within
/// a factor 2 of the exact limit, and only below 2^127 / den where `den` is above 2^126
/// (f32 state keeps `|m|` within the largest `|g|`; stored as a ratio rounded up, it could
/// otherwise pass f32's largest value). The exponent's bits alone (a few integer
/// instructions a block on the GPU): `min(0x7F7F_FFFF, (381 << 23) - 1 - (bits(den) &
/// 0x7F80_0000))`. A NaN or infinite `den` gives about 0.5.
pub fn ratio_scale_limit(scale_u: f32, eps: f32, eps_mode: EpsilonMode) -> f32 {
    let den = exp_avg_of(1.0, scale_u, eps, eps_mode);
    let e = den.to_bits() & 0x7F80_0000;
    f32::from_bits(0x7F7F_FFFF_u32.min(((381 << 23) - 1) - e))
}

/// The first moment an 8-bit state stands for: its decoded ratio times the denominator of
/// its decoded `u`, `f32(ratio * den)` with `den = u` (eps inside the max) or `f32(u +
/// eps)` (eps in the denominator).
pub fn exp_avg_of(ratio: f32, exp_inf: f32, eps: f32, eps_mode: EpsilonMode) -> f32 {
    let den = match eps_mode {
        EpsilonMode::InsideMax => exp_inf,
        EpsilonMode::Denominator => exp_inf + eps,
    };
    ratio * den
}

/// A block's scale as its encoder uses it: `t = rz(a * inv + 2^f)`
/// ([`BlockScale::offset_fraction`]) with `inv = ru(ru(1 / scale) * (1 - 2^f))`, both
/// rounded up (toward +infinity), so that the block's largest magnitude, `a = scale`,
/// gives `a * inv >= 1 - 2^f` and so `t = 1` exactly (its code is 1.0), and any other
/// `a * inv` is at most 2^-22 above its exact value (2^-20 for a scale above 2^126, whose
/// reciprocal is subnormal), too little to matter to a rounding that draws 16 random
/// bits. The GPU takes it once per
/// block (`__frcp_ru`, `__fmul_ru`).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockScale {
    inv: f32,
}

/// `x * y` (finite, positive) rounded toward +infinity (the product of two f32 is exact
/// in f64).
fn mul_up(x: f32, y: f32) -> f32 {
    let exact = f64::from(x) * f64::from(y);
    let p = exact as f32;
    if f64::from(p) < exact {
        p.next_up()
    } else {
        p
    }
}

impl BlockScale {
    /// The reciprocal the encoder multiplies by (for tests that check it).
    #[doc(hidden)]
    pub fn inv(&self) -> f32 {
        self.inv
    }

    /// The reciprocal of `scale` (a finite f32 normal, positive) for `code`.
    pub fn of(code: Code, scale: f32) -> Self {
        let mut r = 1.0 / scale;
        if f64::from(r) * f64::from(scale) < 1.0 {
            r = r.next_up();
        }
        Self {
            inv: mul_up(r, code.span()),
        }
    }

    /// `t = min(|x| * inv + floor, 1)` with `floor = 2^f` of `code` (a NaN gives
    /// `floor`): the product and sum exact, rounded once toward zero (the kernel's
    /// `__saturatef(__fmaf_rz(fabsf(x), inv, floor))`), always in `[floor, 1]`. `|x| *
    /// inv` is exact in f64; the sum to nearest in f64 is stepped back to the f32 below
    /// where it lies on an f32 and the exact sum below it (TwoSum's error, Knuth):
    /// elsewhere the exact sum and the f64 one lie between the same two f32.
    pub fn offset_fraction(&self, code: Code, x: f32) -> f32 {
        let floor = code.floor();
        if x.is_nan() {
            return floor;
        }
        let product = f64::from(x.abs()) * f64::from(self.inv);
        if product >= 1.0 {
            return 1.0; // also infinity
        }
        let c = f64::from(floor);
        let sum = product + c;
        let back = sum - product;
        let err = (product - (sum - back)) + (c - back);
        let mut t = sum as f32;
        if f64::from(t) > sum || (f64::from(t) == sum && err < 0.0) {
            t = f32::from_bits(t.to_bits() - 1);
        }
        // (max: a scale that is no block's, negative or NaN, still gives a t in range.)
        t.max(floor).min(1.0)
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

    /// Quantizes f32 values with round-to-nearest (ties up), deterministic.
    pub fn from_f32(code: Code, values: &[f32]) -> Self {
        Self::rounded(code, values, ROUND_NEAREST)
    }

    /// f32 values in blocks of `code`, every rounding drawing the bits `r`.
    fn rounded(code: Code, values: &[f32], r: u32) -> Self {
        let mut q = Self::zeros(values.len());
        for (b, block) in values.chunks(QBLOCK).enumerate() {
            let codes = &mut q.codes[b * QBLOCK..b * QBLOCK + block.len()];
            q.scales[b] = code.encode_block(block, codes, |_| r);
        }
        q
    }

    /// The 8-bit state of f32 moments `m` and `u` (as long as each other), the
    /// deterministic conversion that brings f32 state (a PyTorch checkpoint) into 8 bits:
    /// `u` first, rounded up (to within 2^-16 of a code step), then each `m` as its ratio
    /// to the denominator of its element's stored `u` ([`exp_avg_of`]; 0 where that is
    /// 0), clamped to `±limit` (AdaMax's bound; `f32::INFINITY`, NaN or a negative
    /// `limit`: no clamp), rounded to nearest in blocks whose scales are limited as a
    /// step's are ([`encode_moments`]). Rounding `u` up keeps the ratios within the bound
    /// the f32 state keeps. Returns the ratio's and `u`'s blocks.
    pub fn encode_state(
        m: &[f32],
        u: &[f32],
        eps: f32,
        eps_mode: EpsilonMode,
        limit: f32,
    ) -> (Self, Self) {
        let u8s = Self::rounded(EXP_INF_CODE, u, ROUND_UP);
        let ratios: Vec<f32> = m
            .iter()
            .zip(u8s.values(EXP_INF_CODE))
            .map(|(&m, u)| {
                let den = exp_avg_of(1.0, u, eps, eps_mode);
                let r = if den == 0.0 { 0.0 } else { m / den };
                if limit.is_nan() || limit < 0.0 {
                    r
                } else if r > limit {
                    limit
                } else if r < -limit {
                    -limit
                } else {
                    r
                }
            })
            .collect();
        let mut q = Self::zeros(ratios.len());
        for (b, block) in ratios.chunks(QBLOCK).enumerate() {
            let codes = &mut q.codes[b * QBLOCK..b * QBLOCK + block.len()];
            let scale_u = u8s.scales.get(b).copied().unwrap_or(f32::NAN);
            q.scales[b] =
                encode_ratios(EXP_AVG_CODE, block, codes, scale_u, (eps, eps_mode), |_| {
                    ROUND_NEAREST
                });
        }
        (q, u8s)
    }

    /// The f32 moments `(m, u)` an 8-bit state (its ratio's and `u`'s blocks, as long as
    /// each other) stands for ([`exp_avg_of`]).
    pub fn decode_state(
        ratio: &Self,
        u: &Self,
        eps: f32,
        eps_mode: EpsilonMode,
    ) -> (Vec<f32>, Vec<f32>) {
        let u = u.to_f32(EXP_INF_CODE);
        let m = ratio
            .values(EXP_AVG_CODE)
            .zip(&u)
            .map(|(r, &u)| exp_avg_of(r, u, eps, eps_mode))
            .collect();
        (m, u)
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
