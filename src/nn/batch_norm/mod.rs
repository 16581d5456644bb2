//! BatchNorm1d / BatchNorm2d with PyTorch semantics (biased variance to normalize, unbiased
//! variance into running_var, momentum or cumulative averaging, optional affine and running
//! statistics), and the variants that change only how batch statistics are computed or
//! combined: Ghost BN (virtual batches), Batch Renormalization (r, d corrections toward the
//! running statistics) and Lp-norm BN (L1 or L∞ scale instead of the standard deviation).

mod running;
mod sync;

use std::sync::Arc;

use rayon::prelude::*;

use crate::dist::Communicator;
use crate::error::{Error, Result};
use crate::kernels::batch_norm::{self as k, ChannelAffine, ChannelGrad, ChannelStats, ChannelSums, Ncs};
use crate::kernels::lp_norm::{self, LpKind};
use crate::nn::layer::{running_buffers, visit_weight_bias, BufferMut, Layer, Mode, Param, ParamKind, StatsMode};
use crate::onnx::graph::{channel_shape, relu_if, OnnxGraph};
use crate::onnx::norms::{affine_or, batch_normalization};
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
    /// Synchronized BN: in training, statistics over the global batch of every process of a
    /// data-parallel job (PyTorch's SyncBatchNorm); with one process, exactly `Standard`.
    Sync,
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

/// Per-step working state, sized once and reused: statistics of the last training forward and
/// what backward derives from them.
#[derive(Default)]
struct Scratch {
    /// Per (virtual batch, channel).
    stats: Vec<ChannelStats>,
    /// Batch Renorm's corrections per channel (r = 1, d = 0 otherwise).
    r: Vec<f32>,
    d: Vec<f32>,
    /// Lp BN's per-channel (mean, scale, backward term).
    lp: Vec<(f64, f32, f64)>,
    grads: Vec<ChannelGrad>,
    sums: Vec<ChannelSums>,
    lp_sums: Vec<(f64, f64)>,
    /// Fixed-statistics apply: mean, scale, shift per channel.
    mean: Vec<f64>,
    scale: Vec<f32>,
    shift: Vec<f32>,
    /// The streaming kernels' scratch.
    ws: k::Workspace,
    /// SyncBN: per-channel values all-reduced over the processes.
    global: Vec<f64>,
}

pub struct BatchNorm {
    /// 1 for BatchNorm1d ([N, C] or [N, C, L]), 2 for BatchNorm2d ([N, C, H, W]).
    pub dims: usize,
    pub channels: usize,
    pub config: BatchNormConfig,
    /// A ReLU fused after the affine (forward and backward), when the model has one there.
    pub relu: bool,
    pub weight: Option<Param>,
    pub bias: Option<Param>,
    pub running_mean: Option<Tensor>,
    /// The running variance; for Lp BN the running Lp scale (state-dict key `running_scale`).
    pub running_var: Option<Tensor>,
    pub num_batches_tracked: i64,
    /// How the running statistics are used (frozen BN, recalibration, batch-statistics eval).
    pub stats_mode: StatsMode,
    /// The last forward normalized with the running statistics (backward is then the
    /// eval-mode one).
    last_running: bool,
    /// SyncBN: the processes whose global batch the statistics cover (none: this one alone).
    comm: Option<Arc<dyn Communicator>>,
    /// The last forward took statistics over all processes; m is their global value count.
    last_sync: Option<f64>,
    scratch: Scratch,
}

