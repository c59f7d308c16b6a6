//! Conversions of a checkpoint: its moments to another state format, and the 16-bit
//! parameters its master weights stand for.

use super::{refuse, Checkpoint};
use crate::{
    config::StateFormat,
    error::Result,
    spec::lowbit::{Blockwise8, EXP_AVG_CODE, EXP_INF_CODE},
    state::Mode,
    storage::Storage,
};

impl Checkpoint {
    /// The same checkpoint with its moments in `format`: 8-bit state is decoded
    /// exactly to f32 (PyTorch's `exp_avg` and `exp_inf`, for a PyTorch optimizer or an
    /// f32-state run), and f32 state is encoded to 8 bits with round-to-nearest
    /// ([`Blockwise8::from_f32`]), deterministic. To 8 bits, each tensor takes the format
    /// the configuration's [`Precision::min_8bit_len`](crate::Precision::min_8bit_len)
    /// gives it (f32 below it, whatever its format was); to f32, every tensor is in f32. The parameter mode and the rest stay as they are; the
    /// result is validated.
    ///
    /// The 8-bit encoder keeps AdaMax's bound in the values it stores, so decoded state is
    /// state an f32 run can resume from.
    pub fn convert_state(&self, format: StateFormat) -> Result<Checkpoint> {
        self.validate()?;
        let mut ck = self.clone();
        ck.config.precision.state = format;
        for (t, f) in ck.tensors.iter_mut().zip(&mut ck.state_formats) {
            let to = ck.config.precision.tensor_state(t.len());
            match (std::mem::replace(f, to), to) {
                (StateFormat::Blockwise8, StateFormat::F32) => {
                    t.exp_avg = t.exp_avg_q8.to_f32(EXP_AVG_CODE);
                    t.exp_inf = t.exp_inf_q8.to_f32(EXP_INF_CODE);
                    t.exp_avg_q8 = Blockwise8::default();
                    t.exp_inf_q8 = Blockwise8::default();
                }
                (StateFormat::F32, StateFormat::Blockwise8) => {
                    t.exp_avg_q8 = Blockwise8::from_f32(EXP_AVG_CODE, &t.exp_avg);
                    t.exp_inf_q8 = Blockwise8::from_f32(EXP_INF_CODE, &t.exp_inf);
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
