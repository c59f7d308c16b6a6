//! `kernels/adamax.cu` compiled for the host with the system's C++ compiler, against
//! its spec in `src/spec/lowbit/` and `src/spec/mod.rs`. A check of CUDA code that
//! needs no GPU: the arithmetic is plain integer and IEEE f32/f64, which x86-64 (SSE, no
//! contraction) computes as the GPU does, and the intrinsics get host definitions with
//! the same rounding.
//!
//! The harness is C++ of its own (`tests/kernel_host/`): `host.hpp` defines what the
//! kernel takes from CUDA, `main.cpp` includes it, then the unchanged kernel file (whose
//! only hooks are `#ifdef ADAMAX_HOST_EMULATION` around its f16 PTX and offsetof), and
//! reads commands. It is built with the `-D` defines adamax-cuda gives NVRTC, so the
//! layout's static_asserts and the entry points from `src/cuda/entry.rs` are the real
//! ones, and with `-fsanitize=alignment`, so a misaligned vector access aborts it.
//!
//! - The helpers (the random stream, stochastic rounding to bf16, the 8-bit codes and
//!   block scales) on edge cases and random inputs.
//! - The traversal of each state format for one tensor: a whole 8-bit block
//!   (`step_q8_block`) on a warp of 32 host threads whose shuffles meet at a barrier,
//!   and the f32-state vector and element steps (`step_f32_vector`, `step_f32_element`),
//!   for f32, f16 and bf16 with masters or stochastic rounding, whole and partial blocks,
//!   vector and element paths, three configurations; parameters, masters, codes and
//!   scales compared bit for bit with `cpu::step_tensor`.
//! - The whole update kernel over a list of tensors, through its entry points, launched
//!   block by block as blocks of host threads, 256 or, for the 8-bit updates, 128 as on
//!   the GPU (barriers for `__syncthreads`, warps
//!   for the shuffles, `std::atomic_ref` for the atomics): several steps with a tensor
//!   missing its gradient in some, a parameter group, one block walking 8,192-element
//!   units and three walking 1,024-element ones, in every mode, and with clipping, a
//!   loss scaler and an overflow (the reduction and the decision pass before the
//!   update), as a captured graph replays, stale, and with misaligned moments;
//!   parameters, state, every step count and the loss scale compared bit for bit with
//!   `CpuAdamax::step_some`. A deadlock among the emulated threads fails the test.
//!
//! What it cannot reach (real device memory and the GPU's own scheduling, the host side
//! of `CudaAdamax`) the GPU tests check.
//! Without a C++ compiler the tests are reported as ignored, unless `CI` is set: then
//! they fail.

use std::process::{Command, Stdio};

use adamax_cuda::spec::lowbit::{self, Code, EXP_AVG_CODE, EXP_INF_CODE};
use libtest_mimic::{Arguments, Failed, Trial};
use rand::{rngs::StdRng, Rng, SeedableRng};

#[path = "common/encoder_cases.rs"]
mod encoder_cases;

/// A storage value as the harness reads and prints it: the f32 bits, or the 16 bits.
fn storage_bits<T: adamax_cuda::Storage>(x: &T) -> u64 {
    match T::TYPE {
        adamax_cuda::StorageType::F16 => u64::from(half::f16::from_f32(x.to_f32()).to_bits()),
        adamax_cuda::StorageType::Bf16 => u64::from(x.to_f32().to_bits() >> 16),
        adamax_cuda::StorageType::F32 => u64::from(x.to_f32().to_bits()),
    }
}

/// The harness's number for a storage type and its mode bits (1: stochastic rounding,
/// 2: 8-bit state).
fn case_kind<T: adamax_cuda::Storage>(precision: &adamax_cuda::Precision) -> (u64, u64) {
    let type_id = match T::TYPE {
        adamax_cuda::StorageType::F32 => 0,
        adamax_cuda::StorageType::Bf16 => 1,
        adamax_cuda::StorageType::F16 => 2,
    };
    let sr = u64::from(precision.params == adamax_cuda::ParamMode::Stochastic);
    let q8 = u64::from(precision.state == adamax_cuda::StateFormat::Blockwise8);
    (type_id, sr | q8 << 1)
}

/// One tensor's state in the harness's print order: master, then the moments (f32
/// bits, or codes and scale bits).
fn state_bits(out: &mut Vec<u64>, state: &adamax_cuda::TensorState, q8: bool) {
    let f32_bits = |v: &[f32]| v.iter().map(|x| u64::from(x.to_bits())).collect::<Vec<_>>();
    out.extend(f32_bits(&state.master));
    if q8 {
        for m in [&state.exp_avg_q8, &state.exp_inf_q8] {
            out.extend(m.codes.iter().map(|&c| u64::from(c)));
            out.extend(f32_bits(&m.scales));
        }
    } else {
        out.extend(f32_bits(&state.exp_avg));
        out.extend(f32_bits(&state.exp_inf));
    }
}

/// A run's parameters, its CPU reference, each tensor's placement in the whole list
/// (stream tensor, first element, first partial sum) and the whole list's partial sums.
type Run<T> = (
    Vec<Vec<T>>,
    adamax_cuda::cpu::CpuAdamax<T>,
    Vec<[u64; 3]>,
    usize,
);

