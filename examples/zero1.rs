//! Data-parallel training with the optimizer state sharded over GPUs (ZeRO-1, issue
//! #20): one process per GPU, the NCCL id passed from rank 0 through a file.
//!
//! ```text
//! cargo run --release --features nccl --example zero1                     # one GPU, world size 1
//! # two GPUs (or two ranks on one GPU with NCCL >= 2.30 and NCCL_MULTI_RANK_GPU_ENABLE=1):
//! cargo run --release --features nccl --example zero1 -- --rank 0 --world-size 2 --id-file /tmp/run7.id &
//! cargo run --release --features nccl --example zero1 -- --rank 1 --world-size 2 --id-file /tmp/run7.id
//! ```
//!
//! Each rank fits a linear model `y = W x + b` to its own synthetic batches; the
//! gradients (computed on the host, to keep the example about the optimizer) go into the
//! flat gradient buffer, and `ShardedAdamax::step` averages them over the ranks, steps
//! this rank's shard and gathers the parameters. With one or two ranks, every rank also
//! runs the one-optimizer CPU reference on the averaged gradients (averaging two is
//! exact whatever NCCL's order) and checks the parameters bit for bit after each step.
//! Use a fresh id file per run: the other ranks read whatever file is at the path.
//! `--save PREFIX` saves each rank's shard of the state at the end (`PREFIX.rank{r}`).

use std::{path::PathBuf, time::Duration};

use adamax_cuda::{
    cpu::CpuAdamax,
    cuda::{
        self,
        nccl::{NcclComm, NcclId, ShardedAdamax},
    },
    shard::ShardLayout,
    AdamaxConfig, Optimizer, StepOptions,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

const IN: usize = 512;
const OUT: usize = 256;
const BATCH: usize = 64;
const STEPS: usize = 60;

struct Args {
    rank: usize,
    world_size: usize,
    id_file: PathBuf,
    /// Where each rank saves its shard of the state at the end (`{save}.rank{r}`).
    save: Option<PathBuf>,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        rank: 0,
        world_size: 1,
        id_file: std::env::temp_dir().join(format!("adamax-zero1-{}.id", std::process::id())),
        save: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--rank" => a.rank = value.parse().map_err(|e| format!("--rank: {e}"))?,
            "--world-size" => {
                a.world_size = value.parse().map_err(|e| format!("--world-size: {e}"))?
            }
            "--id-file" => a.id_file = value.into(),
            "--save" => a.save = Some(value.into()),
            _ => {
                return Err(format!(
                    "unknown flag {flag}; use --rank, --world-size, --id-file, --save"
                ))
            }
        }
    }
    if a.world_size > 1 && std::env::args().all(|x| x != "--id-file") {
        return Err("with several ranks, give every rank the same --id-file".into());
    }
    Ok(a)
}

