//! The spec of the modes that move fewer bytes: the counter-based random stream,
//! stochastic rounding of bf16 parameters ([`ParamMode::Stochastic`]) and the 8-bit
//! blockwise moments ([`StateFormat::Blockwise8`]). `kernels/adamax.cu` repeats each
//! function with the same integer and IEEE f32 operations, so the GPU draws the same
//! bits and rounds the same way.
//!
//! # The random stream
//!
//! Every random bit is a function of (seed, step, tensor, element), never of the order
//! in which threads run, so a run is reproducible and the GPU matches this module:
//!
//! ```text
//! key(seed, t, tensor) = mix64(mix64(seed ^ t * 0xD1B54A32D192ED03) ^ tensor * 0xAEF17502108EF2D9)
//! h(key, j) = mix32(lo32(key) + lo32(8j) * 0x9E3779B9 + hi32(8j) * 0x85EBCA6B)
//! w(key, i) = h(key, i / 8) * SPREAD[i % 8]
//! bits(key, i) = w(key, i) << 32 | w(key, i ^ 1) >> 16                 (all wrapping)
//! ```
//!
//! `mix64` is splitmix64's output function (Steele, Lea & Flood 2014; the constants of
//! Stafford's "variant 13"), taken once per tensor and step; `mix32` is Wellons'
//! `lowbias32` (hash-prospector; the output function of splitmix32), a bijection of 32
//! bits, taken once per aligned group of 8 elements (`8j` to `8j + 7`); each element of
//! a group takes the group's word times its own odd constant of `SPREAD` (one multiply).
//! `t` is the tensor's own step (the step being taken, counted from one) and `i` the
//! element's index in its tensor. One draw serves the element: bits 32 to 47 (the low
//! half of `w`) round the first moment's ratio, bits 48 to 63 (its high half) the
//! infinity norm, and bits 0 to 15 the parameter: the high half of its pair partner's
//! `w` (`i ^ 1`). Each is 16 random bits, the `r` of [`Code::encode_magnitude`] or of
//! [`round_bf16_stochastic`], so a rounding goes up with probability `frac` to within
//! 2^-16; bits 16 to 31 are 0. A mode computes only what it uses.
//!
//! ## Why one hash per 8 elements is enough
//!
//! Unbiased rounding asks one thing of the bits: that each element's 16-bit field be
//! uniform, whatever the values rounded. That holds exactly here, whatever the
//! quality of `mix32`: the key is a fresh splitmix64 output at every step, so the
//! Weyl term is uniform over 32 bits, and `mix32` and the multiply by an odd constant
//! are bijections, so `w` is uniform over 32 bits too. Its two halves, the moments'
//! fields, are then independent (any low half is independent of any high half, even
//! across elements: for a fixed low half of the hash, a high half is still uniform),
//! which the first moment needs: it is decoded as a product of the two roundings (`m'
//! = rho' * den'`), whose mean is the product of means only for independent roundings.
//! The parameter's rounding meets only its own element's moments in the rule; it takes
//! its partner's bits, which never meet it there, so that its error is not tied to its
//! own `u`'s (with coupled decay the parameter also enters its own `u` and ratio).
//!
//! What the cheaper stream gives up is independence between the 8 elements of a
//! group: their words are `x * c` for one uniform `x`, a rank-1 lattice, and their
//! ratio fields, the low halves, depend on the hash's low 16 bits alone (their lowest
//! bit or two, worth 2^-16 of a code step, agree across most of a group: 7 of the 8
//! constants are 1 mod 4). The constants were searched (`scripts/stream_spread.py`) so
//! that every pair of elements' fields, high halves (mod 2^32) and low halves (mod
//! 2^16), forms a 2D lattice whose shortest vector is at least 0.64 of the densest
//! lattice's: pairs of fields are spread evenly over the square, not on a few lines
//! (`tests/lowbit.rs` checks the figure, the low halves' joint histograms exactly and
//! the others' on a stream; groups of three or more elements are not checked). None
//! of this moves a rounding's mean; it can only correlate the errors of elements of one
//! group. Groups, steps and tensors draw independent words as before, and within a
//! tensor of fewer than 2^35 elements (2^32 groups) no two groups hash the same input.
//! The 8-bit updates draw one hash per 8 elements where the previous stream drew 8
//! (with a master) or 12 (`bf16_sr_q8`), and `bf16_sr` one where it drew 4
//! (BENCHMARKS.md, issue #19 part 7).
//!
//! # Stochastic rounding to bf16
//!
//! bf16 is the upper half of an f32. Adding 16 random bits to the f32's bit pattern
//! and keeping the upper half rounds the magnitude up with probability exactly
//! (dropped bits) / 2^16 and down otherwise, so the rounding is unbiased: `E[bf16(x)] =
//! x` (for finite results). A carry into the exponent is the correct rounding up to the
//! next binade; above bf16's largest finite value the result can round to infinity.
//! NaN is rounded as round-to-nearest does (a quiet NaN).
//!
//! # 8-bit state: `u` in blocks, `m` as its ratio to the step's denominator
//!
//! Each tensor's state is cut into blocks of [`QBLOCK`] elements (the last block may be
//! shorter), and each element keeps two 8-bit codes:
//!
//! - the infinity norm `u`, as a fraction of its block's largest `u` (the block's f32
//!   scale), in [`EXP_INF_CODE`] (no sign, 4 exponent and 4 mantissa bits);
//! - the first moment `m` as its **ratio** to the step's denominator, `rho = m / den`
//!   with `den = u` (eps inside the max) or `u + eps` (eps in the denominator): the
//!   very `m / den` the rule divides out for the step ([`crate::spec::update`]'s
//!   `update`, 0 where `den = 0`). It is stored as a fraction of its block's largest
//!   `|rho|` (the block's other scale), in [`EXP_AVG_CODE`] (a sign, 4 exponent and 3
//!   mantissa bits).
//!
//! A step decodes `u'`, then `m' = f32(rho' * den')` with `den'` from `u'` as above
//! ([`exp_avg_of`]), applies the rule, and encodes the new `u` and the step's own
//! ratio. The choice of codes, block and rounding was made from the measurements in
//! BENCHMARKS.md ("8-bit state: choosing the codes"; the ratio form in "8-bit state
//! v2").
//!
//! ## Why the ratio: AdaMax's bound holds by construction
//!
//! AdaMax keeps `|m| <= c * u` with `c = (1 - beta1) / (1 - beta1 / beta2)` (about 1.009
//! with PyTorch's defaults), so no step moves a weight by more than about `c * lr / (1 -
//! beta1^t)`. Rounding `m` and `u` apart, each against its own block's scale, breaks
//! that (`u` can come back as 0 while `m` keeps a code, and the next step divides by
//! `eps`); the first 8-bit encoder did. Stored as a ratio, the step a state makes is
//! its decoded ratio itself, whatever `u` rounded to: `m' / den' = rho'`, and `|rho'|`
//! is at most its block's scale, the largest `|m / den|` the rule computed, itself
//! within `c` (with rounding slack; `crate::state::MomentBound` checks files for it).
//! `u' = 0` gives `m' = 0`. No cap, no check per element: the bound is in the format.
//! (Where `beta1 >= beta2` no bound exists, and the ratio is stored all the same.) The
//! ratio also spares the GPU the cap of the first #19 encoder (per element a decode, two
//! products, an encode and a minimum): the rule's one division gives both the step and
//! the value stored.
//!
//! ## The codes
//!
//! A code with `E` exponent and `M` mantissa bits ([`Code`]) stands for a magnitude `q`
//! in `[0, 1]` through `t = q + 2^f` with `f = 1 - 2^E` (-15 for both codes): `t` in `[2^f,
//! 1]` is an ordinary float of `2^E` exponent values (the binades `2^f` to `2^-1`, and 1.0
//! itself) and `M` mantissa bits, so that the code is the top bits of `t`'s f32 pattern
//! less an offset, and `q = (t - 2^f) / (1 - 2^f)`. Near 0 the codes are evenly spaced
//! (by `2^(f - M)`: 2^-18 for `rho`, 2^-19 for `u` of the block's scale), elsewhere
//! spaced as a float's. 0 and 1.0 are codes, so a block's zeros and its largest
//! magnitude are stored without error.
//!
//! Encoding is integer rounding on the bits, as for bf16: `t = sat(rz(|x| * inv +
//! 2^f))`, the product and sum rounded once toward zero and clamped to 1 (one
//! `FFMA.RZ.SAT` on the GPU), with `inv` the block scale's reciprocal times `1 - 2^f`,
//! each rounded up ([`BlockScale`]: so the block's largest magnitude gives `t = 1`
//! exactly), then 16 random bits `r`, shifted to the top of the `23 - M` bits the code
//! drops, are added to the pattern before the shift: a code rounds up with probability
//! `frac(t)` to within 2^-16 of a code step (`t` itself is at most 2^-22 of it above
//! its exact value, 2^-20 for a scale above 2^126, from the reciprocal's upward
//! roundings, and up to one unit in its last place below, from the sum's rounding
//! toward zero). Rounding to nearest would
//! freeze `u`: `beta2 * u` is within half a code step of `u` (0.999 against a relative
//! step of 1/16), so `u` would never decay; unbiased rounding lets it decay at the right
//! rate on average. `rho`'s sign is its f32 sign bit, in bit 7.
//!
//! A block's scale is its largest magnitude (of `u`, or of `rho`), f32. A block whose
//! largest is 0 or below f32's normal range (2^-126: no optimizer state is made of such
//! values) stores scale 0 and codes 0; a block with a non-finite value stores a NaN
//! scale, and every element of the block reads back as NaN (one NaN poisons its block,
//! where f32 state poisons its element; with [`StepOptions::skip_nonfinite`] no
//! non-finite gradient reaches the state).
//!
//! Rounding `u` is unbiased, but the next step's `max(beta2 * u', |g| + eps)` is not: the
//! max of a noisy value sits above the max of the true one, so `u` drifts up (steps get
//! smaller, the safe direction). tests/lowbit.rs measures that drift.
//!
//! [`StateFormat::Blockwise8`]: crate::StateFormat::Blockwise8
//! [`StepOptions::skip_nonfinite`]: crate::StepOptions::skip_nonfinite
//! [`ParamMode::Stochastic`]: crate::ParamMode::Stochastic

