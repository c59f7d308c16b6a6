//! An optimizer with its parameters on the CPU or on the GPU, driven through the
//! `Optimizer` trait: what tests/scenarios.rs runs every behaviour on, and what
//! tests/gpu.rs pairs into a GPU-and-CPU twin compared bit for bit.

use std::sync::Arc;

use adamax_cuda::{
    cpu::CpuAdamax,
    cuda::{
        self,
        cudarc::driver::{CudaSlice, CudaStream, DriverError},
        CudaAdamax, FlatLayout, GpuStorage,
    },
    AdamaxConfig, Checkpoint, Error, LossScaler, Optimizer, StepOptions, Storage, TensorHyper,
};
use libtest_mimic::Failed;

pub type R<T = ()> = Result<T, Failed>;

/// Device 0's default stream, once per process; `None` where no GPU is visible (the
/// GPU tests are then registered as ignored).
pub fn gpu_stream() -> Option<Arc<CudaStream>> {
    static STREAM: std::sync::OnceLock<Option<Arc<CudaStream>>> = std::sync::OnceLock::new();
    STREAM
        .get_or_init(|| {
            cuda::device_count()
                .ok()
                .filter(|&n| n > 0)
                .and_then(|_| cuda::default_stream(0).ok())
        })
        .clone()
}

/// [`gpu_stream`], or the failure of a GPU test run without a GPU (`--include-ignored`).
pub fn stream() -> R<Arc<CudaStream>> {
    Ok(gpu_stream().ok_or("no CUDA device")?)
}

/// An optimizer with its parameters, on some device, driven through the trait.
pub trait Backend<T: GpuStorage>: Sized {
    type Opt: Optimizer<Storage = T>;
    /// Whether gradients go in as one flat buffer (no per-tensor list to mismatch).
    const FLAT: bool = false;
    fn new(config: AdamaxConfig, init: &[Vec<T>]) -> R<Self>;
    /// An optimizer over no tensors at all (which every optimizer refuses).
    fn over_no_tensors(config: AdamaxConfig) -> R<adamax_cuda::Result<Self::Opt>>;
    fn opt(&mut self) -> &mut Self::Opt;
    /// One step with these host gradients (uploaded first on the GPU).
    fn step(&mut self, grads: &[Vec<T>]) -> adamax_cuda::Result<()>;
    /// One step where some tensors have no gradient.
    fn step_some(&mut self, grads: &[Option<Vec<T>>]) -> adamax_cuda::Result<()>;
    /// The parameters, copied to the host.
    fn params(&self) -> R<Vec<Vec<T>>>;
}

/// The settings half of [`Optimizer`], object safe, so that one closure can set the
/// same thing on a CPU and a GPU optimizer.
pub trait Settings {
    fn set_lr(&mut self, lr: f64) -> adamax_cuda::Result<()>;
    fn set_tensor_hyper(&mut self, tensor: usize, hyper: TensorHyper) -> adamax_cuda::Result<()>;
    fn set_options(&mut self, options: StepOptions) -> adamax_cuda::Result<()>;
    fn set_loss_scaler(&mut self, scaler: Option<LossScaler>) -> adamax_cuda::Result<()>;
    fn restore(&mut self, ck: &Checkpoint) -> adamax_cuda::Result<()>;
    fn set_tensor_state_format(
        &mut self,
        tensor: usize,
        format: adamax_cuda::StateFormat,
    ) -> adamax_cuda::Result<()>;
}

impl<O: Optimizer> Settings for O {
    fn set_lr(&mut self, lr: f64) -> adamax_cuda::Result<()> {
        Optimizer::set_lr(self, lr)
    }
    fn set_tensor_hyper(&mut self, tensor: usize, hyper: TensorHyper) -> adamax_cuda::Result<()> {
        Optimizer::set_tensor_hyper(self, tensor, hyper)
    }
    fn set_options(&mut self, options: StepOptions) -> adamax_cuda::Result<()> {
        Optimizer::set_options(self, options)
    }
    fn set_loss_scaler(&mut self, scaler: Option<LossScaler>) -> adamax_cuda::Result<()> {
        Optimizer::set_loss_scaler(self, scaler)
    }
    fn restore(&mut self, ck: &Checkpoint) -> adamax_cuda::Result<()> {
        Optimizer::restore(self, ck)
    }
    fn set_tensor_state_format(
        &mut self,
        tensor: usize,
        format: adamax_cuda::StateFormat,
    ) -> adamax_cuda::Result<()> {
        Optimizer::set_tensor_state_format(self, tensor, format)
    }
}

pub struct Cpu<T: Storage> {
    pub opt: CpuAdamax<T>,
    pub params: Vec<Vec<T>>,
}

