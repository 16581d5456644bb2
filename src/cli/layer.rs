//! `normlab layer`: one normalization layer on tensors from a safetensors file.

use std::path::PathBuf;

use clap::Args;

use normlab::files::OutputGuard;
use normlab::Result;

#[derive(Args)]
#[command(after_long_help = "Example:\n  normlab layer --spec gn:4 --input in.safetensors --output out.safetensors")]
pub struct LayerArgs {
    /// A --norm spec, e.g. bn, gn:4, layernorm, in:affine=true (`normlab norms` lists them).
    #[arg(long, value_name = "SPEC", value_parser = super::norm_spec)]
    pub spec: normlab::nn::norm_spec::NormSpec,
    /// Safetensors with `x` ([N, C] or [N, C, H, W]) and optionally `dy`, `weight`, `bias`,
    /// `running_mean`, `running_var`, `num_batches_tracked`.
    #[arg(long, value_name = "FILE")]
    pub input: PathBuf,
    /// Where to write `y` (and `dx`, `dweight`, `dbias` when `dy` is given) and the buffers.
    #[arg(long, value_name = "FILE")]
    pub output: PathBuf,
    /// Replace an existing --output file (never the --input).
    #[arg(long)]
    pub force: bool,
    /// Forward in eval mode (running statistics).
    #[arg(long)]
    pub eval: bool,
}

pub fn run(a: LayerArgs) -> Result<()> {
    let output = OutputGuard::new(a.force).input(&a.input).file("--output", &a.output)?;
    let n = normlab::conformance::layer_command(a.spec, &a.input, &output, a.eval)?;
    outln!("wrote {n} tensors to {}", a.output.display())?;
    Ok(())
}
