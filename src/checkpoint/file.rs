//! The safetensors file: writing it deterministically, reading it within bounds, and
//! the integrity checksum. Validation of what was read is the parent module's.
//!
//! The writer is this crate's own (the format is an 8-byte header length, a JSON
//! header padded with spaces to 8 bytes, then the tensors' bytes) so that the header's
//! key order is fixed (sorted) and tensors stream to the file without a copy of the
//! whole file in memory. The header is parsed by the `safetensors` crate, which checks
//! that the tensors' offsets tile the data exactly.

use std::{
    collections::{BTreeMap, HashMap},
    io::{Read, Seek, SeekFrom, Write},
};

use safetensors::{tensor::Metadata, Dtype};
use xxhash_rust::xxh3::Xxh3;

use super::{refuse, Checkpoint, Entry};
use crate::error::Error;
use crate::{
    config::{Precision, StateFormat},
    state::parts::{Data, Elem},
    storage::StorageType,
};

/// The metadata key of the integrity checksum.
pub(super) const CHECKSUM_KEY: &str = "checksum";
/// The largest header read (the `safetensors` crate's own limit).
const MAX_HEADER: u64 = 100_000_000;
/// Bytes converted at a time between f32 values and file bytes.
const BLOCK_BYTES: usize = 1 << 16;

/// The safetensors type of values.
pub(super) fn dtype(elem: Elem) -> Dtype {
    match elem {
        Elem::F32 => Dtype::F32,
        Elem::U8 => Dtype::U8,
    }
}

/// The little-endian bytes of `data`, a block at a time, to `sink`.
fn for_each_le_block(
    data: &Data,
    mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    match data {
        Data::F32(v) => {
            let mut buf = [0u8; BLOCK_BYTES];
            for chunk in v.chunks(BLOCK_BYTES / 4) {
                for (b, x) in buf.chunks_exact_mut(4).zip(chunk) {
                    b.copy_from_slice(&x.to_le_bytes());
                }
                sink(&buf[..4 * chunk.len()])?;
            }
            Ok(())
        }
        Data::U8(v) => v.chunks(BLOCK_BYTES).try_for_each(sink),
    }
}

/// One tensor as read from a file.
pub(super) struct RawTensor {
    pub shape: Vec<usize>,
    pub data: Data,
}

/// A file's metadata and tensors, read but not yet validated.
pub(super) struct RawFile {
    pub meta: HashMap<String, String>,
    /// By name, so that iteration is in name order (the checksum's order).
    pub tensors: BTreeMap<String, RawTensor>,
}

pub(super) enum WriteError {
    Invalid(Error),
    Io(std::io::Error),
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteError::Invalid(e) => e.fmt(f),
            WriteError::Io(e) => e.fmt(f),
        }
    }
}

pub(super) enum ReadError {
    Refused(Error),
    Io(std::io::Error),
}

/// The integrity checksum, computed incrementally: XXH3-64 over the metadata (every key
/// but the checksum, in key order: key, NUL, value, NUL) and then every tensor in name
/// order (name, NUL, `F32`, NUL, rank, dimensions and byte length as u64
/// little-endian, the bytes).
struct Checksum(Xxh3);

impl Checksum {
    fn new<'a>(meta: impl Iterator<Item = (&'a str, &'a str)>) -> Self {
        let mut h = Xxh3::new();
        h.update(b"adamax-cuda checkpoint checksum 1\0");
        for (k, v) in meta.filter(|(k, _)| *k != CHECKSUM_KEY) {
            for part in [k.as_bytes(), b"\0", v.as_bytes(), b"\0"] {
                h.update(part);
            }
        }
        Self(h)
    }

    fn entry(&mut self, name: &str, shape: &[usize], data: &Data) {
        let h = &mut self.0;
        h.update(name.as_bytes());
        h.update(match data {
            Data::F32(_) => b"\0F32\0",
            Data::U8(_) => b"\0U8\0",
        });
        h.update(&(shape.len() as u64).to_le_bytes());
        for &d in shape {
            h.update(&(d as u64).to_le_bytes());
        }
        let bytes = data.len() * data.elem().size();
        h.update(&(bytes as u64).to_le_bytes());
        // Writing to a hasher cannot fail.
        let _ = for_each_le_block(data, |b| {
            h.update(b);
            Ok(())
        });
    }

    fn finish(self) -> String {
        format!("xxh3-64:{:016x}", self.0.digest())
    }
}

