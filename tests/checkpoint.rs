//! Checkpoints: PyTorch interchange (tests/data/checkpoint/, made by
//! scripts/torch_checkpoint.sh), bit-exact resume, and refusal of bad files with the
//! live state untouched.

use adamax_cuda::{bf16, cpu::CpuAdamax, AdamaxConfig, Checkpoint, Error, Storage};
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
    assert_eq!(opt.step_count(), 10);
}

#[test]
fn files_written_here_have_pytorchs_names_types_and_shapes() {
    let r: Resume = serde_json::from_str(TORCH_RESUME).unwrap();
    let refs: Vec<&[f32]> = r.params_at_step7.iter().map(|p| p.as_slice()).collect();
    let opt = CpuAdamax::new(AdamaxConfig::default(), &refs).unwrap();
    let ours = opt.checkpoint().to_bytes().unwrap();
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
    a.checkpoint().save(&path).unwrap();
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
        a.checkpoint(),
        b.checkpoint(),
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
    let bytes = opt.checkpoint().to_bytes().unwrap();
    (opt, bytes)
}

#[test]
fn truncated_and_corrupt_files_are_refused() {
    let (_, bytes) = trained();
    for cut in [0, 1, 7, 8, 20, bytes.len() / 2, bytes.len() - 1] {
        let err = Checkpoint::from_bytes(&bytes[..cut]).unwrap_err();
        assert!(
            matches!(err, Error::Checkpoint { .. }),
            "cut at {cut}: {err}"
        );
    }
    // Flip bytes inside the JSON header.
    let mut bad = bytes.clone();
    for b in bad[8..40].iter_mut() {
        *b ^= 0x5a;
    }
    let err = Checkpoint::from_bytes(&bad).unwrap_err();
    assert!(matches!(err, Error::Checkpoint { .. }), "{err}");
    assert!(err.to_string().contains("not changed"), "{err}");
}

#[test]
fn mismatched_checkpoints_are_refused_and_leave_the_state_untouched() {
    let (mut opt, bytes) = trained();
    let before = opt.checkpoint();
    let good = Checkpoint::from_bytes(&bytes).unwrap();

    let mut wrong_storage = good.clone();
    wrong_storage.storage = "bf16".into();
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
            opt.checkpoint(),
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
    assert_eq!(opt.checkpoint(), other_step);
}

#[test]
fn a_step_scalar_that_disagrees_with_the_metadata_is_refused() {
    let (opt, _) = trained();
    let ck = opt.checkpoint();
    // Rewrite the file with step 2 in the metadata but 1.0 in state.0.step.
    let text = ck.to_bytes().unwrap();
    let header_len = u64::from_le_bytes(text[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&text[8..8 + header_len]).unwrap();
    let patched = header.replace("\"step\":\"1\"", "\"step\":\"2\"");
    assert_ne!(patched, header, "metadata step found");
    let mut bytes = text[..8].to_vec();
    bytes.extend_from_slice(patched.as_bytes());
    bytes.extend_from_slice(&text[8 + header_len..]);
    let err = Checkpoint::from_bytes(&bytes).unwrap_err();
    assert!(err.to_string().contains("state.0.step"), "{err}");
}
