//! candle trains a small MLP (three linear layers, two layer norms) on a three-arm
//! spiral with a held-out test set, on the GPU, in f32 and in bf16 with f32 master
//! weights. The optimizer is adamax-cuda-candle's `Adamax`, a `candle_nn::Optimizer`:
//! every parameter stepped in one launch per step on candle's own stream, biases and
//! norm parameters without weight decay (`no_decay_for_vectors`). The first step of
//! each run is checked bit for bit against the same optimizer on candle's CPU device
//! (adamax-cuda's CPU reference), from the same parameters and gradients.
//!
//! Build it with `scripts/candle_adapter.sh spiral` (candle's CUDA backend needs nvcc
//! and the CUDA libraries at build time; the script takes them from PyPI). Run the
//! binary on a machine with an NVIDIA GPU, with CUDA 13's cuBLAS, cuRAND, cudart and
//! NVRTC on the loader path.

use adamax_cuda_candle::{Adamax, AdamaxConfig, ParamsAdamax};
use candle_core::{backprop::GradStore, DType, Device, Tensor, Var, D};
use candle_nn::Optimizer;
use indicatif::{ProgressBar, ProgressStyle};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const IN: usize = 2;
const HIDDEN: usize = 64;
const CLASSES: usize = 3;
const TRAIN_PER_CLASS: usize = 800;
const TEST_PER_CLASS: usize = 200;
const EPOCHS: usize = 30;
const BATCH: usize = 128;

/// A small deterministic generator (splitmix64): the data and the shuffles repeat.
struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform().max(1e-7), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}

/// A three-arm spiral: points (x, y) and their arm.
fn spiral(rng: &mut Rng, per_class: usize) -> (Vec<f32>, Vec<u32>) {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for class in 0..CLASSES {
        for i in 0..per_class {
            let r = i as f32 / per_class as f32;
            let t = class as f32 * 2.1 + r * 4.0 + rng.normal() * 0.2;
            x.extend([r * t.sin(), r * t.cos()]);
            y.push(class as u32);
        }
    }
    (x, y)
}

/// The model's parameters, candle `Var`s: weights, biases, norm gains and shifts.
struct Model {
    vars: Vec<Var>,
}

impl Model {
    fn new(dtype: DType, device: &Device, rng: &mut Rng) -> Result<Self> {
        let mut vars = Vec::new();
        for (inputs, outputs, norm) in [
            (IN, HIDDEN, true),
            (HIDDEN, HIDDEN, true),
            (HIDDEN, CLASSES, false),
        ] {
            let std = (2.0 / inputs as f32).sqrt();
            let w: Vec<f32> = (0..inputs * outputs).map(|_| rng.normal() * std).collect();
            vars.push(Var::from_tensor(
                &Tensor::from_vec(w, (outputs, inputs), device)?.to_dtype(dtype)?,
            )?);
            vars.push(Var::zeros(outputs, dtype, device)?);
            if norm {
                vars.push(Var::ones(outputs, dtype, device)?); // gain
                vars.push(Var::zeros(outputs, dtype, device)?); // shift
            }
        }
        Ok(Self { vars })
    }

    /// Logits (f32) of a batch `x` of shape [n, IN]; computed in f32 whatever the
    /// parameters' type (candle casts the gradients back to it).
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let p: Vec<Tensor> = self
            .vars
            .iter()
            .map(|v| v.as_tensor().to_dtype(DType::F32))
            .collect::<candle_core::Result<_>>()?;
        let linear = |x: &Tensor, w: &Tensor, b: &Tensor| x.matmul(&w.t()?)?.broadcast_add(b);
        let norm = |x: &Tensor, g: &Tensor, s: &Tensor| -> candle_core::Result<Tensor> {
            let mean = x.mean_keepdim(D::Minus1)?;
            let centred = x.broadcast_sub(&mean)?;
            let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
            centred
                .broadcast_div(&(var + 1e-5)?.sqrt()?)?
                .broadcast_mul(g)?
                .broadcast_add(s)
        };
        let h = norm(&linear(x, &p[0], &p[1])?, &p[2], &p[3])?.relu()?;
        let h = norm(&linear(&h, &p[4], &p[5])?, &p[6], &p[7])?.relu()?;
        linear(&h, &p[8], &p[9])
    }
}

/// The bits of every element of `vars`, as f32.
fn bits(vars: &[Var]) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    for v in vars {
        let values = v
            .as_tensor()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        out.extend(values.iter().map(|x| x.to_bits()));
    }
    Ok(out)
}

/// The same optimizer on candle's CPU device, over a copy of `vars`, stepped from a
/// copy of `grads`: adamax-cuda's CPU reference, which the GPU must match bit for bit.
fn cpu_twin(vars: &[Var], grads: &GradStore, params: ParamsAdamax) -> Result<(Vec<Var>, Adamax)> {
    let host: Vec<Var> = vars
        .iter()
        .map(|v| Var::from_tensor(&v.as_tensor().to_device(&Device::Cpu)?))
        .collect::<candle_core::Result<_>>()?;
    let mut store = GradStore::default();
    for (v, h) in vars.iter().zip(&host) {
        if let Some(g) = grads.get(v.as_tensor()) {
            store.insert(h.as_tensor(), g.to_device(&Device::Cpu)?);
        }
    }
    let mut cpu = Adamax::new(host.clone(), params)?;
    cpu.step(&store)?;
    Ok((host, cpu))
}

