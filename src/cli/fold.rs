//! `normlab fold`: BatchNorm folded into the conv/linear layer before it.

use std::path::PathBuf;

use clap::Args;

use normlab::Result;

use super::*;

#[derive(Args)]
#[command(
    after_long_help = "Example:\n  normlab fold --checkpoint runs/seed-cnn-bn/model.safetensors --out runs/seed-cnn-folded"
)]
pub struct FoldArgs {
    /// A model.safetensors written by `normlab train` (only read).
    #[arg(long, value_name = "FILE")]
    pub checkpoint: PathBuf,
    /// Folder for the folded model.safetensors and fold.json.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Replace the outputs of an earlier run in --out.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub test: TestSetArgs,
}

pub fn run(a: FoldArgs) -> Result<()> {
    init_threads(a.test.threads)?;
    let data = a.test.data_dir()?;
    let req = normlab::fold::FoldRequest {
        checkpoint: a.checkpoint.clone(),
        out: a.out.clone(),
        data: Some(data.clone()),
        test_limit: a.test.test_limit,
        force: a.force,
    };
    let r = in_pool(|| normlab::fold::run_fold(&req))?;
    outln!("{}", r.data)?;
    outln!("folded {} ({}) -> {}", r.model, r.layers, r.folded_checkpoint.display())?;
    outln!(
        "largest |logit difference| over {} test images: {:.3e}",
        r.test_images,
        r.max_abs_logit_difference
    )?;
    outln!("folded test accuracy {:.4}", r.folded_test_accuracy)?;
    print_latency(&r.latency, "unfolded ms", "folded ms")?;
    outln!("wrote {}", a.out.join("fold.json").display())?;
    Ok(())
}
