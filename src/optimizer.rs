//! [`Optimizer`]: the interface both optimizers implement with the same signatures, so
//! that a training loop, a checkpointing routine or a test scenario is written once and
//! runs on the CPU reference and on the GPU.

use crate::{
    checkpoint::Checkpoint,
    config::{AdamaxConfig, StateFormat, TensorHyper},
    error::{Error, Result},
    fused::{LossScaler, StepOptions, StepReport},
    state::TensorState,
    storage::Storage,
};

/// AdaMax over a list of parameter tensors, with its state: what
/// [`cpu::CpuAdamax`](crate::cpu::CpuAdamax) and
/// [`cuda::CudaAdamax`](crate::cuda::CudaAdamax) both offer.
///
/// Queries that the GPU answers from device memory (`step_count`, `last_report`,
/// `loss_scaler`, `state`, `checkpoint`) synchronise its stream and return a
/// `Result` on both, so that the same code serves either.
///
/// For PyTorch users: there is no `zero_grad` (the optimizer never owns or accumulates
/// gradients; a step reads the buffers you pass it), and clipping, the overflow check,
/// unscaling and the loss scaler are settings kept between steps
/// ([`Optimizer::set_options`], [`Optimizer::set_loss_scaler`]) that every step then
/// applies inside the same launch, not calls made before each step. A parameter group
/// is a set of tensor indices given the same [`TensorHyper`].
///
/// ```
/// use adamax_cuda::{cpu::CpuAdamax, AdamaxConfig, Optimizer};
///
/// /// Works with any optimizer of f32 parameters held in host slices.
/// fn train<O>(opt: &mut O, weights: &mut [f32]) -> adamax_cuda::Result<u64>
/// where
///     O: for<'a> Optimizer<Param<'a> = &'a mut [f32], Grad<'a> = &'a [f32]>,
/// {
///     for _ in 0..3 {
///         let grads = vec![0.01f32; weights.len()];
///         opt.step(&mut [&mut *weights], &[&grads])?;
///     }
///     opt.step_count()
/// }
///
/// let mut w = vec![0.5f32; 8];
/// let mut opt = CpuAdamax::new(AdamaxConfig::default(), &[&w])?;
/// assert_eq!(train(&mut opt, &mut w)?, 3);
/// # Ok::<(), adamax_cuda::Error>(())
/// ```
pub trait Optimizer {
    /// The parameter storage type.
    type Storage: Storage;
    /// One tensor's parameters as a step takes them (`&mut [T]` on the CPU, a
    /// `CudaViewMut<T>` on the GPU).
    type Param<'a>;
    /// One tensor's gradient as a step takes it (`&[T]` on the CPU, a `CudaView<T>` on
    /// the GPU).
    type Grad<'a>;

