//! BatchNorm's kernels (training forward and backward, fixed statistics, SyncBN's pieces).

use numpy::{PyArray1, PyReadonlyArray1, PyReadwriteArray1, PyUntypedArrayMethods};
use pyo3::prelude::*;

use super::*;
use normlab::kernels::batch_norm::{self as bn, ChannelAffine, ChannelGrad, Workspace};

/// BatchNorm's training forward: y = (x − μ_B)/sqrt(σ²_B + eps)·γ + β per channel, over the
/// whole batch or per virtual batch; returns each set's (mean, biased variance), [sets·C].
/// With `running_mean` and `running_var` (float32, updated in place): running = (1 − m)·running
/// + m·batch in f64 as PyTorch's CPU kernel, with the sets' average mean and unbiased variance
/// (Keras' Ghost BN for virtual batches).
#[pyfunction]
#[pyo3(signature = (x, y, weight, bias, eps, virtual_batch=0, running_mean=None, running_var=None, momentum=0.1))]
#[allow(clippy::too_many_arguments)]
fn bn_train_forward<'py>(
    py: Python<'py>,
    x: In<'py>,
    mut y: Out<'py>,
    weight: Option<PyReadonlyArray1<'py, f32>>,
    bias: Option<PyReadonlyArray1<'py, f32>>,
    eps: f64,
    virtual_batch: usize,
    running_mean: Option<PyReadwriteArray1<'py, f32>>,
    running_var: Option<PyReadwriteArray1<'py, f32>>,
    momentum: f64,
) -> PyResult<(F64s<'py>, Bound<'py, PyArray1<f32>>)> {
    let shape = view(&x, "x")?;
    same_shape(x.shape(), y.shape(), "y")?;
    check_eps(eps)?;
    let v = set_size(shape.n, virtual_batch)?;
    let (gamma, beta) = (channels(weight, shape.c, "weight")?, channels(bias, shape.c, "bias")?);
    let (xs, ys) = (contiguous(&x, "x")?, contiguous_mut(&mut y, "y")?);
    let set = shape.with_batch(v);
    let mut stats = vec![ChannelStats::default(); shape.n / v * shape.c];
    detached(py, xs.len(), || {
        let affine = |ch: usize, st: ChannelStats| {
            (
                bn::inverse_std(st.var, eps) * gamma.as_ref().map_or(1.0, |g| g[ch]),
                beta.as_ref().map_or(0.0, |b| b[ch]),
            )
        };
        let mut ws = Workspace::default();
        for (j, st) in stats.chunks_mut(shape.c).enumerate() {
            let r = j * set.len()..(j + 1) * set.len();
            bn::batch_norm_forward_train(&xs[r.clone()], &mut ys[r], set, false, st, &affine, &mut ws);
        }
    });
    if let (Some(mut rm), Some(mut rv)) = (running_mean, running_var) {
        let c = shape.c;
        let (rm, rv) = (
            running_slice(&mut rm, c, "running_mean")?,
            running_slice(&mut rv, c, "running_var")?,
        );
        let (sets, m) = ((shape.n / v) as f64, set.per_channel() as f64);
        let unbias = if m > 1.0 { m / (m - 1.0) } else { 1.0 };
        for ch in 0..c {
            let mean = stats.iter().skip(ch).step_by(c).map(|st| st.mean).sum::<f64>() / sets;
            let var = stats.iter().skip(ch).step_by(c).map(|st| st.var as f64).sum::<f64>() / sets * unbias;
            rm[ch] = ((1.0 - momentum) * rm[ch] as f64 + momentum * mean) as f32;
            rv[ch] = ((1.0 - momentum) * rv[ch] as f64 + momentum * var) as f32;
        }
    }
    Ok(stats_out(py, &stats))
}

/// A running-statistics buffer of `c` values, written in place.
fn running_slice<'a>(a: &'a mut PyReadwriteArray1<'_, f32>, c: usize, name: &str) -> PyResult<&'a mut [f32]> {
    let s = a
        .as_slice_mut()
        .map_err(|_| bad(format!("{name} must be a contiguous, writable float32 array")))?;
    if s.len() != c {
        return Err(bad(format!(
            "{name} has {} values, expected {c} (one per channel)",
            s.len()
        )));
    }
    Ok(s)
}

