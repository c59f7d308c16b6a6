//! [`CpuAdamax`]: the reference optimizer over host slices.

use crate::{
    checkpoint::{Checkpoint, ShardCheckpoint},
    config::{AdamaxConfig, StateFormat, TensorHyper},
    error::{Error, Result},
    fused::{
        chunk_partial, clip_coef, total_from_partials, LossScaler, StepOptions, StepReport, CHUNK,
    },
    optimizer::{checkpoint_of, Optimizer},
    shard::{Placement, ShardLayout},
    state::{check_lists, Schedule, TensorState, FIXED_BY_RESTORE, FIXED_BY_SHARD, FIXED_BY_STEP},
    storage::Storage,
};

use super::step_tensor_with;
use crate::spec::{bias_correction, StepScalars};

/// AdaMax on the CPU over a list of tensors of any lengths, owning their state. The
/// shared API is the [`Optimizer`] trait.
///
/// ```
/// use adamax_cuda::{cpu::CpuAdamax, AdamaxConfig, Optimizer};
/// let mut weights = vec![0.5f32, -1.0, 2.0];
/// let mut bias = vec![0.0f32];
/// let mut opt = CpuAdamax::<f32>::new(AdamaxConfig::default(), &[&weights, &bias])?;
/// opt.step(&mut [&mut weights, &mut bias], &[&[0.1, -0.2, 0.3], &[1.0]])?;
/// // The first AdaMax step moves each parameter by about lr against its gradient's sign.
/// assert!((weights[0] - (0.5 - 2e-3)).abs() < 1e-6);
/// # Ok::<(), adamax_cuda::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct CpuAdamax<T: Storage> {
    schedule: Schedule,
    lens: Vec<usize>,
    states: Vec<TensorState>,
    step: u64,
    options: StepOptions,
    scaler: Option<LossScaler>,
    /// What the last step since construction or restore did (the report's other
    /// fields are read live: the step count and the scaler in force).
    last: LastStep,
    /// Why state formats can no longer be chosen (a step or a restore), if so.
    formats_fixed: Option<&'static str>,
    /// Where each tensor sits in the whole list (whole tensors, or the pieces of one
    /// rank's shard), and the chunks of the whole list's reduction.
    placements: Vec<Placement>,
    total_chunks: usize,
    /// The layout and rank of the shard it steps ([`CpuAdamax::for_shard`]), if so.
    shard: Option<(ShardLayout, usize)>,
    _storage: std::marker::PhantomData<T>,
}

/// The exchange of a step taken with `step` or `step_some`: none, which one rank's
/// shard cannot decide with.
fn alone(sharded: bool) -> Result<()> {
    if sharded {
        Err(shard_refusal(SHARD_STEP))
    } else {
        Ok(())
    }
}

/// Why a shard's optimizer refuses what an optimizer over whole tensors does.
const SHARD_STEP: &str = "this optimizer steps one rank's shard: with clipping, the overflow check or a loss scaler its decision needs the other ranks' partial sums, so step it with step_exchanged";
const SHARD_CHECKPOINT: &str = "this optimizer steps one rank's shard: its state is a ShardCheckpoint (shard_checkpoint, restore_shard), which records where its pieces sit; ShardCheckpoint::gather makes the one-GPU checkpoint of every rank's";

fn shard_refusal(reason: &str) -> Error {
    Error::InvalidLayout {
        reason: reason.to_owned(),
    }
}

/// The collective of a sharded step ([`CpuAdamax::step_exchanged`]): given this rank's
/// partial sums of squares (its chunks', zeros elsewhere) and its overflow flag, leaves
/// every rank's sums added and flags or-ed, alike on every rank (an NCCL all-reduce).
#[doc(hidden)]
pub type Exchange<'a> = dyn FnMut(&mut [f32], &mut bool) -> Result<()> + 'a;

/// The parts of a [`StepReport`] that describe the last step itself.
#[derive(Clone, Copy, Debug, PartialEq)]
struct LastStep {
    skipped: bool,
    total_norm: Option<f32>,
    clip_coef: f32,
}

