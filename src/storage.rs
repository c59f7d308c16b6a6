//! Parameter storage types. The arithmetic is always f32; 16-bit parameters carry an
//! f32 master copy that the optimizer steps, and the 16-bit copy is rewritten from it.

use half::{bf16, f16};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// A parameter (and gradient) storage type: `f32`, [`half::f16`] or [`half::bf16`].
///
/// Sealed: the kernels exist for exactly these three.
pub trait Storage:
    sealed::Sealed + Copy + Default + PartialEq + Send + Sync + std::fmt::Debug + 'static
{
    /// Suffix of the kernel entry points for this type (`adamax_step_f32`, ...).
    const NAME: &'static str;
    /// Whether parameters of this type carry f32 master weights.
    const HAS_MASTER: bool;
    /// Exact widening to f32.
    fn to_f32(self) -> f32;
    /// Round-to-nearest-even narrowing from f32 (identity for f32).
    fn from_f32(x: f32) -> Self;
}

impl Storage for f32 {
    const NAME: &'static str = "f32";
    const HAS_MASTER: bool = false;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Storage for f16 {
    const NAME: &'static str = "f16";
    const HAS_MASTER: bool = true;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl Storage for bf16 {
    const NAME: &'static str = "bf16";
    const HAS_MASTER: bool = true;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}