/// Refuses `raw` unless its stored checksum matches its content.
pub(super) fn verify_checksum(raw: &RawFile, stored: &str) -> Result<(), Error> {
    let mut meta: Vec<(&str, &str)> = raw
        .meta
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    meta.sort_unstable();
    let mut sum = Checksum::new(meta.into_iter());
    for (name, t) in &raw.tensors {
        sum.entry(name, &t.shape, &t.data);
    }
    let actual = sum.finish();
    if actual == stored {
        Ok(())
    } else {
        Err(refuse(format!(
            "its integrity check failed (stored {stored}, content gives {actual}): the file is corrupt or was edited"
        )))
    }
}

/// One tensor of a file being written: its data comes from the caller when its turn
/// comes, so a file is written one tensor at a time.
pub(super) struct EntrySpec {
    pub name: String,
    pub elem: Elem,
    pub shape: Vec<usize>,
    pub len: usize,
}

/// The checksum's place in the header until the data has been hashed.
const PLACEHOLDER: &str = "xxh3-64:0000000000000000";

/// A file ready to be written: its entries (in name order) with which tensor and part
/// each one is, and its header, built (and its size checked) before any byte is
/// written or any file created.
pub(super) struct Plan {
    specs: Vec<EntrySpec>,
    which: Vec<(usize, Entry)>,
    /// The JSON header, padded, with the checksum placeholder at `at`.
    text: Vec<u8>,
    at: usize,
    sum: Checksum,
}

