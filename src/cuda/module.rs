//! The compiled kernels of a CUDA context: NVRTC (or the on-disk cache) once per
//! context and process, the module loaded, every entry point looked up; and the
//! crate's one `unsafe` launch site.

use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{
    result, sys::CUdevice_attribute, CudaContext, CudaFunction, CudaModule, CudaStream, DeviceRepr,
};
use cudarc::nvrtc::Ptx;

use crate::{
    error::{Error, Result},
    trace,
};

use super::{
    cache::compile_cached,
    compile::{Arch, MIN_ARCH},
    entry::EntryPoint,
};

/// The compiled kernels of one CUDA context.
pub(crate) struct Kernels {
    _module: Arc<CudaModule>,
    /// Indexed by [`EntryPoint::index`]; every one is loaded at construction.
    functions: Vec<CudaFunction>,
    /// Blocks of each entry point that fill the device once (a whole wave):
    /// multiprocessors x the blocks of that kernel that fit on one.
    waves: Vec<u32>,
}

impl Kernels {
    /// The function of entry point `e`.
    pub(crate) fn function(&self, e: EntryPoint) -> &CudaFunction {
        &self.functions[e.index()]
    }

    /// The grid of one whole wave of entry point `e`: a grid-stride kernel launched
    /// with it keeps every multiprocessor at that kernel's own occupancy.
    pub(crate) fn wave(&self, e: EntryPoint) -> u32 {
        self.waves[e.index()]
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
    trace!(info, ordinal = ctx.ordinal(), %arch, outcome = ?_outcome, "loading the AdaMax kernels");
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
    let functions = EntryPoint::all()
        .map(|e| {
            module
                .load_function(e.name())
                .map_err(Error::driver("finding a kernel entry point"))
        })
        .collect::<Result<Vec<_>>>()?;
    let sms = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(Error::driver("reading the multiprocessor count"))?;
    let sms = u32::try_from(sms).unwrap_or(1).max(1);
    // Each kernel's own occupancy: the first H100 run launched the f32 update with the
    // bf16 kernel's (fewer blocks per multiprocessor), two thirds of a wave.
    let waves = functions
        .iter()
        .zip(EntryPoint::all())
        .map(|(f, e)| {
            let per_sm = f
                .occupancy_max_active_blocks_per_multiprocessor(e.threads(), 0, None)
                .map_err(Error::driver("querying occupancy"))?;
            Ok(sms * per_sm.max(1))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Kernels {
        _module: module,
        functions,
        waves,
    })
}

/// Enqueues entry point `e` of `kernels` on `stream` with `blocks` blocks of its threads
/// ([`EntryPoint::threads`]) and one by-value argument struct: the crate's only launch
/// site. Calls the driver directly (cudarc's launch builder allocates its argument list
/// on every launch).
pub(crate) fn launch<A: DeviceRepr>(
    stream: &CudaStream,
    kernels: &Kernels,
    e: EntryPoint,
    blocks: u32,
    args: &A,
) -> Result<()> {
    let func = kernels.function(e);
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
            (e.threads(), 1, 1),
            0,
            stream.cu_stream(),
            &mut params,
        )
    }
    .map_err(Error::driver("launching an AdaMax kernel"))
}
