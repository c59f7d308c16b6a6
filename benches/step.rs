//! Step throughput: f32, and f16/bf16 with f32 master weights, as one flat tensor and
//! as GPT-2 small's 148 parameter tensors, beside a device-to-device copy of the same
//! bytes (the ceiling of a memory-bound step); every storage mode (stochastic rounding,
//! 8-bit state) beside a copy of the bytes it moves; plus NVRTC compile and
//! construction cost and the CPU reference.
//!
//! Bytes moved per element, the figure behind every GB/s: f32 reads param, grad, m, u
//! and writes param, m, u: 7 x 4 = 28 bytes. f16/bf16 with master weights read grad (2),
//! master, m, u (12) and write the 16-bit param (2), master, m, u (12): also 28 bytes.
//! The copy moves the same 28 bytes per element (reads and writes 14).
//!
//! Timing: criterion's `iter_custom`, the stream synchronised before and after, after
//! warm-up; for sizes whose working set fits the 50 MB L2, several independent sets are
//! rotated so that every step streams from DRAM. Without a GPU the GPU groups print
//! that they were skipped, and the CPU reference group runs.

mod common;

use std::sync::Arc;

use adamax_cuda::{
    bf16,
    cpu::CpuAdamax,
    cuda::{self, cudarc::driver::CudaStream, CudaAdamax, GpuStorage},
    f16, AdamaxConfig, Optimizer,
};
use common::{
    copy_buffers, copy_buffers_of, sets_needed, shapes, timed, values, Set, BYTES_PER_ELEMENT,
};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn bench_storage<T: GpuStorage>(c: &mut Criterion, stream: &Arc<CudaStream>) {
    let mut group = c.benchmark_group(format!("step_{}", T::NAME));
    group.sample_size(20);
    for (name, lens) in shapes() {
        let n: u64 = lens.iter().map(|&x| x as u64).sum();
        let mut sets: Vec<Set<T>> = (0..sets_needed(n))
            .map(|i| Set::new(stream, &lens, i as u32 * 7))
            .collect();
        group.throughput(Throughput::Bytes(n * BYTES_PER_ELEMENT));
        group.bench_function(BenchmarkId::new("adamax", &name), |b| {
            b.iter_custom(|iters| {
                timed(stream, iters, |i| {
                    let k = i % sets.len();
                    sets[k].step();
                })
            })
        });
        drop(sets);
        // The ceiling: a device-to-device copy moving the same bytes.
        let (src, mut dst) = copy_buffers(stream, n);
        let k = src.len();
        group.bench_function(BenchmarkId::new("d2d_copy_same_bytes", &name), |b| {
            b.iter_custom(|iters| {
                timed(stream, iters, |i| {
                    let j = i % k;
                    stream.memcpy_dtod(&src[j], &mut dst[j]).expect("copy");
                })
            })
        });
    }
    group.finish();
}

/// The cost of each fused feature against the plain step, at 2^24 f32 elements (DRAM
/// resident). The reduction pass reads every gradient once more: 4 more bytes per f32
/// element (32 in all); the finalize pass is one block. Per-tensor hyperparameters cost
/// nothing per element (one f64 division per chunk), so they share the plain figure.
fn bench_features(c: &mut Criterion, stream: &Arc<CudaStream>) {
    use adamax_cuda::{LossScaler, StepOptions};
    let n: u64 = 1 << 24;
    let lens = [n as usize];
    let mut group = c.benchmark_group("features_f32_2^24");
    group.sample_size(20);
    let cases: [(&str, StepOptions, Option<LossScaler>, u64); 3] = [
        ("plain", StepOptions::default(), None, BYTES_PER_ELEMENT),
        (
            "clip_grad_norm",
            StepOptions {
                max_norm: Some(1.0),
                ..Default::default()
            },
            None,
            BYTES_PER_ELEMENT + 4,
        ),
        (
            "loss_scaler_and_clip",
            StepOptions {
                max_norm: Some(1.0),
                ..Default::default()
            },
            Some(LossScaler::default()),
            BYTES_PER_ELEMENT + 4,
        ),
    ];
    for (name, options, scaler, bytes) in cases {
        let mut sets: Vec<Set<f32>> = (0..sets_needed(n))
            .map(|i| Set::new(stream, &lens, i as u32))
            .collect();
        for s in &mut sets {
            s.opt.set_options(options).expect("options");
            s.opt.set_loss_scaler(scaler).expect("scaler");
        }
        group.throughput(Throughput::Bytes(n * bytes));
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                timed(stream, iters, |i| {
                    let k = i % sets.len();
                    sets[k].step();
                })
            })
        });
    }
    let (src, mut dst) = copy_buffers(stream, n);
    group.throughput(Throughput::Bytes(n * BYTES_PER_ELEMENT));
    group.bench_function("d2d_copy_28_bytes_per_element", |b| {
        b.iter_custom(|iters| {
            timed(stream, iters, |i| {
                let j = i % src.len();
                stream.memcpy_dtod(&src[j], &mut dst[j]).expect("copy");
            })
        })
    });
    group.finish();
}

