//! [`CudaAdamax`]: the optimizer that owns its device state and launches the kernel.

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, DeviceSlice,
    ValidAsZeroBits,
};

use crate::{
    config::{AdamaxConfig, TensorHyper},
    cpu::{check_lists, Schedule, TensorState},
    error::{Error, Result},
    fused::{LossScaler, StepOptions, StepReport},
    storage::Storage,
};

use std::mem::offset_of;

use super::{
    args::{
        AdamaxArgs, Control, ControlParams, InitArgs, ScalerState, StepState, TensorDesc, BLOCK,
        CHUNK, FLAG_CHECK, FLAG_CLIP, FLAG_SCALER, FLAG_UNSCALE, SKIP_COUNTER_FULL, SKIP_NONFINITE,
    },
    control::ControlBlock,
    device::{kernels_for, launch, Kernels},
};

/// A [`Storage`] type the GPU kernels handle: `f32`, [`half::f16`], [`half::bf16`].
pub trait GpuStorage: Storage + DeviceRepr + ValidAsZeroBits {}
impl GpuStorage for f32 {}
impl GpuStorage for half::f16 {}
impl GpuStorage for half::bf16 {}

/// Elements between the starts of two tensors' state: offsets stay 256-byte aligned
/// (what cudaMalloc guarantees), so the kernel's 16-byte vector path always applies to
/// the optimizer's own buffers.
const STATE_ALIGN: usize = 64;

/// AdaMax on an NVIDIA GPU over a list of parameter tensors: the update of every tensor
/// is one kernel launch.
///
/// Owns the device memory it allocates: `exp_avg` (m) and `exp_inf` (u) for every
/// tensor, and for 16-bit `T` the f32 master weights, initialised from the parameters
/// at construction. Parameters and gradients stay in the caller's buffers; a step checks
/// their count, lengths and device, then enqueues its kernels on the optimizer's stream
/// without synchronising the host: a one-block pass that counts the step on the device,
/// and the update over every tensor in one launch (plus, with the overflow check or
/// clipping of [`StepOptions`], one reduction pass before them).
///
/// The learning rate, the step count, the clip and loss-scale state live on the device,
/// so a step captured in a CUDA graph replays exactly like eager steps, and
/// [`CudaAdamax::set_lr`] between replays takes effect without recapture.
///
/// ```no_run
/// use adamax_cuda::{cuda::{self, CudaAdamax}, AdamaxConfig};
/// let stream = cuda::default_stream(0)?;
/// let mut weights = stream.clone_htod(&vec![0.5f32; 1 << 20]).unwrap();
/// let grads = stream.clone_htod(&vec![0.01f32; 1 << 20]).unwrap();
/// let mut opt = CudaAdamax::<f32>::new(&stream, AdamaxConfig::default(), &[weights.as_view()])?;
/// opt.step(&mut [weights.as_view_mut()], &[grads.as_view()])?;
/// # Ok::<(), adamax_cuda::Error>(())
/// ```
pub struct CudaAdamax<T: GpuStorage> {
    schedule: Schedule,
    stream: Arc<CudaStream>,
    kernels: Arc<Kernels>,
    lens: Vec<usize>,
    /// Element offset of each tensor in the state buffers.
    offsets: Vec<usize>,
    chunk_begin: Vec<u64>,
    num_chunks: u64,
    exp_avg: CudaSlice<f32>,
    exp_inf: CudaSlice<f32>,
    master: Option<CudaSlice<f32>>,
    /// Device addresses of the three buffers above (0 for no master). Only this
    /// optimizer's stream touches them, so they need none of cudarc's cross-stream events.
    bases: [u64; 3],
    /// The launch's tensor table on the device, and the copy of it last uploaded:
    /// re-uploaded only when a caller's buffer moves.
    table: CudaSlice<TensorDesc>,
    table_host: Vec<TensorDesc>,
    /// The device-side state of the step (lr, step count, clip and scaler state).
    control: ControlBlock,
    /// An upper bound of the device's step count (skips only lower the true count): the
    /// host reads the device count only when this bound reaches `u64::MAX`, to refuse a
    /// step as the CPU reference does instead of letting the counter wrap.
    step_bound: u64,
    /// One f32 sum of squares per chunk, written by the reduction for the finalize pass.
    _partials: CudaSlice<f32>,
    partials_ptr: u64,
    options: StepOptions,
    scaler: bool,
    _storage: std::marker::PhantomData<T>,
}

