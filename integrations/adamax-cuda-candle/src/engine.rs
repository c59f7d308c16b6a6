//! The optimizer underneath, one per storage type and device: adamax-cuda's CPU
//! reference for `Var`s on the CPU, its GPU optimizer on candle's CUDA stream for `Var`s
//! on a CUDA device. Dispatch on the dtype is written once, here.

use adamax_cuda::{
    bf16, cpu::CpuAdamax, f16, AdamaxConfig, Checkpoint, LossScaler, Optimizer, StateFormat,
    StepOptions, StepReport, TensorHyper,
};
use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};

use crate::{adamax_error, refuse, Result};

/// One of adamax-cuda's optimizers, over every `Var` of one dtype on one device.
pub(crate) enum Engine {
    CpuF32(CpuAdamax<f32>),
    CpuF16(CpuAdamax<f16>),
    CpuBf16(CpuAdamax<bf16>),
    #[cfg(feature = "cuda")]
    CudaF32(adamax_cuda::cuda::CudaAdamax<f32>),
    #[cfg(feature = "cuda")]
    CudaF16(adamax_cuda::cuda::CudaAdamax<f16>),
    #[cfg(feature = "cuda")]
    CudaBf16(adamax_cuda::cuda::CudaAdamax<bf16>),
}

/// `$body` with `$o` bound to the optimizer, whichever it is.
macro_rules! each {
    ($engine:expr, $o:ident => $body:expr) => {
        match $engine {
            Engine::CpuF32($o) => $body,
            Engine::CpuF16($o) => $body,
            Engine::CpuBf16($o) => $body,
            #[cfg(feature = "cuda")]
            Engine::CudaF32($o) => $body,
            #[cfg(feature = "cuda")]
            Engine::CudaF16($o) => $body,
            #[cfg(feature = "cuda")]
            Engine::CudaBf16($o) => $body,
        }
    };
}

