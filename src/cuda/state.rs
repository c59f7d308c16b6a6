//! The optimizer's device memory: `exp_avg`, `exp_inf` and (for 16-bit parameters) the
//! f32 master weights of every tensor, each in one allocation, with the layout that
//! places the tensors in them; masters initialised from the parameters; copies to the
//! host; and restores staged in new buffers so that a failure changes nothing.

use std::{ops::Range, sync::Arc};

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use crate::{
    checkpoint::Part,
    config::TensorHyper,
    error::{Error, Result},
    state::TensorState,
    storage::StorageType,
};

use super::{
    args::{InitArgs, TensorDesc, BLOCK},
    entry::EntryPoint,
    launch::launch,
    layout::StateLayout,
    module::Kernels,
};

/// The state buffers of one optimizer, on its stream.
pub(crate) struct DeviceState {
    layout: StateLayout,
    stream: Arc<CudaStream>,
    exp_avg: CudaSlice<f32>,
    exp_inf: CudaSlice<f32>,
    master: Option<CudaSlice<f32>>,
    /// Each tensor's own step count (one per tensor, not per element).
    steps: CudaSlice<u64>,
    /// Device addresses of the three buffers (0 for no master) and of `steps`. Only the
    /// optimizer's stream touches them, so launches need none of cudarc's events.
    bases: [u64; 3],
    steps_ptr: u64,
}

/// State uploaded to new buffers, not yet in use.
pub(crate) struct Staged {
    exp_avg: CudaSlice<f32>,
    exp_inf: CudaSlice<f32>,
    master: Option<CudaSlice<f32>>,
    steps: CudaSlice<u64>,
}

/// The device addresses of the three buffers (0 for no master).
fn bases(
    stream: &CudaStream,
    exp_avg: &CudaSlice<f32>,
    exp_inf: &CudaSlice<f32>,
    master: Option<&CudaSlice<f32>>,
) -> [u64; 3] {
    let ptr = |b: &CudaSlice<f32>| b.device_ptr(stream).0;
    [ptr(exp_avg), ptr(exp_inf), master.map_or(0, ptr)]
}

