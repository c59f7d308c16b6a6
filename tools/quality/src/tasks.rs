//! The training tasks: scikit-learn's digits (gradients within a block alike), and two
//! synthetic ones, generated here deterministically, whose gradients within a block of
//! 8-bit state span many orders of magnitude: a regression on unnormalised features and
//! a bag of embeddings over Zipf-distributed tokens.

use std::path::Path;

use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};

use crate::Result;

/// A model and its data: parameters, a training set addressed by example index, and a
/// test set.
pub trait Task: Sync {
    /// A short name, for tables.
    fn name(&self) -> &'static str;
    /// Data, model and schedule, in a sentence or two.
    fn describe(&self) -> String;
    /// AdaMax's learning rate (PyTorch's other defaults).
    fn lr(&self) -> f64;
    fn epochs(&self) -> usize;
    fn batch(&self) -> usize;
    fn seeds(&self) -> u64;
    fn train_len(&self) -> usize;
    /// The initial parameters of `seed`.
    fn init(&self, seed: u64) -> Vec<Vec<f32>>;
    /// Mean loss over training examples `idx`; with `grads`, also its gradient.
    fn train_pass(&self, p: &[Vec<f32>], idx: &[usize], grads: Option<&mut [Vec<f32>]>) -> f32;
    /// Mean loss over the whole training set.
    fn train_loss(&self, p: &[Vec<f32>]) -> f32;
    /// Mean loss over the test set, and the accuracy for a classifier.
    fn test(&self, p: &[Vec<f32>]) -> (f32, Option<f32>);
}

/// Uniform in `[-sqrt(6 / fan_in), sqrt(6 / fan_in)]` (He), `o x i` row-major.
fn he(rng: &mut StdRng, o: usize, i: usize) -> Vec<f32> {
    let s = (6.0 / i as f32).sqrt();
    (0..o * i)
        .map(|_| rng.random_range(-1.0..1.0) * s)
        .collect()
}

/// The population variance of `v`.
fn variance(v: &[f32]) -> f64 {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    v.iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / n
}

/// A standard normal (Box-Muller).
pub fn normal(rng: &mut StdRng) -> f32 {
    let (a, b): (f32, f32) = (rng.random_range(f32::EPSILON..1.0), rng.random());
    (-2.0 * a.ln()).sqrt() * (std::f32::consts::TAU * b).cos()
}

/// Softmax cross-entropy of `logits` against `label`; with `d`, writes `dloss/dlogits /
/// n` into it. Returns (loss, whether the largest logit is the label's).
fn softmax_xent(logits: &[f32], label: usize, d: Option<(&mut [f32], usize)>) -> (f32, bool) {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|l| (l - m).exp()).sum();
    let best = (0..logits.len()).max_by(|&a, &c| logits[a].total_cmp(&logits[c]));
    if let Some((d, n)) = d {
        for (o, dv) in d.iter_mut().enumerate() {
            *dv = ((logits[o] - m).exp() / sum - f32::from(u8::from(o == label))) / n as f32;
        }
    }
    (sum.ln() - (logits[label] - m), best == Some(label))
}

// ---------------------------------------------------------------------------------
// Digits

const D_IN: usize = 64;
const D_HIDDEN: usize = 128;
const D_CLASSES: usize = 10;
const D_TEST: usize = 360;

/// scikit-learn's bundled 8x8 digits, an MLP 64-128-10 (ReLU, softmax cross-entropy).
pub struct Digits {
    train_x: Vec<f32>,
    train_y: Vec<usize>,
    test_x: Vec<f32>,
    test_y: Vec<usize>,
    pub epochs: usize,
    pub seeds: u64,
}

impl Digits {
    pub const BATCH: usize = 32;

    /// `label,pixel0,...,pixel63` per line (pixels 0..16), as scripts/export_digits.py
    /// writes; the same train/test split for every run (1,437 / 360).
    pub fn load(path: &Path, epochs: usize, seeds: u64) -> Result<Self> {
        let text = std::fs::read_to_string(path)?;
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for line in text.lines().filter(|l| !l.is_empty()) {
            let v: Vec<f32> = line
                .split(',')
                .map(str::parse)
                .collect::<std::result::Result<_, _>>()?;
            if v.len() != D_IN + 1 {
                return Err(format!("a line of {} values, expected {}", v.len(), D_IN + 1).into());
            }
            y.push(v[0] as usize);
            x.extend(v[1..].iter().map(|p| p / 16.0));
        }
        let mut order: Vec<usize> = (0..y.len()).collect();
        order.shuffle(&mut StdRng::seed_from_u64(0xD161));
        let take = |idx: &[usize]| -> (Vec<f32>, Vec<usize>) {
            (
                idx.iter()
                    .flat_map(|&i| x[i * D_IN..(i + 1) * D_IN].iter().copied())
                    .collect(),
                idx.iter().map(|&i| y[i]).collect(),
            )
        };
        let (train_x, train_y) = take(&order[D_TEST..]);
        let (test_x, test_y) = take(&order[..D_TEST]);
        Ok(Self {
            train_x,
            train_y,
            test_x,
            test_y,
            epochs,
            seeds,
        })
    }

