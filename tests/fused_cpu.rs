//! The fused features on the CPU reference: overflow skips leave everything untouched,
//! the global norm is the norm, and bad options are refused. (Their agreement with
//! PyTorch's GradScaler and clip_grad_norm_ is in tests/peer_trajectories.rs.)

mod common;

use adamax_cuda::{
    cpu::CpuAdamax, f16, AdamaxConfig, ConfigError, Error, LossScaler, Optimizer, StepOptions,
    Storage,
};
use common::{SCALER_INF_STEPS, SCALER_SCALES};

fn grads_with<T: Storage>(
    lens: &[usize],
    t: usize,
    poison: Option<(usize, usize, f32)>,
) -> Vec<Vec<T>> {
    let mut g: Vec<Vec<T>> = lens
        .iter()
        .enumerate()
        .map(|(k, &n)| {
            (0..n)
                .map(|i| T::from_f32(((i * 7 + k * 3 + t) as f32 * 0.37).sin() * 0.5))
                .collect()
        })
        .collect();
    if let Some((k, i, v)) = poison {
        g[k][i] = T::from_f32(v);
    }
    g
}

fn step<T: Storage>(opt: &mut CpuAdamax<T>, params: &mut [Vec<T>], grads: &[Vec<T>]) {
    let mut p: Vec<&mut [T]> = params.iter_mut().map(|x| x.as_mut_slice()).collect();
    let g: Vec<&[T]> = grads.iter().map(|x| x.as_slice()).collect();
    opt.step(&mut p, &g).unwrap();
}

#[test]
fn a_non_finite_gradient_skips_the_whole_step_bit_for_bit() {
    let lens = [9000usize, 5, 300];
    for poison in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut params: Vec<Vec<f16>> =
            lens.iter().map(|&n| vec![f16::from_f32(0.25); n]).collect();
        let refs: Vec<&[f16]> = params.iter().map(|p| p.as_slice()).collect();
        let mut opt = CpuAdamax::new(AdamaxConfig::default(), &refs).unwrap();
        opt.set_loss_scaler(Some(LossScaler {
            scale: 256.0,
            ..LossScaler::default()
        }))
        .unwrap();
        step(&mut opt, &mut params, &grads_with(&lens, 0, None));
        let (params_before, ck_before) = (params.clone(), opt.checkpoint().unwrap());
        // One bad element, in the last tensor, far from the others.
        step(
            &mut opt,
            &mut params,
            &grads_with(&lens, 1, Some((2, 299, poison))),
        );
        let r = opt.last_report().unwrap();
        assert!(r.skipped, "{poison}");
        assert_eq!(r.step, 1);
        assert_eq!(params, params_before, "{poison}: parameters changed");
        // Everything but the loss scaler, which backs off (checked below).
        let ck_after = opt.checkpoint().unwrap();
        assert_eq!(
            (ck_after.step, &ck_after.tensors, ck_after.config),
            (ck_before.step, &ck_before.tensors, ck_before.config),
            "{poison}: state, masters or step changed"
        );
        assert_eq!(r.loss_scale, Some(128.0), "backoff halves the scale");
        step(&mut opt, &mut params, &grads_with(&lens, 2, None));
        assert!(!opt.last_report().unwrap().skipped && opt.step_count().unwrap() == 2);
    }
}

#[test]
fn skip_nonfinite_works_without_unscaling_and_is_off_by_default() {
    let mut p = vec![vec![1.0f32; 4]];
    let mut opt = CpuAdamax::new(AdamaxConfig::default(), &[&p[0]]).unwrap();
    step(&mut opt, &mut p, &[vec![0.1, f32::NAN, 0.1, 0.1]]);
    assert!(
        !opt.last_report().unwrap().skipped && p[0][1].is_nan(),
        "without the check NaN flows in, as in PyTorch"
    );
    let mut p = vec![vec![1.0f32; 4]];
    let mut opt = CpuAdamax::new(AdamaxConfig::default(), &[&p[0]]).unwrap();
    opt.set_options(StepOptions {
        skip_nonfinite: true,
        ..Default::default()
    })
    .unwrap();
    step(&mut opt, &mut p, &[vec![0.1, f32::NAN, 0.1, 0.1]]);
    assert!(opt.last_report().unwrap().skipped && p[0] == vec![1.0; 4]);
}

#[test]
fn the_reported_norm_is_the_global_l2_norm_and_clipping_bounds_the_update() {
    let lens = [20_000usize, 3, 777];
    let grads = grads_with::<f32>(&lens, 5, None);
    let exact: f64 = grads
        .iter()
        .flatten()
        .map(|&g| f64::from(g) * f64::from(g))
        .sum::<f64>()
        .sqrt();
    let mut params: Vec<Vec<f32>> = lens.iter().map(|&n| vec![0.0; n]).collect();
    let refs: Vec<&[f32]> = params.iter().map(|p| p.as_slice()).collect();
    let mut opt = CpuAdamax::new(AdamaxConfig::default(), &refs).unwrap();
    opt.set_options(StepOptions {
        max_norm: Some(1.0),
        inv_scale: Some(0.5),
        ..Default::default()
    })
    .unwrap();
    step(&mut opt, &mut params, &grads);
    let r = opt.last_report().unwrap();
    // The norm is of the unscaled gradients (g * 0.5); f32 partials of 8192 terms each.
    let norm = f64::from(r.total_norm.unwrap());
    assert!(
        (norm - exact * 0.5).abs() / (exact * 0.5) < 1e-6,
        "{norm} vs {}",
        exact * 0.5
    );
    let expected_coef = 1.0 / (norm + 1e-6);
    assert!((f64::from(r.clip_coef) - expected_coef).abs() < 1e-6 * expected_coef);
    // A clipped first step still moves each parameter by lr * sign(g) (AdaMax is
    // invariant to gradient scale on its first step), so clipping shows in m, not theta.
    let m0 = opt.tensor_states()[0].exp_avg[1];
    assert!(
        (f64::from(m0) - 0.1 * f64::from(grads[0][1]) * 0.5 * f64::from(r.clip_coef)).abs() < 1e-7
    );
}

