//! The sharded optimizer through real NCCL (feature `nccl`, issue #20), against the CPU
//! reference over the whole list, bit for bit: parameters on every rank, each rank's
//! state against the whole tensors' state at its pieces, and the reports. Needs an
//! NVIDIA GPU and NCCL: without a GPU every test is reported as ignored; with a GPU but
//! without NCCL too, unless `ADAMAX_REQUIRE_NCCL=1` (then they fail). Two ranks share
//! the one GPU only with NCCL 2.30 or later (`NCCL_MULTI_RANK_GPU_ENABLE=1`, set here
//! when unset); before it, that test is ignored and says so.
//!
//! Rank 0 is given the gradients and the others zeros, reduced by sum (averaged, when
//! alone): the reduced gradients are then exactly rank 0's (x + 0 = x, x * 1 = x), so
//! the reference is one optimizer stepped with them, and a reduce-scatter that moved
//! nothing fails.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc, Barrier,
};

use adamax_cuda::{
    bf16,
    cpu::CpuAdamax,
    cuda::{
        self,
        cudarc::driver::{CudaSlice, CudaStream},
        nccl::{self, GradReduction, NcclComm, NcclId, ShardedAdamax},
        GpuStorage,
    },
    f16,
    shard::ShardLayout,
    AdamaxConfig, Checkpoint, LossScaler, Optimizer, ParamMode, ShardCheckpoint, StateFormat,
    StepOptions, StepReport, Storage, TensorHyper, TensorState,
};
use libtest_mimic::{Arguments, Failed, Trial};
use rand::{rngs::StdRng, SeedableRng};

#[path = "common/shards.rs"]
mod shards;
use shards::{config, flat_of, slice, step_grads, values};

type R = Result<(), Failed>;

/// A tensor cut by boundaries, one under the 8-bit threshold, an empty and a tiny one,
/// one without a gradient in odd steps (6), one with a parameter group (3).
const LENS: [usize; 7] = [3 * 8192 + 5, 700, 0, 5, 17_000, 9000, 20_000];
const STEPS: usize = 6;

const GROUP: TensorHyper = TensorHyper {
    lr_scale: 0.5,
    weight_decay: 0.0,
};

fn options() -> StepOptions {
    StepOptions {
        max_norm: Some(0.4),
        ..Default::default()
    }
}

fn scaler() -> LossScaler {
    LossScaler {
        scale: 128.0,
        growth_interval: 2,
        ..Default::default()
    }
}

/// The whole list's run on the CPU: the gradients of each step (`None` for a tensor
/// without one), and after each step the parameters, states and report.
struct Reference<T> {
    grads: Vec<Vec<Option<Vec<T>>>>,
    params: Vec<Vec<Vec<T>>>,
    states: Vec<Vec<TensorState>>,
    reports: Vec<StepReport>,
    init: Vec<Vec<T>>,
    /// The file of its checkpoint after the last step.
    checkpoint: Vec<u8>,
}

fn reference<T: Storage>(config: AdamaxConfig, seed: u64) -> Result<Reference<T>, Failed> {
    let mut rng = StdRng::seed_from_u64(seed);
    let init: Vec<Vec<T>> = LENS.iter().map(|&n| values(&mut rng, n, 1.0)).collect();
    let mut params = init.clone();
    let refs: Vec<&[T]> = init.iter().map(Vec::as_slice).collect();
    let mut opt = CpuAdamax::new(config, &refs)?;
    opt.set_tensor_hyper(3, GROUP)?;
    opt.set_options(options())?;
    opt.set_loss_scaler(Some(scaler()))?;
    let mut out = Reference {
        grads: Vec::new(),
        params: Vec::new(),
        states: Vec::new(),
        reports: Vec::new(),
        init,
        checkpoint: Vec::new(),
    };
    for step in 0..STEPS {
        let scale = opt.loss_scaler()?.map_or(1.0, |s| s.scale);
        let grads: Vec<Option<Vec<T>>> = step_grads(&mut rng, &LENS, step, scale, 3);
        let g: Vec<Option<&[T]>> = grads.iter().map(Option::as_deref).collect();
        let mut p: Vec<&mut [T]> = params.iter_mut().map(Vec::as_mut_slice).collect();
        opt.step_some(&mut p, &g)?;
        out.grads.push(grads);
        out.params.push(params.clone());
        out.states.push(opt.tensor_states().to_vec());
        out.reports.push(opt.last_report()?);
    }
    assert_eq!(
        opt.step_count()?,
        STEPS as u64 - 1,
        "the overflow skip happened"
    );
    out.checkpoint = opt.checkpoint()?.to_bytes()?;
    Ok(out)
}

