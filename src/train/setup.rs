//! Before the first step: the run's settings (fresh or from the commit), the same settings on
//! every process, data, model and memory checks, the restored state, and the folder taken.

use super::*;

/// The run's settings and, resuming, its last commit (read by rank 0 alone; the other
/// processes get rank 0's settings from `same_config`).
pub(super) fn settings(
    start: Start,
    out: &Path,
    files: &RunFiles,
    lead: bool,
) -> Result<(TrainConfig, Option<run_folder::Commit>)> {
    match start {
        Start::Fresh(config) => {
            config.validate()?;
            if lead {
                refuse_existing_run(out)?;
            }
            Ok((*config, None))
        }
        Start::Resume { .. } if !lead => Ok((TrainConfig::default(), None)),
        Start::Resume {
            epochs,
            threads,
            loader,
        } => {
            let (mut config, commit) = run_folder::read_run(files)?;
            let done = commit.as_ref().map_or(0, |c| c.metrics.epochs.len());
            if let Some(e) = epochs {
                if e < done {
                    return Err(Error::invalid(format!(
                        "--epochs {e} is fewer than the {done} epochs {} has done already; give at least {done}",
                        out.display()
                    )));
                }
                config.epochs = e;
            }
            if let Some(t) = threads {
                config.threads = t;
            }
            config.decode_threads = loader.decode_threads.or(config.decode_threads);
            config.cache_limit = loader.cache_limit.or(config.cache_limit);
            config.skip_bad_images |= loader.skip_bad_images;
            config.validate()?;
            Ok((config, commit))
        }
    }
}

/// Rank 0's settings on every process: a resumed run's are taken; a fresh run's must equal
/// what each process was given (one command line for all), but for the thread count.
pub(super) fn same_config(comm: &dyn Communicator, mine: TrainConfig, fresh: bool) -> Result<TrainConfig> {
    if comm.size() == 1 {
        return Ok(mine);
    }
    let mut bytes = serde_json::to_vec(&mine).map_err(|e| Error::invalid(format!("settings: {e}")))?;
    dist::broadcast_vec(comm, &mut bytes, 0);
    let lead: TrainConfig = serde_json::from_slice(&bytes)
        .map_err(|e| Error::invalid(format!("the settings from process 0 do not parse: {e}")))?;
    if fresh
        && comm.rank() != 0
        && (TrainConfig {
            threads: mine.threads,
            ..lead.clone()
        }) != mine
    {
        return Err(Error::invalid(format!(
            "process {} was started with other training options than process 0; give every process the same command line",
            comm.rank()
        )));
    }
    let threads = if fresh { mine.threads } else { lead.threads };
    Ok(TrainConfig { threads, ..lead })
}

