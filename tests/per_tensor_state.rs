//! Per-tensor state formats (issue #19, part 4): an optimizer with 8-bit state keeps the
//! tensors below `Precision::min_8bit_len`, and those chosen by hand, in f32 state. The
//! reference for every expected value is the CPU reference with one format for all
//! tensors: a tensor of a mixed optimizer must step exactly as it does in an optimizer
//! whose tensors all keep its format (the random stream is keyed by the tensor's index,
//! and clipping's norm does not depend on formats, so the lists are the same).

use adamax_cuda::{
    bf16, cpu::CpuAdamax, f16, AdamaxConfig, Checkpoint, Error, LossScaler, Optimizer, ParamMode,
    Precision, StateFormat, StepOptions, Storage, WeightDecayMode, DEFAULT_MIN_8BIT_LEN,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

type R = Result<(), Box<dyn std::error::Error>>;

use StateFormat::{Blockwise8 as Q8, F32};

fn config(params: ParamMode, state: StateFormat, min_8bit_len: usize) -> AdamaxConfig {
    AdamaxConfig {
        lr: 1e-2,
        weight_decay: 0.01,
        weight_decay_mode: WeightDecayMode::Decoupled,
        precision: Precision {
            params,
            state,
            seed: 0xF04A75,
            min_8bit_len,
        },
        ..AdamaxConfig::default()
    }
}

/// Values over many orders of magnitude, some zero.
fn values<T: Storage>(rng: &mut StdRng, n: usize, scale: f32) -> Vec<T> {
    (0..n)
        .map(|_| {
            if rng.random_range(0..10) == 0 {
                return T::from_f32(0.0);
            }
            let x = rng.random_range(-1.0..1.0f32) * 10f32.powf(rng.random_range(-6.0..0.0));
            T::from_f32(x * scale)
        })
        .collect()
}

#[test]
fn the_size_threshold_keeps_small_tensors_in_f32_state() -> R {
    let lens = [4096, 4095, 0, 768, 50_000];
    let params: Vec<Vec<f32>> = lens.iter().map(|&n| vec![0.5; n]).collect();
    let refs: Vec<&[f32]> = params.iter().map(Vec::as_slice).collect();
    let q8 = config(ParamMode::Master, Q8, DEFAULT_MIN_8BIT_LEN);
    let opt = CpuAdamax::new(q8, &refs)?;
    assert_eq!(opt.tensor_state_formats(), [Q8, F32, F32, F32, Q8]);
    for (t, f) in opt.tensor_states().iter().zip(opt.tensor_state_formats()) {
        let (f32_len, codes) = (t.exp_avg.len(), t.exp_avg_q8.codes.len());
        match f {
            Q8 => assert_eq!((f32_len, codes), (0, t.len())),
            F32 => assert_eq!((f32_len, codes), (t.len(), 0)),
        }
    }
    // 0 puts every tensor in 8 bits; f32 state keeps every tensor in f32 whatever the
    // threshold says.
    let all = CpuAdamax::new(config(ParamMode::Master, Q8, 0), &refs)?;
    assert_eq!(all.tensor_state_formats(), [Q8; 5]);
    let none = CpuAdamax::new(config(ParamMode::Master, F32, 0), &refs)?;
    assert_eq!(none.tensor_state_formats(), [F32; 5]);
    // The default precision carries the default threshold, and a tensor's state made
    // from a precision follows it.
    assert_eq!(Precision::default().min_8bit_len, DEFAULT_MIN_8BIT_LEN);
    let small = adamax_cuda::TensorState::with_precision(&[0.5f32; 100], &q8.precision);
    assert_eq!(
        (small.exp_avg.len(), small.exp_avg_q8.codes.len()),
        (100, 0)
    );
    let large = adamax_cuda::TensorState::with_precision(&[0.5f32; 4096], &q8.precision);
    assert_eq!(
        (large.exp_avg.len(), large.exp_avg_q8.codes.len()),
        (0, 4096)
    );
    Ok(())
}

/// Steps a mixed optimizer and the two uniform ones side by side, with clipping, a
/// loss scaler with an overflow, and missing gradients; tensor by tensor, every bit of
/// parameters and state must equal the uniform optimizer of the tensor's format.
fn mixed_steps_as_uniform<T: Storage>(params_mode: ParamMode) -> R {
    let mut rng = StdRng::seed_from_u64(0x194);
    let lens = [3000usize, 700, 5, 0, 1300, 257];
    let init: Vec<Vec<T>> = lens.iter().map(|&n| values(&mut rng, n, 1.0)).collect();
    let refs: Vec<&[T]> = init.iter().map(Vec::as_slice).collect();
    let mut mixed = CpuAdamax::new(config(params_mode, Q8, 1000), &refs)?;
    // A small tensor put in 8 bits, a large one kept in f32, by hand.
    mixed.set_tensor_state_format(2, Q8)?;
    mixed.set_tensor_state_format(4, Q8)?;
    mixed.set_tensor_state_format(4, F32)?;
    let formats = mixed.tensor_state_formats().to_vec();
    assert_eq!(formats, [Q8, F32, Q8, F32, F32, F32]);
    let mut uniform_q8 = CpuAdamax::new(config(params_mode, Q8, 0), &refs)?;
    let mut uniform_f32 = CpuAdamax::new(config(params_mode, F32, 0), &refs)?;
    let (mut p_mixed, mut p_q8, mut p_f32) = (init.clone(), init.clone(), init.clone());
    for opt in [&mut mixed, &mut uniform_q8, &mut uniform_f32] {
        opt.set_options(StepOptions {
            max_norm: Some(0.3),
            ..Default::default()
        })?;
        opt.set_loss_scaler(Some(LossScaler {
            scale: 64.0,
            growth_interval: 3,
            ..Default::default()
        }))?;
    }
    for step in 0..12usize {
        let scale = mixed.loss_scaler()?.map_or(1.0, |s| s.scale);
        let mut grads: Vec<Option<Vec<T>>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| ((i + step) % 4 != 1).then(|| values(&mut rng, n, 0.1 * scale)))
            .collect();
        // Rare spikes after zero runs, and an overflow the scaler backs off from.
        if step == 6 {
            if let Some(g) = grads[0].as_mut() {
                g[17] = T::from_f32(30.0 * scale);
            }
        }
        // (Tensor 5 has a gradient in step 7: (5 + 7) % 4 != 1.)
        if step == 7 {
            grads[5]
                .as_mut()
                .ok_or("tensor 5 has no gradient in step 7")?[0] = T::from_f32(f32::INFINITY);
        }
        let g: Vec<Option<&[T]>> = grads.iter().map(|g| g.as_deref()).collect();
        for (opt, p) in [
            (&mut mixed, &mut p_mixed),
            (&mut uniform_q8, &mut p_q8),
            (&mut uniform_f32, &mut p_f32),
        ] {
            let mut views: Vec<&mut [T]> = p.iter_mut().map(Vec::as_mut_slice).collect();
            opt.step_some(&mut views, &g)?;
        }
        assert_eq!(
            mixed.last_report()?,
            uniform_f32.last_report()?,
            "step {step}"
        );
        assert_eq!(
            mixed.last_report()?.skipped,
            step == 7,
            "step {step}: skips step 7 only"
        );
        for (i, f) in formats.iter().enumerate() {
            let (opt, p) = match f {
                Q8 => (&uniform_q8, &p_q8),
                F32 => (&uniform_f32, &p_f32),
            };
            assert_eq!(
                mixed.tensor_states()[i],
                opt.tensor_states()[i],
                "{} {params_mode:?} step {step} tensor {i} ({f:?})",
                T::NAME
            );
            assert_eq!(p_mixed[i], p[i], "{} step {step} tensor {i}", T::NAME);
        }
    }
    Ok(())
}

