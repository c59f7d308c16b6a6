//! Every invalid configuration is refused with a typed error naming the field, the
//! value and the allowed range; the boundaries the docs allow are accepted.

use adamax_cuda::{
    cpu::CpuAdamax, cuda::Arch, AdamaxConfig, ConfigError, EpsilonMode, Error, LossScaler,
    Optimizer, TensorHyper, WeightDecayMode,
};

fn with(field: &str, value: f64) -> AdamaxConfig {
    let mut c = AdamaxConfig::default();
    match field {
        "lr" => c.lr = value,
        "beta1" => c.beta1 = value,
        "beta2" => c.beta2 = value,
        "eps" => c.eps = value,
        "weight_decay" => c.weight_decay = value,
        other => panic!("test table names an unknown field {other}"),
    }
    c
}

const FIELDS: [&str; 5] = ["lr", "beta1", "beta2", "eps", "weight_decay"];

#[test]
fn non_finite_values_are_refused_for_every_field() {
    for field in FIELDS {
        for value in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let err = with(field, value).validate().unwrap_err();
            match err {
                ConfigError::NotFinite { field: f, value: v } => {
                    assert_eq!(f, field);
                    assert_eq!(v.to_bits(), value.to_bits());
                }
                other => panic!("{field} = {value}: expected NotFinite, got {other:?}"),
            }
            assert!(
                err.to_string().contains(field),
                "message names the field: {err}"
            );
        }
    }
}

#[test]
fn out_of_range_values_are_refused_with_their_range() {
    let table: &[(&str, f64, &str)] = &[
        ("lr", -1e-3, "lr >= 0"),
        ("lr", -f64::MIN_POSITIVE, "lr >= 0"),
        ("beta1", -0.1, "0 <= beta1 < 1"),
        ("beta1", 1.0, "0 <= beta1 < 1"),
        ("beta1", 1.5, "0 <= beta1 < 1"),
        ("beta2", -1e-9, "0 <= beta2 < 1"),
        ("beta2", 1.0, "0 <= beta2 < 1"),
        ("eps", -1e-8, "eps >= 0"),
        ("weight_decay", -0.01, "weight_decay >= 0"),
    ];
    for &(field, value, allowed) in table {
        let err = with(field, value).validate().unwrap_err();
        assert_eq!(
            err,
            ConfigError::OutOfRange {
                field,
                value,
                allowed
            },
            "{field} = {value}"
        );
        let msg = err.to_string();
        assert!(msg.contains(field) && msg.contains(allowed), "{msg}");
    }
}

#[test]
fn boundary_values_the_docs_allow_are_accepted() {
    for (field, value) in [
        ("lr", 0.0),
        ("beta1", 0.0),
        ("beta1", 0.999_999),
        ("beta2", 0.0),
        ("eps", 0.0),
        ("weight_decay", 0.0),
        ("weight_decay", 10.0),
    ] {
        with(field, value)
            .validate()
            .unwrap_or_else(|e| panic!("{field} = {value} should be valid: {e}"));
    }
}

#[test]
fn defaults_are_pytorchs() {
    // torch.optim.Adamax(params) defaults: lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.
    let c = AdamaxConfig::default();
    assert_eq!(
        (c.lr, c.beta1, c.beta2, c.eps, c.weight_decay),
        (2e-3, 0.9, 0.999, 1e-8, 0.0)
    );
    assert_eq!(c.eps_mode, adamax_cuda::EpsilonMode::InsideMax);
    assert_eq!(c.weight_decay_mode, adamax_cuda::WeightDecayMode::Coupled);
    assert!(!c.maximize);
}