mod blocks;

pub use blocks::{
    encode_moments, encode_ratios, exp_avg_of, ratio_scale_limit, BlockScale, Blockwise8,
    ROUND_NEAREST,
};

use half::bf16;

/// Elements per block of 8-bit state (one f32 scale each for `m` and for `u`).
pub const QBLOCK: usize = 256;

const K_STEP: u64 = 0xD1B5_4A32_D192_ED03;
const K_TENSOR: u64 = 0xAEF1_7502_108E_F2D9;
const WEYL_A: u32 = 0x9E37_79B9;
const WEYL_HIGH: u32 = 0x85EB_CA6B;

/// The odd multipliers that spread a group's word over its 8 elements (see the module
/// docs; searched by `scripts/stream_spread.py`).
#[doc(hidden)]
pub const SPREAD: [u32; 8] = [
    0x0000_0001,
    0x8DBA_9E15,
    0xF70F_CF31,
    0x6CE6_9E19,
    0x4CDE_2F85,
    0x91E3_6855,
    0x5089_190F,
    0x91E1_6095,
];

/// splitmix64's output function: a bijective 64-bit mix.
#[doc(hidden)]
pub const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A bijective 32-bit mix: Wellons' `lowbias32` (hash-prospector), the output function
/// of splitmix32.
#[doc(hidden)]
pub const fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x21F0_AAAD);
    x ^= x >> 15;
    x = x.wrapping_mul(0x735A_2D97);
    x ^ (x >> 15)
}

