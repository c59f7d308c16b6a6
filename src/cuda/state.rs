//! The optimizer's device memory: every part of every tensor's state (`exp_avg` and
//! `exp_inf`, or their 8-bit codes and block scales, and the f32 master weights of
//! 16-bit parameters kept with a master), each part in one allocation, with the layout
//! that places the tensors in them; masters initialised from the parameters; copies to
//! the host; and restores staged in new buffers so that a failure changes nothing.

use std::{ops::Range, sync::Arc};

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use crate::{
    config::Precision,
    error::{Error, Result},
    spec::lowbit::QBLOCK,
    state::{
        parts::{Data, Part, View},
        Mode, TensorState,
    },
    storage::StorageType,
};

use super::{
    args::InitArgs,
    entry::EntryPoint,
    layout::StateLayout,
    module::{launch, Kernels},
};

/// One device buffer of state: f32 values or 8-bit codes.
enum Buffer {
    F32(CudaSlice<f32>),
    U8(CudaSlice<u8>),
}

impl Buffer {
    fn zeroed(
        stream: &Arc<CudaStream>,
        codes: bool,
        len: usize,
        what: &'static str,
    ) -> Result<Self> {
        Ok(if codes {
            Buffer::U8(stream.alloc_zeros::<u8>(len).map_err(Error::driver(what))?)
        } else {
            Buffer::F32(
                stream
                    .alloc_zeros::<f32>(len)
                    .map_err(Error::driver(what))?,
            )
        })
    }

    fn address(&self, stream: &CudaStream) -> u64 {
        match self {
            Buffer::F32(b) => b.device_ptr(stream).0,
            Buffer::U8(b) => b.device_ptr(stream).0,
        }
    }

    /// Bytes per value.
    fn size(&self) -> u64 {
        match self {
            Buffer::F32(_) => 4,
            Buffer::U8(_) => 1,
        }
    }

    /// Values `at` appended to `out` (which has this buffer's type), synchronously.
    fn append_to(&self, stream: &Arc<CudaStream>, at: Range<usize>, out: &mut Data) -> Result<()> {
        const COPYING: &str = "copying the optimizer state to the host";
        let n = at.len();
        if n == 0 {
            return Ok(());
        }
        match (self, out) {
            (Buffer::F32(b), Data::F32(v)) => {
                let start = v.len();
                v.resize(start + n, 0.0);
                stream
                    .memcpy_dtoh(&b.slice(at), &mut v[start..])
                    .map_err(Error::driver(COPYING))?;
            }
            (Buffer::U8(b), Data::U8(v)) => {
                let start = v.len();
                v.resize(start + n, 0);
                stream
                    .memcpy_dtoh(&b.slice(at), &mut v[start..])
                    .map_err(Error::driver(COPYING))?;
            }
            _ => {
                return Err(Error::Internal {
                    what: "state copied into a buffer of another type",
                })
            }
        }
        stream.synchronize().map_err(Error::driver(COPYING))
    }

    /// Empty host values of this buffer's type.
    fn empty_data(&self) -> Data {
        match self {
            Buffer::F32(_) => Data::F32(Vec::new()),
            Buffer::U8(_) => Data::U8(Vec::new()),
        }
    }

    /// Copies `src`, a buffer of the same type and length, into this one (device to
    /// device, in stream order).
    fn copy_from(&mut self, stream: &Arc<CudaStream>, src: &Buffer) -> Result<()> {
        let restoring = Error::driver("restoring a checkpoint");
        match (self, src) {
            (Buffer::F32(dst), Buffer::F32(src)) => stream.memcpy_dtod(src, dst).map_err(restoring),
            (Buffer::U8(dst), Buffer::U8(src)) => stream.memcpy_dtod(src, dst).map_err(restoring),
            _ => Err(Error::Internal {
                what: "state copied from a buffer of another type",
            }),
        }
    }

    /// Uploads `values` (of this buffer's type) at `at`.
    fn upload(&mut self, stream: &Arc<CudaStream>, at: usize, values: View<'_>) -> Result<()> {
        let restoring = Error::driver("restoring a checkpoint");
        match (self, values) {
            (_, v) if v.len() == 0 => Ok(()),
            (Buffer::F32(b), View::F32(v)) => stream
                .memcpy_htod(v, &mut b.slice_mut(at..at + v.len()))
                .map_err(restoring),
            (Buffer::U8(b), View::U8(v)) => stream
                .memcpy_htod(v, &mut b.slice_mut(at..at + v.len()))
                .map_err(restoring),
            _ => Err(Error::Internal {
                what: "state uploaded from values of another type",
            }),
        }
    }
}

