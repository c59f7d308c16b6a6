//! Behaviour of the CPU reference that the peers do not pin down: the paper's own
//! properties, the zero-history rule, non-finite gradients, and refusals of bad input
//! that leave every buffer untouched.

use adamax_cuda::{
    bf16, cpu::CpuAdamax, f16, spec::powi_exact, AdamaxConfig, EpsilonMode, Error, Optimizer,
    Storage, WeightDecayMode,
};

fn config(eps: f64, eps_mode: EpsilonMode) -> AdamaxConfig {
    AdamaxConfig {
        eps,
        eps_mode,
        ..AdamaxConfig::default()
    }
}

#[test]
fn first_step_moves_each_parameter_by_lr_against_the_gradient_sign() {
    // Kingma & Ba 2015, sec. 7.1: with eps = 0, m_1 = (1-b1) g and u_1 = |g|, so the
    // first update is lr / (1-b1) * (1-b1) g / |g| = lr * sign(g).
    for mode in [EpsilonMode::InsideMax, EpsilonMode::Denominator] {
        let mut p = vec![1.0f32, -2.0, 0.25, 3.0];
        let g = [0.5f32, -1e-3, 7.0, -40.0];
        let mut opt = CpuAdamax::new(config(0.0, mode), &[&p]).unwrap();
        opt.step(&mut [&mut p], &[&g]).unwrap();
        for (x, (p0, g)) in
            p.iter()
                .zip([(1.0f32, 0.5f32), (-2.0, -1e-3), (0.25, 7.0), (3.0, -40.0)])
        {
            let expected = f64::from(p0) - 2e-3 * f64::from(g.signum());
            assert!(
                (f64::from(*x) - expected).abs() <= 2.5e-7,
                "{x} vs {expected}"
            );
        }
    }
}

#[test]
fn matches_the_papers_algorithm_evaluated_in_f64() {
    // Algorithm of sec. 7.1 written out independently in f64 (eps = 0 as in the paper).
    let (lr, b1, b2) = (2e-3f64, 0.9f64, 0.999f64);
    let grads: Vec<[f32; 3]> = (0..30)
        .map(|t| {
            let t = t as f32;
            [
                (t * 0.7).sin(),
                0.01 * (t * 1.3).cos(),
                if t < 5.0 { 0.0 } else { -(t * 0.1) },
            ]
        })
        .collect();
    let init = [0.3f32, -0.7, 1.5];
    let (mut th, mut m, mut u) = (init.map(f64::from), [0.0f64; 3], [0.0f64; 3]);
    let mut p = init;
    let mut opt = CpuAdamax::new(config(0.0, EpsilonMode::InsideMax), &[&p]).unwrap();
    for (t, g) in grads.iter().enumerate() {
        opt.step(&mut [&mut p], &[g]).unwrap();
        for i in 0..3 {
            let gi = f64::from(g[i]);
            m[i] = b1 * m[i] + (1.0 - b1) * gi;
            u[i] = (b2 * u[i]).max(gi.abs());
            if u[i] > 0.0 {
                th[i] -= lr / (1.0 - b1.powi(t as i32 + 1)) * m[i] / u[i];
            }
            // 30 steps of a few f32 roundings each on values of magnitude <= 2.
            assert!(
                (f64::from(p[i]) - th[i]).abs() < 2e-6,
                "step {t} elem {i}: {} vs {}",
                p[i],
                th[i]
            );
        }
    }
}

fn zero_history_is_finite<T: Storage>() {
    for eps in [0.0, 1e-8] {
        for mode in [EpsilonMode::InsideMax, EpsilonMode::Denominator] {
            for (wd, wd_mode) in [
                (0.0, WeightDecayMode::Coupled),
                (0.1, WeightDecayMode::Coupled),
                (0.1, WeightDecayMode::Decoupled),
            ] {
                let c = AdamaxConfig {
                    weight_decay: wd,
                    weight_decay_mode: wd_mode,
                    ..config(eps, mode)
                };
                let init: Vec<T> = [0.5f32, -1.0, 0.0].map(T::from_f32).to_vec();
                let mut p = init.clone();
                let zeros = vec![T::from_f32(0.0); 3];
                let mut opt = CpuAdamax::new(c, &[&p]).unwrap();
                for _ in 0..25 {
                    opt.step(&mut [&mut p], &[&zeros]).unwrap();
                }
                let st = &opt.tensor_states()[0];
                let all = p
                    .iter()
                    .map(|x| x.to_f32())
                    .chain(st.exp_avg.iter().copied())
                    .chain(st.exp_inf.iter().copied());
                for v in all.chain(st.master.iter().copied()) {
                    assert!(
                        v.is_finite(),
                        "{} eps={eps} {mode:?} wd={wd} {wd_mode:?}: {v}",
                        T::NAME
                    );
                }
                if wd == 0.0 {
                    assert_eq!(
                        p,
                        init,
                        "{}: zero gradients and no decay leave parameters unchanged",
                        T::NAME
                    );
                }
            }
        }
    }
}

