//! BatchNorm1d / BatchNorm2d with PyTorch semantics (biased variance to normalize, unbiased
//! variance into running_var, momentum or cumulative averaging, optional affine and running
//! statistics), and the variants that change only how batch statistics are computed or
//! combined: Ghost BN (virtual batches), Batch Renormalization (r, d corrections toward the
//! running statistics) and Lp-norm BN (L1 or L∞ scale instead of the standard deviation).

use crate::error::{Error, Result};
use crate::kernels::batch_norm as k;
use crate::kernels::lp_norm::{self, LpKind};
use crate::nn::layer::{BufferMut, Layer, Mode, Param, ParamKind};
use crate::tensor::Tensor;

/// How training-mode statistics are taken.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BatchStats {
    /// Plain BatchNorm over the whole batch.
    Standard,
    /// Ghost BN: separate statistics for each virtual batch of this many samples.
    Ghost(usize),
    /// Batch Renormalization: y = γ(x̂·r + d) + β with r = clip(σ_B/σ, 1/rmax, rmax) and
    /// d = clip((μ_B - μ)/σ, -dmax, dmax) from the running μ, σ; rmax and dmax ramp from 1 and
    /// 0 after warmup/8 steps to their full values at `warmup` steps (rmax) and 5/8·warmup
    /// (dmax), the paper's 5k/25k/40k schedule scaled.
    Renorm { rmax: f64, dmax: f64, warmup: u64 },
    /// Lp-norm BN: divide the centred values by their mean L1 norm or their L∞ norm (+ eps).
    Lp(LpKind),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNormConfig {
    pub eps: f64,
    /// `None` is PyTorch's momentum=None: a cumulative average with factor 1/num_batches_tracked.
    pub momentum: Option<f64>,
    pub affine: bool,
    pub track_running_stats: bool,
    pub stats: BatchStats,
}

impl Default for BatchNormConfig {
    fn default() -> Self {
        BatchNormConfig {
            eps: 1e-5,
            momentum: Some(0.1),
            affine: true,
            track_running_stats: true,
            stats: BatchStats::Standard,
        }
    }
}

impl BatchNormConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return Err(Error::invalid(format!("BatchNorm eps must be > 0, got {}", self.eps)));
        }
        if let Some(m) = self.momentum {
            if !(0.0..=1.0).contains(&m) {
                return Err(Error::invalid(format!("BatchNorm momentum must be in [0, 1], got {m}")));
            }
        }
        match self.stats {
            BatchStats::Ghost(0) => Err(Error::invalid("ghost BN virtual batch must be at least 1")),
            BatchStats::Renorm { rmax, dmax, .. } if !(rmax >= 1.0 && dmax >= 0.0) => Err(Error::invalid(format!(
                "batch renorm needs rmax >= 1 and dmax >= 0, got {rmax}, {dmax}"
            ))),
            _ => Ok(()),
        }
    }
}

/// What the last training forward leaves for backward.
#[derive(Default)]
struct Cache {
    input: Tensor,
    /// Per (virtual batch, channel).
    mean: Vec<f64>,
    invstd: Vec<f32>,
    /// Batch Renorm's corrections per channel (r = 1, d = 0 otherwise).
    r: Vec<f32>,
    d: Vec<f32>,
    /// Lp BN's per-channel statistics.
    lp: Vec<(f64, f32, f64)>,
}

pub struct BatchNorm {
    /// 1 for BatchNorm1d ([N, C] or [N, C, L]), 2 for BatchNorm2d ([N, C, H, W]).
    pub dims: usize,
    pub channels: usize,
    pub config: BatchNormConfig,
    pub weight: Option<Param>,
    pub bias: Option<Param>,
    pub running_mean: Option<Tensor>,
    /// The running variance; for Lp BN the running Lp scale (state-dict key `running_scale`).
    pub running_var: Option<Tensor>,
    pub num_batches_tracked: i64,
    cache: Cache,
}

