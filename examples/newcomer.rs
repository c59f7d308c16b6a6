//! A first training program, on the CPU: `cargo run --example newcomer` (a few seconds,
//! no GPU, no CUDA).
//!
//! A small MLP (2 -> 32 -> 3, ReLU, softmax cross-entropy) learns a three-arm spiral,
//! with its forward and backward passes written out in plain Rust. What it takes from
//! this crate, in the order a training loop meets it:
//!
//! - two parameter groups, named by tensor index: the weights with decoupled weight
//!   decay, the biases without ([`TensorHyper::no_decay`]);
//! - gradient clipping as a setting made once ([`StepOptions`]' `max_norm`), not a call
//!   before each step; and no `zero_grad`, since a step only reads the gradients;
//! - a learning-rate schedule (warm-up, then cosine decay) through [`Optimizer::set_lr`];
//! - a checkpoint saved mid-run, then a fresh optimizer that loads and restores it. A
//!   checkpoint holds the optimizer's state, not the parameters, so the program saves
//!   those itself, as a training program saves its model. The resumed run must end with
//!   the parameters of an unbroken run, bit for bit, or the program fails.
//!
//! With a GPU the same calls run on `cuda::CudaAdamax` (they are the [`Optimizer`]
//! trait's), with device buffers in place of the vectors.

use std::{error::Error, fs, ops::Range, path::Path};

use adamax_cuda::{
    cpu::CpuAdamax, AdamaxConfig, Checkpoint, Optimizer, StepOptions, TensorHyper, WeightDecayMode,
};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

const IN: usize = 2;
const HIDDEN: usize = 32;
const CLASSES: usize = 3;
const PER_CLASS: usize = 100;
const BATCH: usize = 30;
const EPOCHS: usize = 100;
/// The unbroken run is interrupted here, in the second run.
const CHECKPOINT_AT: usize = 37;

/// The tensors, by their index in the list the optimizer is built with.
const W1: usize = 0;
const B1: usize = 1;
const W2: usize = 2;
const B2: usize = 3;
const BIASES: [usize; 2] = [B1, B2];

const BASE_LR: f64 = 3e-2;
const MAX_NORM: f32 = 0.5;
const WARMUP_STEPS: usize = 20;

fn main() -> Result<()> {
    let (xs, ys) = spiral(7);
    let dir = std::env::temp_dir();
    let run = format!("adamax-cuda-newcomer-{}", std::process::id());
    let ck_path = dir.join(format!("{run}.safetensors"));
    let model_path = dir.join(format!("{run}-model.bin"));

    println!("The unbroken run:");
    let mut params = init_params(1);
    let mut opt = new_optimizer(&params)?;
    train(&mut opt, &mut params, &xs, &ys, 0..EPOCHS, true)?;
    let accuracy = accuracy(&params, &xs, &ys);
    println!("training accuracy {:.1}%", 100.0 * accuracy);
    if accuracy < 0.9 {
        return Err(format!("the MLP did not learn the spiral ({accuracy:.3})").into());
    }
    let unbroken = params;

    println!("\nThe same run, saved after epoch {CHECKPOINT_AT} and resumed:");
    let mut params = init_params(1);
    let mut opt = new_optimizer(&params)?;
    train(&mut opt, &mut params, &xs, &ys, 0..CHECKPOINT_AT, false)?;
    opt.save_checkpoint(&ck_path)?;
    save_model(&model_path, &params)?; // the checkpoint does not hold the parameters
    let lens = opt.tensor_lens().to_vec();
    drop((opt, params));

    // A fresh process would start here.
    let mut params = load_model(&model_path, &lens)?;
    let ck = Checkpoint::load(&ck_path)?;
    let refs: Vec<&[f32]> = params.iter().map(Vec::as_slice).collect();
    let mut opt = CpuAdamax::new(ck.config, &refs)?;
    // Brings back the moments, step count, groups, clipping and learning rate.
    opt.restore(&ck)?;
    println!("restored at step {}", opt.step_count()?);
    train(
        &mut opt,
        &mut params,
        &xs,
        &ys,
        CHECKPOINT_AT..EPOCHS,
        false,
    )?;
    for path in [&ck_path, &model_path] {
        fs::remove_file(path)?;
    }

    let bits = |p: &[Vec<f32>]| -> Vec<u32> { p.iter().flatten().map(|x| x.to_bits()).collect() };
    let (a, b) = (bits(&unbroken), bits(&params));
    if a != b {
        let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        return Err(format!(
            "the resumed run differs from the unbroken one in {differ} of {} parameters",
            a.len()
        )
        .into());
    }
    println!(
        "the resumed run equals the unbroken one bit for bit ({} parameters)",
        a.len()
    );
    Ok(())
}

