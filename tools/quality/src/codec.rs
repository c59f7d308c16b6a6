//! 8-bit state emulated with any code, block size, rounding and encoder, from the spec's
//! public functions: the candidates `src/spec/lowbit.rs` chose between, the crate's own
//! codec (checked against `CpuAdamax` bit for bit), and the two codecs before it, with the
//! codes of their time ([`v1`]): the first #19 codec (`m` capped to AdaMax's bound of its
//! element's `u`) and the codec before issue #19 (`m` and `u` apart).

use adamax_cuda::spec::{
    lowbit::{self, Code, EXP_AVG_CODE, EXP_INF_CODE, ROUND_NEAREST},
    update, StepScalars,
};

/// The 8-bit codes before 8-bit state v2 (commit 6b96f15), reproduced for the
/// comparisons: `E` exponent and `M` mantissa bits of `value / scale`, subnormal codes
/// below `2^emin` (`emin = 2 - 2^E`), 24 random bits per rounding, a block's fraction as
/// `a >= scale ? 1 : (a * factor) * (1 / (scale * factor))`.
pub mod v1 {
    use adamax_cuda::spec::lowbit::mix32;

    /// The random stream of that time (until the pairs of elements of issue #19's kernel
    /// work): both words drawn for every element, `a << 32 | b`. The old codec takes its
    /// bits 16 to 39, which the current stream leaves 0 from 16 to 31.
    pub fn element_bits(key: u64, i: u64) -> u64 {
        let high = ((i >> 32) as u32).wrapping_mul(0x85EB_CA6B);
        let word = |half: u32, weyl: u32| {
            mix32(
                half.wrapping_add((i as u32).wrapping_mul(weyl))
                    .wrapping_add(high),
            )
        };
        ((word(key as u32, 0x9E37_79B9) as u64) << 32)
            | word((key >> 32) as u32, 0xC2B2_AE35) as u64
    }

    fn pow2(e: i32) -> f32 {
        f32::from_bits(((e + 127) as u32) << 23)
    }

    /// A code's shape: signed, exponent and mantissa bits.
    #[derive(Clone, Copy, Debug, PartialEq)]
    pub struct Shape {
        pub signed: bool,
        pub e: u32,
        pub m: u32,
    }

    impl Shape {
        fn emin(self) -> i32 {
            2 - (1 << self.e)
        }

        pub fn decode_magnitude(self, code: u32) -> f32 {
            let (e, f) = (code >> self.m, code & ((1 << self.m) - 1));
            let (mant, exp) = if e == 0 {
                (f, self.emin() - self.m as i32)
            } else {
                (
                    f + (1 << self.m),
                    e as i32 - 1 + self.emin() - self.m as i32,
                )
            };
            mant as f32 * pow2(exp)
        }

        pub fn decode(self, code: u8, scale: f32) -> f32 {
            let magnitude = if self.signed { code & 0x7F } else { code };
            let v = self.decode_magnitude(u32::from(magnitude)) * scale;
            if self.signed && code & 0x80 != 0 {
                -v
            } else {
                v
            }
        }

        /// `q` in `[0, 1]` (clamped, NaN to 0), 24 random bits `r`.
        pub fn encode_magnitude(self, q: f32, r: u32) -> u32 {
            let q = if q.is_nan() { 0.0 } else { q.clamp(0.0, 1.0) };
            let (emin, man) = (self.emin(), self.m);
            let round = ((r ^ 0xFF_FFFF) & 0xFF_FFFF) >> (man + 1);
            let offset = ((126 + emin) as u32) << man;
            let (bits, offset) = if q < pow2(emin) {
                let below = (q * pow2(23 - emin)) as u32;
                ((((127 + emin) as u32) << 23) | below, offset + (1 << man))
            } else {
                (q.to_bits(), offset)
            };
            ((bits + round) >> (23 - man)) - offset
        }

        pub fn with_sign(self, magnitude: u32, x: f32) -> u8 {
            let sign = if self.signed && x < 0.0 && magnitude != 0 {
                0x80
            } else {
                0
            };
            (magnitude | sign) as u8
        }
    }

    /// A block's scale and reciprocal.
    pub struct Scale {
        scale: f32,
        factor: f32,
        inv: f32,
    }

    impl Scale {
        pub fn of(scale: f32) -> Self {
            let factor = if scale < f32::MIN_POSITIVE {
                18_446_744_073_709_551_616.0
            } else {
                1.0
            };
            Self {
                scale,
                factor,
                inv: 1.0 / (scale * factor),
            }
        }

        pub fn scaled(&self, a: f32) -> f32 {
            (a * self.factor) * self.inv
        }

        pub fn fraction(&self, a: f32) -> f32 {
            if a >= self.scale {
                1.0
            } else {
                self.scaled(a)
            }
        }
    }
}