impl LastStep {
    /// Before any step (after construction or a restore).
    const NONE: LastStep = LastStep {
        skipped: false,
        total_norm: None,
        clip_coef: 1.0,
    };
}

/// What the overflow check and clipping decide before a step writes anything.
struct Decision {
    skip: bool,
    total_norm: Option<f32>,
    clip: Option<f32>,
}

impl<T: Storage> CpuAdamax<T> {
    /// Validates `config` and creates zeroed state (and f32 masters for 16-bit types)
    /// for `params`. An empty list is refused; empty tensors are fine.
    pub fn new(config: AdamaxConfig, params: &[&[T]]) -> Result<Self> {
        let lens: Vec<usize> = params.iter().map(|p| p.len()).collect();
        let schedule = Schedule::new(config, &lens)?;
        config.precision.check_storage(T::TYPE)?;
        if params.is_empty() {
            return Err(Error::EmptyParameterList);
        }
        let (placements, total_chunks) = Placement::whole(&lens);
        Ok(Self {
            states: params
                .iter()
                .enumerate()
                .map(|(i, p)| TensorState::with_precision(p, &schedule.precision_of(i)))
                .collect(),
            schedule,
            lens,
            placements,
            total_chunks,
            step: 0,
            options: StepOptions::default(),
            scaler: None,
            last: LastStep::NONE,
            formats_fixed: None,
            shard: None,
            _storage: std::marker::PhantomData,
        })
    }

    /// The state of every tensor, borrowed (the trait's [`Optimizer::state`] copies it).
    pub fn tensor_states(&self) -> &[TensorState] {
        &self.states
    }

    /// The inverse scale this step's gradients are unscaled by, if any.
    fn inv_scale(&self) -> Option<f32> {
        match &self.scaler {
            Some(scaler) => Some(scaler.inv_scale()),
            None => self.options.inv_scale,
        }
    }

