//! LSTM with PyTorch's nn.LSTM semantics (batch-first input, gates i, f, g, o, zero initial
//! states, U(-1/√H, 1/√H) initialization, `weight_ih_l{k}` ... names), stacked, with a norm
//! inside the recurrence:
//! - `Layer`: the LN-LSTM of Ba, Kiros & Hinton 2016: LN of W_ih·x and of W_hh·h separately
//!   (over the 4H gate pre-activations, each with its own gain and bias) and of the cell state
//!   before its tanh;
//! - `Batch { per_step: true }`: the recurrent BN of Cooijmans et al. 2016: BN of W_ih·x and
//!   W_hh·h (γ only, initialized to 0.1; the LSTM bias is the shift) and of the cell (γ, β),
//!   batch statistics of each time step, and running statistics kept per time step;
//! - `Batch { per_step: false }`: the naive use, one set of running statistics shared by every
//!   time step (what a BatchNorm module called inside the time loop does).
//!
//! The model reads an image [N, 1, T, I] as T time steps of I pixels and outputs the last
//! hidden state of the top layer [N, H]. Every buffer backward needs is sized on the first
//! batch and reused.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::kernels::lstm::{self as k, NormStats};
use crate::kernels::matmul::{matmul, Op};
use crate::nn::layer::{BufferMut, Layer, Mode, Param, ParamKind};
use crate::onnx::graph::{Attr, OnnxGraph};
use crate::tensor::Tensor;

/// Layers of one LSTM stack (PyTorch allows any; the limit keeps specs sane).
pub const MAX_LAYERS: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RecurrentNorm {
    None,
    Layer { eps: f64 },
    Batch { eps: f64, momentum: f64, per_step: bool },
}

/// A name that lives as long as the process: state-dict keys are `&'static str`, and an LSTM's
/// depend on its layer index. Interned once per distinct name (a few per layer).
fn intern(s: String) -> &'static str {
    static POOL: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut pool = POOL
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(&name) = pool.get(s.as_str()) {
        return name;
    }
    let name: &'static str = Box::leak(s.into_boxed_str());
    pool.insert(name);
    name
}

/// One normalization site of the recurrence (x, h or c) over `features` values.
struct Site {
    features: usize,
    gamma: Param,
    beta: Option<Param>,
    /// BN: [T, F] per step or [F] shared.
    running_mean: Option<Tensor>,
    running_var: Option<Tensor>,
    names: [&'static str; 4],
}

impl Site {
    fn new(norm: RecurrentNorm, features: usize, steps: usize, with_beta: bool, prefix: String) -> Option<Site> {
        let (gamma0, running) = match norm {
            RecurrentNorm::None => return None,
            RecurrentNorm::Layer { .. } => (1.0, None),
            RecurrentNorm::Batch { per_step, .. } => {
                let shape = if per_step {
                    vec![steps, features]
                } else {
                    vec![features]
                };
                (0.1, Some(shape))
            }
        };
        Some(Site {
            features,
            gamma: Param::new(Tensor::full(&[features], gamma0), ParamKind::Norm),
            beta: with_beta.then(|| Param::new(Tensor::zeros(&[features]), ParamKind::Norm)),
            running_mean: running.as_ref().map(|s| Tensor::zeros(s)),
            running_var: running.as_ref().map(|s| Tensor::full(s, 1.0)),
            names: [
                intern(format!("{prefix}.weight")),
                intern(format!("{prefix}.bias")),
                intern(format!("{prefix}.running_mean")),
                intern(format!("{prefix}.running_var")),
            ],
        })
    }

