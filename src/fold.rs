//! BN folding for inference: every eval-mode BatchNorm is merged into the conv or linear layer
//! before it (PyTorch's fuse_conv_bn_eval): with s = γ / sqrt(running_var + eps),
//! W' = W·s per output channel and b' = (b − running_mean)·s + β. The folded model is the same
//! architecture with `--norm none`, whose conv/linear layers carry the bias.

use std::collections::HashMap;

use crate::checkpoint::{self, CheckpointMeta};
use crate::data::{load_test_for, Dataset, InputNorm};
use crate::error::{Error, Result};
use crate::models::{Arch, Model, ModelSpec};
use crate::nn::batch_norm::BatchStats;
use crate::nn::norm_spec::NormSpec;
use crate::nn::{BufferMut, Mode};
use crate::tensor::Tensor;

/// Every tensor of a model's state dict by name (int64 buffers as one-value tensors).
pub fn state_map(model: &mut Model) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for (name, p) in model.net.named_params() {
        out.insert(name, p.value.clone());
    }
    for (name, b) in model.net.named_buffers() {
        if let BufferMut::F32(t) = b {
            out.insert(name, t.clone());
        }
    }
    out
}

/// The per-channel (scale, shift) that a norm layer `prefix` applies in eval mode.
fn bn_affine(state: &HashMap<String, Tensor>, prefix: &str, eps: f64, lp: bool) -> Result<(Vec<f32>, Vec<f32>)> {
    let get = |k: &str| {
        state.get(&format!("{prefix}.{k}")).ok_or_else(|| {
            Error::invalid(format!(
                "{prefix} has no {k}: only BatchNorm with running statistics folds"
            ))
        })
    };
    let rm = get("running_mean")?;
    let rv = get(if lp { "running_scale" } else { "running_var" })?;
    let c = rm.len();
    let gamma = state
        .get(&format!("{prefix}.weight"))
        .map(|t| t.data.clone())
        .unwrap_or_else(|| vec![1.0; c]);
    let beta = state
        .get(&format!("{prefix}.bias"))
        .map(|t| t.data.clone())
        .unwrap_or_else(|| vec![0.0; c]);
    let mut scale = Vec::with_capacity(c);
    let mut shift = Vec::with_capacity(c);
    for ch in 0..c {
        let inv = if lp {
            1.0 / (rv.data[ch] as f64 + eps)
        } else {
            1.0 / (rv.data[ch] as f64 + eps).sqrt()
        };
        let s = gamma[ch] as f64 * inv;
        scale.push(s as f32);
        // b' = (b − rm)·s + β, with b added by the caller (b·s) when the layer had a bias.
        shift.push((beta[ch] as f64 - rm.data[ch] as f64 * s) as f32);
    }
    Ok((scale, shift))
}

/// The folded model: same architecture, no norm layers, conv/linear weights and biases
/// absorbing each BatchNorm's eval-mode affine; each conv → ReLU → 2x2 max-pool fused into one
/// `ConvPool` (same state dict, same outputs).
pub fn fold(model: &mut Model) -> Result<Model> {
    if matches!(model.spec.model, Arch::Lstm(..)) && model.spec.norm != NormSpec::None {
        return Err(Error::invalid(format!(
            "{} normalizes inside its recurrence, where no layer's weights can absorb the norm: nothing to fold",
            model.spec.model
        )));
    }
    if matches!(model.spec.model, Arch::Vit(_)) && model.spec.norm != NormSpec::None {
        return Err(Error::invalid(format!(
            "{}'s norms follow residual sums (pre-norm: they read the residual stream; post-norm: they \
             normalize a sum), where no layer's weights can absorb them: nothing to fold",
            model.spec.model
        )));
    }
    let norm = model.spec.norm;
    let NormSpec::Batch(cfg) = norm else {
        return Err(Error::invalid(format!(
            "the checkpoint has no BatchNorm layers to fold (its norm is {})",
            model.spec.norm
        )));
    };
    if !cfg.track_running_stats {
        return Err(Error::invalid(
            "BatchNorm without running statistics (track=false) normalizes with batch statistics in eval mode and cannot be folded",
        ));
    }
    let lp = matches!(cfg.stats, BatchStats::Lp(_));
    let state = state_map(model);
    // Which weight layer each norm follows, by name: bnK after convK (fcK in the MLP) in the
    // same parent, a block's shortcut.1 after its shortcut.0.
    let mut follows: Vec<(String, String)> = Vec::new();
    for key in state.keys().filter(|k| k.ends_with(".running_mean")) {
        let bn = key.trim_end_matches(".running_mean").to_string();
        let (parent, last) = bn.rsplit_once('.').map_or(("", bn.as_str()), |(p, l)| (p, l));
        let join = |leaf: String| {
            if parent.is_empty() {
                leaf
            } else {
                format!("{parent}.{leaf}")
            }
        };
        let candidates: Vec<String> = if last == "1" && parent.ends_with("shortcut") {
            vec![format!("{parent}.0")]
        } else if let Some(k) = last.strip_prefix("bn") {
            vec![join(format!("conv{k}")), join(format!("fc{k}"))]
        } else {
            Vec::new()
        };
        let weight = candidates
            .into_iter()
            .find(|c| state.contains_key(&format!("{c}.weight")));
        let weight =
            weight.ok_or_else(|| Error::invalid(format!("{bn}: no conv or linear layer before it to fold into")))?;
        follows.push((weight, bn));
    }
    let spec = ModelSpec {
        norm: NormSpec::None,
        ..model.spec.clone()
    };
    let mut folded = Model::build(&spec, 0)?;
    for (name, p) in folded.net.named_params() {
        let (layer, key) = name.rsplit_once('.').unwrap_or((name.as_str(), ""));
        let bn = follows.iter().find(|(w, _)| w == layer).map(|(_, b)| b.as_str());
        let original = state.get(&name);
        match (bn, key) {
            (None, _) => {
                let t = original.ok_or_else(|| Error::invalid(format!("{name} missing from the checkpoint")))?;
                p.value = t.clone();
            }
            (Some(bn), "weight") => {
                let (scale, _) = bn_affine(&state, bn, cfg.eps, lp)?;
                let w = original.ok_or_else(|| Error::invalid(format!("{name} missing from the checkpoint")))?;
                let per_out = w.len() / scale.len();
                let mut v = w.clone();
                for (row, &s) in v.data.chunks_mut(per_out).zip(&scale) {
                    row.iter_mut().for_each(|x| *x *= s);
                }
                p.value = v;
            }
            (Some(bn), _) => {
                let (scale, shift) = bn_affine(&state, bn, cfg.eps, lp)?;
                let b = original
                    .map(|t| t.data.clone())
                    .unwrap_or_else(|| vec![0.0; scale.len()]);
                p.value.data = b
                    .iter()
                    .zip(&scale)
                    .zip(&shift)
                    .map(|((&b, &s), &t)| b * s + t)
                    .collect();
            }
        }
    }
    // An inference model: a conv and the ReLU + max-pool after it run as one pass.
    crate::nn::conv_pool::fuse_conv_pools(&mut folded.net);
    Ok(folded)
}