#[test]
fn optimizer_construction_and_schedules_refuse_invalid_configs() {
    let p = [1.0f32];
    let err = CpuAdamax::<f32>::new(with("beta2", 1.0), &[&p]).unwrap_err();
    assert!(matches!(
        err,
        Error::Config(ConfigError::OutOfRange { field: "beta2", .. })
    ));
    let mut opt = CpuAdamax::<f32>::new(AdamaxConfig::default(), &[&p]).unwrap();
    let err = opt.set_lr(f64::NAN).unwrap_err();
    assert!(matches!(
        err,
        Error::Config(ConfigError::NotFinite { field: "lr", .. })
    ));
    assert_eq!(
        opt.config().lr,
        2e-3,
        "a refused learning rate leaves the old one"
    );
    opt.set_lr(1e-4).unwrap();
    assert_eq!(opt.config().lr, 1e-4);
}

/// Valid fields whose f32 scalars overflow: each used to give NaN or inf from finite
/// input (a zero gradient included) and is now refused, naming the field and scalar.
#[test]
fn configurations_whose_f32_scalars_overflow_are_refused() {
    let d = AdamaxConfig::default();
    let decoupled = AdamaxConfig {
        weight_decay_mode: WeightDecayMode::Decoupled,
        ..d
    };
    let table: &[(AdamaxConfig, &str, &str)] = &[
        (AdamaxConfig { lr: 1e38, ..d }, "lr", "step size"),
        (
            AdamaxConfig {
                lr: 1e37,
                beta1: 0.99,
                ..d
            },
            "lr",
            "step size",
        ),
        (AdamaxConfig { eps: 1e300, ..d }, "eps", "eps"),
        (
            AdamaxConfig {
                weight_decay: 1e300,
                ..d
            },
            "weight_decay",
            "weight_decay",
        ),
        (
            AdamaxConfig {
                lr: 1e30,
                weight_decay: 1e10,
                ..decoupled
            },
            "weight_decay",
            "lr * lr_scale * weight_decay",
        ),
    ];
    for (c, field, scalar) in table {
        match c.validate() {
            Err(ConfigError::NotRepresentable {
                field: f,
                scalar: s,
                ..
            }) => {
                assert_eq!((f, s.contains(scalar)), (*field, true), "{c:?}");
            }
            other => panic!("{c:?}: expected NotRepresentable, got {other:?}"),
        }
    }
}

/// At the edge of what is accepted, a history of zero gradients stays finite and
/// leaves the parameter where it was (the documented promise).
#[test]
fn the_largest_accepted_scalars_keep_a_zero_gradient_history_finite() {
    for (eps, mode) in [
        (0.0, EpsilonMode::InsideMax),
        (0.0, EpsilonMode::Denominator),
        (3e38, EpsilonMode::InsideMax),
    ] {
        let c = AdamaxConfig {
            lr: 3.0e37,
            eps,
            eps_mode: mode,
            ..AdamaxConfig::default()
        };
        c.validate().unwrap();
        let mut p = [1.0f32, -2.5, 0.0];
        let mut opt = CpuAdamax::new(c, &[&p]).unwrap();
        for _ in 0..5 {
            opt.step(&mut [&mut p], &[&[0.0; 3]]).unwrap();
        }
        assert_eq!(p, [1.0, -2.5, 0.0], "{c:?}");
    }
}

#[test]
fn learning_rates_and_scales_are_checked_together() {
    let p = [1.0f32];
    let mut opt = CpuAdamax::<f32>::new(
        AdamaxConfig {
            lr: 1e35,
            ..AdamaxConfig::default()
        },
        &[&p],
    )
    .unwrap();
    let big = TensorHyper {
        lr_scale: 1e300,
        weight_decay: 0.0,
    };
    let err = opt.set_tensor_hyper(0, big).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Config(ConfigError::NotRepresentable {
                field: "lr_scale",
                ..
            })
        ),
        "{err}"
    );
    opt.set_tensor_hyper(
        0,
        TensorHyper {
            lr_scale: 10.0,
            weight_decay: 0.0,
        },
    )
    .unwrap();
    // 1e37 * 10 / 0.1 = 1e39 overflows f32 for the scaled tensor: refused, lr kept.
    let err = opt.set_lr(1e37).unwrap_err();
    assert!(
        matches!(err, Error::Config(ConfigError::NotRepresentable { .. })),
        "{err}"
    );
    assert_eq!(opt.config().lr, 1e35);
}

