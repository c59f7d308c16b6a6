//! Training-loop features fused into the step: gradient unscaling with an overflow
//! check that skips the step, global-norm clipping, and a dynamic loss scaler.
//!
//! # Semantics (PyTorch's `GradScaler` + `clip_grad_norm_` + `Adamax`, in one pass)
//!
//! For every element, `u = g * inv_scale` when unscaling (else `u = g`). If any `u` of
//! any tensor is NaN or infinite and the check is on, the step is **skipped**: parameters,
//! master weights, `m`, `u` and the step count stay bit-identical. Otherwise the global
//! norm `N = sqrt(sum u^2)` over all tensors gives `c = min(1, max_norm / (N + 1e-6))`,
//! and the AdaMax update sees the gradient `u * c` (clipping on) or `u`.
//!
//! # The reduction, exactly (so that the GPU can be compared bit for bit)
//!
//! Tensors are cut into chunks of [`CHUNK`] elements (a chunk never spans tensors). In a
//! chunk, thread `t` of [`THREADS`] accumulates `acc = fma(u, u, acc)` (f32) over the
//! elements `(j * THREADS + t) * L + k` for `j = 0, 1, ...` and `k < L`, where `L` is 4
//! for f32 and 8 for 16-bit storage (one 16-byte access). The 32 accumulators of a warp
//! are combined by the xor butterfly (offsets 16, 8, 4, 2, 1; lane 0's sum is kept),
//! and the 8 warp sums are added in order: the chunk's f32 partial. The partials of all
//! chunks, in order, are then summed in f64 by [`THREADS`] strided accumulators,
//! combined by the same butterfly per warp and warp sums in order: `sum u^2`. `N` is its
//! f64 square root; `c` is computed in f64 and rounded to f32.

use crate::error::{ConfigError, Error, Result};

/// Elements per chunk: the unit of work of one block, in both the step and the reduction.
#[doc(hidden)]
pub const CHUNK: usize = 8192;
/// Threads per block.
#[doc(hidden)]
pub const THREADS: usize = 256;

/// Options of every step until changed (`set_options`): persistent rather than per call,
/// so that a step captured in a CUDA graph needs no host writes.
///
/// ```
/// use adamax_cuda::{cpu::CpuAdamax, AdamaxConfig, Optimizer, StepOptions};
/// let mut w = vec![1.0f32; 4];
/// let mut opt = CpuAdamax::new(AdamaxConfig::default(), &[&w])?;
/// // clip_grad_norm_(params, 1.0), and skip steps with a NaN or infinite gradient.
/// opt.set_options(StepOptions { max_norm: Some(1.0), skip_nonfinite: true, ..Default::default() })?;
/// opt.step(&mut [&mut w], &[&[3.0, 4.0, 0.0, f32::NAN]])?;
/// assert!(opt.last_report()?.skipped);
/// assert_eq!(w, [1.0; 4]);
/// opt.step(&mut [&mut w], &[&[3.0, 4.0, 0.0, 0.0]])?;
/// let r = opt.last_report()?;
/// assert_eq!(r.total_norm, Some(5.0)); // the norm before clipping
/// assert!((r.clip_coef - 0.2).abs() < 1e-6);
/// # Ok::<(), adamax_cuda::Error>(())
/// ```
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepOptions {
    /// Multiply every gradient by this first (1 / loss scale). Implies the overflow check.
    /// Ignored while a [`LossScaler`] is enabled: the scaler's inverse scale is used.
    pub inv_scale: Option<f32>,
    /// Clip the global L2 norm of the (unscaled) gradients to this
    /// (`torch.nn.utils.clip_grad_norm_`).
    pub max_norm: Option<f32>,
    /// Skip the whole step when any (unscaled) gradient is NaN or infinite. Always on when
    /// unscaling.
    pub skip_nonfinite: bool,
}

impl StepOptions {
    /// Refuses a non-finite or non-positive `inv_scale` or `max_norm`.
    pub fn validate(&self) -> Result<()> {
        for (field, v) in [("inv_scale", self.inv_scale), ("max_norm", self.max_norm)] {
            if let Some(v) = v {
                positive(field, f64::from(v), "> 0")?;
            }
        }
        Ok(())
    }

    /// Whether the overflow check runs.
    pub fn checks(&self, scaler: bool) -> bool {
        self.skip_nonfinite || self.inv_scale.is_some() || scaler
    }
}