/// Rank 0 writes the id (to a temporary name, then renamed, so no rank reads half of
/// it); the others wait for it.
fn exchange_id(a: &Args) -> Result<NcclId, Box<dyn std::error::Error>> {
    if a.rank == 0 {
        let id = NcclId::new()?;
        let tmp = a.id_file.with_extension("tmp");
        std::fs::write(&tmp, id.as_bytes())?;
        std::fs::rename(&tmp, &a.id_file)?;
        return Ok(id);
    }
    for _ in 0..600 {
        if let Ok(bytes) = std::fs::read(&a.id_file) {
            return Ok(NcclId::from_bytes(&bytes)?);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!(
        "no NCCL id appeared at {} in 60 s: start rank 0 with the same --id-file",
        a.id_file.display()
    )
    .into())
}

/// Rank `rank`'s batch of step `step`: inputs and targets of a fixed linear teacher.
fn batch(rank: usize, step: usize) -> (Vec<f32>, Vec<f32>) {
    let mut rng = StdRng::seed_from_u64(((rank as u64) << 32) | step as u64);
    let x: Vec<f32> = (0..BATCH * IN)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let mut y = vec![0.0f32; BATCH * OUT];
    for b in 0..BATCH {
        for o in 0..OUT {
            let teacher = |i: usize| ((o * 31 + i * 17) % 13) as f32 / 13.0 - 0.5;
            y[b * OUT + o] = (0..IN).map(|i| teacher(i) * x[b * IN + i]).sum::<f32>() + 0.1;
        }
    }
    (x, y)
}

/// Mean squared error of `w`, `bias` on a batch, and its gradients.
fn loss_and_grads(w: &[f32], bias: &[f32], x: &[f32], y: &[f32]) -> (f32, Vec<f32>, Vec<f32>) {
    let (mut gw, mut gb, mut loss) = (vec![0.0f32; OUT * IN], vec![0.0f32; OUT], 0.0f32);
    let scale = 2.0 / (BATCH * OUT) as f32;
    for b in 0..BATCH {
        let xb = &x[b * IN..(b + 1) * IN];
        for o in 0..OUT {
            let pred: f32 = w[o * IN..(o + 1) * IN]
                .iter()
                .zip(xb)
                .map(|(a, b)| a * b)
                .sum::<f32>()
                + bias[o];
            let err = pred - y[b * OUT + o];
            loss += err * err / (BATCH * OUT) as f32;
            gb[o] += scale * err;
            for (g, xi) in gw[o * IN..(o + 1) * IN].iter_mut().zip(xb) {
                *g += scale * err * xi;
            }
        }
    }
    (loss, gw, gb)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = args()?;
    let devices = cuda::device_count()?;
    let stream = cuda::default_stream(a.rank % devices.max(1))?
        .context()
        .new_stream()?;
    let id = exchange_id(&a)?;
    let comm = NcclComm::new(&stream, a.rank, a.world_size, &id)?;
    let lens = [OUT * IN, OUT];
    let layout = ShardLayout::new(&lens, a.world_size)?;
    let config = AdamaxConfig {
        lr: 3e-3,
        ..AdamaxConfig::default()
    };
    let options = StepOptions {
        max_norm: Some(1.0),
        ..StepOptions::default()
    };
    let mut host = vec![0.0f32; layout.total()];
    let mut params = stream.clone_htod(&host)?;
    let mut grads = stream.alloc_zeros::<f32>(layout.total())?;
    let mut opt = ShardedAdamax::new(comm, config, layout.clone(), &params)?;
    opt.set_options(options)?;
    // The one-optimizer reference on the averaged gradients (exact for one or two ranks).
    let checked = a.world_size <= 2;
    let mut reference = [vec![0.0f32; OUT * IN], vec![0.0f32; OUT]];
    let mut cpu = CpuAdamax::new(config, &[&reference[0], &reference[1]])?;
    cpu.set_options(options)?;
    let (ow, ob) = (layout.offsets()[0], layout.offsets()[1]);
    for step in 0..STEPS {
        let (w, b) = (&host[ow..ow + OUT * IN], &host[ob..ob + OUT]);
        let (x, y) = batch(a.rank, step);
        let (loss, gw, gb) = loss_and_grads(w, b, &x, &y);
        let mut flat = vec![0.0f32; layout.total()];
        flat[ow..ow + gw.len()].copy_from_slice(&gw);
        flat[ob..ob + gb.len()].copy_from_slice(&gb);
        stream.memcpy_htod(&flat, &mut grads)?;
        opt.step(&mut params, &mut grads)?;
        host = stream.clone_dtoh(&params)?;
        if checked {
            // Every rank's gradients, as the ranks computed them, averaged as NCCL does
            // for two (each halved, then summed).
            let (mut avg_w, mut avg_b) = (vec![0.0f32; OUT * IN], vec![0.0f32; OUT]);
            let n = a.world_size as f32;
            for r in 0..a.world_size {
                let (x, y) = batch(r, step);
                let (_, gw, gb) = loss_and_grads(&reference[0], &reference[1], &x, &y);
                for (acc, g) in avg_w.iter_mut().zip(&gw).chain(avg_b.iter_mut().zip(&gb)) {
                    *acc += g * (1.0 / n);
                }
            }
            let (rw, rb) = reference.split_at_mut(1);
            cpu.step(&mut [&mut rw[0], &mut rb[0]], &[&avg_w, &avg_b])?;
            let same = host[ow..ow + OUT * IN]
                .iter()
                .zip(&reference[0])
                .chain(host[ob..ob + OUT].iter().zip(&reference[1]))
                .all(|(g, c)| g.to_bits() == c.to_bits());
            if !same {
                return Err(format!(
                    "rank {}: step {step} differs from the one-optimizer reference",
                    a.rank
                )
                .into());
            }
        }
        if step % 10 == 0 || step + 1 == STEPS {
            println!("rank {} step {step:>3}: loss {loss:.5}", a.rank);
        }
    }
    if let Some(prefix) = &a.save {
        // Each rank its own shard; ShardCheckpoint::gather of every rank's file makes
        // the one-GPU checkpoint, ShardCheckpoint::reshard the files of another world.
        let path = PathBuf::from(format!("{}.rank{}", prefix.display(), a.rank));
        opt.checkpoint()?.save(&path)?;
        println!(
            "rank {}: saved its shard of the state to {}",
            a.rank,
            path.display()
        );
    }
    println!(
        "rank {} of {}: {} optimizer-state bytes on this GPU ({} pieces){}",
        a.rank,
        a.world_size,
        opt.state_bytes(),
        opt.pieces().len(),
        if checked {
            "; every step equal to one CPU optimizer, bit for bit"
        } else {
            ""
        }
    );
    Ok(())
}
