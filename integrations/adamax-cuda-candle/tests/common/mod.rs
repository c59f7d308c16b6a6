//! What the CPU and GPU tests share: a deterministic generator of adversarial values,
//! a small model's Vars, gradients, and host copies.
#![allow(dead_code)]

use adamax_cuda::Storage;
use candle_core::{backprop::GradStore, DType, Device, Tensor, Var, WithDType};

pub type R = Result<(), Box<dyn std::error::Error>>;

/// A small deterministic generator (splitmix64).
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Values of either sign spanning `decades` orders of magnitude, some exactly 0.
    pub fn spread(&mut self, n: usize, decades: i32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let r = self.next();
                if r.is_multiple_of(17) {
                    return 0.0;
                }
                let sign = if r & 1 == 0 { 1.0 } else { -1.0 };
                let e = ((r >> 8) % decades as u64) as i32;
                let m = 1.0 + (r >> 32) as f32 / u32::MAX as f32;
                sign * m * 10f32.powi(-e)
            })
            .collect()
    }
}

/// Shapes of a small model: a 4-D convolution kernel, a 2-D weight, two vectors.
pub const SHAPES: [&[usize]; 4] = [&[4, 3, 3, 3], &[10, 12], &[10], &[4]];

pub fn model(dtype: DType, device: &Device, rng: &mut Rng) -> candle_core::Result<Vec<Var>> {
    SHAPES
        .iter()
        .map(|s| {
            let n = s.iter().product();
            let t = Tensor::from_vec(rng.spread(n, 3), *s, &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(device)?;
            Var::from_tensor(&t)
        })
        .collect()
}

/// Gradients for `vars` (none for those `missing` picks), in the `Var`s' dtype.
pub fn gradients(
    vars: &[Var],
    rng: &mut Rng,
    missing: impl Fn(usize) -> bool,
) -> candle_core::Result<(GradStore, Vec<Option<Tensor>>)> {
    let mut store = GradStore::default();
    let mut list = Vec::new();
    for (i, v) in vars.iter().enumerate() {
        if missing(i) {
            list.push(None);
            continue;
        }
        let g = Tensor::from_vec(rng.spread(v.elem_count(), 8), v.dims(), &Device::Cpu)?
            .to_dtype(v.dtype())?
            .to_device(v.device())?;
        store.insert(v.as_tensor(), g.clone());
        list.push(Some(g));
    }
    Ok((store, list))
}

pub fn host<T: WithDType>(t: &Tensor) -> candle_core::Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

pub fn bits<T: Storage>(v: &[T]) -> Vec<u32> {
    v.iter().map(|x| x.to_f32().to_bits()).collect()
}
