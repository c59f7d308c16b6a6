//! Encoder inputs where the code's `t = rz(a * inv + 2^-15)` needs the sum's exact error
//! (TwoSum): shared by tests/lowbit.rs (the spec's `t`) and tests/kernel_host.rs (the
//! emulation's codes).

use adamax_cuda::spec::lowbit::{BlockScale, Code};

/// Values `a` with the block scales they are encoded against (scales just above 1, each
/// block's reciprocal for `code`), whose product `a * inv` lies below `2^(s - 38)` (2^s
/// units of `t` at 2^-15) by less than half a unit of the f64 sum `a * inv + 2^-15`:
/// that sum rounds to nearest up onto an f32 (ending in `s` zeros after a carry) above
/// the exact one, whose `t` ends in `s` ones. With `inv`'s significand `m` (an integer
/// in [2^23, 2^24)), `a`'s is `floor((2^47 - 1) / m)`, whose product with `m` is below
/// 2^47 by less than `m`; the blocks whose `m` leaves less than `2^(17 - s)` make the
/// case.
pub fn near_an_f32_above(code: Code, s: i32) -> impl Iterator<Item = (f32, f32)> {
    (1..65536u32).filter_map(move |k| {
        let scale = f32::from_bits(0x3F80_0000 + 97 * k);
        let bits = BlockScale::of(code, scale).inv().to_bits();
        let m = u64::from(bits & 0x007F_FFFF | 0x0080_0000);
        let m_a = ((1u64 << 47) - 1) / m;
        // inv = m * 2^(e - 150) for its biased exponent e; the product m_a * m * 2^(s - 85).
        let exp_a = s - 85 - ((bits >> 23) as i32 - 150);
        ((1u64 << 47) - m_a * m < 1 << (17 - s)).then(|| (m_a as f32 * 2f32.powi(exp_a), scale))
    })
}
