//! The norm kernels on numpy float32 arrays, in place: inputs are read and outputs written in
//! the arrays' own memory (C-contiguous; anything else is refused with the fix). Per-channel
//! values (statistics, γ, β) are small and copied. `normlab.torch` and `normlab.functional`
//! call these; their math is in normlab's `kernels` (one line above each function there).

use numpy::{
    IntoPyArray, PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArray1, PyReadonlyArrayDyn, PyReadwriteArrayDyn,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use normlab::kernels::batch_norm::{self as bn, ChannelAffine, ChannelGrad, ChannelStats, ChannelSums, Ncs, Workspace};
use normlab::kernels::group_norm as gn;
use normlab::kernels::lp_norm::{self, LpKind};

type In<'py> = PyReadonlyArrayDyn<'py, f32>;
type Out<'py> = PyReadwriteArrayDyn<'py, f32>;
type F64s<'py> = Bound<'py, PyArray1<f64>>;

fn bad(message: String) -> PyErr {
    PyValueError::new_err(message)
}

fn contiguous<'a>(a: &'a In, name: &str) -> PyResult<&'a [f32]> {
    a.as_slice().map_err(|_| {
        bad(format!(
            "{name} must be a C-contiguous float32 array (np.ascontiguousarray, or .contiguous() on a tensor)"
        ))
    })
}

fn contiguous_mut<'a>(a: &'a mut Out, name: &str) -> PyResult<&'a mut [f32]> {
    a.as_slice_mut()
        .map_err(|_| bad(format!("{name} must be a C-contiguous, writable float32 array")))
}

/// The (N, C, S) view of an [N, C, *] array.
fn view(x: &In, name: &str) -> PyResult<Ncs> {
    crate::start_pool(None)?;
    let shape = x.shape();
    if shape.len() < 2 {
        return Err(bad(format!("{name} must be [N, C, *], got shape {shape:?}")));
    }
    let shape = Ncs::new(shape[0], shape[1], shape[2..].iter().product());
    if shape.is_empty() {
        return Err(bad(format!("{name} is empty (shape {:?})", x.shape())));
    }
    Ok(shape)
}

/// An explicit (N, C, S) view of any array of N·C·S values.
fn explicit_view(x: &In, n: usize, c: usize, s: usize) -> PyResult<Ncs> {
    crate::start_pool(None)?;
    let shape = Ncs::new(n, c, s);
    if shape.is_empty() || n.checked_mul(c).and_then(|v| v.checked_mul(s)) != Some(x.len()) {
        return Err(bad(format!(
            "the view (N={n}, C={c}, S={s}) does not cover the {} values of the input",
            x.len()
        )));
    }
    Ok(shape)
}

fn same_shape(a: &[usize], b: &[usize], what: &str) -> PyResult<()> {
    if a != b {
        return Err(bad(format!("{what} has shape {b:?}, the input has {a:?}")));
    }
    Ok(())
}

/// A per-channel vector of `c` values, copied.
fn channels<T: numpy::Element + Copy>(
    a: Option<PyReadonlyArray1<T>>,
    c: usize,
    name: &str,
) -> PyResult<Option<Vec<T>>> {
    let Some(a) = a else { return Ok(None) };
    let v = a.as_array().to_vec();
    if v.len() != c {
        return Err(bad(format!(
            "{name} has {} values, expected {c} (one per channel)",
            v.len()
        )));
    }
    Ok(Some(v))
}

fn required<T: numpy::Element + Copy>(a: PyReadonlyArray1<T>, c: usize, name: &str) -> PyResult<Vec<T>> {
    Ok(channels(Some(a), c, name)?.expect("given"))
}

/// Samples per statistics set: `virtual_batch` (Ghost BN) or, when 0, the whole batch.
fn set_size(n: usize, virtual_batch: usize) -> PyResult<usize> {
    match virtual_batch {
        0 => Ok(n),
        v if n.is_multiple_of(v) => Ok(v),
        v => Err(bad(format!("the virtual batch {v} does not divide the batch of {n}"))),
    }
}

fn check_eps(eps: f64) -> PyResult<()> {
    if eps > 0.0 && eps.is_finite() {
        Ok(())
    } else {
        Err(bad(format!("eps must be > 0, got {eps}")))
    }
}

