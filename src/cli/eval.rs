//! `normlab eval`: a checkpoint's test loss and accuracy in eval mode.

use std::path::PathBuf;

use clap::Args;

use normlab::checkpoint::load_model;
use normlab::files::OutputGuard;
use normlab::{train, Result};

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
    /// Replace an existing --predictions file.
    #[arg(long)]
    pub force: bool,
    /// Fold BatchNorm into the layers before it first, and evaluate the folded model.
    #[arg(long)]
    pub fold: bool,
}

pub fn run(a: EvalArgs) -> Result<()> {
    init_threads(a.test.threads)?;
    let guard = OutputGuard::new(a.force).input(&a.checkpoint);
    let predictions = a
        .predictions
        .as_ref()
        .map(|p| guard.file("--predictions", p))
        .transpose()?;
    let (mut model, meta) = load_model(&a.checkpoint)?;
    if a.fold {
        model = normlab::fold::fold(&mut model)?;
    }
    let dir = normlab::data::resolve_data_dir(a.test.data.as_deref())?;
    let test = normlab::data::load_test_for(Some(&dir), a.test.test_limit, meta.spec.input)?;
    let ev = in_pool(|| train::evaluate(&mut model, &test, meta.input_norm, a.batch_size))?;
    if let Some(path) = &predictions {
        let json = serde_json::to_vec(&ev.predictions).expect("predictions serialize");
        normlab::files::write_atomic(path, &json)?;
    }
    if a.json {
        let j = serde_json::json!({
            "checkpoint": a.checkpoint, "data": dir, "model": meta.spec.model, "norm": meta.spec.norm,
            "epoch": meta.epoch, "test_images": test.len(), "test_loss": ev.loss, "test_accuracy": ev.accuracy,
        });
        println!("{j}");
    } else {
        println!("data: {}", dir.display());
        println!(
            "model: {} ({}), norm {}",
            meta.spec.model,
            model.summary(),
            meta.spec.norm
        );
        println!(
            "test images {}  test loss {:.4}  test accuracy {:.4}",
            test.len(),
            ev.loss,
            ev.accuracy
        );
    }
    Ok(())
}
