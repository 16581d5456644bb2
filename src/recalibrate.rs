//! Exact population statistics (PreciseBN; `torch.optim.swa_utils.update_bn`): every running
//! mean and variance recomputed as the equal-weight average over N training batches, with the
//! network otherwise in eval mode, instead of the EMA of the last training steps.
//!
//! The variance kept is the average of the per-batch unbiased variances, as update_bn leaves
//! it (momentum None: running_var is a cumulative average of what each batch would add). Each
//! is an unbiased estimate of the population variance for i.i.d. batches, so their average is
//! too; and the file means what a PyTorch user expects running_var to mean.

use std::path::PathBuf;

use serde::Serialize;

use crate::checkpoint;
use crate::data::{epoch_order, Dataset, InputNorm};
use crate::error::{Error, Result};
use crate::models::Model;
use crate::nn::{BufferMut, Mode, StatsMode};

/// Replaces the running statistics of every norm that keeps them with their average over the
/// first `batches` full batches of `batch_size` of a `seed`-shuffled pass over `data`; the
/// other layers run in eval mode (no dropout, no noise). Returns how many norms it updated.
pub fn population_statistics(
    model: &mut Model,
    data: &Dataset,
    norm: InputNorm,
    batches: usize,
    batch_size: usize,
    seed: u64,
) -> Result<usize> {
    let norms = check(model, data.len(), batches, batch_size)?;
    model.net.set_stats_mode(StatsMode::Accumulate);
    // update_bn's reset_running_stats: mean 0, variance (or Lp scale) 1, count 0.
    for (name, b) in model.net.named_buffers() {
        match b {
            BufferMut::F32(t) if name.ends_with("running_mean") => t.data.fill(0.0),
            BufferMut::F32(t) => t.data.fill(1.0),
            BufferMut::I64(v) => *v = 0,
        }
    }
    let order = epoch_order(data.len(), seed, 0, true);
    let mut labels = Vec::new();
    let result = (|| {
        for idx in order.chunks_exact(batch_size).take(batches) {
            data.batch(idx, norm, model.input_mut(), &mut labels)?;
            model.forward(Mode::Eval)?;
        }
        Ok(())
    })();
    model.net.set_stats_mode(StatsMode::Normal);
    result.map(|()| norms)
}

/// Checks that `model` has running statistics and `batches` full batches fit in `len` training
/// images; returns how many norms keep running statistics.
pub fn check(model: &mut Model, len: usize, batches: usize, batch_size: usize) -> Result<usize> {
    if batches == 0 || batch_size == 0 {
        return Err(Error::invalid("--batches and --batch-size must be at least 1"));
    }
    let norms = model.net.set_stats_mode(StatsMode::Normal);
    if norms == 0 {
        let why = if matches!(model.spec.model, crate::models::Arch::Lstm(..)) {
            "the LSTM's recurrent BN keeps per-time-step statistics, which recalibrate does not cover"
        } else {
            "it keeps no running statistics"
        };
        return Err(Error::invalid(format!(
            "{} with norm {}: nothing to recalibrate ({why})",
            model.spec.model, model.spec.norm
        )));
    }
    let available = len / batch_size;
    if batches > available {
        return Err(Error::invalid(format!(
            "--batches {batches} of {batch_size} images need {} training images; the training set has {len} \
             ({available} full batches)",
            batches * batch_size
        )));
    }
    Ok(norms)
}

/// What `normlab recalibrate` is asked to do.
pub struct RecalibrateRequest {
    pub checkpoint: PathBuf,
    pub batches: usize,
    pub batch_size: usize,
    pub seed: u64,
    pub data: PathBuf,
    pub test_limit: Option<usize>,
    pub out: PathBuf,
    pub force: bool,
}

/// recalibrate.json.
#[derive(Clone, Debug, Serialize)]
pub struct RecalibrateReport {
    pub checkpoint: PathBuf,
    pub recalibrated_checkpoint: PathBuf,
    pub model: crate::models::Arch,
    pub norm: String,
    pub norms_updated: usize,
    pub batches: usize,
    pub batch_size: usize,
    pub training_images_used: usize,
    /// What was read, in one line (`data::describe_data`).
    pub data: String,
    pub test_images: usize,
    pub test_loss_before: f64,
    pub test_accuracy_before: f64,
    pub test_loss_after: f64,
    pub test_accuracy_after: f64,
}

/// The whole command: check, recalibrate, evaluate before and after, write DIR/model.safetensors
/// and DIR/recalibrate.json. The input checkpoint is only read.
pub fn run_recalibrate(req: &RecalibrateRequest) -> Result<RecalibrateReport> {
    let guard = crate::files::OutputGuard::new(req.force).input(&req.checkpoint);
    let dir = guard.folder("--out", &req.out, &["model.safetensors", "recalibrate.json"])?;
    let (mut model, meta) = checkpoint::load_model(&req.checkpoint)?;
    let train = crate::data::load_split(&req.data, true)?;
    let test = crate::data::load_test_for(Some(&req.data), req.test_limit, meta.spec.input)?;
    check(&mut model, train.len(), req.batches, req.batch_size)?;
    let before = crate::train::evaluate(&mut model, &test, meta.input_norm, 1000)?;
    let norms = population_statistics(
        &mut model,
        &train,
        meta.input_norm,
        req.batches,
        req.batch_size,
        req.seed,
    )?;
    let after = crate::train::evaluate(&mut model, &test, meta.input_norm, 1000)?;
    let _lock = crate::files::RunLock::acquire(&dir)?;
    let out = dir.join("model.safetensors");
    checkpoint::save_model(&out, &mut model, &meta)?;
    let report = RecalibrateReport {
        checkpoint: req.checkpoint.clone(),
        recalibrated_checkpoint: out,
        model: meta.spec.model.clone(),
        norm: meta.spec.norm.to_string(),
        norms_updated: norms,
        batches: req.batches,
        batch_size: req.batch_size,
        training_images_used: req.batches * req.batch_size,
        data: crate::data::describe_data(&req.data, Some(&train), &test),
        test_images: test.len(),
        test_loss_before: before.loss,
        test_accuracy_before: before.accuracy,
        test_loss_after: after.loss,
        test_accuracy_after: after.accuracy,
    };
    let json = serde_json::to_vec_pretty(&report).expect("report serializes");
    crate::files::write_atomic(&dir.join("recalibrate.json"), &json)?;
    Ok(report)
}
