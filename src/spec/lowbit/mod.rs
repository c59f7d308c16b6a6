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
//! a(key, i) = mix32(lo32(key) + lo32(i) * 0x9E3779B9 + hi32(i) * 0x85EBCA6B)
//! b(key, i) = mix32(hi32(key) + lo32(i) * 0xC2B2AE35 + hi32(i) * 0x85EBCA6B)
//! bits(key, i) = a << 32 | b                                  (all wrapping)
//! ```
//!
//! `mix64` is splitmix64's output function (Steele, Lea & Flood 2014; the constants of
//! Stafford's "variant 13"), taken once per tensor and step; `mix32` is Wellons'
//! `lowbias32` (hash-prospector; the output function of splitmix32), a bijection of 32
//! bits, taken once per word an element uses. Within a tensor of fewer than 2^32
//! elements no two elements draw the same word. A word is about seven instructions on
//! a GPU, where splitmix64's 64-bit multiplies were about seventeen (issue #19). `t` is
//! the tensor's own step (the step being taken, counted from one) and `i` the
//! element's index in its tensor. One draw serves the element: bits 0 to 15 (of `b`)
//! round the parameter, bits 32 to 47 (of `a`) the first moment, bits 48 to 63 the
//! infinity norm (16 random bits each, placed as the 24-bit `r` of
//! [`Code::encode_magnitude`] with a half unit below them: `r = bits << 8 | 0x80`, so a
//! code rounds up with probability `frac` to within 2^-17). A mode computes only the
//! words it uses: `a` with 8-bit state, `b` with stochastic rounding.
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
//! # 8-bit blockwise moments
//!
//! Each tensor's `m` and `u` are cut into blocks of [`QBLOCK`] elements (the last block
//! may be shorter). A block stores its largest magnitude as an f32 `scale` and one
//! 8-bit code per element for `value / scale`, a number in `[-1, 1]` (in `[0, 1]` for
//! `u`). The codes are small floating-point numbers ([`Code`]): the first moment
//! ([`EXP_AVG_CODE`]) has a sign, 4 exponent and 3 mantissa bits; the infinity norm
//! ([`EXP_INF_CODE`]), never negative, spends the sign bit on a 4th mantissa bit. Both
//! reach down to 2^-17 (2^-18) of the block's scale, with subnormals, and hold the
//! scale itself, 1.0, exactly, so a block's largest element is stored without error.
//! The choice of codes, block and rounding was made from the measurements in
//! BENCHMARKS.md ("8-bit state: choosing the codes").
//!
//! A block divides once: its values are scaled by the reciprocal of its scale, one
//! multiply each (its largest, `|x| >= scale`, is 1 exactly; a scale below f32's normal
//! range is first multiplied by 2^64, exactly, so that its reciprocal is finite).
//!
//! Encoding rounds stochastically with 24 random bits: with `y` the magnitude in units
//! of the code's spacing at that magnitude, `k = trunc(y)`, the code for `k + 1` is
//! taken when `frac(y) * 2^24 > r`, `frac(y)` taken to `23 - M` bits (exact at and above
//! `2^emin`, truncated below it), so up with probability `frac(y)` to within
//! 2^-(23 - M) (2^-20 for `m`, 2^-19 for `u`); it
//! is done on the f32's bits ([`Code::encode_magnitude`]).
//! Rounding to nearest would freeze `u`: `beta2 * u` is within half a code step of
//! `u` (0.999 against a relative step of 1/16), so `u` would never decay; unbiased
//! rounding lets it decay at the right rate on average.
//!
//! # The moment bound, kept in 8 bits
//!
//! AdaMax's moments keep `|m| <= c * u` with `c = (1 - beta1) / (1 - beta1 / beta2)`
//! (about 1.009 with PyTorch's defaults; [`crate::spec::moment_ratio`]), and so no step
//! moves a weight by more than about `c * lr / (1 - beta1^t)`. Rounding `m` and `u` apart,
//! each against its own block's scale, breaks that: `u` can come back as 0 while `m`
//! keeps its smallest code, and the next step divides by `eps`. So a block's moments are
//! encoded together ([`encode_moments`]): `u` first, then each `m` code, whose magnitude
//! is capped at the largest whose value is at most `c` times its element's decoded `u`
//! (`q = f32(c * u')` as a fraction of `m`'s scale, rounded down with the bits
//! `ROUND_DOWN`). The stored state
//! then keeps the bound itself, `u' = 0` implies `m' = 0`, and the step that reads it
//! moves no further than the bound allows. The cap only ever lowers `|m|` (by at most
//! its rounding), towards the safe side. Where no bound exists (`beta1 >= beta2`) nothing
//! is capped.
//!
//! Rounding `u` is unbiased, but the next step's `max(beta2 * u', |g| + eps)` is not: the
//! max of a noisy value sits above the max of the true one, so `u` drifts up (steps get
//! smaller, the safe direction). tests/lowbit.rs measures that drift.
//!
//! A block whose largest magnitude is 0 stores scale 0 and codes 0. A block with a
//! non-finite value stores a NaN scale: every element of the block reads back as NaN
//! (one NaN poisons its block, where f32 state poisons its element; with
//! [`StepOptions::skip_nonfinite`] no non-finite gradient reaches the state).
//!
//! [`ParamMode::Stochastic`]: crate::ParamMode::Stochastic
//! [`StateFormat::Blockwise8`]: crate::StateFormat::Blockwise8
//! [`StepOptions::skip_nonfinite`]: crate::StepOptions::skip_nonfinite

