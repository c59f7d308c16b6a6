//! Shared by benches/step.rs and examples/throughput.rs: the shapes, the data and the
//! rotation of independent sets that keeps every timed step streaming from DRAM.
#![allow(dead_code)]

use std::sync::Arc;

use adamax_cuda::{
    cuda::{
        cudarc::driver::{CudaSlice, CudaStream},
        CudaAdamax, GpuStorage,
    },
    AdamaxConfig, Storage,
};

/// Bytes one element's step moves: f32 reads param, grad, m, u and writes param, m, u
/// (7 x 4); 16-bit with master reads grad (2), master, m, u (12) and writes the 16-bit
/// param (2), master, m, u (12). 28 either way.
pub const BYTES_PER_ELEMENT: u64 = 28;
/// Working set the rotation must exceed: over twice the H100's 50 MB L2.
pub const ROTATE_BYTES: u64 = 128 << 20;

/// GPT-2 small (124,439,808 parameters) as its 148 tensors, in Hugging Face order.
pub fn gpt2_small() -> Vec<usize> {
    let (d, vocab, ctx) = (768, 50257, 1024);
    let mut t = vec![vocab * d, ctx * d];
    for _ in 0..12 {
        t.extend([
            d,
            d,
            d * 3 * d,
            3 * d,
            d * d,
            d,
            d,
            d,
            d * 4 * d,
            4 * d,
            4 * d * d,
            d,
        ]);
    }
    t.extend([d, d]);
    t
}

/// The shapes every throughput figure is taken on: flat 2^16..2^28, GPT-2 small's
/// list, and one flat tensor of GPT-2 small's total size.
pub fn shapes() -> Vec<(String, Vec<usize>)> {
    let mut shapes: Vec<(String, Vec<usize>)> = [16u32, 20, 24, 28]
        .iter()
        .map(|&k| (format!("flat_2^{k}"), vec![1usize << k]))
        .collect();
    let gpt2 = gpt2_small();
    let total: usize = gpt2.iter().sum();
    shapes.push(("gpt2_small_148_tensors".into(), gpt2));
    shapes.push((format!("flat_{total}"), vec![total]));
    shapes
}

/// Deterministic values in [-scale, scale).
pub fn values<T: Storage>(n: usize, seed: u32, scale: f32) -> Vec<T> {
    (0..n)
        .map(|i| {
            let h = (i as u32).wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(0x9e37_79b9);
            T::from_f32(((h >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0) * scale)
        })
        .collect()
}

/// One independent optimizer with its parameters and gradients.
pub struct Set<T: GpuStorage> {
    pub opt: CudaAdamax<T>,
    pub params: Vec<CudaSlice<T>>,
    pub grads: Vec<CudaSlice<T>>,
}

impl<T: GpuStorage> Set<T> {
    pub fn new(stream: &Arc<CudaStream>, lens: &[usize], seed: u32) -> Self {
        Self::with_config(stream, lens, seed, AdamaxConfig::default())
    }

    pub fn with_config(
        stream: &Arc<CudaStream>,
        lens: &[usize],
        seed: u32,
        config: AdamaxConfig,
    ) -> Self {
        let upload = |seed, scale| -> Vec<CudaSlice<T>> {
            lens.iter()
                .map(|&n| {
                    stream
                        .clone_htod(&values::<T>(n, seed, scale))
                        .expect("upload")
                })
                .collect()
        };
        let (params, grads) = (upload(seed, 1.0), upload(seed + 1, 0.01));
        let opt = CudaAdamax::new(stream, config, &params).expect("optimizer");
        Self { opt, params, grads }
    }

    pub fn step(&mut self) {
        self.opt.step(&mut self.params, &self.grads).expect("step");
    }
}

/// Independent sets to rotate so that `elements` per step never sit in L2.
pub fn sets_needed(elements: u64) -> usize {
    (ROTATE_BYTES / (elements * BYTES_PER_ELEMENT).max(1) + 1).min(64) as usize
}

/// Source and destination buffers for a device-to-device copy that moves the same bytes
/// as a step over `elements` (reads 14 and writes 14 per element), rotated likewise.
pub fn copy_buffers(
    stream: &Arc<CudaStream>,
    elements: u64,
) -> (Vec<CudaSlice<f32>>, Vec<CudaSlice<f32>>) {
    copy_buffers_of(stream, elements, elements * BYTES_PER_ELEMENT)
}

/// Copy buffers that move `bytes` in all (half read, half written), rotated as a step
/// over `elements` is.
pub fn copy_buffers_of(
    stream: &Arc<CudaStream>,
    elements: u64,
    bytes: u64,
) -> (Vec<CudaSlice<f32>>, Vec<CudaSlice<f32>>) {
    let len = (bytes / 2 / 4) as usize;
    let alloc = || -> Vec<CudaSlice<f32>> {
        (0..sets_needed(elements))
            .map(|_| stream.alloc_zeros::<f32>(len).expect("alloc"))
            .collect()
    };
    (alloc(), alloc())
}

/// Wall time of `iters` calls of `f(i)` between two synchronisations of `stream`: what
/// criterion's `iter_custom` is given, so that queued GPU work is inside the measurement.
pub fn timed(stream: &CudaStream, iters: u64, mut f: impl FnMut(usize)) -> std::time::Duration {
    stream.synchronize().expect("sync");
    let start = std::time::Instant::now();
    for i in 0..iters as usize {
        f(i);
    }
    stream.synchronize().expect("sync");
    start.elapsed()
}
