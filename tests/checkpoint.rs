//! Checkpoints: PyTorch interchange (tests/data/checkpoint/, made by
//! scripts/torch_checkpoint.sh), bit-exact resume, and refusal of bad files with the
//! live state untouched.

use adamax_cuda::{
    bf16, cpu::CpuAdamax, AdamaxConfig, Checkpoint, ConfigError, Error, Optimizer, Precision,
    StateFormat, Storage, StorageType, TensorHyper,
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

/// `ours` within 2e-6 of PyTorch's parameters after `step`. The tolerance argument of
/// tests/peer_trajectories.rs: from identical state, PyTorch (lerp) and this crate
/// (fma) differ by a few f32 roundings per step; the peer trajectories measured
/// PyTorch's own f32-vs-f64 spread at ~1e-6 over 20 steps, so 3 steps stay well within
/// 2e-6.
fn follows_pytorch(
    ours: &[Vec<f32>],
    theirs: &[Vec<f32>],
    step: usize,
    tensor: impl Fn(usize) -> String,
) {
    assert_eq!(ours.len(), theirs.len());
    for (i, (ours, theirs)) in ours.iter().zip(theirs).enumerate() {
        assert_eq!(ours.len(), theirs.len());
        for (a, b) in ours.iter().zip(theirs) {
            assert!(
                (a - b).abs() <= 2e-6,
                "step {step} tensor {}: {a} vs {b}",
                tensor(i)
            );
        }
    }
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
        follows_pytorch(&params, &r.params_after_steps_8_to_10[t], t + 8, |i| {
            i.to_string()
        });
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
    // Within AdaMax's bound |exp_avg| <= c * exp_inf, as a run's state is.
    other_step.tensors[0].exp_inf[0] = 200.0;

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
    // An exact per-tensor count that its f32 scalar contradicts (in a file of ours with
    // its checksum recomputed: PyTorch's files carry no such key).
    let (_, ours) = trained();
    let edited = edited_header(&ours, |h| {
        h.replace("\"step\":\"1\"", "\"step\":\"1\",\"tensor.0.step\":\"0\"")
    });
    let err = Checkpoint::from_bytes(&edited).unwrap_err();
    assert!(err.to_string().contains("state.0.step"), "{err}");
    // The same kind of edit without a recomputed checksum is caught by the checksum.
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
/// no silently different state. Half the edits are then resealed (the checksum
/// recomputed, so the file is self-consistent): those may load as other state only if
/// a run could reach it ([`reachable`]); 0 impossible states are accepted.
#[test]
fn fuzzed_checkpoints_are_refused_identical_or_reachable() {
    fuzz(adamax_cuda::Precision::default());
    // 8-bit codes (U8 entries), their scales and no master.
    fuzz(adamax_cuda::Precision {
        params: adamax_cuda::ParamMode::Stochastic,
        state: adamax_cuda::StateFormat::Blockwise8,
        seed: 9,
        min_8bit_len: 0,
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
    let (mut refused, mut identical, mut other) = (0, 0, 0);
    for round in 0..8000 {
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
        // Half the rounds are self-consistent edits: the checksum recomputed, as a
        // hostile writer would. Those may load as other state, if a run could reach it.
        let resealed = round % 8 >= 4;
        if resealed {
            b = reseal(&b);
        }
        if b == bytes {
            continue;
        }
        match Checkpoint::from_bytes(&b) {
            Err(Error::Checkpoint { .. }) | Err(Error::Config(_)) => refused += 1,
            Err(other) => panic!("round {round}: untyped refusal {other:?}"),
            Ok(ck) if ck == original => identical += 1,
            Ok(ck) => {
                assert!(
                    resealed,
                    "round {round}: a corrupt file loaded as different state"
                );
                if let Err(why) = reachable(&ck) {
                    panic!("round {round}: a state no run reaches was accepted: {why}");
                }
                other += 1;
            }
        }
    }
    println!(
        "fuzzed checkpoints ({precision:?}): {refused} refused, {identical} identical, {other} other reachable states"
    );
    assert!(refused > 6000, "{refused}");
}

/// Whether a checkpoint that loaded holds state a run can reach, judged here apart from
/// the crate's validation: it saves, and loads and saves again as the same bytes; its
/// moments are finite, `u >= 0`,
/// zero before a tensor's first step; 8-bit blocks hold their largest magnitude as code
/// 1.0 (zeros only at scale 0); and with f32 moments, one step of zero gradients moves
/// no master weight further than the paper's bound, `c * lr / (1 - beta1^t)` with `c =
/// (1 - beta1) / (1 - beta1 / beta2)` (Kingma & Ba 2015, sec. 7.1; coupled decay only
/// adds to the gradient both moments see).
fn reachable(ck: &Checkpoint) -> Result<(), String> {
    use adamax_cuda::{spec::lowbit, StateFormat};
    // Bytes, not `==`: a master weight may be NaN (a user's weights may be).
    let bytes = ck.to_bytes().map_err(|e| e.to_string())?;
    let again = Checkpoint::from_bytes(&bytes).and_then(|back| back.to_bytes());
    if again.map_err(|e| e.to_string())? != bytes {
        return Err("it does not save as itself".into());
    }
    for (i, t) in ck.tensors.iter().enumerate() {
        let scales = [&t.exp_avg_q8.scales, &t.exp_inf_q8.scales];
        for v in [&t.exp_avg, &t.exp_inf, scales[0], scales[1]] {
            if v.iter().any(|x| !x.is_finite()) {
                return Err(format!("tensor {i}: a non-finite moment"));
            }
        }
        if t.exp_inf.iter().chain(scales[1]).any(|u| *u < 0.0) {
            return Err(format!("tensor {i}: a negative infinity norm"));
        }
        let zero = t.exp_avg.iter().chain(&t.exp_inf).all(|x| *x == 0.0)
            && t.exp_avg_q8
                .codes
                .iter()
                .chain(&t.exp_inf_q8.codes)
                .all(|c| *c == 0);
        if t.step == 0 && !zero {
            return Err(format!("tensor {i}: moments before its first step"));
        }
        for (q, signed) in [(&t.exp_avg_q8, true), (&t.exp_inf_q8, false)] {
            let top = if signed {
                lowbit::EXP_AVG_CODE.max_magnitude_code()
            } else {
                lowbit::EXP_INF_CODE.max_magnitude_code()
            };
            for (block, &scale) in q.codes.chunks(lowbit::QBLOCK).zip(&q.scales) {
                let magnitude = |c: u8| u32::from(if signed { c & 0x7F } else { c });
                let has_top = block.iter().any(|&c| magnitude(c) == top);
                if (scale == 0.0 && block.iter().any(|&c| c != 0)) || (scale > 0.0 && !has_top) {
                    return Err(format!(
                        "tensor {i}: an 8-bit block the encoder never writes"
                    ));
                }
            }
        }
    }
    let c = &ck.config;
    if c.precision.state != StateFormat::F32
        || c.beta1 >= c.beta2
        || ck.storage != StorageType::Bf16
    {
        return Ok(());
    }
    let bound = (1.0 - c.beta1) / (1.0 - c.beta1 / c.beta2);
    let mut params: Vec<Vec<bf16>> = ck
        .tensors
        .iter()
        .map(|t| t.master.iter().map(|&x| bf16::from_f32(x)).collect())
        .collect();
    let refs: Vec<&[bf16]> = params.iter().map(|p| p.as_slice()).collect();
    let mut opt = CpuAdamax::new(*c, &refs).map_err(|e| e.to_string())?;
    opt.restore(ck).map_err(|e| e.to_string())?;
    let zeros: Vec<Vec<bf16>> = params.iter().map(|p| vec![bf16::ZERO; p.len()]).collect();
    step_all(&mut opt, &mut params, &zeros);
    for (i, (before, after)) in ck.tensors.iter().zip(opt.tensor_states()).enumerate() {
        let lr = c.lr * ck.hypers[i].lr_scale;
        let most = bound * lr / (1.0 - c.beta1.powi(before.step as i32 + 1));
        for (j, (a, b)) in before.master.iter().zip(&after.master).enumerate() {
            let moved = f64::from(b - a).abs();
            if moved > most * 1.001 + 1e-30 {
                return Err(format!(
                    "tensor {i} weight {j} moved {moved:e} on a zero gradient, beyond the bound {most:e}"
                ));
            }
        }
    }
    Ok(())
}

/// `bytes` with its checksum recomputed as the format documents it (src/checkpoint:
/// XXH3-64 over `adamax-cuda checkpoint checksum 1\0`, every metadata key but the
/// checksum in key order as key, NUL, value, NUL, then every tensor in name order as
/// name, NUL, dtype, NUL, and rank, dimensions and byte length as little-endian u64,
/// then its bytes): an edited file that is self-consistent, as a hostile writer would
/// make it. Written here from the documentation, not with the crate's code. Bytes that
/// do not parse are returned as they are.
fn reseal(bytes: &[u8]) -> Vec<u8> {
    use xxhash_rust::xxh3::Xxh3;
    let Some(n) = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
    else {
        return bytes.to_vec();
    };
    let Some(text) = bytes
        .get(8..8usize.saturating_add(n))
        .and_then(|h| std::str::from_utf8(h).ok())
    else {
        return bytes.to_vec();
    };
    let Ok(serde_json::Value::Object(header)) = serde_json::from_str::<serde_json::Value>(text)
    else {
        return bytes.to_vec();
    };
    let Some(serde_json::Value::Object(meta)) = header.get("__metadata__") else {
        return bytes.to_vec();
    };
    let Some(old) = meta.get("checksum").and_then(|v| v.as_str()) else {
        return bytes.to_vec();
    };
    let data = &bytes[8 + n..];
    let mut h = Xxh3::new();
    h.update(b"adamax-cuda checkpoint checksum 1\0");
    let mut keys: Vec<&String> = meta.keys().filter(|k| *k != "checksum").collect();
    keys.sort();
    for k in keys {
        let Some(v) = meta[k].as_str() else {
            return bytes.to_vec();
        };
        for part in [k.as_bytes(), b"\0", v.as_bytes(), b"\0"] {
            h.update(part);
        }
    }
    let mut names: Vec<&String> = header.keys().filter(|k| *k != "__metadata__").collect();
    names.sort();
    for name in names {
        let t = &header[name];
        let (Some(dtype), Some(shape), Some(offsets)) = (
            t["dtype"].as_str(),
            t["shape"].as_array(),
            t["data_offsets"].as_array(),
        ) else {
            return bytes.to_vec();
        };
        let (Some(a), Some(b)) = (
            offsets.first().and_then(|v| v.as_u64()),
            offsets.get(1).and_then(|v| v.as_u64()),
        ) else {
            return bytes.to_vec();
        };
        let Some(values) = data.get(a as usize..b as usize) else {
            return bytes.to_vec();
        };
        h.update(name.as_bytes());
        h.update(format!("\0{dtype}\0").as_bytes());
        h.update(&(shape.len() as u64).to_le_bytes());
        for d in shape {
            h.update(&d.as_u64().unwrap_or(u64::MAX).to_le_bytes());
        }
        h.update(&(values.len() as u64).to_le_bytes());
        h.update(values);
    }
    let new = format!("xxh3-64:{:016x}", h.digest());
    let mut out = bytes[..8].to_vec();
    out.extend_from_slice(text.replacen(old, &new, 1).as_bytes());
    out.extend_from_slice(data);
    out
}

/// `bytes` made a file of no tensors (tensor count 0, no entries, no data), resealed.
fn without_tensors(bytes: &[u8]) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut meta = header["__metadata__"].as_object().unwrap().clone();
    meta.retain(|k, _| !k.starts_with("tensor."));
    meta.insert("tensors".into(), "0".into());
    let mut text = serde_json::to_vec(&serde_json::json!({ "__metadata__": meta })).unwrap();
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    reseal(&out)
}

/// A resealed copy of `bytes` with its header edited by `edit`.
fn edited_header(bytes: &[u8], edit: impl Fn(&str) -> String) -> Vec<u8> {
    reseal(&with_header(bytes, edit))
}

/// A resealed copy of `bytes` with `value` written over the f32 at element `at` of
/// entry `name`.
fn edited_f32(bytes: &[u8], name: &str, at: usize, value: f32) -> Vec<u8> {
    let st = SafeTensors::deserialize(bytes).unwrap();
    let view = st.tensor(name).unwrap();
    let start = view.data().as_ptr() as usize - bytes.as_ptr() as usize + 4 * at;
    let mut out = bytes.to_vec();
    out[start..start + 4].copy_from_slice(&value.to_le_bytes());
    reseal(&out)
}

/// The reseal helper itself: an unedited file comes back byte for byte, and an edit
/// that it reseals passes the integrity check (so the refusals below are the
/// validation's, not the checksum's).
#[test]
fn resealing_reproduces_the_documented_checksum() {
    let (_, bytes) = trained();
    assert_eq!(reseal(&bytes), bytes);
    let edited = edited_header(&bytes, |h| {
        h.replace("\"lr\":\"0.002\"", "\"lr\":\"0.003\"")
    });
    assert_ne!(edited, bytes);
    assert_eq!(Checkpoint::from_bytes(&edited).unwrap().config.lr, 0.003);
}

fn refused_load(bytes: &[u8], says: &str) {
    match Checkpoint::from_bytes(bytes) {
        Err(Error::Checkpoint { reason }) => assert!(reason.contains(says), "{reason}"),
        other => panic!("expected a refusal saying `{says}`, got {other:?}"),
    }
}

/// Issue #17, item 9: self-consistent files (checksum recomputed) and checkpoints built
/// through the public fields that no run can produce are refused by load, save and
/// restore alike, each saying what is wrong.
#[test]
fn states_no_run_can_reach_are_refused_by_load_save_and_restore() {
    let (opt, bytes) = trained();
    let good = opt.checkpoint().unwrap();
    let path = std::env::temp_dir().join(format!(
        "adamax-ck-impossible-{}.safetensors",
        std::process::id()
    ));
    let refused_everywhere = |ck: &Checkpoint, says: &str| {
        for r in [ck.validate(), ck.to_bytes().map(|_| ()), ck.save(&path)] {
            match r {
                Err(Error::Checkpoint { reason }) => assert!(reason.contains(says), "{reason}"),
                other => panic!("expected a refusal saying `{says}`, got {other:?}"),
            }
        }
        assert!(!path.exists(), "{says}: a refused save wrote a file");
        let mut o = opt.clone();
        assert!(o.restore(ck).is_err(), "{says}: restore");
        assert_eq!(
            o.checkpoint().unwrap(),
            good,
            "{says}: restore changed state"
        );
    };
    // m = 1, u = 0: the next zero-gradient step would move the weight by -5.2e5.
    let mut m_without_u = good.clone();
    m_without_u.tensors[0].exp_avg[3] = 1.0;
    m_without_u.tensors[0].exp_inf[3] = 0.0;
    refused_everywhere(&m_without_u, "beyond");
    refused_load(&edited_f32(&bytes, "state.0.exp_inf", 3, 0.0), "beyond");
    // exp_avg and exp_inf swapped (m = 0.1 * g after one step, u = |g| + eps).
    let mut swapped = good.clone();
    let t = &mut swapped.tensors[1];
    std::mem::swap(&mut t.exp_avg, &mut t.exp_inf);
    t.exp_inf.iter_mut().for_each(|u| *u = u.abs());
    refused_everywhere(&swapped, "beyond");
    // Nonzero moments in a tensor that took no step.
    let mut fresh = CpuAdamax::<f32>::new(AdamaxConfig::default(), &[&[0.5; 9], &[1.0; 4]])
        .unwrap()
        .checkpoint()
        .unwrap();
    fresh.tensors[1].exp_inf[0] = 1.0;
    refused_everywhere(&fresh, "took no step");
    // Non-finite moments (item 11): refused with what happened and what to do.
    for (i, v) in [(0usize, f32::INFINITY), (1, f32::NAN)] {
        let mut ck = good.clone();
        ck.tensors[i].exp_inf[0] = v;
        refused_everywhere(&ck, "skip_nonfinite");
        let mut ck = good.clone();
        ck.tensors[i].exp_avg[0] = v;
        refused_everywhere(&ck, "NaN or infinite gradient");
    }
    refused_load(
        &edited_f32(&bytes, "state.1.exp_avg", 0, f32::NEG_INFINITY),
        "skip_nonfinite",
    );
    // No tensors at all.
    let mut empty = good.clone();
    empty.tensors.clear();
    empty.hypers.clear();
    refused_everywhere(&empty, "no tensors");
    refused_load(&without_tensors(&bytes), "no tensors");
    std::fs::remove_file(&path).ok();
}

/// Issue #17, items 9 and 10: metadata keys the file's writer never writes are refused
/// (an edit, or another program's), also in a file that says it is PyTorch's, which
/// carries no checksum: deleting two keys must not turn integrity off.
#[test]
fn keys_the_writer_never_writes_are_refused() {
    let (_, bytes) = trained();
    for (edit, says) in [
        ("\"maximize\":\"false\",\"foo\":\"1\"", "`foo`"),
        (
            "\"maximize\":\"false\",\"tensor.9.lr_scale\":\"1\"",
            "`tensor.9.lr_scale`",
        ),
        (
            "\"maximize\":\"false\",\"state_block\":\"256\"",
            "`state_block`",
        ),
        ("\"maximize\":\"false\",\"seed\":\"99\"", "`seed`"),
    ] {
        let b = edited_header(&bytes, |h| h.replace("\"maximize\":\"false\"", edit));
        refused_load(&b, says);
    }
    // PyTorch's file with any key of this crate's.
    for extra in [
        "\"options.max_norm\":\"1\"",
        "\"scaler.scale\":\"2\",\"scaler.growth_factor\":\"2\",\"scaler.backoff_factor\":\"0.5\",\"scaler.growth_interval\":\"9\",\"scaler.growth_tracker\":\"0\"",
        "\"tensor.0.lr_scale\":\"0.5\",\"tensor.0.weight_decay\":\"0\"",
        "\"state_format\":\"blockwise8\"",
        "\"checksum\":\"xxh3-64:0000000000000000\"",
    ] {
        let b = with_header(TORCH_FILE, |h| {
            h.replace("\"maximize\":\"false\"", &format!("\"maximize\":\"false\",{extra}"))
        });
        assert_ne!(b, TORCH_FILE, "{extra}: the anchor was found");
        match Checkpoint::from_bytes(&b) {
            Err(Error::Checkpoint { reason }) => assert!(
                reason.contains("not one PyTorch writes") || reason.contains("integrity"),
                "{extra}: {reason}"
            ),
            other => panic!("{extra}: {other:?}"),
        }
    }
    Checkpoint::from_bytes(TORCH_FILE).unwrap();
}

/// Issue #17, item 15: a deterministic mode's seed means nothing, so it is not part of
/// equality, and a checkpoint round-trips equal whatever seed its config held.
#[test]
fn a_deterministic_modes_seed_is_not_part_of_the_state() {
    let (opt, _) = trained();
    let mut ck = opt.checkpoint().unwrap();
    ck.config.precision.seed = 99;
    let back = Checkpoint::from_bytes(&ck.to_bytes().unwrap()).unwrap();
    assert_eq!(back, ck);
    assert_eq!(back.config.precision.seed, 0, "the file holds no seed");
    // A random mode's seed is state.
    use adamax_cuda::{ParamMode, Precision, StateFormat};
    let sr = |seed| Precision {
        params: ParamMode::Stochastic,
        state: StateFormat::F32,
        seed,
        min_8bit_len: 0,
    };
    assert_ne!(sr(1), sr(2));
    assert_eq!(
        Precision {
            seed: 1,
            ..Precision::default()
        },
        Precision::default()
    );
}

/// Issue #17, item 6: a header larger than `load` reads (100 MB, about 330,000 tensors)
/// is refused by `save` before any file is made, naming the limit (the unit tests of
/// src/checkpoint/file.rs check that writer and reader share it).
#[test]
fn headers_larger_than_load_reads_are_refused_before_writing() {
    let n = 400_000;
    let ck = Checkpoint {
        config: AdamaxConfig::default(),
        step: 0,
        storage: StorageType::F32,
        tensors: vec![adamax_cuda::TensorState::default(); n],
        shapes: vec![vec![0]; n],
        names: vec![None; n],
        state_formats: vec![adamax_cuda::StateFormat::F32; n],
        hypers: vec![TensorHyper::from_config(&AdamaxConfig::default()); n],
        options: Default::default(),
        scaler: None,
    };
    let path =
        std::env::temp_dir().join(format!("adamax-ck-huge-{}.safetensors", std::process::id()));
    // (`to_bytes` plans the file with the same code; one call keeps the test short.)
    match ck.save(&path) {
        Err(Error::Checkpoint { reason }) => assert!(reason.contains("100000000"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(!path.exists());
}

/// Issue #17, item 11: after an infinite gradient without the overflow check, f32 state
/// holds `exp_inf = inf` and 8-bit state a NaN block scale; both formats refuse to save
/// or convert it alike, saying what happened and what to do (f32 state used to save,
/// and converting it said only "exp_inf_q8_scale[0] is NaN").
#[test]
fn state_reached_by_a_non_finite_gradient_is_refused_alike_in_both_formats() {
    use adamax_cuda::{ParamMode, Precision, StateFormat};
    for state in [StateFormat::F32, StateFormat::Blockwise8] {
        let config = AdamaxConfig {
            precision: Precision {
                params: ParamMode::Master,
                state,
                seed: 3,
                min_8bit_len: 0,
            },
            ..AdamaxConfig::default()
        };
        let mut w = vec![0.5f32; 5];
        let mut opt = CpuAdamax::new(config, &[&w]).unwrap();
        opt.step(&mut [&mut w], &[&[0.1, f32::INFINITY, 0.0, -0.2, 1.0]])
            .unwrap();
        let ck = opt.checkpoint().unwrap();
        let other = match state {
            StateFormat::F32 => StateFormat::Blockwise8,
            StateFormat::Blockwise8 => StateFormat::F32,
        };
        let path = std::env::temp_dir().join(format!(
            "adamax-ck-nonfinite-{}.safetensors",
            std::process::id()
        ));
        for r in [
            ck.save(&path),
            opt.save_checkpoint(&path),
            ck.convert_state(other).map(|_| ()),
        ] {
            match r {
                Err(Error::Checkpoint { reason }) => assert!(
                    reason.contains("NaN or infinite gradient")
                        && reason.contains("skip_nonfinite"),
                    "{state:?}: {reason}"
                ),
                other => panic!("{state:?}: {other:?}"),
            }
        }
        assert!(!path.exists());
    }
}

/// The other side of the invariants: every state a run reaches validates, so `save`
/// never refuses a real run. Runs of every storage mode under configurations at the
/// edges (beta1 = 0, beta1 just below beta2, eps 0 in either convention, both decays,
/// maximize, clipping and a loss scaler) with adversarial gradients: magnitudes from
/// 1e-30 to 1e30, long zero runs, rare spikes, sign flips; the checkpoint after every
/// step must validate and round-trip.
#[test]
fn every_state_a_run_reaches_validates() {
    use adamax_cuda::{
        EpsilonMode, LossScaler, ParamMode, Precision, StateFormat, StepOptions, WeightDecayMode,
    };
    let mut rng = StdRng::seed_from_u64(0xB0_0D);
    let modes = [
        (ParamMode::Master, StateFormat::F32),
        (ParamMode::Stochastic, StateFormat::F32),
        (ParamMode::Master, StateFormat::Blockwise8),
        (ParamMode::Stochastic, StateFormat::Blockwise8),
    ];
    let mut checked = 0;
    for (beta1, beta2) in [(0.9, 0.999), (0.0, 0.5), (0.998, 0.999), (0.5, 0.6)] {
        for (eps, eps_mode) in [
            (0.0, EpsilonMode::InsideMax),
            (0.0, EpsilonMode::Denominator),
            (1e-8, EpsilonMode::InsideMax),
        ] {
            for (weight_decay_mode, maximize) in [
                (WeightDecayMode::Coupled, false),
                (WeightDecayMode::Decoupled, true),
            ] {
                for (params, state) in modes {
                    let config = AdamaxConfig {
                        lr: 1e-2,
                        beta1,
                        beta2,
                        eps,
                        eps_mode,
                        weight_decay: 0.01,
                        weight_decay_mode,
                        maximize,
                        precision: Precision {
                            params,
                            state,
                            seed: 5,
                            min_8bit_len: 0,
                        },
                    };
                    let lens = [300usize, 7];
                    let mut p: Vec<Vec<bf16>> = lens
                        .iter()
                        .map(|&n| (0..n).map(|i| bf16::from_f32((i as f32).sin())).collect())
                        .collect();
                    let refs: Vec<&[bf16]> = p.iter().map(|x| x.as_slice()).collect();
                    let mut opt = CpuAdamax::new(config, &refs).unwrap();
                    if beta1 == 0.9 {
                        opt.set_options(StepOptions {
                            max_norm: Some(1.0),
                            skip_nonfinite: true,
                            ..Default::default()
                        })
                        .unwrap();
                        opt.set_loss_scaler(Some(LossScaler {
                            scale: 4.0,
                            growth_interval: 3,
                            ..Default::default()
                        }))
                        .unwrap();
                    }
                    for step in 0..60 {
                        let grads: Vec<Vec<bf16>> = lens
                            .iter()
                            .map(|&n| {
                                (0..n)
                                    .map(|i| {
                                        let g = if (10..30).contains(&step) && i % 3 != 0 {
                                            0.0 // a long zero run for most elements
                                        } else if rng.random::<f32>() < 0.01 {
                                            1e30 // a rare spike
                                        } else {
                                            let e = rng.random_range(-30.0..10.0f32);
                                            rng.random_range(-1.0..1.0f32) * 10f32.powf(e)
                                        };
                                        bf16::from_f32(g)
                                    })
                                    .collect()
                            })
                            .collect();
                        step_all(&mut opt, &mut p, &grads);
                        let ck = opt.checkpoint().unwrap();
                        if let Err(e) = ck.validate() {
                            panic!("{config:?} step {step}: a reached state refused: {e}");
                        }
                        checked += 1;
                    }
                    let ck = opt.checkpoint().unwrap();
                    let back = Checkpoint::from_bytes(&ck.to_bytes().unwrap()).unwrap();
                    assert_eq!(back.to_bytes().unwrap(), ck.to_bytes().unwrap());
                }
            }
        }
    }
    println!("{checked} reached states validated");
}

/// 8-bit state keeps the bound in its format: `m` is stored as its ratio to the step's
/// denominator, and a block's ratio scale (its largest |m / den|) is within c. An edit of
/// the scales that no run makes (found by a hostile probe: it sent the weights to
/// infinity on a zero gradient) is refused everywhere. Issue #19's reproduction, whose
/// 8-bit rounding left elements beyond the bound before the ratio format, validates.
#[test]
fn eight_bit_scales_beyond_the_bound_are_refused() {
    use adamax_cuda::{ParamMode, Precision, StateFormat};
    let config = AdamaxConfig {
        precision: Precision {
            params: ParamMode::Master,
            state: StateFormat::Blockwise8,
            seed: 3,
            min_8bit_len: 0,
        },
        ..AdamaxConfig::default()
    };
    let mut w = vec![0.5f32; 4];
    let mut opt = CpuAdamax::new(config, &[&w]).unwrap();
    opt.step(&mut [&mut w], &[&[0.1, -0.2, 0.3, 0.4]]).unwrap();
    let good = opt.checkpoint().unwrap();
    good.validate().unwrap();
    // A ratio of 1 (a first step: m = (1 - beta1) g, u = |g| + eps, so a little under
    // 0.1) is within c = 1.009; just beyond c, or at f32::MAX, it is refused.
    let c = (1.0 - 0.9) / (1.0 - 0.9 / 0.999);
    for scale in [f32::MAX, (c * 1.001) as f32] {
        let mut bad = good.clone();
        bad.tensors[0].exp_avg_q8.scales[0] = scale;
        for r in [bad.validate(), bad.to_bytes().map(|_| ())] {
            match r {
                Err(Error::Checkpoint { reason }) => {
                    assert!(reason.contains("block 0"), "{reason}")
                }
                other => panic!("{other:?}"),
            }
        }
        let mut o = opt.clone();
        assert!(o.restore(&bad).is_err());
    }
    let mut at_c = good.clone();
    at_c.tensors[0].exp_avg_q8.scales[0] = (c * 0.9999) as f32;
    at_c.validate().unwrap();
    let edited = edited_f32(
        &good.to_bytes().unwrap(),
        "state.0.exp_avg_q8_scale",
        0,
        1e30,
    );
    refused_load(&edited, "block 0");
    // A scale below f32's normal range, and a block of a nonzero scale that lost its
    // largest code (resealed edits), are refused.
    let mut tiny = good.clone();
    tiny.tensors[0].exp_inf_q8.scales[0] = 1e-39;
    let mut lost = good.clone();
    let t = &mut lost.tensors[0];
    for c in t.exp_inf_q8.codes.iter_mut() {
        *c = (*c).min(200);
    }
    for (bad, says) in [
        (tiny, "below f32's normal range"),
        (lost, "no code at magnitude 1.0"),
    ] {
        match bad.validate() {
            Err(Error::Checkpoint { reason }) => assert!(reason.contains(says), "{reason}"),
            other => panic!("expected the edit refused: {other:?}"),
        }
    }
    // Issue #19's reproduction: one element far larger than the rest, then a step with
    // zero gradients for the rest; their u rounds far below its block's largest.
    let mut w = vec![0f32; 256];
    let mut opt = CpuAdamax::new(config, &[&w]).unwrap();
    let mut g = vec![1e-6f32; 256];
    g[0] = 1.0;
    opt.step(&mut [&mut w], &[&g]).unwrap();
    let mut g2 = vec![0f32; 256];
    g2[0] = 1.0;
    opt.step(&mut [&mut w], &[&g2]).unwrap();
    let ck = opt.checkpoint().unwrap();
    ck.validate().unwrap();
    ck.convert_state(StateFormat::F32)
        .unwrap()
        .validate()
        .unwrap();
}

/// Metadata values as this crate writes them and no other way (a hostile probe found
/// `+5` and `0005` for 5 accepted), and f32 settings beyond f32's range refused with the
/// file's own text (`1e-50` used to be reported as 0).
#[test]
fn metadata_values_are_read_only_as_written() {
    let (_, bytes) = trained();
    for (from, to) in [
        ("\"step\":\"1\"", "\"step\":\"+1\""),
        ("\"step\":\"1\"", "\"step\":\"0001\""),
        ("\"lr\":\"0.002\"", "\"lr\":\"2e-3\""),
    ] {
        let b = edited_header(&bytes, |h| h.replace(from, to));
        assert_ne!(b, bytes, "{from}");
        refused_load(&b, "not as this crate writes that value");
    }
    for (key, value) in [("options.max_norm", "1e-50"), ("options.inv_scale", "1e39")] {
        let b = edited_header(&bytes, |h| {
            h.replace(
                "\"options.skip_nonfinite\"",
                &format!("\"{key}\":\"{value}\",\"options.skip_nonfinite\""),
            )
        });
        refused_load(
            &b,
            &format!("`{key}` is {value}, beyond what an f32 setting holds"),
        );
    }
}

/// Issue #23: the 16-bit parameters a checkpoint's masters stand for are the ones the
/// run wrote (the CPU reference rounds each step's master the same way); modes and types
/// without masters are refused with what to do.
#[test]
fn params_from_masters_are_the_parameters_the_run_wrote() {
    use adamax_cuda::{bf16, f16, ParamMode, Precision, Storage};
    fn run<T: Storage>(precision: Precision) -> (Vec<Vec<T>>, Checkpoint) {
        let mut p = vec![
            (0..300)
                .map(|i| T::from_f32((i as f32).cos()))
                .collect::<Vec<T>>(),
            vec![T::from_f32(1.5); 5],
        ];
        let refs: Vec<&[T]> = p.iter().map(|x| x.as_slice()).collect();
        let config = AdamaxConfig {
            lr: 1e-2,
            precision,
            ..AdamaxConfig::default()
        };
        let mut opt = CpuAdamax::new(config, &refs).unwrap();
        for s in 0..4 {
            let g: Vec<Vec<T>> = p
                .iter()
                .map(|x| {
                    (0..x.len())
                        .map(|i| T::from_f32(((i + s) as f32).sin()))
                        .collect()
                })
                .collect();
            let mut pm: Vec<&mut [T]> = p.iter_mut().map(|x| x.as_mut_slice()).collect();
            let gr: Vec<&[T]> = g.iter().map(|x| x.as_slice()).collect();
            opt.step(&mut pm, &gr).unwrap();
        }
        (p, opt.checkpoint().unwrap())
    }
    let bits =
        |v: &Vec<Vec<f32>>| -> Vec<u32> { v.iter().flatten().map(|x| x.to_bits()).collect() };
    let (p, ck) = run::<bf16>(Precision::default());
    let widen = |v: &Vec<Vec<bf16>>| {
        v.iter()
            .map(|t| t.iter().map(|x| x.to_f32()).collect())
            .collect()
    };
    assert_eq!(
        bits(&widen(&ck.params::<bf16>().unwrap())),
        bits(&widen(&p))
    );
    let (p16, ck16) = run::<f16>(Precision::default());
    assert_eq!(ck16.params::<f16>().unwrap(), p16);
    let refused = |r: adamax_cuda::Result<()>, says: &str| match r {
        Err(Error::Checkpoint { reason }) => assert!(reason.contains(says), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    };
    refused(
        ck.params::<f16>().map(|_| ()),
        "it holds bf16 parameters, not f16",
    );
    let (_, ck32) = run::<f32>(Precision::default());
    refused(ck32.params::<f32>().map(|_| ()), "save them with the model");
    let sr = Precision {
        params: ParamMode::Stochastic,
        ..Precision::default()
    };
    let (_, cksr) = run::<bf16>(sr);
    refused(cksr.params::<bf16>().map(|_| ()), "rounded stochastically");
}

/// Found by a hostile probe: saving renamed over whatever was at the path, a device
/// node included (`/dev/null`, as root). Only a regular file is replaced now; anything
/// else is refused, left as it was, with what to do.
#[test]
fn saving_replaces_only_a_regular_file() {
    let (opt, _) = trained();
    let dir = std::env::temp_dir().join(format!("adamax-save-target-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("a_directory")).unwrap();
    let refused = |path: &std::path::Path, says: &str| match opt.save_checkpoint(path) {
        Err(e @ Error::Io { .. }) => assert!(e.to_string().contains(says), "{e}"),
        other => panic!("{}: expected Error::Io, got {other:?}", path.display()),
    };
    refused(&dir.join("a_directory"), "not a regular file");
    assert!(dir.join("a_directory").is_dir());
    #[cfg(unix)]
    {
        let target = dir.join("target.txt");
        std::fs::write(&target, b"keep").unwrap();
        let link = dir.join("link.safetensors");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        refused(&link, "not a regular file");
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    }
    refused(
        &dir.join("missing").join("ck.safetensors"),
        "create it first",
    );
    refused(std::path::Path::new(""), "pass a file path");
    // A regular file is replaced, and a new one written.
    let file = dir.join("ck.safetensors");
    std::fs::write(&file, b"old").unwrap();
    opt.save_checkpoint(&file).unwrap();
    assert_eq!(Checkpoint::load(&file).unwrap(), opt.checkpoint().unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Found by a hostile probe: `params` read masters without validating, so a checkpoint
/// edited by hand gave parameters (or a wrong reason).
#[test]
fn params_validate_the_checkpoint_first() {
    let (_, bytes) = trained();
    let mut f32_with_masters = Checkpoint::from_bytes(&bytes).unwrap();
    f32_with_masters.tensors[0].master = vec![1.0; 9];
    assert!(f32_with_masters.params::<f32>().is_err());
    let mut w = vec![adamax_cuda::bf16::from_f32(0.5); 4];
    let mut opt = CpuAdamax::new(AdamaxConfig::default(), &[&w]).unwrap();
    let g = vec![adamax_cuda::bf16::from_f32(0.1); 4];
    opt.step(&mut [&mut w], &[&g]).unwrap();
    let mut short = opt.checkpoint().unwrap();
    short.tensors[0].master.pop();
    let expected = short.validate().unwrap_err().to_string();
    let found = short.params::<adamax_cuda::bf16>().unwrap_err().to_string();
    assert_eq!(found, expected);
}

/// Found by a hostile probe: a file without `tensor.{i}.step` where that tensor's count
/// differs from the optimizer's (which the writer always records) loaded as another
/// state than its bytes say.
#[test]
fn a_missing_tensor_step_key_is_refused() {
    let mut p = vec![vec![0.5f32; 9], vec![1.0f32; 4]];
    let refs: Vec<&[f32]> = p.iter().map(|x| x.as_slice()).collect();
    let mut opt = CpuAdamax::new(AdamaxConfig::default(), &refs).unwrap();
    step_all(&mut opt, &mut p, &[vec![0.1; 9], vec![-0.2; 4]]);
    {
        let (a, b) = p.split_at_mut(1);
        let g = [0.1f32; 9];
        opt.step_some(&mut [&mut a[0], &mut b[0]], &[Some(&g[..]), None])
            .unwrap();
    }
    let bytes = opt.checkpoint().unwrap().to_bytes().unwrap();
    assert_eq!(
        Checkpoint::from_bytes(&bytes).unwrap(),
        opt.checkpoint().unwrap()
    );
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        text.contains("\"tensor.1.step\":\"1\""),
        "the writer records the count"
    );
    let edited = edited_header(&bytes, |h| h.replace("\"tensor.1.step\":\"1\",", ""));
    assert_ne!(edited, bytes);
    refused_load(&edited, "`tensor.1.step` is missing");
}

/// Issue #21: a tensor's state keeps its parameter's shape (PyTorch's `state_dict`
/// has `exp_avg` shaped as the parameter), in every state format: per-element entries
/// N-D, 8-bit block scales 1-D; the shapes travel through save, load and restore; a
/// shape whose product is not the tensor's length is refused and changes nothing; a
/// file whose entries of one tensor disagree on the shape is refused.
#[test]
fn n_d_shapes_are_kept_and_checked() {
    use adamax_cuda::{ParamMode, Precision, StateFormat};
    for precision in [
        Precision::default(),
        Precision {
            params: ParamMode::Master,
            state: StateFormat::Blockwise8,
            seed: 3,
            min_8bit_len: 0,
        },
    ] {
        let config = AdamaxConfig {
            precision,
            ..AdamaxConfig::default()
        };
        let mut p = vec![vec![0.5f32; 24], vec![1.0f32; 300], vec![2.0f32; 1]];
        let refs: Vec<&[f32]> = p.iter().map(|x| x.as_slice()).collect();
        let mut opt = CpuAdamax::new(config, &refs).unwrap();
        assert_eq!(opt.tensor_shapes(), [vec![24], vec![300], vec![1]]);
        let shapes = [vec![2, 3, 4], vec![3, 10, 10], vec![]];
        for (i, s) in shapes.iter().enumerate() {
            opt.set_tensor_shape(i, s).unwrap();
        }
        // Refused, and nothing changed: a wrong product, an overflowing one, no tensor.
        for (i, s) in [(0, vec![5, 5]), (1, vec![usize::MAX, 2]), (2, vec![0])] {
            match opt.set_tensor_shape(i, &s) {
                Err(e @ Error::ShapeMismatch { .. }) => {
                    assert!(e.to_string().contains("param.shape"), "{e}")
                }
                other => panic!("{s:?}: {other:?}"),
            }
        }
        assert!(matches!(
            opt.set_tensor_shape(3, &[1]),
            Err(Error::TensorIndexOutOfRange { index: 3, count: 3 })
        ));
        assert_eq!(opt.tensor_shapes(), shapes);
        step_all(
            &mut opt,
            &mut p,
            &[vec![0.1; 24], vec![-0.2; 300], vec![0.3; 1]],
        );
        let bytes = opt.checkpoint().unwrap().to_bytes().unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let per_element = if precision.state == StateFormat::F32 {
            "exp_avg"
        } else {
            "exp_avg_q8"
        };
        for (i, s) in shapes.iter().enumerate() {
            assert_eq!(
                st.tensor(&format!("state.{i}.{per_element}"))
                    .unwrap()
                    .shape(),
                s
            );
        }
        if precision.state == StateFormat::Blockwise8 {
            assert_eq!(st.tensor("state.1.exp_avg_q8_scale").unwrap().shape(), [2]);
        }
        let back = Checkpoint::from_bytes(&bytes).unwrap();
        assert_eq!(back.shapes, shapes);
        let refs: Vec<&[f32]> = p.iter().map(|x| x.as_slice()).collect();
        let mut fresh = CpuAdamax::new(config, &refs).unwrap();
        fresh.restore(&back).unwrap();
        assert_eq!(fresh.tensor_shapes(), shapes);
        assert_eq!(fresh.checkpoint().unwrap().to_bytes().unwrap(), bytes);
        // A checkpoint whose shape does not fit its tensor is refused by save and
        // restore.
        let mut bad = back.clone();
        bad.shapes[0] = vec![5, 5];
        assert!(matches!(bad.to_bytes(), Err(Error::Checkpoint { .. })));
        assert!(fresh.restore(&bad).is_err());
        assert_eq!(fresh.tensor_shapes(), shapes);
        // Entries of one tensor that disagree on the shape (checksum recomputed).
        let other = if precision.state == StateFormat::F32 {
            "state.0.exp_inf"
        } else {
            "state.0.exp_inf_q8"
        };
        let text = |s: &[usize]| format!("{s:?}").replace(' ', "");
        let edited = edited_header(&bytes, |h| {
            let at = h.find(&format!("\"{other}\"")).unwrap();
            let (head, tail) = h.split_at(at);
            format!("{head}{}", tail.replacen(&text(&shapes[0]), "[4,3,2]", 1))
        });
        assert_ne!(edited, bytes);
        refused_load(&edited, "expected [2, 3, 4]");
    }
    // A 1-D file (PyTorch's, written before shapes) reads as 1-D shapes.
    let torch = Checkpoint::from_bytes(TORCH_FILE).unwrap();
    assert_eq!(torch.shapes, [vec![5], vec![33], vec![0]]);
    // A tensor of no elements: any shape with a 0 whose running product does not
    // overflow, by the same rule as the files (found by a hostile review: a shape
    // accepted here that no save accepted, and a panic on the next call).
    let (empty, w) = (Vec::<f32>::new(), vec![0.5f32; 4]);
    let mut opt = CpuAdamax::new(AdamaxConfig::default(), &[&empty, &w]).unwrap();
    match opt.set_tensor_shape(0, &[1 << 40, 1 << 40, 0]) {
        Err(e @ Error::ShapeMismatch { found: None, .. }) => {
            assert!(e.to_string().contains("more than usize::MAX"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    for shape in [vec![0], vec![3, 0, 5], vec![0, usize::MAX]] {
        opt.set_tensor_shape(0, &shape).unwrap();
        let back = Checkpoint::from_bytes(&opt.checkpoint().unwrap().to_bytes().unwrap()).unwrap();
        assert_eq!(back.shapes[0], shape);
    }
}

/// What scripts/torch_model.py generate wrote: a CNN with a transformer encoder
/// trained 5 steps by torch.optim.Adamax (f32), its state converted with the script's
/// `to-crate` (N-D, in its parameters' shapes), and PyTorch's next 3 steps.
const TORCH_MODEL_FILE: &[u8] =
    include_bytes!("data/checkpoint/torch_model_adamax_step5.safetensors");
const TORCH_MODEL_RESUME: &str = include_str!("data/checkpoint/torch_model_resume.json");
/// The same model in bf16 after 3 steps: PyTorch's bf16 moments widened, its
/// parameters as the masters.
const TORCH_MODEL_BF16_FILE: &[u8] =
    include_bytes!("data/checkpoint/torch_model_bf16_step3.safetensors");

#[derive(Deserialize)]
struct ModelResume {
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    params_at_step5: Vec<Vec<f32>>,
    grads_steps_6_to_8: Vec<Vec<Vec<f32>>>,
    params_after_steps_6_to_8: Vec<Vec<Vec<f32>>>,
}

/// Issue #21: a real model's PyTorch optimizer state (4-D convolution weights, 2-D
/// attention and feed-forward projections, 1-D biases and norms) resumes here and
/// continues PyTorch's trajectory, keeps its shapes, and is written back with
/// PyTorch's names, types, shapes and values (what the script's `to-torch` reads).
#[test]
fn a_real_models_pytorch_state_resumes_and_round_trips() {
    let ck = Checkpoint::from_bytes(TORCH_MODEL_FILE).unwrap();
    let r: ModelResume = serde_json::from_str(TORCH_MODEL_RESUME).unwrap();
    assert_eq!(ck.step, 5);
    assert_eq!(ck.shapes, r.shapes);
    assert!(ck.shapes.iter().any(|s| s.len() == 4) && ck.shapes.iter().any(|s| s.len() == 2));
    // The optimizer was built from `named_parameters()`: PyTorch's `param_names` are
    // the tensors' names, and a model listing its parameters in another order takes
    // the state by them.
    let torch_names: Vec<Option<String>> = r.names.iter().cloned().map(Some).collect();
    assert_eq!(ck.names, torch_names);
    let mut reversed = r.names.clone();
    reversed.reverse();
    let moved = ck.reordered(&reversed).unwrap();
    assert_eq!(moved.tensors[0], ck.tensors[r.names.len() - 1]);
    let mut params = r.params_at_step5.clone();
    let refs: Vec<&[f32]> = params.iter().map(|p| p.as_slice()).collect();
    let mut opt = CpuAdamax::new(AdamaxConfig::default(), &refs).unwrap();
    opt.restore(&ck).unwrap();
    assert_eq!(opt.tensor_shapes(), r.shapes);
    // Written back before any step: the file PyTorch's state made, tensor for tensor.
    let ours = opt.checkpoint().unwrap().to_bytes().unwrap();
    let (a, b) = (
        SafeTensors::deserialize(&ours).unwrap(),
        SafeTensors::deserialize(TORCH_MODEL_FILE).unwrap(),
    );
    let mut names = b.names();
    names.sort();
    let mut ours_names = a.names();
    ours_names.sort();
    assert_eq!(ours_names, names);
    for name in names {
        let (x, y) = (a.tensor(name).unwrap(), b.tensor(name).unwrap());
        assert_eq!(
            (x.dtype(), x.shape(), x.data()),
            (y.dtype(), y.shape(), y.data()),
            "{name}"
        );
    }
    for (t, grads) in r.grads_steps_6_to_8.iter().enumerate() {
        step_all(&mut opt, &mut params, grads);
        follows_pytorch(&params, &r.params_after_steps_6_to_8[t], t + 6, |i| {
            format!("{i} ({})", r.names[i])
        });
    }
    assert_eq!(opt.step_count().unwrap(), 8);
    // PyTorch's bf16 state: widened moments within AdaMax's bound, the parameters as
    // masters; it restores into a bf16 optimizer from the parameters it gives.
    let ck = Checkpoint::from_bytes(TORCH_MODEL_BF16_FILE).unwrap();
    assert_eq!((ck.storage, ck.step), (StorageType::Bf16, 3));
    assert!(ck.names.iter().all(Option::is_none)); // built from `parameters()`
    assert_eq!(ck.shapes, r.shapes);
    let params: Vec<Vec<bf16>> = ck.params::<bf16>().unwrap();
    let refs: Vec<&[bf16]> = params.iter().map(|p| p.as_slice()).collect();
    let mut opt = CpuAdamax::new(AdamaxConfig::default(), &refs).unwrap();
    opt.restore(&ck).unwrap();
    assert_eq!(opt.tensor_shapes(), r.shapes);
}

/// Three named f32 tensors, one step taken, and the file of its checkpoint.
fn named() -> (CpuAdamax<f32>, Vec<u8>) {
    let mut p = vec![vec![0.5f32; 6], vec![0.0f32; 2], vec![1.0f32; 3]];
    let refs: Vec<&[f32]> = p.iter().map(|x| x.as_slice()).collect();
    let mut opt = CpuAdamax::new(AdamaxConfig::default(), &refs).unwrap();
    for (i, name) in ["fc.weight", "fc.bias", "norm.gain"]
        .into_iter()
        .enumerate()
    {
        opt.set_tensor_name(i, Some(name)).unwrap();
    }
    step_all(
        &mut opt,
        &mut p,
        &[vec![0.1; 6], vec![-0.2; 2], vec![0.3; 3]],
    );
    let bytes = opt.checkpoint().unwrap().to_bytes().unwrap();
    (opt, bytes)
}

/// Issue #21 (state by `VarMap` names): tensor names travel through save, load and
/// restore as `tensor.{i}.name`; a file without names (every earlier file, PyTorch's)
/// still loads; a name that cannot be is refused by `set_tensor_name` and changes
/// nothing.
#[test]
fn tensor_names_are_kept_and_checked() {
    let (mut opt, bytes) = named();
    let names = ["fc.weight", "fc.bias", "norm.gain"].map(|n| Some(n.to_owned()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["tensor.1.name"], "fc.bias");
    assert_eq!(st.names().len(), 9);
    let back = Checkpoint::from_bytes(&bytes).unwrap();
    assert_eq!(back.names, names);
    let zeros: [&[f32]; 3] = [&[0.0; 6], &[0.0; 2], &[0.0; 3]];
    let mut fresh = CpuAdamax::new(AdamaxConfig::default(), &zeros).unwrap();
    fresh.restore(&back).unwrap();
    assert_eq!(fresh.tensor_names(), names);
    assert_eq!(fresh.checkpoint().unwrap().to_bytes().unwrap(), bytes);
    assert_eq!(
        Checkpoint::from_bytes(TORCH_FILE).unwrap().names,
        [None, None, None]
    );

    let long = "x".repeat(1025);
    for (i, name, says) in [
        (0, "", "is empty"),
        (0, "fc.bias", "tensor 1's already"),
        (2, "a\nb", "control character"),
        (1, long.as_str(), "1025 bytes"),
    ] {
        match opt.set_tensor_name(i, Some(name)) {
            Err(e @ Error::TensorName { .. }) => assert!(e.to_string().contains(says), "{e}"),
            other => panic!("{name:?}: {other:?}"),
        }
    }
    assert!(matches!(
        opt.set_tensor_name(3, Some("x")),
        Err(Error::TensorIndexOutOfRange { index: 3, count: 3 })
    ));
    assert_eq!(opt.tensor_names(), names);
    // Taking a name away, and giving it to another tensor.
    opt.set_tensor_name(1, None).unwrap();
    opt.set_tensor_name(2, Some("fc.bias")).unwrap();
    assert_eq!(opt.tensor_names()[1..], [None, Some("fc.bias".to_owned())]);
    // A tensor keeps its own name; a renamed tensor's old name is free again, its new
    // one taken (the optimizer indexes names; the index follows every change).
    opt.set_tensor_name(2, Some("fc.bias")).unwrap();
    opt.set_tensor_name(2, Some("head.bias")).unwrap();
    opt.set_tensor_name(1, Some("fc.bias")).unwrap();
    assert!(opt.set_tensor_name(0, Some("head.bias")).is_err());
    // A restore's names are taken too.
    assert!(fresh.set_tensor_name(0, Some("norm.gain")).is_err());
    fresh.set_tensor_name(2, None).unwrap();
    fresh.set_tensor_name(0, Some("norm.gain")).unwrap();
}

/// Issue #21: a checkpoint follows a model whose parameters come in another order by
/// name (`Checkpoint::reordered`), and `restore` refuses one whose names disagree with
/// the optimizer's at some index, changing nothing; names it lacks are filled from the
/// other side.
#[test]
fn checkpoints_are_reordered_by_name_and_restores_check_names() {
    let (opt, bytes) = named();
    let ck = Checkpoint::from_bytes(&bytes).unwrap();
    let order = ["norm.gain", "fc.weight", "fc.bias"];
    let moved = ck.reordered(&order).unwrap();
    for (i, j) in [(0, 2), (1, 0), (2, 1)] {
        assert_eq!(moved.tensors[i], ck.tensors[j]);
        assert_eq!(moved.shapes[i], ck.shapes[j]);
        assert_eq!(moved.names[i], ck.names[j]);
        assert_eq!(moved.hypers[i], ck.hypers[j]);
    }
    let lens =
        |ck: &Checkpoint| -> Vec<Vec<f32>> { ck.shapes.iter().map(|s| vec![0.0; s[0]]).collect() };
    let params = lens(&moved);
    let refs: Vec<&[f32]> = params.iter().map(|x| x.as_slice()).collect();
    let mut other = CpuAdamax::new(AdamaxConfig::default(), &refs).unwrap();
    for (i, n) in order.iter().enumerate() {
        other.set_tensor_name(i, Some(n)).unwrap();
    }
    // The file's order into this optimizer: the lengths differ first; with equal
    // lengths (below) the names are what catch it.
    assert!(other.restore(&ck).is_err());
    other.restore(&moved).unwrap();
    assert_eq!(other.state().unwrap()[1], opt.state().unwrap()[0]);
    // Two tensors of one length swapped: only the names tell.
    let (mut same, _) = named();
    same.set_tensor_name(0, Some("w")).unwrap();
    match same.restore(&ck) {
        Err(e @ Error::NameMismatch { tensor: 0, .. }) => {
            assert!(e.to_string().contains("Checkpoint::reordered"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(same.tensor_names()[0].as_deref(), Some("w"));
    // An unnamed optimizer takes the checkpoint's names; an unnamed checkpoint leaves
    // the optimizer's.
    let mut unnamed = CpuAdamax::new(AdamaxConfig::default(), &refs).unwrap();
    assert_eq!(unnamed.tensor_names(), [None, None, None]);
    unnamed.restore(&moved).unwrap();
    assert_eq!(unnamed.tensor_names(), moved.names);
    let mut anonymous = moved.clone();
    anonymous.names = vec![None; 3];
    other.restore(&anonymous).unwrap();
    assert_eq!(other.tensor_names(), moved.names);

    // Refusals of `reordered`, each naming what is wrong.
    for (names, says) in [
        (vec!["fc.weight", "fc.bias"], "3 tensors but 2 names"),
        (vec!["fc.weight", "fc.bias", "fc.bias"], "given twice"),
        (
            vec!["fc.weight", "fc.bias", "head"],
            "no tensor named \"head\"",
        ),
    ] {
        match ck.reordered(&names) {
            Err(Error::Checkpoint { reason }) => assert!(reason.contains(says), "{reason}"),
            other => panic!("{names:?}: {other:?}"),
        }
    }
    match anonymous.reordered(&order) {
        Err(Error::Checkpoint { reason }) => assert!(reason.contains("has no name"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

/// Issue #21: files whose names no writer writes are refused, with the checksum
/// recomputed (so validation, not integrity, catches them): two tensors of one name,
/// an empty name, a name for a tensor the file does not hold; and a checkpoint built
/// through its public fields with a duplicate is refused by save.
#[test]
fn impossible_names_in_files_are_refused() {
    let (_, bytes) = named();
    for (edit, says) in [
        (("\"fc.bias\"", "\"fc.weight\""), "tensor 0's already"),
        (("\"fc.bias\"", "\"\""), "is empty"),
        (("\"tensor.1.name\"", "\"tensor.7.name\""), "tensor.7.name"),
    ] {
        let edited = edited_header(&bytes, |h| h.replacen(edit.0, edit.1, 1));
        assert_ne!(edited, bytes);
        refused_load(&edited, says);
    }
    let mut ck = Checkpoint::from_bytes(&bytes).unwrap();
    ck.names[2] = Some("fc.weight".into());
    assert!(matches!(ck.to_bytes(), Err(Error::Checkpoint { .. })));
    ck.names.pop();
    assert!(matches!(ck.to_bytes(), Err(Error::Checkpoint { .. })));
}

/// PyTorch's files carry no checksum: a name key is taken only in the form the
/// converter writes it, for a tensor the file holds, and as a valid name.
#[test]
fn names_in_pytorchs_files_are_checked() {
    for (edit, says) in [
        (
            ("\"tensor.4.name\"", "\"tensor.04.name\""),
            "not one PyTorch writes",
        ),
        (
            ("\"tensor.4.name\"", "\"tensor.40.name\""),
            "names a tensor the file does not hold",
        ),
        (
            ("\"proj.weight\"", "\"conv1.weight\""),
            "tensor 0's already",
        ),
    ] {
        let edited = with_header(TORCH_MODEL_FILE, |h| h.replacen(edit.0, edit.1, 1));
        assert_ne!(edited, TORCH_MODEL_FILE);
        refused_load(&edited, says);
    }
}

/// An optimizer with 8-bit state and the default threshold over a tensor of 5,000
/// elements (8-bit) and one of 300 (f32), after one step, with its config and
/// parameters.
fn stepped_8bit(seed: u64) -> (AdamaxConfig, Vec<f32>, Vec<f32>, CpuAdamax<f32>) {
    let config = AdamaxConfig {
        precision: Precision {
            state: StateFormat::Blockwise8,
            seed,
            ..Precision::default()
        },
        ..AdamaxConfig::default()
    };
    let (mut a, mut b) = (vec![0.5f32; 5000], vec![0.5f32; 300]);
    let mut opt = CpuAdamax::new(config, &[&a, &b]).unwrap();
    opt.step(&mut [&mut a, &mut b], &[&[0.1; 5000], &[-0.2; 300]])
        .unwrap();
    (config, a, b, opt)
}

/// Issue #19, part 4: per-tensor state formats in the file. Edits that a hostile writer
/// reseals (a format key removed, added, or rewritten, a threshold not as written) are
/// refused, each saying what is wrong; an 8-bit file from before the threshold (no
/// `min_8bit_len`) reads with every tensor in 8 bits.
#[test]
fn edited_state_formats_are_refused() {
    let (config, mut a, mut b, opt) = stepped_8bit(5);
    let ck = opt.checkpoint().unwrap();
    assert_eq!(
        ck.state_formats,
        [StateFormat::Blockwise8, StateFormat::F32]
    );
    let bytes = ck.to_bytes().unwrap();
    let key = "\"tensor.1.state_format\":\"f32\",";
    assert!(String::from_utf8_lossy(&bytes).contains(key));
    // Without the key tensor 1 would be 8-bit, and its codes are not in the file.
    refused_load(
        &edited_header(&bytes, |h| h.replace(key, "")),
        "tensor 1 is labelled blockwise8 state (its `tensor.1.state_format`, or the file's `state_format` without one) but the file holds its `state.1.exp_avg`",
    );
    // The key with the config's own format, which the writer leaves out.
    refused_load(
        &edited_header(&bytes, |h| {
            h.replace(key, "\"tensor.1.state_format\":\"blockwise8\",")
        }),
        "tensor 1 is labelled blockwise8 state",
    );
    refused_load(
        &edited_header(&bytes, |h| {
            h.replace(key, "\"tensor.1.state_format\":\"f16\",")
        }),
        "unknown state_format `f16`",
    );
    // Tensor 0 said to be f32: its f32 moments are not in the file.
    refused_load(
        &edited_header(&bytes, |h| {
            h.replace(key, &format!("{key}\"tensor.0.state_format\":\"f32\","))
        }),
        "tensor 0 is labelled f32 state",
    );
    for (from, to, says) in [
        (
            "\"min_8bit_len\":\"4096\"",
            "\"min_8bit_len\":\"+4096\"",
            "not as this crate writes",
        ),
        (
            "\"min_8bit_len\":\"4096\"",
            "\"min_8bit_len\":\"lots\"",
            "not a count",
        ),
    ] {
        refused_load(&edited_header(&bytes, |h| h.replace(from, to)), says);
    }
    // A file from before the threshold: every tensor in 8 bits, min_8bit_len 0.
    let mut all = CpuAdamax::new(
        AdamaxConfig {
            precision: Precision {
                min_8bit_len: 0,
                ..config.precision
            },
            ..config
        },
        &[&a, &b],
    )
    .unwrap();
    all.step(&mut [&mut a, &mut b], &[&[0.1; 5000], &[-0.2; 300]])
        .unwrap();
    let old = edited_header(&all.checkpoint().unwrap().to_bytes().unwrap(), |h| {
        h.replace("\"min_8bit_len\":\"0\",", "")
    });
    let read = Checkpoint::from_bytes(&old).unwrap();
    assert_eq!(read, all.checkpoint().unwrap());
    // An f32-state file may not hold 8-bit tensors, however its entries are made.
    let mut f32_ck = CpuAdamax::new(AdamaxConfig::default(), &[&a, &b])
        .unwrap()
        .checkpoint()
        .unwrap();
    f32_ck.state_formats[1] = StateFormat::Blockwise8;
    match f32_ck.validate() {
        Err(Error::Checkpoint { reason }) => {
            assert!(
                reason.contains("tensor 1 keeps 8-bit state in a checkpoint of f32 state"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    // One format per tensor.
    let mut short = ck.clone();
    short.state_formats.pop();
    assert!(matches!(short.to_bytes(), Err(Error::Checkpoint { .. })));
}

/// A file of a mode that rounds stochastically always carries its seed: one without it
/// is refused, as a missing `state_block` is (it used to read as seed 0).
#[test]
fn a_stochastic_mode_without_its_seed_is_refused() {
    let (_, _, _, opt) = stepped_8bit(77);
    let bytes = opt.checkpoint().unwrap().to_bytes().unwrap();
    assert!(String::from_utf8_lossy(&bytes).contains("\"seed\":\"77\","));
    refused_load(
        &edited_header(&bytes, |h| h.replace("\"seed\":\"77\",", "")),
        "it has no `seed`",
    );
}

/// A bf16 run with masters and 8-bit state (two tensors kept in f32 by the threshold),
/// named tensors of n-d shapes, a parameter group, a loss scaler, clipping and a tensor
/// skipped in one step (its own step count): the whole checkpoint sharded checkpoints
/// are made of.
fn sharded_source() -> Checkpoint {
    use adamax_cuda::{LossScaler, StepOptions};
    let lens = [3 * 8192 + 5, 700, 0, 5, 96 * 200, 9000];
    let shapes: [&[usize]; 6] = [&[24581], &[7, 100], &[0, 3], &[5], &[96, 200], &[9000]];
    let config = AdamaxConfig {
        precision: Precision {
            state: StateFormat::Blockwise8,
            ..Precision::default()
        },
        ..AdamaxConfig::default()
    };
    let mut rng = StdRng::seed_from_u64(20);
    let mut p: Vec<Vec<bf16>> = lens
        .iter()
        .map(|&n| {
            (0..n)
                .map(|_| bf16::from_f32(rng.random_range(-1.0..1.0)))
                .collect()
        })
        .collect();
    let refs: Vec<&[bf16]> = p.iter().map(Vec::as_slice).collect();
    let mut opt = CpuAdamax::new(config, &refs).unwrap();
    for (i, shape) in shapes.iter().enumerate() {
        opt.set_tensor_shape(i, shape).unwrap();
        opt.set_tensor_name(i, Some(&format!("layer.{i}"))).unwrap();
    }
    opt.set_tensor_hyper(
        4,
        TensorHyper {
            lr_scale: 0.5,
            weight_decay: 0.0,
        },
    )
    .unwrap();
    opt.set_options(StepOptions {
        max_norm: Some(1.0),
        ..Default::default()
    })
    .unwrap();
    opt.set_loss_scaler(Some(LossScaler::default())).unwrap();
    for step in 0..3 {
        let g: Vec<Vec<bf16>> = lens
            .iter()
            .map(|&n| {
                (0..n)
                    .map(|_| bf16::from_f32(rng.random_range(-1.0..1.0) * 100.0))
                    .collect()
            })
            .collect();
        let grads: Vec<Option<&[bf16]>> = g
            .iter()
            .enumerate()
            .map(|(i, g)| (i != 5 || step != 1).then_some(g.as_slice()))
            .collect();
        let mut params: Vec<&mut [bf16]> = p.iter_mut().map(Vec::as_mut_slice).collect();
        opt.step_some(&mut params, &grads).unwrap();
    }
    let ck = opt.checkpoint().unwrap();
    assert_ne!(ck.tensors[5].step, ck.step, "a tensor took fewer steps");
    ck
}

/// Issue #20: a checkpoint split over any world size and gathered again is the same
/// checkpoint and the same file; shards round-trip through their files; resharding 4
/// ranks to 3, to 1 and back to 4 gives the first 4 files' bytes.
#[test]
fn sharded_checkpoints_gather_and_reshard_to_the_same_bytes() {
    use adamax_cuda::ShardCheckpoint;
    let ck = sharded_source();
    let bytes = ck.to_bytes().unwrap();
    for world in 1..=8 {
        let shards = ck.shard(world).unwrap();
        assert_eq!(shards.len(), world);
        for (rank, s) in shards.iter().enumerate() {
            assert_eq!((s.rank(), s.world_size()), (rank, world));
            let file = s.to_bytes().unwrap();
            assert_eq!(
                &ShardCheckpoint::from_bytes(&file).unwrap(),
                s,
                "world {world} rank {rank}"
            );
        }
        let mut reversed = shards.clone();
        reversed.reverse();
        let gathered = ShardCheckpoint::gather(&reversed).unwrap();
        assert_eq!(gathered.to_bytes().unwrap(), bytes, "world {world}");
    }
    let files = |shards: &[ShardCheckpoint]| -> Vec<Vec<u8>> {
        shards.iter().map(|s| s.to_bytes().unwrap()).collect()
    };
    let four = ck.shard(4).unwrap();
    for (rank, s) in four.iter().enumerate() {
        assert_eq!(&ck.shard_of(4, rank).unwrap(), s, "one rank's shard alone");
    }
    assert!(matches!(
        ck.shard_of(4, 4),
        Err(Error::InvalidLayout { .. })
    ));
    let three = ShardCheckpoint::reshard(&four, 3).unwrap();
    let one = ShardCheckpoint::reshard(&three, 1).unwrap();
    let back = ShardCheckpoint::reshard(&one, 4).unwrap();
    assert_eq!(files(&back), files(&four));
    // The whole tensors' shapes and names travel with every shard.
    assert_eq!(three[2].shapes(), &ck.shapes[..]);
    assert_eq!(three[2].names(), &ck.names[..]);
}

/// Shard files edited and resealed (a consistent checksum), mixed up, or given to the
/// wrong loader are refused, each saying what is wrong.
#[test]
fn shard_files_that_do_not_fit_are_refused() {
    use adamax_cuda::ShardCheckpoint;
    let ck = sharded_source();
    let shards = ck.shard(3).unwrap();
    let file = shards[1].to_bytes().unwrap();
    let refused = |r: Result<ShardCheckpoint, Error>, says: &str| match r {
        Err(Error::Checkpoint { reason }) => assert!(reason.contains(says), "{says}: {reason}"),
        Err(e) => panic!("{says}: {e}"),
        Ok(_) => panic!("{says}: accepted"),
    };
    // The loaders keep to their formats.
    match Checkpoint::from_bytes(&file) {
        Err(Error::Checkpoint { reason }) => {
            assert!(reason.contains("ShardCheckpoint::load"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    refused(
        ShardCheckpoint::from_bytes(&ck.to_bytes().unwrap()),
        "Checkpoint::load",
    );
    // Edits that keep the file self-consistent.
    for (from, to, says) in [
        ("\"shard.rank\":\"1\"", "\"shard.rank\":\"2\"", "piece"),
        ("\"shard.rank\":\"1\"", "\"shard.rank\":\"+1\"", "should be"),
        (
            "\"shard.rank\":\"1\"",
            "\"shard.rank\":\"one\"",
            "not a count",
        ),
        (
            "\"shard.world_size\":\"3\"",
            "\"shard.world_size\":\"4\"",
            "pieces",
        ),
        (
            "\"shard.tensor.1.shape\":\"7,100\"",
            "\"shard.tensor.1.shape\":\"7,101\"",
            "",
        ),
        (
            "\"shard.tensor.4.lr_scale\":\"0.5\"",
            "\"shard.tensor.4.lr_scale\":\"0.25\"",
            "settings",
        ),
        (
            "\"shard.tensors\":\"6\"",
            "\"shard.tensors\":\"6000\"",
            "more than the file",
        ),
        (
            "\"shard.tensor.2.name\":\"layer.2\"",
            "\"shard.tensor.2.nick\":\"layer.2\"",
            "not a key",
        ),
        // A world that no layout has (it would make a gather allocate a slot per rank).
        (
            "\"shard.world_size\":\"3\"",
            "\"shard.world_size\":\"1099511627776\"",
            "world size",
        ),
        // Whole-tensor names are checked as a one-GPU file's are.
        (
            "\"shard.tensor.1.name\":\"layer.1\"",
            "\"shard.tensor.1.name\":\"layer.0\"",
            "layer.0",
        ),
        (
            "\"format\":\"adamax-cuda-shard/2\"",
            "\"format\":\"adamax-cuda/3\"",
            "shard",
        ),
    ] {
        let edited = edited_header(&file, |h| {
            assert!(h.contains(from), "{from}");
            h.replace(from, to)
        });
        match ShardCheckpoint::from_bytes(&edited) {
            Err(Error::Checkpoint { reason }) => assert!(reason.contains(says), "{to}: {reason}"),
            Err(e) => panic!("{to}: {e}"),
            Ok(_) => panic!("{to}: accepted"),
        }
    }
    // Unsealed edits fail the checksum.
    let unsealed = with_header(&file, |h| {
        h.replace("\"shard.rank\":\"1\"", "\"shard.rank\":\"2\"")
    });
    refused(ShardCheckpoint::from_bytes(&unsealed), "integrity");
    // Gathering needs every rank of one run once.
    let gather = |s: &[ShardCheckpoint], says: &str| match ShardCheckpoint::gather(s) {
        Err(Error::Checkpoint { reason }) => assert!(reason.contains(says), "{says}: {reason}"),
        other => panic!("{says}: {other:?}"),
    };
    gather(&[], "no shards");
    gather(&shards[..2], "rank 2's shard is missing");
    gather(
        &[shards[0].clone(), shards[1].clone(), shards[1].clone()],
        "twice",
    );
    let other_world = ck.shard(2).unwrap();
    gather(
        &[shards[0].clone(), other_world[1].clone(), shards[2].clone()],
        "layouts differ (worlds of 3 and 2 ranks",
    );
    let mut later = ck.clone();
    later.step += 1;
    for t in &mut later.tensors {
        t.step += 1;
    }
    let later = later.shard(3).unwrap();
    gather(
        &[shards[0].clone(), later[1].clone(), shards[2].clone()],
        "steps 3 and 4",
    );
}

/// Files of format `adamax-cuda/2`, written before 8-bit state stored `m` as its ratio to
/// the step's denominator: each pair was written by commit 6b96f15 (the last of that
/// format) with the program `tests/data/checkpoint/format2_fixture.rs` (a bf16 run with
/// stochastic rounding and 8-bit state, 5 steps over two tensors whose gradients span 9
/// orders of magnitude within a block, each eps convention), the 8-bit checkpoint and the
/// same checkpoint decoded to f32 by that version. The 8-bit file loads as the state it
/// stands for: its moments within one 8-bit rounding of the old version's decoding (`u`
/// rounded up, by less than a code step; `m` to nearest of its ratio), and resaved in
/// today's format, it loads to the same checkpoint.
#[test]
fn files_of_the_format_before_the_ratio_load_as_the_state_they_stand_for() {
    use adamax_cuda::StateFormat;
    let files: [(&[u8], &[u8]); 2] = [
        (
            include_bytes!("data/checkpoint/format2_q8_inside.safetensors"),
            include_bytes!("data/checkpoint/format2_q8_inside_as_f32.safetensors"),
        ),
        (
            include_bytes!("data/checkpoint/format2_q8_denominator.safetensors"),
            include_bytes!("data/checkpoint/format2_q8_denominator_as_f32.safetensors"),
        ),
    ];
    for (q8, as_f32) in files {
        assert!(String::from_utf8_lossy(&q8[..400]).contains("adamax-cuda/2"));
        let old = Checkpoint::from_bytes(q8).unwrap();
        let decoded_then = Checkpoint::from_bytes(as_f32).unwrap();
        let decoded_now = old.convert_state(StateFormat::F32).unwrap();
        assert_eq!(decoded_now.config, decoded_then.config);
        assert_eq!(decoded_now.step, decoded_then.step);
        let mut compared = 0;
        for (now, then) in decoded_now.tensors.iter().zip(&decoded_then.tensors) {
            assert_eq!(now.step, then.step);
            assert_eq!(now.master, then.master);
            let (scale_u, scale_m) = then
                .exp_inf
                .iter()
                .zip(&then.exp_avg)
                .fold((0f32, 0f32), |(a, b), (u, m)| (a.max(*u), b.max(m.abs())));
            let pairs = now.exp_inf.iter().zip(&then.exp_inf);
            for (j, ((u1, u0), (m1, m0))) in
                pairs.zip(now.exp_avg.iter().zip(&then.exp_avg)).enumerate()
            {
                // u rounded up by less than a code step (1/16 of u, or 2^-19 of the
                // block's largest near 0), not down by more than 2^-16 of one.
                assert!(
                    *u1 >= u0 * (1.0 - 1e-5)
                        && *u1 <= u0 * (1.0 + 1.0 / 16.0) + scale_u * 2f32.powi(-18),
                    "{j}: u {u0} became {u1}"
                );
                // m: its ratio to nearest (half a code step, 1/32), and u's rounding.
                assert!(
                    (m1 - m0).abs() <= m0.abs() / 10.0 + scale_m * 2f32.powi(-16),
                    "{j}: m {m0} became {m1}"
                );
                compared += 1;
            }
        }
        assert!(compared > 300, "{compared}");
        let bytes = old.to_bytes().unwrap();
        assert!(String::from_utf8_lossy(&bytes[..400]).contains("adamax-cuda/3"));
        assert_eq!(Checkpoint::from_bytes(&bytes).unwrap(), old);
    }
    // The old format with its 8-bit state edited beyond that format's bound (a block's
    // u scale lowered, its m kept; resealed) is refused, as the old loader refused it,
    // and so are codes above 1.0.
    let lowered = edited_f32(files[0].0, "state.0.exp_inf_q8_scale", 0, 1e-30);
    refused_load(&lowered, "is beyond");
    let st = SafeTensors::deserialize(files[0].0).unwrap();
    let view = st.tensor("state.0.exp_inf_q8").unwrap();
    let at = view.data().as_ptr() as usize - files[0].0.as_ptr() as usize;
    let mut above = files[0].0.to_vec();
    above[at] = 250;
    refused_load(&reseal(&above), "above the magnitude 1.0");
}

/// A hostile review of 8-bit state v2: a file whose ratio scale is within AdaMax's bound
/// but whose `u` scale is f32's largest value stood for an `m` beyond f32's range (one
/// zero-gradient step then sent the weight to infinity); it is refused, saying where.
/// f32 state at the bound in both eps conventions converts to 8 bits and back, both
/// validating (the conversion left no room for the roundings of decoding).
#[test]
fn eight_bit_state_that_decodes_beyond_f32_is_refused_and_conversions_round_trip() {
    use adamax_cuda::{EpsilonMode, ParamMode, Precision, StateFormat};
    let q8 = Precision {
        params: ParamMode::Master,
        state: StateFormat::Blockwise8,
        seed: 3,
        min_8bit_len: 0,
    };
    for eps_mode in [EpsilonMode::InsideMax, EpsilonMode::Denominator] {
        let config = AdamaxConfig {
            eps_mode,
            precision: q8,
            ..AdamaxConfig::default()
        };
        let mut w = vec![0.5f32; 4];
        let mut opt = CpuAdamax::new(config, &[&w]).unwrap();
        opt.step(&mut [&mut w], &[&[0.1, -0.2, 0.3, 0.4]]).unwrap();
        let mut bad = opt.checkpoint().unwrap();
        let t = &mut bad.tensors[0];
        t.exp_avg_q8.scales[0] = 1.009;
        t.exp_avg_q8.codes[0] = 120;
        t.exp_inf_q8.scales[0] = f32::MAX;
        t.exp_inf_q8.codes[0] = 240;
        match bad.validate() {
            Err(Error::Checkpoint { reason }) => {
                assert!(reason.contains("stays finite"), "{reason}")
            }
            other => panic!("{eps_mode:?}: {other:?}"),
        }
        assert!(opt.restore(&bad).is_err());
    }
    // f32 moments at the bound over a block of u from 1e-37 to 1e27, eps 1e-8.
    let c = (1.0 - 0.9) / (1.0 - 0.9 / 0.999f64);
    for eps_mode in [EpsilonMode::InsideMax, EpsilonMode::Denominator] {
        let config = AdamaxConfig {
            eps_mode,
            precision: Precision {
                min_8bit_len: 0,
                ..Precision::default()
            },
            ..AdamaxConfig::default()
        };
        let mut w = vec![0.0f32; 256];
        let mut opt = CpuAdamax::new(config, &[&w]).unwrap();
        opt.step(&mut [&mut w], &[&vec![0.0; 256]]).unwrap();
        let mut ck = opt.checkpoint().unwrap();
        let eps = if eps_mode == EpsilonMode::Denominator {
            1e-8f64
        } else {
            0.0
        };
        let t = &mut ck.tensors[0];
        for j in 0..256 {
            let u = 10f32.powf(-37.0 + j as f32 * 0.25);
            let mut m = (c * (f64::from(u) + eps)) as f32;
            while f64::from(m) > c * (f64::from(u) + eps) {
                m = m.next_down();
            }
            (t.exp_avg[j], t.exp_inf[j]) = (if j % 2 == 0 { m } else { -m }, u);
        }
        ck.validate().unwrap();
        let q = ck.convert_state(StateFormat::Blockwise8).unwrap();
        assert_eq!(q.state_formats, vec![StateFormat::Blockwise8]);
        let back = q
            .convert_state(StateFormat::F32)
            .unwrap_or_else(|e| panic!("{eps_mode:?}: {e}"));
        back.validate().unwrap();
    }
}

/// Files of format `adamax-cuda/2` are held to that format's block checks before they
/// are converted (the hostile review found a zero scale over nonzero codes, and a `u`
/// block without its largest magnitude, loading after conversion).
#[test]
fn files_of_the_format_before_the_ratio_keep_that_formats_block_checks() {
    let file: &[u8] = include_bytes!("data/checkpoint/format2_q8_inside.safetensors");
    let zeroed = edited_f32(file, "state.0.exp_avg_q8_scale", 0, 0.0);
    refused_load(&zeroed, "format adamax-cuda/2");
    let st = SafeTensors::deserialize(file).unwrap();
    let view = st.tensor("state.0.exp_inf_q8").unwrap();
    let at = view.data().as_ptr() as usize - file.as_ptr() as usize;
    let mut lowered = file.to_vec();
    for c in &mut lowered[at..at + 256] {
        *c = (*c).min(239);
    }
    refused_load(&reseal(&lowered), "format adamax-cuda/2");
}
