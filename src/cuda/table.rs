//! The tensor table: one row per tensor (its parameter, gradient and state addresses,
//! its length, first reduction chunk and first work unit, its settings), on the device
//! where the kernels read it. The launch plan owns the one table of an optimizer; this
//! module is the only one that builds rows, caches what the device holds and forgets it.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use crate::{
    config::{StateFormat, TensorHyper},
    error::{Error, Result},
    state::parts::Part,
};

use super::{args::TensorDesc, device::refuse_during_capture, state::DeviceState};

/// Flat parameter and gradient buffers, by device address: a table built for them
/// stays valid while neither moves.
pub(crate) type FlatKey = (u64, u64);

pub(crate) struct TensorTable {
    device: CudaSlice<TensorDesc>,
    /// What the device holds; empty when that is not known (nothing uploaded yet, or a
    /// failed write), so the next prepared table is uploaded whole.
    uploaded: Vec<TensorDesc>,
    /// The flat buffers the device's table was built for; `None` for a table built from
    /// per-tensor buffers.
    flat: Option<FlatKey>,
    /// The table of the step being prepared, and the flat buffers it is for (reused: no
    /// allocation per step once the capacity is there).
    next: Vec<TensorDesc>,
    next_flat: Option<FlatKey>,
    /// Whether `next` holds the table of the step about to be enqueued.
    pending: bool,
}

impl TensorTable {
    pub(crate) fn new(stream: &Arc<CudaStream>, tensors: usize) -> Result<Self> {
        Ok(Self {
            device: stream
                .alloc_zeros::<TensorDesc>(tensors.max(1))
                .map_err(Error::driver("allocating the tensor table"))?,
            uploaded: Vec::with_capacity(tensors),
            flat: None,
            next: Vec::with_capacity(tensors),
            next_flat: None,
            pending: false,
        })
    }

    /// The table of the next step, from each tensor's parameter address and its
    /// gradient's (`None`: no gradient this step), in tensor order. With `flat`, the
    /// table of those flat buffers: nothing is built when the device already holds it.
    pub(crate) fn prepare(
        &mut self,
        state: &DeviceState,
        hypers: &[TensorHyper],
        flat: Option<FlatKey>,
        addresses: impl Iterator<Item = (u64, Option<u64>)>,
    ) {
        if flat.is_some() && flat == self.flat {
            // Anything prepared before (for a step that was then refused) is dropped.
            self.pending = false;
            return;
        }
        self.next.clear();
        for (i, (param, grad)) in addresses.enumerate() {
            self.next.push(row(state, i, param, grad, &hypers[i]));
        }
        self.next_flat = flat;
        self.pending = true;
    }

    /// Uploads the prepared table if the device does not hold it; refused while the
    /// stream captures a CUDA graph, whose replays would copy host memory that has moved
    /// on.
    pub(crate) fn upload(&mut self, stream: &Arc<CudaStream>, capturing: bool) -> Result<()> {
        if !std::mem::take(&mut self.pending) {
            return Ok(());
        }
        if self.next != self.uploaded {
            if capturing {
                return Err(Error::DuringCapture {
                    what: "a step whose tensor table is not on the device yet (the first step, or buffers at other addresses)",
                    instead: "Take one eager step with the same buffers before begin_capture, then capture",
                });
            }
            if let Err(e) = stream.memcpy_htod(&self.next, &mut self.device) {
                // What the device holds is no longer known.
                self.uploaded.clear();
                self.flat = None;
                return Err(Error::driver("uploading the tensor table")(e));
            }
            std::mem::swap(&mut self.next, &mut self.uploaded);
        }
        self.flat = self.next_flat;
        Ok(())
    }

    /// The table's device address.
    pub(crate) fn device_ptr(&self, stream: &Arc<CudaStream>) -> u64 {
        self.device.device_ptr(stream).0
    }

