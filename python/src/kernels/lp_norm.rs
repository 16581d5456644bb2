//! Lp BatchNorm (p = 1, inf).

use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1, PyUntypedArrayMethods};
use pyo3::prelude::*;

use super::*;
use normlab::kernels::batch_norm::{self as bn, ChannelAffine};
use normlab::kernels::lp_norm::{self, LpKind};

fn lp_kind(p: &str) -> PyResult<LpKind> {
    match p {
        "1" => Ok(LpKind::L1),
        "inf" => Ok(LpKind::Linf),
        _ => Err(bad(format!("p must be 1 or inf, got {p}"))),
    }
}

/// Lp BatchNorm's training forward (Santurkar et al.): per channel, y = (x − μ_B)/(scale + eps)·γ
/// + β with scale = mean|x − μ_B| (p = 1) or max|x − μ_B| (p = inf); returns (mean, scale,
/// backward term) per channel.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn lp_train_forward<'py>(
    py: Python<'py>,
    x: In<'py>,
    mut y: Out<'py>,
    p: &str,
    eps: f64,
    weight: Option<PyReadonlyArray1<'py, f32>>,
    bias: Option<PyReadonlyArray1<'py, f32>>,
) -> PyResult<(F64s<'py>, Bound<'py, PyArray1<f32>>, F64s<'py>)> {
    let kind = lp_kind(p)?;
    let shape = view(&x, "x")?;
    same_shape(x.shape(), y.shape(), "y")?;
    check_eps(eps)?;
    let c = shape.c;
    let (gamma, beta) = (channels(weight, c, "weight")?, channels(bias, c, "bias")?);
    let (xs, ys) = (contiguous(&x, "x")?, contiguous_mut(&mut y, "y")?);
    let mut stats = vec![(0.0f64, 0.0f32, 0.0f64); c];
    detached(py, xs.len(), || {
        lp_norm::lp_stats(xs, shape.n, c, shape.s, kind, &mut stats);
        let mean: Vec<f64> = stats.iter().map(|s| s.0).collect();
        let scale: Vec<f32> = (0..c)
            .map(|ch| (1.0 / (stats[ch].1 as f64 + eps)) as f32 * gamma.as_ref().map_or(1.0, |g| g[ch]))
            .collect();
        let shift: Vec<f32> = (0..c).map(|ch| beta.as_ref().map_or(0.0, |b| b[ch])).collect();
        let affine = ChannelAffine {
            mean: &mean,
            scale: &scale,
            shift: &shift,
        };
        bn::batch_norm_forward_fixed(xs, ys, shape, affine, false);
    });
    let mean: Vec<f64> = stats.iter().map(|s| s.0).collect();
    let scale: Vec<f32> = stats.iter().map(|s| s.1).collect();
    let extra: Vec<f64> = stats.iter().map(|s| s.2).collect();
    Ok((mean.into_pyarray(py), scale.into_pyarray(py), extra.into_pyarray(py)))
}

/// The backward of `lp_train_forward`; returns (Σdy, Σdy·x̂) per channel (dβ, dγ).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn lp_train_backward<'py>(
    py: Python<'py>,
    x: In<'py>,
    dy: In<'py>,
    mut dx: Out<'py>,
    p: &str,
    eps: f64,
    weight: Option<PyReadonlyArray1<'py, f32>>,
    mean: PyReadonlyArray1<'py, f64>,
    scale: PyReadonlyArray1<'py, f32>,
    extra: PyReadonlyArray1<'py, f64>,
) -> PyResult<(F64s<'py>, F64s<'py>)> {
    let kind = lp_kind(p)?;
    let shape = view(&x, "x")?;
    check_eps(eps)?;
    let c = shape.c;
    let gamma = channels(weight, c, "weight")?;
    let (mean, scale, extra) = (
        required(mean, c, "mean")?,
        required(scale, c, "scale")?,
        required(extra, c, "extra")?,
    );
    if kind == LpKind::Linf && extra.iter().any(|&e| !(e >= 0.0 && (e as usize / 2) < x.len())) {
        return Err(bad("extra does not come from lp_train_forward on this input".into()));
    }
    let (xs, ds, dxs) = backward_slices(&x, &dy, &mut dx)?;
    let stats: Vec<(f64, f32, f64)> = (0..c).map(|ch| (mean[ch], scale[ch], extra[ch])).collect();
    let mut sums = vec![(0.0f64, 0.0f64); c];
    detached(py, xs.len(), || {
        lp_norm::lp_backward(
            xs,
            xs,
            ds,
            dxs,
            shape.n,
            c,
            shape.s,
            kind,
            false,
            &stats,
            eps,
            gamma.as_deref(),
            &mut sums,
        )
    });
    let sd: Vec<f64> = sums.iter().map(|s| s.0).collect();
    let sdu: Vec<f64> = sums.iter().map(|s| s.1).collect();
    Ok((sd.into_pyarray(py), sdu.into_pyarray(py)))
}
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(lp_train_forward, m)?)?;
    m.add_function(wrap_pyfunction!(lp_train_backward, m)?)?;
    Ok(())
}
