//! The GPU against the CPU reference, bit for bit. Needs an NVIDIA GPU and NVRTC: without
//! a visible GPU every test is reported as ignored (never as passed).
//!
//! Most tests are one [`Twin`] (a GPU optimizer and the CPU reference built over the
//! same parameters and driven with the same inputs) run over a matrix: storage type x
//! storage mode x case, registered in `main` from the table in [`matrix`] and named
//! `{mode}_{type}_{case}`. The rest exercise what only the GPU has (CUDA graphs, raw
//! pointers, 64-bit indexing). What every optimizer must do whatever its device
//! (refusals, resume, reports) is in tests/scenarios.rs, on both.
//!
//! Every run uses fresh random data (a twin's failure message names its seed; set
//! `ADAMAX_TEST_SEED` to replay one) and poisons the 16-bit parameter copies with NaN
//! before each step where a master makes them output only, so a kernel that skips an
//! element cannot pass.

mod common;

use std::sync::Arc;

use adamax_cuda::{
    bf16,
    cuda::{self, cudarc::driver::CudaStream, CudaAdamax, GpuStorage},
    f16, AdamaxConfig, EpsilonMode, Error, LossScaler, Optimizer, ParamMode, Precision,
    StateFormat, StepOptions, StepReport, Storage, StorageType, TensorHyper, TensorState,
    WeightDecayMode,
};
use common::backends::{self, gpu_stream, Backend, Cpu, Gpu, Offsets, ODD, PLAIN, R};
use libtest_mimic::{Arguments, Trial};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

/// A test of what only the GPU has, given device 0's stream.
type GpuOnly = fn(&Arc<CudaStream>) -> R;

fn seed() -> u64 {
    std::env::var("ADAMAX_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random())
}

/// Random values with a spread of magnitudes, a few exact zeros.
fn random<T: Storage>(rng: &mut StdRng, n: usize, scale: f32) -> Vec<T> {
    let normal = Normal::new(0.0f32, 1.0).unwrap_or_else(|_| unreachable!());
    (0..n)
        .map(|_| {
            if rng.random::<f32>() < 0.02 {
                T::from_f32(0.0)
            } else {
                T::from_f32(normal.sample(rng) * scale * 10f32.powf(rng.random_range(-2.0..0.0)))
            }
        })
        .collect()
}

fn bits<T: Storage>(v: &[T]) -> Vec<u32> {
    v.iter().map(|x| x.to_f32().to_bits()).collect()
}

/// First index where two f32 lists differ in bits (NaN counts as equal to NaN: the
/// payload of a NaN is not part of the contract).
fn first_difference(a: &[f32], b: &[f32]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x.to_bits() != y.to_bits() && !(x.is_nan() && y.is_nan()))
}

fn same(what: &str, tensor: usize, gpu: &[f32], cpu: &[f32]) -> Result<(), String> {
    if gpu.len() != cpu.len() {
        return Err(format!(
            "{what} of tensor {tensor}: {} vs {} elements",
            gpu.len(),
            cpu.len()
        ));
    }
    match first_difference(gpu, cpu) {
        None => Ok(()),
        Some(i) => Err(format!(
            "{what} of tensor {tensor} differs at {i}: gpu {:e} ({:#010x}) cpu {:e} ({:#010x})",
            gpu[i],
            gpu[i].to_bits(),
            cpu[i],
            cpu[i].to_bits()
        )),
    }
}

/// Host tensors copied to the device, in order.
fn upload<T: GpuStorage>(
    stream: &Arc<CudaStream>,
    tensors: &[Vec<T>],
) -> R<Vec<cuda::cudarc::driver::CudaSlice<T>>> {
    Ok(tensors
        .iter()
        .map(|t| stream.clone_htod(t))
        .collect::<Result<Vec<_>, _>>()?)
}

/// Every tensor's state bit for bit, NaN counted equal to NaN (an infinite gradient
/// with clipping and no skip makes `m` NaN on both sides, as PyTorch does).
fn same_state(gpu: &[TensorState], cpu: &[TensorState]) -> Result<(), String> {
    if gpu.len() != cpu.len() {
        return Err(format!("{} vs {} tensors of state", gpu.len(), cpu.len()));
    }
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        same_tensor(i, g, c)?;
    }
    Ok(())
}

/// One tensor's state, every part, bit for bit: f32 moments and masters, or the 8-bit
/// codes and their block scales.
fn same_tensor(i: usize, g: &TensorState, c: &TensorState) -> Result<(), String> {
    same("exp_avg", i, &g.exp_avg, &c.exp_avg)?;
    same("exp_inf", i, &g.exp_inf, &c.exp_inf)?;
    same("master", i, &g.master, &c.master)?;
    same(
        "exp_avg scales",
        i,
        &g.exp_avg_q8.scales,
        &c.exp_avg_q8.scales,
    )?;
    same(
        "exp_inf scales",
        i,
        &g.exp_inf_q8.scales,
        &c.exp_inf_q8.scales,
    )?;
    for (what, a, b) in [
        ("exp_avg codes", &g.exp_avg_q8.codes, &c.exp_avg_q8.codes),
        ("exp_inf codes", &g.exp_inf_q8.codes, &c.exp_inf_q8.codes),
    ] {
        if a != b {
            let at = a.iter().zip(b).position(|(x, y)| x != y);
            return Err(format!(
                "{what} of tensor {i} differ: {} vs {} codes, first difference at {at:?}",
                a.len(),
                b.len()
            ));
        }
    }
    if g.step != c.step {
        return Err(format!(
            "tensor {i} took {} steps on the GPU, {} on the CPU",
            g.step, c.step
        ));
    }
    Ok(())
}

/// Two checkpoints: every field equal, the state bit for bit (NaN equal to NaN).
fn same_checkpoint(a: &adamax_cuda::Checkpoint, b: &adamax_cuda::Checkpoint) -> Result<(), String> {
    if (a.config, a.step, a.storage, &a.hypers) != (b.config, b.step, b.storage, &b.hypers) {
        return Err(format!(
            "config, step, storage or hyperparameters differ: step {} vs {}",
            a.step, b.step
        ));
    }
    same_state(&a.tensors, &b.tensors)
}

/// A seeded generator, and its seed (fresh, or `ADAMAX_TEST_SEED`).
fn rng() -> (u64, StdRng) {
    let seed = seed();
    (seed, StdRng::seed_from_u64(seed))
}

/// Random tensors of these lengths (see [`random`]).
fn tensors<T: Storage>(rng: &mut StdRng, lens: &[usize], scale: f32) -> Vec<Vec<T>> {
    lens.iter().map(|&n| random(rng, n, scale)).collect()
}

/// Every element times `scale` (a loss scale), rounded to `T`.
fn times<T: Storage>(tensors: Vec<Vec<T>>, scale: f32) -> Vec<Vec<T>> {
    tensors
        .into_iter()
        .map(|t| t.iter().map(|x| T::from_f32(x.to_f32() * scale)).collect())
        .collect()
}

fn floats<T: Storage>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// Every tensor's parameters bit for bit (NaN equal to NaN).
fn same_params<T: Storage>(gpu: &[Vec<T>], cpu: &[Vec<T>]) -> Result<(), String> {
    if gpu.len() != cpu.len() {
        return Err(format!("{} vs {} parameter tensors", gpu.len(), cpu.len()));
    }
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        same("param", i, &floats(g), &floats(c))?;
    }
    Ok(())
}

/// A GPU optimizer and the CPU reference, built over the same parameters and driven with
/// the same inputs, compared bit for bit: the parameters and every part of the state
/// ([`Twin::check`]), the step report ([`Twin::same_report`]).
struct Twin<T: GpuStorage> {
    gpu: Gpu<T>,
    cpu: Cpu<T>,
    /// The storage type, the settings and the seed, for failure messages.
    ctx: String,
}

impl<T: GpuStorage> Twin<T> {
    fn new(config: AdamaxConfig, init: &[Vec<T>], offsets: Offsets, seed: u64) -> R<Self> {
        let ctx = format!("{} {config:?} seed {seed}", T::NAME);
        let gpu = Gpu::with_offsets(config, init, offsets)
            .map_err(|e| format!("{ctx}: {}", e.message().unwrap_or_default()))?;
        let cpu = Cpu::new(config, init)?;
        Ok(Self { gpu, cpu, ctx })
    }

