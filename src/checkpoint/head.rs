//! The streamed save: a checkpoint's metadata from its [`Head`] (everything but the
//! tensors' data), and a file written one tensor at a time from a caller that fetches
//! each when its turn comes (the GPU optimizer, from device memory).

use std::{collections::BTreeMap, path::Path};

use super::{file, refuse, Entry, MetaName, FORMAT};
use crate::{
    config::{AdamaxConfig, TensorHyper},
    error::{Error, Result},
    fused::{LossScaler, StepOptions},
    state::check_pairs,
    storage::StorageType,
};

/// Everything of a checkpoint but the tensors' data: what its metadata is made of.
pub(crate) struct Head<'a> {
    pub config: &'a AdamaxConfig,
    pub step: u64,
    pub storage: StorageType,
    /// Each tensor's own step count, in order.
    pub tensor_steps: &'a [u64],
    pub hypers: &'a [TensorHyper],
    pub options: &'a StepOptions,
    pub scaler: Option<&'a LossScaler>,
}

impl Head<'_> {
    /// The metadata of the file, without the checksum.
    pub(super) fn metadata(&self) -> BTreeMap<String, String> {
        let c = self.config;
        let mut meta: BTreeMap<String, String> = [
            ("format", FORMAT.to_owned()),
            ("storage", self.storage.as_str().to_owned()),
            ("step", self.step.to_string()),
            ("tensors", self.tensor_steps.len().to_string()),
            ("lr", c.lr.to_string()),
            ("beta1", c.beta1.to_string()),
            ("beta2", c.beta2.to_string()),
            ("eps", c.eps.to_string()),
            ("weight_decay", c.weight_decay.to_string()),
            ("eps_mode", c.eps_mode.meta_name().to_owned()),
            (
                "weight_decay_mode",
                c.weight_decay_mode.meta_name().to_owned(),
            ),
            ("maximize", c.maximize.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (i, t) in self.tensor_steps.iter().enumerate() {
            if *t != self.step {
                meta.insert(format!("tensor.{i}.step"), t.to_string());
            }
        }
        let o = self.options;
        for (k, v) in [("inv_scale", o.inv_scale), ("max_norm", o.max_norm)] {
            if let Some(v) = v {
                meta.insert(format!("options.{k}"), v.to_string());
            }
        }
        meta.insert(
            "options.skip_nonfinite".into(),
            o.skip_nonfinite.to_string(),
        );
        if let Some(s) = self.scaler {
            for (k, v) in [
                ("scale", s.scale.to_string()),
                ("growth_factor", s.growth_factor.to_string()),
                ("backoff_factor", s.backoff_factor.to_string()),
                ("growth_interval", s.growth_interval.to_string()),
                ("growth_tracker", s.growth_tracker.to_string()),
            ] {
                meta.insert(format!("scaler.{k}"), v);
            }
        }
        for (i, h) in self.hypers.iter().enumerate() {
            meta.insert(format!("tensor.{i}.lr_scale"), h.lr_scale.to_string());
            meta.insert(
                format!("tensor.{i}.weight_decay"),
                h.weight_decay.to_string(),
            );
        }
        meta
    }

    /// What `Checkpoint::validate` checks that needs no tensor data.
    pub(super) fn validate(&self) -> Result<()> {
        check_pairs(self.config, self.hypers)?;
        self.options.validate()?;
        if let Some(s) = self.scaler {
            s.validate()?;
        }
        if self.hypers.len() != self.tensor_steps.len() {
            return Err(refuse(format!(
                "it holds hyperparameters for {} tensors and state for {}",
                self.hypers.len(),
                self.tensor_steps.len()
            )));
        }
        if let Some(i) = self.tensor_steps.iter().position(|&t| t > self.step) {
            return Err(refuse(format!(
                "tensor {i} took {} steps but the optimizer only {}",
                self.tensor_steps[i], self.step
            )));
        }
        Ok(())
    }
}

/// A part of one tensor's state, fetched by [`save_streamed`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Part {
    ExpAvg,
    ExpInf,
    Master,
}

/// Writes a checkpoint file of `head` and tensors of `lens` to `path` atomically, one
/// tensor at a time: `fetch(i, part, buf)` fills `buf` with that part of tensor `i`'s
/// state when its turn comes. Validated as [`Checkpoint::save`] validates (the data as
/// it comes: `exp_inf >= 0`); on a refusal nothing is left at `path`.
pub(crate) fn save_streamed(
    path: &Path,
    head: &Head<'_>,
    lens: &[usize],
    mut fetch: impl FnMut(usize, Part, &mut Vec<f32>) -> Result<()>,
) -> Result<()> {
    head.validate()?;
    if lens.len() != head.tensor_steps.len() {
        return Err(Error::Internal {
            what: "a streamed checkpoint with one length per tensor expected",
        });
    }
    let (specs, which) = file::entries(head.storage, lens.iter().copied());
    let mut refusal = None;
    let written = crate::fsutil::write_atomically_with(path, |w| {
        file::write_streaming(
            head.metadata(),
            &specs,
            |k, buf| {
                let (i, e) = which[k];
                let part = match e {
                    Entry::Step => {
                        buf.push(head.tensor_steps[i] as f32);
                        return Ok(());
                    }
                    Entry::ExpAvg => Part::ExpAvg,
                    Entry::ExpInf => Part::ExpInf,
                    Entry::Master => Part::Master,
                };
                fetch(i, part, buf)?;
                if let (Part::ExpInf, Some(j)) =
                    (part, buf.iter().position(|u| u.is_nan() || *u < 0.0))
                {
                    return Err(refuse(format!(
                        "exp_inf[{j}] of tensor {i} is {}; the infinity norm is never negative or NaN",
                        buf[j]
                    )));
                }
                Ok(())
            },
            w,
        )
        .map_err(|e| match e {
            file::WriteError::Invalid(e) => {
                let message = e.to_string();
                refusal = Some(e);
                std::io::Error::other(message)
            }
            file::WriteError::Io(e) => e,
        })
    });
    match (written, refusal) {
        (_, Some(e)) => Err(e),
        (r, None) => r,
    }
}