    /// Normalizes step `t`'s [rows, F] values `z` into `y`; `stats` gets the statistics the
    /// backward needs (per row for LN, per feature for BN).
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &mut self,
        norm: RecurrentNorm,
        z: &[f32],
        t: usize,
        train: bool,
        y: &mut [f32],
        stats: &mut [NormStats],
    ) -> Result<()> {
        let (f, gamma, beta) = (
            self.features,
            Some(self.gamma.value.data.as_slice()),
            self.beta.as_ref().map(|b| b.value.data.as_slice()),
        );
        match norm {
            RecurrentNorm::None => y.copy_from_slice(z),
            RecurrentNorm::Layer { eps } => k::row_norm_forward(z, f, gamma, beta, eps, y, stats),
            RecurrentNorm::Batch {
                eps,
                momentum,
                per_step,
            } => {
                let (rm, rv) = match (self.running_mean.as_mut(), self.running_var.as_mut()) {
                    (Some(m), Some(v)) => (m, v),
                    _ => return Err(Error::invalid("BN-LSTM site without running statistics")),
                };
                let at = if per_step { t * f } else { 0 };
                let rows = z.len() / f;
                if train {
                    if rows < 2 {
                        return Err(Error::invalid(
                            "BN-LSTM needs more than one sample per time step to compute batch statistics; \
                             use a --batch-size (and a last batch) of at least 2",
                        ));
                    }
                    k::col_norm_forward(z, f, gamma, beta, eps, y, stats);
                    let unbiased = rows as f64 / (rows - 1) as f64;
                    for (j, st) in stats.iter().enumerate().take(f) {
                        let var = 1.0 / (st.rstd * st.rstd) - eps;
                        let (m, v) = (&mut rm.data[at + j], &mut rv.data[at + j]);
                        *m = ((1.0 - momentum) * *m as f64 + momentum * st.mean) as f32;
                        *v = ((1.0 - momentum) * *v as f64 + momentum * var * unbiased) as f32;
                    }
                } else {
                    for (j, st) in stats.iter_mut().enumerate().take(f) {
                        *st = NormStats {
                            mean: rm.data[at + j] as f64,
                            rstd: 1.0 / (rv.data[at + j] as f64 + eps).sqrt(),
                        };
                    }
                    k::col_norm_apply(z, f, gamma, beta, stats, y);
                }
            }
        }
        Ok(())
    }

    fn backward(&mut self, norm: RecurrentNorm, z: &[f32], stats: &[NormStats], dy: &[f32], dz: &mut [f32]) {
        let gamma = Some(self.gamma.value.data.as_slice());
        let dgamma = Some(self.gamma.grad.data.as_mut_slice());
        let dbeta = self.beta.as_mut().map(|b| b.grad.data.as_mut_slice());
        match norm {
            RecurrentNorm::None => dz.copy_from_slice(dy),
            RecurrentNorm::Layer { .. } => k::row_norm_backward(z, self.features, stats, gamma, dy, dgamma, dbeta, dz),
            RecurrentNorm::Batch { .. } => k::col_norm_backward(z, self.features, stats, gamma, dy, dgamma, dbeta, dz),
        }
    }
}

