//! The `normlab` command: a thin layer over the library. Parsing, progress bars, printing.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use normlab::checkpoint::load_model;
use normlab::optim::{OptimizerConfig, OptimizerKind, Schedule};
use normlab::train::{self, EpochMetrics, Reporter, Start, TrainConfig};
use normlab::Result;

#[derive(Parser)]
#[command(
    name = "normlab",
    version,
    about = "Batch Normalization and its relatives in CNN training"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model on MNIST-format data (Fashion-MNIST by default).
    #[command(allow_negative_numbers = true)]
    Train(TrainArgs),
    /// Evaluate a checkpoint on the test set in eval mode (running statistics).
    Eval(EvalArgs),
    /// Fold every eval-mode BatchNorm into the conv/linear layer before it.
    Fold(FoldArgs),
    /// Run a study (batch-size, learning-rate, regularization, ics, landscape): tables, plots, report.html.
    Study(StudyArgs),
    /// Run any grid of models x norms x batch sizes x learning rates x seeds.
    Compare(CompareArgs),
    /// Rebuild the CSV, plots and report.html of a study folder from its results.json.
    Report(ReportArgs),
    /// List every --norm spec with what it does.
    Norms,
    /// Network slimming: remove the channels with the smallest BN |γ|, optionally fine-tune.
    #[command(allow_negative_numbers = true)]
    Prune(PruneArgs),
    /// Time the norm kernels and end-to-end training on this machine.
    Bench(BenchArgs),
    /// Run one normalization layer on tensors from a safetensors file (conformance checks).
    Layer(LayerArgs),
}

#[derive(Args)]
struct StudyArgs {
    /// batch-size, learning-rate, regularization, ics or landscape.
    name: String,
    /// A small version that finishes in about two minutes.
    #[arg(long)]
    quick: bool,
    /// Seeds per configuration (tables and plots show mean and spread).
    #[arg(long, default_value_t = 1)]
    seeds: usize,
    /// Results folder [default: studies/<name>, never overwriting an earlier one].
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Args)]
struct CompareArgs {
    /// Models separated by ';' (or ',' when no model contains a comma): 'seed-cnn;vgg:16,M,32,M'.
    #[arg(long, default_value = "seed-cnn")]
    models: String,
    /// Norm specs separated by ',' or, when a spec has options, ';': 'bn;gn:8,eps=1e-3;none'.
    #[arg(long, default_value = "bn,none")]
    norms: String,
    #[arg(long, default_value = "128")]
    batch_sizes: String,
    #[arg(long, default_value = "0.001")]
    lrs: String,
    #[arg(long, default_value_t = 1)]
    seeds: usize,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    #[arg(long, default_value = "adam")]
    optimizer: OptimizerKind,
    #[arg(long)]
    train_limit: Option<usize>,
    #[arg(long)]
    test_limit: Option<usize>,
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Args)]
struct ReportArgs {
    /// A folder written by `normlab study` or `normlab compare`.
    dir: PathBuf,
}

/// The test set a checkpoint command evaluates on, and its thread count.
#[derive(Args)]
struct TestSetArgs {
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long)]
    test_limit: Option<usize>,
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Args)]
struct PruneArgs {
    /// A model.safetensors of seed-cnn or vgg with BatchNorm (e.g. trained with --sparsity).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Fraction of all BN channels to remove, in [0, 1): one global |γ| threshold.
    #[arg(long)]
    percent: f64,
    /// Fine-tune the pruned model for this many epochs (the original run's settings).
    #[arg(long)]
    finetune: Option<usize>,
    /// Folder for model.safetensors (pruned), prune.json, gamma.svg and finetune/.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    test: TestSetArgs,
}

#[derive(Args)]
struct FoldArgs {
    /// A model.safetensors written by `normlab train`.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Folder for the folded model.safetensors and fold.json.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    test: TestSetArgs,
}

#[derive(Args)]
struct BenchArgs {
    /// Also write the results as JSON to FILE.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Fewer repetitions (a rough look in seconds).
    #[arg(long)]
    quick: bool,
    /// Timed repetitions per kernel (the median is reported); default 15, or 3 with --quick.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100000))]
    reps: Option<u64>,
    /// Only the kernels or models whose name contains this (e.g. bn_train, gn, training).
    #[arg(long, default_value = "")]
    filter: String,
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Args)]
struct LayerArgs {
    /// A --norm spec, e.g. bn, gn:4, layernorm, in:affine=true.
    #[arg(long)]
    spec: String,
    /// Safetensors with `x` and optionally `dy`, `weight`, `bias`, `running_mean`,
    /// `running_var`, `num_batches_tracked`.
    #[arg(long)]
    input: PathBuf,
    /// Where to write `y` (and `dx`, `dweight`, `dbias` when `dy` is given) and the buffers.
    #[arg(long)]
    output: PathBuf,
    /// Forward in eval mode (running statistics).
    #[arg(long)]
    eval: bool,
}