impl BatchNorm {
    /// Gives a SyncBN the processes it takes statistics over; returns 1 for a SyncBN, 0 for
    /// any other variant (which keeps its own statistics).
    pub fn set_communicator(&mut self, comm: &Arc<dyn Communicator>) -> usize {
        if self.config.stats != BatchStats::Sync {
            return 0;
        }
        self.comm = Some(comm.clone());
        1
    }

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
            relu: false,
            stats_mode: StatsMode::Normal,
            last_running: false,
            comm: None,
            last_sync: None,
            scratch: Scratch::default(),
        }
    }

    /// The same layer with a ReLU fused after it.
    pub fn with_relu(mut self) -> Self {
        self.relu = true;
        self
    }

    fn name(&self) -> &'static str {
        match (self.dims, self.relu) {
            (1, false) => "BatchNorm1d",
            (1, true) => "BatchNorm1d+ReLU",
            (_, false) => "BatchNorm2d",
            (_, true) => "BatchNorm2d+ReLU",
        }
    }

    /// (N, C, S) of the input, checked against the layer's dimensionality and channels.
    fn view(&self, x: &Tensor) -> Result<Ncs> {
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
        Ok(Ncs::new(x.shape[0], x.shape[1], x.shape[2..].iter().product()))
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
            // Recalibration averages its batches with equal weights, whatever the momentum.
            Some(m) if self.stats_mode != StatsMode::Accumulate => m,
            _ => 1.0 / self.num_batches_tracked as f64,
        }
    }

    /// Batch Renorm's (rmax, dmax) at the current step.
    fn renorm_limits(&self, rmax: f64, dmax: f64, warmup: u64) -> (f64, f64) {
        let t = self.num_batches_tracked as f64;
        let w = warmup.max(1) as f64;
        let ramp = |end: f64| ((t - w / 8.0) / (end - w / 8.0)).clamp(0.0, 1.0);
        (1.0 + (rmax - 1.0) * ramp(w), dmax * ramp(w * 5.0 / 8.0))
    }

    /// dγ += Σdy·x̂ and dβ += Σdy per channel (no-op without an affine).
    fn add_affine_grads(&mut self, sums: &[ChannelSums]) {
        if let (Some(w), Some(b)) = (self.weight.as_mut(), self.bias.as_mut()) {
            for (ch, sum) in sums.iter().enumerate() {
                w.grad.data[ch] += sum.sum_dy_xhat as f32;
                b.grad.data[ch] += sum.sum_dy as f32;
            }
        }
    }

    fn gamma_or_one(&self, ch: usize) -> f32 {
        self.weight.as_ref().map_or(1.0, |w| w.value.data[ch])
    }

    fn beta_or_zero(&self, ch: usize) -> f32 {
        self.bias.as_ref().map_or(0.0, |b| b.value.data[ch])
    }

    // Standard, Ghost and (one-process) Sync BN, per statistics set of v samples: shifted sums
    // of x per channel, then y = act((x − μ_B)·γ/sqrt(σ²_B + eps) + β) in one streamed pass.
    fn forward_batch(&self, sc: &mut Scratch, x: &Tensor, y: &mut Tensor, set: Ncs) {
        let (c, block, eps, relu) = (set.c, set.len(), self.config.eps, self.relu);
        let sets = x.batch() / set.n;
        let gamma = self.weight.as_ref().map(|p| p.value.data.as_slice());
        let beta = self.bias.as_ref().map(|p| p.value.data.as_slice());
        let affine = |ch: usize, st: ChannelStats| {
            (
                k::inverse_std(st.var, eps) * gamma.map_or(1.0, |g| g[ch]),
                beta.map_or(0.0, |b| b[ch]),
            )
        };
        for j in 0..sets {
            let r = j * block..(j + 1) * block;
            let st = &mut sc.stats[j * c..(j + 1) * c];
            k::batch_norm_forward_train(&x.data[r.clone()], &mut y.data[r], set, relu, st, &affine, &mut sc.ws);
        }
    }

    // Batch Renorm: batch statistics per channel, r = clip(σ_B/σ, 1/rmax, rmax) and
    // d = clip((μ_B − μ)/σ, ±dmax) from the running ones, y = act(γ·(x̂·r + d) + β).
    fn forward_renorm(&self, sc: &mut Scratch, x: &Tensor, y: &mut Tensor, shape: Ncs, limits: (f64, f64, u64)) {
        let (c, eps) = (shape.c, self.config.eps);
        sc.stats
            .par_iter_mut()
            .enumerate()
            .for_each(|(ch, st)| *st = k::channel_stats(&x.data, shape, ch));
        if let (Some(rm), Some(rv)) = (self.running_mean.as_ref(), self.running_var.as_ref()) {
            let (rmax, dmax) = self.renorm_limits(limits.0, limits.1, limits.2);
            for ch in 0..c {
                let sigma = (rv.data[ch] as f64 + eps).sqrt();
                let sigma_b = (sc.stats[ch].var as f64 + eps).sqrt();
                sc.r[ch] = (sigma_b / sigma).clamp(1.0 / rmax, rmax) as f32;
                sc.d[ch] = ((sc.stats[ch].mean - rm.data[ch] as f64) / sigma).clamp(-dmax, dmax) as f32;
            }
        }
        self.apply_fixed(sc, x, y, shape, |sc, ch| {
            k::inverse_std(sc.stats[ch].var, eps) * sc.r[ch]
        });
    }

    // Lp BN (Santurkar et al.): centre by the batch mean, divide by the mean L1 norm (or the L∞
    // norm) of the centred values + eps; y = act(γ·z/scale + β).
    fn forward_lp(&self, sc: &mut Scratch, x: &Tensor, y: &mut Tensor, shape: Ncs, kind: LpKind) {
        let eps = self.config.eps;
        sc.lp.resize(shape.c, (0.0, 0.0, 0.0));
        lp_norm::lp_stats(&x.data, shape.n, shape.c, shape.s, kind, &mut sc.lp);
        for (st, lp) in sc.stats.iter_mut().zip(&sc.lp) {
            *st = ChannelStats { mean: lp.0, var: lp.1 };
        }
        self.apply_fixed(sc, x, y, shape, |sc, ch| (1.0 / (sc.lp[ch].1 as f64 + eps)) as f32);
    }

    /// y = act((x - mean)·γ·inv(ch) + β + γ·d) with the statistics in `sc.stats` (one set):
    /// Batch Renorm (inv = r·invstd) and Lp BN (inv = 1/(scale + eps)).
    fn apply_fixed(
        &self,
        sc: &mut Scratch,
        x: &Tensor,
        y: &mut Tensor,
        shape: Ncs,
        inv: impl Fn(&Scratch, usize) -> f32,
    ) {
        let (mut mean, mut scale, mut shift) = (
            std::mem::take(&mut sc.mean),
            std::mem::take(&mut sc.scale),
            std::mem::take(&mut sc.shift),
        );
        mean.clear();
        scale.clear();
        shift.clear();
        for ch in 0..shape.c {
            mean.push(sc.stats[ch].mean);
            scale.push(inv(sc, ch) * self.gamma_or_one(ch));
            shift.push(self.beta_or_zero(ch) + self.gamma_or_one(ch) * sc.d[ch]);
        }
        let affine = ChannelAffine {
            mean: &mean,
            scale: &scale,
            shift: &shift,
        };
        k::batch_norm_forward_fixed(&x.data, &mut y.data, shape, affine, self.relu);
        (sc.mean, sc.scale, sc.shift) = (mean, scale, shift);
    }
}