/// A code's shape, for the codecs of [`v1`]: a signed code's largest magnitude code is
/// below 128, and it is `(2^E - 1) << M`.
fn shape(code: Code) -> v1::Shape {
    let max = code.max_magnitude_code();
    let m = max.trailing_zeros();
    v1::Shape {
        signed: max < 128,
        e: ((max >> m) + 1).trailing_zeros(),
        m,
    }
}

/// An 8-bit code for `value / block absmax`: one of the spec's small floats, or a
/// linear (integer) code as a naive baseline.
#[derive(Clone, Copy, Debug)]
pub enum Quant {
    Float(Code),
    /// `round(|x| / scale * levels)`, with a sign bit when signed (127 levels, else 255).
    Linear {
        signed: bool,
    },
}

impl Quant {
    fn levels(signed: bool) -> f32 {
        if signed {
            127.0
        } else {
            255.0
        }
    }

    fn decode(self, c: u8, scale: f32, v1: bool) -> f32 {
        match self {
            Quant::Float(code) if v1 => shape(code).decode(c, scale),
            Quant::Float(code) => code.decode(c, scale),
            Quant::Linear { signed } => {
                let (mag, neg) = if signed {
                    (c & 0x7F, c & 0x80 != 0)
                } else {
                    (c, false)
                };
                let v = f32::from(mag) / Self::levels(signed) * scale;
                if neg {
                    -v
                } else {
                    v
                }
            }
        }
    }

    /// The block's scale; writes the codes (rounding bits from `bits(j)`: 16 for the
    /// crate's codes, 24 for the others). `encoder`: the crate's codes
    /// ([`Code::encode_block`]), or [`v1`]'s with the scale's reciprocal (the first #19
    /// codec) or by division (before issue #19).
    fn encode_block(
        self,
        v: &[f32],
        codes: &mut [u8],
        encoder: Encoder,
        bits: impl Fn(usize) -> u32,
    ) -> f32 {
        match self {
            Quant::Float(code) if encoder == Encoder::Ratio => code.encode_block(v, codes, bits),
            Quant::Float(code) => {
                let absmax = v.iter().fold(0.0f32, |a, x| nan_max(a, x.abs()));
                if absmax == 0.0 || !absmax.is_finite() {
                    codes.fill(0);
                    return if absmax == 0.0 { 0.0 } else { f32::NAN };
                }
                let (sh, s) = (shape(code), v1::Scale::of(absmax));
                for (j, (c, &x)) in codes.iter_mut().zip(v).enumerate() {
                    let q = if encoder == Encoder::Old {
                        x.abs() / absmax
                    } else {
                        s.fraction(x.abs())
                    };
                    *c = sh.with_sign(sh.encode_magnitude(q, bits(j)), x);
                }
                absmax
            }
            Quant::Linear { signed } => {
                let absmax = v.iter().fold(0.0f32, |a, x| a.max(x.abs()));
                if absmax == 0.0 || !absmax.is_finite() {
                    codes.fill(0);
                    return if absmax == 0.0 { 0.0 } else { f32::NAN };
                }
                for (j, (c, &x)) in codes.iter_mut().zip(v).enumerate() {
                    let y = x.abs() / absmax * Self::levels(signed);
                    let k = y as u32;
                    let up =
                        u32::from((y - k as f32) * 16_777_216.0 > (bits(j) & 0xFF_FFFF) as f32);
                    let mag = (k + up).min(Self::levels(signed) as u32);
                    *c = (mag
                        | if signed && x < 0.0 && mag != 0 {
                            0x80
                        } else {
                            0
                        }) as u8;
                }
                absmax
            }
        }
    }
}

/// The larger of two magnitudes, NaN if either is (as the spec's block maximum).
fn nan_max(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.max(b)
    }
}

/// The rounding bits of one moment, from an element's 64-bit draw.
type RoundingBits = fn(u64) -> u32;

/// How a block's two moments are encoded.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Encoder {
    /// The crate's (8-bit state v2, any code): `u` in its blocks, `m` as its ratio to the
    /// step's denominator in blocks of its own (`lowbit::encode_moments`), 16 random bits
    /// each (bits 32-47 for the ratio, 48-63 for `u`).
    Ratio,
    /// The first #19 codec, in [`v1`]'s codes: `u` first, then each `m` code capped at the
    /// largest whose value is within the moment ratio of its element's decoded `u`;
    /// fractions by the scale's reciprocal; bits 32-47 (`m`) and 48-63 (`u`) of the draw
    /// with a half unit below them.
    Capped,
    /// `m` and `u` apart, each in its blocks (the linear baseline).
    Apart,
    /// The codec before issue #19, in [`v1`]'s codes: `m` and `u` apart, each fraction by a
    /// division, 24 random bits each: bits 16-39 of the draw for `m`, 40-63 for `u`, from
    /// the stream of its time ([`v1::element_bits`]).
    Old,
}

