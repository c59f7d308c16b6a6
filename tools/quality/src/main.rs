//! Does a mode that moves fewer bytes train as well? Trains an MLP (64 -> 128 -> 10,
//! ReLU, softmax cross-entropy) on scikit-learn's bundled handwritten digits with the
//! CPU reference in every storage mode, over several seeds, and writes a Markdown table,
//! a JSON file and an SVG plot of the test loss:
//!
//! ```text
//! bash scripts/quality.sh            # exports the digits, runs this, writes docs/quality/
//! cargo run --release --manifest-path tools/quality/Cargo.toml -- digits.csv docs/quality
//! ```
//!
//! Without arguments it prints its usage and exits successfully.
//!
//! The CPU reference runs exactly the arithmetic of the GPU kernels (bit for bit), so
//! these are the curves the GPU gives too. Besides the crate's modes it runs two
//! comparisons that are not modes: bf16 parameters stepped with round-to-nearest and no
//! master (the reason stochastic rounding exists: updates below half a bf16 unit in the
//! last place are lost), and the candidates for the 8-bit codes, block size and rounding
//! that `src/spec/lowbit.rs` chose between, emulated here with the spec's public
//! functions. The emulation of the chosen candidate is checked against the crate's
//! 8-bit mode, bit for bit.

use std::{fmt::Write as _, path::PathBuf};

use adamax_cuda::{
    bf16,
    cpu::CpuAdamax,
    spec::{
        lowbit::{self, Code, EXP_AVG_CODE, EXP_INF_CODE},
        update, StepScalars,
    },
    AdamaxConfig, Optimizer, ParamMode, Precision, StateFormat,
};
use plotters::prelude::*;
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};

const IN: usize = 64;
const HIDDEN: usize = 128;
const CLASSES: usize = 10;
const BATCH: usize = 32;
const EPOCHS: usize = 100;
const TEST: usize = 360;
const LR: f64 = 1e-3;
const SEEDS: u64 = 5;
const SWEEP_SEEDS: u64 = 3;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Digits {
    x: Vec<f32>,
    y: Vec<usize>,
}

/// `label,pixel0,...,pixel63` per line (pixels 0..16), as scripts/export_digits.py writes.
fn load(path: &PathBuf) -> Result<Digits> {
    let text = std::fs::read_to_string(path)?;
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for line in text.lines().filter(|l| !l.is_empty()) {
        let v: Vec<f32> = line
            .split(',')
            .map(str::parse)
            .collect::<std::result::Result<_, _>>()?;
        if v.len() != IN + 1 {
            return Err(format!("a line of {} values, expected {}", v.len(), IN + 1).into());
        }
        y.push(v[0] as usize);
        x.extend(v[1..].iter().map(|p| p / 16.0));
    }
    Ok(Digits { x, y })
}

/// The same train/test split for every run (1,437 / 360).
fn split(d: &Digits) -> (Digits, Digits) {
    let mut order: Vec<usize> = (0..d.y.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(0xD161));
    let take = |idx: &[usize]| Digits {
        x: idx
            .iter()
            .flat_map(|&i| d.x[i * IN..(i + 1) * IN].iter().copied())
            .collect(),
        y: idx.iter().map(|&i| d.y[i]).collect(),
    };
    (take(&order[TEST..]), take(&order[..TEST]))
}

/// He-initialised [w1 (HIDDEN x IN), b1, w2 (CLASSES x HIDDEN), b2].
fn init(seed: u64) -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut layer = |o: usize, i: usize| -> Vec<f32> {
        let s = (6.0 / i as f32).sqrt();
        (0..o * i)
            .map(|_| rng.random_range(-1.0..1.0) * s)
            .collect()
    };
    let (w1, w2) = (layer(HIDDEN, IN), layer(CLASSES, HIDDEN));
    vec![w1, vec![0.0; HIDDEN], w2, vec![0.0; CLASSES]]
}

