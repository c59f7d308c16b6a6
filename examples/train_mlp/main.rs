//! Trains a two-layer MLP (2 -> 64 -> 3, ReLU, softmax cross-entropy) on a synthetic
//! three-arm spiral with AdaMax, in f32 and in f16 with f32 master weights, and writes
//! the loss curves as an SVG: `cargo run --release --example train_mlp [out.svg]`.
//!
//! On a GPU the forward and backward passes run in the small NVRTC-compiled kernels of
//! `mlp.cu` and the step in [`CudaAdamax`]; without one, the same model runs on the CPU
//! with [`CpuAdamax`]. Each run prints the loss per epoch under a progress bar and the
//! final training accuracy.

use std::sync::Arc;

use adamax_cuda::{
    cpu::CpuAdamax,
    cuda::{
        self,
        cudarc::{
            driver::{CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg},
            nvrtc::Ptx,
        },
        Arch, CudaAdamax, GpuStorage,
    },
    f16, AdamaxConfig, Optimizer, Storage,
};
use indicatif::{ProgressBar, ProgressStyle};
use plotters::prelude::*;
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};

const IN: usize = 2;
const HIDDEN: usize = 64;
const CLASSES: usize = 3;
const PER_CLASS: usize = 1000;
const BATCH: usize = 250;
const EPOCHS: usize = 40;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Three interleaved spiral arms with noise: (points [n * 2], labels [n]).
fn spiral(seed: u64) -> (Vec<f32>, Vec<i32>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for c in 0..CLASSES {
        for i in 0..PER_CLASS {
            let r = i as f32 / PER_CLASS as f32;
            let t = c as f32 * 4.0 + r * 4.0 + rng.random_range(-0.2..0.2);
            x.extend([r * t.sin(), r * t.cos()]);
            y.push(c as i32);
        }
    }
    (x, y)
}

/// He-initialised parameters: [w1 (HIDDEN x IN), b1, w2 (CLASSES x HIDDEN), b2].
fn init_params<T: Storage>(seed: u64) -> Vec<Vec<T>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut layer = |o: usize, i: usize| -> Vec<T> {
        let s = (2.0 / i as f32).sqrt();
        (0..o * i)
            .map(|_| T::from_f32(rng.random_range(-1.0..1.0) * s))
            .collect()
    };
    let (w1, w2) = (layer(HIDDEN, IN), layer(CLASSES, HIDDEN));
    vec![
        w1,
        vec![T::from_f32(0.0); HIDDEN],
        w2,
        vec![T::from_f32(0.0); CLASSES],
    ]
}

/// Forward (and, with `grads`, backward) on the host; returns the summed loss and the
/// number of correct predictions. The CPU twin of `mlp.cu`.
fn host_pass<T: Storage>(
    p: &[Vec<T>],
    x: &[f32],
    y: &[i32],
    grads: Option<&mut [Vec<f32>]>,
) -> (f32, usize) {
    let f = |v: &Vec<T>| v.iter().map(|a| a.to_f32()).collect::<Vec<f32>>();
    let (w1, b1, w2, b2) = (f(&p[0]), f(&p[1]), f(&p[2]), f(&p[3]));
    let n = y.len();
    let mut h = vec![0f32; n * HIDDEN];
    let mut dl = vec![0f32; n * CLASSES];
    let (mut loss, mut correct) = (0f32, 0);
    for b in 0..n {
        for o in 0..HIDDEN {
            let z = b1[o] + (0..IN).map(|i| x[b * IN + i] * w1[o * IN + i]).sum::<f32>();
            h[b * HIDDEN + o] = z.max(0.0);
        }
        let logits: Vec<f32> = (0..CLASSES)
            .map(|o| {
                b2[o]
                    + (0..HIDDEN)
                        .map(|i| h[b * HIDDEN + i] * w2[o * HIDDEN + i])
                        .sum::<f32>()
            })
            .collect();
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = logits.iter().map(|l| (l - m).exp()).sum();
        let label = y[b] as usize;
        loss += sum.ln() - (logits[label] - m);
        let best = (0..CLASSES)
            .max_by(|&a, &c| logits[a].total_cmp(&logits[c]))
            .unwrap_or(0);
        correct += usize::from(best == label);
        for c in 0..CLASSES {
            dl[b * CLASSES + c] =
                ((logits[c] - m).exp() / sum - f32::from(u8::from(c == label))) / n as f32;
        }
    }
    if let Some(g) = grads {
        for v in g.iter_mut() {
            v.fill(0.0);
        }
        for b in 0..n {
            for o in 0..CLASSES {
                let d = dl[b * CLASSES + o];
                g[3][o] += d;
                for i in 0..HIDDEN {
                    g[2][o * HIDDEN + i] += d * h[b * HIDDEN + i];
                }
            }
            for i in 0..HIDDEN {
                if h[b * HIDDEN + i] > 0.0 {
                    let dh: f32 = (0..CLASSES)
                        .map(|o| dl[b * CLASSES + o] * w2[o * HIDDEN + i])
                        .sum();
                    g[1][i] += dh;
                    for k in 0..IN {
                        g[0][i * IN + k] += dh * x[b * IN + k];
                    }
                }
            }
        }
    }
    (loss, correct)
}