#[derive(Args)]
struct TrainArgs {
    /// seed-cnn, mlp, or vgg[:cfg] (cfg like 32,32,M,64,64,M,128,128,M).
    #[arg(long, default_value = "seed-cnn")]
    model: String,
    /// Normalization after each conv/linear layer: bn[:opts] or none.
    #[arg(long, default_value = "bn")]
    norm: String,
    /// Number of epochs [default: 10].
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    #[arg(long, default_value = "adam")]
    optimizer: OptimizerKind,
    /// Learning rate [default: 1e-3 for adam/adamw, 0.01 for sgd].
    #[arg(long)]
    lr: Option<f64>,
    /// SGD momentum, or Adam's beta1.
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    /// Nesterov momentum (SGD only).
    #[arg(long)]
    nesterov: bool,
    /// L2 penalty (SGD, Adam) or decoupled decay (AdamW).
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Exempt norm parameters (gamma, beta) and biases from weight decay.
    #[arg(long)]
    no_decay_norm_bias: bool,
    #[arg(long, default_value = "constant")]
    schedule: Schedule,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Worker threads [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Train on the first N training images only.
    #[arg(long)]
    train_limit: Option<usize>,
    /// Evaluate on the first N test images only.
    #[arg(long)]
    test_limit: Option<usize>,
    /// Folder with the IDX files [default: $NORMLAB_DATA, ./data/fashion-mnist,
    /// /usr/share/datasets/fashion-mnist].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Run folder [default: runs/<model>-<norm>, never overwriting an earlier run].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in this folder where it stopped (its config is reused; --epochs and
    /// --threads may be given).
    #[arg(long, conflicts_with = "out")]
    resume: Option<PathBuf>,
    /// Network slimming: add LAMBDA·sign(γ) to the gradient of every BN scale γ.
    #[arg(long, default_value_t = 0.0)]
    sparsity: f64,
    /// Initial value of every BN scale γ (slimming uses 0.5; PyTorch's default is 1).
    #[arg(long)]
    gamma_init: Option<f32>,
    /// Dropout probability before the classifier.
    #[arg(long, default_value_t = 0.0)]
    dropout: f32,
    /// Multiply every conv/linear weight after initialization by this (init-sensitivity studies).
    #[arg(long)]
    init_scale: Option<f32>,
}

#[derive(Args)]
struct EvalArgs {
    /// A model.safetensors written by `normlab train`.
    #[arg(long)]
    checkpoint: PathBuf,
    #[command(flatten)]
    test: TestSetArgs,
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Write the predicted class of every test image to FILE as a JSON array.
    #[arg(long)]
    predictions: Option<PathBuf>,
    /// Fold BatchNorm into the layers before it first, and evaluate the folded model.
    #[arg(long)]
    fold: bool,
}

fn init_threads(threads: Option<usize>) -> Result<usize> {
    let n = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if n == 0 {
        return Err(normlab::Error::invalid("--threads must be at least 1"));
    }
    // Only the first call in a process sets the pool; later ones keep it.
    let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
    Ok(n)
}

/// Runs `f` on a worker of the global pool: parallel kernels then start from inside the pool,
/// where an idle worker steals at once, instead of waking the whole pool from outside per call.
fn in_pool<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    let mut out = None;
    rayon::scope(|s| s.spawn(|_| out = Some(f())));
    out.expect("the scope ran the job")
}

/// Progress bars and one table row per epoch.
struct CliReporter {
    bar: Option<ProgressBar>,
}

impl Reporter for CliReporter {
    fn epoch_start(&mut self, epoch: usize, epochs: usize, batches: usize) {
        let bar = ProgressBar::new(batches as u64);
        bar.set_style(
            ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} batches {msg} ({elapsed})")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("{epoch}/{epochs}"));
        bar.enable_steady_tick(Duration::from_millis(250));
        self.bar = Some(bar);
    }

