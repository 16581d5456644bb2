//! Studies: grids of real training runs that let a person check the articles' claims, with
//! results.json, results.csv, SVG plots and a self-contained report.html.
//!
//! A study plans its runs, checks every one before any training starts (unknown study, invalid
//! spec, unwritable output folder), runs them through the ordinary training loop, and hands the
//! records to its analysis (`analysis.rs`), which makes the tables, plots and finding that
//! `report.rs` writes. `normlab report DIR` redoes only that last part from results.json.

pub mod analysis;
pub mod gradients;
pub mod ics;
pub mod landscape;
pub mod report;
pub mod verdict;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::resolve_data_dir;
use crate::error::{Error, Result};
use crate::models::{Model, ModelSpec};
use crate::nn::norm_spec::NormSpec;
use crate::optim::{OptimizerConfig, OptimizerKind, Schedule};
use crate::train::{self, EpochMetrics, Quiet, Start, TrainConfig};

/// The studies, each with one line on what it shows.
pub const STUDIES: &[(&str, &str)] = &[
    (
        "batch-size",
        "test error of BN, GN, LN, IN, BRN, Ghost BN and no norm at batch sizes 2..128 (GN paper, Table 2)",
    ),
    (
        "learning-rate",
        "with and without BN across learning rates spanning 100x and three init scales: divergence, accuracy, speed",
    ),
    (
        "regularization",
        "train/test gap with and without BN, dropout and weight decay",
    ),
    (
        "ics",
        "the BN paper's sigmoid MLP with and without BN: one hidden unit's input distribution over training",
    ),
    (
        "landscape",
        "VGG with BN, without, and noisy BN: loss and gradient change along the gradient (Santurkar et al.)",
    ),
    (
        "sync-bn",
        "under mpirun -n K: per-process BN, SyncBN and LayerNorm at 2, 4 and 8 images per process, against one process with the global batch",
    ),
    (
        "rnn",
        "LSTM without a norm, with LN, per-step BN and BN shared across steps: gate statistics per step, batch sizes, convergence",
    ),
];

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

/// A run to do: its labels and its full training config (seed included).
pub struct Planned {
    pub labels: BTreeMap<String, String>,
    pub config: TrainConfig,
    /// Also evaluate the final model with population and batch statistics (`BnEvals`).
    pub bn_evals: bool,
}

