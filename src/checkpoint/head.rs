//! The streamed save: a checkpoint's metadata from its [`Head`] (everything but the
//! tensors' data), and a file written one tensor at a time from a caller that fetches
//! each when its turn comes (the GPU optimizer, from device memory).

use std::{collections::BTreeMap, path::Path};

use super::{
    file, refuse,
    valid::{check_part, Pairs},
    MetaName, FORMAT,
};
use crate::{
    config::{AdamaxConfig, ParamMode, StateFormat, TensorHyper, DEFAULT_MIN_8BIT_LEN},
    error::{Error, Result},
    fused::{LossScaler, StepOptions},
    spec::lowbit::QBLOCK,
    state::{
        check_pairs,
        parts::{Data, Part},
    },
    storage::StorageType,
};

/// Everything of a checkpoint but the tensors' data: what its metadata is made of.
pub(crate) struct Head<'a> {
    pub config: &'a AdamaxConfig,
    pub step: u64,
    pub storage: StorageType,
    /// Each tensor's own step count, in order.
    pub tensor_steps: &'a [u64],
    /// Each tensor's shape (its per-element entries'), in order.
    pub shapes: &'a [Vec<usize>],
    /// Each tensor's name, in order.
    pub names: &'a [Option<String>],
    /// Each tensor's state format, in order.
    pub formats: &'a [StateFormat],
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
        // Written only when not the default, so files of the default modes keep their
        // bytes (and PyTorch's files, which have none of these keys, read as default).
        let p = &c.precision;
        if p.params != ParamMode::Master {
            meta.insert("param_mode".into(), p.params.meta_name().to_owned());
        }
        if p.state != StateFormat::F32 {
            meta.insert("state_format".into(), p.state.meta_name().to_owned());
            meta.insert("state_block".into(), QBLOCK.to_string());
        }
        // With f32 state only when not the default, so that default files keep their
        // bytes and a converted checkpoint (Checkpoint::convert_state) follows the same
        // threshold after a save and load.
        if p.state != StateFormat::F32 || p.min_8bit_len != DEFAULT_MIN_8BIT_LEN {
            meta.insert("min_8bit_len".into(), p.min_8bit_len.to_string());
        }
        for (i, f) in self.formats.iter().enumerate() {
            if *f != p.state {
                meta.insert(format!("tensor.{i}.state_format"), f.meta_name().to_owned());
            }
        }
        if p.is_random() {
            meta.insert("seed".into(), p.seed.to_string());
        }
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
                ("min_scale", s.min_scale.to_string()),
                ("growth_factor", s.growth_factor.to_string()),
                ("backoff_factor", s.backoff_factor.to_string()),
                ("growth_interval", s.growth_interval.to_string()),
                ("growth_tracker", s.growth_tracker.to_string()),
            ] {
                meta.insert(format!("scaler.{k}"), v);
            }
        }
        for (i, name) in self.names.iter().enumerate() {
            if let Some(name) = name {
                meta.insert(format!("tensor.{i}.name"), name.clone());
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
        self.validate_any(false)
    }

    /// [`Head::validate`], where `allow_empty` lets a list of no tensors pass (one
    /// rank's shard may hold no piece).
    pub(super) fn validate_any(&self, allow_empty: bool) -> Result<()> {
        check_pairs(self.config, self.hypers)?;
        self.config.precision.check_storage(self.storage)?;
        self.options.validate()?;
        if let Some(s) = self.scaler {
            s.validate()?;
        }
        if self.tensor_steps.is_empty() && !allow_empty {
            return Err(refuse(
                "it holds no tensors; an optimizer steps at least one".to_owned(),
            ));
        }
        if self.hypers.len() != self.tensor_steps.len() {
            return Err(refuse(format!(
                "it holds hyperparameters for {} tensors and state for {}",
                self.hypers.len(),
                self.tensor_steps.len()
            )));
        }
        if self.shapes.len() != self.tensor_steps.len() {
            return Err(refuse(format!(
                "it holds shapes for {} tensors and state for {}",
                self.shapes.len(),
                self.tensor_steps.len()
            )));
        }
        if self.names.len() != self.tensor_steps.len() {
            return Err(refuse(format!(
                "it holds names for {} tensors and state for {}",
                self.names.len(),
                self.tensor_steps.len()
            )));
        }
        crate::state::check_names(self.names).map_err(|e| refuse(e.to_string()))?;
        if self.formats.len() != self.tensor_steps.len() {
            return Err(refuse(format!(
                "it holds state formats for {} tensors and state for {}",
                self.formats.len(),
                self.tensor_steps.len()
            )));
        }
        if self.config.precision.state == StateFormat::F32 {
            if let Some(i) = self.formats.iter().position(|f| *f != StateFormat::F32) {
                return Err(refuse(format!(
                    "tensor {i} keeps 8-bit state in a checkpoint of f32 state; only an 8-bit checkpoint (`state_format: blockwise8`) holds tensors of both formats"
                )));
            }
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

/// Writes a checkpoint file of `head` and tensors of `lens` to `path` atomically, one
/// tensor at a time: `fetch(i, part, buf)` fills `buf` with that part of tensor `i`'s
/// state when its turn comes. Validated as [`Checkpoint::save`] validates (the data as
/// it comes, a part with the one it pairs with: see `valid`); on a refusal nothing is
/// left at `path`.
pub(crate) fn save_streamed(
    path: &Path,
    head: &Head<'_>,
    lens: &[usize],
    mut fetch: impl FnMut(usize, Part, &mut Data) -> Result<()>,
) -> Result<()> {
    head.validate()?;
    if lens.len() != head.tensor_steps.len()
        || head
            .shapes
            .iter()
            .zip(lens)
            .any(|(s, &n)| crate::state::shape_len(s) != Some(n))
    {
        return Err(Error::Internal {
            what: "a streamed checkpoint with one length and shape per tensor expected",
        });
    }
    let plan = file::Plan::new(
        head.metadata(),
        head.storage,
        &head.config.precision,
        head.shapes,
        head.formats,
    )?;
    let mut pairs = Pairs::new(head.config);
    let mut refusal = None;
    let written = crate::fsutil::write_atomically_with(path, |w| {
        plan.write(
            |i, e, buf| {
                let Some(part) = e.part() else {
                    buf.f32_mut()?.push(head.tensor_steps[i] as f32);
                    return Ok(());
                };
                fetch(i, part, buf)?;
                check_part(i, head.tensor_steps[i], part, buf.view())?;
                pairs.next(i, part, buf.view())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::TensorState;
    use crate::{
        config::{ParamMode, Precision, StateFormat},
        cpu::CpuAdamax,
        optimizer::Optimizer,
        Checkpoint,
    };

    /// The GPU's streamed save, fed from a checkpoint in memory: the bytes of
    /// `Checkpoint::to_bytes`, or the same refusal as `Checkpoint::validate`.
    fn streamed(ck: &Checkpoint, path: &Path) -> Result<Vec<u8>> {
        let steps: Vec<u64> = ck.tensors.iter().map(|t| t.step).collect();
        let lens: Vec<usize> = ck.tensors.iter().map(TensorState::len).collect();
        save_streamed(path, &ck.head(&steps), &lens, |i, part, buf| {
            buf.extend(part.view(&ck.tensors[i]))
        })?;
        std::fs::read(path).map_err(|e| refuse(e.to_string()))
    }

    #[test]
    fn the_streamed_save_writes_and_refuses_what_the_checkpoint_does() {
        let path = std::env::temp_dir().join(format!(
            "adamax-streamed-{}.safetensors",
            std::process::id()
        ));
        for state in [StateFormat::F32, StateFormat::Blockwise8] {
            let config = AdamaxConfig {
                precision: Precision {
                    params: ParamMode::Master,
                    state,
                    seed: 1,
                    min_8bit_len: 0,
                },
                ..AdamaxConfig::default()
            };
            let mut p = [
                vec![half::bf16::from_f32(0.5); 300],
                vec![],
                vec![half::bf16::ONE; 3],
            ];
            let refs: Vec<&[half::bf16]> = p.iter().map(|x| x.as_slice()).collect();
            let mut opt = CpuAdamax::new(config, &refs).unwrap();
            let g: Vec<Vec<half::bf16>> = p
                .iter()
                .map(|x| {
                    (0..x.len())
                        .map(|i| half::bf16::from_f32((i as f32).sin()))
                        .collect()
                })
                .collect();
            let mut pm: Vec<&mut [half::bf16]> = p.iter_mut().map(|x| x.as_mut_slice()).collect();
            let gr: Vec<&[half::bf16]> = g.iter().map(|x| x.as_slice()).collect();
            opt.step(&mut pm, &gr).unwrap();
            let good = opt.checkpoint().unwrap();
            assert_eq!(streamed(&good, &path).unwrap(), good.to_bytes().unwrap());
            let mut bad = good.clone();
            let t = &mut bad.tensors[0];
            match state {
                // A moment beyond the bound: checked across two parts.
                StateFormat::F32 => t.exp_avg[5] = 3.0 * t.exp_inf[5],
                // Scales beyond the bound: checked across the two moments' scales.
                StateFormat::Blockwise8 => t.exp_avg_q8.scales[1] = 1e30,
            }
            let expected = bad.validate().unwrap_err().to_string();
            std::fs::remove_file(&path).unwrap();
            let err = streamed(&bad, &path).unwrap_err().to_string();
            assert_eq!(err, expected);
            assert!(!path.exists(), "a refused streamed save left a file");
        }
    }
}