    /// The optimizer over rank `rank`'s pieces of a sharded list ([`ShardLayout`]),
    /// from the whole flat parameter buffer (`layout.total()` elements, every rank's
    /// copy alike): tensor `i` of it is piece `i` of `layout.pieces(rank)`, in the state
    /// format its whole tensor gets. Stepped with [`CpuAdamax::step_exchanged`], the
    /// ranks together step every tensor as one optimizer over the whole list does, bit
    /// for bit. The CPU twin of the sharded GPU step (issue #20); a rank may hold no
    /// piece. A rank not in the layout, or a flat buffer of another length, is refused
    /// ([`Error::InvalidLayout`]). Its formats follow its whole tensors' and cannot be
    /// chosen; `step` and `step_some` refuse to decide a step alone (clipping, the
    /// overflow check, a loss scaler); `checkpoint` and `restore` are refused: its
    /// state is a [`ShardCheckpoint`] ([`CpuAdamax::shard_checkpoint`],
    /// [`CpuAdamax::restore_shard`]).
    #[doc(hidden)]
    pub fn for_shard(
        config: AdamaxConfig,
        layout: &ShardLayout,
        rank: usize,
        flat_params: &[T],
    ) -> Result<Self> {
        if rank >= layout.world_size() {
            return Err(shard_refusal(&format!(
                "rank {rank} is not in a layout of {} ranks (0..{})",
                layout.world_size(),
                layout.world_size()
            )));
        }
        if flat_params.len() != layout.total() {
            return Err(shard_refusal(&format!(
                "the flat params hold {} elements; the shard layout's flat buffers hold {} (ShardLayout::total)",
                flat_params.len(),
                layout.total()
            )));
        }
        config.precision.check_storage(T::TYPE)?;
        let (pieces, schedule) = layout.piece_schedule(config, rank)?;
        let lens: Vec<usize> = pieces.iter().map(|p| p.len()).collect();
        let states = pieces
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let at = layout.offsets()[p.tensor];
                let param = &flat_params[at + p.begin..at + p.end];
                TensorState::with_precision(param, &schedule.precision_of(i))
            })
            .collect();
        Ok(Self {
            schedule,
            lens,
            states,
            step: 0,
            options: StepOptions::default(),
            scaler: None,
            last: LastStep::NONE,
            formats_fixed: Some(FIXED_BY_SHARD),
            placements: layout.placements(rank),
            total_chunks: layout.total_chunks(),
            shard: Some((layout.clone(), rank)),
            _storage: std::marker::PhantomData,
        })
    }

    /// [`Optimizer::step_some`] of one rank's shard: `exchange` adds the ranks' partial
    /// sums and ors their overflow flags between the reduction and the decision (see
    /// [`Exchange`]), so that clipping, the overflow skip and the loss scaler decide as
    /// one optimizer over the whole list would. Every rank must call it, with the same
    /// options and scaler, in the same steps (an exchange is a collective). It is called
    /// once a step when the step decides (clipping, the overflow check or a scaler on),
    /// after this rank's arguments are checked (a refused call does not call it: the
    /// caller must not leave the other ranks waiting), and not at all otherwise. Sums
    /// no set of ranks can make (negative, or NaN without an overflow flag) are refused
    /// before anything is written.
    #[doc(hidden)]
    pub fn step_exchanged(
        &mut self,
        params: &mut [&mut [T]],
        grads: &[Option<&[T]>],
        exchange: &mut Exchange<'_>,
    ) -> Result<()> {
        check_lists(
            &self.lens,
            params.iter().map(|p| p.len()),
            grads.iter().map(|g| g.map(<[T]>::len)),
        )?;
        self.step_checked(params, |i| grads[i], exchange)
    }

    /// The overflow check and the global norm, over every tensor with a gradient, in
    /// the reduction order of [`crate::fused`], after `exchange` (the ranks' sums, for a
    /// shard). A tensor without one contributes zero partial sums for its chunks, as on
    /// the GPU, so chunk numbers stay the same.
    fn decide<'g>(
        &self,
        grad: impl Fn(usize) -> Option<&'g [T]>,
        exchange: &mut Exchange<'_>,
    ) -> Result<Decision> {
        let check = self.options.checks(self.scaler.is_some());
        if !check && self.options.max_norm.is_none() {
            return Ok(Decision {
                skip: false,
                total_norm: None,
                clip: None,
            });
        }
        let inv_scale = self.inv_scale();
        let unscale = |g: f32| inv_scale.map_or(g, |s| g * s);
        let lanes = 16 / std::mem::size_of::<T>();
        let (mut found_inf, mut partials) = (false, vec![0.0f32; self.total_chunks]);
        for (i, at) in self.placements.iter().enumerate() {
            let Some(g) = grad(i) else { continue };
            for (j, chunk) in g.chunks(CHUNK).enumerate() {
                let (partial, bad) =
                    chunk_partial(chunk.len(), lanes, |i| unscale(chunk[i].to_f32()));
                let slot = partials.get_mut(at.chunk + j).ok_or(Error::Internal {
                    what: "a chunk beyond the list's reduction",
                })?;
                *slot = partial;
                found_inf |= bad;
            }
        }
        exchange(&mut partials, &mut found_inf)?;
        // Squares are never negative, and a NaN sum comes only from a NaN or infinite
        // value, which sets the flag: anything else is a faulty exchange (alike on every
        // rank, so all refuse together).
        if partials
            .iter()
            .any(|&p| p < 0.0 || (p.is_nan() && !found_inf))
        {
            return Err(shard_refusal(
                "the exchange returned partial sums no ranks can make (negative, or NaN without an overflow flag); check the collective",
            ));
        }
        let skip = check && found_inf;
        Ok(match self.options.max_norm {
            Some(max_norm) if !skip => {
                let (norm, c) = clip_coef(total_from_partials(&partials), max_norm);
                Decision {
                    skip,
                    total_norm: Some(norm),
                    clip: Some(c),
                }
            }
            _ => Decision {
                skip,
                total_norm: None,
                clip: None,
            },
        })
    }

    /// One step over the tensors whose gradient is given (lists already checked).
    fn step_checked<'g>(
        &mut self,
        params: &mut [&mut [T]],
        grad: impl Fn(usize) -> Option<&'g [T]>,
        exchange: &mut Exchange<'_>,
    ) -> Result<()> {
        self.formats_fixed = Some(FIXED_BY_STEP);
        let d = self.decide(&grad, exchange)?;
        if !d.skip {
            let t = self
                .step
                .checked_add(1)
                .ok_or(Error::StepOverflow(self.step))?;
            let inv_scale = self.inv_scale();
            let grad_map = |g: f32| {
                let u = inv_scale.map_or(g, |s| g * s);
                d.clip.map_or(u, |c| u * c)
            };
            let (config, hypers) = (self.schedule.config(), self.schedule.hypers());
            for (i, (p, state)) in params.iter_mut().zip(&mut self.states).enumerate() {
                let Some(g) = grad(i) else { continue };
                // Each tensor's own count (PyTorch's per-parameter step): never above
                // the optimizer's, so it cannot overflow before it.
                let ti = state.step + 1;
                let bc = bias_correction(config.beta1, ti);
                let s = StepScalars::for_tensor(config, config.lr, bc, &hypers[i]);
                let precision = self.schedule.precision_of(i);
                let at = self.placements[i];
                step_tensor_with(
                    &s,
                    &precision,
                    (at.tensor, at.element),
                    p,
                    g,
                    state,
                    grad_map,
                )?;
                state.step = ti;
            }
            self.step = t;
        }
        if let Some(scaler) = self.scaler.as_mut() {
            scaler.update(d.skip);
        }
        self.last = LastStep {
            skipped: d.skip,
            total_norm: d.total_norm,
            clip_coef: d.clip.unwrap_or(1.0),
        };
        Ok(())
    }
}