mod blocks;

pub use blocks::{encode_moments, BlockScale, Blockwise8, ROUND_DOWN};

use half::bf16;

/// Elements per block of 8-bit state (one f32 scale each for `m` and for `u`).
pub const QBLOCK: usize = 256;

const K_STEP: u64 = 0xD1B5_4A32_D192_ED03;
const K_TENSOR: u64 = 0xAEF1_7502_108E_F2D9;
const WEYL_A: u32 = 0x9E37_79B9;
const WEYL_B: u32 = 0xC2B2_AE35;
const WEYL_HIGH: u32 = 0x85EB_CA6B;

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

/// The 64 random bits of element `i` of a stream: two 32-bit words, each [`mix32`] of
/// a Weyl sequence offset by one half of the key (see the module docs).
#[doc(hidden)]
pub const fn element_bits(key: u64, i: u64) -> u64 {
    let (lo, hi) = (i as u32, (i >> 32) as u32);
    let high = hi.wrapping_mul(WEYL_HIGH);
    let a = mix32(
        (key as u32)
            .wrapping_add(lo.wrapping_mul(WEYL_A))
            .wrapping_add(high),
    );
    let b = mix32(
        ((key >> 32) as u32)
            .wrapping_add(lo.wrapping_mul(WEYL_B))
            .wrapping_add(high),
    );
    ((a as u64) << 32) | b as u64
}

/// The 16 bits that round the parameter.
#[doc(hidden)]
pub const fn param_bits(bits: u64) -> u32 {
    (bits & 0xFFFF) as u32
}

/// The 24-bit `r` that rounds the first moment: bits 32 to 47, and a half unit.
#[doc(hidden)]
pub const fn exp_avg_bits(bits: u64) -> u32 {
    ((((bits >> 32) & 0xFFFF) as u32) << 8) | 0x80
}

