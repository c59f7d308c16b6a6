#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![doc(test(attr(deny(warnings))))]

mod engine;
mod params;

use std::{collections::HashMap, path::Path};

pub use adamax_cuda::{
    self, AdamaxConfig, Checkpoint, EpsilonMode, LossScaler, ParamMode, Precision, StateFormat,
    StepOptions, StepReport, TensorHyper, WeightDecayMode,
};
use candle_core::{backprop::GradStore, Tensor, Var};
use candle_nn::VarMap;
pub use params::{ParamGroup, ParamsAdamax, Select, VarRule};

use engine::Engine;

type Result<T> = candle_core::Result<T>;

/// An error of this crate's own, as candle's error type.
pub(crate) fn refuse(reason: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("adamax-cuda-candle: {reason}"))
}

/// An adamax-cuda error, as candle's error type (its message says what to do).
pub(crate) fn adamax_error(e: adamax_cuda::Error) -> candle_core::Error {
    refuse(e)
}

/// AdaMax over a model's `Var`s, as a `candle_nn::Optimizer`: adamax-cuda's fused step,
/// in one launch for every `Var` on candle's CUDA stream, or its CPU reference (which
/// the GPU matches bit for bit) for `Var`s on the CPU.
///
/// Build it with `Adamax::new(varmap.all_vars(), params)` as any candle optimizer, or
/// with [`Adamax::from_varmap`] to give it the `Var`s' names (for parameter groups by
/// name and for checkpoints: [`Adamax::save`], [`Adamax::load`]).
///
/// - The `Var`s it steps are the floating-point ones (integer `Var`s are left alone, as
///   candle's own optimizers do); they must all be f32, all f16 or all bf16, on one
///   device. An f64 `Var`, or `Var`s of two dtypes or on two devices, are refused:
///   build one optimizer per dtype (a step's clipping norm and overflow check then
///   cover each optimizer's `Var`s alone).
/// - A `Var` without a gradient in the `GradStore` is skipped: not read or written,
///   no weight decay, no step counted for its bias correction (as PyTorch skips a
///   parameter whose `grad` is `None`).
/// - Errors are candle errors; none panics. A step that returns an error has changed
///   nothing.
pub struct Adamax {
    /// The `Var`s stepped, in the optimizer's order.
    vars: Vec<Var>,
    /// The optimizer underneath; `None` when there is no `Var` to step.
    engine: Option<Engine>,
    /// The configuration, for an optimizer without `Var`s.
    config: AdamaxConfig,
    /// Why the last `set_learning_rate` was refused, until one is accepted.
    refused_lr: Option<String>,
}

impl std::fmt::Debug for Adamax {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adamax")
            .field("vars", &self.vars.len())
            .field("config", self.config())
            .field("names", &self.names())
            .finish_non_exhaustive()
    }
}

impl candle_nn::Optimizer for Adamax {
    type Config = ParamsAdamax;

    fn new(vars: Vec<Var>, params: ParamsAdamax) -> Result<Self> {
        Self::build(vars.into_iter().map(|v| (None, v)).collect(), params)
    }

    /// One step of every `Var` from its gradient in `grads` (a `Var` without one is
    /// skipped), with the clipping, unscaling and loss scaler in force. On a CUDA
    /// device the step is enqueued on candle's stream and this returns before it runs.
    ///
    /// When no `Var` has a gradient in `grads` (a loss that depends on none of them)
    /// nothing happens: no step is counted and the loss scaler does not move, as
    /// candle's own optimizers do nothing then.
    ///
    /// With a loss scaler set, the step divides the gradients by the scale: they must
    /// come from the loss multiplied by it, as [`backward_step`](candle_nn::Optimizer::backward_step)
    /// does. To take gradients yourself (accumulating them over micro-batches, say),
    /// multiply each loss by [`Adamax::loss_scaler`]`()?.scale` before its backward
    /// pass.
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        if let Some(why) = &self.refused_lr {
            return Err(refuse(format!(
                "{why}; set a valid learning rate before stepping (nothing was stepped)"
            )));
        }
        if !self.vars.iter().any(|v| grads.get(v.as_tensor()).is_some()) {
            return Ok(());
        }
        match &mut self.engine {
            Some(engine) => engine.step(&self.vars, grads),
            None => Ok(()),
        }
    }

    fn learning_rate(&self) -> f64 {
        self.config().lr
    }

    /// Sets the learning rate from the next step on. The trait leaves no way to return
    /// an error: a value adamax-cuda refuses (negative, not finite, or out of range
    /// with a per-group setting) leaves the previous one in force and makes every step
    /// return that error until a valid one is set.
    fn set_learning_rate(&mut self, lr: f64) {
        let result = match &mut self.engine {
            Some(engine) => engine.set_lr(lr),
            None => AdamaxConfig { lr, ..self.config }
                .validate()
                .map_err(adamax_cuda::Error::from),
        };
        match result {
            Ok(()) => {
                self.config.lr = lr;
                self.refused_lr = None;
            }
            Err(e) => self.refused_lr = Some(format!("the learning rate {lr} was refused: {e}")),
        }
    }

    /// With a loss scaler set, the loss is multiplied by the current scale before the
    /// backward pass (which reads the scale from the device: one synchronisation) and
    /// the step unscales; otherwise as candle's default.
    fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let scale = match &self.engine {
            Some(engine) => engine.loss_scaler()?.map(|s| s.scale),
            None => None,
        };
        let grads = match scale {
            Some(scale) => (loss * f64::from(scale))?.backward()?,
            None => loss.backward()?,
        };
        candle_nn::Optimizer::step(self, &grads)
    }
}