impl<T: Storage> Optimizer for CpuAdamax<T> {
    type Storage = T;
    type Param<'a> = &'a mut [T];
    type Grad<'a> = &'a [T];

    /// One AdaMax step over every tensor, with the options and the loss scaler, if any
    /// ([`crate::fused`] gives the semantics). All lengths are checked before anything
    /// is written, so a refused step leaves parameters and state as they were; so does
    /// a step skipped for a non-finite gradient (see [`Optimizer::last_report`]).
    fn step<'a>(&mut self, params: &mut [&'a mut [T]], grads: &[&'a [T]]) -> Result<()> {
        check_lists(
            &self.lens,
            params.iter().map(|p| p.len()),
            grads.iter().map(|g| Some(g.len())),
        )?;
        let sharded = self.shard.is_some();
        self.step_checked(params, |i| Some(grads[i]), &mut |_, _| alone(sharded))
    }

    fn step_some<'a>(
        &mut self,
        params: &mut [&'a mut [T]],
        grads: &[Option<&'a [T]>],
    ) -> Result<()> {
        let sharded = self.shard.is_some();
        self.step_exchanged(params, grads, &mut |_, _| alone(sharded))
    }

    fn config(&self) -> &AdamaxConfig {
        self.schedule.config()
    }

    fn set_lr(&mut self, lr: f64) -> Result<()> {
        self.schedule.set_lr(lr)
    }

    fn tensor_lens(&self) -> &[usize] {
        &self.lens
    }

    fn tensor_hypers(&self) -> &[TensorHyper] {
        self.schedule.hypers()
    }

    fn set_tensor_hyper(&mut self, tensor: usize, hyper: TensorHyper) -> Result<()> {
        self.schedule.set_hyper(tensor, hyper)
    }

    fn tensor_shapes(&self) -> &[Vec<usize>] {
        self.schedule.shapes()
    }

    fn set_tensor_shape(&mut self, tensor: usize, shape: &[usize]) -> Result<()> {
        self.schedule.set_shape(tensor, shape)
    }

    fn tensor_names(&self) -> &[Option<String>] {
        self.schedule.names()
    }

    fn set_tensor_name(&mut self, tensor: usize, name: Option<&str>) -> Result<()> {
        self.schedule.set_name(tensor, name)
    }

    fn tensor_state_formats(&self) -> &[StateFormat] {
        self.schedule.formats()
    }

    fn set_tensor_state_formats(&mut self, formats: &[StateFormat]) -> Result<()> {
        for i in self.schedule.set_formats(formats, self.formats_fixed)? {
            let precision = self.schedule.precision_of(i);
            self.states[i].reset_moments(T::TYPE, self.lens[i], &precision);
        }
        Ok(())
    }

    fn options(&self) -> StepOptions {
        self.options
    }

    fn set_options(&mut self, options: StepOptions) -> Result<()> {
        options.validate()?;
        self.options = options;
        Ok(())
    }

    fn loss_scaler(&self) -> Result<Option<LossScaler>> {
        Ok(self.scaler)
    }

    /// Each step unscales by the scaler's inverse scale, skips on a non-finite
    /// gradient, and updates the scale (`None` disables it).
    fn set_loss_scaler(&mut self, scaler: Option<LossScaler>) -> Result<()> {
        if let Some(s) = &scaler {
            s.validate()?;
        }
        self.scaler = scaler;
        Ok(())
    }

    /// What the last step since construction or the last restore did (skipped, its
    /// norm and clip coefficient), with the step count and the loss scale as they are
    /// now, as the GPU optimizer reads them from its device: after a restore there is
    /// no last step yet, and a scaler set or removed since shows at once.
    fn last_report(&self) -> Result<StepReport> {
        Ok(StepReport {
            step: self.step,
            skipped: self.last.skipped,
            total_norm: self.last.total_norm,
            clip_coef: self.last.clip_coef,
            loss_scale: self.scaler.map(|s| s.scale),
        })
    }

    fn step_count(&self) -> Result<u64> {
        Ok(self.step)
    }

    fn state(&self) -> Result<Vec<TensorState>> {
        Ok(self.states.clone())
    }

    /// Refused for one rank's shard ([`CpuAdamax::for_shard`]): see
    /// [`CpuAdamax::shard_checkpoint`].
    fn checkpoint(&self) -> Result<Checkpoint> {
        if self.shard.is_some() {
            return Err(shard_refusal(SHARD_CHECKPOINT));
        }
        checkpoint_of(self)
    }

    fn restore(&mut self, ck: &Checkpoint) -> Result<()> {
        if self.shard.is_some() {
            return Err(shard_refusal(SHARD_CHECKPOINT));
        }
        self.restore_state(ck)
    }
}