/// The optimizer and its settings; a restore brings all of them back from a checkpoint.
fn new_optimizer(params: &[Vec<f32>]) -> Result<CpuAdamax<f32>> {
    let config = AdamaxConfig {
        lr: BASE_LR,
        weight_decay: 1e-2,
        weight_decay_mode: WeightDecayMode::Decoupled,
        ..AdamaxConfig::default()
    };
    let refs: Vec<&[f32]> = params.iter().map(Vec::as_slice).collect();
    let mut opt = CpuAdamax::new(config, &refs)?;
    // The second group: biases take no weight decay. The weights keep the config's.
    for i in BIASES {
        opt.set_tensor_hyper(i, TensorHyper::no_decay())?;
    }
    // Clip the global gradient norm (PyTorch's clip_grad_norm_) in every step.
    opt.set_options(StepOptions {
        max_norm: Some(MAX_NORM),
        ..StepOptions::default()
    })?;
    Ok(opt)
}

/// Warm-up over the first steps, then cosine decay to a tenth of the base rate.
fn lr_at(step: usize, total: usize) -> f64 {
    if step < WARMUP_STEPS {
        return BASE_LR * (step + 1) as f64 / WARMUP_STEPS as f64;
    }
    let progress = (step - WARMUP_STEPS) as f64 / (total - WARMUP_STEPS) as f64;
    BASE_LR * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))
}

/// Mini-batch training over `epochs`.
fn train(
    opt: &mut CpuAdamax<f32>,
    params: &mut [Vec<f32>],
    xs: &[[f32; IN]],
    ys: &[usize],
    epochs: Range<usize>,
    verbose: bool,
) -> Result<()> {
    let batches = xs.len().div_ceil(BATCH);
    let mut grads: Vec<Vec<f32>> = params.iter().map(|p| vec![0.0; p.len()]).collect();
    let mut clipped = 0;
    for epoch in epochs {
        // The order depends on the epoch alone, so a resumed run sees the batches an
        // unbroken one sees (a real program saves its data loader's position too).
        let order = shuffled(xs.len(), 1000 + epoch as u64);
        let mut total = 0.0;
        for (b, batch) in order.chunks(BATCH).enumerate() {
            let bx: Vec<[f32; IN]> = batch.iter().map(|&i| xs[i]).collect();
            let by: Vec<usize> = batch.iter().map(|&i| ys[i]).collect();
            total += loss_and_grads(params, &bx, &by, &mut grads) * batch.len() as f32;
            opt.set_lr(lr_at(epoch * batches + b, EPOCHS * batches))?;
            let mut p: Vec<&mut [f32]> = params.iter_mut().map(Vec::as_mut_slice).collect();
            let g: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
            opt.step(&mut p, &g)?;
            // What the step did: the gradient norm and the factor clipping applied.
            clipped += usize::from(opt.last_report()?.clip_coef < 1.0);
        }
        if verbose && (epoch + 1) % 20 == 0 {
            println!(
                "epoch {:>3}: loss {:.4}, lr {:.4}; {clipped} of the last {} steps clipped to norm {MAX_NORM}",
                epoch + 1,
                total / xs.len() as f32,
                opt.config().lr,
                20 * batches,
            );
            clipped = 0;
        }
    }
    Ok(())
}

/// Hidden activations (ReLU) and class probabilities of one input.
fn forward(p: &[Vec<f32>], x: &[f32; IN]) -> (Vec<f32>, Vec<f32>) {
    let hidden: Vec<f32> = (0..HIDDEN)
        .map(|j| {
            let w = &p[W1][j * IN..(j + 1) * IN];
            (p[B1][j] + w[0] * x[0] + w[1] * x[1]).max(0.0)
        })
        .collect();
    let logits: Vec<f32> = (0..CLASSES)
        .map(|c| {
            let w = &p[W2][c * HIDDEN..(c + 1) * HIDDEN];
            p[B2][c] + w.iter().zip(&hidden).map(|(a, h)| a * h).sum::<f32>()
        })
        .collect();
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    (hidden, exp.iter().map(|e| e / sum).collect())
}

