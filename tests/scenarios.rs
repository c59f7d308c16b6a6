//! Every optimizer behaviour, written once against the `Optimizer` trait and run on the
//! CPU reference and on the GPU (reported as ignored when no GPU is visible, never as
//! passed). Expected values come from the behaviour itself (a refused call changes
//! nothing, a resumed run equals an unbroken one, a negated gradient equals
//! `maximize`) or from a named reference (torch.amp.GradScaler's rule); tests/gpu.rs
//! compares the GPU with the CPU reference bit for bit.

mod common;

use adamax_cuda::{
    bf16, cuda::GpuStorage, AdamaxConfig, Checkpoint, Error, LossScaler, Optimizer, ParamMode,
    Precision, StateFormat, StepOptions, Storage, StorageType, TensorHyper,
};
use common::backends::{gpu_stream, Backend, Cpu, Gpu, GpuFlat, R};
use libtest_mimic::{Arguments, Trial};

const LENS: [usize; 4] = [4097, 3, 0, 70_001];

/// Deterministic values in [-scale, scale), varied by `seed`.
fn values<T: Storage>(seed: usize, scale: f32) -> Vec<Vec<T>> {
    LENS.iter()
        .enumerate()
        .map(|(k, &n)| {
            (0..n)
                .map(|i| T::from_f32((((i * 7 + k * 13 + seed * 31) as f32) * 0.37).sin() * scale))
                .collect()
        })
        .collect()
}

fn bits<T: Storage>(v: &[Vec<T>]) -> Vec<u32> {
    v.iter().flatten().map(|x| x.to_f32().to_bits()).collect()
}

/// Everything an optimizer exposes, for "nothing changed" checks (NaN-free here).
fn snapshot<T: GpuStorage, B: Backend<T>>(b: &mut B) -> R<(Vec<u32>, Checkpoint)> {
    Ok((bits(&b.params()?), b.opt().checkpoint()?))
}

thread_local! {
    /// The storage modes of the scenario running on this thread (the default ones unless
    /// [`lean`] sets others).
    static PRECISION: std::cell::Cell<Precision> = std::cell::Cell::new(Precision::default());
}

fn config() -> AdamaxConfig {
    AdamaxConfig {
        weight_decay: 0.01,
        precision: PRECISION.get(),
        ..AdamaxConfig::default()
    }
}

/// Runs scenario `f` in the default storage modes.
fn plain(f: fn() -> R) -> R {
    f()
}

/// Runs scenario `f` in the modes that move the fewest bytes `T` has: stochastically
/// rounded bf16 parameters with 8-bit moments, or f32 parameters with 8-bit moments.
/// (Not every scenario applies: a negated gradient rounds differently from its
/// opposite, and a tensor's random stream depends on its index in the optimizer.)
fn lean<T: GpuStorage>(f: fn() -> R) -> R {
    let params = if T::TYPE == StorageType::Bf16 {
        ParamMode::Stochastic
    } else {
        ParamMode::Master
    };
    in_modes(params, StateFormat::Blockwise8, f)
}

/// Runs scenario `f` with bf16 parameters rounded stochastically and f32 moments.
fn sr(f: fn() -> R) -> R {
    in_modes(ParamMode::Stochastic, StateFormat::F32, f)
}

/// Runs scenario `f` with f32 masters (or f32 parameters) and 8-bit moments.
fn q8(f: fn() -> R) -> R {
    in_modes(ParamMode::Master, StateFormat::Blockwise8, f)
}

fn in_modes(params: ParamMode, state: StateFormat, f: fn() -> R) -> R {
    PRECISION.set(Precision {
        params,
        state,
        seed: 11,
        min_8bit_len: 0,
    });
    let r = f();
    PRECISION.set(Precision::default());
    r
}

