//! Every invalid configuration is refused with a typed error naming the field, the
//! value and the allowed range; the boundaries the docs allow are accepted.

use adamax_cuda::{cpu::CpuAdamax, AdamaxConfig, ConfigError, Error};

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
