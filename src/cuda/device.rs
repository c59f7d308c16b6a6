//! Loading the driver, one compiled module per CUDA context, and the launch site.

use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{
    sys::{CUcontext, CUdevice_attribute, CUresult, CUstream},
    CudaContext, CudaFunction, CudaModule, CudaStream, DeviceRepr, DriverError, LaunchConfig,
    PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use crate::error::{Error, Result};

use super::{
    args::BLOCK,
    cache::compile_cached,
    compile::{Arch, MIN_ARCH},
};

/// Loads the CUDA driver library if present; `Err(DriverNotFound)` instead of cudarc's
/// panic otherwise.
pub fn ensure_driver() -> Result<()> {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only tries to dlopen the library names cudarc knows.
    if *PRESENT.get_or_init(|| unsafe { cudarc::driver::sys::is_culib_present() }) {
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
    let count = device_count()?;
    if ordinal >= count {
        return Err(Error::Driver {
            context: if count == 0 {
                "finding a CUDA device (none is visible)"
            } else {
                "finding a CUDA device (ordinal out of range)"
            },
            source: DriverError(CUresult::CUDA_ERROR_INVALID_DEVICE),
        });
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
        return Err(Error::Driver {
            context: "borrowing a stream: it belongs to another CUDA context than the device's primary context",
            source: DriverError(CUresult::CUDA_ERROR_INVALID_CONTEXT),
        });
    }
    // SAFETY: `raw` belongs to `ctx` (checked above) and outlives its uses (contract).
    Ok(unsafe { ctx.wrap_borrowed_stream(raw) })
}

/// The compiled kernels of one CUDA context.
pub(crate) struct Kernels {
    _module: Arc<CudaModule>,
    functions: Vec<(&'static str, CudaFunction)>,
    /// Blocks that fill the device once: multiprocessors x resident blocks of the
    /// heaviest step kernel.
    pub(crate) max_grid: u32,
}

impl Kernels {
    /// The entry point `{prefix}{suffix}` (every one is loaded at construction).
    pub(crate) fn function(&self, prefix: &str, suffix: &str) -> &CudaFunction {
        self.find(prefix, suffix)
            .unwrap_or_else(|| unreachable!("{prefix}{suffix} is in ENTRY_POINTS"))
    }

    pub(crate) fn init_master(&self, storage: &str) -> Option<&CudaFunction> {
        self.find("adamax_init_master_", storage)
    }

    fn find(&self, prefix: &str, storage: &str) -> Option<&CudaFunction> {
        self.functions
            .iter()
            .find(|(name, _)| name.strip_prefix(prefix) == Some(storage))
            .map(|(_, f)| f)
    }
}

/// The kernels for `ctx`, compiled by NVRTC on first use in this process (or read from
/// the on-disk cache) and kept for the process.
pub(crate) fn kernels_for(ctx: &Arc<CudaContext>) -> Result<Arc<Kernels>> {
    type Cache = Mutex<Vec<(usize, Arc<Kernels>)>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let key = ctx.cu_ctx() as usize;
    // A panic elsewhere while holding the lock leaves the cache itself consistent.
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, k)) = cache.iter().find(|(k, _)| *k == key) {
        return Ok(k.clone());
    }
    let kernels = Arc::new(load(ctx)?);
    cache.push((key, kernels.clone()));
    Ok(kernels)
}

fn load(ctx: &Arc<CudaContext>) -> Result<Kernels> {
    let (major, minor) = ctx
        .compute_capability()
        .map_err(Error::driver("reading the compute capability"))?;
    let arch = Arch {
        major: u32::try_from(major).unwrap_or(0),
        minor: u32::try_from(minor).unwrap_or(0),
    };
    if arch < MIN_ARCH {
        return Err(Error::UnsupportedDevice {
            ordinal: ctx.ordinal(),
            major,
            minor,
        });
    }
    // A failure to write the cache costs a compile next time, nothing more.
    let (compiled, _outcome) = compile_cached(arch)?;
    let image = if compiled.is_ptx {
        Ptx::from_src(
            String::from_utf8_lossy(&compiled.image)
                .trim_end_matches('\0')
                .to_owned(),
        )
    } else {
        Ptx::from_binary(compiled.image)
    };
    let module = ctx
        .load_module(image)
        .map_err(Error::driver("loading the compiled kernels"))?;
    let mut functions = Vec::new();
    for name in super::compile::ENTRY_POINTS {
        let f = module
            .load_function(name)
            .map_err(Error::driver("finding a kernel entry point"))?;
        functions.push((name, f));
    }
    let sms = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(Error::driver("reading the multiprocessor count"))?;
    let mut per_sm = u32::MAX;
    for (name, f) in &functions {
        if name.starts_with("adamax_step_") {
            let n = f
                .occupancy_max_active_blocks_per_multiprocessor(BLOCK, 0, None)
                .map_err(Error::driver("querying occupancy"))?;
            per_sm = per_sm.min(n.max(1));
        }
    }
    Ok(Kernels {
        _module: module,
        functions,
        max_grid: u32::try_from(sms).unwrap_or(1).max(1) * per_sm,
    })
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