/// The largest |logit difference| between two models over a dataset in eval mode.
pub fn max_logit_difference(
    a: &mut Model,
    b: &mut Model,
    data: &Dataset,
    norm: InputNorm,
    batch: usize,
) -> Result<f32> {
    let order: Vec<usize> = (0..data.len()).collect();
    let mut labels = Vec::new();
    let mut worst = 0.0f32;
    for idx in order.chunks(batch.max(1)) {
        data.batch(idx, norm, a.input_mut(), &mut labels)?;
        b.input_mut().clone_from(a.input_mut());
        let la = a.forward(Mode::Eval)?.clone();
        let lb = b.forward(Mode::Eval)?;
        for (x, y) in la.data.iter().zip(&lb.data) {
            // NaN is the worst difference of all, and stays (f32::max would drop it).
            let d = (x - y).abs();
            if !worst.is_nan() && (d.is_nan() || d > worst) {
                worst = d;
            }
        }
    }
    Ok(worst)
}

/// What `normlab fold` is asked to do.
pub struct FoldRequest {
    pub checkpoint: std::path::PathBuf,
    pub out: std::path::PathBuf,
    pub data: Option<std::path::PathBuf>,
    pub test_limit: Option<usize>,
    /// Replace the outputs of an earlier run in `out`.
    pub force: bool,
}

/// fold.json.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FoldReport {
    pub checkpoint: std::path::PathBuf,
    pub folded_checkpoint: std::path::PathBuf,
    pub model: crate::models::Arch,
    /// The folded model's layers.
    pub layers: String,
    pub norm_before: String,
    /// What was read, in one line (`data::describe_data`).
    pub data: String,
    pub test_images: usize,
    pub max_abs_logit_difference: f32,
    pub folded_test_accuracy: f64,
    /// before = unfolded, after = folded.
    pub latency: Vec<crate::bench::Latency>,
}

/// The whole command: fold, compare with the original on the test set, time both, write
/// DIR/model.safetensors and DIR/fold.json. The input is only read.
pub fn run_fold(req: &FoldRequest) -> Result<FoldReport> {
    let guard = crate::files::OutputGuard::new(req.force).input(&req.checkpoint);
    let dir = guard.folder("--out", &req.out, &["model.safetensors", "fold.json"])?;
    let out = dir.join("model.safetensors");
    let (mut model, meta) = checkpoint::load_model(&req.checkpoint)?;
    let mut folded = fold(&mut model)?;
    let data_dir = crate::data::resolve_data_dir(req.data.as_deref())?;
    let test = load_test_for(Some(&data_dir), req.test_limit, meta.spec.input)?;
    let _lock = crate::files::RunLock::acquire(&dir)?;
    let max_abs_logit_difference = max_logit_difference(&mut model, &mut folded, &test, meta.input_norm, 500)?;
    let latency = crate::bench::compare_latency(&mut model, &mut folded)?;
    let folded_test_accuracy = crate::train::evaluate(&mut folded, &test, meta.input_norm, 1000)?.accuracy;
    let report = FoldReport {
        checkpoint: req.checkpoint.clone(),
        folded_checkpoint: out.clone(),
        model: meta.spec.model.clone(),
        layers: folded.summary(),
        norm_before: meta.spec.norm.to_string(),
        data: crate::data::describe_data(&data_dir, None, &test),
        test_images: test.len(),
        max_abs_logit_difference,
        folded_test_accuracy,
        latency,
    };
    let fmeta = CheckpointMeta {
        spec: folded.spec.clone(),
        ..meta
    };
    checkpoint::save_model(&out, &mut folded, &fmeta)?;
    let json = serde_json::to_vec_pretty(&report).expect("report serializes");
    crate::files::write_atomic(&dir.join("fold.json"), &json)?;
    Ok(report)
}
