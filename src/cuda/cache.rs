//! On-disk cache of compiled kernel modules, so that only the first process on a machine
//! pays for NVRTC.
//!
//! Entries are keyed by the kernel source hash, the NVRTC options, the NVRTC version,
//! the architecture and this crate's version. The directory is `$ADAMAX_CUDA_CACHE_DIR`,
//! else `$XDG_CACHE_HOME/adamax-cuda`, else `$HOME/.cache/adamax-cuda` (on Windows
//! `%LOCALAPPDATA%\adamax-cuda`); paths are taken as the OS gives them (not
//! necessarily UTF-8). `ADAMAX_CUDA_CACHE` set to `0`, `off`, `false`, `no` or
//! `disabled` (any case, surrounding whitespace ignored) switches it off; any other
//! value, or none, leaves it on. A variable that is empty or only whitespace counts as
//! unset, and a relative `XDG_CACHE_HOME` or `HOME` is ignored (the XDG specification
//! says so of the first).
//! Writes are atomic (temporary file, then rename), and an entry that fails its checks
//! (magic, lengths, content hash) is ignored and rebuilt. The cache is
//! best-effort: a directory that cannot be written costs a compile, never an error.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use crate::{error::Result, fnv::fnv1a64, fsutil::write_atomically, trace};

use super::compile::{compile, nvrtc_version, options, Arch, Compiled, SOURCE_HASH};

const MAGIC: &[u8; 8] = b"ADMXCUB1";

/// What the cache did for one lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheOutcome {
    /// A valid entry was read; NVRTC was not called.
    Hit(PathBuf),
    /// No valid entry (absent or corrupt): compiled, and the entry written.
    Written(PathBuf),
    /// Compiled, but the entry could not be written (the reason is given).
    WriteFailed(String),
    /// The cache is switched off; compiled.
    Disabled,
}

/// Values of `ADAMAX_CUDA_CACHE` that switch the cache off (compared ignoring case).
#[doc(hidden)]
pub const OFF_VALUES: [&str; 5] = ["0", "off", "false", "no", "disabled"];

/// The cache directory from environment variables, as documented in this module;
/// `None` when switched off or when no home directory is known.
pub fn cache_dir() -> Option<PathBuf> {
    cache_dir_from(|k| std::env::var_os(k))
}

/// [`cache_dir`] with an explicit environment lookup.
///
/// Values are read as a shell user means them: `ADAMAX_CUDA_CACHE` ignores surrounding
/// whitespace and case (`" off"`, `"OFF\n"`); a variable that is empty or only
/// whitespace counts as unset; `XDG_CACHE_HOME` is ignored unless it is an absolute path,
/// as the XDG Base Directory specification says, and so is `HOME`.
/// `ADAMAX_CUDA_CACHE_DIR` is the user's own choice and is taken as given (relative to
/// the working directory when relative).
#[doc(hidden)]
pub fn cache_dir_from(env: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let set = |k: &str| env(k).filter(|v| !v.to_string_lossy().trim().is_empty());
    if let Some(v) = set("ADAMAX_CUDA_CACHE") {
        let v = v.to_string_lossy().trim().to_ascii_lowercase();
        if OFF_VALUES.contains(&v.as_str()) {
            return None;
        }
    }
    if let Some(dir) = set("ADAMAX_CUDA_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    let base = set("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            set("HOME")
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .map(|h| h.join(".cache"))
        })
        .or_else(|| set("LOCALAPPDATA").map(PathBuf::from))?;
    Some(base.join("adamax-cuda"))
}

/// The entry file for `arch` with the loaded NVRTC, in `dir`.
#[doc(hidden)]
pub fn entry_path(dir: &Path, arch: Arch) -> Result<PathBuf> {
    let (major, minor) = nvrtc_version()?;
    let mut key = format!(
        "{SOURCE_HASH:016x}\0{arch}\0nvrtc {major}.{minor}\0{}\0",
        env!("CARGO_PKG_VERSION")
    );
    // Both targets an arch may be compiled for; which one is used depends on NVRTC.
    for target in [arch.to_string(), format!("compute_{}", arch.number())] {
        key.push_str(&options(&target).join("\0"));
    }
    Ok(dir.join(format!(
        "adamax-{arch}-{:016x}.bin",
        fnv1a64(key.as_bytes())
    )))
}

