//! The adapter on candle's CPU device, against adamax-cuda's CPU reference driven
//! directly (the crate's executable spec, itself checked against PyTorch, optax and
//! Keras in adamax-cuda's tests): same parameters and gradients in, same bits out.

use adamax_cuda::{cpu::CpuAdamax, Optimizer as _, Storage};
use adamax_cuda_candle::{
    AdamaxConfig, LossScaler, ParamGroup, ParamMode, ParamsAdamax, Precision, Select, StateFormat,
    StepOptions, TensorHyper, WeightDecayMode,
};
use candle_core::{backprop::GradStore, DType, Device, Tensor, Var, WithDType};
use candle_nn::{Optimizer, VarMap};

mod common;
use common::{bits, gradients, host, model, Rng, R};

/// `steps` steps of the adapter and of the CPU reference from the same values and
/// gradients (Var 2 without a gradient every third step), compared bit for bit after
/// each: the parameters and the whole state.
fn matches_reference<T: Storage + WithDType>(dtype: DType, params: ParamsAdamax) -> R {
    let mut rng = Rng(7);
    let vars = model(dtype, &Device::Cpu, &mut rng)?;
    let mut values: Vec<Vec<T>> = vars
        .iter()
        .map(|v| host(v.as_tensor()))
        .collect::<Result<_, _>>()?;
    let refs: Vec<&[T]> = values.iter().map(Vec::as_slice).collect();
    let mut reference = CpuAdamax::<T>::new(params.config, &refs)?;
    for (i, v) in vars.iter().enumerate() {
        if let Some(g) = params.groups.iter().find(|g| match &g.select {
            Select::MaxRank(n) => v.rank() <= *n,
            _ => false,
        }) {
            reference.set_tensor_hyper(i, g.hyper)?;
        }
    }
    reference.set_options(params.options)?;
    let mut opt = adamax_cuda_candle::Adamax::new(vars.clone(), params)?;
    for step in 0..6 {
        let (store, list) = gradients(&vars, &mut rng, |i| i == 2 && step % 3 == 1)?;
        opt.step(&store)?;
        let host_grads: Vec<Option<Vec<T>>> = list
            .iter()
            .map(|g| g.as_ref().map(host::<T>).transpose())
            .collect::<Result<_, _>>()?;
        let g: Vec<Option<&[T]>> = host_grads.iter().map(Option::as_deref).collect();
        let mut p: Vec<&mut [T]> = values.iter_mut().map(Vec::as_mut_slice).collect();
        reference.step_some(&mut p, &g)?;
        for (i, (v, want)) in vars.iter().zip(&values).enumerate() {
            let got = host::<T>(v.as_tensor())?;
            assert_eq!(bits(&got), bits(want), "{dtype:?} step {step} Var {i}");
        }
        assert_eq!(
            opt.checkpoint()?.tensors,
            reference.state()?,
            "{dtype:?} step {step}"
        );
        assert_eq!(opt.last_report()?, reference.last_report()?);
    }
    // Var 2 missed two of six steps: its own count says so (its bias correction).
    assert_eq!(opt.checkpoint()?.tensors[2].step, 4);
    Ok(())
}

/// Issue #21: every dtype and precision mode, parameter groups, decoupled decay and
/// clipping, with a Var that has no gradient in some steps, bit for bit with the CPU
/// reference.
#[test]
fn steps_match_the_cpu_reference_bit_for_bit_in_every_mode() -> R {
    let base = AdamaxConfig {
        lr: 1e-2,
        weight_decay: 1e-2,
        weight_decay_mode: WeightDecayMode::Decoupled,
        ..AdamaxConfig::default()
    };
    let with = |params: ParamMode, state: StateFormat| {
        ParamsAdamax {
            config: AdamaxConfig {
                precision: Precision {
                    params,
                    state,
                    seed: 11,
                    min_8bit_len: 0,
                },
                ..base
            },
            options: StepOptions {
                max_norm: Some(0.5),
                ..StepOptions::default()
            },
            ..ParamsAdamax::default()
        }
        .no_decay_for_vectors()
    };
    for state in [StateFormat::F32, StateFormat::Blockwise8] {
        matches_reference::<f32>(DType::F32, with(ParamMode::Master, state))?;
        matches_reference::<adamax_cuda::f16>(DType::F16, with(ParamMode::Master, state))?;
        for params in [ParamMode::Master, ParamMode::Stochastic] {
            matches_reference::<adamax_cuda::bf16>(DType::BF16, with(params, state))?;
        }
    }
    Ok(())
}

