//! Does a mode that moves fewer bytes train as well, and does it keep AdaMax's step
//! bound? Trains three tasks with the CPU reference in every storage mode, over several
//! seeds, counts the element-steps that move a weight further than AdaMax's bound, and
//! writes a Markdown table, a JSON file and an SVG plot of the digits test loss:
//!
//! ```text
//! bash scripts/quality.sh            # exports the digits, runs this, writes docs/quality/
//! cargo run --release --manifest-path tools/quality/Cargo.toml -- digits.csv docs/quality
//! ```
//!
//! Without arguments it prints its usage and exits successfully.
//!
//! The tasks ([`tasks`]): scikit-learn's digits with an MLP, whose gradients within a
//! block of 8-bit state are alike, and two synthetic ones whose gradients within a block
//! span many orders of magnitude: a regression on unnormalised features and a bag of
//! embeddings over Zipf-distributed tokens.
//!
//! The CPU reference runs exactly the arithmetic of the GPU kernels (bit for bit), so
//! these are the curves the GPU gives too. Besides the crate's modes it runs comparisons
//! that are not modes: bf16 parameters stepped with round-to-nearest and no master (the
//! reason stochastic rounding exists: updates below half a bf16 unit in the last place
//! are lost), the 8-bit codec before issue #19 (`m` and `u` encoded apart, which breaks
//! the bound), and the candidates for the 8-bit codes, block size and rounding that
//! `src/spec/lowbit.rs` chose between, all emulated here ([`codec`]) with the spec's
//! public functions. The emulation of the crate's codec is checked against the crate's
//! 8-bit modes, bit for bit, on every task.

mod codec;
mod tasks;

use std::{fmt::Write as _, path::PathBuf};

use adamax_cuda::{
    bf16,
    cpu::CpuAdamax,
    spec::{lowbit, update, StepScalars},
    AdamaxConfig, Optimizer, ParamMode, Precision, StateFormat, WeightDecayMode,
};
use codec::{Candidate, CANDIDATES, CAPPED, NEW, OLD};
use plotters::prelude::*;
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use tasks::{Digits, Regression, Task, Zipf};

const DIGITS_EPOCHS: usize = 100;
const DIGITS_SEEDS: u64 = 5;
const SWEEP_SEEDS: u64 = 3;
const REGRESSION_EPOCHS: usize = 100;
const ZIPF_EPOCHS: usize = 5;
const SYNTHETIC_SEEDS: u64 = 3;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// One way of stepping the parameters.
enum Stepper {
    F32(CpuAdamax<f32>),
    /// bf16 parameters in the crate (with a master or stochastically rounded).
    Bf16(CpuAdamax<bf16>, Vec<Vec<bf16>>),
    /// bf16 parameters, round-to-nearest, no master: an f32 optimizer whose parameters
    /// are rounded to bf16 after every step (so it reads them back rounded).
    Bf16Nearest(CpuAdamax<f32>),
    /// 8-bit state emulated: (codes, scales) of m and u per tensor.
    Emulated {
        codec: Candidate,
        bf16: bool,
        config: AdamaxConfig,
        state: Vec<[(Vec<u8>, Vec<f32>); 2]>,
        t: u64,
    },
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
    /// 8-bit state with the default `min_8bit_len`: tensors below it in f32 (issue #19,
    /// part 4); with bf16 parameters rounded stochastically when the flag is set.
    Threshold(bool),
    /// An emulated 8-bit state ([`CANDIDATES`]); with bf16 parameters rounded
    /// stochastically when the flag is set, f32 ones otherwise.
    Emulated(usize, bool),
}