    /// The same setting on both (options, a loss scaler, a parameter group, a restore).
    fn set(&mut self, f: impl Fn(&mut dyn backends::Settings) -> adamax_cuda::Result<()>) -> R {
        f(&mut self.gpu.opt).map_err(|e| format!("{} (GPU): {e}", self.ctx))?;
        f(&mut self.cpu.opt).map_err(|e| format!("{} (CPU): {e}", self.ctx))?;
        Ok(())
    }

    fn step(&mut self, grads: &[Vec<T>]) -> R {
        self.gpu
            .step(grads)
            .map_err(|e| format!("{} (GPU): {e}", self.ctx))?;
        self.cpu.step(grads)?;
        Ok(())
    }

    fn step_some(&mut self, grads: &[Option<Vec<T>>]) -> R {
        self.gpu
            .step_some(grads)
            .map_err(|e| format!("{} (GPU): {e}", self.ctx))?;
        self.cpu.step_some(grads)?;
        Ok(())
    }

    /// The parameters and the whole state (moments, masters, 8-bit codes and scales,
    /// per-tensor step counts), bit for bit, NaN equal to NaN.
    fn check(&self, step: usize) -> R {
        let at = |e: String| format!("{} step {step}: {e}", self.ctx);
        same_params(&self.gpu.params()?, &self.cpu.params).map_err(at)?;
        same_state(&self.gpu.opt.state()?, self.cpu.opt.tensor_states()).map_err(at)?;
        Ok(())
    }

    /// The step reports, every field bit for bit.
    fn same_report(&self, step: usize) -> R {
        let (g, c) = (self.gpu.opt.last_report()?, self.cpu.opt.last_report()?);
        let fields = |r: &StepReport| {
            (
                r.step,
                r.skipped,
                r.loss_scale.map(f32::to_bits),
                r.total_norm.map(f32::to_bits),
                r.clip_coef.to_bits(),
            )
        };
        if fields(&g) != fields(&c) {
            return Err(format!("{} step {step}: report gpu {g:?} cpu {c:?}", self.ctx).into());
        }
        Ok(())
    }

    /// The GPU's 16-bit copy is exactly the round to nearest even of its master.
    fn copy_is_rne_of_master(&self, step: usize) -> R {
        for (i, (p, s)) in self
            .gpu
            .params()?
            .iter()
            .zip(self.gpu.opt.state()?)
            .enumerate()
        {
            let rounded: Vec<f32> = s.master.iter().map(|&m| T::from_f32(m).to_f32()).collect();
            if first_difference(&rounded, &floats(p)).is_some() {
                return Err(format!(
                    "{} step {step}: 16-bit copy of tensor {i} is not RNE(master)",
                    self.ctx
                )
                .into());
            }
        }
        Ok(())
    }
}

/// The tensor sizes of the bit-identical cases: the largest spans many waves of units
/// (2^20 + 3 elements; 2^16 + 3 under compute-sanitizer, see [`sanitized`]).
fn sizes() -> [usize; 6] {
    [
        0,
        1,
        3,
        4,
        4097,
        if sanitized() {
            (1 << 16) + 3
        } else {
            (1 << 20) + 3
        },
    ]
}

/// Whether compute-sanitizer runs this process (it loads itself through
/// `CUDA_INJECTION64_PATH`): racecheck then takes about 1.5 s per test one at a time
/// (issue #22), so the cases take at most 5 steps and smaller tensors, which still
/// span several waves of units, to fit the GPU run's 180 s sanitizer steps.
fn sanitized() -> bool {
    static UNDER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *UNDER.get_or_init(|| {
        std::env::var("CUDA_INJECTION64_PATH").is_ok_and(|p| p.to_lowercase().contains("sanitizer"))
    })
}

/// `steps`, or at most 5 under compute-sanitizer.
fn steps_for(steps: usize) -> usize {
    if sanitized() {
        steps.min(5)
    } else {
        steps
    }
}

/// The storage modes (parameters x moments), named as in the test names.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// f32 parameters, or 16-bit ones with f32 masters; f32 moments.
    Default,
    /// bf16 parameters rounded stochastically, f32 moments.
    Sr,
    /// f32 masters (or f32 parameters), 8-bit moments.
    Q8,
    /// bf16 parameters rounded stochastically, 8-bit moments.
    SrQ8,
}

impl Mode {
    const ALL: [Mode; 4] = [Mode::Default, Mode::Sr, Mode::Q8, Mode::SrQ8];

    fn name(self) -> &'static str {
        match self {
            Mode::Default => "default",
            Mode::Sr => "sr",
            Mode::Q8 => "q8",
            Mode::SrQ8 => "sr_q8",
        }
    }

    fn precision(self) -> Precision {
        let (params, state) = match self {
            Mode::Default => return Precision::default(),
            Mode::Sr => (ParamMode::Stochastic, StateFormat::F32),
            Mode::Q8 => (ParamMode::Master, StateFormat::Blockwise8),
            Mode::SrQ8 => (ParamMode::Stochastic, StateFormat::Blockwise8),
        };
        Precision {
            params,
            state,
            seed: 0x5EED,
            min_8bit_len: 0,
        }
    }

    /// Stochastic rounding is bf16's alone.
    fn applies_to(self, ty: StorageType) -> bool {
        self.precision().params == ParamMode::Master || ty == StorageType::Bf16
    }
}

/// Which storage types in which modes a case runs in.
#[derive(Clone, Copy)]
enum Cells {
    /// Every storage type in every mode it has.
    Full,
    /// Every storage type in the default mode, and bf16 (which has every mode) in each.
    Cross,
    /// Every storage type in the default mode.
    Types,
    /// Every storage type in every mode of 8-bit state.
    EightBit,
}

impl Cells {
    fn iter(self) -> impl Iterator<Item = (StorageType, Mode)> {
        StorageType::ALL
            .into_iter()
            .flat_map(|ty| Mode::ALL.map(|mode| (ty, mode)))
            .filter(move |&(ty, mode)| {
                mode.applies_to(ty)
                    && match self {
                        Cells::Full => true,
                        Cells::Cross => mode == Mode::Default || ty == StorageType::Bf16,
                        Cells::Types => mode == Mode::Default,
                        Cells::EightBit => mode.precision().state == StateFormat::Blockwise8,
                    }
            })
    }
}

/// What a twin test does: the case axis of the matrix.
#[derive(Clone, Copy)]
enum Case {
    /// Tensors of every size in [`sizes`] stepped with this configuration.
    BitIdentical(AdamaxConfig),
    /// [`sizes`] as views at odd element offsets (the kernel's scalar path).
    OddViews,
    /// 150 tensors of mixed sizes in one launch.
    MixedList,
    /// NaN, +inf and -inf in every gradient (a NaN poisons its 8-bit block on both sides).
    NanAndInf,
    /// Unscaling, overflow skips, clipping and the loss scaler.
    Fused {
        options: StepOptions,
        scaler: Option<LossScaler>,
        offsets: Offsets,
    },
    /// A loss-scaled run on the GPU against an unscaled one on the CPU.
    ScaledGradients,
    /// Some tensors without a gradient in some steps, with clipping and a loss scaler.
    MissingGradients,
    /// One flat parameter buffer, packed or aligned.
    Flat { aligned: bool },
    /// Parameter groups: other learning rates and weight decays per tensor.
    Groups(WeightDecayMode),
    /// The step that fills the step counter, and the refused one after it.
    FullCounter,
    /// Tensors of both state formats in one launch (the size threshold, and formats
    /// chosen by hand), with missing gradients, clipping and a loss scaler.
    PerTensorState,
}