fn bits<T: Storage>(v: &[T]) -> Vec<u32> {
    v.iter().map(|x| x.to_f32().to_bits()).collect()
}

/// Where the ranks of a test meet after each step: whether any failed.
struct Meet {
    barrier: Barrier,
    failed: AtomicBool,
}

/// The parameters (all-gathered), the report and this rank's state after `step`,
/// against the reference.
fn compare<T: GpuStorage>(
    opt: &ShardedAdamax<T>,
    params: &CudaSlice<T>,
    stream: &Arc<CudaStream>,
    want: &Reference<T>,
    step: usize,
    layout: &ShardLayout,
    what: &str,
) -> R {
    let got = stream.clone_dtoh(params).map_err(|e| format!("{e:?}"))?;
    for (i, (w, &o)) in want.params[step].iter().zip(layout.offsets()).enumerate() {
        if bits(w) != bits(&got[o..o + w.len()]) {
            return Err(format!("{what} step {step} tensor {i}: parameters differ").into());
        }
    }
    let report = opt.last_report()?;
    if report != want.reports[step] {
        return Err(format!(
            "{what} step {step}: report {report:?}, want {:?}",
            want.reports[step]
        )
        .into());
    }
    for (p, state) in opt.pieces().iter().zip(opt.shard_state()?) {
        if state != slice(&want.states[step][p.tensor], p.begin, p.end) {
            return Err(format!("{what} step {step} {p:?}: state differs").into());
        }
    }
    Ok(())
}

/// One rank's run: its own stream and communicator, compared with the reference after
/// every step. Returns the state bytes it holds and its shard of the state.
fn rank_run<T: GpuStorage>(
    stream: Arc<CudaStream>,
    rank: usize,
    layout: &ShardLayout,
    id: NcclId,
    config: AdamaxConfig,
    want: &Reference<T>,
    meet: &Meet,
) -> Result<(u64, ShardCheckpoint), Failed> {
    let comm = NcclComm::new(&stream, rank, layout.world_size(), &id)?;
    let what = format!(
        "{} {:?} world {} rank {rank}",
        T::NAME,
        config.precision,
        layout.world_size()
    );
    let mut params = stream
        .clone_htod(&flat_of(layout, &want.init))
        .map_err(|e| format!("{e:?}"))?;
    let mut opt = ShardedAdamax::new(comm, config, layout.clone(), &params)?;
    // Rank 0's gradients summed with the others' zeros; alone, averaged over one rank
    // (NCCL's ncclAvg multiplies by 1/1): both exact, so both reductions are checked.
    opt.set_grad_reduction(if layout.world_size() == 1 {
        GradReduction::Average
    } else {
        GradReduction::Sum
    });
    opt.set_tensor_hyper(3, GROUP)?;
    opt.set_options(options())?;
    opt.set_loss_scaler(Some(scaler()))?;
    let zeros = vec![T::from_f32(0.0); layout.total()];
    let shard = layout.shard(rank);
    for step in 0..STEPS {
        let present: Vec<Vec<T>> = want.grads[step]
            .iter()
            .zip(LENS)
            .map(|(g, n)| g.clone().unwrap_or_else(|| vec![T::from_f32(0.0); n]))
            .collect();
        let reduced = flat_of(layout, &present);
        let has_grad: Vec<bool> = want.grads[step].iter().map(Option::is_some).collect();
        let all = has_grad.iter().all(|&h| h);
        // Every entry point in turn: the whole buffer reduce-scattered (rank 0 holds
        // the gradients, the others zeros, summed), all tensors or some; and the
        // shard of gradients already reduced.
        if step % 3 == 2 {
            let g = stream
                .clone_htod(&reduced[shard.clone()])
                .map_err(|e| format!("{e:?}"))?;
            opt.step_reduced(&mut params, &g, (!all).then_some(&has_grad[..]))?;
        } else {
            let host = if rank == 0 { reduced } else { zeros.clone() };
            let mut grads = stream.clone_htod(&host).map_err(|e| format!("{e:?}"))?;
            if all {
                opt.step(&mut params, &mut grads)?;
            } else {
                opt.step_some(&mut params, &mut grads, &has_grad)?;
            }
        }
        let verdict = compare(&opt, &params, &stream, want, step, layout, &what);
        // Every rank learns whether any failed before the next step's collectives, so
        // that a failure ends the test on every rank instead of leaving the others
        // waiting in NCCL.
        if verdict.is_err() {
            meet.failed.store(true, Ordering::SeqCst);
        }
        meet.barrier.wait();
        verdict?;
        if meet.failed.load(Ordering::SeqCst) {
            return Err(format!("{what}: another rank failed at step {step}").into());
        }
    }
    // The shard restores into the optimizer as it is.
    let ck = opt.checkpoint()?;
    let before = opt.shard_state()?;
    opt.restore(&ck)?;
    if opt.shard_state()? != before {
        return Err(format!("{what}: restoring its own shard changed the state").into());
    }
    Ok((opt.state_bytes(), ck))
}