#[test]
fn each_tensor_steps_as_an_optimizer_of_its_own_format_would() -> R {
    mixed_steps_as_uniform::<f32>(ParamMode::Master)?;
    mixed_steps_as_uniform::<f16>(ParamMode::Master)?;
    mixed_steps_as_uniform::<bf16>(ParamMode::Master)?;
    mixed_steps_as_uniform::<bf16>(ParamMode::Stochastic)
}

#[test]
fn formats_are_chosen_before_the_first_step_and_only_with_8_bit_state() -> R {
    let (mut a, mut b) = (vec![0.5f32; 5000], vec![0.5f32; 10]);
    let refused = |r: adamax_cuda::Result<()>, says: &str| match r {
        Err(e @ Error::StateFormat { .. }) => {
            assert!(e.to_string().contains(says), "{e}")
        }
        other => panic!("{other:?}"),
    };
    let mut plain = CpuAdamax::new(config(ParamMode::Master, F32, 0), &[&a, &b])?;
    refused(
        plain.set_tensor_state_format(1, Q8),
        "build it with StateFormat::Blockwise8",
    );
    // Choosing the format a tensor has is no change, and always allowed.
    plain.set_tensor_state_format(1, F32)?;
    let mut opt = CpuAdamax::new(config(ParamMode::Master, Q8, 100), &[&a, &b])?;
    assert!(matches!(
        opt.set_tensor_state_format(2, F32),
        Err(Error::TensorIndexOutOfRange { index: 2, count: 2 })
    ));
    opt.set_tensor_state_format(0, F32)?;
    opt.set_tensor_state_format(0, Q8)?;
    opt.step(&mut [&mut a, &mut b], &[&[0.1; 5000], &[0.1; 10]])?;
    let stepped = opt.tensor_states().to_vec();
    refused(
        opt.set_tensor_state_format(0, F32),
        "a step was called on this optimizer (one skipped for a non-finite gradient counts too); state formats are chosen before the first step",
    );
    // The format it has: no change, the state kept.
    opt.set_tensor_state_format(0, Q8)?;
    assert_eq!(opt.tensor_states(), stepped);
    let ck = opt.checkpoint()?;
    let mut fresh = CpuAdamax::new(config(ParamMode::Master, Q8, 100), &[&a, &b])?;
    fresh.restore(&ck)?;
    refused(
        fresh.set_tensor_state_format(1, Q8),
        "the optimizer has restored a checkpoint",
    );
    Ok(())
}

