//! Launching: the plan of one step (its tensor table on the device, the partial sums
//! of the reduction, the grid, the order of the kernels) and the crate's one `unsafe`
//! launch site.

use std::sync::Arc;

use cudarc::driver::{result, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr};

use crate::{
    error::{Error, Result},
    storage::StorageType,
};

use super::{
    args::{AdamaxArgs, TensorDesc, BLOCK, FLAG_CHECK, FLAG_CLIP},
    entry::EntryPoint,
    layout::StateLayout,
    module::Kernels,
};

/// What every step launch needs besides the kernels: the tensor table on the device,
/// the reduction's partial sums, and the grid.
pub(crate) struct LaunchPlan {
    /// The table on the device and the copy last uploaded: re-uploaded only when a
    /// caller's buffer moved (or the state did).
    table: CudaSlice<TensorDesc>,
    uploaded: Vec<TensorDesc>,
    /// The table of the step being prepared (reused: no allocation per step once the
    /// capacity is there).
    next: Vec<TensorDesc>,
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
        let n = layout.lens().len();
        let table = stream
            .alloc_zeros::<TensorDesc>(n.max(1))
            .map_err(Error::driver("allocating the tensor table"))?;
        let chunks = usize::try_from(layout.num_chunks()).map_err(|_| Error::TooLarge {
            what: "the chunk count of the parameter list",
        })?;
        let partials = stream
            .alloc_zeros::<f32>(chunks.max(1))
            .map_err(Error::driver("allocating the partial sums"))?;
        let partials_ptr = partials.device_ptr(stream).0;
        Ok(Self {
            table,
            uploaded: Vec::with_capacity(n),
            next: Vec::with_capacity(n),
            _partials: partials,
            partials_ptr,
            num_tensors: n as u64,
            num_chunks: layout.num_chunks(),
            num_units: layout.num_units(),
            unit_len: layout.unit_len(),
            step_grid: grid(layout.num_units(), kernels.wave(step)),
            reduce_grid: grid(layout.num_chunks(), kernels.wave(reduce)),
            step,
            reduce,
        })
    }

    /// The table of the next step, empty, for the caller to fill in tensor order.
    pub(crate) fn next_table(&mut self) -> &mut Vec<TensorDesc> {
        self.next.clear();
        &mut self.next
    }

    /// Forgets the uploaded table (the state moved): the next step uploads its own.
    pub(crate) fn invalidate(&mut self) {
        self.uploaded.clear();
    }

    /// Uploads the prepared table if it changed, then enqueues the step: with the
    /// overflow check or clipping (`flags`), the reduction and the one-block finalize
    /// that decides the step; then the update, which counts the step itself (so the
    /// common step is one launch). Nothing here reads a host value that changes per
    /// step, so the same calls can be captured in a CUDA graph and replayed.
    ///
    /// `prepared` says whether [`LaunchPlan::next_table`] was filled for this step;
    /// without it the table already on the device is used as it is.
    pub(crate) fn enqueue(
        &mut self,
        stream: &Arc<CudaStream>,
        kernels: &Kernels,
        args: AdamaxArgs,
        flags: u32,
        prepared: bool,
    ) -> Result<()> {
        if prepared && self.next != self.uploaded {
            stream
                .memcpy_htod(&self.next, &mut self.table)
                .map_err(Error::driver("uploading the tensor table"))?;
            std::mem::swap(&mut self.next, &mut self.uploaded);
        }
        let (table, _table_guard) = self.table.device_ptr(stream);
        let args = AdamaxArgs {
            tensors: table,
            num_tensors: self.num_tensors,
            num_chunks: self.num_chunks,
            num_units: self.num_units,
            unit_len: self.unit_len,
            partials: self.partials_ptr,
            ..args
        };
        if flags & (FLAG_CHECK | FLAG_CLIP) != 0 {
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