#[test]
fn zero_gradient_history_never_produces_nan_for_any_eps_or_storage() {
    zero_history_is_finite::<f32>();
    zero_history_is_finite::<f16>();
    zero_history_is_finite::<bf16>();
}

#[test]
fn a_zero_denominator_gives_a_zero_update_even_with_momentum_left() {
    // beta2 = 0 lets u fall to 0 as soon as the gradient does, while m keeps momentum.
    // The rule defines the update for den == 0 as 0 (documented in adamax_cuda::cpu).
    let c = AdamaxConfig {
        beta2: 0.0,
        ..config(0.0, EpsilonMode::Denominator)
    };
    let mut p = [1.0f32];
    let mut opt = CpuAdamax::new(c, &[&p]).unwrap();
    opt.step(&mut [&mut p], &[&[1.0]]).unwrap();
    let after_first = p[0];
    opt.step(&mut [&mut p], &[&[0.0]]).unwrap();
    assert_eq!(opt.tensor_states()[0].exp_inf[0], 0.0);
    assert!(opt.tensor_states()[0].exp_avg[0] > 0.0);
    assert_eq!(p[0], after_first);
}

#[test]
fn the_rules_maximum_orders_plus_zero_above_minus_zero() {
    // u = -0.0 reaches the rule only from a file (one written before the spec took
    // beta2 = -0.0 as +0.0). The maximum is IEEE 754-2019's, +0.0 > -0.0, as PTX's
    // max.NaN.f32 is (the kernel's on sm_80 and later), so that u becomes +0.0 on both.
    use adamax_cuda::spec::{update, StepScalars};
    for mode in [EpsilonMode::InsideMax, EpsilonMode::Denominator] {
        let s = StepScalars::new(&config(0.0, mode), 1);
        for g in [0.0f32, -0.0] {
            let e = update(&s, 1.0, g, 0.0, -0.0);
            assert_eq!(e.exp_inf.to_bits(), 0, "{mode:?}, g {g}: u is +0.0");
            assert_eq!(e.param, 1.0);
        }
        // NaN still wins.
        assert!(update(&s, 1.0, f32::NAN, 0.0, 1.0).exp_inf.is_nan());
    }
}

#[test]
fn nan_and_infinite_gradients_poison_the_parameter_like_pytorch() {
    // torch.maximum propagates NaN, and inf/inf is NaN: PyTorch's Adamax gives the same.
    let mut p = [1.0f32, 1.0, 1.0];
    let mut opt = CpuAdamax::new(AdamaxConfig::default(), &[&p]).unwrap();
    opt.step(&mut [&mut p], &[&[f32::NAN, f32::INFINITY, 0.5]])
        .unwrap();
    let st = &opt.tensor_states()[0];
    assert!(p[0].is_nan() && st.exp_avg[0].is_nan() && st.exp_inf[0].is_nan());
    assert!(p[1].is_nan() && st.exp_avg[1] == f32::INFINITY && st.exp_inf[1] == f32::INFINITY);
    assert!(p[2].is_finite(), "other elements are unaffected");
}

#[test]
fn maximize_is_exactly_a_negated_gradient() {
    let g = [0.3f32, -0.01, 2.0];
    let neg = g.map(|x| -x);
    let (mut a, mut b) = ([0.1f32, 0.2, 0.3], [0.1f32, 0.2, 0.3]);
    let wd = AdamaxConfig {
        weight_decay: 0.05,
        ..AdamaxConfig::default()
    };
    let mut max = CpuAdamax::new(
        AdamaxConfig {
            maximize: true,
            ..wd
        },
        &[&a],
    )
    .unwrap();
    let mut min = CpuAdamax::new(wd, &[&b]).unwrap();
    for _ in 0..5 {
        max.step(&mut [&mut a], &[&g]).unwrap();
        min.step(&mut [&mut b], &[&neg]).unwrap();
    }
    assert_eq!(a, b);
}

