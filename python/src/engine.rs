//! The engine from Python: train a run, run a study, read a checkpoint. The same library calls
//! as the CLI, in this process and on the calling thread (the pool's worker 0): the GIL is
//! released while training, a progress bar shows on a terminal, each epoch's row goes through
//! Python's `sys.stdout` (so a notebook shows it), and Ctrl-C stops the run after the current
//! step with its folder resumable, as in the shell.

use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use numpy::{IntoPyArray, PyArrayMethods};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use normlab::models::Arch;
use normlab::nn::norm_spec::NormSpec;
use normlab::optim::{OptimizerConfig, OptimizerKind};
use normlab::train::{self, EpochMetrics, LoaderProgress, Reporter, RunMetrics, Start, TrainConfig};
use normlab::{Error, Result};

use crate::to_py;

/// The keyword arguments of `normlab.train`: the CLI's `normlab train` options, by the same
/// names with `_` for `-`.
const TRAIN_OPTIONS: &[&str] = &[
    "model",
    "norm",
    "epochs",
    "batch_size",
    "optimizer",
    "lr",
    "momentum",
    "nesterov",
    "weight_decay",
    "no_decay_norm_bias",
    "schedule",
    "warmup",
    "seed",
    "threads",
    "train_limit",
    "test_limit",
    "data",
    "sparsity",
    "gamma_init",
    "dropout",
    "init_scale",
    "init_from",
    "augment",
    "resize",
    "tensorboard",
    "eval_train",
    "freeze_bn",
    "cache_limit",
    "decode_threads",
    "skip_bad_images",
    "shuffle",
    "shuffle_buffer",
];

fn parsed<T: std::str::FromStr<Err = Error>>(v: &Bound<'_, PyAny>, key: &str) -> PyResult<T> {
    let text: String = v
        .extract()
        .map_err(|_| PyTypeError::new_err(format!("{key} takes a string")))?;
    text.parse().map_err(to_py)
}

fn number<'py, T: for<'a> FromPyObject<'a, 'py>>(v: &Bound<'py, PyAny>, key: &str) -> PyResult<T> {
    v.extract()
        .map_err(|_| PyTypeError::new_err(format!("{key} takes a number, got {v}")))
}

