//! The adapter on a CUDA device against the same adapter on the CPU (adamax-cuda's CPU
//! reference), bit for bit. Needs the `cuda` feature and a visible GPU; without either
//! every test is reported as ignored, never as passed.

use adamax_cuda_candle::{
    Adamax, AdamaxConfig, LossScaler, ParamMode, ParamsAdamax, Precision, StateFormat, StepOptions,
};
use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
use candle_nn::{Optimizer, VarMap};
use libtest_mimic::{Arguments, Trial};

mod common;
use common::{bits, host, model, Rng, R};

/// The same Vars on the GPU and on the CPU, and one optimizer for each.
struct Twin {
    gpu: Adamax,
    cpu: Adamax,
}

impl Twin {
    fn new(device: &Device, dtype: DType, params: ParamsAdamax) -> candle_core::Result<Self> {
        let vars = model(dtype, &Device::Cpu, &mut Rng(17))?;
        let on_gpu: Vec<Var> = vars
            .iter()
            .map(|v| Var::from_tensor(&v.as_tensor().to_device(device)?))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            gpu: Adamax::new(on_gpu, params.clone())?,
            cpu: Adamax::new(vars, params)?,
        })
    }

    /// One step of both from the same gradients (Var `skip` without one).
    fn step(&mut self, rng: &mut Rng, skip: Option<usize>) -> candle_core::Result<()> {
        let (mut g, mut c) = (GradStore::default(), GradStore::default());
        for (i, (gv, cv)) in self.gpu.vars().iter().zip(self.cpu.vars()).enumerate() {
            if Some(i) == skip {
                continue;
            }
            let t = Tensor::from_vec(rng.spread(cv.elem_count(), 8), cv.dims(), &Device::Cpu)?
                .to_dtype(cv.dtype())?;
            g.insert(gv.as_tensor(), t.to_device(gv.device())?);
            c.insert(cv.as_tensor(), t);
        }
        self.gpu.step(&g)?;
        self.cpu.step(&c)
    }

    fn same(&self, what: &str) -> R {
        for (i, (g, c)) in self.gpu.vars().iter().zip(self.cpu.vars()).enumerate() {
            let (g, c) = (
                g.as_tensor().to_dtype(DType::F32)?,
                c.as_tensor().to_dtype(DType::F32)?,
            );
            if bits(&host::<f32>(&g)?) != bits(&host::<f32>(&c)?) {
                return Err(format!("{what}: Var {i} differs between GPU and CPU").into());
            }
        }
        if self.gpu.checkpoint()? != self.cpu.checkpoint()? {
            return Err(format!("{what}: the state differs between GPU and CPU").into());
        }
        Ok(())
    }
}

/// Every dtype and precision mode, clipping, a Var without a gradient in some steps.
fn every_mode_matches_the_cpu(device: &Device) -> R {
    let modes = [
        (DType::F32, ParamMode::Master, StateFormat::F32),
        (DType::F32, ParamMode::Master, StateFormat::Blockwise8),
        (DType::F16, ParamMode::Master, StateFormat::F32),
        (DType::F16, ParamMode::Master, StateFormat::Blockwise8),
        (DType::BF16, ParamMode::Master, StateFormat::F32),
        (DType::BF16, ParamMode::Stochastic, StateFormat::F32),
        (DType::BF16, ParamMode::Master, StateFormat::Blockwise8),
        (DType::BF16, ParamMode::Stochastic, StateFormat::Blockwise8),
    ];
    for (dtype, params, state) in modes {
        let p = ParamsAdamax {
            config: AdamaxConfig {
                lr: 1e-2,
                weight_decay: 1e-2,
                precision: Precision {
                    params,
                    state,
                    seed: 5,
                    min_8bit_len: 0,
                },
                ..AdamaxConfig::default()
            },
            options: StepOptions {
                max_norm: Some(0.5),
                ..StepOptions::default()
            },
            ..ParamsAdamax::default()
        }
        .no_decay_for_vectors();
        let mut twin = Twin::new(device, dtype, p)?;
        let mut rng = Rng(3);
        for step in 0..5 {
            twin.step(&mut rng, (step % 2 == 1).then_some(2))?;
            twin.same(&format!("{dtype:?} {params:?} {state:?} step {step}"))?;
        }
    }
    Ok(())
}