fn sixteen_bit_copy_is_the_rounded_master<T: Storage>() {
    let init: Vec<T> = (0..50)
        .map(|i| T::from_f32((i as f32 * 0.37).sin()))
        .collect();
    let mut p = init.clone();
    let mut opt = CpuAdamax::new(
        AdamaxConfig {
            lr: 3e-4,
            ..AdamaxConfig::default()
        },
        &[&p],
    )
    .unwrap();
    let master0: Vec<f32> = init.iter().map(|x| x.to_f32()).collect();
    assert_eq!(
        opt.tensor_states()[0].master,
        master0,
        "master starts as the widened parameter"
    );
    for t in 0..20 {
        let g: Vec<T> = (0..50)
            .map(|i| T::from_f32(((i + t) as f32 * 1.1).cos()))
            .collect();
        opt.step(&mut [&mut p], &[&g]).unwrap();
        for (x, m) in p.iter().zip(&opt.tensor_states()[0].master) {
            assert_eq!(x.to_f32().to_bits(), T::from_f32(*m).to_f32().to_bits());
        }
    }
    // lr 3e-4 is below half a 16-bit ulp for most values: without a master the
    // parameter would never move; with one, small steps accumulate.
    assert_ne!(
        p,
        init,
        "{}: masters accumulate updates below 16-bit resolution",
        T::NAME
    );
}

#[test]
fn sixteen_bit_parameters_are_the_round_to_nearest_even_of_their_f32_master() {
    sixteen_bit_copy_is_the_rounded_master::<f16>();
    sixteen_bit_copy_is_the_rounded_master::<bf16>();
}

#[test]
fn bad_lists_are_refused_and_leave_everything_untouched() {
    let mut a = vec![1.0f32; 4];
    let mut b = vec![2.0f32; 3];
    let mut opt = CpuAdamax::new(AdamaxConfig::default(), &[&a, &b]).unwrap();
    opt.step(&mut [&mut a, &mut b], &[&[0.1; 4], &[0.2; 3]])
        .unwrap();
    let (a0, b0, state0) = (a.clone(), b.clone(), opt.tensor_states().to_vec());

    let err = opt.step(&mut [&mut a], &[&[0.1; 4]]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::TensorCountMismatch {
                what: "params",
                expected: 2,
                found: 1
            }
        ),
        "{err}"
    );
    let err = opt.step(&mut [&mut a, &mut b], &[&[0.1; 4]]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::TensorCountMismatch {
                what: "grads",
                expected: 2,
                found: 1
            }
        ),
        "{err}"
    );
    // The bad gradient is the second tensor's, so the first must not have been stepped.
    let err = opt
        .step(&mut [&mut a, &mut b], &[&[0.1; 4], &[0.2; 5]])
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::LengthMismatch {
                what: "grad",
                tensor: 1,
                expected: 3,
                found: 5
            }
        ),
        "{err}"
    );
    let mut short = vec![1.0f32; 2];
    let err = opt
        .step(&mut [&mut a, &mut short], &[&[0.1; 4], &[0.2; 3]])
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::LengthMismatch {
                what: "param",
                tensor: 1,
                expected: 3,
                found: 2
            }
        ),
        "{err}"
    );

    assert_eq!((a, b), (a0, b0));
    assert_eq!(opt.tensor_states(), state0.as_slice());
    assert_eq!(opt.step_count().unwrap(), 1);
}

#[test]
fn an_empty_list_is_refused_and_empty_tensors_are_fine() {
    let err = CpuAdamax::<f32>::new(AdamaxConfig::default(), &[]).unwrap_err();
    assert!(matches!(err, Error::EmptyParameterList), "{err}");
    assert!(err.to_string().contains("empty parameter list"));

    let mut empty: Vec<f16> = Vec::new();
    let mut one = vec![f16::from_f32(1.0)];
    let mut opt = CpuAdamax::new(AdamaxConfig::default(), &[&empty, &one]).unwrap();
    opt.step(&mut [&mut empty, &mut one], &[&[], &[f16::from_f32(1.0)]])
        .unwrap();
    assert_eq!(opt.step_count().unwrap(), 1);
    assert!(opt.tensor_states()[0].exp_avg.is_empty());
    assert!(one[0].to_f32() < 1.0);
}

#[test]
fn bias_correction_power_is_exact_repeated_multiplication() {
    assert_eq!(powi_exact(0.9, 0), 1.0);
    assert_eq!(powi_exact(0.9, 1), 0.9);
    assert_eq!(powi_exact(0.5, 10), 1.0 / 1024.0);
    for t in [2u64, 3, 17, 1000, 123_456] {
        let (a, b) = (powi_exact(0.999, t), 0.999f64.powf(t as f64));
        // Each squaring doubles the relative error of the base, so after the ~log2(t)
        // squarings and multiplications the error is at most about t roundings of f64.
        let bound = t as f64 * f64::EPSILON;
        assert!(((a - b) / b).abs() <= bound, "t={t}: {a} vs {b}");
    }
}

