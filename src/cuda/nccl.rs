//! The optimizer state sharded over GPUs on NCCL (ZeRO-1; feature `nccl`, issue #20):
//! [`ShardedAdamax`], one per rank, each holding the state (moments, and masters for
//! 16-bit parameters) of its shard of the flat buffers ([`ShardLayout`]) only.
//!
//! # A step
//!
//! Every rank holds the whole flat parameter buffer (its model replica) and, after its
//! backward pass, the whole flat gradient buffer, both laid out as the
//! [`ShardLayout`]. [`ShardedAdamax::step`] enqueues, on the communicator's stream:
//!
//! 1. an in-place NCCL reduce-scatter of the gradients (sum or average over ranks,
//!    [`GradReduction`], in the gradients' type), which leaves this rank's shard of
//!    the reduced gradients in its place in the buffer
//!    ([`ShardedAdamax::step_reduced`] skips it for gradients reduced elsewhere);
//! 2. the one-GPU step over this rank's pieces of tensors, in one launch, in every mode
//!    (f32, masters, stochastic rounding, 8-bit state with its per-tensor threshold,
//!    per-tensor settings, tensors without a gradient);
//! 3. with clipping, the overflow check or a loss scaler, between the step's reduction
//!    and its decision: one grouped NCCL all-reduce of the per-chunk partial sums of
//!    squares (each rank's own chunks, zeros elsewhere: every chunk's sum is added to
//!    zeros only, so the sums arrive exact whatever order NCCL adds in) and of the
//!    overflow flag; each rank then adds them in the one-GPU order;
//! 4. an in-place NCCL all-gather of the updated parameters.
//!
//! # What is bit-identical to what
//!
//! Given the same reduced gradients, the ranks together write the parameters and state
//! one [`CudaAdamax`] over the whole list writes (and the CPU
//! reference, [`CpuAdamax`](crate::cpu::CpuAdamax)), bit for bit, at any world size:
//! clipping's norm and coefficient, the overflow skip and the loss scaler decide alike
//! on every rank and as one GPU does, and the random stream of stochastic rounding is
//! keyed by each element's whole tensor and position. The gradient reduction of step 1
//! is NCCL's own: its order of addition may change with the world size and NCCL's
//! algorithm, as in every data-parallel stack; reduce the gradients yourself in a fixed
//! order and use [`ShardedAdamax::step_reduced`] where that matters. The CPU twin of
//! all this ([`CpuAdamax::for_shard`](crate::cpu::CpuAdamax::for_shard) over an
//! in-process collective) is tested for worlds of 1 to 8 ranks in every mode
//! (`tests/sharded.rs`), and the kernel's placement of pieces by the host emulation.
//!
//! # What every rank must do alike
//!
//! The collectives pair up across ranks, so every rank must make the same calls in the
//! same order (and none inside an NCCL group of its own, which would defer them past
//! the kernels that wait for them): the same steps (and [`ShardedAdamax::step_some`]'s same tensors without
//! a gradient), and the same settings (options, loss scaler), which decide whether a
//! step exchanges partial sums. A rank that does otherwise leaves the others waiting
//! in NCCL. [`ShardedAdamax::new`] checks, with one collective, that every rank builds
//! the optimizer of the same tensors, world size, parameter type and configuration. An
//! error in a step once its collectives are under way (a failed NCCL call, or any
//! other) makes the communicator refuse every later step ([`Error::Nccl`]): its ranks
//! may disagree on what ran, so make a new communicator and optimizer, from the last
//! checkpoint. Give each rank a stream of its own (`context().new_stream()`), not the
//! legacy default stream, whose implicit synchronisation can hold up NCCL's kernels;
//! a garbage [`NcclId`] makes [`NcclComm::new`] wait for NCCL's bootstrap timeout.
//!
//! # Checkpoints
//!
//! [`ShardedAdamax::checkpoint`] gives the rank's [`ShardCheckpoint`] (its pieces'
//! state, with the layout and the whole tensors' shapes, names and settings), which
//! [`ShardCheckpoint::save`] writes with the one-GPU file's integrity checks;
//! [`ShardCheckpoint::gather`] makes the one-GPU [`Checkpoint`](crate::Checkpoint) of
//! every rank's (byte for byte the file one optimizer over the whole list writes),
//! [`Checkpoint::shard`](crate::Checkpoint::shard) splits one over any world size, and
//! [`ShardCheckpoint::reshard`] moves a run to another world size.
//!
//! # Not yet
//!
//! Capturing a sharded step in a CUDA graph is not built (refused), nor overlapping the
//! exchange with the backward pass: that would go in buckets of the
//! flat gradient buffer, each reduce-scattered as the backward pass completes it, on a
//! second stream that the step waits on.
//!
//! ```no_run
//! use adamax_cuda::{
//!     cuda::{self, nccl::{NcclComm, NcclId, ShardedAdamax}},
//!     shard::ShardLayout,
//!     AdamaxConfig,
//! };
//! // One process per GPU; rank 0 makes the id and passes its 128 bytes to the others
//! // out of band (a file, the launcher's store).
//! let (rank, world_size) = (0, 1);
//! let id = NcclId::new()?;
//! let local_rank = 0; // this process's GPU among those it sees
//! let stream = cuda::default_stream(local_rank)?.context().new_stream().unwrap();
//! let comm = NcclComm::new(&stream, rank, world_size, &id)?;
//! let layout = ShardLayout::new(&[4096 * 1024, 4096, 1024 * 4096], world_size)?;
//! let mut params = stream.alloc_zeros::<f32>(layout.total()).unwrap(); // the model, laid out by `layout.offsets()`
//! let mut grads = stream.alloc_zeros::<f32>(layout.total()).unwrap();
//! let mut opt = ShardedAdamax::new(comm, AdamaxConfig::default(), layout, &params)?;
//! // ... backward pass into `grads` ...
//! opt.step(&mut params, &mut grads)?; // every rank's `params` hold the updated model
//! # Ok::<(), adamax_cuda::Error>(())
//! ```

