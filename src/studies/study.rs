//! The one shape every study has: a name and a line on what it shows, a plan of runs, the
//! training that fills its results (the planned grid by default), probes on the finished runs,
//! and the analysis a report is handed. Adding a study is its own file and one line in
//! `STUDIES` (mod.rs).

use super::*;

/// The settings a study's runs share, shown in its report.
pub type Settings = BTreeMap<String, String>;
/// The runs of a study (before seeds) and their shared settings.
pub type Plan = (Vec<Planned>, Settings);

/// `Study::run` for a study with its own training loop (ics, landscape): the data folder and
/// the output folder checked, the folder locked, then `train`; its runs, settings and the lock.
pub(crate) fn own_loop<R>(
    opts: &StudyOptions,
    train: impl FnOnce() -> Result<(R, Settings)>,
) -> Result<(R, Settings, crate::files::RunLock)> {
    resolve_data_dir(opts.data.as_deref())?;
    let lock = prepare_out(&opts.out)?;
    let (runs, settings) = train()?;
    Ok((runs, settings, lock))
}

pub trait Study: Sync {
    /// The name `normlab study NAME` takes ("batch-size").
    fn name(&self) -> &'static str;

    /// One line on what the study shows (`normlab study --help`, errors).
    fn about(&self) -> &'static str;

    /// The grid of runs; a study with its own training loop (`run`) plans none.
    fn plan(&self, _opts: &StudyOptions) -> Result<Plan> {
        Ok((Vec::new(), Settings::new()))
    }

    /// Trains what the study reads into `results`; returns the settings and the lock on the
    /// output folder, held until the report is written. By default: the plan checked before
    /// anything trains, run through the ordinary training loop, then `probe`.
    fn run(
        &self,
        opts: &StudyOptions,
        progress: &mut dyn FnMut(usize, usize, &str) -> Result<()>,
        results: &mut StudyResults,
    ) -> Result<(Settings, Option<crate::files::RunLock>)> {
        let (planned, settings) = self.plan(opts)?;
        let lead = opts.comm.rank() == 0;
        let checked = if lead {
            check(&planned, &opts.out, opts.data.as_deref()).map(Some)
        } else {
            Ok(None)
        };
        let lock = crate::dist::agree(&*opts.comm, checked)?;
        results.runs = run_grid(&planned, opts.seeds, &opts.out, progress, &opts.comm)?;
        self.probe(&planned, results, opts)?;
        Ok((settings, lock))
    }

    /// Measurements on the finished grid (the learning-rate study's gradient norms, the rnn
    /// study's gate statistics); none by default.
    fn probe(&self, _planned: &[Planned], _results: &mut StudyResults, _opts: &StudyOptions) -> Result<()> {
        Ok(())
    }

    /// Tables, plots, claims and the finding, from results.json alone.
    fn analyze(&self, r: &StudyResults) -> Result<analysis::Analysis>;
}