impl Engine {
    /// The optimizer for `vars`, all of `dtype` on `device` (checked by the caller),
    /// their current values as its starting point (the master weights of 16-bit ones).
    pub(crate) fn new(
        dtype: DType,
        device: &Device,
        config: AdamaxConfig,
        vars: &[Var],
    ) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(refuse(format!(
                "it steps f32, f16 and bf16 Vars, and these are {dtype:?}; convert them (Tensor::to_dtype) or use candle_nn's optimizers for them"
            )));
        }
        match (device, dtype) {
            (Device::Cpu, DType::F32) => Ok(Engine::CpuF32(cpu(config, vars)?)),
            (Device::Cpu, DType::F16) => Ok(Engine::CpuF16(cpu(config, vars)?)),
            (Device::Cpu, _) => Ok(Engine::CpuBf16(cpu(config, vars)?)),
            #[cfg(feature = "cuda")]
            (Device::Cuda(_), DType::F32) => Ok(Engine::CudaF32(gpu::new(device, config, vars)?)),
            #[cfg(feature = "cuda")]
            (Device::Cuda(_), DType::F16) => Ok(Engine::CudaF16(gpu::new(device, config, vars)?)),
            #[cfg(feature = "cuda")]
            (Device::Cuda(_), _) => Ok(Engine::CudaBf16(gpu::new(device, config, vars)?)),
            #[cfg(not(feature = "cuda"))]
            (Device::Cuda(_), _) => Err(refuse(
                "the Vars are on a CUDA device but this build has no CUDA support: enable the crate's `cuda` feature",
            )),
            (Device::Metal(_), _) => Err(refuse(
                "the Vars are on a Metal device; it steps Vars on a CUDA device or the CPU",
            )),
        }
    }

    /// One step of every `Var` from its gradient in `grads`; a `Var` without one is
    /// skipped (adamax-cuda's `step_some`).
    pub(crate) fn step(&mut self, vars: &[Var], grads: &GradStore) -> Result<()> {
        match self {
            Engine::CpuF32(o) => cpu_step(o, vars, grads),
            Engine::CpuF16(o) => cpu_step(o, vars, grads),
            Engine::CpuBf16(o) => cpu_step(o, vars, grads),
            #[cfg(feature = "cuda")]
            Engine::CudaF32(o) => gpu::step(o, vars, grads),
            #[cfg(feature = "cuda")]
            Engine::CudaF16(o) => gpu::step(o, vars, grads),
            #[cfg(feature = "cuda")]
            Engine::CudaBf16(o) => gpu::step(o, vars, grads),
        }
    }

    pub(crate) fn config(&self) -> &AdamaxConfig {
        each!(self, o => o.config())
    }
    pub(crate) fn set_lr(&mut self, lr: f64) -> adamax_cuda::Result<()> {
        each!(self, o => o.set_lr(lr))
    }
    pub(crate) fn set_tensor_hyper(&mut self, i: usize, h: TensorHyper) -> Result<()> {
        each!(self, o => o.set_tensor_hyper(i, h)).map_err(adamax_error)
    }
    pub(crate) fn tensor_hypers(&self) -> &[TensorHyper] {
        each!(self, o => o.tensor_hypers())
    }
    pub(crate) fn set_tensor_state_formats(&mut self, formats: &[StateFormat]) -> Result<()> {
        each!(self, o => o.set_tensor_state_formats(formats)).map_err(adamax_error)
    }
    pub(crate) fn tensor_state_formats(&self) -> &[StateFormat] {
        each!(self, o => o.tensor_state_formats())
    }
    pub(crate) fn set_tensor_shape(&mut self, i: usize, shape: &[usize]) -> Result<()> {
        each!(self, o => o.set_tensor_shape(i, shape)).map_err(adamax_error)
    }
    pub(crate) fn set_tensor_name(&mut self, i: usize, name: Option<&str>) -> Result<()> {
        each!(self, o => o.set_tensor_name(i, name)).map_err(adamax_error)
    }
    pub(crate) fn tensor_names(&self) -> &[Option<String>] {
        each!(self, o => o.tensor_names())
    }
    pub(crate) fn options(&self) -> StepOptions {
        each!(self, o => o.options())
    }
    pub(crate) fn set_options(&mut self, options: StepOptions) -> Result<()> {
        each!(self, o => o.set_options(options)).map_err(adamax_error)
    }
    pub(crate) fn loss_scaler(&self) -> Result<Option<LossScaler>> {
        each!(self, o => o.loss_scaler()).map_err(adamax_error)
    }
    pub(crate) fn set_loss_scaler(&mut self, scaler: Option<LossScaler>) -> Result<()> {
        each!(self, o => o.set_loss_scaler(scaler)).map_err(adamax_error)
    }
    pub(crate) fn last_report(&self) -> Result<StepReport> {
        each!(self, o => o.last_report()).map_err(adamax_error)
    }
    pub(crate) fn step_count(&self) -> Result<u64> {
        each!(self, o => o.step_count()).map_err(adamax_error)
    }
    pub(crate) fn checkpoint(&self) -> Result<Checkpoint> {
        each!(self, o => o.checkpoint()).map_err(adamax_error)
    }
    pub(crate) fn save_checkpoint(&self, path: &std::path::Path) -> Result<()> {
        each!(self, o => o.save_checkpoint(path)).map_err(adamax_error)
    }
    pub(crate) fn restore(&mut self, ck: &Checkpoint) -> Result<()> {
        each!(self, o => o.restore(ck)).map_err(adamax_error)
    }
}

/// The CPU reference over host copies of `vars`.
fn cpu<T: adamax_cuda::Storage + candle_core::WithDType>(
    config: AdamaxConfig,
    vars: &[Var],
) -> Result<CpuAdamax<T>> {
    let values = host::<T>(vars.iter().map(Var::as_tensor))?;
    let slices: Vec<&[T]> = values.iter().map(Vec::as_slice).collect();
    CpuAdamax::new(config, &slices).map_err(adamax_error)
}

