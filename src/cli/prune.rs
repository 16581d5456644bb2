//! `normlab prune`: network slimming by BN |γ|, with optional fine-tuning.

use std::path::PathBuf;

use clap::Args;

use normlab::slimming::PruneReport;
use normlab::Result;

use super::*;

#[derive(Args)]
#[command(
    after_long_help = "Example:\n  normlab prune --checkpoint runs/vgg-slim/model.safetensors --percent 0.5 \
    --finetune 4 --out runs/vgg-p50\n  (the result is then runs/vgg-p50/finetune/model.safetensors; \
    `normlab train --resume runs/vgg-p50/finetune` fine-tunes further)"
)]
pub struct PruneArgs {
    /// A model.safetensors of seed-cnn, vgg or resnet with BatchNorm (e.g. trained with --sparsity); only read.
    #[arg(long, value_name = "FILE")]
    pub checkpoint: PathBuf,
    /// Fraction of all BN channels to remove, in [0, 1): one global |γ| threshold.
    #[arg(long, value_parser = fraction)]
    pub percent: f64,
    /// Round every layer's kept channels up to a multiple of N (at most its width), taking back
    /// its largest |γ| among those removed: widths the kernels run at full speed [default: 1].
    #[arg(long, value_name = "N", value_parser = at_least_one, default_value_t = 1)]
    pub multiple_of: usize,
    /// Fine-tune the pruned model for N epochs with the original run's settings, into DIR/finetune.
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub finetune: Option<usize>,
    /// Folder for the pruned model.safetensors, prune.json, gamma.svg and finetune/.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Replace the outputs of an earlier prune in --out.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub test: TestSetArgs,
}

fn print_pruned(r: &PruneReport) -> Result<()> {
    outln!(
        "pruned {} -> {} (threshold |γ| <= {:.5})",
        r.model_before,
        r.model_after,
        r.plan.threshold.max(0.0)
    )?;
    outln!("{:<8} {:<8} {:>8} {:>8}", "conv", "bn", "before", "after")?;
    for l in &r.plan.layers {
        outln!("{:<8} {:<8} {:>8} {:>8}", l.conv, l.bn, l.before, l.after)?;
    }
    let pct = |b: usize, a: usize| 100.0 * (1.0 - a as f64 / b.max(1) as f64);
    outln!(
        "parameters {} -> {} (-{:.1}%)",
        r.parameters_before,
        r.parameters_after,
        pct(r.parameters_before, r.parameters_after)
    )?;
    outln!(
        "FLOPs/image {} -> {} (-{:.1}%)",
        r.flops_before,
        r.flops_after,
        pct(r.flops_before, r.flops_after)
    )?;
    outln!(
        "test accuracy ({} images): before {:.4}, after pruning {:.4}",
        r.test_images,
        r.accuracy_before,
        r.accuracy_after_prune
    )?;
    print_latency(&r.latency, "before ms", "after ms")?;
    outln!("wrote {}", r.pruned_checkpoint.display())
}

pub fn run(a: PruneArgs) -> Result<()> {
    init_threads(a.test.threads)?;
    let data = a.test.data_dir()?;
    let req = normlab::slimming::PruneRequest {
        checkpoint: a.checkpoint.clone(),
        percent: a.percent,
        multiple_of: a.multiple_of,
        finetune: a.finetune,
        out: a.out.clone(),
        data: Some(data.clone()),
        test_limit: a.test.test_limit,
        force: a.force,
    };
    let finetune = a.finetune;
    let r = in_pool(|| {
        normlab::slimming::run_prune(&req, &mut CliReporter::default(), &mut |r| {
            outln!("{}", r.data)?;
            print_pruned(r)?;
            if let Some(n) = finetune {
                outln!("\nfine-tuning the pruned model for {n} epochs:")?;
            }
            Ok(())
        })
    })?;
    match (&r.finetune_checkpoint, r.accuracy_after_finetune) {
        (Some(ckpt), Some(acc)) => outln!(
            "result: {} (fine-tuned; test accuracy {:.4}, {:.4} right after pruning, {:.4} before)",
            ckpt.display(),
            acc,
            r.accuracy_after_prune,
            r.accuracy_before
        )?,
        _ => outln!(
            "result: {} (not fine-tuned; test accuracy {:.4})",
            r.pruned_checkpoint.display(),
            r.accuracy_after_prune
        )?,
    }
    Ok(())
}
