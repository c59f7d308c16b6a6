//! Parameter storage types. The arithmetic is always f32; 16-bit parameters carry an
//! f32 master copy that the optimizer steps, and the 16-bit copy is rewritten from it
//! (unless bf16 parameters are rounded stochastically without one:
//! [`ParamMode::Stochastic`](crate::ParamMode::Stochastic)).

use half::{bf16, f16};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// Which storage type a parameter list has, as a value (checkpoints record it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StorageType {
    /// `f32` parameters, their own master.
    F32,
    /// [`half::f16`] parameters with f32 master weights.
    F16,
    /// [`half::bf16`] parameters with f32 master weights.
    Bf16,
}

impl StorageType {
    /// Every storage type.
    pub const ALL: [StorageType; 3] = [StorageType::F32, StorageType::F16, StorageType::Bf16];

    /// The name used in kernel entry points and checkpoints: `f32`, `f16`, `bf16`.
    pub const fn as_str(self) -> &'static str {
        match self {
            StorageType::F32 => "f32",
            StorageType::F16 => "f16",
            StorageType::Bf16 => "bf16",
        }
    }

    /// Whether parameters of this type carry f32 master weights in the default
    /// [`ParamMode::Master`](crate::ParamMode::Master).
    pub const fn has_master(self) -> bool {
        !matches!(self, StorageType::F32)
    }

    /// Bytes per value.
    pub const fn size(self) -> usize {
        match self {
            StorageType::F32 => 4,
            StorageType::F16 | StorageType::Bf16 => 2,
        }
    }
}

impl std::fmt::Display for StorageType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for StorageType {
    type Err = String;
    /// Parses `f32`, `f16` or `bf16`.
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| format!("unknown storage type `{s}` (expected f32, f16 or bf16)"))
    }
}

/// A parameter (and gradient) storage type: `f32`, [`half::f16`] or [`half::bf16`].
///
/// Sealed: the kernels exist for exactly these three.
pub trait Storage:
    sealed::Sealed + Copy + Default + PartialEq + Send + Sync + std::fmt::Debug + 'static
{
    /// This type as a value.
    const TYPE: StorageType;
    /// Suffix of the kernel entry points for this type (`adamax_step_f32`, ...).
    const NAME: &'static str = Self::TYPE.as_str();
    /// Whether parameters of this type carry f32 master weights (in the default mode).
    const HAS_MASTER: bool = Self::TYPE.has_master();
    /// Exact widening to f32.
    fn to_f32(self) -> f32;
    /// Round-to-nearest-even narrowing from f32 (identity for f32).
    fn from_f32(x: f32) -> Self;
}

impl Storage for f32 {
    const TYPE: StorageType = StorageType::F32;
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
    const TYPE: StorageType = StorageType::F16;
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
    const TYPE: StorageType = StorageType::Bf16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}
