//! normlab's Python module `normlab._native`: the norm kernels on numpy arrays (no copy: they
//! read and write the arrays' own memory), one normlab layer from a `--norm` spec, and the
//! engine (train, study, checkpoints). The Python package (normlab/) wraps it: drop-in PyTorch
//! modules in `normlab.torch`, `torch.nn.functional`-style functions in `normlab.functional`.
//!
//! Every call checks shapes and lengths before touching memory, raises one Python exception
//! naming the problem, and releases the GIL while the kernels run.

use pyo3::exceptions::{PyKeyboardInterrupt, PyMemoryError, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

mod engine;
mod kernels;

/// normlab's error as the Python exception a Python user expects for it.
pub(crate) fn to_py(e: normlab::Error) -> PyErr {
    use normlab::Error as E;
    let text = e.to_string();
    match e {
        E::OutOfMemory(_) => PyMemoryError::new_err(text),
        E::Interrupted(_) => PyKeyboardInterrupt::new_err(text),
        E::Io { .. } | E::Output(_) => PyOSError::new_err(text),
        E::Invalid(_) | E::Shape { .. } | E::Data { .. } | E::DataMissing(_) | E::Checkpoint { .. } => {
            PyValueError::new_err(text)
        }
        _ => PyRuntimeError::new_err(text),
    }
}

/// Sets the number of worker threads of normlab's kernels (once per process, before the first
/// kernel runs; later calls with another number raise).
#[pyfunction]
fn set_num_threads(n: usize) -> PyResult<()> {
    if !(1..=1024).contains(&n) {
        return Err(PyValueError::new_err(format!("threads must be in 1..=1024, got {n}")));
    }
    match rayon::ThreadPoolBuilder::new().num_threads(n).build_global() {
        Ok(()) => Ok(()),
        Err(_) if rayon::current_num_threads() == n => Ok(()),
        Err(_) => Err(PyRuntimeError::new_err(format!(
            "normlab's worker threads are already running ({}); set_num_threads must come before the first call",
            rayon::current_num_threads()
        ))),
    }
}

/// The number of worker threads normlab's kernels use.
#[pyfunction]
fn get_num_threads() -> usize {
    rayon::current_num_threads()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    kernels::register(m)?;
    engine::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
