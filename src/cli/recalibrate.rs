//! `normlab recalibrate`: exact population statistics for every BatchNorm (PreciseBN).

use std::path::PathBuf;

use clap::Args;

use normlab::Result;

use super::*;

#[derive(Args)]
#[command(
    after_long_help = "Example:\n  normlab recalibrate --checkpoint runs/seed-cnn-bn/model.safetensors \
    --batches 200 --out runs/seed-cnn-precise\n\nEvery running mean and variance becomes the equal-weight \
    average over N training batches (the variance: the average of the per-batch unbiased variances, as \
    torch.optim.swa_utils.update_bn leaves it), with all other layers in eval mode."
)]
pub struct RecalibrateArgs {
    /// A model.safetensors with BatchNorm running statistics (only read).
    #[arg(long, value_name = "FILE")]
    pub checkpoint: PathBuf,
    /// Training batches to average over.
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub batches: usize,
    /// Images per batch [default: 128].
    #[arg(long, value_name = "N", value_parser = at_least_one, default_value_t = 128)]
    pub batch_size: usize,
    /// Seed of the order the training images are drawn in [default: 0].
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Folder for the recalibrated model.safetensors and recalibrate.json.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Replace the outputs of an earlier run in --out.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub test: TestSetArgs,
}

pub fn run(a: RecalibrateArgs) -> Result<()> {
    init_threads(a.test.threads)?;
    let data = a.test.data_dir()?;
    let req = normlab::recalibrate::RecalibrateRequest {
        checkpoint: a.checkpoint.clone(),
        batches: a.batches,
        batch_size: a.batch_size,
        seed: a.seed,
        data: data.clone(),
        test_limit: a.test.test_limit,
        out: a.out.clone(),
        force: a.force,
    };
    let r = in_pool(|| normlab::recalibrate::run_recalibrate(&req))?;
    outln!("{}", r.data)?;
    outln!(
        "recalibrated {} norm layers of {} ({}) over {} batches of {} training images",
        r.norms_updated,
        r.model,
        r.norm,
        r.batches,
        r.batch_size
    )?;
    outln!("{:<28} {:>9} {:>9}", "", "test_loss", "test_acc")?;
    outln!(
        "{:<28} {:>9.4} {:>9.4}",
        "running statistics (before)",
        r.test_loss_before,
        r.test_accuracy_before
    )?;
    outln!(
        "{:<28} {:>9.4} {:>9.4}",
        "population statistics",
        r.test_loss_after,
        r.test_accuracy_after
    )?;
    outln!(
        "wrote {} and {}",
        r.recalibrated_checkpoint.display(),
        a.out.join("recalibrate.json").display()
    )?;
    Ok(())
}