#[test]
fn per_tensor_hyperparameters_match_separate_optimizers_bit_for_bit() {
    use adamax_cuda::TensorHyper;
    // Parameter groups, the reference: a tensor with lr_scale s and weight decay w steps
    // exactly like a one-tensor optimizer configured with lr * s and w.
    for mode in [WeightDecayMode::Coupled, WeightDecayMode::Decoupled] {
        let base = AdamaxConfig {
            lr: 3e-3,
            weight_decay: 0.05,
            weight_decay_mode: mode,
            ..AdamaxConfig::default()
        };
        let hypers = [
            TensorHyper {
                lr_scale: 1.0,
                weight_decay: 0.05,
            },
            TensorHyper {
                lr_scale: 0.25,
                weight_decay: 0.0,
            },
            TensorHyper {
                lr_scale: 3.0,
                weight_decay: 0.2,
            },
        ];
        let init: Vec<Vec<f32>> = (0..3)
            .map(|k| (0..17).map(|i| ((i * 3 + k) as f32 * 0.41).sin()).collect())
            .collect();
        let mut grouped_params = init.clone();
        let refs: Vec<&[f32]> = init.iter().map(|p| p.as_slice()).collect();
        let mut grouped = CpuAdamax::new(base, &refs).unwrap();
        for (i, h) in hypers.iter().enumerate() {
            grouped.set_tensor_hyper(i, *h).unwrap();
        }
        let mut singles: Vec<(Vec<f32>, CpuAdamax<f32>)> = hypers
            .iter()
            .zip(&init)
            .map(|(h, p)| {
                let c = AdamaxConfig {
                    lr: base.lr * h.lr_scale,
                    weight_decay: h.weight_decay,
                    ..base
                };
                (p.clone(), CpuAdamax::new(c, &[p]).unwrap())
            })
            .collect();
        for t in 0..12 {
            let grads: Vec<Vec<f32>> = (0..3)
                .map(|k| {
                    (0..17)
                        .map(|i| ((i + 5 * t + k) as f32).cos() * 0.1)
                        .collect()
                })
                .collect();
            let g: Vec<&[f32]> = grads.iter().map(|x| x.as_slice()).collect();
            let mut p: Vec<&mut [f32]> = grouped_params
                .iter_mut()
                .map(|x| x.as_mut_slice())
                .collect();
            grouped.step(&mut p, &g).unwrap();
            for ((param, opt), grad) in singles.iter_mut().zip(&grads) {
                opt.step(&mut [param.as_mut_slice()], &[grad]).unwrap();
            }
        }
        for (i, (param, opt)) in singles.iter().enumerate() {
            assert_eq!(&grouped_params[i], param, "{mode:?} tensor {i}");
            assert_eq!(
                grouped.tensor_states()[i],
                opt.tensor_states()[0],
                "{mode:?} tensor {i}"
            );
        }
    }
}

#[test]
fn bad_tensor_hyperparameters_are_refused() {
    use adamax_cuda::{ConfigError, TensorHyper};
    let mut opt = CpuAdamax::new(AdamaxConfig::default(), &[&[1.0f32][..]]).unwrap();
    let err = opt
        .set_tensor_hyper(
            0,
            TensorHyper {
                lr_scale: -1.0,
                weight_decay: 0.0,
            },
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Config(ConfigError::OutOfRange {
                field: "lr_scale",
                ..
            })
        ),
        "{err}"
    );
    let err = opt
        .set_tensor_hyper(
            0,
            TensorHyper {
                lr_scale: 1.0,
                weight_decay: f64::NAN,
            },
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Config(ConfigError::NotFinite {
                field: "weight_decay",
                ..
            })
        ),
        "{err}"
    );
    let fine = TensorHyper {
        lr_scale: 1.0,
        weight_decay: 0.0,
    };
    for index in [1, usize::MAX] {
        let err = opt.set_tensor_hyper(index, fine).unwrap_err();
        assert!(
            matches!(err, Error::TensorIndexOutOfRange { index: i, count: 1 } if i == index),
            "{err}"
        );
    }
    assert_eq!(
        opt.tensor_hypers(),
        &[TensorHyper::from_config(&AdamaxConfig::default())]
    );
}