fn positive(field: &'static str, value: f64, allowed: &'static str) -> Result<()> {
    if !value.is_finite() {
        return Err(ConfigError::NotFinite { field, value }.into());
    }
    if value <= 0.0 {
        return Err(ConfigError::OutOfRange {
            field,
            value,
            allowed,
        }
        .into());
    }
    Ok(())
}

/// What the last step did.
///
/// With the `serde` feature a report serializes whatever values a run gave it: a norm
/// or coefficient that is NaN or infinite (a non-finite gradient with clipping and no
/// overflow check) is written as the string `"NaN"`, `"inf"` or `"-inf"` (JSON has no
/// such numbers) and reads back as that value.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// Steps taken so far (skipped steps are not counted).
    pub step: u64,
    /// Whether the last step was skipped for a non-finite gradient.
    pub skipped: bool,
    /// Global L2 norm of the unscaled gradients, when it was computed (clipping on).
    #[cfg_attr(feature = "serde", serde(default, with = "non_finite::option"))]
    pub total_norm: Option<f32>,
    /// The factor the gradients were multiplied by for clipping (1 without clipping).
    #[cfg_attr(feature = "serde", serde(with = "non_finite"))]
    pub clip_coef: f32,
    /// The loss scale for the next step, when a [`LossScaler`] is enabled.
    #[cfg_attr(feature = "serde", serde(default, with = "non_finite::option"))]
    pub loss_scale: Option<f32>,
}