/// The rows of the modes tables: the crate's modes, with the two codecs before the
/// crate's beside each 8-bit mode without a master, and bf16 round-to-nearest (not a mode).
const MODES: [Run; 13] = [
    Run::F32,
    Run::Bf16Master,
    Run::Bf16Nearest,
    Run::Bf16Stochastic,
    Run::F32Q8,
    Run::Threshold(false),
    Run::Emulated(CAPPED, false),
    Run::Emulated(OLD, false),
    Run::Bf16MasterQ8,
    Run::Bf16StochasticQ8,
    Run::Threshold(true),
    Run::Emulated(CAPPED, true),
    Run::Emulated(OLD, true),
];

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
            Run::Threshold(false) => {
                "f32 parameters, 8-bit state, tensors under 4,096 elements in f32 (the default)".into()
            }
            Run::Threshold(true) => {
                "bf16 stochastic rounding, 8-bit state, tensors under 4,096 elements in f32 (the default)".into()
            }
            Run::Emulated(OLD, false) => "f32 parameters, 8-bit state, old codec (emulated)".into(),
            Run::Emulated(OLD, true) => {
                "bf16 stochastic rounding, 8-bit state, old codec (emulated)".into()
            }
            Run::Emulated(CAPPED, false) => {
                "f32 parameters, 8-bit state, first #19 codec (emulated)".into()
            }
            Run::Emulated(CAPPED, true) => {
                "bf16 stochastic rounding, 8-bit state, first #19 codec (emulated)".into()
            }
            Run::Emulated(i, false) => CANDIDATES[i].name.into(),
            Run::Emulated(i, true) => format!("{}, bf16 stochastic", CANDIDATES[i].name),
        }
    }

    /// Whether the forward pass reads bf16 parameters.
    fn bf16(self) -> bool {
        !matches!(
            self,
            Run::F32 | Run::F32Q8 | Run::Threshold(false) | Run::Emulated(_, false)
        )
    }

    fn config(self, seed: u64, lr: f64) -> AdamaxConfig {
        let (params, state) = match self {
            Run::Bf16Stochastic => (ParamMode::Stochastic, StateFormat::F32),
            Run::F32Q8 | Run::Bf16MasterQ8 | Run::Threshold(false) | Run::Emulated(_, false) => {
                (ParamMode::Master, StateFormat::Blockwise8)
            }
            Run::Bf16StochasticQ8 | Run::Threshold(true) | Run::Emulated(_, true) => {
                (ParamMode::Stochastic, StateFormat::Blockwise8)
            }
            _ => (ParamMode::Master, StateFormat::F32),
        };
        AdamaxConfig {
            lr,
            precision: Precision {
                params,
                state,
                seed,
                // Every tensor in 8 bits, but in the rows of the default threshold.
                min_8bit_len: if matches!(self, Run::Threshold(_)) {
                    adamax_cuda::DEFAULT_MIN_8BIT_LEN
                } else {
                    0
                },
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

fn round_all(params: &mut [Vec<f32>]) {
    for x in params.iter_mut().flatten() {
        *x = bf16::from_f32(*x).to_f32();
    }
}

impl Stepper {
    fn new(run: Run, params: &mut [Vec<f32>], config: AdamaxConfig) -> Result<Self> {
        if run.bf16() {
            round_all(params);
        }
        Ok(match run {
            Run::F32 | Run::F32Q8 | Run::Threshold(false) => {
                Stepper::F32(CpuAdamax::new(config, &refs(params))?)
            }
            Run::Bf16Master
            | Run::Bf16Stochastic
            | Run::Bf16MasterQ8
            | Run::Bf16StochasticQ8
            | Run::Threshold(true) => {
                let p = to_bf16(params);
                Stepper::Bf16(CpuAdamax::new(config, &refs(&p))?, p)
            }
            Run::Bf16Nearest => Stepper::Bf16Nearest(CpuAdamax::new(config, &refs(params))?),
            Run::Emulated(i, bf16) => {
                let codec = CANDIDATES[i];
                Stepper::Emulated {
                    codec,
                    bf16,
                    config,
                    state: codec.state(params.iter().map(Vec::len)),
                    t: 0,
                }
            }
        })
    }

    /// One step; `params` holds the f32 values the forward pass uses.
    fn step(&mut self, params: &mut [Vec<f32>], grads: &[Vec<f32>]) -> Result<()> {
        let widened = |g: &[Vec<f32>]| -> Vec<Vec<f32>> {
            to_bf16(g)
                .iter()
                .map(|t| t.iter().map(|x| x.to_f32()).collect())
                .collect()
        };
        match self {
            Stepper::F32(opt) => opt.step(&mut muts(params), &refs(grads))?,
            Stepper::Bf16(opt, p) => {
                opt.step(&mut muts(p), &refs(&to_bf16(grads)))?;
                for (dst, src) in params.iter_mut().zip(p.iter()) {
                    dst.iter_mut().zip(src).for_each(|(d, s)| *d = s.to_f32());
                }
            }
            Stepper::Bf16Nearest(opt) => {
                opt.step(&mut muts(params), &refs(&widened(grads)))?;
                round_all(params);
            }
            Stepper::Emulated {
                codec,
                bf16,
                config,
                state,
                t,
            } => {
                *t += 1;
                let s = StepScalars::new(config, *t);
                let g16;
                let grads = if *bf16 {
                    g16 = widened(grads);
                    &g16
                } else {
                    grads
                };
                for (k, (p, g)) in params.iter_mut().zip(grads).enumerate() {
                    let key = lowbit::stream_key(config.precision.seed, *t, k as u64);
                    codec.step(&s, key, p, g, &mut state[k], *bf16);
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
            Stepper::Emulated { .. } => f64::NAN,
        })
    }
}

/// The largest move of an element of value `before` that step `t` may make: the step
/// size times AdaMax's moment ratio (the bound of `|m / u|`), plus the decoupled decay
/// of the weight, with slack for f32 rounding; for bf16 parameters, plus one bf16 unit
/// in the last place (a stochastic rounding, or two roundings to nearest of a master,
/// each within half a unit). As `allowed_move` in tests/lowbit.rs.
fn allowed_move(config: &AdamaxConfig, t: u64, before: f32, bf16: bool) -> f64 {
    let c = (1.0 - config.beta1) / (1.0 - config.beta1 / config.beta2);
    let step_size = config.lr / (1.0 - config.beta1.powi(t as i32));
    let decay = match config.weight_decay_mode {
        WeightDecayMode::Decoupled => config.lr * config.weight_decay,
        WeightDecayMode::Coupled => 0.0,
    };
    let mut allowed = (step_size * c + decay * f64::from(before.abs())) * (1.0 + 1e-5) + 1e-30;
    if bf16 {
        let top = f64::from(before.abs()) + allowed;
        allowed += top * 2f64.powi(-7);
    }
    allowed
}

/// Element-steps that moved a weight further than [`allowed_move`].
#[derive(Clone, Copy, Debug, Default)]
struct Bound {
    element_steps: u64,
    over: u64,
    /// The largest move as a multiple of its bound.
    worst: f64,
}

impl Bound {
    fn count(
        &mut self,
        config: &AdamaxConfig,
        t: u64,
        bf16: bool,
        before: &[Vec<f32>],
        after: &[Vec<f32>],
    ) {
        for (b, a) in before.iter().flatten().zip(after.iter().flatten()) {
            let ratio = f64::from(a - b).abs() / allowed_move(config, t, *b, bf16);
            self.element_steps += 1;
            if ratio.is_nan() || ratio > 1.0 {
                self.over += 1;
            }
            self.worst = if ratio.is_nan() {
                f64::INFINITY
            } else {
                self.worst.max(ratio)
            };
        }
    }
}

struct Outcome {
    train_loss: f32,
    test_loss: f32,
    test_acc: Option<f32>,
    /// Test loss after every epoch.
    curve: Vec<f32>,
    state_bytes: f64,
    bound: Bound,
    final_params: Vec<Vec<f32>>,
}

/// Calls `f(Some(indices))` for every batch of `task`'s epochs (each epoch a new
/// shuffle, the same for every run of `seed`) and `f(None)` after each epoch.
fn for_each_batch(
    task: &dyn Task,
    seed: u64,
    mut f: impl FnMut(Option<&[usize]>) -> Result<()>,
) -> Result<()> {
    let mut order: Vec<usize> = (0..task.train_len()).collect();
    let mut rng = StdRng::seed_from_u64(seed ^ 0xBA7C);
    for _ in 0..task.epochs() {
        order.shuffle(&mut rng);
        for batch in order.chunks(task.batch()) {
            f(Some(batch))?;
        }
        f(None)?;
    }
    Ok(())
}

fn train(task: &dyn Task, run: Run, seed: u64) -> Result<Outcome> {
    let mut params = task.init(seed);
    let config = run.config(seed, task.lr());
    let mut stepper = Stepper::new(run, &mut params, config)?;
    let mut grads: Vec<Vec<f32>> = params.iter().map(|p| vec![0.0; p.len()]).collect();
    let mut before = params.clone();
    let (mut curve, mut bound, mut t) = (Vec::new(), Bound::default(), 0u64);
    for_each_batch(task, seed, |batch| {
        match batch {
            Some(idx) => {
                task.train_pass(&params, idx, Some(&mut grads));
                before.clone_from(&params);
                stepper.step(&mut params, &grads)?;
                t += 1;
                bound.count(&config, t, run.bf16(), &before, &params);
            }
            None => curve.push(task.test(&params).0),
        }
        Ok(())
    })?;
    let (test_loss, test_acc) = task.test(&params);
    Ok(Outcome {
        train_loss: task.train_loss(&params),
        test_loss,
        test_acc,
        curve,
        state_bytes: stepper.state_bytes()?,
        bound,
        final_params: params,
    })
}

/// `train` over seeds `0..seeds`, one thread each.
fn train_seeds(task: &dyn Task, run: Run, seeds: u64) -> Result<Vec<Outcome>> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..seeds)
            .map(|s| scope.spawn(move || train(task, run, s).map_err(|e| e.to_string())))
            .collect();
        handles
            .into_iter()
            .map(|h| match h.join() {
                Ok(r) => r.map_err(Into::into),
                Err(_) => Err("a training thread panicked".into()),
            })
            .collect()
    })
}

