//! Typed errors. Every message says what was wrong and what to do about it.

/// An [`AdamaxConfig`](crate::AdamaxConfig) (or option, scaler, per-tensor setting) field
/// outside its allowed range.
///
/// ```
/// use adamax_cuda::{AdamaxConfig, ConfigError};
/// let err = AdamaxConfig { beta1: 1.0, ..AdamaxConfig::default() }.validate().unwrap_err();
/// assert!(matches!(err, ConfigError::OutOfRange { field: "beta1", .. }));
/// println!("{err}"); // AdaMax config: `beta1` is 1, outside the allowed range (0 <= beta1 < 1)
/// ```
#[derive(Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// NaN or infinite hyperparameter.
    #[error("AdaMax config: `{field}` is {value}, which is not finite; pass a finite number")]
    NotFinite {
        /// Name of the field, as spelled in `AdamaxConfig`.
        field: &'static str,
        /// The value given.
        value: f64,
    },
    /// Finite, but outside the range the rule is defined on.
    #[error("AdaMax config: `{field}` is {}, outside the allowed range ({allowed})", Num(*.value))]
    OutOfRange {
        /// Name of the field, as spelled in `AdamaxConfig`.
        field: &'static str,
        /// The value given.
        value: f64,
        /// The allowed range, e.g. `0 <= beta1 < 1`.
        allowed: &'static str,
    },
    /// Finite and in range, but an f32 scalar the step derives from it would be
    /// infinite (f32's largest value is about 3.4e38).
    #[error("AdaMax config: `{field}` is {}, which makes the step's f32 scalar `{scalar}` infinite; use a value small enough for f32", Num(*.value))]
    NotRepresentable {
        /// The field to change.
        field: &'static str,
        /// The value given.
        value: f64,
        /// The scalar that overflows.
        scalar: &'static str,
    },
    /// Decoupled weight decay whose per-step factor `1 - lr * lr_scale * weight_decay`
    /// is at or below 0: the weights would flip sign or grow each step.
    #[error("AdaMax config: decoupled weight decay with lr {} x lr_scale {} x weight_decay {} = {} would multiply the weights by 1 - {} <= 0 every step; keep lr * lr_scale * weight_decay below 1 (lower the learning rate or the decay)", Num(*.lr), Num(*.lr_scale), Num(*.weight_decay), Num(*.product), Num(*.product))]
    DecayFactor {
        /// The learning rate.
        lr: f64,
        /// The tensor's learning-rate scale.
        lr_scale: f64,
        /// The tensor's weight decay.
        weight_decay: f64,
        /// `f32(lr * lr_scale * weight_decay)`, as the step uses it.
        product: f64,
    },
    /// A storage mode that the parameters' type does not have.
    #[error("AdaMax config: {what} is not available for {storage} parameters; it is for {allowed} parameters: choose another mode or parameter type")]
    Unsupported {
        /// The mode, as spelled in the API.
        what: &'static str,
        /// The parameters' storage type.
        storage: &'static str,
        /// The parameter types that have the mode.
        allowed: String,
    },
}