/// AdaMax's moment ratio `c = (1 - beta1) / (1 - beta1 / beta2)` as the first #19 codec
/// capped `m` with (f64 from the f32 betas, rounded to f32; 1 for `beta1 = 0`; infinite
/// where no bound exists).
fn moment_ratio(s: &StepScalars) -> f32 {
    if s.beta1 == 0.0 {
        return 1.0;
    }
    let kept = f64::from(s.beta1) / f64::from(s.beta2);
    if kept.is_nan() || kept >= 1.0 {
        return f32::INFINITY;
    }
    (f64::from(s.one_minus_beta1) / (1.0 - kept)) as f32
}

/// One emulated 8-bit state: codes, block, rounding, encoder.
#[derive(Clone, Copy, Debug)]
pub struct Candidate {
    pub name: &'static str,
    pub m: Quant,
    pub u: Quant,
    pub block: usize,
    pub stochastic: bool,
    pub encoder: Encoder,
}

const fn float(signed: bool, exp_bits: u32, man_bits: u32) -> Quant {
    match Code::new(signed, exp_bits, man_bits) {
        Some(code) => Quant::Float(code),
        None => panic!("not an 8-bit code"),
    }
}

impl Candidate {
    /// Encodes one block of `m` (or, with [`Encoder::Ratio`], the ratios) and `u` into
    /// their codes; returns their scales. `draw(j)` is element `j`'s 64 random bits.
    fn encode(
        &self,
        m: &[f32],
        u: &[f32],
        (cm, cu): (&mut [u8], &mut [u8]),
        s: &StepScalars,
        draw: impl Fn(usize) -> u64,
    ) -> (f32, f32) {
        let ratio = moment_ratio(s);
        let (m_bits, u_bits, nearest): (RoundingBits, RoundingBits, u32) = match self.encoder {
            Encoder::Ratio => (lowbit::exp_avg_bits, lowbit::exp_inf_bits, ROUND_NEAREST),
            Encoder::Old => (
                |d| ((d >> 16) & 0xFF_FFFF) as u32,
                |d| (d >> 40) as u32,
                0x80_0000,
            ),
            Encoder::Capped | Encoder::Apart => (
                |d| ((((d >> 32) & 0xFFFF) as u32) << 8) | 0x80,
                |d| (((d >> 48) as u32) << 8) | 0x80,
                0x80_0000,
            ),
        };
        let r = |bits: u32| if self.stochastic { bits } else { nearest };
        let su = self
            .u
            .encode_block(u, cu, self.encoder, |j| r(u_bits(draw(j))));
        if let (Encoder::Ratio, Quant::Float(mc)) = (self.encoder, self.m) {
            // The crate's (lowbit::encode_moments), in any code.
            let sm =
                lowbit::encode_ratios(mc, m, cm, su, (s.eps, s.eps_mode), |j| r(m_bits(draw(j))));
            return (sm, su);
        }
        let sm = self
            .m
            .encode_block(m, cm, self.encoder, |j| r(m_bits(draw(j))));
        if let (Encoder::Capped, Quant::Float(mc), Quant::Float(uc)) =
            (self.encoder, self.m, self.u)
        {
            if sm.is_finite() && sm != 0.0 && ratio < f32::INFINITY {
                let (ms, us, s) = (shape(mc), shape(uc), v1::Scale::of(sm));
                for (c, &k) in cm.iter_mut().zip(cu.iter()) {
                    let limit = ratio * us.decode(k, su);
                    let cap = ms.encode_magnitude(s.scaled(limit), 0xFF_FFFF);
                    if u32::from(*c & 0x7F) > cap {
                        *c = ms.with_sign(cap, if *c & 0x80 != 0 { -1.0 } else { 1.0 });
                    }
                }
            }
        }
        (sm, su)
    }

