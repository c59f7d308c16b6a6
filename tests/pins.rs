//! Pins the bits of every storage mode across a refactoring: the parameters a CPU run
//! reaches and the bytes of its checkpoint, hashed, for every mode of the modes table
//! and a spread of configurations. `tests/kernel_host.rs` compares the emulated kernel
//! with the CPU reference bit for bit, so these values pin the emulation too.
//!
//! The expected hashes were recorded at commit 09fce5c (before the modes table of issue
//! #18), whose CPU reference was checked against PyTorch, optax and Keras
//! (`tests/peer_trajectories.rs`) and, for the f32-state modes, against an H100
//! (BENCHMARKS.md); every mode, at 3e05135 and 56209e8, matched it on an H200. A change here is a change of the spec or of the file format: it
//! needs a reason, not just a new constant. The changes so far, all issue #19's: the
//! encoder's cap of `m` to AdaMax's bound of `u` (changed the four 8-bit rows of
//! `coupled_maximize_clip`, eps 0, where a `u` can decode to 0 under a nonzero `m`);
//! the cheaper encoder (a reciprocal per block, 16 random bits per moment from the
//! upper half of the draw), which changed every 8-bit row; then the random stream's
//! 32-bit words (`spec::lowbit`'s `mix32` in place of a splitmix64 draw per element),
//! which changed the 20 rows that draw random bits (stochastic rounding and 8-bit
//! state) and none of the other 12. The encoder's rounding on the f32's bits (subnormal
//! codes' fraction taken to 23 - M bits) changed no row. Per-tensor state formats
//! (issue #19, part 4) added `min_8bit_len` to the metadata of 8-bit files: the 16
//! 8-bit rows' checkpoint bytes changed, their parameters did not (these runs keep every
//! tensor in 8 bits, `min_8bit_len: 0`). Every row without random bits has kept its
//! bits since 09fce5c.

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
            // Every tensor in 8 bits with 8-bit state; the default, which f32-state
            // files leave out, with f32 state.
            min_8bit_len: match state {
                StateFormat::F32 => adamax_cuda::DEFAULT_MIN_8BIT_LEN,
                StateFormat::Blockwise8 => 0,
            },
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
        0xc886b06969808c8d,
        0x3da7775047ef136f,
    ),
    (
        "bf16 stochastic f32state keras_decoupled",
        0x36a75baa595388a4,
        0xf38be3f534514927,
    ),
    (
        "bf16 stochastic f32state coupled_maximize_clip",
        0x779e79274fca994a,
        0x3581f61a274bd28b,
    ),
    (
        "bf16 stochastic f32state scaler",
        0x4d10dac32169abb0,
        0xf80f50e6332a0c3c,
    ),
    (
        "f32 master q8 defaults",
        0x2ea4d63df3281c9b,
        0x24bb00d6e3439ed9,
    ),
    (
        "f32 master q8 keras_decoupled",
        0x5bd0fd11fa18797c,
        0x78730c0b65b46a40,
    ),
    (
        "f32 master q8 coupled_maximize_clip",
        0xf5922935b6201a15,
        0xe5690a2a02c8f40e,
    ),
    (
        "f32 master q8 scaler",
        0x390dc626b7e78f72,
        0x2d8b07eeb549be0c,
    ),
    (
        "f16 master q8 defaults",
        0x17f520d8947a5988,
        0x5e7e2b0cbabdc0ba,
    ),
    (
        "f16 master q8 keras_decoupled",
        0xb9b4be04495d6715,
        0x21ad2666f98c2106,
    ),
    (
        "f16 master q8 coupled_maximize_clip",
        0x6db0dd1cc7fcc6b1,
        0x6caa72395fd6ca7d,
    ),
    (
        "f16 master q8 scaler",
        0x426ba2ca138f6499,
        0x8c8cd94f41216f8c,
    ),
    (
        "bf16 master q8 defaults",
        0x65fd404d984cdd29,
        0x627c326090b9576e,
    ),
    (
        "bf16 master q8 keras_decoupled",
        0xaeff0fc1cac02f1a,
        0x3eeee46d1029ca9e,
    ),
    (
        "bf16 master q8 coupled_maximize_clip",
        0xc2691fe7a7c4a99a,
        0xc8c0de84528ec002,
    ),
    (
        "bf16 master q8 scaler",
        0x6f85f526f442c200,
        0x2e6866e69b10f31a,
    ),
    (
        "bf16 stochastic q8 defaults",
        0x6fe4f4199ddc5165,
        0x17cb322801926f24,
    ),
    (
        "bf16 stochastic q8 keras_decoupled",
        0xde3fa6cc426b72cd,
        0x7bbaf6bfdea6edde,
    ),
    (
        "bf16 stochastic q8 coupled_maximize_clip",
        0x565cd8a4cc993698,
        0xa9f71cf901e044f5,
    ),
    (
        "bf16 stochastic q8 scaler",
        0x4d0f9e1dc513b1c9,
        0x55de7768e994595b,
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
