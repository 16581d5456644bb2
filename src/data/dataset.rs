//! An image-classification dataset in memory, the data-directory search, and a seeded loader.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::cifar::{holds_cifar, load_cifar};
use crate::data::folder::{holds_folder, load_folder, FolderOptions};
use crate::data::idx::read_idx;
use crate::data::shards::{holds_shards, load_shards};
use crate::data::stats::sampled_pixel_stats;
use crate::data::stream::{normalize_batch, Batches, Feed, FeedOptions, Pixels};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Images as raw bytes [N, C, H, W] (in memory, or decoded on demand) and labels; normalized to
/// f32 per batch.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub images: Pixels,
    pub labels: Vec<u8>,
    /// [C, H, W]
    pub shape: [usize; 3],
    pub classes: usize,
    /// The class names in label order (folder names, CIFAR-10's meta file, or "0".."9").
    pub class_names: Vec<String>,
    /// Where it came from and what its reader left out on purpose.
    pub source: Source,
}

/// Where a dataset came from, how many images its split held before any limit, and which
/// entries of an image folder were left out on purpose (counted, so the user sees them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub format: DataFormat,
    /// Images the split held when read (before --train-limit / --test-limit).
    pub read: usize,
    /// Hidden entries (names starting with '.').
    pub hidden: usize,
    /// Files in class folders that are not .png, .jpg or .jpeg.
    pub not_images: usize,
    /// Files beside the class folders.
    pub stray: usize,
    /// Images that did not decode, left out with --skip-bad-images.
    pub bad_images: usize,
    /// Image folders and shards: held in memory (true) or decoded on demand, the split's
    /// decoded bytes and the cache limit they were compared with.
    pub cache: Option<(bool, u64, u64)>,
    /// Shards: samples per shard, in index order (their epoch order needs it).
    pub shards: Vec<usize>,
}

impl Source {
    pub fn new(format: DataFormat, read: usize) -> Self {
        Source {
            format,
            read,
            hidden: 0,
            not_images: 0,
            stray: 0,
            bad_images: 0,
            cache: None,
            shards: Vec::new(),
        }
    }

    /// Records whether the split is cached, its decoded bytes and the limit.
    pub fn set_cache(&mut self, cached: bool, bytes: u64, limit: u64) {
        self.cache = Some((cached, bytes, limit));
    }

    fn skipped(&self) -> usize {
        self.hidden + self.not_images + self.stray + self.bad_images
    }
}

impl DataFormat {
    pub fn name(self) -> &'static str {
        match self {
            DataFormat::Idx => "IDX",
            DataFormat::Cifar => "CIFAR-10",
            DataFormat::Folder => "image folder",
            DataFormat::Shards => "WebDataset shards",
        }
    }
}

