//! The [`Optimizer`] interface of [`CudaAdamax`]: settings written to the device's
//! control block, reports read from it, state copied to and from device memory, and
//! checkpoints saved from the device one tensor at a time.

use cudarc::driver::{CudaView, CudaViewMut};

use crate::{
    checkpoint::{save_streamed, Checkpoint, Head},
    config::{AdamaxConfig, StateFormat, TensorHyper},
    error::{Error, Result},
    fused::{LossScaler, StepOptions, StepReport},
    optimizer::Optimizer,
    state::TensorState,
};

use super::{CudaAdamax, GpuStorage};
use crate::cuda::{
    args::{
        AdamaxArgs, ControlParams, ScalerState, SKIP_COUNTER_FULL, SKIP_NONFINITE, SKIP_STALE_GRAPH,
    },
    device::refuse_during_capture,
};

impl<T: GpuStorage> Optimizer for CudaAdamax<T> {
    type Storage = T;
    type Param<'a> = CudaViewMut<'a, T>;
    type Grad<'a> = CudaView<'a, T>;

    fn step<'a>(
        &mut self,
        params: &mut [CudaViewMut<'a, T>],
        grads: &[CudaView<'a, T>],
    ) -> Result<()> {
        CudaAdamax::step(self, params, grads)
    }

    fn step_some<'a>(
        &mut self,
        params: &mut [CudaViewMut<'a, T>],
        grads: &[Option<CudaView<'a, T>>],
    ) -> Result<()> {
        CudaAdamax::step_some(self, params, grads)
    }

    fn config(&self) -> &AdamaxConfig {
        self.schedule.config()
    }

    /// The value is written to the device, ordered before the next step: a step
    /// captured in a CUDA graph uses the new rate on its next replay.
    fn set_lr(&mut self, lr: f64) -> Result<()> {
        let mut schedule = self.schedule.clone();
        schedule.set_lr(lr)?;
        self.control.set_params(ControlParams {
            lr,
            ..*self.control.params()
        })?;
        self.schedule = schedule;
        Ok(())
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

    /// Allocates the moments anew in the new layout, once (refused while the stream
    /// captures a CUDA graph); the master weights stay where they are.
    fn set_tensor_state_formats(&mut self, formats: &[StateFormat]) -> Result<()> {
        self.set_state_formats(formats)
    }

    fn tensor_lens(&self) -> &[usize] {
        self.state.layout().lens()
    }

    fn tensor_hypers(&self) -> &[TensorHyper] {
        self.schedule.hypers()
    }

    /// Written into the tensor table on the device (one copy), so a captured step
    /// picks it up without recapture.
    fn set_tensor_hyper(&mut self, tensor: usize, hyper: TensorHyper) -> Result<()> {
        let mut schedule = self.schedule.clone();
        schedule.set_hyper(tensor, hyper)?;
        self.plan
            .table
            .set_hypers(&self.stream, schedule.hypers())?;
        self.schedule = schedule;
        Ok(())
    }

    fn options(&self) -> StepOptions {
        self.options
    }

    /// Written to the device, so a captured step picks them up without recapture.
    fn set_options(&mut self, options: StepOptions) -> Result<()> {
        options.validate()?;
        let params = self.params_with(&options, self.scaler);
        self.control.set_params(params)?;
        self.options = options;
        Ok(())
    }

    /// Read from the device (synchronises).
    fn loss_scaler(&self) -> Result<Option<LossScaler>> {
        if !self.scaler {
            return Ok(None);
        }
        let c = self.control.read()?;
        Ok(Some(LossScaler {
            scale: c.scaler.scale,
            min_scale: c.params.min_scale,
            growth_factor: c.params.growth_factor,
            backoff_factor: c.params.backoff_factor,
            growth_interval: c.params.growth_interval,
            growth_tracker: c.scaler.growth_tracker,
        }))
    }

    /// Dynamic loss scaling on the device: each step unscales by the scaler's inverse
    /// scale, skips on a non-finite gradient and updates the scale, all without the
    /// host. The scale to multiply the loss by is at
    /// [`CudaAdamax::loss_scale_device_ptr`], or on the host from
    /// [`Optimizer::last_report`]. Synchronises the stream (it rewrites the device's
    /// scaler state).
    fn set_loss_scaler(&mut self, scaler: Option<LossScaler>) -> Result<()> {
        if let Some(s) = &scaler {
            s.validate()?;
        }
        let mut params = self.params_with(&self.options, scaler.is_some());
        let scaler_state = set_scaler(&mut params, scaler.as_ref());
        self.control.update(|c| {
            c.params = params;
            if let Some(s) = scaler_state {
                c.scaler = s;
            }
        })?;
        self.scaler = scaler.is_some();
        Ok(())
    }

    /// Read from the device (synchronises). A step replayed from a CUDA graph while the
    /// step counter was at `u64::MAX` changed nothing and is reported as
    /// [`Error::StepOverflow`] (an eager step is refused with that error before it is
    /// enqueued); one replayed from a graph captured before a restore that changed the
    /// configuration changed nothing either, and is reported as [`Error::StaleGraph`].
    fn last_report(&self) -> Result<StepReport> {
        let c = self.control.read()?;
        match c.state.skipped {
            SKIP_COUNTER_FULL => return Err(Error::StepOverflow(c.state.step)),
            SKIP_STALE_GRAPH => return Err(Error::StaleGraph),
            _ => {}
        }
        let skipped = c.state.skipped == SKIP_NONFINITE;
        // What the last step did, as the device recorded it: not today's options.
        let clipped = c.state.clipped != 0;
        Ok(StepReport {
            step: c.state.step,
            skipped,
            total_norm: clipped.then_some(c.state.total_norm),
            clip_coef: if clipped { c.state.clip_coef } else { 1.0 },
            loss_scale: self.scaler.then_some(c.scaler.scale),
        })
    }

    /// Read from the device, where it is kept (synchronises).
    fn step_count(&self) -> Result<u64> {
        Ok(self.control.read()?.state.step)
    }

    /// One whole-buffer copy per part of the state (synchronises).
    fn state(&self) -> Result<Vec<TensorState>> {
        self.state.to_host()
    }

    /// Streamed from the device one tensor at a time (synchronises).
    fn save_checkpoint(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        let steps = self.state.steps_to_host()?;
        let (options, scaler) = (self.options(), self.loss_scaler()?);
        let head = Head {
            config: self.schedule.config(),
            step: self.step_count()?,
            storage: T::TYPE,
            tensor_steps: &steps,
            shapes: self.schedule.shapes(),
            names: self.schedule.names(),
            formats: self.schedule.formats(),
            hypers: self.schedule.hypers(),
            options: &options,
            scaler: scaler.as_ref(),
        };
        save_streamed(
            path.as_ref(),
            &head,
            self.state.layout().lens(),
            |i, part, buf| self.state.part_to_host(i, part, buf),
        )
    }

    /// The state is uploaded into new device buffers (so the optimizer's memory doubles
    /// while it runs), and only once every upload has been enqueued is it copied into
    /// the buffers in use (on the device), the control block rewritten (one copy) and
    /// the tensor settings written into the table. Synchronises the stream.
    ///
    /// Every device address stays where it was, so a step captured in a CUDA graph
    /// before the restore replays on the restored state and settings. A restore that
    /// changes the configuration the launch carries by value (betas, eps, their
    /// conventions, `maximize`, the seed) makes such a graph stale instead: its replays
    /// change nothing and [`Optimizer::last_report`] says [`Error::StaleGraph`];
    /// capture again.
    fn restore(&mut self, ck: &Checkpoint) -> Result<()> {
        let schedule = ck.schedule_for(T::TYPE, &self.schedule, self.state.layout().lens())?;
        refuse_during_capture(
            &self.stream,
            "restoring a checkpoint",
            "Restore before begin_capture or after end_capture",
        )?;
        let staged = self.state.stage(&ck.tensors)?;
        let mut params = self.params_with(&ck.options, ck.scaler.is_some());
        params.lr = ck.config.lr;
        params.beta1 = ck.config.beta1;
        let by_value = |c| AdamaxArgs::for_config(c, 0, 0);
        if by_value(self.schedule.config()) != by_value(&ck.config) {
            params.generation = params.generation.wrapping_add(1);
        }
        let scaler_state = set_scaler(&mut params, ck.scaler.as_ref());
        self.state.commit(staged)?;
        self.control.update(|c| {
            c.params = params;
            if let Some(s) = scaler_state {
                c.scaler = s;
            }
            c.state.step = ck.step;
            c.state.skipped = 0;
            c.state.clipped = 0;
        })?;
        // The device holds the checkpoint's state and settings from here: the host follows
        // even if writing the settings into the table fails (it then forgets the table,
        // and the next step uploads one built from these settings).
        let hypers_written = self.plan.table.set_hypers(&self.stream, schedule.hypers());
        self.schedule = schedule;
        self.step_bound = ck.step;
        self.options = ck.options;
        self.scaler = ck.scaler.is_some();
        self.formats_fixed = Some(crate::state::FIXED_BY_RESTORE);
        hypers_written
    }
}

/// A loss scaler as the control block holds it: its factors go into the settings part
/// (`params`), and its scale and tracker are returned for the scaler part.
fn set_scaler(params: &mut ControlParams, scaler: Option<&LossScaler>) -> Option<ScalerState> {
    let s = scaler?;
    params.min_scale = s.min_scale;
    params.growth_factor = s.growth_factor;
    params.backoff_factor = s.backoff_factor;
    params.growth_interval = s.growth_interval;
    Some(ScalerState {
        scale: s.scale,
        growth_tracker: s.growth_tracker,
    })
}