/// Trains one run; returns the loss of every epoch and the final test accuracy.
fn train(
    name: &str,
    dtype: DType,
    device: &Device,
    data: &(Tensor, Tensor, Tensor, Tensor),
) -> Result<(Vec<f32>, f32)> {
    let (x_train, y_train, x_test, y_test) = data;
    let mut rng = Rng(7);
    let model = Model::new(dtype, device, &mut rng)?;
    let params = ParamsAdamax::from(AdamaxConfig {
        lr: 1e-2,
        weight_decay: 1e-4,
        ..AdamaxConfig::default()
    })
    .no_decay_for_vectors();
    let mut opt = Adamax::new(model.vars.clone(), params.clone())?;
    let n = y_train.dim(0)?;
    let bar = ProgressBar::new(EPOCHS as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} epochs  {msg}")?
            .progress_chars("=> "),
    );
    bar.set_prefix(name.to_owned());
    let (mut losses, mut accuracy) = (Vec::new(), 0.0);
    let mut checked = false;
    for epoch in 1..=EPOCHS {
        let mut order: Vec<u32> = (0..n as u32).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        let (mut total, mut batches) = (0.0f32, 0);
        for chunk in order.chunks(BATCH) {
            let idx = Tensor::from_slice(chunk, chunk.len(), device)?;
            let (xb, yb) = (
                x_train.index_select(&idx, 0)?,
                y_train.index_select(&idx, 0)?,
            );
            let loss = candle_nn::loss::cross_entropy(&model.forward(&xb)?, &yb)?;
            let grads = loss.backward()?;
            // The first step against the CPU reference, bit for bit.
            let expected = (!checked)
                .then(|| cpu_twin(&model.vars, &grads, params.clone()))
                .transpose()?;
            opt.step(&grads)?;
            if let Some((expected, cpu)) = expected {
                if bits(&model.vars)? != bits(&expected)?
                    || opt.checkpoint()?.tensors != cpu.checkpoint()?.tensors
                {
                    return Err(
                        format!("{name}: the GPU step differs from the CPU reference").into(),
                    );
                }
                // Printed past the bar (`bar.println` prints nothing where the bar is
                // hidden, as in a log), so that a log shows the check ran.
                bar.suspend(|| eprintln!("{name:>10}  first step == CPU reference, bit for bit"));
                checked = true;
            }
            total += loss.to_scalar::<f32>()?;
            batches += 1;
        }
        let loss = total / batches as f32;
        let predicted = model.forward(x_test)?.argmax(D::Minus1)?;
        let correct = predicted
            .eq(y_test)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?;
        accuracy = correct / y_test.dim(0)? as f32;
        bar.println(format!(
            "{name:>10}  epoch {epoch:>2}  loss {loss:.4}  test accuracy {:.1}%",
            100.0 * accuracy
        ));
        bar.set_message(format!("loss {loss:.4}"));
        bar.inc(1);
        losses.push(loss);
    }
    bar.finish_and_clear();
    Ok((losses, accuracy))
}

fn main() -> Result<()> {
    let device = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            println!("this example needs an NVIDIA GPU: {e}");
            return Ok(());
        }
    };
    let mut rng = Rng(2026);
    let (xt, yt) = spiral(&mut rng, TRAIN_PER_CLASS);
    let (xe, ye) = spiral(&mut rng, TEST_PER_CLASS);
    let data = (
        Tensor::from_vec(xt, (CLASSES * TRAIN_PER_CLASS, IN), &device)?,
        Tensor::from_vec(yt, CLASSES * TRAIN_PER_CLASS, &device)?,
        Tensor::from_vec(xe, (CLASSES * TEST_PER_CLASS, IN), &device)?,
        Tensor::from_vec(ye, CLASSES * TEST_PER_CLASS, &device)?,
    );
    let (f32_losses, f32_acc) = train("f32", DType::F32, &device, &data)?;
    let (bf16_losses, bf16_acc) = train("bf16", DType::BF16, &device, &data)?;
    println!("| run | first-epoch loss | last-epoch loss | test accuracy |");
    println!("| --- | --- | --- | --- |");
    for (name, l, a) in [
        ("f32", &f32_losses, f32_acc),
        ("bf16 + f32 master", &bf16_losses, bf16_acc),
    ] {
        println!(
            "| {name} | {:.4} | {:.4} | {:.1}% |",
            l[0],
            l[EPOCHS - 1],
            100.0 * a
        );
    }
    if f32_acc < 0.95 || bf16_acc < 0.95 {
        return Err("a run ended below 95% test accuracy".into());
    }
    Ok(())
}
