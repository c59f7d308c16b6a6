//! Checkpoints: PyTorch interchange (tests/data/checkpoint/, made by
//! scripts/torch_checkpoint.sh), bit-exact resume, and refusal of bad files with the
//! live state untouched.

use adamax_cuda::{
    bf16, cpu::CpuAdamax, AdamaxConfig, Checkpoint, ConfigError, Error, Optimizer, Storage,
    StorageType, TensorHyper,
};
use rand::{rngs::StdRng, Rng, SeedableRng};
use safetensors::SafeTensors;
use serde::Deserialize;

const TORCH_FILE: &[u8] = include_bytes!("data/checkpoint/torch_adamax_step7.safetensors");
const TORCH_RESUME: &str = include_str!("data/checkpoint/torch_adamax_resume.json");

#[derive(Deserialize)]
struct Resume {
    params_at_step7: Vec<Vec<f32>>,
    grads_steps_8_to_10: Vec<Vec<Vec<f32>>>,
    params_after_steps_8_to_10: Vec<Vec<Vec<f32>>>,
}

fn step_all<T: Storage>(opt: &mut CpuAdamax<T>, params: &mut [Vec<T>], grads: &[Vec<T>]) {
    let mut p: Vec<&mut [T]> = params.iter_mut().map(|p| p.as_mut_slice()).collect();
    let g: Vec<&[T]> = grads.iter().map(|g| g.as_slice()).collect();
    opt.step(&mut p, &g).unwrap();
}

#[test]
fn resuming_from_a_pytorch_checkpoint_continues_pytorchs_trajectory() {
    let ck = Checkpoint::from_bytes(TORCH_FILE).unwrap();
    assert_eq!(ck.step, 7);
    assert_eq!(
        (ck.config.lr, ck.config.beta2, ck.config.weight_decay),
        (1e-2, 0.99, 0.01)
    );
    let r: Resume = serde_json::from_str(TORCH_RESUME).unwrap();
    let mut params = r.params_at_step7.clone();
    let refs: Vec<&[f32]> = params.iter().map(|p| p.as_slice()).collect();
    let mut opt = CpuAdamax::new(AdamaxConfig::default(), &refs).unwrap();
    opt.restore(&ck).unwrap();
    assert_eq!(
        opt.config(),
        &ck.config,
        "the file's configuration is restored"
    );
    for (t, grads) in r.grads_steps_8_to_10.iter().enumerate() {
        step_all(&mut opt, &mut params, grads);
        // Same tolerance argument as tests/peer_trajectories.rs: from identical state,
        // PyTorch (lerp) and this crate (fma) differ by a few f32 roundings per step;
        // the peer trajectories measured PyTorch's own f32-vs-f64 spread at ~1e-6
        // over 20 steps, so 3 steps stay well within 2e-6.
        for (i, (ours, theirs)) in params
            .iter()
            .zip(&r.params_after_steps_8_to_10[t])
            .enumerate()
        {
            for (a, b) in ours.iter().zip(theirs) {
                assert!(
                    (a - b).abs() <= 2e-6,
                    "step {} tensor {i}: {a} vs {b}",
                    t + 8
                );
            }
        }
    }
    assert_eq!(opt.step_count().unwrap(), 10);
}