fn stats_out<'py>(py: Python<'py>, stats: &[ChannelStats]) -> (F64s<'py>, Bound<'py, PyArray1<f32>>) {
    let mean: Vec<f64> = stats.iter().map(|s| s.mean).collect();
    let var: Vec<f32> = stats.iter().map(|s| s.var).collect();
    (mean.into_pyarray(py), var.into_pyarray(py))
}

fn sums_out<'py>(py: Python<'py>, sums: &[ChannelSums]) -> (F64s<'py>, F64s<'py>) {
    let dy: Vec<f64> = sums.iter().map(|s| s.sum_dy).collect();
    let dy_xhat: Vec<f64> = sums.iter().map(|s| s.sum_dy_xhat).collect();
    (dy.into_pyarray(py), dy_xhat.into_pyarray(py))
}

/// BatchNorm's training forward: y = (x − μ_B)/sqrt(σ²_B + eps)·γ + β per channel, over the
/// whole batch or per virtual batch; returns each set's (mean, biased variance), [sets·C].
#[pyfunction]
#[pyo3(signature = (x, y, weight, bias, eps, virtual_batch=0))]
fn bn_train_forward<'py>(
    py: Python<'py>,
    x: In<'py>,
    mut y: Out<'py>,
    weight: Option<PyReadonlyArray1<'py, f32>>,
    bias: Option<PyReadonlyArray1<'py, f32>>,
    eps: f64,
    virtual_batch: usize,
) -> PyResult<(F64s<'py>, Bound<'py, PyArray1<f32>>)> {
    let shape = view(&x, "x")?;
    same_shape(x.shape(), y.shape(), "y")?;
    check_eps(eps)?;
    let v = set_size(shape.n, virtual_batch)?;
    let (gamma, beta) = (channels(weight, shape.c, "weight")?, channels(bias, shape.c, "bias")?);
    let (xs, ys) = (contiguous(&x, "x")?, contiguous_mut(&mut y, "y")?);
    let set = shape.with_batch(v);
    let mut stats = vec![ChannelStats::default(); shape.n / v * shape.c];
    py.detach(|| {
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
    Ok(stats_out(py, &stats))
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
    py.detach(|| {
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
    same_shape(x.shape(), dy.shape(), "dy")?;
    same_shape(x.shape(), dx.shape(), "dx")?;
    check_eps(eps)?;
    let v = set_size(shape.n, virtual_batch)?;
    let (c, sets) = (shape.c, shape.n / v);
    let (mean, var) = (required(mean, sets * c, "mean")?, required(var, sets * c, "var")?);
    let gain = required(gain, c, "gain")?;
    let (xs, ds, dxs) = (
        contiguous(&x, "x")?,
        contiguous(&dy, "dy")?,
        contiguous_mut(&mut dx, "dx")?,
    );
    let set = shape.with_batch(v);
    let mut total = vec![ChannelSums::default(); c];
    py.detach(|| {
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
    py.detach(|| bn::batch_norm_backward_fixed(xs, xs, ds, dxs, shape, &mean, &inv, &gain, false, &mut sums));
    Ok(sums_out(py, &sums))
}

/// Per-channel mean (f64) and biased variance of x over N and the spatial dims (SyncBN's local
/// statistics, Batch Renorm's and Lp BN's first pass).
#[pyfunction]
fn bn_channel_stats<'py>(py: Python<'py>, x: In<'py>) -> PyResult<(F64s<'py>, Bound<'py, PyArray1<f32>>)> {
    let shape = view(&x, "x")?;
    let xs = contiguous(&x, "x")?;
    let stats: Vec<ChannelStats> = py.detach(|| {
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
    same_shape(x.shape(), dy.shape(), "dy")?;
    same_shape(x.shape(), dx.shape(), "dx")?;
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
    let (xs, ds, dxs) = (
        contiguous(&x, "x")?,
        contiguous(&dy, "dy")?,
        contiguous_mut(&mut dx, "dx")?,
    );
    py.detach(|| {
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
    py.detach(|| {
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
    same_shape(x.shape(), dy.shape(), "dy")?;
    same_shape(x.shape(), dx.shape(), "dx")?;
    check_groups(shape, groups)?;
    check_eps(eps)?;
    let gamma = channels(weight, c, "weight")?;
    let (mean, var) = (required(mean, n * groups, "mean")?, required(var, n * groups, "var")?);
    let (xs, ds, dxs) = (
        contiguous(&x, "x")?,
        contiguous(&dy, "dy")?,
        contiguous_mut(&mut dx, "dx")?,
    );
    let (dw, db) = py.detach(|| {
        let stats: Vec<ChannelStats> = mean
            .iter()
            .zip(&var)
            .map(|(&mean, &var)| ChannelStats { mean, var })
            .collect();
        let (mut dw, mut db) = (vec![0.0f64; c], vec![0.0f64; c]);
        let gamma = gamma.as_deref();
        if s == 1 && groups == 1 {
            // nn.LayerNorm: column sums over the samples, not N·C per-element pairs.
            gn::layer_norm_backward(xs, xs, ds, dxs, shape, eps, gamma, false, &stats, &mut dw, &mut db);
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
    py.detach(|| {
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
    same_shape(x.shape(), dy.shape(), "dy")?;
    same_shape(x.shape(), dx.shape(), "dx")?;
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
    let (xs, ds, dxs) = (
        contiguous(&x, "x")?,
        contiguous(&dy, "dy")?,
        contiguous_mut(&mut dx, "dx")?,
    );
    let stats: Vec<(f64, f32, f64)> = (0..c).map(|ch| (mean[ch], scale[ch], extra[ch])).collect();
    let mut sums = vec![(0.0f64, 0.0f64); c];
    py.detach(|| {
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

/// One normlab layer from a `--norm` spec on arrays, as `normlab layer` runs it on a file: `x`,
/// optionally `dy`, `weight`, `bias`, `running_mean`, `running_var` (float32 arrays) and
/// `num_batches_tracked` (int). Returns `y`, with `dy` also `dx`, `dweight`, `dbias`, and the
/// buffers after the call.
#[pyfunction]
#[pyo3(signature = (spec, tensors, training=true))]
fn norm_layer<'py>(
    py: Python<'py>,
    spec: &str,
    tensors: &Bound<'py, PyDict>,
    training: bool,
) -> PyResult<Bound<'py, PyDict>> {
    crate::start_pool(None)?;
    let norm: normlab::nn::norm_spec::NormSpec = spec.parse().map_err(crate::to_py)?;
    let mut inputs = normlab::conformance::NamedTensors::default();
    for (k, v) in tensors.iter() {
        let key: String = k.extract()?;
        if v.is_none() {
            continue;
        }
        if key == "num_batches_tracked" {
            inputs.i64.insert(key, v.extract::<i64>()?);
            continue;
        }
        let a: PyReadonlyArrayDyn<f32> = v
            .extract()
            .map_err(|_| bad(format!("'{key}' must be a float32 numpy array")))?;
        let t = normlab::tensor::Tensor {
            shape: a.shape().to_vec(),
            data: a.as_array().iter().copied().collect(),
        };
        inputs.f32.insert(key, t);
    }
    let entries = py
        .detach(|| normlab::conformance::run_layer(norm, &inputs, !training))
        .map_err(crate::to_py)?;
    let out = PyDict::new(py);
    for e in entries {
        match e.dtype {
            safetensors::Dtype::I64 => {
                let v = i64::from_le_bytes(e.bytes[..8].try_into().expect("8 bytes"));
                out.set_item(&e.name, v)?;
            }
            _ => {
                let data: Vec<f32> = normlab::checkpoint::le_f32s(&e.bytes).collect();
                let a: Bound<'py, PyArrayDyn<f32>> = data.into_pyarray(py).reshape(e.shape.clone())?;
                out.set_item(&e.name, a)?;
            }
        }
    }
    Ok(out)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(bn_train_forward, m)?)?;
    m.add_function(wrap_pyfunction!(bn_fixed_forward, m)?)?;
    m.add_function(wrap_pyfunction!(bn_train_backward, m)?)?;
    m.add_function(wrap_pyfunction!(bn_fixed_backward, m)?)?;
    m.add_function(wrap_pyfunction!(bn_channel_stats, m)?)?;
    m.add_function(wrap_pyfunction!(bn_sync_dx, m)?)?;
    m.add_function(wrap_pyfunction!(gn_train_forward, m)?)?;
    m.add_function(wrap_pyfunction!(gn_train_backward, m)?)?;
    m.add_function(wrap_pyfunction!(lp_train_forward, m)?)?;
    m.add_function(wrap_pyfunction!(lp_train_backward, m)?)?;
    m.add_function(wrap_pyfunction!(norm_layer, m)?)?;
    Ok(())
}