/// The README's claim, with a real backward pass: a model trained through
/// `backward_step`, the loss falls, and integer `Var`s are left alone.
#[test]
fn a_model_trains_through_backward_step() -> R {
    use candle_core::Module;
    let device = Device::Cpu;
    let varmap = VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let l1 = candle_nn::linear(2, 16, vb.pp("l1"))?;
    let l2 = candle_nn::linear(16, 1, vb.pp("l2"))?;
    let counter = Var::from_tensor(&Tensor::new(&[3u32], &device)?)?;
    let mut vars = varmap.all_vars();
    vars.push(counter.clone());
    let mut opt = adamax_cuda_candle::Adamax::new(vars, ParamsAdamax::with_lr(2e-2))?;
    assert_eq!(opt.vars().len(), 4);
    let x = Tensor::new(&[[0f32, 0.], [0., 1.], [1., 0.], [1., 1.]], &device)?;
    let y = Tensor::new(&[[0f32], [1.], [1.], [0.]], &device)?;
    let loss = |l1: &candle_nn::Linear, l2: &candle_nn::Linear| -> candle_core::Result<Tensor> {
        (l2.forward(&l1.forward(&x)?.tanh()?)? - &y)?
            .sqr()?
            .mean_all()
    };
    let first = loss(&l1, &l2)?.to_scalar::<f32>()?;
    for _ in 0..300 {
        opt.backward_step(&loss(&l1, &l2)?)?;
    }
    let last = loss(&l1, &l2)?.to_scalar::<f32>()?;
    assert!(last < first * 0.2, "loss {first} -> {last}");
    assert_eq!(counter.as_tensor().to_vec1::<u32>()?, [3]);
    assert_eq!(opt.step_count()?, 300);
    Ok(())
}

/// Parameter groups by rule and by name: a Var takes its first group's settings, the
/// config's otherwise; name rules need names.
#[test]
fn parameter_groups_select_by_rule_and_by_name() -> R {
    let device = Device::Cpu;
    let varmap = VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &device);
    candle_nn::linear(3, 4, vb.pp("enc"))?;
    candle_nn::embedding(10, 4, vb.pp("emb"))?;
    candle_nn::layer_norm(4, 1e-5, vb.pp("norm"))?;
    let slow = TensorHyper {
        lr_scale: 0.1,
        weight_decay: 0.0,
    };
    let params = ParamsAdamax {
        config: AdamaxConfig {
            weight_decay: 0.05,
            ..AdamaxConfig::default()
        },
        groups: vec![ParamGroup {
            select: Select::NameContains(vec!["emb".into()]),
            hyper: slow,
        }],
        ..ParamsAdamax::default()
    }
    .no_decay_for_vectors();
    let opt = adamax_cuda_candle::Adamax::from_varmap(&varmap, params.clone())?;
    let names: Vec<_> = opt.names().into_iter().flatten().collect();
    assert_eq!(
        names,
        [
            "emb.weight",
            "enc.bias",
            "enc.weight",
            "norm.bias",
            "norm.weight"
        ]
    );
    let decay = |wd| TensorHyper {
        lr_scale: 1.0,
        weight_decay: wd,
    };
    assert_eq!(
        opt.tensor_hypers(),
        [slow, decay(0.0), decay(0.05), decay(0.0), decay(0.0)]
    );
    // A name rule without names is refused, saying how to get them.
    let err = adamax_cuda_candle::Adamax::new(varmap.all_vars(), params).unwrap_err();
    assert!(err.to_string().contains("from_varmap"), "{err}");
    // A rule of one's own sees the name and the Var.
    let rule = ParamsAdamax {
        groups: vec![ParamGroup {
            select: Select::Rule(std::sync::Arc::new(|name, var| {
                name == Some("enc.weight") && var.dims() == [4, 3]
            })),
            hyper: slow,
        }],
        ..ParamsAdamax::default()
    };
    let opt = adamax_cuda_candle::Adamax::from_varmap(&varmap, rule)?;
    assert_eq!(opt.tensor_hypers()[2], slow);
    assert_eq!(opt.tensor_hypers()[1], decay(0.0));
    Ok(())
}