/// serde for f32 values that may be NaN or infinite: finite values as numbers, the
/// others as the strings `"NaN"`, `"inf"` and `"-inf"` (JSON has no number for them, and
/// serde_json writes them as `null`, which reads back as nothing or fails).
#[cfg(feature = "serde")]
mod non_finite {
    use serde::{de::Error as _, Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Repr<'a> {
        Number(f32),
        Text(&'a str),
    }

    pub(super) fn serialize<S: Serializer>(v: &f32, s: S) -> Result<S::Ok, S::Error> {
        match *v {
            v if v.is_finite() => Repr::Number(v),
            v if v.is_nan() => Repr::Text("NaN"),
            v if v > 0.0 => Repr::Text("inf"),
            _ => Repr::Text("-inf"),
        }
        .serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
        match Repr::deserialize(d)? {
            Repr::Number(v) => Ok(v),
            Repr::Text("NaN") => Ok(f32::NAN),
            Repr::Text("inf") => Ok(f32::INFINITY),
            Repr::Text("-inf") => Ok(f32::NEG_INFINITY),
            Repr::Text(other) => Err(D::Error::custom(format!(
                "`{other}` is not a number; expected a number, \"NaN\", \"inf\" or \"-inf\""
            ))),
        }
    }

    pub(super) mod option {
        use serde::{Deserialize, Deserializer, Serializer};

        #[derive(Deserialize)]
        struct Value(#[serde(deserialize_with = "super::deserialize")] f32);

        pub(in crate::fused) fn serialize<S: Serializer>(
            v: &Option<f32>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match v {
                Some(v) => super::serialize(v, s),
                None => s.serialize_none(),
            }
        }

        pub(in crate::fused) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<f32>, D::Error> {
            Ok(Option::<Value>::deserialize(d)?.map(|v| v.0))
        }
    }
}

/// A dynamic loss scale with growth and backoff: `torch.amp.GradScaler`'s update rule.
///
/// ```
/// use adamax_cuda::{cpu::CpuAdamax, f16, AdamaxConfig, LossScaler, Optimizer};
/// let mut w = vec![f16::from_f32(0.5); 3];
/// let mut opt = CpuAdamax::new(AdamaxConfig::default(), &[&w])?;
/// opt.set_loss_scaler(Some(LossScaler { scale: 1024.0, ..LossScaler::default() }))?;
/// // The backward pass ran on loss * 1024: gradients arrive scaled, and overflow.
/// let scaled = [f16::from_f32(0.01 * 1024.0), f16::INFINITY, f16::from_f32(0.0)];
/// opt.step(&mut [&mut w], &[&scaled])?;
/// let r = opt.last_report()?;
/// assert!(r.skipped);
/// assert_eq!(r.loss_scale, Some(512.0)); // backed off for the next step
/// # Ok::<(), adamax_cuda::Error>(())
/// ```
///
/// After a step with a non-finite gradient the scale is multiplied by `backoff_factor`,
/// but never below `min_scale`; after `growth_interval` consecutive good steps, by
/// `growth_factor` (if the result is finite). Products are taken in f64 and rounded to
/// f32, and the inverse scale is `f32(1 / f64(scale))`, as PyTorch computes them.
///
/// The floor is what keeps every state a run reaches valid, so that it saves and
/// resumes: without it a run whose gradients keep overflowing halves the scale towards
/// 0 (PyTorch's `GradScaler` has no floor; 150 overflows from 65536 give 4.6e-41, whose
/// inverse is infinite). The default floor, 1, is DeepSpeed's and Megatron-LM's
/// (`min_loss_scale`); [`LossScaler::NO_FLOOR`] reproduces PyTorch down to f32's
/// smallest normal number.
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossScaler {
    /// The current scale: multiply the loss by it before the backward pass.
    pub scale: f32,
    /// The smallest scale a backoff leaves (default 1). At least
    /// [`LossScaler::NO_FLOOR`]. (Absent from a serialized scaler, it is `NO_FLOOR`, the
    /// rule before the floor existed.)
    #[cfg_attr(feature = "serde", serde(default = "no_floor"))]
    pub min_scale: f32,
    /// Factor after `growth_interval` good steps (PyTorch: 2.0).
    pub growth_factor: f64,
    /// Factor after a step with a non-finite gradient (PyTorch: 0.5).
    pub backoff_factor: f64,
    /// Good steps before growing (PyTorch: 2000).
    pub growth_interval: u32,
    /// Good steps since the last growth or backoff.
    pub growth_tracker: u32,
}

#[cfg(feature = "serde")]
fn no_floor() -> f32 {
    LossScaler::NO_FLOOR
}

impl Default for LossScaler {
    /// PyTorch's defaults (scale 65536, growth 2, backoff 0.5, interval 2000) with a
    /// floor of 1.
    fn default() -> Self {
        Self {
            scale: 65536.0,
            min_scale: 1.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            growth_tracker: 0,
        }
    }
}

impl LossScaler {
    /// The lowest floor: f32's smallest normal number, 2^-126, whose inverse is finite.
    /// With it the scaler follows PyTorch's rule, which has no floor, until the scale
    /// would leave f32's normal range.
    pub const NO_FLOOR: f32 = f32::MIN_POSITIVE;

    /// Refuses a `min_scale` below [`LossScaler::NO_FLOOR`] or not finite, a scale below
    /// `min_scale` or not finite, factors that do not move an f32 scale
    /// (`growth_factor` below `1 + 2^-23`, `backoff_factor` outside `(0, 1 - 2^-23]`: a
    /// backoff of 0.99999999 rounds back to the same scale, so every step would be
    /// skipped forever), a zero interval, and a tracker that has already reached the
    /// interval.
    pub fn validate(&self) -> Result<()> {
        if !self.min_scale.is_finite() {
            return Err(ConfigError::NotFinite {
                field: "min_scale",
                value: f64::from(self.min_scale),
            }
            .into());
        }
        if self.min_scale < Self::NO_FLOOR {
            return Err(out_of_range(
                "min_scale",
                f64::from(self.min_scale),
                "min_scale >= 2^-126 (LossScaler::NO_FLOOR)",
            ));
        }
        positive("scale", f64::from(self.scale), "> 0")?;
        if self.scale < self.min_scale {
            return Err(out_of_range(
                "scale",
                f64::from(self.scale),
                "scale >= min_scale",
            ));
        }
        // The smallest change of a factor that moves every normal f32 scale.
        let step = 2f64.powi(-23);
        if !self.growth_factor.is_finite() || self.growth_factor < 1.0 + step {
            return Err(out_of_range(
                "growth_factor",
                self.growth_factor,
                "growth_factor >= 1 + 2^-23, so that growing changes an f32 scale",
            ));
        }
        if !(self.backoff_factor > 0.0 && self.backoff_factor <= 1.0 - step) {
            return Err(out_of_range(
                "backoff_factor",
                self.backoff_factor,
                "0 < backoff_factor <= 1 - 2^-23, so that backing off changes an f32 scale",
            ));
        }
        if self.growth_interval == 0 {
            return Err(out_of_range("growth_interval", 0.0, ">= 1"));
        }
        if self.growth_tracker >= self.growth_interval {
            return Err(out_of_range(
                "growth_tracker",
                f64::from(self.growth_tracker),
                "growth_tracker < growth_interval",
            ));
        }
        Ok(())
    }

    /// The factor the gradients are multiplied by: `f32(1 / f64(scale))`.
    pub fn inv_scale(&self) -> f32 {
        (1.0 / f64::from(self.scale)) as f32
    }

    /// Updates the scale after a step that did (`found_inf`) or did not see a
    /// non-finite gradient.
    pub fn update(&mut self, found_inf: bool) {
        if found_inf {
            let backed_off = (f64::from(self.scale) * self.backoff_factor) as f32;
            // Not `f32::max`: the kernel's comparison, the same for every non-NaN value.
            self.scale = if backed_off < self.min_scale {
                self.min_scale
            } else {
                backed_off
            };
            self.growth_tracker = 0;
        } else {
            // `>=` equals PyTorch's `==` for every valid scaler (tracker < interval) and
            // cannot overflow or miss the interval for an invalid one.
            let successful = self.growth_tracker.saturating_add(1);
            if successful >= self.growth_interval {
                let grown = (f64::from(self.scale) * self.growth_factor) as f32;
                if grown.is_finite() {
                    self.scale = grown;
                }
                self.growth_tracker = 0;
            } else {
                self.growth_tracker = successful;
            }
        }
    }
}

fn out_of_range(field: &'static str, value: f64, allowed: &'static str) -> Error {
    ConfigError::OutOfRange {
        field,
        value,
        allowed,
    }
    .into()
}

/// The xor butterfly of one warp, as `__shfl_xor_sync` computes it: lane 0's result.
fn butterfly<F: Copy + std::ops::Add<Output = F>>(mut lanes: [F; 32]) -> F {
    for off in [16, 8, 4, 2, 1] {
        let prev = lanes;
        for (l, v) in lanes.iter_mut().enumerate() {
            *v = prev[l] + prev[l ^ off];
        }
    }
    lanes[0]
}

/// One block's reduction of per-thread values: butterfly per warp, warp sums in order.
fn block_sum<F: Copy + Default + std::ops::Add<Output = F>>(threads: &[F; THREADS]) -> F {
    let mut total: Option<F> = None;
    for warp in threads.chunks_exact(32) {
        let mut lanes = [F::default(); 32];
        lanes.copy_from_slice(warp);
        let s = butterfly(lanes);
        total = Some(match total {
            None => s,
            Some(t) => t + s,
        });
    }
    total.unwrap_or_default()
}

/// The f32 partial sum of squares of one chunk and whether it holds a non-finite value.
/// `u(i)` is the unscaled gradient of element `i` of the chunk (`0 <= i < n`); `lanes`
/// is 4 for f32 storage and 8 for 16-bit.
pub(crate) fn chunk_partial(n: usize, lanes: usize, u: impl Fn(usize) -> f32) -> (f32, bool) {
    let mut acc = [0f32; THREADS];
    let mut nonfinite = false;
    for (t, a) in acc.iter_mut().enumerate() {
        let mut j = 0;
        loop {
            let base = (j * THREADS + t) * lanes;
            if base >= n {
                break;
            }
            for i in base..(base + lanes).min(n) {
                let v = u(i);
                nonfinite |= !v.is_finite();
                *a = v.mul_add(v, *a);
            }
            j += 1;
        }
    }
    (block_sum(&acc), nonfinite)
}

/// `sum u^2` over all chunk partials, in chunk order, as the finalize kernel sums them.
pub(crate) fn total_from_partials(partials: &[f32]) -> f64 {
    let mut acc = [0f64; THREADS];
    for (c, &p) in partials.iter().enumerate() {
        acc[c % THREADS] += f64::from(p);
    }
    block_sum(&acc)
}

/// The global norm and the clip coefficient from `sum u^2`.
pub(crate) fn clip_coef(sum_squares: f64, max_norm: f32) -> (f32, f32) {
    let norm = sum_squares.sqrt();
    let c = f64::from(max_norm) / (norm + 1e-6);
    let c = if c > 1.0 { 1.0 } else { c };
    (norm as f32, c as f32)
}