impl Layer for BatchNorm {
    fn kind(&self) -> &'static str {
        self.name()
    }

    // Eval mode: BatchNormalization with the running statistics; Lp BN (whose running scale
    // is not a variance) as its per-channel affine x·s + t, s = γ/(scale + eps), t = β − mean·s.
    fn export_onnx(&self, g: &mut OnnxGraph, x: &str, name: &str) -> Result<String> {
        let (Some(rm), Some(rv)) = (&self.running_mean, &self.running_var) else {
            return Err(Error::invalid(format!(
                "{name}: BatchNorm without running statistics (track=false) normalizes with each batch's \
                 statistics even in eval mode, which an exported model cannot do; train with running \
                 statistics (the default bn) to export"
            )));
        };
        let affine = (
            self.weight.as_ref().map(|p| p.value.data.as_slice()),
            self.bias.as_ref().map(|p| p.value.data.as_slice()),
        );
        let y = if let BatchStats::Lp(_) = self.config.stats {
            let c = self.channels;
            let gamma = affine_or(affine.0, &[c], 1.0);
            let beta = affine_or(affine.1, &[c], 0.0);
            let s: Vec<f64> = (0..c)
                .map(|i| gamma[i] as f64 / (rv.data[i] as f64 + self.config.eps))
                .collect();
            let t: Vec<f32> = (0..c)
                .map(|i| (beta[i] as f64 - rm.data[i] as f64 * s[i]) as f32)
                .collect();
            let s: Vec<f32> = s.iter().map(|&v| v as f32).collect();
            let rank = g.rank(x)?;
            let shape = channel_shape(c, rank);
            let s = g.constant(&format!("{name}.eval_scale"), &shape, &s)?;
            let t = g.constant(&format!("{name}.eval_shift"), &shape, &t)?;
            let scaled = g.node("Mul", &[x, &s], &[], rank);
            g.node("Add", &[&scaled, &t], &[], rank)
        } else {
            batch_normalization(g, x, name, affine, (&rm.data, &rv.data), self.config.eps)?
        };
        Ok(relu_if(g, y, self.relu))
    }

    // y = (x - mean) / sqrt(var + eps) * gamma + beta   (then max(·, 0) when fused)
    fn forward(&mut self, x: &Tensor, y: &mut Tensor, mode: Mode) -> Result<()> {
        let shape = self.view(x)?;
        let Ncs { n, c, s } = shape;
        y.resize_to(&x.shape)?;
        self.last_running = self.config.track_running_stats && self.stats_mode.uses_running(mode);
        if self.last_running {
            self.forward_running(x, y, shape);
            return Ok(());
        }
        self.last_sync = None;
        if let Some(comm) = self.sync_comm(mode) {
            return self.forward_sync(x, y, mode, shape, &*comm);
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
        let mut sc = std::mem::take(&mut self.scratch);
        sc.stats.resize(sets * c, ChannelStats::default());
        sc.r.clear();
        sc.r.resize(c, 1.0);
        sc.d.clear();
        sc.d.resize(c, 0.0);
        match self.config.stats {
            BatchStats::Standard | BatchStats::Ghost(_) | BatchStats::Sync => {
                self.forward_batch(&mut sc, x, y, shape.with_batch(v))
            }
            BatchStats::Renorm { rmax, dmax, warmup } => {
                self.forward_renorm(&mut sc, x, y, shape, (rmax, dmax, warmup))
            }
            BatchStats::Lp(kind) => self.forward_lp(&mut sc, x, y, shape, kind),
        }
        self.scratch = sc;
        if self.stats_mode.updates_running(mode) {
            self.update_running_stats(c, sets, v * s);
        }
        Ok(())
    }

    // dx = γ·r·invstd/m · (m·dy - Σdy - x̂·Σdy·x̂) per statistics set,
    // dγ = Σdy·(x̂·r + d),  dβ = Σdy  (r = 1, d = 0 but for Batch Renorm; Lp BN has its own)
    fn backward(&mut self, x: &Tensor, y: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
        let shape = self.view(x)?;
        let Ncs { n, c, s } = shape;
        if dy.shape != x.shape || y.shape != x.shape {
            return Err(Error::shape(
                self.name(),
                format!("gradient {:?} does not match the input {:?}", dy.shape, x.shape),
            ));
        }
        if self.last_running {
            self.backward_running(x, y, dy, dx, shape)?;
            return Ok(());
        }
        if let (Some(m), Some(comm)) = (self.last_sync, self.comm.clone()) {
            self.backward_sync(x, y, dy, dx, shape, m, &*comm)?;
            return Ok(());
        }
        let v = self.set_size(n)?;
        if self.scratch.stats.len() != (n / v) * c {
            return Err(Error::invalid(format!(
                "{} backward needs a training forward first",
                self.name()
            )));
        }
        dx.resize_to(&x.shape)?;
        let mut sc = std::mem::take(&mut self.scratch);
        let (eps, relu) = (self.config.eps, self.relu);
        if let BatchStats::Lp(kind) = self.config.stats {
            let gamma = self.weight.as_ref().map(|p| p.value.data.as_slice());
            sc.lp_sums.resize(c, (0.0, 0.0));
            lp_norm::lp_backward(
                &x.data,
                &y.data,
                &dy.data,
                &mut dx.data,
                n,
                c,
                s,
                kind,
                relu,
                &sc.lp,
                eps,
                gamma,
                &mut sc.lp_sums,
            );
            if let (Some(w), Some(b)) = (self.weight.as_mut(), self.bias.as_mut()) {
                for ch in 0..c {
                    w.grad.data[ch] += sc.lp_sums[ch].1 as f32;
                    b.grad.data[ch] += sc.lp_sums[ch].0 as f32;
                }
            }
            self.scratch = sc;
            return Ok(());
        }
        let block = v * c * s;
        sc.grads.resize(c, ChannelGrad::default());
        sc.sums.resize(c, ChannelSums::default());
        for j in 0..n / v {
            for ch in 0..c {
                let st = sc.stats[j * c + ch];
                let gain = self.gamma_or_one(ch) * sc.r[ch];
                sc.grads[ch] = ChannelGrad {
                    mean: st.mean,
                    invstd: k::inverse_std(st.var, eps),
                    gain,
                };
            }
            let r = j * block..(j + 1) * block;
            k::batch_norm_backward_train(
                &x.data[r.clone()],
                &y.data[r.clone()],
                &dy.data[r.clone()],
                &mut dx.data[r],
                shape.with_batch(v),
                relu,
                &sc.grads,
                &mut sc.sums,
                &mut sc.ws,
            );
            if let (Some(w), Some(b)) = (self.weight.as_mut(), self.bias.as_mut()) {
                for ch in 0..c {
                    let sum = sc.sums[ch];
                    w.grad.data[ch] += (sum.sum_dy_xhat * sc.r[ch] as f64 + sum.sum_dy * sc.d[ch] as f64) as f32;
                    b.grad.data[ch] += sum.sum_dy as f32;
                }
            }
        }
        self.scratch = sc;
        Ok(())
    }

    fn visit_params<'a>(&'a mut self, f: &mut dyn FnMut(&'static str, &'a mut Param)) {
        visit_weight_bias(self.weight.as_mut(), self.bias.as_mut(), f);
    }

    fn visit_parts(&mut self, f: &mut dyn FnMut(&mut dyn std::any::Any)) {
        f(self);
    }

    fn set_stats_mode(&mut self, mode: StatsMode) -> usize {
        if !self.config.track_running_stats {
            return 0;
        }
        self.stats_mode = mode;
        let frozen = matches!(mode, StatsMode::Frozen { affine: true });
        self.visit_params(&mut |_, p| p.frozen = frozen);
        1
    }

    fn buffers(&mut self) -> Vec<(&'static str, BufferMut<'_>)> {
        let var_key = if matches!(self.config.stats, BatchStats::Lp(_)) {
            "running_scale"
        } else {
            "running_var"
        };
        running_buffers(
            self.running_mean.as_mut(),
            self.running_var.as_mut(),
            var_key,
            &mut self.num_batches_tracked,
        )
    }
}