/// Everything a step, a construction or a state query can refuse. Every message says
/// what was wrong and what to do; match on the variants to act on them.
///
/// ```
/// use adamax_cuda::{cpu::CpuAdamax, AdamaxConfig, Error, Optimizer};
/// let mut w = vec![0.0f32; 3];
/// let mut opt = CpuAdamax::new(AdamaxConfig::default(), &[&w])?;
/// match opt.step(&mut [&mut w], &[&[1.0, 2.0]]) {
///     Err(Error::LengthMismatch { what: "grad", tensor: 0, expected: 3, found: 2 }) => {}
///     other => panic!("{other:?}"),
/// }
/// // Without a GPU the GPU path says so, as a value: never a panic.
/// if let Err(e) = adamax_cuda::cuda::default_stream(0) {
///     assert!(matches!(e, Error::DriverNotFound | Error::NoSuchDevice { .. } | Error::Driver { .. }));
/// }
/// # Ok::<(), adamax_cuda::Error>(())
/// ```
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Invalid hyperparameters.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The optimizer was given no tensors (PyTorch refuses this too).
    #[error("AdaMax: empty parameter list; pass at least one tensor (a tensor may be empty)")]
    EmptyParameterList,
    /// A list passed to a step does not have one entry per tensor of the optimizer.
    #[error("AdaMax: {what} has {found} tensors but the optimizer was built for {expected}; pass one per parameter tensor, in the same order")]
    TensorCountMismatch {
        /// Which list (`"params"`, `"grads"`).
        what: &'static str,
        /// Tensors the optimizer holds state for.
        expected: usize,
        /// Tensors passed.
        found: usize,
    },
    /// A buffer whose length disagrees with its tensor's.
    #[error("AdaMax: {what} of tensor {tensor} has {found} elements but the tensor has {expected}; buffers of one tensor must have equal lengths")]
    LengthMismatch {
        /// Which buffer (`"grad"`, `"param"`, ...).
        what: &'static str,
        /// Index of the tensor in the parameter list.
        tensor: usize,
        /// Elements the tensor has.
        expected: usize,
        /// Elements the buffer has.
        found: usize,
    },
    /// A tensor shape whose element count is not its tensor's.
    #[error("AdaMax: shape {shape:?} of tensor {tensor} holds {} elements but the tensor has {expected}; give the shape its parameter has (PyTorch's `param.shape`), whose product is the tensor's length", .found.map_or_else(|| "more than usize::MAX".to_owned(), |n| n.to_string()))]
    ShapeMismatch {
        /// Index of the tensor in the parameter list.
        tensor: usize,
        /// The shape given.
        shape: Vec<usize>,
        /// Elements the tensor has.
        expected: usize,
        /// Elements the shape holds; `None` when the product overflows `usize`.
        found: Option<usize>,
    },
    /// A tensor name that cannot be given (empty, too long, with a control character,
    /// or already another tensor's).
    #[error("AdaMax: the name {name:?} of tensor {tensor} {reason}")]
    TensorName {
        /// Index of the tensor in the parameter list.
        tensor: usize,
        /// The name given.
        name: String,
        /// What is wrong with it and what to do.
        reason: String,
    },
    /// A checkpoint whose tensor has another name than the optimizer's tensor at the same
    /// index: the model's variables came in another order, or it is another model's state.
    #[error("AdaMax: tensor {tensor} is {expected:?} in this optimizer but {found:?} in the checkpoint; put the checkpoint in the optimizer's order by name first (Checkpoint::reordered), or restore a checkpoint of this model")]
    NameMismatch {
        /// Index of the tensor in the parameter list.
        tensor: usize,
        /// The optimizer's name for it.
        expected: String,
        /// The checkpoint's name for it.
        found: String,
    },
    /// A tensor's state format that cannot be chosen: 8 bits in an optimizer built with
    /// f32 state, or any change after the first step or a restore (the state would have
    /// to be converted), or a checkpoint whose tensor keeps another format than the
    /// optimizer's.
    #[error("AdaMax: tensor {tensor} cannot keep {format} state: {reason}")]
    StateFormat {
        /// Index of the tensor in the parameter list.
        tensor: usize,
        /// The format asked for (`f32` or `8-bit`).
        format: &'static str,
        /// Why, and what to do.
        reason: String,
    },
    /// A tensor index past the end of the optimizer's list.
    #[error("AdaMax: tensor index {index} is out of range: the optimizer holds {count} tensors (indices 0..{count})")]
    TensorIndexOutOfRange {
        /// The index given.
        index: usize,
        /// Tensors the optimizer holds.
        count: usize,
    },
    /// The tensors' total size does not fit the address space or the device's indices.
    #[error("AdaMax: {what} overflows; split the parameters over several optimizers")]
    TooLarge {
        /// What overflowed, e.g. "the total element count".
        what: &'static str,
    },
    /// The step counter would pass `u64::MAX`.
    #[error("AdaMax: the step counter is at its maximum ({0}); reset the optimizer")]
    StepOverflow(u64),
    /// No CUDA driver library could be loaded.
    #[error("AdaMax GPU: the CUDA driver library (libcuda.so / nvcuda.dll) was not found; install the NVIDIA driver, or use adamax_cuda::cpu::CpuAdamax without a GPU")]
    DriverNotFound,
    /// No NVRTC library could be loaded.
    #[error("AdaMax GPU: the NVRTC library (libnvrtc.so.13 or .12) was not found; install a CUDA toolkit or `pip install nvidia-cuda-nvrtc` and put its lib directory on LD_LIBRARY_PATH")]
    NvrtcNotFound,
    /// NVRTC refused the kernel source; carries NVRTC's log.
    #[error("AdaMax GPU: NVRTC failed to compile kernels/adamax.cu for {arch} ({nvrtc}) with options {options:?}; log:\n{log}")]
    Compile {
        /// Target architecture, e.g. `sm_90`.
        arch: String,
        /// NVRTC's status.
        nvrtc: String,
        /// The options passed.
        options: Vec<String>,
        /// NVRTC's compile log.
        log: String,
    },
    /// A CUDA driver call failed.
    #[error("AdaMax GPU: {context} failed: {source}")]
    Driver {
        /// What was being done.
        context: &'static str,
        /// The driver's error.
        source: cudarc::driver::DriverError,
    },
    /// No CUDA device has this ordinal.
    #[error("AdaMax GPU: there is no CUDA device {ordinal} ({visible} visible); pick an ordinal below {visible}, check CUDA_VISIBLE_DEVICES, or use adamax_cuda::cpu::CpuAdamax without a GPU")]
    NoSuchDevice {
        /// The ordinal asked for.
        ordinal: usize,
        /// Devices the driver sees.
        visible: usize,
    },
    /// A stream handed to `borrow_stream` belongs to another CUDA context than the
    /// device's primary context.
    #[error("AdaMax GPU: the borrowed stream belongs to another CUDA context than device {ordinal}'s primary context; pass a stream created in the primary context (as candle, burn and tch do)")]
    ForeignStream {
        /// The device ordinal asked for.
        ordinal: usize,
    },
    /// A `FlatLayout` that cannot describe tensors in one buffer.
    #[error("AdaMax flat layout: {reason}")]
    InvalidLayout {
        /// What is wrong and what to do.
        reason: String,
    },
    /// A flat buffer shorter than its layout.
    #[error("AdaMax GPU: {what} holds {found} elements but the flat layout needs {needed}; allocate at least FlatLayout::total() elements")]
    BufferTooSmall {
        /// Which buffer (`"flat params"`, `"flat grads"`).
        what: &'static str,
        /// Elements the layout needs.
        needed: usize,
        /// Elements the buffer holds.
        found: usize,
    },
    /// A CUDA graph captured before a `restore` that changed the configuration (betas,
    /// eps, its conventions, `maximize` or the seed) was replayed: the replay changed
    /// nothing.
    #[error("AdaMax GPU: the last step was a CUDA graph captured before a restore changed the configuration (betas, eps, their conventions, maximize or the seed); it changed nothing. Capture the step again after the restore")]
    StaleGraph,
    /// A call that copies host memory to the device was made while the optimizer's
    /// stream is capturing a CUDA graph.
    #[error("AdaMax GPU: {what} while the optimizer's stream is capturing a CUDA graph; the copy would be captured and replay host memory that no longer holds it. {instead}")]
    DuringCapture {
        /// What was attempted.
        what: &'static str,
        /// What to do instead.
        instead: &'static str,
    },
    /// `step_flat` on an optimizer not built with `new_flat`.
    #[error("AdaMax GPU: step_flat needs an optimizer built with CudaAdamax::new_flat (it knows no flat layout); use step with one view per tensor, or build it with new_flat")]
    NotFlat,
    /// A buffer lives in another CUDA context than the optimizer's stream.
    #[error("AdaMax GPU: {what} of tensor {tensor} lives on device {found} but the optimizer runs on device {expected}; move it or build the optimizer on that device's stream")]
    WrongDevice {
        /// Which buffer.
        what: &'static str,
        /// Index of the tensor.
        tensor: usize,
        /// Device ordinal of the optimizer.
        expected: usize,
        /// Device ordinal of the buffer.
        found: usize,
    },
    /// A raw device address passed to an `_raw` entry point is unusable.
    #[error("AdaMax GPU: {what} of tensor {tensor} at address {address:#x} {reason}; pass the device address of the tensor's first element")]
    InvalidPointer {
        /// Which buffer.
        what: &'static str,
        /// Index of the tensor.
        tensor: usize,
        /// The address given.
        address: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A checkpoint was refused (by a load, a save or a restore); nothing was changed:
    /// no optimizer's state, and no file.
    #[error(
        "AdaMax checkpoint refused: {reason}; nothing was changed (no optimizer state, no file)"
    )]
    Checkpoint {
        /// What was wrong with it.
        reason: String,
    },
    /// Reading or writing a file failed.
    #[error("AdaMax: {action} {}: {source}{hint}", path.display())]
    Io {
        /// What was being done: `"reading"`, `"writing"`.
        action: &'static str,
        /// What to do, when the error says it (`"; create its directory first"`), else
        /// empty.
        hint: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The NCCL library could not be loaded (the `nccl` feature's sharded optimizer).
    #[error("AdaMax NCCL: the NCCL library (libnccl.so) was not found{hint}")]
    NcclNotFound {
        /// What to install or link.
        hint: &'static str,
    },
    /// An NCCL id made from bytes that are not its 128.
    #[error("AdaMax NCCL: an NCCL id is 128 bytes, not {len}; pass the bytes of NcclId::as_bytes from rank 0 whole")]
    InvalidNcclId {
        /// Bytes given.
        len: usize,
    },
    /// An NCCL call failed; the sharded optimizer that made it refuses every later
    /// step (its ranks may disagree on what ran): rebuild the communicator and the
    /// optimizer, from a checkpoint.
    #[error("AdaMax NCCL: {context} failed: {code}{detail}")]
    Nccl {
        /// What was being done.
        context: &'static str,
        /// NCCL's result code and its description.
        code: String,
        /// NCCL's last error message for the communicator, when it has one (`": ..."`),
        /// else empty.
        detail: String,
    },
    /// An invariant of this crate did not hold: a bug, never the caller's input.
    #[error("AdaMax internal error: {what}; please report it with the steps that led here")]
    Internal {
        /// What did not hold.
        what: &'static str,
    },
    /// The device is older than the kernels support.
    #[error("AdaMax GPU: device {ordinal} has compute capability {major}.{minor}; the kernels need 7.5 (Turing) or newer")]
    UnsupportedDevice {
        /// Device ordinal.
        ordinal: usize,
        /// Compute capability, major.
        major: i32,
        /// Compute capability, minor.
        minor: i32,
    },
}

/// `Debug` is the message (as `anyhow` prints it), so that `fn main() -> Result<()>`
/// and `unwrap` show what to do, not just a variant's name.
macro_rules! debug_is_display {
    ($($t:ty),*) => {$(
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                std::fmt::Display::fmt(self, f)
            }
        }
    )*};
}
debug_is_display!(Error, ConfigError);

