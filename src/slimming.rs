//! Network slimming (Liu et al. 2017): one global threshold over every BN |γ|, channels at or
//! below it removed from the conv that produces them, its BN, and the next layer's inputs.
//! Works on seed-cnn and vgg, whose specs record the new widths (`seed-cnn:W`, `vgg:<cfg>`).

use std::collections::HashMap;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::fold::state_map;
use crate::models::{Arch, Model, ModelSpec};
use crate::nn::norm_spec::NormSpec;
use crate::nn::BufferMut;
use crate::tensor::Tensor;

/// Channels kept in one conv+BN pair, and the layer that reads them.
#[derive(Clone, Debug, Serialize)]
pub struct LayerPlan {
    pub conv: String,
    pub bn: String,
    /// The conv or linear layer whose inputs are these channels.
    pub consumer: String,
    pub before: usize,
    pub after: usize,
    #[serde(skip)]
    pub keep: Vec<usize>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PrunePlan {
    pub percent: f64,
    /// Every layer keeps a multiple of this many channels (1: any count).
    pub multiple_of: usize,
    /// Channels with |γ| <= threshold are removed.
    pub threshold: f32,
    pub layers: Vec<LayerPlan>,
    /// Every |γ|, for the distribution plot.
    #[serde(skip)]
    pub gammas: Vec<f32>,
}

/// The prunable (conv, BN, consumer) triples: for seed-cnn and vgg every conv → BN, read by the
/// next conv or the classifier; for resnet the inner conv1 → bn1 of each block, read by its
/// conv2, so every residual addition keeps its width.
fn prunable(model: &Model) -> Result<Vec<(String, String, String)>> {
    if !matches!(model.spec.model, Arch::SeedCnn(_) | Arch::Vgg(_) | Arch::ResNet(_)) {
        return Err(Error::invalid(format!(
            "pruning supports seed-cnn, vgg and resnet, not {}",
            model.spec.model
        )));
    }
    let NormSpec::Batch(cfg) = model.spec.norm else {
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
    if matches!(model.spec.model, Arch::ResNet(_)) {
        return Ok(model
            .net
            .layers
            .iter()
            .filter(|(_, l)| l.kind() == "BasicBlock")
            .map(|(n, _)| (format!("{n}.conv1"), format!("{n}.bn1"), format!("{n}.conv2")))
            .collect());
    }
    let mut pairs: Vec<(String, String)> = Vec::new();
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
    let classifier = model.net.layers.last().map(|(n, _)| n.clone()).unwrap_or_default();
    let consumers: Vec<String> = pairs
        .iter()
        .skip(1)
        .map(|(c, _)| c.clone())
        .chain([classifier])
        .collect();
    Ok(pairs.into_iter().zip(consumers).map(|((c, b), n)| (c, b, n)).collect())
}

/// Chooses the channels to keep: the floor(P·total) smallest |γ| over all prunable BN layers
/// go; each layer keeps at least its largest one. With `multiple_of` m > 1 each layer's count
/// is then rounded up to a multiple of m (at most its width), taking back its largest |γ| among
/// those removed, as deployment tools round widths to what the kernels like (16-lane vectors,
/// the Winograd paths' 16-channel blocks).
pub fn plan(model: &mut Model, percent: f64, multiple_of: usize) -> Result<PrunePlan> {
    if multiple_of == 0 {
        return Err(Error::invalid("--multiple-of must be at least 1"));
    }
    if !(0.0..1.0).contains(&percent) {
        return Err(Error::invalid(format!(
            "--percent must be in [0, 1) (a fraction of the channels), got {percent}"
        )));
    }
    let triples = prunable(model)?;
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
    for (_, bn, _) in &triples {
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
    for (conv, bn, consumer) in triples {
        let g = gamma(&bn)?;
        let mut keep: Vec<usize> = (0..g.len()).filter(|&i| g[i] > threshold).collect();
        if keep.is_empty() {
            let best = (0..g.len()).max_by(|&a, &b| g[a].total_cmp(&g[b])).unwrap_or(0);
            keep.push(best);
        }
        let rounded = keep.len().div_ceil(multiple_of) * multiple_of;
        if rounded > keep.len() {
            let mut dropped: Vec<usize> = (0..g.len()).filter(|i| !keep.contains(i)).collect();
            dropped.sort_by(|&a, &b| g[b].total_cmp(&g[a]));
            let back = rounded.min(g.len()) - keep.len();
            keep.extend(dropped.into_iter().take(back));
            keep.sort_unstable();
        }
        layers.push(LayerPlan {
            conv,
            bn,
            consumer,
            before: g.len(),
            after: keep.len(),
            keep,
        });
    }
    Ok(PrunePlan {
        percent,
        multiple_of,
        threshold,
        layers,
        gammas: all,
    })
}

/// Rows `keep` of a tensor, its first dimension being the row index.
fn take_rows(t: &Tensor, keep: &[usize]) -> Tensor {
    let row = t.len() / t.shape[0];
    let data = keep
        .iter()
        .flat_map(|&r| t.data[r * row..(r + 1) * row].iter().copied())
        .collect();
    let mut shape = t.shape.clone();
    shape[0] = keep.len();
    Tensor { shape, data }
}

/// Of each row, the input channels `keep` of `channels` equal blocks (k·k values per channel for
/// a conv weight, H·W for the classifier behind a flatten).
fn take_inputs(t: &Tensor, keep: &[usize], channels: usize) -> Tensor {
    let rows = t.shape[0];
    let row_len = t.len() / rows;
    let per = row_len / channels;
    let mut data = Vec::with_capacity(rows * keep.len() * per);
    for r in 0..rows {
        let row = &t.data[r * row_len..(r + 1) * row_len];
        for &c in keep {
            data.extend_from_slice(&row[c * per..(c + 1) * per]);
        }
    }
    let mut shape = t.shape.clone();
    shape[1] = shape[1] / channels * keep.len();
    Tensor { shape, data }
}

/// The pruned model's spec: the same architecture with the new widths.
fn pruned_spec(spec: &ModelSpec, plan: &PrunePlan) -> ModelSpec {
    let widths: Vec<usize> = plan.layers.iter().map(|l| l.after).collect();
    let model = match &spec.model {
        Arch::SeedCnn(_) => Arch::SeedCnn(widths[0]),
        Arch::ResNet(_) => Arch::ResNet(widths),
        Arch::Vgg(items) => {
            let mut it = widths.into_iter();
            Arch::Vgg(items.iter().map(|i| i.and_then(|_| it.next())).collect())
        }
        other => other.clone(),
    };
    ModelSpec { model, ..spec.clone() }
}

/// The pruned model: new widths in its spec, every tensor cut to the kept channels.
pub fn apply(model: &mut Model, plan: &PrunePlan) -> Result<Model> {
    let state = state_map(model);
    let mut pruned = Model::build(&pruned_spec(&model.spec, plan), 0)?;
    let get = |n: &str| {
        state
            .get(n)
            .ok_or_else(|| Error::invalid(format!("{n} missing from the checkpoint")))
    };
    for (name, p) in pruned.net.named_params() {
        let (layer, key) = name.rsplit_once('.').unwrap_or((name.as_str(), ""));
        let mut t = get(&name)?.clone();
        for l in &plan.layers {
            if l.conv == layer || l.bn == layer {
                t = take_rows(&t, &l.keep);
            }
        }
        for l in &plan.layers {
            if l.consumer == layer && key == "weight" {
                t = take_inputs(&t, &l.keep, l.before);
            }
        }
        if t.len() != p.value.len() {
            return Err(Error::invalid(format!(
                "{name}: pruned to {} values, the model needs {}",
                t.len(),
                p.value.len()
            )));
        }
        p.value.data = t.data;
    }
    let counts: HashMap<String, i64> = model
        .net
        .named_buffers()
        .into_iter()
        .filter_map(|(n, b)| if let BufferMut::I64(v) = b { Some((n, *v)) } else { None })
        .collect();
    for (name, b) in pruned.net.named_buffers() {
        let layer = name.rsplit_once('.').map_or(name.as_str(), |(l, _)| l);
        match b {
            BufferMut::F32(t) => {
                let mut old = get(&name)?.clone();
                if let Some(l) = plan.layers.iter().find(|l| l.bn == layer) {
                    old = take_rows(&old, &l.keep);
                }
                if old.len() != t.len() {
                    return Err(Error::invalid(format!(
                        "{name}: pruned to {} values, the model needs {}",
                        old.len(),
                        t.len()
                    )));
                }
                t.data = old.data;
            }
            BufferMut::I64(v) => *v = counts.get(&name).copied().unwrap_or(0),
        }
    }
    Ok(pruned)
}

/// What `normlab prune` is asked to do.
pub struct PruneRequest {
    pub checkpoint: std::path::PathBuf,
    pub percent: f64,
    /// Round every layer's kept channels up to a multiple of this (1: off).
    pub multiple_of: usize,
    pub finetune: Option<usize>,
    pub out: std::path::PathBuf,
    pub data: Option<std::path::PathBuf>,
    pub test_limit: Option<usize>,
    /// Replace the outputs of an earlier run in `out`.
    pub force: bool,
}

/// prune.json.
#[derive(Clone, Debug, Serialize)]
pub struct PruneReport {
    pub checkpoint: std::path::PathBuf,
    pub pruned_checkpoint: std::path::PathBuf,
    pub model_before: crate::models::Arch,
    pub model_after: crate::models::Arch,
    pub plan: PrunePlan,
    pub parameters_before: usize,
    pub parameters_after: usize,
    pub flops_before: usize,
    pub flops_after: usize,
    /// What was read, in one line (`data::describe_data`).
    pub data: String,
    pub test_images: usize,
    pub accuracy_before: f64,
    pub accuracy_after_prune: f64,
    pub accuracy_after_finetune: Option<f64>,
    /// The fine-tuning run's folder (`train --resume` continues it).
    pub finetune_run: Option<std::path::PathBuf>,
    /// The result: the fine-tuned model, when there is one.
    pub finetune_checkpoint: Option<std::path::PathBuf>,
    pub latency: Vec<crate::bench::Latency>,
}

/// The whole command: prune, measure, write DIR/model.safetensors, DIR/prune.json,
/// DIR/gamma.svg, and fine-tune into DIR/finetune when asked. The input is only read.
/// `on_pruned` sees the report once the pruned model is written, before fine-tuning starts; its error (standard output closed) stops the command.
pub fn run_prune(
    req: &PruneRequest,
    reporter: &mut dyn crate::train::Reporter,
    on_pruned: &mut dyn FnMut(&PruneReport) -> Result<()>,
) -> Result<PruneReport> {
    use crate::checkpoint::{self, CheckpointMeta};
    if !(0.0..1.0).contains(&req.percent) {
        return Err(Error::invalid(format!(
            "--percent must be in [0, 1) (a fraction of the channels), got {}",
            req.percent
        )));
    }
    let guard = crate::files::OutputGuard::new(req.force).input(&req.checkpoint);
    let dir = guard.folder("--out", &req.out, &["model.safetensors", "prune.json", "gamma.svg"])?;
    let finetune_dir = dir.join("finetune");
    if req.finetune.is_some() {
        guard.folder("--out", &finetune_dir, &[])?;
    }
    let pruned_path = dir.join("model.safetensors");
    let (mut model, meta) = checkpoint::load_model(&req.checkpoint)?;
    let plan = plan(&mut model, req.percent, req.multiple_of)?;
    let data_dir = crate::data::resolve_data_dir(req.data.as_deref())?;
    let test = crate::data::load_test_for(Some(&data_dir), req.test_limit, meta.spec.input)?;
    let finetune = match req.finetune {
        Some(epochs) => Some(finetune_config(
            &req.checkpoint,
            &model.spec,
            epochs,
            &pruned_path,
            req,
        )?),
        None => None,
    };
    let _lock = crate::files::RunLock::acquire(&dir)?;
    let mut pruned = apply(&mut model, &plan)?;
    let accuracy_before = crate::train::evaluate(&mut model, &test, meta.input_norm, 1000)?.accuracy;
    let accuracy_after_prune = crate::train::evaluate(&mut pruned, &test, meta.input_norm, 1000)?.accuracy;
    let latency = crate::bench::compare_latency(&mut model, &mut pruned)?;
    let pmeta = CheckpointMeta {
        spec: pruned.spec.clone(),
        ..meta.clone()
    };
    checkpoint::save_model(&pruned_path, &mut pruned, &pmeta)?;
    let svg = crate::plot::gamma_histogram_svg(&plan.gammas, plan.threshold, plan.percent)?;
    crate::files::write_atomic(&dir.join("gamma.svg"), svg.as_bytes())?;
    let mut report = PruneReport {
        checkpoint: req.checkpoint.clone(),
        pruned_checkpoint: pruned_path,
        model_before: model.spec.model.clone(),
        model_after: pruned.spec.model.clone(),
        parameters_before: model.parameter_count(),
        parameters_after: pruned.parameter_count(),
        flops_before: model.spec.flops()?,
        flops_after: pruned.spec.flops()?,
        plan,
        data: crate::data::describe_data(&data_dir, None, &test),
        test_images: test.len(),
        accuracy_before,
        accuracy_after_prune,
        accuracy_after_finetune: None,
        finetune_run: None,
        finetune_checkpoint: None,
        latency,
    };
    let write_report = |r: &PruneReport| {
        let json = serde_json::to_vec_pretty(r).expect("report serializes");
        crate::files::write_atomic(&dir.join("prune.json"), &json)
    };
    write_report(&report)?;
    on_pruned(&report)?;
    if let Some(mut config) = finetune {
        config.model = pruned.spec.model.clone();
        if req.force {
            // --force: the fine-tuning run of an earlier prune here starts over.
            for f in crate::files::guard::RUN_MARKERS {
                let _ = std::fs::remove_file(finetune_dir.join(f));
            }
        }
        let m = crate::train::train(crate::train::Start::Fresh(Box::new(config)), &finetune_dir, reporter)?;
        report.accuracy_after_finetune = Some(m.test_accuracy);
        report.finetune_checkpoint = Some(finetune_dir.join("model.safetensors"));
        report.finetune_run = Some(finetune_dir);
        write_report(&report)?;
    }
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
    config.norm = spec.norm;
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