/// A fresh run's settings: the CLI's defaults with every keyword given put in its place.
fn config_from(options: &Bound<'_, PyDict>, threads: usize) -> PyResult<TrainConfig> {
    for key in options.keys() {
        let key: String = key.extract()?;
        if !TRAIN_OPTIONS.contains(&key.as_str()) {
            return Err(PyTypeError::new_err(format!(
                "train() got an unexpected keyword argument '{key}' (the options are: {})",
                TRAIN_OPTIONS.join(", ")
            )));
        }
    }
    let get = |k: &str| options.get_item(k).ok().flatten().filter(|v| !v.is_none());
    let kind: OptimizerKind = match get("optimizer") {
        Some(v) => parsed(&v, "optimizer")?,
        None => OptimizerKind::Adam,
    };
    let mut c = TrainConfig {
        optimizer: OptimizerConfig {
            kind,
            lr: if kind == OptimizerKind::Sgd { 0.01 } else { 1e-3 },
            ..OptimizerConfig::default()
        },
        threads,
        ..TrainConfig::default()
    };
    if let Some(v) = get("model") {
        c.model = parsed::<Arch>(&v, "model")?;
    }
    match get("norm") {
        Some(v) => c.norm = parsed::<NormSpec>(&v, "norm")?,
        None => c.norm = c.model.default_norm(),
    }
    if let Some(v) = get("epochs") {
        c.epochs = number(&v, "epochs")?;
    }
    if let Some(v) = get("batch_size") {
        c.batch_size = number(&v, "batch_size")?;
    }
    if let Some(v) = get("lr") {
        c.optimizer.lr = number(&v, "lr")?;
    }
    if let Some(v) = get("momentum") {
        c.optimizer.momentum = number(&v, "momentum")?;
    }
    if let Some(v) = get("nesterov") {
        c.optimizer.nesterov = v.is_truthy()?;
    }
    if let Some(v) = get("weight_decay") {
        c.optimizer.weight_decay = number(&v, "weight_decay")?;
    }
    if let Some(v) = get("no_decay_norm_bias") {
        c.optimizer.no_decay_norm_and_bias = v.is_truthy()?;
    }
    if let Some(v) = get("schedule") {
        c.schedule = parsed(&v, "schedule")?;
    }
    if let Some(v) = get("warmup") {
        c.warmup_epochs = number(&v, "warmup")?;
    }
    if let Some(v) = get("seed") {
        c.seed = number(&v, "seed")?;
    }
    if let Some(v) = get("train_limit") {
        c.train_limit = Some(number(&v, "train_limit")?);
    }
    if let Some(v) = get("test_limit") {
        c.test_limit = Some(number(&v, "test_limit")?);
    }
    if let Some(v) = get("data") {
        c.data = Some(v.extract::<PathBuf>()?);
    }
    if let Some(v) = get("sparsity") {
        c.sparsity = number(&v, "sparsity")?;
    }
    if let Some(v) = get("gamma_init") {
        c.gamma_init = Some(number(&v, "gamma_init")?);
    }
    if let Some(v) = get("dropout") {
        c.dropout = number(&v, "dropout")?;
    }
    if let Some(v) = get("init_scale") {
        c.init_scale = Some(number(&v, "init_scale")?);
    }
    if let Some(v) = get("init_from") {
        c.init_from = Some(v.extract::<PathBuf>()?);
    }
    if let Some(v) = get("augment") {
        c.augment = parsed(&v, "augment")?;
    }
    if let Some(v) = get("resize") {
        let (h, w): (usize, usize) = v
            .extract()
            .map_err(|_| PyTypeError::new_err("resize takes (height, width)"))?;
        c.resize = Some([h, w]);
    }
    if let Some(v) = get("tensorboard") {
        c.tensorboard = v.is_truthy()?;
    }
    if let Some(v) = get("eval_train") {
        c.eval_train = v.is_truthy()?;
    }
    if let Some(v) = get("freeze_bn") {
        c.freeze_bn = Some(parsed(&v, "freeze_bn")?);
    }
    if let Some(v) = get("cache_limit") {
        c.cache_limit = Some(
            v.extract::<u64>()
                .map_err(|_| PyTypeError::new_err("cache_limit takes a number of bytes"))?,
        );
    }
    if let Some(v) = get("decode_threads") {
        c.decode_threads = Some(
            v.extract::<usize>()
                .map_err(|_| PyTypeError::new_err("decode_threads takes a whole number"))?,
        );
    }
    if let Some(v) = get("skip_bad_images") {
        c.skip_bad_images = v.is_truthy()?;
    }
    if let Some(v) = get("shuffle") {
        c.shuffle = v.is_truthy()?;
    }
    if let Some(v) = get("shuffle_buffer") {
        c.shuffle_buffer = v
            .extract::<usize>()
            .map_err(|_| PyTypeError::new_err("shuffle_buffer takes a whole number"))?;
    }
    if c.optimizer.nesterov && c.optimizer.momentum == 0.0 {
        return Err(to_py(Error::invalid("nesterov needs momentum > 0")));
    }
    c.validate().map_err(to_py)?;
    Ok(c)
}

/// Runs `f` on this thread (the pool's worker 0, see `start_pool`) with the GIL released.
fn run_here<T: Send>(py: Python<'_>, f: impl FnOnce() -> T + Send) -> T {
    py.detach(f)
}

/// Whether Ctrl-C was pressed: runs Python's pending signal handlers (only the main thread
/// has any) and says whether one raised.
fn interrupted() -> bool {
    Python::attach(|py| py.check_signals()).is_err()
}