/// `world` ranks on device 0, one thread and stream each.
fn ranks<T: GpuStorage>(world: usize, params: ParamMode, state: StateFormat) -> R {
    let base = cuda::default_stream(0)?;
    let config = config(params, state);
    let want = reference::<T>(config, 0x20 + world as u64)?;
    let layout = ShardLayout::new(&LENS, world)?;
    if world > 1 {
        assert!(
            layout.pieces(1).iter().any(|p| p.begin > 0),
            "a tensor is cut"
        );
    }
    let id = NcclId::new()?;
    let meet = Meet {
        barrier: Barrier::new(world),
        failed: AtomicBool::new(false),
    };
    let done = std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (layout, want, meet) = (&layout, &want, &meet);
                let stream = base.context().new_stream();
                s.spawn(move || -> Result<(u64, ShardCheckpoint), Failed> {
                    let stream = stream.map_err(|e| format!("{e:?}"))?;
                    rank_run::<T>(stream, rank, layout, id, config, want, meet)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("a rank panicked".into())))
            .collect::<Result<Vec<_>, Failed>>()
    })?;
    let (bytes, shards): (Vec<u64>, Vec<ShardCheckpoint>) = done.into_iter().unzip();
    // The ranks' shards make the one optimizer's checkpoint file, byte for byte.
    let gathered = ShardCheckpoint::gather(&shards)?;
    if gathered.to_bytes()? != want.checkpoint {
        let whole = Checkpoint::from_bytes(&want.checkpoint)?;
        return Err(format!(
            "the gathered shards differ from the one optimizer's checkpoint: {}",
            checkpoint_difference(&gathered, &whole)
        )
        .into());
    }
    eprintln!(
        "{} {params:?} {state:?}: state bytes per rank {bytes:?} (world {world})",
        T::NAME
    );
    Ok(())
}

/// The fields in which `got` differs from `want`, each with both values (the whole of
/// `got` when their bytes differ but their fields agree).
fn checkpoint_difference(got: &Checkpoint, want: &Checkpoint) -> String {
    fn field<V: PartialEq + std::fmt::Debug>(name: &str, got: &V, want: &V) -> Option<String> {
        (got != want).then(|| format!("{name} {got:?} / {want:?}"))
    }
    let tensors = (got.tensors != want.tensors).then(|| {
        match got
            .tensors
            .iter()
            .zip(&want.tensors)
            .position(|(g, w)| g != w)
        {
            Some(i) => format!("tensors: {i} first"),
            None => format!("tensors: {} / {}", got.tensors.len(), want.tensors.len()),
        }
    });
    let differ: Vec<String> = [
        field("config", &got.config, &want.config),
        field("step", &got.step, &want.step),
        field("storage", &got.storage, &want.storage),
        tensors,
        field("shapes", &got.shapes, &want.shapes),
        field("names", &got.names, &want.names),
        field("state_formats", &got.state_formats, &want.state_formats),
        field("hypers", &got.hypers, &want.hypers),
        field("options", &got.options, &want.options),
        field("scaler", &got.scaler, &want.scaler),
    ]
    .into_iter()
    .flatten()
    .collect();
    if differ.is_empty() {
        format!("every field agrees, the bytes do not: got {got:?}")
    } else {
        format!("(got / want) {}", differ.join("; "))
    }
}

