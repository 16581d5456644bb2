//! GroupNorm, LayerNorm and InstanceNorm: statistics within each sample.

use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1, PyUntypedArrayMethods};
use pyo3::prelude::*;

use super::*;
use normlab::kernels::group_norm as gn;

fn check_groups(shape: Ncs, groups: usize) -> PyResult<()> {
    if groups == 0 || !shape.c.is_multiple_of(groups) {
        return Err(bad(format!(
            "num_channels ({}) must be divisible by num_groups ({groups})",
            shape.c
        )));
    }
    Ok(())
}

/// GroupNorm / LayerNorm / InstanceNorm training forward on the (N, C, S) view: statistics per
/// (sample, group) of C/G·S values, y = (x − μ)/sqrt(σ² + eps)·γ[c] + β[c]; returns the
/// per-(n, g) mean and biased variance. nn.LayerNorm is (N, numel(normalized_shape), 1), G = 1.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn gn_train_forward<'py>(
    py: Python<'py>,
    x: In<'py>,
    mut y: Out<'py>,
    n: usize,
    c: usize,
    s: usize,
    groups: usize,
    eps: f64,
    weight: Option<PyReadonlyArray1<'py, f32>>,
    bias: Option<PyReadonlyArray1<'py, f32>>,
) -> PyResult<(F64s<'py>, Bound<'py, PyArray1<f32>>)> {
    let shape = explicit_view(&x, n, c, s)?;
    same_shape(x.shape(), y.shape(), "y")?;
    check_groups(shape, groups)?;
    check_eps(eps)?;
    let (gamma, beta) = (channels(weight, c, "weight")?, channels(bias, c, "bias")?);
    let (xs, ys) = (contiguous(&x, "x")?, contiguous_mut(&mut y, "y")?);
    let mut stats = vec![ChannelStats::default(); n * groups];
    detached(py, xs.len(), || {
        gn::group_norm_forward_train(
            xs,
            ys,
            shape,
            groups,
            eps,
            gamma.as_deref(),
            beta.as_deref(),
            false,
            &mut stats,
        )
    });
    Ok(stats_out(py, &stats))
}

/// The backward of `gn_train_forward`; returns dγ and dβ per channel (summed over samples).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn gn_train_backward<'py>(
    py: Python<'py>,
    x: In<'py>,
    dy: In<'py>,
    mut dx: Out<'py>,
    n: usize,
    c: usize,
    s: usize,
    groups: usize,
    eps: f64,
    weight: Option<PyReadonlyArray1<'py, f32>>,
    mean: PyReadonlyArray1<'py, f64>,
    var: PyReadonlyArray1<'py, f32>,
) -> PyResult<(F64s<'py>, F64s<'py>)> {
    let shape = explicit_view(&x, n, c, s)?;
    check_groups(shape, groups)?;
    check_eps(eps)?;
    let gamma = channels(weight, c, "weight")?;
    let (mean, var) = (required(mean, n * groups, "mean")?, required(var, n * groups, "var")?);
    let (xs, ds, dxs) = backward_slices(&x, &dy, &mut dx)?;
    let (dw, db) = detached(py, xs.len(), || {
        let stats: Vec<ChannelStats> = mean
            .iter()
            .zip(&var)
            .map(|(&mean, &var)| ChannelStats { mean, var })
            .collect();
        let (mut dw, mut db) = (vec![0.0f64; c], vec![0.0f64; c]);
        let gamma = gamma.as_deref();
        if s == 1 && groups == 1 {
            // nn.LayerNorm: column sums over the samples, not N·C per-element pairs.
            gn::layer_norm_backward(
                xs,
                xs,
                ds,
                dxs,
                shape,
                eps,
                gamma,
                false,
                &stats,
                &mut dw,
                &mut db,
                &mut Vec::new(),
            );
            return (dw, db);
        }
        let mut per = vec![(0.0f64, 0.0f64); n * c];
        gn::group_norm_backward(
            xs,
            xs,
            ds,
            dxs,
            shape,
            groups,
            eps,
            gamma,
            false,
            &stats,
            Some(&mut per),
        );
        for row in per.chunks(c) {
            for (ch, &(sd, sdx)) in row.iter().enumerate() {
                db[ch] += sd;
                dw[ch] += sdx;
            }
        }
        (dw, db)
    });
    Ok((dw.into_pyarray(py), db.into_pyarray(py)))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(gn_train_forward, m)?)?;
    m.add_function(wrap_pyfunction!(gn_train_backward, m)?)?;
    Ok(())
}