    fn batch(&mut self, mean_loss: f64, images_per_sec: f64) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("loss {mean_loss:.4}  {images_per_sec:.0} img/s"));
            bar.inc(1);
        }
    }

    fn epoch_end(&mut self, m: &EpochMetrics) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        println!(
            "{:>5}  {:>9.2e}  {:>10.4}  {:>9.4}  {:>9.4}  {:>8.4}  {:>7.1}  {:>8.0}",
            m.epoch, m.lr, m.train_loss, m.train_accuracy, m.test_loss, m.test_accuracy, m.seconds, m.images_per_sec
        );
    }
}

fn run_train(a: TrainArgs) -> Result<()> {
    let (start, out) = match &a.resume {
        Some(dir) => {
            let threads = a.threads.map(|t| init_threads(Some(t))).transpose()?;
            if threads.is_none() {
                // The stored thread count applies; read it back for the pool.
                let m = std::fs::read_to_string(dir.join("metrics.json")).ok();
                let stored = m.and_then(|t| serde_json::from_str::<train::RunMetrics>(&t).ok());
                init_threads(stored.map(|s| s.config.threads))?;
            }
            (
                Start::Resume {
                    epochs: a.epochs,
                    threads,
                },
                dir.clone(),
            )
        }
        None => {
            let threads = init_threads(a.threads)?;
            let lr =
                a.lr.unwrap_or(if a.optimizer == OptimizerKind::Sgd { 0.01 } else { 1e-3 });
            let config = TrainConfig {
                model: a.model.clone(),
                norm: a.norm.clone(),
                epochs: a.epochs.unwrap_or(10),
                batch_size: a.batch_size,
                optimizer: OptimizerConfig {
                    kind: a.optimizer,
                    lr,
                    momentum: a.momentum,
                    nesterov: a.nesterov,
                    weight_decay: a.weight_decay,
                    no_decay_norm_and_bias: a.no_decay_norm_bias,
                    ..OptimizerConfig::default()
                },
                schedule: a.schedule,
                seed: a.seed,
                threads,
                train_limit: a.train_limit,
                test_limit: a.test_limit,
                data: a.data.clone(),
                sparsity: a.sparsity,
                gamma_init: a.gamma_init,
                init_from: None,
                dropout: a.dropout,
                init_scale: a.init_scale,
            };
            config.validate()?;
            let name = format!(
                "{}-{}",
                a.model.replace([':', ','], "_"),
                a.norm.replace([':', ',', '='], "_")
            );
            let out = a
                .out
                .clone()
                .unwrap_or_else(|| train::fresh_run_dir(&PathBuf::from("runs"), &name));
            (Start::Fresh(Box::new(config)), out)
        }
    };
    println!("run folder: {}", out.display());
    println!(
        "{:>5}  {:>9}  {:>10}  {:>9}  {:>9}  {:>8}  {:>7}  {:>8}",
        "epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds", "img/s"
    );
    let m = in_pool(|| train::train(start, &out, &mut CliReporter { bar: None }))?;
    println!(
        "done: test accuracy {:.4}, test loss {:.4}, {:.0} training images/s; wrote {}",
        m.test_accuracy,
        m.test_loss,
        m.train_images_per_sec,
        out.display()
    );
    Ok(())
}

fn run_eval(a: EvalArgs) -> Result<()> {
    init_threads(a.test.threads)?;
    if a.batch_size == 0 {
        return Err(normlab::Error::invalid("--batch-size must be at least 1"));
    }
    let (mut model, meta) = load_model(&a.checkpoint)?;
    if a.fold {
        model = normlab::fold::fold(&mut model)?;
    }
    let test = normlab::data::load_test_for(a.test.data.as_deref(), a.test.test_limit, meta.spec.input)?;
    let ev = in_pool(|| train::evaluate(&mut model, &test, meta.input_norm, a.batch_size))?;
    let (loss, acc) = (ev.loss, ev.accuracy);
    if let Some(path) = &a.predictions {
        let json = serde_json::to_vec(&ev.predictions).expect("predictions serialize");
        normlab::checkpoint::write_atomic(path, &json)?;
    }
    if a.json {
        let j = serde_json::json!({
            "checkpoint": a.checkpoint, "model": meta.spec.model, "norm": meta.spec.norm,
            "epoch": meta.epoch, "test_images": test.len(), "test_loss": loss, "test_accuracy": acc,
        });
        println!("{j}");
    } else {
        println!(
            "model: {} ({}), norm {}",
            meta.spec.model,
            model.summary(),
            meta.spec.norm
        );
        println!(
            "test images {}  test loss {loss:.4}  test accuracy {acc:.4}",
            test.len()
        );
    }
    Ok(())
}