/// The emulation of the crate's codec is the crate's 8-bit mode, bit for bit, with f32
/// and with stochastically rounded bf16 parameters.
fn check_emulation(task: &dyn Task) -> Result<()> {
    let pairs = [
        (Run::F32Q8, Run::Emulated(NEW, false)),
        (Run::Bf16StochasticQ8, Run::Emulated(NEW, true)),
    ];
    for (crate_run, emulated_run) in pairs {
        let (a, b) = std::thread::scope(|scope| {
            let a = scope.spawn(|| train(task, crate_run, 0).map_err(|e| e.to_string()));
            let b = scope.spawn(|| train(task, emulated_run, 0).map_err(|e| e.to_string()));
            (a.join(), b.join())
        });
        let (Ok(Ok(a)), Ok(Ok(b))) = (a, b) else {
            return Err("a check run failed".into());
        };
        let same = a
            .final_params
            .iter()
            .flatten()
            .zip(b.final_params.iter().flatten())
            .all(|(x, y)| x.to_bits() == y.to_bits());
        if !same {
            return Err(format!(
                "{}: the emulated codec differs from the crate's mode \"{}\"",
                task.name(),
                crate_run.name()
            )
            .into());
        }
    }
    println!(
        "check ({}): the emulated codec equals the crate's 8-bit modes bit for bit (f32 and bf16 stochastic parameters)",
        task.name()
    );
    Ok(())
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

/// `mean ± sd [min, max]` with `digits` decimals, or the range of a run that blew up.
fn fmt_stats((m, s, lo, hi): (f32, f32, f32, f32), scale: f32, digits: usize) -> String {
    if m.abs() > 1e6 || !m.is_finite() {
        return format!("diverged ({:.1e} to {:.1e})", lo * scale, hi * scale);
    }
    format!(
        "{:.digits$} ± {:.digits$} [{:.digits$}, {:.digits$}]",
        m * scale,
        s * scale,
        lo * scale,
        hi * scale
    )
}

/// The over-bound cell: element-steps over the bound, of how many, and the largest
/// move as a multiple of its bound (over all seeds).
fn fmt_bound(outcomes: &[Outcome]) -> (String, u64, u64, f64) {
    let over: u64 = outcomes.iter().map(|o| o.bound.over).sum();
    let total: u64 = outcomes.iter().map(|o| o.bound.element_steps).sum();
    let worst = outcomes.iter().map(|o| o.bound.worst).fold(0.0, f64::max);
    let cell = if over == 0 {
        format!("0 of {total:.2e} (largest {worst:.3}x)")
    } else {
        format!("**{over}** of {total:.2e} (largest **{worst:.3e}x**)")
    };
    (cell, over, total, worst)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(data), Some(out)) = (args.get(1), args.get(2)) else {
        // Without arguments there is nothing to run; a runner that starts every example
        // (the GPU machine's does) skips this CPU-only one rather than failing.
        println!("usage: quality <digits.csv> <output directory> (scripts/quality.sh runs it)");
        return Ok(());
    };
    let start = std::time::Instant::now();
    let digits = Digits::load(&PathBuf::from(data), DIGITS_EPOCHS, DIGITS_SEEDS)?;
    let regression = Regression::new(REGRESSION_EPOCHS, SYNTHETIC_SEEDS);
    let zipf = Zipf::new(ZIPF_EPOCHS, SYNTHETIC_SEEDS);
    let tasks: [&dyn Task; 3] = [&regression, &zipf, &digits];
    let out = PathBuf::from(out);
    std::fs::create_dir_all(&out)?;

    for task in tasks {
        check_emulation(task)?;
    }

    let mut md = String::new();
    let mut json = Vec::new();
    writeln!(
        md,
        "Every task with the CPU reference, which computes what the GPU kernels compute bit for bit; PyTorch's AdaMax defaults but the learning rate; seeds vary the initialisation, batch order and rounding stream. Losses: mean ± standard deviation [min, max] over the seeds. \"Over the bound\": element-steps (summed over seeds) that moved a weight further than AdaMax's bound, `step_size * (1 - beta1) / (1 - beta1 / beta2)` with a relative slack of 1e-5, plus one bf16 unit in the last place for bf16 parameters (as `allowed_move` in tests/lowbit.rs), of all element-steps, and the largest move as a multiple of its bound. The crate's 8-bit state (v2) stores `u` in blocks and `m` as its ratio to the step's denominator. \"First #19 codec\": `m` and `u` each in its blocks, `m` capped to the moment ratio of its element's decoded `u` (the crate's until v2). \"Old codec\": the 8-bit encoder before issue #19 (`m` and `u` rounded apart, each against its block's scale, by division, with bits 16-39 and 40-63 of the draw of the random stream of its time). Both are emulated with the codes of their time (tools/quality/src/codec.rs, `v1`); the emulation of the crate's current codec equals the crate's 8-bit modes bit for bit on every task (checked at every run)."
    )?;
    let mut digits_curves = Vec::new();
    for task in tasks {
        let seeds = task.seeds();
        writeln!(
            md,
            "\n### {}\n\n{}; {seeds} seeds.\n",
            task.name(),
            task.describe()
        )?;
        writeln!(md, "| mode | state bytes / parameter (counted) | final train loss | test loss | test accuracy | over the bound |")?;
        writeln!(md, "| --- | --- | --- | --- | --- | --- |")?;
        for run in MODES {
            let outcomes = train_seeds(task, run, seeds)?;
            let col = |f: fn(&Outcome) -> f32| stats(&outcomes.iter().map(f).collect::<Vec<_>>());
            let (tr, te) = (col(|o| o.train_loss), col(|o| o.test_loss));
            let acc = outcomes[0]
                .test_acc
                .map(|_| col(|o| o.test_acc.unwrap_or(f32::NAN)));
            let bytes = outcomes[0].state_bytes;
            let (bound_cell, over, total, worst) = fmt_bound(&outcomes);
            writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} |",
                run.name(),
                if bytes.is_nan() {
                    "(emulated)".to_string()
                } else {
                    format!("{bytes:.3}")
                },
                fmt_stats(tr, 1.0, 4),
                fmt_stats(te, 1.0, 4),
                acc.map_or("—".into(), |a| fmt_stats(a, 100.0, 2)),
                bound_cell
            )?;
            println!(
                "[{:.0} s] {}, {}: train {:.4}, test {:.4}, over the bound {over} of {total} (largest {worst:.3}x)",
                start.elapsed().as_secs_f64(),
                task.name(),
                run.name(),
                tr.0,
                te.0,
            );
            if task.name() == digits.name() {
                let epochs = task.epochs();
                let mean_curve: Vec<f32> = (0..epochs)
                    .map(|e| outcomes.iter().map(|o| o.curve[e]).sum::<f32>() / seeds as f32)
                    .collect();
                digits_curves.push((run, mean_curve));
            }
            json.push(serde_json::json!({
                "task": task.name(),
                "run": run.name(),
                "seeds": seeds,
                "state_bytes_per_parameter": if bytes.is_nan() { None } else { Some(bytes) },
                "train_loss": outcomes.iter().map(|o| o.train_loss).collect::<Vec<_>>(),
                "test_loss": outcomes.iter().map(|o| o.test_loss).collect::<Vec<_>>(),
                "test_accuracy": outcomes.iter().map(|o| o.test_acc).collect::<Vec<_>>(),
                "element_steps": outcomes.iter().map(|o| o.bound.element_steps).collect::<Vec<_>>(),
                "over_bound": outcomes.iter().map(|o| o.bound.over).collect::<Vec<_>>(),
                "largest_move_over_bound": outcomes.iter().map(|o| o.bound.worst).collect::<Vec<_>>(),
            }));
        }
    }

    writeln!(
        md,
        "\n### 8-bit state: choosing the codes, block and rounding\n\nDigits, f32 parameters, {SWEEP_SEEDS} seeds; every float code with the crate's encoder (`u` in its blocks, `m` as its ratio to the step's denominator), the linear baseline, the first #19 codec (`m` capped at the moment ratio of its decoded `u`) and the old codec with `m` and `u` apart.\n\n| candidate | final train loss | test loss | test accuracy | over the bound |\n| --- | --- | --- | --- | --- |"
    )?;
    for (k, candidate) in CANDIDATES.iter().enumerate() {
        let run = Run::Emulated(k, false);
        let outcomes = train_seeds(&digits, run, SWEEP_SEEDS)?;
        let col = |f: fn(&Outcome) -> f32| stats(&outcomes.iter().map(f).collect::<Vec<_>>());
        let (tr, te, acc) = (
            col(|o| o.train_loss),
            col(|o| o.test_loss),
            col(|o| o.test_acc.unwrap_or(f32::NAN)),
        );
        let (bound_cell, ..) = fmt_bound(&outcomes);
        writeln!(
            md,
            "| {} | {} | {} | {} | {bound_cell} |",
            candidate.name,
            fmt_stats(tr, 1.0, 4),
            fmt_stats(te, 1.0, 4),
            fmt_stats(acc, 100.0, 2)
        )?;
        println!(
            "[{:.0} s] candidate {}: train {:.4}, test {:.4}, accuracy {:.2}%",
            start.elapsed().as_secs_f64(),
            candidate.name,
            tr.0,
            te.0,
            acc.0 * 100.0
        );
        json.push(serde_json::json!({
            "task": digits.name(),
            "candidate": candidate.name,
            "seeds": SWEEP_SEEDS,
            "train_loss": outcomes.iter().map(|o| o.train_loss).collect::<Vec<_>>(),
            "test_loss": outcomes.iter().map(|o| o.test_loss).collect::<Vec<_>>(),
            "test_accuracy": outcomes.iter().map(|o| o.test_acc).collect::<Vec<_>>(),
            "over_bound": outcomes.iter().map(|o| o.bound.over).collect::<Vec<_>>(),
        }));
    }

    let fidelity_digits: Vec<Vec<(f64, f64)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..SWEEP_SEEDS)
            .map(|seed| {
                let digits = &digits;
                scope.spawn(move || fidelity(seed, digits).map_err(|e| e.to_string()))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| "a thread panicked".to_string())?)
            .collect::<std::result::Result<_, String>>()
    })?;
    let fading: Vec<Vec<(f64, f64)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..SWEEP_SEEDS)
            .map(|seed| scope.spawn(move || fidelity_fading(seed)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| "a thread panicked"))
            .collect::<std::result::Result<_, _>>()
    })?;
    writeln!(
        md,
        "\n8-bit state against f32 state on the same gradients, means over steps of the relative L2 distance of the update `-step_size * m / u` from the f32 state's (error) and of its projection on it (gain; below 1: updates systematically too small) ({SWEEP_SEEDS} seeds, mean ± standard deviation): on the digits run's own gradients (every step of {DIGITS_EPOCHS} epochs), and on a synthetic stream where most gradients fade while one element in 64 keeps a gradient of magnitude 1 (random sign), which holds each block's scale at 1 (the others: `z * s_i * exp(-t / 500)`, `z` standard normal, `s_i` log-uniform in [1e-3, 1]; 3,000 steps, 4,096 elements).\n\n| candidate | digits: update error | digits: update gain | fading: update error | fading: update gain |\n| --- | --- | --- | --- | --- |"
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
            col(&fidelity_digits, false),
            col(&fidelity_digits, true),
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
    plot(&out.join("quality.svg"), &digits_curves)?;
    println!(
        "wrote {} in {:.0} s",
        out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// How far each candidate's update is from the f32 state's, on the same gradients: an
/// f32 run trains; at every step each candidate's 8-bit state (and an f32 copy of the
/// moments, the reference) takes the same gradient and gives its update
/// `-step_size * m / u` (from a zero parameter, so that only the state differs). Returns,
/// per candidate, the means over steps of the error ||update - f32 update|| / ||f32
/// update|| and of the gain <update, f32 update> / ||f32 update||^2 (below 1: updates
/// systematically too small).
fn fidelity(seed: u64, digits: &Digits) -> Result<Vec<(f64, f64)>> {
    let mut params = digits.init(seed);
    let config = Run::F32.config(seed, digits.lr());
    let mut opt = CpuAdamax::new(config, &refs(&params))?;
    let lens: Vec<usize> = params.iter().map(Vec::len).collect();
    let mut states: Vec<_> = CANDIDATES
        .iter()
        .map(|c| c.state(lens.iter().copied()))
        .collect();
    let mut reference: Vec<(Vec<f32>, Vec<f32>)> =
        lens.iter().map(|&n| (vec![0.0; n], vec![0.0; n])).collect();
    let mut grads: Vec<Vec<f32>> = lens.iter().map(|&n| vec![0.0; n]).collect();
    let mut sums = vec![(0.0f64, 0.0f64); CANDIDATES.len()];
    let mut t = 0u64;
    for_each_batch(digits, seed, |batch| {
        let Some(idx) = batch else { return Ok(()) };
        digits.train_pass(&params, idx, Some(&mut grads));
        t += 1;
        let s = StepScalars::new(&config, t);
        let want = reference_step(&s, &mut reference, &grads);
        for (k, c) in CANDIDATES.iter().enumerate() {
            let mut got = Vec::new();
            for (i, g) in grads.iter().enumerate() {
                let key = lowbit::stream_key(seed, t, i as u64);
                let mut p = vec![0.0f32; g.len()];
                c.step(&s, key, &mut p, g, &mut states[k][i], false);
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
    let config = Run::F32.config(seed, 1e-3);
    let mut states: Vec<_> = CANDIDATES
        .iter()
        .map(|c| c.state([n].into_iter()))
        .collect();
    let mut reference = (vec![0.0f32; n], vec![0.0f32; n]);
    let mut sums = vec![(0.0f64, 0.0f64); CANDIDATES.len()];
    let steps = 3000u64;
    for t in 1..=steps {
        let fade = (-(t as f32) / 500.0).exp();
        let grads = [scale
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                let z = tasks::normal(&mut rng);
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
            c.step(&s, key, &mut p, &grads[0], &mut states[k][0], false);
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

fn plot(path: &PathBuf, curves: &[(Run, Vec<f32>)]) -> Result<()> {
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let top = curves
        .iter()
        .flat_map(|(_, c)| c.iter().copied())
        .fold(0.0f32, f32::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Digits MLP: test loss per epoch, mean of {DIGITS_SEEDS} seeds"),
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(1..DIGITS_EPOCHS, (0.05f32..top.min(3.0)).log_scale())?;
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
