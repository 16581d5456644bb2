//! One transformer block on token rows [N·T, D], timm's `Block` names: norm1, attn, norm2 and
//! an MLP (fc1, exact GELU, fc2), with residual connections. Pre-norm (timm's, GPT-2's):
//! x + attn(norm1(x)), then + mlp(norm2(·)). Post-norm (the original Transformer):
//! norm1(x + attn(x)), then norm2(· + mlp(·)).

use rand::Rng;
use rayon::prelude::*;

use crate::error::Result;
use crate::kernels::dense::DenseThen;
use crate::nn::layer::{BufferMut, Layer, Mode, Param, StatsMode};
use crate::nn::linear::Linear;
use crate::nn::norm_spec::NormSpec;
use crate::onnx::graph::OnnxGraph;
use crate::tensor::Tensor;

use super::attention::{vit_linear, Attention};
use super::Placement;

pub struct Block {
    pub placement: Placement,
    pub norm1: Option<Box<dyn Layer>>,
    pub attn: Attention,
    pub norm2: Option<Box<dyn Layer>>,
    pub fc1: Linear,
    pub fc2: Linear,
    /// Activations of the last forward. Pre: h1 = norm1(x), r1 = x + attn(h1), h2 =
    /// norm2(r1). Post: h1 = x + attn(x), r1 = norm1(h1), h2 = r1 + mlp(r1) (the input of
    /// norm2). g = GELU(fc1(·)), f1 = GELU'(fc1(·)), the slope the backward multiplies by. The
    /// residual adds run inside the projections (`DenseThen`), the GELU inside fc1's forward and
    /// fc2's backward.
    h1: Tensor,
    r1: Tensor,
    h2: Tensor,
    f1: Tensor,
    g: Tensor,
    // Gradients.
    d2: Tensor,
    d3: Tensor,
    d4: Tensor,
}

/// y = norm(x), or a copy of x without a norm.
fn norm_forward(norm: &mut Option<Box<dyn Layer>>, x: &Tensor, y: &mut Tensor, mode: Mode) -> Result<()> {
    match norm {
        Some(n) => n.forward(x, y, mode),
        None => {
            y.resize_to(&x.shape)?;
            y.data.copy_from_slice(&x.data);
            Ok(())
        }
    }
}

fn norm_backward(
    norm: &mut Option<Box<dyn Layer>>,
    x: &Tensor,
    y: &Tensor,
    dy: &Tensor,
    dx: &mut Tensor,
) -> Result<()> {
    match norm {
        Some(n) => n.backward(x, y, dy, dx),
        None => {
            dx.resize_to(&dy.shape)?;
            dx.data.copy_from_slice(&dy.data);
            Ok(())
        }
    }
}

/// acc += b, in parallel runs: on one thread the other sat idle through it (12 passes over
/// [6400, 128] a vit:128 step).
fn add_into(acc: &mut Tensor, b: &Tensor) {
    const RUN: usize = 1 << 14;
    acc.data
        .par_chunks_mut(RUN)
        .zip(b.data.par_chunks(RUN))
        .for_each(|(o, v)| o.iter_mut().zip(v).for_each(|(o, &v)| *o += v));
}

impl Block {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dim: usize,
        heads: usize,
        tokens: usize,
        hidden: usize,
        norm: &NormSpec,
        placement: Placement,
        name: &str,
        rng: &mut impl Rng,
    ) -> Result<Self> {
        let norm1 = norm.build(&[dim], &format!("{name}.norm1"), false)?;
        let attn = Attention::new(dim, heads, tokens, rng);
        let norm2 = norm.build(&[dim], &format!("{name}.norm2"), false)?;
        let fc1 = vit_linear(dim, hidden, rng);
        let fc2 = vit_linear(hidden, dim, rng);
        Ok(Block {
            placement,
            norm1,
            attn,
            norm2,
            fc1,
            fc2,
            h1: Tensor::default(),
            r1: Tensor::default(),
            h2: Tensor::default(),
            f1: Tensor::default(),
            g: Tensor::default(),
            d2: Tensor::default(),
            d3: Tensor::default(),
            d4: Tensor::default(),
        })
    }

    /// y = residual + fc2(GELU(fc1(x))), keeping fc1's output and the GELU's.
    fn mlp_forward(
        (fc1, fc2): (&mut Linear, &mut Linear),
        (f1, g): (&mut Tensor, &mut Tensor),
        x: &Tensor,
        residual: &Tensor,
        y: &mut Tensor,
    ) -> Result<()> {
        g.resize_to(&[x.batch(), fc1.out_features])?;
        fc1.forward_then(x, f1, DenseThen::GeluKeepingSlope(&mut g.data))?;
        fc2.forward_then(g, y, DenseThen::AddResidual(&residual.data))
    }

    /// dx of the MLP into `d3` (its input was `x`), given df; d2 holds the gradient at f1.
    fn mlp_backward(&mut self, x: &Tensor, df: &Tensor) -> Result<()> {
        self.fc2.backward_into(&self.g, df, &mut self.d2, Some(&self.f1))?;
        self.fc1.backward_into(x, &self.d2, &mut self.d3, None)
    }
}