impl BatchNorm {
    pub fn new(dims: usize, channels: usize, config: BatchNormConfig) -> Self {
        let (weight, bias) = if config.affine {
            (
                Some(Param::new(Tensor::full(&[channels], 1.0), ParamKind::Norm)),
                Some(Param::new(Tensor::zeros(&[channels]), ParamKind::Norm)),
            )
        } else {
            (None, None)
        };
        let (running_mean, running_var) = if config.track_running_stats {
            (Some(Tensor::zeros(&[channels])), Some(Tensor::full(&[channels], 1.0)))
        } else {
            (None, None)
        };
        BatchNorm {
            dims,
            channels,
            config,
            weight,
            bias,
            running_mean,
            running_var,
            num_batches_tracked: 0,
            cache: Cache::default(),
        }
    }

    fn name(&self) -> &'static str {
        if self.dims == 1 {
            "BatchNorm1d"
        } else {
            "BatchNorm2d"
        }
    }

    /// (N, C, S) of the input, checked against the layer's dimensionality and channels.
    fn view(&self, x: &Tensor) -> Result<(usize, usize, usize)> {
        let ok_rank = match self.dims {
            1 => matches!(x.shape.len(), 2 | 3),
            _ => x.shape.len() == 4,
        };
        let want = if self.dims == 1 {
            "[N, C] or [N, C, L]"
        } else {
            "[N, C, H, W]"
        };
        if !ok_rank {
            return Err(Error::shape(
                self.name(),
                format!("expected input {want}, got {:?}", x.shape),
            ));
        }
        if x.shape[1] != self.channels {
            return Err(Error::shape(
                self.name(),
                format!("expected {} channels, got input {:?}", self.channels, x.shape),
            ));
        }
        Ok((x.shape[0], x.shape[1], x.shape[2..].iter().product()))
    }

    /// Samples per statistics set: the virtual batch for Ghost BN, else the whole batch.
    fn set_size(&self, n: usize) -> Result<usize> {
        match self.config.stats {
            BatchStats::Ghost(v) if !n.is_multiple_of(v) => Err(Error::shape(
                self.name(),
                format!("ghost BN virtual batch {v} does not divide the batch of {n}"),
            )),
            BatchStats::Ghost(v) => Ok(v),
            _ => Ok(n),
        }
    }

    /// The factor f of `running = (1 - f)·running + f·batch`, after counting this batch.
    fn next_factor(&mut self) -> f64 {
        self.num_batches_tracked += 1;
        match self.config.momentum {
            Some(m) => m,
            None => 1.0 / self.num_batches_tracked as f64,
        }
    }

    /// Batch Renorm's (rmax, dmax) at the current step.
    fn renorm_limits(&self, rmax: f64, dmax: f64, warmup: u64) -> (f64, f64) {
        let t = self.num_batches_tracked as f64;
        let w = warmup.max(1) as f64;
        let ramp = |end: f64| ((t - w / 8.0) / (end - w / 8.0)).clamp(0.0, 1.0);
        (1.0 + (rmax - 1.0) * ramp(w), dmax * ramp(w * 5.0 / 8.0))
    }

    fn gamma(&self) -> Option<&[f32]> {
        self.weight.as_ref().map(|p| p.value.data.as_slice())
    }

    fn beta_or_zero(&self, ch: usize) -> f32 {
        self.bias.as_ref().map_or(0.0, |b| b.value.data[ch])
    }

    fn gamma_or_one(&self, ch: usize) -> f32 {
        self.weight.as_ref().map_or(1.0, |w| w.value.data[ch])
    }

    /// Eval with running statistics: y = (x - running_mean)·γ/σ + β with σ = sqrt(running_var
    /// + eps), or (running_scale + eps) for Lp BN.
    fn forward_running(&self, x: &Tensor, n: usize, c: usize, s: usize) -> Tensor {
        let rm: Vec<f64> = self
            .running_mean
            .as_ref()
            .expect("tracked")
            .data
            .iter()
            .map(|&v| v as f64)
            .collect();
        let rv = &self.running_var.as_ref().expect("tracked").data;
        let mut invstd = vec![0.0f32; c];
        match self.config.stats {
            BatchStats::Lp(_) => {
                for (o, &v) in invstd.iter_mut().zip(rv) {
                    *o = (1.0 / (v as f64 + self.config.eps)) as f32;
                }
            }
            _ => k::inverse_std(rv, self.config.eps, &mut invstd),
        }
        let mut y = Tensor::zeros(&x.shape);
        let beta = self.bias.as_ref().map(|p| p.value.data.as_slice());
        k::batch_norm_apply(&x.data, n, c, s, &rm, &invstd, self.gamma(), beta, &mut y.data);
        y
    }
}

