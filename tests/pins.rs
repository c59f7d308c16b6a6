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
//! tensor in 8 bits, `min_8bit_len: 0`). 8-bit state v2 (issue #19, part 2: `m` stored
//! as its ratio to the step's denominator, the codes as `q + 2^-15`, blocks below f32's
//! normal range stored as 0) changed the parameters and bytes of the 16 8-bit rows, and
//! the format's version (`adamax-cuda/3`) the bytes of the 16 others, whose parameters
//! did not change. Then one `b` word of the random stream per pair of elements, each
//! rounding the parameter with its half (16 bits, as before), changed the parameters of
//! the 8 stochastic-rounding rows and the checkpoint bytes of the two of them with
//! coupled decay (whose moments follow the parameters); the 24 others did not change.
//! Then one hash per group of 8 elements, spread over them by odd constants (each
//! parameter rounded with its pair partner's `u` bits), and the 8-bit encoder's `t` made
//! by one fused multiply-add rounded toward zero (issue #19, part 7), changed the 20
//! rows that draw random bits: the parameters of all 20 and the checkpoint bytes of the
//! 16 8-bit rows and of `bf16 stochastic f32state coupled_maximize_clip`; the 12 others
//! did not change. Every row without 8-bit state or stochastic rounding has kept its
//! parameters since 09fce5c.
//! `ADAMAX_PINS_PRINT=1 cargo test --test pins -- --nocapture` prints each row's values
//! and whether they match (for a change that has its reason).

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
        0x7f67e79bb79e8c1c,
    ),
    (
        "f32 master f32state keras_decoupled",
        0xe1b08d2c4e8af9de,
        0xd19c174c4a3844c0,
    ),
    (
        "f32 master f32state coupled_maximize_clip",
        0xbcddb8e20cc68362,
        0x905dcb2aa747c478,
    ),
    (
        "f32 master f32state scaler",
        0xbd7205676eea85f6,
        0x58d683a6e41713e9,
    ),
    (
        "f16 master f32state defaults",
        0xb9acf9325ae874c5,
        0x6cf55c517eb78c65,
    ),
    (
        "f16 master f32state keras_decoupled",
        0x866485c7016e4473,
        0x96b73890fa1fef5c,
    ),
    (
        "f16 master f32state coupled_maximize_clip",
        0x579340bd97672374,
        0x416257c3995d6ad0,
    ),
    (
        "f16 master f32state scaler",
        0x940d84d448e125ab,
        0xc5a02ab537ba8017,
    ),
    (
        "bf16 master f32state defaults",
        0xdc2c84cc10102a48,
        0xdace028498850726,
    ),
    (
        "bf16 master f32state keras_decoupled",
        0x9ffad6b7443fa844,
        0xfe384672dcef8a5f,
    ),
    (
        "bf16 master f32state coupled_maximize_clip",
        0x8810cf7b33d93b14,
        0x1fa0df9106184304,
    ),
    (
        "bf16 master f32state scaler",
        0xd09f2aad432982fa,
        0xae80214e72a4be90,
    ),
    (
        "bf16 stochastic f32state defaults",
        0xd053850629397f7a,
        0x695c67c0e4fca592,
    ),
    (
        "bf16 stochastic f32state keras_decoupled",
        0x641f9aabc27a2f19,
        0x16698630d3ccf538,
    ),
    (
        "bf16 stochastic f32state coupled_maximize_clip",
        0x87128f9ae7ca292d,
        0x847d7887617fc491,
    ),
    (
        "bf16 stochastic f32state scaler",
        0x3424b16e1e4e73bc,
        0xb5553e06dc3a3cc9,
    ),
    (
        "f32 master q8 defaults",
        0x576cb569be8cbedd,
        0xf0edb2eeaf3919f1,
    ),
    (
        "f32 master q8 keras_decoupled",
        0xdd9374ffd2df6e70,
        0xfd02c0e7abb16eec,
    ),
    (
        "f32 master q8 coupled_maximize_clip",
        0x18b7b12e553ef846,
        0x44bc8ff8459eaf02,
    ),
    (
        "f32 master q8 scaler",
        0x1b4bb727051db597,
        0x1cdb643bcc48812f,
    ),
    (
        "f16 master q8 defaults",
        0x2150d28bf0745f1c,
        0x3178b1e4ad04ad08,
    ),
    (
        "f16 master q8 keras_decoupled",
        0xebeb8562ffd8339e,
        0xd41b874ae446da43,
    ),
    (
        "f16 master q8 coupled_maximize_clip",
        0xc980e26e01bf5add,
        0x614412f3d4d16a27,
    ),
    (
        "f16 master q8 scaler",
        0x77ef8e23cbfa9ec3,
        0xe4e040d07ed8512c,
    ),
    (
        "bf16 master q8 defaults",
        0xb8b5f3c775b8d249,
        0x6eb626ac84ebe1e2,
    ),
    (
        "bf16 master q8 keras_decoupled",
        0xac918f16f3049cb1,
        0x165eb356aa2b51e,
    ),
    (
        "bf16 master q8 coupled_maximize_clip",
        0x8106f18186592fb1,
        0x1c3fae83470dfc3e,
    ),
    (
        "bf16 master q8 scaler",
        0xd1e1e5c3cce8cba6,
        0xc67345d7d37c54f9,
    ),
    (
        "bf16 stochastic q8 defaults",
        0xf09e2901ee8b54fd,
        0xd969b202be592858,
    ),
    (
        "bf16 stochastic q8 keras_decoupled",
        0x9db727c35e6546df,
        0xc698ea14b2461cb9,
    ),
    (
        "bf16 stochastic q8 coupled_maximize_clip",
        0xfcbea08738bd77da,
        0xbddaada1cafe9c13,
    ),
    (
        "bf16 stochastic q8 scaler",
        0x962e378bd338cfdc,
        0xdd12f04ac4f8de02,
    ),
];

#[test]
fn every_mode_reaches_the_pinned_parameters_and_checkpoint_bytes() {
    let found = modes();
    if std::env::var_os("ADAMAX_PINS_PRINT").is_some() {
        for ((name, p, f), (_, pp, pf)) in found.iter().zip(PINNED) {
            println!("{name}\t{}\t{}\t{p:#x}\t{f:#x}", p == pp, f == pf);
        }
    }
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
