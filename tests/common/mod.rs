//! Shared by the integration tests: the committed peer trajectories (tests/data/, made
//! by scripts/peer_trajectories.sh) and helpers to step them, and (in `backends`) the
//! CPU and GPU optimizers that tests/scenarios.rs and tests/gpu.rs drive alike.
#![allow(dead_code)]

pub mod backends;

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
    (
        "torch_clip_grad_norm",
        include_str!("../data/torch_clip_grad_norm.json"),
    ),
    (
        "torch_grad_scaler_and_clipping",
        include_str!("../data/torch_grad_scaler_and_clipping.json"),
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
    /// `clip_grad_norm_(params, max_norm)` before each step.
    #[serde(default)]
    pub max_norm: Option<f32>,
    /// `torch.amp.GradScaler` around each step.
    #[serde(default)]
    pub scaler: Option<PeerScaler>,
}

#[derive(Deserialize)]
pub struct PeerScaler {
    pub init_scale: f32,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: u32,
}

impl PeerConfig {
    /// The step options and loss scaler that reproduce the peer's recipe.
    pub fn to_fused(&self) -> (adamax_cuda::StepOptions, Option<adamax_cuda::LossScaler>) {
        let options = adamax_cuda::StepOptions {
            max_norm: self.max_norm,
            ..Default::default()
        };
        // PyTorch's GradScaler has no floor.
        let scaler = self.scaler.as_ref().map(|s| adamax_cuda::LossScaler {
            scale: s.init_scale,
            min_scale: adamax_cuda::LossScaler::NO_FLOOR,
            growth_factor: s.growth_factor,
            backoff_factor: s.backoff_factor,
            growth_interval: s.growth_interval,
            growth_tracker: 0,
        });
        (options, scaler)
    }

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
            precision: Default::default(),
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
    /// Fused-feature trajectories: whether each step was skipped, the loss scale after
    /// it, the clip_grad_norm_ total norm, and the [step, tensor, element] gradients
    /// that were +inf (JSON has no inf; the grads list holds a finite value there).
    #[serde(default)]
    pub skipped: Vec<bool>,
    #[serde(default)]
    pub scales: Vec<Option<f32>>,
    #[serde(default)]
    pub total_norms: Vec<Option<f64>>,
    #[serde(default)]
    pub inf_at: Vec<[usize; 3]>,
}

pub fn trajectories() -> impl Iterator<Item = Trajectory> {
    TRAJECTORIES.iter().map(|(name, text)| {
        let t: Trajectory = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("tests/data/{name}.json does not parse: {e}"));
        assert_eq!(&t.name, name);
        t
    })
}

/// A loss-scaler schedule shared by tests/fused_cpu.rs and tests/gpu.rs: from scale
/// 1024 with growth_interval 2, steps 2, 5 and 6 (counted from 0) get an infinite
/// gradient. That gives a skip right after a growth step (2 and 5) and two backoffs in
/// a row (5, 6).
pub const SCALER_INF_STEPS: [usize; 3] = [2, 5, 6];
/// The scale before each of those 10 steps, by torch.amp.GradScaler's documented rule
/// (x2 after `growth_interval` good steps in a row, x0.5 on a non-finite gradient).
pub const SCALER_SCALES: [f32; 10] = [
    1024.0, 1024.0, 2048.0, 1024.0, 1024.0, 2048.0, 1024.0, 512.0, 512.0, 1024.0,
];