/// Loads the data, builds the model and checks that every batch fits it; resuming, restores
/// the model, optimizer and logs of the last commit (rank 0, which read it), and starting
/// afresh, sets the initial weights (rank 0).
pub(super) fn prepare(
    config: &TrainConfig,
    commit: Option<&run_folder::Commit>,
    files: &RunFiles,
    processes: usize,
    lead: bool,
) -> Result<Prepared> {
    let data_dir = resolve_data_dir(config.data.as_deref())?;
    let folder = config.folder_options();
    let mut train_set = load_split_with(&data_dir, true, folder)?;
    // The test images take the training images' channels (grey or colour).
    let folder = FolderOptions {
        channels: Some(train_set.shape[0]),
        ..folder
    };
    let mut test_set = load_split_with(&data_dir, false, folder)?;
    if test_set.shape != train_set.shape {
        return Err(Error::invalid(format!(
            "the test images in {} are {:?} but the training images {:?}; give both one size or pass --resize HxW",
            data_dir.display(),
            test_set.shape,
            train_set.shape
        )));
    }
    if test_set.source.format == crate::data::DataFormat::Shards {
        // Shards carry class indices, not a class list: the test split takes the training one.
        if test_set.classes > train_set.classes {
            return Err(Error::invalid(format!(
                "the test shards in {} hold class index {} but the training shards only {} classes; every test class needs training images",
                data_dir.display(),
                test_set.classes - 1,
                train_set.classes
            )));
        }
        test_set.classes = train_set.classes;
        test_set.class_names.clone_from(&train_set.class_names);
    }
    // A resumed run keeps the normalization it started with (and skips the sampling pass).
    let input_norm = match commit {
        Some(c) => c.metrics.input_norm,
        None => train_set.pixel_stats()?,
    };
    if let Some(n) = config.train_limit {
        train_set.truncate(n);
    }
    if let Some(n) = config.test_limit {
        test_set.truncate(n);
    }
    let spec = ModelSpec {
        dropout: config.dropout,
        ..ModelSpec::new(config.model.clone(), config.norm, train_set.shape, train_set.classes)?
    };
    let mut model = Model::build(&spec, config.seed)?;
    let norm = spec.norm;
    // Each process's share of a batch is what a per-process norm sees; SyncBN sees the batch.
    let smallest = data_parallel::check_split(config.batch_size, train_set.len(), processes)?;
    let synced = matches!(norm, NormSpec::Batch(c) if c.stats == crate::nn::batch_norm::BatchStats::Sync);
    let (batch, last) = if processes == 1 || synced {
        (config.batch_size, train_set.len() % config.batch_size)
    } else {
        (config.batch_size / processes, smallest)
    };
    norm.check_batches(batch, last)?;
    let per_sample_bn = matches!(spec.model, Arch::Mlp | Arch::Lstm(..))
        && matches!(norm, NormSpec::Batch(_) | NormSpec::SharedBatch(_));
    if per_sample_bn && (batch == 1 || last == 1) {
        let per_process = if processes > 1 && !synced {
            format!(" (each of the {processes} processes takes its share of a batch, and its BatchNorm sees that share alone: use syncbn for statistics over the whole batch)")
        } else {
            String::new()
        };
        return Err(Error::invalid(format!(
            "{} training samples in batches of {} leave {} batch of 1{per_process}, whose BatchNorm statistics over the \
             batch are undefined ({} cannot train on it); choose another --batch-size or --train-limit",
            train_set.len(),
            config.batch_size,
            if batch == 1 { "every" } else { "a last" },
            if spec.model == Arch::Mlp {
                "BatchNorm1d"
            } else {
                "the BN-LSTM"
            }
        )));
    }
    // Rank 0 sets the initial weights; the others receive them (`broadcast_state`).
    if lead && commit.is_none() {
        if let Some(g) = config.gamma_init {
            model.net.set_norm_scales(g);
        }
        if let Some(k) = config.init_scale {
            model.net.visit_params(&mut |p| {
                if p.kind == crate::nn::ParamKind::Weight {
                    p.value.data.iter_mut().for_each(|w| *w *= k);
                }
            });
        }
        if let Some(path) = &config.init_from {
            checkpoint::load_weights_into(path, &mut model)?;
        }
    }
    if let Some(f) = config.freeze_bn {
        let frozen = model.net.set_stats_mode(crate::nn::StatsMode::Frozen {
            affine: f == FreezeBn::All,
        });
        if frozen == 0 {
            let why = if matches!(spec.model, Arch::Lstm(..)) {
                "the LSTM's recurrent BN keeps per-time-step statistics, which --freeze-bn does not cover"
            } else {
                "it has no BatchNorm with running statistics"
            };
            return Err(Error::invalid(format!(
                "--freeze-bn: nothing to freeze in {} with norm {} ({why})",
                spec.model, spec.norm
            )));
        }
    }
    // Before anything large is allocated: the run must fit in this process's memory.
    let eval_batch = footprint::check_training_fits(
        &mut model,
        config.optimizer.kind,
        config.optimizer.momentum,
        batch,
        test_set.len(),
    )?;
    let mut opt = Optimizer::new(config.optimizer.clone());
    let mut history = Vec::new();
    let mut log = logs::RunLog::default();
    if let Some(c) = commit {
        log = run_folder::restore(files, c, &mut model, &mut opt)?;
        run_folder::check_counters(
            files,
            c,
            config,
            train_set.len().div_ceil(config.batch_size),
            &mut model,
        )?;
        history = c.metrics.epochs.clone();
    }
    Ok(Prepared {
        data_dir,
        train_set,
        test_set,
        input_norm,
        spec,
        model,
        opt,
        log,
        history,
        eval_batch,
    })
}

/// Rank 0's first writes: the lock (held for the run), the model put back to the committed
/// epoch when resuming, metrics.json and the logs' views.
pub(super) fn take_folder(
    out: &Path,
    fresh: bool,
    files: &RunFiles,
    model: &mut Model,
    meta: &dyn Fn(usize) -> CheckpointMeta,
    metrics: &RunMetrics,
    log: &logs::RunLog,
) -> Result<Option<RunLock>> {
    let lock = RunLock::acquire(out)?;
    if fresh {
        // Again under the lock: another run may have finished here since the first check.
        refuse_existing_run(out)?;
    } else {
        // The model file may run one epoch ahead of the commit (a kill between the two
        // writes): put it back to the committed epoch.
        checkpoint::save_model(&files.model(), model, &meta(metrics.epochs.len()))?;
    }
    run_folder::save_metrics(files, metrics)?;
    // The logs as the last commit left them (rows of an epoch killed midway are gone).
    run_folder::save_log_views(files, log, metrics)?;
    Ok(Some(lock))
}