#[test]
fn loss_scalers_that_cannot_work_are_refused() {
    let mut opt = CpuAdamax::<f32>::new(AdamaxConfig::default(), &[&[1.0f32][..]]).unwrap();
    for (s, field) in [
        // Its inverse is infinite: every step would be skipped and the scale fall to 0.
        (
            LossScaler {
                scale: 1e-45,
                ..LossScaler::default()
            },
            "scale",
        ),
        // `growth_tracker + 1` used to overflow in the first step.
        (
            LossScaler {
                growth_tracker: u32::MAX,
                ..LossScaler::default()
            },
            "growth_tracker",
        ),
        (
            LossScaler {
                growth_tracker: 2000,
                ..LossScaler::default()
            },
            "growth_tracker",
        ),
        // Factors that round back to the same f32 scale: a backoff of 0.99999999 left
        // the scale at 65536 through 400 overflowing steps, each skipped.
        (
            LossScaler {
                backoff_factor: 0.999_999_99,
                ..LossScaler::default()
            },
            "backoff_factor",
        ),
        (
            LossScaler {
                growth_factor: 1.000_000_01,
                ..LossScaler::default()
            },
            "growth_factor",
        ),
        // Below the floor (1 by default).
        (
            LossScaler {
                scale: 0.5,
                ..LossScaler::default()
            },
            "scale",
        ),
        // Floors below f32's normal range, whose inverse would not be finite, or none.
        (
            LossScaler {
                scale: 3e-39,
                min_scale: 3e-39,
                ..LossScaler::default()
            },
            "min_scale",
        ),
        (
            LossScaler {
                min_scale: 0.0,
                ..LossScaler::default()
            },
            "min_scale",
        ),
    ] {
        let err = opt.set_loss_scaler(Some(s)).unwrap_err();
        assert!(
            matches!(&err, Error::Config(ConfigError::OutOfRange { field: f, .. }) if *f == field),
            "{s:?}: {err}"
        );
    }
    // The boundaries are fine.
    for s in [
        LossScaler {
            growth_tracker: 1999,
            ..LossScaler::default()
        },
        LossScaler {
            scale: f32::MIN_POSITIVE,
            min_scale: LossScaler::NO_FLOOR,
            ..LossScaler::default()
        },
        LossScaler {
            scale: f32::MAX,
            growth_interval: u32::MAX,
            growth_tracker: u32::MAX - 1,
            ..LossScaler::default()
        },
    ] {
        opt.set_loss_scaler(Some(s)).unwrap();
        opt.step(&mut [&mut [1.0f32][..]], &[&[0.5][..]]).unwrap();
    }
    // At the edges of the factors' range every normal f32 scale moves, up and down
    // (the bottom and the top of a binade are the hardest).
    let edge = LossScaler {
        growth_factor: 1.0 + 2f64.powi(-23),
        backoff_factor: 1.0 - 2f64.powi(-23),
        growth_interval: 1,
        min_scale: LossScaler::NO_FLOOR,
        ..LossScaler::default()
    };
    edge.validate().unwrap();
    for scale in [1.0f32, 1.999_999_9, 65536.0, f32::MIN_POSITIVE * 2.0, 1e38] {
        let (mut up, mut down) = (LossScaler { scale, ..edge }, LossScaler { scale, ..edge });
        up.update(false);
        down.update(true);
        assert!(
            up.scale > scale && down.scale < scale,
            "{scale}: {up:?} {down:?}"
        );
    }
    // An invalid scaler used directly still never overflows.
    let mut raw = LossScaler {
        growth_tracker: u32::MAX,
        growth_interval: 5,
        ..LossScaler::default()
    };
    raw.update(false);
    assert_eq!(raw.growth_tracker, 0);
}

