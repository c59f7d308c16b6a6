//! [`CpuAdamax`]: the reference optimizer over host slices.

use crate::{
    checkpoint::Checkpoint,
    config::{AdamaxConfig, StateFormat, TensorHyper},
    error::{Error, Result},
    fused::{
        chunk_partial, clip_coef, total_from_partials, LossScaler, StepOptions, StepReport, CHUNK,
    },
    optimizer::Optimizer,
    state::{check_lists, Schedule, TensorState, FIXED_BY_RESTORE, FIXED_BY_STEP},
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
    _storage: std::marker::PhantomData<T>,
}

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
        Ok(Self {
            states: params
                .iter()
                .enumerate()
                .map(|(i, p)| TensorState::with_precision(p, &schedule.precision_of(i)))
                .collect(),
            schedule,
            lens,
            step: 0,
            options: StepOptions::default(),
            scaler: None,
            last: LastStep::NONE,
            formats_fixed: None,
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

    /// The overflow check and the global norm, over every tensor with a gradient, in
    /// the reduction order of [`crate::fused`]. A tensor without one contributes zero
    /// partial sums for its chunks, as on the GPU, so chunk numbers stay the same.
    fn decide<'g>(&self, grad: impl Fn(usize) -> Option<&'g [T]>) -> Decision {
        let check = self.options.checks(self.scaler.is_some());
        if !check && self.options.max_norm.is_none() {
            return Decision {
                skip: false,
                total_norm: None,
                clip: None,
            };
        }
        let inv_scale = self.inv_scale();
        let unscale = |g: f32| inv_scale.map_or(g, |s| g * s);
        let lanes = 16 / std::mem::size_of::<T>();
        let (mut found_inf, mut partials) = (false, Vec::new());
        for (i, &n) in self.lens.iter().enumerate() {
            match grad(i) {
                Some(g) => {
                    for chunk in g.chunks(CHUNK) {
                        let (partial, bad) =
                            chunk_partial(chunk.len(), lanes, |i| unscale(chunk[i].to_f32()));
                        partials.push(partial);
                        found_inf |= bad;
                    }
                }
                None => partials.extend(std::iter::repeat_n(0.0, n.div_ceil(CHUNK))),
            }
        }
        let skip = check && found_inf;
        match self.options.max_norm {
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
        }
    }

    /// One step over the tensors whose gradient is given (lists already checked).
    fn step_checked<'g>(
        &mut self,
        params: &mut [&mut [T]],
        grad: impl Fn(usize) -> Option<&'g [T]>,
    ) -> Result<()> {
        self.formats_fixed = Some(FIXED_BY_STEP);
        let d = self.decide(&grad);
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
                let precision = config.precision.with_state(self.schedule.formats()[i]);
                step_tensor_with(&s, &precision, i, p, g, state, grad_map)?;
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
        self.step_checked(params, |i| Some(grads[i]))
    }

    fn step_some<'a>(
        &mut self,
        params: &mut [&'a mut [T]],
        grads: &[Option<&'a [T]>],
    ) -> Result<()> {
        check_lists(
            &self.lens,
            params.iter().map(|p| p.len()),
            grads.iter().map(|g| g.map(<[T]>::len)),
        )?;
        self.step_checked(params, |i| grads[i])
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

    fn set_tensor_state_format(&mut self, tensor: usize, format: StateFormat) -> Result<()> {
        if self
            .schedule
            .set_format(tensor, format, self.formats_fixed)?
        {
            let precision = self.schedule.precision_of(tensor);
            self.states[tensor].reset_moments(T::TYPE, self.lens[tensor], &precision);
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

    fn restore(&mut self, ck: &Checkpoint) -> Result<()> {
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
