//! Launching: the plan of one step (its tensor table, the partial sums of the
//! reduction, the grid, the order of the kernels) and the crate's one `unsafe` launch
//! site.

use std::sync::Arc;

use cudarc::driver::{result, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr};

use crate::{
    error::{Error, Result},
    storage::StorageType,
};

use super::{
    args::{AdamaxArgs, BLOCK, FLAG_CHECK, FLAG_CLIP},
    entry::EntryPoint,
    layout::StateLayout,
    module::Kernels,
    table::TensorTable,
};

/// What every step launch needs besides the kernels: the tensor table, the
/// reduction's partial sums, and the grid.
pub(crate) struct LaunchPlan {
    /// The table the kernels read, and its one cache.
    pub(crate) table: TensorTable,
    /// One f32 sum of squares per chunk, written by the reduction for the finalize pass.
    _partials: CudaSlice<f32>,
    partials_ptr: u64,
    num_tensors: u64,
    num_chunks: u64,
    num_units: u64,
    unit_len: u64,
    /// Blocks of the update and of the reduction: at most one whole wave each, of
    /// that kernel's own occupancy.
    step_grid: u32,
    reduce_grid: u32,
    /// The update of this optimizer's storage type and modes, and its reduction.
    step: EntryPoint,
    reduce: EntryPoint,
}

impl LaunchPlan {
    pub(crate) fn new(
        stream: &Arc<CudaStream>,
        kernels: &Kernels,
        layout: &StateLayout,
        step: EntryPoint,
        storage: StorageType,
    ) -> Result<Self> {
        let reduce = EntryPoint::reduce(storage);
        let chunks = usize::try_from(layout.num_chunks()).map_err(|_| Error::TooLarge {
            what: "the chunk count of the parameter list",
        })?;
        let partials = stream
            .alloc_zeros::<f32>(chunks.max(1))
            .map_err(Error::driver("allocating the partial sums"))?;
        let partials_ptr = partials.device_ptr(stream).0;
        Ok(Self {
            table: TensorTable::new(stream, layout.lens().len())?,
            _partials: partials,
            partials_ptr,
            num_tensors: layout.lens().len() as u64,
            num_chunks: layout.num_chunks(),
            num_units: layout.num_units(),
            unit_len: layout.unit_len(),
            step_grid: grid(layout.num_units(), kernels.wave(step)),
            reduce_grid: grid(layout.num_chunks(), kernels.wave(reduce)),
            step,
            reduce,
        })
    }

    /// Uploads a table prepared for this step if the device does not hold it, then
    /// enqueues the step: the reduction and the one-block finalize that decides the step
    /// when the flags need them (the overflow check or clipping) or when the stream is
    /// capturing a CUDA graph (see [`decision_passes`]); then the update, which counts
    /// the step itself (so the common eager step is one launch). Nothing here reads a
    /// host value that changes per step, so the same calls can be captured in a CUDA
    /// graph and replayed.
    pub(crate) fn enqueue(
        &mut self,
        stream: &Arc<CudaStream>,
        kernels: &Kernels,
        args: AdamaxArgs,
        flags: u32,
    ) -> Result<()> {
        let capturing = is_capturing(stream)?;
        self.table.upload(stream, capturing)?;
        let args = AdamaxArgs {
            tensors: self.table.device_ptr(stream),
            num_tensors: self.num_tensors,
            num_chunks: self.num_chunks,
            num_units: self.num_units,
            unit_len: self.unit_len,
            partials: self.partials_ptr,
            ..args
        };
        if decision_passes(flags, capturing) {
            if self.num_chunks > 0 {
                let f = kernels.function(self.reduce);
                launch(stream, f, self.reduce_grid, &args)?;
            }
            launch(stream, kernels.function(EntryPoint::Finalize), 1, &args)?;
        }
        // Launched even with no elements: it counts the step.
        let f = kernels.function(self.step);
        launch(stream, f, self.step_grid, &args)
    }
}

