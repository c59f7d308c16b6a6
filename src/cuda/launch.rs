//! Launching: the plan of one step (its tensor table on the device, the partial sums
//! of the reduction, the grid, the order of the kernels) and the crate's one `unsafe`
//! launch site.

use std::sync::Arc;

use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};

use crate::{
    error::{Error, Result},
    storage::StorageType,
};

use super::{
    args::{AdamaxArgs, TensorDesc, BLOCK, FLAG_CHECK, FLAG_CLIP},
    entry::EntryPoint,
    module::Kernels,
    state::StateLayout,
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
    grid: u32,
}

impl LaunchPlan {
    pub(crate) fn new(
        stream: &Arc<CudaStream>,
        kernels: &Kernels,
        layout: &StateLayout,
    ) -> Result<Self> {
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
            grid: layout.num_chunks().min(u64::from(kernels.max_grid)).max(1) as u32,
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

    /// Uploads the prepared table if it changed, then enqueues the step: the reduction
    /// (when `flags` ask for the overflow check or clipping), the one-block finalize
    /// that decides the step on the device, and the update. Nothing here reads a host
    /// value that changes per step, so the same calls can be captured in a CUDA graph
    /// and replayed.
    pub(crate) fn enqueue(
        &mut self,
        stream: &Arc<CudaStream>,
        kernels: &Kernels,
        storage: StorageType,
        args: AdamaxArgs,
        flags: u32,
    ) -> Result<()> {
        if self.next != self.uploaded {
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
            partials: self.partials_ptr,
            ..args
        };
        if flags & (FLAG_CHECK | FLAG_CLIP) != 0 && self.num_chunks > 0 {
            let f = kernels.function(EntryPoint::reduce(storage));
            launch(stream, f, self.grid, &args)?;
        }
        launch(stream, kernels.function(EntryPoint::Finalize), 1, &args)?;
        if self.num_chunks > 0 {
            let f = kernels.function(EntryPoint::step(storage));
            launch(stream, f, self.grid, &args)?;
        }
        Ok(())
    }
}

/// Enqueues `func` on `stream` with `blocks` blocks of [`BLOCK`] threads and one
/// by-value argument struct: the crate's only launch site.
pub(crate) fn launch<A: DeviceRepr>(
    stream: &CudaStream,
    func: &CudaFunction,
    blocks: u32,
    args: &A,
) -> Result<()> {
    let cfg = LaunchConfig {
        grid_dim: (blocks.max(1), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut builder = stream.launch_builder(func);
    builder.arg(args);
    // SAFETY: `func` comes from kernels/adamax.cu, whose every entry point takes exactly
    // one by-value struct, and `A` is the `repr(C)` mirror of that struct (sizes checked
    // at compile time on both sides). Callers build the struct from device addresses
    // they have checked: buffers in this stream's context, lengths that match the
    // element counts written in the struct, and state buffers this crate allocated for
    // those lengths; the kernel touches no element beyond them.
    unsafe { builder.launch(cfg) }
        .map(|_| ())
        .map_err(Error::driver("launching an AdaMax kernel"))
}
