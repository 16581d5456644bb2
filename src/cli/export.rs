//! `normlab export`: a checkpoint as an ONNX model (opset 21) that ONNX Runtime runs.

use std::path::PathBuf;

use clap::Args;

use normlab::checkpoint::load_model;
use normlab::files::{write_atomic, OutputGuard};
use normlab::Result;

#[derive(Args)]
#[command(
    after_long_help = "The graph's input 'image' is [N, C, H, W] pixels scaled to [0, 1] (any N); its first \
    nodes apply the training normalization, so a runtime feeds raw images. Output 'logits' [N, classes].\n\n\
    Examples:\n  normlab export --checkpoint runs/seed-cnn-bn/model.safetensors --out seed-cnn.onnx\n  \
    normlab export --checkpoint runs/vgg-bn/model.safetensors --out vgg-folded.onnx --fold"
)]
pub struct ExportArgs {
    /// A model.safetensors written by normlab (train, prune, fold); only read.
    #[arg(long, value_name = "FILE")]
    pub checkpoint: PathBuf,
    /// The ONNX file to write.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Fold every BatchNorm into the conv/linear layer before it first (fewer nodes).
    #[arg(long)]
    pub fold: bool,
    /// Replace an existing --out file.
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: ExportArgs) -> Result<()> {
    let out = OutputGuard::new(a.force).input(&a.checkpoint).file("--out", &a.out)?;
    let (mut model, meta) = load_model(&a.checkpoint)?;
    if a.fold {
        model = normlab::fold::fold(&mut model)?;
    }
    let exported = normlab::export::export(&model, &meta, a.fold)?;
    write_atomic(&out, &exported.bytes)?;
    outln!(
        "{} ({}, norm {}{}) -> {}",
        a.checkpoint.display(),
        meta.spec.model,
        meta.spec.norm,
        if a.fold { ", folded" } else { "" },
        a.out.display()
    )?;
    outln!(
        "ONNX opset {} (IR {}), {} nodes, {} initializers, {} bytes; parsed back and checked",
        normlab::export::OPSET,
        normlab::export::IR_VERSION,
        exported.nodes,
        exported.initializers,
        exported.bytes.len()
    )?;
    Ok(())
}
