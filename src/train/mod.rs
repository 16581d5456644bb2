//! The training loop: seeded batches, forward, loss, backward, optimizer step; evaluation each
//! epoch; atomic checkpoints; exact resume; a clear stop when the loss diverges.

pub mod data_parallel;
mod footprint;
pub mod logs;
mod run_folder;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

pub use run_folder::{read_run, RunFiles};

use crate::checkpoint::{self, CheckpointMeta};
use crate::data::augment::Augment;
use crate::data::{describe_data, epoch_order, load_split_with, resolve_data_dir, Dataset, FolderOptions, InputNorm};
use crate::dist::{self, Communicator};
use crate::error::{Error, Result};
use crate::files::RunLock;
use crate::kernels::loss::{argmax, softmax_cross_entropy};
use crate::models::{Model, ModelSpec};
use crate::nn::norm_spec::NormSpec;
use crate::nn::Mode;
use crate::optim::{Optimizer, OptimizerConfig, Schedule};
use data_parallel::GradientSync;

/// Everything that defines a run; stored in metrics.json and reused by `--resume`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub model: String,
    #[serde(serialize_with = "NormSpec::serialize_short")]
    pub norm: NormSpec,
    pub epochs: usize,
    pub batch_size: usize,
    pub optimizer: OptimizerConfig,
    pub schedule: Schedule,
    pub seed: u64,
    pub threads: usize,
    pub train_limit: Option<usize>,
    pub test_limit: Option<usize>,
    pub data: Option<PathBuf>,
    /// Network slimming: λ of the L1 penalty on every norm scale γ (0 = off).
    #[serde(default)]
    pub sparsity: f64,
    /// Initial value of every norm scale γ (PyTorch's is 1; slimming uses 0.5).
    #[serde(default)]
    pub gamma_init: Option<f32>,
    /// Start from these weights (a checkpoint of the same architecture, e.g. a pruned one).
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    /// Dropout probability before the classifier.
    #[serde(default)]
    pub dropout: f32,
    /// Multiplies every conv/linear weight after PyTorch's initialization (1 = unchanged).
    #[serde(default)]
    pub init_scale: Option<f32>,
    /// Frozen BN: every norm with running statistics runs in eval mode while training.
    #[serde(default)]
    pub freeze_bn: Option<FreezeBn>,
    /// Linear learning-rate warm-up over this many epochs, per step from lr/steps up to the
    /// schedule's rate (Goyal et al. 2017, for large batches with a linearly scaled rate).
    #[serde(default)]
    pub warmup_epochs: usize,
    /// Training-time augmentation (random crop with padding, horizontal flip).
    #[serde(default)]
    pub augment: Augment,
    /// Image folders: resize every image to [H, W].
    #[serde(default)]
    pub resize: Option<[usize; 2]>,
    /// Also write TensorBoard event files under RUN/tb/ (with per-layer |γ| histograms).
    #[serde(default)]
    pub tensorboard: bool,
}

/// What `--freeze-bn` freezes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FreezeBn {
    /// The running statistics (used, never updated); γ and β still train.
    Stats,
    /// The running statistics and γ, β (FrozenBatchNorm2d).
    All,
}