/// How the emulated steps are launched.
#[derive(Clone, Copy, Debug)]
struct Launch {
    /// As a captured CUDA graph replays them: the reduction and the decision pass are
    /// enqueued in every step, whatever the flags.
    captured: bool,
    /// The step from which the fused options and the loss scaler are on (set after a
    /// capture, for a captured launch).
    fused_from: usize,
    /// The launch carries by-value arguments of an older generation (a graph captured
    /// before a restore that changed them): nothing may change.
    stale: bool,
    /// The moments start one element (one code) off a 16-byte boundary.
    misaligned_state: bool,
}

const EAGER: Launch = Launch {
    captured: false,
    fused_from: 0,
    stale: false,
    misaligned_state: false,
};

/// `StepState::skipped` of a stale launch (src/cuda/args.rs).
const SKIP_STALE_GRAPH: u64 = 3;

/// Several steps of a list of tensors (some without a gradient in some steps) in one
/// storage type and mode, from fresh state, on the emulated kernel and with
/// `CpuAdamax::step_some`: the input for the harness and the reference's output. With
/// `shard: Some((world, rank))`, the tensors of `whole` are cut as `ShardLayout` cuts
/// them and the run is rank `rank`'s pieces (their random stream, elements and partial
/// sums placed in the whole list), against `CpuAdamax::for_shard` (which sees only its
/// own partial sums, as the emulated kernel does without an exchange).
#[allow(clippy::too_many_arguments)]
fn whole_step_run<T: adamax_cuda::Storage>(
    rng: &mut StdRng,
    config: adamax_cuda::AdamaxConfig,
    whole: &[usize],
    steps: usize,
    (grid, unit_len): (u32, u64),
    fused: Option<(adamax_cuda::StepOptions, adamax_cuda::LossScaler)>,
    launch: Launch,
    shard: Option<(usize, usize)>,
) -> Result<(Vec<u64>, Vec<u64>), Failed> {
    use adamax_cuda::{
        cpu::CpuAdamax, shard::ShardLayout, EpsilonMode, Optimizer, StateFormat, WeightDecayMode,
    };
    const CHUNK: usize = adamax_cuda::fused::CHUNK;
    let precision = config.precision;
    let (type_id, mode) = case_kind::<T>(&precision);
    let value = |rng: &mut StdRng, scale: f32| {
        rng.random_range(-1.0..1.0f32) * scale * 10f32.powf(rng.random_range(-3.0..0.0))
    };
    let first_chunk =
        |lens: &[usize], i: usize| -> usize { lens[..i].iter().map(|n| n.div_ceil(CHUNK)).sum() };
    // Each tensor's (stream tensor, first element, first partial sum), and the partial
    // sums of the whole list.
    let (mut params, mut cpu, placements, num_partials): Run<T> = match shard {
        None => {
            let params: Vec<Vec<T>> = whole
                .iter()
                .map(|&n| (0..n).map(|_| T::from_f32(value(rng, 1.0))).collect())
                .collect();
            let refs: Vec<&[T]> = params.iter().map(|p| p.as_slice()).collect();
            let cpu = CpuAdamax::new(config, &refs)?;
            let placements = (0..whole.len())
                .map(|i| [i as u64, 0, first_chunk(whole, i) as u64])
                .collect();
            (params, cpu, placements, first_chunk(whole, whole.len()))
        }
        Some((world, rank)) => {
            let layout = ShardLayout::new(whole, world)?;
            let flat: Vec<T> = (0..layout.total())
                .map(|_| T::from_f32(value(rng, 1.0)))
                .collect();
            let pieces = layout.pieces(rank);
            let params = pieces
                .iter()
                .map(|p| {
                    let o = layout.offsets()[p.tensor];
                    flat[o + p.begin..o + p.end].to_vec()
                })
                .collect();
            let cpu = CpuAdamax::for_shard(config, &layout, rank, &flat)?;
            let placements = pieces
                .iter()
                .map(|p| {
                    let chunk = first_chunk(whole, p.tensor) + p.begin / CHUNK;
                    [p.tensor as u64, p.begin as u64, chunk as u64]
                })
                .collect();
            (params, cpu, placements, first_chunk(whole, whole.len()))
        }
    };
    let lens: Vec<usize> = params.iter().map(Vec::len).collect();
    // A parameter group with its own learning rate and no decay.
    let group = adamax_cuda::TensorHyper {
        lr_scale: 0.5,
        weight_decay: 0.0,
    };
    cpu.set_tensor_hyper(lens.len() - 1, group)?;
    // With a size threshold, the small tensors keep f32 state in the same launch, and
    // one of them is put in 8 bits by hand.
    if precision.state == StateFormat::Blockwise8 && precision.min_8bit_len > 0 {
        cpu.set_tensor_state_format(lens.len() - 2, StateFormat::Blockwise8)?;
    }
    let formats = cpu.tensor_state_formats().to_vec();
    // The fused passes as CudaAdamax sets them (src/cuda/optimizer.rs, params_with):
    // unscale (1), clip (2), check (4), scaler (8).
    let (flags, max_norm, scaler) = match fused {
        Some((options, scaler)) => {
            let clip = options.max_norm.map_or(0, |_| 2);
            (1 | clip | 4 | 8, options.max_norm.unwrap_or(0.0), scaler)
        }
        None => (0, 0.0, adamax_cuda::LossScaler::default()),
    };
    let s = adamax_cuda::spec::StepScalars::new(&config, 1);
    let mut input = vec![
        type_id,
        mode,
        lens.len() as u64,
        steps as u64,
        u64::from(grid),
        unit_len,
        num_partials as u64,
    ];
    input.extend([config.lr.to_bits(), config.beta1.to_bits(), precision.seed]);
    input.extend([s.beta1, s.one_minus_beta1, s.beta2, s.eps].map(|x| u64::from(x.to_bits())));
    input.extend([
        u64::from(config.eps_mode == EpsilonMode::Denominator),
        u64::from(config.weight_decay_mode == WeightDecayMode::Decoupled),
        u64::from(config.maximize),
    ]);
    input.extend([
        flags,
        u64::from(max_norm.to_bits()),
        scaler.growth_factor.to_bits(),
        scaler.backoff_factor.to_bits(),
        u64::from(scaler.growth_interval),
        u64::from(scaler.scale.to_bits()),
        u64::from(scaler.min_scale.to_bits()),
        u64::from(launch.captured),
        launch.fused_from as u64,
        u64::from(launch.stale),
        u64::from(launch.misaligned_state),
    ]);
    for (i, p) in params.iter().enumerate() {
        let h = cpu.tensor_hypers()[i];
        input.extend([
            p.len() as u64,
            h.lr_scale.to_bits(),
            h.weight_decay.to_bits(),
            u64::from(formats[i] == StateFormat::Blockwise8),
        ]);
        input.extend(placements[i]);
        input.extend(p.iter().map(storage_bits));
    }
    for step in 0..steps {
        if let (Some((options, scaler)), true) = (fused, step == launch.fused_from) {
            cpu.set_options(options)?;
            cpu.set_loss_scaler(Some(scaler))?;
        }
        let grads: Vec<Option<Vec<T>>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                // Tensor 1 has no gradient in odd steps.
                (i != 1 || step % 2 == 0).then(|| {
                    // Scaled by the loss scale of this step; an overflow two steps
                    // after the fused passes are on.
                    let scale = cpu.loss_scaler().ok().flatten().map_or(1.0, |s| s.scale);
                    let mut g: Vec<T> = (0..n)
                        .map(|_| T::from_f32(value(rng, 0.1) * scale))
                        .collect();
                    if fused.is_some() && step == launch.fused_from + 2 && i == 0 {
                        g[7] = T::from_f32(f32::INFINITY);
                    }
                    g
                })
            })
            .collect();
        for g in &grads {
            match g {
                Some(g) => {
                    input.push(1);
                    input.extend(g.iter().map(storage_bits));
                }
                None => input.push(0),
            }
        }
        if !launch.stale {
            let mut p: Vec<&mut [T]> = params.iter_mut().map(|x| x.as_mut_slice()).collect();
            let g: Vec<Option<&[T]>> = grads.iter().map(|g| g.as_deref()).collect();
            // A shard's reference decides with its own partial sums alone, as the
            // emulated rank does without an exchange.
            cpu.step_exchanged(&mut p, &g, &mut |_, _| Ok(()))?;
        }
    }
    let mut expected = Vec::new();
    for ((p, t), f) in params.iter().zip(cpu.tensor_states()).zip(&formats) {
        expected.extend(p.iter().map(storage_bits));
        state_bits(&mut expected, t, *f == StateFormat::Blockwise8);
        expected.push(t.step);
    }
    expected.push(cpu.step_count()?);
    let s = cpu.loss_scaler()?.unwrap_or(scaler);
    let skipped = if launch.stale {
        SKIP_STALE_GRAPH
    } else {
        u64::from(cpu.last_report()?.skipped)
    };
    expected.extend([
        u64::from(s.scale.to_bits()),
        u64::from(s.growth_tracker),
        skipped,
    ]);
    // The partial sums the last step's reduction wrote: each tensor's chunks at its
    // placement, when the reduction ran (the fused passes on, not stale) and the tensor
    // had a gradient (random, so its sums are not zero).
    let last = steps - 1;
    let reduced = fused.is_some() && !launch.stale && last >= launch.fused_from;
    let mut written = vec![0u64; num_partials];
    for (i, (&n, at)) in lens.iter().zip(&placements).enumerate() {
        if reduced && (i != 1 || last.is_multiple_of(2)) {
            for c in 0..n.div_ceil(CHUNK) {
                written[at[2] as usize + c] = 1;
            }
        }
    }
    expected.extend(written);
    Ok((input, expected))
}