impl Plan {
    /// The file of tensors of `lens` with `storage` kept in `precision`, and `meta`
    /// (without the checksum). Refuses a header larger than `load` reads.
    pub(super) fn new(
        mut meta: BTreeMap<String, String>,
        storage: StorageType,
        precision: &Precision,
        shapes: &[Vec<usize>],
        formats: &[StateFormat],
    ) -> Result<Self, Error> {
        let (specs, which) = entries(storage, precision, shapes, formats)?;
        let sum = Checksum::new(meta.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        meta.insert(CHECKSUM_KEY.to_owned(), PLACEHOLDER.to_owned());
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".to_owned(), serde_json::json!(meta));
        let mut offset = 0usize;
        for e in &specs {
            let end = offset + e.elem.size() * e.len;
            header.insert(
                e.name.clone(),
                serde_json::json!({ "dtype": dtype(e.elem), "shape": e.shape, "data_offsets": [offset, end] }),
            );
            offset = end;
        }
        // serde_json's map keeps keys sorted (or, with `preserve_order` enabled
        // elsewhere, in the sorted order they were inserted in): the header is
        // deterministic.
        let mut text = serde_json::to_vec(&header)
            .map_err(|e| refuse(format!("cannot serialise the header: {e}")))?;
        text.resize(text.len().next_multiple_of(8), b' ');
        check_header_len(text.len() as u64).map_err(|limit| {
            refuse(format!(
                "its header would take {} bytes ({} tensors), beyond the {limit} that load reads; save the state of fewer tensors per file (an optimizer per part of the model)",
                text.len(),
                shapes.len()
            ))
        })?;
        let at = text
            .windows(PLACEHOLDER.len())
            .position(|w| w == PLACEHOLDER.as_bytes())
            .ok_or(Error::Internal {
                what: "the checksum placeholder is missing from a checkpoint header",
            })?;
        Ok(Self {
            specs,
            which,
            text,
            at,
            sum,
        })
    }

    /// Writes the file: the header with a placeholder checksum, then each entry as
    /// `fill(i, entry, buf)` gives its values for tensor `i` (hashed as they are
    /// written: one entry in memory at a time), then the checksum over the placeholder.
    pub(super) fn write<W: Write + Seek>(
        mut self,
        mut fill: impl FnMut(usize, Entry, &mut Data) -> Result<(), Error>,
        w: &mut W,
    ) -> Result<(), WriteError> {
        let io = WriteError::Io;
        let start = w.stream_position().map_err(io)?;
        w.write_all(&(self.text.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(&self.text).map_err(io)?;
        for (e, &(i, entry)) in self.specs.iter().zip(&self.which) {
            let mut buf = Data::empty(e.elem);
            fill(i, entry, &mut buf).map_err(WriteError::Invalid)?;
            if buf.len() != e.len {
                return Err(WriteError::Invalid(Error::Internal {
                    what: "a checkpoint entry changed length while being written",
                }));
            }
            self.sum.entry(&e.name, &e.shape, &buf);
            for_each_le_block(&buf, |b| w.write_all(b)).map_err(io)?;
        }
        let end = w.stream_position().map_err(io)?;
        w.seek(SeekFrom::Start(start + 8 + self.at as u64))
            .map_err(io)?;
        w.write_all(self.sum.finish().as_bytes()).map_err(io)?;
        w.seek(SeekFrom::Start(end)).map_err(io)?;
        w.flush().map_err(io)
    }
}

/// The one limit on a header's length, for writing and reading alike (the
/// `safetensors` crate's own): `Err(limit)` beyond it.
fn check_header_len(n: u64) -> Result<(), u64> {
    if n > MAX_HEADER {
        Err(MAX_HEADER)
    } else {
        Ok(())
    }
}

/// A file's entries, in name order, and which tensor and part each one is.
type Entries = (Vec<EntrySpec>, Vec<(usize, Entry)>);

/// The entries of a file of tensors of `shapes` with `storage`, in name order (the
/// file's and the checksum's order), and which tensor and part each one is: a tensor's
/// per-element entries have its shape, its block scales `[blocks]`, its step `[]`.
/// Refuses a shape whose element count overflows.
fn entries(
    storage: StorageType,
    precision: &Precision,
    shapes: &[Vec<usize>],
    formats: &[StateFormat],
) -> Result<Entries, Error> {
    let mut all: Vec<(EntrySpec, (usize, Entry))> = Vec::new();
    for (i, (tensor_shape, &format)) in shapes.iter().zip(formats).enumerate() {
        let n = crate::state::shape_len(tensor_shape).ok_or_else(|| {
            refuse(format!(
                "tensor {i}'s shape {tensor_shape:?} holds more elements than an address can count"
            ))
        })?;
        for e in Entry::of(storage, &precision.with_state(format)) {
            let len = e.len(n);
            let shape = match e.part() {
                None => vec![],
                Some(p) if p.per_block() => vec![len],
                Some(_) => tensor_shape.clone(),
            };
            let name = e.name(i);
            let elem = e.elem();
            all.push((
                EntrySpec {
                    name,
                    elem,
                    shape,
                    len,
                },
                (i, e),
            ));
        }
    }
    all.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    Ok(all.into_iter().unzip())
}

/// The file of `ck` (validated first).
pub(super) fn plan(ck: &Checkpoint) -> Result<Plan, Error> {
    ck.validate()?;
    Plan::new(
        ck.metadata(),
        ck.storage,
        &ck.config.precision,
        &ck.shapes,
        &ck.state_formats,
    )
}

/// Writes `ck`'s file, planned by [`plan`]: entries in name order, header keys sorted,
/// the checksum in the metadata.
pub(super) fn write<W: Write + Seek>(
    ck: &Checkpoint,
    plan: Plan,
    w: &mut W,
) -> Result<(), WriteError> {
    plan.write(
        |i, e, buf| {
            let t = &ck.tensors[i];
            match e.part() {
                Some(part) => buf.extend(part.view(t)),
                // PyTorch's f32 step scalar (the exact count is in the metadata).
                None => buf.f32_mut().map(|b| b.push(t.step as f32)),
            }
        },
        w,
    )
}

/// Reads a safetensors file of `total_len` bytes from `r`: the header (bounded), then
/// every tensor, no byte past what the header declares.
pub(super) fn read(r: &mut impl Read, total_len: u64) -> Result<RawFile, ReadError> {
    let bad = |reason: String| ReadError::Refused(refuse(reason));
    if total_len < 8 {
        return Err(bad(format!(
            "{total_len} bytes is too short for a safetensors file"
        )));
    }
    let mut len = [0u8; 8];
    r.read_exact(&mut len).map_err(ReadError::Io)?;
    let n = u64::from_le_bytes(len);
    if check_header_len(n).is_err() || n > total_len - 8 {
        return Err(bad(format!(
            "it is not an adamax-cuda or safetensors file (its header claims {n} bytes; the file has {total_len} and headers are at most {MAX_HEADER}); pass a file written by Checkpoint::save or scripts/torch_checkpoint.py"
        )));
    }
    let mut header = vec![0u8; n as usize];
    r.read_exact(&mut header).map_err(ReadError::Io)?;
    let metadata: Metadata = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("not a readable safetensors header ({e})")))?;
    let declared = 8 + n + metadata.data_len() as u64;
    if declared != total_len {
        return Err(bad(format!(
            "its header declares {declared} bytes but the file has {total_len}: truncated or corrupt"
        )));
    }
    let meta = metadata
        .metadata()
        .clone()
        .ok_or_else(|| bad("no metadata: not an AdaMax checkpoint".into()))?;
    let mut tensors = BTreeMap::new();
    let mut buf = vec![0u8; BLOCK_BYTES];
    for name in metadata.offset_keys() {
        let Some(info) = metadata.info(&name) else {
            return Err(bad(format!("`{name}` is listed without its description")));
        };
        let mut left = info.data_offsets.1 - info.data_offsets.0;
        // Reserved fallibly: a file may declare more than this machine can hold, which
        // is an error to report, not a reason to abort the process.
        let too_large = |_| {
            bad(format!(
                "`{name}` holds {left} bytes, more than this process can allocate"
            ))
        };
        let mut data = match info.dtype {
            Dtype::F32 => {
                let mut v = Vec::new();
                v.try_reserve_exact(left / 4).map_err(too_large)?;
                Data::F32(v)
            }
            Dtype::U8 => {
                let mut v = Vec::new();
                v.try_reserve_exact(left).map_err(too_large)?;
                Data::U8(v)
            }
            other => return Err(bad(format!("`{name}` is {other:?}, expected F32 or U8"))),
        };
        while left > 0 {
            let take = left.min(BLOCK_BYTES);
            r.read_exact(&mut buf[..take]).map_err(ReadError::Io)?;
            match &mut data {
                Data::F32(v) => v.extend(
                    buf[..take]
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                ),
                Data::U8(v) => v.extend_from_slice(&buf[..take]),
            }
            left -= take;
        }
        tensors.insert(
            name,
            RawTensor {
                shape: info.shape.clone(),
                data,
            },
        );
    }
    Ok(RawFile { meta, tensors })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue #17, item 6: the writer refuses, before writing anything, a header the
    /// reader would refuse: one limit for both.
    #[test]
    fn writer_and_reader_share_the_header_limit() {
        let meta = |len: usize| BTreeMap::from([("big".to_owned(), "x".repeat(len))]);
        let plan = |len| Plan::new(meta(len), StorageType::F32, &Precision::default(), &[], &[]);
        assert!(plan(0).is_ok());
        match plan(MAX_HEADER as usize) {
            Err(Error::Checkpoint { reason }) => {
                assert!(reason.contains(&MAX_HEADER.to_string()), "{reason}")
            }
            Err(other) => panic!("{other:?}"),
            Ok(_) => panic!("a header beyond the limit was planned"),
        }
        // The reader refuses a header length beyond the same limit, before reading it.
        let mut file = (MAX_HEADER + 1).to_le_bytes().to_vec();
        file.resize(64, b' ');
        let err = read(&mut &file[..], MAX_HEADER + 100).err();
        assert!(matches!(err, Some(ReadError::Refused(_))));
        assert_eq!(check_header_len(MAX_HEADER), Ok(()));
        assert_eq!(check_header_len(MAX_HEADER + 1), Err(MAX_HEADER));
    }
}
