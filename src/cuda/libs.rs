//! Whether the CUDA driver and NVRTC libraries can be loaded, checked by this crate
//! itself so that a missing library is a typed error instead of cudarc's panic.
//!
//! cudarc's own check (`sys::is_culib_present`) exists only when it loads libraries at
//! run time; a stack that links CUDA at build time (cudarc's `dynamic-linking`, as
//! candle does) removes it, so this asks the loader directly for the names cudarc
//! itself tries (a subset of them: finding one here means cudarc finds one too).

/// Library names of the CUDA driver.
#[cfg(windows)]
const DRIVER: &[&str] = &["nvcuda.dll"];
#[cfg(not(windows))]
const DRIVER: &[&str] = &["libcuda.so.1", "libcuda.so"];

/// Library names of NVRTC 13.x and 12.x.
#[cfg(windows)]
const NVRTC: &[&str] = &["nvrtc64_130_0.dll", "nvrtc64_120_0.dll", "nvrtc.dll"];
#[cfg(not(windows))]
const NVRTC: &[&str] = &["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"];

/// Whether any of `names` loads.
fn loads(names: &[&str]) -> bool {
    names.iter().any(|name| {
        // SAFETY: loading a CUDA library runs its initialisers, which is what cudarc
        // does with the same names on first use; the handle is closed again at once.
        unsafe { libloading::Library::new(*name) }.is_ok()
    })
}

/// Whether the CUDA driver library loads.
pub(crate) fn driver_present() -> bool {
    loads(DRIVER)
}

/// Whether an NVRTC library loads.
pub(crate) fn nvrtc_present() -> bool {
    loads(NVRTC)
}
