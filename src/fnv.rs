/// 64-bit FNV-1a: small, dependency-free and stable across Rust versions, which is all a
/// cache key needs (it is not a security boundary). Shared with build.rs by `include!`.
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
