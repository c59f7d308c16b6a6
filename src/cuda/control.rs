//! The device control block: the optimizer state that lives on the GPU so that a step
//! reads no host value (and a captured CUDA graph replays correctly).
//!
//! The host keeps a typed copy of what it decides ([`ControlParams`]: learning rate,
//! flags, clipping and scaler settings) and uploads it whole, in one copy, whenever a
//! setting changes; the kernels own the scaler and step state. Changes that touch the
//! kernels' part too (setting a loss scaler, restoring a checkpoint) read the block,
//! change it and write it back whole. Every change is one copy on the optimizer's
//! stream, ordered before the next step, and the host copy is updated only once that
//! copy has been enqueued: a failed driver call leaves both sides as they were.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use crate::error::{Error, Result};

use super::{
    args::{Control, ControlParams},
    device::refuse_during_capture,
};

/// What to do instead of changing settings during a capture.
const OUTSIDE_CAPTURE: &str = "Do it before begin_capture or after end_capture: a captured step reads the settings from the device when it replays";

/// The control block on the device and the host's copy of its settings.
pub(crate) struct ControlBlock {
    stream: Arc<CudaStream>,
    buf: CudaSlice<Control>,
    /// Device address of `buf`. Only the optimizer's stream touches the block, so its
    /// launches need none of cudarc's cross-stream events.
    ptr: u64,
    params: ControlParams,
}

impl ControlBlock {
    /// Allocates the block on `stream` with `initial` in it.
    pub(crate) fn new(stream: &Arc<CudaStream>, initial: Control) -> Result<Self> {
        let buf = stream
            .clone_htod(&[initial])
            .map_err(Error::driver("allocating the control block"))?;
        let ptr = buf.device_ptr(stream).0;
        Ok(Self {
            stream: stream.clone(),
            buf,
            ptr,
            params: initial.params,
        })
    }

    /// The block's device address, for the kernels' arguments.
    pub(crate) fn device_ptr(&self) -> u64 {
        self.ptr
    }

    /// The settings last uploaded.
    pub(crate) fn params(&self) -> &ControlParams {
        &self.params
    }

    /// Uploads `params` (one copy of the settings part) and then keeps it as the host
    /// copy; on a driver error neither side changes.
    pub(crate) fn set_params(&mut self, params: ControlParams) -> Result<()> {
        refuse_during_capture(
            &self.stream,
            "changing the optimizer's settings",
            OUTSIDE_CAPTURE,
        )?;
        // SAFETY: `params` is the first field of the repr(C) `Control` (offset 0,
        // checked with the kernel), and ControlParams is plain old data.
        let mut view =
            unsafe { self.buf.transmute_mut::<ControlParams>(1) }.ok_or(Error::Internal {
                what: "the control block is smaller than its settings part",
            })?;
        self.stream
            .memcpy_htod(&[params], &mut view)
            .map_err(Error::driver(
                "writing the optimizer settings to the device",
            ))?;
        self.params = params;
        Ok(())
    }

    /// The whole block, copied to the host (synchronises the stream).
    pub(crate) fn read(&self) -> Result<Control> {
        refuse_during_capture(
            &self.stream,
            "reading the optimizer's step state (step_count, last_report, loss_scaler, checkpoints)",
            "Read it after end_capture",
        )?;
        let mut out = [Control::default()];
        self.stream
            .memcpy_dtoh(&self.buf, &mut out[..])
            .and_then(|()| self.stream.synchronize())
            .map_err(Error::driver("reading the control block"))?;
        Ok(out[0])
    }

    /// Reads the block (synchronises), applies `change`, and writes it back whole in
    /// one copy; the host copy of the settings follows only once the copy is enqueued.
    pub(crate) fn update(&mut self, change: impl FnOnce(&mut Control)) -> Result<()> {
        refuse_during_capture(
            &self.stream,
            "setting a loss scaler or restoring a checkpoint",
            OUTSIDE_CAPTURE,
        )?;
        let mut c = self.read()?;
        c.params = self.params;
        change(&mut c);
        self.stream
            .memcpy_htod(&[c], &mut self.buf)
            .map_err(Error::driver("writing the control block"))?;
        self.params = c.params;
        Ok(())
    }
}