impl Case {
    fn run<T: GpuStorage>(self, mode: Mode) -> R {
        let precision = mode.precision();
        let default = AdamaxConfig {
            precision,
            ..AdamaxConfig::default()
        };
        let f32_default = mode == Mode::Default && T::TYPE == StorageType::F32;
        match self {
            Case::BitIdentical(config) => {
                // The most steps where the GPU time is shortest.
                let steps = match (mode, T::TYPE) {
                    (Mode::Default, StorageType::F32) => 100,
                    (Mode::Default, _) => 20,
                    (_, StorageType::F16) => 10,
                    _ => 30,
                };
                let config = AdamaxConfig {
                    precision,
                    ..config
                };
                bit_identical::<T>(config, &sizes(), steps_for(steps), PLAIN, false)
            }
            Case::OddViews => bit_identical::<T>(default, &sizes(), steps_for(10), ODD, false),
            Case::MixedList => {
                let (sizes_seed, steps) = match (f32_default, mode) {
                    (true, _) => (1, 30),
                    (false, Mode::Default) => (2, 10),
                    _ => (3, 10),
                };
                bit_identical::<T>(
                    default,
                    &mixed_sizes(150, sizes_seed),
                    steps_for(steps),
                    PLAIN,
                    false,
                )
            }
            Case::NanAndInf => bit_identical::<T>(default, &sizes()[..5], 5, PLAIN, true),
            Case::Fused {
                options,
                scaler,
                offsets,
            } => fused::<T>(options, scaler, offsets, precision),
            Case::ScaledGradients => scaled_gradients::<T>(precision),
            Case::MissingGradients => missing_gradients::<T>(precision),
            Case::Flat { aligned } => flat_buffers::<T>(aligned, precision),
            Case::Groups(decay) => groups::<T>(decay, precision),
            Case::FullCounter => the_step_that_fills_the_counter::<T>(precision),
            Case::PerTensorState => per_tensor_state::<T>(precision),
        }
    }
}

/// The twin tests: (case name, where it runs, what it does).
fn matrix() -> Vec<(String, Cells, Case)> {
    use Cells::{Cross, Full, Types};
    let clip = StepOptions {
        max_norm: Some(0.5),
        ..Default::default()
    };
    let scaler = Some(LossScaler {
        scale: 1024.0,
        growth_interval: 3,
        ..LossScaler::default()
    });
    let unscale = StepOptions {
        inv_scale: Some(0.25),
        ..Default::default()
    };
    let fused = |options, scaler, offsets| Case::Fused {
        options,
        scaler,
        offsets,
    };
    let rows = [
        (
            "views_at_odd_offsets_take_the_scalar_path",
            Cross,
            Case::OddViews,
        ),
        (
            "a_list_of_150_mixed_tensors_in_one_launch",
            Cross,
            Case::MixedList,
        ),
        (
            "nan_and_inf_gradients_match_the_cpu",
            Cross,
            Case::NanAndInf,
        ),
        (
            "fused_scaler_and_clipping_match_the_cpu",
            Types,
            fused(clip, scaler, PLAIN),
        ),
        (
            "fused_scaler_and_clipping_match_the_cpu_at_odd_offsets",
            Cross,
            fused(clip, scaler, ODD),
        ),
        (
            "fused_clipping_alone_matches_the_cpu_at_odd_offsets",
            Types,
            fused(clip, None, ODD),
        ),
        (
            "fused_fixed_unscale_with_check_matches_the_cpu",
            Types,
            fused(unscale, None, PLAIN),
        ),
        (
            "loss_scaler_unscales_by_the_scale_the_gradients_carry",
            Types,
            Case::ScaledGradients,
        ),
        (
            "missing_gradients_match_the_cpu_with_clipping_and_scaler",
            Cross,
            Case::MissingGradients,
        ),
        (
            "flat_buffers_match_the_cpu_packed",
            Cross,
            Case::Flat { aligned: false },
        ),
        (
            "flat_buffers_match_the_cpu_aligned",
            Full,
            Case::Flat { aligned: true },
        ),
        (
            "per_tensor_hyperparameters_match_the_cpu_coupled",
            Types,
            Case::Groups(WeightDecayMode::Coupled),
        ),
        (
            "per_tensor_hyperparameters_match_the_cpu_decoupled",
            Types,
            Case::Groups(WeightDecayMode::Decoupled),
        ),
        (
            "the_step_that_fills_the_step_counter_matches_the_cpu",
            Types,
            Case::FullCounter,
        ),
        (
            "tensors_of_both_state_formats_in_one_launch_match_the_cpu",
            Cells::EightBit,
            Case::PerTensorState,
        ),
    ];
    configs()
        .into_iter()
        .map(|(name, config)| {
            let name = format!("is_bit_identical_to_cpu_{name}");
            (name, Full, Case::BitIdentical(config))
        })
        .chain(rows.map(|(name, cells, case)| (name.to_string(), cells, case)))
        .collect()
}

/// Steps random tensors of `lens` on the twin `steps` times and compares them after the
/// first and the last step. Where a master makes the 16-bit copy output only, the GPU's
/// copy is poisoned with NaN before each step and must come out as the round to nearest
/// even of the master. `special`: NaN, +inf and -inf at the start of every gradient of
/// 4 elements or more.
fn bit_identical<T: GpuStorage>(
    config: AdamaxConfig,
    lens: &[usize],
    steps: usize,
    offsets: Offsets,
    special: bool,
) -> R {
    let (seed, mut rng) = rng();
    let mut twin = Twin::new(config, &tensors::<T>(&mut rng, lens, 1.0), offsets, seed)?;
    let output_only = T::HAS_MASTER && config.precision.params == ParamMode::Master;
    twin.gpu.poison = output_only;
    for step in 1..=steps {
        let mut grads = tensors::<T>(&mut rng, lens, 0.1);
        if special {
            for g in grads.iter_mut().filter(|g| g.len() >= 4) {
                g[0] = T::from_f32(f32::NAN);
                g[1] = T::from_f32(f32::INFINITY);
                g[2] = T::from_f32(f32::NEG_INFINITY);
            }
        }
        twin.step(&grads)?;
        if step == 1 || step == steps {
            twin.check(step)?;
            if output_only {
                twin.copy_is_rne_of_master(step)?;
            }
        }
    }
    let count = twin.gpu.opt.step_count()?;
    if count != steps as u64 {
        return Err(format!("{}: step count {count}", twin.ctx).into());
    }
    Ok(())
}

/// Unscaling, overflow skips, clipping and the loss scaler, step by step: parameters,
/// state and report (skip, scale, norm, clip factor). Steps 4, 5 and 10 get a +inf
/// gradient in the last tensor (scaled runs skip them).
fn fused<T: GpuStorage>(
    options: StepOptions,
    scaler: Option<LossScaler>,
    offsets: Offsets,
    precision: Precision,
) -> R {
    let (seed, mut rng) = rng();
    let lens = [(1usize << 16) + 5, 3, 0, 8192 * 3 + 1, 700];
    let config = AdamaxConfig {
        weight_decay: 0.01,
        precision,
        ..AdamaxConfig::default()
    };
    let mut twin = Twin::new(config, &tensors::<T>(&mut rng, &lens, 1.0), offsets, seed)?;
    twin.ctx += &format!(" {options:?} {scaler:?}");
    twin.set(|o| {
        o.set_options(options)?;
        o.set_loss_scaler(scaler)
    })?;
    for step in 1..=12 {
        let scale = twin.cpu.opt.loss_scaler()?.map_or(1.0, |s| s.scale);
        let mut grads = times(tensors::<T>(&mut rng, &lens, 0.1), scale);
        if [4, 5, 10].contains(&step) {
            grads[4][0] = T::from_f32(f32::INFINITY);
        }
        twin.step(&grads)?;
        twin.same_report(step)?;
        twin.check(step)?;
    }
    Ok(())
}

/// The loss-scaler regression of the first H100 run: on a growth step the update
/// divided by the next step's scale. With power-of-two scales, unscaling is exact, so
/// the GPU's scaled run must equal the CPU reference on the unscaled gradients with the
/// skipped steps left out, bit for bit, through a growth step followed by a skip and
/// two backoffs in a row (tests/common's schedule; the CPU twin is in fused_cpu.rs).
fn scaled_gradients<T: GpuStorage>(precision: Precision) -> R {
    use common::{SCALER_INF_STEPS, SCALER_SCALES};
    let (seed, mut rng) = rng();
    let lens = [(1usize << 16) + 5, 3, 8193];
    let config = AdamaxConfig {
        weight_decay: 0.01,
        precision,
        ..AdamaxConfig::default()
    };
    let mut twin = Twin::new(config, &tensors::<T>(&mut rng, &lens, 1.0), PLAIN, seed)?;
    twin.gpu.opt.set_loss_scaler(Some(LossScaler {
        scale: 1024.0,
        growth_interval: 2,
        ..Default::default()
    }))?;
    for (t, &scale) in SCALER_SCALES.iter().enumerate() {
        let got_scale = twin.gpu.opt.loss_scaler()?.map(|s| s.scale);
        if got_scale != Some(scale) {
            let ctx = &twin.ctx;
            return Err(format!("{ctx} step {t}: scale {got_scale:?}, expected {scale}").into());
        }
        let grads = tensors::<T>(&mut rng, &lens, 0.1);
        let mut scaled = times(grads.clone(), scale);
        let inf = SCALER_INF_STEPS.contains(&t);
        if inf {
            scaled[2][100] = T::from_f32(f32::INFINITY);
        }
        twin.gpu.step(&scaled)?;
        if twin.gpu.opt.last_report()?.skipped != inf {
            return Err(format!("{} step {t}: skip decision differs", twin.ctx).into());
        }
        if !inf {
            twin.cpu.step(&grads)?;
        }
        twin.check(t)?;
    }
    Ok(())
}