/// Each tensor's elements, in order, on the host.
fn host<'t, T: candle_core::WithDType>(
    tensors: impl Iterator<Item = &'t Tensor>,
) -> Result<Vec<Vec<T>>> {
    tensors.map(|t| t.flatten_all()?.to_vec1::<T>()).collect()
}

/// Var `i`'s gradient in `grads`, contiguous, after checking that it is one for that
/// `Var` (dtype, shape, device); `None` when it has none.
pub(crate) fn gradient(i: usize, var: &Var, grads: &GradStore) -> Result<Option<Tensor>> {
    let Some(g) = grads.get(var.as_tensor()) else {
        return Ok(None);
    };
    let what = |found: String, expected: String| {
        refuse(format!(
            "the gradient of Var {i} is {found} but the Var is {expected}; a gradient has its Var's dtype, shape and device"
        ))
    };
    if g.dtype() != var.dtype() {
        return Err(what(
            format!("{:?}", g.dtype()),
            format!("{:?}", var.dtype()),
        ));
    }
    if g.dims() != var.dims() {
        return Err(what(format!("{:?}", g.dims()), format!("{:?}", var.dims())));
    }
    if !g.device().same_device(var.device()) {
        return Err(what(
            format!("on {:?}", g.device().location()),
            format!("on {:?}", var.device().location()),
        ));
    }
    Ok(Some(g.contiguous()?))
}

/// A CPU step: host copies of the parameters and gradients, adamax-cuda's CPU
/// reference, and the updated values written back into the `Var`s that had a gradient.
fn cpu_step<T: adamax_cuda::Storage + candle_core::WithDType>(
    o: &mut CpuAdamax<T>,
    vars: &[Var],
    grads: &GradStore,
) -> Result<()> {
    let gradients: Vec<Option<Tensor>> = vars
        .iter()
        .enumerate()
        .map(|(i, v)| gradient(i, v, grads))
        .collect::<Result<_>>()?;
    let mut params = host::<T>(vars.iter().map(Var::as_tensor))?;
    let host_grads: Vec<Option<Vec<T>>> = gradients
        .iter()
        .map(|g| {
            g.as_ref()
                .map(|g| g.flatten_all()?.to_vec1::<T>())
                .transpose()
        })
        .collect::<Result<_>>()?;
    let mut p: Vec<&mut [T]> = params.iter_mut().map(Vec::as_mut_slice).collect();
    let g: Vec<Option<&[T]>> = host_grads.iter().map(Option::as_deref).collect();
    o.step_some(&mut p, &g).map_err(adamax_error)?;
    if o.last_report().map_err(adamax_error)?.skipped {
        return Ok(());
    }
    for ((var, values), g) in vars.iter().zip(params).zip(&gradients) {
        if g.is_some() {
            var.set(&Tensor::from_vec(values, var.shape(), var.device())?)?;
        }
    }
    Ok(())
}

#[cfg(feature = "cuda")]
mod gpu {
    //! `Var`s on a CUDA device: their buffers' addresses go to adamax-cuda's raw entry
    //! points, on candle's own stream, so every `Var` is stepped in one launch ordered
    //! after the backward pass that wrote the gradients.

    use std::sync::Arc;

    use adamax_cuda::cuda::{
        cudarc::driver::{CudaStream, DevicePtr},
        CudaAdamax, GpuStorage, RawParam,
    };
    use candle_core::{backprop::GradStore, cuda_backend::CudaDType, Device, Storage, Tensor, Var};

    use crate::{adamax_error, refuse, Result};

    /// The stream of candle's CUDA device.
    fn stream(device: &Device) -> Result<Arc<CudaStream>> {
        Ok(device.as_cuda_device()?.cuda_stream())
    }

