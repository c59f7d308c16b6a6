//! The CPU optimizer: [`CpuAdamax`], the crate's spec ([`crate::spec`]) applied tensor by
//! tensor on the host. It is the reference the GPU is compared with bit for bit, and a
//! CPU fallback with the same API ([`crate::Optimizer`]).

mod optimizer;

pub use optimizer::CpuAdamax;
#[doc(hidden)]
pub use optimizer::Exchange;

use crate::{
    config::{ParamMode, Precision, StateFormat},
    error::{Error, Result},
    spec::{
        lowbit::{self, EXP_AVG_CODE, EXP_INF_CODE, QBLOCK},
        update, StepScalars,
    },
    state::{parts::Part, Mode, TensorState},
    storage::Storage,
};

/// Steps one tensor in place with the scalars of one step, in `precision`'s storage
/// modes, in the state format it gives the tensor (the state must have been made for
/// it, see [`TensorState::with_precision`]).
/// Lengths are checked first; nothing is written when they disagree. The step taken is
/// the tensor's `state.step + 1` (the caller counts it).
#[doc(hidden)]
pub fn step_tensor<T: Storage>(
    s: &StepScalars,
    precision: &Precision,
    tensor: usize,
    param: &mut [T],
    grad: &[T],
    state: &mut TensorState,
) -> Result<()> {
    step_tensor_with(s, precision, (tensor, 0), param, grad, state, |g| g)
}

/// [`step_tensor`] with the gradient passed through `grad_map` first (unscaling and
/// clipping, in [`crate::fused`]'s order), for elements `element..` of tensor `tensor`
/// of the whole list (a piece of a shard: the random stream draws by the whole
/// tensor's index and element; `(i, 0)` for a whole tensor `i`).
pub(crate) fn step_tensor_with<T: Storage>(
    s: &StepScalars,
    precision: &Precision,
    (tensor, element): (usize, usize),
    param: &mut [T],
    grad: &[T],
    state: &mut TensorState,
    grad_map: impl Fn(f32) -> f32,
) -> Result<()> {
    precision.check_storage(T::TYPE)?;
    let n = param.len();
    let precision = &precision.for_len(n);
    let mode = Mode::or_master(T::TYPE, precision);
    if grad.len() != n {
        return Err(Error::LengthMismatch {
            what: "grad",
            tensor,
            expected: n,
            found: grad.len(),
        });
    }
    // Each part's expected length: its own in the parts of the mode, none in the others.
    for part in Part::ALL {
        let expected = if mode.parts.contains(&part) {
            part.len(n)
        } else {
            0
        };
        let found = part.view(state).len();
        if found != expected {
            return Err(Error::LengthMismatch {
                what: part.name(),
                tensor,
                expected,
                found,
            });
        }
    }
    let q8 = precision.state == StateFormat::Blockwise8;
    let blocks = n.div_ceil(QBLOCK);
    let key = lowbit::stream_key(precision.seed, state.step.wrapping_add(1), tensor as u64);
    let stochastic = precision.params == ParamMode::Stochastic;
    let has_master = mode.has_master();
    // One element: read the parameter (the master when there is one), step, write it;
    // returns m (with f32 state) or the ratio m / den (with 8-bit state), and u.
    let mut element = |i: usize, master: &mut [f32], m: f32, u: f32| -> (f32, f32, u64) {
        let bits = if precision.is_random() {
            lowbit::element_bits(key, (element + i) as u64)
        } else {
            0
        };
        let p = if has_master {
            master[i]
        } else {
            param[i].to_f32()
        };
        let e = update(s, p, grad_map(grad[i].to_f32()), m, u);
        if stochastic {
            param[i] = T::from_f32(
                lowbit::round_bf16_stochastic(e.param, lowbit::param_bits(bits)).to_f32(),
            );
        } else {
            if has_master {
                master[i] = e.param;
            }
            param[i] = T::from_f32(e.param);
        }
        (if q8 { e.ratio } else { e.exp_avg }, e.exp_inf, bits)
    };
    let TensorState {
        exp_avg,
        exp_inf,
        master,
        exp_avg_q8,
        exp_inf_q8,
        ..
    } = state;
    if !q8 {
        for i in 0..n {
            (exp_avg[i], exp_inf[i], _) = element(i, master, exp_avg[i], exp_inf[i]);
        }
        return Ok(());
    }
    let (mut ratio, mut u, mut bits) = ([0f32; QBLOCK], [0f32; QBLOCK], [0u64; QBLOCK]);
    for b in 0..blocks {
        let range = b * QBLOCK..n.min((b + 1) * QBLOCK);
        let len = range.len();
        for (j, i) in range.clone().enumerate() {
            let u0 = EXP_INF_CODE.decode(exp_inf_q8.codes[i], exp_inf_q8.scales[b]);
            let r0 = EXP_AVG_CODE.decode(exp_avg_q8.codes[i], exp_avg_q8.scales[b]);
            let m0 = lowbit::exp_avg_of(r0, u0, s.eps, s.eps_mode);
            (ratio[j], u[j], bits[j]) = element(i, master, m0, u0);
        }
        (exp_avg_q8.scales[b], exp_inf_q8.scales[b]) = lowbit::encode_moments(
            &ratio[..len],
            &u[..len],
            &mut exp_avg_q8.codes[range.clone()],
            &mut exp_inf_q8.codes[range],
            s.eps,
            s.eps_mode,
            |j| bits[j],
        );
    }
    Ok(())
}