fn labels(pairs: &[(&str, String)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

/// The grid `normlab compare` runs: every combination of the lists, each seed.
#[derive(Clone, Debug)]
pub struct CompareGrid {
    pub models: Vec<String>,
    pub norms: Vec<NormSpec>,
    pub batch_sizes: Vec<usize>,
    pub lrs: Vec<f64>,
    pub base: TrainConfig,
}

/// Common settings of the studies: a small conv net on a subset of Fashion-MNIST.
fn base_config(opts: &StudyOptions, epochs: usize, train_limit: usize, test_limit: usize) -> TrainConfig {
    TrainConfig {
        model: "vgg:16,M,32,M".into(),
        epochs,
        train_limit: Some(train_limit),
        test_limit: Some(test_limit),
        data: opts.data.clone(),
        threads: opts.threads,
        ..TrainConfig::default()
    }
}

fn sgd(lr: f64) -> OptimizerConfig {
    OptimizerConfig {
        kind: OptimizerKind::Sgd,
        lr,
        momentum: 0.9,
        ..OptimizerConfig::default()
    }
}

/// The sync-bn study's model.
pub const SYNC_BN_MODEL: &str = "mlp";

/// The rnn study's model and the test accuracy its convergence claim counts steps to.
pub const RNN_MODEL: &str = "lstm:64";
pub const RNN_TARGET: f64 = 0.8;

/// The learning-rate study's net: six conv layers.
pub const LR_MODEL: &str = "vgg:16,16,M,32,32,M,64,64,M";

/// The batch-size study's models and their norms: the within-sample norm each is compared
/// with first (LayerNorm for the MLP, GroupNorm for the conv net), then BRN and Ghost BN.
pub const BATCH_SIZE_MODELS: [(&str, &[&str]); 2] = [
    ("mlp", &["bn", "layernorm", "brn:warmup=200", "ghost:2", "none"]),
    (
        "vgg:16,M,32,M,64,M",
        &["bn", "gn:8", "brn:warmup=200", "ghost:2", "none"],
    ),
];

/// The runs of a study (before seeds), with the settings they share.
pub fn plan(study: &str, opts: &StudyOptions) -> Result<(Vec<Planned>, BTreeMap<String, String>)> {
    let mut out = Vec::new();
    let mut settings = BTreeMap::new();
    match study {
        "batch-size" => {
            // Two models that pool very different numbers of values into each statistic: the BN
            // paper's MLP (B per statistic) and a conv net whose last maps are 7x7 (B·784,
            // B·196 and B·49 in its three BN layers). Every batch size trains the same epochs,
            // the learning rate scaled linearly with the batch (GN paper: 0.02·B/32, SGD 0.9),
            // warmed up over the first epoch and annealed to near 0 (cosine), so that every
            // curve has flattened by the end (the report's convergence table checks it).
            let (batches, epochs, train, test): (&[usize], usize, usize, usize) = if opts.quick {
                (&[2, 32], 1, 1024, 500)
            } else {
                (&[2, 8, 32, 128], 6, 10000, 5000)
            };
            for (model, norms) in BATCH_SIZE_MODELS {
                let norms: &[&str] = if opts.quick { &norms[..2] } else { norms };
                for &norm in norms.iter().chain(opts.quick.then_some(&"none")) {
                    for &b in batches {
                        if norm.starts_with("ghost") && b <= 2 {
                            continue; // ghost:2 at batch 2 is plain BN
                        }
                        let lr = 0.02 * b as f64 / 32.0;
                        let mut config = base_config(opts, epochs, train, test);
                        config.model = model.to_string();
                        config.norm = NormSpec::builtin(norm);
                        config.batch_size = b;
                        config.optimizer = sgd(lr);
                        config.schedule = Schedule::Cosine;
                        config.warmup_epochs = usize::from(epochs > 1);
                        out.push(Planned {
                            labels: labels(&[
                                ("model", model.to_string()),
                                ("norm", norm.into()),
                                ("batch_size", b.to_string()),
                            ]),
                            config,
                            bn_evals: true,
                        });
                    }
                }
            }
            settings.insert("models".into(), "mlp (784-100-100-100-10, sigmoid) and vgg:16,M,32,M,64,M (three 3x3 convs, norm+ReLU, max-pools; maps 28, 14, 7)".into());
            settings.insert(
                "learning rate".into(),
                "0.02 x batch / 32, SGD momentum 0.9; linear warm-up over the first epoch, then cosine annealing per epoch".into(),
            );
            settings.insert("epochs".into(), format!("{epochs} at every batch size"));
            settings.insert("training images (at most)".into(), train.to_string());
            settings.insert("test images (at most)".into(), test.to_string());
            settings.insert(
                "BN evaluations".into(),
                "running (EMA) statistics; population statistics over up to 100 training batches of 128 after training; each test batch's own statistics at the training batch size".into(),
            );
            return Ok((out, settings));
        }
        "learning-rate" => {
            // Six conv layers: deep enough that plain SGD fails at rates BN tolerates.
            let (lrs, scales, epochs, train, test): (&[f64], &[f32], usize, usize, usize) = if opts.quick {
                (&[0.01, 0.1, 1.0], &[1.0], 1, 1536, 500)
            } else {
                (&[0.005, 0.015, 0.05, 0.15, 0.5], &[0.5, 1.0, 2.0], 2, 10000, 2000)
            };
            for norm in ["bn", "none"] {
                for &scale in scales {
                    for &lr in lrs {
                        let mut config = base_config(opts, epochs, train, test);
                        config.model = LR_MODEL.into();
                        config.norm = NormSpec::builtin(norm);
                        config.optimizer = sgd(lr);
                        config.init_scale = Some(scale);
                        let l = labels(&[
                            ("norm", norm.into()),
                            ("init_scale", scale.to_string()),
                            ("lr", lr.to_string()),
                        ]);
                        out.push(Planned {
                            labels: l,
                            config,
                            bn_evals: false,
                        });
                    }
                }
            }
            settings.insert("optimizer".into(), "SGD momentum 0.9, batch 128, constant rate".into());
            settings.insert("epochs".into(), epochs.to_string());
            settings.insert("training images (at most)".into(), train.to_string());
            settings.insert("test images (at most)".into(), test.to_string());
            settings.insert(
                "model".into(),
                format!("{LR_MODEL} (six 3x3 convs, norm+ReLU, max-pools, linear)"),
            );
            settings.insert(
                "gradient probe".into(),
                format!("‖∂L/∂W‖ per layer on the first 128 training images, at initialization and after training at lr {}, init scale 1", lrs[lrs.len() / 2]),
            );
            return Ok((out, settings));
        }
        "regularization" => {
            let (epochs, train, test) = if opts.quick { (2, 1024, 500) } else { (10, 4096, 2000) };
            for norm in ["bn", "none"] {
                for dropout in [0.0f32, 0.5] {
                    for wd in [0.0f64, 5e-4] {
                        let mut config = base_config(opts, epochs, train, test);
                        config.norm = NormSpec::builtin(norm);
                        config.dropout = dropout;
                        config.optimizer.weight_decay = wd;
                        let l = labels(&[
                            ("norm", norm.into()),
                            ("dropout", dropout.to_string()),
                            ("weight_decay", wd.to_string()),
                        ]);
                        out.push(Planned {
                            labels: l,
                            config,
                            bn_evals: false,
                        });
                    }
                }
            }
            settings.insert("optimizer".into(), "Adam lr 1e-3, batch 128 (L2 weight decay)".into());
            settings.insert("epochs".into(), epochs.to_string());
            settings.insert(
                "training images".into(),
                format!("{train} (small, so that models can overfit)"),
            );
            settings.insert("test images (at most)".into(), test.to_string());
        }
        "sync-bn" => {
            // The MLP of the BN paper, whose BatchNorm1d at 2 images per process has two values per
            // statistic: per-process BN (DDP's default), SyncBN and LayerNorm over K processes, and
            // plain BN in one process with the same global batch (which SyncBN equals in exact
            // arithmetic). Adam, the same epochs for every batch.
            let k = opts.comm.size();
            if k < 2 {
                return Err(Error::invalid(
                    "the sync-bn study compares several processes: start it with mpirun -n 4 normlab study sync-bn (normlab built with --features mpi)",
                ));
            }
            let (epochs, train, test) = if opts.quick { (1, 96 * k, 500) } else { (5, 12000, 5000) };
            let per_process: &[usize] = if opts.quick { &[2] } else { &[2, 4, 8] };
            for &b in per_process {
                let arms = [("bn", k), ("syncbn", k), ("layernorm", k), ("bn", 1)];
                for (norm, processes) in arms {
                    let mut config = base_config(opts, epochs, train, test);
                    config.model = SYNC_BN_MODEL.into();
                    config.norm = NormSpec::builtin(norm);
                    config.batch_size = b * k;
                    let arm = if processes == 1 {
                        format!("{norm} (1 process)")
                    } else {
                        norm.to_string()
                    };
                    out.push(Planned {
                        labels: labels(&[
                            ("norm", arm),
                            ("per_process_batch", b.to_string()),
                            ("processes", processes.to_string()),
                        ]),
                        config,
                        bn_evals: false,
                    });
                }
            }
            settings.insert(
                "model".into(),
                format!("{SYNC_BN_MODEL} (784-100-100-100-10, sigmoid, BatchNorm1d)"),
            );
            settings.insert("processes".into(), k.to_string());
            settings.insert("optimizer".into(), "Adam, lr 1e-3".into());
            settings.insert("epochs".into(), epochs.to_string());
            settings.insert("global batch".into(), format!("{k} x the per-process batch"));
            settings.insert("training images (at most)".into(), train.to_string());
            settings.insert("test images (at most)".into(), test.to_string());
        }
        "rnn" => {
            // An LSTM reading each image's 28 rows. Norms at batch 32 (claims 1 and 3), then LN
            // and per-step BN at batches 4 and 128 too (claim 2); Adam with the square-root
            // scaling of its rate with the batch, the same epochs for every batch.
            let (epochs, train, test) = if opts.quick { (2, 512, 300) } else { (10, 12000, 5000) };
            let mut push = |norm: &'static str, b: usize| {
                let mut config = base_config(opts, epochs, train, test);
                config.model = RNN_MODEL.into();
                config.norm = NormSpec::builtin(norm);
                config.batch_size = b;
                config.optimizer.lr = 1e-3 * (b as f64 / 32.0).sqrt();
                out.push(Planned {
                    labels: labels(&[("norm", norm.into()), ("batch_size", b.to_string())]),
                    config,
                    bn_evals: false,
                });
            };
            for norm in ["none", "ln", "bn", "bn-shared"] {
                push(norm, 32);
            }
            let sizes: &[usize] = if opts.quick { &[8] } else { &[4, 128] };
            for &b in sizes {
                for norm in ["ln", "bn"] {
                    push(norm, b);
                }
            }
            settings.insert(
                "model".into(),
                format!(
                    "{RNN_MODEL} (an LSTM reading 28 rows of 28 pixels, a linear classifier on its last hidden state)"
                ),
            );
            settings.insert("optimizer".into(), "Adam, lr 1e-3 x sqrt(batch / 32)".into());
            settings.insert("epochs".into(), epochs.to_string());
            settings.insert("training images (at most)".into(), train.to_string());
            settings.insert("test images (at most)".into(), test.to_string());
            settings.insert(
                "convergence target".into(),
                format!(
                    "{:.0}% test accuracy (steps counted at the end of the first epoch that reaches it)",
                    100.0 * RNN_TARGET
                ),
            );
            return Ok((out, settings));
        }
        _ => {
            let known: Vec<&str> = STUDIES.iter().map(|(n, _)| *n).collect();
            return Err(Error::invalid(format!(
                "unknown study '{study}' (known: {})",
                known.join(", ")
            )));
        }
    }
    settings.insert(
        "model".into(),
        "vgg:16,M,32,M (two conv layers, BN+ReLU, max-pool, linear)".into(),
    );
    Ok((out, settings))
}

/// The runs of a compare grid.
pub fn plan_compare(grid: &CompareGrid) -> Vec<Planned> {
    let mut out = Vec::new();
    for model in &grid.models {
        for norm in &grid.norms {
            for &b in &grid.batch_sizes {
                for &lr in &grid.lrs {
                    let mut config = grid.base.clone();
                    config.model = model.clone();
                    config.norm = *norm;
                    config.batch_size = b;
                    config.optimizer.lr = lr;
                    let l = labels(&[
                        ("model", model.clone()),
                        ("norm", norm.to_string()),
                        ("batch_size", b.to_string()),
                        ("lr", lr.to_string()),
                    ]);
                    out.push(Planned {
                        labels: l,
                        config,
                        bn_evals: false,
                    });
                }
            }
        }
    }
    out
}

/// Everything that can be checked without training: options, specs, model construction,
/// batch/norm compatibility, data, and a writable output folder with no earlier results.
/// Returns the lock on `out`, held until the study is written.
pub fn check(planned: &[Planned], out: &Path, data: Option<&Path>) -> Result<crate::files::RunLock> {
    if planned.is_empty() {
        return Err(Error::invalid("the grid is empty"));
    }
    let dir = resolve_data_dir(data)?;
    let train_len = crate::data::load_split(&dir, true)?.len();
    for p in planned {
        let c = &p.config;
        c.validate()?;
        let spec = ModelSpec::new(&c.model, c.norm, [1, 28, 28], 10)?;
        Model::build(&spec, 0)?;
        let n = c.train_limit.map_or(train_len, |l| l.min(train_len));
        c.norm.check_batches(c.batch_size, n % c.batch_size)?;
    }
    prepare_out(out)
}

/// The output folder must hold no earlier results and no training run, and be writable: it is
/// locked (which writes its lock file) for the whole study.
fn prepare_out(out: &Path) -> Result<crate::files::RunLock> {
    crate::files::OutputGuard::without_force().folder("--out", out, &["results.json", "report.html"])?;
    crate::files::RunLock::acquire(out)
}

/// Runs every planned config for seeds 0..K, each into DIR/runs/NNN; a run that diverges is
/// recorded as such, any other error stops the study. Under mpirun (sync-bn), a run labelled
/// with more than one process trains over all of `comm`'s processes, the others on rank 0
/// alone; rank 0 writes every run and keeps the records (the others return none).
pub fn run_grid(
    planned: &[Planned],
    seeds: usize,
    out: &Path,
    progress: &mut dyn FnMut(usize, usize, &str),
    comm: &std::sync::Arc<dyn crate::dist::Communicator>,
) -> Result<Vec<RunRecord>> {
    let lead = comm.rank() == 0;
    let total = planned.len() * seeds;
    let mut records = Vec::with_capacity(total);
    let mut k = 0;
    // The final train accuracy is measured in eval mode on the run's training images (the
    // epoch's running average mixes in early batches and, with dropout, noisy forwards).
    let data_dir = resolve_data_dir(planned.first().and_then(|p| p.config.data.as_deref()))?;
    let train_set = if lead {
        crate::data::load_split(&data_dir, true).map(Some)
    } else {
        Ok(None)
    };
    let train_set = crate::dist::agree(&**comm, train_set)?;
    for p in planned {
        let processes: usize = p.labels.get("processes").and_then(|v| v.parse().ok()).unwrap_or(1);
        for seed in 0..seeds as u64 {
            let label: Vec<String> = p.labels.iter().map(|(a, b)| format!("{a}={b}")).collect();
            progress(k, total, &format!("{} seed {seed}", label.join(" ")));
            let dir = out.join("runs").join(format!("{k:03}"));
            let mut config = p.config.clone();
            config.seed = seed;
            let t0 = std::time::Instant::now();
            let start = Start::Fresh(Box::new(config.clone()));
            if !lead {
                // Rank 0 decides what a run's end means (a diverged run is an error here too).
                let mine = if processes > 1 {
                    train::train_on(start, &dir, &mut Quiet, comm).map(|_| ())
                } else {
                    Ok(())
                };
                let mine = match mine {
                    Err(Error::OtherRank(_)) => Ok(()),
                    other => other,
                };
                crate::dist::agree(&**comm, mine)?;
                k += 1;
                continue;
            }
            let record = (|| -> Result<RunRecord> {
                let result = if processes > 1 {
                    train::train_on(start, &dir, &mut Quiet, comm)
                } else {
                    train::train(start, &dir, &mut Quiet)
                };
                let metrics = match result {
                    Ok(m) => m,
                    Err(Error::Diverged(_)) => {
                        let text = std::fs::read_to_string(dir.join("metrics.json")).map_err(|e| Error::io(&dir, e))?;
                        serde_json::from_str(&text).map_err(|e| Error::invalid(format!("{}: {e}", dir.display())))?
                    }
                    Err(e) => return Err(e),
                };
                let last = metrics.epochs.last();
                let mut subset = train_set
                    .clone()
                    .ok_or_else(|| Error::invalid("rank 0 holds the training images"))?;
                let n = config.train_limit.unwrap_or(subset.len()).min(subset.len());
                subset.truncate(n);
                let (train_eval, bn_evals) = if metrics.status == "diverged" {
                    (None, None)
                } else {
                    let (mut model, meta) = crate::checkpoint::load_model(&dir.join("model.safetensors"))?;
                    let train_eval = train::evaluate(&mut model, &subset, meta.input_norm, 1000)?;
                    let bn_evals = if p.bn_evals {
                        bn_evaluations(&mut model, &meta, &subset, &config)?
                    } else {
                        None
                    };
                    (Some(train_eval), bn_evals)
                };
                Ok(RunRecord {
                    labels: p.labels.clone(),
                    seed,
                    status: if metrics.status == "diverged" {
                        "diverged".into()
                    } else {
                        "complete".into()
                    },
                    steps_per_epoch: n.div_ceil(config.batch_size),
                    test_accuracy: last.map_or(f64::NAN, |e| e.test_accuracy),
                    test_loss: last.map_or(f64::NAN, |e| e.test_loss),
                    train_accuracy: train_eval.as_ref().map_or(f64::NAN, |e| e.accuracy),
                    train_loss: train_eval.as_ref().map_or(f64::NAN, |e| e.loss),
                    epochs: metrics.epochs,
                    seconds: t0.elapsed().as_secs_f64(),
                    bn_evals,
                })
            })();
            records.push(crate::dist::agree(&**comm, record)?);
            k += 1;
        }
    }
    progress(total, total, "done");
    Ok(records)
}

/// A trained model with running statistics evaluated three ways (None for other norms): with
/// them, with population statistics over up to 100 batches of 128 of its training images,
/// and with each test batch's statistics at the training batch size.
fn bn_evaluations(
    model: &mut Model,
    meta: &crate::checkpoint::CheckpointMeta,
    train_images: &crate::data::Dataset,
    config: &TrainConfig,
) -> Result<Option<BnEvals>> {
    use crate::nn::StatsMode;
    if model.net.set_stats_mode(StatsMode::Normal) == 0 {
        return Ok(None);
    }
    let dir = resolve_data_dir(config.data.as_deref())?;
    let test = crate::data::load_test_for(Some(&dir), config.test_limit, meta.spec.input)?;
    let running = train::evaluate(model, &test, meta.input_norm, 1000)?.accuracy;
    model.net.set_stats_mode(StatsMode::Batch);
    let batch = train::evaluate(model, &test, meta.input_norm, config.batch_size).map_or(f64::NAN, |e| e.accuracy);
    model.net.set_stats_mode(StatsMode::Normal);
    let batches = (train_images.len() / 128).clamp(1, 100);
    let size = 128.min(train_images.len());
    crate::recalibrate::population_statistics(model, train_images, meta.input_norm, batches, size, config.seed)?;
    let population = train::evaluate(model, &test, meta.input_norm, 1000)?.accuracy;
    Ok(Some(BnEvals {
        running,
        population,
        batch,
    }))
}

/// The gradient probe of the learning-rate study: for each norm and seed, at initialization
/// (init scale 1) and for the final model trained at the middle rate.
fn learning_rate_gradients(
    planned: &[Planned],
    runs: &[RunRecord],
    opts: &StudyOptions,
) -> Result<Vec<gradients::GradientNorms>> {
    let dir = resolve_data_dir(opts.data.as_deref())?;
    let train_set = crate::data::load_split(&dir, true)?;
    let input_norm = train_set.pixel_stats();
    let mut lrs: Vec<f64> = planned.iter().map(|p| p.config.optimizer.lr).collect();
    lrs.sort_by(|a, b| a.total_cmp(b));
    lrs.dedup();
    let lr = lrs[lrs.len() / 2];
    let mut out = Vec::new();
    for p in planned
        .iter()
        .filter(|p| p.config.init_scale == Some(1.0) && p.config.optimizer.lr == lr)
    {
        for seed in 0..opts.seeds as u64 {
            let k = runs.iter().position(|r| r.labels == p.labels && r.seed == seed);
            let model = k
                .filter(|&k| runs[k].status == "complete")
                .map(|k| opts.out.join("runs").join(format!("{k:03}")).join("model.safetensors"));
            out.extend(gradients::probe(
                &p.config,
                seed,
                model.as_deref(),
                &train_set,
                input_norm,
            )?);
        }
    }
    Ok(out)
}

/// Why BN does not fit a recurrence: each plain LSTM (batch 32) of the rnn study, run on 512
/// test images, gives its first layer's gate pre-activation statistics at every time step.
fn rnn_gate_stats(planned: &[Planned], runs: &[RunRecord], opts: &StudyOptions) -> Result<Vec<GateStats>> {
    let dir = resolve_data_dir(opts.data.as_deref())?;
    let test = crate::data::load_split(&dir, false)?;
    let mut out = Vec::new();
    for p in planned
        .iter()
        .filter(|p| p.labels.get("norm").map(String::as_str) == Some("none"))
    {
        for (k, r) in runs.iter().enumerate() {
            if r.labels != p.labels || r.status != "complete" {
                continue;
            }
            let path = opts.out.join("runs").join(format!("{k:03}")).join("model.safetensors");
            let (mut model, meta) = crate::checkpoint::load_model(&path)?;
            let idx: Vec<usize> = (0..test.len().min(512)).collect();
            let mut labels = Vec::new();
            test.batch(&idx, meta.input_norm, model.input_mut(), &mut labels)?;
            model.forward(crate::nn::Mode::Eval)?;
            let lstm = model
                .net
                .layers
                .first()
                .and_then(|(_, l)| l.as_any())
                .and_then(|a| a.downcast_ref::<crate::nn::lstm::Lstm>())
                .ok_or_else(|| Error::invalid("the rnn study's model has no LSTM first layer"))?;
            out.push(GateStats {
                seed: r.seed,
                steps: lstm.gate_preactivation_stats(idx.len()),
            });
        }
    }
    Ok(out)
}

/// `normlab compare`: the grid from check to report, like a study.
pub fn run_compare(
    grid: &CompareGrid,
    seeds: usize,
    out: &Path,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<StudyResults> {
    if seeds == 0 {
        return Err(Error::invalid("--seeds must be at least 1"));
    }
    let planned = plan_compare(grid);
    let _lock = check(&planned, out, grid.base.data.as_deref())?;
    let t0 = std::time::Instant::now();
    let runs = run_grid(&planned, seeds, out, progress, &crate::dist::single_process())?;
    let mut settings = BTreeMap::new();
    settings.insert("epochs".to_string(), grid.base.epochs.to_string());
    settings.insert(
        "optimizer".to_string(),
        format!("{:?}", grid.base.optimizer.kind).to_lowercase(),
    );
    settings.insert(
        "training images (at most)".to_string(),
        grid.base.train_limit.map_or("all".into(), |n| n.to_string()),
    );
    let results = StudyResults {
        study: "compare".into(),
        quick: false,
        seeds,
        settings,
        runs,
        ics: Vec::new(),
        landscape: Vec::new(),
        seconds: t0.elapsed().as_secs_f64(),
        claims: Vec::new(),
        gradients: Vec::new(),
        gates: Vec::new(),
    };
    report::write_all(&results, out)?;
    Ok(results)
}

/// A study from plan to report.
pub fn run_study(
    study: &str,
    opts: &StudyOptions,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<StudyResults> {
    if opts.seeds == 0 {
        return Err(Error::invalid("--seeds must be at least 1"));
    }
    if opts.comm.size() > 1 && study != "sync-bn" {
        let e = match opts.comm.rank() {
            0 => Error::invalid(format!(
                "under mpirun only the sync-bn study runs; start '{study}' as one process"
            )),
            _ => Error::OtherRank(0),
        };
        return Err(crate::dist::stop_together(e));
    }
    let t0 = std::time::Instant::now();
    let (mut runs, mut ics_runs, mut landscape_runs) = (Vec::new(), Vec::new(), Vec::new());
    let mut gradient_norms = Vec::new();
    let mut gates = Vec::new();
    let _lock;
    let settings = match study {
        "ics" | "landscape" => {
            resolve_data_dir(opts.data.as_deref())?;
            _lock = Some(prepare_out(&opts.out)?);
            if study == "ics" {
                let (r, settings) = ics::run(opts, progress)?;
                ics_runs = r;
                settings
            } else {
                let (r, settings) = landscape::run(opts, progress)?;
                landscape_runs = r;
                settings
            }
        }
        _ => {
            let (planned, settings) = plan(study, opts)?;
            let lead = opts.comm.rank() == 0;
            let checked = if lead {
                check(&planned, &opts.out, opts.data.as_deref()).map(Some)
            } else {
                Ok(None)
            };
            _lock = crate::dist::agree(&*opts.comm, checked)?;
            runs = run_grid(&planned, opts.seeds, &opts.out, progress, &opts.comm)?;
            if study == "learning-rate" {
                gradient_norms = learning_rate_gradients(&planned, &runs, opts)?;
            }
            if study == "rnn" {
                gates = rnn_gate_stats(&planned, &runs, opts)?;
            }
            settings
        }
    };
    let results = StudyResults {
        study: study.into(),
        quick: opts.quick,
        seeds: opts.seeds,
        settings,
        runs,
        ics: ics_runs,
        landscape: landscape_runs,
        seconds: t0.elapsed().as_secs_f64(),
        claims: Vec::new(),
        gradients: gradient_norms,
        gates,
    };
    if opts.comm.rank() == 0 {
        report::write_all(&results, &opts.out)?;
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_diverged_runs_nan_survives_results_json() {
        // serde_json writes NaN as null; `normlab report` must read it back.
        let r = RunRecord {
            labels: BTreeMap::new(),
            seed: 0,
            status: "diverged".into(),
            epochs: Vec::new(),
            steps_per_epoch: 1,
            test_accuracy: f64::NAN,
            test_loss: f64::NAN,
            train_accuracy: f64::NAN,
            train_loss: f64::NAN,
            seconds: 1.0,
            bn_evals: Some(BnEvals {
                running: 0.5,
                population: 0.5,
                batch: f64::NAN,
            }),
        };
        let json = serde_json::to_string(&r).unwrap();
        let back: RunRecord = serde_json::from_str(&json).unwrap();
        assert!(back.test_accuracy.is_nan() && back.bn_evals.unwrap().batch.is_nan());
    }
}