    /// Mean loss and accuracy over `(x, y)`; with `grads`, also the mean gradient.
    fn pass(
        p: &[Vec<f32>],
        x: &[f32],
        y: &[usize],
        mut grads: Option<&mut [Vec<f32>]>,
    ) -> (f32, f32) {
        let n = y.len();
        if let Some(g) = grads.as_deref_mut() {
            g.iter_mut().for_each(|v| v.fill(0.0));
        }
        let (mut loss, mut correct) = (0.0f32, 0usize);
        let mut h = [0f32; D_HIDDEN];
        let mut d = [0f32; D_CLASSES];
        for b in 0..n {
            let xb = &x[b * D_IN..(b + 1) * D_IN];
            for (o, ho) in h.iter_mut().enumerate() {
                let w = &p[0][o * D_IN..(o + 1) * D_IN];
                *ho = (p[1][o] + w.iter().zip(xb).map(|(a, c)| a * c).sum::<f32>()).max(0.0);
            }
            let logits: Vec<f32> = (0..D_CLASSES)
                .map(|o| {
                    let w = &p[2][o * D_HIDDEN..(o + 1) * D_HIDDEN];
                    p[3][o] + w.iter().zip(&h).map(|(a, c)| a * c).sum::<f32>()
                })
                .collect();
            let want = grads.is_some().then_some((&mut d[..], n));
            let (l, right) = softmax_xent(&logits, y[b], want);
            loss += l;
            correct += usize::from(right);
            let Some(g) = grads.as_deref_mut() else {
                continue;
            };
            for (o, &d) in d.iter().enumerate() {
                g[3][o] += d;
                for (i, &hi) in h.iter().enumerate() {
                    g[2][o * D_HIDDEN + i] += d * hi;
                    if hi > 0.0 {
                        let dh = d * p[2][o * D_HIDDEN + i];
                        g[1][i] += dh;
                        for (k, &xk) in xb.iter().enumerate() {
                            g[0][i * D_IN + k] += dh * xk;
                        }
                    }
                }
            }
        }
        (loss / n as f32, correct as f32 / n as f32)
    }
}

impl Task for Digits {
    fn name(&self) -> &'static str {
        "digits MLP"
    }

    fn describe(&self) -> String {
        format!(
            "Digits (scikit-learn's bundled 8x8 handwritten digits, {} train / {} test), MLP {D_IN}-{D_HIDDEN}-{D_CLASSES} (ReLU, softmax cross-entropy), {} epochs of batches of {}, AdaMax lr {}",
            self.train_y.len(),
            self.test_y.len(),
            self.epochs,
            Self::BATCH,
            self.lr()
        )
    }

    fn lr(&self) -> f64 {
        1e-3
    }

    fn epochs(&self) -> usize {
        self.epochs
    }

    fn batch(&self) -> usize {
        Self::BATCH
    }

    fn seeds(&self) -> u64 {
        self.seeds
    }

    fn train_len(&self) -> usize {
        self.train_y.len()
    }

    /// He-initialised [w1 (HIDDEN x IN), b1, w2 (CLASSES x HIDDEN), b2].
    fn init(&self, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = StdRng::seed_from_u64(seed);
        let w1 = he(&mut rng, D_HIDDEN, D_IN);
        let w2 = he(&mut rng, D_CLASSES, D_HIDDEN);
        vec![w1, vec![0.0; D_HIDDEN], w2, vec![0.0; D_CLASSES]]
    }

    fn train_pass(&self, p: &[Vec<f32>], idx: &[usize], grads: Option<&mut [Vec<f32>]>) -> f32 {
        let xb: Vec<f32> = idx
            .iter()
            .flat_map(|&i| self.train_x[i * D_IN..(i + 1) * D_IN].iter().copied())
            .collect();
        let yb: Vec<usize> = idx.iter().map(|&i| self.train_y[i]).collect();
        Self::pass(p, &xb, &yb, grads).0
    }

    fn train_loss(&self, p: &[Vec<f32>]) -> f32 {
        Self::pass(p, &self.train_x, &self.train_y, None).0
    }

    fn test(&self, p: &[Vec<f32>]) -> (f32, Option<f32>) {
        let (loss, acc) = Self::pass(p, &self.test_x, &self.test_y, None);
        (loss, Some(acc))
    }
}

