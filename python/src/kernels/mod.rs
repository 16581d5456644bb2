//! The norm kernels on numpy float32 arrays, in place: inputs are read and outputs written in
//! the arrays' own memory (C-contiguous; anything else is refused with the fix). Per-channel
//! values (statistics, γ, β) are small and copied. `normlab.torch` and `normlab.functional`
//! call these; their math is in normlab's `kernels` (one line above each function there).
//! mod.rs: the array checks every function shares; one file per norm family, and `layer.rs`,
//! any `--norm` spec through the engine's own layer.

use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1, PyReadonlyArrayDyn, PyReadwriteArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use normlab::kernels::batch_norm::{ChannelStats, ChannelSums, Ncs};

mod batch_norm;
mod group_norm;
mod layer;
mod lp_norm;

pub(super) type In<'py> = PyReadonlyArrayDyn<'py, f32>;
pub(super) type Out<'py> = PyReadwriteArrayDyn<'py, f32>;
pub(super) type F64s<'py> = Bound<'py, PyArray1<f64>>;

/// Below this many values a kernel runs without quieting PyTorch's OpenMP team: entering and
/// leaving the team's region costs about 14 µs here (a [2, 64] forward: 15.8 µs against
/// 1.8 µs), more than a spinning neighbour takes from so short a kernel.
const QUIET_FROM: usize = 1 << 16;

/// A kernel call over `values` values with the GIL released and, for a large one, PyTorch's
/// OpenMP team asleep rather than spinning on the cores the kernel needs (omp.rs).
pub(super) fn detached<R: Send>(py: Python<'_>, values: usize, f: impl FnOnce() -> R + Send) -> R {
    if values < QUIET_FROM {
        return py.detach(f);
    }
    py.detach(|| crate::omp::quiet(f))
}

pub(super) fn bad(message: String) -> PyErr {
    PyValueError::new_err(message)
}

pub(super) fn contiguous<'a>(a: &'a In, name: &str) -> PyResult<&'a [f32]> {
    a.as_slice().map_err(|_| {
        bad(format!(
            "{name} must be a C-contiguous float32 array (np.ascontiguousarray, or .contiguous() on a tensor)"
        ))
    })
}

pub(super) fn contiguous_mut<'a>(a: &'a mut Out, name: &str) -> PyResult<&'a mut [f32]> {
    a.as_slice_mut()
        .map_err(|_| bad(format!("{name} must be a C-contiguous, writable float32 array")))
}

/// A backward's x, dy and dx: same shapes, contiguous, dx writable.
pub(super) fn backward_slices<'a>(
    x: &'a In,
    dy: &'a In,
    dx: &'a mut Out,
) -> PyResult<(&'a [f32], &'a [f32], &'a mut [f32])> {
    same_shape(x.shape(), dy.shape(), "dy")?;
    same_shape(x.shape(), dx.shape(), "dx")?;
    Ok((contiguous(x, "x")?, contiguous(dy, "dy")?, contiguous_mut(dx, "dx")?))
}

/// The (N, C, S) view of an [N, C, *] array.
pub(super) fn view(x: &In, name: &str) -> PyResult<Ncs> {
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
pub(super) fn explicit_view(x: &In, n: usize, c: usize, s: usize) -> PyResult<Ncs> {
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

pub(super) fn same_shape(a: &[usize], b: &[usize], what: &str) -> PyResult<()> {
    if a != b {
        return Err(bad(format!("{what} has shape {b:?}, the input has {a:?}")));
    }
    Ok(())
}

/// A per-channel vector of `c` values, copied.
pub(super) fn channels<T: numpy::Element + Copy>(
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

pub(super) fn required<T: numpy::Element + Copy>(a: PyReadonlyArray1<T>, c: usize, name: &str) -> PyResult<Vec<T>> {
    Ok(channels(Some(a), c, name)?.expect("given"))
}

/// Samples per statistics set: `virtual_batch` (Ghost BN) or, when 0, the whole batch.
pub(super) fn set_size(n: usize, virtual_batch: usize) -> PyResult<usize> {
    match virtual_batch {
        0 => Ok(n),
        v if n.is_multiple_of(v) => Ok(v),
        v => Err(bad(format!("the virtual batch {v} does not divide the batch of {n}"))),
    }
}

pub(super) fn check_eps(eps: f64) -> PyResult<()> {
    if eps > 0.0 && eps.is_finite() {
        Ok(())
    } else {
        Err(bad(format!("eps must be > 0, got {eps}")))
    }
}

pub(super) fn stats_out<'py>(py: Python<'py>, stats: &[ChannelStats]) -> (F64s<'py>, Bound<'py, PyArray1<f32>>) {
    let mean: Vec<f64> = stats.iter().map(|s| s.mean).collect();
    let var: Vec<f32> = stats.iter().map(|s| s.var).collect();
    (mean.into_pyarray(py), var.into_pyarray(py))
}

pub(super) fn sums_out<'py>(py: Python<'py>, sums: &[ChannelSums]) -> (F64s<'py>, F64s<'py>) {
    let dy: Vec<f64> = sums.iter().map(|s| s.sum_dy).collect();
    let dy_xhat: Vec<f64> = sums.iter().map(|s| s.sum_dy_xhat).collect();
    (dy.into_pyarray(py), dy_xhat.into_pyarray(py))
}
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    batch_norm::register(m)?;
    group_norm::register(m)?;
    lp_norm::register(m)?;
    layer::register(m)
}