/// Fixed statistics (eval mode, Batch Renorm, SyncBN): y = (x − mean[c])·scale[c] + shift[c].
#[pyfunction]
fn bn_fixed_forward<'py>(
    py: Python<'py>,
    x: In<'py>,
    mut y: Out<'py>,
    mean: PyReadonlyArray1<'py, f64>,
    scale: PyReadonlyArray1<'py, f32>,
    shift: PyReadonlyArray1<'py, f32>,
) -> PyResult<()> {
    let shape = view(&x, "x")?;
    same_shape(x.shape(), y.shape(), "y")?;
    let c = shape.c;
    let (mean, scale, shift) = (
        required(mean, c, "mean")?,
        required(scale, c, "scale")?,
        required(shift, c, "shift")?,
    );
    let (xs, ys) = (contiguous(&x, "x")?, contiguous_mut(&mut y, "y")?);
    detached(py, xs.len(), || {
        let affine = ChannelAffine {
            mean: &mean,
            scale: &scale,
            shift: &shift,
        };
        bn::batch_norm_forward_fixed(xs, ys, shape, affine, false)
    });
    Ok(())
}

/// BatchNorm's training backward with the forward's per-set statistics: dx = gain·invstd/m ·
/// (m·dy − Σdy − x̂·Σdy·x̂) per set; returns Σdy and Σdy·x̂ per channel summed over the sets
/// (dβ and, without Renorm's r and d, dγ).
#[pyfunction]
#[pyo3(signature = (x, dy, dx, mean, var, gain, eps, virtual_batch=0))]
#[allow(clippy::too_many_arguments)]
fn bn_train_backward<'py>(
    py: Python<'py>,
    x: In<'py>,
    dy: In<'py>,
    mut dx: Out<'py>,
    mean: PyReadonlyArray1<'py, f64>,
    var: PyReadonlyArray1<'py, f32>,
    gain: PyReadonlyArray1<'py, f32>,
    eps: f64,
    virtual_batch: usize,
) -> PyResult<(F64s<'py>, F64s<'py>)> {
    let shape = view(&x, "x")?;
    check_eps(eps)?;
    let v = set_size(shape.n, virtual_batch)?;
    let (c, sets) = (shape.c, shape.n / v);
    let (mean, var) = (required(mean, sets * c, "mean")?, required(var, sets * c, "var")?);
    let gain = required(gain, c, "gain")?;
    let (xs, ds, dxs) = backward_slices(&x, &dy, &mut dx)?;
    let set = shape.with_batch(v);
    let mut total = vec![ChannelSums::default(); c];
    detached(py, xs.len(), || {
        let mut ws = Workspace::default();
        let mut sums = vec![ChannelSums::default(); c];
        for j in 0..sets {
            let grads: Vec<ChannelGrad> = (0..c)
                .map(|ch| ChannelGrad {
                    mean: mean[j * c + ch],
                    invstd: bn::inverse_std(var[j * c + ch], eps),
                    gain: gain[ch],
                })
                .collect();
            let r = j * set.len()..(j + 1) * set.len();
            // y is read only to mask a fused ReLU, which these modules never fuse.
            bn::batch_norm_backward_train(
                &xs[r.clone()],
                &xs[r.clone()],
                &ds[r.clone()],
                &mut dxs[r],
                set,
                false,
                &grads,
                &mut sums,
                &mut ws,
            );
            for (t, s) in total.iter_mut().zip(&sums) {
                t.sum_dy += s.sum_dy;
                t.sum_dy_xhat += s.sum_dy_xhat;
            }
        }
    });
    Ok(sums_out(py, &total))
}

