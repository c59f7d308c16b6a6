//! Shared by the integration tests: the committed peer trajectories (tests/data/, made
//! by scripts/peer_trajectories.sh) and helpers to step them.
#![allow(dead_code)]

use adamax_cuda::{AdamaxConfig, EpsilonMode, WeightDecayMode};
use serde::Deserialize;

/// Every file in tests/data/, embedded so that test binaries run anywhere (the GPU
/// machine has no source tree). `every_data_file_is_replayed` checks the list is whole.
pub const TRAJECTORIES: &[(&str, &str)] = &[
    (
        "torch_defaults",
        include_str!("../data/torch_defaults.json"),
    ),
    (
        "torch_coupled_weight_decay",
        include_str!("../data/torch_coupled_weight_decay.json"),
    ),
    (
        "torch_maximize",
        include_str!("../data/torch_maximize.json"),
    ),
    (
        "torch_zero_and_tiny_grads",
        include_str!("../data/torch_zero_and_tiny_grads.json"),
    ),
    (
        "torch_f16_master",
        include_str!("../data/torch_f16_master.json"),
    ),
    (
        "torch_bf16_master",
        include_str!("../data/torch_bf16_master.json"),
    ),
    ("optax_adamax", include_str!("../data/optax_adamax.json")),
    (
        "optax_adamaxw_decoupled",
        include_str!("../data/optax_adamaxw_decoupled.json"),
    ),
    (
        "keras_defaults",
        include_str!("../data/keras_defaults.json"),
    ),
    (
        "keras_decoupled_weight_decay",
        include_str!("../data/keras_decoupled_weight_decay.json"),
    ),
    (
        "keras_zero_and_tiny_grads",
        include_str!("../data/keras_zero_and_tiny_grads.json"),
    ),
];

#[derive(Deserialize)]
pub struct PeerConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub weight_decay_mode: String,
    pub eps_mode: String,
    pub maximize: bool,
}

impl PeerConfig {
    pub fn to_config(&self) -> AdamaxConfig {
        AdamaxConfig {
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            eps_mode: match self.eps_mode.as_str() {
                "torch" => EpsilonMode::InsideMax,
                "keras" => EpsilonMode::Denominator,
                other => panic!("unknown eps_mode {other} in test data"),
            },
            weight_decay: self.weight_decay,
            weight_decay_mode: match self.weight_decay_mode.as_str() {
                "none" | "coupled" => WeightDecayMode::Coupled,
                "decoupled" => WeightDecayMode::Decoupled,
                other => panic!("unknown weight_decay_mode {other} in test data"),
            },
            maximize: self.maximize,
        }
    }
}

#[derive(Deserialize)]
pub struct PeerTensor {
    pub init: Vec<f32>,
    /// `grads[t]` is the gradient of step `t + 1`.
    pub grads: Vec<Vec<f32>>,
    /// `expected[t]`: the peer's f32 parameter (master for 16-bit) after step `t + 1`.
    pub expected: Vec<Vec<f32>>,
    /// `expected_16bit[t]`: round-to-nearest-even of `expected[t]` to the storage type.
    #[serde(default)]
    pub expected_16bit: Vec<Vec<f32>>,
    pub final_exp_avg: Vec<f32>,
    pub final_exp_inf: Vec<f32>,
}

#[derive(Deserialize)]
pub struct Trajectory {
    pub name: String,
    pub peer: String,
    pub config: PeerConfig,
    pub storage: String,
    pub steps: usize,
    /// Largest |f32 - f64| difference of the peer's own parameters over the trajectory.
    pub f32_vs_f64_max_abs: f64,
    pub tensors: Vec<PeerTensor>,
}

pub fn trajectories() -> impl Iterator<Item = Trajectory> {
    TRAJECTORIES.iter().map(|(name, text)| {
        let t: Trajectory = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("tests/data/{name}.json does not parse: {e}"));
        assert_eq!(&t.name, name);
        t
    })
}
