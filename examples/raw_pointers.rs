//! Calling the step from another CUDA stack: `cargo run --release --example raw_pointers`.
//!
//! Stacks built on another cudarc version, candle, burn or tch hold raw device
//! addresses and a raw `CUstream` in the device's primary context. This example plays
//! such a stack: it allocates and creates its stream with the raw driver API only (no
//! `CudaSlice`), then hands the addresses to [`CudaAdamax::new_raw`] and
//! [`CudaAdamax::step_raw`] on a stream wrapped by [`cuda::borrow_stream`], and checks
//! the result against the CPU reference. Without a GPU it says why and exits.
//!
//! With candle, for instance, the addresses come from its `CudaStorage` slices
//! (`device_ptr`) and the stream from its `CudaDevice`; with tch, from
//! `Tensor::data_ptr()` and the current CUDA stream. The safety contract is the same.

use adamax_cuda::{
    cpu::CpuAdamax,
    cuda::{self, cudarc::driver::result, CudaAdamax, RawParam, RawTensor},
    AdamaxConfig, Optimizer,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The "other stack" needs the primary context current: borrow_stream would bind it,
    // but the other stack allocates first. default_stream(0) makes it current here.
    let stream = match cuda::default_stream(0) {
        Ok(s) => s,
        Err(e) => {
            println!("raw_pointers needs a GPU: {e}");
            return Ok(());
        }
    };
    stream.context().bind_to_thread()?;
    let lens = [1000usize, 3, 4097];
    let params: Vec<Vec<f32>> = lens
        .iter()
        .map(|&n| (0..n).map(|i| (i as f32 * 0.01).sin()).collect())
        .collect();
    let grads: Vec<Vec<f32>> = lens
        .iter()
        .map(|&n| (0..n).map(|i| (i as f32 * 0.07).cos() * 0.1).collect())
        .collect();

    // --- the other stack: raw allocations, raw copies, its own stream ---
    // SAFETY: the primary context is current; sizes match the host data copied in.
    let (raw_params, raw_grads, raw_stream) = unsafe {
        let mut p = Vec::new();
        let mut g = Vec::new();
        for (hp, hg) in params.iter().zip(&grads) {
            let dp = result::malloc_sync(4 * hp.len())?;
            let dg = result::malloc_sync(4 * hg.len())?;
            result::memcpy_htod_sync(dp, hp)?;
            result::memcpy_htod_sync(dg, hg)?;
            p.push(dp);
            g.push(dg);
        }
        (
            p,
            g,
            result::stream::create(result::stream::StreamKind::NonBlocking)?,
        )
    };

    // --- this crate, on the other stack's stream ---
    // SAFETY: `raw_stream` is live until destroyed below, after the last use.
    let borrowed = unsafe { cuda::borrow_stream(0, raw_stream)? };
    let raw: Vec<RawParam> = raw_params
        .iter()
        .zip(&lens)
        .map(|(&ptr, &len)| RawParam { ptr, len })
        .collect();
    let config = AdamaxConfig::default();
    // SAFETY: each address holds `len` f32s in this context, written synchronously above.
    let mut opt = unsafe { CudaAdamax::<f32>::new_raw(&borrowed, config, &raw)? };
    let tensors: Vec<RawTensor> = raw_params
        .iter()
        .zip(&raw_grads)
        .map(|(&param, &grad)| RawTensor { param, grad })
        .collect();
    for _ in 0..5 {
        // SAFETY: as above; parameters and gradients are distinct allocations.
        unsafe { opt.step_raw(&tensors)? };
    }

    // --- compare with the CPU reference ---
    let mut host = params.clone();
    let refs: Vec<&[f32]> = host.iter().map(|p| p.as_slice()).collect();
    let mut cpu = CpuAdamax::new(config, &refs)?;
    for _ in 0..5 {
        let mut p: Vec<&mut [f32]> = host.iter_mut().map(|p| p.as_mut_slice()).collect();
        let g: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
        cpu.step(&mut p, &g)?;
    }
    // SAFETY: the stream is live; the buffers hold `len` f32s each.
    let same = unsafe {
        result::stream::synchronize(raw_stream)?;
        let mut ok = true;
        for (&dp, h) in raw_params.iter().zip(&host) {
            let mut got = vec![0f32; h.len()];
            result::memcpy_dtoh_sync(&mut got, dp)?;
            ok &= got.iter().zip(h).all(|(a, b)| a.to_bits() == b.to_bits());
        }
        ok
    };
    drop(opt);
    drop(borrowed);
    // SAFETY: nothing uses these any more (the optimizer and the wrapper are dropped).
    unsafe {
        for p in raw_params.into_iter().chain(raw_grads) {
            result::free_sync(p)?;
        }
        result::stream::destroy(raw_stream)?;
    }
    println!(
        "5 raw-pointer steps on a borrowed stream {} the CPU reference",
        if same {
            "match bit for bit"
        } else {
            "DIFFER from"
        }
    );
    if !same {
        return Err("mismatch".into());
    }
    Ok(())
}