impl Adamax {
    /// The optimizer over every `Var` of `varmap`, named by their `VarMap` names, in
    /// name order (so the order does not depend on the map's): parameter groups may
    /// select by name, and checkpoints are saved and restored by name.
    pub fn from_varmap(varmap: &VarMap, params: ParamsAdamax) -> Result<Self> {
        let mut named = named_vars(varmap)?;
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Self::build(
            named.into_iter().map(|(n, v)| (Some(n), v)).collect(),
            params,
        )
    }

    fn build(named: Vec<(Option<String>, Var)>, params: ParamsAdamax) -> Result<Self> {
        let ParamsAdamax {
            config,
            groups,
            state_formats,
            options,
            loss_scaler,
        } = params;
        config.validate().map_err(|e| adamax_error(e.into()))?;
        options.validate().map_err(adamax_error)?;
        if let Some(s) = &loss_scaler {
            s.validate().map_err(adamax_error)?;
        }
        check_scaling(&options, loss_scaler.as_ref())?;
        for g in &groups {
            g.hyper.validate().map_err(|e| adamax_error(e.into()))?;
            config
                .check_scalars(&g.hyper)
                .map_err(|e| adamax_error(e.into()))?;
        }
        let named: Vec<(Option<String>, Var)> = named
            .into_iter()
            .filter(|(_, v)| v.dtype().is_float())
            .collect();
        let label = |i: usize, name: &Option<String>| match name {
            Some(n) => format!("Var {i} ({n:?})"),
            None => format!("Var {i}"),
        };
        let selects = || {
            groups
                .iter()
                .map(|g| ("parameter group", &g.select))
                .chain(state_formats.iter().map(|(s, _)| ("state format rule", s)))
        };
        if let Some((what, select)) = selects().find(|(_, s)| s.needs_names()) {
            if let Some(i) = named.iter().position(|(n, _)| n.is_none()) {
                return Err(refuse(format!(
                    "the {what} {select:?} selects by name but {} has none; build the optimizer with Adamax::from_varmap",
                    label(i, &named[i].0)
                )));
            }
        }
        for (what, select) in selects() {
            if let Select::Names(wanted) = select {
                if let Some(w) = wanted
                    .iter()
                    .find(|w| !named.iter().any(|(n, _)| n.as_deref() == Some(w.as_str())))
                {
                    return Err(refuse(format!(
                        "the {what} {select:?} names {w:?}, which no Var has; the names are the VarMap's ({})",
                        named
                            .iter()
                            .flat_map(|(n, _)| n.as_deref())
                            .take(8)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
            }
        }
        let mut me = Self {
            vars: named.iter().map(|(_, v)| v.clone()).collect(),
            engine: None,
            config,
            refused_lr: None,
        };
        let Some((_, first)) = named.first() else {
            return Ok(me);
        };
        let (dtype, device) = (first.dtype(), first.device().clone());
        let mut seen = HashMap::with_capacity(named.len());
        for (i, (name, v)) in named.iter().enumerate() {
            if v.dtype() != dtype {
                return Err(refuse(format!(
                    "{} is {:?} but Var 0 is {dtype:?}; one optimizer steps Vars of one dtype: build one per dtype",
                    label(i, name),
                    v.dtype()
                )));
            }
            if !v.device().same_device(&device) {
                return Err(refuse(format!(
                    "{} is on {:?} but Var 0 on {:?}; one optimizer steps Vars on one device: build one per device",
                    label(i, name),
                    v.device().location(),
                    device.location()
                )));
            }
            if !v.as_tensor().is_contiguous() {
                return Err(refuse(format!(
                    "{} is not contiguous; make it with Var::from_tensor of a contiguous tensor",
                    label(i, name)
                )));
            }
            if let Some(j) = seen.insert(v.as_tensor().id(), i) {
                return Err(refuse(format!(
                    "{} is Var {j} again; pass each Var once",
                    label(i, name)
                )));
            }
        }
        let mut engine = Engine::new(dtype, &device, config, &me.vars)?;
        for (i, (name, v)) in named.iter().enumerate() {
            engine.set_tensor_shape(i, v.dims())?;
            engine.set_tensor_name(i, name.as_deref())?;
            if let Some(g) = groups.iter().find(|g| g.select.picks(name.as_deref(), v)) {
                engine.set_tensor_hyper(i, g.hyper)?;
            }
        }
        // All at once: on a GPU the state is laid out once.
        let mut formats = engine.tensor_state_formats().to_vec();
        for ((name, v), format) in named.iter().zip(&mut formats) {
            if let Some((_, f)) = state_formats
                .iter()
                .find(|(s, _)| s.picks(name.as_deref(), v))
            {
                *format = *f;
            }
        }
        if !state_formats.is_empty() {
            engine.set_tensor_state_formats(&formats)?;
        }
        engine.set_options(options)?;
        engine.set_loss_scaler(loss_scaler)?;
        me.engine = Some(engine);
        Ok(me)
    }

    /// The `Var`s it steps, in its order (the floating-point ones it was given).
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// Each `Var`'s name (`None` for a `Var` given without one), in order.
    pub fn names(&self) -> Vec<Option<&str>> {
        match &self.engine {
            Some(e) => e.tensor_names().iter().map(Option::as_deref).collect(),
            None => Vec::new(),
        }
    }

    /// Names every `Var` by its name in `varmap` (for an optimizer built with
    /// `Adamax::new`, so that it can [`save`](Adamax::save) and [`load`](Adamax::load)
    /// by name). A `Var` that `varmap` does not hold is refused, and nothing changes.
    pub fn name_vars(&mut self, varmap: &VarMap) -> Result<()> {
        let mut by_id: HashMap<_, String> = HashMap::new();
        for (n, v) in named_vars(varmap)? {
            if let Some(other) = by_id.insert(v.as_tensor().id(), n.clone()) {
                if self
                    .vars
                    .iter()
                    .any(|x| x.as_tensor().id() == v.as_tensor().id())
                {
                    let (a, b) = if other < n { (other, n) } else { (n, other) };
                    return Err(refuse(format!(
                        "the VarMap holds one Var under two names, {a:?} and {b:?}; give each Var one name"
                    )));
                }
            }
        }
        let names: Vec<String> = self
            .vars
            .iter()
            .enumerate()
            .map(|(i, v)| {
                by_id.get(&v.as_tensor().id()).cloned().ok_or_else(|| {
                    refuse(format!(
                        "Var {i} (shape {:?}) is not in the VarMap; name Vars from the VarMap that holds them",
                        v.dims()
                    ))
                })
            })
            .collect::<Result<_>>()?;
        let old: Vec<Option<String>> = self.names().iter().map(|n| n.map(str::to_owned)).collect();
        if let Some(engine) = &mut self.engine {
            let result = set_names(engine, names.iter().map(|n| Some(n.as_str())));
            if result.is_err() {
                // The names in force before are valid: put them back.
                set_names(engine, old.iter().map(Option::as_deref))?;
            }
            result?;
        }
        Ok(())
    }

    /// Sets each 16-bit `Var`'s f32 master weights to the `Var`'s current value. With
    /// master weights (the default for f16 and bf16 `Var`s) a step computes from the
    /// masters and writes the `Var`s rounded from them, so a value written into a
    /// `Var` from outside (`VarMap::load` of other weights after the optimizer was
    /// built, a clamp, a re-initialisation) is overwritten by the next step unless the
    /// masters take it: call this after such a write. Nothing to do for f32 `Var`s and
    /// for bf16 with stochastic rounding (no master). Synchronises, and copies the
    /// state through the host.
    pub fn sync_masters(&mut self) -> Result<()> {
        let Some(engine) = &mut self.engine else {
            return Ok(());
        };
        let mut ck = engine.checkpoint()?;
        if ck.tensors.iter().all(|t| t.master.is_empty()) {
            return Ok(());
        }
        for (t, v) in ck.tensors.iter_mut().zip(&self.vars) {
            if !t.master.is_empty() {
                t.master = v
                    .as_tensor()
                    .flatten_all()?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1::<f32>()?;
            }
        }
        engine.restore(&ck)
    }

    /// The configuration in force.
    pub fn config(&self) -> &AdamaxConfig {
        match &self.engine {
            Some(e) => e.config(),
            None => &self.config,
        }
    }

    /// Each `Var`'s learning-rate scale and weight decay (its parameter group's).
    pub fn tensor_hypers(&self) -> &[TensorHyper] {
        match &self.engine {
            Some(e) => e.tensor_hypers(),
            None => &[],
        }
    }

    /// Each `Var`'s state format, in order (see [`ParamsAdamax::state_formats`]).
    pub fn tensor_state_formats(&self) -> &[adamax_cuda::StateFormat] {
        match &self.engine {
            Some(e) => e.tensor_state_formats(),
            None => &[],
        }
    }

    /// Changes `Var` `i`'s learning-rate scale and weight decay from the next step on.
    pub fn set_tensor_hyper(&mut self, i: usize, hyper: TensorHyper) -> Result<()> {
        self.engine_mut()?.set_tensor_hyper(i, hyper)
    }

    /// The step options in force (clipping, unscaling, overflow skip).
    pub fn options(&self) -> StepOptions {
        self.engine
            .as_ref()
            .map_or_else(StepOptions::default, Engine::options)
    }

    /// Sets the options of every following step.
    pub fn set_options(&mut self, options: StepOptions) -> Result<()> {
        check_scaling(&options, self.loss_scaler()?.as_ref())?;
        self.engine_mut()?.set_options(options)
    }

    /// The loss scaler's state, when one is set (on a GPU, read from the device).
    pub fn loss_scaler(&self) -> Result<Option<LossScaler>> {
        self.engine.as_ref().map_or(Ok(None), Engine::loss_scaler)
    }

    /// Sets (or, with `None`, removes) the dynamic loss scaler.
    pub fn set_loss_scaler(&mut self, scaler: Option<LossScaler>) -> Result<()> {
        check_scaling(&self.options(), scaler.as_ref())?;
        self.engine_mut()?.set_loss_scaler(scaler)
    }

    /// What the last step did: skipped or not, the gradients' norm and the clip
    /// coefficient when clipping, the step count and the loss scale.
    pub fn last_report(&self) -> Result<StepReport> {
        self.engine_ref()?.last_report()
    }

    /// Steps taken (skipped steps are not counted).
    pub fn step_count(&self) -> Result<u64> {
        self.engine.as_ref().map_or(Ok(0), Engine::step_count)
    }

    /// The whole optimizer state on the host (adamax-cuda's [`Checkpoint`]).
    pub fn checkpoint(&self) -> Result<Checkpoint> {
        self.engine_ref()?.checkpoint()
    }

    /// Restores `ck` position by position (`ck`'s tensor `i` into `Var` `i`), after
    /// adamax-cuda's checks (storage, modes, lengths, and names where both have one)
    /// and a check that each tensor's shape is its `Var`'s (a file without shapes,
    /// 1-D, is taken for any). Like [`Adamax::load`], it replaces the configuration,
    /// the parameter groups' settings, the step options and the loss scaler with
    /// `ck`'s. [`Adamax::load`] goes by name instead.
    pub fn restore(&mut self, ck: &Checkpoint) -> Result<()> {
        self.check_shapes(ck)?;
        let engine = self.engine.as_mut().ok_or_else(no_vars)?;
        engine.restore(ck)?;
        for (i, v) in self.vars.iter().enumerate() {
            engine.set_tensor_shape(i, v.dims())?;
        }
        self.refused_lr = None;
        Ok(())
    }

    /// Saves the optimizer's state to `path` (adamax-cuda's checkpoint file, written
    /// atomically, with each `Var`'s name and shape), streamed from the GPU one tensor
    /// at a time. Every `Var` must be named ([`Adamax::from_varmap`] or
    /// [`Adamax::name_vars`]). The `Var`s' values are not in it: save the `VarMap` too.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        self.check_named("save")?;
        self.engine_ref()?.save_checkpoint(path.as_ref())
    }

    /// Restores the state saved by [`Adamax::save`] by the `Var`s' names, whatever
    /// their order now: every `Var` must be named, and the file must hold a state of
    /// the `Var`'s shape for each name, and no other name. A refused file changes
    /// nothing.
    ///
    /// As PyTorch's `load_state_dict` does, the file's settings replace the
    /// optimizer's: the configuration (learning rate included), each `Var`'s group
    /// settings, the step options (clipping, overflow skip) and the loss scaler are
    /// the ones in force when it was saved. Set them again after loading to change
    /// them.
    ///
    /// Load the `VarMap` too (`VarMap::load`). For 16-bit `Var`s with master weights
    /// the file's masters are the truth: the run continues bit for bit when the `Var`s
    /// hold the values saved with the file, and a step overwrites other values (see
    /// [`Adamax::sync_masters`]).
    pub fn load(&mut self, path: impl AsRef<Path>) -> Result<()> {
        self.check_named("load")?;
        let names: Vec<&str> = self.names().into_iter().flatten().collect();
        let ck = Checkpoint::load(path)
            .and_then(|ck| ck.reordered(&names))
            .map_err(adamax_error)?;
        self.restore(&ck)
    }

    /// Refuses a checkpoint whose tensor has another shape than its `Var` (a 1-D
    /// shape, a file's without shapes, is taken for any).
    fn check_shapes(&self, ck: &Checkpoint) -> Result<()> {
        for (i, (v, shape)) in self.vars.iter().zip(&ck.shapes).enumerate() {
            let flat = shape.len() == 1 && shape[0] == v.elem_count();
            if shape.as_slice() != v.dims() && !flat {
                let name = self
                    .names()
                    .get(i)
                    .copied()
                    .flatten()
                    .map_or_else(String::new, |n| format!(" ({n:?})"));
                return Err(refuse(format!(
                    "the checkpoint's tensor {i}{name} has shape {shape:?} but the Var has {:?}; restore a checkpoint of this model",
                    v.dims()
                )));
            }
        }
        Ok(())
    }

    fn check_named(&self, what: &str) -> Result<()> {
        if let Some(i) = self.names().iter().position(Option::is_none) {
            return Err(refuse(format!(
                "Var {i} has no name, and checkpoints {what} by name; build with Adamax::from_varmap or call Adamax::name_vars"
            )));
        }
        Ok(())
    }

    fn engine_ref(&self) -> Result<&Engine> {
        self.engine.as_ref().ok_or_else(no_vars)
    }

    fn engine_mut(&mut self) -> Result<&mut Engine> {
        self.engine.as_mut().ok_or_else(no_vars)
    }
}

/// Sets every tensor's name: first all cleared, so that names moving between `Var`s
/// never clash midway.
fn set_names<'a>(
    engine: &mut Engine,
    names: impl ExactSizeIterator<Item = Option<&'a str>>,
) -> Result<()> {
    for i in 0..names.len() {
        engine.set_tensor_name(i, None)?;
    }
    for (i, n) in names.enumerate() {
        engine.set_tensor_name(i, n)?;
    }
    Ok(())
}

/// `inv_scale` is ignored while a loss scaler is set (the scaler's inverse scale is
/// used): refused, so that a setting never silently does nothing.
fn check_scaling(options: &StepOptions, scaler: Option<&LossScaler>) -> Result<()> {
    if options.inv_scale.is_some() && scaler.is_some() {
        return Err(refuse(
            "options.inv_scale and a loss scaler were both given; the scaler unscales by its own scale: leave inv_scale None",
        ));
    }
    Ok(())
}

fn no_vars() -> candle_core::Error {
    refuse("the optimizer has no Var to step (it was built without f32, f16 or bf16 Vars)")
}

/// Every `(name, Var)` of `varmap`.
fn named_vars(varmap: &VarMap) -> Result<Vec<(String, Var)>> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| refuse("the VarMap's lock is poisoned (a thread panicked holding it)"))?;
    Ok(data.iter().map(|(n, v)| (n.clone(), v.clone())).collect())
}