/// The storage modes at 2^26 elements (DRAM resident), each beside a device-to-device
/// copy of the bytes it moves per element (the 8-bit modes also move two f32 scales,
/// read and written, per 256 elements: 1/16 byte more), and the device memory each
/// optimizer allocates, read from the driver before and after construction (printed
/// as bytes of state per parameter).
fn bench_modes(c: &mut Criterion, stream: &Arc<CudaStream>) {
    use adamax_cuda::{ParamMode as P, StateFormat as S};
    let mut group = c.benchmark_group("modes_2^26");
    group.sample_size(20);
    bench_mode::<f32>(&mut group, stream, "f32", P::Master, S::F32);
    bench_mode::<f32>(&mut group, stream, "f32_q8", P::Master, S::Blockwise8);
    bench_mode::<bf16>(&mut group, stream, "bf16_master", P::Master, S::F32);
    bench_mode::<bf16>(&mut group, stream, "bf16_sr", P::Stochastic, S::F32);
    bench_mode::<bf16>(
        &mut group,
        stream,
        "bf16_master_q8",
        P::Master,
        S::Blockwise8,
    );
    bench_mode::<bf16>(
        &mut group,
        stream,
        "bf16_sr_q8",
        P::Stochastic,
        S::Blockwise8,
    );
    group.finish();
}

/// One storage mode of [`bench_modes`]: two optimizers of 2^26 elements (rotated), the
/// device memory they allocate, the step, and the copy of the same bytes.
fn bench_mode<T: GpuStorage>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    stream: &Arc<CudaStream>,
    name: &str,
    params: adamax_cuda::ParamMode,
    state: adamax_cuda::StateFormat,
) {
    let n: u64 = 1 << 26;
    let config = AdamaxConfig {
        precision: adamax_cuda::Precision {
            params,
            state,
            seed: 1,
            min_8bit_len: 0,
        },
        ..AdamaxConfig::default()
    };
    let free = || stream.context().mem_get_info().map_or(0, |(f, _)| f as i64);
    let before = free();
    let mut sets: Vec<Set<T>> = (0..2)
        .map(|i| Set::with_config(stream, &[n as usize], i, config))
        .collect();
    // Less the parameters and gradients the sets hold themselves.
    let param_and_grad = 2.0 * std::mem::size_of::<T>() as f64;
    let state_bytes = (before - free()) as f64 / 2.0 / n as f64 - param_and_grad;
    eprintln!("modes_2^26/{name}: {state_bytes:.3} bytes of device state per parameter");
    // The bytes the step moves, from the crate's modes table.
    let bytes = config
        .precision
        .bytes_moved(T::TYPE, n as usize)
        .expect("a mode the storage type has");
    group.throughput(Throughput::Bytes(bytes));
    group.bench_function(BenchmarkId::new("adamax", name), |b| {
        b.iter_custom(|iters| timed(stream, iters, |i| sets[i % 2].step()))
    });
    drop(sets);
    let (src, mut dst) = copy_buffers_of(stream, n, bytes);
    group.bench_function(BenchmarkId::new("d2d_copy_same_bytes", name), |b| {
        b.iter_custom(|iters| {
            timed(stream, iters, |i| {
                let j = i % src.len();
                stream.memcpy_dtod(&src[j], &mut dst[j]).expect("copy");
            })
        })
    });
}

