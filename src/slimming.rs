//! Network slimming (Liu et al. 2017): one global threshold over every BN |γ|, channels at or
//! below it removed from the conv that produces them, its BN, and the next layer's inputs.
//! Works on seed-cnn and vgg, whose specs record the new widths (`seed-cnn:W`, `vgg:<cfg>`).

use std::collections::HashMap;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::fold::state_map;
use crate::models::{Model, ModelSpec};
use crate::nn::norm_spec::NormSpec;
use crate::nn::BufferMut;
use crate::tensor::Tensor;

/// Channels kept in one conv+BN pair.
#[derive(Clone, Debug, Serialize)]
pub struct LayerPlan {
    pub conv: String,
    pub bn: String,
    pub before: usize,
    pub after: usize,
    #[serde(skip)]
    pub keep: Vec<usize>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PrunePlan {
    pub percent: f64,
    /// Channels with |γ| <= threshold are removed.
    pub threshold: f32,
    pub layers: Vec<LayerPlan>,
    /// Every |γ|, for the distribution plot.
    #[serde(skip)]
    pub gammas: Vec<f32>,
}

/// The conv → BN pairs of a seed-cnn or vgg model, in order.
fn conv_bn_pairs(model: &Model) -> Result<Vec<(String, String)>> {
    let name = model.spec.model.split(':').next().unwrap_or("");
    if name != "seed-cnn" && name != "vgg" {
        return Err(Error::invalid(format!(
            "pruning supports seed-cnn and vgg, not {}",
            model.spec.model
        )));
    }
    let NormSpec::Batch(cfg) = model.spec.norm.parse::<NormSpec>()? else {
        return Err(Error::invalid(format!(
            "the checkpoint has no BatchNorm layers to prune by (its norm is {})",
            model.spec.norm
        )));
    };
    if !cfg.affine {
        return Err(Error::invalid(
            "BatchNorm without affine parameters has no γ to prune by",
        ));
    }
    let mut pairs = Vec::new();
    let mut last_conv = None;
    for (n, layer) in &model.net.layers {
        if layer.kind().starts_with("Conv2d") {
            last_conv = Some(n.clone());
        } else if layer.kind().starts_with("BatchNorm") {
            let conv = last_conv
                .take()
                .ok_or_else(|| Error::invalid(format!("{n} follows no conv layer")))?;
            pairs.push((conv, n.clone()));
        }
    }
    Ok(pairs)
}

/// Chooses the channels to keep: the floor(P·total) smallest |γ| over all BN layers go; each
/// layer keeps at least its largest one.
pub fn plan(model: &mut Model, percent: f64) -> Result<PrunePlan> {
    if !(0.0..1.0).contains(&percent) {
        return Err(Error::invalid(format!(
            "--percent must be in [0, 1) (a fraction of the channels), got {percent}"
        )));
    }
    let pairs = conv_bn_pairs(model)?;
    let state = state_map(model);
    let gamma = |bn: &str| -> Result<Vec<f32>> {
        Ok(state
            .get(&format!("{bn}.weight"))
            .ok_or_else(|| Error::invalid(format!("{bn}.weight missing")))?
            .data
            .iter()
            .map(|g| g.abs())
            .collect())
    };
    let mut all: Vec<f32> = Vec::new();
    for (_, bn) in &pairs {
        all.extend(gamma(bn)?);
    }
    if all.iter().any(|g| !g.is_finite()) {
        return Err(Error::invalid(
            "a BN γ is NaN or infinite; the checkpoint cannot be pruned",
        ));
    }
    let mut sorted = all.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let cut = (sorted.len() as f64 * percent).floor() as usize;
    let threshold = if cut == 0 { f32::NEG_INFINITY } else { sorted[cut - 1] };
    let mut layers = Vec::new();
    for (conv, bn) in pairs {
        let g = gamma(&bn)?;
        let mut keep: Vec<usize> = (0..g.len()).filter(|&i| g[i] > threshold).collect();
        if keep.is_empty() {
            let best = (0..g.len()).max_by(|&a, &b| g[a].total_cmp(&g[b])).unwrap_or(0);
            keep.push(best);
        }
        layers.push(LayerPlan {
            conv,
            bn,
            before: g.len(),
            after: keep.len(),
            keep,
        });
    }
    Ok(PrunePlan {
        percent,
        threshold,
        layers,
        gammas: all,
    })
}

/// Rows `keep` of a tensor whose first dimension is split into `groups` equal rows.
fn take_rows(t: &Tensor, keep: &[usize]) -> Vec<f32> {
    let row = t.len() / t.shape[0];
    keep.iter()
        .flat_map(|&r| t.data[r * row..(r + 1) * row].iter().copied())
        .collect()
}

/// Columns of an [rows, in] matrix whose input is `groups` channels of `per` values each: keeps
/// channels `keep` (for conv weights per = k·k, for the linear layer per = H·W).
fn take_input_channels(t: &Tensor, keep: &[usize], per: usize) -> Vec<f32> {
    let rows = t.shape[0];
    let row_len = t.len() / rows;
    let mut out = Vec::with_capacity(rows * keep.len() * per);
    for r in 0..rows {
        let row = &t.data[r * row_len..(r + 1) * row_len];
        for &c in keep {
            out.extend_from_slice(&row[c * per..(c + 1) * per]);
        }
    }
    out
}

/// The pruned model: new widths in its spec, every tensor cut to the kept channels.
pub fn apply(model: &mut Model, plan: &PrunePlan) -> Result<Model> {
    let state = state_map(model);
    let widths: Vec<usize> = plan.layers.iter().map(|l| l.after).collect();
    let name = model.spec.model.split(':').next().unwrap_or("");
    let new_model = if name == "seed-cnn" {
        format!("seed-cnn:{}", widths[0])
    } else {
        let cfg = model.spec.model.split_once(':').map(|(_, c)| c).unwrap_or("");
        let mut it = widths.iter();
        let items: Vec<String> = cfg
            .split(',')
            .map(|t| {
                if t.trim().eq_ignore_ascii_case("M") {
                    "M".to_string()
                } else {
                    it.next().map_or(String::new(), |w| w.to_string())
                }
            })
            .collect();
        format!("vgg:{}", items.join(","))
    };
    let spec = ModelSpec {
        model: new_model,
        ..model.spec.clone()
    };
    let mut pruned = Model::build(&spec, 0)?;
    let by_conv: HashMap<&str, usize> = plan
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| (l.conv.as_str(), i))
        .collect();
    let by_bn: HashMap<&str, usize> = plan
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| (l.bn.as_str(), i))
        .collect();
    let last_keep = &plan.layers.last().ok_or_else(|| Error::invalid("no BN layers"))?.keep;
    let get = |n: &str| {
        state
            .get(n)
            .ok_or_else(|| Error::invalid(format!("{n} missing from the checkpoint")))
    };
    for (name, p) in pruned.net.named_params() {
        let (layer, key) = name.rsplit_once('.').unwrap_or((name.as_str(), ""));
        let old = get(&name)?;
        let data = if let Some(&i) = by_conv.get(layer) {
            let out_kept = take_rows(old, &plan.layers[i].keep);
            if key == "weight" && i > 0 {
                let t = Tensor {
                    shape: vec![plan.layers[i].after, old.shape[1], old.shape[2], old.shape[3]],
                    data: out_kept,
                };
                take_input_channels(&t, &plan.layers[i - 1].keep, old.shape[2] * old.shape[3])
            } else {
                out_kept
            }
        } else if let Some(&i) = by_bn.get(layer) {
            plan.layers[i].keep.iter().map(|&c| old.data[c]).collect()
        } else if key == "weight" {
            // The classifier: its inputs are the last conv's channels, H·W values each.
            let per = old.shape[1] / plan.layers.last().map_or(1, |l| l.before);
            take_input_channels(old, last_keep, per)
        } else {
            old.data.clone()
        };
        if data.len() != p.value.len() {
            return Err(Error::invalid(format!(
                "{name}: pruned to {} values, the model needs {}",
                data.len(),
                p.value.len()
            )));
        }
        p.value.data = data;
    }
    let nbt: HashMap<String, i64> = model
        .net
        .named_buffers()
        .into_iter()
        .filter_map(|(n, b)| if let BufferMut::I64(v) = b { Some((n, *v)) } else { None })
        .collect();
    for (name, b) in pruned.net.named_buffers() {
        let layer = name.rsplit_once('.').map_or(name.as_str(), |(l, _)| l);
        match b {
            BufferMut::F32(t) => {
                let i = *by_bn
                    .get(layer)
                    .ok_or_else(|| Error::invalid(format!("{name}: no plan")))?;
                let old = get(&name)?;
                t.data = plan.layers[i].keep.iter().map(|&c| old.data[c]).collect();
            }
            BufferMut::I64(v) => *v = nbt.get(&name).copied().unwrap_or(0),
        }
    }
    Ok(pruned)
}

