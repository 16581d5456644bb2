//! The `normlab` command line: one file per subcommand, each parsing its flags, calling the
//! library and printing; no math here. This file holds what several subcommands share.

/// `println!` that returns `Err(Error::Output)` when standard output is full or closed instead
/// of panicking; use as `outln!(...)?`.
macro_rules! outln {
    () => {
        $crate::cli::write_out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

pub mod bench;
pub mod compare;
pub mod data;
pub mod eval;
pub mod export;
pub mod fold;
pub mod launch;
pub mod layer;
pub mod norms;
pub mod prune;
pub mod recalibrate;
pub mod report;
pub mod study;
pub mod train;

use std::path::{Path, PathBuf};

use clap::Args;
use indicatif::ProgressBar;

use normlab::train::{EpochMetrics, LoaderProgress, Reporter, RunMetrics};
use normlab::{Error, Result};

/// Writes to standard output; a full disk or closed pipe becomes `Error::Output`.
pub fn write_out(args: std::fmt::Arguments) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_fmt(args).and_then(|()| out.flush()).map_err(Error::Output)
}

/// More threads than this only cost time on any machine normlab is meant for.
pub const MAX_THREADS: usize = 256;

/// Sets the global thread pool once: `threads` workers, or one per core.
pub fn init_threads(threads: Option<usize>) -> Result<usize> {
    let n = threads.unwrap_or_else(launch::default_threads);
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| Error::invalid(format!("--threads {n}: cannot start the worker threads ({e})")))?;
    Ok(n)
}

/// Runs `f` on a worker of the global pool: parallel kernels then start from inside the pool,
/// where an idle worker steals at once, instead of waking the whole pool from outside per call.
pub fn in_pool<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    let mut out = None;
    rayon::scope(|s| s.spawn(|_| out = Some(f())));
    out.expect("the scope ran the job")
}

// Value parsers: a bad value is refused by clap with the flag's name in the message.

pub fn threads(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=MAX_THREADS).contains(&n) => Ok(n),
        _ => Err(format!("must be a whole number from 1 to {MAX_THREADS}")),
    }
}

pub fn at_least_one(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err("must be a whole number >= 1".into()),
    }
}

pub fn positive(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err("must be a finite number > 0".into()),
    }
}

pub fn non_negative(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v >= 0.0 && v.is_finite() => Ok(v),
        _ => Err("must be a finite number >= 0".into()),
    }
}

pub fn fraction(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..1.0).contains(&v) => Ok(v),
        _ => Err("must be a number in [0, 1)".into()),
    }
}

/// `--norm SPEC`, parsed here once: everything below the command line holds a `NormSpec`.
pub fn norm_spec(s: &str) -> std::result::Result<normlab::nn::norm_spec::NormSpec, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

pub fn model_arch(s: &str) -> std::result::Result<normlab::models::Arch, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

pub fn finite_f32(s: &str) -> std::result::Result<f32, String> {
    match s.parse::<f32>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err("must be a finite number".into()),
    }
}

/// The test set a checkpoint command evaluates on, and its thread count.
#[derive(Args)]
pub struct TestSetArgs {
    /// Data folder: the four MNIST-format IDX files, CIFAR-10's binary batches, or
    /// train/<class>/ and test/<class>/ image folders [default: $NORMLAB_DATA if set, else
    /// ./data/fashion-mnist, else /usr/share/datasets/fashion-mnist].
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Evaluate on the first N test images only [default: all].
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub test_limit: Option<usize>,
    /// Worker threads, 1 to 256 [default: one per core].
    #[arg(long, value_name = "N", value_parser = threads)]
    pub threads: Option<usize>,
}

impl TestSetArgs {
    /// The data folder in use (print it with the results, so the user sees which data a
    /// number comes from).
    pub fn data_dir(&self) -> Result<PathBuf> {
        normlab::data::resolve_data_dir(self.data.as_deref())
    }
}

/// Where the last committed epoch of the training in progress is, for Ctrl-C.
static LAST_COMMIT: std::sync::Mutex<Option<(PathBuf, usize)>> = std::sync::Mutex::new(None);