use std::{cell::Cell, ffi::CStr, mem::MaybeUninit, sync::Arc};

use cudarc::{
    driver::{CudaStream, DevicePtr, DevicePtrMut},
    nccl::{result, sys},
};

use crate::{
    checkpoint::ShardCheckpoint,
    config::{AdamaxConfig, TensorHyper},
    error::{Error, Result},
    fused::{LossScaler, StepOptions, StepReport},
    optimizer::Optimizer,
    shard::{Piece, ShardLayout},
    state::{Schedule, TensorState},
    storage::StorageType,
};

use super::{
    device::{check_devices, refuse_during_capture},
    launch::Exchanged,
    optimizer::{check_len, piece_addresses, CudaAdamax, GpuStorage},
};

/// Library names of NCCL: the one cudarc loads, and the versioned one that NCCL's
/// packages install (PyPI's `nvidia-nccl-cu13` installs only it).
#[cfg(not(windows))]
const NCCL: &str = "libnccl.so";
#[cfg(not(windows))]
const NCCL_VERSIONED: &str = "libnccl.so.2";
#[cfg(windows)]
const NCCL: &str = "nccl.dll";
#[cfg(windows)]
const NCCL_VERSIONED: &str = "nccl.dll";

/// Whether NCCL loads under cudarc's name, else why not: cudarc panics where it does
/// not, so nothing calls into it before this succeeds.
fn nccl_loads() -> Result<()> {
    // SAFETY: loading NCCL runs its initialisers, as cudarc's first call does with the
    // same name; the handle is closed again at once.
    let loads = |name: &str| unsafe { libloading::Library::new(name) }.is_ok();
    if loads(NCCL) {
        return Ok(());
    }
    let hint = if loads(NCCL_VERSIONED) {
        "; libnccl.so.2 loads, but cudarc loads libnccl.so: add a link named libnccl.so to it in a directory on LD_LIBRARY_PATH (PyPI's nvidia-nccl-cu13 installs libnccl.so.2 only)"
    } else {
        "; install NCCL (the CUDA repository's libnccl2 and libnccl-dev, or PyPI's nvidia-nccl-cu13 with a link named libnccl.so to its libnccl.so.2) and put its directory on LD_LIBRARY_PATH"
    };
    Err(Error::NcclNotFound { hint })
}

