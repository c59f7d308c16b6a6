//! The CPU reference replays every committed peer trajectory (PyTorch, optax, Keras;
//! made by scripts/peer_trajectories.sh) within a tolerance derived from the peer's own
//! float32-versus-float64 spread.

mod common;

use adamax_cuda::{bf16, cpu::CpuAdamax, f16, Optimizer, Storage};
use common::{trajectories, Trajectory, TRAJECTORIES};

/// What the replay produced: parameters after every step (master for 16-bit), the
/// 16-bit copies, and the final state.
struct Replay {
    params: Vec<Vec<Vec<f32>>>,
    params_16bit: Vec<Vec<Vec<f32>>>,
    exp_avg: Vec<Vec<f32>>,
    exp_inf: Vec<Vec<f32>>,
}

fn replay<T: Storage>(t: &Trajectory) -> Replay {
    let mut params: Vec<Vec<T>> = t
        .tensors
        .iter()
        .map(|x| x.init.iter().map(|&v| T::from_f32(v)).collect())
        .collect();
    for (p, x) in params.iter().zip(&t.tensors) {
        for (a, &b) in p.iter().zip(&x.init) {
            assert_eq!(
                a.to_f32(),
                b,
                "{}: init must be exact in {}",
                t.name,
                T::NAME
            );
        }
    }
    let refs: Vec<&[T]> = params.iter().map(|p| p.as_slice()).collect();
    let mut opt = CpuAdamax::<T>::new(t.config.to_config(), &refs).unwrap();
    let (options, scaler) = t.config.to_fused();
    opt.set_options(options).unwrap();
    opt.set_loss_scaler(scaler).unwrap();
    let mut out = Replay {
        params: vec![Vec::new(); params.len()],
        params_16bit: vec![Vec::new(); params.len()],
        exp_avg: Vec::new(),
        exp_inf: Vec::new(),
    };
    for step in 0..t.steps {
        let mut grads: Vec<Vec<T>> = t
            .tensors
            .iter()
            .map(|x| x.grads[step].iter().map(|&v| T::from_f32(v)).collect())
            .collect();
        for &[s, i, e] in &t.inf_at {
            if s == step {
                grads[i][e] = T::from_f32(f32::INFINITY);
            }
        }
        let grad_refs: Vec<&[T]> = grads.iter().map(|g| g.as_slice()).collect();
        let mut param_refs: Vec<&mut [T]> = params.iter_mut().map(|p| p.as_mut_slice()).collect();
        opt.step(&mut param_refs, &grad_refs).unwrap();
        check_fused_step(t, step, &opt.last_report().unwrap());
        for (i, p) in params.iter().enumerate() {
            let state = &opt.tensor_states()[i];
            let stored: Vec<f32> = p.iter().map(|x| x.to_f32()).collect();
            if T::HAS_MASTER {
                // The 16-bit copy is exactly the round-to-nearest-even of the master.
                for (&s, &m) in stored.iter().zip(&state.master) {
                    assert_eq!(s.to_bits(), T::from_f32(m).to_f32().to_bits(), "{}", t.name);
                }
                out.params[i].push(state.master.clone());
            } else {
                out.params[i].push(stored.clone());
            }
            out.params_16bit[i].push(stored);
        }
    }
    let skipped = t.skipped.iter().filter(|&&s| s).count();
    assert_eq!(opt.step_count().unwrap(), (t.steps - skipped) as u64);
    out.exp_avg = opt
        .tensor_states()
        .iter()
        .map(|s| s.exp_avg.clone())
        .collect();
    out.exp_inf = opt
        .tensor_states()
        .iter()
        .map(|s| s.exp_inf.clone())
        .collect();
    out
}

/// The skip decision and the loss scale match PyTorch exactly (both are decided by the
/// same comparisons and f64-then-f32 products); the global norm to 1e-5 relative (the
/// sums of squares run in different orders: at most ~168 f32 roundings apart). A
/// trajectory recorded with a scaler must carry a skip and a scale for every step, and
/// one recorded with clipping a norm for every step: a file without them fails here
/// instead of skipping the checks.
fn check_fused_step(t: &Trajectory, step: usize, r: &adamax_cuda::StepReport) {
    let (scaler, clipping) = (t.config.scaler.is_some(), t.config.max_norm.is_some());
    if scaler {
        let skipped = *t.skipped.get(step).unwrap_or_else(|| {
            panic!(
                "{}: recorded with a scaler but no skip for step {}",
                t.name,
                step + 1
            )
        });
        assert_eq!(r.skipped, skipped, "{}: step {} skip", t.name, step + 1);
        let scale = t.scales.get(step).copied().flatten().unwrap_or_else(|| {
            panic!(
                "{}: recorded with a scaler but no scale for step {}",
                t.name,
                step + 1
            )
        });
        assert_eq!(
            r.loss_scale,
            Some(scale),
            "{}: step {} loss scale",
            t.name,
            step + 1
        );
    } else {
        assert!(
            t.skipped.iter().all(|s| !s) && t.scales.iter().all(Option::is_none),
            "{}: skips or scales recorded without a scaler in the config",
            t.name
        );
        assert!(
            !r.skipped,
            "{}: step {} skipped without a scaler",
            t.name,
            step + 1
        );
    }
    if clipping && !r.skipped {
        let norm = t
            .total_norms
            .get(step)
            .copied()
            .flatten()
            .unwrap_or_else(|| {
                panic!(
                    "{}: recorded with clipping but no norm for step {}",
                    t.name,
                    step + 1
                )
            });
        let ours = f64::from(r.total_norm.expect("clipping computes the norm"));
        assert!(
            ((ours - norm) / norm).abs() < 1e-5,
            "{}: step {} norm {ours} vs {norm}",
            t.name,
            step + 1
        );
    }
}

