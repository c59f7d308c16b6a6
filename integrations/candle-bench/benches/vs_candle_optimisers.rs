//! One optimizer step of the same model (GPT-2 small's 148 tensors on a GPU; a narrower
//! model of the same structure on the CPU), in f32 and bf16:
//!
//! - `adamax_cuda_candle`: this repository's adapter, every `Var` in one fused launch
//!   (bf16: with f32 master weights, the default, and with stochastic rounding and no
//!   master, `bf16_sr`);
//! - `candle_optimisers`: candle-optimisers 0.10's `Adamax` (on candle 0.10), a dozen
//!   tensor operations per `Var`, its state in the parameter's type, default settings
//!   but the learning rate (its default is 1.0; both use 2e-3 here);
//! - `d2d_copy_same_bytes`: on a GPU, a device-to-device copy moving the bytes the
//!   adapter's step moves (f32: 28 per parameter; bf16 with master: 28; bf16_sr: 22),
//!   the ceiling of a memory-bound step.
//!
//! Timing: criterion's `iter_custom`, each device synchronised after the steps. Every
//! throughput is the adapter's bytes per step, so the ratios between rows are ratios of
//! step times. Run it with `cargo bench` (CPU) or, built with `--features cuda`, on a
//! GPU machine.

use std::time::{Duration, Instant};

use adamax_cuda_candle::{Adamax, AdamaxConfig, ParamMode, ParamsAdamax, Precision};
use adamax_cuda_candle_bench::model_shapes;
use candle_nn::Optimizer as _;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const LR: f64 = 2e-3;

mod new {
    //! The model on candle 0.11, for the adapter.
    pub use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
}

mod old {
    //! The model on candle 0.10, for candle-optimisers.
    pub use candle_core_010::{backprop::GradStore, DType, Device, Tensor, Var};
}

fn new_device() -> new::Device {
    new::Device::new_cuda(0).unwrap_or(new::Device::Cpu)
}

fn old_device() -> old::Device {
    old::Device::new_cuda(0).unwrap_or(old::Device::Cpu)
}

/// `fn $name(shapes, dtype, device)`: random Vars of `shapes` on the candle of
/// module `$candle`, and their gradients: those of `sum(var * c)` for random tensors
/// `c` (a backward pass makes the `GradStore`: candle 0.10 has no public constructor
/// for one). Written once for both candles, whose types differ.
macro_rules! model_fn {
    ($name:ident, $candle:ident, $result:ty) => {
        fn $name(
            shapes: &[Vec<usize>],
            dtype: $candle::DType,
            device: &$candle::Device,
        ) -> $result {
            let mut vars = Vec::new();
            let mut loss = $candle::Tensor::zeros((), dtype, device)?;
            for s in shapes {
                let v = $candle::Var::from_tensor(
                    &$candle::Tensor::randn(0f32, 0.02, s.as_slice(), device)?.to_dtype(dtype)?,
                )?;
                let c =
                    $candle::Tensor::randn(0f32, 1e-3, s.as_slice(), device)?.to_dtype(dtype)?;
                loss = (loss + (v.as_tensor() * c)?.sum_all()?)?;
                vars.push(v);
            }
            Ok((vars, loss.backward()?))
        }
    };
}

model_fn!(
    new_model,
    new,
    candle_core::Result<(Vec<new::Var>, new::GradStore)>
);
model_fn!(
    old_model,
    old,
    candle_core_010::Result<(Vec<old::Var>, old::GradStore)>
);

/// `iters` calls of `step`, then the device synchronised: the elapsed time.
fn timed(iters: u64, mut step: impl FnMut(), sync: impl Fn()) -> Duration {
    sync();
    let start = Instant::now();
    for _ in 0..iters {
        step();
    }
    sync();
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let (dev, old_dev) = (new_device(), old_device());
    let gpu = dev.is_cuda();
    let shapes = model_shapes(gpu);
    let n: u64 = shapes
        .iter()
        .map(|s| s.iter().product::<usize>() as u64)
        .sum();
    let mut group = c.benchmark_group(if gpu {
        "gpt2_small_step_gpu"
    } else {
        "gpt2_narrow_step_cpu"
    });
    group.sample_size(10);
    let sync_new = || dev.synchronize().expect("synchronise");
    let sync_old = || old_dev.synchronize().expect("synchronise");
    for (name, dtype, old_dtype, params, bytes) in [
        (
            "f32",
            new::DType::F32,
            old::DType::F32,
            ParamMode::Master,
            28u64,
        ),
        (
            "bf16",
            new::DType::BF16,
            old::DType::BF16,
            ParamMode::Master,
            28,
        ),
        (
            "bf16_sr",
            new::DType::BF16,
            old::DType::BF16,
            ParamMode::Stochastic,
            22,
        ),
    ] {
        group.throughput(Throughput::Bytes(n * bytes));
        let (vars, grads) = new_model(&shapes, dtype, &dev).expect("model");
        let config = AdamaxConfig {
            lr: LR,
            precision: Precision {
                params,
                ..Precision::default()
            },
            ..AdamaxConfig::default()
        };
        let mut opt = Adamax::new(vars, ParamsAdamax::from(config)).expect("optimizer");
        group.bench_function(BenchmarkId::new("adamax_cuda_candle", name), |b| {
            b.iter_custom(|iters| timed(iters, || opt.step(&grads).expect("step"), sync_new))
        });
        drop(opt);
        if params == ParamMode::Master {
            let (vars, grads) = old_model(&shapes, old_dtype, &old_dev).expect("model");
            let mut opt = <candle_optimisers::adamax::Adamax as candle_nn_010::Optimizer>::new(
                vars,
                candle_optimisers::adamax::ParamsAdaMax {
                    lr: LR,
                    ..Default::default()
                },
            )
            .expect("optimizer");
            group.bench_function(BenchmarkId::new("candle_optimisers", name), |b| {
                b.iter_custom(|iters| {
                    timed(
                        iters,
                        || candle_nn_010::Optimizer::step(&mut opt, &grads).expect("step"),
                        sync_old,
                    )
                })
            });
        }
        #[cfg(feature = "cuda")]
        if gpu {
            // A copy moving the same bytes: reads and writes half of them each.
            let stream = dev.as_cuda_device().expect("cuda").cuda_stream();
            let half = (n * bytes / 2) as usize;
            let src = stream.alloc_zeros::<u8>(half).expect("alloc");
            let mut dst = stream.alloc_zeros::<u8>(half).expect("alloc");
            group.bench_function(BenchmarkId::new("d2d_copy_same_bytes", name), |b| {
                b.iter_custom(|iters| {
                    timed(
                        iters,
                        || stream.memcpy_dtod(&src, &mut dst).expect("copy"),
                        sync_new,
                    )
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
