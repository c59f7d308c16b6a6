//! Pins the bits of every storage mode across a refactoring: the parameters a CPU run
//! reaches and the bytes of its checkpoint, hashed, for every mode of the modes table
//! and a spread of configurations. `tests/kernel_host.rs` compares the emulated kernel
//! with the CPU reference bit for bit, so these values pin the emulation too.
//!
//! The expected hashes were recorded at commit 09fce5c (before the modes table of issue
//! #18), whose CPU reference was checked against PyTorch, optax and Keras
//! (`tests/peer_trajectories.rs`) and, for the f32-state modes, against an H100
//! (BENCHMARKS.md). A change here is a change of the spec or of the file format: it
//! needs a reason, not just a new constant. The one change so far: issue #19's 8-bit
//! encoder, which caps `m` to AdaMax's bound of `u`, changed the four 8-bit rows of
//! `coupled_maximize_clip` (eps 0, where a `u` can decode to 0 under a nonzero `m`);
//! every other row, the 8-bit ones included, kept its bits.

use adamax_cuda::{
    bf16, cpu::CpuAdamax, f16, AdamaxConfig, EpsilonMode, LossScaler, Optimizer, ParamMode,
    Precision, StateFormat, StepOptions, Storage, TensorHyper, WeightDecayMode,
};