/// The device address of a buffer this module owns, without event bookkeeping.
fn base_ptr(buf: &CudaSlice<f32>, stream: &CudaStream) -> u64 {
    let (ptr, _guard) = buf.device_ptr(stream);
    ptr
}

impl<T: GpuStorage> CudaAdamax<T> {
    /// Validates `config`, compiles the kernels for the stream's device on first use in
    /// this process, allocates the state, and (for 16-bit `T`) copies the parameters into
    /// f32 master weights on `stream`.
    pub fn new<P: DevicePtr<T>>(
        stream: &Arc<CudaStream>,
        config: AdamaxConfig,
        params: &[P],
    ) -> Result<Self> {
        check_devices(stream, "param", params)?;
        let lens: Vec<usize> = params.iter().map(DeviceSlice::len).collect();
        let opt = Self::allocate(stream, config, lens)?;
        let guarded: Vec<_> = params.iter().map(|p| p.device_ptr(stream)).collect();
        let ptrs: Vec<u64> = guarded.iter().map(|(ptr, _)| *ptr).collect();
        opt.init_master(&ptrs)?;
        Ok(opt)
    }

    /// [`CudaAdamax::new`] for parameters owned by another CUDA stack (another cudarc
    /// version, candle, burn, tch), given as raw device addresses and element counts.
    ///
    /// # Safety
    ///
    /// - `stream` belongs to the CUDA context the parameters were allocated in (for a
    ///   stream owned by another stack, get it from [`borrow_stream`](super::borrow_stream)).
    /// - Each `params[i].ptr` is the address of `params[i].len` initialised elements of
    ///   `T` that stay allocated while the work enqueued here runs; work that writes them
    ///   on other streams is ordered before this call by the caller.
    ///
    /// Checked here, as errors: an empty list, null or misaligned addresses.
    pub unsafe fn new_raw(
        stream: &Arc<CudaStream>,
        config: AdamaxConfig,
        params: &[RawParam],
    ) -> Result<Self> {
        for (i, p) in params.iter().enumerate() {
            check_raw::<T>("param", i, p.ptr, p.len)?;
        }
        let opt = Self::allocate(stream, config, params.iter().map(|p| p.len).collect())?;
        let ptrs: Vec<u64> = params.iter().map(|p| p.ptr).collect();
        opt.init_master(&ptrs)?;
        Ok(opt)
    }

