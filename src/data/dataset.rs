//! An image-classification dataset in memory, the data-directory search, and a seeded loader.

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::idx::read_idx;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Images as raw bytes [N, C, H, W] and labels; normalized to f32 per batch.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
    /// [C, H, W]
    pub shape: [usize; 3],
    pub classes: usize,
}

/// x ↦ (x/255 - mean) / std, the input normalization; stored with each checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputNorm {
    pub mean: f32,
    pub std: f32,
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
        self.images.truncate(n * self.sample_len());
        self.labels.truncate(n);
    }

    /// Mean and standard deviation of all pixel values (scaled to [0, 1]).
    pub fn pixel_stats(&self) -> InputNorm {
        let n = self.images.len().max(1) as f64;
        let sum: f64 = self.images.iter().map(|&b| b as f64 / 255.0).sum();
        let mean = sum / n;
        let var: f64 = self
            .images
            .iter()
            .map(|&b| (b as f64 / 255.0 - mean).powi(2))
            .sum::<f64>()
            / n;
        InputNorm {
            mean: mean as f32,
            std: var.sqrt().max(1e-6) as f32,
        }
    }

    /// Gathers samples `idx` into a normalized [B, C, H, W] tensor and their labels.
    pub fn batch(&self, idx: &[usize], norm: InputNorm, x: &mut Tensor, y: &mut Vec<u8>) {
        let s = self.sample_len();
        let [c, h, w] = self.shape;
        x.resize_to(&[idx.len(), c, h, w]);
        y.clear();
        let (scale, shift) = (1.0 / (255.0 * norm.std), norm.mean / norm.std);
        for (dst, &i) in x.data.chunks_mut(s).zip(idx) {
            for (o, &b) in dst.iter_mut().zip(&self.images[i * s..(i + 1) * s]) {
                *o = b as f32 * scale - shift;
            }
            y.push(self.labels[i]);
        }
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

/// The data directory: `--data DIR`, else `$NORMLAB_DATA` (which must then hold the files), else `./data/fashion-mnist`, else
/// the Debian package's `/usr/share/datasets/fashion-mnist`.
pub fn resolve_data_dir(explicit: Option<&Path>) -> Result<PathBuf> {
    let install = "install Fashion-MNIST with `apt-get install dataset-fashion-mnist` \
                   (files under /usr/share/datasets/fashion-mnist) or pass --data DIR";
    if let Some(dir) = explicit {
        if holds_idx(dir) {
            return Ok(dir.to_path_buf());
        }
        return Err(Error::DataMissing(format!(
            "{} does not hold the IDX files ({TRAIN_IMAGES}[.gz], {TRAIN_LABELS}[.gz], {TEST_IMAGES}[.gz], \
             {TEST_LABELS}[.gz]); {install}",
            dir.display()
        )));
    }
    if let Some(env) = std::env::var_os("NORMLAB_DATA") {
        // Set means meant: a wrong NORMLAB_DATA is an error, not a silent fall back.
        let dir = PathBuf::from(env);
        if holds_idx(&dir) {
            return Ok(dir);
        }
        return Err(Error::DataMissing(format!(
            "NORMLAB_DATA={} does not hold the IDX files ({TRAIN_IMAGES}[.gz], {TRAIN_LABELS}[.gz], \
             {TEST_IMAGES}[.gz], {TEST_LABELS}[.gz]); fix or unset it, or pass --data DIR",
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

/// Loads one split (`train` or `test`) from an MNIST-format directory and checks that image
/// and label counts agree and every label is below 10.
pub fn load_split(dir: &Path, train: bool) -> Result<Dataset> {
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
    Ok(Dataset {
        images: images.data,
        labels: labels.data,
        shape: [1, images.dims[1], images.dims[2]],
        classes: 10,
    })
}

/// The test split a model with input `input` is evaluated on: found like `resolve_data_dir`,
/// limited to the first `limit` images, and checked to have the model's image shape.
pub fn load_test_for(data: Option<&Path>, limit: Option<usize>, input: [usize; 3]) -> Result<Dataset> {
    let dir = resolve_data_dir(data)?;
    let mut test = load_split(&dir, false)?;
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