/// The error of a failed NCCL call made while `context`, with NCCL's description of
/// the code and, for a communicator, its last error message.
fn nccl_error(context: &'static str, comm: Option<sys::ncclComm_t>, e: result::NcclError) -> Error {
    // SAFETY: NCCL returns static or communicator-owned NUL-terminated strings (or null).
    let text = |p: *const std::ffi::c_char| {
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    };
    let described = text(unsafe { sys::ncclGetErrorString(e.0) });
    let code = match described {
        Some(d) => format!("{:?} ({d})", e.0),
        None => format!("{:?}", e.0),
    };
    let detail = comm
        .and_then(|c| text(unsafe { sys::ncclGetLastError(c) }))
        .filter(|d| !d.is_empty())
        .map(|d| format!(": {d}"))
        .unwrap_or_default();
    Error::Nccl {
        context,
        code,
        detail,
    }
}

/// Makes `stream`'s CUDA context current on this thread, where NCCL's calls look for
/// it (cudarc does not bind it for them).
fn bind(stream: &CudaStream) -> Result<()> {
    stream.context().bind_to_thread().map_err(Error::driver(
        "binding the stream's CUDA context to this thread",
    ))
}

/// The version of the NCCL library that loads, as `(major, minor, patch)`.
pub fn nccl_version() -> Result<(u32, u32, u32)> {
    nccl_loads()?;
    let code =
        result::get_nccl_version().map_err(|e| nccl_error("reading NCCL's version", None, e))?;
    let code = u32::try_from(code).unwrap_or(0);
    // NCCL_VERSION_CODE: major * 10000 + minor * 100 + patch since 2.9, major * 1000 +
    // minor * 100 + patch before.
    Ok(if code >= 20900 {
        (code / 10000, code / 100 % 100, code % 100)
    } else {
        (code / 1000, code / 100 % 10, code % 100)
    })
}

/// NCCL's unique id of a communicator: made once, by rank 0 ([`NcclId::new`]), and
/// passed to every other rank out of band (a file, the job launcher's store) as its
/// 128 bytes ([`NcclId::as_bytes`], [`NcclId::from_bytes`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclId([u8; 128]);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NcclId(..)")
    }
}

impl NcclId {
    /// A new id (NCCL's `ncclGetUniqueId`: it also starts NCCL's bootstrap listener in
    /// this process, which the other ranks reach over the network).
    pub fn new() -> Result<Self> {
        nccl_loads()?;
        let id = result::get_uniqueid().map_err(|e| nccl_error("making an NCCL id", None, e))?;
        Ok(Self(id.internal.map(|c| c as u8)))
    }

    /// The id's 128 bytes, to pass to the other ranks.
    pub fn as_bytes(&self) -> &[u8; 128] {
        &self.0
    }

    /// The id from its 128 bytes; other lengths are refused ([`Error::InvalidNcclId`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let id: [u8; 128] = bytes
            .try_into()
            .map_err(|_| Error::InvalidNcclId { len: bytes.len() })?;
        Ok(Self(id))
    }
}

/// An NCCL communicator of one rank, on one CUDA stream: what a [`ShardedAdamax`]
/// exchanges over. Made on every rank with the same [`NcclId`] and world size; each
/// blocks until all ranks have joined. Not `Send`: use it on the thread that made it.
pub struct NcclComm {
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    rank: usize,
    world_size: usize,
    /// Set by a failed call: every later collective is refused, and dropping aborts.
    failed: Cell<bool>,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("failed", &self.failed.get())
            .finish_non_exhaustive()
    }
}