/// Whether a step enqueues the reduction and the decision pass before the update: when
/// its flags need them (the overflow check or clipping), and always in a step captured
/// in a CUDA graph, whose replays must honour flags set after the capture (the kernels
/// read the flags when they run and return at once without them; see the kernel's
/// NOTE: [captured steps]).
pub(crate) fn decision_passes(flags: u32, capturing: bool) -> bool {
    capturing || flags & (FLAG_CHECK | FLAG_CLIP) != 0
}

/// Whether `stream` is capturing a CUDA graph (an invalidated capture counts: work
/// enqueued now would belong to it).
pub(crate) fn is_capturing(stream: &CudaStream) -> Result<bool> {
    use cudarc::driver::sys::CUstreamCaptureStatus as Status;
    let status = stream
        .capture_status()
        .map_err(Error::driver("asking whether the stream is capturing"))?;
    Ok(status != Status::CU_STREAM_CAPTURE_STATUS_NONE)
}

/// [`Error::DuringCapture`] when `stream` is capturing a CUDA graph.
pub(crate) fn refuse_during_capture(
    stream: &CudaStream,
    what: &'static str,
    instead: &'static str,
) -> Result<()> {
    if is_capturing(stream)? {
        return Err(Error::DuringCapture { what, instead });
    }
    Ok(())
}

/// Blocks for `work` grid-stride items: at most one wave, at least one block.
fn grid(work: u64, wave: u32) -> u32 {
    u32::try_from(work.min(u64::from(wave)).max(1)).unwrap_or(1)
}

/// Enqueues `func` on `stream` with `blocks` blocks of [`BLOCK`] threads and one
/// by-value argument struct: the crate's only launch site. Calls the driver directly
/// (cudarc's launch builder allocates its argument list on every launch).
pub(crate) fn launch<A: DeviceRepr>(
    stream: &CudaStream,
    func: &CudaFunction,
    blocks: u32,
    args: &A,
) -> Result<()> {
    stream
        .context()
        .bind_to_thread()
        .map_err(Error::driver("binding the CUDA context"))?;
    let mut params = [(args as *const A).cast_mut().cast::<std::ffi::c_void>()];
    // SAFETY: `func` comes from kernels/adamax.cu, loaded in the stream's context (the
    // optimizer holds the module), and each of its entry points takes exactly one
    // by-value struct, whose `repr(C)` mirror `A` is (layout checked field by field at
    // compile time); `params` points at `args`, alive for the call, which is all the
    // driver reads (it copies the value when the launch is enqueued). Callers build the
    // struct from device addresses they have checked: buffers in this stream's context,
    // lengths that match the element counts written in the struct, and state buffers
    // this crate allocated for those lengths; the kernel touches no element beyond them.
    unsafe {
        result::launch_kernel(
            func.cu_function(),
            (blocks.max(1), 1, 1),
            (BLOCK, 1, 1),
            0,
            stream.cu_stream(),
            &mut params,
        )
    }
    .map_err(Error::driver("launching an AdaMax kernel"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::args::{FLAG_SCALER, FLAG_UNSCALE};

    /// Issue #17, item 1: a graph captured without the passes replayed only the update,
    /// which then read a stale clip coefficient and inverse scale when clipping or a
    /// scaler was turned on after the capture.
    #[test]
    fn a_captured_step_always_carries_the_decision_passes_an_eager_one_when_needed() {
        for flags in 0..16 {
            assert!(decision_passes(flags, true), "captured, flags {flags}");
            let needed = flags & (FLAG_CHECK | FLAG_CLIP) != 0;
            assert_eq!(
                decision_passes(flags, false),
                needed,
                "eager, flags {flags}"
            );
        }
        // Unscaling and the scaler always come with the check (StepOptions::checks).
        assert!(decision_passes(
            FLAG_UNSCALE | FLAG_SCALER | FLAG_CHECK,
            false
        ));
        assert!(
            !decision_passes(0, false),
            "the common eager step is one launch"
        );
    }
}