impl Layer for BatchNorm {
    fn kind(&self) -> &'static str {
        self.name()
    }

    // y = (x - mean) / sqrt(var + eps) * gamma + beta
    fn forward(&mut self, x: Tensor, mode: Mode) -> Result<Tensor> {
        let (n, c, s) = self.view(&x)?;
        if mode == Mode::Eval && self.config.track_running_stats {
            return Ok(self.forward_running(&x, n, c, s));
        }
        let v = self.set_size(n)?;
        if v * s <= 1 {
            return Err(Error::shape(
                self.name(),
                format!(
                    "Expected more than 1 value per channel when training, got input size {:?}",
                    x.shape
                ),
            ));
        }
        let sets = n / v;
        let block = v * c * s;
        let mut y = Tensor::zeros(&x.shape);
        let (mut mean, mut var) = (vec![0.0f64; sets * c], vec![0.0f32; sets * c]);
        let mut invstd = vec![0.0f32; sets * c];
        let (mut r, mut d) = (vec![1.0f32; c], vec![0.0f32; c]);
        let mut lp = Vec::new();
        match self.config.stats {
            BatchStats::Lp(kind) => {
                lp = lp_norm::lp_stats(&x.data, n, c, s, kind);
                for (ch, &(mu, scale, _)) in lp.iter().enumerate() {
                    mean[ch] = mu;
                    var[ch] = scale;
                    invstd[ch] = (1.0 / (scale as f64 + self.config.eps)) as f32;
                }
            }
            _ => {
                for j in 0..sets {
                    let xs = &x.data[j * block..(j + 1) * block];
                    k::batch_norm_stats(xs, v, c, s, &mut mean[j * c..(j + 1) * c], &mut var[j * c..(j + 1) * c]);
                }
                k::inverse_std(&var, self.config.eps, &mut invstd);
            }
        }
        if let (BatchStats::Renorm { rmax, dmax, warmup }, Some(rm), Some(rv)) =
            (self.config.stats, self.running_mean.as_ref(), self.running_var.as_ref())
        {
            let (rmax, dmax) = self.renorm_limits(rmax, dmax, warmup);
            for ch in 0..c {
                let sigma = (rv.data[ch] as f64 + self.config.eps).sqrt();
                let sigma_b = 1.0 / invstd[ch] as f64;
                r[ch] = (sigma_b / sigma).clamp(1.0 / rmax, rmax) as f32;
                d[ch] = ((mean[ch] - rm.data[ch] as f64) / sigma).clamp(-dmax, dmax) as f32;
            }
        }
        // y = γ·(x̂·r + d) + β = (x - mean)·(γ·r·invstd) + (β + γ·d)
        let shift: Vec<f32> = (0..c)
            .map(|ch| self.beta_or_zero(ch) + self.gamma_or_one(ch) * d[ch])
            .collect();
        for j in 0..sets {
            let scale: Vec<f32> = (0..c)
                .map(|ch| invstd[j * c + ch] * self.gamma_or_one(ch) * r[ch])
                .collect();
            let (xs, ys) = (
                &x.data[j * block..(j + 1) * block],
                &mut y.data[j * block..(j + 1) * block],
            );
            k::normalize_affine(xs, c, s, &mean[j * c..(j + 1) * c], &scale, &shift, ys);
        }
        if mode == Mode::Train && self.config.track_running_stats {
            let f = self.next_factor();
            // Unbiased variance over each set's v·s values; ghost sets are averaged (Keras).
            let unbias = match self.config.stats {
                BatchStats::Lp(_) => 1.0,
                _ => (v * s) as f64 / (v * s - 1) as f64,
            };
            let rm = self.running_mean.as_mut().expect("tracked");
            let rv = self.running_var.as_mut().expect("tracked");
            for ch in 0..c {
                let bm = (0..sets).map(|j| mean[j * c + ch]).sum::<f64>() / sets as f64;
                let bv = (0..sets).map(|j| var[j * c + ch] as f64).sum::<f64>() / sets as f64 * unbias;
                rm.data[ch] = ((1.0 - f) * rm.data[ch] as f64 + f * bm) as f32;
                rv.data[ch] = ((1.0 - f) * rv.data[ch] as f64 + f * bv) as f32;
            }
        }
        if mode == Mode::Train {
            self.cache = Cache {
                input: x,
                mean,
                invstd,
                r,
                d,
                lp,
            };
        }
        Ok(y)
    }

    // dx = γ·r·invstd/m · (m·dy - Σdy - x̂·Σdy·x̂) per statistics set,
    // dγ = Σdy·(x̂·r + d),  dβ = Σdy  (r = 1, d = 0 but for Batch Renorm; Lp BN has its own)
    fn backward(&mut self, mut dy: Tensor) -> Result<Tensor> {
        let x = &self.cache.input;
        if x.is_empty() || dy.shape != x.shape {
            return Err(Error::shape(
                self.name(),
                format!("gradient {:?} does not match the last forward", dy.shape),
            ));
        }
        let (n, c, s) = self.view(x)?;
        if let BatchStats::Lp(kind) = self.config.stats {
            let gamma = self.weight.as_ref().map(|p| p.value.data.clone());
            let (dg, db) = match (self.weight.as_mut(), self.bias.as_mut()) {
                (Some(w), Some(b)) => (Some(w.grad.data.as_mut_slice()), Some(b.grad.data.as_mut_slice())),
                _ => (None, None),
            };
            let (eps, lp) = (self.config.eps, &self.cache.lp);
            lp_norm::lp_backward(&x.data, &mut dy.data, n, c, s, kind, lp, eps, gamma.as_deref(), dg, db);
            return Ok(dy);
        }
        let v = self.set_size(n)?;
        let block = v * c * s;
        let (r, d) = (&self.cache.r, &self.cache.d);
        let gamma_r: Vec<f32> = (0..c).map(|ch| self.gamma_or_one(ch) * r[ch]).collect();
        let (mut dgamma, mut dbeta) = (vec![0.0f64; c], vec![0.0f64; c]);
        let (mut sum_dy, mut sum_dy_xhat) = (vec![0.0f64; c], vec![0.0f64; c]);
        for j in 0..n / v {
            let (mean, invstd) = (
                &self.cache.mean[j * c..(j + 1) * c],
                &self.cache.invstd[j * c..(j + 1) * c],
            );
            let xs = &x.data[j * block..(j + 1) * block];
            let ds = &mut dy.data[j * block..(j + 1) * block];
            k::batch_norm_grad_sums(xs, ds, v, c, s, mean, invstd, &mut sum_dy, &mut sum_dy_xhat);
            k::batch_norm_backward_input(xs, ds, v, c, s, mean, invstd, Some(&gamma_r), &sum_dy, &sum_dy_xhat);
            for ch in 0..c {
                dgamma[ch] += sum_dy_xhat[ch] * r[ch] as f64 + sum_dy[ch] * d[ch] as f64;
                dbeta[ch] += sum_dy[ch];
            }
        }
        if let (Some(w), Some(b)) = (self.weight.as_mut(), self.bias.as_mut()) {
            for ch in 0..c {
                w.grad.data[ch] += dgamma[ch] as f32;
                b.grad.data[ch] += dbeta[ch] as f32;
            }
        }
        Ok(dy)
    }

    fn params(&mut self) -> Vec<(&'static str, &mut Param)> {
        let mut v = Vec::new();
        if let Some(w) = self.weight.as_mut() {
            v.push(("weight", w));
        }
        if let Some(b) = self.bias.as_mut() {
            v.push(("bias", b));
        }
        v
    }

    fn buffers(&mut self) -> Vec<(&'static str, BufferMut<'_>)> {
        let var_key = if matches!(self.config.stats, BatchStats::Lp(_)) {
            "running_scale"
        } else {
            "running_var"
        };
        match (self.running_mean.as_mut(), self.running_var.as_mut()) {
            (Some(rm), Some(rv)) => vec![
                ("running_mean", BufferMut::F32(rm)),
                (var_key, BufferMut::F32(rv)),
                ("num_batches_tracked", BufferMut::I64(&mut self.num_batches_tracked)),
            ],
            _ => Vec::new(),
        }
    }
}
