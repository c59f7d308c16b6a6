//! The driver, devices and streams: loading the driver library, primary contexts,
//! streams (our own or another stack's), whether a stream is capturing a CUDA graph,
//! and the check that a buffer lives in the optimizer's context.

use std::sync::{Arc, OnceLock};

use cudarc::driver::{
    sys::{CUcontext, CUresult, CUstream},
    CudaContext, CudaStream, DeviceSlice,
};

use crate::error::{Error, Result};

/// Loads the CUDA driver library if present; `Err(DriverNotFound)` instead of cudarc's
/// panic otherwise.
pub fn ensure_driver() -> Result<()> {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    if *PRESENT.get_or_init(super::libs::driver_present) {
        Ok(())
    } else {
        Err(Error::DriverNotFound)
    }
}

/// Number of CUDA devices; `Ok(0)` when the driver is installed but sees no GPU.
pub fn device_count() -> Result<usize> {
    ensure_driver()?;
    match CudaContext::device_count() {
        Ok(n) => Ok(usize::try_from(n).unwrap_or(0)),
        // cuInit fails with NO_DEVICE on machines whose driver sees no GPU.
        Err(e) if e.0 == CUresult::CUDA_ERROR_NO_DEVICE => Ok(0),
        Err(e) => Err(Error::Driver {
            context: "counting CUDA devices",
            source: e,
        }),
    }
}

/// The primary context of device `ordinal`, with typed errors for a missing driver or
/// device.
fn primary_context(ordinal: usize) -> Result<Arc<CudaContext>> {
    let visible = device_count()?;
    if ordinal >= visible {
        return Err(Error::NoSuchDevice { ordinal, visible });
    }
    CudaContext::new(ordinal).map_err(Error::driver("creating a CUDA context"))
}

/// The default stream of device `ordinal`'s primary context, with typed errors for a
/// missing driver or device. (A device older than sm_75 is refused when an optimizer
/// is built on it.)
pub fn default_stream(ordinal: usize) -> Result<Arc<CudaStream>> {
    Ok(primary_context(ordinal)?.default_stream())
}

/// Wraps a stream owned by another CUDA stack (another cudarc version, candle, burn,
/// tch: all use the device's primary context) so that an optimizer built on it enqueues
/// its work in that stack's stream order.
///
/// Checked here: the driver and device exist, and `raw` belongs to the primary context
/// of device `ordinal` (`cuStreamGetCtx`).
///
/// # Safety
///
/// `raw` is a live `CUstream` (or null, the legacy default stream) and its owner keeps
/// it alive while anything built on the returned stream may use it.
pub unsafe fn borrow_stream(ordinal: usize, raw: CUstream) -> Result<Arc<CudaStream>> {
    let ctx = primary_context(ordinal)?;
    ctx.bind_to_thread()
        .map_err(Error::driver("binding the CUDA context"))?;
    let mut owner: CUcontext = std::ptr::null_mut();
    // SAFETY: `raw` is a live stream (the caller's contract); `owner` is writable.
    unsafe { cudarc::driver::sys::cuStreamGetCtx(raw, &mut owner) }
        .result()
        .map_err(Error::driver("asking the borrowed stream for its context"))?;
    if owner != ctx.cu_ctx() {
        return Err(Error::ForeignStream { ordinal });
    }
    // SAFETY: `raw` belongs to `ctx` (checked above) and outlives its uses (contract).
    Ok(unsafe { ctx.wrap_borrowed_stream(raw) })
}

/// Every buffer must live in the optimizer's CUDA context (`None`: no buffer for that
/// tensor, nothing to check).
pub(crate) fn check_devices<'b, T: 'b, B: DeviceSlice<T> + 'b>(
    stream: &CudaStream,
    what: &'static str,
    bufs: impl IntoIterator<Item = Option<&'b B>>,
) -> Result<()> {
    let ours: &Arc<CudaContext> = stream.context();
    for (tensor, b) in bufs.into_iter().enumerate() {
        let Some(b) = b else { continue };
        let theirs = b.stream().context();
        if theirs.cu_ctx() != ours.cu_ctx() {
            return Err(Error::WrongDevice {
                what,
                tensor,
                expected: ours.ordinal(),
                found: theirs.ordinal(),
            });
        }
    }
    Ok(())
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
