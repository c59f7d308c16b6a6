//! 8-bit state emulated with any code, block size, rounding and encoder, from the spec's
//! public functions: the candidates `src/spec/lowbit.rs` chose between, the crate's own
//! codec (checked against `CpuAdamax` bit for bit) and the codec before issue #19.

use adamax_cuda::spec::{
    lowbit::{self, BlockScale, Code, EXP_AVG_CODE, EXP_INF_CODE, ROUND_DOWN},
    update, StepScalars,
};

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

    fn decode(self, c: u8, scale: f32) -> f32 {
        match self {
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

    /// The block's scale; writes the codes (rounding bits from `bits(j)`). `divide`:
    /// each value's fraction of the scale by a division, as the codec before issue #19
    /// did (the crate's multiplies by the scale's reciprocal, [`BlockScale`]).
    fn encode_block(
        self,
        v: &[f32],
        codes: &mut [u8],
        divide: bool,
        bits: impl Fn(usize) -> u32,
    ) -> f32 {
        match self {
            Quant::Float(code) if !divide => code.encode_block(v, codes, bits),
            Quant::Float(code) => {
                let absmax = v.iter().fold(0.0f32, |a, x| nan_max(a, x.abs()));
                if absmax == 0.0 || !absmax.is_finite() {
                    codes.fill(0);
                    return if absmax == 0.0 { 0.0 } else { f32::NAN };
                }
                for (j, (c, &x)) in codes.iter_mut().zip(v).enumerate() {
                    let magnitude = code.encode_magnitude(x.abs() / absmax, bits(j));
                    let sign = if is_signed(code) && x < 0.0 && magnitude != 0 {
                        0x80
                    } else {
                        0
                    };
                    *c = (magnitude | sign) as u8;
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

/// Whether `code` has a sign bit: a signed code has 7 magnitude bits, so its largest
/// magnitude code is below 128.
fn is_signed(code: Code) -> bool {
    code.max_magnitude_code() < 128
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
    /// The crate's (`lowbit::encode_moments`, any float code): `u` first, then each `m`
    /// code capped at the largest whose value is within the moment ratio of its
    /// element's decoded `u`; fractions by the scale's reciprocal; rounding bits 32-47
    /// (`m`) and 48-63 (`u`) of the element's draw.
    Capped,
    /// `m` and `u` apart, as the crate's encoder without the cap.
    Apart,
    /// The codec before issue #19: `m` and `u` apart, each fraction by a division, 24
    /// random bits each: bits 16-39 of the draw for `m`, 40-63 for `u`.
    Old,
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
    /// Encodes one block of `m` and `u` into their codes; returns their scales.
    /// `draw(j)` is element `j`'s 64 random bits.
    fn encode(
        &self,
        m: &[f32],
        u: &[f32],
        (cm, cu): (&mut [u8], &mut [u8]),
        ratio: f32,
        draw: impl Fn(usize) -> u64,
    ) -> (f32, f32) {
        let r = |bits: u32| if self.stochastic { bits } else { 0x80_0000 };
        let divide = self.encoder == Encoder::Old;
        let (m_bits, u_bits): (RoundingBits, RoundingBits) = if divide {
            (|d| ((d >> 16) & 0xFF_FFFF) as u32, |d| (d >> 40) as u32)
        } else {
            (lowbit::exp_avg_bits, lowbit::exp_inf_bits)
        };
        let su = self.u.encode_block(u, cu, divide, |j| r(u_bits(draw(j))));
        let sm = self.m.encode_block(m, cm, divide, |j| r(m_bits(draw(j))));
        if let (Encoder::Capped, Quant::Float(mc), Quant::Float(uc)) =
            (self.encoder, self.m, self.u)
        {
            if sm.is_finite() && sm != 0.0 && ratio < f32::INFINITY {
                let s = BlockScale::of(sm);
                for (c, &k) in cm.iter_mut().zip(cu.iter()) {
                    let limit = ratio * uc.decode(k, su);
                    *c = mc.cap(*c, mc.encode_magnitude(s.scaled(limit), ROUND_DOWN));
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
        let draw = |i: usize| lowbit::element_bits(key, i as u64);
        for (b, start) in (0..p.len()).step_by(self.block).enumerate() {
            let end = p.len().min(start + self.block);
            m.clear();
            u.clear();
            for i in start..end {
                let e = update(
                    s,
                    p[i],
                    g[i],
                    self.m.decode(cm[i], sm[b]),
                    self.u.decode(cu[i], su[b]),
                );
                p[i] = if bf16 {
                    lowbit::round_bf16_stochastic(e.param, lowbit::param_bits(draw(i))).to_f32()
                } else {
                    e.param
                };
                m.push(e.exp_avg);
                u.push(e.exp_inf);
            }
            (sm[b], su[b]) = self.encode(
                &m,
                &u,
                (&mut cm[start..end], &mut cu[start..end]),
                s.moment_ratio,
                |j| draw(start + j),
            );
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

/// The codec before issue #19 in [`CANDIDATES`]: the crate's codes, block and rounding,
/// `m` and `u` encoded apart by division.
pub const OLD: usize = 1;

/// The sweep of codes, block and rounding (each float code with the crate's encoder),
/// and the codec before issue #19.
pub const CANDIDATES: [Candidate; 8] = [
    Candidate {
        name: "m E4M3, u E4M4, block 256, stochastic (chosen; the crate's)",
        m: Quant::Float(EXP_AVG_CODE),
        u: Quant::Float(EXP_INF_CODE),
        block: 256,
        stochastic: true,
        encoder: Encoder::Capped,
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
        name: "m E4M3, u E4M4, block 256, round to nearest",
        m: Quant::Float(EXP_AVG_CODE),
        u: Quant::Float(EXP_INF_CODE),
        block: 256,
        stochastic: false,
        encoder: Encoder::Capped,
    },
    Candidate {
        name: "m E3M4, u E3M5 (less range), block 256, stochastic",
        m: float(true, 3, 4),
        u: float(false, 3, 5),
        block: 256,
        stochastic: true,
        encoder: Encoder::Capped,
    },
    Candidate {
        name: "m E5M2, u E5M3 (more range), block 256, stochastic",
        m: float(true, 5, 2),
        u: float(false, 5, 3),
        block: 256,
        stochastic: true,
        encoder: Encoder::Capped,
    },
    Candidate {
        name: "m E4M3, u E4M4, block 64, stochastic",
        m: Quant::Float(EXP_AVG_CODE),
        u: Quant::Float(EXP_INF_CODE),
        block: 64,
        stochastic: true,
        encoder: Encoder::Capped,
    },
    Candidate {
        name: "m E4M3, u E4M4, block 2048, stochastic",
        m: Quant::Float(EXP_AVG_CODE),
        u: Quant::Float(EXP_INF_CODE),
        block: 2048,
        stochastic: true,
        encoder: Encoder::Capped,
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
