//! GPU against the CPU reference, bit for bit. Needs an NVIDIA GPU and NVRTC: without a
//! visible GPU every test is reported as ignored (never as passed).
//!
//! Every run uses fresh random data (the seed is printed; set `ADAMAX_TEST_SEED` to
//! replay one) and poisons the 16-bit parameter copies with NaN before each step where
//! a master makes them output only, so a kernel that skips an element cannot pass.

mod common;

use std::sync::Arc;

use adamax_cuda::{
    bf16,
    cpu::CpuAdamax,
    cuda::{self, cudarc::driver::CudaStream, CudaAdamax, GpuStorage},
    f16, AdamaxConfig, EpsilonMode, Error, Optimizer, ParamMode, Precision, StateFormat, Storage,
    TensorState, WeightDecayMode,
};
use libtest_mimic::{Arguments, Failed, Trial};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

type TestResult = Result<(), Failed>;
type GpuTest = Box<dyn FnOnce(&Arc<CudaStream>) -> TestResult + Send>;

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
) -> Result<Vec<cuda::cudarc::driver::CudaSlice<T>>, Failed> {
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

/// Where each tensor's parameter and gradient sit inside larger buffers: a non-zero
/// offset makes them views at odd element offsets, which must take the scalar path.
#[derive(Clone, Copy)]
struct Layout {
    param_offset: usize,
    grad_offset: usize,
}

const PLAIN: Layout = Layout {
    param_offset: 0,
    grad_offset: 0,
};

/// Steps `lens` tensors `steps` times on the GPU and with the CPU reference, from the
/// same random data, and checks the parameters and the whole state bit for bit.
fn gpu_matches_cpu<T: GpuStorage>(
    stream: &Arc<CudaStream>,
    config: AdamaxConfig,
    lens: &[usize],
    steps: usize,
    layout: Layout,
    special_grads: bool,
) -> TestResult {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let ctx = format!("{} {config:?} seed {seed}", T::NAME);
    let has_master = T::HAS_MASTER && config.precision.params == ParamMode::Master;
    let mut host: Vec<Vec<T>> = lens.iter().map(|&n| random(&mut rng, n, 1.0)).collect();
    let mut dev_params = Vec::new();
    for p in &host {
        let mut padded = vec![T::from_f32(7.0); layout.param_offset];
        padded.extend_from_slice(p);
        dev_params.push(stream.clone_htod(&padded)?);
    }
    let init_views: Vec<_> = dev_params
        .iter()
        .map(|b| b.slice(layout.param_offset..))
        .collect();
    let mut gpu =
        CudaAdamax::<T>::new(stream, config, &init_views).map_err(|e| format!("{ctx}: {e}"))?;
    drop(init_views);
    let refs: Vec<&[T]> = host.iter().map(|p| p.as_slice()).collect();
    let mut cpu = CpuAdamax::<T>::new(config, &refs)?;

    for step in 0..steps {
        let mut grads: Vec<Vec<T>> = lens.iter().map(|&n| random(&mut rng, n, 0.1)).collect();
        if special_grads {
            for g in grads.iter_mut().filter(|g| g.len() >= 4) {
                g[0] = T::from_f32(f32::NAN);
                g[1] = T::from_f32(f32::INFINITY);
                g[2] = T::from_f32(f32::NEG_INFINITY);
            }
        }
        let mut dev_grads = Vec::new();
        for g in &grads {
            let mut padded = vec![T::from_f32(-3.0); layout.grad_offset];
            padded.extend_from_slice(g);
            dev_grads.push(stream.clone_htod(&padded)?);
        }
        if has_master {
            // Poison: the 16-bit copy is output only, and every element must be written.
            for p in dev_params.iter_mut() {
                let nan = vec![T::from_f32(f32::NAN); p.len()];
                stream.memcpy_htod(&nan, p)?;
            }
        }
        let grad_views: Vec<_> = dev_grads
            .iter()
            .map(|g| g.slice(layout.grad_offset..))
            .collect();
        let mut param_views: Vec<_> = dev_params
            .iter_mut()
            .map(|b| b.slice_mut(layout.param_offset..))
            .collect();
        gpu.step(&mut param_views, &grad_views)
            .map_err(|e| format!("{ctx}: {e}"))?;
        drop(param_views);
        let grad_refs: Vec<&[T]> = grads.iter().map(|g| g.as_slice()).collect();
        let mut param_refs: Vec<&mut [T]> = host.iter_mut().map(|p| p.as_mut_slice()).collect();
        cpu.step(&mut param_refs, &grad_refs)?;

        if step == 0 || step + 1 == steps {
            let gpu_state = gpu.state()?;
            for (i, (dev, want)) in dev_params.iter().zip(&host).enumerate() {
                let got: Vec<T> = stream.clone_dtoh(dev)?[layout.param_offset..].to_vec();
                let f = |v: &[T]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
                same("param", i, &f(&got), &f(want))
                    .map_err(|e| format!("{ctx} step {}: {e}", step + 1))?;
                let cs = &cpu.tensor_states()[i];
                let gs = &gpu_state[i];
                same_tensor(i, gs, cs).map_err(|e| format!("{ctx} step {}: {e}", step + 1))?;
                if has_master {
                    // The 16-bit copy is exactly the round-to-nearest-even of the master.
                    let rounded: Vec<T> = gs.master.iter().map(|&m| T::from_f32(m)).collect();
                    if bits(&rounded) != bits(&got)
                        && first_difference(&f(&rounded), &f(&got)).is_some()
                    {
                        return Err(
                            format!("{ctx}: 16-bit copy of tensor {i} is not RNE(master)").into(),
                        );
                    }
                }
            }
        }
    }
    if gpu.step_count()? != steps as u64 {
        return Err(format!("{ctx}: step count {}", gpu.step_count()?).into());
    }
    Ok(())
}

const SIZES: [usize; 6] = [0, 1, 3, 4, 4097, (1 << 20) + 3];

/// The default storage modes.
const F32: Precision = Precision {
    params: ParamMode::Master,
    state: StateFormat::F32,
    seed: 0,
};
/// bf16 parameters rounded stochastically, f32 moments.
const SR: Precision = Precision {
    params: ParamMode::Stochastic,
    state: StateFormat::F32,
    seed: 0x5EED,
};
/// f32 masters (or f32 parameters), 8-bit moments.
const Q8: Precision = Precision {
    params: ParamMode::Master,
    state: StateFormat::Blockwise8,
    seed: 0x5EED,
};
/// bf16 parameters rounded stochastically, 8-bit moments.
const SR_Q8: Precision = Precision {
    params: ParamMode::Stochastic,
    state: StateFormat::Blockwise8,
    seed: 0x5EED,
};

/// The low-byte modes against the CPU reference, bit for bit: every mode each storage
/// type has, over sizes with partial 8-bit blocks, odd views, 150 mixed tensors in one
/// launch, NaN and infinite gradients (a NaN poisons its 8-bit block on both sides),
/// fused clipping with a loss scaler, flat buffers, missing gradients and resume.
fn add_low_byte_tests(add: &mut dyn FnMut(String, GpuTest)) {
    let odd = Layout {
        param_offset: 1,
        grad_offset: 3,
    };
    let with = |p: Precision, c: AdamaxConfig| AdamaxConfig { precision: p, ..c };
    for (mode, p) in [("sr", SR), ("q8", Q8), ("sr_q8", SR_Q8)] {
        for (name, config) in configs() {
            let c = with(p, config);
            if p.params == ParamMode::Master {
                add(
                    format!("{mode}_f32_is_bit_identical_to_cpu_{name}"),
                    Box::new(move |s| gpu_matches_cpu::<f32>(s, c, &SIZES, 30, PLAIN, false)),
                );
                add(
                    format!("{mode}_f16_is_bit_identical_to_cpu_{name}"),
                    Box::new(move |s| gpu_matches_cpu::<f16>(s, c, &SIZES, 10, PLAIN, false)),
                );
            }
            add(
                format!("{mode}_bf16_is_bit_identical_to_cpu_{name}"),
                Box::new(move |s| gpu_matches_cpu::<bf16>(s, c, &SIZES, 30, PLAIN, false)),
            );
        }
        let c = with(p, AdamaxConfig::default());
        add(
            format!("{mode}_views_at_odd_offsets_bf16"),
            Box::new(move |s| gpu_matches_cpu::<bf16>(s, c, &SIZES, 10, odd, false)),
        );
        add(
            format!("{mode}_a_list_of_150_mixed_tensors_bf16"),
            Box::new(move |s| {
                gpu_matches_cpu::<bf16>(s, c, &mixed_sizes(150, 3), 10, PLAIN, false)
            }),
        );
        add(
            format!("{mode}_nan_and_inf_gradients_bf16"),
            Box::new(move |s| gpu_matches_cpu::<bf16>(s, c, &SIZES[..5], 5, PLAIN, true)),
        );
        let scaler = Some(adamax_cuda::LossScaler {
            scale: 1024.0,
            growth_interval: 3,
            ..adamax_cuda::LossScaler::default()
        });
        let clip = adamax_cuda::StepOptions {
            max_norm: Some(0.5),
            ..Default::default()
        };
        add(
            format!("{mode}_fused_scaler_and_clipping_bf16_odd_views"),
            Box::new(move |s| fused_matches_the_cpu::<bf16>(s, clip, scaler, odd, p)),
        );
        add(
            format!("{mode}_flat_buffers_packed_bf16"),
            Box::new(move |s| flat_buffers_match_the_cpu::<bf16>(s, false, p)),
        );
        add(
            format!("{mode}_missing_gradients_bf16"),
            Box::new(move |s| missing_gradients_match_the_cpu::<bf16>(s, p)),
        );
        add(
            format!("{mode}_checkpoint_resume_is_bit_exact_bf16"),
            Box::new(move |s| gpu_resume_is_bit_exact::<bf16>(s, p)),
        );
    }
    add(
        "q8_flat_buffers_aligned_f32".into(),
        Box::new(|s| flat_buffers_match_the_cpu::<f32>(s, true, Q8)),
    );
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

fn refused_steps_change_nothing(stream: &Arc<CudaStream>) -> TestResult {
    let p = stream.clone_htod(&[1.0f32, 2.0, 3.0])?;
    let g = stream.clone_htod(&[0.5f32, 0.5, 0.5])?;
    let short = stream.clone_htod(&[0.5f32, 0.5])?;
    let mut params = vec![p];
    let mut opt = CudaAdamax::<f32>::new(stream, AdamaxConfig::default(), &params)?;
    opt.step(&mut params, std::slice::from_ref(&g))?;
    let before = (stream.clone_dtoh(&params[0])?, opt.state()?);
    match opt.step(&mut params, &[short]) {
        Err(Error::LengthMismatch {
            what: "grad",
            tensor: 0,
            expected: 3,
            found: 2,
        }) => {}
        other => return Err(format!("expected LengthMismatch, got {other:?}").into()),
    }
    match opt.step(&mut params, &[g.clone(), g.clone()]) {
        Err(Error::TensorCountMismatch {
            what: "grads",
            expected: 1,
            found: 2,
        }) => {}
        other => return Err(format!("expected TensorCountMismatch, got {other:?}").into()),
    }
    let after = (stream.clone_dtoh(&params[0])?, opt.state()?);
    if before.0 != after.0 || opt.step_count()? != 1 {
        return Err("a refused step changed the parameters or the step count".into());
    }
    same_state(&after.1, &before.1)
        .map_err(|e| format!("a refused step changed the state: {e}"))?;
    let none: [cuda::cudarc::driver::CudaSlice<f32>; 0] = [];
    match CudaAdamax::<f32>::new(stream, AdamaxConfig::default(), &none) {
        Err(Error::EmptyParameterList) => Ok(()),
        other => Err(format!("expected EmptyParameterList, got {:?}", other.err()).into()),
    }
}

/// 64-bit indexing: one 16-bit tensor of 2^31 + 4099 elements (34 GB of device memory
/// with its state), checked against the CPU reference on windows at the start, across
/// element 2^31, and at the end. The CPU reference is elementwise, so stepping a window
/// on its own is exact.
fn over_2_pow_31_elements<T: GpuStorage>(stream: &Arc<CudaStream>) -> TestResult {
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

/// Checkpoint on the GPU, keep stepping; restore into a fresh optimizer and step the
/// same gradients: parameters and state must be identical.
fn gpu_resume_is_bit_exact<T: GpuStorage>(
    stream: &Arc<CudaStream>,
    precision: Precision,
) -> TestResult {
    let mut rng = StdRng::seed_from_u64(seed());
    let lens = [4097usize, 3, 0, 70_001];
    let init: Vec<Vec<T>> = lens.iter().map(|&n| random(&mut rng, n, 1.0)).collect();
    let grads: Vec<Vec<Vec<T>>> = (0..10)
        .map(|_| lens.iter().map(|&n| random(&mut rng, n, 0.1)).collect())
        .collect();
    let config = AdamaxConfig {
        weight_decay: 0.01,
        precision,
        ..AdamaxConfig::default()
    };
    let mut params = upload(stream, &init)?;
    let mut a = CudaAdamax::<T>::new(stream, config, &params)?;
    for g in &grads[..5] {
        a.step(&mut params, &upload(stream, g)?)?;
    }
    let ck = adamax_cuda::Checkpoint::from_bytes(&a.checkpoint()?.to_bytes()?)?;
    let host_at_5: Vec<Vec<T>> = params
        .iter()
        .map(|p| stream.clone_dtoh(p))
        .collect::<Result<_, _>>()?;
    for g in &grads[5..] {
        a.step(&mut params, &upload(stream, g)?)?;
    }
    let mut resumed = upload(stream, &host_at_5)?;
    let fresh = AdamaxConfig {
        precision,
        ..AdamaxConfig::default()
    };
    let mut b = CudaAdamax::<T>::new(stream, fresh, &upload(stream, &init)?)?;
    b.restore(&ck)?;
    for g in &grads[5..] {
        b.step(&mut resumed, &upload(stream, g)?)?;
    }
    same_checkpoint(&a.checkpoint()?, &b.checkpoint()?)
        .map_err(|e| format!("{}: after resume: {e}", T::NAME))?;
    for (x, y) in params.iter().zip(&resumed) {
        if bits(&stream.clone_dtoh(x)?) != bits(&stream.clone_dtoh(y)?) {
            return Err(format!("{}: parameters differ after resume", T::NAME).into());
        }
    }
    Ok(())
}

/// The raw-pointer entry points give the same bits as the typed ones, and refuse null
/// and misaligned addresses and a wrong tensor count without counting a step.
fn raw_entry_points_match_and_refuse_bad_addresses(stream: &Arc<CudaStream>) -> TestResult {
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
    Ok(())
}

/// Parameter groups on the GPU: every third tensor without decay, others at a quarter
/// or three times the learning rate; the CPU reference with the same groups is the
/// expected value, bit for bit.
fn per_tensor_hyperparameters_match_the_cpu(
    stream: &Arc<CudaStream>,
    mode: WeightDecayMode,
) -> TestResult {
    use adamax_cuda::TensorHyper;
    let mut rng = StdRng::seed_from_u64(seed());
    let lens = mixed_sizes(40, 3);
    let config = AdamaxConfig {
        weight_decay: 0.05,
        weight_decay_mode: mode,
        lr: 3e-3,
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
    let mut host: Vec<Vec<f32>> = lens.iter().map(|&n| random(&mut rng, n, 1.0)).collect();
    let mut dev = upload(stream, &host)?;
    let mut gpu = CudaAdamax::<f32>::new(stream, config, &dev)?;
    let refs: Vec<&[f32]> = host.iter().map(|p| p.as_slice()).collect();
    let mut cpu = CpuAdamax::new(config, &refs)?;
    for i in 0..lens.len() {
        gpu.set_tensor_hyper(i, hyper(i))?;
        cpu.set_tensor_hyper(i, hyper(i))?;
    }
    for _ in 0..20 {
        let grads: Vec<Vec<f32>> = lens.iter().map(|&n| random(&mut rng, n, 0.1)).collect();
        let dg = upload(stream, &grads)?;
        gpu.step(&mut dev, &dg)?;
        let g: Vec<&[f32]> = grads.iter().map(|x| x.as_slice()).collect();
        let mut p: Vec<&mut [f32]> = host.iter_mut().map(|x| x.as_mut_slice()).collect();
        cpu.step(&mut p, &g)?;
    }
    for (i, (d, h)) in dev.iter().zip(&host).enumerate() {
        same("param", i, &stream.clone_dtoh(d)?, h)?;
    }
    same_state(&gpu.state()?, cpu.tensor_states()).map_err(|e| format!("{mode:?}: {e}"))?;
    Ok(())
}

/// Unscaling, overflow skips, clipping and the loss scaler on the GPU against the CPU
/// reference, bit for bit, step by step: parameters, state, skips, scale, norm, clip
/// factor. `inf_steps` get a +inf gradient in the last tensor (scaled runs skip them).
fn fused_matches_the_cpu<T: GpuStorage>(
    stream: &Arc<CudaStream>,
    options: adamax_cuda::StepOptions,
    scaler: Option<adamax_cuda::LossScaler>,
    layout: Layout,
    precision: Precision,
) -> TestResult {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let ctx = format!(
        "{} {options:?} {scaler:?} {precision:?} seed {seed}",
        T::NAME
    );
    let lens = [(1usize << 16) + 5, 3, 0, 8192 * 3 + 1, 700];
    let inf_steps = [3usize, 4, 9];
    let mut host: Vec<Vec<T>> = lens.iter().map(|&n| random(&mut rng, n, 1.0)).collect();
    let mut dev = Vec::new();
    for p in &host {
        let mut padded = vec![T::from_f32(7.0); layout.param_offset];
        padded.extend_from_slice(p);
        dev.push(stream.clone_htod(&padded)?);
    }
    let views: Vec<_> = dev.iter().map(|b| b.slice(layout.param_offset..)).collect();
    let config = AdamaxConfig {
        weight_decay: 0.01,
        precision,
        ..AdamaxConfig::default()
    };
    let mut gpu = CudaAdamax::<T>::new(stream, config, &views)?;
    drop(views);
    let refs: Vec<&[T]> = host.iter().map(|p| p.as_slice()).collect();
    let mut cpu = CpuAdamax::<T>::new(config, &refs)?;
    gpu.set_options(options)?;
    gpu.set_loss_scaler(scaler)?;
    cpu.set_options(options)?;
    cpu.set_loss_scaler(scaler)?;
    for step in 0..12 {
        let scale = cpu.loss_scaler()?.map_or(1.0, |s| s.scale);
        let mut grads: Vec<Vec<T>> = lens
            .iter()
            .map(|&n| random::<T>(&mut rng, n, 0.1))
            .collect();
        for g in grads.iter_mut() {
            for x in g.iter_mut() {
                *x = T::from_f32(x.to_f32() * scale);
            }
        }
        if inf_steps.contains(&step) {
            grads[4][0] = T::from_f32(f32::INFINITY);
        }
        let mut dev_grads = Vec::new();
        for g in &grads {
            let mut padded = vec![T::from_f32(-3.0); layout.grad_offset];
            padded.extend_from_slice(g);
            dev_grads.push(stream.clone_htod(&padded)?);
        }
        let gv: Vec<_> = dev_grads
            .iter()
            .map(|g| g.slice(layout.grad_offset..))
            .collect();
        let mut pv: Vec<_> = dev
            .iter_mut()
            .map(|b| b.slice_mut(layout.param_offset..))
            .collect();
        gpu.step(&mut pv, &gv)?;
        drop(pv);
        let g: Vec<&[T]> = grads.iter().map(|x| x.as_slice()).collect();
        let mut p: Vec<&mut [T]> = host.iter_mut().map(|x| x.as_mut_slice()).collect();
        cpu.step(&mut p, &g)?;
        let (gr, cr) = (gpu.last_report()?, cpu.last_report()?);
        let same_norm = gr.total_norm.map(f32::to_bits) == cr.total_norm.map(f32::to_bits);
        if gr.step != cr.step
            || gr.skipped != cr.skipped
            || gr.loss_scale != cr.loss_scale
            || !same_norm
            || gr.clip_coef.to_bits() != cr.clip_coef.to_bits()
        {
            return Err(format!("{ctx} step {}: report gpu {gr:?} cpu {cr:?}", step + 1).into());
        }
        for (i, (d, h)) in dev.iter().zip(&host).enumerate() {
            let got: Vec<T> = stream.clone_dtoh(d)?[layout.param_offset..].to_vec();
            let f = |v: &[T]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
            same("param", i, &f(&got), &f(h))
                .map_err(|e| format!("{ctx} step {}: {e}", step + 1))?;
        }
        same_state(&gpu.state()?, cpu.tensor_states())
            .map_err(|e| format!("{ctx} step {}: {e}", step + 1))?;
    }
    Ok(())
}

/// A step captured in a CUDA graph and replayed N times gives the same bits as N eager
/// steps, and a learning rate changed between replays takes effect without recapture.
fn graph_replay_equals_eager_steps(stream: &Arc<CudaStream>) -> TestResult {
    use adamax_cuda::cuda::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let ctx = stream.context().clone();
    // Graphs cannot capture the legacy default stream; and cudarc's cross-stream events
    // must not reach into the capture.
    let s = ctx.new_stream()?;
    // SAFETY: every buffer below is used on `s` only.
    unsafe { ctx.disable_event_tracking() };
    let mut rng = StdRng::seed_from_u64(seed());
    let lens = [4097usize, 100_003, 5];
    let init: Vec<Vec<f32>> = lens.iter().map(|&n| random(&mut rng, n, 1.0)).collect();
    let grads: Vec<Vec<f32>> = lens.iter().map(|&n| random(&mut rng, n, 0.1)).collect();
    let up = |v: &Vec<Vec<f32>>| {
        v.iter()
            .map(|x| s.clone_htod(x))
            .collect::<Result<Vec<_>, _>>()
    };
    let (mut pa, ga, mut pb, gb) = (up(&init)?, up(&grads)?, up(&init)?, up(&grads)?);
    let options = adamax_cuda::StepOptions {
        max_norm: Some(0.5),
        ..Default::default()
    };
    let mut eager = CudaAdamax::<f32>::new(&s, AdamaxConfig::default(), &pa)?;
    let mut graphed = CudaAdamax::<f32>::new(&s, AdamaxConfig::default(), &pb)?;
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
    s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    graphed.step(&mut pb, &gb)?;
    let graph = s
        .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH)?
        .ok_or("empty graph")?;
    for k in 0..7 {
        if k == 4 {
            eager.set_lr(5e-4)?;
            graphed.set_lr(5e-4)?;
        }
        eager.step(&mut pa, &ga)?;
        graph.launch()?;
    }
    s.synchronize()?;
    // SAFETY: restores cudarc's default for the rest of the process.
    unsafe { ctx.enable_event_tracking() };
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
    fn new(stream: &Arc<CudaStream>) -> Result<Self, Failed> {
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
    ) -> Result<adamax_cuda::cuda::cudarc::driver::CudaGraph, Failed> {
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
fn a_graph_captured_before_settings_honours_them_on_replay(stream: &Arc<CudaStream>) -> TestResult {
    let cap = Captured::new(stream)?;
    let s = &cap.s;
    let mut rng = StdRng::seed_from_u64(seed());
    let lens = [4097usize, 100_003, 5];
    let init: Vec<Vec<f32>> = lens.iter().map(|&n| random(&mut rng, n, 1.0)).collect();
    let grads: Vec<Vec<f32>> = lens.iter().map(|&n| random(&mut rng, n, 0.1)).collect();
    let up = |v: &Vec<Vec<f32>>| {
        v.iter()
            .map(|x| s.clone_htod(x))
            .collect::<Result<Vec<_>, _>>()
    };
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
fn a_graph_replayed_after_a_restore_steps_the_restored_state(
    stream: &Arc<CudaStream>,
) -> TestResult {
    let cap = Captured::new(stream)?;
    let s = &cap.s;
    let mut rng = StdRng::seed_from_u64(seed());
    let lens = [4097usize, 3, 70_001];
    let init: Vec<Vec<bf16>> = lens.iter().map(|&n| random(&mut rng, n, 1.0)).collect();
    let grads: Vec<Vec<bf16>> = lens.iter().map(|&n| random(&mut rng, n, 0.1)).collect();
    let up = |v: &Vec<Vec<bf16>>| {
        v.iter()
            .map(|x| s.clone_htod(x))
            .collect::<Result<Vec<_>, _>>()
    };
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
fn host_copies_during_a_capture_are_refused(stream: &Arc<CudaStream>) -> TestResult {
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

/// The loss-scaler regression of the first H100 run: on a growth step the update
/// divided by the next step's scale. With power-of-two scales, unscaling is exact, so
/// the GPU's scaled run must equal the CPU reference on the unscaled gradients with the
/// skipped steps left out, bit for bit, through a growth step followed by a skip and
/// two backoffs in a row (tests/common's schedule; the CPU twin is in fused_cpu.rs).
fn loss_scaler_unscales_by_the_scale_the_gradients_carry<T: GpuStorage>(
    stream: &Arc<CudaStream>,
) -> TestResult {
    use common::{SCALER_INF_STEPS, SCALER_SCALES};
    let mut rng = StdRng::seed_from_u64(seed());
    let lens = [(1usize << 16) + 5, 3, 8193];
    let mut host: Vec<Vec<T>> = lens.iter().map(|&n| random(&mut rng, n, 1.0)).collect();
    let mut dev = upload(stream, &host)?;
    let config = AdamaxConfig {
        weight_decay: 0.01,
        ..AdamaxConfig::default()
    };
    let mut gpu = CudaAdamax::<T>::new(stream, config, &dev)?;
    gpu.set_loss_scaler(Some(adamax_cuda::LossScaler {
        scale: 1024.0,
        growth_interval: 2,
        ..Default::default()
    }))?;
    let refs: Vec<&[T]> = host.iter().map(|p| p.as_slice()).collect();
    let mut plain = CpuAdamax::<T>::new(config, &refs)?;
    for (t, &scale) in SCALER_SCALES.iter().enumerate() {
        let got_scale = gpu.loss_scaler()?.map(|s| s.scale);
        if got_scale != Some(scale) {
            return Err(format!(
                "{} step {t}: scale {got_scale:?}, expected {scale}",
                T::NAME
            )
            .into());
        }
        let grads: Vec<Vec<T>> = lens.iter().map(|&n| random(&mut rng, n, 0.1)).collect();
        let mut scaled: Vec<Vec<T>> = grads
            .iter()
            .map(|g| g.iter().map(|x| T::from_f32(x.to_f32() * scale)).collect())
            .collect();
        let inf = SCALER_INF_STEPS.contains(&t);
        if inf {
            scaled[2][100] = T::from_f32(f32::INFINITY);
        }
        let dg = upload(stream, &scaled)?;
        gpu.step(&mut dev, &dg)?;
        if gpu.last_report()?.skipped != inf {
            return Err(format!("{} step {t}: skip decision differs", T::NAME).into());
        }
        if !inf {
            let g: Vec<&[T]> = grads.iter().map(|x| x.as_slice()).collect();
            let mut p: Vec<&mut [T]> = host.iter_mut().map(|x| x.as_mut_slice()).collect();
            plain.step(&mut p, &g)?;
        }
        for (i, (d, h)) in dev.iter().zip(&host).enumerate() {
            let f = |v: &[T]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
            same("param", i, &f(&stream.clone_dtoh(d)?), &f(h))
                .map_err(|e| format!("{} step {t}: {e}", T::NAME))?;
        }
        same_state(&gpu.state()?, plain.tensor_states())
            .map_err(|e| format!("{} step {t}: {e}", T::NAME))?;
    }
    Ok(())
}

/// A step counter at `u64::MAX` refuses the next step with `StepOverflow`, as the CPU
/// reference does, and nothing changes; a replayed graph at the limit changes nothing
/// either and reports the same error.
fn a_full_step_counter_refuses_the_step_like_the_cpu(stream: &Arc<CudaStream>) -> TestResult {
    let mut rng = StdRng::seed_from_u64(seed());
    let lens = [4097usize, 3];
    let init: Vec<Vec<f32>> = lens.iter().map(|&n| random(&mut rng, n, 1.0)).collect();
    let grads: Vec<Vec<f32>> = lens.iter().map(|&n| random(&mut rng, n, 0.1)).collect();
    let mut params = upload(stream, &init)?;
    let dg = upload(stream, &grads)?;
    let mut gpu = CudaAdamax::<f32>::new(stream, AdamaxConfig::default(), &params)?;
    let refs: Vec<&[f32]> = init.iter().map(|p| p.as_slice()).collect();
    let mut cpu = CpuAdamax::<f32>::new(AdamaxConfig::default(), &refs)?;
    let mut ck = cpu.checkpoint()?;
    ck.step = u64::MAX - 1;
    gpu.restore(&ck)?;
    cpu.restore(&ck)?;
    let mut host = init.clone();
    gpu.step(&mut params, &dg)?;
    {
        let g: Vec<&[f32]> = grads.iter().map(|x| x.as_slice()).collect();
        let mut p: Vec<&mut [f32]> = host.iter_mut().map(|x| x.as_mut_slice()).collect();
        cpu.step(&mut p, &g)?;
    }
    let before = (
        gpu.checkpoint()?,
        params
            .iter()
            .map(|p| stream.clone_dtoh(p))
            .collect::<Result<Vec<_>, _>>()?,
    );
    let g: Vec<&[f32]> = grads.iter().map(|x| x.as_slice()).collect();
    let mut p: Vec<&mut [f32]> = host.iter_mut().map(|x| x.as_mut_slice()).collect();
    let cpu_err = cpu.step(&mut p, &g);
    let gpu_err = gpu.step(&mut params, &dg);
    match (&cpu_err, &gpu_err) {
        (Err(Error::StepOverflow(a)), Err(Error::StepOverflow(b)))
            if *a == u64::MAX && *b == u64::MAX => {}
        _ => {
            return Err(
                format!("expected StepOverflow on both: cpu {cpu_err:?}, gpu {gpu_err:?}").into(),
            )
        }
    }
    let after = (
        gpu.checkpoint()?,
        params
            .iter()
            .map(|p| stream.clone_dtoh(p))
            .collect::<Result<Vec<_>, _>>()?,
    );
    same_checkpoint(&after.0, &before.0)?;
    if after.1 != before.1 {
        return Err("a refused step changed the parameters".into());
    }
    same_checkpoint(&after.0, &cpu.checkpoint()?)?;
    counter_full_in_a_replayed_graph_changes_nothing(stream, &init, &grads)
}

/// The device's own guard: a graph captured at step u64::MAX - 1 replays once (step
/// u64::MAX), then changes nothing and reports StepOverflow; an eager step after it is
/// refused on the host.
fn counter_full_in_a_replayed_graph_changes_nothing(
    stream: &Arc<CudaStream>,
    init: &[Vec<f32>],
    grads: &[Vec<f32>],
) -> TestResult {
    use adamax_cuda::cuda::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let ctx = stream.context().clone();
    let s = ctx.new_stream()?;
    // SAFETY: every buffer below is used on `s` only.
    unsafe { ctx.disable_event_tracking() };
    let up = |v: &[Vec<f32>]| {
        v.iter()
            .map(|x| s.clone_htod(x))
            .collect::<Result<Vec<_>, _>>()
    };
    let (mut params, dg) = (up(init)?, up(grads)?);
    let mut opt = CudaAdamax::<f32>::new(&s, AdamaxConfig::default(), &params)?;
    let refs: Vec<&[f32]> = init.iter().map(|p| p.as_slice()).collect();
    let mut ck = CpuAdamax::<f32>::new(AdamaxConfig::default(), &refs)?.checkpoint()?;
    ck.step = u64::MAX - 2;
    opt.restore(&ck)?;
    opt.step(&mut params, &dg)?; // step u64::MAX - 1; uploads the tensor table
    s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    opt.step(&mut params, &dg)?;
    let graph = s
        .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH)?
        .ok_or("empty graph")?;
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
    // SAFETY: restores cudarc's default for the rest of the process.
    unsafe { ctx.enable_event_tracking() };
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

/// The flat-buffer path against the CPU reference, bit for bit: 100 mixed tensors in
/// one parameter buffer (packed or aligned layout), stepped with gradients written into
/// the same flat buffer (the tensor table on the device is reused), then from a new
/// gradient buffer, after a per-tensor setting changed, and after a per-tensor step
/// (each rebuilds it). Refusals: a short buffer, and step_flat on a per-tensor optimizer.
fn flat_buffers_match_the_cpu<T: GpuStorage>(
    stream: &Arc<CudaStream>,
    aligned: bool,
    precision: Precision,
) -> TestResult {
    use adamax_cuda::{cuda::FlatLayout, TensorHyper};
    let mut rng = StdRng::seed_from_u64(seed());
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
    let mut host: Vec<Vec<T>> = lens.iter().map(|&n| random(&mut rng, n, 1.0)).collect();
    let mut params = stream.clone_htod(&flatten(&host))?;
    let config = AdamaxConfig {
        weight_decay: 0.01,
        precision,
        ..AdamaxConfig::default()
    };
    let mut gpu = CudaAdamax::<T>::new_flat(stream, config, &params, layout.clone())?;
    let refs: Vec<&[T]> = host.iter().map(|p| p.as_slice()).collect();
    let mut cpu = CpuAdamax::<T>::new(config, &refs)?;
    let mut grads = stream.alloc_zeros::<T>(layout.total())?;
    for step in 0..8 {
        let g: Vec<Vec<T>> = lens.iter().map(|&n| random(&mut rng, n, 0.1)).collect();
        match step {
            3 => grads = stream.alloc_zeros::<T>(layout.total() + 5)?,
            4 => {
                let h = TensorHyper {
                    lr_scale: 0.5,
                    weight_decay: 0.0,
                };
                gpu.set_tensor_hyper(5, h)?;
                cpu.set_tensor_hyper(5, h)?;
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
        let gr: Vec<&[T]> = g.iter().map(|x| x.as_slice()).collect();
        let mut pr: Vec<&mut [T]> = host.iter_mut().map(|x| x.as_mut_slice()).collect();
        cpu.step(&mut pr, &gr)?;
        let flat = stream.clone_dtoh(&params)?;
        for (i, (&o, h)) in layout.offsets().iter().zip(&host).enumerate() {
            let f = |v: &[T]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
            same("param", i, &f(&flat[o..o + h.len()]), &f(h))
                .map_err(|e| format!("{} step {step}: {e}", T::NAME))?;
        }
        same_state(&gpu.state()?, cpu.tensor_states())
            .map_err(|e| format!("{} step {step}: {e}", T::NAME))?;
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

/// Missing gradients with clipping, a loss scaler and overflow skips, against the CPU
/// reference bit for bit: absent tensors add zero partial sums (their chunks keep their
/// numbers in the reduction order), take no update and keep their own step counts.
fn missing_gradients_match_the_cpu<T: GpuStorage>(
    stream: &Arc<CudaStream>,
    precision: Precision,
) -> TestResult {
    let mut rng = StdRng::seed_from_u64(seed());
    let lens = [(1usize << 16) + 5, 3, 0, 8192 * 3 + 1, 700, 9000];
    let mut host: Vec<Vec<T>> = lens.iter().map(|&n| random(&mut rng, n, 1.0)).collect();
    let mut dev = upload(stream, &host)?;
    let config = AdamaxConfig {
        weight_decay: 0.01,
        precision,
        ..AdamaxConfig::default()
    };
    let mut gpu = CudaAdamax::<T>::new(stream, config, &dev)?;
    let refs: Vec<&[T]> = host.iter().map(|p| p.as_slice()).collect();
    let mut cpu = CpuAdamax::<T>::new(config, &refs)?;
    let options = adamax_cuda::StepOptions {
        max_norm: Some(0.5),
        ..Default::default()
    };
    let scaler = Some(adamax_cuda::LossScaler {
        scale: 256.0,
        growth_interval: 2,
        ..Default::default()
    });
    for o in [&mut gpu as &mut dyn FnMutOpt, &mut cpu] {
        o.setup(options, scaler)?;
    }
    for step in 0..10usize {
        let scale = cpu.loss_scaler()?.map_or(1.0, |s| s.scale);
        let grads: Vec<Option<Vec<T>>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let g: Vec<T> = random::<T>(&mut rng, n, 0.1)
                    .iter()
                    .map(|x| T::from_f32(x.to_f32() * scale))
                    .collect();
                ((i + step) % 3 != 0).then_some(g)
            })
            .collect();
        let mut grads = grads;
        if step == 4 {
            if let Some(g) = grads[5].as_mut() {
                g[10] = T::from_f32(f32::INFINITY);
            }
        }
        let dg = grads
            .iter()
            .map(|g| g.as_ref().map(|g| stream.clone_htod(g)).transpose())
            .collect::<Result<Vec<_>, _>>()?;
        gpu.step_some(&mut dev, &dg)?;
        let g: Vec<Option<&[T]>> = grads.iter().map(|x| x.as_deref()).collect();
        let mut p: Vec<&mut [T]> = host.iter_mut().map(|x| x.as_mut_slice()).collect();
        cpu.step_some(&mut p, &g)?;
        let (gr, cr) = (gpu.last_report()?, cpu.last_report()?);
        if (
            gr.skipped,
            gr.loss_scale,
            gr.total_norm.map(f32::to_bits),
            gr.clip_coef.to_bits(),
        ) != (
            cr.skipped,
            cr.loss_scale,
            cr.total_norm.map(f32::to_bits),
            cr.clip_coef.to_bits(),
        ) {
            return Err(format!("{} step {step}: gpu {gr:?} cpu {cr:?}", T::NAME).into());
        }
        for (i, (d, h)) in dev.iter().zip(&host).enumerate() {
            let f = |v: &[T]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
            same("param", i, &f(&stream.clone_dtoh(d)?), &f(h))
                .map_err(|e| format!("{} step {step}: {e}", T::NAME))?;
        }
        let (gs, cs) = (gpu.state()?, cpu.tensor_states().to_vec());
        same_state(&gs, &cs).map_err(|e| format!("{} step {step}: {e}", T::NAME))?;
        let counts = |v: &[TensorState]| v.iter().map(|t| t.step).collect::<Vec<_>>();
        if counts(&gs) != counts(&cs) {
            return Err(format!(
                "{} step {step}: step counts {:?} vs {:?}",
                T::NAME,
                counts(&gs),
                counts(&cs)
            )
            .into());
        }
    }
    Ok(())
}

/// Options and scaler set alike on either optimizer (through the trait).
trait FnMutOpt {
    fn setup(
        &mut self,
        o: adamax_cuda::StepOptions,
        s: Option<adamax_cuda::LossScaler>,
    ) -> adamax_cuda::Result<()>;
}
impl<O: Optimizer> FnMutOpt for O {
    fn setup(
        &mut self,
        o: adamax_cuda::StepOptions,
        s: Option<adamax_cuda::LossScaler>,
    ) -> adamax_cuda::Result<()> {
        self.set_options(o)?;
        self.set_loss_scaler(s)
    }
}

fn main() {
    let args = Arguments::from_args();
    let device = cuda::device_count()
        .ok()
        .filter(|&n| n > 0)
        .and_then(|_| cuda::default_stream(0).ok());
    match &device {
        Some(s) => eprintln!(
            "GPU: {} (compute capability {:?})",
            s.context().name().unwrap_or_default(),
            s.context().compute_capability().ok()
        ),
        None => eprintln!("no CUDA device visible: GPU tests are ignored"),
    }
    let stream = device.clone();
    let mut trials = Vec::new();
    let mut add = |name: String, f: GpuTest| {
        let stream = stream.clone();
        trials.push(
            Trial::test(name, move || match stream {
                Some(s) => f(&s),
                None => Err("no CUDA device".into()),
            })
            .with_ignored_flag(device.is_none()),
        );
    };
    for (name, config) in configs() {
        add(
            format!("f32_is_bit_identical_to_cpu_after_100_steps_{name}"),
            Box::new(move |s| gpu_matches_cpu::<f32>(s, config, &SIZES, 100, PLAIN, false)),
        );
        add(
            format!("f16_master_is_bit_identical_and_copy_is_rne_{name}"),
            Box::new(move |s| gpu_matches_cpu::<f16>(s, config, &SIZES, 20, PLAIN, false)),
        );
        add(
            format!("bf16_master_is_bit_identical_and_copy_is_rne_{name}"),
            Box::new(move |s| gpu_matches_cpu::<bf16>(s, config, &SIZES, 20, PLAIN, false)),
        );
    }
    let odd = Layout {
        param_offset: 1,
        grad_offset: 3,
    };
    let d = AdamaxConfig::default();
    add(
        "views_at_odd_offsets_take_the_scalar_path_f32".into(),
        Box::new(move |s| gpu_matches_cpu::<f32>(s, d, &SIZES, 10, odd, false)),
    );
    add(
        "views_at_odd_offsets_take_the_scalar_path_f16".into(),
        Box::new(move |s| gpu_matches_cpu::<f16>(s, d, &SIZES, 10, odd, false)),
    );
    add(
        "views_at_odd_offsets_take_the_scalar_path_bf16".into(),
        Box::new(move |s| gpu_matches_cpu::<bf16>(s, d, &SIZES, 10, odd, false)),
    );
    add(
        "a_list_of_150_mixed_tensors_in_one_launch_f32".into(),
        Box::new(move |s| gpu_matches_cpu::<f32>(s, d, &mixed_sizes(150, 1), 30, PLAIN, false)),
    );
    add(
        "a_list_of_150_mixed_tensors_in_one_launch_bf16".into(),
        Box::new(move |s| gpu_matches_cpu::<bf16>(s, d, &mixed_sizes(150, 2), 10, PLAIN, false)),
    );
    add(
        "nan_and_inf_gradients_match_the_cpu_f32".into(),
        Box::new(move |s| gpu_matches_cpu::<f32>(s, d, &SIZES[..5], 5, PLAIN, true)),
    );
    add(
        "nan_and_inf_gradients_match_the_cpu_f16".into(),
        Box::new(move |s| gpu_matches_cpu::<f16>(s, d, &SIZES[..5], 5, PLAIN, true)),
    );
    add(
        "refused_steps_change_nothing".into(),
        Box::new(refused_steps_change_nothing),
    );
    add(
        "graph_replay_equals_eager_steps_and_follows_set_lr".into(),
        Box::new(graph_replay_equals_eager_steps),
    );
    add(
        "a_graph_captured_before_settings_honours_them_on_replay".into(),
        Box::new(a_graph_captured_before_settings_honours_them_on_replay),
    );
    add(
        "a_graph_replayed_after_a_restore_steps_the_restored_state".into(),
        Box::new(a_graph_replayed_after_a_restore_steps_the_restored_state),
    );
    add(
        "host_copies_during_a_capture_are_refused".into(),
        Box::new(host_copies_during_a_capture_are_refused),
    );
    {
        use adamax_cuda::{LossScaler, StepOptions};
        let scaler = Some(LossScaler {
            scale: 1024.0,
            growth_interval: 3,
            ..LossScaler::default()
        });
        let clip = StepOptions {
            max_norm: Some(0.5),
            ..Default::default()
        };
        let unscale = StepOptions {
            inv_scale: Some(0.25),
            ..Default::default()
        };
        let odd = Layout {
            param_offset: 1,
            grad_offset: 3,
        };
        add(
            "fused_scaler_and_clipping_match_the_cpu_f32".into(),
            Box::new(move |s| fused_matches_the_cpu::<f32>(s, clip, scaler, PLAIN, F32)),
        );
        add(
            "fused_scaler_and_clipping_match_the_cpu_f16".into(),
            Box::new(move |s| fused_matches_the_cpu::<f16>(s, clip, scaler, PLAIN, F32)),
        );
        add(
            "fused_scaler_and_clipping_match_the_cpu_bf16_odd_views".into(),
            Box::new(move |s| fused_matches_the_cpu::<bf16>(s, clip, scaler, odd, F32)),
        );
        add(
            "fused_clipping_alone_matches_the_cpu_f32_odd_views".into(),
            Box::new(move |s| fused_matches_the_cpu::<f32>(s, clip, None, odd, F32)),
        );
        add(
            "fused_fixed_unscale_with_check_matches_the_cpu_f16".into(),
            Box::new(move |s| fused_matches_the_cpu::<f16>(s, unscale, None, PLAIN, F32)),
        );
    }
    add(
        "loss_scaler_unscales_by_the_scale_the_gradients_carry_f32".into(),
        Box::new(loss_scaler_unscales_by_the_scale_the_gradients_carry::<f32>),
    );
    add(
        "loss_scaler_unscales_by_the_scale_the_gradients_carry_bf16".into(),
        Box::new(loss_scaler_unscales_by_the_scale_the_gradients_carry::<bf16>),
    );
    add(
        "a_full_step_counter_refuses_the_step_like_the_cpu".into(),
        Box::new(a_full_step_counter_refuses_the_step_like_the_cpu),
    );
    add(
        "flat_buffers_match_the_cpu_packed_f32".into(),
        Box::new(|s| flat_buffers_match_the_cpu::<f32>(s, false, F32)),
    );
    add(
        "flat_buffers_match_the_cpu_aligned_f32".into(),
        Box::new(|s| flat_buffers_match_the_cpu::<f32>(s, true, F32)),
    );
    add(
        "flat_buffers_match_the_cpu_aligned_bf16".into(),
        Box::new(|s| flat_buffers_match_the_cpu::<bf16>(s, true, F32)),
    );
    add(
        "missing_gradients_match_the_cpu_with_clipping_and_scaler_f32".into(),
        Box::new(|s| missing_gradients_match_the_cpu::<f32>(s, F32)),
    );
    add(
        "missing_gradients_match_the_cpu_with_clipping_and_scaler_bf16".into(),
        Box::new(|s| missing_gradients_match_the_cpu::<bf16>(s, F32)),
    );
    add(
        "per_tensor_hyperparameters_match_the_cpu_coupled".into(),
        Box::new(|s| per_tensor_hyperparameters_match_the_cpu(s, WeightDecayMode::Coupled)),
    );
    add(
        "per_tensor_hyperparameters_match_the_cpu_decoupled".into(),
        Box::new(|s| per_tensor_hyperparameters_match_the_cpu(s, WeightDecayMode::Decoupled)),
    );
    add(
        "raw_entry_points_match_the_typed_ones_and_refuse_bad_addresses".into(),
        Box::new(raw_entry_points_match_and_refuse_bad_addresses),
    );
    add(
        "checkpoint_resume_is_bit_exact_f32".into(),
        Box::new(|s| gpu_resume_is_bit_exact::<f32>(s, F32)),
    );
    add(
        "checkpoint_resume_is_bit_exact_bf16".into(),
        Box::new(|s| gpu_resume_is_bit_exact::<bf16>(s, F32)),
    );
    add_low_byte_tests(&mut add);
    // Needs about 35 GB free: ignored on smaller GPUs rather than failing.
    let big_enough = device
        .as_ref()
        .and_then(|s| s.context().mem_get_info().ok())
        .is_some_and(|(free, _)| free > 40 << 30);
    if !big_enough {
        eprintln!("tensor_over_2_pow_31_elements: needs > 40 GiB free device memory, ignored");
    }
    let s = device.clone();
    trials.push(
        Trial::test(
            "tensor_over_2_pow_31_elements_uses_64_bit_indices_f16",
            move || match s {
                Some(s) => over_2_pow_31_elements::<f16>(&s),
                None => Err("no CUDA device".into()),
            },
        )
        .with_ignored_flag(!big_enough),
    );
    libtest_mimic::run(&args, trials).exit();
}
