//! `normlab compare`: any grid of models x norms x batch sizes x learning rates x seeds, run
//! like a study and read as one.

use super::analysis::*;
use super::*;

/// A compare grid's reading (not a `normlab study`: the grid comes from the command line).
pub struct Compare;

impl Study for Compare {
    fn name(&self) -> &'static str {
        "compare"
    }

    fn about(&self) -> &'static str {
        "any grid of models x norms x batch sizes x learning rates x seeds"
    }

    fn analyze(&self, r: &StudyResults) -> Result<Analysis> {
        compare(r)
    }
}

/// The grid `normlab compare` runs: every combination of the lists, each seed.
#[derive(Clone, Debug)]
pub struct CompareGrid {
    pub models: Vec<Arch>,
    pub norms: Vec<NormSpec>,
    pub batch_sizes: Vec<usize>,
    pub lrs: Vec<f64>,
    pub base: TrainConfig,
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
                        ("model", model.short()),
                        ("norm", norm.short()),
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

/// `normlab compare`: the grid from check to report, like a study.
pub fn run_compare(
    grid: &CompareGrid,
    seeds: usize,
    out: &Path,
    progress: &mut dyn FnMut(usize, usize, &str) -> Result<()>,
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
        kernels: Vec::new(),
    };
    report::write_all(&results, out)?;
    Ok(results)
}

/// Any grid: one row per configuration, test accuracy bars.
pub(crate) fn compare(r: &StudyResults) -> Result<Analysis> {
    let mut groups: Vec<(BTreeMap<String, String>, Vec<&RunRecord>)> = Vec::new();
    for run in &r.runs {
        match groups.iter_mut().find(|(l, _)| *l == run.labels) {
            Some((_, v)) => v.push(run),
            None => groups.push((run.labels.clone(), vec![run])),
        }
    }
    let keys: Vec<String> = r
        .runs
        .first()
        .map(|x| x.labels.keys().cloned().collect())
        .unwrap_or_default();
    let (mut rows, mut bars) = (Vec::new(), Vec::new());
    for (labels, runs) in &groups {
        let ok: Vec<f64> = runs
            .iter()
            .filter(|x| x.status == "complete")
            .map(|x| 100.0 * x.test_accuracy)
            .collect();
        let train: Vec<f64> = runs
            .iter()
            .filter(|x| x.status == "complete")
            .map(|x| 100.0 * x.train_accuracy)
            .collect();
        let (m, s) = mean_std(&ok);
        let mut row: Vec<String> = keys
            .iter()
            .map(|k| labels.get(k).cloned().unwrap_or_default())
            .collect();
        row.push(if ok.is_empty() {
            "diverged".into()
        } else if s > 0.0 {
            format!("{m:.2} ± {s:.2}")
        } else {
            format!("{m:.2}")
        });
        row.push(format!("{:.2}", mean_std(&train).0));
        row.push(format!("{}/{}", runs.len() - ok.len(), runs.len()));
        rows.push(row);
        bars.push((
            labels.values().cloned().collect::<Vec<_>>().join(" "),
            if m.is_finite() { m } else { 0.0 },
            s,
        ));
    }
    // The best configuration and the runner-up by mean test accuracy, and whether the per-seed
    // difference between them excludes zero.
    let mut order: Vec<usize> = (0..groups.len()).collect();
    order.sort_by(|&a, &b| bars[b].1.total_cmp(&bars[a].1));
    let describe = |labels: &BTreeMap<String, String>| {
        labels
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let acc_by_seed = |i: usize| {
        per_seed(&groups[i].1, r.seeds, &|x| {
            if x.status == "complete" {
                100.0 * x.test_accuracy
            } else {
                10.0
            }
        })
    };
    let best = order.first().map(|&i| {
        let mut text = format!("Best configuration: {} ({:.2}% test accuracy).", describe(&groups[i].0), bars[i].1);
        if let Some(&j) = order.get(1) {
            let (m, lo, hi) = crate::studies::verdict::t_interval(
                &minus(&acc_by_seed(i), &acc_by_seed(j)).into_iter().filter(|v| v.is_finite()).collect::<Vec<_>>(),
            );
            let verdict = if r.seeds < 2 {
                "one seed cannot tell them apart".to_string()
            } else if lo > 0.0 {
                "distinguishable: the 95% interval excludes zero".to_string()
            } else {
                "not distinguishable: the 95% interval includes zero".to_string()
            };
            text.push_str(&format!(
                " Runner-up: {} ({:.2}%); difference {m:+.2} points, 95% interval [{lo:.2}, {hi:.2}] over {} seeds: {verdict}.",
                describe(&groups[j].0),
                bars[j].1,
                r.seeds
            ));
        }
        text
    });
    let mut header = vec!["#".to_string()];
    header.extend(keys.clone());
    header.extend(["test acc (%)".to_string(), "train acc (%)".into(), "diverged".into()]);
    for (k, row) in rows.iter_mut().enumerate() {
        row.insert(0, format!("#{}", k + 1));
    }
    let numbered: Vec<(String, f64, f64)> = bars
        .iter()
        .enumerate()
        .map(|(k, b)| (format!("#{}", k + 1), b.1, b.2))
        .collect();
    let svg = crate::plot::points_svg(
        "Test accuracy by configuration (mean ± std over seeds)",
        "configuration (#, see the table)",
        "test accuracy (%)",
        &numbered,
    )?;
    Ok(Analysis {
        title: "Comparison grid".into(),
        claim: String::new(),
        claims: Vec::new(),
        finding: best.unwrap_or_else(|| "No run completed.".into()),
        tables: vec![Table {
            caption: "Final metrics per configuration (mean ± std over seeds)".into(),
            header,
            rows,
        }],
        plots: vec![Plot {
            file: "test_accuracy.svg".into(),
            caption: "Test accuracy per configuration".into(),
            svg,
        }],
    })
}
