//! ZeRO-1 sharding simulated on the CPU (issue #20): ranks are threads, each stepping
//! its shard of a [`ShardLayout`] with the CPU reference (`CpuAdamax::for_shard`), the
//! partial sums of the clipping reduction exchanged through an in-process all-reduce
//! with NCCL's semantics (a test double, not a product path). The reference is one
//! `CpuAdamax` over the whole list: at every world size from 1 to 8, in every storage
//! mode, with clipping, a loss scaler and an overflow skip, tensors without a gradient,
//! parameter groups and tensors of both state formats, every parameter, every piece of
//! state and every report must equal it bit for bit.

use std::sync::{Barrier, Mutex};

use adamax_cuda::{
    bf16, cpu::CpuAdamax, f16, shard::ShardLayout, AdamaxConfig, LossScaler, Optimizer, ParamMode,
    Precision, StateFormat, StepOptions, Storage, TensorHyper,
};
use rand::{rngs::StdRng, SeedableRng};

#[path = "common/shards.rs"]
mod shards;
use shards::{config, flat_of, slice, step_grads, values};

type R = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// An all-reduce over `world` threads: sums of f32 (exact here, since each chunk's sum
/// comes from one rank and the others add zeros) and an or of flags, the same on every
/// rank once all have called.
struct AllReduce {
    barrier: Barrier,
    acc: Mutex<(Vec<f32>, bool)>,
}

impl AllReduce {
    fn new(world: usize) -> Self {
        Self {
            barrier: Barrier::new(world),
            acc: Mutex::new((Vec::new(), false)),
        }
    }

    fn all_reduce(&self, partials: &mut [f32], found: &mut bool) -> adamax_cuda::Result<()> {
        {
            let mut acc = self.acc.lock().expect("no rank panicked");
            if acc.0.len() != partials.len() {
                acc.0 = vec![0.0; partials.len()];
            }
            for (a, p) in acc.0.iter_mut().zip(partials.iter()) {
                *a += *p;
            }
            acc.1 |= *found;
        }
        self.barrier.wait();
        {
            let acc = self.acc.lock().expect("no rank panicked");
            partials.copy_from_slice(&acc.0);
            *found = acc.1;
        }
        // Everyone has read before the next call's first write.
        if self.barrier.wait().is_leader() {
            *self.acc.lock().expect("no rank panicked") = (Vec::new(), false);
        }
        self.barrier.wait();
        Ok(())
    }
}

/// Six steps of the whole list and of `world` ranks, compared after each; whether the
/// layout cut a tensor.
fn sharded_equals_whole<T: Storage>(
    params: ParamMode,
    state: StateFormat,
    world: usize,
) -> Result<bool, Box<dyn std::error::Error + Send + Sync>> {
    let what = format!("{} {params:?} {state:?} world {world}", T::NAME);
    let mut rng = StdRng::seed_from_u64(0x20 + world as u64);
    // A tensor cut by several boundaries, one under the 8-bit threshold, empty and
    // tiny ones, one without a gradient in odd steps.
    let lens = [3 * 8192 + 5, 700, 0, 5, 17_000, 9000, 20_000];
    let config = config(params, state);
    let init: Vec<Vec<T>> = lens.iter().map(|&n| values(&mut rng, n, 1.0)).collect();
    let layout = ShardLayout::new(&lens, world)?;
    let pieces: usize = (0..world).map(|r| layout.pieces(r).len()).sum();
    let holding = (0..world).filter(|&r| !layout.pieces(r).is_empty()).count();
    assert!(
        world == 1 || holding >= 2,
        "{what}: one rank holds everything"
    );
    let group = TensorHyper {
        lr_scale: 0.5,
        weight_decay: 0.0,
    };
    let options = StepOptions {
        max_norm: Some(0.4),
        ..Default::default()
    };
    let scaler = LossScaler {
        scale: 128.0,
        growth_interval: 2,
        ..Default::default()
    };
    // The whole list.
    let mut whole_params = init.clone();
    let refs: Vec<&[T]> = init.iter().map(Vec::as_slice).collect();
    let mut whole = CpuAdamax::new(config, &refs)?;
    whole.set_tensor_hyper(3, group)?;
    whole.set_options(options)?;
    whole.set_loss_scaler(Some(scaler))?;
    // The ranks, over one flat buffer (each writes only its shard: the all-gather).
    let mut flat = vec![T::from_f32(0.0); layout.total()];
    for (t, &o) in init.iter().zip(layout.offsets()) {
        flat[o..o + t.len()].copy_from_slice(t);
    }
    let mut ranks = Vec::with_capacity(world);
    for rank in 0..world {
        let mut opt = CpuAdamax::for_shard(config, &layout, rank, &flat)?;
        for (i, p) in layout.pieces(rank).iter().enumerate() {
            if p.tensor == 3 {
                opt.set_tensor_hyper(i, group)?;
            }
        }
        opt.set_options(options)?;
        opt.set_loss_scaler(Some(scaler))?;
        ranks.push(opt);
    }
    for step in 0..6usize {
        let scale = whole.loss_scaler()?.map_or(1.0, |s| s.scale);
        let grads: Vec<Option<Vec<T>>> = step_grads(&mut rng, &lens, step, scale, 3);
        let g: Vec<Option<&[T]>> = grads.iter().map(Option::as_deref).collect();
        let mut p: Vec<&mut [T]> = whole_params.iter_mut().map(Vec::as_mut_slice).collect();
        whole.step_some(&mut p, &g)?;
        step_world(&layout, &mut ranks, &mut flat, &grads)?;
        // Parameters, state and reports.
        for (i, (w, &o)) in whole_params.iter().zip(layout.offsets()).enumerate() {
            let bits = |v: &[T]| v.iter().map(|x| x.to_f32().to_bits()).collect::<Vec<_>>();
            assert!(
                bits(w) == bits(&flat[o..o + w.len()]),
                "{what} step {step} tensor {i}: parameters"
            );
        }
        let report = whole.last_report()?;
        for (rank, opt) in ranks.iter().enumerate() {
            assert_eq!(
                opt.last_report()?,
                report,
                "{what} step {step} rank {rank}: report"
            );
            for (p, state) in layout.pieces(rank).iter().zip(opt.tensor_states()) {
                let want = slice(&whole.tensor_states()[p.tensor], p.begin, p.end);
                assert!(
                    *state == want,
                    "{what} step {step} rank {rank} {p:?}: state"
                );
            }
        }
    }
    // The run took its overflow skip: the case happened.
    assert_eq!(whole.step_count()?, 5, "{what}");
    Ok(pieces > lens.len())
}