/// The batch's mean cross-entropy; its gradient with respect to every tensor goes into
/// `grads` (overwritten: nothing accumulates between steps, so there is no zero_grad).
fn loss_and_grads(p: &[Vec<f32>], xs: &[[f32; IN]], ys: &[usize], grads: &mut [Vec<f32>]) -> f32 {
    grads.iter_mut().for_each(|g| g.fill(0.0));
    let n = ys.len() as f32;
    let mut loss = 0.0;
    for (x, &y) in xs.iter().zip(ys) {
        let (hidden, probs) = forward(p, x);
        loss -= probs[y].ln();
        let dlogits: Vec<f32> = (0..CLASSES)
            .map(|c| (probs[c] - f32::from(u8::from(c == y))) / n)
            .collect();
        let mut dhidden = vec![0.0f32; HIDDEN];
        for (c, &d) in dlogits.iter().enumerate() {
            grads[B2][c] += d;
            let row = c * HIDDEN..(c + 1) * HIDDEN;
            for ((g, w), (h, dh)) in grads[W2][row.clone()]
                .iter_mut()
                .zip(&p[W2][row])
                .zip(hidden.iter().zip(dhidden.iter_mut()))
            {
                *g += d * h;
                *dh += d * w;
            }
        }
        for (j, (&h, &dh)) in hidden.iter().zip(&dhidden).enumerate() {
            if h > 0.0 {
                grads[B1][j] += dh;
                grads[W1][j * IN] += dh * x[0];
                grads[W1][j * IN + 1] += dh * x[1];
            }
        }
    }
    loss / n
}

fn accuracy(p: &[Vec<f32>], xs: &[[f32; IN]], ys: &[usize]) -> f32 {
    let correct = xs
        .iter()
        .zip(ys)
        .filter(|(x, &y)| {
            let (_, probs) = forward(p, x);
            (0..CLASSES).max_by(|&a, &b| probs[a].total_cmp(&probs[b])) == Some(y)
        })
        .count();
    correct as f32 / ys.len() as f32
}

/// The parameters as little-endian f32s, one tensor after another: a stand-in for the
/// model file a training program writes beside the optimizer's checkpoint.
fn save_model(path: &Path, params: &[Vec<f32>]) -> Result<()> {
    let bytes: Vec<u8> = params
        .iter()
        .flatten()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    Ok(fs::write(path, bytes)?)
}

fn load_model(path: &Path, lens: &[usize]) -> Result<Vec<Vec<f32>>> {
    let bytes = fs::read(path)?;
    if bytes.len() != 4 * lens.iter().sum::<usize>() {
        return Err(format!("{} is not this model's file", path.display()).into());
    }
    let mut values = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    Ok(lens
        .iter()
        .map(|&n| values.by_ref().take(n).collect())
        .collect())
}

/// He-initialised weights and zero biases, from `seed`.
fn init_params(seed: u64) -> Vec<Vec<f32>> {
    let mut rng = Rng(seed);
    let mut layer = |outputs: usize, inputs: usize| -> Vec<f32> {
        let s = (2.0 / inputs as f32).sqrt();
        (0..outputs * inputs)
            .map(|_| (2.0 * rng.uniform() - 1.0) * s)
            .collect()
    };
    let (w1, w2) = (layer(HIDDEN, IN), layer(CLASSES, HIDDEN));
    vec![w1, vec![0.0; HIDDEN], w2, vec![0.0; CLASSES]]
}

/// Three noisy spiral arms, one per class.
fn spiral(seed: u64) -> (Vec<[f32; IN]>, Vec<usize>) {
    let mut rng = Rng(seed);
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for class in 0..CLASSES {
        for i in 0..PER_CLASS {
            let r = i as f32 / PER_CLASS as f32;
            let angle = class as f32 * 2.0 * std::f32::consts::PI / CLASSES as f32
                + 4.0 * r
                + 0.2 * (rng.uniform() - 0.5);
            xs.push([r * angle.cos(), r * angle.sin()]);
            ys.push(class);
        }
    }
    (xs, ys)
}

/// The indices `0..n` in an order fixed by `seed` (Fisher-Yates).
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = Rng(seed);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    order
}

/// A small deterministic generator (splitmix64), so that every run sees the same data.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}