/// A real backward pass on the GPU with the loss scaler, against the CPU.
fn backward_step_with_a_loss_scaler_matches_the_cpu(device: &Device) -> R {
    let params = ParamsAdamax {
        loss_scaler: Some(LossScaler {
            scale: 256.0,
            ..LossScaler::default()
        }),
        ..ParamsAdamax::with_lr(1e-2)
    };
    let mut twin = Twin::new(device, DType::F32, params)?;
    // An elementwise loss, so that both devices compute the same gradient bits
    // (2 w times the scale); a matrix product's would depend on the device's GEMM.
    for step in 0..4 {
        for opt in [&mut twin.gpu, &mut twin.cpu] {
            let w = opt.vars()[1].as_tensor().clone();
            let loss = w.sqr()?.sum_all()?;
            let loss = if step == 2 {
                (loss * f64::INFINITY)?
            } else {
                loss
            };
            opt.backward_step(&loss)?;
        }
        twin.same(&format!("loss-scaled step {step}"))?;
    }
    if !twin.gpu.checkpoint()?.tensors.iter().all(|t| t.step <= 3) {
        return Err("the overflowing step was counted".into());
    }
    Ok(())
}

/// A checkpoint saved from the GPU loads into a CPU optimizer of the same model whose
/// Vars come in another order (and back), by name.
fn checkpoints_move_between_devices_by_name(device: &Device) -> R {
    let dir = std::env::temp_dir().join(format!("adamax-candle-gpu-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("adamax.safetensors");
    let (gpu_map, cpu_map) = (VarMap::new(), VarMap::new());
    for (name, shape) in [("w", [64usize, 3]), ("b", [64, 1])] {
        let t = Tensor::from_vec(Rng(1).spread(shape[0] * shape[1], 2), &shape, &Device::Cpu)?;
        cpu_map
            .data()
            .lock()
            .unwrap()
            .insert(name.into(), Var::from_tensor(&t)?);
        gpu_map
            .data()
            .lock()
            .unwrap()
            .insert(name.into(), Var::from_tensor(&t.to_device(device)?)?);
    }
    let mut gpu = Adamax::from_varmap(&gpu_map, ParamsAdamax::default())?;
    let mut rng = Rng(4);
    let mut store = GradStore::default();
    for v in gpu.vars() {
        let g = Tensor::from_vec(rng.spread(v.elem_count(), 4), v.dims(), &Device::Cpu)?;
        store.insert(v.as_tensor(), g.to_device(device)?);
    }
    gpu.step(&store)?;
    gpu.save(&path)?;
    let mut vars = cpu_map.all_vars();
    vars.reverse();
    let mut cpu = Adamax::new(vars, ParamsAdamax::default())?;
    cpu.name_vars(&cpu_map)?;
    cpu.load(&path)?;
    let order: Vec<&str> = gpu.names().into_iter().flatten().collect();
    if cpu
        .checkpoint()?
        .reordered(&order)
        .map_err(|e| e.to_string())?
        != gpu.checkpoint()?
    {
        return Err("the state loaded on the CPU is not the GPU's".into());
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Vars on two devices are refused.
fn vars_on_two_devices_are_refused(device: &Device) -> R {
    let a = Var::zeros(4, DType::F32, device)?;
    let b = Var::zeros(4, DType::F32, &Device::Cpu)?;
    match Adamax::new(vec![a, b], ParamsAdamax::default()) {
        Err(e) if e.to_string().contains("one device") => Ok(()),
        other => Err(format!("expected a refusal, got {:?}", other.map(|_| ())).into()),
    }
}

/// A GPU test.
type Case = fn(&Device) -> R;

fn main() {
    let args = Arguments::from_args();
    let device = Device::new_cuda(0).ok();
    if device.is_none() {
        eprintln!("no CUDA device (or a build without the `cuda` feature): GPU tests are ignored");
    }
    let ignored = device.is_none();
    let cases: [(&str, Case); 4] = [
        ("every_mode_matches_the_cpu", every_mode_matches_the_cpu),
        (
            "backward_step_with_a_loss_scaler_matches_the_cpu",
            backward_step_with_a_loss_scaler_matches_the_cpu,
        ),
        (
            "checkpoints_move_between_devices_by_name",
            checkpoints_move_between_devices_by_name,
        ),
        (
            "vars_on_two_devices_are_refused",
            vars_on_two_devices_are_refused,
        ),
    ];
    let trials = cases
        .into_iter()
        .map(|(name, f)| {
            let device = device.clone();
            // Run anyway (`--include-ignored`) without a GPU, a test fails saying so
            // rather than comparing the CPU with itself.
            Trial::test(name, move || match &device {
                Some(d) => f(d).map_err(|e| e.to_string().into()),
                None => {
                    Err("no CUDA device visible (or a build without the `cuda` feature)".into())
                }
            })
            .with_ignored_flag(ignored)
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}