/// The key of tensor `tensor`'s stream in its step `t` (from 1).
#[doc(hidden)]
pub const fn stream_key(seed: u64, t: u64, tensor: u64) -> u64 {
    mix64(mix64(seed ^ t.wrapping_mul(K_STEP)) ^ tensor.wrapping_mul(K_TENSOR))
}

/// The word `w` of element `i`: [`mix32`] of the Weyl term of its group's first
/// element, times the element's constant of [`SPREAD`].
const fn word(key: u64, i: u64) -> u32 {
    let first = i & !7;
    let (lo, hi) = (first as u32, (first >> 32) as u32);
    let h = mix32(
        (key as u32)
            .wrapping_add(lo.wrapping_mul(WEYL_A))
            .wrapping_add(hi.wrapping_mul(WEYL_HIGH)),
    );
    h.wrapping_mul(SPREAD[(i & 7) as usize])
}

/// The random bits of element `i` of a stream: its word in bits 32 to 63, and in bits 0
/// to 15 the high half of its pair partner's (see the module docs).
#[doc(hidden)]
pub const fn element_bits(key: u64, i: u64) -> u64 {
    ((word(key, i) as u64) << 32) | (word(key, i ^ 1) >> 16) as u64
}

/// The 16 bits that round the parameter.
#[doc(hidden)]
pub const fn param_bits(bits: u64) -> u32 {
    (bits & 0xFFFF) as u32
}

