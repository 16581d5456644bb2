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
mod omp;

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

/// normlab's worker threads: the global rayon pool, started once per process with the thread
/// that starts it (the interpreter's main thread, normally) as worker 0. A kernel called from
/// that thread then runs its parallel loops as a worker, taking the first share of the work at
/// once, instead of handing every loop to the pool and sleeping until it ends: measured on
/// BatchNorm2d at (32, 512, 2, 2), that hand-off and the wake-ups cost more than the kernel.
/// Training runs on that thread too, so its Ctrl-C check (Python runs signal handlers only on
/// the main thread) works between steps.
pub(crate) fn start_pool(threads: Option<usize>) -> PyResult<usize> {
    use std::sync::Mutex;
    static STARTED: Mutex<Option<usize>> = Mutex::new(None);
    let mut started = STARTED
        .lock()
        .map_err(|_| PyRuntimeError::new_err("normlab's thread setup failed earlier"))?;
    if let Some(n) = *started {
        return match threads {
            Some(t) if t != n => Err(PyRuntimeError::new_err(format!(
                "normlab's worker threads are already running ({n}); set_num_threads({t}) must come before the first call"
            ))),
            _ => Ok(n),
        };
    }
    let n = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if !(1..=256).contains(&n) {
        return Err(PyValueError::new_err(format!("threads must be in 1..=256, got {n}")));
    }
    let n = match rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .use_current_thread()
        .build_global()
    {
        Ok(()) => n,
        // Started by something else in this process: use it as it is.
        Err(_) => rayon::current_num_threads(),
    };
    *started = Some(n);
    Ok(n)
}

/// Sets the number of worker threads of normlab's kernels (once per process, before the first
/// kernel runs; a later call with another number raises).
#[pyfunction]
fn set_num_threads(n: usize) -> PyResult<()> {
    start_pool(Some(n)).map(|_| ())
}

/// The number of worker threads normlab's kernels use.
#[pyfunction]
fn get_num_threads() -> PyResult<usize> {
    start_pool(None)
}

/// Looks for the process's OpenMP runtime (PyTorch's), whose team then sleeps while normlab's
/// kernels run; whether it was found. `normlab.torch` calls it once torch is imported.
#[pyfunction]
fn _find_openmp() -> bool {
    omp::search()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(_find_openmp, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    kernels::register(m)?;
    engine::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