/// Mean loss and accuracy over `d`; with `grads`, also the mean gradient.
fn pass(p: &[Vec<f32>], x: &[f32], y: &[usize], mut grads: Option<&mut [Vec<f32>]>) -> (f32, f32) {
    let n = y.len();
    if let Some(g) = grads.as_deref_mut() {
        g.iter_mut().for_each(|v| v.fill(0.0));
    }
    let (mut loss, mut correct) = (0.0f32, 0usize);
    let mut h = [0f32; HIDDEN];
    for b in 0..n {
        let xb = &x[b * IN..(b + 1) * IN];
        for (o, ho) in h.iter_mut().enumerate() {
            let w = &p[0][o * IN..(o + 1) * IN];
            *ho = (p[1][o] + w.iter().zip(xb).map(|(a, c)| a * c).sum::<f32>()).max(0.0);
        }
        let logits: Vec<f32> = (0..CLASSES)
            .map(|o| {
                let w = &p[2][o * HIDDEN..(o + 1) * HIDDEN];
                p[3][o] + w.iter().zip(&h).map(|(a, c)| a * c).sum::<f32>()
            })
            .collect();
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = logits.iter().map(|l| (l - m).exp()).sum();
        loss += sum.ln() - (logits[y[b]] - m);
        let best = (0..CLASSES).max_by(|&a, &c| logits[a].total_cmp(&logits[c]));
        correct += usize::from(best == Some(y[b]));
        let Some(g) = grads.as_deref_mut() else {
            continue;
        };
        for o in 0..CLASSES {
            let d = ((logits[o] - m).exp() / sum - f32::from(u8::from(o == y[b]))) / n as f32;
            g[3][o] += d;
            for (i, &hi) in h.iter().enumerate() {
                g[2][o * HIDDEN + i] += d * hi;
                if hi > 0.0 {
                    let dh = d * p[2][o * HIDDEN + i];
                    g[1][i] += dh;
                    for (k, &xk) in xb.iter().enumerate() {
                        g[0][i * IN + k] += dh * xk;
                    }
                }
            }
        }
    }
    (loss / n as f32, correct as f32 / n as f32)
}

/// An 8-bit code for `value / block absmax`: one of the spec's small floats, or a
/// linear (integer) code as a naive baseline.
#[derive(Clone, Copy, Debug)]
enum Quant {
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