/// Issue #19, part 4: with 8-bit state, `Var`s under the size threshold keep f32 state,
/// a rule keeps a chosen `Var` in f32 by name, and every `Var` steps as the CPU
/// reference with the same formats does; a rule naming no `Var` is refused.
#[test]
fn state_formats_follow_the_size_rule_and_chosen_names() -> R {
    let device = Device::Cpu;
    let varmap = VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &device);
    candle_nn::linear(64, 80, vb.pp("enc"))?;
    candle_nn::embedding(100, 48, vb.pp("emb"))?;
    let config = AdamaxConfig {
        lr: 1e-2,
        precision: Precision {
            state: StateFormat::Blockwise8,
            seed: 3,
            min_8bit_len: 1000,
            ..Precision::default()
        },
        ..AdamaxConfig::default()
    };
    let params = ParamsAdamax::from(config)
        .with_state_format(Select::Names(vec!["emb.weight".into()]), StateFormat::F32);
    let mut opt = adamax_cuda_candle::Adamax::from_varmap(&varmap, params.clone())?;
    // emb.weight (4,800: chosen f32), enc.bias (80: under the threshold), enc.weight
    // (5,120: 8 bits).
    use StateFormat::{Blockwise8 as Q8, F32};
    assert_eq!(opt.tensor_state_formats(), [F32, F32, Q8]);
    let vars = opt.vars().to_vec();
    let mut values: Vec<Vec<f32>> = vars
        .iter()
        .map(|v| host(v.as_tensor()))
        .collect::<Result<_, _>>()?;
    let refs: Vec<&[f32]> = values.iter().map(Vec::as_slice).collect();
    let mut reference = CpuAdamax::<f32>::new(config, &refs)?;
    reference.set_tensor_state_format(0, F32)?;
    let mut rng = Rng(19);
    for step in 0..4 {
        let (store, list) = gradients(&vars, &mut rng, |_| false)?;
        opt.step(&store)?;
        let host_grads: Vec<Vec<f32>> = list
            .iter()
            .map(|g| host::<f32>(g.as_ref().expect("every Var has a gradient")))
            .collect::<Result<_, _>>()?;
        let g: Vec<&[f32]> = host_grads.iter().map(Vec::as_slice).collect();
        let mut p: Vec<&mut [f32]> = values.iter_mut().map(Vec::as_mut_slice).collect();
        reference.step(&mut p, &g)?;
        assert_eq!(opt.checkpoint()?.tensors, reference.state()?, "step {step}");
    }
    let ck = opt.checkpoint()?;
    assert_eq!(ck.state_formats, [F32, F32, Q8]);
    // Without the rule, emb.weight would be 8-bit: its checkpoint does not fit.
    let mut other = adamax_cuda_candle::Adamax::from_varmap(&varmap, ParamsAdamax::from(config))?;
    refused(other.restore(&ck), "cannot keep f32 state");
    let wrong = ParamsAdamax::from(config)
        .with_state_format(Select::Names(vec!["embedding".into()]), StateFormat::F32);
    refused(
        adamax_cuda_candle::Adamax::from_varmap(&varmap, wrong),
        "the state format rule Names([\"embedding\"]) names \"embedding\", which no Var has",
    );
    Ok(())
}