    /// One tensor's step with this candidate's 8-bit state `st` ((codes, scales) of `m`
    /// and `u`); `bf16`: the parameters are bf16 (as f32 values) rounded stochastically,
    /// as [`adamax_cuda::ParamMode::Stochastic`] does.
    pub fn step(
        &self,
        s: &StepScalars,
        key: u64,
        p: &mut [f32],
        g: &[f32],
        st: &mut [(Vec<u8>, Vec<f32>); 2],
        bf16: bool,
    ) {
        let [(cm, sm), (cu, su)] = st;
        let (mut m, mut u) = (
            Vec::with_capacity(self.block),
            Vec::with_capacity(self.block),
        );
        // The old codec draws from the stream of its time (its bf16 parameters too).
        let draw = |i: usize| match self.encoder {
            Encoder::Old => v1::element_bits(key, i as u64),
            _ => lowbit::element_bits(key, i as u64),
        };
        let ratio_form = self.encoder == Encoder::Ratio;
        let v1 = matches!(self.encoder, Encoder::Capped | Encoder::Old);
        for (b, start) in (0..p.len()).step_by(self.block).enumerate() {
            let end = p.len().min(start + self.block);
            m.clear();
            u.clear();
            for i in start..end {
                let u0 = self.u.decode(cu[i], su[b], v1);
                let stored = self.m.decode(cm[i], sm[b], v1);
                let m0 = if ratio_form {
                    lowbit::exp_avg_of(stored, u0, s.eps, s.eps_mode)
                } else {
                    stored
                };
                let e = update(s, p[i], g[i], m0, u0);
                p[i] = if bf16 {
                    lowbit::round_bf16_stochastic(e.param, lowbit::param_bits(draw(i))).to_f32()
                } else {
                    e.param
                };
                m.push(if ratio_form { e.ratio } else { e.exp_avg });
                u.push(e.exp_inf);
            }
            (sm[b], su[b]) =
                self.encode(&m, &u, (&mut cm[start..end], &mut cu[start..end]), s, |j| {
                    draw(start + j)
                });
        }
    }

    /// Fresh zero state for tensors of `lens`.
    pub fn state(&self, lens: impl Iterator<Item = usize>) -> Vec<[(Vec<u8>, Vec<f32>); 2]> {
        let zeros = |n: usize| (vec![0u8; n], vec![0f32; n.div_ceil(self.block)]);
        lens.map(|n| [zeros(n), zeros(n)]).collect()
    }
}

/// The crate's codec (its 8-bit modes, emulated) in [`CANDIDATES`].
pub const NEW: usize = 0;

/// The codec before issue #19 in [`CANDIDATES`]: its codes, block and rounding, `m` and
/// `u` encoded apart by division.
pub const OLD: usize = 1;

/// The first codec of issue #19 in [`CANDIDATES`] (until 8-bit state v2): its codes, `m`
/// capped to the moment ratio of its element's decoded `u`.
pub const CAPPED: usize = 2;

/// The sweep of codes, block and rounding (each float code with the crate's encoder),
/// and the two codecs before the crate's.
pub const CANDIDATES: [Candidate; 9] = [
    Candidate {
        name: "ratio E4M3, u E4M4, block 256, stochastic (chosen; the crate's)",
        m: Quant::Float(EXP_AVG_CODE),
        u: Quant::Float(EXP_INF_CODE),
        block: 256,
        stochastic: true,
        encoder: Encoder::Ratio,
    },
    Candidate {
        name: "m E4M3, u E4M4, block 256, stochastic, m and u apart (the codec before issue #19)",
        m: Quant::Float(EXP_AVG_CODE),
        u: Quant::Float(EXP_INF_CODE),
        block: 256,
        stochastic: true,
        encoder: Encoder::Old,
    },
    Candidate {
        name:
            "m E4M3 capped to the bound of u, u E4M4, block 256, stochastic (the first #19 codec)",
        m: Quant::Float(EXP_AVG_CODE),
        u: Quant::Float(EXP_INF_CODE),
        block: 256,
        stochastic: true,
        encoder: Encoder::Capped,
    },
    Candidate {
        name: "ratio E4M3, u E4M4, block 256, round to nearest",
        m: Quant::Float(EXP_AVG_CODE),
        u: Quant::Float(EXP_INF_CODE),
        block: 256,
        stochastic: false,
        encoder: Encoder::Ratio,
    },
    Candidate {
        name: "ratio E3M4, u E3M5 (less range), block 256, stochastic",
        m: float(true, 3, 4),
        u: float(false, 3, 5),
        block: 256,
        stochastic: true,
        encoder: Encoder::Ratio,
    },
    Candidate {
        name: "ratio E5M2, u E5M3 (more range), block 256, stochastic",
        m: float(true, 5, 2),
        u: float(false, 5, 3),
        block: 256,
        stochastic: true,
        encoder: Encoder::Ratio,
    },
    Candidate {
        name: "ratio E4M3, u E4M4, block 64, stochastic",
        m: Quant::Float(EXP_AVG_CODE),
        u: Quant::Float(EXP_INF_CODE),
        block: 64,
        stochastic: true,
        encoder: Encoder::Ratio,
    },
    Candidate {
        name: "ratio E4M3, u E4M4, block 2048, stochastic",
        m: Quant::Float(EXP_AVG_CODE),
        u: Quant::Float(EXP_INF_CODE),
        block: 2048,
        stochastic: true,
        encoder: Encoder::Ratio,
    },
    Candidate {
        name: "linear int8 absmax (naive baseline), block 256, stochastic, m and u apart",
        m: Quant::Linear { signed: true },
        u: Quant::Linear { signed: false },
        block: 256,
        stochastic: true,
        encoder: Encoder::Apart,
    },
];
