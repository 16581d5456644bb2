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

mod cell;

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

pub use cell::LstmLayer;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RecurrentNorm {
    None,
    Layer { eps: f64 },
    Batch { eps: f64, momentum: f64, per_step: bool },
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
