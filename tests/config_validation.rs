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
            scale: 3e-39,
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
