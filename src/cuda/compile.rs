//! NVRTC compilation of `kernels/adamax.cu` for one GPU architecture.

use std::{
    ffi::{c_char, c_int, CStr, CString},
    sync::OnceLock,
};

use cudarc::nvrtc::{result, sys};

use crate::error::{Error, Result};

use super::{args::layout_defines, entry::entry_points_define};

/// The CUDA source, embedded by build.rs.
#[doc(hidden)]
pub const SOURCE: &str = crate::kernels::ADAMAX_CU;
/// FNV-1a hash of [`SOURCE`] (a cache key).
#[doc(hidden)]
pub const SOURCE_HASH: u64 = crate::kernels::ADAMAX_CU_HASH;

/// Oldest architecture the kernels support (Turing, sm_75): the oldest NVRTC 13 targets.
#[doc(hidden)]
pub const MIN_ARCH: Arch = Arch { major: 7, minor: 5 };

/// A GPU architecture, as its compute capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Arch {
    /// Major version (9 for Hopper).
    pub major: u32,
    /// Minor version.
    pub minor: u32,
}

impl Arch {
    /// NVIDIA's number for the architecture: the major and minor digits written side
    /// by side (`75`, `90`, `100`, `121`); as text, so no value can overflow.
    pub(crate) fn number(self) -> String {
        format!("{}{}", self.major, self.minor)
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sm_{}", self.number())
    }
}

/// What NVRTC produced for one architecture.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// The architecture asked for.
    pub arch: Arch,
    /// The module image: a CUBIN for `arch`, or PTX (NUL-terminated) for the newest
    /// architecture this NVRTC knows when `arch` is newer than that.
    pub image: Vec<u8>,
    /// Whether `image` is PTX to be JIT-compiled by the driver.
    pub is_ptx: bool,
    /// NVRTC's log, including ptxas's register and spill report.
    pub log: String,
    /// The options used.
    pub options: Vec<String>,
}

/// Loads NVRTC if present; `Err(NvrtcNotFound)` instead of cudarc's panic otherwise.
#[doc(hidden)]
pub fn ensure_nvrtc() -> Result<()> {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    if *PRESENT.get_or_init(super::libs::nvrtc_present) {
        Ok(())
    } else {
        Err(Error::NvrtcNotFound)
    }
}

/// The loaded NVRTC's version, e.g. `(13, 0)`.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    ensure_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded; both pointers are valid for writes.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| nvrtc_error("nvrtcVersion", e))?;
    Ok((major, minor))
}

/// Architectures the loaded NVRTC can compile CUBINs for.
pub fn supported_archs() -> Result<Vec<Arch>> {
    ensure_nvrtc()?;
    let mut n: c_int = 0;
    // SAFETY: NVRTC is loaded; `n` is valid for writes.
    unsafe { sys::nvrtcGetNumSupportedArchs(&mut n) }
        .result()
        .map_err(|e| nvrtc_error("nvrtcGetNumSupportedArchs", e))?;
    let mut archs = vec![0 as c_int; usize::try_from(n).unwrap_or(0)];
    // SAFETY: `archs` has room for the `n` entries NVRTC writes.
    unsafe { sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
        .result()
        .map_err(|e| nvrtc_error("nvrtcGetSupportedArchs", e))?;
    Ok(archs
        .into_iter()
        .filter_map(|a| u32::try_from(a).ok())
        .map(|a| Arch {
            major: a / 10,
            minor: a % 10,
        })
        .collect())
}

fn nvrtc_error(what: &str, e: result::NvrtcError) -> Error {
    Error::Compile {
        arch: String::new(),
        nvrtc: format!("{what}: {e:?}"),
        options: Vec::new(),
        log: String::new(),
    }
}

/// The NVRTC options for `target` (`sm_XX` or `compute_XX`).
#[doc(hidden)]
pub fn options(target: &str) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={target}"),
        // The CPU reference fixes where fused multiply-adds happen; let NVRTC add none.
        "--fmad=false".into(),
        "--ftz=false".into(),
        "--prec-div=true".into(),
        "--std=c++17".into(),
        "--ptxas-options=--verbose".into(),
    ];
    o.extend(layout_defines());
    o.push(entry_points_define());
    o
}

