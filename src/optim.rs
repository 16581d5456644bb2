//! Optimizers with PyTorch's update rules (SGD with momentum/nesterov, Adam, AdamW) and
//! per-epoch learning-rate schedules.

use std::str::FromStr;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::kernels::simd::multiversion;
use crate::nn::{ParamKind, Sequential};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Sgd,
    Adam,
    Adamw,
}

impl FromStr for OptimizerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sgd" => Ok(OptimizerKind::Sgd),
            "adam" => Ok(OptimizerKind::Adam),
            "adamw" => Ok(OptimizerKind::Adamw),
            _ => Err(Error::invalid(format!(
                "unknown optimizer '{s}' (known: sgd, adam, adamw)"
            ))),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    pub lr: f64,
    /// SGD momentum, or Adam's beta1.
    pub momentum: f64,
    pub beta2: f64,
    pub eps: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    /// When true, norm parameters (gamma, beta) and biases get no weight decay.
    pub no_decay_norm_and_bias: bool,
}

impl OptimizerConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(Error::invalid(format!("--lr must be > 0, got {}", self.lr)));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(Error::invalid(format!(
                "--momentum must be in [0, 1), got {}",
                self.momentum
            )));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(Error::invalid(format!(
                "--weight-decay must be >= 0, got {}",
                self.weight_decay
            )));
        }
        if self.nesterov && (self.kind != OptimizerKind::Sgd || self.momentum == 0.0) {
            return Err(Error::invalid("--nesterov needs --optimizer sgd with --momentum > 0"));
        }
        Ok(())
    }
}

/// Per-parameter state, in the model's parameter order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Optimizer {
    pub config: OptimizerConfig,
    /// Number of steps taken (Adam's t).
    pub step: u64,
    /// SGD momentum buffers, or Adam's first moments.
    pub first: Vec<Vec<f32>>,
    /// Adam's second moments (empty for SGD).
    pub second: Vec<Vec<f32>>,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            kind: OptimizerKind::Adam,
            lr: 1e-3,
            momentum: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            nesterov: false,
            weight_decay: 0.0,
            no_decay_norm_and_bias: false,
        }
    }
}

impl Optimizer {
    pub fn new(config: OptimizerConfig) -> Self {
        Optimizer {
            config,
            step: 0,
            first: Vec::new(),
            second: Vec::new(),
        }
    }

    /// One update of every parameter of `net` with learning rate `lr` (the schedule's value now).
    pub fn step(&mut self, net: &mut Sequential, lr: f64) {
        if self.first.is_empty() {
            let kind = self.config.kind;
            let (first, second) = (&mut self.first, &mut self.second);
            net.visit_params(&mut |p| {
                first.push(vec![0.0; p.value.len()]);
                if kind != OptimizerKind::Sgd {
                    second.push(vec![0.0; p.value.len()]);
                }
            });
        }
        self.step = self.step.saturating_add(1);
        // Past i32::MAX steps β^t is 0 in f64 anyway; a wrapped cast would make it β^-1.
        let t = i32::try_from(self.step).unwrap_or(i32::MAX);
        let cfg = &self.config;
        let (first, second) = (&mut self.first, &mut self.second);
        let mut i = 0;
        net.visit_params(&mut |p| {
            if p.frozen {
                // Not trained: no update, no decay, its state stays zero (requires_grad=False).
                i += 1;
                return;
            }
            let decays = !(cfg.no_decay_norm_and_bias && matches!(p.kind, ParamKind::Norm | ParamKind::Bias));
            let wd = if decays { cfg.weight_decay } else { 0.0 };
            let (w, g) = (&mut p.value.data, &p.grad.data);
            match cfg.kind {
                OptimizerKind::Sgd => sgd_update(w, g, &mut first[i], lr, cfg.momentum, cfg.nesterov, wd, t == 1),
                OptimizerKind::Adam => adam_update(w, g, &mut first[i], &mut second[i], lr, cfg, wd, 0.0, t),
                OptimizerKind::Adamw => adam_update(w, g, &mut first[i], &mut second[i], lr, cfg, 0.0, wd, t),
            }
            i += 1;
        });
    }
}

/// Values per parallel task of an update. A parameter of fewer than two runs in place: each
/// value's update is independent of the others, so the split changes no bit.
const UPDATE_CHUNK: usize = 1 << 14;

// d = g + wd·w;  buf = μ·buf + d (buf = d on the first step);  w -= lr·(nesterov ? d + μ·buf : buf)
#[allow(clippy::too_many_arguments)]
fn sgd_update(w: &mut [f32], g: &[f32], buf: &mut [f32], lr: f64, mu: f64, nesterov: bool, wd: f64, first: bool) {
    let (lr, mu, wd) = (lr as f32, mu as f32, wd as f32);
    if w.len() < 2 * UPDATE_CHUNK {
        return sgd_chunk(w, g, buf, lr, mu, nesterov, wd, first);
    }
    w.par_chunks_mut(UPDATE_CHUNK)
        .zip(g.par_chunks(UPDATE_CHUNK).zip(buf.par_chunks_mut(UPDATE_CHUNK)))
        .for_each(|(w, (g, buf))| sgd_chunk(w, g, buf, lr, mu, nesterov, wd, first));
}

