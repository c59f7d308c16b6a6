//! Conversions of a checkpoint: its moments to another state format, and the 16-bit
//! parameters its master weights stand for.

use super::{refuse, Checkpoint};
use crate::{
    config::{Precision, StateFormat},
    error::Result,
    spec::lowbit::Blockwise8,
    state::{Mode, MomentBound},
    storage::Storage,
};

impl Checkpoint {
    /// The same checkpoint with its moments in `format`: 8-bit state is decoded
    /// exactly to f32 (PyTorch's `exp_avg` and `exp_inf`, for a PyTorch optimizer or an
    /// f32-state run: `m` is its stored ratio times its denominator), and f32 state is
    /// encoded to 8 bits, deterministic ([`Blockwise8::encode_state`]: `u` rounded up,
    /// `m`'s ratio to nearest). To f32, every tensor is in f32. To 8
    /// bits, an f32-state checkpoint's tensors take the formats its configuration's
    /// [`Precision::min_8bit_len`](crate::Precision::min_8bit_len) gives them (f32
    /// below it); an 8-bit checkpoint is returned as it is, its tensors' formats kept
    /// ([`Checkpoint::with_state_formats`] chooses them one by one). The parameter mode
    /// and the rest stay as they are; the result is validated.
    ///
    /// 8-bit state keeps AdaMax's bound in the values it stands for, so decoded state is
    /// state an f32 run can resume from. 8-bit state rounds stochastically from
    /// [`Precision::seed`](crate::Precision::seed), which a file of a deterministic mode
    /// does not keep (it loads as 0): set it in the converted checkpoint's config.
    pub fn convert_state(&self, format: StateFormat) -> Result<Checkpoint> {
        let formats: Vec<StateFormat> = match (self.config.precision.state, format) {
            (StateFormat::Blockwise8, StateFormat::Blockwise8) => self.state_formats.clone(),
            (_, StateFormat::F32) => vec![StateFormat::F32; self.tensors.len()],
            (StateFormat::F32, StateFormat::Blockwise8) => {
                let to = Precision {
                    state: format,
                    ..self.config.precision
                };
                self.tensors
                    .iter()
                    .map(|t| to.tensor_state(t.len()))
                    .collect()
            }
        };
        let mut ck = self.with_state_formats(&formats)?;
        ck.config.precision.state = format;
        ck.validate()?;
        Ok(ck)
    }

    /// The same checkpoint with tensor `i`'s moments in `formats[i]`, each converted as
    /// [`Checkpoint::convert_state`] converts (decoded to f32, or encoded to 8 bits,
    /// deterministic): for instance to restore into an optimizer whose
    /// tensors keep other formats, `ck.with_state_formats(opt.tensor_state_formats())`.
    /// A checkpoint of f32 state becomes one of 8-bit state (with f32 tensors) when a
    /// format is [`StateFormat::Blockwise8`]. Validated, before and after; one format
    /// per tensor.
    pub fn with_state_formats(&self, formats: &[StateFormat]) -> Result<Checkpoint> {
        self.validate()?;
        if formats.len() != self.tensors.len() {
            return Err(refuse(format!(
                "{} state formats were given for its {} tensors; give one per tensor",
                formats.len(),
                self.tensors.len()
            )));
        }
        let mut ck = self.clone();
        let (eps, eps_mode) = (self.config.eps as f32, self.config.eps_mode);
        let limit = super::valid::ratio_limit(MomentBound::of(&self.config));
        if formats.contains(&StateFormat::Blockwise8) {
            ck.config.precision.state = StateFormat::Blockwise8;
        }
        for ((t, from), &to) in ck
            .tensors
            .iter_mut()
            .zip(&mut ck.state_formats)
            .zip(formats)
        {
            match (std::mem::replace(from, to), to) {
                (StateFormat::Blockwise8, StateFormat::F32) => {
                    (t.exp_avg, t.exp_inf) =
                        Blockwise8::decode_state(&t.exp_avg_q8, &t.exp_inf_q8, eps, eps_mode);
                    t.exp_avg_q8 = Blockwise8::default();
                    t.exp_inf_q8 = Blockwise8::default();
                }
                (StateFormat::F32, StateFormat::Blockwise8) => {
                    (t.exp_avg_q8, t.exp_inf_q8) =
                        Blockwise8::encode_state(&t.exp_avg, &t.exp_inf, eps, eps_mode, limit);
                    t.exp_avg = Vec::new();
                    t.exp_inf = Vec::new();
                }
                _ => {}
            }
        }
        ck.validate()?;
        Ok(ck)
    }

    /// The parameters the master weights stand for, rounded to `T` (round to nearest
    /// even, as every step writes them): after a restore of a 16-bit run, copy these
    /// into the model's parameters to resume bit for bit without having saved them.
    /// Validated first ([`Checkpoint::validate`]). Refused for a checkpoint without masters (f32 parameters are their own master,
    /// and [`ParamMode::Stochastic`](crate::ParamMode::Stochastic) keeps none: save
    /// the parameters with the model) and for a `T` other than the file's storage.
    ///
    /// ```
    /// use adamax_cuda::{bf16, cpu::CpuAdamax, AdamaxConfig, Optimizer};
    /// let mut w = vec![bf16::from_f32(0.5); 4];
    /// let mut opt = CpuAdamax::new(AdamaxConfig::default(), &[&w])?;
    /// opt.step(&mut [&mut w], &[&[bf16::from_f32(0.1); 4]])?;
    /// let ck = opt.checkpoint()?;
    /// assert_eq!(ck.params::<bf16>()?, vec![w]);
    /// # Ok::<(), adamax_cuda::Error>(())
    /// ```
    pub fn params<T: Storage>(&self) -> Result<Vec<Vec<T>>> {
        if T::TYPE != self.storage {
            return Err(refuse(format!(
                "it holds {} parameters, not {}; ask for params::<{}>",
                self.storage,
                T::TYPE,
                self.storage
            )));
        }
        self.validate()?;
        if !Mode::or_master(self.storage, &self.config.precision).has_master() {
            return Err(refuse(format!(
                "it has no master weights ({}); the parameters are not in a checkpoint: save them with the model",
                if self.storage.has_master() {
                    "bf16 parameters rounded stochastically keep none"
                } else {
                    "f32 parameters are their own master"
                }
            )));
        }
        Ok(self
            .tensors
            .iter()
            .map(|t| t.master.iter().map(|&x| T::from_f32(x)).collect())
            .collect())
    }
}
