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
    /// Under mpirun: time the all-reduction of 4 KB to 64 MB of gradients between the
    /// processes (the communication of a data-parallel step against its size).
    #[arg(long)]
    pub all_reduce: bool,
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
    /// Time the kernels on this one shape instead of their table (and no training), as
    /// bench/kernels_vs_pytorch.py does to alternate with PyTorch shape by shape; each size 1 to
    /// 2^24, at most 2^26 values in all.
    #[arg(long, value_name = "N,C,H,W", value_parser = kernel_shape)]
    pub shape: Option<[usize; 4]>,
    /// Worker threads, 1 to 256 [default: one per core].
    #[arg(long, value_name = "N", value_parser = threads)]
    pub threads: Option<usize>,
    /// Time eval-mode inference of this checkpoint instead (repeatable): the median ms of one
    /// forward at each --batch-sizes, as bench/inference_vs_runtimes.py reads it.
    #[arg(long, value_name = "FILE")]
    pub inference: Vec<PathBuf>,
    /// With --inference: fold BatchNorm into the layers before timing.
    #[arg(long, requires = "inference")]
    pub fold: bool,
    /// With --inference: also print each layer's median time (where a forward's time goes).
    #[arg(long, requires = "inference")]
    pub layers: bool,
    /// With --inference: the batch sizes to time [default: 1,128].
    #[arg(long, value_name = "N,...", value_delimiter = ',', value_parser = at_least_one, requires = "inference")]
    pub batch_sizes: Vec<usize>,
}

/// `normlab bench --inference`: one row per checkpoint and batch size.
fn run_inference(a: &BenchArgs, json: Option<PathBuf>) -> Result<()> {
    let threads = init_threads(a.threads)?;
    let batches = if a.batch_sizes.is_empty() {
        vec![1, 128]
    } else {
        a.batch_sizes.clone()
    };
    let mut rows = Vec::new();
    // Every checkpoint loaded (and checked) before any timing; several are timed side by side.
    let mut models = Vec::with_capacity(a.inference.len());
    for path in &a.inference {
        let (mut model, _) = normlab::checkpoint::load_model(path)?;
        if a.fold {
            model = normlab::fold::fold(&mut model)?;
        }
        models.push(model);
    }
    let several = models.len() > 1;
    let turns = if several {
        format!(
            "; the checkpoints take turns, {} timed forwards each after an untimed one",
            normlab::bench::ROUND_FORWARDS
        )
    } else {
        String::new()
    };
    outln!(
        "threads {threads}; eval-mode forward, median of timed runs{}{turns}",
        if a.fold { ", BN folded" } else { "" }
    )?;
    outln!(
        "{:<50} {:>6} {:>10} {:>12}{}",
        "checkpoint",
        "batch",
        "ms",
        "images/s",
        if several { "  first/this" } else { "" }
    )?;
    for &b in &batches {
        let reps = a.reps.map(|r| r as usize).unwrap_or(if a.quick {
            5
        } else if b == 1 {
            200
        } else {
            30
        });
        let ms = in_pool(|| {
            let mut all: Vec<&mut normlab::models::Model> = models.iter_mut().collect();
            normlab::bench::inference_latencies(&mut all, b, reps)
        })?;
        for ((path, model), &ms_i) in a.inference.iter().zip(&mut models).zip(&ms) {
            let ratio = ms[0] / ms_i;
            let vs_first = if several {
                format!("  {ratio:>9.2}x")
            } else {
                String::new()
            };
            outln!(
                "{:<50} {:>6} {:>10.3} {:>12.0}{vs_first}",
                path.display(),
                b,
                ms_i,
                b as f64 * 1e3 / ms_i
            )?;
            if a.layers {
                for (layer, ms) in in_pool(|| normlab::bench::inference_layer_times(model, b, reps))? {
                    outln!("    {layer:<46} {ms:>17.3}")?;
                }
            }
            let mut row = serde_json::json!({
                "checkpoint": path, "model": model.spec.model, "norm": model.spec.norm,
                "folded": a.fold, "batch": b, "ms": ms_i, "threads": threads,
            });
            if several {
                row["first_over_this"] = serde_json::json!(ratio);
            }
            rows.push(row);
        }
    }
    if let Some(path) = json {
        let bytes = serde_json::to_vec_pretty(&rows).expect("rows serialize");
        normlab::files::write_atomic(&path, &bytes)?;
    }
    Ok(())
}