/// One way of training: yields the mean loss of each epoch and the final parameters.
trait Trainer {
    fn epoch(&mut self, x: &[f32], y: &[i32]) -> Result<f32>;
    fn params_f32(&self) -> Result<Vec<Vec<f32>>>;
}

struct CpuTrainer<T: Storage> {
    params: Vec<Vec<T>>,
    opt: CpuAdamax<T>,
}

impl<T: Storage> Trainer for CpuTrainer<T> {
    fn epoch(&mut self, x: &[f32], y: &[i32]) -> Result<f32> {
        let mut total = 0.0;
        let mut g32: Vec<Vec<f32>> = self.params.iter().map(|p| vec![0.0; p.len()]).collect();
        for (xb, yb) in x.chunks(BATCH * IN).zip(y.chunks(BATCH)) {
            total += host_pass(&self.params, xb, yb, Some(&mut g32)).0;
            let g: Vec<Vec<T>> = g32
                .iter()
                .map(|v| v.iter().map(|&a| T::from_f32(a)).collect())
                .collect();
            let grefs: Vec<&[T]> = g.iter().map(|v| v.as_slice()).collect();
            let mut prefs: Vec<&mut [T]> =
                self.params.iter_mut().map(|p| p.as_mut_slice()).collect();
            self.opt.step(&mut prefs, &grefs)?;
        }
        Ok(total / y.len() as f32)
    }
    fn params_f32(&self) -> Result<Vec<Vec<f32>>> {
        Ok(self
            .params
            .iter()
            .map(|p| p.iter().map(|a| a.to_f32()).collect())
            .collect())
    }
}

struct GpuTrainer<T: GpuStorage> {
    stream: Arc<CudaStream>,
    f: [CudaFunction; 4],
    params: Vec<CudaSlice<T>>,
    grads: Vec<CudaSlice<T>>,
    opt: CudaAdamax<T>,
    xb: CudaSlice<f32>,
    yb: CudaSlice<i32>,
    h: CudaSlice<f32>,
    logits: CudaSlice<f32>,
    dlogits: CudaSlice<f32>,
    dh: CudaSlice<f32>,
    loss: CudaSlice<f32>,
}

fn grid(n: usize) -> LaunchConfig {
    LaunchConfig::for_num_elems(n as u32)
}

impl<T: GpuStorage> GpuTrainer<T> {
    fn new(stream: &Arc<CudaStream>, config: AdamaxConfig, module_image: &[u8]) -> Result<Self> {
        let module = stream
            .context()
            .load_module(Ptx::from_binary(module_image.to_vec()))?;
        let load = |name: &str| module.load_function(&format!("{name}_{}", T::NAME));
        let f = [
            load("linear_forward")?,
            load("linear_backward_input")?,
            load("linear_backward_params")?,
            module.load_function("softmax_cross_entropy")?,
        ];
        let params = init_params::<T>(7)
            .iter()
            .map(|p| stream.clone_htod(p))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let grads = params
            .iter()
            .map(|p| stream.alloc_zeros::<T>(p.len()))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let opt = CudaAdamax::new(stream, config, &params)?;
        let z = |n: usize| stream.alloc_zeros::<f32>(n);
        Ok(Self {
            stream: stream.clone(),
            f,
            xb: z(BATCH * IN)?,
            yb: stream.alloc_zeros::<i32>(BATCH)?,
            h: z(BATCH * HIDDEN)?,
            logits: z(BATCH * CLASSES)?,
            dlogits: z(BATCH * CLASSES)?,
            dh: z(BATCH * HIDDEN)?,
            loss: z(BATCH)?,
            params,
            grads,
            opt,
        })
    }

