//! The README's run command: `cargo run --release --features quickstart --bin quickstart`.
//!
//! On a GPU it steps a few million parameters in f32 and in f16 with f32 master weights,
//! checks them against the CPU reference bit for bit, and prints a rough throughput.
//! Without a GPU it says why and runs the CPU reference alone.

use std::time::Instant;

use adamax_cuda::{cpu::CpuAdamax, cuda, f16, AdamaxConfig, Optimizer, Storage};

/// A deterministic spread of values in [-scale, scale): no RNG dependency needed here.
fn values<T: Storage>(n: usize, seed: u32, scale: f32) -> Vec<T> {
    (0..n)
        .map(|i| {
            let h = (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(40_503));
            T::from_f32(((h >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0) * scale)
        })
        .collect()
}

const LENS: [usize; 3] = [3_000_000, 768, 1_000_003];
const STEPS: u32 = 10;

fn cpu_only(reason: &adamax_cuda::Error) -> Result<(), adamax_cuda::Error> {
    println!("no GPU path: {reason}");
    println!("running the CPU reference instead");
    let mut params: Vec<Vec<f32>> = LENS
        .iter()
        .enumerate()
        .map(|(i, &n)| values(n, i as u32, 1.0))
        .collect();
    let grads: Vec<Vec<f32>> = LENS
        .iter()
        .enumerate()
        .map(|(i, &n)| values(n, 100 + i as u32, 0.01))
        .collect();
    let refs: Vec<&[f32]> = params.iter().map(|p| p.as_slice()).collect();
    let mut opt = CpuAdamax::new(AdamaxConfig::default(), &refs)?;
    let start = Instant::now();
    for _ in 0..STEPS {
        let mut p: Vec<&mut [f32]> = params.iter_mut().map(|p| p.as_mut_slice()).collect();
        let g: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
        opt.step(&mut p, &g)?;
    }
    let total: usize = LENS.iter().sum();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "CPU reference: {STEPS} steps of {total} f32 parameters, {:.1} M elements/s (one thread)",
        total as f64 * f64::from(STEPS) / secs / 1e6
    );
    Ok(())
}

/// Steps the same data on the GPU and with the CPU reference; returns whether every
/// parameter matched bit for bit, and the GPU's elements per second.
fn compare<T: cuda::GpuStorage>(
    stream: &std::sync::Arc<cuda::cudarc::driver::CudaStream>,
) -> Result<(bool, f64), Box<dyn std::error::Error>> {
    let config = AdamaxConfig::default();
    let mut host: Vec<Vec<T>> = LENS
        .iter()
        .enumerate()
        .map(|(i, &n)| values(n, i as u32, 1.0))
        .collect();
    let grads: Vec<Vec<T>> = LENS
        .iter()
        .enumerate()
        .map(|(i, &n)| values(n, 100 + i as u32, 0.01))
        .collect();
    let mut dev = host
        .iter()
        .map(|p| stream.clone_htod(p))
        .collect::<Result<Vec<_>, _>>()?;
    let dev_grads = grads
        .iter()
        .map(|g| stream.clone_htod(g))
        .collect::<Result<Vec<_>, _>>()?;
    let mut gpu = cuda::CudaAdamax::<T>::new(stream, config, &dev)?;
    let refs: Vec<&[T]> = host.iter().map(|p| p.as_slice()).collect();
    let mut cpu = CpuAdamax::<T>::new(config, &refs)?;
    for _ in 0..STEPS {
        gpu.step(&mut dev, &dev_grads)?;
        let mut p: Vec<&mut [T]> = host.iter_mut().map(|p| p.as_mut_slice()).collect();
        let g: Vec<&[T]> = grads.iter().map(|g| g.as_slice()).collect();
        cpu.step(&mut p, &g)?;
    }
    let mut same = true;
    for (d, h) in dev.iter().zip(&host) {
        let got = stream.clone_dtoh(d)?;
        same &= got
            .iter()
            .zip(h)
            .all(|(a, b)| a.to_f32().to_bits() == b.to_f32().to_bits());
    }
    same &= gpu.state()? == cpu.state()?;
    // Rough: wall-clock around 100 synchronised steps. Real figures: `cargo bench`.
    stream.synchronize()?;
    let start = Instant::now();
    for _ in 0..100 {
        gpu.step(&mut dev, &dev_grads)?;
    }
    stream.synchronize()?;
    let total: usize = LENS.iter().sum();
    Ok((same, total as f64 * 100.0 / start.elapsed().as_secs_f64()))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let stream = match cuda::default_stream(0) {
        Ok(s) => s,
        Err(e) => return Ok(cpu_only(&e)?),
    };
    let ctx = stream.context();
    println!(
        "GPU: {} (compute capability {:?})",
        ctx.name()?,
        ctx.compute_capability()?
    );
    println!("NVRTC {:?}", cuda::nvrtc_version()?);
    let total: usize = LENS.iter().sum();
    let mut ok = true;
    for (name, result) in [
        ("f32", compare::<f32>(&stream)?),
        ("f16 + f32 master", compare::<f16>(&stream)?),
    ] {
        let (same, rate) = result;
        ok &= same;
        println!(
            "{name:>16}: {STEPS} steps of {total} parameters {} the CPU reference; ~{:.2} G elements/s (rough, wall clock)",
            if same { "match bit for bit" } else { "DIFFER from" },
            rate / 1e9
        );
    }
    if !ok {
        return Err("GPU and CPU reference differ".into());
    }
    Ok(())
}