/// Latency of small steps, back to back (criterion's `iter_custom` with the stream
/// synchronised around the iterations, so the figure is the larger of the host's
/// enqueue time and the GPU's time per step), beside one device-to-device memcpy launch
/// of 16 KiB: one tensor of 4,096 elements, and 148 and 1,000 tensors of 1,024
/// elements, per-tensor (`step`) with cudarc's event tracking on (a context with more
/// than one stream, the normal case in a training stack) and off, flat (`step_flat`),
/// and a CUDA graph replay of one step.
fn bench_latency(c: &mut Criterion, stream: &Arc<CudaStream>) {
    use adamax_cuda::cuda::{
        cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode},
        FlatLayout,
    };
    let ctx = stream.context().clone();
    // A second stream puts the context in multi-stream mode: buffers allocated with
    // tracking on then record events on every use.
    let side = ctx.new_stream().expect("stream");
    let mut group = c.benchmark_group("latency");
    group.sample_size(30);
    let src = stream.alloc_zeros::<f32>(4096).expect("alloc");
    let mut dst = stream.alloc_zeros::<f32>(4096).expect("alloc");
    group.bench_function("d2d_memcpy_launch_16KiB", |b| {
        b.iter_custom(|iters| {
            timed(stream, iters, |_| {
                stream.memcpy_dtod(&src, &mut dst).expect("copy");
            })
        })
    });
    for (count, len) in [(1usize, 4096usize), (148, 1024), (1000, 1024)] {
        let lens = vec![len; count];
        let name = format!("{count}x{len}");
        for tracking in [true, false] {
            if !tracking {
                // SAFETY: the buffers below are used on `stream` only.
                unsafe { ctx.disable_event_tracking() };
            }
            let mut set = Set::<f32>::new(stream, &lens, 3);
            let label = if tracking {
                "tracking_on"
            } else {
                "tracking_off"
            };
            group.bench_function(BenchmarkId::new(format!("eager_{label}"), &name), |b| {
                b.iter_custom(|iters| timed(stream, iters, |_| set.step()))
            });
            // SAFETY: restores cudarc's default for what follows.
            unsafe { ctx.enable_event_tracking() };
        }
        let layout = FlatLayout::aligned(&lens).expect("layout");
        let mut params = stream
            .clone_htod(&values::<f32>(layout.total(), 1, 1.0))
            .expect("upload");
        let grads = stream
            .clone_htod(&values::<f32>(layout.total(), 2, 0.01))
            .expect("upload");
        let mut flat = CudaAdamax::new_flat(stream, AdamaxConfig::default(), &params, layout)
            .expect("optimizer");
        group.bench_function(BenchmarkId::new("flat_tracking_on", &name), |b| {
            b.iter_custom(|iters| {
                timed(stream, iters, |_| {
                    flat.step_flat(&mut params, &grads).expect("step")
                })
            })
        });
        // Graphs capture a non-default stream, without cudarc's cross-stream events.
        // SAFETY: the buffers below are used on `side` only.
        unsafe { ctx.disable_event_tracking() };
        let mut set = Set::<f32>::new(&side, &lens, 5);
        set.step(); // uploads the tensor table before the capture
        side.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .expect("capture");
        set.step();
        let graph = side
            .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH)
            .expect("capture")
            .expect("a graph");
        group.bench_function(BenchmarkId::new("graph_replay", &name), |b| {
            b.iter_custom(|iters| timed(&side, iters, |_| graph.launch().expect("replay")))
        });
        // SAFETY: restores cudarc's default.
        unsafe { ctx.enable_event_tracking() };
    }
    group.finish();
}

fn gpu(c: &mut Criterion) {
    let stream = match cuda::default_stream(0) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("GPU benches skipped: {e}");
            return;
        }
    };
    eprintln!("GPU: {}", stream.context().name().unwrap_or_default());
    bench_storage::<f32>(c, &stream);
    bench_storage::<f16>(c, &stream);
    bench_storage::<bf16>(c, &stream);
    bench_features(c, &stream);
    bench_modes(c, &stream);
    bench_latency(c, &stream);
    // Construction once the kernels are compiled and cached in the process.
    let p = stream
        .clone_htod(&values::<f32>(1 << 20, 1, 1.0))
        .expect("upload");
    c.bench_function("construct_cudaadamax_cached_kernels_2^20", |b| {
        b.iter(|| {
            CudaAdamax::<f32>::new(&stream, AdamaxConfig::default(), std::slice::from_ref(&p))
                .expect("new")
        })
    });
}

fn nvrtc(c: &mut Criterion) {
    let arch = cuda::Arch { major: 9, minor: 0 };
    if let Err(e) = cuda::nvrtc_version() {
        eprintln!("NVRTC bench skipped: {e}");
        return;
    }
    let mut group = c.benchmark_group("nvrtc");
    group.sample_size(10);
    // What construction costs with the on-disk cache warm (read + validate), beside the
    // compile it saves.
    let dir = std::env::temp_dir().join(format!("adamax-bench-cache-{}", std::process::id()));
    cuda::cache::compile_cached_in(Some(&dir), arch).expect("warm the cache");
    group.bench_function("disk_cache_hit_sm_90", |b| {
        b.iter(|| cuda::cache::compile_cached_in(Some(&dir), arch).expect("cache"))
    });
    let _ = std::fs::remove_dir_all(&dir);
    group.bench_function("compile_all_entry_points_sm_90", |b| {
        b.iter(|| cuda::compile(arch).expect("compile"))
    });
    group.finish();
}

fn cpu_reference(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu_reference_f32");
    for k in [16u32, 20] {
        let n = 1usize << k;
        let mut p = values::<f32>(n, 1, 1.0);
        let g = values::<f32>(n, 2, 0.01);
        let mut opt = CpuAdamax::new(AdamaxConfig::default(), &[&p]).expect("cpu");
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(format!("2^{k}"), |b| {
            b.iter(|| opt.step(&mut [&mut p], &[&g]).expect("step"))
        });
    }
    group.finish();
}

criterion_group!(benches, gpu, nvrtc, cpu_reference);
criterion_main!(benches);