pub fn run(a: BenchArgs) -> Result<()> {
    let world = super::launch::world();
    if a.all_reduce {
        return run_all_reduce(&*world, a.quick);
    }
    if world.size() > 1 {
        let e = if world.rank() == 0 {
            Error::invalid("under mpirun, bench times --all-reduce only; run the other benchmarks as one process")
        } else {
            Error::OtherRank(0)
        };
        return Err(normlab::dist::stop_together(e));
    }
    // The checkpoints timed with --inference are inputs: never the --json output.
    let guard = a.inference.iter().fold(OutputGuard::new(a.force), |g, p| g.input(p));
    let json = a.json.as_ref().map(|p| guard.file("--json", p)).transpose()?;
    if !a.inference.is_empty() {
        return run_inference(&a, json);
    }
    let threads = init_threads(a.threads)?;
    // The memory copy, then the kernels and models, or with `--filter conv` the conv table.
    use normlab::bench::{CONV_ALGORITHMS, CONV_SHAPES, KERNELS, SHAPES, TOKEN_SHAPES, TRAINING_MODELS};
    let measured = if a.filter == "conv" {
        1 + CONV_SHAPES.len() * CONV_ALGORITHMS.len()
    } else if a.shape.is_some() {
        KERNELS.len()
    } else {
        KERNELS.len() * SHAPES.len() + 2 * TOKEN_SHAPES.len() + TRAINING_MODELS.len()
    };
    let total = (1 + measured) as u64;
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("bench [{bar:30}] {pos}/{len} {msg} ({per_sec}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let report = in_pool(|| {
        normlab::bench::run(a.quick, a.reps.map(|r| r as usize), &a.filter, a.shape, &mut |what| {
            bar.set_message(what.to_string());
            bar.inc(1);
        })
    });
    bar.finish_and_clear();
    let report = report?;
    outln!(
        "threads {threads}; memory copy {:.1} GB/s (read + write)",
        report.copy_gb_per_s
    )?;
    if !report.kernels.is_empty() {
        outln!(
            "{:<18} {:<18} {:>9} {:>9} {:>7} {:>9} {:>7}",
            "kernel",
            "shape (N,C,H,W)",
            "ms",
            "GB/s",
            "copy%",
            "stream ms",
            "of ms"
        )?;
    }
    for k in &report.kernels {
        let shape = format!("{:?}", k.shape);
        outln!(
            "{:<18} {:<18} {:>9.3} {:>9.1} {:>6.0}% {:>9.3} {:>6.0}%",
            k.kernel,
            shape,
            k.ms,
            k.gb_per_s,
            100.0 * k.copy_fraction,
            k.streams_ms,
            100.0 * k.streams_ms / k.ms
        )?;
    }
    if !report.kernels.is_empty() {
        outln!("copy%: GB/s over the 256 MiB copy's; stream ms: the same reads and writes as plain streams on tensors of the shape (y = x, then dx = x + dy), timed in blocks alternating with the kernel's, each side warm: the limit where they fit in cache; of ms: that over ms")?;
    }
    if let Some(peak) = report.gemm_peak_gflops {
        outln!("gemm peak {peak:.0} GFLOP/s (f32, square products of 512 to 1536, every thread); conv GFLOP/s count the direct algorithm's 2·N·C·OC·H·W·9 per pass")?;
        outln!(
            "{:<22} {:<12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>9} {:>6}",
            "conv (N,C,OC,H=W)",
            "algorithm",
            "fwd ms",
            "dW ms",
            "dx ms",
            "bwd ms",
            "fwd GF/s",
            "peak%",
            "bwd GF/s",
            "peak%"
        )?;
        for c in &report.convs {
            outln!(
                "{:<22} {:<12} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.0} {:>5.0}% {:>9.0} {:>5.0}%",
                format!("{:?}", c.shape),
                c.algorithm,
                c.forward_ms,
                c.weight_grad_ms,
                c.backward_ms - c.weight_grad_ms,
                c.backward_ms,
                c.forward_gflops,
                100.0 * c.forward_gflops / peak,
                c.backward_gflops,
                100.0 * c.backward_gflops / peak
            )?;
        }
    }
    for t in &report.training {
        outln!(
            "training {:<30} {:<6} batch {:>4}: {:>8.0} images/s",
            t.model,
            t.norm,
            t.batch_size,
            t.images_per_sec
        )?;
    }
    if let Some(path) = &json {
        let bytes = serde_json::to_vec_pretty(&report).expect("report serializes");
        normlab::files::write_atomic(path, &bytes)?;
        outln!("wrote {}", path.display())?;
    }
    Ok(())
}

/// `bench --all-reduce`: seconds per all-reduction by size, with the bandwidth a ring
/// all-reduce would need for it (each process sends and receives 2(K-1)/K of the buffer).
fn run_all_reduce(comm: &dyn normlab::dist::Communicator, quick: bool) -> Result<()> {
    let sizes: Vec<usize> = (10..=24).step_by(2).map(|p| 1usize << p).collect();
    let reps = if quick { 5 } else { 30 };
    let rows = normlab::train::data_parallel::all_reduce_timings(comm, &sizes, reps);
    if comm.rank() == 0 {
        let k = comm.size() as f64;
        outln!(
            "all-reduce of f32 sums over {} processes (median of {reps})",
            comm.size()
        )?;
        outln!("{:>12}  {:>12}  {:>16}", "bytes", "ms", "ring GB/s each")?;
        for (n, secs) in rows {
            let bytes = (n * 4) as f64;
            let ring = 2.0 * (k - 1.0) / k * bytes / secs / 1e9;
            outln!("{:>12}  {:>12.4}  {:>16.2}", n * 4, secs * 1e3, ring)?;
        }
    }
    Ok(())
}

/// `--shape N,C,H,W`: four sizes of 1 to 2^24, at most 2^26 values in all (the kernel and its
/// streams reference hold eight tensors of the shape: 2 GiB at most).
fn kernel_shape(s: &str) -> std::result::Result<[usize; 4], String> {
    let sizes: Vec<usize> = s
        .split(',')
        .map(|v| v.trim().parse::<usize>().ok().filter(|n| (1..=1 << 24).contains(n)))
        .collect::<Option<_>>()
        .ok_or("must be four whole numbers N,C,H,W, each from 1 to 16777216")?;
    let shape: [usize; 4] = sizes
        .try_into()
        .map_err(|_| "must be four whole numbers N,C,H,W, each from 1 to 16777216")?;
    if shape
        .iter()
        .try_fold(1usize, |p, &n| p.checked_mul(n))
        .is_none_or(|p| p > 1 << 26)
    {
        return Err("has more than 2^26 values (67108864): pass a smaller shape".into());
    }
    Ok(shape)
}
