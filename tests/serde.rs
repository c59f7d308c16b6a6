//! The settings types round-trip through serde (with `--features serde`; CI runs it).
#![cfg(feature = "serde")]

use adamax_cuda::{
    AdamaxConfig, EpsilonMode, LossScaler, StepOptions, TensorHyper, WeightDecayMode,
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
