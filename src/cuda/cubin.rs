//! Resource usage of every kernel in a CUBIN, read from the image itself.
//!
//! NVRTC's `--ptxas-options=--verbose` log is the usual source of register and stack
//! figures, but it is not always there: NVRTC 13.0.88 returned a one-byte log for
//! sm_90 on the GPU machine (2026-11-24) while the same call gave the full report for
//! other architectures. The CUBIN always carries the figures the driver itself uses,
//! in its ELF `.nv.info` section, so the no-spill audit reads them from there.
//!
//! # What is read
//!
//! The CUBIN is an ELF64 little-endian file. Its `.nv.info` section is a list of
//! records `{ u8 format, u8 attribute, u16 value-or-size, [size bytes] }`; the records
//! used here have format `EIFMT_SVAL` (4) and an 8-byte payload `{ u32 symbol, u32
//! value }`, where `symbol` indexes `.symtab`:
//!
//! | attribute | code | value |
//! | --- | --- | --- |
//! | `EIATTR_FRAME_SIZE` | 0x11 | bytes of local memory of the function's own frame (spills live there) |
//! | `EIATTR_MIN_STACK_SIZE` | 0x12 | stack the function needs with its calls |
//! | `EIATTR_MAX_STACK_SIZE` | 0x23 | stack bound with calls (present for some targets) |
//! | `EIATTR_REGCOUNT` | 0x2f | registers per thread |
//!
//! ptxas spills only to local memory, inside the frame: a function whose frame is 0
//! bytes has no spill stores or loads. Malformed input is an error, never a panic.

/// What the CUBIN says about one kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelResources {
    /// The kernel's symbol name.
    pub name: String,
    /// Registers per thread (`EIATTR_REGCOUNT`).
    pub registers: Option<u32>,
    /// Bytes of the kernel's own stack frame (`EIATTR_FRAME_SIZE`); spills need one.
    pub frame_bytes: Option<u32>,
    /// Stack bytes with its calls (`EIATTR_MIN_STACK_SIZE`).
    pub min_stack_bytes: Option<u32>,
    /// Stack bound with calls (`EIATTR_MAX_STACK_SIZE`), when present.
    pub max_stack_bytes: Option<u32>,
}

/// A CUBIN that could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a readable CUBIN: {0}; compile to a CUBIN (sm_XX), not PTX")]
pub struct CubinError(String);

const SHT_SYMTAB: u32 = 2;
const EIFMT_SVAL: u8 = 4;
const EIATTR_FRAME_SIZE: u8 = 0x11;
const EIATTR_MIN_STACK_SIZE: u8 = 0x12;
const EIATTR_MAX_STACK_SIZE: u8 = 0x23;
const EIATTR_REGCOUNT: u8 = 0x2f;

/// Bounds-checked little-endian reads.
struct Bytes<'a>(&'a [u8]);