/// FNV-1a over bytes: a stable hash with no dependency.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A deterministic value in about [-1, 1] spanning several orders of magnitude, with
/// zeros and an occasional spike.
fn value(seed: u64, i: u64) -> f32 {
    let z = (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i.wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .rotate_left(17)
        .wrapping_mul(0x94D0_49BB_1331_11EB);
    let unit = (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
    match z % 11 {
        0 => 0.0,
        1 => unit * 1e-6,
        2 => unit * 1e3,
        _ => unit,
    }
}

fn configs() -> Vec<(&'static str, AdamaxConfig, StepOptions, Option<LossScaler>)> {
    let base = AdamaxConfig {
        lr: 1e-2,
        ..AdamaxConfig::default()
    };
    vec![
        ("defaults", base, StepOptions::default(), None),
        (
            "keras_decoupled",
            AdamaxConfig {
                eps: 1e-7,
                eps_mode: EpsilonMode::Denominator,
                weight_decay: 0.01,
                weight_decay_mode: WeightDecayMode::Decoupled,
                ..base
            },
            StepOptions::default(),
            None,
        ),
        (
            "coupled_maximize_clip",
            AdamaxConfig {
                weight_decay: 0.1,
                maximize: true,
                eps: 0.0,
                ..base
            },
            StepOptions {
                max_norm: Some(0.5),
                skip_nonfinite: true,
                ..StepOptions::default()
            },
            None,
        ),
        (
            "scaler",
            base,
            StepOptions::default(),
            Some(LossScaler {
                scale: 8.0,
                growth_interval: 2,
                ..LossScaler::default()
            }),
        ),
    ]
}

/// Runs five steps of three tensors (one without a gradient in step 3, one with a
/// per-tensor setting) and hashes the parameters' bits and the checkpoint's bytes.
fn run<T: Storage>(precision: Precision, name: &str) -> Vec<(String, u64, u64)> {
    let lens = [300usize, 7, 1030];
    let mut out = Vec::new();
    for (label, config, options, scaler) in configs() {
        let config = AdamaxConfig {
            precision,
            ..config
        };
        let mut params: Vec<Vec<T>> = lens
            .iter()
            .enumerate()
            .map(|(k, &n)| {
                (0..n as u64)
                    .map(|i| T::from_f32(value(k as u64, i)))
                    .collect()
            })
            .collect();
        let refs: Vec<&[T]> = params.iter().map(|p| p.as_slice()).collect();
        let mut opt = CpuAdamax::new(config, &refs).unwrap();
        opt.set_options(options).unwrap();
        opt.set_loss_scaler(scaler).unwrap();
        opt.set_tensor_hyper(
            1,
            TensorHyper {
                lr_scale: 0.5,
                weight_decay: 0.0,
            },
        )
        .unwrap();
        for step in 0..5u64 {
            let scale = if scaler.is_some() { 8.0 } else { 1.0 };
            let grads: Vec<Vec<T>> = lens
                .iter()
                .enumerate()
                .map(|(k, &n)| {
                    (0..n as u64)
                        .map(|i| T::from_f32(value(100 + step * 7 + k as u64, i) * scale))
                        .collect()
                })
                .collect();
            let mut p: Vec<&mut [T]> = params.iter_mut().map(|p| p.as_mut_slice()).collect();
            let g: Vec<Option<&[T]>> = grads
                .iter()
                .enumerate()
                .map(|(k, g)| (step != 2 || k != 1).then_some(g.as_slice()))
                .collect();
            opt.step_some(&mut p, &g).unwrap();
        }
        let bits: Vec<u8> = params
            .iter()
            .flatten()
            .flat_map(|x| x.to_f32().to_bits().to_le_bytes())
            .collect();
        let file = opt.checkpoint().unwrap().to_bytes().unwrap();
        out.push((format!("{name} {label}"), fnv(&bits), fnv(&file)));
    }
    out
}

fn modes() -> Vec<(String, u64, u64)> {
    let mut all = Vec::new();
    for state in [StateFormat::F32, StateFormat::Blockwise8] {
        let master = Precision {
            params: ParamMode::Master,
            state,
            seed: 3,
        };
        let sr = Precision {
            params: ParamMode::Stochastic,
            ..master
        };
        let s = if state == StateFormat::F32 {
            "f32state"
        } else {
            "q8"
        };
        all.extend(run::<f32>(master, &format!("f32 master {s}")));
        all.extend(run::<f16>(master, &format!("f16 master {s}")));
        all.extend(run::<bf16>(master, &format!("bf16 master {s}")));
        all.extend(run::<bf16>(sr, &format!("bf16 stochastic {s}")));
    }
    all
}

/// (mode and configuration, hash of the parameters' bits, hash of the checkpoint file).
const PINNED: &[(&str, u64, u64)] = &[
    (
        "f32 master f32state defaults",
        0xb5b09b87ae9a1d5a,
        0xe90165ed7dd67fdd,
    ),
    (
        "f32 master f32state keras_decoupled",
        0xe1b08d2c4e8af9de,
        0xe5580a366e76e071,
    ),
    (
        "f32 master f32state coupled_maximize_clip",
        0xbcddb8e20cc68362,
        0xdbbcba293e9c2ce8,
    ),
    (
        "f32 master f32state scaler",
        0xbd7205676eea85f6,
        0x93a414da07aa4064,
    ),
    (
        "f16 master f32state defaults",
        0xb9acf9325ae874c5,
        0x73e854476c5e7a35,
    ),
    (
        "f16 master f32state keras_decoupled",
        0x866485c7016e4473,
        0x4d883888c0bb2bf9,
    ),
    (
        "f16 master f32state coupled_maximize_clip",
        0x579340bd97672374,
        0xb62bae7322c1f2db,
    ),
    (
        "f16 master f32state scaler",
        0x940d84d448e125ab,
        0x4493524df71714b9,
    ),
    (
        "bf16 master f32state defaults",
        0xdc2c84cc10102a48,
        0x36bea9044289323e,
    ),
    (
        "bf16 master f32state keras_decoupled",
        0x9ffad6b7443fa844,
        0xec89fb6f6679ff1d,
    ),
    (
        "bf16 master f32state coupled_maximize_clip",
        0x8810cf7b33d93b14,
        0x7b651cda5b985ca6,
    ),
    (
        "bf16 master f32state scaler",
        0xd09f2aad432982fa,
        0x6270f1049c1d5d13,
    ),
    (
        "bf16 stochastic f32state defaults",
        0xc84e8dd25c4b1eb0,
        0x3da7775047ef136f,
    ),
    (
        "bf16 stochastic f32state keras_decoupled",
        0xac3b3c10daba63cd,
        0xf38be3f534514927,
    ),
    (
        "bf16 stochastic f32state coupled_maximize_clip",
        0x579979f68feb71ca,
        0x1b6e2d1914ee07a3,
    ),
    (
        "bf16 stochastic f32state scaler",
        0xa70ed9f41941931e,
        0xf80f50e6332a0c3c,
    ),
    (
        "f32 master q8 defaults",
        0x843f4161d43372af,
        0xc1b651fd1f6ab62e,
    ),
    (
        "f32 master q8 keras_decoupled",
        0xb6bd565064dd05c5,
        0xa760d230f040d18b,
    ),
    (
        "f32 master q8 coupled_maximize_clip",
        0x32a60944b2965ceb,
        0x703bf80b5856a0e2,
    ),
    (
        "f32 master q8 scaler",
        0x96177f31b8ea373a,
        0x2ad45b0a23d27211,
    ),
    (
        "f16 master q8 defaults",
        0xa36a075707b3ae8e,
        0x55586f451fc79107,
    ),
    (
        "f16 master q8 keras_decoupled",
        0xfaa2589c2195fc56,
        0xd562f55c3484dbb7,
    ),
    (
        "f16 master q8 coupled_maximize_clip",
        0x888860f4bae8a294,
        0xe0a1bb0c7680a9c4,
    ),
    (
        "f16 master q8 scaler",
        0x3125e5c0ca728ba2,
        0xfe2ddbbf08df077c,
    ),
    (
        "bf16 master q8 defaults",
        0x0d35bf6d40f1dd13,
        0xc45e8c3bbf750a90,
    ),
    (
        "bf16 master q8 keras_decoupled",
        0x63fdf236c7ee0db7,
        0xd173bef0d3f12184,
    ),
    (
        "bf16 master q8 coupled_maximize_clip",
        0x92b500460efcb101,
        0x6b6557c709f45c26,
    ),
    (
        "bf16 master q8 scaler",
        0x909a475271104f1b,
        0xc13da2b8b242eca1,
    ),
    (
        "bf16 stochastic q8 defaults",
        0x3d55e4ab0804df23,
        0x1d876c73c4ac6e60,
    ),
    (
        "bf16 stochastic q8 keras_decoupled",
        0x8aea44be1d1da50d,
        0x4a278e07e20b500e,
    ),
    (
        "bf16 stochastic q8 coupled_maximize_clip",
        0x288c6779edec0235,
        0x4aebbfe9b8e96c8a,
    ),
    (
        "bf16 stochastic q8 scaler",
        0xb318f535d5289ca5,
        0x1c647805c587ab5b,
    ),
];

#[test]
fn every_mode_reaches_the_pinned_parameters_and_checkpoint_bytes() {
    let found = modes();
    assert_eq!(found.len(), PINNED.len());
    for ((name, p, f), (pname, pp, pf)) in found.iter().zip(PINNED) {
        assert_eq!(name, pname);
        assert_eq!(
            (*p, *f),
            (*pp, *pf),
            "{name}: parameters or checkpoint bytes"
        );
    }
}