fn refused_calls_change_nothing<T: GpuStorage, B: Backend<T>>() -> R {
    let mut b = B::new(config(), &values::<T>(0, 1.0))?;
    b.step(&values(1, 0.1))?;
    let before = snapshot(&mut b)?;
    let mut short = values::<T>(2, 0.1);
    short[3].pop();
    let flat_refusal = |r: &adamax_cuda::Result<()>| {
        B::FLAT
            && matches!(
                r,
                Err(Error::BufferTooSmall {
                    what: "flat grads",
                    ..
                })
            )
    };
    match b.step(&short) {
        Err(Error::LengthMismatch {
            what: "grad",
            tensor: 3,
            expected: 70_001,
            found: 70_000,
        }) if !B::FLAT => {}
        r if flat_refusal(&r) => {}
        other => return Err(format!("short gradient: {other:?}").into()),
    }
    match b.step(&values(2, 0.1)[..3]) {
        Err(Error::TensorCountMismatch {
            what: "grads",
            expected: 4,
            found: 3,
        }) if !B::FLAT => {}
        r if flat_refusal(&r) => {}
        other => return Err(format!("three gradients: {other:?}").into()),
    }
    let opt = b.opt();
    assert_refused(opt.set_lr(f64::NAN), "NaN lr")?;
    assert_refused(opt.set_lr(1e38), "overflowing lr")?;
    let bad_hyper = TensorHyper {
        lr_scale: -1.0,
        weight_decay: 0.0,
    };
    assert_refused(opt.set_tensor_hyper(0, bad_hyper), "negative lr_scale")?;
    let fine = TensorHyper::from_config(&config());
    assert_refused(opt.set_tensor_hyper(usize::MAX, fine), "tensor index")?;
    let bad_options = StepOptions {
        max_norm: Some(-1.0),
        ..Default::default()
    };
    assert_refused(opt.set_options(bad_options), "negative max_norm")?;
    let bad_scaler = LossScaler {
        scale: 1e-45,
        ..Default::default()
    };
    assert_refused(opt.set_loss_scaler(Some(bad_scaler)), "tiny scale")?;
    let mut other = before.1.clone();
    other.tensors[1].exp_avg.push(0.0);
    other.tensors[1].exp_inf.push(0.0);
    assert_refused(opt.restore(&other), "mismatched checkpoint")?;
    if snapshot(&mut b)? != before || b.opt().options() != StepOptions::default() {
        return Err("a refused call changed the optimizer".into());
    }
    if !B::FLAT {
        match B::over_no_tensors(config())? {
            Err(Error::EmptyParameterList) => {}
            other => return Err(format!("no tensors: {:?}", other.err()).into()),
        }
    }
    Ok(())
}

fn assert_refused(r: adamax_cuda::Result<()>, what: &str) -> R {
    match r {
        Err(Error::Config(_) | Error::Checkpoint { .. } | Error::TensorIndexOutOfRange { .. }) => {
            Ok(())
        }
        other => Err(format!("{what}: expected a typed refusal, got {other:?}").into()),
    }
}

fn a_non_finite_gradient_skips_the_whole_step<T: GpuStorage, B: Backend<T>>() -> R {
    let mut b = B::new(config(), &values::<T>(0, 1.0))?;
    b.opt().set_options(StepOptions {
        skip_nonfinite: true,
        ..Default::default()
    })?;
    b.step(&values(1, 0.1))?;
    let before = snapshot(&mut b)?;
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut g = values::<T>(2, 0.1);
        g[3][70_000] = T::from_f32(bad);
        b.step(&g)?;
        let r = b.opt().last_report()?;
        if !r.skipped || r.step != 1 {
            return Err(format!("{bad}: report {r:?}").into());
        }
        if snapshot(&mut b)? != before {
            return Err(format!("{bad}: a skipped step changed something").into());
        }
    }
    b.step(&values(3, 0.1))?;
    if b.opt().step_count()? != 2 {
        return Err("a good step after skips was not counted".into());
    }
    Ok(())
}