/// The state buffers of one optimizer, on its stream. Their addresses never change
/// (restores copy into them), so a captured CUDA graph that holds them stays valid.
pub(crate) struct DeviceState {
    layout: StateLayout,
    stream: Arc<CudaStream>,
    /// One buffer per part of the state that some tensor keeps (in [`Part::ALL`]'s
    /// order), holding the tensors that keep it (see [`StateLayout`]).
    parts: Vec<(Part, Buffer)>,
    /// The parts each tensor keeps: its mode's.
    tensor_parts: Vec<&'static [Part]>,
    /// Each tensor's own step count (one per tensor, not per element).
    steps: CudaSlice<u64>,
    /// Device addresses of the buffers, in `parts` order, and of `steps`. Only the
    /// optimizer's stream touches them, so launches need none of cudarc's events.
    bases: Vec<u64>,
    steps_ptr: u64,
}

/// State uploaded to new buffers, not yet in use.
pub(crate) struct Staged {
    parts: Vec<(Part, Buffer)>,
    steps: CudaSlice<u64>,
}

impl DeviceState {
    /// Zeroed state for `layout`: the parts of `storage` kept in `precision`, each
    /// tensor in its own state format (the layout's).
    pub(crate) fn zeroed(
        stream: &Arc<CudaStream>,
        layout: StateLayout,
        storage: StorageType,
        precision: &Precision,
    ) -> Result<Self> {
        Self::with_masters(stream, layout, storage, precision, || None)
    }

    /// [`DeviceState::zeroed`], with the master weights' buffer (when the state keeps
    /// one) from `masters`, called once every other buffer is allocated, else zeroed.
    fn with_masters(
        stream: &Arc<CudaStream>,
        layout: StateLayout,
        storage: StorageType,
        precision: &Precision,
        masters: impl FnOnce() -> Option<Buffer>,
    ) -> Result<Self> {
        let tensor_parts: Vec<&'static [Part]> = layout
            .formats()
            .iter()
            .map(|&f| Mode::or_master(storage, &precision.with_state(f)).parts)
            .collect();
        let held: Vec<Part> = Part::ALL
            .into_iter()
            .filter(|p| tensor_parts.iter().any(|t| t.contains(p)))
            .collect();
        let mut moments = held
            .iter()
            .filter(|&&p| p != Part::Master)
            .map(|&p| Self::alloc(stream, &layout, p))
            .collect::<Result<Vec<_>>>()?
            .into_iter();
        let steps = stream
            .alloc_zeros::<u64>(layout.lens.len().max(1))
            .map_err(Error::driver("allocating the per-tensor step counts"))?;
        let mut kept = masters();
        let mut parts = Vec::with_capacity(held.len());
        for p in held {
            let buffer = if p == Part::Master {
                match kept.take() {
                    Some(m) => m,
                    None => Self::alloc(stream, &layout, p)?,
                }
            } else {
                moments.next().ok_or(Error::Internal {
                    what: "a state buffer went missing while the state was laid out",
                })?
            };
            parts.push((p, buffer));
        }
        let steps_ptr = steps.device_ptr(stream).0;
        Ok(Self {
            bases: parts.iter().map(|(_, b)| b.address(stream)).collect(),
            steps_ptr,
            layout,
            stream: stream.clone(),
            parts,
            tensor_parts,
            steps,
        })
    }

    /// A zeroed buffer for `part` of every tensor.
    fn alloc(stream: &Arc<CudaStream>, layout: &StateLayout, part: Part) -> Result<Buffer> {
        Buffer::zeroed(
            stream,
            part.is_codes(),
            layout.buffer_len(part),
            "allocating the optimizer state",
        )
    }

    pub(crate) fn layout(&self) -> &StateLayout {
        &self.layout
    }

    /// Bytes of the state buffers (padding included) and of the step counts.
    #[cfg(feature = "nccl")]
    pub(crate) fn bytes(&self) -> u64 {
        let buffers: u64 = self
            .parts
            .iter()
            .map(|(p, b)| self.layout.buffer_len(*p) as u64 * b.size())
            .sum();
        buffers + 8 * self.layout.lens.len().max(1) as u64
    }