/// The 16 random bits that round the first moment's ratio: bits 32 to 47.
#[doc(hidden)]
pub const fn exp_avg_bits(bits: u64) -> u32 {
    ((bits >> 32) & 0xFFFF) as u32
}

/// The 16 random bits that round the infinity norm: bits 48 to 63.
#[doc(hidden)]
pub const fn exp_inf_bits(bits: u64) -> u32 {
    (bits >> 48) as u32
}

/// `x` rounded to bf16 stochastically with the 16 random bits `r` (see the module docs).
#[doc(hidden)]
pub fn round_bf16_stochastic(x: f32, r: u32) -> bf16 {
    let b = x.to_bits();
    if (b & 0x7FFF_FFFF) > 0x7F80_0000 {
        return bf16::from_f32(x);
    }
    // Cannot overflow: every non-NaN pattern is at most 0xFF80_0000.
    bf16::from_bits(((b + (r & 0xFFFF)) >> 16) as u16)
}

/// `2^e` for `e` in f32's normal range.
fn pow2(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

/// `a + b` rounded toward zero, for `a >= 0` and `b > 0` finite: the sum to nearest,
/// stepped back where that rounding went up (the exact error of the sum by TwoSum,
/// Knuth). The kernel's `__fadd_rz`.
fn add_toward_zero(a: f32, b: f32) -> f32 {
    let s = a + b;
    let bb = s - a;
    let err = (a - (s - bb)) + (b - bb);
    if err < 0.0 {
        f32::from_bits(s.to_bits() - 1)
    } else {
        s
    }
}

/// An 8-bit code: a small float for a magnitude `q` in `[0, 1]`, stored as `t = q +
/// 2^f` (see the module docs), with a sign in bit 7 for a signed code.
///
/// With `E` exponent bits and `M` mantissa bits, `f = 1 - 2^E`, and a magnitude code
/// `c` stands for `t = 2^(e + f) * (1 + m / 2^M)` with `e = c >> M` and `m` its low `M`
/// bits: the top binade `e = 2^E - 1` holds only `t = 1`, the magnitude 1.0. `q = (t -
/// 2^f) / (1 - 2^f)`, in f64, rounded to f32.
///
/// The crate's state uses [`EXP_AVG_CODE`] and [`EXP_INF_CODE`]; others (for studies of
/// the format) come from [`Code::new`], which makes only codes whose every value is an
/// f32, so every method is defined on every input:
///
/// ```compile_fail
/// // The fields are private: a code with 32 exponent bits cannot exist.
/// let c = adamax_cuda::spec::lowbit::Code { signed: false, exp_bits: 32, man_bits: 0 };
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Code {
    /// Whether bit 7 is a sign.
    signed: bool,
    /// Exponent bits.
    exp_bits: u32,
    /// Mantissa bits: `exp_bits + man_bits` is 7 for a signed code, 8 otherwise.
    man_bits: u32,
}

/// The code of the first moment's ratio `m / den`: sign, 4 exponent bits, 3 mantissa
/// bits.
pub const EXP_AVG_CODE: Code = Code {
    signed: true,
    exp_bits: 4,
    man_bits: 3,
};

/// The code of the infinity norm `u`: 4 exponent bits, 4 mantissa bits, no sign.
pub const EXP_INF_CODE: Code = Code {
    signed: false,
    exp_bits: 4,
    man_bits: 4,
};

impl Code {
    /// An 8-bit code with `exp_bits` exponent and `man_bits` mantissa bits (7 bits in
    /// all with a sign, 8 without); `None` unless `1 <= exp_bits <= 6` (so that `2^f`,
    /// `f = 1 - 2^exp_bits`, is an f32 normal).
    ///
    /// ```
    /// use adamax_cuda::spec::lowbit::{Code, EXP_AVG_CODE};
    /// assert_eq!(Code::new(true, 4, 3), Some(EXP_AVG_CODE));
    /// assert_eq!(Code::new(false, 4, 3), None); // 7 bits without a sign
    /// assert_eq!(Code::new(false, 8, 0), None); // magnitudes below f32's normals
    /// ```
    pub const fn new(signed: bool, exp_bits: u32, man_bits: u32) -> Option<Self> {
        let bits = if signed { 7 } else { 8 };
        if exp_bits == 0 || exp_bits > 6 || man_bits > 8 || exp_bits + man_bits != bits {
            return None;
        }
        Some(Self {
            signed,
            exp_bits,
            man_bits,
        })
    }

    /// `f`: the magnitudes are stored as `q + 2^f`.
    const fn floor_exp(self) -> i32 {
        1 - (1 << self.exp_bits)
    }

    /// `2^f`, the least `t`.
    pub(crate) fn floor(self) -> f32 {
        pow2(self.floor_exp())
    }

    /// The offset of the code in `t`'s f32 pattern, shifted right by `23 - M`.
    const fn offset(self) -> u32 {
        ((127 + self.floor_exp()) as u32) << self.man_bits
    }

    /// The largest valid code: the magnitude 1.0 (positive for a signed code).
    pub const fn max_magnitude_code(self) -> u32 {
        ((1 << self.exp_bits) - 1) << self.man_bits
    }

    /// Whether `code` is one the encoder can produce (no magnitude above 1).
    pub const fn is_valid(self, code: u8) -> bool {
        self.magnitude(code) <= self.max_magnitude_code()
    }

    /// The magnitude bits of `code` (without the sign bit of a signed code).
    pub(crate) const fn magnitude(self, code: u8) -> u32 {
        if self.signed {
            code as u32 & 0x7F
        } else {
            code as u32
        }
    }

    /// `1 - 2^f`, rounded to nearest: a block scale's reciprocal is multiplied by it
    /// ([`BlockScale::of`]).
    pub(crate) fn span(self) -> f32 {
        (1.0 - f64::from(pow2(self.floor_exp()))) as f32
    }

    /// Stochastic rounding to a code, with 16 random bits `r` ([`ROUND_NEAREST`] rounds
    /// to nearest, ties up), of `s`, a magnitude `q` in `[0, 1]` already scaled by `1 -
    /// 2^f` (finite, `>= 0`; `t` above 1 is taken as 1): `t = min(s + 2^f rounded toward
    /// zero, 1)`, then `r`, placed at the top of the bits the code drops (`23 - M` of
    /// them), is added to `t`'s pattern, and the code is its top bits less the offset. It
    /// rounds up with probability `frac(t)` (its dropped bits as a fraction of the code's
    /// step) to within 2^-16. A NaN is taken as 0. The state's encoder
    /// ([`Code::encode_scaled`]) makes `t` from the value and its block's reciprocal in
    /// one rounding instead, then rounds `t` the same way.
    pub fn encode_magnitude(self, q: f32, r: u32) -> u32 {
        let floor = self.floor();
        let t = if q.is_nan() {
            floor
        } else {
            add_toward_zero(q.max(0.0), floor).min(1.0)
        };
        self.encode_offset(t, r)
    }

    /// The code of `t` in `[2^f, 1]` with 16 random bits `r` (see
    /// [`Code::encode_magnitude`]). On the GPU one multiply-add that leaves the code in
    /// a word's top byte, then a byte permute per four codes to pack them.
    fn encode_offset(self, t: f32, r: u32) -> u32 {
        let man = self.man_bits;
        let dither = (r & 0xFFFF) << (7 - man);
        ((t.to_bits() + dither) >> (23 - man)) - self.offset()
    }

    /// The magnitude of a code (exact in f64, rounded once to f32): `code` is the
    /// magnitude's bits, below 128 for a signed code and 256 otherwise. A larger number
    /// is no code of this format and gives NaN; a code above
    /// [`Code::max_magnitude_code`] decodes to more than 1.
    pub fn decode_magnitude(self, code: u32) -> f32 {
        let bits = self.exp_bits + self.man_bits;
        if code >> bits != 0 {
            return f32::NAN;
        }
        let t = f32::from_bits((code + self.offset()) << (23 - self.man_bits));
        let floor = f64::from(pow2(self.floor_exp()));
        ((f64::from(t) - floor) / (1.0 - floor)) as f32
    }

    /// `x` (of magnitude at most `scale`, which is a finite f32 normal) as a code, as a
    /// block of that scale encodes it ([`BlockScale::of`]).
    pub fn encode(self, x: f32, scale: f32, r: u32) -> u8 {
        self.encode_scaled(x, &BlockScale::of(self, scale), r)
    }

    /// `x` as a code in a block of scale `s`: `t = min(|x| * inv + 2^f, 1)`, the
    /// product and sum rounded once toward zero ([`BlockScale::offset_fraction`]; on the
    /// GPU one `FFMA.RZ.SAT`), rounded to a code with `r` as [`Code::encode_magnitude`]
    /// does, and for a signed code `x`'s sign bit in bit 7. A NaN is taken as 0 (the
    /// kernel meets one only in a block whose scale is NaN, whose codes it stores as 0).
    #[doc(hidden)]
    pub fn encode_scaled(self, x: f32, s: &BlockScale, r: u32) -> u8 {
        let magnitude = self.encode_offset(s.offset_fraction(self, x), r);
        let sign = if self.signed && x.is_sign_negative() {
            0x80
        } else {
            0
        };
        (magnitude | sign) as u8
    }

    /// The value a code stands for in a block of scale `scale`: its signed magnitude
    /// times the scale, one rounding.
    pub fn decode(self, code: u8, scale: f32) -> f32 {
        let magnitude = self.decode_magnitude(self.magnitude(code));
        let signed = if self.signed && code & 0x80 != 0 {
            -magnitude
        } else {
            magnitude
        };
        signed * scale
    }

    /// A block's scale from its values: their largest magnitude, 0 when that is 0 or below
    /// f32's normal range, NaN when it is not finite.
    #[doc(hidden)]
    pub fn block_scale(values: &[f32]) -> f32 {
        let absmax = values
            .iter()
            .fold(0.0f32, |a, &v| super::max_propagating_nan(a, v.abs()));
        if !absmax.is_finite() {
            f32::NAN
        } else if absmax < f32::MIN_POSITIVE {
            0.0
        } else {
            absmax
        }
    }

    /// Encodes a block: returns its scale ([`Code::block_scale`]) and writes one code per
    /// value, drawing the rounding bits of value `j` from `bits(j)`. `codes` should be as
    /// long as `values`; codes beyond the values are left as they are (zeroed when the
    /// block's scale is 0 or NaN).
    pub fn encode_block(
        self,
        values: &[f32],
        codes: &mut [u8],
        bits: impl Fn(usize) -> u32,
    ) -> f32 {
        let scale = Self::block_scale(values);
        self.encode_with_scale(values, codes, scale, bits);
        scale
    }

    /// Writes one code per value against a block scale given (a value above it takes
    /// the code 1.0): codes 0 for a scale of 0 or NaN (and for a negative one or one
    /// below f32's normal range, which no block has). `codes` as in
    /// [`Code::encode_block`].
    #[doc(hidden)]
    pub fn encode_with_scale(
        self,
        values: &[f32],
        codes: &mut [u8],
        scale: f32,
        bits: impl Fn(usize) -> u32,
    ) {
        if scale.is_nan() || scale < f32::MIN_POSITIVE || scale.is_infinite() {
            codes.fill(0);
            return;
        }
        let s = BlockScale::of(self, scale);
        for (j, (c, &v)) in codes.iter_mut().zip(values).enumerate() {
            *c = self.encode_scaled(v, &s, bits(j));
        }
    }
}