fn whole_steps_match_the_cpu(cxx: &str) -> Result<(), Failed> {
    use adamax_cuda::{
        bf16, f16, AdamaxConfig, LossScaler, ParamMode as P, Precision, StateFormat as S,
        StepOptions, WeightDecayMode,
    };
    let mut rng = StdRng::seed_from_u64(0x57E9);
    let lens = [3000usize, 700, 0, 5, 1300];
    let config = |params, state, min_8bit_len| AdamaxConfig {
        weight_decay: 0.05,
        weight_decay_mode: WeightDecayMode::Decoupled,
        lr: 1e-2,
        precision: Precision {
            params,
            state,
            seed: 0xA11CE,
            min_8bit_len,
        },
        ..AdamaxConfig::default()
    };
    // Clipping, a loss scaler that grows and backs off, the overflow skip.
    let fused = Some((
        StepOptions {
            max_norm: Some(0.5),
            ..Default::default()
        },
        LossScaler {
            scale: 1024.0,
            growth_interval: 2,
            ..Default::default()
        },
    ));
    // One block walking 8,192-element units (more 8-bit blocks than warps), and three
    // blocks walking 1,024-element units (the grid stride); then the fused passes.
    // Then as a captured graph replays (issue #17, items 1 and 2): the passes in every
    // step, with no flags, with the flags turned on after two steps, and a stale launch.
    let captured = |fused_from, stale| Launch {
        captured: true,
        fused_from,
        stale,
        ..EAGER
    };
    let shapes = [
        ((1u32, 8192u64), 4, None, EAGER),
        ((3, 1024), 4, None, EAGER),
        ((3, 1024), 6, fused, EAGER),
        ((3, 1024), 3, None, captured(0, false)),
        ((3, 1024), 7, fused, captured(2, false)),
        ((3, 1024), 3, fused, captured(0, true)),
        (
            (1, 8192),
            2,
            None,
            Launch {
                stale: true,
                ..EAGER
            },
        ),
        // Issue #17, item 3: the low-byte paths checked the alignment of the parameters
        // only, then read misaligned moments with vector accesses.
        (
            (3, 1024),
            2,
            None,
            Launch {
                misaligned_state: true,
                ..EAGER
            },
        ),
    ];
    let mut runs = Vec::new();
    for (grid, steps, fused, launch) in shapes {
        macro_rules! add {
            ($what:literal, $t:ty, $params:expr, $state:expr) => {
                add!($what, $t, $params, $state, 0)
            };
            ($what:literal, $t:ty, $params:expr, $state:expr, $min_8bit_len:expr) => {
                runs.push((
                    format!("{} {grid:?} fused {} {launch:?}", $what, fused.is_some()),
                    whole_step_run::<$t>(
                        &mut rng,
                        config($params, $state, $min_8bit_len),
                        &lens,
                        steps,
                        grid,
                        fused,
                        launch,
                        None,
                    )?,
                ))
            };
        }
        add!("f32", f32, P::Master, S::F32);
        add!("f32 q8", f32, P::Master, S::Blockwise8);
        add!("bf16", bf16, P::Master, S::F32);
        add!("bf16 sr", bf16, P::Stochastic, S::F32);
        add!("bf16 q8", bf16, P::Master, S::Blockwise8);
        add!("bf16 sr q8", bf16, P::Stochastic, S::Blockwise8);
        add!("f16", f16, P::Master, S::F32);
        add!("f16 q8", f16, P::Master, S::Blockwise8);
        // Per-tensor state (issue #19, part 4): tensors of 700, 0 and 1300 elements
        // below the threshold keep f32 state, the one of 5 is put in 8 bits by hand.
        add!("f32 q8 mixed", f32, P::Master, S::Blockwise8, 1500);
        add!("bf16 q8 mixed", bf16, P::Master, S::Blockwise8, 1500);
        add!("bf16 sr q8 mixed", bf16, P::Stochastic, S::Blockwise8, 1500);
        add!("f16 q8 mixed", f16, P::Master, S::Blockwise8, 1500);
    }
    // Issue #20: a rank's pieces of a sharded list (a tensor cut at a chunk, so pieces
    // whose random stream starts mid-tensor and whose partial sums go mid-list), with
    // the fused passes, against CpuAdamax::for_shard.
    let whole = [9000, 700, 0, 20_000, 3000];
    for (world, rank) in [(2usize, 1usize), (3, 2)] {
        let layout = adamax_cuda::shard::ShardLayout::new(&whole, world)?;
        // The case needs a piece cut mid-tensor, and pieces whose index in the rank
        // differs from their tensor's in the list.
        let pieces = layout.pieces(rank);
        if !pieces.iter().any(|p| p.begin > 0)
            || pieces.iter().enumerate().all(|(i, p)| i == p.tensor)
        {
            return Err(format!("world {world} rank {rank}: {pieces:?} test nothing").into());
        }
        macro_rules! add_shard {
            ($what:literal, $t:ty, $params:expr, $state:expr) => {
                runs.push((
                    format!("{} world {world} rank {rank}", $what),
                    whole_step_run::<$t>(
                        &mut rng,
                        config($params, $state, 0),
                        &whole,
                        5,
                        (3, 1024),
                        fused,
                        EAGER,
                        Some((world, rank)),
                    )?,
                ))
            };
        }
        add_shard!("f32 shard", f32, P::Master, S::F32);
        add_shard!("bf16 sr shard", bf16, P::Stochastic, S::F32);
        add_shard!("f16 shard", f16, P::Master, S::F32);
        add_shard!("f32 q8 shard", f32, P::Master, S::Blockwise8);
        add_shard!("bf16 sr q8 shard", bf16, P::Stochastic, S::Blockwise8);
        add_shard!("bf16 q8 shard", bf16, P::Master, S::Blockwise8);
    }
    for (what, (input, expected)) in &runs {
        let text: Vec<String> = input.iter().map(u64::to_string).collect();
        let got = run(cxx, "whole", &text.join(" "))?;
        if let Some(i) = got.iter().zip(expected).position(|(a, b)| a != b) {
            return Err(format!(
                "{what}: value {i} is {} on the kernel, {} on the CPU",
                got[i], expected[i]
            )
            .into());
        }
        if got.len() != expected.len() {
            return Err(format!(
                "{what}: {} values from the kernel, {} expected",
                got.len(),
                expected.len()
            )
            .into());
        }
    }
    eprintln!(
        "{} multi-step runs of the whole update kernel equal CpuAdamax",
        runs.len()
    );
    Ok(())
}