/// Writes a line through Python's sys.stdout (a notebook cell shows it).
fn say(line: &str) {
    Python::attach(|py| {
        if let Ok(sys) = py.import("sys") {
            if let Ok(out) = sys.getattr("stdout") {
                let _ = out.call_method1("write", (format!("{line}\n"),));
                let _ = out.call_method0("flush");
            }
        }
    });
}

/// Progress bars on a terminal, the epoch table through sys.stdout, Ctrl-C between steps.
struct PyReporter {
    bar: Option<ProgressBar>,
    show: bool,
    out: PathBuf,
    committed: usize,
}

impl PyReporter {
    fn interrupted(&self) -> Error {
        let how = format!("normlab.train(resume=\"{}\")", self.out.display());
        Error::Interrupted(match self.committed {
            0 => format!(
                "interrupted before the first epoch ended: no checkpoint yet in {}; start again, or continue with {how}",
                self.out.display()
            ),
            k => format!(
                "interrupted: the last checkpoint is {} (epoch {k}); continue with {how}",
                self.out.join("model.safetensors").display()
            ),
        })
    }
}

impl Reporter for PyReporter {
    fn started(&mut self, data: &str, out: &Path, m: &RunMetrics) -> Result<()> {
        self.committed = m.epochs.len();
        if self.show {
            say(data);
            let resumed = match m.epochs.len() {
                0 => String::new(),
                k => format!(" (resuming after epoch {k})"),
            };
            say(&format!("run folder: {}{resumed}", out.display()));
            say(&train::progress::epoch_header());
        }
        Ok(())
    }

    fn epoch_start(&mut self, epoch: usize, epochs: usize, batches: usize) {
        if self.show {
            self.bar = Some(train::progress::epoch_bar(epoch, epochs, batches));
        }
    }

    fn batch(&mut self, mean_loss: f64, images_per_sec: f64, data: Option<LoaderProgress>) -> Result<()> {
        if let Some(bar) = &self.bar {
            train::progress::advance(bar, mean_loss, images_per_sec, data);
        }
        if interrupted() {
            if let Some(bar) = self.bar.take() {
                bar.finish_and_clear();
            }
            return Err(self.interrupted());
        }
        Ok(())
    }

    fn epoch_end(&mut self, m: &EpochMetrics) -> Result<()> {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if self.show {
            say(&train::progress::epoch_row(m));
        }
        Ok(())
    }

    fn committed(&mut self, _out: &Path, epoch: usize) {
        self.committed = epoch;
    }
}

/// Trains a run (fresh from the options, or `resume`d) and returns its folder.
#[pyfunction]
#[pyo3(signature = (*, out=None, resume=None, progress=true, **options))]
fn train_run(
    py: Python<'_>,
    out: Option<PathBuf>,
    resume: Option<PathBuf>,
    progress: bool,
    options: Option<&Bound<'_, PyDict>>,
) -> PyResult<PathBuf> {
    let empty = PyDict::new(py);
    let options = options.unwrap_or(&empty);
    let threads: Option<usize> = match options.get_item("threads")? {
        Some(v) if !v.is_none() => Some(number(&v, "threads")?),
        _ => None,
    };
    let (start, dir) = match resume {
        Some(dir) => {
            let extra: Vec<String> = options
                .keys()
                .iter()
                .filter_map(|k| k.extract::<String>().ok())
                .filter(|k| k != "epochs" && k != "threads")
                .collect();
            if !extra.is_empty() || out.is_some() {
                return Err(to_py(Error::invalid(format!(
                    "resume keeps the run's own settings; only epochs and threads may be given with it, not {}",
                    if out.is_some() {
                        "out".to_string()
                    } else {
                        extra.join(", ")
                    }
                ))));
            }
            let epochs: Option<usize> = match options.get_item("epochs")? {
                Some(v) if !v.is_none() => Some(number(&v, "epochs")?),
                _ => None,
            };
            crate::start_pool(threads)?;
            (
                Start::Resume {
                    epochs,
                    threads,
                    loader: Default::default(),
                },
                dir,
            )
        }
        None => {
            let n = crate::start_pool(threads)?;
            let config = config_from(options, n)?;
            let name = format!(
                "{}-{}",
                config.model.short().replace([':', ','], "_"),
                config.norm.short().replace([':', ',', '='], "_")
            );
            let dir = out.unwrap_or_else(|| train::fresh_run_dir(Path::new("runs"), &name));
            (Start::Fresh(Box::new(config)), dir)
        }
    };
    let mut reporter = PyReporter {
        bar: None,
        show: progress,
        out: dir.clone(),
        committed: 0,
    };
    let target = dir.clone();
    let result = run_here(py, move || train::train(start, &target, &mut reporter));
    result.map_err(to_py)?;
    Ok(dir)
}