#[test]
fn files_written_here_have_pytorchs_names_types_and_shapes() {
    let r: Resume = serde_json::from_str(TORCH_RESUME).unwrap();
    let refs: Vec<&[f32]> = r.params_at_step7.iter().map(|p| p.as_slice()).collect();
    let opt = CpuAdamax::new(AdamaxConfig::default(), &refs).unwrap();
    let ours = opt.checkpoint().unwrap().to_bytes().unwrap();
    let describe = |bytes: &[u8]| {
        let st = SafeTensors::deserialize(bytes).unwrap();
        let mut v: Vec<(String, String, Vec<usize>)> = st
            .tensors()
            .into_iter()
            .map(|(n, t)| (n, format!("{:?}", t.dtype()), t.shape().to_vec()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(describe(&ours), describe(TORCH_FILE));
}

fn resume_is_bit_exact<T: Storage>() {
    let lens = [3usize, 0, 130];
    let init: Vec<Vec<T>> = lens
        .iter()
        .map(|&n| {
            (0..n)
                .map(|i| T::from_f32((i as f32 * 0.3).sin()))
                .collect()
        })
        .collect();
    let grads = |t: usize| -> Vec<Vec<T>> {
        lens.iter()
            .map(|&n| {
                (0..n)
                    .map(|i| T::from_f32(((i + 7 * t) as f32).cos() * 0.1))
                    .collect()
            })
            .collect()
    };
    let config = AdamaxConfig {
        weight_decay: 0.01,
        lr: 5e-3,
        ..AdamaxConfig::default()
    };
    let mut params = init.clone();
    let refs: Vec<&[T]> = params.iter().map(|p| p.as_slice()).collect();
    let mut a = CpuAdamax::new(config, &refs).unwrap();
    // Parameter groups travel with the checkpoint.
    a.set_tensor_hyper(
        2,
        adamax_cuda::TensorHyper {
            lr_scale: 0.5,
            weight_decay: 0.0,
        },
    )
    .unwrap();
    for t in 0..5 {
        step_all(&mut a, &mut params, &grads(t));
    }
    let path = std::env::temp_dir().join(format!(
        "adamax-ck-{}-{}.safetensors",
        T::NAME,
        std::process::id()
    ));
    a.checkpoint().unwrap().save(&path).unwrap();
    let params_at_5 = params.clone();
    for t in 5..10 {
        step_all(&mut a, &mut params, &grads(t));
    }

    let loaded = Checkpoint::load(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let mut resumed_params = params_at_5.clone();
    let refs: Vec<&[T]> = init.iter().map(|p| p.as_slice()).collect();
    let mut b = CpuAdamax::new(AdamaxConfig::default(), &refs).unwrap();
    b.restore(&loaded).unwrap();
    assert_eq!(b.tensor_hypers(), a.tensor_hypers());
    for t in 5..10 {
        step_all(&mut b, &mut resumed_params, &grads(t));
    }
    assert_eq!(
        a.checkpoint().unwrap(),
        b.checkpoint().unwrap(),
        "{}: state after resume",
        T::NAME
    );
    let bits = |v: &Vec<Vec<T>>| -> Vec<u32> {
        v.iter().flatten().map(|x| x.to_f32().to_bits()).collect()
    };
    assert_eq!(
        bits(&params),
        bits(&resumed_params),
        "{}: parameters after resume",
        T::NAME
    );
}

#[test]
fn save_load_and_resume_is_bit_exact() {
    resume_is_bit_exact::<f32>();
    resume_is_bit_exact::<bf16>();
}

/// An optimizer with some history, and its checkpoint.
fn trained() -> (CpuAdamax<f32>, Vec<u8>) {
    let mut p = vec![vec![0.5f32; 9], vec![1.0f32; 4]];
    let refs: Vec<&[f32]> = p.iter().map(|x| x.as_slice()).collect();
    let mut opt = CpuAdamax::new(AdamaxConfig::default(), &refs).unwrap();
    step_all(&mut opt, &mut p, &[vec![0.1; 9], vec![-0.2; 4]]);
    let bytes = opt.checkpoint().unwrap().to_bytes().unwrap();
    (opt, bytes)
}

#[test]
fn truncated_and_corrupt_files_are_refused_for_what_is_wrong_with_them() {
    let (_, bytes) = trained();
    let reason = |b: &[u8]| match Checkpoint::from_bytes(b) {
        Err(Error::Checkpoint { reason }) => reason,
        other => panic!("expected Error::Checkpoint, got {other:?}"),
    };
    for cut in [0, 1, 7] {
        assert!(reason(&bytes[..cut]).contains("too short"), "cut at {cut}");
    }
    for cut in [8, 20] {
        assert!(
            reason(&bytes[..cut]).contains("header claims"),
            "cut at {cut}"
        );
    }
    for cut in [bytes.len() / 2, bytes.len() - 1] {
        let r = reason(&bytes[..cut]);
        assert!(
            r.contains("truncated") || r.contains("header claims"),
            "cut at {cut}: {r}"
        );
    }
    // Bytes flipped inside the JSON header: no longer JSON.
    let mut bad = bytes.clone();
    for b in bad[8..40].iter_mut() {
        *b ^= 0x5a;
    }
    assert!(reason(&bad).contains("not a readable safetensors header"));
    // One bit flipped in the last tensor's data: only the checksum can tell.
    let mut flipped = bytes.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x01;
    assert!(reason(&flipped).contains("integrity check failed"));
}

#[test]
fn mismatched_checkpoints_are_refused_and_leave_the_state_untouched() {
    let (mut opt, bytes) = trained();
    let before = opt.checkpoint().unwrap();
    let good = Checkpoint::from_bytes(&bytes).unwrap();

    let mut wrong_storage = good.clone();
    wrong_storage.storage = StorageType::Bf16;
    for t in &mut wrong_storage.tensors {
        t.master = vec![0.0; t.exp_avg.len()];
    }
    let mut wrong_count = good.clone();
    wrong_count.tensors.pop();
    let mut wrong_len = good.clone();
    wrong_len.tensors[1].exp_avg.push(0.0);
    wrong_len.tensors[1].exp_inf.push(0.0);
    let mut bad_config = good.clone();
    bad_config.config.beta1 = 1.0;
    let mut other_step = good.clone();
    other_step.step = 999;
    other_step.tensors[0].exp_avg[0] = 123.0;

    for (what, ck) in [
        ("storage", &wrong_storage),
        ("count", &wrong_count),
        ("length", &wrong_len),
        ("config", &bad_config),
    ] {
        let err = opt.restore(ck).unwrap_err();
        assert!(
            matches!(err, Error::Checkpoint { .. } | Error::Config(_)),
            "{what}: {err}"
        );
        assert_eq!(
            opt.checkpoint().unwrap(),
            before,
            "{what}: refused restore changed the state"
        );
    }
    // A 16-bit checkpoint does not fit an f32 optimizer, even with matching lengths.
    let err = CpuAdamax::<f32>::new(AdamaxConfig::default(), &[&[0.0; 9], &[0.0; 4]])
        .unwrap()
        .restore(&wrong_storage)
        .unwrap_err();
    assert!(err.to_string().contains("bf16"), "{err}");
    // A fitting checkpoint is taken whole.
    opt.restore(&other_step).unwrap();
    assert_eq!(opt.checkpoint().unwrap(), other_step);
}

#[test]
fn step_counts_that_cannot_be_are_refused() {
    // In a PyTorch file (no checksum, so the edit reaches validation): every
    // `state.{i}.step` is 7.0. An optimizer of 6 steps cannot hold tensors of 7.
    let edited = with_header(TORCH_FILE, |h| {
        h.replace("\"step\":\"7\"", "\"step\":\"6\"")
    });
    assert!(edited != TORCH_FILE, "metadata step found");
    let err = Checkpoint::from_bytes(&edited).unwrap_err();
    assert!(
        err.to_string()
            .contains("took 7 steps but the optimizer only 6"),
        "{err}"
    );
    // An exact per-tensor count that its f32 scalar contradicts.
    let edited = with_header(TORCH_FILE, |h| {
        h.replace("\"step\":\"7\"", "\"step\":\"7\",\"tensor.0.step\":\"5\"")
    });
    let err = Checkpoint::from_bytes(&edited).unwrap_err();
    assert!(err.to_string().contains("state.0.step"), "{err}");
    // The same kind of edit in one of this crate's files is caught by its checksum.
    let (_, ours) = trained();
    let edited = with_header(&ours, |h| h.replace("\"step\":\"1\"", "\"step\":\"2\""));
    assert!(edited != ours, "metadata step found");
    let err = Checkpoint::from_bytes(&edited).unwrap_err();
    assert!(err.to_string().contains("integrity check failed"), "{err}");
}

/// PyTorch counts steps per parameter. A file whose tensors took fewer steps than the
/// optimizer (here 7 of 8: each skipped once for lack of a gradient) loads with each
/// tensor's own count, and resuming continues PyTorch's trajectory, whose next step is
/// each parameter's eighth.
#[test]
fn per_tensor_step_counts_from_pytorch_resume_its_trajectory() {
    let edited = with_header(TORCH_FILE, |h| {
        h.replace("\"step\":\"7\"", "\"step\":\"8\"")
    });
    let ck = Checkpoint::from_bytes(&edited).unwrap();
    assert_eq!(ck.step, 8);
    assert!(ck.tensors.iter().all(|t| t.step == 7));
    let r: Resume = serde_json::from_str(TORCH_RESUME).unwrap();
    let mut params = r.params_at_step7.clone();
    let refs: Vec<&[f32]> = params.iter().map(|p| p.as_slice()).collect();
    let mut opt = CpuAdamax::new(AdamaxConfig::default(), &refs).unwrap();
    opt.restore(&ck).unwrap();
    for (t, grads) in r.grads_steps_8_to_10.iter().enumerate() {
        step_all(&mut opt, &mut params, grads);
        for (ours, theirs) in params.iter().zip(&r.params_after_steps_8_to_10[t]) {
            for (a, b) in ours.iter().zip(theirs) {
                assert!((a - b).abs() <= 2e-6, "step {}: {a} vs {b}", t + 8);
            }
        }
    }
    assert_eq!(opt.step_count().unwrap(), 11);
    assert!(opt.tensor_states().iter().all(|t| t.step == 10));
    // Written back, the per-tensor counts travel in the metadata, exactly.
    let back = Checkpoint::from_bytes(&opt.checkpoint().unwrap().to_bytes().unwrap()).unwrap();
    assert_eq!(back, opt.checkpoint().unwrap());
}

/// `bytes` with its JSON header replaced by `edit(header)` (the length prefix follows).
fn with_header(bytes: &[u8], edit: impl Fn(&str) -> String) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = edit(std::str::from_utf8(&bytes[8..8 + n]).unwrap());
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

#[test]
fn a_tensor_count_beyond_what_the_file_holds_is_refused_before_anything_is_sized() {
    // PyTorch's files carry no checksum, so the count reaches validation; it used to
    // overflow a multiplication and then `Vec::with_capacity`.
    for count in ["4611686018427387904", "18446744073709551615", "4", "2", "0"] {
        let edited = with_header(TORCH_FILE, |h| {
            h.replace("\"tensors\":\"3\"", &format!("\"tensors\":\"{count}\""))
        });
        assert!(edited != TORCH_FILE, "the count was found");
        let err = Checkpoint::from_bytes(&edited).unwrap_err();
        assert!(err.to_string().contains("the file holds"), "{count}: {err}");
    }
}

#[test]
fn the_same_state_gives_the_same_bytes() {
    let (opt, bytes) = trained();
    assert_eq!(opt.checkpoint().unwrap().to_bytes().unwrap(), bytes);
    let path =
        std::env::temp_dir().join(format!("adamax-ck-det-{}.safetensors", std::process::id()));
    opt.checkpoint().unwrap().save(&path).unwrap();
    let saved = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(saved, bytes, "save writes what to_bytes gives");
}

#[test]
fn save_refuses_what_load_would_refuse_and_writes_nothing() {
    let (opt, _) = trained();
    let good = opt.checkpoint().unwrap();
    let mut nan_lr = good.clone();
    nan_lr.config.lr = f64::NAN;
    let mut masters_on_f32 = good.clone();
    masters_on_f32.tensors[0].master = vec![0.0; 9];
    let mut one_hyper_for_two = good.clone();
    one_hyper_for_two.hypers.pop();
    let mut negative_u = good.clone();
    negative_u.tensors[1].exp_inf[2] = -1.0;
    let mut nan_u = good.clone();
    nan_u.tensors[0].exp_inf[0] = f32::NAN;
    let mut short_u = good.clone();
    short_u.tensors[0].exp_inf.pop();
    let mut huge_lr_scale = good.clone();
    huge_lr_scale.hypers[0] = TensorHyper {
        lr_scale: 1e300,
        weight_decay: 0.0,
    };
    let path =
        std::env::temp_dir().join(format!("adamax-ck-bad-{}.safetensors", std::process::id()));
    for (what, ck) in [
        ("NaN learning rate", nan_lr),
        ("f32 checkpoint with masters", masters_on_f32),
        ("one hyperparameter for two tensors", one_hyper_for_two),
        ("negative exp_inf", negative_u),
        ("NaN exp_inf", nan_u),
        ("exp_inf shorter than exp_avg", short_u),
        ("an infinite step size", huge_lr_scale),
    ] {
        assert!(ck.to_bytes().is_err(), "{what}: to_bytes");
        let err = ck.save(&path).unwrap_err();
        assert!(
            matches!(err, Error::Checkpoint { .. } | Error::Config(_)),
            "{what}: {err}"
        );
        assert!(!path.exists(), "{what}: a refused save wrote a file");
        // The same state is refused by restore, leaving the optimizer as it was.
        let mut o = opt.clone();
        assert!(o.restore(&ck).is_err(), "{what}: restore");
        assert_eq!(
            o.checkpoint().unwrap(),
            good,
            "{what}: a refused restore changed state"
        );
    }
}

#[test]
fn load_reads_regular_files_only() {
    let err = Checkpoint::load("/dev/zero").unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");
    let dir = std::env::temp_dir();
    let err = Checkpoint::load(&dir).unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");
    #[cfg(unix)]
    {
        let fifo = dir.join(format!("adamax-ck-fifo-{}", std::process::id()));
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            // Would block forever if it were opened for reading.
            let err = Checkpoint::load(&fifo).unwrap_err();
            std::fs::remove_file(&fifo).unwrap();
            assert!(err.to_string().contains("not a regular file"), "{err}");
        }
    }
    let err = Checkpoint::load(dir.join("adamax-no-such-file")).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
}

#[test]
fn config_errors_from_a_file_are_typed() {
    let (opt, _) = trained();
    let mut ck = opt.checkpoint().unwrap();
    ck.config.beta2 = 1.0;
    assert!(matches!(
        ck.validate(),
        Err(Error::Config(ConfigError::OutOfRange {
            field: "beta2",
            ..
        }))
    ));
}

/// Thousands of random truncations, byte flips, bit flips and header-digit edits:
/// each is refused with a typed error or (when the edit left the content as it was,
/// e.g. one space of header padding for another) loads the same state. No panics,
/// no silently different state.
#[test]
fn fuzzed_checkpoints_are_refused_or_identical_never_different() {
    fuzz(adamax_cuda::Precision::default());
    // 8-bit codes (U8 entries), their scales and no master.
    fuzz(adamax_cuda::Precision {
        params: adamax_cuda::ParamMode::Stochastic,
        state: adamax_cuda::StateFormat::Blockwise8,
        seed: 9,
    });
}

fn fuzz(precision: adamax_cuda::Precision) {
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let lens = [9usize, 0, 300];
    let mut params: Vec<Vec<bf16>> = lens
        .iter()
        .map(|&n| {
            (0..n)
                .map(|i| bf16::from_f32((i as f32 * 0.7).sin()))
                .collect()
        })
        .collect();
    let refs: Vec<&[bf16]> = params.iter().map(|p| p.as_slice()).collect();
    let mut opt = CpuAdamax::new(
        AdamaxConfig {
            weight_decay: 0.01,
            precision,
            ..AdamaxConfig::default()
        },
        &refs,
    )
    .unwrap();
    opt.set_tensor_hyper(
        2,
        TensorHyper {
            lr_scale: 0.5,
            weight_decay: 0.0,
        },
    )
    .unwrap();
    for t in 0..3 {
        let grads: Vec<Vec<bf16>> = lens
            .iter()
            .map(|&n| {
                (0..n)
                    .map(|i| bf16::from_f32(((i + t) as f32).cos() * 0.1))
                    .collect()
            })
            .collect();
        step_all(&mut opt, &mut params, &grads);
    }
    let original = opt.checkpoint().unwrap();
    let bytes = original.to_bytes().unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let digits: Vec<usize> = (8..8 + header_len)
        .filter(|&i| bytes[i].is_ascii_digit())
        .collect();
    let (mut refused, mut identical) = (0, 0);
    for round in 0..6000 {
        let mut b = bytes.clone();
        match round % 4 {
            0 => b.truncate(rng.random_range(0..bytes.len())),
            1 => {
                let i = rng.random_range(0..b.len());
                b[i] = rng.random();
            }
            2 => {
                let i = rng.random_range(0..b.len());
                b[i] ^= 1 << rng.random_range(0..8);
            }
            _ => {
                let i = digits[rng.random_range(0..digits.len())];
                let d = b'0' + (b[i] - b'0' + rng.random_range(1..10)) % 10;
                b[i] = d;
            }
        }
        if b == bytes {
            continue;
        }
        match Checkpoint::from_bytes(&b) {
            Err(Error::Checkpoint { .. }) | Err(Error::Config(_)) => refused += 1,
            Err(other) => panic!("round {round}: untyped refusal {other:?}"),
            Ok(ck) => {
                assert_eq!(
                    ck, original,
                    "round {round}: a corrupt file loaded as different state"
                );
                identical += 1;
            }
        }
    }
    println!("fuzzed checkpoints ({precision:?}): {refused} refused, {identical} identical");
    assert!(refused > 5000, "{refused}");
}
