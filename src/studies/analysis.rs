//! What every study's analysis shares: the analysis a report is handed (tables, plots, the
//! finding), the statistics over seeds and the table cells. Each study reads its own runs in its
//! own file; all of it is a pure function of results.json, so `normlab report` can redo it.

use crate::error::Result;
use crate::studies::{RunRecord, Study, StudyResults};

pub(crate) use crate::plot::{bars_svg, lines_svg, Series};
pub(crate) use crate::studies::verdict::{Claim, Kind};
pub(crate) use crate::train::EpochMetrics;
pub(crate) use std::collections::BTreeMap;

pub struct Table {
    pub caption: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

pub struct Plot {
    pub file: String,
    pub caption: String,
    pub svg: String,
}

pub struct Analysis {
    pub title: String,
    pub claim: String,
    pub finding: String,
    /// The claims tested, each with its per-seed differences and verdict.
    pub claims: Vec<Claim>,
    pub tables: Vec<Table>,
    pub plots: Vec<Plot>,
}

/// Test error (%) of a run; a diverged run counts as chance (90% for ten classes).
pub(crate) fn error_of(r: &RunRecord) -> f64 {
    if r.status == "complete" {
        100.0 * (1.0 - r.test_accuracy)
    } else {
        90.0
    }
}

/// Per seed 0..`seeds`, `f` of that seed's run among `runs` (NaN where it has none).
pub(crate) fn per_seed(runs: &[&RunRecord], seeds: usize, f: &dyn Fn(&RunRecord) -> f64) -> Vec<f64> {
    (0..seeds as u64)
        .map(|s| runs.iter().find(|r| r.seed == s).map_or(f64::NAN, |r| f(r)))
        .collect()
}

/// a[i] - b[i].
pub(crate) fn minus(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

/// The claims, one sentence each, for the finding text.
pub(crate) fn verdict_lines(claims: &[Claim]) -> String {
    claims
        .iter()
        .map(|c| {
            format!(
                "{}: {} (mean difference {:+.3}, 95% interval [{:.3}, {:.3}], {} seeds).",
                c.claim, c.verdict, c.mean_difference, c.interval[0], c.interval[1], c.seeds
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A training curve has flattened when its last epoch's fall is under this share (%) of the
/// whole fall since epoch 1.
pub(crate) const FLAT_SHARE: f64 = 10.0;

/// The last epoch's fall in training loss as a share (%) of the fall from epoch 1 to the end;
/// None with fewer than 3 epochs or no fall at all.
pub(crate) fn last_epoch_share(epochs: &[EpochMetrics]) -> Option<f64> {
    let n = epochs.len();
    if n < 3 {
        return None;
    }
    let total = epochs[0].train_loss - epochs[n - 1].train_loss;
    let last = epochs[n - 2].train_loss - epochs[n - 1].train_loss;
    (total > 0.0).then(|| 100.0 * last / total)
}

/// The condition of a claim that compares final values of arms trained for different numbers
/// of steps: every arm's training curve has flattened (mean share over its seeds under
/// `FLAT_SHARE`). Each arm is (its name, its runs); the reason it is broken, or None.
pub(crate) fn unflattened(arms: &[(String, Vec<&RunRecord>)]) -> Option<String> {
    let broken: Vec<String> = arms
        .iter()
        .filter_map(|(name, runs)| {
            let share: Vec<f64> = runs.iter().filter_map(|x| last_epoch_share(&x.epochs)).collect();
            let mean = mean_std(&share).0;
            if share.is_empty() {
                Some(format!("{name} has no training curve to judge"))
            } else if mean >= FLAT_SHARE {
                Some(format!(
                    "{name} was still learning (last epoch's fall {mean:.1}% of the whole)"
                ))
            } else {
                None
            }
        })
        .collect();
    (!broken.is_empty()).then(|| broken.join("; "))
}

/// Mean and standard deviation (0 for one value); NaN when empty.
pub(crate) fn mean_std(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let s = if v.len() > 1 {
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
    } else {
        0.0
    };
    (m, s)
}

/// The runs whose labels include every (key, value) in `want`.
pub(crate) fn select<'a>(runs: &'a [RunRecord], want: &[(&str, &str)]) -> Vec<&'a RunRecord> {
    runs.iter()
        .filter(|r| {
            want.iter()
                .all(|(k, v)| r.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect()
}

/// The distinct values of a label, in first-seen order.
pub(crate) fn values(runs: &[RunRecord], key: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in runs {
        if let Some(v) = r.labels.get(key) {
            if !out.contains(v) {
                out.push(v.clone());
            }
        }
    }
    out
}

/// Test error in percent over the completed runs of a cell: (mean, std, diverged count, runs).
pub(crate) fn error_cell(runs: &[&RunRecord]) -> (f64, f64, usize, usize) {
    let ok: Vec<f64> = runs
        .iter()
        .filter(|r| r.status == "complete")
        .map(|r| 100.0 * (1.0 - r.test_accuracy))
        .collect();
    let (m, s) = mean_std(&ok);
    (m, s, runs.len() - ok.len(), runs.len())
}

/// "m" or "m ± s" (s > 0 only with several seeds); "—" when there is no value.
pub(crate) fn fmt_mean((m, s): (f64, f64), digits: usize) -> String {
    if m.is_nan() {
        "—".into()
    } else if s > 0.0 {
        format!("{m:.digits$} ± {s:.digits$}")
    } else {
        format!("{m:.digits$}")
    }
}

pub(crate) fn fmt_cell((m, s, diverged, n): (f64, f64, usize, usize)) -> String {
    if diverged == n {
        return "diverged".into();
    }
    let mut t = if s > 0.0 {
        format!("{m:.2} ± {s:.2}")
    } else {
        format!("{m:.2}")
    };
    if diverged > 0 {
        t.push_str(&format!(" ({diverged}/{n} diverged)"));
    }
    t
}

/// Mean ± std over seeds of `value` at each step of the first run (runs measured on the
/// same step grid: the ics and landscape studies).
pub(crate) fn per_step<P>(
    runs: &[&[P]],
    step: impl Fn(&P) -> usize,
    value: &dyn Fn(&P) -> f64,
) -> Vec<(f64, f64, f64)> {
    let steps: Vec<usize> = runs.first().map(|r| r.iter().map(&step).collect()).unwrap_or_default();
    steps
        .iter()
        .map(|&st| {
            let v: Vec<f64> = runs
                .iter()
                .filter_map(|r| r.iter().find(|p| step(p) == st))
                .map(value)
                .collect();
            let (m, s) = mean_std(&v);
            (st as f64, m, s)
        })
        .collect()
}

/// The analysis of `r` by the study that wrote it (a compare grid's by `compare`).
pub fn analyze(r: &StudyResults) -> Result<Analysis> {
    match super::find(&r.study) {
        Ok(study) => study.analyze(r),
        Err(_) => super::compare::Compare.analyze(r),
    }
}

/// Test error (%) per norm and batch size: the table's rows (mean ± std, "—" where a cell has
/// no runs), its header, and one plotted series per norm.
pub(crate) fn error_by_batch(
    runs: &[RunRecord],
    norms: &[String],
    batches: &[usize],
) -> (Vec<String>, Vec<Vec<String>>, Vec<Series>) {
    error_by(runs, norms, "batch_size", batches, &|b| format!("batch {b}"))
}

/// `error_by_batch` over the batch label `key`, with `column` naming each batch's column.
pub(crate) fn error_by(
    runs: &[RunRecord],
    norms: &[String],
    key: &str,
    batches: &[usize],
    column: &dyn Fn(usize) -> String,
) -> (Vec<String>, Vec<Vec<String>>, Vec<Series>) {
    let (mut rows, mut series) = (Vec::new(), Vec::new());
    for norm in norms {
        let mut row = vec![norm.clone()];
        let mut pts = Vec::new();
        for b in batches {
            let cell = select(runs, &[("norm", norm), (key, &b.to_string())]);
            if cell.is_empty() {
                row.push("—".into());
                continue;
            }
            let c = error_cell(&cell);
            row.push(fmt_cell(c));
            pts.push((*b as f64, c.0, c.1));
        }
        rows.push(row);
        series.push((norm.clone(), pts));
    }
    let mut header = vec!["norm".to_string()];
    header.extend(batches.iter().map(|&b| column(b)));
    (header, rows, series)
}
