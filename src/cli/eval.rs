//! `normlab eval`: a checkpoint's test loss and accuracy in eval mode.

use std::path::PathBuf;

use clap::Args;

use normlab::checkpoint::{load_model, CheckpointMeta};
use normlab::data::InputNorm;
use normlab::files::OutputGuard;
use normlab::models::ModelSpec;
use normlab::nn::StatsMode;
use normlab::{train, Error, Result};

use super::*;

#[derive(Args)]
#[command(after_long_help = "Example:\n  normlab eval --checkpoint runs/seed-cnn-bn/model.safetensors --json")]
pub struct EvalArgs {
    /// A model.safetensors written by `normlab train`, `fold` or `prune` (not the run folder).
    #[arg(long, value_name = "FILE")]
    pub checkpoint: PathBuf,
    #[command(flatten)]
    pub test: TestSetArgs,
    /// Images per forward pass [default: 1000]; results do not depend on it.
    #[arg(long, value_name = "N", value_parser = at_least_one, default_value_t = 1000)]
    pub batch_size: usize,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Write the predicted class of every test image to FILE as a JSON array (a device or pipe
    /// such as /dev/stdout is written through).
    #[arg(long, value_name = "FILE")]
    pub predictions: Option<PathBuf>,
    /// Write the logits of every test image to FILE as safetensors (one tensor "logits",
    /// [N, classes] float32), e.g. to compare with another runtime.
    #[arg(long, value_name = "FILE")]
    pub logits: Option<PathBuf>,
    /// Replace an existing --predictions or --logits file.
    #[arg(long)]
    pub force: bool,
    /// Fold BatchNorm into the layers before it first, and evaluate the folded model.
    #[arg(long)]
    pub fold: bool,
    /// running: normalize with the stored running statistics (eval mode, as PyTorch);
    /// batch: with each test batch's own statistics (training-mode normalization, nothing
    /// updated; the result depends on --batch-size) [default: running].
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(["running", "batch"]),
          default_value = "running")]
    pub bn_stats: String,
    /// The architecture of a checkpoint without normlab's metadata (a plain PyTorch state
    /// dict saved as safetensors, with normlab's tensor names): seed-cnn[:W], mlp, vgg[:CFG],
    /// resnet[:W1,...,W6]. Input shape and classes come from the data.
    #[arg(long, value_name = "MODEL", value_parser = super::model_arch)]
    pub model: Option<normlab::models::Arch>,
    /// The norm of such a checkpoint [default: bn]; `normlab norms` lists the specs.
    #[arg(long, value_name = "SPEC", requires = "model", value_parser = super::norm_spec)]
    pub norm: Option<normlab::nn::norm_spec::NormSpec>,
    /// With --model: the input normalization x ↦ (x/255 − MEAN)/STD [default: the training
    /// images' pixel mean and standard deviation, as normlab's own runs use].
    #[arg(long, value_name = "MEAN", requires_all = ["model", "input_std"], value_parser = finite_f32)]
    pub input_mean: Option<f32>,
    /// With --model: see --input-mean.
    #[arg(long, value_name = "STD", requires_all = ["model", "input_mean"], value_parser = positive)]
    pub input_std: Option<f64>,
}

pub fn run(a: EvalArgs) -> Result<()> {
    init_threads(a.test.threads)?;
    let guard = OutputGuard::new(a.force).input(&a.checkpoint);
    let predictions = a
        .predictions
        .as_ref()
        .map(|p| guard.file("--predictions", p))
        .transpose()?;
    let logits = a.logits.as_ref().map(|p| guard.file("--logits", p)).transpose()?;
    let dir = normlab::data::resolve_data_dir(a.test.data.as_deref())?;
    let (mut model, meta) = match &a.model {
        None => load_model(&a.checkpoint)?,
        Some(m) => foreign(&a, m, &dir)?,
    };
    if a.fold {
        model = normlab::fold::fold(&mut model)?;
    }
    if a.bn_stats == "batch" && model.net.set_stats_mode(StatsMode::Batch) == 0 {
        if matches!(meta.spec.model, normlab::models::Arch::Lstm(..)) {
            return Err(Error::invalid(format!(
                "--bn-stats batch: {}'s recurrent BN keeps per-time-step statistics, which --bn-stats does not cover",
                meta.spec.model
            )));
        }
        return Err(Error::invalid(format!(
            "--bn-stats batch: {} with norm {} keeps no running statistics; it already normalizes \
             with batch statistics (or none)",
            meta.spec.model, meta.spec.norm
        )));
    }
    let test = normlab::data::load_test_for(Some(&dir), a.test.test_limit, meta.spec.input)?;
    let ev = in_pool(|| train::evaluate(&mut model, &test, meta.input_norm, a.batch_size)).map_err(|e| {
        if a.bn_stats == "batch" {
            Error::invalid(format!(
                "{e}; with --bn-stats batch every test batch (--batch-size {}) must give each channel more than one value",
                a.batch_size
            ))
        } else {
            e
        }
    })?;
    if let Some(path) = &predictions {
        let json = serde_json::to_vec(&ev.predictions).expect("predictions serialize");
        normlab::files::write_atomic(path, &json)?;
    }
    if let Some(path) = &logits {
        let classes = meta.spec.classes;
        let entry = normlab::checkpoint::Entry::f32("logits".into(), &[test.len(), classes], &ev.logits);
        let bytes = normlab::checkpoint::serialize(&[entry], Default::default())?;
        normlab::files::write_atomic(path, &bytes)?;
    }
    if a.json {
        let j = serde_json::json!({
            "checkpoint": a.checkpoint, "data": dir, "model": meta.spec.model, "norm": meta.spec.norm,
            "epoch": meta.epoch, "test_images": test.len(), "test_loss": ev.loss, "test_accuracy": ev.accuracy,
            "bn_stats": a.bn_stats, "input_norm": meta.input_norm,
        });
        outln!("{j}")?;
    } else {
        outln!("{}", normlab::data::describe_data(&dir, None, &test))?;
        outln!(
            "model: {} ({}), norm {}",
            meta.spec.model,
            model.summary(),
            meta.spec.norm
        )?;
        if a.bn_stats == "batch" {
            outln!(
                "normalized with each test batch's own statistics (batches of {})",
                a.batch_size
            )?;
        }
        outln!(
            "test images {}  test loss {:.4}  test accuracy {:.4}",
            test.len(),
            ev.loss,
            ev.accuracy
        )?;
    }
    Ok(())
}

/// A checkpoint whose architecture comes from the flags (a plain PyTorch state dict): the input
/// shape from the test images, ten classes, the input normalization from the flags or the
/// training images.
fn foreign(
    a: &EvalArgs,
    model: &normlab::models::Arch,
    dir: &std::path::Path,
) -> Result<(normlab::models::Model, CheckpointMeta)> {
    let norm = a.norm.unwrap_or(normlab::nn::norm_spec::NormSpec::builtin("bn"));
    let test = normlab::data::load_split(dir, false)?;
    let spec = ModelSpec::new(model.clone(), norm, test.shape, test.classes)?;
    let input_norm = match (a.input_mean, a.input_std) {
        (Some(mean), Some(std)) => InputNorm::uniform(test.shape[0], mean, std as f32),
        _ => normlab::data::load_split(dir, true)?.pixel_stats()?,
    };
    let m = normlab::checkpoint::load_foreign(&a.checkpoint, &spec)?;
    Ok((
        m,
        CheckpointMeta {
            spec,
            input_norm,
            epoch: 0,
        },
    ))
}
