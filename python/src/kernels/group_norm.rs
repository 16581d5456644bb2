//! GroupNorm, LayerNorm and InstanceNorm: statistics within each sample.

use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1, PyUntypedArrayMethods};
use pyo3::prelude::*;

use super::*;
use normlab::kernels::group_norm as gn;

/// Buffers kept across calls of nn.LayerNorm's backward: the kernel's per-task column
/// accumulators and its f64 dγ, dβ. Allocating them afresh (6.4 MB and 3.2 MB at [8, 64, 56,
/// 56]) cost page faults on every call.
#[derive(Default)]
struct LayerNormScratch {
    tasks: Vec<f32>,
    dgamma: Vec<f32>,
    dbeta: Vec<f32>,
}

static LAYER_NORM_SCRATCH: std::sync::Mutex<LayerNormScratch> = std::sync::Mutex::new(LayerNormScratch {
    tasks: Vec::new(),
    dgamma: Vec::new(),
    dbeta: Vec::new(),
});

/// A caller's float32 array for C per-channel values, checked.
fn output<'a>(out: &'a mut Option<Out>, c: usize, name: &str) -> PyResult<Option<&'a mut [f32]>> {
    let Some(o) = out else { return Ok(None) };
    let o = contiguous_mut(o, name)?;
    if o.len() != c {
        return Err(bad(format!("{name} has {} values, expected {c}", o.len())));
    }
    Ok(Some(o))
}

/// Per-channel sums (f64, or f32 already rounded once) rounded into the caller's arrays when
/// given, else new f64 vectors.
fn rounded<T: Copy + Into<f64>>(sums: [&[T]; 2], outs: [Option<&mut [f32]>; 2]) -> Option<(Vec<f64>, Vec<f64>)> {
    let widened = |v: &[T]| v.iter().map(|&v| v.into()).collect::<Vec<f64>>();
    if outs.iter().all(Option::is_none) {
        return Some((widened(sums[0]), widened(sums[1])));
    }
    for (sum, out) in sums.into_iter().zip(outs) {
        if let Some(o) = out {
            o.iter_mut().zip(sum).for_each(|(o, &v)| *o = v.into() as f32);
        }
    }
    None
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

/// The backward of `gn_train_forward`; returns dγ and dβ per channel (summed over samples) as
/// float64 arrays, or, when `dweight` and `dbias` (float32, C values) are given, rounds them
/// into those and returns None (nn.LayerNorm's C = numel(normalized_shape) can be large: no
/// new arrays per call).
#[pyfunction]
#[pyo3(signature = (x, dy, dx, n, c, s, groups, eps, weight, mean, var, dweight=None, dbias=None))]
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
    mut dweight: Option<Out<'py>>,
    mut dbias: Option<Out<'py>>,
) -> PyResult<Option<(F64s<'py>, F64s<'py>)>> {
    let shape = explicit_view(&x, n, c, s)?;
    check_groups(shape, groups)?;
    check_eps(eps)?;
    let gamma = channels(weight, c, "weight")?;
    let (mean, var) = (required(mean, n * groups, "mean")?, required(var, n * groups, "var")?);
    let dw_out = output(&mut dweight, c, "dweight")?;
    let db_out = output(&mut dbias, c, "dbias")?;
    let (xs, ds, dxs) = backward_slices(&x, &dy, &mut dx)?;
    let stats: Vec<ChannelStats> = mean
        .iter()
        .zip(&var)
        .map(|(&mean, &var)| ChannelStats { mean, var })
        .collect();
    let gamma = gamma.as_deref();
    let sums = detached(py, xs.len(), || {
        if s == 1 && groups == 1 {
            // nn.LayerNorm: column sums over the samples, not N·C per-element pairs. The
            // buffers are locked inside the GIL-free section (a thread waiting for them must
            // not hold the GIL).
            let mut guard = LAYER_NORM_SCRATCH.lock().unwrap_or_else(|e| e.into_inner());
            let sc = &mut *guard;
            // The kernel adds into them.
            sc.dgamma.clear();
            sc.dgamma.resize(c, 0.0);
            sc.dbeta.clear();
            sc.dbeta.resize(c, 0.0);
            normlab::kernels::layer_norm::layer_norm_backward(
                xs,
                xs,
                ds,
                dxs,
                shape,
                eps,
                gamma,
                false,
                &stats,
                &mut sc.dgamma,
                &mut sc.dbeta,
                &mut sc.tasks,
            );
            // Already rounded once (the f64 sums of the kernel's tasks, added into zeros).
            return rounded([&sc.dgamma, &sc.dbeta], [dw_out, db_out]);
        }
        let (mut dw, mut db) = (vec![0.0f64; c], vec![0.0f64; c]);
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
        rounded([&dw, &db], [dw_out, db_out])
    });
    Ok(sums.map(|(dw, db)| (dw.into_pyarray(py), db.into_pyarray(py))))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(gn_train_forward, m)?)?;
    m.add_function(wrap_pyfunction!(gn_train_backward, m)?)?;
    Ok(())
}