fn refused(result: candle_core::Result<impl std::fmt::Debug>, says: &str) {
    match result {
        Err(e) => assert!(e.to_string().contains(says), "`{e}` should say `{says}`"),
        Ok(v) => panic!("expected an error saying `{says}`, got {v:?}"),
    }
}

/// Hostile inputs: each is a candle error that says what to do, never a panic, and a
/// refused step changes nothing.
#[test]
fn bad_inputs_are_errors_that_change_nothing() -> R {
    let d = Device::Cpu;
    let f32v = |n: usize| Var::zeros(n, DType::F32, &d);
    let build = |vars: Vec<Var>| adamax_cuda_candle::Adamax::new(vars, ParamsAdamax::default());
    refused(
        build(vec![f32v(3)?, Var::zeros(3, DType::BF16, &d)?]),
        "one dtype",
    );
    refused(build(vec![Var::zeros(3, DType::F64, &d)?]), "F64");
    let v = f32v(3)?;
    refused(build(vec![v.clone(), v.clone()]), "Var 0 again");
    refused(
        adamax_cuda_candle::Adamax::new(vec![f32v(3)?], ParamsAdamax::with_lr(f64::NAN)),
        "lr",
    );

    let (a, b) = (Var::ones((2, 3), DType::F32, &d)?, f32v(4)?);
    let mut opt = build(vec![a.clone(), b.clone()])?;
    let step_with = |opt: &mut adamax_cuda_candle::Adamax, g: Tensor| {
        let mut store = GradStore::default();
        store.insert(a.as_tensor(), g);
        opt.step(&store)
    };
    refused(
        step_with(&mut opt, Tensor::ones((2, 3), DType::F16, &d)?),
        "dtype, shape and device",
    );
    refused(
        step_with(&mut opt, Tensor::ones((3, 2), DType::F32, &d)?),
        "[3, 2]",
    );
    assert_eq!(opt.step_count()?, 0);
    assert_eq!(a.as_tensor().to_vec2::<f32>()?, [[1.0; 3]; 2]);

    // A refused learning rate: every step refuses until a valid one is set.
    opt.set_learning_rate(-1.0);
    assert_eq!(opt.learning_rate(), 2e-3);
    refused(
        step_with(&mut opt, Tensor::ones((2, 3), DType::F32, &d)?),
        "learning rate -1 was refused",
    );
    assert_eq!(opt.step_count()?, 0);
    opt.set_learning_rate(1e-1);
    step_with(&mut opt, Tensor::ones((2, 3), DType::F32, &d)?)?;
    assert_eq!(opt.step_count()?, 1);
    assert_eq!(a.as_tensor().to_vec2::<f32>()?, [[0.9; 3]; 2]);
    // b had no gradient: untouched.
    assert_eq!(b.as_tensor().to_vec1::<f32>()?, [0.0; 4]);

    // Unnamed Vars cannot be saved by name.
    refused(
        opt.save(std::env::temp_dir().join("never.safetensors")),
        "has no name",
    );
    // A VarMap that does not hold the Vars.
    refused(opt.name_vars(&VarMap::new()), "not in the VarMap");

    // An optimizer with nothing to step steps nothing and says so where it matters.
    let mut empty = <adamax_cuda_candle::Adamax as Optimizer>::empty(ParamsAdamax::default())?;
    empty.step(&GradStore::default())?;
    empty.set_learning_rate(0.5);
    assert_eq!(empty.learning_rate(), 0.5);
    refused(
        empty.save(std::env::temp_dir().join("never.safetensors")),
        "no Var to step",
    );
    Ok(())
}

