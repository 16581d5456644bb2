//! What defines a run: `TrainConfig` (stored in metrics.json and the commit record, reused by
//! `--resume`) and its checks.

use super::*;

/// Everything that defines a run; stored in metrics.json and reused by `--resume`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    #[serde(serialize_with = "Arch::serialize_short")]
    pub model: Arch,
    #[serde(serialize_with = "NormSpec::serialize_short")]
    pub norm: NormSpec,
    pub epochs: usize,
    pub batch_size: usize,
    pub optimizer: OptimizerConfig,
    pub schedule: Schedule,
    pub seed: u64,
    pub threads: usize,
    pub train_limit: Option<usize>,
    pub test_limit: Option<usize>,
    pub data: Option<PathBuf>,
    /// Network slimming: λ of the L1 penalty on every norm scale γ (0 = off).
    #[serde(default)]
    pub sparsity: f64,
    /// Initial value of every norm scale γ (PyTorch's is 1; slimming uses 0.5).
    #[serde(default)]
    pub gamma_init: Option<f32>,
    /// Start from these weights (a checkpoint of the same architecture, e.g. a pruned one).
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    /// Dropout probability before the classifier.
    #[serde(default)]
    pub dropout: f32,
    /// Multiplies every conv/linear weight after PyTorch's initialization (1 = unchanged).
    #[serde(default)]
    pub init_scale: Option<f32>,
    /// Frozen BN: every norm with running statistics runs in eval mode while training.
    #[serde(default)]
    pub freeze_bn: Option<FreezeBn>,
    /// Linear learning-rate warm-up over this many epochs, per step from lr/steps up to the
    /// schedule's rate (Goyal et al. 2017, for large batches with a linearly scaled rate).
    #[serde(default)]
    pub warmup_epochs: usize,
    /// Training-time augmentation (random crop with padding, horizontal flip).
    #[serde(default)]
    pub augment: Augment,
    /// Image folders: resize every image to [H, W].
    #[serde(default)]
    pub resize: Option<[usize; 2]>,
    /// Also write TensorBoard event files under RUN/tb/ (with per-layer |γ| histograms).
    #[serde(default)]
    pub tensorboard: bool,
    /// Also evaluate the model in eval mode on the training images after every epoch (the fit
    /// itself, free of dropout's noise and of batch statistics; the studies' matched fit).
    #[serde(default)]
    pub eval_train: bool,
    /// Image folders and shards: hold a split in memory when its decoded bytes are at most
    /// this many, else stream it [default: a quarter of the memory available].
    #[serde(default)]
    pub cache_limit: Option<u64>,
    /// Decode threads of a streamed split [default: from the cores and the training threads].
    #[serde(default)]
    pub decode_threads: Option<usize>,
    /// Count and leave out images that do not decode instead of stopping the run.
    #[serde(default)]
    pub skip_bad_images: bool,
    /// Shuffle the training samples every epoch (false: the data's own order each epoch).
    #[serde(default = "yes")]
    pub shuffle: bool,
    /// Shards: the shuffle buffer's size in samples (webdataset's `.shuffle(N)`).
    #[serde(default = "default_shuffle_buffer")]
    pub shuffle_buffer: usize,
}

fn yes() -> bool {
    true
}

fn default_shuffle_buffer() -> usize {
    crate::data::shards::DEFAULT_SHUFFLE_BUFFER
}

impl TrainConfig {
    /// Decode threads for a streamed split: as given, else the cores the training threads
    /// leave free, at least one (a decode thread mostly waits once its queue is full).
    pub fn decode_threads(&self) -> usize {
        self.decode_threads.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            cores.saturating_sub(self.threads).max(1)
        })
    }

    /// How the loader reads the data of this run.
    pub fn folder_options(&self) -> FolderOptions {
        FolderOptions {
            resize: self.resize,
            channels: None,
            cache_limit: self.cache_limit,
            skip_bad: self.skip_bad_images,
        }
    }
}

/// What `--freeze-bn` freezes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FreezeBn {
    /// The running statistics (used, never updated); γ and β still train.
    Stats,
    /// The running statistics and γ, β (FrozenBatchNorm2d).
    All,
}

impl std::str::FromStr for FreezeBn {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "stats" => Ok(FreezeBn::Stats),
            "all" => Ok(FreezeBn::All),
            _ => Err(Error::invalid(format!("--freeze-bn takes stats or all, got '{s}'"))),
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: Arch::SeedCnn(crate::models::DEFAULT_SEED_WIDTH),
            norm: NormSpec::Batch(Default::default()),
            epochs: 10,
            batch_size: 128,
            optimizer: OptimizerConfig::default(),
            schedule: Schedule::Constant,
            seed: 0,
            threads: 2,
            train_limit: None,
            test_limit: None,
            data: None,
            sparsity: 0.0,
            gamma_init: None,
            init_from: None,
            dropout: 0.0,
            init_scale: None,
            freeze_bn: None,
            warmup_epochs: 0,
            augment: Augment::default(),
            resize: None,
            tensorboard: false,
            eval_train: false,
            cache_limit: None,
            decode_threads: None,
            skip_bad_images: false,
            shuffle: true,
            shuffle_buffer: crate::data::shards::DEFAULT_SHUFFLE_BUFFER,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(Error::invalid("--epochs must be at least 1"));
        }
        if self.batch_size == 0 {
            return Err(Error::invalid("--batch-size must be at least 1"));
        }
        if self.warmup_epochs > self.epochs {
            return Err(Error::invalid(format!(
                "--warmup ({}) must not exceed --epochs ({})",
                self.warmup_epochs, self.epochs
            )));
        }
        if self.train_limit == Some(0) || self.test_limit == Some(0) {
            return Err(Error::invalid("--train-limit and --test-limit must be at least 1"));
        }
        if !(self.sparsity >= 0.0 && self.sparsity.is_finite()) {
            return Err(Error::invalid(format!(
                "--sparsity must be >= 0, got {}",
                self.sparsity
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::invalid(format!(
                "--dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        if let Some(k) = self.init_scale {
            if !(k > 0.0 && k.is_finite()) {
                return Err(Error::invalid(format!("--init-scale must be > 0, got {k}")));
            }
        }
        if let Some(g) = self.gamma_init {
            if !g.is_finite() {
                return Err(Error::invalid(format!("--gamma-init must be a finite number, got {g}")));
            }
        }
        // The CLI's parser checks --resize too; a config can also come from the Python API.
        if let Some([h, w]) = self.resize {
            let side = 1..=crate::data::MAX_INPUT_SIDE;
            if !side.contains(&h) || !side.contains(&w) {
                return Err(Error::invalid(format!(
                    "--resize {h}x{w}: sides must be in 1..={}",
                    crate::data::MAX_INPUT_SIDE
                )));
            }
        }
        if self.decode_threads == Some(0) || self.decode_threads.is_some_and(|t| t > 256) {
            return Err(Error::invalid("--decode-threads must be from 1 to 256"));
        }
        if self.shuffle_buffer == 0 {
            return Err(Error::invalid("--shuffle-buffer must be at least 1 (1: no buffer)"));
        }
        self.optimizer.validate()
    }
}
