//! Studies: grids of real training runs that let a person check the articles' claims, with
//! results.json, results.csv, SVG plots and a self-contained report.html.
//!
//! A study plans its runs, checks every one before any training starts (unknown study, invalid
//! spec, unwritable output folder), runs them through the ordinary training loop, and hands the
//! records to its analysis (`analysis.rs`), which makes the tables, plots and finding that
//! `report.rs` writes. `normlab report DIR` redoes only that last part from results.json.

pub mod analysis;
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
use crate::optim::{OptimizerConfig, OptimizerKind};
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
    pub test_accuracy: f64,
    pub test_loss: f64,
    /// The final model in eval mode on the run's training images.
    pub train_accuracy: f64,
    pub train_loss: f64,
    pub seconds: f64,
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
}

pub struct StudyOptions {
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
}

fn labels(pairs: &[(&str, String)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

/// The grid `normlab compare` runs: every combination of the lists, each seed.
#[derive(Clone, Debug)]
pub struct CompareGrid {
    pub models: Vec<String>,
    pub norms: Vec<String>,
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

/// The runs of a study (before seeds), with the settings they share.
pub fn plan(study: &str, opts: &StudyOptions) -> Result<(Vec<Planned>, BTreeMap<String, String>)> {
    let mut out = Vec::new();
    let mut settings = BTreeMap::new();
    match study {
        "batch-size" => {
            let (norms, batches, epochs, train, test): (&[&str], &[usize], usize, usize, usize) = if opts.quick {
                (&["bn", "gn:8", "none"], &[2, 8, 32, 128], 1, 1536, 500)
            } else {
                (
                    &[
                        "bn",
                        "gn:8",
                        "ln",
                        "in:affine=true",
                        "brn:warmup=200",
                        "ghost:2",
                        "none",
                    ],
                    &[2, 4, 8, 16, 32, 64, 128],
                    2,
                    8192,
                    2000,
                )
            };
            for &norm in norms {
                for &b in batches {
                    // The GN paper's linear scaling: lr = 0.02 · B / 32 (SGD, momentum 0.9).
                    let lr = 0.02 * b as f64 / 32.0;
                    let mut config = base_config(opts, epochs, train, test);
                    config.norm = norm.into();
                    config.batch_size = b;
                    config.optimizer = sgd(lr);
                    out.push(Planned {
                        labels: labels(&[("norm", norm.into()), ("batch_size", b.to_string())]),
                        config,
                    });
                }
            }
            settings.insert("learning rate".into(), "0.02 x batch / 32, SGD momentum 0.9".into());
            settings.insert("epochs".into(), epochs.to_string());
            settings.insert("training images (at most)".into(), train.to_string());
            settings.insert("test images (at most)".into(), test.to_string());
        }
        "learning-rate" => {
            let (lrs, scales, epochs, train, test): (&[f64], &[f32], usize, usize, usize) = if opts.quick {
                (&[0.01, 0.1, 1.0], &[1.0], 1, 1536, 500)
            } else {
                (&[0.005, 0.015, 0.05, 0.15, 0.5], &[0.5, 1.0, 2.0], 3, 6144, 2000)
            };
            for norm in ["bn", "none"] {
                for &scale in scales {
                    for &lr in lrs {
                        let mut config = base_config(opts, epochs, train, test);
                        config.norm = norm.into();
                        config.optimizer = sgd(lr);
                        config.init_scale = Some(scale);
                        let l = labels(&[
                            ("norm", norm.into()),
                            ("init_scale", scale.to_string()),
                            ("lr", lr.to_string()),
                        ]);
                        out.push(Planned { labels: l, config });
                    }
                }
            }
            settings.insert("optimizer".into(), "SGD momentum 0.9, batch 128, constant rate".into());
            settings.insert("epochs".into(), epochs.to_string());
            settings.insert("training images (at most)".into(), train.to_string());
            settings.insert("test images (at most)".into(), test.to_string());
        }
        "regularization" => {
            let (epochs, train, test) = if opts.quick { (2, 1024, 500) } else { (10, 4096, 2000) };
            for norm in ["bn", "none"] {
                for dropout in [0.0f32, 0.5] {
                    for wd in [0.0f64, 5e-4] {
                        let mut config = base_config(opts, epochs, train, test);
                        config.norm = norm.into();
                        config.dropout = dropout;
                        config.optimizer.weight_decay = wd;
                        let l = labels(&[
                            ("norm", norm.into()),
                            ("dropout", dropout.to_string()),
                            ("weight_decay", wd.to_string()),
                        ]);
                        out.push(Planned { labels: l, config });
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
                    config.norm = norm.clone();
                    config.batch_size = b;
                    config.optimizer.lr = lr;
                    let l = labels(&[
                        ("model", model.clone()),
                        ("norm", norm.clone()),
                        ("batch_size", b.to_string()),
                        ("lr", lr.to_string()),
                    ]);
                    out.push(Planned { labels: l, config });
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
        let spec = ModelSpec::new(&c.model, &c.norm, [1, 28, 28], 10)?;
        Model::build(&spec, 0)?;
        let n = c.train_limit.map_or(train_len, |l| l.min(train_len));
        let norm: NormSpec = c.norm.parse()?;
        norm.check_batches(c.batch_size, n % c.batch_size)?;
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
/// recorded as such, any other error stops the study.
pub fn run_grid(
    planned: &[Planned],
    seeds: usize,
    out: &Path,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<Vec<RunRecord>> {
    let total = planned.len() * seeds;
    let mut records = Vec::with_capacity(total);
    let mut k = 0;
    // The final train accuracy is measured in eval mode on the run's training images (the
    // epoch's running average mixes in early batches and, with dropout, noisy forwards).
    let data_dir = resolve_data_dir(planned.first().and_then(|p| p.config.data.as_deref()))?;
    let train_set = crate::data::load_split(&data_dir, true)?;
    for p in planned {
        for seed in 0..seeds as u64 {
            let label: Vec<String> = p.labels.iter().map(|(a, b)| format!("{a}={b}")).collect();
            progress(k, total, &format!("{} seed {seed}", label.join(" ")));
            let dir = out.join("runs").join(format!("{k:03}"));
            let mut config = p.config.clone();
            config.seed = seed;
            let t0 = std::time::Instant::now();
            let result = train::train(Start::Fresh(Box::new(config.clone())), &dir, &mut Quiet);
            let metrics = match result {
                Ok(m) => m,
                Err(Error::Diverged(_)) => {
                    let text = std::fs::read_to_string(dir.join("metrics.json")).map_err(|e| Error::io(&dir, e))?;
                    serde_json::from_str(&text).map_err(|e| Error::invalid(format!("{}: {e}", dir.display())))?
                }
                Err(e) => return Err(e),
            };
            let last = metrics.epochs.last();
            let n = config.train_limit.unwrap_or(train_set.len()).min(train_set.len());
            let train_eval = if metrics.status == "diverged" {
                None
            } else {
                let (mut model, meta) = crate::checkpoint::load_model(&dir.join("model.safetensors"))?;
                let mut subset = train_set.clone();
                subset.truncate(n);
                Some(train::evaluate(&mut model, &subset, meta.input_norm, 1000)?)
            };
            records.push(RunRecord {
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
            });
            k += 1;
        }
    }
    progress(total, total, "done");
    Ok(records)
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
    let runs = run_grid(&planned, seeds, out, progress)?;
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
    let t0 = std::time::Instant::now();
    let (mut runs, mut ics_runs, mut landscape_runs) = (Vec::new(), Vec::new(), Vec::new());
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
            _lock = Some(check(&planned, &opts.out, opts.data.as_deref())?);
            runs = run_grid(&planned, opts.seeds, &opts.out, progress)?;
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
    };
    report::write_all(&results, &opts.out)?;
    Ok(results)
}