/// Largest |a - b| over two equally long lists.
fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).abs())
        .fold(0.0, f64::max)
}

fn check(t: &Trajectory, r: &Replay) {
    // The peer in f32 and this crate in f32 are two roundings of the same exact
    // trajectory; the peer's own f32 run lies within `spread` of its f64 run, so two f32
    // runs of comparable accuracy lie within about 2 * spread of each other. The
    // tolerance allows that, and no more.
    let tol = 2.0 * t.f32_vs_f64_max_abs;
    let mut worst = 0.0f64;
    for (i, x) in t.tensors.iter().enumerate() {
        for step in 0..t.steps {
            let d = max_abs_diff(&r.params[i][step], &x.expected[step]);
            assert!(
                d <= tol,
                "{} ({}): tensor {i} step {}: |ours - peer| = {d:e} > tol {tol:e}",
                t.name,
                t.peer,
                step + 1
            );
            worst = worst.max(d);
        }
        // m and u are sums and maxima of the (effective) gradients: each of the 20 steps
        // rounds about three times, so each implementation is within about
        // 60 * 2^-24 = 3.6e-6 of the exact value *relative to the largest gradient term
        // it summed* (m can cancel to far below that, so a relative bound on m itself
        // would be wrong). The effective gradient includes coupled decay, wd * |theta|.
        let wd = t.config.weight_decay;
        for (j, (&a, &b)) in r.exp_avg[i].iter().zip(&x.final_exp_avg).enumerate() {
            let theta_max = x
                .expected
                .iter()
                .map(|p| p[j].abs())
                .fold(x.init[j].abs(), f32::max);
            let g_max = x.grads.iter().map(|g| g[j].abs()).fold(0.0, f32::max);
            let scale = f64::from(g_max) + wd * f64::from(theta_max);
            let tol = 2.0 * 3.6e-6 * scale;
            for (name, a, b) in [
                ("exp_avg", a, b),
                ("exp_inf", r.exp_inf[i][j], x.final_exp_inf[j]),
            ] {
                let d = (f64::from(a) - f64::from(b)).abs();
                assert!(
                    d <= tol,
                    "{}: tensor {i} {name}[{j}]: ours {a:e}, peer {b:e}, |d| {d:e} > {tol:e}",
                    t.name
                );
            }
        }
    }
    println!(
        "{}: worst |ours - peer| = {worst:.3e} (tol {tol:.3e})",
        t.name
    );
}

fn check_16bit<T: Storage>(t: &Trajectory, r: &Replay) {
    // Masters agree within tolerance, so their 16-bit roundings agree exactly unless the
    // two masters straddle a rounding boundary: then they are one 16-bit ulp apart.
    for (i, x) in t.tensors.iter().enumerate() {
        for step in 0..t.steps {
            for (&a, &b) in r.params_16bit[i][step].iter().zip(&x.expected_16bit[step]) {
                if a != b {
                    let (ta, tb) = (T::from_f32(a), T::from_f32(b));
                    let ulp = ulp_distance(ta, tb);
                    assert_eq!(
                        ulp,
                        1,
                        "{}: tensor {i} step {}: {a} vs {b}",
                        t.name,
                        step + 1
                    );
                }
            }
        }
    }
}

/// Distance in representable 16-bit values between two finite numbers of one sign.
fn ulp_distance<T: Storage>(a: T, b: T) -> u32 {
    let bits = |x: T| -> i32 {
        let f = x.to_f32();
        // 16-bit formats are prefixes of f32 (bf16) or embed monotonically; count steps
        // in the narrow format by rounding the f32 bits of its neighbours.
        if T::NAME == "bf16" {
            (bf16::from_f32(f).to_bits() as i32) & 0x7fff
        } else {
            (f16::from_f32(f).to_bits() as i32) & 0x7fff
        }
    };
    assert_eq!(a.to_f32().is_sign_negative(), b.to_f32().is_sign_negative());
    bits(a).abs_diff(bits(b))
}

#[test]
fn cpu_reference_reproduces_every_peer_trajectory() {
    let mut seen = 0;
    for t in trajectories() {
        match t.storage.as_str() {
            "f32" => check(&t, &replay::<f32>(&t)),
            "f16" => {
                let r = replay::<f16>(&t);
                check(&t, &r);
                check_16bit::<f16>(&t, &r);
            }
            "bf16" => {
                let r = replay::<bf16>(&t);
                check(&t, &r);
                check_16bit::<bf16>(&t, &r);
            }
            other => panic!("{}: unknown storage {other}", t.name),
        }
        seen += 1;
    }
    assert_eq!(seen, TRAJECTORIES.len());
}

#[test]
fn every_data_file_is_replayed() {
    let mut on_disk: Vec<String> = std::fs::read_dir("tests/data")
        .expect("run from the crate root (cargo test does)")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .map(|n| n.trim_end_matches(".json").to_owned())
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = TRAJECTORIES.iter().map(|(n, _)| n.to_string()).collect();
    listed.sort();
    assert_eq!(
        on_disk, listed,
        "tests/common/mod.rs must list every tests/data file"
    );
}
