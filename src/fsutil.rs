//! File helpers shared by checkpoints and the kernel cache.

use std::{
    fs,
    io::{self, Write},
    path::Path,
};

use crate::error::{Error, Result};

/// Writes `bytes` to `path` atomically (see [`write_atomically_with`]).
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically_with(path, |w| w.write_all(bytes))
}

/// Writes to `path` atomically what `write` writes: to a temporary file in the same
/// directory (so the rename cannot cross file systems), buffered, flushed to disk,
/// then renamed over `path`. Readers see the old content or the new, never a torn
/// file; on any error the temporary file is removed and `path` is untouched.
pub(crate) fn write_atomically_with(
    path: &Path,
    write: impl FnOnce(&mut io::BufWriter<fs::File>) -> io::Result<()>,
) -> Result<()> {
    let io_err = |source| Error::io("writing", path, source);
    // Only a regular file is replaced: renaming over a device, a FIFO, a directory or a
    // symbolic link would put a file in its place (`/dev/null` included, as root).
    if path.as_os_str().is_empty() {
        return Err(io_err(io::ErrorKind::NotFound.into()));
    }
    if let Ok(m) = fs::symlink_metadata(path) {
        if !m.file_type().is_file() {
            return Err(io_err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "it exists and is not a regular file (a directory, device, FIFO or symbolic link), which saving would replace",
            )));
        }
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(".{}.{:x}.tmp", std::process::id(), unique()));
    let tmp = dir.join(name);
    let result = (|| {
        let mut w = io::BufWriter::with_capacity(1 << 20, fs::File::create(&tmp)?);
        write(&mut w)?;
        let f = w.into_inner().map_err(io::IntoInnerError::into_error)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        // Best effort: a leftover temporary file is harmless but untidy.
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err)
}

/// A value distinct per call within the process, for temporary file names.
fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ NEXT.fetch_add(1, Ordering::Relaxed).rotate_left(48)
}