impl NcclComm {
    /// Rank `rank` of `world_size` in the communicator of `id`, its collectives
    /// enqueued on `stream` (whose device is the rank's GPU). A rank outside
    /// `0..world_size`, or a world size NCCL cannot count, is refused
    /// ([`Error::InvalidLayout`]); a missing NCCL is [`Error::NcclNotFound`].
    pub fn new(
        stream: &Arc<CudaStream>,
        rank: usize,
        world_size: usize,
        id: &NcclId,
    ) -> Result<Self> {
        if world_size == 0 || rank >= world_size {
            return Err(Error::InvalidLayout {
                reason: format!(
                    "rank {rank} is not in a communicator of {world_size} ranks; give a rank in 0..world_size, and at least one rank"
                ),
            });
        }
        let (Ok(world), Ok(r)) = (i32::try_from(world_size), i32::try_from(rank)) else {
            return Err(Error::InvalidLayout {
                reason: format!(
                    "an NCCL communicator of {world_size} ranks cannot be; NCCL counts at most {} ranks",
                    i32::MAX
                ),
            });
        };
        nccl_loads()?;
        bind(stream)?;
        let unique = sys::ncclUniqueId {
            internal: id.0.map(|b| b as std::ffi::c_char),
        };
        let mut comm = MaybeUninit::uninit();
        // SAFETY: `comm` is written by NCCL before it is read; the id is 128 bytes.
        unsafe { result::comm_init_rank(comm.as_mut_ptr(), world, unique, r) }
            .map_err(|e| nccl_error("joining the NCCL communicator (ncclCommInitRank)", None, e))?;
        Ok(Self {
            // SAFETY: initialised by the successful call above.
            comm: unsafe { comm.assume_init() },
            stream: stream.clone(),
            rank,
            world_size,
            failed: Cell::new(false),
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the communicator.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The stream its collectives (and its optimizer's kernels) are enqueued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Whether an NCCL call of this communicator failed (it then refuses every call).
    pub fn failed(&self) -> bool {
        self.failed.get()
    }

    /// Refuses a call after a failure.
    fn usable(&self) -> Result<()> {
        if self.failed.get() {
            return Err(Error::Nccl {
                context: "a step on a communicator whose earlier step failed",
                code: "refused".into(),
                detail: ": the ranks may disagree on what ran; make a new communicator and optimizer (from a checkpoint)".into(),
            });
        }
        Ok(())
    }

    /// Runs an NCCL call with the stream's context current; a failure marks the
    /// communicator failed.
    fn call(
        &self,
        context: &'static str,
        f: impl FnOnce(
            sys::ncclComm_t,
            sys::cudaStream_t,
        ) -> Result<result::NcclStatus, result::NcclError>,
    ) -> Result<()> {
        self.usable()?;
        bind(&self.stream)?;
        f(self.comm, self.stream.cu_stream() as sys::cudaStream_t)
            .map(drop)
            .map_err(|e| {
                self.failed.set(true);
                nccl_error(context, Some(self.comm), e)
            })
    }

    /// The exchange of a step's decision ([`Exchanged`]), as one NCCL group.
    fn exchange(&self, x: &Exchanged) -> Result<()> {
        self.call(
            "exchanging the step's partial sums (ncclAllReduce)",
            |comm, stream| {
                result::group_start()?;
                // SAFETY: the addresses are the plan's buffers and the control block's
                // flag, of `count` f32 and one u32, on this stream's device.
                let sums = unsafe {
                    result::all_reduce(
                        x.send as *const _,
                        x.recv as *mut _,
                        x.count,
                        sys::ncclDataType_t::ncclFloat32,
                        sys::ncclRedOp_t::ncclSum,
                        comm,
                        stream,
                    )
                };
                let flag = unsafe {
                    result::all_reduce(
                        x.found_inf as *const _,
                        x.found_inf as *mut _,
                        1,
                        sys::ncclDataType_t::ncclUint32,
                        sys::ncclRedOp_t::ncclMax,
                        comm,
                        stream,
                    )
                };
                let end = result::group_end();
                sums.and(flag).and(end)
            },
        )
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // SAFETY: the communicator is ours and dropped once. A failed one is aborted
        // (its peers may be gone); a healthy one is destroyed once its work is done.
        unsafe {
            // Unwinding, the peers may never finish the work on the stream: abort
            // rather than wait for it.
            if self.failed.get() || std::thread::panicking() || self.stream.synchronize().is_err() {
                let _ = result::comm_abort(self.comm);
            } else {
                let _ = result::comm_destroy(self.comm);
            }
        }
    }
}

/// How [`ShardedAdamax::step`] reduces the ranks' gradients: summed, or averaged
/// (PyTorch DDP's default, and this one's). The average is NCCL's `ncclAvg`: for
/// floating-point types each rank's gradient is multiplied by `1 / world_size`
/// rounded to the gradient's type, and the products summed, so it is exact for
/// power-of-two world sizes (barring underflow) and otherwise carries the rounding of
/// `1 / world_size` (about 0.2% in bf16 for 3 ranks): use `Sum` and fold the division
/// into the loss or the learning rate where that matters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GradReduction {
    /// The sum over ranks.
    Sum,
    /// The sum over ranks divided by the world size.
    #[default]
    Average,
}

/// NCCL's type of `T`.
fn nccl_type(storage: StorageType) -> sys::ncclDataType_t {
    match storage {
        StorageType::F32 => sys::ncclDataType_t::ncclFloat32,
        StorageType::F16 => sys::ncclDataType_t::ncclFloat16,
        StorageType::Bf16 => sys::ncclDataType_t::ncclBfloat16,
    }
}

/// Where a step's gradients are.
#[derive(Clone, Copy)]
enum Grads {
    /// The whole flat buffer at this address, reduce-scattered by the step.
    Whole(u64),
    /// This rank's shard, already reduced, at this address.
    Shard(u64),
}

/// AdaMax with its state sharded over the ranks of an NCCL communicator (ZeRO-1): the
/// module's section says what a step does and what is bit-identical to what.
///
/// Each rank allocates the state of its shard only: moments (or 8-bit codes and
/// scales), and for 16-bit parameters f32 masters, of `layout.shard_len()` elements at
/// most ([`ShardedAdamax::pieces`]), where one GPU holds them for all `layout.total()`.
pub struct ShardedAdamax<T: GpuStorage> {
    opt: CudaAdamax<T>,
    comm: NcclComm,
    layout: ShardLayout,
    pieces: Vec<Piece>,
    reduction: GradReduction,
    /// The whole list's settings: what every rank checks a change against, so that a
    /// change one rank accepts is accepted by all.
    whole: Schedule,
}

impl<T: GpuStorage> std::fmt::Debug for ShardedAdamax<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedAdamax")
            .field("comm", &self.comm)
            .field("pieces", &self.pieces)
            .field("reduction", &self.reduction)
            .finish_non_exhaustive()
    }
}

impl<T: GpuStorage> ShardedAdamax<T> {
    /// The optimizer of `comm`'s rank over its shard of `layout`, from the whole flat
    /// parameter buffer `flat_params` (at least `layout.total()` elements, alike on
    /// every rank; 16-bit parameters' masters are copied from this rank's shard).
    /// Refused: a layout for another world size ([`Error::InvalidLayout`]), a short
    /// buffer ([`Error::BufferTooSmall`]), a buffer of another device.
    pub fn new<P: DevicePtr<T>>(
        comm: NcclComm,
        config: AdamaxConfig,
        layout: ShardLayout,
        flat_params: &P,
    ) -> Result<Self> {
        if layout.world_size() != comm.world_size() {
            return Err(Error::InvalidLayout {
                reason: format!(
                    "the shard layout is for {} ranks but the communicator has {}; make the layout with the communicator's world size",
                    layout.world_size(),
                    comm.world_size()
                ),
            });
        }
        let whole = Schedule::new(config, layout.lens())?;
        let stream = comm.stream().clone();
        check_devices(&stream, "flat params", [Some(flat_params)])?;
        check_len("flat params", flat_params.len(), layout.total())?;
        check_agreement(&comm, &format!("{layout:?} {:?} {config:?}", T::TYPE))?;
        let opt = {
            let (base, _guard) = flat_params.device_ptr(&stream);
            CudaAdamax::for_pieces(&stream, config, &layout, comm.rank(), base)?
        };
        Ok(Self {
            opt,
            pieces: layout.pieces(comm.rank()),
            comm,
            layout,
            reduction: GradReduction::default(),
            whole,
        })
    }