#[test]
fn architectures_display_as_nvidia_names_for_any_value() {
    assert_eq!(Arch { major: 9, minor: 0 }.to_string(), "sm_90");
    assert_eq!(
        Arch {
            major: 12,
            minor: 1
        }
        .to_string(),
        "sm_121"
    );
    assert_eq!(
        Arch {
            major: 7,
            minor: 15
        }
        .to_string(),
        "sm_715"
    );
    assert_eq!(
        Arch {
            major: u32::MAX,
            minor: u32::MAX
        }
        .to_string(),
        "sm_42949672954294967295"
    );
}

/// Decoupled decay multiplies the weights by `1 - lr * lr_scale * weight_decay` each
/// step; at or below 0 that means nothing, and at -1 or below the weights grow to
/// infinity and NaN on zero gradients (the audit's reproductions: `lr 1, wd 3` is NaN
/// at step 130, `lr 1e30, wd 0.01` at step 3, `lr 0.1, wd 25` at step 221). Refused in
/// validation, by `set_lr` and by `set_tensor_hyper`, naming the rule.
#[test]
fn decoupled_decay_factors_at_or_below_zero_are_refused_everywhere() {
    let decoupled = |lr: f64, weight_decay: f64| AdamaxConfig {
        lr,
        weight_decay,
        weight_decay_mode: WeightDecayMode::Decoupled,
        ..AdamaxConfig::default()
    };
    for (lr, wd) in [
        (1.0, 3.0),
        (1e30, 0.01),
        (0.1, 25.0),
        (1.0, 1.0),
        (0.5, 2.0),
    ] {
        let err = decoupled(lr, wd).validate().unwrap_err();
        assert!(
            matches!(err, ConfigError::DecayFactor { .. }),
            "lr {lr} wd {wd}: {err:?}"
        );
        assert!(err.to_string().contains("below 1"), "{err}");
        // Coupled decay is an L2 term on the gradient: the step stays bounded.
        let coupled = AdamaxConfig {
            weight_decay_mode: WeightDecayMode::Coupled,
            ..decoupled(lr, wd)
        };
        coupled.validate().unwrap();
    }
    decoupled(0.999, 1.0).validate().unwrap();
    let p = [1.0f32];
    let mut opt = CpuAdamax::<f32>::new(decoupled(0.5, 1.5), &[&p]).unwrap();
    let err = opt.set_lr(1.0).unwrap_err();
    assert!(
        matches!(err, Error::Config(ConfigError::DecayFactor { .. })),
        "{err}"
    );
    assert_eq!(opt.config().lr, 0.5, "a refused rate changes nothing");
    for hyper in [
        TensorHyper {
            lr_scale: 2.0,
            weight_decay: 1.5,
        },
        TensorHyper {
            lr_scale: 1.0,
            weight_decay: 2.0,
        },
    ] {
        let err = opt.set_tensor_hyper(0, hyper).unwrap_err();
        assert!(
            matches!(err, Error::Config(ConfigError::DecayFactor { .. })),
            "{hyper:?}: {err}"
        );
    }
    assert_eq!(opt.tensor_hypers()[0].weight_decay, 1.5);
}

