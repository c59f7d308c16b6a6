//! The settings types round-trip through serde. Built only with `--features serde`
//! (`required-features` in Cargo.toml; CI runs it).

use adamax_cuda::{
    AdamaxConfig, EpsilonMode, LossScaler, StepOptions, StepReport, TensorHyper, WeightDecayMode,
};

fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(
    value: T,
) {
    let text = serde_json::to_string(&value).unwrap();
    let back: T = serde_json::from_str(&text).unwrap();
    assert_eq!(back, value, "{text}");
}

#[test]
fn settings_round_trip_through_json() {
    round_trip(AdamaxConfig {
        lr: 1e-3,
        eps: 1e-7,
        eps_mode: EpsilonMode::Denominator,
        weight_decay: 0.004,
        weight_decay_mode: WeightDecayMode::Decoupled,
        maximize: true,
        precision: adamax_cuda::Precision {
            params: adamax_cuda::ParamMode::Stochastic,
            state: adamax_cuda::StateFormat::Blockwise8,
            seed: 17,
            min_8bit_len: 0,
        },
        ..AdamaxConfig::default()
    });
    round_trip(TensorHyper {
        lr_scale: 0.5,
        weight_decay: 0.0,
    });
    round_trip(StepOptions {
        inv_scale: Some(0.25),
        max_norm: Some(1.0),
        skip_nonfinite: true,
    });
    round_trip(LossScaler {
        growth_tracker: 7,
        ..LossScaler::default()
    });
}

/// A config serialized before the storage modes existed reads with the default ones.
#[test]
fn a_deserialized_config_is_checked_when_used() {
    let bad: AdamaxConfig = serde_json::from_str(
        r#"{"lr":0.001,"beta1":1.5,"beta2":0.999,"eps":1e-8,"eps_mode":"InsideMax",
            "weight_decay":0.0,"weight_decay_mode":"Coupled","maximize":false}"#,
    )
    .unwrap();
    assert!(bad.validate().is_err());
    assert!(adamax_cuda::cpu::CpuAdamax::<f32>::new(bad, &[&[1.0]]).is_err());
}

/// Every value a run can give a report round-trips: a NaN or infinite norm (clipping
/// without the overflow check, a non-finite gradient) and coefficient used to be written
/// as `null`, read back as no norm or refused.
#[test]
fn reports_with_non_finite_values_round_trip() {
    let report = |total_norm, clip_coef, loss_scale| StepReport {
        step: 3,
        skipped: false,
        total_norm,
        clip_coef,
        loss_scale,
    };
    for v in [f32::INFINITY, f32::NEG_INFINITY, 0.25, 0.0, -0.0, f32::MAX] {
        round_trip(report(Some(v), v, Some(65536.0)));
    }
    round_trip(report(None, 1.0, None));
    // NaN is not equal to itself: compared by kind.
    let text = serde_json::to_string(&report(Some(f32::NAN), f32::NAN, None)).unwrap();
    let back: StepReport = serde_json::from_str(&text).unwrap();
    assert!(back.total_norm.is_some_and(f32::is_nan), "{text}");
    assert!(back.clip_coef.is_nan(), "{text}");
    let bad: Result<StepReport, _> = serde_json::from_str(
        r#"{"step":1,"skipped":false,"total_norm":"lots","clip_coef":1.0,"loss_scale":null}"#,
    );
    assert!(bad
        .unwrap_err()
        .to_string()
        .contains("`lots` is not a number"));
    // The optional fields may be left out, as for any Option.
    let short: StepReport =
        serde_json::from_str(r#"{"step":1,"skipped":false,"clip_coef":1.0}"#).unwrap();
    assert_eq!((short.total_norm, short.loss_scale), (None, None));
}

/// A scaler serialized before the floor existed reads with no floor (`NO_FLOOR`), the
/// rule it was written under.
#[test]
fn a_scaler_without_a_floor_reads_as_no_floor() {
    let s: LossScaler = serde_json::from_str(
        r#"{"scale":0.5,"growth_factor":2.0,"backoff_factor":0.5,"growth_interval":2000,"growth_tracker":0}"#,
    )
    .unwrap();
    assert_eq!(s.min_scale, LossScaler::NO_FLOOR);
    s.validate().unwrap();
}
