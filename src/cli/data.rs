//! `normlab data`: pack an image folder into WebDataset shards; time the loader alone.

use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use normlab::data::augment::Augment;
use normlab::data::{load_split_with, resolve_data_dir, FeedOptions, FolderOptions};
use normlab::files::guard::OutputGuard;
use normlab::tensor::Tensor;
use normlab::{Error, Result};

use super::train::parse_size;
use super::*;

#[derive(Args)]
pub struct DataArgs {
    #[command(subcommand)]
    pub command: DataCommand,
}

#[derive(Subcommand)]
pub enum DataCommand {
    /// Write an image folder (train/<class>/*, test/<class>/*) as WebDataset tar shards.
    #[command(after_long_help = "Example:\n  normlab data pack --data images --out shards --shard-size 256MB")]
    Pack(PackArgs),
    /// Time the loader alone: decode, resize, normalize and augment one epoch of the training
    /// images, streamed by the decode threads, without a model.
    #[command(
        after_long_help = "Example:\n  normlab data bench --data images --resize 64x64 --augment flip --decode-threads 2"
    )]
    Bench(BenchArgs),
}

#[derive(Args)]
pub struct PackArgs {
    /// The image folder (train/<class>/*.png|jpg|jpeg and test/<class>/*).
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Folder for train-000000.tar ..., test-000000.tar ... and classes.txt.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Largest shard (an image larger than this gets a shard of its own) [default: 256MB].
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "256MB")]
    pub shard_size: u64,
    /// Replace shards an earlier pack wrote in --out.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args)]
pub struct BenchArgs {
    /// Data folder: an image folder or shards [default: as `normlab train`].
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Resize every image to H x W (bilinear).
    #[arg(long, value_name = "HxW", value_parser = super::train::parse_resize)]
    pub resize: Option<[usize; 2]>,
    /// Augmentation, as `normlab train --augment`.
    #[arg(long)]
    pub augment: Option<String>,
    /// Decode threads [default: one per core].
    #[arg(long, value_name = "N", value_parser = threads)]
    pub decode_threads: Option<usize>,
    /// Images per batch [default: 128].
    #[arg(long, value_name = "N", value_parser = at_least_one, default_value_t = 128)]
    pub batch_size: usize,
    /// Time the first N training images only [default: all].
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub limit: Option<usize>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: DataArgs) -> Result<()> {
    match a.command {
        DataCommand::Pack(p) => pack(p),
        DataCommand::Bench(b) => bench(b),
    }
}

fn pack(a: PackArgs) -> Result<()> {
    if !normlab::data::folder::holds_folder(&a.data) {
        return Err(Error::DataMissing(format!(
            "{} is not an image folder (train/<class>/* and test/<class>/*); give one with --data",
            a.data.display()
        )));
    }
    if a.shard_size < 1 << 20 {
        return Err(Error::invalid("--shard-size must be at least 1MB"));
    }
    let guard = OutputGuard::new(a.force).input(&a.data);
    let out = guard.folder("--out", &a.out, &["classes.txt"])?;
    let old: Vec<PathBuf> = ["train", "test"]
        .iter()
        .flat_map(|s| normlab::data::shards::shard_files(&out, *s == "train").unwrap_or_default())
        .collect();
    if !old.is_empty() && !a.force {
        return Err(Error::invalid(format!(
            "--out {} already holds shards ({}); choose another folder or pass --force",
            a.out.display(),
            old[0].display()
        )));
    }
    std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("packing {msg} images: {pos} ({per_sec}, {elapsed})").expect("valid template"),
    );
    let report = normlab::data::pack::pack_folder(&a.data, &out, a.shard_size, &|split| {
        bar.set_message(split.to_string());
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    // Shards of an earlier, larger pack that this one did not rewrite would be read as data.
    let written: Vec<&PathBuf> = report.iter().flat_map(|r| &r.shards).collect();
    for f in old.iter().filter(|f| !written.contains(f)) {
        std::fs::remove_file(f).map_err(|e| Error::io(f, e))?;
    }
    for r in &report {
        outln!(
            "{}: {} images in {} shards ({})",
            r.split,
            r.images,
            r.shards.len(),
            normlab::memory::human(r.bytes)
        )?;
    }
    outln!(
        "wrote {} (train with: normlab train --data {})",
        out.display(),
        out.display()
    )?;
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = a.decode_threads.unwrap_or(cores);
    init_threads(Some(cores))?;
    let dir = resolve_data_dir(a.data.as_deref())?;
    let augment: Augment = a.augment.as_deref().unwrap_or("").parse()?;
    let opts = FolderOptions {
        resize: a.resize,
        cache_limit: Some(0),
        ..FolderOptions::default()
    };
    let mut set = load_split_with(&dir, true, opts)?;
    if let Some(n) = a.limit {
        set.truncate(n);
    }
    let norm = set.pixel_stats()?;
    let order = set.epoch_order(0, 0, true, normlab::data::shards::DEFAULT_SHUFFLE_BUFFER);
    let batches: Vec<Vec<usize>> = order.chunks(a.batch_size).map(<[usize]>::to_vec).collect();
    let count = batches.len();
    let t0 = Instant::now();
    let mut feed = set.feed(batches, FeedOptions::new(threads, false))?;
    let (mut x, mut y, mut scratch) = (Tensor::zeros(&[1]), Vec::new(), Vec::new());
    let mut images = 0;
    for b in 0..count {
        let fed = feed
            .next_into(norm, &mut x, &mut y)
            .ok_or_else(|| Error::invalid("the loader ended early"))??;
        augment.apply(&mut x, &norm, b as u64, &mut scratch);
        images += fed.samples;
    }
    let seconds = t0.elapsed().as_secs_f64();
    let waited = feed.stats().waited.as_secs_f64();
    drop(feed);
    let rate = images as f64 / seconds;
    if a.json {
        outln!(
            "{}",
            serde_json::json!({
                "data": dir, "images": images, "seconds": seconds, "images_per_sec": rate,
                "decode_threads": threads, "batch_size": a.batch_size, "shape": set.shape,
                "consumer_wait_seconds": waited,
            })
        )?;
    } else {
        outln!(
            "loader: {images} images of {:?} in {seconds:.2} s = {rate:.0} images/s ({threads} decode threads, batches of {}; the consumer waited {waited:.2} s)",
            set.shape,
            a.batch_size
        )?;
    }
    Ok(())
}