/// [`compile`] through the cache in [`cache_dir`].
pub fn compile_cached(arch: Arch) -> Result<(Compiled, CacheOutcome)> {
    compile_cached_in(cache_dir().as_deref(), arch)
}

/// [`compile`] through the cache in `dir` (`None`: no cache).
/// With the `tracing` feature, every outcome is an event: a hit (debug), a miss and
/// the compile that follows (info, with its duration), a failed write (warn).
#[doc(hidden)]
pub fn compile_cached_in(dir: Option<&Path>, arch: Arch) -> Result<(Compiled, CacheOutcome)> {
    let Some(dir) = dir else {
        trace!(debug, %arch, "kernel cache off: compiling with NVRTC");
        return Ok((timed_compile(arch)?, CacheOutcome::Disabled));
    };
    let path = entry_path(dir, arch)?;
    if let Some(c) = std::fs::read(&path).ok().and_then(|b| decode(&b, arch)) {
        trace!(debug, %arch, path = %path.display(), "kernel cache hit");
        return Ok((c, CacheOutcome::Hit(path)));
    }
    trace!(info, %arch, path = %path.display(), "kernel cache miss: compiling with NVRTC");
    let compiled = timed_compile(arch)?;
    let outcome = std::fs::create_dir_all(dir)
        .map_err(|e| e.to_string())
        .and_then(|()| write_atomically(&path, &encode(&compiled)).map_err(|e| e.to_string()));
    Ok(match outcome {
        Ok(()) => {
            trace!(debug, %arch, path = %path.display(), "kernel cache written");
            (compiled, CacheOutcome::Written(path))
        }
        Err(reason) => {
            trace!(warn, %arch, %reason, "kernel cache write failed: the next process compiles again");
            (compiled, CacheOutcome::WriteFailed(reason))
        }
    })
}

/// [`compile`].
#[cfg(not(feature = "tracing"))]
fn timed_compile(arch: Arch) -> Result<Compiled> {
    compile(arch)
}

/// [`compile`], with its outcome and duration as an event.
#[cfg(feature = "tracing")]
fn timed_compile(arch: Arch) -> Result<Compiled> {
    let start = std::time::Instant::now();
    let compiled = compile(arch);
    let ms = start.elapsed().as_secs_f64() * 1e3;
    match &compiled {
        Ok(c) => trace!(info, %arch, ms, ptx = c.is_ptx, "NVRTC compiled the kernels"),
        Err(e) => trace!(warn, %arch, ms, error = %e, "NVRTC failed"),
    }
    compiled
}

/// MAGIC, is_ptx (1 byte), image length, image hash, log length (u64 LE each), image, log.
fn encode(c: &Compiled) -> Vec<u8> {
    let mut out = Vec::with_capacity(41 + c.image.len() + c.log.len());
    out.extend_from_slice(MAGIC);
    out.push(u8::from(c.is_ptx));
    out.extend_from_slice(&(c.image.len() as u64).to_le_bytes());
    out.extend_from_slice(&fnv1a64(&c.image).to_le_bytes());
    out.extend_from_slice(&(c.log.len() as u64).to_le_bytes());
    out.extend_from_slice(&c.image);
    out.extend_from_slice(c.log.as_bytes());
    out
}

/// The entry, or `None` when anything about it is off.
fn decode(b: &[u8], arch: Arch) -> Option<Compiled> {
    let word = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
    };
    if b.get(..8)? != MAGIC {
        return None;
    }
    let is_ptx = match *b.get(8)? {
        0 => false,
        1 => true,
        _ => return None,
    };
    let image_len = usize::try_from(word(9)?).ok()?;
    let hash = word(17)?;
    let log_len = usize::try_from(word(25)?).ok()?;
    let image_end = 33usize.checked_add(image_len)?;
    if b.len() != image_end.checked_add(log_len)? {
        return None;
    }
    let image = b[33..image_end].to_vec();
    if fnv1a64(&image) != hash || image.is_empty() {
        return None;
    }
    let log = String::from_utf8(b[image_end..].to_vec()).ok()?;
    let target = if is_ptx {
        format!("compute_{}", arch.number())
    } else {
        arch.to_string()
    };
    Some(Compiled {
        arch,
        image,
        is_ptx,
        log,
        options: options(&target),
    })
}
