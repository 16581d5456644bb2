//! "Noisy BN" of Santurkar et al. 2018: BatchNorm, then in training a random per-sample,
//! per-unit scale and shift that changes the distribution every step — covariate shift put
//! back on purpose. For unit j, μ_j ~ U(−0.5, 0.5) and σ_j ~ U(1, 1.25); for each sample,
//! s ~ N(σ_j, 0.1) and m ~ U(μ_j − 0.1, μ_j + 0.1); y = s·BN(x) + m, then ReLU when fused; all
//! redrawn every step. Eval mode is plain BatchNorm. The state dict is BatchNorm's.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::Result;
use crate::kernels::reduce::relu_mask;
use crate::nn::batch_norm::BatchNorm;
use crate::nn::layer::{BufferMut, Layer, Mode, Param, StatsMode};
use crate::onnx::graph::{relu_if, OnnxGraph};
use crate::tensor::Tensor;

pub struct NoisyBatchNorm {
    pub bn: BatchNorm,
    pub relu: bool,
    seed: u64,
    /// BN's output of the last forward, and the gradient reaching it.
    normalized: Tensor,
    dnormalized: Tensor,
    /// Per (sample, channel) scale and shift of the last training forward.
    scale: Vec<f32>,
    shift: Vec<f32>,
}

impl NoisyBatchNorm {
    pub fn new(bn: BatchNorm, relu: bool) -> Self {
        NoisyBatchNorm {
            bn,
            relu,
            seed: 0,
            normalized: Tensor::default(),
            dnormalized: Tensor::default(),
            scale: Vec::new(),
            shift: Vec::new(),
        }
    }
}

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f32 = rng.gen_range(f32::EPSILON..1.0);
    let u2: f32 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

impl Layer for NoisyBatchNorm {
    fn kind(&self) -> &'static str {
        if self.relu {
            "NoisyBatchNorm+ReLU"
        } else {
            "NoisyBatchNorm"
        }
    }

    /// In eval mode noisy BN is its BatchNorm (the noise is a training-time regularizer).
    fn export_onnx(&self, g: &mut OnnxGraph, x: &str, name: &str) -> Result<String> {
        let y = self.bn.export_onnx(g, x, name)?;
        Ok(relu_if(g, y, self.relu))
    }

    fn forward(&mut self, x: &Tensor, y: &mut Tensor, mode: Mode) -> Result<()> {
        self.bn.forward(x, &mut self.normalized, mode)?;
        let (n, c) = (x.shape[0], x.shape[1]);
        let s = x.sample_len() / c.max(1);
        self.scale.clear();
        self.shift.clear();
        // Noise only in ordinary training: a frozen, recalibrating or batch-statistics BN is
        // the plain BN of eval mode.
        if mode == Mode::Train && self.bn.stats_mode == StatsMode::Normal {
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
            // Per unit (mu_j, sigma_j) first, then the per-sample draws, all from this step's seed.
            let units: Vec<(f32, f32)> = (0..c)
                .map(|_| (rng.gen_range(-0.5..0.5), rng.gen_range(1.0..1.25)))
                .collect();
            for i in 0..n * c {
                let (mu, sigma) = units[i % c];
                self.scale.push(sigma + 0.1 * normal(&mut rng));
                self.shift.push(rng.gen_range(mu - 0.1..mu + 0.1));
            }
        } else {
            self.scale.resize(n * c, 1.0);
            self.shift.resize(n * c, 0.0);
        }
        let shift = &self.shift;
        y.resize_to(&x.shape)?;
        for (k, (yr, xr)) in y.data.chunks_mut(s).zip(self.normalized.data.chunks(s)).enumerate() {
            let (a, b) = (self.scale[k], shift[k]);
            for (o, &v) in yr.iter_mut().zip(xr) {
                let z = a * v + b;
                *o = if self.relu { crate::kernels::reduce::relu(z) } else { z };
            }
        }
        Ok(())
    }

    // dBN = dy · [y > 0] · s, then BatchNorm's backward
    fn backward(&mut self, x: &Tensor, y: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
        let c = x.shape[1];
        let s = x.sample_len() / c.max(1);
        self.dnormalized.resize_to(&dy.shape)?;
        for (k, ((d, g), yr)) in self
            .dnormalized
            .data
            .chunks_mut(s)
            .zip(dy.data.chunks(s))
            .zip(y.data.chunks(s))
            .enumerate()
        {
            let a = self.scale.get(k).copied().unwrap_or(1.0);
            for ((o, &gv), &yv) in d.iter_mut().zip(g).zip(yr) {
                *o = a * if self.relu { relu_mask(yv, gv) } else { gv };
            }
        }
        self.bn.backward(x, &self.normalized, &self.dnormalized, dx)
    }

    fn visit_params<'a>(&'a mut self, f: &mut dyn FnMut(&'static str, &'a mut Param)) {
        self.bn.visit_params(f);
    }

    fn buffers(&mut self) -> Vec<(&'static str, BufferMut<'_>)> {
        self.bn.buffers()
    }

    fn set_step_seed(&mut self, seed: u64) {
        self.seed = seed;
    }

    fn set_stats_mode(&mut self, mode: StatsMode) -> usize {
        self.bn.set_stats_mode(mode)
    }
}