/// One line saying what a command read: the folder, its format, the images of each split (and
/// how many are used when a limit applies), the classes, the image shape and, for image
/// folders, the files skipped and why.
pub fn describe_data(dir: &Path, train: Option<&Dataset>, test: &Dataset) -> String {
    let count = |d: &Dataset| {
        if d.len() < d.source.read {
            format!("{} of {}", d.len(), d.source.read)
        } else {
            d.len().to_string()
        }
    };
    let images = match train {
        Some(t) => format!("{} training and {} test images", count(t), count(test)),
        None => format!("{} test images", count(test)),
    };
    let [c, h, w] = test.shape;
    let mut line = format!(
        "data: {} ({}): {images}, {} classes, {c}x{h}x{w}",
        dir.display(),
        test.source.format.name(),
        test.classes
    );
    let sets: Vec<&Source> = train.into_iter().chain([test]).map(|d| &d.source).collect();
    if test.source.format == DataFormat::Folder {
        let sum = |f: fn(&Source) -> usize| sets.iter().map(|s| f(s)).sum::<usize>();
        let skipped = sum(Source::skipped);
        if skipped == 0 {
            line.push_str("; no file skipped");
        } else {
            let why: Vec<String> = [
                (sum(|s| s.hidden), "hidden"),
                (sum(|s| s.not_images), "not .png/.jpg/.jpeg"),
                (sum(|s| s.stray), "beside the class folders"),
                (sum(|s| s.bad_images), "unreadable images, --skip-bad-images"),
            ]
            .iter()
            .filter(|(n, _)| *n > 0)
            .map(|(n, w)| format!("{n} {w}"))
            .collect();
            line.push_str(&format!("; skipped {skipped} files ({})", why.join(", ")));
        }
    } else {
        let others: usize = sets.iter().map(|s| s.not_images).sum();
        if test.source.format == DataFormat::Shards && others > 0 {
            line.push_str(&format!(
                "; skipped {others} tar members that are no sample's .png/.jpg/.jpeg or .cls"
            ));
        }
        let bad: usize = sets.iter().map(|s| s.bad_images).sum();
        if bad > 0 {
            line.push_str(&format!("; skipped {bad} unreadable images (--skip-bad-images)"));
        }
    }
    // Cached or streamed, and why: the decoded bytes against the cache limit.
    let human = crate::memory::human;
    let names: &[&str] = if train.is_some() {
        &["training", "test"]
    } else {
        &["test"]
    };
    for (name, s) in names.iter().zip(&sets) {
        if let Some((cached, bytes, limit)) = s.cache {
            if cached {
                line.push_str(&format!(
                    "; {name} set cached in memory ({} <= --cache-limit {})",
                    human(bytes),
                    human(limit)
                ));
            } else {
                line.push_str(&format!(
                    "; {name} set streamed from disk ({} > --cache-limit {})",
                    human(bytes),
                    human(limit)
                ));
            }
        }
    }
    line
}

/// x ↦ (x/255 − mean_c) / std_c per channel c, the input normalization; stored with each
/// checkpoint. Grey data has one channel, colour data three.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InputNorm {
    pub channels: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl InputNorm {
    /// The same mean and std for every one of `channels` channels.
    pub fn uniform(channels: usize, mean: f32, std: f32) -> Self {
        InputNorm {
            channels: channels.clamp(1, 3),
            mean: [mean; 3],
            std: [std; 3],
        }
    }

    pub fn means(&self) -> &[f32] {
        &self.mean[..self.channels]
    }

    pub fn stds(&self) -> &[f32] {
        &self.std[..self.channels]
    }
}

/// One channel as {"mean": m, "std": s} (the format of every older checkpoint and of the
/// Python scripts), several as arrays.
impl Serialize for InputNorm {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        if self.channels == 1 {
            serde_json::json!({"mean": self.mean[0], "std": self.std[0]}).serialize(s)
        } else {
            serde_json::json!({"mean": self.means(), "std": self.stds()}).serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for InputNorm {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(f32),
            Many(Vec<f32>),
        }
        #[derive(Deserialize)]
        struct Raw {
            mean: OneOrMany,
            std: OneOrMany,
        }
        let raw = Raw::deserialize(d)?;
        let list = |v: OneOrMany| match v {
            OneOrMany::One(x) => vec![x],
            OneOrMany::Many(v) => v,
        };
        let (mean, std) = (list(raw.mean), list(raw.std));
        if mean.is_empty() || mean.len() > 3 || mean.len() != std.len() {
            return Err(serde::de::Error::custom(format!(
                "input normalization needs 1 to 3 channels with a mean and std each, got {} means and {} stds",
                mean.len(),
                std.len()
            )));
        }
        if mean.iter().chain(&std).any(|v| !v.is_finite()) || std.iter().any(|&v| v <= 0.0) {
            return Err(serde::de::Error::custom(
                "input normalization needs finite means and positive stds",
            ));
        }
        let mut norm = InputNorm::uniform(mean.len(), 0.0, 1.0);
        norm.mean[..mean.len()].copy_from_slice(&mean);
        norm.std[..std.len()].copy_from_slice(&std);
        Ok(norm)
    }
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn sample_len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Keeps the first `n` samples (a subset for quick runs).
    pub fn truncate(&mut self, n: usize) {
        let n = n.min(self.len());
        if let Pixels::Memory(bytes) = &mut self.images {
            bytes.truncate(n * self.shape.iter().product::<usize>());
        }
        self.labels.truncate(n);
    }

