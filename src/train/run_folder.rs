//! A run folder on disk, and its one commit point per epoch.
//!
//! `train_state.safetensors` is the commit record: the model's state dict (under `model.`),
//! the optimizer's buffers, the step, and the whole metrics (config and per-epoch rows) in its
//! metadata. It is written by one atomic rename, so after a kill at any instant the folder
//! holds either the previous epoch's record or the new one, never a mix. `model.safetensors`
//! (written just before the commit, so it exists once any epoch has ended) and `metrics.json`
//! (just after) are views of it; a resume rewrites both from the record.

use std::collections::HashMap;
use std::path::PathBuf;

use safetensors::SafeTensors;

use super::logs::RunLog;
use super::RunMetrics;
use crate::checkpoint::{self, CheckpointMeta, Entry};
use crate::error::{Error, Result};
use crate::models::Model;
use crate::optim::{Optimizer, OptimizerKind};

const META_METRICS: &str = "normlab.metrics";

/// Where a run's files live.
pub struct RunFiles {
    pub dir: PathBuf,
}

impl RunFiles {
    pub fn model(&self) -> PathBuf {
        self.dir.join("model.safetensors")
    }
    pub fn train_state(&self) -> PathBuf {
        self.dir.join("train_state.safetensors")
    }
    pub fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.json")
    }
}

pub(super) fn save_metrics(files: &RunFiles, m: &RunMetrics) -> Result<()> {
    let json = serde_json::to_vec_pretty(m).expect("metrics serialize");
    crate::files::write_atomic(&files.metrics(), &json)
}

fn optimizer_keys(kind: OptimizerKind) -> (&'static str, Option<&'static str>) {
    match kind {
        OptimizerKind::Sgd => ("momentum_buffer", None),
        _ => ("exp_avg", Some("exp_avg_sq")),
    }
}

/// Ends an epoch: the model file, then the commit record, then metrics.json.
pub(super) fn commit_epoch(
    files: &RunFiles,
    model: &mut Model,
    meta: &CheckpointMeta,
    opt: &Optimizer,
    names: &[String],
    metrics: &RunMetrics,
    log: &RunLog,
) -> Result<()> {
    checkpoint::save_model(&files.model(), model, meta)?;
    let (first, second) = optimizer_keys(opt.config.kind);
    let mut entries = Vec::new();
    for (i, name) in names.iter().enumerate() {
        if let Some(b) = opt.first.get(i) {
            entries.push(Entry::f32(format!("{first}.{name}"), &[b.len()], b));
        }
        if let (Some(b), Some(key)) = (opt.second.get(i), second) {
            entries.push(Entry::f32(format!("{key}.{name}"), &[b.len()], b));
        }
    }
    for mut e in checkpoint::state_dict(model) {
        e.name = format!("model.{}", e.name);
        entries.push(e);
    }
    entries.extend(log.entries());
    let mut md: HashMap<String, String> = checkpoint::model_metadata(meta);
    md.insert("step".to_string(), opt.step.to_string());
    md.insert("epoch".to_string(), meta.epoch.to_string());
    md.insert(
        META_METRICS.to_string(),
        serde_json::to_string(metrics).expect("metrics serialize"),
    );
    crate::files::write_atomic(&files.train_state(), &checkpoint::serialize(&entries, md)?)?;
    save_metrics(files, metrics)?;
    save_log_views(files, log, metrics)
}

/// steps.csv, and with --tensorboard tb/events.out.tfevents.normlab: views of the commit
/// record's log, rewritten whole.
pub(super) fn save_log_views(files: &RunFiles, log: &RunLog, metrics: &RunMetrics) -> Result<()> {
    crate::files::write_atomic(&files.dir.join("steps.csv"), log.steps_csv().as_bytes())?;
    if metrics.config.tensorboard {
        let tb = files.dir.join("tb");
        std::fs::create_dir_all(&tb).map_err(|e| Error::io(&tb, e))?;
        crate::files::write_atomic(&tb.join(super::logs::EVENTS_FILE), &log.tensorboard_events(metrics)?)?;
    }
    Ok(())
}

/// The last committed epoch of a run folder.
pub struct Commit {
    pub metrics: RunMetrics,
    pub step: u64,
    bytes: Vec<u8>,
    /// A folder written before the commit record held the weights: they are in
    /// model.safetensors (and the metrics in metrics.json).
    legacy_model: Option<Vec<u8>>,
}

/// The config of the run in `files.dir` and its last commit (None when it was killed before
/// its first epoch ended; it then starts over from its config).
pub fn read_run(files: &RunFiles) -> Result<(super::TrainConfig, Option<Commit>)> {
    let dir = &files.dir;
    if !dir.is_dir() {
        return Err(Error::invalid(format!(
            "--resume {}: no such folder; start a run there with --out {}",
            dir.display(),
            dir.display()
        )));
    }
    let state = files.train_state();
    if state.exists() {
        let bytes = checkpoint::read_safetensors(&state)?;
        let md = checkpoint::metadata(&state, &bytes)?;
        let step = md
            .get("step")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Error::checkpoint(&state, "metadata has no valid 'step'"))?;
        let Some(text) = md.get(META_METRICS) else {
            return read_legacy_run(files, bytes, step, &md);
        };
        let metrics: RunMetrics = serde_json::from_str(text)
            .map_err(|e| Error::checkpoint(&state, format!("bad run record in its metadata: {e}")))?;
        return Ok((
            metrics.config.clone(),
            Some(Commit {
                metrics,
                step,
                bytes,
                legacy_model: None,
            }),
        ));
    }
    let path = files.metrics();
    if !path.exists() {
        let what = if dir.join("prune.json").exists() {
            " (a prune output: its fine-tuning run, if any, is the finetune/ folder inside it)"
        } else if dir.join(".lock").exists() {
            " (a training was stopped here before it wrote its first record; start it again with \
             the same --out)"
        } else {
            ""
        };
        return Err(Error::invalid(format!(
            "--resume {}: the folder holds no normlab training run (no metrics.json){what}",
            dir.display()
        )));
    }
    let text = crate::files::read_limited(&path, 64 << 20, "metrics.json")?;
    let prev: RunMetrics = serde_json::from_slice(&text)
        .map_err(|e| Error::checkpoint(&path, format!("not a normlab metrics.json ({e})")))?;
    if !prev.epochs.is_empty() {
        return Err(Error::checkpoint(
            &path,
            format!(
                "lists {} epochs but {} is missing; the run cannot be continued",
                prev.epochs.len(),
                state.display()
            ),
        ));
    }
    Ok((prev.config, None))
}

