//! The grid runner every grid study shares: a planned run, the check of every run before any
//! trains, the output folder, and the runs through the ordinary training loop.

use super::*;

/// A run to do: its labels and its full training config (seed included).
pub struct Planned {
    pub labels: BTreeMap<String, String>,
    pub config: TrainConfig,
    /// Also evaluate the final model with population and batch statistics (`BnEvals`).
    pub bn_evals: bool,
}

pub(crate) fn labels(pairs: &[(&str, String)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

/// Common settings of the studies: a small conv net on a subset of Fashion-MNIST.
pub(crate) fn base_config(opts: &StudyOptions, epochs: usize, train_limit: usize, test_limit: usize) -> TrainConfig {
    TrainConfig {
        model: Arch::builtin("vgg:16,M,32,M"),
        epochs,
        train_limit: Some(train_limit),
        test_limit: Some(test_limit),
        data: opts.data.clone(),
        threads: opts.threads,
        ..TrainConfig::default()
    }
}

pub(crate) fn sgd(lr: f64) -> OptimizerConfig {
    OptimizerConfig {
        kind: OptimizerKind::Sgd,
        lr,
        momentum: 0.9,
        ..OptimizerConfig::default()
    }
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
        let spec = ModelSpec::new(c.model.clone(), c.norm, [1, 28, 28], 10)?;
        Model::build(&spec, 0)?;
        let n = c.train_limit.map_or(train_len, |l| l.min(train_len));
        c.norm.check_batches(c.batch_size, n % c.batch_size)?;
    }
    prepare_out(out)
}

/// The output folder must hold no earlier results and no training run, and be writable: it is
/// locked (which writes its lock file) for the whole study.
pub(crate) fn prepare_out(out: &Path) -> Result<crate::files::RunLock> {
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
    progress: &mut dyn FnMut(usize, usize, &str) -> Result<()>,
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
            progress(k, total, &format!("{} seed {seed}", label.join(" ")))?;
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
    progress(total, total, "done")?;
    Ok(records)
}

/// A trained model with running statistics evaluated three ways (None for other norms): with
/// them, with population statistics over up to 100 batches of 128 of its training images,
/// and with each test batch's statistics at the training batch size.
pub(crate) fn bn_evaluations(
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