    /// One step: reduce-scatters `flat_grads` in place (as [`GradReduction`] says; the
    /// rest of the buffer keeps this rank's own gradients), steps this rank's shard, and
    /// all-gathers the parameters into `flat_params` on every rank. Both buffers hold
    /// at least `layout.total()` elements. Every rank calls it in the same step.
    pub fn step<P: DevicePtrMut<T>, G: DevicePtrMut<T>>(
        &mut self,
        flat_params: &mut P,
        flat_grads: &mut G,
    ) -> Result<()> {
        self.step_whole(flat_params, flat_grads, None)
    }

    /// [`ShardedAdamax::step`] where the (whole) tensors with `has_grad[i] == false`
    /// have no gradient this step: they are not stepped, as
    /// [`Optimizer::step_some`] describes. Every rank
    /// passes the same `has_grad`.
    pub fn step_some<P: DevicePtrMut<T>, G: DevicePtrMut<T>>(
        &mut self,
        flat_params: &mut P,
        flat_grads: &mut G,
        has_grad: &[bool],
    ) -> Result<()> {
        self.step_whole(flat_params, flat_grads, Some(has_grad))
    }

    fn step_whole<P: DevicePtrMut<T>, G: DevicePtrMut<T>>(
        &mut self,
        flat_params: &mut P,
        flat_grads: &mut G,
        has_grad: Option<&[bool]>,
    ) -> Result<()> {
        let stream = self.comm.stream().clone();
        check_devices(&stream, "flat grads", [Some(&*flat_grads)])?;
        check_len("flat grads", flat_grads.len(), self.layout.total())?;
        let (grads, _guard) = flat_grads.device_ptr_mut(&stream);
        self.step_with(flat_params, Grads::Whole(grads), has_grad)
    }