impl<T: GpuStorage> Backend<T> for Cpu<T> {
    type Opt = CpuAdamax<T>;
    fn new(config: AdamaxConfig, init: &[Vec<T>]) -> R<Self> {
        let refs: Vec<&[T]> = init.iter().map(|p| p.as_slice()).collect();
        Ok(Self {
            opt: CpuAdamax::new(config, &refs)?,
            params: init.to_vec(),
        })
    }
    fn over_no_tensors(config: AdamaxConfig) -> R<adamax_cuda::Result<CpuAdamax<T>>> {
        Ok(CpuAdamax::new(config, &[]))
    }
    fn opt(&mut self) -> &mut CpuAdamax<T> {
        &mut self.opt
    }
    fn step(&mut self, grads: &[Vec<T>]) -> adamax_cuda::Result<()> {
        let mut p: Vec<&mut [T]> = self.params.iter_mut().map(|x| x.as_mut_slice()).collect();
        let g: Vec<&[T]> = grads.iter().map(|x| x.as_slice()).collect();
        self.opt.step(&mut p, &g)
    }
    fn step_some(&mut self, grads: &[Option<Vec<T>>]) -> adamax_cuda::Result<()> {
        let mut p: Vec<&mut [T]> = self.params.iter_mut().map(|x| x.as_mut_slice()).collect();
        let g: Vec<Option<&[T]>> = grads.iter().map(|x| x.as_deref()).collect();
        self.opt.step_some(&mut p, &g)
    }
    fn params(&self) -> R<Vec<Vec<T>>> {
        Ok(self.params.clone())
    }
}

/// Where each tensor starts in its device buffer: after `param` (or `grad`) elements of
/// padding. Non-zero offsets make views at odd element offsets, which must take the
/// kernel's scalar path.
#[derive(Clone, Copy, Debug)]
pub struct Offsets {
    pub param: usize,
    pub grad: usize,
}

/// Every tensor in a buffer of its own, from its start.
pub const PLAIN: Offsets = Offsets { param: 0, grad: 0 };
/// Parameters one element in, gradients three.
pub const ODD: Offsets = Offsets { param: 1, grad: 3 };

/// The GPU optimizer over one device buffer per tensor (at [`Offsets`] inside it).
pub struct Gpu<T: GpuStorage> {
    pub stream: Arc<CudaStream>,
    pub opt: CudaAdamax<T>,
    /// Each with `offsets.param` elements of padding before the tensor.
    params: Vec<CudaSlice<T>>,
    offsets: Offsets,
    /// Overwrite the parameters with NaN before each [`Backend::step`]: where a master
    /// makes the 16-bit copy output only, a kernel that skips an element cannot pass.
    pub poison: bool,
}

fn uploading(source: DriverError) -> Error {
    Error::Driver {
        context: "uploading test data",
        source,
    }
}

impl<T: GpuStorage> Gpu<T> {
    pub fn with_offsets(config: AdamaxConfig, init: &[Vec<T>], offsets: Offsets) -> R<Self> {
        let stream = stream()?;
        let params = init
            .iter()
            .map(|p| stream.clone_htod(&padded(offsets.param, 7.0, p)))
            .collect::<Result<Vec<_>, _>>()?;
        let views: Vec<_> = params.iter().map(|b| b.slice(offsets.param..)).collect();
        let opt = CudaAdamax::new(&stream, config, &views)?;
        drop(views);
        Ok(Self {
            stream,
            opt,
            params,
            offsets,
            poison: false,
        })
    }

    fn upload_grad(&self, g: &[T]) -> adamax_cuda::Result<CudaSlice<T>> {
        let padded = padded(self.offsets.grad, -3.0, g);
        self.stream.clone_htod(&padded).map_err(uploading)
    }
}

/// `v` after `n` copies of `fill`.
fn padded<T: Storage>(n: usize, fill: f32, v: &[T]) -> Vec<T> {
    let mut out = vec![T::from_f32(fill); n];
    out.extend_from_slice(v);
    out
}