    /// Forward, loss and backward of one batch, all enqueued on the stream.
    fn batch(&mut self, n: i32) -> Result<()> {
        let (s, (i, h, c)) = (&self.stream, (IN as i32, HIDDEN as i32, CLASSES as i32));
        let (p, g) = (&self.params, &mut self.grads);
        let [fwd, bwd_in, bwd_p, xent] = &self.f;
        let (relu, linear) = (1i32, 0i32);
        // SAFETY: every buffer is sized for BATCH rows of its layer (n <= BATCH), the
        // parameter and gradient buffers for their layer's shape, and each entry point
        // takes exactly these arguments (mlp.cu).
        unsafe {
            s.launch_builder(fwd)
                .arg(&self.xb)
                .arg(&p[0])
                .arg(&p[1])
                .arg(&mut self.h)
                .arg(&n)
                .arg(&i)
                .arg(&h)
                .arg(&relu)
                .launch(grid(BATCH * HIDDEN))?;
            s.launch_builder(fwd)
                .arg(&self.h)
                .arg(&p[2])
                .arg(&p[3])
                .arg(&mut self.logits)
                .arg(&n)
                .arg(&h)
                .arg(&c)
                .arg(&linear)
                .launch(grid(BATCH * CLASSES))?;
            s.launch_builder(xent)
                .arg(&self.logits)
                .arg(&self.yb)
                .arg(&mut self.loss)
                .arg(&mut self.dlogits)
                .arg(&n)
                .arg(&c)
                .launch(grid(BATCH))?;
            let (g0, rest) = g.split_at_mut(1);
            let (g1, rest) = rest.split_at_mut(1);
            let (g2, g3) = rest.split_at_mut(1);
            s.launch_builder(bwd_p)
                .arg(&self.dlogits)
                .arg(&self.h)
                .arg(&mut g2[0])
                .arg(&mut g3[0])
                .arg(&n)
                .arg(&h)
                .arg(&c)
                .launch(grid(HIDDEN * CLASSES + CLASSES))?;
            s.launch_builder(bwd_in)
                .arg(&self.dlogits)
                .arg(&p[2])
                .arg(&self.h)
                .arg(&mut self.dh)
                .arg(&n)
                .arg(&h)
                .arg(&c)
                .launch(grid(BATCH * HIDDEN))?;
            s.launch_builder(bwd_p)
                .arg(&self.dh)
                .arg(&self.xb)
                .arg(&mut g0[0])
                .arg(&mut g1[0])
                .arg(&n)
                .arg(&i)
                .arg(&h)
                .launch(grid(IN * HIDDEN + HIDDEN))?;
        }
        Ok(())
    }
}

impl<T: GpuStorage> Trainer for GpuTrainer<T> {
    fn epoch(&mut self, x: &[f32], y: &[i32]) -> Result<f32> {
        let mut total = 0.0;
        for (xb, yb) in x.chunks(BATCH * IN).zip(y.chunks(BATCH)) {
            self.stream.memcpy_htod(xb, &mut self.xb)?;
            self.stream.memcpy_htod(yb, &mut self.yb)?;
            self.batch(yb.len() as i32)?;
            self.opt.step(&mut self.params, &self.grads)?;
            total += self.stream.clone_dtoh(&self.loss)?[..yb.len()]
                .iter()
                .sum::<f32>();
        }
        Ok(total / y.len() as f32)
    }
    fn params_f32(&self) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::new();
        for p in &self.params {
            out.push(
                self.stream
                    .clone_dtoh(p)?
                    .iter()
                    .map(|a| a.to_f32())
                    .collect(),
            );
        }
        Ok(out)
    }
}