/// The backward of the fixed-statistics map y = (x − mean)·inv·gain + β: dx = dy·gain·inv (when
/// `dx` is given); returns Σdy and Σdy·(x − mean)·inv per channel.
#[pyfunction]
fn bn_fixed_backward<'py>(
    py: Python<'py>,
    x: In<'py>,
    dy: In<'py>,
    dx: Option<Out<'py>>,
    mean: PyReadonlyArray1<'py, f64>,
    inv: PyReadonlyArray1<'py, f32>,
    gain: PyReadonlyArray1<'py, f32>,
) -> PyResult<(F64s<'py>, F64s<'py>)> {
    let shape = view(&x, "x")?;
    same_shape(x.shape(), dy.shape(), "dy")?;
    let c = shape.c;
    let (mean, inv, gain) = (
        required(mean, c, "mean")?,
        required(inv, c, "inv")?,
        required(gain, c, "gain")?,
    );
    let mut dx = dx;
    if let Some(d) = &dx {
        same_shape(x.shape(), d.shape(), "dx")?;
    }
    let (xs, ds) = (contiguous(&x, "x")?, contiguous(&dy, "dy")?);
    let dxs = match dx.as_mut() {
        Some(d) => Some(contiguous_mut(d, "dx")?),
        None => None,
    };
    let mut sums = vec![ChannelSums::default(); c];
    detached(py, xs.len(), || {
        bn::batch_norm_backward_fixed(xs, xs, ds, dxs, shape, &mean, &inv, &gain, false, &mut sums)
    });
    Ok(sums_out(py, &sums))
}

/// Per-channel mean (f64) and biased variance of x over N and the spatial dims (SyncBN's local
/// statistics, Batch Renorm's and Lp BN's first pass).
#[pyfunction]
fn bn_channel_stats<'py>(py: Python<'py>, x: In<'py>) -> PyResult<(F64s<'py>, Bound<'py, PyArray1<f32>>)> {
    let shape = view(&x, "x")?;
    let xs = contiguous(&x, "x")?;
    let stats: Vec<ChannelStats> = detached(py, xs.len(), || {
        use rayon::prelude::*;
        (0..shape.c)
            .into_par_iter()
            .map(|ch| bn::channel_stats(xs, shape, ch))
            .collect()
    });
    Ok(stats_out(py, &stats))
}

/// SyncBN's dx with Σdy and Σdy·x̂ taken over all `count` values of every process:
/// dx = gain·invstd·(dy − Σdy/m − x̂·Σdy·x̂/m).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn bn_sync_dx<'py>(
    py: Python<'py>,
    x: In<'py>,
    dy: In<'py>,
    mut dx: Out<'py>,
    mean: PyReadonlyArray1<'py, f64>,
    var: PyReadonlyArray1<'py, f32>,
    gain: PyReadonlyArray1<'py, f32>,
    eps: f64,
    sum_dy: PyReadonlyArray1<'py, f64>,
    sum_dy_xhat: PyReadonlyArray1<'py, f64>,
    count: f64,
) -> PyResult<()> {
    let shape = view(&x, "x")?;
    check_eps(eps)?;
    if !(count >= 1.0 && count.is_finite()) {
        return Err(bad(format!("count must be >= 1, got {count}")));
    }
    let c = shape.c;
    let (mean, var, gain) = (
        required(mean, c, "mean")?,
        required(var, c, "var")?,
        required(gain, c, "gain")?,
    );
    let (sd, sdx) = (required(sum_dy, c, "sum_dy")?, required(sum_dy_xhat, c, "sum_dy_xhat")?);
    let (xs, ds, dxs) = backward_slices(&x, &dy, &mut dx)?;
    detached(py, xs.len(), || {
        let grads: Vec<ChannelGrad> = (0..c)
            .map(|ch| ChannelGrad {
                mean: mean[ch],
                invstd: bn::inverse_std(var[ch], eps),
                gain: gain[ch],
            })
            .collect();
        let sums: Vec<ChannelSums> = (0..c)
            .map(|ch| ChannelSums {
                sum_dy: sd[ch],
                sum_dy_xhat: sdx[ch],
            })
            .collect();
        let mut ws = Workspace::default();
        bn::batch_norm_backward_dx(xs, xs, ds, dxs, shape, false, &grads, &sums, count, &mut ws);
    });
    Ok(())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(bn_train_forward, m)?)?;
    m.add_function(wrap_pyfunction!(bn_fixed_forward, m)?)?;
    m.add_function(wrap_pyfunction!(bn_train_backward, m)?)?;
    m.add_function(wrap_pyfunction!(bn_fixed_backward, m)?)?;
    m.add_function(wrap_pyfunction!(bn_channel_stats, m)?)?;
    m.add_function(wrap_pyfunction!(bn_sync_dx, m)?)?;
    Ok(())
}