/// Compiles the kernels for `arch`: a CUBIN when this NVRTC knows `arch`, else PTX for
/// the newest architecture it knows (the driver JIT-compiles it for the device).
#[doc(hidden)]
pub fn compile(arch: Arch) -> Result<Compiled> {
    compile_source(SOURCE, arch)
}

/// [`compile`] for another source, with the same options: for tests and tools that
/// check how failures are reported.
#[doc(hidden)]
pub fn compile_source(source: &str, arch: Arch) -> Result<Compiled> {
    ensure_nvrtc()?;
    let supported = supported_archs()?;
    let (target, is_ptx) = if supported.contains(&arch) {
        (arch.to_string(), false)
    } else {
        let newest = supported.iter().copied().filter(|a| *a <= arch).max();
        match newest {
            Some(a) => (format!("compute_{}", a.number()), true),
            None => {
                return Err(Error::Compile {
                    arch: arch.to_string(),
                    nvrtc: format!("this NVRTC targets {supported:?} only"),
                    options: Vec::new(),
                    log: "install an NVRTC that supports the device (CUDA 12.x or 13.x)".into(),
                })
            }
        }
    };
    let options = options(&target);
    let program = Program::new(source)?;
    let fail = |nvrtc: String, log: String| Error::Compile {
        arch: arch.to_string(),
        nvrtc,
        options: options.clone(),
        log,
    };
    // SAFETY: `program.0` is a live program; options are NUL-free ASCII.
    let status = unsafe { result::compile_program(program.0, &options) };
    let log = program.log().unwrap_or_else(|e| format!("(no log: {e:?})"));
    if let Err(e) = status {
        return Err(fail(format!("{e:?}"), log));
    }
    let image = if is_ptx {
        program.ptx()
    } else {
        program.cubin()
    }
    .map_err(|e| fail(format!("{e:?}"), log.clone()))?;
    Ok(Compiled {
        arch,
        image,
        is_ptx,
        log,
        options,
    })
}

/// An NVRTC program, destroyed on drop.
struct Program(sys::nvrtcProgram, #[allow(dead_code)] CString);

// The CString is kept alive beside the program, as cudarc's own wrapper does, in case
// an NVRTC version reads the source after nvrtcCreateProgram returns.
impl Program {
    fn new(source: &str) -> Result<Self> {
        let src = CString::new(source).map_err(|_| Error::Compile {
            arch: String::new(),
            nvrtc: "kernel source contains a NUL byte".into(),
            options: Vec::new(),
            log: String::new(),
        })?;
        let name = c"adamax.cu";
        let prog = result::create_program(&src, Some(name))
            .map_err(|e| nvrtc_error("nvrtcCreateProgram", e))?;
        Ok(Self(prog, src))
    }

    fn log(&self) -> Result<String, result::NvrtcError> {
        // SAFETY: live program.
        let raw = unsafe { result::get_program_log(self.0) }?;
        Ok(c_chars_to_string(&raw))
    }

    fn ptx(&self) -> Result<Vec<u8>, result::NvrtcError> {
        // SAFETY: live, compiled program.
        let raw = unsafe { result::get_ptx(self.0) }?;
        Ok(raw.into_iter().map(|c| c as u8).collect())
    }

    fn cubin(&self) -> Result<Vec<u8>, result::NvrtcError> {
        let mut size = 0usize;
        // SAFETY: live, compiled program; `size` is valid for writes.
        unsafe { sys::nvrtcGetCUBINSize(self.0, &mut size) }.result()?;
        let mut image = vec![0u8; size];
        // SAFETY: `image` has the `size` bytes NVRTC writes.
        unsafe { sys::nvrtcGetCUBIN(self.0, image.as_mut_ptr().cast::<c_char>()) }.result()?;
        Ok(image)
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by nvrtcCreateProgram and destroyed only here. A failure to
        // free cannot be reported from drop and leaks only the program.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

fn c_chars_to_string(raw: &[c_char]) -> String {
    let bytes: Vec<u8> = raw.iter().map(|&c| c as u8).collect();
    CStr::from_bytes_until_nul(&bytes)
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned())
}