/// With clipping, a loss scaler and N-D shapes too: the checkpoint carries them, so a
/// fresh optimizer (built without them) resumes the scaled, clipped run exactly, and
/// saves the same file.
fn resuming_from_a_checkpoint_equals_an_unbroken_run<T: GpuStorage, B: Backend<T>>() -> R {
    let mut a = B::new(config(), &values::<T>(0, 1.0))?;
    a.opt().set_options(StepOptions {
        max_norm: Some(0.5),
        ..Default::default()
    })?;
    a.opt().set_loss_scaler(Some(LossScaler {
        scale: 64.0,
        growth_interval: 3,
        ..Default::default()
    }))?;
    a.opt().set_tensor_hyper(
        3,
        TensorHyper {
            lr_scale: 0.5,
            weight_decay: 0.0,
        },
    )?;
    // The parameters' shapes (PyTorch's N-D state), which the files keep.
    let shapes = [vec![17, 241], vec![1, 3], vec![0, 5], vec![70_001, 1]];
    for (i, shape) in shapes.iter().enumerate() {
        a.opt().set_tensor_shape(i, shape)?;
    }
    for t in 1..=4 {
        a.step(&values(t, 0.1))?;
    }
    let ck = Checkpoint::from_bytes(&a.opt().checkpoint()?.to_bytes()?)?;
    if ck.shapes != shapes {
        return Err(format!("the file's shapes are {:?}", ck.shapes).into());
    }
    let params_at_4 = a.params()?;
    for t in 5..=8 {
        a.step(&values(t, 0.1))?;
    }
    // A fresh optimizer with another config (the same storage modes: the state's layout
    // depends on them): restore takes config, groups and state.
    let fresh = AdamaxConfig {
        precision: config().precision,
        ..AdamaxConfig::default()
    };
    let mut b = B::new(fresh, &params_at_4)?;
    b.opt().restore(&ck)?;
    for t in 5..=8 {
        b.step(&values(t, 0.1))?;
    }
    if snapshot(&mut a)? != snapshot(&mut b)? {
        return Err("resumed run differs from the unbroken one".into());
    }
    if a.opt().options() != b.opt().options() || a.opt().loss_scaler()? != b.opt().loss_scaler()? {
        return Err("the options or the loss scaler did not travel with the checkpoint".into());
    }
    if b.opt().tensor_shapes() != shapes {
        return Err("the shapes did not travel with the checkpoint".into());
    }
    // save_checkpoint (streamed from the device on the GPU) writes exactly the bytes of
    // the in-memory checkpoint.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let unique = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!(
        "adamax-scenario-{}-{unique}.safetensors",
        std::process::id()
    ));
    a.opt().save_checkpoint(&path)?;
    let saved = std::fs::read(&path)?;
    std::fs::remove_file(&path)?;
    if saved != a.opt().checkpoint()?.to_bytes()? {
        return Err("save_checkpoint differs from checkpoint().to_bytes()".into());
    }
    Ok(())
}