/// What `normlab prune` is asked to do.
pub struct PruneRequest {
    pub checkpoint: std::path::PathBuf,
    pub percent: f64,
    pub finetune: Option<usize>,
    pub out: std::path::PathBuf,
    pub data: Option<std::path::PathBuf>,
    pub test_limit: Option<usize>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    pub batch: usize,
    pub before_ms: f64,
    pub after_ms: f64,
    pub speedup: f64,
}

/// prune.json.
#[derive(Clone, Debug, Serialize)]
pub struct PruneReport {
    pub checkpoint: std::path::PathBuf,
    pub pruned_checkpoint: std::path::PathBuf,
    pub model_before: String,
    pub model_after: String,
    pub plan: PrunePlan,
    pub parameters_before: usize,
    pub parameters_after: usize,
    pub flops_before: usize,
    pub flops_after: usize,
    pub test_images: usize,
    pub accuracy_before: f64,
    pub accuracy_after_prune: f64,
    pub accuracy_after_finetune: Option<f64>,
    pub finetune_run: Option<std::path::PathBuf>,
    pub latency: Vec<Latency>,
}

/// The whole command: prune, measure, write DIR/model.safetensors, DIR/prune.json,
/// DIR/gamma.svg, and fine-tune into DIR/finetune when asked. The input is only read.
pub fn run_prune(req: &PruneRequest, reporter: &mut dyn crate::train::Reporter) -> Result<PruneReport> {
    use crate::checkpoint::{self, CheckpointMeta};
    use crate::data::{load_split, resolve_data_dir};
    if !(0.0..1.0).contains(&req.percent) {
        return Err(Error::invalid(format!(
            "--percent must be in [0, 1) (a fraction of the channels), got {}",
            req.percent
        )));
    }
    let pruned_path = req.out.join("model.safetensors");
    let same = |a: &std::path::Path, b: &std::path::Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    };
    if same(&pruned_path, &req.checkpoint) {
        return Err(Error::invalid(
            "--out would overwrite the input checkpoint; choose another folder",
        ));
    }
    let (mut model, meta) = checkpoint::load_model(&req.checkpoint)?;
    let plan = plan(&mut model, req.percent)?;
    let data_dir = resolve_data_dir(req.data.as_deref())?;
    let mut test = load_split(&data_dir, false)?;
    if let Some(n) = req.test_limit {
        test.truncate(n);
    }
    if test.shape != meta.spec.input {
        return Err(Error::invalid(format!(
            "the checkpoint expects images {:?}, the data are {:?}",
            meta.spec.input, test.shape
        )));
    }
    let mut pruned = apply(&mut model, &plan)?;
    let accuracy_before = crate::train::evaluate(&mut model, &test, meta.input_norm, 1000)?.accuracy;
    let accuracy_after_prune = crate::train::evaluate(&mut pruned, &test, meta.input_norm, 1000)?.accuracy;
    let mut latency = Vec::new();
    for batch in [1usize, 128] {
        let reps = if batch == 1 { 200 } else { 20 };
        let before = crate::bench::inference_latency(&mut model, batch, reps)?;
        let after = crate::bench::inference_latency(&mut pruned, batch, reps)?;
        latency.push(Latency {
            batch,
            before_ms: before * 1e3,
            after_ms: after * 1e3,
            speedup: before / after,
        });
    }
    let pmeta = CheckpointMeta {
        spec: pruned.spec.clone(),
        ..meta.clone()
    };
    checkpoint::save_model(&pruned_path, &mut pruned, &pmeta)?;
    let svg = crate::plot::gamma_histogram_svg(&plan.gammas, plan.threshold, plan.percent)?;
    checkpoint::write_atomic(&req.out.join("gamma.svg"), svg.as_bytes())?;
    let (mut accuracy_after_finetune, mut finetune_run) = (None, None);
    if let Some(epochs) = req.finetune {
        let run_dir = req.out.join("finetune");
        let config = finetune_config(&req.checkpoint, &pruned.spec, epochs, &pruned_path, req)?;
        let m = crate::train::train(crate::train::Start::Fresh(config), &run_dir, reporter)?;
        accuracy_after_finetune = Some(m.test_accuracy);
        finetune_run = Some(run_dir);
    }
    let report = PruneReport {
        checkpoint: req.checkpoint.clone(),
        pruned_checkpoint: pruned_path,
        model_before: model.spec.model.clone(),
        model_after: pruned.spec.model.clone(),
        parameters_before: model.parameter_count(),
        parameters_after: pruned.parameter_count(),
        flops_before: model.spec.flops()?,
        flops_after: pruned.spec.flops()?,
        plan,
        test_images: test.len(),
        accuracy_before,
        accuracy_after_prune,
        accuracy_after_finetune,
        finetune_run,
        latency,
    };
    let json = serde_json::to_vec_pretty(&report).expect("report serializes");
    checkpoint::write_atomic(&req.out.join("prune.json"), &json)?;
    Ok(report)
}

/// Fine-tuning settings: the original run's (from the metrics.json beside the checkpoint) when
/// there is one, without the sparsity penalty; otherwise the training defaults.
fn finetune_config(
    checkpoint: &std::path::Path,
    spec: &ModelSpec,
    epochs: usize,
    init: &std::path::Path,
    req: &PruneRequest,
) -> Result<crate::train::TrainConfig> {
    let metrics = checkpoint.parent().map(|d| d.join("metrics.json"));
    let original = metrics
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str::<crate::train::RunMetrics>(&t).ok())
        .map(|m| m.config);
    let mut config = original.unwrap_or_default();
    config.model = spec.model.clone();
    config.norm = spec.norm.clone();
    config.epochs = epochs;
    config.sparsity = 0.0;
    config.gamma_init = None;
    config.init_from = Some(init.to_path_buf());
    if req.data.is_some() {
        config.data = req.data.clone();
    }
    config.validate()?;
    Ok(config)
}