/// One layer of the stack, with its caches (time-major: step t's [N, ·] block at t·N·width).
pub struct LstmLayer {
    pub input: usize,
    pub hidden: usize,
    pub weight_ih: Param,
    pub weight_hh: Param,
    pub bias_ih: Param,
    pub bias_hh: Param,
    sites: [Option<Site>; 3],
    names: [&'static str; 4],
    // Forward caches.
    xin: Vec<f32>,
    zx: Vec<f32>,
    zh: Vec<f32>,
    gates: Vec<f32>,
    /// (T+1)·N·H: c[0] = 0.
    c: Vec<f32>,
    cn: Vec<f32>,
    tc: Vec<f32>,
    /// (T+1)·N·H: h[0] = 0.
    h: Vec<f32>,
    stats: [Vec<NormStats>; 3],
    // Backward scratch.
    nx: Vec<f32>,
    da: Vec<f32>,
    dzx: Vec<f32>,
    dzh: Vec<f32>,
    dh: Vec<f32>,
    dc_next: Vec<f32>,
    dcn: Vec<f32>,
    dc: Vec<f32>,
    /// dL/d(input sequence), time-major.
    dx: Vec<f32>,
}

impl LstmLayer {
    fn new(
        index: usize,
        input: usize,
        hidden: usize,
        steps: usize,
        norm: RecurrentNorm,
        rng: &mut impl rand::Rng,
    ) -> Self {
        let g = 4 * hidden;
        let p = |shape: &[usize], rng: &mut dyn rand::RngCore, kind| {
            let mut r = rng;
            let v = crate::nn::init::uniform_fan_in(&mut r, shape.iter().product(), hidden);
            Param::new(
                Tensor {
                    shape: shape.to_vec(),
                    data: v,
                },
                kind,
            )
        };
        let prefix = match norm {
            RecurrentNorm::Layer { .. } => "ln",
            _ => "bn",
        };
        LstmLayer {
            input,
            hidden,
            weight_ih: p(&[g, input], rng, ParamKind::Weight),
            weight_hh: p(&[g, hidden], rng, ParamKind::Weight),
            bias_ih: p(&[g], rng, ParamKind::Bias),
            bias_hh: p(&[g], rng, ParamKind::Bias),
            sites: [
                Site::new(
                    norm,
                    g,
                    steps,
                    matches!(norm, RecurrentNorm::Layer { .. }),
                    format!("{prefix}_ih_l{index}"),
                ),
                Site::new(
                    norm,
                    g,
                    steps,
                    matches!(norm, RecurrentNorm::Layer { .. }),
                    format!("{prefix}_hh_l{index}"),
                ),
                Site::new(norm, hidden, steps, true, format!("{prefix}_c_l{index}")),
            ],
            names: [
                intern(format!("weight_ih_l{index}")),
                intern(format!("weight_hh_l{index}")),
                intern(format!("bias_ih_l{index}")),
                intern(format!("bias_hh_l{index}")),
            ],
            xin: Vec::new(),
            zx: Vec::new(),
            zh: Vec::new(),
            gates: Vec::new(),
            c: Vec::new(),
            cn: Vec::new(),
            tc: Vec::new(),
            h: Vec::new(),
            stats: Default::default(),
            nx: Vec::new(),
            da: Vec::new(),
            dzx: Vec::new(),
            dzh: Vec::new(),
            dh: Vec::new(),
            dc_next: Vec::new(),
            dcn: Vec::new(),
            dc: Vec::new(),
            dx: Vec::new(),
        }
    }

    fn size(&mut self, n: usize, t: usize, norm: RecurrentNorm) {
        let (h, g) = (self.hidden, 4 * self.hidden);
        self.xin.resize(t * n * self.input, 0.0);
        for v in [
            &mut self.zx,
            &mut self.zh,
            &mut self.gates,
            &mut self.da,
            &mut self.dzx,
            &mut self.dzh,
        ] {
            v.resize(t * n * g, 0.0);
        }
        self.nx.resize(n * g, 0.0);
        for v in [&mut self.c, &mut self.h] {
            v.resize((t + 1) * n * h, 0.0);
            v[..n * h].fill(0.0);
        }
        for v in [&mut self.cn, &mut self.tc] {
            v.resize(t * n * h, 0.0);
        }
        for v in [&mut self.dh, &mut self.dc_next, &mut self.dcn, &mut self.dc] {
            v.resize(n * h, 0.0);
        }
        self.dx.resize(t * n * self.input, 0.0);
        // LN keeps statistics per row (sample), BN per feature, for every step.
        let widths = [norm_width(norm, n, g), norm_width(norm, n, g), norm_width(norm, n, h)];
        for (s, w) in self.stats.iter_mut().zip(widths) {
            s.resize(t * w, NormStats::default());
        }
    }

