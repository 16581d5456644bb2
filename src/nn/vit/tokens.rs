//! The ViT's token rows: patches to tokens (with the class token and position embeddings) and
//! the class token's row back out. Token tensors are [N·T, D], one row per token, so every
//! norm and linear layer reads them as rows.

use rand::Rng;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::nn::layer::{Layer, Mode, Param, ParamKind};
use crate::onnx::graph::{Attr, OnnxGraph};
use crate::tensor::Tensor;

use super::{onnx_reshape, onnx_transpose};

/// [N, D, gh, gw] patch embeddings to rows [N·T, D], T = 1 + gh·gw: row (n, 0) is cls_token +
/// pos_embed[0], row (n, 1 + p) is patch p (row-major over the grid) + pos_embed[1 + p]; timm's
/// `_pos_embed` with a class token and no dropout.
pub struct PatchTokens {
    dim: usize,
    patches: usize,
    pub cls_token: Param,
    pub pos_embed: Param,
}

impl PatchTokens {
    /// timm's init: cls_token ~ N(0, 1e-6²), pos_embed ~ trunc_normal(std 0.02).
    pub fn new(dim: usize, patches: usize, rng: &mut impl Rng) -> Self {
        let cls = crate::nn::init::trunc_normal(rng, dim, 1e-6);
        let pos = crate::nn::init::trunc_normal(rng, (patches + 1) * dim, 0.02);
        PatchTokens {
            dim,
            patches,
            cls_token: Param::new(
                Tensor {
                    shape: vec![1, 1, dim],
                    data: cls,
                },
                ParamKind::Bias,
            ),
            pos_embed: Param::new(
                Tensor {
                    shape: vec![1, patches + 1, dim],
                    data: pos,
                },
                ParamKind::Bias,
            ),
        }
    }

    /// Tokens per sample (the class token and the patches).
    pub fn tokens(&self) -> usize {
        self.patches + 1
    }

    fn check(&self, x: &Tensor) -> Result<usize> {
        if x.shape.len() != 4 || x.shape[1] != self.dim || x.shape[2] * x.shape[3] != self.patches {
            return Err(Error::shape(
                "PatchTokens",
                format!(
                    "expected patch embeddings [N, {}, gh, gw] with gh·gw = {}, got {:?}",
                    self.dim, self.patches, x.shape
                ),
            ));
        }
        Ok(x.shape[0])
    }
}

impl Layer for PatchTokens {
    fn kind(&self) -> &'static str {
        "PatchTokens"
    }

    // y[n, 0, :] = cls + pos[0];  y[n, 1 + p, d] = x[n, d, p] + pos[1 + p, d]
    fn forward(&mut self, x: &Tensor, y: &mut Tensor, _mode: Mode) -> Result<()> {
        let n = self.check(x)?;
        let (d, t, p) = (self.dim, self.tokens(), self.patches);
        y.resize_to(&[n * t, d])?;
        let (pos, cls) = (&self.pos_embed.value.data, &self.cls_token.value.data);
        // Samples in parallel: on one thread the other sat idle through the transposes.
        y.data
            .par_chunks_mut(t * d)
            .zip(x.data.par_chunks(d * p))
            .for_each(|(ys, xs)| {
                ys[..d]
                    .iter_mut()
                    .zip(cls)
                    .zip(&pos[..d])
                    .for_each(|((o, &c), &q)| *o = c + q);
                for (i, row) in ys[d..].chunks_mut(d).enumerate() {
                    for (j, o) in row.iter_mut().enumerate() {
                        *o = xs[j * p + i] + pos[(1 + i) * d + j];
                    }
                }
            });
        Ok(())
    }

    // dcls = Σ_n dy[n, 0];  dpos[t] = Σ_n dy[n, t];  dx[n, d, p] = dy[n, 1 + p, d]
    fn backward(&mut self, x: &Tensor, _y: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
        let n = self.check(x)?;
        let (d, t, p) = (self.dim, self.tokens(), self.patches);
        if dy.shape != [n * t, d] {
            return Err(Error::shape(
                "PatchTokens",
                format!("gradient {:?} is not [{}, {d}]", dy.shape, n * t),
            ));
        }
        dx.resize_to(&x.shape)?;
        // The sums over samples in order, the transposes in parallel.
        for gs in dy.data.chunks(t * d) {
            self.cls_token
                .grad
                .data
                .iter_mut()
                .zip(&gs[..d])
                .for_each(|(a, &g)| *a += g);
            self.pos_embed.grad.data.iter_mut().zip(gs).for_each(|(a, &g)| *a += g);
        }
        dy.data
            .par_chunks(t * d)
            .zip(dx.data.par_chunks_mut(d * p))
            .for_each(|(gs, dxs)| {
                for (i, row) in gs[d..].chunks(d).enumerate() {
                    for (j, &g) in row.iter().enumerate() {
                        dxs[j * p + i] = g;
                    }
                }
            });
        Ok(())
    }

    // [N, D, gh, gw] → [N, P, D]; the class token expanded to [N, 1, D] in front; + pos_embed;
    // rows [N·T, D].
    fn export_onnx(&self, g: &mut OnnxGraph, x: &str, _name: &str) -> Result<String> {
        let d = self.dim as i64;
        let flat = onnx_reshape(g, x, &[0, d, -1], "patch_rows");
        let patches = onnx_transpose(g, &flat, &[0, 2, 1]);
        let shape = g.node("Shape", &[&patches], &[], 1);
        let (start, end) = (g.constant_i64("batch_start", &[0]), g.constant_i64("batch_end", &[1]));
        let n = g.node("Slice", &[&shape, &start, &end], &[], 1);
        let rest = g.constant_i64("cls_shape", &[1, d]);
        let cls_shape = g.node("Concat", &[&n, &rest], &[("axis", Attr::Int(0))], 1);
        let cls = g.constant("cls_token", &self.cls_token.value.shape, &self.cls_token.value.data)?;
        let cls = g.node("Expand", &[&cls, &cls_shape], &[], 3);
        let tokens = g.node("Concat", &[&cls, &patches], &[("axis", Attr::Int(1))], 3);
        let pos = g.constant("pos_embed", &self.pos_embed.value.shape, &self.pos_embed.value.data)?;
        let tokens = g.node("Add", &[&tokens, &pos], &[], 3);
        Ok(onnx_reshape(g, &tokens, &[-1, d], "token_rows"))
    }

    fn visit_params<'a>(&'a mut self, f: &mut dyn FnMut(&'static str, &'a mut Param)) {
        f("cls_token", &mut self.cls_token);
        f("pos_embed", &mut self.pos_embed);
    }
}