    /// The block's scale; writes the codes (rounding bits from `bits(j)`).
    fn encode_block(self, v: &[f32], codes: &mut [u8], bits: impl Fn(usize) -> u32) -> f32 {
        match self {
            Quant::Float(code) => code.encode_block(v, codes, bits),
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

/// 8-bit state emulated with any code, block size and rounding, from the spec's public
/// functions: the candidates `lowbit` chose between.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    name: &'static str,
    m: Quant,
    u: Quant,
    block: usize,
    stochastic: bool,
}

const fn float(signed: bool, exp_bits: u32, man_bits: u32) -> Quant {
    match Code::new(signed, exp_bits, man_bits) {
        Some(code) => Quant::Float(code),
        None => panic!("not an 8-bit code"),
    }
}

/// One tensor's step with candidate `c`'s 8-bit state `st` ((codes, scales) of m and u).
fn candidate_step(
    c: &Candidate,
    s: &StepScalars,
    key: u64,
    p: &mut [f32],
    g: &[f32],
    st: &mut [(Vec<u8>, Vec<f32>); 2],
) {
    let [(cm, sm), (cu, su)] = st;
    let (mut m, mut u) = (Vec::with_capacity(c.block), Vec::with_capacity(c.block));
    for (b, start) in (0..p.len()).step_by(c.block).enumerate() {
        let end = p.len().min(start + c.block);
        m.clear();
        u.clear();
        for i in start..end {
            let e = update(
                s,
                p[i],
                g[i],
                c.m.decode(cm[i], sm[b]),
                c.u.decode(cu[i], su[b]),
            );
            p[i] = e.param;
            m.push(e.exp_avg);
            u.push(e.exp_inf);
        }
        let bits = |j: usize, pick: fn(u64) -> u32| {
            if c.stochastic {
                pick(lowbit::element_bits(key, (start + j) as u64))
            } else {
                0x80_0000
            }
        };
        sm[b] =
            c.m.encode_block(&m, &mut cm[start..end], |j| bits(j, lowbit::exp_avg_bits));
        su[b] =
            c.u.encode_block(&u, &mut cu[start..end], |j| bits(j, lowbit::exp_inf_bits));
    }
}

/// Fresh zero state of candidate `c` for tensors of `lens`.
fn candidate_state(
    c: &Candidate,
    lens: impl Iterator<Item = usize>,
) -> Vec<[(Vec<u8>, Vec<f32>); 2]> {
    let zeros = |n: usize| (vec![0u8; n], vec![0f32; n.div_ceil(c.block)]);
    lens.map(|n| [zeros(n), zeros(n)]).collect()
}

const CANDIDATES: [Candidate; 7] = [
    Candidate {
        name: "m E4M3, u E4M4, block 256, stochastic (chosen)",
        m: Quant::Float(EXP_AVG_CODE),
        u: Quant::Float(EXP_INF_CODE),
        block: 256,
        stochastic: true,
    },
    Candidate {
        name: "m E4M3, u E4M4, block 256, round to nearest",
        m: Quant::Float(EXP_AVG_CODE),
        u: Quant::Float(EXP_INF_CODE),
        block: 256,
        stochastic: false,
    },
    Candidate {
        name: "m E3M4, u E3M5 (less range), block 256, stochastic",
        m: float(true, 3, 4),
        u: float(false, 3, 5),
        block: 256,
        stochastic: true,
    },
    Candidate {
        name: "m E5M2, u E5M3 (more range), block 256, stochastic",
        m: float(true, 5, 2),
        u: float(false, 5, 3),
        block: 256,
        stochastic: true,
    },
    Candidate {
        name: "m E4M3, u E4M4, block 64, stochastic",
        m: Quant::Float(EXP_AVG_CODE),
        u: Quant::Float(EXP_INF_CODE),
        block: 64,
        stochastic: true,
    },
    Candidate {
        name: "m E4M3, u E4M4, block 2048, stochastic",
        m: Quant::Float(EXP_AVG_CODE),
        u: Quant::Float(EXP_INF_CODE),
        block: 2048,
        stochastic: true,
    },
    Candidate {
        name: "linear int8 absmax (naive baseline), block 256, stochastic",
        m: Quant::Linear { signed: true },
        u: Quant::Linear { signed: false },
        block: 256,
        stochastic: true,
    },
];

/// One way of stepping the parameters.
enum Stepper {
    F32(CpuAdamax<f32>),
    /// bf16 parameters in the crate (with a master or stochastically rounded).
    Bf16(CpuAdamax<bf16>, Vec<Vec<bf16>>),
    /// bf16 parameters, round-to-nearest, no master: an f32 optimizer whose parameters
    /// are rounded to bf16 after every step (so it reads them back rounded).
    Bf16Nearest(CpuAdamax<f32>),
    /// 8-bit state emulated per candidate: (codes, scales) of m and u per tensor.
    Emulated(Candidate, Vec<[(Vec<u8>, Vec<f32>); 2]>, u64),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Run {
    F32,
    Bf16Master,
    Bf16Nearest,
    Bf16Stochastic,
    F32Q8,
    Bf16MasterQ8,
    Bf16StochasticQ8,
    Candidate(usize),
}

impl Run {
    fn name(self) -> String {
        match self {
            Run::F32 => "f32 parameters, f32 state (28 B moved, 8 B state)".into(),
            Run::Bf16Master => "bf16 + f32 master, f32 state (28 B, 12 B)".into(),
            Run::Bf16Nearest => "bf16, round to nearest, no master (not a mode: 22 B, 8 B)".into(),
            Run::Bf16Stochastic => "bf16 stochastic rounding, f32 state (22 B, 8 B)".into(),
            Run::F32Q8 => "f32 parameters, 8-bit state (16 B, 2.03 B)".into(),
            Run::Bf16MasterQ8 => "bf16 + f32 master, 8-bit state (16 B, 6.03 B)".into(),
            Run::Bf16StochasticQ8 => "bf16 stochastic rounding, 8-bit state (10 B, 2.03 B)".into(),
            Run::Candidate(i) => CANDIDATES[i].name.into(),
        }
    }

    fn config(self, seed: u64) -> AdamaxConfig {
        let (params, state) = match self {
            Run::Bf16Stochastic => (ParamMode::Stochastic, StateFormat::F32),
            Run::F32Q8 | Run::Bf16MasterQ8 => (ParamMode::Master, StateFormat::Blockwise8),
            Run::Bf16StochasticQ8 => (ParamMode::Stochastic, StateFormat::Blockwise8),
            _ => (ParamMode::Master, StateFormat::F32),
        };
        AdamaxConfig {
            lr: LR,
            precision: Precision {
                params,
                state,
                seed,
            },
            ..AdamaxConfig::default()
        }
    }
}

fn refs<T>(v: &[Vec<T>]) -> Vec<&[T]> {
    v.iter().map(Vec::as_slice).collect()
}

fn muts<T>(v: &mut [Vec<T>]) -> Vec<&mut [T]> {
    v.iter_mut().map(Vec::as_mut_slice).collect()
}

fn to_bf16(v: &[Vec<f32>]) -> Vec<Vec<bf16>> {
    v.iter()
        .map(|t| t.iter().map(|&x| bf16::from_f32(x)).collect())
        .collect()
}

impl Stepper {
    fn new(run: Run, params: &mut Vec<Vec<f32>>, seed: u64) -> Result<Self> {
        let config = run.config(seed);
        Ok(match run {
            Run::F32 | Run::F32Q8 => Stepper::F32(CpuAdamax::new(config, &refs(params))?),
            Run::Bf16Master | Run::Bf16Stochastic | Run::Bf16MasterQ8 | Run::Bf16StochasticQ8 => {
                let p = to_bf16(params);
                *params = p
                    .iter()
                    .map(|t| t.iter().map(|x| x.to_f32()).collect())
                    .collect();
                Stepper::Bf16(CpuAdamax::new(config, &refs(&p))?, p)
            }
            Run::Bf16Nearest => {
                round_all(params);
                Stepper::Bf16Nearest(CpuAdamax::new(config, &refs(params))?)
            }
            Run::Candidate(i) => {
                let c = CANDIDATES[i];
                Stepper::Emulated(c, candidate_state(&c, params.iter().map(Vec::len)), 0)
            }
        })
    }

    /// One step; `params` holds the f32 values the forward pass uses.
    fn step(&mut self, params: &mut [Vec<f32>], grads: &[Vec<f32>], seed: u64) -> Result<()> {
        match self {
            Stepper::F32(opt) => opt.step(&mut muts(params), &refs(grads))?,
            Stepper::Bf16(opt, p) => {
                opt.step(&mut muts(p), &refs(&to_bf16(grads)))?;
                for (dst, src) in params.iter_mut().zip(p.iter()) {
                    dst.iter_mut().zip(src).for_each(|(d, s)| *d = s.to_f32());
                }
            }
            Stepper::Bf16Nearest(opt) => {
                let g: Vec<Vec<f32>> = to_bf16(grads)
                    .iter()
                    .map(|t| t.iter().map(|x| x.to_f32()).collect())
                    .collect();
                opt.step(&mut muts(params), &refs(&g))?;
                round_all(params);
            }
            Stepper::Emulated(c, state, t) => {
                *t += 1;
                let s = StepScalars::new(&Run::Candidate(0).config(seed), *t);
                for (k, (p, g)) in params.iter_mut().zip(grads).enumerate() {
                    let key = lowbit::stream_key(seed, *t, k as u64);
                    candidate_step(c, &s, key, p, g, &mut state[k]);
                }
            }
        }
        Ok(())
    }

    /// Bytes of optimizer state per parameter, counted from the state the optimizer holds.
    fn state_bytes(&self) -> Result<f64> {
        let count = |states: Vec<adamax_cuda::TensorState>| {
            let (mut bytes, mut n) = (0usize, 0usize);
            for t in &states {
                bytes += 4 * (t.exp_avg.len() + t.exp_inf.len() + t.master.len())
                    + 4 * (t.exp_avg_q8.scales.len() + t.exp_inf_q8.scales.len())
                    + t.exp_avg_q8.codes.len()
                    + t.exp_inf_q8.codes.len();
                n += t.len();
            }
            bytes as f64 / n as f64
        };
        Ok(match self {
            Stepper::F32(o) | Stepper::Bf16Nearest(o) => count(o.state()?),
            Stepper::Bf16(o, _) => count(o.state()?),
            Stepper::Emulated(..) => f64::NAN,
        })
    }
}

fn round_all(params: &mut [Vec<f32>]) {
    for x in params.iter_mut().flatten() {
        *x = bf16::from_f32(*x).to_f32();
    }
}

struct Outcome {
    train_loss: f32,
    test_loss: f32,
    test_acc: f32,
    /// Test loss after every epoch.
    curve: Vec<f32>,
    state_bytes: f64,
    final_params: Vec<Vec<f32>>,
}

/// Calls `f(Some((inputs, labels)))` for every batch of `EPOCHS` epochs of `train` (each
/// epoch a new shuffle, the same for every run of `seed`) and `f(None)` after each epoch.
fn for_each_batch(
    train: &Digits,
    seed: u64,
    mut f: impl FnMut(Option<(&[f32], &[usize])>) -> Result<()>,
) -> Result<()> {
    let mut order: Vec<usize> = (0..train.y.len()).collect();
    let mut rng = StdRng::seed_from_u64(seed ^ 0xBA7C);
    let (mut xb, mut yb) = (Vec::new(), Vec::new());
    for _ in 0..EPOCHS {
        order.shuffle(&mut rng);
        for batch in order.chunks(BATCH) {
            xb.clear();
            yb.clear();
            for &i in batch {
                xb.extend_from_slice(&train.x[i * IN..(i + 1) * IN]);
                yb.push(train.y[i]);
            }
            f(Some((&xb, &yb)))?;
        }
        f(None)?;
    }
    Ok(())
}

fn train(run: Run, seed: u64, train: &Digits, test: &Digits) -> Result<Outcome> {
    let mut params = init(seed);
    let mut stepper = Stepper::new(run, &mut params, seed)?;
    let mut grads: Vec<Vec<f32>> = params.iter().map(|p| vec![0.0; p.len()]).collect();
    let mut curve = Vec::new();
    for_each_batch(train, seed, |batch| {
        match batch {
            Some((xb, yb)) => {
                pass(&params, xb, yb, Some(&mut grads));
                stepper.step(&mut params, &grads, seed)?;
            }
            None => curve.push(pass(&params, &test.x, &test.y, None).0),
        }
        Ok(())
    })?;
    let (train_loss, _) = pass(&params, &train.x, &train.y, None);
    let (test_loss, test_acc) = pass(&params, &test.x, &test.y, None);
    Ok(Outcome {
        train_loss,
        test_loss,
        test_acc,
        curve,
        state_bytes: stepper.state_bytes()?,
        final_params: params,
    })
}

/// How far each candidate's update is from the f32 state's, on the same gradients: an
/// f32 run trains; at every step each candidate's 8-bit state (and an f32 copy of the
/// moments, the reference) takes the same gradient and gives its update
/// `-step_size * m / u` (from a zero parameter, so that only the state differs). Returns,
/// per candidate, the means over steps of the error ||update - f32 update|| / ||f32
/// update|| and of the gain <update, f32 update> / ||f32 update||^2 (below 1: updates
/// systematically too small).
fn fidelity(seed: u64, train_set: &Digits) -> Result<Vec<(f64, f64)>> {
    let mut params = init(seed);
    let config = Run::F32.config(seed);
    let mut opt = CpuAdamax::new(config, &refs(&params))?;
    let lens: Vec<usize> = params.iter().map(Vec::len).collect();
    let mut states: Vec<_> = CANDIDATES
        .iter()
        .map(|c| candidate_state(c, lens.iter().copied()))
        .collect();
    let mut reference: Vec<(Vec<f32>, Vec<f32>)> =
        lens.iter().map(|&n| (vec![0.0; n], vec![0.0; n])).collect();
    let mut grads: Vec<Vec<f32>> = lens.iter().map(|&n| vec![0.0; n]).collect();
    let mut sums = vec![(0.0f64, 0.0f64); CANDIDATES.len()];
    let mut t = 0u64;
    for_each_batch(train_set, seed, |batch| {
        let Some((xb, yb)) = batch else { return Ok(()) };
        pass(&params, xb, yb, Some(&mut grads));
        t += 1;
        let s = StepScalars::new(&config, t);
        let want = reference_step(&s, &mut reference, &grads);
        for (k, c) in CANDIDATES.iter().enumerate() {
            let mut got = Vec::new();
            for (i, g) in grads.iter().enumerate() {
                let key = lowbit::stream_key(seed, t, i as u64);
                let mut p = vec![0.0f32; g.len()];
                candidate_step(c, &s, key, &mut p, g, &mut states[k][i]);
                got.extend_from_slice(&p);
            }
            sums[k].0 += relative_distance(&got, &want);
            sums[k].1 += gain(&got, &want);
        }
        opt.step(&mut muts(&mut params), &refs(&grads))?;
        Ok(())
    })?;
    Ok(sums
        .into_iter()
        .map(|(a, b)| (a / t as f64, b / t as f64))
        .collect())
}

/// The same measures on a synthetic stream where most gradients fade while a few stay,
/// the case where rounding `u` to nearest is biased: one element in 64 has a gradient
/// of magnitude 1 (random sign), the others `z * s_i * exp(-t / 500)` (`z` standard
/// normal, `s_i` log-uniform in [1e-3, 1]); 3,000 steps of one tensor of 4,096
/// elements. The steady elements hold every block's scale at 1, so the others' `u` must
/// decay at `beta2` per step relative to a fixed scale.
fn fidelity_fading(seed: u64) -> Vec<(f64, f64)> {
    let n = 4096;
    let mut rng = StdRng::seed_from_u64(seed ^ 0xFADE);
    let scale: Vec<f32> = (0..n)
        .map(|_| 10f32.powf(rng.random_range(-3.0..0.0)))
        .collect();
    let config = Run::F32.config(seed);
    let mut states: Vec<_> = CANDIDATES
        .iter()
        .map(|c| candidate_state(c, [n].into_iter()))
        .collect();
    let mut reference = (vec![0.0f32; n], vec![0.0f32; n]);
    let mut sums = vec![(0.0f64, 0.0f64); CANDIDATES.len()];
    let steps = 3000u64;
    let normal = |rng: &mut StdRng| {
        // Box-Muller: two uniforms, one normal.
        let (a, b): (f32, f32) = (rng.random_range(f32::EPSILON..1.0), rng.random());
        (-2.0 * a.ln()).sqrt() * (std::f32::consts::TAU * b).cos()
    };
    for t in 1..=steps {
        let fade = (-(t as f32) / 500.0).exp();
        let grads = [scale
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                let z = normal(&mut rng);
                if i % 64 == 0 {
                    z.signum()
                } else {
                    z * s * fade
                }
            })
            .collect::<Vec<f32>>()];
        let s = StepScalars::new(&config, t);
        let want = reference_step(&s, std::slice::from_mut(&mut reference), &grads);
        for (k, c) in CANDIDATES.iter().enumerate() {
            let mut p = vec![0.0f32; n];
            let key = lowbit::stream_key(seed, t, 0);
            candidate_step(c, &s, key, &mut p, &grads[0], &mut states[k][0]);
            sums[k].0 += relative_distance(&p, &want);
            sums[k].1 += gain(&p, &want);
        }
    }
    sums.into_iter()
        .map(|(a, b)| (a / steps as f64, b / steps as f64))
        .collect()
}

/// One step of the f32 moments `reference` ((m, u) per tensor) from a zero parameter:
/// the updates, flattened.
fn reference_step(
    s: &StepScalars,
    reference: &mut [(Vec<f32>, Vec<f32>)],
    grads: &[Vec<f32>],
) -> Vec<f32> {
    let mut want = Vec::new();
    for ((m, u), g) in reference.iter_mut().zip(grads) {
        for i in 0..g.len() {
            let e = update(s, 0.0, g[i], m[i], u[i]);
            (m[i], u[i]) = (e.exp_avg, e.exp_inf);
            want.push(e.param);
        }
    }
    want
}

/// <a, b> / ||b||^2: how much of `b` `a` carries.
fn gain(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum();
    let norm2: f64 = b.iter().map(|&y| f64::from(y).powi(2)).sum();
    dot / norm2.max(f64::MIN_POSITIVE)
}

/// ||a - b|| / ||b||.
fn relative_distance(a: &[f32], b: &[f32]) -> f64 {
    let norm = b.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    let dist = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    dist / norm.max(f64::MIN_POSITIVE)
}

/// Mean, standard deviation (n - 1) and range.
fn stats(v: &[f32]) -> (f32, f32, f32, f32) {
    let n = v.len() as f32;
    let mean = v.iter().sum::<f32>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / (n - 1.0).max(1.0);
    let (lo, hi) = v
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        });
    (mean, var.sqrt(), lo, hi)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(data), Some(out)) = (args.get(1), args.get(2)) else {
        // Without arguments there is nothing to run; a runner that starts every example
        // (the GPU machine's does) skips this CPU-only one rather than failing.
        println!("usage: quality <digits.csv> <output directory> (scripts/quality.sh runs it)");
        return Ok(());
    };
    let (train_set, test_set) = split(&load(&PathBuf::from(data))?);
    let out = PathBuf::from(out);
    std::fs::create_dir_all(&out)?;
    println!(
        "digits: {} train, {} test; MLP {IN}-{HIDDEN}-{CLASSES}; {EPOCHS} epochs of batches of {BATCH}; AdaMax lr {LR}",
        train_set.y.len(),
        test_set.y.len()
    );

    // The emulation is the crate's 8-bit mode when given the chosen candidate.
    let crate_q8 = train(Run::F32Q8, 0, &train_set, &test_set)?;
    let emulated = train(Run::Candidate(0), 0, &train_set, &test_set)?;
    let same = crate_q8
        .final_params
        .iter()
        .flatten()
        .zip(emulated.final_params.iter().flatten())
        .all(|(a, b)| a.to_bits() == b.to_bits());
    if !same {
        return Err("the emulated 8-bit state differs from the crate's 8-bit mode".into());
    }
    println!("check: the emulated candidate equals the crate's 8-bit mode bit for bit");

    let modes = [
        Run::F32,
        Run::Bf16Master,
        Run::Bf16Nearest,
        Run::Bf16Stochastic,
        Run::F32Q8,
        Run::Bf16MasterQ8,
        Run::Bf16StochasticQ8,
    ];
    let mut md = String::new();
    let mut json = Vec::new();
    writeln!(
        md,
        "Digits (scikit-learn's bundled 8x8 handwritten digits, 1,437 train / 360 test), MLP {IN}-{HIDDEN}-{CLASSES}, {EPOCHS} epochs of batches of {BATCH}, AdaMax lr {LR}, PyTorch's other defaults; {SEEDS} seeds (initialisation, batch order and rounding stream); CPU reference, which computes what the GPU kernels compute bit for bit. Mean ± standard deviation [min, max].\n"
    )?;
    writeln!(md, "| mode | state bytes / parameter (counted) | final train loss | test loss | test accuracy |")?;
    writeln!(md, "| --- | --- | --- | --- | --- |")?;
    let mut curves = Vec::new();
    for (runs, seeds, title) in [
        (modes.to_vec(), SEEDS, "modes"),
        (
            (0..CANDIDATES.len())
                .map(Run::Candidate)
                .collect::<Vec<_>>(),
            SWEEP_SEEDS,
            "candidates",
        ),
    ] {
        if title == "candidates" {
            writeln!(
                md,
                "\n8-bit state: choosing the codes, block and rounding (f32 parameters, {SWEEP_SEEDS} seeds):\n\n| candidate | final train loss | test loss | test accuracy |\n| --- | --- | --- | --- |"
            )?;
        }
        for run in runs {
            let outcomes: Vec<Outcome> = (0..seeds)
                .map(|s| train(run, s, &train_set, &test_set))
                .collect::<Result<_>>()?;
            let col = |f: fn(&Outcome) -> f32| stats(&outcomes.iter().map(f).collect::<Vec<_>>());
            let fmt = |(m, s, lo, hi): (f32, f32, f32, f32), scale: f32| {
                if m.abs() > 1e6 || !m.is_finite() {
                    // A run that blew up: no spread to speak of.
                    return format!("diverged ({:.1e} to {:.1e})", lo * scale, hi * scale);
                }
                format!(
                    "{:.4} ± {:.4} [{:.4}, {:.4}]",
                    m * scale,
                    s * scale,
                    lo * scale,
                    hi * scale
                )
            };
            let (tr, te, acc) = (
                col(|o| o.train_loss),
                col(|o| o.test_loss),
                col(|o| o.test_acc),
            );
            let bytes = outcomes[0].state_bytes;
            if title == "modes" {
                writeln!(
                    md,
                    "| {} | {bytes:.3} | {} | {} | {} |",
                    run.name(),
                    fmt(tr, 1.0),
                    fmt(te, 1.0),
                    fmt(acc, 100.0)
                )?;
                let mean_curve: Vec<f32> = (0..EPOCHS)
                    .map(|e| outcomes.iter().map(|o| o.curve[e]).sum::<f32>() / seeds as f32)
                    .collect();
                curves.push((run, mean_curve));
            } else {
                writeln!(
                    md,
                    "| {} | {} | {} | {} |",
                    run.name(),
                    fmt(tr, 1.0),
                    fmt(te, 1.0),
                    fmt(acc, 100.0)
                )?;
            }
            println!(
                "{}: train {:.4}, test {:.4}, accuracy {:.2}%",
                run.name(),
                tr.0,
                te.0,
                acc.0 * 100.0
            );
            json.push(serde_json::json!({
                "run": run.name(),
                "seeds": seeds,
                "state_bytes_per_parameter": if bytes.is_nan() { None } else { Some(bytes) },
                "train_loss": outcomes.iter().map(|o| o.train_loss).collect::<Vec<_>>(),
                "test_loss": outcomes.iter().map(|o| o.test_loss).collect::<Vec<_>>(),
                "test_accuracy": outcomes.iter().map(|o| o.test_acc).collect::<Vec<_>>(),
            }));
        }
    }
    let digits: Vec<Vec<(f64, f64)>> = (0..SWEEP_SEEDS)
        .map(|seed| fidelity(seed, &train_set))
        .collect::<Result<_>>()?;
    let fading: Vec<Vec<(f64, f64)>> = (0..SWEEP_SEEDS).map(fidelity_fading).collect();
    writeln!(
        md,
        "\n8-bit state against f32 state on the same gradients, means over steps of the relative L2 distance of the update `-step_size * m / u` from the f32 state's (error) and of its projection on it (gain; below 1: updates systematically too small) ({SWEEP_SEEDS} seeds, mean ± standard deviation): on the digits run's own gradients (every step of {EPOCHS} epochs), and on a synthetic stream where most gradients fade while one element in 64 keeps a gradient of magnitude 1 (random sign), which holds each block's scale at 1 (the others: `z * s_i * exp(-t / 500)`, `z` standard normal, `s_i` log-uniform in [1e-3, 1]; 3,000 steps, 4,096 elements).\n\n| candidate | digits: update error | digits: update gain | fading: update error | fading: update gain |\n| --- | --- | --- | --- | --- |"
    )?;
    for (k, c) in CANDIDATES.iter().enumerate() {
        let col = |runs: &[Vec<(f64, f64)>], second: bool| {
            let v: Vec<f32> = runs
                .iter()
                .map(|r| if second { r[k].1 } else { r[k].0 } as f32)
                .collect();
            let (m, s, _, _) = stats(&v);
            (format!("{m:.4} ± {s:.4}"), v)
        };
        let cells = [
            col(&digits, false),
            col(&digits, true),
            col(&fading, false),
            col(&fading, true),
        ];
        writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            c.name, cells[0].0, cells[1].0, cells[2].0, cells[3].0
        )?;
        println!(
            "fidelity, {}: digits error {}, gain {}; fading error {}, gain {}",
            c.name, cells[0].0, cells[1].0, cells[2].0, cells[3].0
        );
        json.push(serde_json::json!({
            "candidate": c.name,
            "digits_update_error_per_seed": cells[0].1,
            "digits_update_gain_per_seed": cells[1].1,
            "fading_update_error_per_seed": cells[2].1,
            "fading_update_gain_per_seed": cells[3].1,
        }));
    }
    std::fs::write(out.join("quality.md"), &md)?;
    std::fs::write(
        out.join("quality.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    plot(&out.join("quality.svg"), &curves)?;
    println!("wrote {}", out.display());
    Ok(())
}

fn plot(path: &PathBuf, curves: &[(Run, Vec<f32>)]) -> Result<()> {
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let top = curves
        .iter()
        .flat_map(|(_, c)| c.iter().copied())
        .fold(0.0f32, f32::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Digits MLP: test loss per epoch, mean of 5 seeds",
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(1..EPOCHS, (0.05f32..top.min(3.0)).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("test loss")
        .draw()?;
    for (k, (run, c)) in curves.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        chart
            .draw_series(LineSeries::new(
                c.iter().enumerate().map(|(e, &l)| (e + 1, l)),
                color.stroke_width(2),
            ))?
            .label(run.name())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}