    /// Writes every tensor's settings into the table on the device (one copy of the
    /// rows from the first to the last that changed), so that a captured step replays
    /// with them: the table is where the kernel reads them. Nothing to do before the
    /// first table is uploaded (that step builds it with these settings).
    pub(crate) fn set_hypers(
        &mut self,
        stream: &Arc<CudaStream>,
        hypers: &[TensorHyper],
    ) -> Result<()> {
        let Some(rows) = changed_rows(&self.uploaded, hypers) else {
            return Ok(());
        };
        let (first, last) = rows.into_inner();
        refuse_during_capture(
            stream,
            "changing a tensor's settings",
            "Change it before begin_capture or after end_capture: a captured step reads the settings from the device when it replays",
        )?;
        for (d, h) in self.uploaded[first..=last].iter_mut().zip(&hypers[first..]) {
            d.lr_scale = h.lr_scale;
            d.weight_decay = h.weight_decay;
        }
        let copied = stream
            .memcpy_htod(
                &self.uploaded[first..=last],
                &mut self.device.slice_mut(first..=last),
            )
            .map_err(Error::driver("writing tensor settings to the device"));
        if copied.is_err() {
            // The host copy no longer says what the device holds.
            self.uploaded.clear();
            self.flat = None;
        }
        copied
    }
}

/// The row of tensor `i` with its parameter address and its gradient's (`None`: no
/// gradient this step, the tensor is skipped): each part of the state in its field
/// (a moment's f32 values or, with 8-bit state, its codes).
fn row(
    state: &DeviceState,
    i: usize,
    param: u64,
    grad: Option<u64>,
    h: &TensorHyper,
) -> TensorDesc {
    let layout = state.layout();
    let mut d = TensorDesc {
        param,
        grad: grad.unwrap_or(0),
        has_grad: u64::from(grad.is_some()),
        blockwise8: u64::from(layout.formats()[i] == StateFormat::Blockwise8),
        stream_tensor: layout.placements()[i].tensor as u64,
        element_base: layout.placements()[i].element as u64,
        partial_begin: layout.placements()[i].chunk as u64,
        len: layout.lens[i] as u64,
        chunk_begin: layout.chunk_begin[i],
        unit_begin: layout.unit_begin[i],
        lr_scale: h.lr_scale,
        weight_decay: h.weight_decay,
        ..TensorDesc::default()
    };
    // The kernel's random stream takes a unit's Weyl term once and hashes groups of 8
    // elements: a piece starts at a multiple of the reduction chunk, keeping groups whole.
    debug_assert!(d.element_base.is_multiple_of(crate::fused::CHUNK as u64));
    for &part in state.parts_of(i) {
        let field = match part {
            Part::ExpAvg | Part::ExpAvgCodes => &mut d.exp_avg,
            Part::ExpInf | Part::ExpInfCodes => &mut d.exp_inf,
            Part::Master => &mut d.master,
            Part::ExpAvgScales => &mut d.exp_avg_scale,
            Part::ExpInfScales => &mut d.exp_inf_scale,
        };
        *field = state.address(part, i);
    }
    d
}

/// The rows of `table` from the first to the last whose settings differ from `hypers`.
fn changed_rows(
    table: &[TensorDesc],
    hypers: &[TensorHyper],
) -> Option<std::ops::RangeInclusive<usize>> {
    let differs = |(d, h): (&TensorDesc, &TensorHyper)| {
        (d.lr_scale, d.weight_decay) != (h.lr_scale, h.weight_decay)
    };
    let mut rows = table.iter().zip(hypers);
    let first = rows.clone().position(differs)?;
    let last = rows.rposition(differs).unwrap_or(first);
    Some(first..=last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_rows_whose_settings_changed_are_written() {
        let h = |lr_scale, weight_decay| TensorHyper {
            lr_scale,
            weight_decay,
        };
        let row = |t: TensorHyper| TensorDesc {
            lr_scale: t.lr_scale,
            weight_decay: t.weight_decay,
            ..TensorDesc::default()
        };
        let hypers = [h(1.0, 0.0), h(1.0, 0.1), h(0.5, 0.0), h(1.0, 0.0)];
        let table: Vec<TensorDesc> = hypers.iter().map(|&t| row(t)).collect();
        assert_eq!(changed_rows(&table, &hypers), None);
        assert_eq!(changed_rows(&[], &hypers), None, "no table uploaded yet");
        let mut one = hypers;
        one[2] = h(0.25, 0.0);
        assert_eq!(changed_rows(&table, &one), Some(2..=2));
        let mut two = one;
        two[0] = h(1.0, 0.5);
        assert_eq!(changed_rows(&table, &two), Some(0..=2));
    }
}