#[test]
fn a_restore_refuses_other_formats_and_takes_them_once_chosen() -> R {
    let (mut a, mut b) = (
        vec![bf16::from_f32(0.5); 5000],
        vec![bf16::from_f32(0.5); 300],
    );
    let q8 = config(ParamMode::Stochastic, Q8, DEFAULT_MIN_8BIT_LEN);
    let mut opt = CpuAdamax::new(q8, &[&a, &b])?;
    opt.set_tensor_state_format(0, F32)?;
    let g = [
        vec![bf16::from_f32(0.1); 5000],
        vec![bf16::from_f32(-0.2); 300],
    ];
    opt.step(&mut [&mut a, &mut b], &[&g[0], &g[1]])?;
    let ck = opt.checkpoint()?;
    assert_eq!(ck.state_formats, [F32, F32]);
    let mut other = CpuAdamax::new(q8, &[&a, &b])?;
    match other.restore(&ck) {
        Err(e @ Error::StateFormat { tensor: 0, .. }) => assert!(
            e.to_string()
                .contains("the checkpoint keeps it in f32 state and this optimizer in 8-bit"),
            "{e}"
        ),
        r => panic!("{r:?}"),
    }
    // Nothing changed, and the format can still be chosen.
    assert_eq!(other.step_count()?, 0);
    other.set_tensor_state_format(0, F32)?;
    other.restore(&ck)?;
    assert_eq!(other.checkpoint()?, ck);
    // Both then step alike.
    let mut b2 = b.clone();
    let mut a2 = a.clone();
    opt.step(&mut [&mut a, &mut b], &[&g[0], &g[1]])?;
    other.step(&mut [&mut a2, &mut b2], &[&g[0], &g[1]])?;
    assert_eq!((a, b), (a2, b2));
    assert_eq!(opt.checkpoint()?, other.checkpoint()?);
    Ok(())
}