    // For each step t: a = N_x(x_t·W_ihᵀ) + N_h(h_{t−1}·W_hhᵀ) + b_ih + b_hh; gates; c_t;
    // h_t = o·tanh(N_c(c_t))
    fn forward(&mut self, n: usize, t_steps: usize, norm: RecurrentNorm, train: bool) -> Result<()> {
        let (h, g, i) = (self.hidden, 4 * self.hidden, self.input);
        let threads = rayon::current_num_threads();
        // Without a norm, x·W_ihᵀ + b goes straight into the gates and each step's h·W_hhᵀ is
        // accumulated onto it: no separate products to keep, add or copy.
        let plain = self.sites[0].is_none();
        matmul(
            if plain { &mut self.gates } else { &mut self.zx },
            t_steps * n,
            g,
            i,
            &self.xin,
            Op::N,
            &self.weight_ih.value.data,
            Op::T,
            false,
            threads,
        );
        let (b_ih, b_hh) = (&self.bias_ih.value.data, &self.bias_hh.value.data);
        let add_bias = |rows: &mut [f32]| {
            rows.par_chunks_mut(g * 16).for_each(|chunk| {
                for row in chunk.chunks_mut(g) {
                    for ((v, a), b) in row.iter_mut().zip(b_ih).zip(b_hh) {
                        *v += a + b;
                    }
                }
            })
        };
        if plain {
            add_bias(&mut self.gates);
        }
        let (sw, bw) = (norm_width(norm, n, g), norm_width(norm, n, h));
        for t in 0..t_steps {
            let (step, hs) = (t * n * g..(t + 1) * n * g, t * n * h..(t + 1) * n * h);
            let h_prev = &self.h[t * n * h..(t + 1) * n * h];
            let a = &mut self.gates[step.clone()];
            let [sx, sh, sc] = &mut self.sites;
            let [st_x, st_h, st_c] = &mut self.stats;
            match (sx, sh) {
                (Some(sx), Some(sh)) => {
                    matmul(
                        &mut self.zh[step.clone()],
                        n,
                        g,
                        h,
                        h_prev,
                        Op::N,
                        &self.weight_hh.value.data,
                        Op::T,
                        false,
                        threads,
                    );
                    sx.forward(
                        norm,
                        &self.zx[step.clone()],
                        t,
                        train,
                        &mut self.nx,
                        &mut st_x[t * sw..(t + 1) * sw],
                    )?;
                    sh.forward(
                        norm,
                        &self.zh[step.clone()],
                        t,
                        train,
                        a,
                        &mut st_h[t * sw..(t + 1) * sw],
                    )?;
                    a.iter_mut().zip(&self.nx).for_each(|(v, x)| *v += x);
                    add_bias(a);
                }
                _ => matmul(
                    a,
                    n,
                    g,
                    h,
                    h_prev,
                    Op::N,
                    &self.weight_hh.value.data,
                    Op::T,
                    true,
                    threads,
                ),
            }
            let (c_prev, c_next) = self.c.split_at_mut((t + 1) * n * h);
            k::lstm_cell_forward(a, &c_prev[t * n * h..], &mut c_next[..n * h], h);
            let cn = &mut self.cn[hs.clone()];
            match sc {
                Some(sc) => sc.forward(norm, &c_next[..n * h], t, train, cn, &mut st_c[t * bw..(t + 1) * bw])?,
                None => cn.copy_from_slice(&c_next[..n * h]),
            }
            k::lstm_hidden_forward(
                a,
                cn,
                &mut self.tc[hs],
                &mut self.h[(t + 1) * n * h..(t + 2) * n * h],
                h,
            );
        }
        Ok(())
    }