/// What a user can get wrong before any collective, refused as errors.
fn refusals() -> R {
    use adamax_cuda::Error;
    let stream = cuda::default_stream(0)?;
    let id = NcclId::new()?;
    assert!(matches!(
        NcclId::from_bytes(&[0; 12]),
        Err(Error::InvalidNcclId { len: 12 })
    ));
    assert_eq!(NcclId::from_bytes(id.as_bytes())?, id);
    for (rank, world) in [(1, 1), (0, 0), (5, 2)] {
        assert!(
            matches!(
                NcclComm::new(&stream, rank, world, &id),
                Err(Error::InvalidLayout { .. })
            ),
            "rank {rank} of {world}"
        );
    }
    let comm = NcclComm::new(&stream, 0, 1, &id)?;
    let layout = ShardLayout::new(&LENS, 2)?;
    let params = stream
        .alloc_zeros::<f32>(layout.total())
        .map_err(|e| format!("{e:?}"))?;
    // A layout for another world size.
    let Err(e) = ShardedAdamax::new(comm, AdamaxConfig::default(), layout, &params) else {
        return Err("a layout of 2 ranks over a communicator of 1".into());
    };
    assert!(matches!(e, Error::InvalidLayout { .. }), "{e}");
    let comm = NcclComm::new(&stream, 0, 1, &NcclId::new()?)?;
    let layout = ShardLayout::new(&LENS, 1)?;
    let short = stream
        .alloc_zeros::<f32>(layout.total() - 1)
        .map_err(|e| format!("{e:?}"))?;
    assert!(matches!(
        ShardedAdamax::new(comm, AdamaxConfig::default(), layout.clone(), &short),
        Err(Error::BufferTooSmall { .. })
    ));
    let comm = NcclComm::new(&stream, 0, 1, &NcclId::new()?)?;
    let mut params = stream
        .alloc_zeros::<f32>(layout.total())
        .map_err(|e| format!("{e:?}"))?;
    let mut opt = ShardedAdamax::new(comm, AdamaxConfig::default(), layout.clone(), &params)?;
    let mut grads = stream
        .alloc_zeros::<f32>(layout.total())
        .map_err(|e| format!("{e:?}"))?;
    assert!(matches!(
        opt.step_some(&mut params, &mut grads, &[true; 3]),
        Err(Error::TensorCountMismatch { .. })
    ));
    let mut short = stream
        .alloc_zeros::<f32>(layout.total() - 1)
        .map_err(|e| format!("{e:?}"))?;
    assert!(matches!(
        opt.step(&mut params, &mut short),
        Err(Error::BufferTooSmall { .. })
    ));
    assert!(matches!(
        opt.set_tensor_hyper(LENS.len(), GROUP),
        Err(Error::TensorIndexOutOfRange { .. })
    ));
    // Nothing was enqueued: the first real step is step 1.
    opt.step(&mut params, &mut grads)?;
    assert_eq!(opt.step_count()?, 1);
    Ok(())
}

fn main() {
    let mut args = Arguments::from_args();
    // One test at a time: communicators of concurrent tests on the one GPU could wait
    // on each other's kernels.
    args.test_threads.get_or_insert(1);
    // NCCL's version first (it needs no GPU), so that the variable below is set before
    // the driver starts any thread.
    let version = nccl::nccl_version();
    let multi_rank = version.as_ref().is_ok_and(|&v| v >= (2, 30, 0));
    if multi_rank && std::env::var_os("NCCL_MULTI_RANK_GPU_ENABLE").is_none() {
        std::env::set_var("NCCL_MULTI_RANK_GPU_ENABLE", "1");
    }
    let gpu = cuda::device_count().ok().filter(|&n| n > 0).is_some();
    let required = std::env::var("ADAMAX_REQUIRE_NCCL").is_ok_and(|v| v == "1");
    match (&version, gpu) {
        (_, false) => eprintln!("no CUDA device visible: NCCL tests are ignored"),
        (Ok(v), true) => eprintln!("NCCL {v:?}"),
        (Err(e), true) => eprintln!("{e}"),
    }
    let runs = gpu && (version.is_ok() || required);
    if runs && !multi_rank {
        eprintln!(
            "NCCL before 2.30 cannot put two ranks on one GPU: the two-rank tests are ignored"
        );
    }
    type Run = fn(usize, ParamMode, StateFormat) -> R;
    let modes: [(&str, Run, ParamMode, StateFormat); 6] = [
        ("f32", ranks::<f32>, ParamMode::Master, StateFormat::F32),
        ("f16", ranks::<f16>, ParamMode::Master, StateFormat::F32),
        (
            "bf16_sr",
            ranks::<bf16>,
            ParamMode::Stochastic,
            StateFormat::F32,
        ),
        (
            "f32_q8",
            ranks::<f32>,
            ParamMode::Master,
            StateFormat::Blockwise8,
        ),
        (
            "bf16_q8",
            ranks::<bf16>,
            ParamMode::Master,
            StateFormat::Blockwise8,
        ),
        (
            "bf16_sr_q8",
            ranks::<bf16>,
            ParamMode::Stochastic,
            StateFormat::Blockwise8,
        ),
    ];
    let mut trials =
        vec![Trial::test("refusals_before_any_collective", refusals).with_ignored_flag(!runs)];
    for (name, run, params, state) in modes {
        for world in [1, 2] {
            let ignored = !runs || (world > 1 && !multi_rank);
            trials.push(
                Trial::test(
                    format!("{name}_world_{world}_equals_one_cpu_optimizer"),
                    move || run(world, params, state),
                )
                .with_ignored_flag(ignored),
            );
        }
    }
    libtest_mimic::run(&args, trials).exit();
}