/// ONNX: norm(x), or x itself without a norm.
fn norm_onnx(norm: &Option<Box<dyn Layer>>, g: &mut OnnxGraph, x: &str, name: String) -> Result<String> {
    match norm {
        Some(n) => n.export_onnx(g, x, &name),
        None => Ok(x.to_string()),
    }
}

/// ONNX: the exact GELU, x/2·(1 + erf(x/√2)) (Gelu is an operator only from opset 20).
fn gelu_onnx(g: &mut OnnxGraph, x: &str, name: &str) -> Result<String> {
    let sqrt2 = g.constant(&format!("{name}.sqrt2"), &[], &[std::f32::consts::SQRT_2])?;
    let (one, half) = (
        g.constant(&format!("{name}.one"), &[], &[1.0])?,
        g.constant(&format!("{name}.half"), &[], &[0.5])?,
    );
    let z = g.node("Div", &[x, &sqrt2], &[], 2);
    let e = g.node("Erf", &[&z], &[], 2);
    let e = g.node("Add", &[&e, &one], &[], 2);
    let hx = g.node("Mul", &[x, &half], &[], 2);
    Ok(g.node("Mul", &[&hx, &e], &[], 2))
}

/// A block's norm keys ("norm1.weight", "norm2.running_var") from the norm layer's own.
fn norm_key(which: u8, key: &str) -> &'static str {
    match (which, key) {
        (1, "weight") => "norm1.weight",
        (1, "bias") => "norm1.bias",
        (1, "running_mean") => "norm1.running_mean",
        (1, "running_var") => "norm1.running_var",
        (1, "running_scale") => "norm1.running_scale",
        (1, _) => "norm1.num_batches_tracked",
        (_, "weight") => "norm2.weight",
        (_, "bias") => "norm2.bias",
        (_, "running_mean") => "norm2.running_mean",
        (_, "running_var") => "norm2.running_var",
        (_, "running_scale") => "norm2.running_scale",
        _ => "norm2.num_batches_tracked",
    }
}

