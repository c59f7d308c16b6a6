//! Step throughput as JSON lines, for scripts/torch_side_by_side.py to print beside
//! PyTorch's optimizers: `cargo run --release --example throughput`.
//!
//! Same shapes, byte counts (28 per element in the default modes; 22, 16.06 and 10.06 in
//! the storage modes that move fewer bytes) and L2-defeating rotation as the criterion
//! bench (benches/step.rs); timed with CUDA events around 50 steps after 10 of warm-up,
//! median of 5, beside a device-to-device copy of the same bytes in the same run.
//!
//! `throughput MODE [SHAPE]` times one mode (`f32`, `bf16_sr_q8`, ...), and one shape
//! (`flat_2^24`, ...) of it: a short run to profile one kernel under Nsight Compute
//! (`scripts/gpu_quick.sh`).

#[path = "../benches/common/mod.rs"]
mod common;

use std::sync::Arc;

use adamax_cuda::{
    bf16,
    cuda::{
        self,
        cudarc::driver::{sys::CUevent_flags, CudaStream},
        GpuStorage,
    },
    f16, AdamaxConfig, Error, ParamMode, Precision, StateFormat,
};
use common::{copy_buffers_of, sets_needed, shapes, Set};

const WARMUP: usize = 10;
const ITERS: usize = 50;
const REPEATS: usize = 5;

/// Median over REPEATS of the milliseconds per call of `f(i)`, timed with CUDA events.
fn time_ms(stream: &Arc<CudaStream>, mut f: impl FnMut(usize)) -> Result<f64, Error> {
    let drv = |e| Error::Driver {
        context: "timing with CUDA events",
        source: e,
    };
    for i in 0..WARMUP {
        f(i);
    }
    // cudarc's default event flags disable timing (elapsed_ms then fails with
    // CUDA_ERROR_INVALID_HANDLE): ask for timing events.
    let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let mut samples = Vec::new();
    for _ in 0..REPEATS {
        let start = stream.record_event(timing).map_err(drv)?;
        for i in 0..ITERS {
            f(i);
        }
        let end = stream.record_event(timing).map_err(drv)?;
        end.synchronize().map_err(drv)?;
        samples.push(f64::from(start.elapsed_ms(&end).map_err(drv)?) / ITERS as f64);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[REPEATS / 2])
}

/// Every shape in one storage mode, labelled `label`, with 8-bit state for tensors of
/// `min_8bit_len` elements or more (with a threshold, only the lists of tensors: a flat
/// tensor is all 8-bit). The bytes moved are the modes table's
/// (`Precision::bytes_moved`), tensor by tensor.
fn run<T: GpuStorage>(
    stream: &Arc<CudaStream>,
    only: Only,
    label: &str,
    params: ParamMode,
    state: StateFormat,
    min_8bit_len: usize,
) -> Result<(), Error> {
    let config = AdamaxConfig {
        precision: Precision {
            params,
            state,
            seed: 1,
            min_8bit_len,
        },
        ..AdamaxConfig::default()
    };
    if only.mode.is_some_and(|m| m != label) {
        return Ok(());
    }
    for (name, lens) in shapes() {
        if only.shape.is_some_and(|s| s != name) || (min_8bit_len > 0 && lens.len() == 1) {
            continue;
        }
        let n: u64 = lens.iter().map(|&x| x as u64).sum();
        let mut bytes = 0u64;
        for &len in &lens {
            bytes += config.precision.bytes_moved(T::TYPE, len)?;
        }
        let mut sets: Vec<Set<T>> = (0..sets_needed(n))
            .map(|i| Set::with_config(stream, &lens, i as u32, config))
            .collect();
        let k = sets.len();
        let step_ms = time_ms(stream, |i| sets[i % k].step())?;
        drop(sets);
        let (src, mut dst) = copy_buffers_of(stream, n, bytes);
        let copy_ms = time_ms(stream, |i| {
            stream
                .memcpy_dtod(&src[i % k], &mut dst[i % k])
                .expect("copy");
        })?;
        let bytes = bytes as f64;
        println!(
            "{{\"impl\":\"adamax-cuda\",\"storage\":\"{label}\",\"shape\":\"{name}\",\"tensors\":{},\"elements\":{n},\"bytes_per_element\":{:.4},\"ms\":{step_ms:.5},\"gbps\":{:.1},\"copy_ms\":{copy_ms:.5},\"copy_gbps\":{:.1},\"ratio_to_copy\":{:.3}}}",
            lens.len(),
            bytes / n as f64,
            bytes / step_ms / 1e6,
            bytes / copy_ms / 1e6,
            copy_ms / step_ms
        );
    }
    Ok(())
}

fn main() -> Result<(), Error> {
    let stream = match cuda::default_stream(0) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("throughput needs a GPU: {e}");
            return Ok(());
        }
    };
    eprintln!("GPU: {}", stream.context().name().unwrap_or_default());
    let mut args = std::env::args().skip(1);
    let (mode, shape) = (args.next(), args.next());
    let only = Only {
        mode: mode.as_deref(),
        shape: shape.as_deref(),
    };
    use {ParamMode::*, StateFormat::*};
    run::<f32>(&stream, only, "f32", Master, F32, 0)?;
    run::<f16>(&stream, only, "f16", Master, F32, 0)?;
    run::<bf16>(&stream, only, "bf16", Master, F32, 0)?;
    run::<bf16>(&stream, only, "bf16_sr", Stochastic, F32, 0)?;
    run::<f32>(&stream, only, "f32_q8", Master, Blockwise8, 0)?;
    run::<bf16>(&stream, only, "bf16_q8", Master, Blockwise8, 0)?;
    run::<bf16>(&stream, only, "bf16_sr_q8", Stochastic, Blockwise8, 0)?;
    // The default threshold: small tensors in f32 state in the same launch.
    let default = adamax_cuda::DEFAULT_MIN_8BIT_LEN;
    run::<f32>(&stream, only, "f32_q8_default", Master, Blockwise8, default)?;
    run::<bf16>(
        &stream,
        only,
        "bf16_sr_q8_default",
        Stochastic,
        Blockwise8,
        default,
    )
}

/// The mode and shape asked for on the command line (all when absent).
#[derive(Clone, Copy)]
struct Only<'a> {
    mode: Option<&'a str>,
    shape: Option<&'a str>,
}