    /// The order of the samples in 0-based `epoch` (`epoch_order`; shards in webdataset's
    /// order, `shard_epoch_order`, with a shuffle buffer of `buffer` samples).
    pub fn epoch_order(&self, seed: u64, epoch: usize, shuffle: bool, buffer: usize) -> Vec<usize> {
        if self.source.format == DataFormat::Shards {
            crate::data::shards::shard_epoch_order(&self.source.shards, self.len(), seed, epoch, shuffle, buffer)
        } else {
            epoch_order(self.len(), seed, epoch, shuffle)
        }
    }

    /// The decoded bytes when the split is held in memory.
    pub fn cached_bytes(&self) -> Option<&[u8]> {
        match &self.images {
            Pixels::Memory(b) => Some(b),
            Pixels::Stream(_) => None,
        }
    }

    /// True when the images are decoded on demand.
    pub fn is_streamed(&self) -> bool {
        matches!(self.images, Pixels::Stream(_))
    }

    /// Sample `i`'s [C, H, W] bytes into `dst`: copied from memory or decoded.
    pub fn read_sample(&self, i: usize, dst: &mut [u8]) -> Result<()> {
        let s = self.sample_len();
        match &self.images {
            Pixels::Memory(b) => {
                dst.copy_from_slice(&b[i * s..(i + 1) * s]);
                Ok(())
            }
            Pixels::Stream(r) => r.read(i, dst),
        }
    }

    /// Mean and standard deviation of each channel's pixel values (scaled to [0, 1]): over every
    /// image of IDX and CIFAR-10 data; over an evenly spaced sample of at most
    /// `stats::STATS_IMAGES` images of an image folder or shards, cached or streamed alike (a
    /// streamed set is not decoded whole before training for it).
    pub fn pixel_stats(&self) -> Result<InputNorm> {
        if matches!(self.source.format, DataFormat::Folder | DataFormat::Shards) {
            return sampled_pixel_stats(self);
        }
        let Pixels::Memory(images) = &self.images else {
            return sampled_pixel_stats(self);
        };
        let [c, h, w] = self.shape;
        let plane = h * w;
        let mut norm = InputNorm::uniform(c, 0.0, 1.0);
        for ch in 0..c.min(3) {
            let values = || {
                images
                    .chunks(c * plane)
                    .flat_map(move |img| &img[ch * plane..(ch + 1) * plane])
                    .map(|&b| b as f64 / 255.0)
            };
            let n = (self.len() * plane).max(1) as f64;
            let mean = values().sum::<f64>() / n;
            let var = values().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
            norm.mean[ch] = mean as f32;
            norm.std[ch] = var.sqrt().max(1e-6) as f32;
        }
        Ok(norm)
    }

    /// Gathers samples `idx` into a normalized [B, C, H, W] tensor and their labels (a
    /// streamed split decodes them here, on this thread).
    pub fn batch(&self, idx: &[usize], norm: InputNorm, x: &mut Tensor, y: &mut Vec<u8>) -> Result<()> {
        let s = self.sample_len();
        match &self.images {
            Pixels::Memory(images) => {
                let samples = idx.iter().map(|&i| &images[i * s..(i + 1) * s]);
                normalize_batch(samples, idx.len(), self.shape, norm, x)?;
            }
            Pixels::Stream(reader) => {
                let mut bytes = vec![0u8; idx.len() * s];
                for (dst, &i) in bytes.chunks_mut(s).zip(idx) {
                    reader.read(i, dst)?;
                }
                normalize_batch(bytes.chunks(s), idx.len(), self.shape, norm, x)?;
            }
        }
        y.clear();
        y.extend(idx.iter().map(|&i| self.labels[i]));
        Ok(())
    }