/// One step of every rank of `layout` (threads over an in-process all-reduce) from the
/// reduced gradients `grads` (`None`: the tensor has none; in the flat layout, absent
/// tensors stay zero and are passed as `None`), each rank writing its shard of the
/// flat parameters `flat`.
fn step_world<T: Storage>(
    layout: &ShardLayout,
    ranks: &mut [CpuAdamax<T>],
    flat: &mut [T],
    grads: &[Option<Vec<T>>],
) -> R {
    let world = layout.world_size();
    let mut flat_grads = vec![T::from_f32(0.0); layout.total()];
    for (g, &o) in grads.iter().zip(layout.offsets()) {
        if let Some(g) = g {
            flat_grads[o..o + g.len()].copy_from_slice(g);
        }
    }
    let flat_grads = &flat_grads;
    let exchange = AllReduce::new(world);
    let shard_len = layout.shard_len();
    std::thread::scope(|s| -> R {
        let mut handles = Vec::new();
        for ((rank, opt), shard) in ranks.iter_mut().enumerate().zip(flat.chunks_mut(shard_len)) {
            let exchange = &exchange;
            handles.push(s.spawn(move || -> adamax_cuda::Result<()> {
                let base = rank * shard_len;
                let pieces = layout.pieces(rank);
                let mut params: Vec<&mut [T]> = Vec::with_capacity(pieces.len());
                let mut rest = shard;
                let mut at = base;
                for p in &pieces {
                    let start = layout.offsets()[p.tensor] + p.begin;
                    let (_, tail) = std::mem::take(&mut rest).split_at_mut(start - at);
                    let (mine, tail) = tail.split_at_mut(p.len());
                    params.push(mine);
                    rest = tail;
                    at = start + p.len();
                }
                let piece_grads: Vec<Option<&[T]>> = pieces
                    .iter()
                    .map(|p| {
                        grads[p.tensor].as_ref().map(|_| {
                            let start = layout.offsets()[p.tensor] + p.begin;
                            &flat_grads[start..start + p.len()]
                        })
                    })
                    .collect();
                opt.step_exchanged(&mut params, &piece_grads, &mut |partials, found| {
                    exchange.all_reduce(partials, found)
                })
            }));
        }
        for h in handles {
            h.join().map_err(|_| "a rank panicked")??;
        }
        Ok(())
    })
}