    /// Validates, compiles or fetches the kernels, and allocates zeroed state.
    fn allocate(stream: &Arc<CudaStream>, config: AdamaxConfig, lens: Vec<usize>) -> Result<Self> {
        let schedule = Schedule::new(config, lens.len())?;
        if lens.is_empty() {
            return Err(Error::EmptyParameterList);
        }
        let kernels = kernels_for(stream.context())?;
        let mut offsets = Vec::with_capacity(lens.len());
        let mut chunk_begin = Vec::with_capacity(lens.len());
        let (mut total, mut chunks) = (0usize, 0u64);
        for &n in &lens {
            offsets.push(total);
            chunk_begin.push(chunks);
            total = n
                .checked_next_multiple_of(STATE_ALIGN)
                .and_then(|padded| total.checked_add(padded))
                // Every buffer's byte size must fit too (4 bytes per element).
                .filter(|t| t.checked_mul(4).is_some())
                .ok_or(Error::TooLarge {
                    what: "the total element count of the parameter list",
                })?;
            chunks += (n as u64).div_ceil(CHUNK);
        }
        let alloc = |what: &'static str| {
            // At least one element: the driver refuses zero-byte allocations.
            stream
                .alloc_zeros::<f32>(total.max(1))
                .map_err(Error::driver(what))
        };
        let exp_avg = alloc("allocating exp_avg")?;
        let exp_inf = alloc("allocating exp_inf")?;
        let master = if T::HAS_MASTER {
            Some(alloc("allocating master weights")?)
        } else {
            None
        };
        let table = stream
            .alloc_zeros::<TensorDesc>(lens.len())
            .map_err(Error::driver("allocating the tensor table"))?;
        let bases = [
            base_ptr(&exp_avg, stream),
            base_ptr(&exp_inf, stream),
            master.as_ref().map_or(0, |m| base_ptr(m, stream)),
        ];
        let control = ControlBlock::new(
            stream,
            Control {
                params: ControlParams {
                    lr: config.lr,
                    beta1: config.beta1,
                    inv_scale: 1.0,
                    ..ControlParams::default()
                },
                scaler: ScalerState::default(),
                state: StepState {
                    step_inv_scale: 1.0,
                    clip_coef: 1.0,
                    ..StepState::default()
                },
            },
        )?;
        let partials = stream
            .alloc_zeros::<f32>(usize::try_from(chunks).unwrap_or(usize::MAX).max(1))
            .map_err(Error::driver("allocating the partial sums"))?;
        let partials_ptr = partials.device_ptr(stream).0;
        Ok(Self {
            schedule,
            stream: stream.clone(),
            kernels,
            lens,
            offsets,
            chunk_begin,
            num_chunks: chunks,
            exp_avg,
            exp_inf,
            master,
            bases,
            table,
            table_host: Vec::new(),
            control,
            step_bound: 0,
            _partials: partials,
            partials_ptr,
            options: StepOptions::default(),
            scaler: false,
            _storage: std::marker::PhantomData,
        })
    }

    /// master = f32(param) for every tensor of a 16-bit optimizer; `params` are the
    /// device addresses of the parameters, in order.
    fn init_master(&self, params: &[u64]) -> Result<()> {
        let Some(func) = self.kernels.init_master(T::NAME) else {
            return Ok(());
        };
        for (i, &param) in params.iter().enumerate() {
            let n = self.lens[i] as u64;
            if n == 0 {
                continue;
            }
            let args = InitArgs {
                param,
                master: self.bases[2] + 4 * self.offsets[i] as u64,
                len: n,
            };
            let blocks = n
                .div_ceil(u64::from(BLOCK))
                .min(u64::from(self.kernels.max_grid));
            launch(&self.stream, func, blocks as u32, &args)?;
        }
        Ok(())
    }

    /// One AdaMax step over every tensor: `params[i]` is updated in place from
    /// `grads[i]` (for 16-bit `T`, from the master weights, which are updated too).
    ///
    /// Everything is checked before the launch: one parameter and one gradient per
    /// tensor, in order, of the lengths given at construction, in the optimizer's CUDA
    /// context. A refused step enqueues nothing and changes nothing. The step is
    /// asynchronous: it returns once the kernel is enqueued on the optimizer's stream.
    pub fn step<P: DevicePtrMut<T>, G: DevicePtr<T>>(
        &mut self,
        params: &mut [P],
        grads: &[G],
    ) -> Result<()> {
        let param_lens: Vec<usize> = params.iter().map(DeviceSlice::len).collect();
        let grad_lens: Vec<usize> = grads.iter().map(DeviceSlice::len).collect();
        check_lists(&self.lens, &param_lens, &grad_lens)?;
        check_devices(&self.stream, "param", params)?;
        check_devices(&self.stream, "grad", grads)?;

        let stream = self.stream.clone();
        // The guards make cudarc order this stream after other streams' writes to the
        // caller's buffers, and record our use when dropped after the launch.
        let mut guards = Vec::with_capacity(2 * params.len());
        let mut table = Vec::with_capacity(params.len());
        for (i, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            let (param, param_guard) = p.device_ptr_mut(&stream);
            let (grad, grad_guard) = g.device_ptr(&stream);
            guards.push(param_guard);
            guards.push(grad_guard);
            table.push(self.descriptor(i, param, grad));
        }
        self.launch_step(table)?;
        drop(guards);
        Ok(())
    }

    /// [`CudaAdamax::step`] for buffers owned by another CUDA stack, as raw device
    /// addresses: `tensors[i]` is the parameter and gradient of tensor `i`.
    ///
    /// # Safety
    ///
    /// - Each `tensors[i].param` and `.grad` is the address of as many elements of `T`
    ///   as tensor `i` was constructed with, allocated in the optimizer's CUDA context and
    ///   alive while the enqueued step runs; the parameter is not aliased by any other
    ///   tensor's parameter or by a gradient.
    /// - Work that writes them on streams other than the optimizer's is ordered before
    ///   this call by the caller (the step runs on the optimizer's stream: build the
    ///   optimizer on the other stack's stream with [`borrow_stream`](super::borrow_stream)
    ///   to share its ordering).
    ///
    /// Checked here, as errors: the tensor count, null and misaligned addresses.
    pub unsafe fn step_raw(&mut self, tensors: &[RawTensor]) -> Result<()> {
        if tensors.len() != self.lens.len() {
            return Err(Error::TensorCountMismatch {
                what: "tensors",
                expected: self.lens.len(),
                found: tensors.len(),
            });
        }
        for (i, t) in tensors.iter().enumerate() {
            check_raw::<T>("param", i, t.param, self.lens[i])?;
            check_raw::<T>("grad", i, t.grad, self.lens[i])?;
        }
        let table = tensors
            .iter()
            .enumerate()
            .map(|(i, x)| self.descriptor(i, x.param, x.grad))
            .collect();
        self.launch_step(table)
    }

    /// Uploads `table` if it changed, then enqueues the step: the reduction (when the
    /// options check or clip), the one-block finalize that decides the step on the
    /// device, and the update. Nothing here reads a host value that changes per step,
    /// so the same calls can be captured in a CUDA graph and replayed.
    fn launch_step(&mut self, table: Vec<TensorDesc>) -> Result<()> {
        if self.step_bound == u64::MAX {
            let step = self.control.read()?.state.step;
            if step == u64::MAX {
                return Err(Error::StepOverflow(step));
            }
            self.step_bound = step;
        }
        let stream = self.stream.clone();
        if table != self.table_host {
            stream
                .memcpy_htod(&table, &mut self.table)
                .map_err(Error::driver("uploading the tensor table"))?;
            self.table_host = table;
        }
        let (table_ptr, _table_guard) = self.table.device_ptr(&stream);
        let config = self.schedule.config();
        let args = AdamaxArgs::new(
            &self.schedule.scalars(0, 1.0),
            config.weight_decay_mode,
            self.control.device_ptr(),
            self.partials_ptr,
            table_ptr,
            self.lens.len() as u64,
            self.num_chunks,
        );
        let grid = self.num_chunks.min(u64::from(self.kernels.max_grid)) as u32;
        if self.control.params().flags & (FLAG_CHECK | FLAG_CLIP) != 0 && self.num_chunks > 0 {
            launch(
                &stream,
                self.kernels.function("adamax_reduce_", T::NAME),
                grid,
                &args,
            )?;
        }
        launch(
            &stream,
            self.kernels.function("adamax_finalize_", "step"),
            1,
            &args,
        )?;
        if self.num_chunks > 0 {
            launch(
                &stream,
                self.kernels.function("adamax_step_", T::NAME),
                grid,
                &args,
            )?;
        }
        self.step_bound += 1;
        Ok(())
    }

    /// The settings part of the control block for `options`, with or without a loss
    /// scaler (whose factors stay as last set).
    fn params_with(&self, options: &StepOptions, scaler: bool) -> ControlParams {
        let mut flags = 0;
        if scaler || options.inv_scale.is_some() {
            flags |= FLAG_UNSCALE;
        }
        if options.max_norm.is_some() {
            flags |= FLAG_CLIP;
        }
        if options.checks(scaler) {
            flags |= FLAG_CHECK;
        }
        if scaler {
            flags |= FLAG_SCALER;
        }
        ControlParams {
            inv_scale: options.inv_scale.unwrap_or(1.0),
            max_norm: options.max_norm.unwrap_or(0.0),
            flags,
            ..*self.control.params()
        }
    }

    /// Sets the options of every following step (unscaling, overflow skip, clipping);
    /// written to the device, so a captured step picks them up without recapture.
    pub fn set_options(&mut self, options: StepOptions) -> Result<()> {
        options.validate()?;
        let params = self.params_with(&options, self.scaler);
        self.control.set_params(params)?;
        self.options = options;
        Ok(())
    }

    /// Enables dynamic loss scaling on the device (`None` disables it): each step
    /// unscales by the scaler's inverse scale, skips on a non-finite gradient and updates
    /// the scale, all without the host. The scale to multiply the loss by is at
    /// [`CudaAdamax::loss_scale_device_ptr`], or on the host from [`CudaAdamax::last_report`].
    /// Synchronises the stream (it rewrites the device's scaler state).
    pub fn set_loss_scaler(&mut self, scaler: Option<LossScaler>) -> Result<()> {
        if let Some(s) = &scaler {
            s.validate()?;
        }
        let mut params = self.params_with(&self.options, scaler.is_some());
        if let Some(s) = &scaler {
            params.growth_factor = s.growth_factor;
            params.backoff_factor = s.backoff_factor;
            params.growth_interval = s.growth_interval;
        }
        self.control.update(|c| {
            c.params = params;
            if let Some(s) = &scaler {
                c.scaler = ScalerState {
                    scale: s.scale,
                    growth_tracker: s.growth_tracker,
                };
            }
        })?;
        self.scaler = scaler.is_some();
        Ok(())
    }

    /// The loss scaler's state, read from the device (synchronises), when enabled.
    pub fn loss_scaler(&self) -> Result<Option<LossScaler>> {
        if !self.scaler {
            return Ok(None);
        }
        let c = self.control.read()?;
        Ok(Some(LossScaler {
            scale: c.scaler.scale,
            growth_factor: c.params.growth_factor,
            backoff_factor: c.params.backoff_factor,
            growth_interval: c.params.growth_interval,
            growth_tracker: c.scaler.growth_tracker,
        }))
    }

    /// What the last step did, read from the device (synchronises the stream).
    ///
    /// A step replayed from a CUDA graph while the step counter was at `u64::MAX`
    /// changed nothing and is reported as [`Error::StepOverflow`] (an eager step is
    /// refused with that error before it is enqueued).
    pub fn last_report(&self) -> Result<StepReport> {
        let c = self.control.read()?;
        if c.state.skipped == SKIP_COUNTER_FULL {
            return Err(Error::StepOverflow(c.state.step));
        }
        let skipped = c.state.skipped == SKIP_NONFINITE;
        let clipped = self.options.max_norm.is_some() && !skipped && c.state.step > 0;
        Ok(StepReport {
            step: c.state.step,
            skipped,
            total_norm: clipped.then_some(c.state.total_norm),
            clip_coef: if clipped { c.state.clip_coef } else { 1.0 },
            loss_scale: self.scaler.then_some(c.scaler.scale),
        })
    }

    /// Device address of a `u32` that is non-zero when the last step changed nothing: 1
    /// for a non-finite gradient (the overflow check), 2 for a step counter at its
    /// maximum; else 0. Valid while the optimizer lives. For device-side consumers (a
    /// captured graph, a training stack's own kernels).
    pub fn skipped_flag_device_ptr(&self) -> u64 {
        self.control.device_ptr()
            + (offset_of!(Control, state) + offset_of!(StepState, skipped)) as u64
    }

    /// Device address of the loss scaler's current scale (`f32`), valid while the
    /// optimizer lives: multiply the loss by it on the device, inside a graph too.
    pub fn loss_scale_device_ptr(&self) -> u64 {
        self.control.device_ptr()
            + (offset_of!(Control, scaler) + offset_of!(ScalerState, scale)) as u64
    }

    fn descriptor(&self, i: usize, param: u64, grad: u64) -> TensorDesc {
        let at = |base: u64| {
            if base == 0 {
                0
            } else {
                base + 4 * self.offsets[i] as u64
            }
        };
        TensorDesc {
            param,
            grad,
            exp_avg: at(self.bases[0]),
            exp_inf: at(self.bases[1]),
            master: at(self.bases[2]),
            len: self.lens[i] as u64,
            chunk_begin: self.chunk_begin[i],
            lr_scale: self.schedule.hypers()[i].lr_scale,
            weight_decay: self.schedule.hypers()[i].weight_decay,
        }
    }

    /// Copies the state of every tensor to the host (synchronises the stream): `exp_avg`,
    /// `exp_inf`, and for 16-bit `T` the master weights, in the CPU reference's layout.
    pub fn state_to_host(&self) -> Result<Vec<TensorState>> {
        // Three whole-buffer copies, split on the host: not three per tensor.
        let all = self.copy_state(0..self.exp_avg.len())?;
        let part = |v: &Vec<f32>, o: usize, n: usize| {
            v.get(o..o + n).map_or_else(Vec::new, <[f32]>::to_vec)
        };
        Ok(self
            .lens
            .iter()
            .zip(&self.offsets)
            .map(|(&n, &o)| TensorState {
                exp_avg: part(&all.exp_avg, o, n),
                exp_inf: part(&all.exp_inf, o, n),
                master: part(&all.master, o, n),
            })
            .collect())
    }

    /// Copies elements `range` of tensor `tensor`'s state to the host (synchronises the
    /// stream), e.g. a window of a tensor too large to copy whole.
    pub fn tensor_state_to_host(
        &self,
        tensor: usize,
        range: std::ops::Range<usize>,
    ) -> Result<TensorState> {
        let n = *self.lens.get(tensor).ok_or(Error::TensorIndexOutOfRange {
            index: tensor,
            count: self.lens.len(),
        })?;
        if range.start > range.end || range.end > n {
            return Err(Error::LengthMismatch {
                what: "state range end",
                tensor,
                expected: n,
                found: range.end,
            });
        }
        let o = self.offsets[tensor];
        self.copy_state(o + range.start..o + range.end)
    }

    /// Copies elements `at` of the state buffers (all tensors' state, laid out at
    /// `offsets`) to the host; `master` is empty for f32.
    fn copy_state(&self, at: std::ops::Range<usize>) -> Result<TensorState> {
        let copy = |buf: &CudaSlice<f32>| {
            self.stream
                .clone_dtoh(&buf.slice(at.clone()))
                .map_err(Error::driver("copying the optimizer state to the host"))
        };
        Ok(TensorState {
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

    /// The whole state copied to the host (synchronises the stream), for
    /// [`Checkpoint::save`](crate::Checkpoint::save).
    pub fn checkpoint(&self) -> Result<crate::Checkpoint> {
        Ok(crate::Checkpoint {
            config: *self.config(),
            step: self.step_count()?,
            storage: T::TYPE,
            tensors: self.state_to_host()?,
            hypers: self.schedule.hypers().to_vec(),
        })
    }

    /// Replaces config, step count and device state with `ck`'s, after checking that it
    /// fits (storage type, tensor count and lengths). All or nothing: the state is
    /// uploaded into new device buffers (so the optimizer's memory doubles while it
    /// runs), and only once every copy has been enqueued are they swapped in and the
    /// control block rewritten (one copy); a refused checkpoint or a failed driver call
    /// changes nothing. Synchronises the stream. The parameters are the caller's to
    /// restore.
    pub fn restore(&mut self, ck: &crate::Checkpoint) -> Result<()> {
        ck.check_fits(T::TYPE, &self.lens)?;
        let mut schedule = self.schedule.clone();
        schedule.restore(ck);
        let total = self.exp_avg.len();
        let upload = |pick: fn(&TensorState) -> &Vec<f32>| -> Result<CudaSlice<f32>> {
            let mut buf = self
                .stream
                .alloc_zeros::<f32>(total)
                .map_err(Error::driver(
                    "allocating state to restore a checkpoint into",
                ))?;
            for (i, t) in ck.tensors.iter().enumerate() {
                let (o, data) = (self.offsets[i], pick(t));
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
        let exp_avg = upload(|t| &t.exp_avg)?;
        let exp_inf = upload(|t| &t.exp_inf)?;
        let master = match self.master {
            Some(_) => Some(upload(|t| &t.master)?),
            None => None,
        };
        let c = &ck.config;
        self.control.update(|ctl| {
            ctl.params.lr = c.lr;
            ctl.params.beta1 = c.beta1;
            ctl.state.step = ck.step;
            ctl.state.skipped = 0;
        })?;
        self.bases = [
            base_ptr(&exp_avg, &self.stream),
            base_ptr(&exp_inf, &self.stream),
            master.as_ref().map_or(0, |m| base_ptr(m, &self.stream)),
        ];
        (self.exp_avg, self.exp_inf, self.master) = (exp_avg, exp_inf, master);
        // The state moved: the next step uploads a fresh tensor table.
        self.table_host.clear();
        self.schedule = schedule;
        self.step_bound = ck.step;
        Ok(())
    }

    /// Steps taken so far (PyTorch's `state["step"]`; skipped steps are not counted),
    /// read from the device, where it is kept (synchronises the stream).
    pub fn step_count(&self) -> Result<u64> {
        Ok(self.control.read()?.state.step)
    }

    /// The configuration in force.
    pub fn config(&self) -> &AdamaxConfig {
        self.schedule.config()
    }

    /// Changes the learning rate (for a schedule); validated like the config.
    ///
    /// The value is written to the device, ordered before the next step: a step
    /// captured in a CUDA graph uses the new rate on its next replay.
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        let mut schedule = self.schedule.clone();
        schedule.set_lr(lr)?;
        self.control.set_params(ControlParams {
            lr,
            ..*self.control.params()
        })?;
        self.schedule = schedule;
        Ok(())
    }

    /// Sets tensor `tensor`'s learning-rate scale and weight decay (a parameter group);
    /// takes effect from the next step.
    pub fn set_tensor_hyper(&mut self, tensor: usize, hyper: TensorHyper) -> Result<()> {
        self.schedule.set_hyper(tensor, hyper)
    }

    /// Every tensor's hyperparameters, in order.
    pub fn tensor_hypers(&self) -> &[TensorHyper] {
        self.schedule.hypers()
    }

    /// The element count of every tensor, in order.
    pub fn tensor_lens(&self) -> &[usize] {
        &self.lens
    }

    /// The stream the optimizer enqueues its work on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

/// A parameter tensor owned by another CUDA stack: device address and element count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawParam {
    /// Device address of the first element.
    pub ptr: u64,
    /// Number of elements.
    pub len: usize,
}

/// One tensor of a [`CudaAdamax::step_raw`]: device addresses of its parameter and
/// gradient (each as long as the tensor the optimizer was built with).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawTensor {
    /// Device address of the parameter.
    pub param: u64,
    /// Device address of the gradient.
    pub grad: u64,
}

/// A raw address must be non-null (unless the tensor is empty) and aligned to `T`.
fn check_raw<T>(what: &'static str, tensor: usize, address: u64, len: usize) -> Result<()> {
    let align = std::mem::align_of::<T>() as u64;
    let reason = if address == 0 && len > 0 {
        "is null"
    } else if !address.is_multiple_of(align) {
        "is not aligned to its element type"
    } else {
        return Ok(());
    };
    Err(Error::InvalidPointer {
        what,
        tensor,
        address,
        reason,
    })
}

/// Every buffer must live in the optimizer's CUDA context.
fn check_devices<T, B: DeviceSlice<T>>(
    stream: &CudaStream,
    what: &'static str,
    bufs: &[B],
) -> Result<()> {
    let ours: &Arc<CudaContext> = stream.context();
    for (tensor, b) in bufs.iter().enumerate() {
        let theirs = b.stream().context();
        if theirs.cu_ctx() != ours.cu_ctx() {
            return Err(Error::WrongDevice {
                what,
                tensor,
                expected: ours.ordinal(),
                found: theirs.ordinal(),
            });
        }
    }
    Ok(())
}