    /// One step from this rank's shard of gradients already reduced over the ranks
    /// (`shard_grads`: at least `layout.shard_len()` elements, element `k` the
    /// gradient at flat position `layout.shard(rank).start + k`), then the all-gather
    /// of the parameters. `has_grad` as in [`ShardedAdamax::step_some`].
    pub fn step_reduced<P: DevicePtrMut<T>, G: DevicePtr<T>>(
        &mut self,
        flat_params: &mut P,
        shard_grads: &G,
        has_grad: Option<&[bool]>,
    ) -> Result<()> {
        let stream = self.comm.stream().clone();
        check_devices(&stream, "shard grads", [Some(shard_grads)])?;
        check_len("shard grads", shard_grads.len(), self.layout.shard_len())?;
        let (grads, _guard) = shard_grads.device_ptr(&stream);
        self.step_with(flat_params, Grads::Shard(grads), has_grad)
    }

    /// Checks everything a rank can check alone, then enqueues the collectives and
    /// the step (nothing is enqueued when a check fails).
    fn step_with<P: DevicePtrMut<T>>(
        &mut self,
        flat_params: &mut P,
        grads: Grads,
        has_grad: Option<&[bool]>,
    ) -> Result<()> {
        self.comm.usable()?;
        let stream = self.comm.stream().clone();
        refuse_during_capture(
            &stream,
            "a sharded step",
            "Step it eagerly: capturing a sharded step in a CUDA graph is not supported yet",
        )?;
        check_devices(&stream, "flat params", [Some(&*flat_params)])?;
        check_len("flat params", flat_params.len(), self.layout.total())?;
        if let Some(h) = has_grad {
            if h.len() != self.layout.lens().len() {
                return Err(Error::TensorCountMismatch {
                    what: "has_grad",
                    expected: self.layout.lens().len(),
                    found: h.len(),
                });
            }
        }
        let (params, _guard) = flat_params.device_ptr_mut(&stream);
        // From here on the ranks' collectives are under way: an error leaves this
        // rank out of step with the others (they wait in NCCL, and a retried step would
        // pair its collectives with theirs wrongly), so any error fails the
        // communicator.
        let done = self.enqueue(params, grads, has_grad);
        if done.is_err() {
            self.comm.failed.set(true);
        }
        done
    }

    /// Enqueues the collectives and the step over buffers checked by the caller.
    fn enqueue(&mut self, params: u64, grads: Grads, has_grad: Option<&[bool]>) -> Result<()> {
        let size = std::mem::size_of::<T>() as u64;
        let shard = self.layout.shard(self.comm.rank());
        let dtype = nccl_type(T::TYPE);
        let shard_len = self.layout.shard_len();
        let grad_base = match grads {
            Grads::Whole(base) => {
                let op = match self.reduction {
                    GradReduction::Sum => sys::ncclRedOp_t::ncclSum,
                    GradReduction::Average => sys::ncclRedOp_t::ncclAvg,
                };
                let own = base + shard.start as u64 * size;
                self.comm
                    .call("reducing the gradients (ncclReduceScatter)", |comm, s| {
                        // SAFETY: checked above: the buffer holds world * shard_len elements;
                        // receiving into this rank's own shard is NCCL's in-place form.
                        unsafe {
                            result::reduce_scatter(
                                base as *const _,
                                own as *mut _,
                                shard_len,
                                dtype,
                                op,
                                comm,
                                s,
                            )
                        }
                    })?;
                base
            }
            // The pieces' gradients at their place in the shard: the shard starts at
            // flat position `shard.start`.
            Grads::Shard(base) => base.wrapping_sub(shard.start as u64 * size),
        };
        let flags: Vec<bool> = match has_grad {
            Some(h) => self.pieces.iter().map(|p| h[p.tensor]).collect(),
            None => vec![true; self.pieces.len()],
        };
        // The table is reused while the addresses it holds stay (the gradients' by
        // their flat base, whichever way they came).
        let key = has_grad.is_none().then_some((params, grad_base));
        let param_at = piece_addresses::<T>(&self.layout, &self.pieces, params);
        let grad_at = piece_addresses::<T>(&self.layout, &self.pieces, grad_base);
        let addresses = param_at
            .zip(grad_at)
            .zip(flags)
            .map(|((p, g), has)| (p, has.then_some(g)));
        let comm = &self.comm;
        // SAFETY: the buffers were checked to hold the layout on this device; the
        // pieces lie in them without overlapping.
        unsafe {
            self.opt
                .step_pieces(addresses, key, &mut |x: &Exchanged| comm.exchange(x))?;
        }
        let own = params + shard.start as u64 * size;
        self.comm
            .call("gathering the parameters (ncclAllGather)", |comm, s| {
                // SAFETY: the buffer holds world * shard_len elements; sending from this
                // rank's own shard is NCCL's in-place form.
                unsafe {
                    result::all_gather(own as *const _, params as *mut _, shard_len, dtype, comm, s)
                }
            })
    }