    /// The device address of a contiguous tensor's first element, and its byte count.
    fn address<T: CudaDType>(t: &Tensor, stream: &Arc<CudaStream>) -> Result<(u64, u64)> {
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else {
            return Err(refuse("a tensor expected on the CUDA device is not"));
        };
        if !layout.is_contiguous() {
            return Err(refuse(
                "a Var is not contiguous; make it with Var::from_tensor of a contiguous tensor",
            ));
        }
        let base = cs.as_cuda_slice::<T>()?.device_ptr(stream).0;
        let size = std::mem::size_of::<T>() as u64;
        Ok((
            base + layout.start_offset() as u64 * size,
            t.elem_count() as u64 * size,
        ))
    }

    pub(super) fn new<T: GpuStorage + CudaDType>(
        device: &Device,
        config: adamax_cuda::AdamaxConfig,
        vars: &[Var],
    ) -> Result<CudaAdamax<T>> {
        let stream = stream(device)?;
        let params: Vec<RawParam> = vars
            .iter()
            .map(|v| {
                address::<T>(v.as_tensor(), &stream).map(|(ptr, _)| RawParam {
                    ptr,
                    len: v.elem_count(),
                })
            })
            .collect::<Result<_>>()?;
        // SAFETY: the addresses are those of candle's Var buffers with their element
        // counts, in the context of candle's stream, which the optimizer runs on; the
        // Vars are held by the optimizer, and candle wrote them on that same stream.
        unsafe { CudaAdamax::new_raw(&stream, config, &params) }.map_err(adamax_error)
    }

    pub(super) fn step<T: GpuStorage + CudaDType>(
        o: &mut CudaAdamax<T>,
        vars: &[Var],
        grads: &GradStore,
    ) -> Result<()> {
        let stream = o.stream().clone();
        // Held until the step is enqueued: a contiguous copy of a gradient lives here.
        let gradients: Vec<Option<Tensor>> = vars
            .iter()
            .enumerate()
            .map(|(i, v)| super::gradient(i, v, grads))
            .collect::<Result<_>>()?;
        let mut params = Vec::with_capacity(vars.len());
        let mut ranges = Vec::with_capacity(vars.len());
        for v in vars {
            let (ptr, bytes) = address::<T>(v.as_tensor(), &stream)?;
            params.push(ptr);
            ranges.push((ptr, ptr + bytes));
        }
        let mut grad_ptrs = Vec::with_capacity(vars.len());
        // Distinct Vars own distinct buffers: sorted, the non-empty ranges do not
        // overlap, so only the last one starting before a gradient's end can meet it.
        ranges.retain(|&(start, end)| start < end);
        ranges.sort_unstable();
        for (i, g) in gradients.iter().enumerate() {
            let Some(g) = g else {
                grad_ptrs.push(None);
                continue;
            };
            let (ptr, bytes) = address::<T>(g, &stream)?;
            // The kernel writes every parameter while it reads the gradients: a
            // gradient that shares memory with a parameter would race.
            let before_end = ranges.partition_point(|&(start, _)| start < ptr + bytes);
            if bytes > 0 && before_end > 0 && ranges[before_end - 1].1 > ptr {
                return Err(refuse(format!(
                    "the gradient of Var {i} shares memory with a Var; a gradient must be a tensor of its own"
                )));
            }
            grad_ptrs.push(Some(ptr));
        }
        // SAFETY: candle's Var and gradient buffers, alive (the Vars are held by the
        // optimizer, the gradients in `gradients` until after this call; a buffer freed
        // later is freed in stream order), in candle's context, written on candle's
        // stream, which is the optimizer's; the Vars are distinct (checked when the
        // optimizer was built) and no gradient overlaps a Var (checked above).
        unsafe { o.step_some_raw(&params, &grad_ptrs) }.map_err(adamax_error)?;
        drop(gradients);
        Ok(())
    }
}
