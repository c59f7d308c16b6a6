//! What the sharding tests share (tests/sharded.rs on the CPU, tests/nccl.rs through
//! NCCL): inputs, the configuration, and a piece of a whole tensor's state.
#![allow(dead_code)]

use adamax_cuda::{
    shard::ShardLayout, AdamaxConfig, ParamMode, Precision, StateFormat, Storage, TensorState,
    WeightDecayMode,
};
use rand::{rngs::StdRng, Rng};

/// Values over many orders of magnitude, some zero.
pub fn values<T: Storage>(rng: &mut StdRng, n: usize, scale: f32) -> Vec<T> {
    (0..n)
        .map(|_| {
            if rng.random_range(0..8) == 0 {
                return T::from_f32(0.0);
            }
            let x = rng.random_range(-1.0..1.0f32) * 10f32.powf(rng.random_range(-5.0..0.0));
            T::from_f32(x * scale)
        })
        .collect()
}

/// Tensor `p.tensor`'s state, elements `p.begin..p.end`, as a piece holds it.
pub fn slice(t: &TensorState, begin: usize, end: usize) -> TensorState {
    let part = |v: &Vec<f32>| {
        if v.is_empty() {
            Vec::new()
        } else {
            v[begin..end].to_vec()
        }
    };
    let blocks = begin / 256..end.div_ceil(256);
    let mut s = TensorState {
        step: t.step,
        exp_avg: part(&t.exp_avg),
        exp_inf: part(&t.exp_inf),
        master: part(&t.master),
        ..TensorState::default()
    };
    for (dst, src) in [
        (&mut s.exp_avg_q8, &t.exp_avg_q8),
        (&mut s.exp_inf_q8, &t.exp_inf_q8),
    ] {
        if !src.codes.is_empty() {
            dst.codes = src.codes[begin..end].to_vec();
            dst.scales = src.scales[blocks.clone()].to_vec();
        }
    }
    s
}

pub fn config(params: ParamMode, state: StateFormat) -> AdamaxConfig {
    AdamaxConfig {
        lr: 1e-2,
        weight_decay: 0.02,
        weight_decay_mode: WeightDecayMode::Decoupled,
        precision: Precision {
            params,
            state,
            seed: 0x5A4D,
            ..Precision::default()
        },
        ..AdamaxConfig::default()
    }
}

/// Tensors in a flat buffer laid out as `layout` (zeros between them).
pub fn flat_of<T: Storage>(layout: &ShardLayout, tensors: &[Vec<T>]) -> Vec<T> {
    let mut flat = vec![T::from_f32(0.0); layout.total()];
    for (t, &o) in tensors.iter().zip(layout.offsets()) {
        flat[o..o + t.len()].copy_from_slice(t);
    }
    flat
}

/// The gradients of step `step` of tensors of `lens` at loss scale `scale`: tensor 6
/// has none in odd steps, and in step `overflow` element 16,500 of tensor 4 is
/// infinite (the overflow check skips that step).
pub fn step_grads<T: Storage>(
    rng: &mut StdRng,
    lens: &[usize],
    step: usize,
    scale: f32,
    overflow: usize,
) -> Vec<Option<Vec<T>>> {
    let mut grads: Vec<Option<Vec<T>>> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| (i != 6 || step.is_multiple_of(2)).then(|| values(rng, n, 0.1 * scale)))
        .collect();
    if step == overflow {
        if let Some(g) = grads[4].as_mut() {
            g[16_500] = T::from_f32(f32::INFINITY);
        }
    }
    grads
}