// ---------------------------------------------------------------------------------
// Regression on unnormalised features

const R_IN: usize = 16;
const R_HIDDEN: usize = 64;
const R_TRAIN: usize = 2048;
const R_TEST: usize = 512;

/// Tabular regression with unnormalised features: feature `j` is `s_j * z_j` with `z_j`
/// standard normal and `s_j = 10^(-2 + 4 j / 15)` (1e-2 to 1e2), the target `sum_j a_j
/// tanh(z_j) + 0.1 n` (`a_j`, `n` standard normal); an MLP 16-64-1 (ReLU), mean squared
/// error. Every block of the first layer's weights holds all 16 features, so its
/// gradients span the features' four orders of magnitude (and more, with the
/// hidden units' own spread).
pub struct Regression {
    train_x: Vec<f32>,
    train_y: Vec<f32>,
    test_x: Vec<f32>,
    test_y: Vec<f32>,
    pub epochs: usize,
    pub seeds: u64,
}

impl Regression {
    pub fn new(epochs: usize, seeds: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(0x7AB1E);
        let a: Vec<f32> = (0..R_IN).map(|_| normal(&mut rng)).collect();
        let scale: Vec<f32> = (0..R_IN)
            .map(|j| 10f32.powf(-2.0 + 4.0 * j as f32 / (R_IN - 1) as f32))
            .collect();
        let mut make = |n: usize| {
            let (mut x, mut y) = (Vec::with_capacity(n * R_IN), Vec::with_capacity(n));
            for _ in 0..n {
                let mut t = 0.1 * normal(&mut rng);
                for j in 0..R_IN {
                    let z = normal(&mut rng);
                    x.push(scale[j] * z);
                    t += a[j] * z.tanh();
                }
                y.push(t);
            }
            (x, y)
        };
        let (train_x, train_y) = make(R_TRAIN);
        let (test_x, test_y) = make(R_TEST);
        Self {
            train_x,
            train_y,
            test_x,
            test_y,
            epochs,
            seeds,
        }
    }

    /// Mean squared error over the examples `rows` of `(x, y)`; with `grads`, its
    /// gradient.
    fn pass(
        p: &[Vec<f32>],
        x: &[f32],
        y: &[f32],
        rows: impl ExactSizeIterator<Item = usize>,
        mut grads: Option<&mut [Vec<f32>]>,
    ) -> f32 {
        let n = rows.len();
        if let Some(g) = grads.as_deref_mut() {
            g.iter_mut().for_each(|v| v.fill(0.0));
        }
        let mut loss = 0.0f32;
        let mut h = [0f32; R_HIDDEN];
        for r in rows {
            let xr = &x[r * R_IN..(r + 1) * R_IN];
            for (o, ho) in h.iter_mut().enumerate() {
                let w = &p[0][o * R_IN..(o + 1) * R_IN];
                *ho = (p[1][o] + w.iter().zip(xr).map(|(a, c)| a * c).sum::<f32>()).max(0.0);
            }
            let out = p[3][0] + p[2].iter().zip(&h).map(|(a, c)| a * c).sum::<f32>();
            let e = out - y[r];
            loss += e * e;
            let Some(g) = grads.as_deref_mut() else {
                continue;
            };
            let d = 2.0 * e / n as f32;
            g[3][0] += d;
            for (i, &hi) in h.iter().enumerate() {
                g[2][i] += d * hi;
                if hi > 0.0 {
                    let dh = d * p[2][i];
                    g[1][i] += dh;
                    for (k, &xk) in xr.iter().enumerate() {
                        g[0][i * R_IN + k] += dh * xk;
                    }
                }
            }
        }
        loss / n as f32
    }
}