/// Runs a study (`normlab study NAME`) into `out` and returns that folder.
#[pyfunction]
#[pyo3(signature = (name, *, quick=false, seeds=3, out=None, data=None, threads=None, progress=true))]
#[allow(clippy::too_many_arguments)]
fn study_run(
    py: Python<'_>,
    name: &str,
    quick: bool,
    seeds: usize,
    out: Option<PathBuf>,
    data: Option<PathBuf>,
    threads: Option<usize>,
    progress: bool,
) -> PyResult<PathBuf> {
    normlab::studies::find(name).map_err(to_py)?;
    let threads = crate::start_pool(threads)?;
    let out = out.unwrap_or_else(|| train::fresh_run_dir(Path::new("studies"), name));
    let opts = normlab::studies::StudyOptions {
        comm: normlab::dist::single_process(),
        quick,
        seeds,
        out: out.clone(),
        data,
        threads,
    };
    let bar = if progress {
        train::progress::runs_bar()
    } else {
        ProgressBar::hidden()
    };
    let name = name.to_string();
    // Ctrl-C stops the study between its runs (a study starts over in a new folder).
    let results = run_here(py, || {
        normlab::studies::run_study(&name, &opts, &mut |i, n, what| {
            bar.set_length(n as u64);
            bar.set_position(i as u64);
            bar.set_message(what.to_string());
            if interrupted() {
                return Err(Error::Interrupted(format!(
                    "interrupted between runs: the finished runs are in {}; a study starts over in a new folder",
                    out.join("runs").display()
                )));
            }
            Ok(())
        })
    });
    bar.finish_and_clear();
    results.map_err(to_py)?;
    Ok(out)
}

/// A checkpoint's tensors by PyTorch name: float32 arrays, and int64 0-d arrays for
/// `num_batches_tracked`, as `torch.load_state_dict` expects them.
#[pyfunction]
fn read_state_dict<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let bytes = normlab::checkpoint::read_safetensors(&path).map_err(to_py)?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        to_py(Error::checkpoint(
            &path,
            format!("not a readable safetensors file ({e})"),
        ))
    })?;
    let out = PyDict::new(py);
    let mut names: Vec<String> = st.names().into_iter().cloned().collect();
    names.sort();
    for name in names {
        let t = st
            .tensor(&name)
            .map_err(|e| to_py(Error::checkpoint(&path, format!("{name}: {e}"))))?;
        let shape = t.shape().to_vec();
        match t.dtype() {
            safetensors::Dtype::F32 => {
                let v: Vec<f32> = normlab::checkpoint::le_f32s(t.data()).collect();
                out.set_item(&name, v.into_pyarray(py).reshape(shape)?)?;
            }
            safetensors::Dtype::I64 => {
                let v: Vec<i64> = t
                    .data()
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                    .collect();
                out.set_item(&name, v.into_pyarray(py).reshape(shape)?)?;
            }
            other => {
                return Err(to_py(Error::checkpoint(
                    &path,
                    format!("tensor '{name}' is {other:?}; normlab writes F32 and I64 only"),
                )))
            }
        }
    }
    Ok(out)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(train_run, m)?)?;
    m.add_function(wrap_pyfunction!(study_run, m)?)?;
    m.add_function(wrap_pyfunction!(read_state_dict, m)?)?;
    Ok(())
}