/// The report describes the last step since construction or restore (skipped, its norm
/// and clip coefficient) with the step count and loss scale in force now, alike on
/// every backend (issue #17, item 8: the CPU kept a restored-away step's count and a
/// removed scaler's scale; the GPU derived "clipped" from today's options).
fn the_report_describes_the_last_step_and_the_settings_in_force<T: GpuStorage, B: Backend<T>>() -> R
{
    use adamax_cuda::StepReport;
    let mut b = B::new(config(), &values::<T>(0, 1.0))?;
    let fresh = StepReport {
        step: 0,
        skipped: false,
        total_norm: None,
        clip_coef: 1.0,
        loss_scale: None,
    };
    if b.opt().last_report()? != fresh {
        return Err(format!("before any step: {:?}", b.opt().last_report()?).into());
    }
    let at_zero = b.opt().checkpoint()?;
    b.opt().set_options(StepOptions {
        max_norm: Some(1e-3),
        skip_nonfinite: true,
        ..Default::default()
    })?;
    let scaler = LossScaler {
        scale: 2.0,
        growth_interval: 100,
        ..Default::default()
    };
    b.opt().set_loss_scaler(Some(scaler))?;
    b.step(&values(1, 0.1))?;
    let clipped = b.opt().last_report()?;
    if clipped.step != 1 || clipped.total_norm.is_none() || clipped.clip_coef >= 1.0 {
        return Err(format!("a clipped step: {clipped:?}").into());
    }
    let at_one = b.opt().checkpoint()?;
    // Turning clipping off describes the next step, not the last one.
    b.opt().set_options(StepOptions::default())?;
    if b.opt().last_report()? != clipped {
        return Err(format!(
            "options changed the last report: {:?}",
            b.opt().last_report()?
        )
        .into());
    }
    // The scale shown is the one in force.
    b.opt().set_loss_scaler(None)?;
    let expected = StepReport {
        loss_scale: None,
        ..clipped
    };
    if b.opt().last_report()? != expected {
        return Err(format!("after removing the scaler: {:?}", b.opt().last_report()?).into());
    }
    b.opt().set_loss_scaler(Some(LossScaler {
        scale: 8.0,
        ..scaler
    }))?;
    if b.opt().last_report()?.loss_scale != Some(8.0) {
        return Err(format!("after a new scaler: {:?}", b.opt().last_report()?).into());
    }
    // A skipped step: no norm.
    let mut bad = values::<T>(2, 0.1);
    bad[0][0] = T::from_f32(f32::NAN);
    b.step(&bad)?;
    let r = b.opt().last_report()?;
    if !r.skipped || r.total_norm.is_some() || r.clip_coef != 1.0 || r.step != 1 {
        return Err(format!("a skipped step: {r:?}").into());
    }
    // After a restore there is no last step: the checkpoint's count and scaler.
    for ck in [&at_zero, &at_one] {
        b.opt().restore(ck)?;
        let r = b.opt().last_report()?;
        let want = StepReport {
            step: ck.step,
            loss_scale: ck.scaler.map(|s| s.scale),
            ..fresh
        };
        if r != want || b.opt().step_count()? != ck.step {
            return Err(
                format!("after restoring step {}: {r:?}, expected {want:?}", ck.step).into(),
            );
        }
    }
    Ok(())
}

fn maximize_equals_descending_the_negated_gradient<T: GpuStorage, B: Backend<T>>() -> R {
    let up = AdamaxConfig {
        maximize: true,
        ..config()
    };
    let (mut a, mut b) = (
        B::new(up, &values::<T>(0, 1.0))?,
        B::new(config(), &values::<T>(0, 1.0))?,
    );
    for t in 1..=5 {
        let g = values::<T>(t, 0.1);
        let neg: Vec<Vec<T>> = g
            .iter()
            .map(|v| v.iter().map(|x| T::from_f32(-x.to_f32())).collect())
            .collect();
        a.step(&g)?;
        b.step(&neg)?;
    }
    if bits(&a.params()?) != bits(&b.params()?) || a.opt().state()? != b.opt().state()? {
        return Err("maximize differs from the negated gradient".into());
    }
    Ok(())
}

fn learning_rate_zero_and_frozen_groups_leave_parameters<T: GpuStorage, B: Backend<T>>() -> R {
    let init = values::<T>(0, 1.0);
    let mut b = B::new(
        AdamaxConfig {
            weight_decay: 0.0,
            ..config()
        },
        &init,
    )?;
    b.opt().set_tensor_hyper(
        0,
        TensorHyper {
            lr_scale: 0.0,
            weight_decay: 0.0,
        },
    )?;
    b.step(&values(1, 0.1))?;
    let after = b.params()?;
    if bits(&after[..1]) != bits(&init[..1]) || bits(&after[3..]) == bits(&init[3..]) {
        return Err("lr_scale 0 must freeze tensor 0 and only it".into());
    }
    b.opt().set_lr(0.0)?;
    b.step(&values(2, 0.1))?;
    if bits(&b.params()?) != bits(&after) || b.opt().step_count()? != 2 {
        return Err("lr 0 must count the step and move nothing".into());
    }
    Ok(())
}