impl Task for Regression {
    fn name(&self) -> &'static str {
        "regression, unnormalised features"
    }

    fn describe(&self) -> String {
        format!(
            "Regression on unnormalised tabular features (synthetic, {R_TRAIN} train / {R_TEST} test): {R_IN} features, feature j = s_j z_j with z_j standard normal and s_j = 10^(-2 + 4j/15), from 1e-2 to 1e2; target sum_j a_j tanh(z_j) + 0.1 n (a_j, n standard normal; its variance over the training set is {:.2}); MLP {R_IN}-{R_HIDDEN}-1 (ReLU, He initialisation), mean squared error, {} epochs of batches of {}, AdaMax lr {}. Every block of the first layer's weights holds all {R_IN} features, so its gradients span four orders of magnitude and more",
            variance(&self.train_y),
            self.epochs,
            self.batch(),
            self.lr()
        )
    }

    fn lr(&self) -> f64 {
        3e-3
    }

    fn epochs(&self) -> usize {
        self.epochs
    }

    fn batch(&self) -> usize {
        64
    }

    fn seeds(&self) -> u64 {
        self.seeds
    }

    fn train_len(&self) -> usize {
        R_TRAIN
    }

    /// He-initialised [w1 (HIDDEN x IN), b1, w2 (1 x HIDDEN), b2].
    fn init(&self, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x4E6);
        let w1 = he(&mut rng, R_HIDDEN, R_IN);
        let w2 = he(&mut rng, 1, R_HIDDEN);
        vec![w1, vec![0.0; R_HIDDEN], w2, vec![0.0; 1]]
    }

    fn train_pass(&self, p: &[Vec<f32>], idx: &[usize], grads: Option<&mut [Vec<f32>]>) -> f32 {
        Self::pass(p, &self.train_x, &self.train_y, idx.iter().copied(), grads)
    }

    fn train_loss(&self, p: &[Vec<f32>]) -> f32 {
        Self::pass(p, &self.train_x, &self.train_y, 0..R_TRAIN, None)
    }

    fn test(&self, p: &[Vec<f32>]) -> (f32, Option<f32>) {
        let loss = Self::pass(p, &self.test_x, &self.test_y, 0..R_TEST, None);
        (loss, None)
    }
}

// ---------------------------------------------------------------------------------
// Embeddings over Zipf-distributed tokens

const Z_VOCAB: usize = 2048;
const Z_DIM: usize = 16;
const Z_CLUSTERS: usize = 8;
const Z_TRAIN: usize = 16384;
const Z_TEST: usize = 4096;
const Z_EXPONENT: f64 = 1.1;

/// A next-token model over Zipf-distributed tokens: a stream of tokens from a
/// vocabulary of 2,048 in which the next token is drawn, with probability 1/2 each,
/// from a global Zipf distribution (the rank-`r` token with probability proportional
/// to `(r + 1)^-1.1`) or from the Zipf distribution of the current token's cluster (its
/// id mod 8; each cluster ranks the tokens in its own order); ids are a random
/// permutation of the global ranks, so a block of a table mixes frequent and rare
/// tokens, as a tokenizer's ids do. Model: input embeddings (2,048 x 16), output
/// embeddings (2,048 x 16) and a bias, softmax cross-entropy over the vocabulary. A rare
/// token's output row and bias get a gradient of the size of its predicted
/// probability, orders of magnitude below a frequent one's; its input row gets one only
/// in the few steps whose batch holds it.
pub struct Zipf {
    train: Vec<(u16, u16)>,
    test: Vec<(u16, u16)>,
    pub epochs: usize,
    pub seeds: u64,
}

impl Zipf {
    pub fn new(epochs: usize, seeds: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(0x21FF);
        let mut cdf: Vec<f64> = (0..Z_VOCAB)
            .scan(0.0, |acc, r| {
                *acc += ((r + 1) as f64).powf(-Z_EXPONENT);
                Some(*acc)
            })
            .collect();
        let total = cdf[Z_VOCAB - 1];
        cdf.iter_mut().for_each(|c| *c /= total);
        // The global ranking, then one per cluster: token ids by rank.
        let rankings: Vec<Vec<u16>> = (0..=Z_CLUSTERS)
            .map(|_| {
                let mut ids: Vec<u16> = (0..Z_VOCAB as u16).collect();
                ids.shuffle(&mut rng);
                ids
            })
            .collect();
        let mut tok = rankings[0][0];
        let mut pairs = Vec::with_capacity(Z_TRAIN + Z_TEST);
        for _ in 0..Z_TRAIN + Z_TEST {
            let ranking = if rng.random::<bool>() {
                &rankings[0]
            } else {
                &rankings[1 + usize::from(tok) % Z_CLUSTERS]
            };
            let u: f64 = rng.random();
            let next = ranking[cdf.partition_point(|&c| c < u).min(Z_VOCAB - 1)];
            pairs.push((tok, next));
            tok = next;
        }
        let test = pairs.split_off(Z_TRAIN);
        Self {
            train: pairs,
            test,
            epochs,
            seeds,
        }
    }