    /// How [`ShardedAdamax::step`] reduces gradients.
    pub fn grad_reduction(&self) -> GradReduction {
        self.reduction
    }

    /// Sets how [`ShardedAdamax::step`] reduces gradients (alike on every rank).
    pub fn set_grad_reduction(&mut self, reduction: GradReduction) {
        self.reduction = reduction;
    }

    /// The configuration in force.
    pub fn config(&self) -> &AdamaxConfig {
        self.opt.config()
    }

    /// Sets the learning rate of the next steps (alike on every rank).
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        let mut whole = self.whole.clone();
        whole.set_lr(lr)?;
        self.opt.set_lr(lr)?;
        self.whole = whole;
        Ok(())
    }

    /// The step options in force.
    pub fn options(&self) -> StepOptions {
        self.opt.options()
    }

    /// Sets clipping, the overflow check and unscaling (alike on every rank: they
    /// decide whether a step exchanges partial sums).
    pub fn set_options(&mut self, options: StepOptions) -> Result<()> {
        self.opt.set_options(options)
    }

    /// The loss scaler's state (synchronises the stream).
    pub fn loss_scaler(&self) -> Result<Option<LossScaler>> {
        self.opt.loss_scaler()
    }

    /// Enables, replaces or (with `None`) disables the loss scaler (alike on every
    /// rank; its state then stays alike, as every rank decides on the same sums).
    pub fn set_loss_scaler(&mut self, scaler: Option<LossScaler>) -> Result<()> {
        self.opt.set_loss_scaler(scaler)
    }

    /// What the last step did (synchronises the stream): alike on every rank.
    pub fn last_report(&self) -> Result<StepReport> {
        self.opt.last_report()
    }

    /// Steps taken (synchronises the stream).
    pub fn step_count(&self) -> Result<u64> {
        self.opt.step_count()
    }

    /// Sets whole tensor `tensor`'s hyperparameters (its piece on this rank, if any;
    /// alike on every rank).
    pub fn set_tensor_hyper(&mut self, tensor: usize, hyper: TensorHyper) -> Result<()> {
        let mut whole = self.whole.clone();
        whole.set_hyper(tensor, hyper)?;
        if let Some(i) = self.pieces.iter().position(|p| p.tensor == tensor) {
            self.opt.set_tensor_hyper(i, hyper)?;
        }
        self.whole = whole;
        Ok(())
    }

    /// Sets whole tensor `tensor`'s shape (its parameter's, for the checkpoints: see
    /// [`Optimizer::set_tensor_shape`]).
    pub fn set_tensor_shape(&mut self, tensor: usize, shape: &[usize]) -> Result<()> {
        self.whole.set_shape(tensor, shape)
    }

    /// Sets whole tensor `tensor`'s name (its parameter's, for the checkpoints: see
    /// [`Optimizer::set_tensor_name`]).
    pub fn set_tensor_name(&mut self, tensor: usize, name: Option<&str>) -> Result<()> {
        self.whole.set_name(tensor, name)
    }

    /// This rank's shard of the state, with the whole tensors' shapes, names and
    /// settings (synchronises the stream): save it with
    /// [`ShardCheckpoint::save`]; [`ShardCheckpoint::gather`] makes the one-GPU
    /// checkpoint of every rank's, and [`ShardCheckpoint::reshard`] the shards of
    /// another world size.
    pub fn checkpoint(&self) -> Result<ShardCheckpoint> {
        ShardCheckpoint::new(
            self.comm.rank(),
            self.layout.clone(),
            self.whole.shapes().to_vec(),
            self.whole.names().to_vec(),
            self.whole.hypers().to_vec(),
            self.opt.checkpoint()?,
        )
    }

