//! [`CudaAdamax`]: the GPU optimizer, a thin layer over its device state
//! ([`super::state`]), control block ([`super::control`]) and launch plan
//! ([`super::launch`], which owns the tensor table). Construction and the per-tensor
//! step are here; the [`Optimizer`] interface, the flat-buffer path and the raw-pointer
//! entry points are its submodules.

mod flat;
#[cfg(feature = "nccl")]
mod pieces;
mod raw;
mod trait_impl;

#[cfg(feature = "nccl")]
pub(crate) use flat::check_len;
#[cfg(feature = "nccl")]
pub(crate) use pieces::piece_addresses;
pub use raw::{RawParam, RawTensor};

use std::{mem::offset_of, sync::Arc};

use cudarc::driver::{
    CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, DeviceSlice, ValidAsZeroBits,
};

use crate::{
    config::{AdamaxConfig, StateFormat},
    error::{Error, Result},
    fused::StepOptions,
    state::{check_lists, Schedule, TensorState},
    storage::Storage,
};

#[cfg(doc)]
use crate::optimizer::Optimizer;

use super::{
    args::{
        AdamaxArgs, Control, ControlParams, ScalerState, StepState, FLAG_CHECK, FLAG_CLIP,
        FLAG_SCALER, FLAG_UNSCALE,
    },
    control::ControlBlock,
    device::{check_devices, refuse_during_capture},
    entry::EntryPoint,
    launch::{Exchange, LaunchPlan},
    layout::{FlatLayout, StateLayout},
    module::{kernels_for, Kernels},
    state::DeviceState,
};

/// A [`Storage`] type the GPU kernels handle: `f32`, [`half::f16`], [`half::bf16`].
pub trait GpuStorage: Storage + DeviceRepr + ValidAsZeroBits {}
impl GpuStorage for f32 {}
impl GpuStorage for half::f16 {}
impl GpuStorage for half::bf16 {}