    /// Mean loss and accuracy over the pairs `rows` of `data`; with `grads`, the mean
    /// gradient.
    fn pass(
        p: &[Vec<f32>],
        data: &[(u16, u16)],
        rows: impl ExactSizeIterator<Item = usize>,
        mut grads: Option<&mut [Vec<f32>]>,
    ) -> (f32, f32) {
        let n = rows.len();
        if let Some(g) = grads.as_deref_mut() {
            g.iter_mut().for_each(|v| v.fill(0.0));
        }
        let (mut loss, mut correct) = (0.0f32, 0usize);
        let mut logits = vec![0f32; Z_VOCAB];
        let mut d = vec![0f32; Z_VOCAB];
        for r in rows {
            let (x, y) = (usize::from(data[r].0), usize::from(data[r].1));
            let h = &p[0][x * Z_DIM..(x + 1) * Z_DIM];
            for (o, l) in logits.iter_mut().enumerate() {
                let w = &p[1][o * Z_DIM..(o + 1) * Z_DIM];
                *l = p[2][o] + w.iter().zip(h).map(|(a, c)| a * c).sum::<f32>();
            }
            let want = grads.is_some().then_some((&mut d[..], n));
            let (l, right) = softmax_xent(&logits, y, want);
            loss += l;
            correct += usize::from(right);
            let Some(g) = grads.as_deref_mut() else {
                continue;
            };
            let mut dh = [0f32; Z_DIM];
            for (o, &d) in d.iter().enumerate() {
                g[2][o] += d;
                let w = &p[1][o * Z_DIM..(o + 1) * Z_DIM];
                let gw = &mut g[1][o * Z_DIM..(o + 1) * Z_DIM];
                for k in 0..Z_DIM {
                    gw[k] += d * h[k];
                    dh[k] += d * w[k];
                }
            }
            g[0][x * Z_DIM..(x + 1) * Z_DIM]
                .iter_mut()
                .zip(&dh)
                .for_each(|(a, b)| *a += b);
        }
        (loss / n as f32, correct as f32 / n as f32)
    }
}

impl Task for Zipf {
    fn name(&self) -> &'static str {
        "embeddings, Zipf tokens"
    }

    fn describe(&self) -> String {
        format!(
            "A next-token model over Zipf-distributed tokens (synthetic, {Z_TRAIN} train / {Z_TEST} test pairs of consecutive tokens): a stream over a vocabulary of {Z_VOCAB} in which the next token is drawn, with probability 1/2 each, from a global Zipf distribution (the rank-r token with probability proportional to (r + 1)^-{Z_EXPONENT}) or from the Zipf distribution of the current token's cluster (id mod {Z_CLUSTERS}, each cluster ranking the tokens its own way); ids a random permutation of the global ranks, so a block of a table mixes frequent and rare tokens; model: input and output embeddings ({Z_VOCAB} x {Z_DIM} each, N(0, 1) and N(0, 1/{Z_DIM}) initialisation) and an output bias, softmax cross-entropy over the vocabulary, {} epochs of batches of {}, AdaMax lr {}. A rare token's output row and bias get gradients the size of its predicted probability, orders of magnitude below a frequent token's",
            self.epochs,
            self.batch(),
            self.lr()
        )
    }

    fn lr(&self) -> f64 {
        1e-2
    }

    fn epochs(&self) -> usize {
        self.epochs
    }

    fn batch(&self) -> usize {
        64
    }

    fn seeds(&self) -> u64 {
        self.seeds
    }

    fn train_len(&self) -> usize {
        Z_TRAIN
    }

    /// [input embeddings (VOCAB x DIM), output embeddings (VOCAB x DIM), output bias].
    fn init(&self, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = StdRng::seed_from_u64(seed ^ 0xE3B);
        let input = (0..Z_VOCAB * Z_DIM).map(|_| normal(&mut rng)).collect();
        let s = (Z_DIM as f32).sqrt().recip();
        let output = (0..Z_VOCAB * Z_DIM).map(|_| normal(&mut rng) * s).collect();
        vec![input, output, vec![0.0; Z_VOCAB]]
    }

    fn train_pass(&self, p: &[Vec<f32>], idx: &[usize], grads: Option<&mut [Vec<f32>]>) -> f32 {
        Self::pass(p, &self.train, idx.iter().copied(), grads).0
    }

    fn train_loss(&self, p: &[Vec<f32>]) -> f32 {
        Self::pass(p, &self.train, 0..Z_TRAIN, None).0
    }

    fn test(&self, p: &[Vec<f32>]) -> (f32, Option<f32>) {
        let (loss, acc) = Self::pass(p, &self.test, 0..Z_TEST, None);
        (loss, Some(acc))
    }
}
