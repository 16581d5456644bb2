//! What a run reports: per-epoch and whole-run metrics (metrics.json) and the `Reporter` the
//! CLI draws its progress with.

use super::*;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// 1-based.
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub test_loss: f64,
    pub test_accuracy: f64,
    pub seconds: f64,
    pub images_per_sec: f64,
    /// Seconds of the epoch's training spent in communication between processes (0 alone).
    #[serde(default)]
    pub communication_seconds: f64,
    /// With `eval_train`: loss and accuracy in eval mode on the training images after the
    /// epoch (train_loss above is the running mean over the epoch's training-mode batches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fit: Option<Fit>,
    /// Seconds the epoch's steps waited for batches the loader had not decoded yet.
    #[serde(default)]
    pub data_wait_seconds: f64,
    /// A streamed split: images the decode threads can deliver per second (images per second
    /// of decoding, times the threads; 0 in memory). Above the training rate, decoding keeps up.
    #[serde(default)]
    pub loader_images_per_sec: f64,
    /// A streamed split: images this process (process 0 of a job) decoded in the epoch.
    #[serde(default)]
    pub decoded_images: usize,
    /// Images left out as unreadable (--skip-bad-images).
    #[serde(default)]
    pub skipped_images: usize,
}

/// The model in eval mode on its training images.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fit {
    pub loss: f64,
    pub accuracy: f64,
}

/// metrics.json.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunMetrics {
    pub config: TrainConfig,
    pub data_dir: PathBuf,
    pub input_norm: InputNorm,
    pub model_parameters: usize,
    /// "running", "complete" or "diverged".
    pub status: String,
    pub epochs: Vec<EpochMetrics>,
    pub test_accuracy: f64,
    pub test_loss: f64,
    /// Mean of the per-epoch training rates.
    pub train_images_per_sec: f64,
    /// Processes of the data-parallel job that trained the last epoch (1: a single process).
    #[serde(default = "one")]
    pub processes: usize,
}

pub(super) fn one() -> usize {
    1
}

/// Receives progress; the CLI draws bars, studies stay quiet.
pub trait Reporter {
    /// Everything is checked and the run folder locked: training starts (or resumes at
    /// `metrics.epochs.len()`); `data` says in one line what was read (`describe_data`). An
    /// error (standard output full or closed) stops the run; its folder stays resumable.
    fn started(&mut self, _data: &str, _out: &Path, _metrics: &RunMetrics) -> Result<()> {
        Ok(())
    }
    fn epoch_start(&mut self, _epoch: usize, _epochs: usize, _batches: usize) {}
    /// After each step. An error (the Python API's Ctrl-C) stops the run where it is: the run
    /// folder keeps its last committed epoch, as after a kill.
    /// `data`: a streamed split's loader so far (None in memory).
    fn batch(&mut self, _mean_loss: f64, _images_per_sec: f64, _data: Option<LoaderProgress>) -> Result<()> {
        Ok(())
    }
    fn epoch_end(&mut self, _m: &EpochMetrics) -> Result<()> {
        Ok(())
    }
    /// Epoch `epoch` is committed in `out`: a kill from now on resumes after it.
    fn committed(&mut self, _out: &Path, _epoch: usize) {}
}

/// A streamed split's loader during an epoch: the share of the time spent waiting for data and
/// what the decode threads can deliver (`FeedStats::capacity`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoaderProgress {
    pub wait_share: f64,
    pub images_per_sec: f64,
}

/// A reporter that says nothing.
pub struct Quiet;

impl Reporter for Quiet {}

pub(super) fn summarize(m: &mut RunMetrics) {
    if let Some(last) = m.epochs.last() {
        m.test_accuracy = last.test_accuracy;
        m.test_loss = last.test_loss;
    }
    if !m.epochs.is_empty() {
        m.train_images_per_sec = m.epochs.iter().map(|e| e.images_per_sec).sum::<f64>() / m.epochs.len() as f64;
    }
}