/// Rows [N·T, D] to the class token's rows [N, D] (timm's `global_pool='token'`).
pub struct ClassToken {
    pub tokens: usize,
    pub dim: usize,
}

impl ClassToken {
    fn dim_of(&self, g: &OnnxGraph, x: &str) -> Result<i64> {
        if g.rank(x)? != 2 {
            return Err(Error::invalid("ONNX export: the class token reads token rows [N·T, D]"));
        }
        Ok(self.dim as i64)
    }

    fn check(&self, x: &Tensor) -> Result<usize> {
        if x.shape.len() != 2 || !x.shape[0].is_multiple_of(self.tokens) {
            return Err(Error::shape(
                "ClassToken",
                format!("expected token rows [N·{}, D], got {:?}", self.tokens, x.shape),
            ));
        }
        Ok(x.shape[0] / self.tokens)
    }
}

impl Layer for ClassToken {
    fn kind(&self) -> &'static str {
        "ClassToken"
    }

    // rows [N·T, D] → [N, T, D] → token 0 → [N, D]
    fn export_onnx(&self, g: &mut OnnxGraph, x: &str, _name: &str) -> Result<String> {
        let d = self.dim_of(g, x)?;
        let tokens = onnx_reshape(g, x, &[-1, self.tokens as i64, d], "sample_tokens");
        let first = g.constant_i64("class_token_index", &[0]);
        let cls = g.node("Gather", &[&tokens, &first], &[("axis", Attr::Int(1))], 3);
        Ok(onnx_reshape(g, &cls, &[-1, d], "class_rows"))
    }

    fn forward(&mut self, x: &Tensor, y: &mut Tensor, _mode: Mode) -> Result<()> {
        let n = self.check(x)?;
        let d = x.shape[1];
        y.resize_to(&[n, d])?;
        for (row, xs) in y.data.chunks_mut(d).zip(x.data.chunks(self.tokens * d)) {
            row.copy_from_slice(&xs[..d]);
        }
        Ok(())
    }

    fn backward(&mut self, x: &Tensor, _y: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
        let n = self.check(x)?;
        let d = x.shape[1];
        if dy.shape != [n, d] {
            return Err(Error::shape(
                "ClassToken",
                format!("gradient {:?} is not [{n}, {d}]", dy.shape),
            ));
        }
        dx.resize_to(&x.shape)?;
        for (g, dxs) in dy.data.chunks(d).zip(dx.data.chunks_mut(self.tokens * d)) {
            dxs[..d].copy_from_slice(g);
            dxs[d..].fill(0.0);
        }
        Ok(())
    }
}