fn the_loss_scale_follows_grad_scalers_rule<T: GpuStorage, B: Backend<T>>() -> R {
    use common::{SCALER_INF_STEPS, SCALER_SCALES};
    let mut b = B::new(config(), &values::<T>(0, 1.0))?;
    b.opt().set_loss_scaler(Some(LossScaler {
        scale: 1024.0,
        growth_interval: 2,
        ..Default::default()
    }))?;
    for (t, &scale) in SCALER_SCALES.iter().enumerate() {
        let got = b.opt().loss_scaler()?.map(|s| s.scale);
        if got != Some(scale) {
            return Err(format!("step {t}: scale {got:?}, expected {scale}").into());
        }
        let mut g = values::<T>(t + 1, 0.1 * scale);
        if SCALER_INF_STEPS.contains(&t) {
            g[0][5] = T::from_f32(f32::INFINITY);
        }
        b.step(&g)?;
        if b.opt().last_report()?.skipped != SCALER_INF_STEPS.contains(&t) {
            return Err(format!("step {t}: skip decision").into());
        }
    }
    Ok(())
}

/// Tensors without a gradient in a step are skipped: not touched, no weight decay, and
/// their own step count (PyTorch's per-parameter step) does not advance, so a tensor
/// skipped in some steps ends bit-identical to an optimizer over that tensor alone that
/// saw only its steps.
fn tensors_without_a_gradient_are_skipped_and_keep_their_count<T: GpuStorage, B: Backend<T>>() -> R
{
    let init = values::<T>(0, 1.0);
    let mut b = B::new(config(), &init)?;
    let mut alone: Vec<B> = init
        .iter()
        .map(|t| B::new(config(), std::slice::from_ref(t)))
        .collect::<R<_>>()?;
    // Tensor 1 has no gradient in steps 2 and 3, tensor 3 none in step 4.
    let absent = |t: usize, i: usize| (i == 1 && (t == 2 || t == 3)) || (i == 3 && t == 4);
    for t in 1..=6 {
        let g: Vec<Option<Vec<T>>> = values::<T>(t, 0.1)
            .into_iter()
            .enumerate()
            .map(|(i, g)| (!absent(t, i)).then_some(g))
            .collect();
        let before = b.params()?;
        b.step_some(&g)?;
        let after = b.params()?;
        for (i, g) in g.iter().enumerate() {
            match g {
                Some(g) => alone[i].step(std::slice::from_ref(g))?,
                None if bits(&after[i..=i]) != bits(&before[i..=i]) => {
                    return Err(format!("step {t}: tensor {i} moved without a gradient").into())
                }
                None => {}
            }
        }
    }
    let state = b.opt().state()?;
    for (i, a) in alone.iter_mut().enumerate() {
        if bits(&b.params()?[i..=i]) != bits(&a.params()?) || state[i] != a.opt().state()?[0] {
            return Err(format!("tensor {i} differs from its optimizer alone").into());
        }
    }
    let steps: Vec<u64> = state.iter().map(|s| s.step).collect();
    if steps != [6, 4, 6, 5] || b.opt().step_count()? != 6 {
        return Err(format!("step counts {steps:?}").into());
    }
    Ok(())
}