impl<'a> Bytes<'a> {
    fn slice(&self, at: u64, len: u64) -> Result<&'a [u8], CubinError> {
        let start = usize::try_from(at).map_err(|_| err("offset out of range"))?;
        let len = usize::try_from(len).map_err(|_| err("length out of range"))?;
        start
            .checked_add(len)
            .and_then(|end| self.0.get(start..end))
            .ok_or_else(|| err(format!("{len} bytes at {start} run past the image")))
    }
    fn u8(&self, at: u64) -> Result<u8, CubinError> {
        Ok(self.slice(at, 1)?[0])
    }
    fn u16(&self, at: u64) -> Result<u16, CubinError> {
        let b = self.slice(at, 2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&self, at: u64) -> Result<u32, CubinError> {
        let b = self.slice(at, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&self, at: u64) -> Result<u64, CubinError> {
        let b = self.slice(at, 8)?;
        let mut w = [0u8; 8];
        w.copy_from_slice(b);
        Ok(u64::from_le_bytes(w))
    }
}

fn err(reason: impl Into<String>) -> CubinError {
    CubinError(reason.into())
}

struct Section {
    name: u32,
    kind: u32,
    offset: u64,
    size: u64,
    link: u32,
}

/// The resources of every function symbol that has a `.nv.info` record.
pub fn kernel_resources(image: &[u8]) -> Result<Vec<KernelResources>, CubinError> {
    let b = Bytes(image);
    if b.slice(0, 4)? != b"\x7fELF" {
        return Err(err("no ELF magic"));
    }
    if b.u8(4)? != 2 || b.u8(5)? != 1 {
        return Err(err("not a 64-bit little-endian ELF"));
    }
    let shoff = b.u64(0x28)?;
    let shentsize = u64::from(b.u16(0x3a)?);
    let shnum = u64::from(b.u16(0x3c)?);
    let shstrndx = u64::from(b.u16(0x3e)?);
    if shentsize < 64 {
        return Err(err("section headers too small"));
    }
    let sections = (0..shnum)
        .map(|i| {
            let h = shoff
                .checked_add(i * shentsize)
                .ok_or_else(|| err("section header offset overflows"))?;
            Ok(Section {
                name: b.u32(h)?,
                kind: b.u32(h + 4)?,
                offset: b.u64(h + 24)?,
                size: b.u64(h + 32)?,
                link: b.u32(h + 40)?,
            })
        })
        .collect::<Result<Vec<_>, CubinError>>()?;
    let section = |i: u64| {
        usize::try_from(i)
            .ok()
            .and_then(|i| sections.get(i))
            .ok_or_else(|| err(format!("section index {i} out of range")))
    };
    let names = section(shstrndx)?;
    let c_string = |table: &Section, at: u32| -> Result<String, CubinError> {
        let bytes = b.slice(table.offset, table.size)?;
        let tail = bytes
            .get(at as usize..)
            .ok_or_else(|| err("string offset out of range"))?;
        let end = tail
            .iter()
            .position(|&c| c == 0)
            .ok_or_else(|| err("unterminated string"))?;
        Ok(String::from_utf8_lossy(&tail[..end]).into_owned())
    };
    let symtab = sections
        .iter()
        .find(|s| s.kind == SHT_SYMTAB)
        .ok_or_else(|| err("no symbol table"))?;
    let strtab = section(u64::from(symtab.link))?;
    let symbol_name = |index: u32| -> Result<String, CubinError> {
        let at = u64::from(index)
            .checked_mul(24)
            .filter(|&at| at + 24 <= symtab.size)
            .ok_or_else(|| err(format!("symbol {index} out of range")))?;
        c_string(strtab, b.u32(symtab.offset + at)?)
    };
    let mut info = None;
    for s in &sections {
        if c_string(names, s.name)? == ".nv.info" {
            info = Some(s);
        }
    }
    let info = info.ok_or_else(|| err("no .nv.info section"))?;
    let records = b.slice(info.offset, info.size)?;
    let rb = Bytes(records);
    let mut out: Vec<KernelResources> = Vec::new();
    let mut at = 0u64;
    while at < info.size {
        let (format, attribute) = (rb.u8(at)?, rb.u8(at + 1)?);
        let value = rb.u16(at + 2)?;
        at += 4;
        if format != EIFMT_SVAL {
            continue;
        }
        let payload = rb.slice(at, u64::from(value))?;
        at += u64::from(value);
        let slot = match attribute {
            EIATTR_FRAME_SIZE | EIATTR_MIN_STACK_SIZE | EIATTR_MAX_STACK_SIZE | EIATTR_REGCOUNT => {
                attribute
            }
            _ => continue,
        };
        if payload.len() != 8 {
            return Err(err(format!(
                "attribute {slot:#x} has a {}-byte payload, expected 8",
                payload.len()
            )));
        }
        let pb = Bytes(payload);
        let (symbol, v) = (pb.u32(0)?, pb.u32(4)?);
        let name = symbol_name(symbol)?;
        let entry = match out.iter().position(|k| k.name == name) {
            Some(i) => &mut out[i],
            None => {
                out.push(KernelResources {
                    name,
                    registers: None,
                    frame_bytes: None,
                    min_stack_bytes: None,
                    max_stack_bytes: None,
                });
                let last = out.len() - 1;
                &mut out[last]
            }
        };
        let field = match slot {
            EIATTR_FRAME_SIZE => &mut entry.frame_bytes,
            EIATTR_MIN_STACK_SIZE => &mut entry.min_stack_bytes,
            EIATTR_MAX_STACK_SIZE => &mut entry.max_stack_bytes,
            _ => &mut entry.registers,
        };
        *field = Some(v);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_and_truncated_images_are_errors_not_panics() {
        for image in [
            &b""[..],
            b"\x7fELF",
            b"\x7fELF\x02\x01",
            b"not an elf at all, but long enough to have a header of sixty-four bytes.....",
        ] {
            assert!(kernel_resources(image).is_err());
        }
        // A 64-byte ELF header whose section table lies past the end.
        let mut h = vec![0u8; 64];
        h[..6].copy_from_slice(b"\x7fELF\x02\x01");
        h[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        h[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        h[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        assert!(kernel_resources(&h).is_err());
    }
}