/// Missing gradients with clipping, a loss scaler and overflow skips: absent tensors
/// add zero partial sums (their chunks keep their numbers in the reduction order), take
/// no update and keep their own step counts.
fn missing_gradients<T: GpuStorage>(precision: Precision) -> R {
    let (seed, mut rng) = rng();
    let lens = [(1usize << 16) + 5, 3, 0, 8192 * 3 + 1, 700, 9000];
    let config = AdamaxConfig {
        weight_decay: 0.01,
        precision,
        ..AdamaxConfig::default()
    };
    let mut twin = Twin::new(config, &tensors::<T>(&mut rng, &lens, 1.0), PLAIN, seed)?;
    twin.set(|o| {
        o.set_options(StepOptions {
            max_norm: Some(0.5),
            ..Default::default()
        })?;
        o.set_loss_scaler(Some(LossScaler {
            scale: 256.0,
            growth_interval: 2,
            ..Default::default()
        }))
    })?;
    for step in 0..10usize {
        let scale = twin.cpu.opt.loss_scaler()?.map_or(1.0, |s| s.scale);
        let mut grads: Vec<Option<Vec<T>>> = times(tensors::<T>(&mut rng, &lens, 0.1), scale)
            .into_iter()
            .enumerate()
            .map(|(i, g)| ((i + step) % 3 != 0).then_some(g))
            .collect();
        if step == 4 {
            if let Some(g) = grads[5].as_mut() {
                g[10] = T::from_f32(f32::INFINITY);
            }
        }
        twin.step_some(&grads)?;
        twin.same_report(step)?;
        twin.check(step)?;
    }
    Ok(())
}

/// Issue #19, part 4: an 8-bit optimizer whose tensors below the default threshold
/// (4,096 elements) keep f32 state, with a large tensor kept in f32 and a small one put
/// in 8 bits by hand, steps every tensor as the CPU reference does, in one launch;
/// formats are refused once it has stepped; the streamed save writes what the CPU's
/// checkpoint holds.
fn per_tensor_state<T: GpuStorage>(precision: Precision) -> R {
    let (seed, mut rng) = rng();
    let lens = [(1usize << 16) + 5, 768, 3, 4096, 4095, 9000, 0, 300];
    let config = AdamaxConfig {
        precision: Precision {
            min_8bit_len: adamax_cuda::DEFAULT_MIN_8BIT_LEN,
            ..precision
        },
        ..AdamaxConfig::default()
    };
    let mut twin = Twin::new(config, &tensors::<T>(&mut rng, &lens, 1.0), PLAIN, seed)?;
    twin.set(|o| {
        o.set_tensor_state_format(5, StateFormat::F32)?;
        o.set_tensor_state_format(7, StateFormat::Blockwise8)?;
        o.set_options(StepOptions {
            max_norm: Some(0.5),
            ..Default::default()
        })?;
        o.set_loss_scaler(Some(LossScaler {
            scale: 256.0,
            growth_interval: 2,
            ..Default::default()
        }))
    })?;
    use StateFormat::{Blockwise8 as Q8, F32};
    let expected = [Q8, F32, F32, Q8, F32, F32, F32, Q8];
    if twin.gpu.opt.tensor_state_formats() != expected {
        return Err(format!("formats {:?}", twin.gpu.opt.tensor_state_formats()).into());
    }
    for step in 0..steps_for(8) {
        let scale = twin.cpu.opt.loss_scaler()?.map_or(1.0, |s| s.scale);
        let mut grads: Vec<Option<Vec<T>>> = times(tensors::<T>(&mut rng, &lens, 0.1), scale)
            .into_iter()
            .enumerate()
            .map(|(i, g)| ((i + step) % 4 != 0).then_some(g))
            .collect();
        if step == 3 {
            if let Some(g) = grads[1].as_mut() {
                g[10] = T::from_f32(f32::INFINITY);
            }
        }
        twin.step_some(&grads)?;
        twin.same_report(step)?;
        twin.check(step)?;
    }
    if !matches!(
        twin.gpu.opt.set_tensor_state_format(1, Q8),
        Err(adamax_cuda::Error::StateFormat { .. })
    ) {
        return Err("a format change after a step was not refused".into());
    }
    let path = std::env::temp_dir().join(format!(
        "adamax-gpu-per-tensor-{}-{}.safetensors",
        T::NAME,
        std::process::id()
    ));
    twin.gpu.opt.save_checkpoint(&path)?;
    let loaded = adamax_cuda::Checkpoint::load(&path);
    let _ = std::fs::remove_file(&path);
    let ck = twin.cpu.opt.checkpoint()?;
    same_checkpoint(&loaded?, &ck)?;
    // A restore of mixed formats (staged per part, each tensor at its own offsets) into
    // new optimizers given the same formats, then more steps alike.
    let mut restored = Twin::new(config, &tensors::<T>(&mut rng, &lens, 1.0), PLAIN, seed)?;
    restored.set(|o| {
        o.set_tensor_state_format(5, StateFormat::F32)?;
        o.set_tensor_state_format(7, StateFormat::Blockwise8)?;
        o.restore(&ck)
    })?;
    restored.check(100)?;
    for step in 101..103 {
        let scale = restored.cpu.opt.loss_scaler()?.map_or(1.0, |s| s.scale);
        restored.step(&times(tensors::<T>(&mut rng, &lens, 0.1), scale))?;
        restored.check(step)?;
    }
    // An 8-bit configuration whose every tensor keeps f32 state launches the f32-state
    // update.
    let all_f32 = AdamaxConfig {
        precision: Precision {
            min_8bit_len: usize::MAX,
            ..config.precision
        },
        ..config
    };
    let mut plain = Twin::new(all_f32, &tensors::<T>(&mut rng, &lens, 1.0), PLAIN, seed)?;
    if plain.gpu.opt.tensor_state_formats().contains(&Q8) {
        return Err("min_8bit_len usize::MAX left a tensor in 8 bits".into());
    }
    for step in 0..2 {
        plain.step(&tensors::<T>(&mut rng, &lens, 0.1))?;
        plain.check(step)?;
    }
    Ok(())
}

/// Parameter groups: every third tensor without decay, others at a quarter or three
/// times the learning rate, set alike on both.
fn groups<T: GpuStorage>(decay: WeightDecayMode, precision: Precision) -> R {
    let (seed, mut rng) = rng();
    let lens = mixed_sizes(40, 3);
    let config = AdamaxConfig {
        weight_decay: 0.05,
        weight_decay_mode: decay,
        lr: 3e-3,
        precision,
        ..AdamaxConfig::default()
    };
    let hyper = |i: usize| match i % 3 {
        0 => TensorHyper {
            lr_scale: 1.0,
            weight_decay: 0.0,
        },
        1 => TensorHyper {
            lr_scale: 0.25,
            weight_decay: 0.05,
        },
        _ => TensorHyper {
            lr_scale: 3.0,
            weight_decay: 0.2,
        },
    };
    let mut twin = Twin::new(config, &tensors::<T>(&mut rng, &lens, 1.0), PLAIN, seed)?;
    for i in 0..lens.len() {
        twin.set(|o| o.set_tensor_hyper(i, hyper(i)))?;
    }
    for _ in 0..20 {
        twin.step(&tensors(&mut rng, &lens, 0.1))?;
    }
    twin.check(20)
}