fn a_full_step_counter_refuses_the_step<T: GpuStorage, B: Backend<T>>() -> R {
    let mut b = B::new(config(), &values::<T>(0, 1.0))?;
    let mut ck = b.opt().checkpoint()?;
    ck.step = u64::MAX;
    b.opt().restore(&ck)?;
    let before = snapshot(&mut b)?;
    match b.step(&values(1, 0.1)) {
        Err(Error::StepOverflow(u64::MAX)) => {}
        other => return Err(format!("expected StepOverflow, got {other:?}").into()),
    }
    if snapshot(&mut b)? != before {
        return Err("a refused step changed something".into());
    }
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let gpu = gpu_stream().is_some();
    if !gpu {
        eprintln!("no CUDA device visible: the GPU scenarios are ignored");
    }
    let mut trials = Vec::new();
    // A scenario on the CPU, the GPU and the GPU's flat path, in the default modes or,
    // with `lean`, in the modes that move the fewest bytes.
    macro_rules! scenario {
        ($f:ident, $t:ty) => {
            scenario!($f, $t, "", plain)
        };
        ($f:ident, $t:ty, $prefix:literal, $modes:expr) => {
            let name = |backend: &str| {
                format!("{backend}_{}{}_{}", $prefix, stringify!($t), stringify!($f))
            };
            trials.push(Trial::test(name("cpu"), || ($modes)($f::<$t, Cpu<$t>>)));
            trials.push(
                Trial::test(name("gpu"), || ($modes)($f::<$t, Gpu<$t>>)).with_ignored_flag(!gpu),
            );
            trials.push(
                Trial::test(name("gpu_flat"), || ($modes)($f::<$t, GpuFlat<$t>>))
                    .with_ignored_flag(!gpu),
            );
        };
    }
    macro_rules! lean_scenario {
        ($f:ident, $t:ty) => {
            scenario!($f, $t, "lean_", lean::<$t>)
        };
    }
    lean_scenario!(refused_calls_change_nothing, bf16);
    lean_scenario!(a_non_finite_gradient_skips_the_whole_step, bf16);
    lean_scenario!(resuming_from_a_checkpoint_equals_an_unbroken_run, bf16);
    lean_scenario!(resuming_from_a_checkpoint_equals_an_unbroken_run, f32);
    // bf16 resumes in each of its storage modes (with the default and lean ones).
    scenario!(
        resuming_from_a_checkpoint_equals_an_unbroken_run,
        bf16,
        "sr_",
        sr
    );
    scenario!(
        resuming_from_a_checkpoint_equals_an_unbroken_run,
        bf16,
        "q8_",
        q8
    );
    lean_scenario!(learning_rate_zero_and_frozen_groups_leave_parameters, bf16);
    lean_scenario!(the_loss_scale_follows_grad_scalers_rule, f32);
    lean_scenario!(a_full_step_counter_refuses_the_step, bf16);
    scenario!(
        the_report_describes_the_last_step_and_the_settings_in_force,
        f32
    );
    scenario!(
        the_report_describes_the_last_step_and_the_settings_in_force,
        bf16
    );
    lean_scenario!(
        the_report_describes_the_last_step_and_the_settings_in_force,
        bf16
    );
    scenario!(refused_calls_change_nothing, f32);
    scenario!(refused_calls_change_nothing, bf16);
    scenario!(a_non_finite_gradient_skips_the_whole_step, f32);
    scenario!(a_non_finite_gradient_skips_the_whole_step, bf16);
    scenario!(resuming_from_a_checkpoint_equals_an_unbroken_run, f32);
    scenario!(resuming_from_a_checkpoint_equals_an_unbroken_run, bf16);
    scenario!(maximize_equals_descending_the_negated_gradient, f32);
    scenario!(learning_rate_zero_and_frozen_groups_leave_parameters, f32);
    scenario!(the_loss_scale_follows_grad_scalers_rule, f32);
    scenario!(a_full_step_counter_refuses_the_step, f32);
    for (name, f) in [
        (
            "cpu_f32_tensors_without_a_gradient_are_skipped_and_keep_their_count",
            tensors_without_a_gradient_are_skipped_and_keep_their_count::<f32, Cpu<f32>>
                as fn() -> R,
        ),
        (
            "cpu_bf16_tensors_without_a_gradient_are_skipped_and_keep_their_count",
            tensors_without_a_gradient_are_skipped_and_keep_their_count::<bf16, Cpu<bf16>>,
        ),
    ] {
        trials.push(Trial::test(name, f));
    }
    for (name, f) in [
        (
            "gpu_f32_tensors_without_a_gradient_are_skipped_and_keep_their_count",
            tensors_without_a_gradient_are_skipped_and_keep_their_count::<f32, Gpu<f32>>
                as fn() -> R,
        ),
        (
            "gpu_bf16_tensors_without_a_gradient_are_skipped_and_keep_their_count",
            tensors_without_a_gradient_are_skipped_and_keep_their_count::<bf16, Gpu<bf16>>,
        ),
    ] {
        trials.push(Trial::test(name, f).with_ignored_flag(!gpu));
    }
    libtest_mimic::run(&args, trials).exit();
}