/// Worlds 1 to 8 in one mode (a test per mode, so that they run side by side).
fn every_world<T: Storage>(params: ParamMode, state: StateFormat) -> R {
    let mut cut = 0;
    for world in 1..=8 {
        cut += usize::from(sharded_equals_whole::<T>(params, state, world)?);
    }
    // Most world sizes cut a tensor mid-way (the others place boundaries between
    // tensors).
    assert!(cut >= 4, "only {cut} world sizes cut a tensor");
    Ok(())
}

#[test]
fn f32_shards_step_as_one_optimizer_at_every_world_size() -> R {
    every_world::<f32>(ParamMode::Master, StateFormat::F32)
}

#[test]
fn f16_shards_step_as_one_optimizer_at_every_world_size() -> R {
    every_world::<f16>(ParamMode::Master, StateFormat::F32)
}

#[test]
fn bf16_shards_step_as_one_optimizer_at_every_world_size() -> R {
    every_world::<bf16>(ParamMode::Master, StateFormat::F32)
}

#[test]
fn bf16_sr_shards_step_as_one_optimizer_at_every_world_size() -> R {
    every_world::<bf16>(ParamMode::Stochastic, StateFormat::F32)
}

#[test]
fn f32_q8_shards_step_as_one_optimizer_at_every_world_size() -> R {
    every_world::<f32>(ParamMode::Master, StateFormat::Blockwise8)
}

#[test]
fn f16_q8_shards_step_as_one_optimizer_at_every_world_size() -> R {
    every_world::<f16>(ParamMode::Master, StateFormat::Blockwise8)
}

#[test]
fn bf16_q8_shards_step_as_one_optimizer_at_every_world_size() -> R {
    every_world::<bf16>(ParamMode::Master, StateFormat::Blockwise8)
}

#[test]
fn bf16_sr_q8_shards_step_as_one_optimizer_at_every_world_size() -> R {
    every_world::<bf16>(ParamMode::Stochastic, StateFormat::Blockwise8)
}

/// What a hostile review of the shard API found, each pinned: a rank outside the
/// layout and a flat buffer of another length are refused; a shard's optimizer will not
/// decide a step alone, choose a piece's format alone, or write or take a checkpoint
/// that does not say where its pieces sit; sums no ranks can make are refused before
/// anything is written.
#[test]
fn a_shard_refuses_what_would_break_the_whole_list() -> R {
    use adamax_cuda::Error;
    let refused = |r: adamax_cuda::Result<()>, says: &str| match r {
        Err(e @ Error::InvalidLayout { .. }) => assert!(e.to_string().contains(says), "{e}"),
        other => panic!("expected a refusal saying `{says}`, got {other:?}"),
    };
    let layout = ShardLayout::new(&[10, 20_000, 0, 3], 3)?;
    let flat = vec![0.5f32; layout.total()];
    let config = config(ParamMode::Master, StateFormat::Blockwise8);
    refused(
        CpuAdamax::for_shard(config, &layout, 3, &flat).map(|_| ()),
        "rank 3 is not in a layout of 3 ranks",
    );
    refused(
        CpuAdamax::for_shard(config, &layout, 0, &flat[1..]).map(|_| ()),
        "the flat params hold",
    );
    let mut opt = CpuAdamax::for_shard(config, &layout, 0, &flat)?;
    let pieces = layout.pieces(0);
    let mut params: Vec<Vec<f32>> = pieces.iter().map(|p| vec![0.5; p.len()]).collect();
    let grads: Vec<Vec<f32>> = pieces.iter().map(|p| vec![0.1; p.len()]).collect();
    let g: Vec<Option<&[f32]>> = grads.iter().map(|g| Some(g.as_slice())).collect();
    let before = opt.tensor_states().to_vec();
    // Formats follow the whole tensors on every rank.
    match opt.set_tensor_state_format(0, StateFormat::Blockwise8) {
        Err(e @ Error::StateFormat { .. }) => assert!(
            e.to_string()
                .contains("whose pieces keep their whole tensors' formats"),
            "{e}"
        ),
        other => panic!("{other:?}"),
    }
    // With clipping and the overflow check, a step is decided over every rank.
    opt.set_options(StepOptions {
        max_norm: Some(1.0),
        skip_nonfinite: true,
        ..Default::default()
    })?;
    {
        let mut p: Vec<&mut [f32]> = params.iter_mut().map(Vec::as_mut_slice).collect();
        refused(opt.step_some(&mut p, &g), "step it with step_exchanged");
        for faulty in [f32::NAN, -1.0] {
            refused(
                opt.step_exchanged(&mut p, &g, &mut |partials, _| {
                    partials.fill(faulty);
                    Ok(())
                }),
                "partial sums no ranks can make",
            );
        }
    }
    assert_eq!(opt.tensor_states(), before, "a refused step wrote state");
    assert!(
        params.iter().flatten().all(|&x| x == 0.5),
        "a refused step wrote parameters"
    );
    refused(opt.checkpoint().map(|_| ()), "ShardCheckpoint");
    let whole = CpuAdamax::new(config, &[&[0.5f32; 10][..]])?.checkpoint()?;
    refused(opt.restore(&whole), "ShardCheckpoint");
    Ok(())
}

