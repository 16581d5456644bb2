//! timm's `Attention`: a fused qkv Linear (with bias), multi-head scaled dot-product attention
//! and an output projection, on token rows [N·T, D].

use rand::Rng;

use crate::error::{Error, Result};
use crate::kernels::attention::{attention_backward, attention_forward, attention_scratch_len, AttentionShape};
use crate::kernels::dense::DenseThen;
use crate::nn::layer::{Layer, Mode, Param};
use crate::nn::linear::Linear;
use crate::onnx::graph::{Attr, OnnxGraph};
use crate::tensor::Tensor;

use super::{onnx_reshape, onnx_transpose};

pub struct Attention {
    pub qkv: Linear,
    pub proj: Linear,
    heads: usize,
    tokens: usize,
    /// The last forward's qkv rows [N·T, 3D], heads' outputs [N·T, D] and probabilities.
    qkv_out: Tensor,
    core: Tensor,
    probs: Vec<f32>,
    dcore: Tensor,
    dqkv: Tensor,
    scratch: Vec<f32>,
}

/// timm's Linear init (init_weights_vit_timm): weight ~ trunc_normal(std 0.02), bias 0.
pub fn vit_linear(inputs: usize, outputs: usize, rng: &mut impl Rng) -> Linear {
    let mut l = Linear::new(inputs, outputs, true, rng);
    l.weight.value.data = crate::nn::init::trunc_normal(rng, inputs * outputs, 0.02);
    if let Some(b) = l.bias.as_mut() {
        b.value.data.fill(0.0);
    }
    l
}

impl Attention {
    pub fn new(dim: usize, heads: usize, tokens: usize, rng: &mut impl Rng) -> Self {
        Attention {
            qkv: vit_linear(dim, 3 * dim, rng),
            proj: vit_linear(dim, dim, rng),
            heads,
            tokens,
            qkv_out: Tensor::default(),
            core: Tensor::default(),
            probs: Vec::new(),
            dcore: Tensor::default(),
            dqkv: Tensor::default(),
            scratch: Vec::new(),
        }
    }

    fn shape(&self, x: &Tensor) -> Result<AttentionShape> {
        let d = self.proj.out_features;
        if x.shape.len() != 2 || x.shape[1] != d || !x.shape[0].is_multiple_of(self.tokens) {
            return Err(Error::shape(
                "Attention",
                format!("expected token rows [N·{}, {d}], got {:?}", self.tokens, x.shape),
            ));
        }
        Ok(AttentionShape {
            batch: x.shape[0] / self.tokens,
            tokens: self.tokens,
            heads: self.heads,
            head_dim: d / self.heads,
        })
    }
}

impl Attention {
    /// y = proj(MHA(qkv(x))), plus `residual` where given (added in the projection's blocks:
    /// a block's x + attn(x) without a pass of its own).
    pub fn forward_then(&mut self, x: &Tensor, y: &mut Tensor, residual: Option<&Tensor>) -> Result<()> {
        let s = self.shape(x)?;
        if residual.is_some_and(|r| r.shape != x.shape) {
            return Err(Error::shape("Attention", "the residual must have the input's shape"));
        }
        self.qkv.forward_then(x, &mut self.qkv_out, DenseThen::Nothing)?;
        self.core.resize_to(&x.shape)?;
        self.probs.resize(s.probs_len(), 0.0);
        self.scratch.resize(attention_scratch_len(s), 0.0);
        attention_forward(
            &self.qkv_out.data,
            &mut self.core.data,
            &mut self.probs,
            &mut self.scratch,
            s,
        );
        let then = residual.map_or(DenseThen::Nothing, |r| DenseThen::AddResidual(&r.data));
        self.proj.forward_then(&self.core, y, then)
    }
}

impl Layer for Attention {
    fn kind(&self) -> &'static str {
        "Attention"
    }

    // y = proj(MHA(qkv(x)))
    fn forward(&mut self, x: &Tensor, y: &mut Tensor, _mode: Mode) -> Result<()> {
        self.forward_then(x, y, None)
    }

    fn backward(&mut self, x: &Tensor, _y: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
        let s = self.shape(x)?;
        if self.probs.len() != s.probs_len() || self.qkv_out.shape != [x.shape[0], 3 * x.shape[1]] {
            return Err(Error::invalid(
                "Attention backward needs a training forward of this batch first",
            ));
        }
        self.proj.backward_into(&self.core, dy, &mut self.dcore, None)?;
        self.dqkv.resize_to(&self.qkv_out.shape)?;
        self.scratch.resize(attention_scratch_len(s), 0.0);
        attention_backward(
            &self.qkv_out.data,
            &self.probs,
            &self.dcore.data,
            &mut self.dqkv.data,
            &mut self.scratch,
            s,
        );
        self.qkv.backward_into(x, &self.dqkv, dx, None)
    }

    fn visit_params<'a>(&'a mut self, f: &mut dyn FnMut(&'static str, &'a mut Param)) {
        self.qkv
            .visit_params(&mut |k, p| f(if k == "weight" { "qkv.weight" } else { "qkv.bias" }, p));
        self.proj
            .visit_params(&mut |k, p| f(if k == "weight" { "proj.weight" } else { "proj.bias" }, p));
    }

    fn set_input_grad(&mut self, needed: bool) {
        self.qkv.set_input_grad(needed);
    }

    // qkv rows → [N, T, 3, H, d] → [3, N, H, T, d]; softmax(scale·q kᵀ) v; → rows; proj.
    fn export_onnx(&self, g: &mut OnnxGraph, x: &str, name: &str) -> Result<String> {
        let (d, h, t) = (self.proj.out_features as i64, self.heads as i64, self.tokens as i64);
        let hd = d / h;
        let qkv = self.qkv.export_onnx(g, x, &format!("{name}.qkv"))?;
        let split = onnx_reshape(g, &qkv, &[-1, t, 3, h, hd], &format!("{name}.split"));
        let heads = onnx_transpose(g, &split, &[2, 0, 3, 1, 4]);
        let sizes = g.constant_i64(&format!("{name}.sizes"), &[1, 1, 1]);
        let parts = g.node_outputs("Split", &[&heads, &sizes], &[("axis", Attr::Int(0))], &[5, 5, 5]);
        let [q, k, v] = [0, 1, 2].map(|i| onnx_reshape(g, &parts[i], &[-1, h, t, hd], &format!("{name}.head")));
        let scale = g.constant(&format!("{name}.scale"), &[], &[(hd as f32).powf(-0.5)])?;
        let q = g.node("Mul", &[&q, &scale], &[], 4);
        let kt = onnx_transpose(g, &k, &[0, 1, 3, 2]);
        let scores = g.node("MatMul", &[&q, &kt], &[], 4);
        let probs = g.node("Softmax", &[&scores], &[("axis", Attr::Int(-1))], 4);
        let out = g.node("MatMul", &[&probs, &v], &[], 4);
        let out = onnx_transpose(g, &out, &[0, 2, 1, 3]);
        let rows = onnx_reshape(g, &out, &[-1, d], &format!("{name}.rows"));
        self.proj.export_onnx(g, &rows, &format!("{name}.proj"))
    }

    fn visit_parts(&mut self, f: &mut dyn FnMut(&mut dyn std::any::Any)) {
        f(&mut self.qkv);
        f(&mut self.proj);
    }
}