/// The 24-bit `r` that rounds the infinity norm: bits 48 to 63, and a half unit.
#[doc(hidden)]
pub const fn exp_inf_bits(bits: u64) -> u32 {
    (((bits >> 48) as u32) << 8) | 0x80
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

/// An 8-bit code: a small float for `value / scale`, a number of magnitude at most 1.
///
/// With `E` exponent bits and `M` mantissa bits, a magnitude's bits are an exponent
/// field `e` and a fraction `f`; it is `f * 2^(emin - M)` when `e = 0` (subnormals) and
/// `(2^M + f) * 2^(e - 1 + emin - M)` otherwise, with `emin = 2 - 2^E`. The top field
/// `e = 2^E - 1` is the binade of 1.0, of which only 1.0 itself is used. A signed code
/// puts the sign in bit 7.
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

/// The code of the first moment `m`: sign, 4 exponent bits, 3 mantissa bits.
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
    /// all with a sign, 8 without); `None` unless `exp_bits >= 1` and its smallest
    /// magnitude, `2^(2 - 2^exp_bits - man_bits)`, is an f32 normal (`2^exp_bits +
    /// man_bits <= 128`).
    ///
    /// ```
    /// use adamax_cuda::spec::lowbit::{Code, EXP_AVG_CODE};
    /// assert_eq!(Code::new(true, 4, 3), Some(EXP_AVG_CODE));
    /// assert_eq!(Code::new(false, 4, 3), None); // 7 bits without a sign
    /// assert_eq!(Code::new(false, 8, 0), None); // magnitudes below f32's normals
    /// ```
    pub const fn new(signed: bool, exp_bits: u32, man_bits: u32) -> Option<Self> {
        let bits = if signed { 7 } else { 8 };
        if exp_bits == 0 || exp_bits > 7 || man_bits > 8 || exp_bits + man_bits != bits {
            return None;
        }
        if (1 << exp_bits) + man_bits > 128 {
            return None;
        }
        Some(Self {
            signed,
            exp_bits,
            man_bits,
        })
    }

    /// The exponent of the smallest normal magnitude.
    const fn emin(self) -> i32 {
        2 - (1 << self.exp_bits)
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

    /// `code` with its magnitude lowered to `max_magnitude` where it is above (the sign
    /// kept, unless the magnitude becomes 0).
    pub fn cap(self, code: u8, max_magnitude: u32) -> u8 {
        let magnitude = self.magnitude(code);
        if magnitude <= max_magnitude {
            return code;
        }
        let sign = if self.signed && code & 0x80 != 0 && max_magnitude != 0 {
            0x80
        } else {
            0
        };
        (max_magnitude | sign) as u8
    }

    /// Stochastic rounding of a magnitude `q` in `[0, 1]` to a code, with 24 random
    /// bits `r` (`0x80_0000` rounds to nearest, ties down; [`ROUND_DOWN`] truncates). A
    /// `q` outside `[0, 1]` is clamped to it, NaN to 0. A block's values reach here as
    /// fractions of its largest magnitude, at most 1 (or above it by a relative 2^-22
    /// when the reciprocal of a scale near f32's largest is subnormal, too little to
    /// change a code, so the kernel does not clamp there); the moment cap's limit can
    /// exceed 1, and the kernel clamps it as this does.
    ///
    /// Integer rounding on the f32's bits, as bf16's: for `q >= 2^emin` the code is the
    /// top bits of `q`'s pattern less the exponent's offset, and `(r ^ 0xFFFFFF) >> (M +
    /// 1)` added below them rounds up exactly when `frac * 2^24 > r`, `frac` being the
    /// dropped `23 - M` bits as a fraction of the code's spacing. Below `2^emin` (the
    /// subnormal codes, spaced evenly) the same is done on `q + 2^emin` rounded toward
    /// zero (one `FADD.RZ` on the GPU), whose last `23 - M` bits are then `frac`
    /// truncated to that many bits: a code rounds up with probability `frac` to within
    /// 2^-(23 - M) everywhere.
    pub fn encode_magnitude(self, q: f32, r: u32) -> u32 {
        let q = if q.is_nan() { 0.0 } else { q.clamp(0.0, 1.0) };
        let (emin, man) = (self.emin(), self.man_bits);
        let round = ((r ^ 0xFF_FFFF) & 0xFF_FFFF) >> (man + 1);
        let offset = ((126 + emin) as u32) << man;
        let (bits, offset) = if q < pow2(emin) {
            // q + 2^emin toward zero: 2^emin's pattern plus q in units of 2^(emin - 23),
            // truncated (the scaling is exact, and below 2^23).
            let below = (q * pow2(23 - emin)) as u32;
            ((((127 + emin) as u32) << 23) | below, offset + (1 << man))
        } else {
            (q.to_bits(), offset)
        };
        ((bits + round) >> (23 - man)) - offset
    }

    /// The magnitude of a code (exact): `code` is the magnitude's bits, below 128 for a
    /// signed code and 256 otherwise. A larger number is no code of this format and
    /// gives NaN.
    pub fn decode_magnitude(self, code: u32) -> f32 {
        let bits = self.exp_bits + self.man_bits;
        if code >> bits != 0 {
            return f32::NAN;
        }
        let e = code >> self.man_bits;
        let f = code & ((1 << self.man_bits) - 1);
        let (mant, exp) = if e == 0 {
            (f, self.emin() - self.man_bits as i32)
        } else {
            (
                f + (1 << self.man_bits),
                e as i32 - 1 + self.emin() - self.man_bits as i32,
            )
        };
        mant as f32 * pow2(exp)
    }

    /// `x` (of magnitude at most `scale`, which is finite and positive) as a code, as a
    /// block of that scale encodes it ([`BlockScale::of`]).
    pub fn encode(self, x: f32, scale: f32, r: u32) -> u8 {
        self.encode_scaled(x, &BlockScale::of(scale), r)
    }

    /// `x` as a code in a block of scale `s`: the magnitude `q = s.fraction(|x|)`.
    #[doc(hidden)]
    pub fn encode_scaled(self, x: f32, s: &BlockScale, r: u32) -> u8 {
        let magnitude = self.encode_magnitude(s.fraction(x.abs()), r);
        let sign = if self.signed && x < 0.0 && magnitude != 0 {
            0x80
        } else {
            0
        };
        (magnitude | sign) as u8
    }

    /// The value a code stands for in a block of scale `scale`: one rounding, of the
    /// product.
    pub fn decode(self, code: u8, scale: f32) -> f32 {
        let negative = self.signed && code & 0x80 != 0;
        let v = self.decode_magnitude(self.magnitude(code)) * scale;
        if negative {
            -v
        } else {
            v
        }
    }

    /// Encodes a block: returns its scale and writes one code per value, drawing the
    /// rounding bits of value `j` from `bits(j)`. `codes` should be as long as `values`;
    /// codes beyond the values are left as they are (zeroed when the block's largest
    /// magnitude is 0 or not finite).
    pub fn encode_block(
        self,
        values: &[f32],
        codes: &mut [u8],
        bits: impl Fn(usize) -> u32,
    ) -> f32 {
        let absmax = values
            .iter()
            .fold(0.0f32, |a, &v| super::max_propagating_nan(a, v.abs()));
        if absmax == 0.0 || !absmax.is_finite() {
            codes.fill(0);
            return if absmax == 0.0 { 0.0 } else { f32::NAN };
        }
        let s = BlockScale::of(absmax);
        for (j, (c, &v)) in codes.iter_mut().zip(values).enumerate() {
            *c = self.encode_scaled(v, &s, bits(j));
        }
        absmax
    }
}
