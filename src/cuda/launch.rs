//! The plan of one step: its tensor table, the partial sums of the reduction, the
//! grid, and the order of the kernels.

use std::{mem::offset_of, sync::Arc};

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use crate::{
    error::{Error, Result},
    storage::StorageType,
};

use super::{
    args::{AdamaxArgs, Control, StepState, FLAG_CHECK, FLAG_CLIP},
    device::is_capturing,
    entry::EntryPoint,
    layout::StateLayout,
    module::{launch, Kernels},
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
    /// For one rank's shard: the buffer the exchange leaves every rank's partial sums in,
    /// which finalize reads (the reduction's own buffer keeps zeros at the other ranks'
    /// chunks, so that the exchange adds each chunk's sum to zeros only).
    summed: Option<(CudaSlice<f32>, u64)>,
    num_tensors: u64,
    num_chunks: u64,
    num_partials: u64,
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
        exchanged: bool,
    ) -> Result<Self> {
        let reduce = EntryPoint::reduce(storage);
        // One partial sum per chunk of the whole list (a shard's are placed among them).
        let chunks = usize::try_from(layout.num_partials()).map_err(|_| Error::TooLarge {
            what: "the chunk count of the parameter list",
        })?;
        let partials = stream
            .alloc_zeros::<f32>(chunks.max(1))
            .map_err(Error::driver("allocating the partial sums"))?;
        let partials_ptr = partials.device_ptr(stream).0;
        let summed = if exchanged {
            let buf = stream
                .alloc_zeros::<f32>(chunks.max(1))
                .map_err(Error::driver("allocating the exchanged partial sums"))?;
            let ptr = buf.device_ptr(stream).0;
            Some((buf, ptr))
        } else {
            None
        };
        Ok(Self {
            summed,
            table: TensorTable::new(stream, layout.lens().len())?,
            _partials: partials,
            partials_ptr,
            num_tensors: layout.lens().len() as u64,
            num_chunks: layout.num_chunks(),
            num_partials: layout.num_partials(),
            num_units: layout.num_units(),
            unit_len: layout.unit_len(),
            step_grid: grid(layout.num_units(), kernels.wave(step)),
            reduce_grid: grid(layout.num_chunks(), kernels.wave(reduce)),
            step,
            reduce,
        })
    }

    /// Whether the plan is one rank's shard's, whose decision exchanges partial sums.
    pub(crate) fn exchanged(&self) -> bool {
        self.summed.is_some()
    }

    /// Uploads a table prepared for this step if the device does not hold it, then
    /// enqueues the step: the reduction and the one-block finalize that decides the step
    /// when the flags need them (the overflow check or clipping) or when the stream is
    /// capturing a CUDA graph (see [`decision_passes`]); then the update, which counts
    /// the step itself (so the common eager step is one launch). Nothing here reads a
    /// host value that changes per step, so the same calls can be captured in a CUDA
    /// graph and replayed. A plan built for a shard (`exchanged`) calls `exchange`
    /// between the reduction and the decision pass (see [`Exchanged`]); it must be
    /// given then, and only then.
    pub(crate) fn enqueue(
        &mut self,
        stream: &Arc<CudaStream>,
        kernels: &Kernels,
        args: AdamaxArgs,
        flags: u32,
        exchange: Option<&mut Exchange<'_>>,
    ) -> Result<()> {
        let capturing = is_capturing(stream)?;
        self.table.upload(stream, capturing)?;
        let args = AdamaxArgs {
            tensors: self.table.device_ptr(stream),
            num_tensors: self.num_tensors,
            num_chunks: self.num_chunks,
            num_partials: self.num_partials,
            num_units: self.num_units,
            unit_len: self.unit_len,
            partials: self.partials_ptr,
            ..args
        };
        if decision_passes(flags, capturing) {
            if self.num_chunks > 0 {
                launch(stream, kernels, self.reduce, self.reduce_grid, &args)?;
            }
            let decided =
                match (&self.summed, exchange) {
                    (None, None) => args,
                    (Some((_, summed)), Some(exchange)) => {
                        exchange(&Exchanged {
                            send: self.partials_ptr,
                            recv: *summed,
                            count: self.num_partials.max(1) as usize,
                            found_inf: args.control
                                + (offset_of!(Control, state) + offset_of!(StepState, found_inf))
                                    as u64,
                        })?;
                        AdamaxArgs {
                            partials: *summed,
                            ..args
                        }
                    }
                    _ => return Err(Error::Internal {
                        what: "a shard's step without its exchange, or an exchange without a shard",
                    }),
                };
            launch(stream, kernels, EntryPoint::Finalize, 1, &decided)?;
        }
        // Launched even with no elements: it counts the step.
        launch(stream, kernels, self.step, self.step_grid, &args)
    }
}

/// What a sharded step exchanges between its reduction and its decision: device
/// addresses of this rank's partial sums of squares (`count` f32, its own chunks' sums
/// and zeros at every other rank's), of the buffer the decision reads them from
/// (`count` f32), and of its overflow flag (one `u32`, 0 or 1). The exchange enqueues,
/// on the optimizer's stream, the collectives that leave in `recv` the sum over ranks
/// of `send` (each chunk's sum added to zeros only, so exact in any order), and in
/// `found_inf` the maximum over ranks, alike on every rank.
// Read by the NCCL exchange only (feature `nccl`).
#[cfg_attr(not(feature = "nccl"), allow(dead_code))]
pub(crate) struct Exchanged {
    pub(crate) send: u64,
    pub(crate) recv: u64,
    pub(crate) count: usize,
    pub(crate) found_inf: u64,
}

/// The collective of a sharded step's decision ([`Exchanged`]).
pub(crate) type Exchange<'a> = dyn FnMut(&Exchanged) -> Result<()> + 'a;

/// Whether a step enqueues the reduction and the decision pass before the update: when
/// its flags need them (the overflow check or clipping), and always in a step captured
/// in a CUDA graph, whose replays must honour flags set after the capture (the kernels
/// read the flags when they run and return at once without them; see the kernel's
/// NOTE: [captured steps]).
pub(crate) fn decision_passes(flags: u32, capturing: bool) -> bool {
    capturing || flags & (FLAG_CHECK | FLAG_CLIP) != 0
}

/// Blocks for `work` grid-stride items: at most one wave, at least one block.
fn grid(work: u64, wave: u32) -> u32 {
    u32::try_from(work.min(u64::from(wave)).max(1)).unwrap_or(1)
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