impl Layer for Block {
    fn kind(&self) -> &'static str {
        "Block"
    }

    fn forward(&mut self, x: &Tensor, y: &mut Tensor, mode: Mode) -> Result<()> {
        match self.placement {
            Placement::Pre => {
                norm_forward(&mut self.norm1, x, &mut self.h1, mode)?;
                self.attn.forward_then(&self.h1, &mut self.r1, Some(x))?;
                norm_forward(&mut self.norm2, &self.r1, &mut self.h2, mode)?;
                let fcs = (&mut self.fc1, &mut self.fc2);
                Block::mlp_forward(fcs, (&mut self.f1, &mut self.g), &self.h2, &self.r1, y)
            }
            Placement::Post => {
                self.attn.forward_then(x, &mut self.h1, Some(x))?;
                norm_forward(&mut self.norm1, &self.h1, &mut self.r1, mode)?;
                let fcs = (&mut self.fc1, &mut self.fc2);
                Block::mlp_forward(fcs, (&mut self.f1, &mut self.g), &self.r1, &self.r1, &mut self.h2)?;
                norm_forward(&mut self.norm2, &self.h2, y, mode)
            }
        }
    }

    fn backward(&mut self, x: &Tensor, y: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
        match self.placement {
            Placement::Pre => {
                // y = r1 + mlp(h2), h2 = norm2(r1): dr1 = dy + norm2ᵀ(mlpᵀ(dy)).
                let h2 = std::mem::take(&mut self.h2);
                let r = self.mlp_backward(&h2, dy);
                self.h2 = h2;
                r?;
                // dr1 in d4 and attn's dx in d3 (free once norm2 has read it): reusing the MLP's
                // wider d1/d2 shrank them, and growing them back zero-filled [N, hidden] twice a
                // step (6% of a vit:64 step).
                let mut dr1 = std::mem::take(&mut self.d4);
                norm_backward(&mut self.norm2, &self.r1, &self.h2, &self.d3, &mut dr1)?;
                add_into(&mut dr1, dy);
                // r1 = x + attn(h1), h1 = norm1(x): dx = dr1 + norm1ᵀ(attnᵀ(dr1)).
                self.attn.backward(&self.h1, &self.r1, &dr1, &mut self.d3)?;
                norm_backward(&mut self.norm1, x, &self.h1, &self.d3, dx)?;
                add_into(dx, &dr1);
                self.d4 = dr1;
                Ok(())
            }
            Placement::Post => {
                // y = norm2(h2), h2 = r1 + mlp(r1): dr1 = dh2 + mlpᵀ(dh2).
                let mut dh2 = std::mem::take(&mut self.d4);
                norm_backward(&mut self.norm2, &self.h2, y, dy, &mut dh2)?;
                let r1 = std::mem::take(&mut self.r1);
                let r = self.mlp_backward(&r1, &dh2);
                self.r1 = r1;
                r?;
                add_into(&mut self.d3, &dh2);
                // r1 = norm1(h1), h1 = x + attn(x): dx = dh1 + attnᵀ(dh1).
                norm_backward(&mut self.norm1, &self.h1, &self.r1, &self.d3, &mut dh2)?;
                self.attn.backward(x, &self.h1, &dh2, dx)?;
                add_into(dx, &dh2);
                self.d4 = dh2;
                Ok(())
            }
        }
    }

    fn export_onnx(&self, g: &mut OnnxGraph, x: &str, name: &str) -> Result<String> {
        let mlp = |g: &mut OnnxGraph, x: &str| -> Result<String> {
            let h = self.fc1.export_onnx(g, x, &format!("{name}.mlp.fc1"))?;
            let h = gelu_onnx(g, &h, &format!("{name}.mlp"))?;
            self.fc2.export_onnx(g, &h, &format!("{name}.mlp.fc2"))
        };
        let (n1, n2) = (format!("{name}.norm1"), format!("{name}.norm2"));
        match self.placement {
            Placement::Pre => {
                let h = norm_onnx(&self.norm1, g, x, n1)?;
                let a = self.attn.export_onnx(g, &h, &format!("{name}.attn"))?;
                let r = g.node("Add", &[x, &a], &[], 2);
                let h = norm_onnx(&self.norm2, g, &r, n2)?;
                let f = mlp(g, &h)?;
                Ok(g.node("Add", &[&r, &f], &[], 2))
            }
            Placement::Post => {
                let a = self.attn.export_onnx(g, x, &format!("{name}.attn"))?;
                let s = g.node("Add", &[x, &a], &[], 2);
                let r = norm_onnx(&self.norm1, g, &s, n1)?;
                let f = mlp(g, &r)?;
                let s = g.node("Add", &[&r, &f], &[], 2);
                norm_onnx(&self.norm2, g, &s, n2)
            }
        }
    }

    fn visit_params<'a>(&'a mut self, f: &mut dyn FnMut(&'static str, &'a mut Param)) {
        if let Some(n) = self.norm1.as_mut() {
            n.visit_params(&mut |k, p| f(norm_key(1, k), p));
        }
        self.attn.visit_params(&mut |k, p| {
            f(
                match k {
                    "qkv.weight" => "attn.qkv.weight",
                    "qkv.bias" => "attn.qkv.bias",
                    "proj.weight" => "attn.proj.weight",
                    _ => "attn.proj.bias",
                },
                p,
            )
        });
        if let Some(n) = self.norm2.as_mut() {
            n.visit_params(&mut |k, p| f(norm_key(2, k), p));
        }
        self.fc1.visit_params(&mut |k, p| {
            f(
                if k == "weight" {
                    "mlp.fc1.weight"
                } else {
                    "mlp.fc1.bias"
                },
                p,
            )
        });
        self.fc2.visit_params(&mut |k, p| {
            f(
                if k == "weight" {
                    "mlp.fc2.weight"
                } else {
                    "mlp.fc2.bias"
                },
                p,
            )
        });
    }

    fn buffers(&mut self) -> Vec<(&'static str, BufferMut<'_>)> {
        let mut out = Vec::new();
        if let Some(n) = self.norm1.as_mut() {
            out.extend(n.buffers().into_iter().map(|(k, b)| (norm_key(1, k), b)));
        }
        if let Some(n) = self.norm2.as_mut() {
            out.extend(n.buffers().into_iter().map(|(k, b)| (norm_key(2, k), b)));
        }
        out
    }

    fn visit_parts(&mut self, f: &mut dyn FnMut(&mut dyn std::any::Any)) {
        if let Some(n) = self.norm1.as_mut() {
            n.visit_parts(f);
        }
        self.attn.visit_parts(f);
        if let Some(n) = self.norm2.as_mut() {
            n.visit_parts(f);
        }
        f(&mut self.fc1);
        f(&mut self.fc2);
    }

    fn set_stats_mode(&mut self, mode: StatsMode) -> usize {
        self.norm1.as_mut().map_or(0, |n| n.set_stats_mode(mode))
            + self.norm2.as_mut().map_or(0, |n| n.set_stats_mode(mode))
    }
}