/// A run folder of a normlab from before the commit record: the optimizer in
/// train_state.safetensors, the weights in model.safetensors, the metrics in metrics.json, all
/// of the same epoch (anything else was a torn write of the old scheme).
fn read_legacy_run(
    files: &RunFiles,
    bytes: Vec<u8>,
    step: u64,
    md: &HashMap<String, String>,
) -> Result<(super::TrainConfig, Option<Commit>)> {
    let state = files.train_state();
    let path = files.metrics();
    let text = crate::files::read_limited(&path, 64 << 20, "metrics.json")?;
    let metrics: RunMetrics = serde_json::from_slice(&text)
        .map_err(|e| Error::checkpoint(&path, format!("not a normlab metrics.json ({e})")))?;
    let epoch: Option<usize> = md.get("epoch").and_then(|v| v.parse().ok());
    let model = checkpoint::read_safetensors(&files.model())?;
    let model_epoch = checkpoint::parse_metadata(&files.model(), &checkpoint::metadata(&files.model(), &model)?)?.epoch;
    let done = metrics.epochs.len();
    if epoch != Some(done) || model_epoch != done {
        return Err(Error::checkpoint(
            &state,
            format!(
                "an older normlab's run whose files disagree (optimizer state of epoch {}, model of epoch \
                 {model_epoch}, metrics of {done} epochs); it cannot be resumed",
                epoch.map_or("?".into(), |e| e.to_string())
            ),
        ));
    }
    Ok((
        metrics.config.clone(),
        Some(Commit {
            metrics,
            step,
            bytes,
            legacy_model: Some(model),
        }),
    ))
}

/// Checks the counters of a commit against the run's own configuration before any is used:
/// the epochs done (numbered 1, 2, ... and no more than the run's), the optimizer's step
/// count (one per batch of every epoch done) and, unless the run started from foreign weights,
/// every norm's batch counter (at most one per step). A counter from a damaged file would
/// otherwise surface later as something else (a step of 2^64-1 turned Adam's loss into NaN and
/// was reported as divergence).
pub(super) fn check_counters(
    files: &RunFiles,
    c: &Commit,
    config: &super::TrainConfig,
    batches_per_epoch: usize,
    model: &mut Model,
) -> Result<()> {
    let path = files.train_state();
    let done = c.metrics.epochs.len();
    if done > config.epochs {
        return Err(Error::checkpoint(
            &path,
            format!(
                "records {done} epochs done of a run of {}; the file is damaged",
                config.epochs
            ),
        ));
    }
    if let Some((k, e)) = c.metrics.epochs.iter().enumerate().find(|(k, e)| e.epoch != k + 1) {
        return Err(Error::checkpoint(
            &path,
            format!("its epoch row {} is numbered {}; the file is damaged", k + 1, e.epoch),
        ));
    }
    let steps = (done as u64).saturating_mul(batches_per_epoch as u64);
    if c.step != steps {
        return Err(Error::checkpoint(
            &path,
            format!(
                "its optimizer step counter is {} but {done} epochs of {batches_per_epoch} batches make {steps}; \
                 the file is damaged, or the training data changed size since the run started",
                c.step
            ),
        ));
    }
    if config.init_from.is_none() {
        for (name, b) in model.net.named_buffers() {
            if let crate::nn::BufferMut::I64(&mut count) = b {
                if count as u64 > steps {
                    return Err(Error::checkpoint(
                        &path,
                        format!(
                            "model.{name} is {count}, more than the {steps} training steps done; the file is damaged"
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Puts the committed weights, buffers and optimizer state into `model` and `opt`; returns the
/// committed log.
pub(super) fn restore(files: &RunFiles, c: &Commit, model: &mut Model, opt: &mut Optimizer) -> Result<RunLog> {
    let path = files.train_state();
    let st = SafeTensors::deserialize(&c.bytes).map_err(|e| Error::checkpoint(&path, e.to_string()))?;
    match &c.legacy_model {
        Some(bytes) => checkpoint::load_state_dict(&files.model(), bytes, model)?,
        None => {
            checkpoint::load_prefixed(&path, &st, model, "model.")?;
        }
    }
    opt.step = c.step;
    if c.step > 0 {
        let (first, second) = optimizer_keys(opt.config.kind);
        for (name, p) in model.net.named_params() {
            let shape = [p.value.len()];
            opt.first
                .push(checkpoint::tensor_f32(&path, &st, &format!("{first}.{name}"), &shape)?);
            if let Some(key) = second {
                opt.second
                    .push(checkpoint::tensor_f32(&path, &st, &format!("{key}.{name}"), &shape)?);
            }
        }
    }
    RunLog::from_record(&path, &st, c.metrics.epochs.len())
}
