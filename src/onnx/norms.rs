//! ONNX forms of the norms' eval mode, shared by BatchNorm and InstanceNorm with running
//! statistics (both normalize with stored per-channel statistics there).

use crate::error::Result;
use crate::onnx::graph::{Attr, OnnxGraph};

/// γ or β of a norm, or the identity's ones/zeros when it has no affine.
pub fn affine_or(p: Option<&[f32]>, shape: &[usize], fill: f32) -> Vec<f32> {
    p.map(<[f32]>::to_vec)
        .unwrap_or_else(|| vec![fill; shape.iter().product()])
}

/// y = (x − running_mean) / sqrt(running_var + eps) · γ + β as one BatchNormalization node,
/// with the tensors under PyTorch's names (`{name}.weight`, `{name}.running_mean`, ...).
pub fn batch_normalization(
    g: &mut OnnxGraph,
    x: &str,
    name: &str,
    affine: (Option<&[f32]>, Option<&[f32]>),
    running: (&[f32], &[f32]),
    eps: f64,
) -> Result<String> {
    let c = running.0.len();
    let rank = g.rank(x)?;
    let scale = g.constant(&format!("{name}.weight"), &[c], &affine_or(affine.0, &[c], 1.0))?;
    let bias = g.constant(&format!("{name}.bias"), &[c], &affine_or(affine.1, &[c], 0.0))?;
    let mean = g.constant(&format!("{name}.running_mean"), &[c], running.0)?;
    let var = g.constant(&format!("{name}.running_var"), &[c], running.1)?;
    Ok(g.node(
        "BatchNormalization",
        &[x, &scale, &bias, &mean, &var],
        &[("epsilon", Attr::Float(eps as f32))],
        rank,
    ))
}