#[test]
fn bad_options_and_scalers_are_refused() {
    let mut opt = CpuAdamax::new(AdamaxConfig::default(), &[&[1.0f32][..]]).unwrap();
    for (o, field) in [
        (
            StepOptions {
                inv_scale: Some(0.0),
                ..Default::default()
            },
            "inv_scale",
        ),
        (
            StepOptions {
                inv_scale: Some(f32::INFINITY),
                ..Default::default()
            },
            "inv_scale",
        ),
        (
            StepOptions {
                max_norm: Some(-1.0),
                ..Default::default()
            },
            "max_norm",
        ),
        (
            StepOptions {
                max_norm: Some(f32::NAN),
                ..Default::default()
            },
            "max_norm",
        ),
    ] {
        let err = opt.set_options(o).unwrap_err();
        assert!(err.to_string().contains(field), "{err}");
    }
    for (s, field) in [
        (
            LossScaler {
                scale: 0.0,
                ..LossScaler::default()
            },
            "scale",
        ),
        (
            LossScaler {
                growth_factor: 1.0,
                ..LossScaler::default()
            },
            "growth_factor",
        ),
        (
            LossScaler {
                backoff_factor: 1.0,
                ..LossScaler::default()
            },
            "backoff_factor",
        ),
        (
            LossScaler {
                growth_interval: 0,
                ..LossScaler::default()
            },
            "growth_interval",
        ),
    ] {
        let err = opt.set_loss_scaler(Some(s)).unwrap_err();
        assert!(
            matches!(&err, Error::Config(ConfigError::OutOfRange { field: f, .. }) if *f == field),
            "{field}: {err}"
        );
    }
    assert_eq!(opt.loss_scaler().unwrap(), None);
}

#[test]
fn the_loss_scaler_follows_grad_scalers_rule() {
    // torch.amp.GradScaler: backoff on overflow, growth after `interval` good steps,
    // growth refused when it would overflow f32.
    let mut s = LossScaler {
        scale: 8.0,
        growth_interval: 2,
        ..LossScaler::default()
    };
    s.update(false);
    assert_eq!((s.scale, s.growth_tracker), (8.0, 1));
    s.update(false);
    assert_eq!((s.scale, s.growth_tracker), (16.0, 0));
    s.update(true);
    assert_eq!((s.scale, s.growth_tracker), (8.0, 0));
    assert_eq!(s.inv_scale(), 0.125);
    let mut big = LossScaler {
        scale: f32::MAX,
        growth_interval: 1,
        ..LossScaler::default()
    };
    big.update(false);
    assert_eq!((big.scale, big.growth_tracker), (f32::MAX, 0));
}

/// With power-of-two scales, unscaling is exact: a run whose gradients carry the
/// scaler's scale must give the bits of a run on the unscaled gradients that simply
/// leaves out the skipped steps. This pins down which scale the update divides by on a
/// growth step (the scale the gradients were made with, not the next one).
#[test]
fn with_a_loss_scaler_the_update_sees_exactly_the_unscaled_gradients() {
    let lens = [3000usize, 5, 8193];
    let init =
        |k: usize| -> Vec<f32> { (0..lens[k]).map(|i| ((i + k) as f32 * 0.3).sin()).collect() };
    let mut scaled_p: Vec<Vec<f32>> = (0..lens.len()).map(init).collect();
    let mut plain_p = scaled_p.clone();
    let refs: Vec<&[f32]> = scaled_p.iter().map(|p| p.as_slice()).collect();
    let config = AdamaxConfig {
        weight_decay: 0.01,
        ..AdamaxConfig::default()
    };
    let mut scaled = CpuAdamax::new(config, &refs).unwrap();
    let mut plain = CpuAdamax::new(config, &refs).unwrap();
    scaled
        .set_loss_scaler(Some(LossScaler {
            scale: 1024.0,
            growth_interval: 2,
            ..LossScaler::default()
        }))
        .unwrap();
    for (t, &want_scale) in SCALER_SCALES.iter().enumerate() {
        let scale = scaled.loss_scaler().unwrap().unwrap().scale;
        assert_eq!(scale, want_scale, "scale before step {t}");
        let g = grads_with::<f32>(&lens, t, None);
        let mut gs: Vec<Vec<f32>> = g
            .iter()
            .map(|x| x.iter().map(|v| v * scale).collect())
            .collect();
        let inf = SCALER_INF_STEPS.contains(&t);
        if inf {
            gs[1][3] = f32::INFINITY;
        }
        step(&mut scaled, &mut scaled_p, &gs);
        assert_eq!(scaled.last_report().unwrap().skipped, inf, "step {t}");
        if !inf {
            step(&mut plain, &mut plain_p, &g);
        }
        let bits =
            |v: &[Vec<f32>]| -> Vec<u32> { v.iter().flatten().map(|x| x.to_bits()).collect() };
        assert_eq!(bits(&scaled_p), bits(&plain_p), "parameters after step {t}");
        assert_eq!(
            scaled.tensor_states(),
            plain.tensor_states(),
            "state after step {t}"
        );
    }
}