    /// The batches `batches` of this split, in order: gathered from memory when taken, or, for a
    /// streamed split, decoded ahead by `opts.threads` threads.
    pub fn feed(&self, batches: Vec<Vec<usize>>, opts: FeedOptions) -> Result<Batches<'_>> {
        Ok(match &self.images {
            Pixels::Memory(_) => Batches::Memory {
                set: self,
                batches,
                next: 0,
            },
            Pixels::Stream(reader) => Batches::Stream(Feed::start(
                Arc::clone(reader),
                Arc::new(self.labels.clone()),
                self.shape,
                batches,
                opts,
            )?),
        })
    }
}

/// The four IDX files of MNIST / Fashion-MNIST, with or without `.gz`.
const TRAIN_IMAGES: &str = "train-images-idx3-ubyte";
const TRAIN_LABELS: &str = "train-labels-idx1-ubyte";
const TEST_IMAGES: &str = "t10k-images-idx3-ubyte";
const TEST_LABELS: &str = "t10k-labels-idx1-ubyte";

fn find_file(dir: &Path, stem: &str) -> Option<PathBuf> {
    [stem.to_string(), format!("{stem}.gz")]
        .into_iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
}

fn holds_idx(dir: &Path) -> bool {
    [TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS]
        .iter()
        .all(|f| find_file(dir, f).is_some())
}

/// The layouts a data folder may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataFormat {
    /// MNIST / Fashion-MNIST IDX files.
    Idx,
    /// CIFAR-10's binary batches.
    Cifar,
    /// train/<class>/*.png and test/<class>/*, as torchvision's ImageFolder.
    Folder,
    /// WebDataset tar shards: train-*.tar and test-*.tar (KEY.png|jpg|jpeg with KEY.cls).
    Shards,
}

/// Which layout `dir` holds, if any.
pub fn data_format(dir: &Path) -> Option<DataFormat> {
    if holds_idx(dir) {
        Some(DataFormat::Idx)
    } else if holds_cifar(dir) {
        Some(DataFormat::Cifar)
    } else if holds_folder(dir) {
        Some(DataFormat::Folder)
    } else if holds_shards(dir) {
        Some(DataFormat::Shards)
    } else {
        None
    }
}

const LAYOUTS: &str = "the four MNIST-format IDX files (train-images-idx3-ubyte[.gz], ...), CIFAR-10's binary \
                       batches (data_batch_1.bin ... test_batch.bin), train/<class>/*.png and test/<class>/*, or \
                       WebDataset shards train-*.tar and test-*.tar";

/// The data directory: `--data DIR`, else `$NORMLAB_DATA` (which must then hold data), else
/// `./data/fashion-mnist`, else the Debian package's `/usr/share/datasets/fashion-mnist`.
pub fn resolve_data_dir(explicit: Option<&Path>) -> Result<PathBuf> {
    let install = "install Fashion-MNIST with `apt-get install dataset-fashion-mnist` \
                   (files under /usr/share/datasets/fashion-mnist) or pass --data DIR";
    if let Some(dir) = explicit {
        if data_format(dir).is_some() {
            return Ok(dir.to_path_buf());
        }
        return Err(Error::DataMissing(format!(
            "{} holds none of the layouts normlab reads ({LAYOUTS}); {install}",
            dir.display()
        )));
    }
    if let Some(env) = std::env::var_os("NORMLAB_DATA") {
        // Set means meant: a wrong NORMLAB_DATA is an error, not a silent fall back.
        let dir = PathBuf::from(env);
        if data_format(&dir).is_some() {
            return Ok(dir);
        }
        return Err(Error::DataMissing(format!(
            "NORMLAB_DATA={} holds none of the layouts normlab reads ({LAYOUTS}); fix or unset it, or pass --data DIR",
            dir.display()
        )));
    }
    let candidates = [
        PathBuf::from("data/fashion-mnist"),
        PathBuf::from("/usr/share/datasets/fashion-mnist"),
    ];
    candidates.iter().find(|d| holds_idx(d)).cloned().ok_or_else(|| {
        let looked: Vec<String> = candidates.iter().map(|d| d.display().to_string()).collect();
        Error::DataMissing(format!(
            "no MNIST-format data found (looked in {}); {install}",
            looked.join(", ")
        ))
    })
}