fn compiler() -> Option<String> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_owned());
    Command::new(&cxx)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| cxx)
}

/// How long one harness run may take (the largest takes about a second).
const HARNESS_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// The harness: `tests/kernel_host/main.cpp`, which includes `host.hpp` and then
/// `kernels/adamax.cu` itself, built in a temporary directory with the `-D` defines that
/// adamax-cuda gives NVRTC (the layout, its static_asserts, the entry points).
struct Harness {
    dir: std::path::PathBuf,
    exe: std::path::PathBuf,
}

impl Harness {
    fn build(cxx: &str) -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!("adamax-kernel-host-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        // The harness and the kernel the crate embeds (what NVRTC compiles), written out
        // so that the test binary needs no source tree (a GPU machine runs binaries).
        for (name, text) in [
            ("host.hpp", include_str!("kernel_host/host.hpp")),
            ("main.cpp", include_str!("kernel_host/main.cpp")),
            ("adamax.cu", adamax_cuda::cuda::compile::SOURCE),
        ] {
            std::fs::write(dir.join(name), text).map_err(|e| e.to_string())?;
        }
        let exe = dir.join("harness");
        let defines = adamax_cuda::cuda::compile::options("sm_75")
            .into_iter()
            .filter(|o| o.starts_with("-D"));
        let built = Command::new(cxx)
            .args([
                "-std=c++20",
                "-O2",
                "-ffp-contract=off",
                "-fno-fast-math",
                "-pthread",
                // Every vector access must be aligned as on the GPU (a misaligned one
                // aborts the harness).
                "-fsanitize=alignment",
                "-fno-sanitize-recover=alignment",
            ])
            .args(defines)
            .arg("-o")
            .arg(&exe)
            .arg(dir.join("main.cpp"))
            .output()
            .map_err(|e| e.to_string())?;
        if !built.status.success() {
            return Err(format!(
                "the kernel does not compile for the host:\n{}",
                String::from_utf8_lossy(&built.stderr)
            ));
        }
        Ok(Self { dir, exe })
    }