    /// Backward through time. `dh_seq` is dL/dh_t for every step (time-major [T, N, H]);
    /// with `input_grad` the layer's input gradient goes to `self.dx`.
    fn backward(&mut self, n: usize, t_steps: usize, norm: RecurrentNorm, dh_seq: &[f32], input_grad: bool) {
        let (h, g, i) = (self.hidden, 4 * self.hidden, self.input);
        let threads = rayon::current_num_threads();
        let (sw, bw) = (norm_width(norm, n, g), norm_width(norm, n, h));
        let plain = self.sites[0].is_none();
        self.dh.fill(0.0);
        self.dc_next.fill(0.0);
        for t in (0..t_steps).rev() {
            let (step, hs) = (t * n * g..(t + 1) * n * g, t * n * h..(t + 1) * n * h);
            // dh = external + recurrent (the latter already in self.dh).
            self.dh.iter_mut().zip(&dh_seq[hs.clone()]).for_each(|(a, b)| *a += b);
            let gates = &self.gates[step.clone()];
            let da = &mut self.da[step.clone()];
            k::lstm_hidden_backward(gates, &self.tc[hs.clone()], &self.dh, &mut self.dcn, da, h);
            let [sx, sh, sc] = &mut self.sites;
            let [st_x, st_h, st_c] = &self.stats;
            match sc {
                Some(sc) => sc.backward(
                    norm,
                    &self.c[(t + 1) * n * h..(t + 2) * n * h],
                    &st_c[t * bw..(t + 1) * bw],
                    &self.dcn,
                    &mut self.dc,
                ),
                None => self.dc.copy_from_slice(&self.dcn),
            }
            k::lstm_cell_backward(
                gates,
                &self.c[t * n * h..(t + 1) * n * h],
                &self.dc,
                &mut self.dc_next,
                da,
                h,
            );
            // Without a norm dz_x = dz_h = da: the gemms below read da itself.
            if let (Some(sx), Some(sh)) = (sx, sh) {
                sx.backward(
                    norm,
                    &self.zx[step.clone()],
                    &st_x[t * sw..(t + 1) * sw],
                    da,
                    &mut self.dzx[step.clone()],
                );
                sh.backward(
                    norm,
                    &self.zh[step.clone()],
                    &st_h[t * sw..(t + 1) * sw],
                    da,
                    &mut self.dzh[step.clone()],
                );
            }
            let dzh = if plain { &self.da[step] } else { &self.dzh[step] };
            // dh_{t−1} = dz_h · W_hh
            matmul(
                &mut self.dh,
                n,
                h,
                g,
                dzh,
                Op::N,
                &self.weight_hh.value.data,
                Op::N,
                false,
                threads,
            );
        }
        // db = Σ da over every step and sample (the same for b_ih and b_hh)
        let rows = t_steps * n;
        for row in self.da[..rows * g].chunks(g) {
            for ((bi, bh), v) in self
                .bias_ih
                .grad
                .data
                .iter_mut()
                .zip(&mut self.bias_hh.grad.data)
                .zip(row)
            {
                *bi += v;
                *bh += v;
            }
        }
        let (dzx, dzh) = if plain {
            (&self.da, &self.da)
        } else {
            (&self.dzx, &self.dzh)
        };
        // dW_hh = Σ_t dz_hᵀ·h_{t−1};  dW_ih = dz_xᵀ·x;  dx = dz_x·W_ih
        matmul(
            &mut self.weight_hh.grad.data,
            g,
            h,
            rows,
            dzh,
            Op::T,
            &self.h[..rows * h],
            Op::N,
            true,
            threads,
        );
        matmul(
            &mut self.weight_ih.grad.data,
            g,
            i,
            rows,
            dzx,
            Op::T,
            &self.xin,
            Op::N,
            true,
            threads,
        );
        if input_grad {
            matmul(
                &mut self.dx,
                rows,
                i,
                g,
                dzx,
                Op::N,
                &self.weight_ih.value.data,
                Op::N,
                false,
                threads,
            );
        }
    }
}

/// Statistics per step: one per sample (LN) or per feature (BN).
fn norm_width(norm: RecurrentNorm, n: usize, features: usize) -> usize {
    match norm {
        RecurrentNorm::Layer { .. } => n,
        _ => features,
    }
}

/// The stack: an image [N, 1, T, I] in, the top layer's last hidden state [N, H] out.
pub struct Lstm {
    pub layers: Vec<LstmLayer>,
    pub norm: RecurrentNorm,
    pub steps: usize,
    input_grad: bool,
    last_train: bool,
    dh_top: Vec<f32>,
    num_batches_tracked: i64,
}

impl Lstm {
    pub fn new(
        input: usize,
        hidden: usize,
        layers: usize,
        steps: usize,
        norm: RecurrentNorm,
        rng: &mut impl rand::Rng,
    ) -> Result<Self> {
        if hidden == 0 || !(1..=MAX_LAYERS).contains(&layers) || steps == 0 || input == 0 {
            return Err(Error::invalid(format!(
                "lstm needs a hidden size >= 1 and 1..={MAX_LAYERS} layers over a sequence of at least one step, got H = {hidden}, {layers} layers, {steps} steps of {input}"
            )));
        }
        let layers = (0..layers)
            .map(|l| LstmLayer::new(l, if l == 0 { input } else { hidden }, hidden, steps, norm, rng))
            .collect();
        Ok(Lstm {
            layers,
            norm,
            steps,
            input_grad: true,
            last_train: false,
            dh_top: Vec::new(),
            num_batches_tracked: 0,
        })
    }