impl<T: GpuStorage> Backend<T> for Gpu<T> {
    type Opt = CudaAdamax<T>;
    fn new(config: AdamaxConfig, init: &[Vec<T>]) -> R<Self> {
        Self::with_offsets(config, init, PLAIN)
    }
    fn over_no_tensors(config: AdamaxConfig) -> R<adamax_cuda::Result<CudaAdamax<T>>> {
        let none: [CudaSlice<T>; 0] = [];
        Ok(CudaAdamax::new(&stream()?, config, &none))
    }
    fn opt(&mut self) -> &mut CudaAdamax<T> {
        &mut self.opt
    }
    fn step(&mut self, grads: &[Vec<T>]) -> adamax_cuda::Result<()> {
        let dg = grads
            .iter()
            .map(|g| self.upload_grad(g))
            .collect::<adamax_cuda::Result<Vec<_>>>()?;
        if self.poison {
            for p in self.params.iter_mut() {
                let nan = vec![T::from_f32(f32::NAN); p.len()];
                self.stream.memcpy_htod(&nan, p).map_err(uploading)?;
            }
        }
        let at = self.offsets;
        let mut pv: Vec<_> = self
            .params
            .iter_mut()
            .map(|p| p.slice_mut(at.param..))
            .collect();
        let gv: Vec<_> = dg.iter().map(|g| g.slice(at.grad..)).collect();
        Optimizer::step(&mut self.opt, &mut pv, &gv)
    }
    fn step_some(&mut self, grads: &[Option<Vec<T>>]) -> adamax_cuda::Result<()> {
        let dg = grads
            .iter()
            .map(|g| g.as_ref().map(|g| self.upload_grad(g)).transpose())
            .collect::<adamax_cuda::Result<Vec<_>>>()?;
        let at = self.offsets;
        let mut pv: Vec<_> = self
            .params
            .iter_mut()
            .map(|p| p.slice_mut(at.param..))
            .collect();
        let gv: Vec<_> = dg
            .iter()
            .map(|g| g.as_ref().map(|g| g.slice(at.grad..)))
            .collect();
        Optimizer::step_some(&mut self.opt, &mut pv, &gv)
    }
    fn params(&self) -> R<Vec<Vec<T>>> {
        let mut host = Vec::with_capacity(self.params.len());
        for p in &self.params {
            host.push(self.stream.clone_dtoh(p)?[self.offsets.param..].to_vec());
        }
        Ok(host)
    }
}

/// The GPU optimizer over one flat parameter buffer (aligned layout), stepped with
/// `step_flat` from one flat gradient buffer: every scenario runs on the flat path too.
pub struct GpuFlat<T: GpuStorage> {
    stream: Arc<CudaStream>,
    opt: CudaAdamax<T>,
    layout: FlatLayout,
    params: CudaSlice<T>,
}

impl<T: GpuStorage> GpuFlat<T> {
    fn flatten(layout: &FlatLayout, tensors: &[Vec<T>]) -> Vec<T> {
        let mut flat = vec![T::from_f32(0.0); layout.total()];
        for (t, &o) in tensors.iter().zip(layout.offsets()) {
            flat[o..o + t.len()].copy_from_slice(t);
        }
        flat
    }
}

impl<T: GpuStorage> Backend<T> for GpuFlat<T> {
    type Opt = CudaAdamax<T>;
    const FLAT: bool = true;
    fn new(config: AdamaxConfig, init: &[Vec<T>]) -> R<Self> {
        let stream = stream()?;
        let lens: Vec<usize> = init.iter().map(Vec::len).collect();
        let layout = FlatLayout::aligned(&lens)?;
        let params = stream.clone_htod(&Self::flatten(&layout, init))?;
        let opt = CudaAdamax::new_flat(&stream, config, &params, layout.clone())?;
        Ok(Self {
            stream,
            opt,
            layout,
            params,
        })
    }
    fn over_no_tensors(_: AdamaxConfig) -> R<adamax_cuda::Result<CudaAdamax<T>>> {
        unreachable!("a flat layout of no tensors is a layout question, not this refusal")
    }
    fn opt(&mut self) -> &mut CudaAdamax<T> {
        &mut self.opt
    }
    fn step(&mut self, grads: &[Vec<T>]) -> adamax_cuda::Result<()> {
        let lens: Vec<usize> = grads.iter().map(Vec::len).collect();
        let mut host = if lens == self.layout.lens() {
            Self::flatten(&self.layout, grads)
        } else {
            // Gradients that do not fit the layout: on the flat path that is a gradient
            // buffer shorter than the layout, which step_flat must refuse.
            vec![T::from_f32(0.0); self.layout.total()]
        };
        if lens != self.layout.lens() {
            host.pop();
        }
        let flat = self.stream.clone_htod(&host).map_err(uploading)?;
        self.opt.step_flat(&mut self.params, &flat)
    }
    fn step_some(&mut self, _: &[Option<Vec<T>>]) -> adamax_cuda::Result<()> {
        unreachable!("the flat path has no per-tensor gradients to leave out")
    }
    fn params(&self) -> R<Vec<Vec<T>>> {
        let flat = self.stream.clone_dtoh(&self.params)?;
        Ok(self
            .layout
            .offsets()
            .iter()
            .zip(self.layout.lens())
            .map(|(&o, &n)| flat[o..o + n].to_vec())
            .collect())
    }
}
