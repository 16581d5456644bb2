//! `normlab bench`: the norm kernels and end-to-end training on this machine.

use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use normlab::files::OutputGuard;
use normlab::Result;

use super::*;

#[derive(Args)]
#[command(after_long_help = "Example:\n  normlab bench --filter bn_train --reps 30 --json bench.json")]
pub struct BenchArgs {
    /// Also write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Replace an existing --json file.
    #[arg(long)]
    pub force: bool,
    /// Fewer repetitions (a rough look in seconds).
    #[arg(long)]
    pub quick: bool,
    /// Timed repetitions per kernel, 1 to 100000 (the median is reported) [default: 15, or 3 with --quick].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=100000))]
    pub reps: Option<u64>,
    /// Only the kernels or models whose name contains this (e.g. bn_train, gn, training) [default: all].
    #[arg(long, default_value = "")]
    pub filter: String,
    /// Worker threads, 1 to 256 [default: one per core].
    #[arg(long, value_name = "N", value_parser = threads)]
    pub threads: Option<usize>,
}

pub fn run(a: BenchArgs) -> Result<()> {
    let json = a
        .json
        .as_ref()
        .map(|p| OutputGuard::new(a.force).file("--json", p))
        .transpose()?;
    let threads = init_threads(a.threads)?;
    let total = (normlab::bench::KERNELS.len() * normlab::bench::SHAPES.len() + 3) as u64;
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("bench [{bar:30}] {pos}/{len} {msg} ({per_sec}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let report = in_pool(|| {
        normlab::bench::run(a.quick, a.reps.map(|r| r as usize), &a.filter, &mut |what| {
            bar.set_message(what.to_string());
            bar.inc(1);
        })
    });
    bar.finish_and_clear();
    let report = report?;
    println!(
        "threads {threads}; memory copy {:.1} GB/s (read + write)",
        report.copy_gb_per_s
    );
    println!(
        "{:<18} {:<18} {:>9} {:>9} {:>7}",
        "kernel", "shape (N,C,H,W)", "ms", "GB/s", "copy%"
    );
    for k in &report.kernels {
        let shape = format!("{:?}", k.shape);
        println!(
            "{:<18} {:<18} {:>9.3} {:>9.1} {:>6.0}%",
            k.kernel,
            shape,
            k.ms,
            k.gb_per_s,
            100.0 * k.copy_fraction
        );
    }
    for t in &report.training {
        println!(
            "training {:<30} batch {:>4}: {:>8.0} images/s",
            t.model, t.batch_size, t.images_per_sec
        );
    }
    if let Some(path) = &json {
        let bytes = serde_json::to_vec_pretty(&report).expect("report serializes");
        normlab::files::write_atomic(path, &bytes)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