    /// Feeds `commands` to the harness; returns its output numbers (whitespace-separated).
    fn run(&self, commands: &str) -> Result<Vec<u64>, Failed> {
        // From a file: a pipe would fill both ways and deadlock. Files of their own, as
        // the checks run at the same time.
        static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let input = self.dir.join(format!("commands-{n}.txt"));
        std::fs::write(&input, commands)?;
        let output = self.dir.join(format!("output-{n}.txt"));
        let mut child = Command::new(&self.exe)
            .stdin(Stdio::from(std::fs::File::open(&input)?))
            .stdout(Stdio::from(std::fs::File::create(&output)?))
            .stderr(Stdio::piped())
            .spawn()?;
        // A barrier that some emulated threads never reach hangs the harness: a
        // deadlock in the kernel's synchronisation, reported as such.
        let start = std::time::Instant::now();
        while child.try_wait()?.is_none() {
            if start.elapsed() > HARNESS_LIMIT {
                let _ = child.kill();
                return Err(format!(
                    "the harness did not finish in {HARNESS_LIMIT:?}: its threads deadlocked (a barrier or shuffle that some threads of a block never reach)"
                )
                .into());
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let mut out = child.wait_with_output()?;
        out.stdout = std::fs::read(&output)?;
        if !out.status.success() {
            return Err(format!(
                "the harness failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        String::from_utf8(out.stdout)?
            .split_whitespace()
            .map(|l| l.parse::<u64>().map_err(|e| format!("`{l}`: {e}").into()))
            .collect()
    }
}

/// The harness, built once for all checks by the first that needs it.
static HARNESS: std::sync::OnceLock<Result<Harness, String>> = std::sync::OnceLock::new();

/// Runs `commands` for `check` (helpers, traversal, whole) on the harness.
fn run(cxx: &str, check: &str, commands: &str) -> Result<Vec<u64>, Failed> {
    let harness = HARNESS
        .get_or_init(|| Harness::build(cxx))
        .as_ref()
        .map_err(|e| Failed::from(e.clone()))?;
    harness.run(&format!("{check}\n{commands}"))
}

/// f32 values that exercise every path: zeros, subnormals, the codes' boundaries,
/// exact codes, values near 1, the largest finite values, infinities and NaNs.
fn interesting(rng: &mut StdRng) -> Vec<f32> {
    let mut v = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        0.5,
        f32::MIN_POSITIVE,
        1e-40,
        -1e-45,
        f32::MAX,
        -f32::MAX,
        3.389e38,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::from_bits(0x7FFF_FFFF),
        f32::from_bits(0xFFC0_0001),
        1.0f32.next_down(),
        2f32.powi(-14),
        2f32.powi(-14).next_down(),
        2f32.powi(-17),
        2f32.powi(-18),
        2f32.powi(-19),
    ];
    for code in [EXP_AVG_CODE, EXP_INF_CODE] {
        for c in 0..=code.max_magnitude_code() {
            let x = code.decode_magnitude(c);
            v.extend([x, x.next_up(), x.next_down().max(0.0)]);
        }
    }
    for _ in 0..3000 {
        let x: f32 = rng.random_range(-1.0..1.0) * 10f32.powf(rng.random_range(-12.0..1.0));
        v.push(x);
    }
    v
}

fn helpers_match_the_spec(cxx: &str) -> Result<(), Failed> {
    let mut rng = StdRng::seed_from_u64(0xC0DE5);
    let mut commands = String::new();
    let mut expected: Vec<(String, u64)> = Vec::new();
    let mut add = |cmd: String, want: u64| {
        commands.push_str(&cmd);
        commands.push('\n');
        expected.push((cmd, want));
    };
    for _ in 0..2000 {
        let (a, b, c): (u64, u64, u64) = (rng.random(), rng.random(), rng.random());
        add(format!("mix {a}"), lowbit::mix64(a));
        add(format!("key {a} {b} {c}"), lowbit::stream_key(a, b, c));
        add(format!("bits {a} {b}"), lowbit::element_bits(a, b));
    }
    let values = interesting(&mut rng);
    for &x in &values {
        for r in [
            0u32,
            1,
            0x7FFF,
            0x8000,
            0xFFFF,
            rng.random::<u32>() & 0xFFFF,
        ] {
            let want = lowbit::round_bf16_stochastic(x, r).to_bits();
            add(format!("sr {} {r}", x.to_bits()), u64::from(want));
        }
    }
    // Encoding takes a value of magnitude at most the block's scale (its largest), so
    // each value is encoded against scales at and above its magnitude.
    let finite: Vec<f32> = values.iter().copied().filter(|x| x.is_finite()).collect();
    for &x in &finite {
        let a = x.abs();
        if a == 0.0 {
            continue;
        }
        for scale in [a, a * 1.5, a * 1000.0, 1.0f32.max(a)] {
            // Blocks whose largest magnitude is below f32's normals are stored as 0.
            if !scale.is_finite() || scale < f32::MIN_POSITIVE {
                continue;
            }
            for r in [0u32, 0x8000, 0xFFFF, rng.random::<u32>() & 0xFFFF] {
                let (xb, sb) = (x.to_bits(), scale.to_bits());
                add(
                    format!("eavg {xb} {sb} {r}"),
                    u64::from(EXP_AVG_CODE.encode(x, scale, r)),
                );
                add(
                    format!("einf {} {sb} {r}", a.to_bits()),
                    u64::from(EXP_INF_CODE.encode(a, scale, r)),
                );
            }
        }
    }
    // The encoder's t = rz(a * inv + 2^-15) where rounding the sum to nearest in f64
    // lands on an f32 above the exact sum (tests/lowbit.rs checks t itself), t ending in
    // s ones where the sum to nearest ends in s zeros after a carry. s is the bits below
    // a code's 16 random bits (3 for u, 4 for the ratio), so r = 0xFFFF rounds the two
    // to different codes, and the emulation's __fmaf_rz must step back there as the
    // GPU's FFMA.RZ does.
    for (s, code) in [(3, EXP_INF_CODE), (4, EXP_AVG_CODE)] {
        let cases: Vec<(f32, f32)> = encoder_cases::near_an_f32_above(code, s).take(8).collect();
        if cases.len() < 8 {
            return Err(format!("only {} encoder cases near an f32 boundary", cases.len()).into());
        }
        for (a, scale) in cases {
            for r in [0u32, 0x8000, 0xFFFF] {
                let sb = scale.to_bits();
                if code == EXP_INF_CODE {
                    add(
                        format!("einf {} {sb} {r}", a.to_bits()),
                        u64::from(code.encode(a, scale, r)),
                    );
                } else {
                    add(
                        format!("eavg {} {sb} {r}", (-a).to_bits()),
                        u64::from(code.encode(-a, scale, r)),
                    );
                }
            }
        }
    }
    for code in 0..=255u8 {
        for scale in [0.0f32, 1.0, 3.7e-3, 1e30, f32::NAN, 2e-40] {
            let sb = scale.to_bits();
            if EXP_AVG_CODE.is_valid(code) {
                let want = EXP_AVG_CODE.decode(code, scale).to_bits();
                add(format!("davg {code} {sb}"), u64::from(want));
            }
            if EXP_INF_CODE.is_valid(code) {
                let want = EXP_INF_CODE.decode(code, scale).to_bits();
                add(format!("dinf {code} {sb}"), u64::from(want));
            }
        }
    }
    // A ratio block's scale limited by its u block's (the largest denominators near
    // f32's largest value), in both eps modes.
    for &su in values.iter().filter(|x| **x >= 0.0 || x.is_nan()) {
        for scale in [1.0f32, 1.009, 9.0, 1e30, f32::NAN, 0.0] {
            for (eps, mode) in [
                (0.0f32, adamax_cuda::EpsilonMode::InsideMax),
                (1e-8, adamax_cuda::EpsilonMode::InsideMax),
                (1e-8, adamax_cuda::EpsilonMode::Denominator),
                (1e30, adamax_cuda::EpsilonMode::Denominator),
            ] {
                let limit = lowbit::ratio_scale_limit(su, eps, mode);
                let want = if scale > limit { limit } else { scale };
                let c = u64::from(eps.to_bits())
                    | (u64::from(mode == adamax_cuda::EpsilonMode::Denominator) << 32);
                add(
                    format!("limit {} {} {c}", scale.to_bits(), su.to_bits()),
                    u64::from(want.to_bits()),
                );
            }
        }
    }
    for &x in &values {
        // The spec's block scale: 0 and f32 subnormals give 0, a non-finite largest
        // magnitude marks the block NaN (f32::NAN's bits), else it is the scale.
        let a = x.abs();
        let want = Code::block_scale(&[x]);
        add(format!("scale {}", a.to_bits()), u64::from(want.to_bits()));
    }
    let got = run(cxx, "helpers", &commands)?;
    if got.len() != expected.len() {
        return Err(format!("{} results for {} commands", got.len(), expected.len()).into());
    }
    let wrong: Vec<String> = expected
        .iter()
        .zip(&got)
        .filter(|((_, want), got)| want != *got)
        .take(10)
        .map(|((cmd, want), got)| format!("{cmd}: kernel {got}, spec {want}"))
        .collect();
    if !wrong.is_empty() {
        return Err(format!(
            "{} of {} differ, e.g.:\n{}",
            expected
                .iter()
                .zip(&got)
                .filter(|((_, w), g)| w != *g)
                .count(),
            expected.len(),
            wrong.join("\n")
        )
        .into());
    }
    eprintln!("{} kernel helper results equal the spec", expected.len());
    Ok(())
}

/// One traversal case for the harness and the spec's result for it.
struct Case {
    input: Vec<u64>,
    expected: Vec<u64>,
    what: String,
}

/// A tensor of `n` elements of storage `T` in `precision`, with random parameters,
/// gradients (some zero), master and moments (valid codes and scales), stepped once by
/// the spec as tensor 3 at its step 5; the harness gets the same inputs.
fn traversal_case<T: adamax_cuda::Storage>(
    rng: &mut StdRng,
    precision: adamax_cuda::Precision,
    config: adamax_cuda::AdamaxConfig,
    n: usize,
    aligned: bool,
) -> Case {
    use adamax_cuda::{spec::Decay, EpsilonMode, StateFormat, TensorState};
    let config = adamax_cuda::AdamaxConfig {
        precision,
        ..config
    };
    let (tensor, t) = (3usize, 5u64);
    let s = adamax_cuda::spec::StepScalars::new(&config, t);
    let key = lowbit::stream_key(precision.seed, t, tensor as u64);
    // Values spanning 12 orders of magnitude within a block, and zeros (issue #19's
    // adversarial blocks; the codes below are drawn apart, so the ratios and u start
    // anywhere, beyond the bound too).
    let value = |rng: &mut StdRng, scale: f32| {
        if rng.random::<f32>() < 0.05 {
            0.0
        } else {
            rng.random_range(-1.0..1.0f32) * scale * 10f32.powf(rng.random_range(-12.0..0.0))
        }
    };
    let mut param: Vec<T> = (0..n).map(|_| T::from_f32(value(rng, 1.0))).collect();
    let mut grad: Vec<T> = (0..n).map(|_| T::from_f32(value(rng, 0.1))).collect();
    // Past one block, the first is all zero (gradients and 8-bit state: its new ratio
    // scale is 0, and with eps 0 its u scale too, so the block stores codes 0), and past
    // two, the third holds a NaN gradient (its scales are NaN, its codes 0).
    let zero_block = n > lowbit::QBLOCK;
    if zero_block {
        grad[..lowbit::QBLOCK].fill(T::from_f32(0.0));
    }
    if n > 2 * lowbit::QBLOCK {
        grad[2 * lowbit::QBLOCK + 5] = T::from_f32(f32::NAN);
    }
    let mut state = TensorState::with_precision(&param, &precision);
    state.step = t - 1;
    for x in state.master.iter_mut() {
        *x += value(rng, 1e-3);
    }
    let q8 = precision.state == StateFormat::Blockwise8;
    if q8 {
        for c in state.exp_avg_q8.codes.iter_mut() {
            *c = rng.random_range(0..=120u8) | if rng.random() { 0x80 } else { 0 };
        }
        for c in state.exp_inf_q8.codes.iter_mut() {
            *c = rng.random_range(0..=240u8);
        }
        if zero_block {
            state.exp_avg_q8.codes[..lowbit::QBLOCK].fill(0);
            state.exp_inf_q8.codes[..lowbit::QBLOCK].fill(0);
        }
        for sc in state
            .exp_avg_q8
            .scales
            .iter_mut()
            .chain(&mut state.exp_inf_q8.scales)
        {
            *sc = value(rng, 0.1).abs();
        }
    } else {
        for (m, u) in state.exp_avg.iter_mut().zip(state.exp_inf.iter_mut()) {
            (*m, *u) = (value(rng, 0.1), value(rng, 0.1).abs());
        }
        // A -0.0 u, as a file written before the spec took beta2 = -0.0 as +0.0 can
        // hold, against a zero gradient: with eps 0 the rule's maximum ties -0.0 against
        // +0.0 and orders +0.0 above it.
        if let Some(u) = state.exp_inf.get_mut(3) {
            *u = -0.0;
            grad[3] = T::from_f32(0.0);
        }
    }
    let (type_id, mode) = case_kind::<T>(&precision);
    let (decay, decay_mode) = match s.decay {
        Decay::None => (0.0, 0),
        Decay::Coupled { weight_decay } => (weight_decay, 1),
        Decay::Decoupled { lr_wd } => (lr_wd, 2),
    };
    let mut input = vec![type_id, mode, n as u64, key, u64::from(aligned)];
    input.extend(
        [
            s.beta1,
            s.one_minus_beta1,
            s.beta2,
            s.eps,
            s.step_size,
            decay,
        ]
        .map(|x| u64::from(x.to_bits())),
    );
    input.extend([
        u64::from(s.eps_mode == EpsilonMode::Denominator),
        decay_mode,
        u64::from(s.maximize),
    ]);
    let dump = |out: &mut Vec<u64>, param: &[T], state: &TensorState, grad: Option<&[T]>| {
        out.extend(param.iter().map(storage_bits));
        out.extend(grad.into_iter().flatten().map(storage_bits));
        state_bits(out, state, q8);
    };
    dump(&mut input, &param, &state, Some(&grad));
    adamax_cuda::cpu::step_tensor(&s, &precision, tensor, &mut param, &grad, &mut state)
        .unwrap_or_else(|e| panic!("the spec refused a case: {e}"));
    let mut expected = Vec::new();
    dump(&mut expected, &param, &state, None);
    Case {
        input,
        expected,
        what: format!(
            "{} {precision:?} n {n} aligned {aligned} {config:?}",
            T::NAME
        ),
    }
}

fn traversal_matches_the_spec(cxx: &str) -> Result<(), Failed> {
    use adamax_cuda::{
        bf16, f16, AdamaxConfig, EpsilonMode, ParamMode as P, Precision, StateFormat as S,
        WeightDecayMode,
    };
    let mut rng = StdRng::seed_from_u64(0x7A5E);
    let p = |params, state| Precision {
        params,
        state,
        seed: 0x5EED,
        min_8bit_len: 0,
    };
    let configs = [
        AdamaxConfig::default(),
        AdamaxConfig {
            weight_decay: 0.1,
            weight_decay_mode: WeightDecayMode::Decoupled,
            eps_mode: EpsilonMode::Denominator,
            lr: 1e-2,
            ..AdamaxConfig::default()
        },
        AdamaxConfig {
            weight_decay: 0.05,
            maximize: true,
            eps: 0.0,
            ..AdamaxConfig::default()
        },
        // beta2 -0.0 with eps 0 (a review found u = -0.0 there, whose bits the kernel's
        // block maximum took for a NaN): the spec's beta2 is +0.0.
        AdamaxConfig {
            beta2: -0.0,
            eps: 0.0,
            ..AdamaxConfig::default()
        },
    ];
    let mut cases = Vec::new();
    for config in configs {
        for n in [1usize, 7, 8, 256, 300, 1000] {
            for aligned in [true, false] {
                let master = p(P::Master, S::F32);
                cases.push(traversal_case::<f32>(&mut rng, master, config, n, aligned));
                cases.push(traversal_case::<bf16>(&mut rng, master, config, n, aligned));
                cases.push(traversal_case::<f16>(&mut rng, master, config, n, aligned));
                let q8 = p(P::Master, S::Blockwise8);
                cases.push(traversal_case::<f32>(&mut rng, q8, config, n, aligned));
                cases.push(traversal_case::<bf16>(&mut rng, q8, config, n, aligned));
                cases.push(traversal_case::<f16>(&mut rng, q8, config, n, aligned));
                let sr = p(P::Stochastic, S::F32);
                cases.push(traversal_case::<bf16>(&mut rng, sr, config, n, aligned));
                let lean = p(P::Stochastic, S::Blockwise8);
                cases.push(traversal_case::<bf16>(&mut rng, lean, config, n, aligned));
            }
        }
    }
    let mut input = vec![cases.len() as u64];
    for c in &cases {
        input.extend(&c.input);
    }
    let text: Vec<String> = input.iter().map(u64::to_string).collect();
    let got = run(cxx, "traversal", &text.join(" "))?;
    let mut at = 0;
    for c in &cases {
        let mine = got
            .get(at..at + c.expected.len())
            .ok_or_else(|| format!("{}: the harness printed too little", c.what))?;
        if let Some(i) = mine.iter().zip(&c.expected).position(|(a, b)| a != b) {
            return Err(format!(
                "{}: output {i} is {} on the kernel, {} in the spec",
                c.what, mine[i], c.expected[i]
            )
            .into());
        }
        at += c.expected.len();
    }
    eprintln!(
        "{} traversal cases ({at} values) equal the spec",
        cases.len()
    );
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let cxx = compiler();
    let in_ci = std::env::var_os("CI").is_some();
    if cxx.is_none() {
        eprintln!(
            "no C++ compiler (`c++` or $CXX): the host check of the kernel's helpers is ignored"
        );
    }
    let ignored = cxx.is_none() && !in_ci;
    let trial = |name: &str, f: fn(&str) -> Result<(), Failed>| {
        let cxx = cxx.clone();
        Trial::test(name, move || match cxx {
            Some(c) => f(&c),
            None => Err("no C++ compiler".into()),
        })
        .with_ignored_flag(ignored)
    };
    let trials = vec![
        trial(
            "kernel_low_byte_helpers_compiled_for_the_host_match_the_spec",
            helpers_match_the_spec,
        ),
        trial(
            "kernel_8_bit_blocks_and_stochastic_rounding_on_an_emulated_warp_match_the_spec",
            traversal_matches_the_spec,
        ),
        trial(
            "kernel_update_over_tensor_lists_on_emulated_blocks_matches_cpuadamax",
            whole_steps_match_the_cpu,
        ),
    ];
    let conclusion = libtest_mimic::run(&args, trials);
    if let Some(Ok(harness)) = HARNESS.get() {
        let _ = std::fs::remove_dir_all(&harness.dir);
    }
    conclusion.exit();
}
