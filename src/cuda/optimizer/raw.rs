//! The raw-pointer entry points, for stacks on another cudarc version, candle, burn or
//! tch: parameters and gradients as device addresses, under a documented safety
//! contract; counts, null and misaligned addresses are still refused as errors.

use std::sync::Arc;

use cudarc::driver::CudaStream;

use crate::{
    config::AdamaxConfig,
    error::{Error, Result},
    optimizer::Optimizer,
};

use super::{CudaAdamax, GpuStorage};

/// A parameter tensor owned by another CUDA stack: device address and element count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawParam {
    /// Device address of the first element.
    pub ptr: u64,
    /// Number of elements.
    pub len: usize,
}

/// One tensor of a [`CudaAdamax::step_raw`]: device addresses of its parameter and
/// gradient (each as long as the tensor the optimizer was built with).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawTensor {
    /// Device address of the parameter.
    pub param: u64,
    /// Device address of the gradient.
    pub grad: u64,
}

impl<T: GpuStorage> CudaAdamax<T> {
    /// [`CudaAdamax::new`] for parameters owned by another CUDA stack (another cudarc
    /// version, candle, burn, tch), given as raw device addresses and element counts.
    ///
    /// # Safety
    ///
    /// - `stream` belongs to the CUDA context the parameters were allocated in (for a
    ///   stream owned by another stack, get it from [`borrow_stream`](crate::cuda::borrow_stream)).
    /// - Each `params[i].ptr` is the address of `params[i].len` initialised elements of
    ///   `T` that stay allocated while the work enqueued here runs; work that writes them
    ///   on other streams is ordered before this call by the caller.
    ///
    /// Checked here, as errors: an empty list, null or misaligned addresses.
    pub unsafe fn new_raw(
        stream: &Arc<CudaStream>,
        config: AdamaxConfig,
        params: &[RawParam],
    ) -> Result<Self> {
        for (i, p) in params.iter().enumerate() {
            check_raw::<T>("param", i, p.ptr, p.len)?;
        }
        let opt = Self::allocate(stream, config, params.iter().map(|p| p.len).collect())?;
        opt.init_master(params.iter().map(|p| p.ptr))?;
        Ok(opt)
    }

    /// [`CudaAdamax::step`] for buffers owned by another CUDA stack, as raw device
    /// addresses: `tensors[i]` is the parameter and gradient of tensor `i`.
    ///
    /// # Safety
    ///
    /// - Each `tensors[i].param` and `.grad` is the address of as many elements of `T`
    ///   as tensor `i` was constructed with, allocated in the optimizer's CUDA context and
    ///   alive while the enqueued step runs; the parameter is not aliased by any other
    ///   tensor's parameter or by a gradient.
    /// - Work that writes them on streams other than the optimizer's is ordered before
    ///   this call by the caller (the step runs on the optimizer's stream: build the
    ///   optimizer on the other stack's stream with [`borrow_stream`](crate::cuda::borrow_stream)
    ///   to share its ordering).
    ///
    /// Checked here, as errors: the tensor count, null and misaligned addresses.
    pub unsafe fn step_raw(&mut self, tensors: &[RawTensor]) -> Result<()> {
        check_count(self.tensor_lens(), "tensors", tensors.len())?;
        // SAFETY: the caller's contract, which is step_some_raw's with every gradient
        // present.
        unsafe { self.step_addresses(tensors.iter().map(|t| (t.param, Some(t.grad)))) }
    }

    /// [`CudaAdamax::step_some`] for buffers owned by another CUDA stack:
    /// `params[i]` is the device address of tensor `i`'s parameter and `grads[i]` that
    /// of its gradient, or `None` when it has none this step (the tensor is skipped,
    /// as [`Optimizer::step_some`] describes; its parameter is not read or written).
    ///
    /// # Safety
    ///
    /// As [`CudaAdamax::step_raw`], for every parameter and every gradient given.
    ///
    /// Checked here, as errors: the list lengths, null and misaligned addresses.
    pub unsafe fn step_some_raw(&mut self, params: &[u64], grads: &[Option<u64>]) -> Result<()> {
        check_count(self.tensor_lens(), "params", params.len())?;
        check_count(self.tensor_lens(), "grads", grads.len())?;
        // SAFETY: the caller's contract.
        unsafe { self.step_addresses(params.iter().copied().zip(grads.iter().copied())) }
    }

    /// Checks every address (one pair per tensor, counted by the caller), then
    /// prepares the table and enqueues the step; nothing is allocated on the way.
    ///
    /// # Safety
    ///
    /// The addresses satisfy [`CudaAdamax::step_some_raw`]'s contract.
    unsafe fn step_addresses(
        &mut self,
        addresses: impl Iterator<Item = (u64, Option<u64>)> + Clone,
    ) -> Result<()> {
        for (i, ((param, grad), &n)) in addresses.clone().zip(self.tensor_lens()).enumerate() {
            check_raw::<T>("param", i, param, n)?;
            if let Some(grad) = grad {
                check_raw::<T>("grad", i, grad, n)?;
            }
        }
        let hypers = self.schedule.hypers();
        self.plan
            .table
            .prepare(&self.state, hypers, None, addresses);
        self.enqueue(None)
    }
}

/// A list of `found` entries for an optimizer of tensors of `lens`: one per tensor.
fn check_count(lens: &[usize], what: &'static str, found: usize) -> Result<()> {
    if found != lens.len() {
        return Err(Error::TensorCountMismatch {
            what,
            expected: lens.len(),
            found,
        });
    }
    Ok(())
}

/// A raw address must be non-null (unless the tensor is empty) and aligned to `T`.
fn check_raw<T>(what: &'static str, tensor: usize, address: u64, len: usize) -> Result<()> {
    let align = std::mem::align_of::<T>() as u64;
    let reason = if address == 0 && len > 0 {
        "is null"
    } else if !address.is_multiple_of(align) {
        "is not aligned to its element type"
    } else {
        return Ok(());
    };
    Err(Error::InvalidPointer {
        what,
        tensor,
        address,
        reason,
    })
}