/// The README's promise, swept: every valid configuration (a grid over learning rate,
/// decay, eps, both conventions of each, maximize, extreme betas) in every storage
/// mode keeps a history of zero gradients finite for 300 steps, from weights that span
/// many orders of magnitude. (The audit found 320 of 2,432 valid configurations, all
/// with decoupled decay, reaching NaN.) Learning rates stop at 1e30: the README's
/// exception is values pushed past f32's range, which `lr = 3e37` with coupled decay
/// does in two steps (a weight of -3e37 times a decay of 25).
#[test]
fn every_valid_configuration_keeps_a_zero_gradient_history_finite() {
    use adamax_cuda::{bf16, ParamMode, Precision, StateFormat};
    let modes = [
        Precision::default(),
        Precision {
            params: ParamMode::Stochastic,
            state: StateFormat::F32,
            seed: 1,
            min_8bit_len: 0,
        },
        Precision {
            params: ParamMode::Master,
            state: StateFormat::Blockwise8,
            seed: 2,
            min_8bit_len: 0,
        },
    ];
    let init = [1.0f32, -2.5e-3, 3.0e4, -7.0e-30, 0.0, 1.0e30];
    let (mut valid, mut total) = (0, 0);
    for lr in [1e-8, 1e-3, 0.1, 1.0, 10.0, 1e10, 1e30] {
        for wd in [0.0, 1e-4, 0.01, 0.5, 0.999, 3.0, 25.0] {
            for eps in [0.0, 1e-8, 3e38] {
                for (beta1, beta2) in [(0.9, 0.999), (0.0, 0.0), (0.999, 0.5)] {
                    for eps_mode in [EpsilonMode::InsideMax, EpsilonMode::Denominator] {
                        for weight_decay_mode in
                            [WeightDecayMode::Coupled, WeightDecayMode::Decoupled]
                        {
                            for maximize in [false, true] {
                                for precision in modes {
                                    total += 1;
                                    let c = AdamaxConfig {
                                        lr,
                                        beta1,
                                        beta2,
                                        eps,
                                        eps_mode,
                                        weight_decay: wd,
                                        weight_decay_mode,
                                        maximize,
                                        precision,
                                    };
                                    if c.validate().is_err() {
                                        continue;
                                    }
                                    valid += 1;
                                    let mut p: Vec<bf16> =
                                        init.iter().map(|&x| bf16::from_f32(x)).collect();
                                    let mut opt = CpuAdamax::new(c, &[&p]).unwrap();
                                    let zeros = vec![bf16::ZERO; p.len()];
                                    for t in 0..300 {
                                        opt.step(&mut [&mut p], &[&zeros]).unwrap();
                                        let state = &opt.tensor_states()[0];
                                        let finite = p.iter().all(|x| x.is_finite())
                                            && state.master.iter().all(|x| x.is_finite());
                                        assert!(finite, "step {}: {c:?}: {p:?}", t + 1);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    println!("{valid} of {total} configurations valid, all finite");
    assert!(valid > 1000, "{valid}");
}

/// Every state a run reaches saves and resumes (issue #17, item 7): gradients that keep
/// overflowing used to halve the scale to 4.6e-41 in 150 steps (its inverse infinite:
/// every later step skipped, `save` refused), and `backoff_factor: 1e-300` set it to 0
/// in one. The floor stops both; with `NO_FLOOR` the scale stops at f32's smallest
/// normal number.
#[test]
fn a_scaler_that_keeps_backing_off_stops_at_its_floor_and_saves() {
    use adamax_cuda::Checkpoint;
    for (scaler, floor) in [
        (LossScaler::default(), 1.0),
        (
            LossScaler {
                min_scale: LossScaler::NO_FLOOR,
                ..LossScaler::default()
            },
            f32::MIN_POSITIVE,
        ),
        (
            LossScaler {
                backoff_factor: 1e-300,
                min_scale: 0.25,
                ..LossScaler::default()
            },
            0.25,
        ),
    ] {
        let mut w = vec![0.5f32; 3];
        let mut opt = CpuAdamax::new(AdamaxConfig::default(), &[&w]).unwrap();
        opt.set_loss_scaler(Some(scaler)).unwrap();
        for _ in 0..150 {
            opt.step(&mut [&mut w], &[&[1.0, f32::INFINITY, 0.0]])
                .unwrap();
            assert!(opt.last_report().unwrap().skipped);
        }
        let s = opt.loss_scaler().unwrap().unwrap();
        assert_eq!(s.scale, floor, "{scaler:?}");
        let ck = opt.checkpoint().unwrap();
        let back = Checkpoint::from_bytes(&ck.to_bytes().unwrap()).unwrap();
        assert_eq!(back, ck);
        opt.restore(&back).unwrap();
        // And the run goes on: a good step is taken at the floor's inverse scale.
        opt.step(&mut [&mut w], &[&[1.0, 1.0, 0.0]]).unwrap();
        assert!(!opt.last_report().unwrap().skipped);
    }
    // Without a floor the scale goes below 1, as PyTorch's does.
    let mut raw = LossScaler {
        scale: 2.0,
        min_scale: LossScaler::NO_FLOOR,
        ..LossScaler::default()
    };
    raw.update(true);
    raw.update(true);
    assert_eq!(raw.scale, 0.5, "below 1 without a floor, as PyTorch");
}

/// Issue #23: a value far out of range is shown in scientific notation, and `Debug`
/// (what `fn main() -> Result<()>` and `unwrap` print) is the message with its hint.
#[test]
fn messages_show_numbers_readably_and_debug_keeps_the_hint() {
    let e = AdamaxConfig {
        lr: 1e40,
        ..AdamaxConfig::default()
    }
    .validate()
    .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("is 1e40,"), "{msg}");
    assert_eq!(format!("{e:?}"), msg);
    let e = AdamaxConfig {
        beta1: 1.0,
        ..AdamaxConfig::default()
    }
    .validate()
    .unwrap_err();
    assert!(e.to_string().contains("`beta1` is 1,"), "{e}");
    // An f32 setting is shown as that f32, not with its widening's digits.
    let e = adamax_cuda::LossScaler {
        min_scale: 1e-40,
        ..adamax_cuda::LossScaler::default()
    }
    .validate()
    .unwrap_err();
    assert!(e.to_string().contains("is 1e-40,"), "{e}");
    let e = adamax_cuda::Error::DriverNotFound;
    assert!(
        format!("{e:?}").contains("install the NVIDIA driver"),
        "{e:?}"
    );
    let missing = std::env::temp_dir().join("adamax-no-such-checkpoint.safetensors");
    let e = adamax_cuda::Checkpoint::load(&missing).unwrap_err();
    assert!(e.to_string().contains("reading"), "{e}");
}

/// 8-bit state stores `m` as its ratio to `u + eps` with eps in the denominator, so `u +
/// eps` must stay finite: an eps above 1e30 is refused there (a hostile review found eps
/// 1e38 turning a finite state into NaN), and accepted with f32 state or eps inside the
/// max; 1e30 itself keeps a zero-gradient history finite after a gradient near f32's
/// largest value.
#[test]
fn eight_bit_state_refuses_an_eps_in_the_denominator_that_overflows_u_plus_eps() {
    use adamax_cuda::{Precision, StateFormat};
    let q8 = Precision {
        state: StateFormat::Blockwise8,
        min_8bit_len: 0,
        ..Precision::default()
    };
    let c = |eps, eps_mode, precision| AdamaxConfig {
        eps,
        eps_mode,
        precision,
        ..AdamaxConfig::default()
    };
    match c(1e38, EpsilonMode::Denominator, q8).validate() {
        Err(ConfigError::OutOfRange { field: "eps", .. }) => {}
        other => panic!("{other:?}"),
    }
    let w = [0.0f32; 2];
    assert!(matches!(
        CpuAdamax::new(c(2e30, EpsilonMode::Denominator, q8), &[&w]),
        Err(Error::Config(ConfigError::OutOfRange { field: "eps", .. }))
    ));
    c(1e38, EpsilonMode::Denominator, Precision::default())
        .validate()
        .unwrap();
    c(1e38, EpsilonMode::InsideMax, q8).validate().unwrap();
    let mut w = [0.0f32; 2];
    let mut opt = CpuAdamax::new(c(1e30, EpsilonMode::Denominator, q8), &[&w]).unwrap();
    opt.step(&mut [&mut w], &[&[3e38, 0.0]]).unwrap();
    for _ in 0..3 {
        opt.step(&mut [&mut w], &[&[0.0, 0.0]]).unwrap();
    }
    assert!(w.iter().all(|x| x.is_finite()), "{w:?}");
    opt.checkpoint().unwrap().validate().unwrap();
}