/// From a step counter at `u64::MAX - 1`, one step reaches the limit as on the CPU; the
/// next is refused with `StepOverflow` on both and changes nothing. (The refusal after a
/// restore to the limit is a scenario; the replayed graph at the limit is
/// [`a_full_step_counter_in_a_replayed_graph_changes_nothing`].)
fn the_step_that_fills_the_counter<T: GpuStorage>(precision: Precision) -> R {
    let (seed, mut rng) = rng();
    let lens = [4097usize, 3];
    let config = AdamaxConfig {
        precision,
        ..AdamaxConfig::default()
    };
    let mut twin = Twin::new(config, &tensors::<T>(&mut rng, &lens, 1.0), PLAIN, seed)?;
    let grads = tensors::<T>(&mut rng, &lens, 0.1);
    let mut ck = twin.cpu.opt.checkpoint()?;
    ck.step = u64::MAX - 1;
    twin.set(|o| o.restore(&ck))?;
    twin.step(&grads)?;
    let before = (twin.gpu.opt.checkpoint()?, twin.gpu.params()?);
    let cpu_err = twin.cpu.step(&grads);
    let gpu_err = twin.gpu.step(&grads);
    match (&cpu_err, &gpu_err) {
        (Err(Error::StepOverflow(a)), Err(Error::StepOverflow(b)))
            if *a == u64::MAX && *b == u64::MAX => {}
        _ => {
            return Err(
                format!("expected StepOverflow on both: cpu {cpu_err:?}, gpu {gpu_err:?}").into(),
            )
        }
    }
    same_checkpoint(&twin.gpu.opt.checkpoint()?, &before.0)?;
    if twin.gpu.params()? != before.1 {
        return Err("a refused step changed the parameters".into());
    }
    same_checkpoint(&twin.gpu.opt.checkpoint()?, &twin.cpu.opt.checkpoint()?)?;
    twin.check(2)
}

/// The flat-buffer path against the CPU reference, bit for bit: 100 mixed tensors in
/// one parameter buffer (packed or aligned layout), stepped with gradients written into
/// the same flat buffer (the tensor table on the device is reused), then from a new
/// gradient buffer, after a per-tensor setting changed, and after a per-tensor step
/// (each rebuilds it). Refusals: a short buffer, and step_flat on a per-tensor optimizer.
fn flat_buffers<T: GpuStorage>(aligned: bool, precision: Precision) -> R {
    use adamax_cuda::cuda::FlatLayout;
    let stream = &backends::stream()?;
    let (seed, mut rng) = rng();
    let lens = mixed_sizes(100, 7);
    let layout = if aligned {
        FlatLayout::aligned(&lens)?
    } else {
        FlatLayout::packed(&lens)?
    };
    let flatten = |tensors: &[Vec<T>]| {
        let mut flat = vec![T::from_f32(-9.0); layout.total()];
        for (t, &o) in tensors.iter().zip(layout.offsets()) {
            flat[o..o + t.len()].copy_from_slice(t);
        }
        flat
    };
    let init = tensors::<T>(&mut rng, &lens, 1.0);
    let mut params = stream.clone_htod(&flatten(&init))?;
    let config = AdamaxConfig {
        weight_decay: 0.01,
        precision,
        ..AdamaxConfig::default()
    };
    let ctx = format!("{} {config:?} seed {seed}", T::NAME);
    let mut gpu = CudaAdamax::<T>::new_flat(stream, config, &params, layout.clone())?;
    let mut cpu = Cpu::new(config, &init)?;
    let mut grads = stream.alloc_zeros::<T>(layout.total())?;
    for step in 0..8 {
        let g = tensors::<T>(&mut rng, &lens, 0.1);
        match step {
            3 => grads = stream.alloc_zeros::<T>(layout.total() + 5)?,
            4 => {
                let h = TensorHyper {
                    lr_scale: 0.5,
                    weight_decay: 0.0,
                };
                gpu.set_tensor_hyper(5, h)?;
                cpu.opt.set_tensor_hyper(5, h)?;
            }
            _ => {}
        }
        stream.memcpy_htod(&flatten(&g), &mut grads)?;
        if step == 5 {
            // A per-tensor step (raw addresses into the same buffers): it replaces the
            // table on the device, so the next flat step must rebuild it.
            use adamax_cuda::cuda::{
                cudarc::driver::{DevicePtr, DevicePtrMut},
                RawTensor,
            };
            let size = std::mem::size_of::<T>() as u64;
            let pbase = params.device_ptr_mut(stream).0;
            let gbase = grads.device_ptr(stream).0;
            let tensors: Vec<RawTensor> = layout
                .offsets()
                .iter()
                .map(|&o| RawTensor {
                    param: pbase + o as u64 * size,
                    grad: gbase + o as u64 * size,
                })
                .collect();
            // SAFETY: the addresses lie in live buffers of this stream's context, each
            // tensor within the layout these buffers were made for; one stream only.
            unsafe { gpu.step_raw(&tensors)? };
        } else {
            gpu.step_flat(&mut params, &grads)?;
        }
        cpu.step(&g)?;
        let flat = stream.clone_dtoh(&params)?;
        let got: Vec<Vec<T>> = layout
            .offsets()
            .iter()
            .zip(layout.lens())
            .map(|(&o, &n)| flat[o..o + n].to_vec())
            .collect();
        same_params(&got, &cpu.params).map_err(|e| format!("{ctx} step {step}: {e}"))?;
        same_state(&gpu.state()?, cpu.opt.tensor_states())
            .map_err(|e| format!("{ctx} step {step}: {e}"))?;
    }
    let short = stream.alloc_zeros::<T>(layout.total() - 1)?;
    match gpu.step_flat(&mut params, &short) {
        Err(Error::BufferTooSmall { .. }) => {}
        other => return Err(format!("a short gradient buffer: {other:?}").into()),
    }
    let mut per_tensor = CudaAdamax::<T>::new(stream, config, &[params.slice(0..3)])?;
    match per_tensor.step_flat(&mut params, &grads) {
        Err(Error::NotFlat) => Ok(()),
        other => Err(format!("step_flat on a per-tensor optimizer: {other:?}").into()),
    }
}
fn configs() -> Vec<(&'static str, AdamaxConfig)> {
    let d = AdamaxConfig::default();
    vec![
        ("pytorch_defaults", d),
        (
            "keras_epsilon",
            AdamaxConfig {
                eps: 1e-7,
                eps_mode: EpsilonMode::Denominator,
                lr: 1e-3,
                ..d
            },
        ),
        (
            "coupled_decay",
            AdamaxConfig {
                weight_decay: 0.1,
                lr: 1e-2,
                ..d
            },
        ),
        (
            "decoupled_decay",
            AdamaxConfig {
                weight_decay: 0.1,
                weight_decay_mode: WeightDecayMode::Decoupled,
                lr: 1e-2,
                ..d
            },
        ),
        (
            "maximize",
            AdamaxConfig {
                maximize: true,
                beta1: 0.8,
                beta2: 0.99,
                ..d
            },
        ),
        (
            "zero_eps_keras",
            AdamaxConfig {
                eps: 0.0,
                eps_mode: EpsilonMode::Denominator,
                ..d
            },
        ),
    ]
}

fn mixed_sizes(count: usize, seed: u64) -> Vec<usize> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count)
        .map(|i| match i % 5 {
            0 => rng.random_range(0..8),
            1 => rng.random_range(8..1000),
            2 => 768,
            3 => rng.random_range(1000..70_000),
            _ => 768 * 4 + rng.random_range(0..3),
        })
        .collect()
}