    /// Restores this rank's shard from `ck`: the same layout and rank (reshard the
    /// files of another world size first). Everything is checked as
    /// [`Optimizer::restore`] checks a checkpoint; a refused restore changes nothing.
    /// Every rank restores its own shard of one run.
    pub fn restore(&mut self, ck: &ShardCheckpoint) -> Result<()> {
        ck.check_place(&self.layout, self.comm.rank())?;
        let mut whole = self.whole.clone();
        let formats = whole.formats().to_vec();
        whole.replace(
            ck.state().config,
            ck.hypers(),
            ck.shapes(),
            ck.names(),
            &formats,
        )?;
        self.opt.restore(ck.state())?;
        self.whole = whole;
        Ok(())
    }

    /// The layout of the flat buffers.
    pub fn layout(&self) -> &ShardLayout {
        &self.layout
    }

    /// The pieces of tensors this rank steps (and holds state for), in order.
    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// The communicator.
    pub fn comm(&self) -> &NcclComm {
        &self.comm
    }

    /// The state of this rank's pieces, in [`ShardedAdamax::pieces`] order, copied to
    /// the host (synchronises the stream).
    pub fn shard_state(&self) -> Result<Vec<TensorState>> {
        self.opt.state()
    }

    /// Bytes of optimizer state this rank holds: moments (or codes and scales) and
    /// masters of its pieces, padding included.
    pub fn state_bytes(&self) -> u64 {
        self.opt.device_state_bytes()
    }
}

/// Refuses, on every rank alike, ranks whose `what` (their layout, parameter type and
/// configuration) differ: a one-off all-reduce of the minimum of its hash and of the
/// hash's complement, which are each other's complement only where every rank's hash
/// is the same. A rank that steps another list than the others would otherwise pair
/// its collectives with theirs wrongly.
fn check_agreement(comm: &NcclComm, what: &str) -> Result<()> {
    let hash = xxhash_rust::xxh3::xxh3_64(what.as_bytes());
    let stream = comm.stream();
    let mut buf = stream
        .clone_htod(&[hash, !hash])
        .map_err(Error::driver("allocating the ranks' agreement check"))?;
    {
        let (ptr, _guard) = buf.device_ptr_mut(stream);
        comm.call("checking that the ranks agree (ncclAllReduce)", |c, s| {
            // SAFETY: two u64 on this stream's device, reduced in place.
            unsafe {
                result::all_reduce(
                    ptr as *const _,
                    ptr as *mut _,
                    2,
                    sys::ncclDataType_t::ncclUint64,
                    sys::ncclRedOp_t::ncclMin,
                    c,
                    s,
                )
            }
        })?;
    }
    let reduced = stream
        .clone_dtoh(&buf)
        .map_err(Error::driver("reading the ranks' agreement check"))?;
    if reduced.first().map(|m| !m) != reduced.get(1).copied() {
        return Err(Error::InvalidLayout {
            reason: "the ranks do not agree on the tensors' sizes, the world size, the parameter type or the configuration: build every rank's ShardedAdamax from the same list and settings".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where NCCL is missing (CI), asking for it is a typed error that says what to
    /// install, never cudarc's panic; where it loads, its version and an id come back.
    #[test]
    fn a_missing_nccl_is_an_error_that_says_what_to_install() {
        match nccl_version() {
            Ok((major, minor, _)) => {
                assert!(major >= 2 && minor < 100, "{major}.{minor}");
                let id = NcclId::new().unwrap();
                assert_eq!(NcclId::from_bytes(id.as_bytes()).unwrap(), id);
            }
            Err(e @ Error::NcclNotFound { .. }) => {
                let message = e.to_string();
                assert!(message.contains("libnccl.so"), "{message}");
                assert!(message.contains("LD_LIBRARY_PATH"), "{message}");
                assert!(matches!(NcclId::new(), Err(Error::NcclNotFound { .. })));
            }
            Err(e) => panic!("{e}"),
        }
        assert!(matches!(
            NcclId::from_bytes(&[1; 127]),
            Err(Error::InvalidNcclId { len: 127 })
        ));
    }
}
