//! Studies: grids of real training runs that let a person check the articles' claims, with
//! results.json, results.csv, SVG plots and a self-contained report.html.
//!
//! Each study is one file holding its plan, probes and analysis behind the `Study` trait
//! (study.rs), registered once in `STUDIES` below. A study plans its runs, checks every one
//! before any training starts (unknown study, invalid spec, unwritable output folder), runs them
//! through the ordinary training loop (grid.rs), and hands the records (records.rs) to its
//! analysis, which makes the tables, plots and finding that `report.rs` writes. `normlab
//! report DIR` redoes only that last part from results.json.

pub mod analysis;
pub mod batch_size;
pub mod compare;
pub mod gradients;
mod grid;
pub mod ics;
pub mod landscape;
pub mod learning_rate;
mod records;
pub mod regularization;
pub mod report;
pub mod rnn;
mod study;
pub mod sync_bn;
pub mod transformer;
pub mod verdict;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::resolve_data_dir;
use crate::error::{Error, Result};
use crate::models::{Arch, Model, ModelSpec};
use crate::nn::norm_spec::NormSpec;
use crate::optim::{OptimizerConfig, OptimizerKind, Schedule};
use crate::train::{self, EpochMetrics, Quiet, Start, TrainConfig};

pub use compare::{plan_compare, run_compare, CompareGrid};
pub use grid::*;
pub use learning_rate::LR_MODEL;
pub use records::*;
pub use rnn::{RNN_MODEL, RNN_TARGET};
pub use study::{Plan, Settings, Study};
pub use sync_bn::SYNC_BN_MODEL;

/// Every `normlab study`, in the order `--help` lists them.
pub const STUDIES: &[&dyn Study] = &[
    &batch_size::BatchSize,
    &learning_rate::LearningRate,
    &regularization::Regularization,
    &ics::Ics,
    &landscape::Landscape,
    &sync_bn::SyncBn,
    &rnn::Rnn,
    &transformer::Transformer,
];

/// The study named `name`, or an error listing the known ones.
pub fn find(name: &str) -> Result<&'static dyn Study> {
    STUDIES.iter().copied().find(|s| s.name() == name).ok_or_else(|| {
        let known: Vec<&str> = STUDIES.iter().map(|s| s.name()).collect();
        Error::invalid(format!("unknown study '{name}' (known: {})", known.join(", ")))
    })
}

/// The runs of a study (before seeds), with the settings they share.
pub fn plan(study: &str, opts: &StudyOptions) -> Result<Plan> {
    find(study)?.plan(opts)
}

/// A study from plan to report.
pub fn run_study(
    study: &str,
    opts: &StudyOptions,
    progress: &mut dyn FnMut(usize, usize, &str) -> Result<()>,
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
    let found = find(study)?;
    let t0 = std::time::Instant::now();
    let mut results = StudyResults {
        study: study.into(),
        quick: opts.quick,
        seeds: opts.seeds,
        settings: Settings::new(),
        runs: Vec::new(),
        ics: Vec::new(),
        landscape: Vec::new(),
        seconds: 0.0,
        claims: Vec::new(),
        gradients: Vec::new(),
        gates: Vec::new(),
        kernels: Vec::new(),
    };
    let (settings, _lock) = found.run(opts, progress, &mut results)?;
    results.settings = settings;
    results.seconds = t0.elapsed().as_secs_f64();
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