/// On Ctrl-C or a termination signal: say where the last checkpoint is and how to continue,
/// then exit 130. Under mpirun the signal usually means another process of the job ended
/// (mpirun then stops the rest), and rank 0 names the checkpoint.
pub fn on_interrupt_name_the_checkpoint() {
    let world = launch::world();
    let (rank, size) = (world.rank(), world.size());
    let _ = ctrlc::set_handler(move || {
        let last = LAST_COMMIT.lock().ok().and_then(|g| g.clone());
        let (how, why) = if size > 1 {
            (
                format!("mpirun -n {size} normlab train"),
                format!(
                    "process {rank} of {size} stopped (another process of the job ended, or the job was interrupted)"
                ),
            )
        } else {
            ("normlab train".to_string(), "interrupted".to_string())
        };
        match last {
            _ if rank > 0 => eprintln!("\n{why}; process 0 keeps the run folder"),
            Some((dir, 0)) => eprintln!(
                "\n{why} before the first epoch ended: no checkpoint yet in {}; start again, or \
                 continue with: {how} --resume {}",
                dir.display(),
                dir.display()
            ),
            Some((dir, epoch)) => eprintln!(
                "\n{why}: the last checkpoint is {} (epoch {epoch}); continue with: {how} --resume {}",
                dir.join("model.safetensors").display(),
                dir.display()
            ),
            None => eprintln!("\n{why} before training started; nothing was written"),
        }
        std::process::exit(130);
    });
}

/// Progress bars, and one table row per epoch.
#[derive(Default)]
pub struct CliReporter {
    bar: Option<ProgressBar>,
}

pub fn print_epoch_header() -> Result<()> {
    outln!("{}", normlab::train::progress::epoch_header())
}

impl Reporter for CliReporter {
    fn started(&mut self, data: &str, out: &Path, m: &RunMetrics) -> Result<()> {
        outln!("{data}")?;
        let done = m.epochs.len();
        if done > 0 {
            outln!("run folder: {} (resuming after epoch {done})", out.display())?;
        } else {
            outln!("run folder: {}", out.display())?;
        }
        if let Ok(mut g) = LAST_COMMIT.lock() {
            *g = Some((out.to_path_buf(), done));
        }
        print_epoch_header()
    }

    fn epoch_start(&mut self, epoch: usize, epochs: usize, batches: usize) {
        self.bar = Some(normlab::train::progress::epoch_bar(epoch, epochs, batches));
    }

    fn batch(&mut self, mean_loss: f64, images_per_sec: f64, data: Option<LoaderProgress>) -> Result<()> {
        if let Some(bar) = &self.bar {
            normlab::train::progress::advance(bar, mean_loss, images_per_sec, data);
        }
        Ok(())
    }

    fn epoch_end(&mut self, m: &EpochMetrics) -> Result<()> {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        outln!("{}", normlab::train::progress::epoch_row(m))
    }

    fn committed(&mut self, out: &Path, epoch: usize) {
        if let Ok(mut g) = LAST_COMMIT.lock() {
            *g = Some((out.to_path_buf(), epoch));
        }
    }
}

impl Drop for CliReporter {
    fn drop(&mut self) {
        // An error mid-epoch: the bar goes, so the error line stands alone.
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// Prints the one line of what a data folder holds (both splits), before a study or a grid
/// trains on it (each of its runs reads the same folder).
pub fn print_data_line(data: Option<&Path>) -> Result<()> {
    let dir = normlab::data::resolve_data_dir(data)?;
    let train = normlab::data::load_split(&dir, true)?;
    let test = normlab::data::load_split(&dir, false)?;
    outln!("{}", normlab::data::describe_data(&dir, Some(&train), &test))
}

/// A progress bar over a study's runs.
pub fn run_bar() -> ProgressBar {
    normlab::train::progress::runs_bar()
}

/// The first table and the finding, as the study's summary on screen.
pub fn print_analysis(a: &normlab::studies::analysis::Analysis) -> Result<()> {
    outln!("{}", a.title)?;
    if let Some(t) = a.tables.first() {
        outln!("{}", t.caption)?;
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
        outln!("{}", line(&t.header))?;
        for r in &t.rows {
            outln!("{}", line(r))?;
        }
    }
    if a.claims.is_empty() {
        return outln!("finding: {}", a.finding);
    }
    outln!("claims (difference per seed; mean and 95% t-interval across seeds):")?;
    for c in &a.claims {
        outln!(
            "  {:<58} {:>+9.3}  [{:>8.3}, {:>8.3}]  threshold {:<18} seeds {}  {}",
            c.claim,
            c.mean_difference,
            c.interval[0],
            c.interval[1],
            c.rule(),
            c.seeds,
            c.verdict
        )?;
    }
    Ok(())
}

/// Before/after inference latency as a table.
pub fn print_latency(rows: &[normlab::bench::Latency], before: &str, after: &str) -> Result<()> {
    outln!("{:>6} {before:>13} {after:>11} {:>8}", "batch", "speedup")?;
    for l in rows {
        outln!(
            "{:>6} {:>13.3} {:>11.3} {:>7.2}x",
            l.batch,
            l.before_ms,
            l.after_ms,
            l.speedup
        )?;
    }
    Ok(())
}