    /// Where tensor `tensor`'s values of `part` start in the part's buffer.
    fn offset(&self, part: Part, tensor: usize) -> usize {
        self.layout.offset(part, tensor)
    }

    /// The parts tensor `tensor` keeps.
    pub(crate) fn parts_of(&self, tensor: usize) -> &'static [Part] {
        self.tensor_parts[tensor]
    }

    /// Values of `part` that tensor `tensor` keeps (0 for a part it does not keep).
    fn values_of(&self, part: Part, tensor: usize) -> usize {
        if self.tensor_parts[tensor].contains(&part) {
            part.len(self.layout.lens[tensor])
        } else {
            0
        }
    }

    /// The device address of tensor `tensor`'s values of `part`; 0 when the tensor
    /// does not keep that part.
    pub(crate) fn address(&self, part: Part, tensor: usize) -> u64 {
        if !self.tensor_parts[tensor].contains(&part) {
            return 0;
        }
        self.parts
            .iter()
            .zip(&self.bases)
            .find(|((p, _), _)| *p == part)
            .map_or(0, |((p, b), base)| {
                base + b.size() * self.offset(*p, tensor) as u64
            })
    }

    /// Zeroed state for `layout` (the same tensors in other state formats) that keeps
    /// this state's master weights, in their buffer: for formats chosen before the first
    /// step. The new moments are allocated before this state gives its masters up, so a
    /// failure leaves it whole; on success it is left without them, to be dropped. So
    /// at most the old and new moments and one copy of the masters are held at once.
    pub(crate) fn reformatted(
        &mut self,
        layout: StateLayout,
        storage: StorageType,
        precision: &Precision,
    ) -> Result<DeviceState> {
        if layout.lens != self.layout.lens {
            return Err(Error::Internal {
                what: "a state reformatted for other tensors",
            });
        }
        let (parts, bases) = (&mut self.parts, &mut self.bases);
        Self::with_masters(&self.stream, layout, storage, precision, || {
            let at = parts.iter().position(|(p, _)| *p == Part::Master)?;
            bases.remove(at);
            Some(parts.remove(at).1)
        })
    }

    /// master = f32(param) for every tensor, from the parameters' device addresses in
    /// order (nothing for state without masters).
    pub(crate) fn init_master(
        &self,
        kernels: &Kernels,
        storage: StorageType,
        params: impl Iterator<Item = u64>,
    ) -> Result<()> {
        let Some(entry) = EntryPoint::init_master(storage) else {
            return Ok(());
        };
        if !self.parts.iter().any(|(p, _)| *p == Part::Master) {
            return Ok(());
        }
        for (i, param) in params.enumerate() {
            let n = self.layout.lens[i] as u64;
            if n == 0 {
                continue;
            }
            let args = InitArgs {
                param,
                master: self.address(Part::Master, i),
                len: n,
            };
            let blocks = n
                .div_ceil(u64::from(entry.threads()))
                .min(u64::from(kernels.wave(entry)));
            launch(&self.stream, kernels, entry, blocks as u32, &args)?;
        }
        Ok(())
    }

    /// Device address of the per-tensor step counts (the kernel's `tensor_steps`).
    pub(crate) fn steps_ptr(&self) -> u64 {
        self.steps_ptr
    }

    /// Every tensor's state on the host, in the CPU reference's layout (synchronises):
    /// one whole-buffer copy per part, split on the host.
    pub(crate) fn to_host(&self) -> Result<Vec<TensorState>> {
        let steps = self.steps_to_host()?;
        let mut states: Vec<TensorState> = steps
            .into_iter()
            .map(|step| TensorState {
                step,
                ..TensorState::default()
            })
            .collect();
        for (part, buf) in &self.parts {
            let mut all = buf.empty_data();
            buf.append_to(&self.stream, 0..self.layout.buffer_len(*part), &mut all)?;
            for (i, state) in states.iter_mut().enumerate() {
                let (o, n) = (self.offset(*part, i), self.values_of(*part, i));
                let mut mine = buf.empty_data();
                mine.extend(all.view().slice(o..o + n))?;
                part.store(state, mine)?;
            }
        }
        Ok(states)
    }

    /// Elements `range` of tensor `tensor`'s state on the host (synchronises). With
    /// 8-bit state the range must start on a block ([`QBLOCK`] elements); the window
    /// holds the scales of the blocks it touches.
    pub(crate) fn window_to_host(&self, tensor: usize, range: Range<usize>) -> Result<TensorState> {
        let n = *self
            .layout
            .lens
            .get(tensor)
            .ok_or(Error::TensorIndexOutOfRange {
                index: tensor,
                count: self.layout.lens.len(),
            })?;
        if range.start > range.end || range.end > n {
            return Err(Error::LengthMismatch {
                what: "state range end",
                tensor,
                expected: n,
                found: range.end,
            });
        }
        let blocked = self.tensor_parts[tensor].iter().any(|p| p.per_block());
        if blocked && !range.start.is_multiple_of(QBLOCK) {
            return Err(Error::LengthMismatch {
                what: "start of a window of 8-bit state (a multiple of 256)",
                tensor,
                expected: range.start - range.start % QBLOCK,
                found: range.start,
            });
        }
        let mut window = TensorState {
            step: self.steps_to_host()?.get(tensor).copied().unwrap_or(0),
            ..TensorState::default()
        };
        for (part, buf) in &self.parts {
            if !self.tensor_parts[tensor].contains(part) {
                continue;
            }
            let o = self.offset(*part, tensor);
            let at = if part.per_block() {
                o + range.start / QBLOCK..o + range.end.div_ceil(QBLOCK)
            } else {
                o + range.start..o + range.end
            };
            let mut data = buf.empty_data();
            buf.append_to(&self.stream, at, &mut data)?;
            part.store(&mut window, data)?;
        }
        Ok(window)
    }

    /// One part of tensor `tensor`'s state appended to `buf` (synchronises): for a
    /// streamed checkpoint.
    pub(crate) fn part_to_host(&self, tensor: usize, part: Part, buf: &mut Data) -> Result<()> {
        let (_, src) = self
            .parts
            .iter()
            .find(|(p, _)| *p == part)
            .ok_or(Error::Internal {
                what: "a part of the state this optimizer does not keep was requested",
            })?;
        let o = self.offset(part, tensor);
        src.append_to(&self.stream, o..o + self.values_of(part, tensor), buf)
    }

    /// Every tensor's step count on the host (synchronises).
    pub(crate) fn steps_to_host(&self) -> Result<Vec<u64>> {
        let mut steps = self
            .stream
            .clone_dtoh(&self.steps)
            .map_err(Error::driver("copying the step counts to the host"))?;
        steps.truncate(self.layout.lens.len());
        Ok(steps)
    }

    /// Uploads `tensors` (which fit the layout and the parts: checked by the caller)
    /// into new buffers, leaving the state in use untouched.
    pub(crate) fn stage(&self, tensors: &[TensorState]) -> Result<Staged> {
        let mut parts = Vec::with_capacity(self.parts.len());
        for (part, _) in &self.parts {
            let mut buf = Self::alloc(&self.stream, &self.layout, *part)?;
            for (i, t) in tensors.iter().enumerate() {
                buf.upload(&self.stream, self.offset(*part, i), part.view(t))?;
            }
            parts.push((*part, buf));
        }
        let mut steps: Vec<u64> = tensors.iter().map(|t| t.step).collect();
        steps.resize(self.layout.lens.len().max(1), 0);
        Ok(Staged {
            parts,
            steps: self
                .stream
                .clone_htod(&steps)
                .map_err(Error::driver("restoring the step counts"))?,
        })
    }

    /// Copies staged buffers into the ones in use, on the device, in stream order (the
    /// staged ones are then freed in stream order). The buffers in use keep their
    /// addresses for the optimizer's life: a captured CUDA graph holds them (through
    /// the tensor table and `tensor_steps`), so a restore must not move them.
    pub(crate) fn commit(&mut self, staged: Staged) -> Result<()> {
        for ((part, live), (staged_part, src)) in self.parts.iter_mut().zip(&staged.parts) {
            if part != staged_part {
                return Err(Error::Internal {
                    what: "a restore staged the parts of the state in another order",
                });
            }
            live.copy_from(&self.stream, src)?;
        }
        self.stream
            .memcpy_dtod(&staged.steps, &mut self.steps)
            .map_err(Error::driver("restoring the step counts"))
    }
}