#[test]
fn converting_a_mixed_checkpoint_follows_the_threshold() -> R {
    let (mut a, mut b) = (vec![0.5f32; 5000], vec![0.5f32; 300]);
    let mut opt = CpuAdamax::new(config(ParamMode::Master, Q8, 1000), &[&a, &b])?;
    opt.step(&mut [&mut a, &mut b], &[&[0.1; 5000], &[-0.3; 300]])?;
    let ck = opt.checkpoint()?;
    assert_eq!(ck.state_formats, [Q8, F32]);
    let f32_ck = ck.convert_state(F32)?;
    assert_eq!(f32_ck.state_formats, [F32, F32]);
    assert_eq!(
        f32_ck.tensors[1], ck.tensors[1],
        "an f32 tensor is not touched"
    );
    let back = f32_ck.convert_state(Q8)?;
    assert_eq!(back.state_formats, [Q8, F32]);
    assert_eq!(back.tensors[1], ck.tensors[1]);
    // Decoding is exact: 8 bits -> f32 -> 8 bits gives the codes back.
    assert_eq!(back.tensors[0], ck.tensors[0]);
    Ok(())
}

#[test]
fn a_mixed_checkpoint_round_trips_through_its_file() -> R {
    let (mut a, mut b, mut c) = (
        vec![f16::from_f32(0.5); 5000],
        vec![f16::from_f32(0.5); 300],
        vec![f16::from_f32(0.5); 9000],
    );
    let mut opt = CpuAdamax::new(config(ParamMode::Master, Q8, 4096), &[&a, &b, &c])?;
    opt.set_tensor_state_format(2, F32)?;
    let g = [
        vec![f16::from_f32(0.1); 5000],
        vec![f16::from_f32(-0.2); 300],
        vec![f16::from_f32(0.3); 9000],
    ];
    opt.step(&mut [&mut a, &mut b, &mut c], &[&g[0], &g[1], &g[2]])?;
    let ck = opt.checkpoint()?;
    let bytes = ck.to_bytes()?;
    let back = Checkpoint::from_bytes(&bytes)?;
    assert_eq!(back, ck);
    assert_eq!(back.config.precision.min_8bit_len, 4096);
    let text = String::from_utf8_lossy(&bytes[8..]);
    assert!(text.contains(r#""tensor.1.state_format":"f32""#), "{text}");
    assert!(text.contains(r#""tensor.2.state_format":"f32""#));
    assert!(!text.contains("tensor.0.state_format"));
    assert!(text.contains(r#""min_8bit_len":"4096""#));
    Ok(())
}

/// GPT-2 small's parameter shapes, as the benchmarks take them (148 tensors in Hugging
/// Face order).
#[path = "../benches/common/mod.rs"]
mod bench_common;
use bench_common::gpt2_small;

/// The cost the README and `DEFAULT_MIN_8BIT_LEN`'s docs quote for the default
/// threshold, computed from the modes table (`Precision::state_bytes`): in GPT-2 small
/// it keeps every bias and norm gain (121,344 parameters, 0.098%) in f32 state, for
/// 724,272 bytes more than 8 bits (0.29% of the 8-bit state), with f32 parameters.
#[test]
fn the_default_thresholds_cost_on_gpt2_small_is_as_documented() -> R {
    let lens = gpt2_small();
    assert_eq!(lens.iter().sum::<usize>(), 124_439_808);
    let q8 = Precision {
        state: Q8,
        ..Precision::default()
    };
    let every_tensor_8bit = Precision {
        min_8bit_len: 0,
        ..q8
    };
    let storage = adamax_cuda::StorageType::F32;
    let (mut small, mut extra, mut all_8bit) = (0usize, 0u64, 0u64);
    for &n in &lens {
        let eight = every_tensor_8bit.state_bytes(storage, n)?;
        all_8bit += eight;
        if q8.tensor_state(n) == F32 {
            small += n;
            // state_bytes follows the threshold: a small tensor's are f32 state's.
            assert_eq!(q8.state_bytes(storage, n)?, 8 * n as u64);
            extra += q8.state_bytes(storage, n)? - eight;
        } else {
            assert_eq!(q8.state_bytes(storage, n)?, eight);
        }
    }
    assert_eq!(small, 121_344);
    assert_eq!(extra, 724_272);
    assert_eq!(
        format!("{:.3}%", 100.0 * small as f64 / 124_439_808.0),
        "0.098%"
    );
    assert_eq!(
        format!("{:.2}%", 100.0 * extra as f64 / all_8bit as f64),
        "0.29%"
    );
    Ok(())
}

/// What a hostile review of the per-tensor API found (issue #19, part 4), each pinned.
#[test]
fn hostile_review_findings_stay_fixed() -> R {
    let (mut a, mut b, mut c) = (vec![0.5f32; 5000], vec![0.5f32; 100], vec![0.5f32; 300]);
    let g = [vec![0.1f32; 5000], vec![-0.2; 100], vec![0.3; 300]];
    // 1. An f32-state checkpoint keeps its threshold through a file, so converting it
    //    to 8 bits after a load gives the formats it gives before.
    for min_8bit_len in [DEFAULT_MIN_8BIT_LEN, 200] {
        let mut plain =
            CpuAdamax::new(config(ParamMode::Master, F32, min_8bit_len), &[&a, &b, &c])?;
        plain.step(&mut [&mut a, &mut b, &mut c], &[&g[0], &g[1], &g[2]])?;
        let ck = plain.checkpoint()?;
        let loaded = Checkpoint::from_bytes(&ck.to_bytes()?)?;
        assert_eq!(loaded.config.precision.min_8bit_len, min_8bit_len);
        let (x, mut y) = (ck.convert_state(Q8)?, loaded.convert_state(Q8)?);
        // (A deterministic mode's file keeps no seed: the 8-bit run's is set anew.)
        y.config.precision.seed = x.config.precision.seed;
        assert!(x == y);
        let expected = if min_8bit_len == 200 {
            [Q8, F32, Q8]
        } else {
            [Q8, F32, F32]
        };
        assert_eq!(x.state_formats, expected);
    }
    // 3. Converting an 8-bit checkpoint to 8 bits changes nothing, and a checkpoint can be
    //    put in any optimizer's formats.
    let mut opt = CpuAdamax::new(config(ParamMode::Master, Q8, 4096), &[&a, &b, &c])?;
    opt.set_tensor_state_format(0, F32)?;
    opt.set_tensor_state_format(1, Q8)?;
    opt.step(&mut [&mut a, &mut b, &mut c], &[&g[0], &g[1], &g[2]])?;
    let ck = opt.checkpoint()?;
    assert_eq!(ck.state_formats, [F32, Q8, F32]);
    assert_eq!(ck.convert_state(Q8)?, ck);
    let mut other = CpuAdamax::new(config(ParamMode::Master, Q8, 4096), &[&a, &b, &c])?;
    assert!(matches!(other.restore(&ck), Err(Error::StateFormat { .. })));
    other.restore(&ck.with_state_formats(other.tensor_state_formats())?)?;
    assert_eq!(other.tensor_state_formats(), [Q8, F32, F32]);
    let back = other.checkpoint()?.with_state_formats(&ck.state_formats)?;
    assert_eq!(back.state_formats, ck.state_formats);
    // f32 moments survive the round trip through 8 bits only as well as 8 bits hold them;
    // 8-bit ones decode exactly and come back as they were.
    assert_eq!(back.tensors[1], ck.tensors[1]);
    assert!(matches!(
        ck.with_state_formats(&[F32]),
        Err(Error::Checkpoint { .. })
    ));
    // An f32-state checkpoint becomes an 8-bit one when a tensor is put in 8 bits.
    let plain =
        CpuAdamax::new(config(ParamMode::Master, F32, 4096), &[&a, &b, &c])?.checkpoint()?;
    let mixed = plain.with_state_formats(&[Q8, F32, F32])?;
    assert_eq!(mixed.config.precision.state, Q8);
    // 4. Sizes follow the threshold.
    let p = config(ParamMode::Master, Q8, 4096).precision;
    let f32_storage = adamax_cuda::StorageType::F32;
    assert_eq!(p.state_bytes(f32_storage, 300)?, 2400);
    assert_eq!(p.bytes_moved(f32_storage, 300)?, 28 * 300);
    assert_eq!(p.state_bytes(f32_storage, 4096)?, 2 * 4096 + 2 * 4 * 16);
    Ok(())
}