impl DeviceState {
    /// Zeroed state for `layout`, with master buffers when `storage` has them.
    pub(crate) fn zeroed(
        stream: &Arc<CudaStream>,
        layout: StateLayout,
        storage: StorageType,
    ) -> Result<Self> {
        let alloc = |what: &'static str| {
            stream
                .alloc_zeros::<f32>(layout.total)
                .map_err(Error::driver(what))
        };
        let (exp_avg, exp_inf) = (alloc("allocating exp_avg")?, alloc("allocating exp_inf")?);
        let master = if storage.has_master() {
            Some(alloc("allocating master weights")?)
        } else {
            None
        };
        let steps = stream
            .alloc_zeros::<u64>(layout.lens.len().max(1))
            .map_err(Error::driver("allocating the per-tensor step counts"))?;
        let steps_ptr = steps.device_ptr(stream).0;
        Ok(Self {
            bases: bases(stream, &exp_avg, &exp_inf, master.as_ref()),
            steps_ptr,
            layout,
            stream: stream.clone(),
            exp_avg,
            exp_inf,
            master,
            steps,
        })
    }

    pub(crate) fn layout(&self) -> &StateLayout {
        &self.layout
    }

    /// master = f32(param) for every tensor, from the parameters' device addresses in
    /// order (nothing for f32 storage).
    pub(crate) fn init_master(
        &self,
        kernels: &Kernels,
        storage: StorageType,
        params: impl Iterator<Item = u64>,
    ) -> Result<()> {
        let Some(entry) = EntryPoint::init_master(storage) else {
            return Ok(());
        };
        for (i, param) in params.enumerate() {
            let n = self.layout.lens[i] as u64;
            if n == 0 {
                continue;
            }
            let args = InitArgs {
                param,
                master: self.bases[2] + 4 * self.layout.offsets[i] as u64,
                len: n,
            };
            let blocks = n
                .div_ceil(u64::from(BLOCK))
                .min(u64::from(kernels.wave(entry)));
            launch(&self.stream, kernels.function(entry), blocks as u32, &args)?;
        }
        Ok(())
    }

    /// Device address of the per-tensor step counts (the kernel's `tensor_steps`).
    pub(crate) fn steps_ptr(&self) -> u64 {
        self.steps_ptr
    }

    /// The launch descriptor of tensor `i` with its parameter address and its gradient's
    /// (`None`: no gradient this step, the tensor is skipped).
    pub(crate) fn descriptor(
        &self,
        i: usize,
        param: u64,
        grad: Option<u64>,
        h: &TensorHyper,
    ) -> TensorDesc {
        let at = |base: u64| {
            if base == 0 {
                0
            } else {
                base + 4 * self.layout.offsets[i] as u64
            }
        };
        TensorDesc {
            param,
            grad: grad.unwrap_or(0),
            has_grad: u64::from(grad.is_some()),
            exp_avg: at(self.bases[0]),
            exp_inf: at(self.bases[1]),
            master: at(self.bases[2]),
            len: self.layout.lens[i] as u64,
            chunk_begin: self.layout.chunk_begin[i],
            unit_begin: self.layout.unit_begin[i],
            lr_scale: h.lr_scale,
            weight_decay: h.weight_decay,
        }
    }

    /// Every tensor's state on the host, in the CPU reference's layout (synchronises):
    /// three whole-buffer copies, split on the host.
    pub(crate) fn to_host(&self) -> Result<Vec<TensorState>> {
        let all = self.copy(0..self.exp_avg.len())?;
        let steps = self.steps_to_host()?;
        let part = |v: &Vec<f32>, o: usize, n: usize| {
            v.get(o..o + n).map_or_else(Vec::new, <[f32]>::to_vec)
        };
        Ok(self
            .layout
            .lens
            .iter()
            .zip(&self.layout.offsets)
            .zip(steps)
            .map(|((&n, &o), step)| TensorState {
                step,
                exp_avg: part(&all.exp_avg, o, n),
                exp_inf: part(&all.exp_inf, o, n),
                master: part(&all.master, o, n),
            })
            .collect())
    }

    /// Elements `range` of tensor `tensor`'s state on the host (synchronises).
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
        let o = self.layout.offsets[tensor];
        let mut window = self.copy(o + range.start..o + range.end)?;
        window.step = self.steps_to_host()?.get(tensor).copied().unwrap_or(0);
        Ok(window)
    }

    /// One part of tensor `tensor`'s state appended to `buf` (synchronises): for a
    /// streamed checkpoint. Nothing for a master of f32 storage.
    pub(crate) fn part_to_host(&self, tensor: usize, part: Part, buf: &mut Vec<f32>) -> Result<()> {
        let (o, n) = (self.layout.offsets[tensor], self.layout.lens[tensor]);
        let src = match part {
            Part::ExpAvg => &self.exp_avg,
            Part::ExpInf => &self.exp_inf,
            Part::Master => match &self.master {
                Some(m) => m,
                None => return Ok(()),
            },
        };
        let start = buf.len();
        buf.resize(start + n, 0.0);
        if n == 0 {
            return Ok(());
        }
        self.stream
            .memcpy_dtoh(&src.slice(o..o + n), &mut buf[start..])
            .and_then(|()| self.stream.synchronize())
            .map_err(Error::driver("copying the optimizer state to the host"))
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

    /// Elements `at` of the three buffers; `master` is empty for f32.
    fn copy(&self, at: Range<usize>) -> Result<TensorState> {
        let copy = |buf: &CudaSlice<f32>| {
            self.stream
                .clone_dtoh(&buf.slice(at.clone()))
                .map_err(Error::driver("copying the optimizer state to the host"))
        };
        Ok(TensorState {
            step: 0,
            exp_avg: copy(&self.exp_avg)?,
            exp_inf: copy(&self.exp_inf)?,
            master: self
                .master
                .as_ref()
                .map(copy)
                .transpose()?
                .unwrap_or_default(),
        })
    }

    /// Uploads `tensors` (which fit the layout: checked by the caller) into new buffers,
    /// leaving the state in use untouched.
    pub(crate) fn stage(&self, tensors: &[TensorState]) -> Result<Staged> {
        let upload = |pick: fn(&TensorState) -> &Vec<f32>| -> Result<CudaSlice<f32>> {
            let mut buf =
                self.stream
                    .alloc_zeros::<f32>(self.layout.total)
                    .map_err(Error::driver(
                        "allocating state to restore a checkpoint into",
                    ))?;
            for (t, &o) in tensors.iter().zip(&self.layout.offsets) {
                let data = pick(t);
                if data.is_empty() {
                    continue;
                }
                let mut dst = buf.slice_mut(o..o + data.len());
                self.stream
                    .memcpy_htod(data.as_slice(), &mut dst)
                    .map_err(Error::driver("restoring a checkpoint"))?;
            }
            Ok(buf)
        };
        let mut steps: Vec<u64> = tensors.iter().map(|t| t.step).collect();
        steps.resize(self.layout.lens.len().max(1), 0);
        Ok(Staged {
            exp_avg: upload(|t| &t.exp_avg)?,
            exp_inf: upload(|t| &t.exp_inf)?,
            master: match self.master {
                Some(_) => Some(upload(|t| &t.master)?),
                None => None,
            },
            steps: self
                .stream
                .clone_htod(&steps)
                .map_err(Error::driver("restoring the step counts"))?,
        })
    }

    /// Puts staged buffers in use (the old ones are freed in stream order).
    pub(crate) fn commit(&mut self, staged: Staged) {
        self.bases = bases(
            &self.stream,
            &staged.exp_avg,
            &staged.exp_inf,
            staged.master.as_ref(),
        );
        self.steps_ptr = staged.steps.device_ptr(&self.stream).0;
        self.exp_avg = staged.exp_avg;
        self.exp_inf = staged.exp_inf;
        self.master = staged.master;
        self.steps = staged.steps;
    }
}