/// 64-bit indexing: one 16-bit tensor of 2^31 + 4099 elements (34 GB of device memory
/// with its state), checked against the CPU reference on windows at the start, across
/// element 2^31, and at the end. The CPU reference is elementwise, so stepping a window
/// on its own is exact.
fn over_2_pow_31_elements<T: GpuStorage>(stream: &Arc<CudaStream>) -> R {
    let n = (1usize << 31) + 4099;
    let value = |i: usize, seed: u32, scale: f32| {
        let h = (i as u32).wrapping_mul(2_654_435_761)
            ^ seed.wrapping_mul(0x9e37_79b9)
            ^ (i >> 32) as u32;
        T::from_f32(((h >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0) * scale)
    };
    let host_params: Vec<T> = (0..n).map(|i| value(i, 1, 1.0)).collect();
    let mut params = vec![stream.clone_htod(&host_params)?];
    drop(host_params);
    let grads_for = |step: u32| -> Vec<T> { (0..n).map(|i| value(i, 10 + step, 0.1)).collect() };
    let config = AdamaxConfig::default();
    let mut gpu = CudaAdamax::<T>::new(stream, config, &params)?;
    let windows = [0..4096, (1 << 31) - 4096..(1 << 31) + 4096, n - 4096..n];
    let mut cpu: Vec<(Vec<T>, adamax_cuda::TensorState)> = windows
        .iter()
        .map(|w| {
            let p: Vec<T> = w.clone().map(|i| value(i, 1, 1.0)).collect();
            let st = adamax_cuda::TensorState::new(&p);
            (p, st)
        })
        .collect();
    for step in 1..=2u64 {
        let host_grads = grads_for(step as u32);
        let grads = vec![stream.clone_htod(&host_grads)?];
        gpu.step(&mut params, &grads)?;
        let s = adamax_cuda::spec::StepScalars::new(&config, step);
        for (w, (p, st)) in windows.iter().zip(cpu.iter_mut()) {
            adamax_cuda::cpu::step_tensor(&s, &config.precision, 0, p, &host_grads[w.clone()], st)?;
        }
    }
    for (w, (p, st)) in windows.iter().zip(&cpu) {
        let got: Vec<T> = stream.clone_dtoh(&params[0].slice(w.clone()))?;
        let f = |v: &[T]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
        same("param window", 0, &f(&got), &f(p)).map_err(|e| format!("window {w:?}: {e}"))?;
        let gs = gpu.tensor_state_to_host(0, w.clone())?;
        for (what, g, c) in [
            ("exp_avg", &gs.exp_avg, &st.exp_avg),
            ("exp_inf", &gs.exp_inf, &st.exp_inf),
            ("master", &gs.master, &st.master),
        ] {
            same(what, 0, g, c).map_err(|e| format!("window {w:?}: {e}"))?;
        }
    }
    Ok(())
}

/// The raw-pointer entry points give the same bits as the typed ones, and refuse null
/// and misaligned addresses and a wrong tensor count without counting a step.
fn raw_entry_points_match_and_refuse_bad_addresses(stream: &Arc<CudaStream>) -> R {
    use adamax_cuda::cuda::{
        cudarc::driver::{DevicePtr, DevicePtrMut},
        RawParam, RawTensor,
    };
    let mut rng = StdRng::seed_from_u64(seed());
    let lens = [4097usize, 5, 0];
    let init: Vec<Vec<f16>> = lens.iter().map(|&n| random(&mut rng, n, 1.0)).collect();
    let grads: Vec<Vec<f16>> = lens.iter().map(|&n| random(&mut rng, n, 0.1)).collect();
    let (mut typed_p, typed_g) = (upload(stream, &init)?, upload(stream, &grads)?);
    let (mut raw_p, raw_g) = (upload(stream, &init)?, upload(stream, &grads)?);
    let config = AdamaxConfig::default();
    let mut typed = CudaAdamax::<f16>::new(stream, config, &typed_p)?;
    let addrs: Vec<(u64, u64)> = raw_p
        .iter_mut()
        .zip(&raw_g)
        .map(|(p, g)| (p.device_ptr_mut(stream).0, g.device_ptr(stream).0))
        .collect();
    let params: Vec<RawParam> = addrs
        .iter()
        .zip(&lens)
        .map(|(&(ptr, _), &len)| RawParam { ptr, len })
        .collect();
    let tensors: Vec<RawTensor> = addrs
        .iter()
        .map(|&(param, grad)| RawTensor { param, grad })
        .collect();
    // SAFETY: the addresses come from live CudaSlices of this context with these lengths.
    let mut raw = unsafe { CudaAdamax::<f16>::new_raw(stream, config, &params)? };
    for _ in 0..3 {
        typed.step(&mut typed_p, &typed_g)?;
        // SAFETY: as above.
        unsafe { raw.step_raw(&tensors)? };
    }
    for (a, b) in typed_p.iter().zip(&raw_p) {
        if bits(&stream.clone_dtoh(a)?) != bits(&stream.clone_dtoh(b)?) {
            return Err("step_raw differs from step".into());
        }
    }
    same_state(&raw.state()?, &typed.state()?)
        .map_err(|e| format!("step_raw state differs from step's: {e}"))?;
    let mut null = tensors.clone();
    null[0].param = 0;
    let mut odd = tensors.clone();
    odd[1].grad += 1;
    for (what, bad) in [
        ("null", &null[..]),
        ("misaligned", &odd[..]),
        ("short list", &tensors[..2]),
    ] {
        // SAFETY: refused before any launch (the test checks that it is refused).
        match unsafe { raw.step_raw(bad) } {
            Err(Error::InvalidPointer { .. }) | Err(Error::TensorCountMismatch { .. }) => {}
            other => return Err(format!("{what}: expected a refusal, got {other:?}").into()),
        }
    }
    if raw.step_count()? != 3 {
        return Err("a refused raw step was counted".into());
    }
    // step_some_raw: tensor 1 without a gradient, as step_some skips it.
    let missing: Vec<Option<u64>> = addrs
        .iter()
        .enumerate()
        .map(|(i, &(_, g))| (i != 1).then_some(g))
        .collect();
    let raw_params: Vec<u64> = addrs.iter().map(|&(p, _)| p).collect();
    let some: Vec<Option<_>> = typed_g
        .iter()
        .enumerate()
        .map(|(i, g)| (i != 1).then(|| g.as_view()))
        .collect();
    typed.step_some(&mut typed_p, &some)?;
    // SAFETY: as above.
    unsafe { raw.step_some_raw(&raw_params, &missing)? };
    for (a, b) in typed_p.iter().zip(&raw_p) {
        if bits(&stream.clone_dtoh(a)?) != bits(&stream.clone_dtoh(b)?) {
            return Err("step_some_raw differs from step_some".into());
        }
    }
    same_state(&raw.state()?, &typed.state()?)
        .map_err(|e| format!("step_some_raw state differs from step_some's: {e}"))?;
    let mut odd = missing.clone();
    odd[0] = odd[0].map(|g| g + 1);
    for (what, p, g) in [
        ("misaligned grad", &raw_params[..], &odd[..]),
        ("short grads", &raw_params[..], &missing[..2]),
        ("short params", &raw_params[..2], &missing[..]),
    ] {
        // SAFETY: refused before any launch (the test checks that it is refused).
        match unsafe { raw.step_some_raw(p, g) } {
            Err(Error::InvalidPointer { .. }) | Err(Error::TensorCountMismatch { .. }) => {}
            other => return Err(format!("{what}: expected a refusal, got {other:?}").into()),
        }
    }
    if raw.step_count()? != 4 {
        return Err("a refused step_some_raw was counted".into());
    }
    Ok(())
}

/// A step captured in a CUDA graph and replayed N times gives the same bits as N eager
/// steps, and a learning rate changed between replays takes effect without recapture.
fn graph_replay_equals_eager_steps(stream: &Arc<CudaStream>) -> R {
    let cap = Captured::new(stream)?;
    let s = &cap.s;
    let mut rng = StdRng::seed_from_u64(seed());
    let lens = [4097usize, 100_003, 5];
    let init: Vec<Vec<f32>> = tensors(&mut rng, &lens, 1.0);
    let grads: Vec<Vec<f32>> = tensors(&mut rng, &lens, 0.1);
    let up = |v: &[Vec<f32>]| upload(s, v);
    let (mut pa, ga, mut pb, gb) = (up(&init)?, up(&grads)?, up(&init)?, up(&grads)?);
    let options = adamax_cuda::StepOptions {
        max_norm: Some(0.5),
        ..Default::default()
    };
    let mut eager = CudaAdamax::<f32>::new(s, AdamaxConfig::default(), &pa)?;
    let mut graphed = CudaAdamax::<f32>::new(s, AdamaxConfig::default(), &pb)?;
    for o in [&mut eager, &mut graphed] {
        o.set_options(options)?;
        o.set_loss_scaler(Some(adamax_cuda::LossScaler {
            scale: 8.0,
            growth_interval: 2,
            ..Default::default()
        }))?;
    }
    // One eager step each uploads the tensor tables, then capture one step.
    eager.step(&mut pa, &ga)?;
    graphed.step(&mut pb, &gb)?;
    let graph = cap.capture(|| graphed.step(&mut pb, &gb))?;
    for k in 0..7 {
        if k == 4 {
            eager.set_lr(5e-4)?;
            graphed.set_lr(5e-4)?;
        }
        eager.step(&mut pa, &ga)?;
        graph.launch()?;
    }
    s.synchronize()?;
    same_checkpoint(&graphed.checkpoint()?, &eager.checkpoint()?)
        .map_err(|e| format!("graph replay differs from eager steps: {e}"))?;
    for (a, b) in pa.iter().zip(&pb) {
        if bits(&s.clone_dtoh(a)?) != bits(&s.clone_dtoh(b)?) {
            return Err("graph replay: parameters differ from eager steps".into());
        }
    }
    if graphed.step_count()? != 8 || graphed.last_report()? != eager.last_report()? {
        return Err("graph replay: step count or report differs".into());
    }
    Ok(())
}

/// A capture of one step on its own stream, with cudarc's cross-stream events off (they
/// must not reach into a capture; graphs cannot capture the legacy default stream).
struct Captured {
    s: Arc<CudaStream>,
    ctx: Arc<adamax_cuda::cuda::cudarc::driver::CudaContext>,
}

impl Captured {
    fn new(stream: &Arc<CudaStream>) -> R<Self> {
        let ctx = stream.context().clone();
        let s = ctx.new_stream()?;
        // SAFETY: every buffer of the test is used on `s` only; `Drop` turns tracking on.
        unsafe { ctx.disable_event_tracking() };
        Ok(Self { s, ctx })
    }

    /// `step` run while `s` captures, as a graph.
    fn capture(
        &self,
        step: impl FnOnce() -> adamax_cuda::Result<()>,
    ) -> R<adamax_cuda::cuda::cudarc::driver::CudaGraph> {
        use adamax_cuda::cuda::cudarc::driver::sys::{
            CUgraphInstantiate_flags, CUstreamCaptureMode,
        };
        self.s
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        let stepped = step();
        let graph = self.s.end_capture(
            CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
        )?;
        stepped?;
        Ok(graph.ok_or("empty graph")?)
    }
}

impl Drop for Captured {
    fn drop(&mut self) {
        // SAFETY: restores cudarc's default for the rest of the process; the test's
        // buffers were used on one stream only.
        unsafe { self.ctx.enable_event_tracking() };
    }
}

/// Issue #17, item 1: a step captured with no option set, replayed after clipping, the
/// overflow check, a loss scaler, a parameter group and a new learning rate were turned
/// on, equals eager steps with the same settings bit for bit (and skips the step whose
/// gradient overflows). Before the fix the graph held the update alone, which read a
/// stale clip coefficient and inverse scale.
fn a_graph_captured_before_settings_honours_them_on_replay(stream: &Arc<CudaStream>) -> R {
    let cap = Captured::new(stream)?;
    let s = &cap.s;
    let mut rng = StdRng::seed_from_u64(seed());
    let lens = [4097usize, 100_003, 5];
    let init: Vec<Vec<f32>> = tensors(&mut rng, &lens, 1.0);
    let grads: Vec<Vec<f32>> = tensors(&mut rng, &lens, 0.1);
    let up = |v: &[Vec<f32>]| upload(s, v);
    let (mut pa, mut ga, mut pb, mut gb) = (up(&init)?, up(&grads)?, up(&init)?, up(&grads)?);
    let mut eager = CudaAdamax::<f32>::new(s, AdamaxConfig::default(), &pa)?;
    let mut graphed = CudaAdamax::<f32>::new(s, AdamaxConfig::default(), &pb)?;
    // One eager step each uploads the tensor tables, then one step is captured plain.
    eager.step(&mut pa, &ga)?;
    graphed.step(&mut pb, &gb)?;
    let graph = cap.capture(|| graphed.step(&mut pb, &gb))?;
    let scaler = adamax_cuda::LossScaler {
        scale: 8.0,
        growth_interval: 2,
        ..Default::default()
    };
    let group = adamax_cuda::TensorHyper {
        lr_scale: 0.5,
        weight_decay: 0.01,
    };
    for k in 0..9 {
        for o in [&mut eager, &mut graphed] {
            match k {
                1 => o.set_options(adamax_cuda::StepOptions {
                    max_norm: Some(0.05),
                    skip_nonfinite: true,
                    ..Default::default()
                })?,
                2 => o.set_loss_scaler(Some(scaler))?,
                3 => o.set_tensor_hyper(0, group)?,
                5 => o.set_lr(5e-4)?,
                _ => {}
            }
        }
        // An overflowing gradient in step 6 (the scaler backs off, nothing moves); the
        // graph reads the gradient buffers it was captured with.
        let g2 = if k == 6 { f32::INFINITY } else { grads[2][0] };
        for g in [&mut ga[2], &mut gb[2]] {
            s.memcpy_htod(&[g2], &mut g.slice_mut(0..1))?;
        }
        eager.step(&mut pa, &ga)?;
        graph.launch()?;
        s.synchronize()?;
        let (re, rg) = (eager.last_report()?, graphed.last_report()?);
        if re != rg {
            return Err(format!("replay {k}: report {rg:?}, eager {re:?}").into());
        }
        if (k == 6) != re.skipped || (k >= 1 && k != 6 && re.total_norm.is_none()) {
            return Err(format!("replay {k}: the settings did not act: {re:?}").into());
        }
        same_checkpoint(&graphed.checkpoint()?, &eager.checkpoint()?)
            .map_err(|e| format!("replay {k}: {e}"))?;
        for (a, b) in pa.iter().zip(&pb) {
            if bits(&s.clone_dtoh(a)?) != bits(&s.clone_dtoh(b)?) {
                return Err(format!("replay {k}: parameters differ from eager steps").into());
            }
        }
    }
    if graphed.loss_scaler()? != eager.loss_scaler()? {
        return Err("the scaler differs".into());
    }
    Ok(())
}

/// Issue #17, item 2: a restore keeps every device address a captured graph holds
/// (state, step counts, tensor table), so a replay after it steps the restored state
/// (run under compute-sanitizer memcheck: before the fix it read freed buffers). A
/// restore that changes the configuration the launch carries by value makes the graph
/// stale: its replay changes nothing and reports `StaleGraph`; an eager step still works.
fn a_graph_replayed_after_a_restore_steps_the_restored_state(stream: &Arc<CudaStream>) -> R {
    let cap = Captured::new(stream)?;
    let s = &cap.s;
    let mut rng = StdRng::seed_from_u64(seed());
    let lens = [4097usize, 3, 70_001];
    let init: Vec<Vec<bf16>> = tensors(&mut rng, &lens, 1.0);
    let grads: Vec<Vec<bf16>> = tensors(&mut rng, &lens, 0.1);
    let up = |v: &[Vec<bf16>]| upload(s, v);
    let (mut pa, ga, mut pb, gb) = (up(&init)?, up(&grads)?, up(&init)?, up(&grads)?);
    let config = AdamaxConfig {
        weight_decay: 0.01,
        ..AdamaxConfig::default()
    };
    let mut eager = CudaAdamax::<bf16>::new(s, config, &pa)?;
    let mut graphed = CudaAdamax::<bf16>::new(s, config, &pb)?;
    eager.step(&mut pa, &ga)?;
    graphed.step(&mut pb, &gb)?;
    let at_one = eager.checkpoint()?;
    let graph = cap.capture(|| graphed.step(&mut pb, &gb))?;
    for _ in 0..3 {
        eager.step(&mut pa, &ga)?;
        graph.launch()?;
    }
    // Back to step 1 with other per-tensor settings: the replay uses the restored
    // state, counts and groups.
    let mut ck = at_one.clone();
    ck.hypers[2] = adamax_cuda::TensorHyper {
        lr_scale: 0.25,
        weight_decay: 0.0,
    };
    eager.restore(&ck)?;
    graphed.restore(&ck)?;
    for k in 0..3 {
        eager.step(&mut pa, &ga)?;
        graph.launch()?;
        s.synchronize()?;
        same_checkpoint(&graphed.checkpoint()?, &eager.checkpoint()?)
            .map_err(|e| format!("replay {k} after a restore: {e}"))?;
    }
    // Another beta2: the graph is stale.
    let other = adamax_cuda::Checkpoint {
        config: AdamaxConfig {
            beta2: 0.99,
            ..config
        },
        ..at_one
    };
    graphed.restore(&other)?;
    let before = (graphed.checkpoint()?, bits(&s.clone_dtoh(&pb[0])?));
    graph.launch()?;
    s.synchronize()?;
    match graphed.last_report() {
        Err(Error::StaleGraph) => {}
        other => return Err(format!("a stale replay reported {other:?}").into()),
    }
    same_checkpoint(&graphed.checkpoint()?, &before.0)
        .map_err(|e| format!("a stale replay changed the state: {e}"))?;
    if bits(&s.clone_dtoh(&pb[0])?) != before.1 {
        return Err("a stale replay changed the parameters".into());
    }
    eager.restore(&other)?;
    eager.step(&mut pa, &ga)?;
    graphed.step(&mut pb, &gb)?;
    same_checkpoint(&graphed.checkpoint()?, &eager.checkpoint()?)
        .map_err(|e| format!("an eager step after a stale replay: {e}"))?;
    if graphed.last_report()? != eager.last_report()? {
        return Err("an eager step after a stale replay reports otherwise".into());
    }
    Ok(())
}

/// What cannot be captured is refused with `DuringCapture`, enqueuing nothing: a step
/// whose tensor table is not on the device yet, and host writes (settings, restore).
fn host_copies_during_a_capture_are_refused(stream: &Arc<CudaStream>) -> R {
    let cap = Captured::new(stream)?;
    let s = &cap.s;
    let mut p = s.clone_htod(&[1.0f32; 300])?;
    let g = s.clone_htod(&[0.5f32; 300])?;
    let mut opt = CudaAdamax::<f32>::new(s, AdamaxConfig::default(), &[p.as_view()])?;
    let ck = opt.checkpoint()?;
    let refused = |r: adamax_cuda::Result<()>, what: &str| match r {
        Err(Error::DuringCapture { .. }) => Ok(()),
        other => Err(format!("{what} during a capture: {other:?}")),
    };
    use adamax_cuda::cuda::cudarc::driver::sys::CUstreamCaptureMode;
    s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    let results = [
        refused(
            opt.step(&mut [p.as_view_mut()], &[g.as_view()]),
            "a first step",
        ),
        refused(opt.set_lr(1e-3), "set_lr"),
        refused(opt.restore(&ck), "restore"),
        refused(
            opt.set_loss_scaler(Some(adamax_cuda::LossScaler::default())),
            "set_loss_scaler",
        ),
    ];
    let _ = s.end_capture(adamax_cuda::cuda::cudarc::driver::sys::CUgraphInstantiate_flags(0));
    for r in results {
        r?;
    }
    // Nothing was enqueued or changed: the first step runs eagerly now.
    if opt.step_count()? != 0 || opt.config().lr != AdamaxConfig::default().lr {
        return Err("a refused call changed the optimizer".into());
    }
    opt.step(&mut [p.as_view_mut()], &[g.as_view()])?;
    if opt.step_count()? != 1 {
        return Err("the step after the capture was not taken".into());
    }
    Ok(())
}

/// The device's own guard: a graph captured at step u64::MAX - 1 replays once (step
/// u64::MAX), then changes nothing and reports StepOverflow; an eager step after it is
/// refused on the host.
fn a_full_step_counter_in_a_replayed_graph_changes_nothing(stream: &Arc<CudaStream>) -> R {
    let cap = Captured::new(stream)?;
    let s = &cap.s;
    let mut rng = StdRng::seed_from_u64(seed());
    let lens = [4097usize, 3];
    let init: Vec<Vec<f32>> = tensors(&mut rng, &lens, 1.0);
    let grads: Vec<Vec<f32>> = tensors(&mut rng, &lens, 0.1);
    let (mut params, dg) = (upload(s, &init)?, upload(s, &grads)?);
    let mut opt = CudaAdamax::<f32>::new(s, AdamaxConfig::default(), &params)?;
    let mut ck = opt.checkpoint()?;
    ck.step = u64::MAX - 2;
    opt.restore(&ck)?;
    opt.step(&mut params, &dg)?; // step u64::MAX - 1; uploads the tensor table
    let graph = cap.capture(|| opt.step(&mut params, &dg))?;
    graph.launch()?; // step u64::MAX
    s.synchronize()?;
    let at_max = (
        opt.checkpoint()?,
        params
            .iter()
            .map(|p| s.clone_dtoh(p))
            .collect::<Result<Vec<_>, _>>()?,
    );
    let replayed = graph.launch();
    s.synchronize()?;
    let report = opt.last_report();
    let eager = opt.step(&mut params, &dg);
    let after = (
        opt.checkpoint()?,
        params
            .iter()
            .map(|p| s.clone_dtoh(p))
            .collect::<Result<Vec<_>, _>>()?,
    );
    replayed?;
    if at_max.0.step != u64::MAX {
        return Err(format!(
            "step count {} after the replay, expected u64::MAX",
            at_max.0.step
        )
        .into());
    }
    if !matches!(report, Err(Error::StepOverflow(u64::MAX))) {
        return Err(format!("the replay at the limit reported {report:?}").into());
    }
    if !matches!(eager, Err(Error::StepOverflow(u64::MAX))) {
        return Err(format!("an eager step at the limit gave {eager:?}").into());
    }
    same_checkpoint(&after.0, &at_max.0)?;
    if after.1 != at_max.1 {
        return Err("a step at the limit changed the parameters".into());
    }
    Ok(())
}

fn main() {
    let mut args = Arguments::from_args();
    // Under compute-sanitizer (which loads itself through CUDA_INJECTION64_PATH) the
    // tests run one at a time unless told otherwise: racecheck serialises the GPU work,
    // and 16 test threads made no test finish in 180 s on an H200, where one thread
    // runs about 1.5 s a test (issue #22).
    if args.test_threads.is_none() && sanitized() {
        eprintln!("under compute-sanitizer: one test at a time (--test-threads overrides), at most 5 steps, 2^16-element tensors");
        args.test_threads = Some(1);
    }
    let device = gpu_stream();
    match &device {
        Some(s) => eprintln!(
            "GPU: {} (compute capability {:?})",
            s.context().name().unwrap_or_default(),
            s.context().compute_capability().ok()
        ),
        None => eprintln!("no CUDA device visible: GPU tests are ignored"),
    }
    let ignored = device.is_none();
    let mut trials = Vec::new();
    for (case, cells, what) in matrix() {
        for (ty, mode) in cells.iter() {
            let name = format!("{}_{}_{case}", mode.name(), ty.as_str());
            let run = move || {
                backends::stream()?;
                match ty {
                    StorageType::F32 => what.run::<f32>(mode),
                    StorageType::F16 => what.run::<f16>(mode),
                    StorageType::Bf16 => what.run::<bf16>(mode),
                }
            };
            trials.push(Trial::test(name, run).with_ignored_flag(ignored));
        }
    }
    let gpu_only: [(&str, GpuOnly); 6] = [
        (
            "graph_replay_equals_eager_steps_and_follows_set_lr",
            graph_replay_equals_eager_steps,
        ),
        (
            "a_graph_captured_before_settings_honours_them_on_replay",
            a_graph_captured_before_settings_honours_them_on_replay,
        ),
        (
            "a_graph_replayed_after_a_restore_steps_the_restored_state",
            a_graph_replayed_after_a_restore_steps_the_restored_state,
        ),
        (
            "a_full_step_counter_in_a_replayed_graph_changes_nothing",
            a_full_step_counter_in_a_replayed_graph_changes_nothing,
        ),
        (
            "host_copies_during_a_capture_are_refused",
            host_copies_during_a_capture_are_refused,
        ),
        (
            "raw_entry_points_match_the_typed_ones_and_refuse_bad_addresses",
            raw_entry_points_match_and_refuse_bad_addresses,
        ),
    ];
    for (name, f) in gpu_only {
        trials.push(Trial::test(name, move || f(&backends::stream()?)).with_ignored_flag(ignored));
    }
    // Needs about 35 GB free: ignored on smaller GPUs rather than failing.
    let big_enough = device
        .as_ref()
        .and_then(|s| s.context().mem_get_info().ok())
        .is_some_and(|(free, _)| free > 40 << 30);
    if !big_enough {
        eprintln!("tensor_over_2_pow_31_elements: needs > 40 GiB free device memory, ignored");
    }
    trials.push(
        Trial::test(
            "tensor_over_2_pow_31_elements_uses_64_bit_indices_f16",
            move || over_2_pow_31_elements::<f16>(&backends::stream()?),
        )
        .with_ignored_flag(!big_enough),
    );
    libtest_mimic::run(&args, trials).exit();
}
