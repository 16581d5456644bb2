//! A Vision Transformer in timm's layout (`VisionTransformer` with a class token, learned
//! position embeddings and no dropout): patch embedding, token rows, blocks, final norm, the
//! class token's row and a linear head. Each part is its own layer in the model's Sequential,
//! named as timm names it, so state dicts load into timm with `strict=True`.

pub mod attention;
pub mod block;
pub mod tokens;

use std::fmt;

/// Where a block's norms sit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Placement {
    /// timm's and GPT-2's: x + f(norm(x)).
    #[default]
    Pre,
    /// The original Transformer's: norm(x + f(x)).
    Post,
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Placement::Pre => "pre",
            Placement::Post => "post",
        })
    }
}

use crate::onnx::graph::{Attr, OnnxGraph};

/// ONNX: `x` reshaped to `shape` (0 copies a dimension, -1 is inferred).
pub(crate) fn onnx_reshape(g: &mut OnnxGraph, x: &str, shape: &[i64], hint: &str) -> String {
    let s = g.constant_i64(hint, shape);
    g.node("Reshape", &[x, &s], &[], shape.len())
}

/// ONNX: `x` with its axes permuted.
pub(crate) fn onnx_transpose(g: &mut OnnxGraph, x: &str, perm: &[i64]) -> String {
    g.node("Transpose", &[x], &[("perm", Attr::Ints(perm.to_vec()))], perm.len())
}