    /// One AdaMax step over every tensor: `params[i]` is updated in place from
    /// `grads[i]`, with the options and loss scaler in force. Every argument is checked
    /// before anything is written: a refused step changes nothing.
    fn step<'a>(&mut self, params: &mut [Self::Param<'a>], grads: &[Self::Grad<'a>]) -> Result<()>;

    /// [`Optimizer::step`] where some tensors have no gradient this step (`None`: a
    /// frozen layer, an embedding row set not used), as PyTorch and candle skip
    /// parameters whose gradient is `None`: such a tensor is not read or written, takes
    /// no weight decay, adds nothing to the clipping norm or the overflow check, and does
    /// not count the step (its own step count, [`TensorState::step`], drives its bias
    /// correction, as PyTorch's per-parameter `state["step"]` does). The optimizer's
    /// step count still advances.
    fn step_some<'a>(
        &mut self,
        params: &mut [Self::Param<'a>],
        grads: &[Option<Self::Grad<'a>>],
    ) -> Result<()>;

    /// The configuration in force.
    fn config(&self) -> &AdamaxConfig;
    /// Changes the learning rate (for a schedule), validated with every tensor's
    /// settings; a refused value changes nothing.
    fn set_lr(&mut self, lr: f64) -> Result<()>;

    /// The element count of every tensor, in order.
    fn tensor_lens(&self) -> &[usize];
    /// Every tensor's hyperparameters, in order.
    fn tensor_hypers(&self) -> &[TensorHyper];
    /// Sets tensor `tensor`'s learning-rate scale and weight decay (a parameter group),
    /// from the next step on.
    fn set_tensor_hyper(&mut self, tensor: usize, hyper: TensorHyper) -> Result<()>;

    /// Every tensor's shape, in order: `[len]` unless set with
    /// [`Optimizer::set_tensor_shape`] or restored from a checkpoint that has another.
    fn tensor_shapes(&self) -> &[Vec<usize>];
    /// Gives tensor `tensor` its parameter's shape (PyTorch's `param.shape`, `[]` for a
    /// scalar), which checkpoints then give its per-element state, as PyTorch's
    /// `state_dict` does. Only what files hold changes: steps see the elements in
    /// order. The product must be the tensor's length ([`Error::ShapeMismatch`]).
    /// [`Optimizer::restore`] takes the checkpoint's shapes, `[n]` for a file written
    /// without them: set the shapes again after restoring such a file.
    ///
    /// [`Error::ShapeMismatch`]: crate::Error::ShapeMismatch
    fn set_tensor_shape(&mut self, tensor: usize, shape: &[usize]) -> Result<()>;

    /// Every tensor's name, in order (`None` unless set with
    /// [`Optimizer::set_tensor_name`] or restored from a checkpoint that has one).
    fn tensor_names(&self) -> &[Option<String>];
    /// Names tensor `tensor` (its parameter's name in the model: a candle `VarMap` key,
    /// PyTorch's `named_parameters()` name), or with `None` takes its name away.
    /// Checkpoints record the names, [`Checkpoint::reordered`] puts a checkpoint's
    /// tensors in another order by them, and [`Optimizer::restore`] refuses a
    /// checkpoint whose tensor has another name than the optimizer's at the same index
    /// ([`Error::NameMismatch`]). A name is non-empty, at most 1024 bytes, without
    /// control characters, and another tensor's is refused ([`Error::TensorName`]).
    ///
    /// [`Error::NameMismatch`]: crate::Error::NameMismatch
    /// [`Error::TensorName`]: crate::Error::TensorName
    fn set_tensor_name(&mut self, tensor: usize, name: Option<&str>) -> Result<()>;

    /// Every tensor's state format, in order: with
    /// [`StateFormat::Blockwise8`](crate::StateFormat::Blockwise8), 8 bits for tensors
    /// of at least [`Precision::min_8bit_len`](crate::Precision::min_8bit_len) elements
    /// and f32 for the others, unless chosen with
    /// [`Optimizer::set_tensor_state_format`]; with f32 state, f32 for all.
    fn tensor_state_formats(&self) -> &[StateFormat];
    /// Keeps tensor `tensor`'s moments in `format`, overriding the size rule: f32 for a
    /// tensor that should not be quantised (an embedding, a norm gain), or 8 bits for a
    /// small one. Tensors of both formats are stepped in the same launch. Allowed in an
    /// optimizer built with 8-bit state, before its first step or restore (the state
    /// would otherwise need converting: see
    /// [`Checkpoint::convert_state`](crate::Checkpoint::convert_state));
    /// [`Error::StateFormat`](crate::Error::StateFormat) otherwise. Checkpoints record
    /// each tensor's format, and a restore refuses one whose formats differ.
    ///
    /// ```
    /// use adamax_cuda::{cpu::CpuAdamax, AdamaxConfig, Optimizer, Precision, StateFormat};
    /// let (embedding, bias) = (vec![0.1f32; 50_000], vec![0.0f32; 64]);
    /// let config = AdamaxConfig {
    ///     precision: Precision { state: StateFormat::Blockwise8, ..Precision::default() },
    ///     ..AdamaxConfig::default()
    /// };
    /// let mut opt = CpuAdamax::new(config, &[&embedding, &bias])?;
    /// assert_eq!(opt.tensor_state_formats(), &[StateFormat::Blockwise8, StateFormat::F32]);
    /// opt.set_tensor_state_format(0, StateFormat::F32)?; // keep the embedding exact
    /// # Ok::<(), adamax_cuda::Error>(())
    /// ```
    fn set_tensor_state_format(&mut self, tensor: usize, format: StateFormat) -> Result<()> {
        let mut formats = self.tensor_state_formats().to_vec();
        let count = formats.len();
        *formats
            .get_mut(tensor)
            .ok_or(Error::TensorIndexOutOfRange {
                index: tensor,
                count,
            })? = format;
        self.set_tensor_state_formats(&formats)
    }
    /// Every tensor's state format at once, one per tensor, as
    /// [`Optimizer::set_tensor_state_format`] sets one (all or nothing): on the GPU the
    /// state is laid out once, where choosing tensor by tensor lays it out anew for each.
    fn set_tensor_state_formats(&mut self, formats: &[StateFormat]) -> Result<()>;

    /// The options of every step (unscaling, overflow skip, clipping).
    fn options(&self) -> StepOptions;
    /// Sets the options of every following step.
    fn set_options(&mut self, options: StepOptions) -> Result<()>;
    /// The loss scaler's current state, when one is enabled.
    fn loss_scaler(&self) -> Result<Option<LossScaler>>;
    /// Enables (or, with `None`, disables) dynamic loss scaling.
    fn set_loss_scaler(&mut self, scaler: Option<LossScaler>) -> Result<()>;

    /// What the last step since construction or the last [`Optimizer::restore`] did
    /// (skipped or not, its norm and clip factor; before any step: not skipped, no
    /// norm, factor 1), with the step count and the loss scale in force now (a scaler
    /// set or removed since shows at once). Both optimizers answer alike.
    fn last_report(&self) -> Result<StepReport>;
    /// Steps taken so far (PyTorch's `state["step"]`; skipped steps are not counted).
    fn step_count(&self) -> Result<u64>;
    /// A host copy of every tensor's state, in parameter order.
    fn state(&self) -> Result<Vec<TensorState>>;

    /// The optimizer's whole state on the host (not the parameters), for
    /// [`Checkpoint::save`].
    fn checkpoint(&self) -> Result<Checkpoint> {
        checkpoint_of(self)
    }

    /// Writes the optimizer's state to a checkpoint file at `path`, atomically, as
    /// [`Checkpoint::save`] does (and refusing what it refuses). The GPU optimizer
    /// streams it from the device one tensor at a time, so the host holds one tensor's
    /// state, not the model's. The parameters are not in it: save them with your model
    /// (for 16-bit parameters kept with a master, the master weights in the file are
    /// the truth).
    fn save_checkpoint(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        self.checkpoint()?.save(path)
    }

    /// Replaces configuration, per-tensor settings, shapes, step options, loss scaler,
    /// step count and state with `ck`'s, after checking that it fits (storage type,
    /// tensor count and lengths, and names: a tensor named by both must have the same
    /// name; one named by either keeps that name). All or nothing: a refused
    /// checkpoint changes nothing. The
    /// parameters are the caller's to restore; for 16-bit storage kept with a master,
    /// the master weights in `ck` are the truth and [`Checkpoint::params`] gives the
    /// 16-bit parameters rounded from them.
    fn restore(&mut self, ck: &Checkpoint) -> Result<()>;
}

/// The checkpoint of `opt` from its trait's reads: [`Optimizer::checkpoint`]'s default,
/// for an implementation that checks something first.
pub(crate) fn checkpoint_of<O: Optimizer + ?Sized>(opt: &O) -> Result<Checkpoint> {
    Ok(Checkpoint {
        config: *opt.config(),
        step: opt.step_count()?,
        storage: <O::Storage as Storage>::TYPE,
        tensors: opt.state()?,
        shapes: opt.tensor_shapes().to_vec(),
        names: opt.tensor_names().to_vec(),
        state_formats: opt.tensor_state_formats().to_vec(),
        hypers: opt.tensor_hypers().to_vec(),
        options: opt.options(),
        scaler: opt.loss_scaler()?,
    })
}