/// Issue #21: state saved by `VarMap` names resumes bit for bit in an optimizer whose
/// Vars come in another order; a file of another model is refused and changes nothing.
#[test]
fn checkpoints_follow_vars_by_name_across_reorderings() -> R {
    let dir = std::env::temp_dir().join(format!("adamax-candle-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("adamax.safetensors");
    let d = Device::Cpu;
    let varmap = VarMap::new();
    let mut rng = Rng(3);
    let names = ["b.weight", "a.weight", "c.bias"];
    let shapes: [&[usize]; 3] = [&[3, 4], &[3, 4], &[4]];
    {
        let mut data = varmap.data().lock().unwrap();
        for (n, s) in names.iter().zip(shapes) {
            let t = Tensor::from_vec(rng.spread(s.iter().product(), 2), s, &d)?;
            data.insert(n.to_string(), Var::from_tensor(&t)?);
        }
    }
    // f32 state: its step is deterministic. (The modes that round stochastically draw
    // their random bits by tensor position, so across a reordering they resume with
    // other, equally distributed, bits: see `stochastic_modes_resume_bit_for_bit_in_name_order`.)
    let params = ParamsAdamax {
        loss_scaler: Some(LossScaler::default()),
        ..ParamsAdamax::default()
    };
    let mut opt = adamax_cuda_candle::Adamax::from_varmap(&varmap, params.clone())?;
    for _ in 0..3 {
        let (store, _) = gradients(opt.vars(), &mut rng, |_| false)?;
        opt.step(&store)?;
    }
    opt.save(&path)?;
    varmap.save(dir.join("model.safetensors"))?;

    // Another process: the same Vars listed in another order, named from the VarMap.
    let mut vars = varmap.all_vars();
    vars.sort_by_key(|v| std::cmp::Reverse(v.dims().to_vec()));
    let mut other = adamax_cuda_candle::Adamax::new(vars, params.clone())?;
    other.name_vars(&varmap)?;
    assert_ne!(other.names(), opt.names());
    other.load(&path)?;
    let by_name = |o: &adamax_cuda_candle::Adamax| -> candle_core::Result<Vec<_>> {
        let ck = o.checkpoint()?;
        let mut v: Vec<_> = ck
            .names
            .iter()
            .cloned()
            .zip(ck.tensors.iter().cloned())
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(v)
    };
    assert_eq!(by_name(&other)?, by_name(&opt)?);
    assert_eq!(other.loss_scaler()?, opt.loss_scaler()?);
    // Both take the same next step.
    let (store, _) = gradients(opt.vars(), &mut rng, |_| false)?;
    let before: Vec<Tensor> = opt
        .vars()
        .iter()
        .map(|v| v.as_tensor().copy())
        .collect::<Result<_, _>>()?;
    opt.step(&store)?;
    let after_a: Vec<Vec<f32>> = opt
        .vars()
        .iter()
        .map(|v| host(v.as_tensor()))
        .collect::<Result<_, _>>()?;
    for (v, b) in opt.vars().iter().zip(&before) {
        v.set(b)?;
    }
    other.step(&store)?;
    let after_b: Vec<Vec<f32>> = opt
        .vars()
        .iter()
        .map(|v| host(v.as_tensor()))
        .collect::<Result<_, _>>()?;
    assert_eq!(after_a, after_b);
    assert_eq!(by_name(&other)?, by_name(&opt)?);

    // Another model's file (one Var renamed): refused, nothing changed.
    let renamed = VarMap::new();
    {
        let mut data = renamed.data().lock().unwrap();
        for (n, v) in varmap.data().lock().unwrap().iter() {
            let n = if n == "c.bias" {
                "c.shift".to_owned()
            } else {
                n.clone()
            };
            data.insert(n, v.clone());
        }
    }
    let mut third = adamax_cuda_candle::Adamax::from_varmap(&renamed, params)?;
    let fresh = third.checkpoint()?;
    refused(third.load(&path), "no tensor named \"c.shift\"");
    assert_eq!(third.checkpoint()?, fresh);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// The loss scaler through `backward_step`: the loss is scaled by the scale in force,
/// the step unscales (bit for bit with the CPU reference fed the same scaled
/// gradients), and a non-finite loss skips the step and backs the scale off.
#[test]
fn backward_step_scales_the_loss_and_skips_overflows() -> R {
    let d = Device::Cpu;
    let w = Var::from_tensor(&Tensor::new(&[0.5f32, -1.0, 2.0], &d)?)?;
    let scaler = LossScaler {
        scale: 1024.0,
        ..LossScaler::default()
    };
    let params = ParamsAdamax {
        loss_scaler: Some(scaler),
        ..ParamsAdamax::with_lr(1e-2)
    };
    let mut opt = adamax_cuda_candle::Adamax::new(vec![w.clone()], params.clone())?;
    let mut reference = CpuAdamax::<f32>::new(params.config, &[&[0.5, -1.0, 2.0]])?;
    reference.set_loss_scaler(Some(scaler))?;
    let x = Tensor::new(&[1f32, 2.0, 3.0], &d)?;
    let loss = (w.as_tensor() * &x)?.sum_all()?;
    let scaled_grads = (&loss * 1024.0)?.backward()?;
    let g = host::<f32>(scaled_grads.get(w.as_tensor()).unwrap())?;
    assert_eq!(g, [1024.0, 2048.0, 3072.0]);
    opt.backward_step(&loss)?;
    let mut p = vec![0.5f32, -1.0, 2.0];
    reference.step(&mut [&mut p], &[&g])?;
    assert_eq!(bits(&host::<f32>(w.as_tensor())?), bits(&p));
    assert_eq!(opt.checkpoint()?.tensors, reference.state()?);
    // An infinite loss: skipped, the scale halves, the Var is unchanged.
    let before = host::<f32>(w.as_tensor())?;
    opt.backward_step(&(loss * f64::INFINITY)?)?;
    assert!(opt.last_report()?.skipped);
    assert_eq!(opt.loss_scaler()?.map(|s| s.scale), Some(512.0));
    assert_eq!(host::<f32>(w.as_tensor())?, before);
    assert_eq!(opt.step_count()?, 1);
    Ok(())
}

/// 8-bit state and stochastic rounding draw their random bits by step, seed and tensor
/// position: optimizers built with `from_varmap` put the Vars in name order, so a run
/// resumed from a checkpoint continues bit for bit, in a new VarMap too.
#[test]
fn stochastic_modes_resume_bit_for_bit_in_name_order() -> R {
    let dir = std::env::temp_dir().join(format!("adamax-candle-sr-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("adamax.safetensors");
    let mut rng = Rng(5);
    let make = |rng: &mut Rng| -> candle_core::Result<VarMap> {
        let varmap = VarMap::new();
        let mut data = varmap.data().lock().unwrap();
        for (n, s) in [("z", [300usize]), ("a", [7]), ("m", [256])] {
            let t =
                Tensor::from_vec(rng.spread(s[0], 2), &s, &Device::Cpu)?.to_dtype(DType::BF16)?;
            data.insert(n.to_owned(), Var::from_tensor(&t)?);
        }
        drop(data);
        Ok(varmap)
    };
    let varmap = make(&mut rng)?;
    let params = ParamsAdamax::from(AdamaxConfig {
        precision: Precision {
            params: ParamMode::Stochastic,
            state: StateFormat::Blockwise8,
            seed: 9,
            min_8bit_len: 0,
        },
        ..AdamaxConfig::default()
    });
    let mut opt = adamax_cuda_candle::Adamax::from_varmap(&varmap, params.clone())?;
    let (store, _) = gradients(opt.vars(), &mut rng, |_| false)?;
    opt.step(&store)?;
    opt.save(&path)?;
    varmap.save(dir.join("model.safetensors"))?;
    // A new process: a new VarMap (other values), the saved weights loaded into it.
    let mut again = make(&mut Rng(99))?;
    again.load(dir.join("model.safetensors"))?;
    let mut resumed = adamax_cuda_candle::Adamax::from_varmap(&again, params)?;
    resumed.load(&path)?;
    for _ in 0..3 {
        let (a, list) = gradients(opt.vars(), &mut rng, |_| false)?;
        let mut b = GradStore::default();
        for (v, g) in resumed.vars().iter().zip(&list) {
            b.insert(v.as_tensor(), g.clone().unwrap());
        }
        opt.step(&a)?;
        resumed.step(&b)?;
    }
    for (x, y) in opt.vars().iter().zip(resumed.vars()) {
        assert_eq!(
            bits(&host::<adamax_cuda::bf16>(x.as_tensor())?),
            bits(&host::<adamax_cuda::bf16>(y.as_tensor())?)
        );
    }
    assert_eq!(opt.checkpoint()?, resumed.checkpoint()?);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A value written into a 16-bit Var after the optimizer was built (pretrained weights
/// loaded into the VarMap, a clamp) is overwritten by the next step from the masters,
/// as documented; `sync_masters` makes the masters take it (and only them), and the
/// next step is then the CPU reference's from that state.
#[test]
fn sync_masters_takes_values_written_into_16_bit_vars() -> R {
    use adamax_cuda::bf16;
    let d = Device::Cpu;
    let mut varmap = VarMap::new();
    let w = varmap.get(4, "w", candle_nn::Init::Const(0.0), DType::BF16, &d)?;
    let mut opt = adamax_cuda_candle::Adamax::from_varmap(&varmap, ParamsAdamax::with_lr(1e-2))?;
    let loaded = Tensor::new(&[1f32, 2.0, 3.0, 4.0], &d)?.to_dtype(DType::BF16)?;
    let g = Tensor::new(&[0.5f32, -0.5, 0.25, 0.0], &d)?.to_dtype(DType::BF16)?;
    let mut grads = GradStore::default();
    grads.insert(&w, g.clone());
    varmap.set_one("w", &loaded)?;
    opt.step(&grads)?;
    // The masters held 0: the Var is back near 0, the write lost (documented).
    assert!(host::<bf16>(&w)?.iter().all(|x| x.to_f32().abs() < 0.1));
    let moments = opt.checkpoint()?.tensors[0].clone();
    varmap.set_one("w", &loaded)?;
    opt.sync_masters()?;
    let synced = opt.checkpoint()?;
    assert_eq!(synced.tensors[0].master, [1.0, 2.0, 3.0, 4.0]);
    assert_eq!(synced.tensors[0].exp_avg, moments.exp_avg);
    assert_eq!(synced.tensors[0].exp_inf, moments.exp_inf);
    assert_eq!(synced.step, 1);
    // The next step, against the CPU reference restored from that state.
    let mut reference = CpuAdamax::<bf16>::new(synced.config, &[&[bf16::ZERO; 4]])?;
    reference.restore(&synced)?;
    let mut p = host::<bf16>(&loaded)?;
    reference.step(&mut [&mut p], &[&host::<bf16>(&g)?])?;
    opt.step(&grads)?;
    assert_eq!(bits(&host::<bf16>(&w)?), bits(&p));
    assert_eq!(opt.checkpoint()?.tensors, reference.state()?);
    // f32 Vars have no master: nothing to do.
    let f32_map = VarMap::new();
    f32_map.get(3, "v", candle_nn::Init::Const(1.0), DType::F32, &d)?;
    adamax_cuda_candle::Adamax::from_varmap(&f32_map, ParamsAdamax::default())?.sync_masters()?;
    Ok(())
}

/// Fixes after a hostile review: a step with no gradient at all changes nothing (count,
/// scaler); `name_vars` is all or nothing and refuses a Var under two names; a
/// checkpoint of another shape is refused by `load` and `restore`; `inv_scale` with a
/// loss scaler is refused; an optimizer without Vars still validates its settings; a
/// group naming no Var is refused; a restore clears a refused learning rate.
#[test]
fn hostile_review_findings_stay_fixed() -> R {
    let d = Device::Cpu;
    let dir = std::env::temp_dir().join(format!("adamax-candle-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let varmap = VarMap::new();
    let w = varmap.get((2, 3), "w", candle_nn::Init::Const(1.0), DType::F32, &d)?;
    let scaler = LossScaler {
        growth_interval: 1,
        ..LossScaler::default()
    };
    let params = ParamsAdamax {
        loss_scaler: Some(scaler),
        ..ParamsAdamax::default()
    };
    let mut opt = adamax_cuda_candle::Adamax::from_varmap(&varmap, params.clone())?;
    // No gradient anywhere: nothing happens.
    opt.backward_step(&Tensor::new(5f32, &d)?)?;
    opt.step(&GradStore::default())?;
    assert_eq!(opt.step_count()?, 0);
    assert_eq!(opt.loss_scaler()?, Some(scaler));
    assert_eq!(w.to_vec2::<f32>()?, [[1.0; 3]; 2]);

    // inv_scale beside a scaler, at build and through the setters.
    let both = StepOptions {
        inv_scale: Some(0.5),
        ..StepOptions::default()
    };
    refused(
        adamax_cuda_candle::Adamax::from_varmap(
            &varmap,
            ParamsAdamax {
                options: both,
                ..params.clone()
            },
        ),
        "leave inv_scale None",
    );
    refused(opt.set_options(both), "leave inv_scale None");
    // Without Vars, settings are still checked.
    let nan_clip = ParamsAdamax {
        options: StepOptions {
            max_norm: Some(f32::NAN),
            ..StepOptions::default()
        },
        ..ParamsAdamax::default()
    };
    refused(
        adamax_cuda_candle::Adamax::new(vec![], nan_clip),
        "max_norm",
    );
    // A group naming a Var the model does not have (a typo).
    let typo = ParamsAdamax {
        groups: vec![ParamGroup {
            select: Select::Names(vec!["W".into()]),
            hyper: TensorHyper {
                lr_scale: 1.0,
                weight_decay: 0.0,
            },
        }],
        ..ParamsAdamax::default()
    };
    refused(
        adamax_cuda_candle::Adamax::from_varmap(&varmap, typo),
        "which no Var has",
    );

    // name_vars: a Var under two names is refused, and a refusal changes nothing.
    let twice = VarMap::new();
    {
        let mut data = twice.data().lock().unwrap();
        data.insert("a".into(), Var::from_tensor(&w)?);
        data.insert("b".into(), Var::from_tensor(&w)?);
    }
    refused(opt.name_vars(&twice), "two names, \"a\" and \"b\"");
    let bad = VarMap::new();
    bad.data()
        .lock()
        .unwrap()
        .insert(String::new(), Var::from_tensor(&w)?);
    refused(opt.name_vars(&bad), "is empty");
    assert_eq!(opt.names(), [Some("w")]);

    // A checkpoint of another shape (same length) is refused by load and restore.
    opt.backward_step(&w.sqr()?.sum_all()?)?;
    let path = dir.join("adamax.safetensors");
    opt.save(&path)?;
    let other = VarMap::new();
    other.get((3, 2), "w", candle_nn::Init::Const(1.0), DType::F32, &d)?;
    let mut transposed = adamax_cuda_candle::Adamax::from_varmap(&other, params.clone())?;
    let before = transposed.checkpoint()?;
    refused(
        transposed.load(&path),
        "has shape [2, 3] but the Var has [3, 2]",
    );
    refused(transposed.restore(&opt.checkpoint()?), "has shape [2, 3]");
    assert_eq!(transposed.checkpoint()?, before);
    // A 1-D file (written without shapes) fits any Var of its length.
    let mut flat = opt.checkpoint()?;
    flat.shapes = vec![vec![6]];
    flat.names = vec![None];
    transposed.restore(&flat)?;
    assert_eq!(transposed.checkpoint()?.shapes, [vec![3, 2]]);

    // A restore clears a refused learning rate (the file's is in force).
    transposed.set_learning_rate(f64::NAN);
    transposed.load(dir.join("adamax.safetensors")).unwrap_err(); // other shape, refused
    transposed.restore(&flat)?;
    assert_eq!(transposed.learning_rate(), 2e-3);
    transposed.backward_step(&other.all_vars()[0].as_tensor().sum_all()?)?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