    fn view(&self, x: &Tensor) -> Result<(usize, usize, usize)> {
        let i = self.layers[0].input;
        let ok = match x.shape.len() {
            4 => x.shape[1] == 1 && x.shape[2] == self.steps && x.shape[3] == i,
            3 => x.shape[1] == self.steps && x.shape[2] == i,
            _ => false,
        };
        if !ok {
            return Err(Error::shape(
                "LSTM",
                format!(
                    "expected [N, 1, {}, {i}] (a grey image read row by row) or [N, {}, {i}], got {:?}",
                    self.steps, self.steps, x.shape
                ),
            ));
        }
        Ok((x.shape[0], self.steps, i))
    }

    fn hidden(&self) -> usize {
        self.layers[0].hidden
    }

    /// The first layer's gate pre-activations a = x_t·W_ihᵀ + h_{t−1}·W_hhᵀ + b of the last
    /// forward (of a plain LSTM: with a norm they are normalized first), summarized per time
    /// step and gate (i, f, g, o) as (mean, standard deviation) over the batch and the units.
    pub fn gate_preactivation_stats(&self, n: usize) -> Vec<[(f64, f64); 4]> {
        let l = &self.layers[0];
        let (t_steps, h, g) = (self.steps, l.hidden, 4 * l.hidden);
        let mut a = vec![0.0f32; n * g];
        let mut out = Vec::with_capacity(t_steps);
        for t in 0..t_steps {
            matmul(
                &mut a,
                n,
                g,
                l.input,
                &l.xin[t * n * l.input..(t + 1) * n * l.input],
                Op::N,
                &l.weight_ih.value.data,
                Op::T,
                false,
                1,
            );
            matmul(
                &mut a,
                n,
                g,
                h,
                &l.h[t * n * h..(t + 1) * n * h],
                Op::N,
                &l.weight_hh.value.data,
                Op::T,
                true,
                1,
            );
            let mut step = [(0.0, 0.0); 4];
            for (gate, st) in step.iter_mut().enumerate() {
                let vals = || {
                    a.chunks(g).flat_map(move |row| {
                        row[gate * h..(gate + 1) * h].iter().enumerate().map(move |(k, &v)| {
                            v as f64
                                + l.bias_ih.value.data[gate * h + k] as f64
                                + l.bias_hh.value.data[gate * h + k] as f64
                        })
                    })
                };
                let count = (n * h) as f64;
                let mean = vals().sum::<f64>() / count;
                let var = vals().map(|v| (v - mean).powi(2)).sum::<f64>() / count;
                *st = (mean, var.sqrt());
            }
            out.push(step);
        }
        out
    }

