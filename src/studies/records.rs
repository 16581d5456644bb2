//! What a study keeps: each run's record, the probes' results, and results.json's whole.

use super::*;

/// One finished run of a study.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    /// What varies across the study: norm, batch_size, lr, ... as strings.
    pub labels: BTreeMap<String, String>,
    pub seed: u64,
    /// "complete" or "diverged".
    pub status: String,
    pub epochs: Vec<EpochMetrics>,
    pub steps_per_epoch: usize,
    #[serde(deserialize_with = "crate::studies::verdict::null_as_nan")]
    pub test_accuracy: f64,
    #[serde(deserialize_with = "crate::studies::verdict::null_as_nan")]
    pub test_loss: f64,
    /// The final model in eval mode on the run's training images.
    #[serde(deserialize_with = "crate::studies::verdict::null_as_nan")]
    pub train_accuracy: f64,
    #[serde(deserialize_with = "crate::studies::verdict::null_as_nan")]
    pub train_loss: f64,
    pub seconds: f64,
    /// For the batch-size study's norms with running statistics: the final model's test
    /// accuracy three ways.
    #[serde(default)]
    pub bn_evals: Option<BnEvals>,
}

/// One trained BN model evaluated with its running (EMA) statistics, with population
/// statistics recomputed over the training set afterwards (`recalibrate`), and with each test
/// batch's own statistics at the training batch size.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BnEvals {
    #[serde(deserialize_with = "crate::studies::verdict::null_as_nan")]
    pub running: f64,
    #[serde(deserialize_with = "crate::studies::verdict::null_as_nan")]
    pub population: f64,
    #[serde(deserialize_with = "crate::studies::verdict::null_as_nan")]
    pub batch: f64,
}

/// results.json.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StudyResults {
    pub study: String,
    pub quick: bool,
    pub seeds: usize,
    /// What every run shares (model, epochs, data subset, optimizer).
    pub settings: BTreeMap<String, String>,
    pub runs: Vec<RunRecord>,
    /// The ics study's measurements (its runs are not grid runs).
    #[serde(default)]
    pub ics: Vec<ics::IcsRun>,
    /// The landscape study's probes.
    #[serde(default)]
    pub landscape: Vec<landscape::LandscapeRun>,
    pub seconds: f64,
    /// The claims tested, each with per-seed differences, interval and verdict (written by
    /// the analysis; `normlab report` recomputes them).
    #[serde(default)]
    pub claims: Vec<verdict::Claim>,
    /// The learning-rate study's per-layer gradient norms at initialization and at the end.
    #[serde(default)]
    pub gradients: Vec<gradients::GradientNorms>,
    /// The rnn study's gate pre-activation statistics of each trained plain LSTM.
    #[serde(default)]
    pub gates: Vec<GateStats>,
    /// The transformer study's kernel timings (RMSNorm against LayerNorm).
    #[serde(default)]
    pub kernels: Vec<crate::studies::transformer::KernelTiming>,
}

/// One trained plain LSTM's gate pre-activations on test images: per time step, per gate
/// (i, f, g, o), (mean, standard deviation) over the images and the units.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GateStats {
    pub seed: u64,
    pub steps: Vec<[(f64, f64); 4]>,
}

pub struct StudyOptions {
    /// The processes of the job the study runs in (sync-bn needs more than one).
    pub comm: std::sync::Arc<dyn crate::dist::Communicator>,
    pub quick: bool,
    pub seeds: usize,
    pub out: PathBuf,
    pub data: Option<PathBuf>,
    pub threads: usize,
}