multiversion! {
    /// `sgd_update` on one run of values.
    fn sgd_chunk(w: &mut [f32], g: &[f32], buf: &mut [f32], lr: f32, mu: f32, nesterov: bool, wd: f32, first: bool) {
        for ((wv, &gv), b) in w.iter_mut().zip(g).zip(buf.iter_mut()) {
            let mut d = gv + wd * *wv;
            if mu != 0.0 {
                *b = if first { d } else { mu * *b + d };
                d = if nesterov { d + mu * *b } else { *b };
            }
            *wv -= lr * d;
        }
    }
}

// w *= 1 - lr·decoupled;  d = g + l2·w;  m = β1·m + (1-β1)·d;  v = β2·v + (1-β2)·d²;
// w -= lr/(1-β1ᵗ) · m / (√v/√(1-β2ᵗ) + eps)
#[allow(clippy::too_many_arguments)]
fn adam_update(
    w: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    lr: f64,
    cfg: &OptimizerConfig,
    l2: f64,
    decoupled: f64,
    t: i32,
) {
    let (b1, b2) = (cfg.momentum, cfg.beta2);
    let step_size = (lr / (1.0 - b1.powi(t))) as f32;
    let bc2_sqrt = (1.0 - b2.powi(t)).sqrt() as f32;
    let shrink = (1.0 - lr * decoupled) as f32;
    let (b1, b2, eps, l2) = (b1 as f32, b2 as f32, cfg.eps as f32, l2 as f32);
    let decays = decoupled != 0.0;
    let k = AdamConstants {
        b1,
        b2,
        eps,
        l2,
        shrink,
        step_size,
        bc2_sqrt,
    };
    if w.len() < 2 * UPDATE_CHUNK {
        return adam_chunk(w, g, m, v, &k, decays);
    }
    w.par_chunks_mut(UPDATE_CHUNK)
        .zip(g.par_chunks(UPDATE_CHUNK))
        .zip(m.par_chunks_mut(UPDATE_CHUNK).zip(v.par_chunks_mut(UPDATE_CHUNK)))
        .for_each(|((w, g), (m, v))| adam_chunk(w, g, m, v, &k, decays));
}

/// One Adam step's constants in f32.
struct AdamConstants {
    b1: f32,
    b2: f32,
    eps: f32,
    l2: f32,
    shrink: f32,
    step_size: f32,
    bc2_sqrt: f32,
}

multiversion! {
    /// `adam_update` on one run of values (`decays`: the decoupled shrink applies).
    fn adam_chunk(w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &AdamConstants, decays: bool) {
        for (((wv, &gv), mv), vv) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            if decays {
                *wv *= k.shrink;
            }
            let d = gv + k.l2 * *wv;
            *mv = k.b1 * *mv + (1.0 - k.b1) * d;
            *vv = k.b2 * *vv + (1.0 - k.b2) * d * d;
            *wv -= k.step_size * *mv / (vv.sqrt() / k.bc2_sqrt + k.eps);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    /// ×0.1 at 50% and again at 75% of the epochs (the network-slimming schedule).
    Step,
    /// Cosine annealing from lr to 0 over the epochs (PyTorch's CosineAnnealingLR, T_max = epochs).
    Cosine,
}

impl FromStr for Schedule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(Schedule::Constant),
            "step" => Ok(Schedule::Step),
            "cosine" => Ok(Schedule::Cosine),
            _ => Err(Error::invalid(format!(
                "unknown schedule '{s}' (known: constant, step, cosine)"
            ))),
        }
    }
}

impl Schedule {
    /// The learning rate for 0-based `epoch` of `epochs`.
    pub fn lr(&self, base: f64, epoch: usize, epochs: usize) -> f64 {
        match self {
            Schedule::Constant => base,
            Schedule::Step => {
                let mut lr = base;
                for milestone in [epochs / 2, epochs * 3 / 4] {
                    if milestone > 0 && epoch >= milestone {
                        lr *= 0.1;
                    }
                }
                lr
            }
            Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * epoch as f64 / epochs.max(1) as f64).cos()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_follow_their_definitions() {
        assert_eq!(Schedule::Constant.lr(0.1, 7, 10), 0.1);
        let step: Vec<f64> = (0..8).map(|e| Schedule::Step.lr(1.0, e, 8)).collect();
        assert_eq!(step[3], 1.0);
        assert!((step[4] - 0.1).abs() < 1e-12 && (step[6] - 0.01).abs() < 1e-12);
        assert!((Schedule::Cosine.lr(1.0, 5, 10) - 0.5).abs() < 1e-12);
        assert_eq!(Schedule::Cosine.lr(1.0, 0, 10), 1.0);
    }
}