    /// The last forward's results as nn.LSTM returns them: the top layer's hidden states
    /// [N, T, H] (batch-first), h_n and c_n [layers, N, H].
    pub fn outputs(&self, n: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (t, h) = (self.steps, self.hidden());
        let top = self.layers.last().expect("at least one layer");
        let mut seq = vec![0.0; n * t * h];
        for step in 0..t {
            for s in 0..n {
                seq[(s * t + step) * h..(s * t + step + 1) * h]
                    .copy_from_slice(&top.h[((step + 1) * n + s) * h..((step + 1) * n + s + 1) * h]);
            }
        }
        let last = |v: &Vec<f32>| v[t * n * h..(t + 1) * n * h].to_vec();
        let h_n = self.layers.iter().flat_map(|l| last(&l.h)).collect();
        let c_n = self.layers.iter().flat_map(|l| last(&l.c)).collect();
        (seq, h_n, c_n)
    }
}

impl Layer for Lstm {
    fn kind(&self) -> &'static str {
        "LSTM"
    }

    fn forward(&mut self, x: &Tensor, y: &mut Tensor, mode: Mode) -> Result<()> {
        let (n, t, i) = self.view(x)?;
        let train = mode == Mode::Train;
        let norm = self.norm;
        for l in 0..self.layers.len() {
            self.layers[l].size(n, t, norm);
            if l == 0 {
                // Batch-first [N, T, I] to time-major [T, N, I].
                let xin = &mut self.layers[0].xin;
                for s in 0..n {
                    for step in 0..t {
                        xin[(step * n + s) * i..(step * n + s + 1) * i]
                            .copy_from_slice(&x.data[(s * t + step) * i..(s * t + step + 1) * i]);
                    }
                }
            } else {
                let (below, above) = self.layers.split_at_mut(l);
                let hb = &below[l - 1].h;
                let h = below[l - 1].hidden;
                above[0].xin.copy_from_slice(&hb[n * h..(t + 1) * n * h]);
            }
            self.layers[l].forward(n, t, norm, train)?;
        }
        if train && matches!(norm, RecurrentNorm::Batch { .. }) {
            self.num_batches_tracked += 1;
        }
        self.last_train = train;
        let top = self.layers.last().expect("at least one layer");
        let h = top.hidden;
        y.resize_to(&[n, h])?;
        y.data.copy_from_slice(&top.h[t * n * h..(t + 1) * n * h]);
        Ok(())
    }

    fn backward(&mut self, x: &Tensor, _y: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
        let (n, t, i) = self.view(x)?;
        let h = self.hidden();
        if !self.last_train || dy.shape != [n, h] {
            return Err(Error::invalid(format!(
                "LSTM backward needs a training forward and dL/dy of shape [{n}, {h}], got {:?}",
                dy.shape
            )));
        }
        // The top layer's gradient reaches only its last hidden state.
        self.dh_top.resize(t * n * h, 0.0);
        self.dh_top.fill(0.0);
        self.dh_top[(t - 1) * n * h..].copy_from_slice(&dy.data);
        let norm = self.norm;
        let last = self.layers.len() - 1;
        for l in (0..=last).rev() {
            let need_dx = l > 0 || self.input_grad;
            if l == last {
                let dh = std::mem::take(&mut self.dh_top);
                self.layers[l].backward(n, t, norm, &dh, need_dx);
                self.dh_top = dh;
            } else {
                let (below, above) = self.layers.split_at_mut(l + 1);
                below[l].backward(n, t, norm, &above[0].dx, need_dx);
            }
        }
        dx.resize_to(&x.shape)?;
        if self.input_grad {
            let d = &self.layers[0].dx;
            for s in 0..n {
                for step in 0..t {
                    dx.data[(s * t + step) * i..(s * t + step + 1) * i]
                        .copy_from_slice(&d[(step * n + s) * i..(step * n + s + 1) * i]);
                }
            }
        } else {
            dx.data.fill(0.0);
        }
        Ok(())
    }