impl std::str::FromStr for FreezeBn {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "stats" => Ok(FreezeBn::Stats),
            "all" => Ok(FreezeBn::All),
            _ => Err(Error::invalid(format!("--freeze-bn takes stats or all, got '{s}'"))),
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: "seed-cnn".into(),
            norm: NormSpec::Batch(Default::default()),
            epochs: 10,
            batch_size: 128,
            optimizer: OptimizerConfig::default(),
            schedule: Schedule::Constant,
            seed: 0,
            threads: 2,
            train_limit: None,
            test_limit: None,
            data: None,
            sparsity: 0.0,
            gamma_init: None,
            init_from: None,
            dropout: 0.0,
            init_scale: None,
            freeze_bn: None,
            warmup_epochs: 0,
            augment: Augment::default(),
            resize: None,
            tensorboard: false,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(Error::invalid("--epochs must be at least 1"));
        }
        if self.batch_size == 0 {
            return Err(Error::invalid("--batch-size must be at least 1"));
        }
        if self.warmup_epochs > self.epochs {
            return Err(Error::invalid(format!(
                "--warmup ({}) must not exceed --epochs ({})",
                self.warmup_epochs, self.epochs
            )));
        }
        if self.train_limit == Some(0) || self.test_limit == Some(0) {
            return Err(Error::invalid("--train-limit and --test-limit must be at least 1"));
        }
        if !(self.sparsity >= 0.0 && self.sparsity.is_finite()) {
            return Err(Error::invalid(format!(
                "--sparsity must be >= 0, got {}",
                self.sparsity
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::invalid(format!(
                "--dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        if let Some(k) = self.init_scale {
            if !(k > 0.0 && k.is_finite()) {
                return Err(Error::invalid(format!("--init-scale must be > 0, got {k}")));
            }
        }
        if let Some(g) = self.gamma_init {
            if !g.is_finite() {
                return Err(Error::invalid(format!("--gamma-init must be a finite number, got {g}")));
            }
        }
        self.optimizer.validate()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// 1-based.
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub test_loss: f64,
    pub test_accuracy: f64,
    pub seconds: f64,
    pub images_per_sec: f64,
    /// Seconds of the epoch's training spent in communication between processes (0 alone).
    #[serde(default)]
    pub communication_seconds: f64,
}

/// metrics.json.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunMetrics {
    pub config: TrainConfig,
    pub data_dir: PathBuf,
    pub input_norm: InputNorm,
    pub model_parameters: usize,
    /// "running", "complete" or "diverged".
    pub status: String,
    pub epochs: Vec<EpochMetrics>,
    pub test_accuracy: f64,
    pub test_loss: f64,
    /// Mean of the per-epoch training rates.
    pub train_images_per_sec: f64,
    /// Processes of the data-parallel job that trained the last epoch (1: a single process).
    #[serde(default = "one")]
    pub processes: usize,
}

fn one() -> usize {
    1
}

/// Receives progress; the CLI draws bars, studies stay quiet.
pub trait Reporter {
    /// Everything is checked and the run folder locked: training starts (or resumes at
    /// `metrics.epochs.len()`); `data` says in one line what was read (`describe_data`). An
    /// error (standard output full or closed) stops the run; its folder stays resumable.
    fn started(&mut self, _data: &str, _out: &Path, _metrics: &RunMetrics) -> Result<()> {
        Ok(())
    }
    fn epoch_start(&mut self, _epoch: usize, _epochs: usize, _batches: usize) {}
    fn batch(&mut self, _mean_loss: f64, _images_per_sec: f64) {}
    fn epoch_end(&mut self, _m: &EpochMetrics) -> Result<()> {
        Ok(())
    }
    /// Epoch `epoch` is committed in `out`: a kill from now on resumes after it.
    fn committed(&mut self, _out: &Path, _epoch: usize) {}
}

/// A reporter that says nothing.
pub struct Quiet;
impl Reporter for Quiet {}

/// A model's results on a dataset in eval mode.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    pub loss: f64,
    pub accuracy: f64,
    /// The predicted class of every sample, in order.
    pub predictions: Vec<u8>,
    /// The logits of every sample, [N, classes] row-major.
    pub logits: Vec<f32>,
}

/// Mean loss, accuracy and predictions of `model` in eval mode over `data`.
pub fn evaluate(model: &mut Model, data: &Dataset, norm: InputNorm, batch_size: usize) -> Result<Evaluation> {
    let order: Vec<usize> = (0..data.len()).collect();
    evaluate_samples(model, data, &order, norm, batch_size)
}

/// `evaluate` over the samples `order` of `data` (a process's share of a test set).
pub fn evaluate_samples(
    model: &mut Model,
    data: &Dataset,
    order: &[usize],
    norm: InputNorm,
    batch_size: usize,
) -> Result<Evaluation> {
    let mut y = Vec::new();
    let (mut loss_sum, mut correct) = (0.0f64, 0usize);
    let mut predictions = Vec::with_capacity(order.len());
    let mut all_logits = Vec::with_capacity(order.len() * data.classes);
    for idx in order.chunks(batch_size.max(1)) {
        data.batch(idx, norm, model.input_mut(), &mut y)?;
        model.forward(Mode::Eval)?;
        let (logits, dlogits) = model.net.output_and_grad();
        dlogits.resize_to(&logits.shape)?;
        let (loss, c) = softmax_cross_entropy(&logits.data, &y, data.classes, &mut dlogits.data);
        loss_sum += loss * idx.len() as f64;
        correct += c;
        predictions.extend(logits.data.chunks(data.classes).map(|z| argmax(z) as u8));
        all_logits.extend_from_slice(&logits.data);
    }
    let n = order.len().max(1) as f64;
    Ok(Evaluation {
        loss: loss_sum / n,
        accuracy: correct as f64 / n,
        predictions,
        logits: all_logits,
    })
}

/// Forward in train mode, softmax cross-entropy against `labels`, and (for a finite loss)
/// backward: the parameters' gradients hold dL/dθ of this batch afterwards. Returns the mean
/// loss and the number of correct predictions.
pub fn loss_and_grad(model: &mut Model, labels: &[u8], classes: usize) -> Result<(f64, usize)> {
    let (loss, correct) = forward_loss(model, labels, classes, 1.0)?;
    if loss.is_finite() {
        model.backward()?;
    }
    Ok((loss, correct))
}

/// Zeroes the gradients, runs the training forward and the loss: the mean cross-entropy over
/// this batch, and its gradient times `share` in the output's gradient (a process's share of a
/// global batch, so that the gradients of all processes add up to the global batch's).
fn forward_loss(model: &mut Model, labels: &[u8], classes: usize, share: f32) -> Result<(f64, usize)> {
    model.net.zero_grad();
    model.forward(Mode::Train)?;
    let (logits, dlogits) = model.net.output_and_grad();
    dlogits.resize_to(&logits.shape)?;
    let (loss, correct) = softmax_cross_entropy(&logits.data, labels, classes, &mut dlogits.data);
    if share != 1.0 {
        dlogits.data.iter_mut().for_each(|g| *g *= share);
    }
    Ok((loss, correct))
}

/// A data-parallel training step on this process's share (already in the model's input) of a
/// global batch of `global` samples: forward and loss, the global loss (every process sees the
/// same, so all stop together on a non-finite one), backward, the gradients summed over the
/// processes, the L1 term, the update. With one process this is `train_step`, bit for bit.
#[allow(clippy::too_many_arguments)]
fn parallel_step(
    model: &mut Model,
    opt: &mut Optimizer,
    labels: &[u8],
    classes: usize,
    global: usize,
    lr: f64,
    sparsity: f64,
    comm: &dyn Communicator,
    sync: &mut GradientSync,
) -> Result<(f64, usize)> {
    let share = labels.len() as f64 / global as f64;
    let (loss, correct) = forward_loss(model, labels, classes, share as f32)?;
    let (loss, correct) = if comm.size() > 1 {
        let mut sums = [loss * share, correct as f64];
        comm.all_reduce_sum_f64(&mut sums);
        (sums[0], sums[1] as usize)
    } else {
        (loss, correct)
    };
    if !loss.is_finite() {
        return Ok((loss, correct));
    }
    model.backward()?;
    sync.all_reduce(comm, &mut model.net);
    if sparsity > 0.0 {
        model.net.add_norm_scale_l1(sparsity as f32);
    }
    opt.step(&mut model.net, lr);
    Ok((loss, correct))
}

/// One training step on the batch already in `model.input_mut()`: `loss_and_grad`, then the
/// optimizer update. A non-finite loss returns before any update. With `sparsity` λ > 0,
/// λ·sign(γ) is added to every norm scale's gradient after backward.
pub fn train_step(
    model: &mut Model,
    opt: &mut Optimizer,
    labels: &[u8],
    classes: usize,
    lr: f64,
    sparsity: f64,
) -> Result<(f64, usize)> {
    let (loss, correct) = loss_and_grad(model, labels, classes)?;
    if !loss.is_finite() {
        return Ok((loss, correct));
    }
    if sparsity > 0.0 {
        model.net.add_norm_scale_l1(sparsity as f32);
    }
    opt.step(&mut model.net, lr);
    Ok((loss, correct))
}

/// Picks `runs/<name>`, or `runs/<name>-2`, `-3`, ... so an earlier run is never overwritten.
pub fn fresh_run_dir(root: &Path, name: &str) -> PathBuf {
    let mut dir = root.join(name);
    let mut k = 2;
    while dir.exists() {
        dir = root.join(format!("{name}-{k}"));
        k += 1;
    }
    dir
}

/// How a run starts: fresh into `out`, or continuing the run in `out`.
pub enum Start {
    Fresh(Box<TrainConfig>),
    /// Continue the run in the folder; `epochs`/`threads` may override the stored config.
    Resume {
        epochs: Option<usize>,
        threads: Option<usize>,
    },
}

/// Trains as `start` says, writing the run folder `out`; returns the final metrics. Everything
/// is checked (config, data, model, batch fit) before the folder is touched; then the folder
/// is locked, and each epoch ends in one commit point (`run_folder::commit_epoch`), so a kill
/// at any instant leaves a folder that `--resume` continues exactly.
pub fn train(start: Start, out: &Path, reporter: &mut dyn Reporter) -> Result<RunMetrics> {
    train_on(start, out, reporter, &dist::single_process())
}

/// What every process holds once the settings, data and model are checked.
struct Prepared {
    data_dir: PathBuf,
    train_set: Dataset,
    test_set: Dataset,
    input_norm: InputNorm,
    spec: ModelSpec,
    model: Model,
    opt: Optimizer,
    log: logs::RunLog,
    history: Vec<EpochMetrics>,
    /// Test images per evaluation batch (fewer than 1000 only where memory is short).
    eval_batch: usize,
}

/// `train` as one process of a data-parallel job over `comm` (with one process, `train`
/// itself): `config.batch_size` is the global batch, each process takes its contiguous share of
/// every batch of the seeded epoch order, and the gradients are summed over the processes each
/// step. Rank 0 alone reads and writes the run folder; the others receive its state. Every
/// check runs on every process and ends in an agreement, so a failure anywhere stops all of
/// them with the failing process's one error line.
pub fn train_on(
    start: Start,
    out: &Path,
    reporter: &mut dyn Reporter,
    comm: &Arc<dyn Communicator>,
) -> Result<RunMetrics> {
    let files = RunFiles { dir: out.to_path_buf() };
    let lead = comm.rank() == 0;
    let fresh = matches!(start, Start::Fresh(_));
    let read = settings(start, out, &files, lead);
    let (config, commit) = dist::agree(&**comm, read)?;
    let config = dist::agree(&**comm, same_config(&**comm, config, fresh))?;
    let prepared = prepare(&config, commit.as_ref(), &files, comm.size(), lead);
    let Prepared {
        data_dir,
        train_set,
        test_set,
        input_norm,
        spec,
        mut model,
        mut opt,
        mut log,
        history,
        eval_batch,
    } = dist::agree(&**comm, prepared)?;

    // Everything is checked: rank 0 takes the folder.
    let timed = Arc::new(dist::TimedComm::new(comm.clone()));
    let comm: Arc<dyn Communicator> = if comm.size() > 1 { timed.clone() } else { comm.clone() };
    let comm = &*comm;
    let meta = |epoch| CheckpointMeta {
        spec: spec.clone(),
        input_norm,
        epoch,
    };
    let mut metrics = RunMetrics {
        config: config.clone(),
        data_dir: data_dir.clone(),
        input_norm,
        model_parameters: model.parameter_count(),
        status: "running".into(),
        epochs: history,
        test_accuracy: 0.0,
        test_loss: 0.0,
        train_images_per_sec: 0.0,
        processes: comm.size(),
    };
    summarize(&mut metrics);
    let taken = if lead {
        take_folder(out, fresh, &files, &mut model, &meta, &metrics, &log)
    } else {
        Ok(None)
    };
    let _lock = dist::agree(comm, taken)?;
    let mut start_epoch = (metrics.epochs.len() as u64).to_le_bytes();
    comm.broadcast_bytes(&mut start_epoch, 0);
    let start_epoch = u64::from_le_bytes(start_epoch) as usize;
    data_parallel::broadcast_state(comm, &mut model.net, &mut opt);
    model
        .net
        .set_communicator(&(Arc::clone(&timed) as Arc<dyn Communicator>));
    let started = if lead {
        reporter.started(&describe_data(&data_dir, Some(&train_set), &test_set), out, &metrics)
    } else {
        Ok(())
    };
    dist::agree(comm, started)?;

    let bs = config.batch_size;
    let batches = train_set.len().div_ceil(bs);
    let (rank, size) = (comm.rank(), comm.size());
    let test_order: Vec<usize> = (0..test_set.len()).collect();
    let mut y = Vec::new();
    let mut augment_scratch = Vec::new();
    let mut sync = GradientSync::default();
    for epoch in start_epoch..config.epochs {
        let lr = config.schedule.lr(config.optimizer.lr, epoch, config.epochs);
        reporter.epoch_start(epoch + 1, config.epochs, batches);
        let order = epoch_order(train_set.len(), config.seed, epoch, true);
        let t0 = Instant::now();
        timed.take();
        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
        for (b, idx) in order.chunks(bs).enumerate() {
            let mine = data_parallel::shard(idx, rank, size);
            train_set.batch(mine, input_norm, model.input_mut(), &mut y)?;
            let mut step_seed = config.seed ^ ((epoch * batches + b) as u64).wrapping_mul(0x2545_F491_4F6C_DD1D);
            if size > 1 {
                // Each process's samples get their own dropout masks and augmentation draws.
                step_seed = step_seed.wrapping_add((rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            }
            model.net.set_step_seed(step_seed);
            config
                .augment
                .apply(model.input_mut(), &input_norm, step_seed, &mut augment_scratch);
            let step_lr = warmup(lr, epoch * batches + b, config.warmup_epochs * batches);
            let (loss, c) = parallel_step(
                &mut model,
                &mut opt,
                &y,
                train_set.classes,
                idx.len(),
                step_lr,
                config.sparsity,
                comm,
                &mut sync,
            )?;
            if !loss.is_finite() {
                let what = format!(
                    "the training loss became {loss} at epoch {}, batch {} (lr {lr})",
                    epoch + 1,
                    b + 1
                );
                return Err(diverged(&files, &mut metrics, &what, lead));
            }
            loss_sum += loss * idx.len() as f64;
            correct += c;
            seen += idx.len();
            log.steps.push(logs::StepRow {
                step: (epoch * batches + b + 1) as u64,
                epoch: epoch + 1,
                loss,
                lr: step_lr,
                images_per_sec: seen as f64 / t0.elapsed().as_secs_f64(),
                wall_time: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64()),
            });
            reporter.batch(loss_sum / seen as f64, seen as f64 / t0.elapsed().as_secs_f64());
        }
        let seconds = t0.elapsed().as_secs_f64();
        let communication = timed.take();
        // Evaluation: each process its share of the test set, with rank 0's running statistics
        // (per-process BN keeps its own; PyTorch DDP broadcasts rank 0's buffers likewise).
        data_parallel::broadcast_buffers(comm, &mut model.net);
        let (test_loss, test_accuracy) = if size == 1 {
            let test = evaluate(&mut model, &test_set, input_norm, eval_batch)?;
            (test.loss, test.accuracy)
        } else {
            let mine = data_parallel::shard(&test_order, rank, size);
            let test = evaluate_samples(&mut model, &test_set, mine, input_norm, eval_batch)?;
            let n = mine.len() as f64;
            let mut sums = [test.loss * n, (test.accuracy * n).round()];
            comm.all_reduce_sum_f64(&mut sums);
            let all = test_set.len().max(1) as f64;
            (sums[0] / all, sums[1] / all)
        };
        if !test_loss.is_finite() {
            let what = format!("the test loss became {test_loss} after epoch {} (lr {lr})", epoch + 1);
            return Err(diverged(&files, &mut metrics, &what, lead));
        }
        if let Some(name) = first_non_finite(&mut model) {
            let what = format!("{name} holds a non-finite value after epoch {} (lr {lr})", epoch + 1);
            return Err(diverged(&files, &mut metrics, &what, lead));
        }
        let m = EpochMetrics {
            epoch: epoch + 1,
            lr,
            train_loss: loss_sum / seen as f64,
            train_accuracy: correct as f64 / seen as f64,
            test_loss,
            test_accuracy,
            seconds,
            images_per_sec: seen as f64 / seconds,
            communication_seconds: communication.as_secs_f64(),
        };
        // A failure to show the row (standard output full or closed) ends the run after the
        // epoch is committed.
        let shown = reporter.epoch_end(&m);
        metrics.epochs.push(m);
        metrics.processes = size;
        summarize(&mut metrics);
        if epoch + 1 == config.epochs {
            metrics.status = "complete".into();
        }
        if config.tensorboard {
            for (name, p) in model.net.named_params() {
                if let (crate::nn::ParamKind::Norm, Some(layer)) = (p.kind, name.strip_suffix(".weight")) {
                    log.gammas.push((
                        epoch + 1,
                        layer.to_string(),
                        p.value.data.iter().map(|g| g.abs()).collect(),
                    ));
                }
            }
        }
        let committed = if lead {
            let names: Vec<String> = model.net.named_params().into_iter().map(|(n, _)| n).collect();
            run_folder::commit_epoch(&files, &mut model, &meta(epoch + 1), &opt, &names, &metrics, &log)
        } else {
            Ok(())
        };
        dist::agree(comm, committed)?;
        if lead {
            reporter.committed(out, epoch + 1);
        }
        dist::agree(comm, shown)?;
    }
    if metrics.status != "complete" {
        // Resumed with nothing left to train.
        metrics.status = "complete".into();
        if lead {
            run_folder::save_metrics(&files, &metrics)?;
        }
    }
    Ok(metrics)
}

/// The run's settings and, resuming, its last commit (read by rank 0 alone; the other
/// processes get rank 0's settings from `same_config`).
fn settings(
    start: Start,
    out: &Path,
    files: &RunFiles,
    lead: bool,
) -> Result<(TrainConfig, Option<run_folder::Commit>)> {
    match start {
        Start::Fresh(config) => {
            config.validate()?;
            if lead {
                refuse_existing_run(out)?;
            }
            Ok((*config, None))
        }
        Start::Resume { .. } if !lead => Ok((TrainConfig::default(), None)),
        Start::Resume { epochs, threads } => {
            let (mut config, commit) = run_folder::read_run(files)?;
            let done = commit.as_ref().map_or(0, |c| c.metrics.epochs.len());
            if let Some(e) = epochs {
                if e < done {
                    return Err(Error::invalid(format!(
                        "--epochs {e} is fewer than the {done} epochs {} has done already; give at least {done}",
                        out.display()
                    )));
                }
                config.epochs = e;
            }
            if let Some(t) = threads {
                config.threads = t;
            }
            config.validate()?;
            Ok((config, commit))
        }
    }
}

/// Rank 0's settings on every process: a resumed run's are taken; a fresh run's must equal
/// what each process was given (one command line for all), but for the thread count.
fn same_config(comm: &dyn Communicator, mine: TrainConfig, fresh: bool) -> Result<TrainConfig> {
    if comm.size() == 1 {
        return Ok(mine);
    }
    let mut bytes = serde_json::to_vec(&mine).map_err(|e| Error::invalid(format!("settings: {e}")))?;
    dist::broadcast_vec(comm, &mut bytes, 0);
    let lead: TrainConfig = serde_json::from_slice(&bytes)
        .map_err(|e| Error::invalid(format!("the settings from process 0 do not parse: {e}")))?;
    if fresh
        && comm.rank() != 0
        && (TrainConfig {
            threads: mine.threads,
            ..lead.clone()
        }) != mine
    {
        return Err(Error::invalid(format!(
            "process {} was started with other training options than process 0; give every process the same command line",
            comm.rank()
        )));
    }
    let threads = if fresh { mine.threads } else { lead.threads };
    Ok(TrainConfig { threads, ..lead })
}

/// Loads the data, builds the model and checks that every batch fits it; resuming, restores
/// the model, optimizer and logs of the last commit (rank 0, which read it), and starting
/// afresh, sets the initial weights (rank 0).
fn prepare(
    config: &TrainConfig,
    commit: Option<&run_folder::Commit>,
    files: &RunFiles,
    processes: usize,
    lead: bool,
) -> Result<Prepared> {
    let data_dir = resolve_data_dir(config.data.as_deref())?;
    let folder = FolderOptions {
        resize: config.resize,
        channels: None,
    };
    let mut train_set = load_split_with(&data_dir, true, folder)?;
    // The test images take the training images' channels (grey or colour).
    let folder = FolderOptions {
        channels: Some(train_set.shape[0]),
        ..folder
    };
    let mut test_set = load_split_with(&data_dir, false, folder)?;
    if test_set.shape != train_set.shape {
        return Err(Error::invalid(format!(
            "the test images in {} are {:?} but the training images {:?}; give both one size or pass --resize HxW",
            data_dir.display(),
            test_set.shape,
            train_set.shape
        )));
    }
    let input_norm = train_set.pixel_stats();
    if let Some(n) = config.train_limit {
        train_set.truncate(n);
    }
    if let Some(n) = config.test_limit {
        test_set.truncate(n);
    }
    let spec = ModelSpec {
        dropout: config.dropout,
        ..ModelSpec::new(&config.model, config.norm, train_set.shape, train_set.classes)?
    };
    let mut model = Model::build(&spec, config.seed)?;
    let norm = spec.norm;
    // Each process's share of a batch is what a per-process norm sees; SyncBN sees the batch.
    let smallest = data_parallel::check_split(config.batch_size, train_set.len(), processes)?;
    let synced = matches!(norm, NormSpec::Batch(c) if c.stats == crate::nn::batch_norm::BatchStats::Sync);
    let (batch, last) = if processes == 1 || synced {
        (config.batch_size, train_set.len() % config.batch_size)
    } else {
        (config.batch_size / processes, smallest)
    };
    norm.check_batches(batch, last)?;
    let per_sample_bn = (spec.model == "mlp" || spec.model.starts_with("lstm"))
        && matches!(norm, NormSpec::Batch(_) | NormSpec::SharedBatch(_));
    if per_sample_bn && (batch == 1 || last == 1) {
        let per_process = if processes > 1 && !synced {
            format!(" (each of the {processes} processes takes its share of a batch, and its BatchNorm sees that share alone: use syncbn for statistics over the whole batch)")
        } else {
            String::new()
        };
        return Err(Error::invalid(format!(
            "{} training samples in batches of {} leave {} batch of 1{per_process}, whose BatchNorm statistics over the \
             batch are undefined ({} cannot train on it); choose another --batch-size or --train-limit",
            train_set.len(),
            config.batch_size,
            if batch == 1 { "every" } else { "a last" },
            if spec.model == "mlp" {
                "BatchNorm1d"
            } else {
                "the BN-LSTM"
            }
        )));
    }
    // Rank 0 sets the initial weights; the others receive them (`broadcast_state`).
    if lead && commit.is_none() {
        if let Some(g) = config.gamma_init {
            model.net.set_norm_scales(g);
        }
        if let Some(k) = config.init_scale {
            model.net.visit_params(&mut |p| {
                if p.kind == crate::nn::ParamKind::Weight {
                    p.value.data.iter_mut().for_each(|w| *w *= k);
                }
            });
        }
        if let Some(path) = &config.init_from {
            checkpoint::load_weights_into(path, &mut model)?;
        }
    }
    if let Some(f) = config.freeze_bn {
        let frozen = model.net.set_stats_mode(crate::nn::StatsMode::Frozen {
            affine: f == FreezeBn::All,
        });
        if frozen == 0 {
            let why = if spec.model.starts_with("lstm") {
                "the LSTM's recurrent BN keeps per-time-step statistics, which --freeze-bn does not cover"
            } else {
                "it has no BatchNorm with running statistics"
            };
            return Err(Error::invalid(format!(
                "--freeze-bn: nothing to freeze in {} with norm {} ({why})",
                spec.model, spec.norm
            )));
        }
    }
    // Before anything large is allocated: the run must fit in this process's memory.
    let eval_batch = footprint::check_training_fits(
        &mut model,
        config.optimizer.kind,
        config.optimizer.momentum,
        batch,
        test_set.len(),
    )?;
    let mut opt = Optimizer::new(config.optimizer.clone());
    let mut history = Vec::new();
    let mut log = logs::RunLog::default();
    if let Some(c) = commit {
        log = run_folder::restore(files, c, &mut model, &mut opt)?;
        run_folder::check_counters(
            files,
            c,
            config,
            train_set.len().div_ceil(config.batch_size),
            &mut model,
        )?;
        history = c.metrics.epochs.clone();
    }
    Ok(Prepared {
        data_dir,
        train_set,
        test_set,
        input_norm,
        spec,
        model,
        opt,
        log,
        history,
        eval_batch,
    })
}

/// Rank 0's first writes: the lock (held for the run), the model put back to the committed
/// epoch when resuming, metrics.json and the logs' views.
fn take_folder(
    out: &Path,
    fresh: bool,
    files: &RunFiles,
    model: &mut Model,
    meta: &dyn Fn(usize) -> CheckpointMeta,
    metrics: &RunMetrics,
    log: &logs::RunLog,
) -> Result<Option<RunLock>> {
    let lock = RunLock::acquire(out)?;
    if fresh {
        // Again under the lock: another run may have finished here since the first check.
        refuse_existing_run(out)?;
    } else {
        // The model file may run one epoch ahead of the commit (a kill between the two
        // writes): put it back to the committed epoch.
        checkpoint::save_model(&files.model(), model, &meta(metrics.epochs.len()))?;
    }
    run_folder::save_metrics(files, metrics)?;
    // The logs as the last commit left them (rows of an epoch killed midway are gone).
    run_folder::save_log_views(files, log, metrics)?;
    Ok(Some(lock))
}

/// Linear warm-up: step k (0-based) of `steps` warm-up steps trains at lr·(k+1)/steps.
fn warmup(lr: f64, step: usize, steps: usize) -> f64 {
    if step < steps {
        lr * (step + 1) as f64 / steps as f64
    } else {
        lr
    }
}

/// Marks the run diverged in metrics.json (the last commit stays as it was) and says what is
/// left to the user.
fn diverged(files: &RunFiles, metrics: &mut RunMetrics, what: &str, lead: bool) -> Error {
    // Every process saw the same global loss and stops here; rank 0 says it.
    if !lead {
        return dist::stop_together(Error::OtherRank(0));
    }
    metrics.status = "diverged".into();
    let kept = match metrics.epochs.len() {
        0 => "no checkpoint exists yet (it diverged in its first epoch); lower --lr and start again".to_string(),
        k => format!(
            "the last good checkpoint (epoch {k}) is kept in {}",
            files.dir.display()
        ),
    };
    let e = match run_folder::save_metrics(files, metrics) {
        Err(e) => e,
        Ok(()) => Error::Diverged(format!("{what}; {kept}")),
    };
    dist::stop_together(e)
}

/// The first parameter or buffer holding NaN or ±inf, by name.
fn first_non_finite(model: &mut Model) -> Option<String> {
    let bad = |v: &[f32]| v.iter().any(|x| !x.is_finite());
    for (name, p) in model.net.named_params() {
        if bad(&p.value.data) {
            return Some(format!("parameter {name}"));
        }
    }
    for (name, b) in model.net.named_buffers() {
        if let crate::nn::BufferMut::F32(t) = b {
            if bad(&t.data) {
                return Some(format!("buffer {name}"));
            }
        }
    }
    None
}

/// An error when `out` already holds a run or results.
fn refuse_existing_run(out: &Path) -> Result<()> {
    if let Some(f) = crate::files::guard::RUN_MARKERS.iter().find(|f| out.join(f).exists()) {
        return Err(Error::invalid(format!(
            "{} already holds a run ({f}); continue it with --resume {} or choose another --out",
            out.display(),
            out.display()
        )));
    }
    Ok(())
}

fn summarize(m: &mut RunMetrics) {
    if let Some(last) = m.epochs.last() {
        m.test_accuracy = last.test_accuracy;
        m.test_loss = last.test_loss;
    }
    if !m.epochs.is_empty() {
        m.train_images_per_sec = m.epochs.iter().map(|e| e.images_per_sec).sum::<f64>() / m.epochs.len() as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_ramps_linearly_per_step_then_holds() {
        let lrs: Vec<f64> = (0..6).map(|k| warmup(0.8, k, 4)).collect();
        assert_eq!(lrs, vec![0.2, 0.4, 0.6000000000000001, 0.8, 0.8, 0.8]);
        assert_eq!(warmup(0.8, 0, 0), 0.8);
        let too_long = TrainConfig {
            epochs: 2,
            warmup_epochs: 3,
            ..TrainConfig::default()
        };
        assert!(too_long.validate().unwrap_err().to_string().contains("--warmup"));
    }
}
