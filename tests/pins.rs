//! Pins the bits of every storage mode across a refactoring: the parameters a CPU run
//! reaches and the bytes of its checkpoint, hashed, for every mode of the modes table
//! and a spread of configurations. `tests/kernel_host.rs` compares the emulated kernel
//! with the CPU reference bit for bit, so these values pin the emulation too.
//!
//! The expected hashes were recorded at commit 09fce5c (before the modes table of issue
//! #18), whose CPU reference was checked against PyTorch, optax and Keras
//! (`tests/peer_trajectories.rs`) and, for the f32-state modes, against an H100
//! (BENCHMARKS.md). A change here is a change of the spec or of the file format: it
//! needs a reason, not just a new constant. The changes so far, both issue #19's and
//! both in the 8-bit rows only: the encoder's cap of `m` to AdaMax's bound of `u`
//! (changed the four rows of `coupled_maximize_clip`, eps 0, where a `u` can decode to
//! 0 under a nonzero `m`), then the cheaper encoder (a reciprocal per block, 16 random
//! bits per moment from the upper half of the draw), which changed every 8-bit row.
//! Every f32-state row has kept its bits since 09fce5c.

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
        0x9cab7f3fb18f299d,
        0x335c2cf2debbe349,
    ),
    (
        "f32 master q8 keras_decoupled",
        0x58137057fc2c0a65,
        0x4ef64ac792a04762,
    ),
    (
        "f32 master q8 coupled_maximize_clip",
        0xfae4b33622498df5,
        0xe8e9d0cf4fc8657a,
    ),
    (
        "f32 master q8 scaler",
        0x2264033725aceaa5,
        0x853db47b3cd4a8ef,
    ),
    (
        "f16 master q8 defaults",
        0x92a8b0a089d10c7b,
        0x845309e752dea653,
    ),
    (
        "f16 master q8 keras_decoupled",
        0x40974c822fde01e0,
        0xc754adbf881ca2c0,
    ),
    (
        "f16 master q8 coupled_maximize_clip",
        0xbfc94bd5b3c4ea23,
        0x8238302e5f5ce500,
    ),
    (
        "f16 master q8 scaler",
        0x170bbc7d0ff4c352,
        0xa845b63afc09b7ff,
    ),
    (
        "bf16 master q8 defaults",
        0x1448bfaff249ec34,
        0xfa2b991ae79352af,
    ),
    (
        "bf16 master q8 keras_decoupled",
        0xa950b7e37953c1c5,
        0x8038d33aaff90938,
    ),
    (
        "bf16 master q8 coupled_maximize_clip",
        0x62b77d5360e561f8,
        0x0137b9815f7fd0aa,
    ),
    (
        "bf16 master q8 scaler",
        0x32288025356a2eb4,
        0x6d0220899b41a5e0,
    ),
    (
        "bf16 stochastic q8 defaults",
        0x870adda394886e8c,
        0xc09875a42fd014da,
    ),
    (
        "bf16 stochastic q8 keras_decoupled",
        0xcaf8ce1f9eb1575c,
        0xa55f5b75ea0b18a7,
    ),
    (
        "bf16 stochastic q8 coupled_maximize_clip",
        0x70e80b8c082423fa,
        0x3747878d23f7e275,
    ),
    (
        "bf16 stochastic q8 scaler",
        0x6eb94a4d6c74ddff,
        0xf311e0709c7dce0f,
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