/// The first table and the finding, as the study's summary on screen.
fn print_analysis(a: &normlab::studies::analysis::Analysis) {
    println!("{}", a.title);
    if let Some(t) = a.tables.first() {
        println!("{}", t.caption);
        let widths: Vec<usize> = (0..t.header.len())
            .map(|i| {
                t.rows
                    .iter()
                    .map(|r| r[i].chars().count())
                    .chain([t.header[i].chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: &[String]| {
            cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:>w$}"))
                .collect::<Vec<_>>()
                .join("  ")
        };
        println!("{}", line(&t.header));
        for r in &t.rows {
            println!("{}", line(r));
        }
    }
    println!("finding: {}", a.finding);
}

/// A progress bar over a study's runs.
fn run_bar() -> ProgressBar {
    let bar = ProgressBar::new(1);
    bar.set_style(
        ProgressStyle::with_template("runs [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(500));
    bar
}

fn run_study(a: StudyArgs) -> Result<()> {
    let threads = init_threads(a.threads)?;
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| train::fresh_run_dir(&PathBuf::from("studies"), &a.name));
    let opts = normlab::studies::StudyOptions {
        quick: a.quick,
        seeds: a.seeds,
        out: out.clone(),
        data: a.data.clone(),
        threads,
    };
    let bar = run_bar();
    let results = in_pool(|| {
        normlab::studies::run_study(&a.name, &opts, &mut |i, n, what| {
            bar.set_length(n as u64);
            bar.set_position(i as u64);
            bar.set_message(what.to_string());
        })
    });
    bar.finish_and_clear();
    let results = results?;
    let an = normlab::studies::analysis::analyze(&results)?;
    print_analysis(&an);
    let n = results.runs.len() + results.ics.len() + results.landscape.len();
    println!(
        "{n} runs in {:.0} s; wrote {}",
        results.seconds,
        out.join("report.html").display()
    );
    Ok(())
}

fn split_list(s: &str) -> Vec<String> {
    let sep = if s.contains(';') { ';' } else { ',' };
    s.split(sep)
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

fn run_compare(a: CompareArgs) -> Result<()> {
    let threads = init_threads(a.threads)?;
    let parse_list = |what: &str, s: &str| -> Result<Vec<f64>> {
        split_list(s)
            .iter()
            .map(|t| {
                t.parse::<f64>()
                    .map_err(|_| normlab::Error::invalid(format!("--{what}: '{t}' is not a number")))
            })
            .collect()
    };
    let batch_sizes: Vec<usize> = parse_list("batch-sizes", &a.batch_sizes)?
        .iter()
        .map(|&b| b as usize)
        .collect();
    let base = TrainConfig {
        epochs: a.epochs,
        optimizer: OptimizerConfig {
            kind: a.optimizer,
            lr: 1e-3,
            ..OptimizerConfig::default()
        },
        threads,
        train_limit: a.train_limit,
        test_limit: a.test_limit,
        data: a.data.clone(),
        ..TrainConfig::default()
    };
    let grid = normlab::studies::CompareGrid {
        models: split_list(&a.models),
        norms: split_list(&a.norms),
        batch_sizes,
        lrs: parse_list("lrs", &a.lrs)?,
        base,
    };
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| train::fresh_run_dir(&PathBuf::from("studies"), "compare"));
    let bar = run_bar();
    let results = in_pool(|| {
        normlab::studies::run_compare(&grid, a.seeds, &out, &mut |i, n, what| {
            bar.set_length(n as u64);
            bar.set_position(i as u64);
            bar.set_message(what.to_string());
        })
    });
    bar.finish_and_clear();
    let an = normlab::studies::analysis::analyze(&results?)?;
    print_analysis(&an);
    println!("wrote {}", out.join("report.html").display());
    Ok(())
}

fn run_prune(a: PruneArgs) -> Result<()> {
    init_threads(a.test.threads)?;
    let req = normlab::slimming::PruneRequest {
        checkpoint: a.checkpoint.clone(),
        percent: a.percent,
        finetune: a.finetune.filter(|&e| e > 0),
        out: a.out.clone(),
        data: a.test.data.clone(),
        test_limit: a.test.test_limit,
    };
    let r = in_pool(|| normlab::slimming::run_prune(&req, &mut CliReporter { bar: None }))?;
    println!(
        "pruned {} -> {} (threshold |γ| <= {:.5})",
        r.model_before,
        r.model_after,
        r.plan.threshold.max(0.0)
    );
    println!("{:<8} {:<8} {:>8} {:>8}", "conv", "bn", "before", "after");
    for l in &r.plan.layers {
        println!("{:<8} {:<8} {:>8} {:>8}", l.conv, l.bn, l.before, l.after);
    }
    let pct = |b: usize, a: usize| 100.0 * (1.0 - a as f64 / b.max(1) as f64);
    println!(
        "parameters {} -> {} (-{:.1}%)",
        r.parameters_before,
        r.parameters_after,
        pct(r.parameters_before, r.parameters_after)
    );
    println!(
        "FLOPs/image {} -> {} (-{:.1}%)",
        r.flops_before,
        r.flops_after,
        pct(r.flops_before, r.flops_after)
    );
    print!(
        "test accuracy ({} images): before {:.4}, after pruning {:.4}",
        r.test_images, r.accuracy_before, r.accuracy_after_prune
    );
    match r.accuracy_after_finetune {
        Some(f) => println!(", after fine-tuning {f:.4}"),
        None => println!(),
    }
    print_latency(&r.latency, "before ms", "after ms");
    println!(
        "wrote {} and {}",
        r.pruned_checkpoint.display(),
        a.out.join("prune.json").display()
    );
    Ok(())
}

fn run_fold(a: FoldArgs) -> Result<()> {
    init_threads(a.test.threads)?;
    let req = normlab::fold::FoldRequest {
        checkpoint: a.checkpoint.clone(),
        out: a.out.clone(),
        data: a.test.data.clone(),
        test_limit: a.test.test_limit,
    };
    let r = in_pool(|| normlab::fold::run_fold(&req))?;
    println!("folded {} ({}) -> {}", r.model, r.layers, r.folded_checkpoint.display());
    println!(
        "largest |logit difference| over {} test images: {:.3e}",
        r.test_images, r.max_abs_logit_difference
    );
    println!("folded test accuracy {:.4}", r.folded_test_accuracy);
    print_latency(&r.latency, "unfolded ms", "folded ms");
    println!("wrote {}", a.out.join("fold.json").display());
    Ok(())
}

/// Before/after inference latency as a table.
fn print_latency(rows: &[normlab::bench::Latency], before: &str, after: &str) {
    println!("{:>6} {before:>13} {after:>11} {:>8}", "batch", "speedup");
    for l in rows {
        println!(
            "{:>6} {:>13.3} {:>11.3} {:>7.2}x",
            l.batch, l.before_ms, l.after_ms, l.speedup
        );
    }
}

fn run_bench(a: BenchArgs) -> Result<()> {
    let threads = init_threads(a.threads)?;
    let total = (normlab::bench::KERNELS.len() * normlab::bench::SHAPES.len() + 3) as u64;
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("bench [{bar:30}] {pos}/{len} {msg} ({per_sec})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let report = in_pool(|| {
        normlab::bench::run(a.quick, a.reps.map(|r| r as usize), &a.filter, &mut |what| {
            bar.set_message(what.to_string());
            bar.inc(1);
        })
    })?;
    bar.finish_and_clear();
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
    if let Some(path) = &a.json {
        let json = serde_json::to_vec_pretty(&report).expect("report serializes");
        normlab::checkpoint::write_atomic(path, &json)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(a) => run_train(a),
        Command::Eval(a) => run_eval(a),
        Command::Norms => {
            for (spec, what) in normlab::nn::norm_spec::CATALOG {
                println!("{spec:<10} {what}");
            }
            Ok(())
        }
        Command::Bench(a) => run_bench(a),
        Command::Fold(a) => run_fold(a),
        Command::Prune(a) => run_prune(a),
        Command::Study(a) => run_study(a),
        Command::Compare(a) => run_compare(a),
        Command::Report(a) => normlab::studies::report::rebuild(&a.dir).map(|an| {
            print_analysis(&an);
            println!("rebuilt {}", a.dir.join("report.html").display());
        }),
        Command::Layer(a) => normlab::conformance::layer_command(&a.spec, &a.input, &a.output, a.eval).map(|n| {
            println!("wrote {} tensors to {}", n, a.output.display());
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