/// Loads one split of any layout with the default options (folder images at their own size,
/// grey or colour as the data are).
pub fn load_split(dir: &Path, train: bool) -> Result<Dataset> {
    load_split_with(dir, train, FolderOptions::default())
}

/// Loads one split; `opts` applies to image folders.
pub fn load_split_with(dir: &Path, train: bool, opts: FolderOptions) -> Result<Dataset> {
    match data_format(dir) {
        Some(DataFormat::Cifar) => load_cifar(dir, train),
        Some(DataFormat::Folder) => load_folder(dir, if train { "train" } else { "test" }, opts),
        Some(DataFormat::Shards) => load_shards(dir, train, opts),
        _ => load_idx_split(dir, train),
    }
}

/// Loads one split (`train` or `test`) from an MNIST-format directory and checks that image
/// and label counts agree and every label is below 10.
fn load_idx_split(dir: &Path, train: bool) -> Result<Dataset> {
    let (img_stem, lbl_stem) = if train {
        (TRAIN_IMAGES, TRAIN_LABELS)
    } else {
        (TEST_IMAGES, TEST_LABELS)
    };
    let missing = |stem: &str| Error::DataMissing(format!("{} has no {stem}[.gz]", dir.display()));
    let img_path = find_file(dir, img_stem).ok_or_else(|| missing(img_stem))?;
    let lbl_path = find_file(dir, lbl_stem).ok_or_else(|| missing(lbl_stem))?;
    let images = read_idx(&img_path, 3)?;
    let labels = read_idx(&lbl_path, 1)?;
    if images.dims[0] != labels.dims[0] {
        return Err(Error::data(
            &lbl_path,
            format!(
                "{} labels but {} has {} images",
                labels.dims[0],
                img_path.display(),
                images.dims[0]
            ),
        ));
    }
    if images.dims[0] == 0 || images.dims[1] == 0 || images.dims[2] == 0 {
        return Err(Error::data(&img_path, format!("empty image array {:?}", images.dims)));
    }
    if let Some(bad) = labels.data.iter().find(|&&l| l >= 10) {
        return Err(Error::data(&lbl_path, format!("label {bad} is outside 0..9")));
    }
    let read = labels.data.len();
    Ok(Dataset {
        images: Pixels::Memory(images.data),
        labels: labels.data,
        shape: [1, images.dims[1], images.dims[2]],
        classes: 10,
        class_names: (0..10).map(|k| k.to_string()).collect(),
        source: Source::new(DataFormat::Idx, read),
    })
}

/// The test split a model with input `input` is evaluated on: found like `resolve_data_dir`,
/// limited to the first `limit` images, and checked to have the model's image shape.
pub fn load_test_for(data: Option<&Path>, limit: Option<usize>, input: [usize; 3]) -> Result<Dataset> {
    let dir = resolve_data_dir(data)?;
    // A folder's test images are brought to the model's size and channels.
    let opts = FolderOptions {
        resize: Some([input[1], input[2]]),
        channels: Some(input[0]),
        ..FolderOptions::default()
    };
    let mut test = load_split_with(&dir, false, opts)?;
    if let Some(n) = limit {
        test.truncate(n);
    }
    if test.shape != input {
        return Err(Error::invalid(format!(
            "the checkpoint expects images {input:?}, the data in {} are {:?}",
            dir.display(),
            test.shape
        )));
    }
    Ok(test)
}

/// The order of the samples in 0-based `epoch`: a shuffle seeded by (seed, epoch) alone, so
/// a resumed run sees exactly the order the uninterrupted one would have.
pub fn epoch_order(len: usize, seed: u64, epoch: usize, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    if shuffle {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (epoch as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
        order.shuffle(&mut rng);
    }
    order
}