impl<T: Storage> CpuAdamax<T> {
    /// The state of one rank's shard ([`CpuAdamax::for_shard`]) as a
    /// [`ShardCheckpoint`], its whole tensors of shape `[n]`, unnamed, with `hypers`
    /// (one per whole tensor, as set on every rank's pieces). Refused for an optimizer
    /// over whole tensors ([`Optimizer::checkpoint`] is its).
    #[doc(hidden)]
    pub fn shard_checkpoint(&self, hypers: &[TensorHyper]) -> Result<ShardCheckpoint> {
        let (layout, rank) = self.shard.as_ref().ok_or_else(|| {
            shard_refusal("this optimizer steps whole tensors; its state is a Checkpoint")
        })?;
        let shapes = layout.lens().iter().map(|&n| vec![n]).collect();
        let names = vec![None; layout.lens().len()];
        ShardCheckpoint::new(
            *rank,
            layout.clone(),
            shapes,
            names,
            hypers.to_vec(),
            checkpoint_of(self)?,
        )
    }

    /// Restores one rank's shard from `ck`, a shard of the same layout and rank (see
    /// [`ShardCheckpoint::reshard`] for another world size); checked as
    /// [`Optimizer::restore`] checks a checkpoint, nothing changed when refused.
    #[doc(hidden)]
    pub fn restore_shard(&mut self, ck: &ShardCheckpoint) -> Result<()> {
        let (layout, rank) = self.shard.as_ref().ok_or_else(|| {
            shard_refusal("this optimizer steps whole tensors; restore a Checkpoint")
        })?;
        ck.check_place(layout, *rank)?;
        self.restore_state(ck.state())
    }

    /// The restore of a checkpoint of this optimizer's tensors.
    fn restore_state(&mut self, ck: &Checkpoint) -> Result<()> {
        self.schedule = ck.schedule_for(T::TYPE, &self.schedule, &self.lens)?;
        self.states = ck.tensors.clone();
        self.step = ck.step;
        self.options = ck.options;
        self.scaler = ck.scaler;
        self.last = LastStep::NONE;
        self.formats_fixed = Some(FIXED_BY_RESTORE);
        Ok(())
    }
}