/// A run of `world` ranks' optimizers over `init` laid out by `layout`, set up as the
/// whole optimizer of `sharded_equals_whole` is (group on tensor 3, clipping, scaler).
fn world_of<T: Storage>(
    config: AdamaxConfig,
    layout: &ShardLayout,
    flat: &[T],
    group: TensorHyper,
) -> Result<Vec<CpuAdamax<T>>, Box<dyn std::error::Error + Send + Sync>> {
    (0..layout.world_size())
        .map(|rank| {
            let mut opt = CpuAdamax::for_shard(config, layout, rank, flat)?;
            for (i, p) in layout.pieces(rank).iter().enumerate() {
                if p.tensor == 3 {
                    opt.set_tensor_hyper(i, group)?;
                }
            }
            opt.set_options(StepOptions {
                max_norm: Some(0.4),
                ..Default::default()
            })?;
            opt.set_loss_scaler(Some(LossScaler {
                scale: 128.0,
                growth_interval: 2,
                ..Default::default()
            }))?;
            Ok(opt)
        })
        .collect()
}

/// Issue #20: a sharded run saved by each of its 4 ranks (files on disk) gathers into
/// the one-optimizer checkpoint, byte for byte; resharded to 3 ranks and restored
/// there, it continues as the one optimizer does, bit for bit (parameters, state,
/// reports), through an overflow skip.
#[test]
fn a_sharded_run_saved_at_one_world_size_resumes_at_another() -> R {
    use adamax_cuda::ShardCheckpoint;
    for (params, state) in [
        (ParamMode::Master, StateFormat::Blockwise8),
        (ParamMode::Stochastic, StateFormat::F32),
    ] {
        let what = format!("{params:?} {state:?}");
        let mut rng = StdRng::seed_from_u64(7);
        let lens = [3 * 8192 + 5, 700, 0, 5, 17_000, 9000, 20_000];
        let config = config(params, state);
        let group = TensorHyper {
            lr_scale: 0.5,
            weight_decay: 0.0,
        };
        let mut hypers = vec![TensorHyper::from_config(&config); lens.len()];
        hypers[3] = group;
        let init: Vec<Vec<bf16>> = lens.iter().map(|&n| values(&mut rng, n, 1.0)).collect();
        let mut whole_params = init.clone();
        let refs: Vec<&[bf16]> = init.iter().map(Vec::as_slice).collect();
        let mut whole = CpuAdamax::new(config, &refs)?;
        whole.set_tensor_hyper(3, group)?;
        whole.set_options(StepOptions {
            max_norm: Some(0.4),
            ..Default::default()
        })?;
        whole.set_loss_scaler(Some(LossScaler {
            scale: 128.0,
            growth_interval: 2,
            ..Default::default()
        }))?;
        let mut layout = ShardLayout::new(&lens, 4)?;
        let mut flat = flat_of(&layout, &init);
        let mut ranks = world_of(config, &layout, &flat, group)?;
        for step in 0..6usize {
            if step == 3 {
                // Every rank saves its shard; the files make the one-GPU checkpoint.
                let dir = std::env::temp_dir();
                let paths: Vec<_> = (0..4)
                    .map(|r| {
                        dir.join(format!(
                            "adamax-shard-{}-{r}.safetensors",
                            std::process::id()
                        ))
                    })
                    .collect();
                for (opt, path) in ranks.iter().zip(&paths) {
                    opt.shard_checkpoint(&hypers)?.save(path)?;
                }
                let loaded = paths
                    .iter()
                    .map(ShardCheckpoint::load)
                    .collect::<adamax_cuda::Result<Vec<_>>>()?;
                for p in &paths {
                    std::fs::remove_file(p)?;
                }
                let gathered = ShardCheckpoint::gather(&loaded)?;
                assert!(
                    gathered.to_bytes()? == whole.checkpoint()?.to_bytes()?,
                    "{what}: the gathered shards are the one optimizer's checkpoint"
                );
                // Three ranks go on from the same files.
                let three = ShardCheckpoint::reshard(&loaded, 3)?;
                layout = ShardLayout::new(&lens, 3)?;
                flat = flat_of(&layout, &whole_params);
                ranks = world_of(config, &layout, &flat, TensorHyper::from_config(&config))?;
                for (opt, shard) in ranks.iter_mut().zip(&three) {
                    opt.restore_shard(shard)?;
                }
                // A shard of another rank or world is refused.
                let mut other = CpuAdamax::for_shard(config, &layout, 0, &flat)?;
                assert!(other.restore_shard(&three[1]).is_err());
                assert!(other.restore_shard(&loaded[0]).is_err());
            }
            let scale = whole.loss_scaler()?.map_or(1.0, |s| s.scale);
            let grads: Vec<Option<Vec<bf16>>> = step_grads(&mut rng, &lens, step, scale, 4);
            let g: Vec<Option<&[bf16]>> = grads.iter().map(Option::as_deref).collect();
            let mut p: Vec<&mut [bf16]> = whole_params.iter_mut().map(Vec::as_mut_slice).collect();
            whole.step_some(&mut p, &g)?;
            step_world(&layout, &mut ranks, &mut flat, &grads)?;
            for (i, (w, &o)) in whole_params.iter().zip(layout.offsets()).enumerate() {
                let bits = |v: &[bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert!(
                    bits(w) == bits(&flat[o..o + w.len()]),
                    "{what} step {step} tensor {i}: parameters"
                );
            }
            let report = whole.last_report()?;
            for (rank, opt) in ranks.iter().enumerate() {
                assert_eq!(opt.last_report()?, report, "{what} step {step} rank {rank}");
                for (p, state) in layout.pieces(rank).iter().zip(opt.tensor_states()) {
                    let want = slice(&whole.tensor_states()[p.tensor], p.begin, p.end);
                    assert!(
                        *state == want,
                        "{what} step {step} rank {rank} {p:?}: state"
                    );
                }
            }
        }
        assert_eq!(whole.step_count()?, 5, "{what}: the overflow skip happened");
    }
    Ok(())
}

/// GPT-2 small's parameter shapes, as the benchmarks take them.
#[path = "../benches/common/mod.rs"]
mod bench_common;

/// The optimizer state each rank holds, computed from the modes table
/// (`Precision::state_bytes` of each piece, in its whole tensor's format) for GPT-2
/// small: the ranks' bytes add up to one optimizer's exactly (pieces cut no 8-bit
/// block), and the largest rank holds at most 1% more than 1/world of it (the shards
/// hold equal element counts; with 8-bit state a rank whose shard holds more of the
/// small tensors kept in f32 holds a little more). The figures BENCHMARKS.md quotes.
#[test]
fn each_rank_holds_a_world_size_share_of_the_state() -> R {
    use adamax_cuda::StorageType;
    let lens = bench_common::gpt2_small();
    let modes = [
        ("f32", StorageType::F32, ParamMode::Master, StateFormat::F32),
        (
            "bf16 (master)",
            StorageType::Bf16,
            ParamMode::Master,
            StateFormat::F32,
        ),
        (
            "bf16_sr_q8",
            StorageType::Bf16,
            ParamMode::Stochastic,
            StateFormat::Blockwise8,
        ),
    ];
    for (name, storage, params, state) in modes {
        let p = Precision {
            params,
            state,
            ..Precision::default()
        };
        let bytes_of = |whole_len: usize, n: usize| -> adamax_cuda::Result<u64> {
            let kept = Precision {
                state: p.tensor_state(whole_len),
                min_8bit_len: 0,
                ..p
            };
            Ok(kept.state_bytes(storage, n)?)
        };
        let one: u64 = lens
            .iter()
            .map(|&n| bytes_of(n, n))
            .sum::<adamax_cuda::Result<u64>>()?;
        let mut row = format!("{name}: one GPU {one} B");
        for world in [2, 4, 8] {
            let layout = ShardLayout::new(&lens, world)?;
            let per_rank = (0..world)
                .map(|r| {
                    layout
                        .pieces(r)
                        .iter()
                        .map(|pc| bytes_of(lens[pc.tensor], pc.len()))
                        .sum::<adamax_cuda::Result<u64>>()
                })
                .collect::<adamax_cuda::Result<Vec<u64>>>()?;
            assert_eq!(per_rank.iter().sum::<u64>(), one, "{name} world {world}");
            let most = *per_rank.iter().max().unwrap_or(&0);
            assert!(
                most as f64 <= one as f64 / world as f64 * 1.01,
                "{name} world {world}: {most} of {one}"
            );
            row += &format!(
                ", world {world}: at most {most} B a rank ({:.4} of one GPU's)",
                most as f64 / one as f64
            );
        }
        eprintln!("{row}");
    }
    Ok(())
}