/// AdaMax on an NVIDIA GPU over a list of parameter tensors: the update of every tensor
/// is one kernel launch. The shared API is the [`Optimizer`] trait.
///
/// Owns the device memory it allocates: `exp_avg` (m) and `exp_inf` (u) for every
/// tensor (or, with [`StateFormat::Blockwise8`](crate::StateFormat::Blockwise8), their
/// 8-bit codes and block scales), and for 16-bit `T` kept with a master
/// ([`ParamMode::Master`](crate::ParamMode::Master), the default) the f32 master
/// weights, initialised from the parameters at construction. Parameters and gradients stay in the caller's buffers; a step checks
/// their count, lengths and device, then enqueues its kernels on the optimizer's stream
/// without synchronising the host: the update of every tensor in one launch, which also
/// counts the step on the device (plus, with the overflow check or clipping of
/// [`StepOptions`], a reduction and a one-block decision pass before it). For many
/// tensors in one flat buffer, see [`CudaAdamax::new_flat`].
///
/// The learning rate, the step count, the options, the loss scaler and the per-tensor
/// settings live on the device, and a step captured in a CUDA graph always carries the
/// decision passes (they do nothing unless a setting asks for them), so it replays
/// exactly like eager steps and every setting changed between replays takes effect
/// without recapture. Take one eager step with the same buffers before capturing (the
/// tensor table must be on the device); calls that copy from the host while the stream
/// captures are refused ([`Error::DuringCapture`]). A graph replays the tensor table on
/// the device, which the last eager step wrote: an eager step between replays with
/// other buffers, or with another set of tensors without a gradient, makes the replays
/// step those (take it with the captured buffers, or capture again).
/// [`Optimizer::restore`] keeps every device address, so a graph replays on the restored
/// state (see it for the one restore that makes a graph stale).
///
/// ```no_run
/// use adamax_cuda::{cuda::{self, CudaAdamax}, AdamaxConfig, Optimizer};
/// let stream = cuda::default_stream(0)?;
/// let mut weights = stream.clone_htod(&vec![0.5f32; 1 << 20]).unwrap();
/// let grads = stream.clone_htod(&vec![0.01f32; 1 << 20]).unwrap();
/// let mut opt = CudaAdamax::<f32>::new(&stream, AdamaxConfig::default(), &[weights.as_view()])?;
/// opt.step(&mut [weights.as_view_mut()], &[grads.as_view()])?;
/// opt.set_lr(1e-3)?;
/// # Ok::<(), adamax_cuda::Error>(())
/// ```
pub struct CudaAdamax<T: GpuStorage> {
    schedule: Schedule,
    stream: Arc<CudaStream>,
    kernels: Arc<Kernels>,
    state: DeviceState,
    plan: LaunchPlan,
    /// The device-side state of the step (lr, step count, clip and scaler state).
    control: ControlBlock,
    /// An upper bound of the device's step count (skips only lower the true count): the
    /// host reads the device count only when this bound reaches `u64::MAX`, to refuse a
    /// step as the CPU reference does instead of letting the counter wrap.
    step_bound: u64,
    options: StepOptions,
    scaler: bool,
    /// The layout of an optimizer built with `new_flat`.
    flat: Option<FlatLayout>,
    /// Why state formats can no longer be chosen (a step or a restore), if so.
    formats_fixed: Option<&'static str>,
    _storage: std::marker::PhantomData<T>,
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
        check_devices(stream, "param", params.iter().map(Some))?;
        let opt = Self::allocate(
            stream,
            config,
            params.iter().map(DeviceSlice::len).collect(),
        )?;
        let guarded: Vec<_> = params.iter().map(|p| p.device_ptr(stream)).collect();
        opt.init_master(guarded.iter().map(|(ptr, _)| *ptr))?;
        Ok(opt)
    }

    /// master = f32(param) for every tensor of a 16-bit optimizer, from the parameters'
    /// device addresses in order.
    fn init_master(&self, params: impl Iterator<Item = u64>) -> Result<()> {
        self.state.init_master(&self.kernels, T::TYPE, params)
    }

    /// Validates, lays out, compiles or fetches the kernels, and allocates zeroed state.
    fn allocate(stream: &Arc<CudaStream>, config: AdamaxConfig, lens: Vec<usize>) -> Result<Self> {
        let schedule = Schedule::new(config, &lens)?;
        config.precision.check_storage(T::TYPE)?;
        if lens.is_empty() {
            return Err(Error::EmptyParameterList);
        }
        let layout = StateLayout::new(lens, schedule.formats().to_vec())?;
        Self::assemble(stream, schedule, layout, false)
    }

    /// Compiles or fetches the kernels and allocates zeroed state for `layout` (checked
    /// against `schedule` by the caller), and the control block; `exchanged` for one
    /// rank's shard.
    pub(super) fn assemble(
        stream: &Arc<CudaStream>,
        schedule: Schedule,
        layout: StateLayout,
        exchanged: bool,
    ) -> Result<Self> {
        let config = *schedule.config();
        let kernels = kernels_for(stream.context())?;
        let (state, plan) = Self::lay_out(stream, &kernels, &schedule, layout, exchanged)?;
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
        Ok(Self {
            schedule,
            stream: stream.clone(),
            kernels,
            state,
            plan,
            control,
            step_bound: 0,
            options: StepOptions::default(),
            scaler: false,
            flat: None,
            formats_fixed: None,
            _storage: std::marker::PhantomData,
        })
    }

    /// Zeroed state and the launch plan for `layout` (whose formats are `schedule`'s).
    fn lay_out(
        stream: &Arc<CudaStream>,
        kernels: &Kernels,
        schedule: &Schedule,
        mut layout: StateLayout,
        exchanged: bool,
    ) -> Result<(DeviceState, LaunchPlan)> {
        let plan = Self::plan(stream, kernels, schedule, &mut layout, exchanged)?;
        let precision = schedule.config().precision;
        let state = DeviceState::zeroed(stream, layout, T::TYPE, &precision)?;
        Ok((state, plan))
    }

    /// The launch plan of `layout`'s formats, its work units cut for that update's wave.
    fn plan(
        stream: &Arc<CudaStream>,
        kernels: &Kernels,
        schedule: &Schedule,
        layout: &mut StateLayout,
        exchanged: bool,
    ) -> Result<LaunchPlan> {
        let step = Self::update_of(schedule, layout)?;
        layout.plan_units(kernels.wave(step));
        LaunchPlan::new(stream, kernels, layout, step, T::TYPE, exchanged)
    }

    /// The update entry point of `layout`'s formats: the 8-bit one when some tensor
    /// keeps 8 bits (it steps the f32-state ones in the same launch), else the
    /// f32-state one.
    fn update_of(schedule: &Schedule, layout: &StateLayout) -> Result<EntryPoint> {
        let any_8bit = layout.formats().contains(&StateFormat::Blockwise8);
        let launched = schedule.config().precision.with_state(if any_8bit {
            StateFormat::Blockwise8
        } else {
            StateFormat::F32
        });
        EntryPoint::step(T::TYPE, &launched).ok_or(Error::Internal {
            what: "a storage mode without an update entry point passed validation",
        })
    }

    /// Tensors in `formats` (see [`Optimizer::set_tensor_state_formats`]): new zeroed
    /// moments in the new layout, laid out once; the master weights stay in their buffer.
    pub(super) fn set_state_formats(&mut self, formats: &[StateFormat]) -> Result<()> {
        let mut schedule = self.schedule.clone();
        if schedule
            .set_formats(formats, self.formats_fixed)?
            .is_empty()
        {
            return Ok(());
        }
        refuse_during_capture(
            &self.stream,
            "choosing a tensor's state format",
            "Choose it before begin_capture (and before the first step)",
        )?;
        let mut layout = StateLayout::new(
            self.state.layout().lens().to_vec(),
            schedule.formats().to_vec(),
        )?;
        let plan = Self::plan(
            &self.stream,
            &self.kernels,
            &schedule,
            &mut layout,
            self.plan.exchanged(),
        )?;
        let precision = schedule.config().precision;
        self.state = self.state.reformatted(layout, T::TYPE, &precision)?;
        self.plan = plan;
        self.schedule = schedule;
        Ok(())
    }

    /// One AdaMax step over every tensor, for any buffers cudarc can address
    /// (`CudaSlice`s or views): `params[i]` is updated in place from `grads[i]` (for
    /// 16-bit `T`, from the master weights, which are updated too). The trait's
    /// [`Optimizer::step`] is this method for views.
    ///
    /// Everything is checked before the launch: one parameter and one gradient per
    /// tensor, in order, of the lengths given at construction, in the optimizer's CUDA
    /// context. A refused step enqueues nothing and changes nothing. The step is
    /// asynchronous: it returns once the kernels are enqueued on the optimizer's stream.
    pub fn step<P: DevicePtrMut<T>, G: DevicePtr<T>>(
        &mut self,
        params: &mut [P],
        grads: &[G],
    ) -> Result<()> {
        check_lists(
            self.state.layout().lens(),
            params.iter().map(DeviceSlice::len),
            grads.iter().map(|g| Some(g.len())),
        )?;
        self.step_checked(params, |i| Some(&grads[i]))
    }

    /// [`CudaAdamax::step`] where some tensors have no gradient this step (`None`);
    /// they are skipped in the same launch, as [`Optimizer::step_some`] describes.
    pub fn step_some<P: DevicePtrMut<T>, G: DevicePtr<T>>(
        &mut self,
        params: &mut [P],
        grads: &[Option<G>],
    ) -> Result<()> {
        check_lists(
            self.state.layout().lens(),
            params.iter().map(DeviceSlice::len),
            grads.iter().map(|g| g.as_ref().map(|g| g.len())),
        )?;
        self.step_checked(params, |i| grads[i].as_ref())
    }

    /// A step whose lists are checked: devices, then the table, then the launch.
    fn step_checked<'g, P: DevicePtrMut<T>, G: DevicePtr<T> + 'g>(
        &mut self,
        params: &mut [P],
        grad: impl Fn(usize) -> Option<&'g G>,
    ) -> Result<()> {
        check_devices(&self.stream, "param", params.iter().map(Some))?;
        check_devices(&self.stream, "grad", (0..params.len()).map(&grad))?;
        let stream = self.stream.clone();
        // The guards make cudarc order this stream after other streams' writes to the
        // caller's buffers, and record our use when dropped after the launch. Without
        // event tracking they do nothing and are not kept (nothing is allocated).
        let tracking = stream.context().is_managing_stream_synchronization();
        let mut guards = Vec::new();
        let addresses = params.iter_mut().enumerate().map(|(i, p)| {
            let (param, param_guard) = p.device_ptr_mut(&stream);
            let grad = grad(i).map(|g| g.device_ptr(&stream));
            let grad = grad.map(|(ptr, guard)| {
                if tracking {
                    guards.push(guard);
                }
                ptr
            });
            if tracking {
                guards.push(param_guard);
            }
            (param, grad)
        });
        let hypers = self.schedule.hypers();
        self.plan
            .table
            .prepare(&self.state, hypers, None, addresses);
        self.enqueue(None)?;
        drop(guards);
        Ok(())
    }

    /// Enqueues a step, after the counter check, with the table prepared for it (or,
    /// when none was, the one on the device); `exchange` for one rank's shard.
    fn enqueue(&mut self, exchange: Option<&mut Exchange<'_>>) -> Result<()> {
        self.formats_fixed = Some(crate::state::FIXED_BY_STEP);
        if self.step_bound == u64::MAX {
            let step = self.control.read()?.state.step;
            if step == u64::MAX {
                return Err(Error::StepOverflow(step));
            }
            self.step_bound = step;
        }
        let args = AdamaxArgs {
            tensor_steps: self.state.steps_ptr(),
            ..AdamaxArgs::for_config(
                self.schedule.config(),
                self.control.device_ptr(),
                self.control.params().generation,
            )
        };
        let flags = self.control.params().flags;
        self.plan
            .enqueue(&self.stream, &self.kernels, args, flags, exchange)?;
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

    /// Copies elements `range` of tensor `tensor`'s state to the host (synchronises the
    /// stream), e.g. a window of a tensor too large to copy whole.
    pub fn tensor_state_to_host(
        &self,
        tensor: usize,
        range: std::ops::Range<usize>,
    ) -> Result<TensorState> {
        self.state.window_to_host(tensor, range)
    }

    /// The stream the optimizer enqueues its work on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}