    fn visit_params<'a>(&'a mut self, f: &mut dyn FnMut(&'static str, &'a mut Param)) {
        for layer in &mut self.layers {
            let [a, b, c, d] = layer.names;
            f(a, &mut layer.weight_ih);
            f(b, &mut layer.weight_hh);
            f(c, &mut layer.bias_ih);
            f(d, &mut layer.bias_hh);
            for site in layer.sites.iter_mut().flatten() {
                f(site.names[0], &mut site.gamma);
                if let Some(beta) = site.beta.as_mut() {
                    f(site.names[1], beta);
                }
            }
        }
    }

    fn buffers(&mut self) -> Vec<(&'static str, BufferMut<'_>)> {
        let mut out = Vec::new();
        for layer in &mut self.layers {
            for site in layer.sites.iter_mut().flatten() {
                if let (Some(m), Some(v)) = (site.running_mean.as_mut(), site.running_var.as_mut()) {
                    out.push((site.names[2], BufferMut::F32(m)));
                    out.push((site.names[3], BufferMut::F32(v)));
                }
            }
        }
        if matches!(self.norm, RecurrentNorm::Batch { .. }) {
            out.push(("num_batches_tracked", BufferMut::I64(&mut self.num_batches_tracked)));
        }
        out
    }

    fn set_input_grad(&mut self, needed: bool) {
        self.input_grad = needed;
    }

    fn visit_parts(&mut self, f: &mut dyn FnMut(&mut dyn std::any::Any)) {
        f(self);
    }

    // ONNX's LSTM operator (gates in the order i, o, f, c; sequence-first): the image
    // [N, 1, T, I] becomes [T, N, I], each layer's Y feeds the next, the top layer's Y_h is
    // the output. LN and BN inside the recurrence have no ONNX operator.
    fn export_onnx(&self, g: &mut OnnxGraph, x: &str, name: &str) -> Result<String> {
        if self.norm != RecurrentNorm::None {
            return Err(Error::invalid(format!(
                "{name}: ONNX's LSTM operator has no normalization inside the recurrence, so only the plain \
                 LSTM (--norm none) exports; LN-LSTM and BN-LSTM would need the recurrence unrolled"
            )));
        }
        let h = self.hidden();
        let axes1 = g.constant_i64(&format!("{name}.axes1"), &[1]);
        let axes0 = g.constant_i64(&format!("{name}.axes0"), &[0]);
        let mut seq = if g.rank(x)? == 4 {
            g.node("Squeeze", &[x, &axes1], &[], 3)
        } else {
            x.to_string()
        };
        seq = g.node("Transpose", &[&seq], &[("perm", Attr::Ints(vec![1, 0, 2]))], 3);
        let mut last = String::new();
        for (l, layer) in self.layers.iter().enumerate() {
            // PyTorch's blocks i, f, g, o as ONNX's i, o, f, c.
            let reorder = |v: &[f32], cols: usize| -> Vec<f32> {
                [0, 3, 1, 2]
                    .iter()
                    .flat_map(|&b| v[b * h * cols..(b + 1) * h * cols].to_vec())
                    .collect()
            };
            let w = g.constant(
                &format!("{name}.W_l{l}"),
                &[1, 4 * h, layer.input],
                &reorder(&layer.weight_ih.value.data, layer.input),
            )?;
            let r = g.constant(
                &format!("{name}.R_l{l}"),
                &[1, 4 * h, h],
                &reorder(&layer.weight_hh.value.data, h),
            )?;
            let mut b = reorder(&layer.bias_ih.value.data, 1);
            b.extend(reorder(&layer.bias_hh.value.data, 1));
            let b = g.constant(&format!("{name}.B_l{l}"), &[1, 8 * h], &b)?;
            let outs = g.node_outputs(
                "LSTM",
                &[&seq, &w, &r, &b],
                &[("hidden_size", Attr::Int(h as i64))],
                &[4, 3],
            );
            seq = g.node("Squeeze", &[&outs[0], &axes1], &[], 3);
            last = outs[1].clone();
        }
        Ok(g.node("Squeeze", &[&last, &axes0], &[], 2))
    }
}