fn train(name: &str, trainer: &mut dyn Trainer, x: &[f32], y: &[i32]) -> Result<Vec<f32>> {
    let bar = ProgressBar::new(EPOCHS as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>22} [{bar:30}] {pos}/{len} epochs  {msg}")?
            .progress_chars("=> "),
    );
    bar.set_prefix(name.to_owned());
    let mut rng = StdRng::seed_from_u64(11);
    let mut order: Vec<usize> = (0..y.len()).collect();
    let mut losses = Vec::new();
    for epoch in 1..=EPOCHS {
        order.shuffle(&mut rng);
        let xs: Vec<f32> = order
            .iter()
            .flat_map(|&k| [x[k * IN], x[k * IN + 1]])
            .collect();
        let ys: Vec<i32> = order.iter().map(|&k| y[k]).collect();
        let loss = trainer.epoch(&xs, &ys)?;
        bar.suspend(|| println!("{name:>22}  epoch {epoch:>2}  loss {loss:.4}"));
        bar.set_message(format!("loss {loss:.4}"));
        bar.inc(1);
        losses.push(loss);
    }
    bar.finish_and_clear();
    let p = trainer.params_f32()?;
    let (_, correct) = host_pass(&p, x, y, None);
    println!(
        "{name:>22}  final training accuracy {:.1}%",
        100.0 * correct as f64 / y.len() as f64
    );
    Ok(losses)
}

fn plot(path: &str, curves: &[(String, Vec<f32>)]) -> Result<()> {
    let top = curves
        .iter()
        .flat_map(|(_, l)| l.iter().copied())
        .fold(0.0f32, f32::max)
        * 1.05;
    let root = SVGBackend::new(path, (720, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "AdaMax on a 3-arm spiral: training loss",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(1f32..EPOCHS as f32, 0f32..top)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("mean cross-entropy")
        .draw()?;
    for (k, (name, losses)) in curves.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        chart
            .draw_series(LineSeries::new(
                losses.iter().enumerate().map(|(e, &l)| (e as f32 + 1.0, l)),
                color.stroke_width(2),
            ))?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn main() -> Result<()> {
    // Where the caller asked, else the system's temporary directory (not the
    // repository the example runs from).
    let out = std::env::args().nth(1).unwrap_or_else(|| {
        std::env::temp_dir()
            .join("adamax-cuda-train_mlp_loss.svg")
            .display()
            .to_string()
    });
    let (x, y) = spiral(3);
    let config = AdamaxConfig {
        lr: 1e-2,
        ..AdamaxConfig::default()
    };
    let mut curves = Vec::new();
    match cuda::default_stream(0) {
        Ok(stream) => {
            let (major, minor) = stream.context().compute_capability()?;
            println!("GPU: {}", stream.context().name()?);
            let arch = Arch {
                major: major as u32,
                minor: minor as u32,
            };
            let module = cuda::compile_source(include_str!("mlp.cu"), arch)?;
            if module.is_ptx {
                return Err("this NVRTC does not know the device; update it".into());
            }
            let mut f32_run = GpuTrainer::<f32>::new(&stream, config, &module.image)?;
            curves.push((
                "GPU f32".to_owned(),
                train("GPU f32", &mut f32_run, &x, &y)?,
            ));
            let mut f16_run = GpuTrainer::<f16>::new(&stream, config, &module.image)?;
            curves.push((
                "GPU f16 + f32 master".to_owned(),
                train("GPU f16 + f32 master", &mut f16_run, &x, &y)?,
            ));
        }
        Err(e) => {
            println!("no GPU ({e}); training on the CPU reference");
            let mut run = |name: &str, t: &mut dyn Trainer| -> Result<()> {
                curves.push((name.to_owned(), train(name, t, &x, &y)?));
                Ok(())
            };
            let f32_params = init_params::<f32>(7);
            let refs: Vec<&[f32]> = f32_params.iter().map(|p| p.as_slice()).collect();
            let opt = CpuAdamax::new(config, &refs)?;
            run(
                "CPU f32",
                &mut CpuTrainer {
                    params: f32_params.clone(),
                    opt,
                },
            )?;
            let f16_params = init_params::<f16>(7);
            let refs: Vec<&[f16]> = f16_params.iter().map(|p| p.as_slice()).collect();
            let opt = CpuAdamax::new(config, &refs)?;
            run(
                "CPU f16 + f32 master",
                &mut CpuTrainer {
                    params: f16_params.clone(),
                    opt,
                },
            )?;
        }
    }
    plot(&out, &curves)?;
    println!("loss curves written to {out}");
    Ok(())
}