/// A number as a message shows it: plainly in everyday ranges, in scientific notation
/// beyond them (`1e40`, not forty-one digits).
struct Num(f64);

impl std::fmt::Display for Num {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A value that came from an f32 (a loss scale, an f32 scalar of the step) is
        // shown as that f32, not with the digits its widening to f64 shows.
        let narrow = self.0 as f32;
        let exact_f32 = f64::from(narrow) == self.0;
        let a = self.0.abs();
        match (
            exact_f32,
            a == 0.0 || !a.is_finite() || (1e-4..1e15).contains(&a),
        ) {
            (true, true) => write!(f, "{narrow}"),
            (true, false) => write!(f, "{narrow:e}"),
            (false, true) => write!(f, "{}", self.0),
            (false, false) => write!(f, "{:e}", self.0),
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
impl Error {
    /// An I/O error while `action` (`"reading"`, `"writing"`) `path`, with a hint
    /// from its kind.
    pub(crate) fn io(action: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        let writing = action == "writing";
        let hint = match source.kind() {
            K::NotFound if path.as_os_str().is_empty() => "; pass a file path",
            K::NotFound if writing => "; its directory does not exist: create it first",
            K::NotFound => "; check the path",
            K::AlreadyExists => {
                "; pass the path of a regular file, or of one that does not exist yet"
            }
            K::IsADirectory => "; pass the path of a file, not of a directory",
            K::NotADirectory => {
                "; a part of the path is not a directory (or the path ends in `/`): check the path"
            }
            K::PermissionDenied | K::ReadOnlyFilesystem if writing => {
                "; choose a location this process may write"
            }
            K::PermissionDenied => "; check the file's permissions",
            K::StorageFull | K::QuotaExceeded => "; free some space or choose another disk",
            _ => "",
        };
        Self::Io {
            action,
            hint,
            path: path.to_owned(),
            source,
        }
    }

    pub(crate) fn driver(
        context: &'static str,
    ) -> impl FnOnce(cudarc::driver::DriverError) -> Self {
        move |source| Self::Driver { context, source }
    }
}
