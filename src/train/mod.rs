//! The training loop: seeded batches, forward, loss, backward, optimizer step; evaluation each
//! epoch; atomic checkpoints; exact resume; a clear stop when the loss diverges.

mod config;
pub mod data_parallel;
mod footprint;
pub mod logs;
mod metrics;
pub mod progress;
mod run_folder;
mod setup;
mod step;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

pub use run_folder::{read_run, RunFiles};

use crate::checkpoint::{self, CheckpointMeta};
use crate::data::augment::Augment;
use crate::data::{describe_data, load_split_with, resolve_data_dir, Dataset, FeedOptions, FolderOptions, InputNorm};
use crate::dist::{self, Communicator};
use crate::error::{Error, Result};
use crate::files::RunLock;
use crate::kernels::loss::{argmax, softmax_cross_entropy};
use crate::models::{Arch, Model, ModelSpec};
use crate::nn::norm_spec::NormSpec;
use crate::nn::Mode;
use crate::optim::{Optimizer, OptimizerConfig, Schedule};
use data_parallel::GradientSync;

pub use config::{FreezeBn, TrainConfig};
use metrics::summarize;
pub use metrics::{EpochMetrics, Fit, LoaderProgress, Quiet, Reporter, RunMetrics};
use setup::{prepare, same_config, settings, take_folder};
pub use step::{evaluate, evaluate_samples, evaluate_shared, loss_and_grad, train_step, Evaluation};
use step::{parallel_step, warmup};

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
    /// Continue the run in the folder; `epochs`/`threads` and the loader's settings may
    /// override the stored config.
    Resume {
        epochs: Option<usize>,
        threads: Option<usize>,
        loader: LoaderOverrides,
    },
}

/// What `--resume` may change about how the data are read (none of it changes the numbers of
/// a run whose images all decode).
#[derive(Clone, Copy, Debug, Default)]
pub struct LoaderOverrides {
    pub decode_threads: Option<usize>,
    pub cache_limit: Option<u64>,
    /// Turns on --skip-bad-images (an image found unreadable mid-run can then be skipped).
    pub skip_bad_images: bool,
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
    let mut y = Vec::new();
    let mut augment_scratch = Vec::new();
    let mut sync = GradientSync::default();
    let feed_options = FeedOptions::new(config.decode_threads(), config.skip_bad_images);
    for epoch in start_epoch..config.epochs {
        let lr = config.schedule.lr(config.optimizer.lr, epoch, config.epochs);
        reporter.epoch_start(epoch + 1, config.epochs, batches);
        let order = train_set.epoch_order(config.seed, epoch, config.shuffle, config.shuffle_buffer);
        // This process's share of every batch: a streamed split decodes only these.
        let shares: Vec<Vec<usize>> = order
            .chunks(bs)
            .map(|idx| data_parallel::shard(idx, rank, size).to_vec())
            .collect();
        let mut feed = train_set.feed(shares, feed_options)?;
        let t0 = Instant::now();
        timed.take();
        let (mut loss_sum, mut correct, mut seen, mut skipped) = (0.0f64, 0usize, 0usize, 0usize);
        let mut waited_before = std::time::Duration::ZERO;
        for (b, idx) in order.chunks(bs).enumerate() {
            let fed = match feed.next_into(input_norm, model.input_mut(), &mut y) {
                Some(Ok(fed)) => fed,
                Some(Err(e)) => return Err(stopped_by_data(e, out, epoch)),
                None => return Err(Error::invalid("the loader ended before the epoch's last batch")),
            };
            let step_wait = feed.stats().waited - waited_before;
            waited_before = feed.stats().waited;
            // With --skip-bad-images a batch may hold fewer samples than its indices.
            let mut global = idx.len();
            if config.skip_bad_images {
                let mut kept = [fed.samples as f64, fed.skipped.len() as f64];
                if size > 1 {
                    comm.all_reduce_sum_f64(&mut kept);
                }
                global = kept[0] as usize;
                skipped += kept[1] as usize;
                if global == 0 {
                    continue;
                }
            }
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
                global,
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
            loss_sum += loss * global as f64;
            correct += c;
            seen += global;
            log.steps.push(logs::StepRow {
                step: (epoch * batches + b + 1) as u64,
                epoch: epoch + 1,
                loss,
                lr: step_lr,
                images_per_sec: seen as f64 / t0.elapsed().as_secs_f64(),
                data_wait: step_wait.as_secs_f64(),
                loader_images_per_sec: feed.stats().capacity(),
                wall_time: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64()),
            });
            let data = train_set.is_streamed().then(|| LoaderProgress {
                wait_share: feed.stats().waited.as_secs_f64() / t0.elapsed().as_secs_f64(),
                images_per_sec: feed.stats().capacity(),
            });
            reporter.batch(loss_sum / seen as f64, seen as f64 / t0.elapsed().as_secs_f64(), data)?;
        }
        let seconds = t0.elapsed().as_secs_f64();
        let loaded = feed.stats();
        drop(feed);
        let communication = timed.take();
        // Evaluation: each process its share of the test set, with rank 0's running statistics
        // (per-process BN keeps its own; PyTorch DDP broadcasts rank 0's buffers likewise).
        data_parallel::broadcast_buffers(comm, &mut model.net);
        let (test_loss, test_accuracy) = evaluate_shared(&mut model, &test_set, input_norm, eval_batch, comm)?;
        if !test_loss.is_finite() {
            let what = format!("the test loss became {test_loss} after epoch {} (lr {lr})", epoch + 1);
            return Err(diverged(&files, &mut metrics, &what, lead));
        }
        let fit = if config.eval_train {
            let (loss, accuracy) = evaluate_shared(&mut model, &train_set, input_norm, eval_batch, comm)?;
            if !loss.is_finite() {
                let what = format!(
                    "the loss on the training images became {loss} after epoch {} (lr {lr})",
                    epoch + 1
                );
                return Err(diverged(&files, &mut metrics, &what, lead));
            }
            Some(Fit { loss, accuracy })
        } else {
            None
        };
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
            fit,
            data_wait_seconds: loaded.waited.as_secs_f64(),
            loader_images_per_sec: loaded.capacity(),
            decoded_images: loaded.images,
            skipped_images: skipped,
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

/// A data error mid-epoch: the image named, and how to go on (the folder keeps the last
/// committed epoch, which `--resume` continues).
fn stopped_by_data(e: Error, out: &Path, epoch: usize) -> Error {
    let resume = format!(
        "the run stopped in epoch {}; {} keeps the last finished epoch: continue with `normlab train --resume {}`",
        epoch + 1,
        out.display(),
        out.display(),
    );
    match e {
        Error::Data { path, message } => Error::Data {
            path,
            message: format!("{message}; {resume}"),
        },
        other => Error::invalid(format!("{other}; {resume}")),
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
