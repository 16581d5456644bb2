//! Each study's reading of its runs: tables, plots, and the finding in numbers, set against
//! the paper's claim. A pure function of results.json, so `normlab report` can redo it.

use std::collections::BTreeMap;

use crate::error::Result;
use crate::plot::{bars_svg, lines_svg, Series};
use crate::studies::verdict::{Claim, Kind};
use crate::studies::{RunRecord, StudyResults};
use crate::train::EpochMetrics;

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
fn error_of(r: &RunRecord) -> f64 {
    if r.status == "complete" {
        100.0 * (1.0 - r.test_accuracy)
    } else {
        90.0
    }
}

/// Per seed 0..`seeds`, `f` of that seed's run among `runs` (NaN where it has none).
fn per_seed(runs: &[&RunRecord], seeds: usize, f: &dyn Fn(&RunRecord) -> f64) -> Vec<f64> {
    (0..seeds as u64)
        .map(|s| runs.iter().find(|r| r.seed == s).map_or(f64::NAN, |r| f(r)))
        .collect()
}

/// a[i] - b[i].
fn minus(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

/// The claims, one sentence each, for the finding text.
fn verdict_lines(claims: &[Claim]) -> String {
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

/// Mean and standard deviation (0 for one value); NaN when empty.
fn mean_std(v: &[f64]) -> (f64, f64) {
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
fn select<'a>(runs: &'a [RunRecord], want: &[(&str, &str)]) -> Vec<&'a RunRecord> {
    runs.iter()
        .filter(|r| {
            want.iter()
                .all(|(k, v)| r.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect()
}

/// The distinct values of a label, in first-seen order.
fn values(runs: &[RunRecord], key: &str) -> Vec<String> {
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
fn error_cell(runs: &[&RunRecord]) -> (f64, f64, usize, usize) {
    let ok: Vec<f64> = runs
        .iter()
        .filter(|r| r.status == "complete")
        .map(|r| 100.0 * (1.0 - r.test_accuracy))
        .collect();
    let (m, s) = mean_std(&ok);
    (m, s, runs.len() - ok.len(), runs.len())
}

/// "m" or "m ± s" (s > 0 only with several seeds).
fn fmt_mean((m, s): (f64, f64), digits: usize) -> String {
    if s > 0.0 {
        format!("{m:.digits$} ± {s:.digits$}")
    } else {
        format!("{m:.digits$}")
    }
}

fn fmt_cell((m, s, diverged, n): (f64, f64, usize, usize)) -> String {
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
fn per_step<P>(runs: &[&[P]], step: impl Fn(&P) -> usize, value: &dyn Fn(&P) -> f64) -> Vec<(f64, f64, f64)> {
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

pub fn analyze(r: &StudyResults) -> Result<Analysis> {
    match r.study.as_str() {
        "batch-size" => batch_size(r),
        "learning-rate" => learning_rate(r),
        "regularization" => regularization(r),
        "ics" => ics(r),
        "landscape" => landscape(r),
        "rnn" => rnn(r),
        "sync-bn" => sync_bn(r),
        _ => compare(r),
    }
}

/// Test error (%) per norm and batch size: the table's rows (mean ± std, "—" where a cell has
/// no runs), its header, and one plotted series per norm.
fn error_by_batch(
    runs: &[RunRecord],
    norms: &[String],
    batches: &[usize],
) -> (Vec<String>, Vec<Vec<String>>, Vec<Series>) {
    error_by(runs, norms, "batch_size", batches, &|b| format!("batch {b}"))
}

/// `error_by_batch` over the batch label `key`, with `column` naming each batch's column.
fn error_by(
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

/// Values pooled into each statistic of a per-channel BN at batch `b`, per norm layer.
fn pooled_values(model: &str, b: usize) -> String {
    if model == "mlp" {
        return format!("{b}");
    }
    // vgg cfgs: one statistic per channel over B·H·W, H and W halved at each M (28x28 input).
    let mut side = 28;
    let mut out = Vec::new();
    for item in model.split_once(':').map_or("", |c| c.1).split(',') {
        if item == "M" {
            side /= 2;
        } else {
            out.push((b * side * side).to_string());
        }
    }
    out.join(" / ")
}

fn batch_size(r: &StudyResults) -> Result<Analysis> {
    let mut batches: Vec<usize> = values(&r.runs, "batch_size")
        .iter()
        .filter_map(|b| b.parse().ok())
        .collect();
    batches.sort();
    let (b_small, b_ref) = (
        batches.first().copied().unwrap_or(0),
        batches
            .iter()
            .copied()
            .find(|&b| b >= 32)
            .or(batches.last().copied())
            .unwrap_or(0),
    );
    let models = values(&r.runs, "model");
    let (mut tables, mut plots, mut claims) = (Vec::new(), Vec::new(), Vec::new());
    let mut notes = Vec::new();
    let mut pooled_rows = Vec::new();
    let mut eval_rows = Vec::new();
    let (mut flat_cells, mut unflat) = (0usize, Vec::new());
    for model in &models {
        let runs: Vec<RunRecord> = select(&r.runs, &[("model", model)]).into_iter().cloned().collect();
        let norms = values(&runs, "norm");
        let (header, rows, series) = error_by_batch(&runs, &norms, &batches);
        tables.push(Table {
            caption: format!("{model}: test error (%) by norm and batch size (mean ± std over seeds)"),
            header,
            rows,
        });
        plots.push(Plot {
            file: format!("test_error_vs_batch_{}.svg", model.replace([':', ','], "_")),
            caption: format!(
                "{model}: test error against batch size, one line per normalization (bars: std over seeds)"
            ),
            svg: lines_svg(
                &format!("{model}: test error against batch size (lr ∝ batch)"),
                "batch size (log scale)",
                "test error (%)",
                &series,
                true,
            )?,
        });
        for b in &batches {
            pooled_rows.push(vec![model.clone(), b.to_string(), pooled_values(model, *b)]);
            // BN evaluated three ways, error in %.
            let bn = select(&runs, &[("norm", "bn"), ("batch_size", &b.to_string())]);
            let three = |f: fn(&crate::studies::BnEvals) -> f64| {
                let v: Vec<f64> = bn
                    .iter()
                    .filter_map(|x| x.bn_evals.as_ref())
                    .map(|e| 100.0 * (1.0 - f(e)))
                    .collect();
                fmt_mean(mean_std(&v), 2)
            };
            if !bn.is_empty() {
                eval_rows.push(vec![
                    model.clone(),
                    b.to_string(),
                    three(|e| e.running),
                    three(|e| e.population),
                    three(|e| e.batch),
                ]);
            }
        }
        // Has training converged? For every norm and batch: the last epoch's fall in training
        // loss as a share of the whole fall since epoch 1 (the curve has flattened when small).
        let mut loss_series: Vec<Series> = Vec::new();
        let mut flat_rows = Vec::new();
        for b in &batches {
            let mut row = vec![b.to_string()];
            for norm in &norms {
                let cell = select(&runs, &[("norm", norm), ("batch_size", &b.to_string())]);
                let share: Vec<f64> = cell.iter().filter_map(|x| last_epoch_share(&x.epochs)).collect();
                if !share.is_empty() {
                    flat_cells += 1;
                    let mean = mean_std(&share).0;
                    if mean >= FLAT_SHARE {
                        unflat.push(format!("{model} {norm} at batch {b} ({mean:.1}%)"));
                    }
                }
                row.push(if cell.is_empty() {
                    "—".into()
                } else {
                    fmt_mean(mean_std(&share), 1)
                });
                if norm == "bn" {
                    let epochs = cell.iter().map(|x| x.epochs.len()).min().unwrap_or(0);
                    let pts = (0..epochs)
                        .map(|e| {
                            let v: Vec<f64> = cell.iter().map(|x| x.epochs[e].train_loss).collect();
                            let (m, sd) = mean_std(&v);
                            ((e + 1) as f64, m, sd)
                        })
                        .collect();
                    loss_series.push((format!("bn, batch {b}"), pts));
                }
            }
            flat_rows.push(row);
        }
        let mut header = vec!["batch".to_string()];
        header.extend(norms.iter().map(|n| format!("{n}: last epoch's fall (%)")));
        tables.push(Table {
            caption: format!(
                "{model}: has training converged? The last epoch's fall in training loss as a share of the whole fall since epoch 1 (mean ± std over seeds; under {FLAT_SHARE}%: flattened)"
            ),
            header,
            rows: flat_rows,
        });
        plots.push(Plot {
            file: format!("bn_train_loss_{}.svg", model.replace([':', ','], "_")),
            caption: format!(
                "{model}: BN's training loss per epoch at each batch size (bars: std over seeds): flat at the end means converged under the schedule"
            ),
            svg: lines_svg(
                &format!("{model}: BN training loss per epoch"),
                "epoch",
                "training loss",
                &loss_series,
                false,
            )?,
        });
        let cell = |norm: &str, b: usize| {
            per_seed(
                &select(&runs, &[("norm", norm), ("batch_size", &b.to_string())]),
                r.seeds,
                &error_of,
            )
        };
        let metric = |norm: &str| format!("{model}: test error (%) at batch {b_small} minus at batch {b_ref}, {norm}");
        claims.push(Claim::new(
            format!("BN degrades at small batches ({model})"),
            metric("bn"),
            &[&format!("bn @ {b_small}"), &format!("bn @ {b_ref}")],
            Kind::Greater,
            minus(&cell("bn", b_small), &cell("bn", b_ref)),
            2.0,
            r.quick,
        ));
        if let Some(within) = norms
            .iter()
            .find(|n| n.starts_with("gn") || n.starts_with("layernorm") || n.starts_with("ln"))
        {
            claims.push(Claim::new(
                format!("{within} does not degrade at small batches ({model})"),
                metric(within),
                &[&format!("{within} @ {b_small}"), &format!("{within} @ {b_ref}")],
                Kind::Equivalent,
                minus(&cell(within, b_small), &cell(within, b_ref)),
                2.0,
                r.quick,
            ));
        }
        let m = |norm: &str, b: usize| error_cell(&select(&runs, &[("norm", norm), ("batch_size", &b.to_string())])).0;
        notes.push(format!(
            "{model}: BN's test error {:.2}% at batch {b_ref} and {:.2}% at batch {b_small}.",
            m("bn", b_ref),
            m("bn", b_small)
        ));
    }
    tables.push(Table {
        caption: "Values pooled into each BN statistic (per BN layer): B for the MLP, B·H·W per conv layer".into(),
        header: vec!["model".into(), "batch".into(), "values per statistic".into()],
        rows: pooled_rows,
    });
    tables.push(Table {
        caption: "BN's test error (%) three ways: running (EMA) statistics, population statistics recomputed after training, each test batch's own statistics at the training batch size".into(),
        header: vec!["model".into(), "batch".into(), "running".into(), "population".into(), "batch statistics".into()],
        rows: eval_rows,
    });
    if flat_cells > 0 {
        notes.push(if unflat.is_empty() {
            format!("Every training curve flattened (the last epoch's fall under {FLAT_SHARE}% of the whole, {flat_cells} cells).")
        } else {
            format!(
                "The training curves flattened (the last epoch's fall under {FLAT_SHARE}% of the whole) in {} of {flat_cells} cells; not in {}.",
                flat_cells - unflat.len(),
                unflat.join(", ")
            )
        });
    }
    let finding = format!("{} {}", notes.join(" "), verdict_lines(&claims));
    Ok(Analysis {
        title: "Batch size: where BN fails and GroupNorm/LayerNorm do not".into(),
        claims,
        claim: "Group Normalization paper (Wu & He 2018, Table 2): ResNet-50 error at 32/16/8/4/2 images per GPU is 23.6/23.7/24.8/27.3/34.7% with BN and 24.1/24.2/24.0/24.2/24.1% with GN. Whether BN's small-batch failure shows depends on how many values each statistic pools: B in an MLP, B·H·W in a conv layer.".into(),
        finding,
        tables,
        plots,
    })
}

/// A training curve has flattened when its last epoch's fall is under this share (%) of the
/// whole fall since epoch 1.
const FLAT_SHARE: f64 = 10.0;

/// The last epoch's fall in training loss as a share (%) of the fall from epoch 1 to the end;
/// None with fewer than 3 epochs or no fall at all.
fn last_epoch_share(epochs: &[EpochMetrics]) -> Option<f64> {
    let n = epochs.len();
    if n < 3 {
        return None;
    }
    let total = epochs[0].train_loss - epochs[n - 1].train_loss;
    let last = epochs[n - 2].train_loss - epochs[n - 1].train_loss;
    (total > 0.0).then(|| 100.0 * last / total)
}

fn learning_rate(r: &StudyResults) -> Result<Analysis> {
    let mut lrs: Vec<f64> = values(&r.runs, "lr").iter().filter_map(|v| v.parse().ok()).collect();
    lrs.sort_by(|a, b| a.total_cmp(b));
    let target = 0.8;
    let (mut rows, mut speed_rows, mut series) = (Vec::new(), Vec::new(), Vec::new());
    let mut diverged: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut best: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for norm in values(&r.runs, "norm") {
        for scale in values(&r.runs, "init_scale") {
            let name = format!("{norm}, init x{scale}");
            let (mut row, mut srow, mut pts) = (vec![name.clone()], vec![name.clone()], Vec::new());
            for lr in &lrs {
                let cell_runs = select(
                    &r.runs,
                    &[("norm", &norm), ("init_scale", &scale), ("lr", &lr.to_string())],
                );
                let acc: Vec<f64> = cell_runs
                    .iter()
                    .filter(|x| x.status == "complete")
                    .map(|x| 100.0 * x.test_accuracy)
                    .collect();
                // A run fails when it diverges or ends below FAIL_ACCURACY.
                let d = diverged.entry(norm.clone()).or_default();
                d.0 += cell_runs.len() - acc.iter().filter(|&&a| a >= FAIL_ACCURACY).count();
                d.1 += cell_runs.len();
                let (m, s) = mean_std(&acc);
                row.push(if acc.is_empty() {
                    "diverged".into()
                } else if m < FAIL_ACCURACY {
                    format!("{} (failed)", fmt_mean((m, s), 2))
                } else {
                    fmt_mean((m, s), 2)
                });
                pts.push((*lr, m, s));
                if m.is_finite() && m > best.get(&norm).map_or(f64::MIN, |b| b.0) {
                    best.insert(norm.clone(), (m, *lr));
                }
                // Steps until the test accuracy first reaches the target (epoch granularity).
                let steps: Vec<usize> = cell_runs
                    .iter()
                    .filter_map(|x| {
                        x.epochs
                            .iter()
                            .position(|e| e.test_accuracy >= target)
                            .map(|i| (i + 1) * x.steps_per_epoch)
                    })
                    .collect();
                srow.push(if steps.len() == cell_runs.len() && !steps.is_empty() {
                    format!("{}", steps.iter().sum::<usize>() / steps.len())
                } else {
                    "not reached".into()
                });
            }
            rows.push(row);
            speed_rows.push(srow);
            series.push((name, pts));
        }
    }
    let mut header = vec!["norm, init".to_string()];
    header.extend(lrs.iter().map(|l| format!("lr {l}")));
    // Sensitivity to initialization: at each rate where no scale failed, the accuracy spread
    // (max − min) across init scales, averaged over those rates.
    let init_spread = |norm: &str| -> f64 {
        let mut spreads = Vec::new();
        for lr in &lrs {
            let accs: Vec<f64> = values(&r.runs, "init_scale")
                .iter()
                .map(|sc| {
                    let cell = select(&r.runs, &[("norm", norm), ("init_scale", sc), ("lr", &lr.to_string())]);
                    mean_std(
                        &cell
                            .iter()
                            .filter(|x| x.status == "complete")
                            .map(|x| 100.0 * x.test_accuracy)
                            .collect::<Vec<_>>(),
                    )
                    .0
                })
                .collect();
            if accs.len() > 1 && accs.iter().all(|&a| a >= FAIL_ACCURACY) {
                spreads.push(
                    accs.iter().cloned().fold(f64::MIN, f64::max) - accs.iter().cloned().fold(f64::MAX, f64::min),
                );
            }
        }
        mean_std(&spreads).0
    };
    let d = |n: &str| diverged.get(n).copied().unwrap_or((0, 0));
    let b = |n: &str| best.get(n).copied().unwrap_or((f64::NAN, f64::NAN));
    let (bn_d, none_d, bn_b, none_b) = (d("bn"), d("none"), b("bn"), b("none"));
    let finding = format!(
        "Runs that failed (diverged, or ended below {FAIL_ACCURACY}% test accuracy): {} of {} with BN, {} of {} without. Best test accuracy: {:.2}% with BN (lr {}), {:.2}% without (lr {}).",
        bn_d.0, bn_d.1, none_d.0, none_d.1, bn_b.0, bn_b.1, none_b.0, none_b.1
    );
    let mut claims = learning_rate_claims(r, &lrs, target);
    let (gradient_plot, gradient_claims) = gradient_analysis(r)?;
    claims.extend(gradient_claims);
    let (spread_bn, spread_none) = (init_spread("bn"), init_spread("none"));
    let finding = if spread_bn.is_finite() && spread_none.is_finite() {
        format!(
            "{finding} Across init scales, test accuracy varies by {spread_bn:.2} points with BN and {spread_none:.2} without (mean over the rates where no scale failed)."
        )
    } else {
        finding
    };
    let finding = format!("{finding} {}", verdict_lines(&claims));
    let svg = lines_svg(
        "Final test accuracy against learning rate",
        "learning rate (log scale)",
        "test accuracy (%)",
        &series,
        true,
    )?;
    Ok(Analysis {
        title: "Learning rate and initialization: does BN allow faster, less fragile training?".into(),
        claims,
        claim: "BN paper (Ioffe & Szegedy 2015): BN permits much higher learning rates (BN-x30 reached 72.2% in 2.7M steps vs 31.0M for Inception) and makes training less sensitive to initialization.".into(),
        finding,
        tables: vec![
            Table { caption: "Final test accuracy (%) by norm, init scale and learning rate".into(), header: header.clone(), rows },
            Table { caption: format!("Training steps until test accuracy first reaches {:.0}% (checked at epoch ends)", target * 100.0), header, rows: speed_rows },
        ],
        plots: std::iter::once(Plot { file: "accuracy_vs_lr.svg".into(), caption: "Final test accuracy against learning rate; missing points diverged".into(), svg })
            .chain(gradient_plot)
            .collect(),
    })
}

/// The per-layer gradient norms of the learning-rate study: a plot (log10 ‖∂L/∂W‖ by layer, at
/// initialization and after training, with and without BN) and the claim that BN keeps them
/// within a narrower range (neither vanishing nor exploding across the depth).
fn gradient_analysis(r: &StudyResults) -> Result<(Option<Plot>, Vec<Claim>)> {
    if r.gradients.is_empty() {
        return Ok((None, Vec::new()));
    }
    let mut series = Vec::new();
    for norm in ["bn", "none"] {
        for when in ["init", "final"] {
            let runs: Vec<&crate::studies::gradients::GradientNorms> = r
                .gradients
                .iter()
                .filter(|g| g.norm == norm && g.when == when)
                .collect();
            let layers = runs.first().map_or(0, |g| g.layers.len());
            let pts: Vec<(f64, f64, f64)> = (0..layers)
                .map(|i| {
                    let v: Vec<f64> = runs
                        .iter()
                        .map(|g| g.layers[i].1.log10())
                        .filter(|v| v.is_finite())
                        .collect();
                    let (m, s) = mean_std(&v);
                    ((i + 1) as f64, m, s)
                })
                .collect();
            if !pts.is_empty() {
                series.push((format!("{norm}, {when}"), pts));
            }
        }
    }
    let spread = |norm: &str, when: &str| -> Vec<f64> {
        (0..r.seeds as u64)
            .map(|s| {
                r.gradients
                    .iter()
                    .find(|g| g.norm == norm && g.when == when && g.seed == s)
                    .map_or(f64::NAN, |g| {
                        let v: Vec<f64> = g
                            .layers
                            .iter()
                            .map(|l| l.1)
                            .filter(|v| *v > 0.0 && v.is_finite())
                            .collect();
                        (v.iter().cloned().fold(f64::MIN, f64::max) / v.iter().cloned().fold(f64::MAX, f64::min))
                            .log10()
                    })
            })
            .collect()
    };
    let claims = ["init", "final"]
        .iter()
        .map(|when| {
            Claim::new(
                format!("BN keeps gradients from vanishing or exploding across layers ({when})"),
                format!("log10(max/min) over layers of ‖∂L/∂W‖ ({when}), none minus BN"),
                &["none", "bn"],
                Kind::Greater,
                minus(&spread("none", when), &spread("bn", when)),
                0.3,
                r.quick,
            )
        })
        .collect();
    let plot = Plot {
        file: "gradient_norms.svg".into(),
        caption: "log10 of each layer's weight-gradient norm on one batch, at initialization and after training (mean ± std over seeds)".into(),
        svg: lines_svg(
            "Per-layer gradient norms, with and without BN",
            "layer (input to output)",
            "log10 ‖∂L/∂W‖",
            &series,
            false,
        )?,
    };
    Ok((Some(plot), claims))
}

/// A learning-rate run fails below this test accuracy (%): on Fashion-MNIST even a linear model
/// reaches about 84%, so a net below 50% has not learned the task.
const FAIL_ACCURACY: f64 = 50.0;

/// The learning-rate study's claims, per seed at init scale 1 unless stated.
fn learning_rate_claims(r: &StudyResults, lrs: &[f64], target: f64) -> Vec<Claim> {
    let cell = |norm: &str, scale: &str, lr: f64| {
        select(
            &r.runs,
            &[("norm", norm), ("init_scale", scale), ("lr", &lr.to_string())],
        )
    };
    let acc_of = |x: &RunRecord| {
        if x.status == "complete" {
            100.0 * x.test_accuracy
        } else {
            10.0
        }
    };
    // log10 of the highest rate that did not fail (half a decade below the lowest when all did).
    let highest = |norm: &str| -> Vec<f64> {
        (0..r.seeds as u64)
            .map(|s| {
                let floor = lrs.first().map_or(f64::NAN, |l| l.log10() - 0.5);
                lrs.iter()
                    .filter(|&&lr| {
                        cell(norm, "1", lr)
                            .iter()
                            .any(|x| x.seed == s && acc_of(x) >= FAIL_ACCURACY)
                    })
                    .map(|lr| lr.log10())
                    .fold(floor, f64::max)
            })
            .collect()
    };
    // log2 of the fewest steps to the target accuracy over the rates (one epoch past the end
    // when never reached: a censored value that favours the arm that did not reach it).
    let fewest = |norm: &str| -> Vec<f64> {
        (0..r.seeds as u64)
            .map(|s| {
                let v = lrs
                    .iter()
                    .flat_map(|&lr| cell(norm, "1", lr).into_iter().filter(move |x| x.seed == s))
                    .map(|x| {
                        let reached = x.epochs.iter().position(|e| e.test_accuracy >= target);
                        let epochs = reached.map_or(x.epochs.len() + 1, |i| i + 1);
                        ((epochs * x.steps_per_epoch) as f64).log2()
                    })
                    .fold(f64::INFINITY, f64::min);
                if v.is_finite() {
                    v
                } else {
                    f64::NAN
                }
            })
            .collect()
    };
    // Accuracy spread (max - min, points) across init scales, averaged over the rates.
    let scales = values(&r.runs, "init_scale");
    let spread = |norm: &str| -> Vec<f64> {
        (0..r.seeds as u64)
            .map(|s| {
                let per_lr: Vec<f64> = lrs
                    .iter()
                    .map(|&lr| {
                        let accs: Vec<f64> = scales
                            .iter()
                            .filter_map(|sc| cell(norm, sc, lr).into_iter().find(|x| x.seed == s).map(acc_of))
                            .collect();
                        accs.iter().cloned().fold(f64::MIN, f64::max) - accs.iter().cloned().fold(f64::MAX, f64::min)
                    })
                    .collect();
                if scales.len() < 2 {
                    f64::NAN
                } else {
                    mean_std(&per_lr).0
                }
            })
            .collect()
    };
    vec![
        Claim::new(
            "BN trains at higher learning rates",
            format!("log10 of the highest rate reaching {FAIL_ACCURACY}% test accuracy, BN minus none (init scale 1)"),
            &["bn", "none"],
            Kind::Greater,
            minus(&highest("bn"), &highest("none")),
            0.3,
            r.quick,
        ),
        Claim::new(
            "BN reaches the target accuracy in fewer steps",
            format!(
                "log2 of the fewest steps to {:.0}% test accuracy over the rates, none minus BN (init scale 1)",
                target * 100.0
            ),
            &["none", "bn"],
            Kind::Greater,
            minus(&fewest("none"), &fewest("bn")),
            0.5,
            r.quick,
        ),
        Claim::new(
            "BN is less sensitive to initialization",
            "test accuracy spread (points) across init scales, mean over the rates, none minus BN",
            &["none", "bn"],
            Kind::Greater,
            minus(&spread("none"), &spread("bn")),
            2.0,
            r.quick,
        ),
    ]
}

fn regularization(r: &StudyResults) -> Result<Analysis> {
    let (mut rows, mut bars) = (Vec::new(), Vec::new());
    let mut gaps: BTreeMap<String, f64> = BTreeMap::new();
    for norm in values(&r.runs, "norm") {
        for dropout in values(&r.runs, "dropout") {
            for wd in values(&r.runs, "weight_decay") {
                let cell = select(
                    &r.runs,
                    &[("norm", &norm), ("dropout", &dropout), ("weight_decay", &wd)],
                );
                let ok: Vec<&&RunRecord> = cell.iter().filter(|x| x.status == "complete").collect();
                let train = mean_std(&ok.iter().map(|x| 100.0 * x.train_accuracy).collect::<Vec<_>>());
                let test = mean_std(&ok.iter().map(|x| 100.0 * x.test_accuracy).collect::<Vec<_>>());
                let gap = mean_std(
                    &ok.iter()
                        .map(|x| 100.0 * (x.train_accuracy - x.test_accuracy))
                        .collect::<Vec<_>>(),
                );
                let name = format!("{norm}, dropout {dropout}, wd {wd}");
                gaps.insert(name.clone(), gap.0);
                rows.push(vec![
                    name.clone(),
                    fmt_mean(train, 2),
                    fmt_mean(test, 2),
                    fmt_mean(gap, 2),
                ]);
                bars.push((name, gap.0, gap.1));
            }
        }
    }
    let g = |k: &str| gaps.get(k).copied().unwrap_or(f64::NAN);
    let (bn, none) = (g("bn, dropout 0, wd 0"), g("none, dropout 0, wd 0"));
    let gap_of = |norm: &str| {
        per_seed(
            &select(&r.runs, &[("norm", norm), ("dropout", "0"), ("weight_decay", "0")]),
            r.seeds,
            &|x| {
                if x.status == "complete" {
                    100.0 * (x.train_accuracy - x.test_accuracy)
                } else {
                    f64::NAN
                }
            },
        )
    };
    let claims = vec![Claim::new(
        "BN regularizes (a smaller train/test gap)",
        "train minus test accuracy (points) without dropout or weight decay, none minus BN",
        &["none", "bn"],
        Kind::Greater,
        minus(&gap_of("none"), &gap_of("bn")),
        1.0,
        r.quick,
    )];
    let finding = format!(
        "Without dropout or weight decay, the train/test accuracy gap is {bn:.2} points with BN and {none:.2} without. With dropout 0.5: {:.2} (BN) and {:.2} (none); with weight decay 5e-4: {:.2} (BN) and {:.2} (none). {}",
        g("bn, dropout 0.5, wd 0"),
        g("none, dropout 0.5, wd 0"),
        g("bn, dropout 0, wd 0.0005"),
        g("none, dropout 0, wd 0.0005"),
        verdict_lines(&claims)
    );
    let _ = (bn, none);
    let svg = bars_svg(
        "Train − test accuracy (points) by configuration",
        "generalization gap (points)",
        &bars,
    )?;
    Ok(Analysis {
        title: "Regularization: BN, dropout and weight decay against overfitting".into(),
        claims,
        claim: "The articles: BN has some regularizing effect from batch noise (less overfitting) and combines with dropout and L1/L2 penalties.".into(),
        finding,
        tables: vec![Table {
            caption: "Final train and test accuracy (%) and their gap (points)".into(),
            header: vec!["configuration".into(), "train acc".into(), "test acc".into(), "gap".into()],
            rows,
        }],
        plots: vec![Plot { file: "generalization_gap.svg".into(), caption: "Train − test accuracy gap".into(), svg }],
    })
}

/// Optimizer steps until the test accuracy first reaches `target` (counted at the end of that
/// epoch); a run that never reaches it counts one epoch past its last (censored).
fn steps_to(r: &RunRecord, target: f64) -> f64 {
    let k = r
        .epochs
        .iter()
        .position(|e| e.test_accuracy >= target)
        .unwrap_or(r.epochs.len());
    ((k + 1) * r.steps_per_epoch) as f64
}

fn rnn(r: &StudyResults) -> Result<Analysis> {
    let target = crate::studies::RNN_TARGET;
    let at = |norm: &str, b: &str| select(&r.runs, &[("norm", norm), ("batch_size", b)]);
    let err = |norm: &str, b: &str| per_seed(&at(norm, b), r.seeds, &error_of);
    let mut batches: Vec<usize> = values(&r.runs, "batch_size")
        .iter()
        .filter_map(|b| b.parse().ok())
        .collect();
    batches.sort();
    let (small, large) = (
        batches.first().copied().unwrap_or(32).to_string(),
        batches.last().copied().unwrap_or(32).to_string(),
    );
    let norms = ["none", "ln", "bn", "bn-shared"];
    let (mut tables, mut plots) = (Vec::new(), Vec::new());

    // Norms at batch 32: test error, steps to the target, and the learning curves.
    let mut rows = Vec::new();
    let mut curves: Vec<Series> = Vec::new();
    for norm in norms {
        let cell = at(norm, "32");
        let steps: Vec<f64> = cell
            .iter()
            .filter(|x| x.status == "complete")
            .map(|x| steps_to(x, target))
            .collect();
        rows.push(vec![
            norm.to_string(),
            fmt_cell(error_cell(&cell)),
            fmt_mean(mean_std(&steps), 0),
        ]);
        let epochs = cell.iter().map(|x| x.epochs.len()).min().unwrap_or(0);
        let pts = (0..epochs)
            .map(|e| {
                let v: Vec<f64> = cell.iter().map(|x| 100.0 * x.epochs[e].test_accuracy).collect();
                let (m, sd) = mean_std(&v);
                (((e + 1) * cell[0].steps_per_epoch) as f64, m, sd)
            })
            .collect();
        curves.push((norm.to_string(), pts));
    }
    tables.push(Table {
        caption: format!(
            "Batch 32: test error (%) and optimizer steps to {:.0}% test accuracy (mean ± std over seeds; a run that never gets there counts one epoch past its last)",
            100.0 * target
        ),
        header: vec!["norm".into(), "test error (%)".into(), "steps to target".into()],
        rows,
    });
    plots.push(Plot {
        file: "rnn_test_accuracy.svg".into(),
        caption: "Test accuracy after each epoch at batch 32, one line per norm (bars: std over seeds)".into(),
        svg: lines_svg(
            "LSTM test accuracy during training (batch 32)",
            "optimizer steps",
            "test accuracy (%)",
            &curves,
            false,
        )?,
    });

    // LN and per-step BN across batch sizes.
    let (header, rows, series) = error_by_batch(&r.runs, &["ln".to_string(), "bn".to_string()], &batches);
    tables.push(Table {
        caption: "Test error (%) by batch size (Adam, lr 1e-3·sqrt(B/32), the same epochs for every batch)".into(),
        header,
        rows,
    });
    plots.push(Plot {
        file: "rnn_error_vs_batch.svg".into(),
        caption: "Test error against batch size for LN-LSTM and per-step BN-LSTM (bars: std over seeds)".into(),
        svg: lines_svg(
            "LSTM test error against batch size",
            "batch size (log scale)",
            "test error (%)",
            &series,
            true,
        )?,
    });

    // Why BN does not fit: the gate pre-activations' statistics move from step to step.
    let gate_names = ["input i", "forget f", "cell g", "output o"];
    let mut gate_series: Vec<Series> = Vec::new();
    let mut gate_rows = Vec::new();
    let mut drift = Vec::new();
    for (k, gate) in gate_names.iter().enumerate() {
        let steps = r.gates.iter().map(|g| g.steps.len()).min().unwrap_or(0);
        let (mut means, mut stds) = (Vec::new(), Vec::new());
        let pts: Vec<(f64, f64, f64)> = (0..steps)
            .map(|t| {
                let m: Vec<f64> = r.gates.iter().map(|g| g.steps[t][k].0).collect();
                let sd: Vec<f64> = r.gates.iter().map(|g| g.steps[t][k].1).collect();
                let (m, sd) = (mean_std(&m).0, mean_std(&sd).0);
                means.push(m);
                stds.push(sd);
                ((t + 1) as f64, m, sd)
            })
            .collect();
        if steps > 0 {
            let lo = means.iter().copied().fold(f64::MAX, f64::min);
            let hi = means.iter().copied().fold(f64::MIN, f64::max);
            let (slo, shi) = stds
                .iter()
                .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
            let within = mean_std(&stds).0;
            drift.push((gate.to_string(), (hi - lo) / within, shi / slo));
            gate_rows.push(vec![
                gate.to_string(),
                format!("{lo:.3} … {hi:.3}"),
                format!("{slo:.3} … {shi:.3}"),
                format!("{:.2}", (hi - lo) / within),
                format!("{:.2}", shi / slo),
            ]);
        }
        gate_series.push((gate.to_string(), pts));
    }
    if !gate_rows.is_empty() {
        tables.push(Table {
            caption: "A trained plain LSTM's gate pre-activations over 512 test images, per time step: the range of the per-step means and standard deviations across the 28 steps (mean over seeds)".into(),
            header: vec![
                "gate".into(),
                "per-step mean".into(),
                "per-step std".into(),
                "range of means / mean std".into(),
                "largest / smallest std".into(),
            ],
            rows: gate_rows,
        });
        plots.push(Plot {
            file: "rnn_gate_statistics.svg".into(),
            caption: "Mean of each gate's pre-activation at every time step of a trained plain LSTM (bars: the standard deviation within the step, over images and units)".into(),
            svg: lines_svg("Gate pre-activations per time step (plain LSTM)", "time step (image row)", "pre-activation", &gate_series, false)?,
        });
    }

    let claims = vec![
        Claim::new(
            "BN with statistics shared across time steps trains worse than per-step BN",
            "test error (%) at batch 32, bn-shared minus bn",
            &["bn-shared", "bn"],
            Kind::Greater,
            minus(&err("bn-shared", "32"), &err("bn", "32")),
            1.0,
            r.quick,
        ),
        Claim::new(
            "BN with statistics shared across time steps trains worse than LN",
            "test error (%) at batch 32, bn-shared minus ln",
            &["bn-shared", "ln"],
            Kind::Greater,
            minus(&err("bn-shared", "32"), &err("ln", "32")),
            1.0,
            r.quick,
        ),
        Claim::new(
            "LN does not depend on the batch size",
            format!("test error (%) of ln, batch {small} minus batch {large}"),
            &[&format!("ln @ {small}"), &format!("ln @ {large}")],
            Kind::Equivalent,
            minus(&err("ln", &small), &err("ln", &large)),
            2.0,
            r.quick,
        ),
        Claim::new(
            "Per-step BN depends on the batch size (more than LN does)",
            format!("(bn − ln) test error (%) at batch {small} minus the same at batch {large}"),
            &[
                &format!("bn @ {small}"),
                &format!("ln @ {small}"),
                &format!("bn @ {large}"),
                &format!("ln @ {large}"),
            ],
            Kind::Greater,
            minus(
                &minus(&err("bn", &small), &err("ln", &small)),
                &minus(&err("bn", &large), &err("ln", &large)),
            ),
            2.0,
            r.quick,
        ),
        Claim::new(
            "LN-LSTM converges faster than the plain LSTM",
            format!(
                "optimizer steps to {:.0}% test accuracy at batch 32, none minus ln",
                100.0 * target
            ),
            &["none", "ln"],
            Kind::Greater,
            minus(
                &per_seed(&at("none", "32"), r.seeds, &|x| steps_to(x, target)),
                &per_seed(&at("ln", "32"), r.seeds, &|x| steps_to(x, target)),
            ),
            at("none", "32").first().map_or(1.0, |x| x.steps_per_epoch as f64),
            r.quick,
        ),
    ];
    let drift_text = drift
        .iter()
        .map(|(g, d, s)| format!("{g}: means span {d:.2} within-step stds, stds vary {s:.2}x"))
        .collect::<Vec<_>>()
        .join("; ");
    let finding = format!(
        "Across the 28 time steps of a trained plain LSTM the gate pre-activation statistics move ({drift_text}), so one set of normalization statistics cannot fit every step. {}",
        verdict_lines(&claims)
    );
    Ok(Analysis {
        title: "Recurrent networks: where BatchNorm does not fit, and LayerNorm does".into(),
        claims,
        claim: "The articles: BN is not used in recurrent networks because the activations at each time step have different distributions; Layer Normalization (Ba et al. 2016) fits there, and recurrent BN needs separate statistics per time step (Cooijmans et al. 2016).".into(),
        finding,
        tables,
        plots,
    })
}

/// sync-bn: test error of per-process BN, SyncBN, LayerNorm and one-process BN by the batch
/// each process sees.
fn sync_bn(r: &StudyResults) -> Result<Analysis> {
    let k = r.settings.get("processes").cloned().unwrap_or_else(|| "K".into());
    let one = "bn (1 process)".to_string();
    let arms = [
        "bn".to_string(),
        "syncbn".to_string(),
        "layernorm".to_string(),
        one.clone(),
    ];
    let mut batches: Vec<usize> = values(&r.runs, "per_process_batch")
        .iter()
        .filter_map(|b| b.parse().ok())
        .collect();
    batches.sort();
    let (header, rows, series) = error_by(&r.runs, &arms, "per_process_batch", &batches, &|b| {
        format!("{b} per process")
    });
    let tables = vec![Table {
        caption: format!(
            "Test error (%) by images per process, {k} processes (global batch = {k} x that), and plain BN in one process with the same global batch (mean ± std over seeds)"
        ),
        header,
        rows,
    }];
    let plots = vec![Plot {
        file: "sync_bn_error.svg".into(),
        caption: "Test error against the images each process sees (bars: std over seeds)".into(),
        svg: lines_svg(
            "Per-process BN, SyncBN and LayerNorm across processes",
            "images per process (log scale)",
            "test error (%)",
            &series,
            true,
        )?,
    }];
    let small = batches.first().copied().unwrap_or(2).to_string();
    let err = |arm: &str| {
        per_seed(
            &select(&r.runs, &[("norm", arm), ("per_process_batch", &small)]),
            r.seeds,
            &error_of,
        )
    };
    let claims = vec![
        Claim::new(
            "SyncBN recovers BN's accuracy at small per-process batches",
            format!("test error (%) at {small} images per process, syncbn over {k} processes minus bn in one process with the global batch"),
            &["syncbn", &one],
            Kind::Equivalent,
            minus(&err("syncbn"), &err(&one)),
            1.0,
            r.quick,
        ),
        Claim::new(
            "Per-process BN (DDP's default) loses accuracy at small per-process batches",
            format!("test error (%) at {small} images per process, bn minus syncbn"),
            &["bn", "syncbn"],
            Kind::Greater,
            minus(&err("bn"), &err("syncbn")),
            2.0,
            r.quick,
        ),
    ];
    let finding = format!(
        "With {small} images per process each per-process BatchNorm1d statistic pools {small} values; SyncBN pools the global batch's. {}",
        verdict_lines(&claims)
    );
    Ok(Analysis {
        title: "Synchronized BatchNorm across processes".into(),
        claims,
        claim: "Data-parallel training with per-process BN statistics suffers at small per-process batches; synchronized BN (statistics over the global batch) recovers the accuracy of BN with the global batch.".into(),
        finding,
        tables,
        plots,
    })
}

/// Any grid: one row per configuration, test accuracy bars.
fn compare(r: &StudyResults) -> Result<Analysis> {
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

fn ics(r: &StudyResults) -> Result<Analysis> {
    let norms = ["bn", "none"];
    let series_of = |norm: &str, f: &dyn Fn(&crate::studies::ics::IcsPoint) -> f64| {
        let runs: Vec<&[crate::studies::ics::IcsPoint]> = r
            .ics
            .iter()
            .filter(|x| x.norm == norm)
            .map(|x| x.points.as_slice())
            .collect();
        per_step(&runs, |p| p.step, f)
    };
    let acc: Vec<Series> = norms
        .iter()
        .map(|n| (n.to_string(), series_of(n, &|p| 100.0 * p.test_accuracy)))
        .collect();
    let mut plots = vec![Plot {
        file: "test_accuracy_vs_steps.svg".into(),
        caption: "Test accuracy against training steps, with and without BN".into(),
        svg: lines_svg(
            "Test accuracy against steps (sigmoid MLP, batch 60)",
            "training step",
            "test accuracy (%)",
            &acc,
            false,
        )?,
    }];
    let mut rows = Vec::new();
    let mut drift = BTreeMap::new();
    for n in norms {
        let pct: Vec<Series> = vec![
            ("15th percentile".into(), series_of(n, &|p| p.p15 as f64)),
            ("median".into(), series_of(n, &|p| p.p50 as f64)),
            ("85th percentile".into(), series_of(n, &|p| p.p85 as f64)),
        ];
        let title = format!(
            "Input to one last-hidden-layer sigmoid, {}",
            if n == "bn" { "with BN" } else { "without BN" }
        );
        plots.push(Plot {
            file: format!("sigmoid_input_{n}.svg"),
            caption: format!("15th/50th/85th percentiles of the sigmoid input over training ({n})"),
            svg: lines_svg(&title, "training step", "sigmoid input", &pct, false)?,
        });
        let median = &pct[1].1;
        let first_quarter = median.len() / 4;
        let late: Vec<f64> = median[first_quarter.max(1).min(median.len())..]
            .iter()
            .map(|p| p.1)
            .collect();
        let range = late.iter().cloned().fold(f64::MIN, f64::max) - late.iter().cloned().fold(f64::MAX, f64::min);
        let accs = &acc.iter().find(|s| s.0 == n).map(|s| s.1.clone()).unwrap_or_default();
        // (mean, spread over seeds) of the test accuracy at a fraction of training.
        let at = |q: f64| {
            accs.get(((accs.len().max(1) - 1) as f64 * q) as usize)
                .map_or((f64::NAN, f64::NAN), |p| (p.1, p.2))
        };
        drift.insert(n, (range, at(0.1).0, at(1.0).0));
        rows.push(vec![
            n.to_string(),
            fmt_mean(at(0.1), 2),
            fmt_mean(at(0.5), 2),
            fmt_mean(at(1.0), 2),
            format!("{range:.3}"),
        ]);
    }
    let (b, o) = (drift["bn"], drift["none"]);
    // Per seed: the median's range after the first quarter, and the accuracy at 10% of training.
    let per_run = |norm: &str, f: &dyn Fn(&crate::studies::ics::IcsRun) -> f64| -> Vec<f64> {
        (0..r.seeds as u64)
            .map(|s| r.ics.iter().find(|x| x.norm == norm && x.seed == s).map_or(f64::NAN, f))
            .collect()
    };
    let range_of = |x: &crate::studies::ics::IcsRun| {
        let late: Vec<f64> = x
            .points
            .iter()
            .skip((x.points.len() / 4).max(1))
            .map(|p| p.p50 as f64)
            .collect();
        late.iter().cloned().fold(f64::MIN, f64::max) - late.iter().cloned().fold(f64::MAX, f64::min)
    };
    let early_acc = |x: &crate::studies::ics::IcsRun| {
        x.points
            .get((x.points.len().max(1) - 1) / 10)
            .map_or(f64::NAN, |p| 100.0 * p.test_accuracy)
    };
    let (rb, rn) = (per_run("bn", &range_of), per_run("none", &range_of));
    let claims = vec![
        Claim::new(
            "BN keeps a hidden unit's input distribution steadier",
            "range of the median sigmoid input after the first quarter of training, reduction with BN (% of none's)",
            &["none", "bn"],
            Kind::Greater,
            rn.iter().zip(&rb).map(|(n, b)| 100.0 * (n - b) / n).collect(),
            20.0,
            r.quick,
        ),
        Claim::new(
            "BN trains faster",
            "test accuracy (%) at 10% of the steps, BN minus none",
            &["bn", "none"],
            Kind::Greater,
            minus(&per_run("bn", &early_acc), &per_run("none", &early_acc)),
            1.0,
            r.quick,
        ),
    ];
    let finding = format!(
        "Test accuracy after 10% of the steps: {:.2}% with BN, {:.2}% without; at the end: {:.2}% and {:.2}%. The median sigmoid input moves over a range of {:.3} with BN and {:.3} without after the first quarter of training. {}",
        b.1, o.1, b.2, o.2, b.0, o.0,
        verdict_lines(&claims)
    );
    Ok(Analysis {
        title: "Internal covariate shift: a hidden unit's input over training".into(),
        claims,
        claim: "BN paper (Ioffe & Szegedy 2015, Fig. 1): on MNIST, the 3-hidden-layer sigmoid MLP trains faster with BN, and the 15th/50th/85th percentiles of a last-layer sigmoid's input drift without BN but stay stable with it.".into(),
        finding,
        tables: vec![Table {
            caption: "Test accuracy (%) at 10%, 50% and 100% of training, and the range of the median sigmoid input after the first quarter".into(),
            header: vec!["norm".into(), "acc @10%".into(), "acc @50%".into(), "acc @100%".into(), "median range".into()],
            rows,
        }],
        plots,
    })
}

fn landscape(r: &StudyResults) -> Result<Analysis> {
    use crate::studies::landscape::Probe;
    let norms: Vec<&str> = ["bn", "none", "bn-noisy", "bn-l1", "bn-linf"]
        .into_iter()
        .filter(|n| r.landscape.iter().any(|x| x.norm == *n))
        .collect();
    // The plots start after step 0, as the claims do: the untrained net's probe is an order of
    // magnitude larger and would flatten the curves of training.
    let series_of = |norm: &str, f: &dyn Fn(&Probe) -> f64| {
        let trained: Vec<Vec<Probe>> = r
            .landscape
            .iter()
            .filter(|x| x.norm == norm)
            .map(|x| x.probes.iter().filter(|p| p.step > 0).cloned().collect())
            .collect();
        let runs: Vec<&[Probe]> = trained.iter().map(|v| v.as_slice()).collect();
        per_step(&runs, |p| p.step, f)
    };
    let mut loss_series = Vec::new();
    for &n in &norms {
        loss_series.push((format!("{n}: max loss along g"), series_of(n, &|p| p.loss_max)));
        loss_series.push((format!("{n}: min loss along g"), series_of(n, &|p| p.loss_min)));
    }
    let change: Vec<Series> = norms
        .iter()
        .map(|n| (n.to_string(), series_of(n, &|p| p.grad_change_max)))
        .collect();
    let beta: Vec<Series> = norms
        .iter()
        .map(|n| (n.to_string(), series_of(n, &|p| p.beta)))
        .collect();
    let plots = vec![
        Plot {
            file: "loss_landscape.svg".into(),
            caption: "Range of the loss at θ − ηg for η in [0.5, 4]·lr, over training (after step 0)".into(),
            svg: lines_svg(
                "Loss along the gradient direction (range over step sizes)",
                "training step",
                "loss",
                &loss_series,
                false,
            )?,
        },
        Plot {
            file: "gradient_predictiveness.svg".into(),
            caption: "Largest ‖∇L(θ − ηg) − ∇L(θ)‖ over the step sizes (lower: more predictive gradients)".into(),
            svg: lines_svg(
                "Gradient predictiveness",
                "training step",
                "max l2 change of the gradient",
                &change,
                false,
            )?,
        },
        Plot {
            file: "beta_smoothness.svg".into(),
            caption: "Effective β-smoothness: max ‖Δ∇L‖ / ‖ηg‖ over the step sizes".into(),
            svg: lines_svg("Effective beta-smoothness", "training step", "beta", &beta, false)?,
        },
    ];
    let mut rows = Vec::new();
    let mut avg = BTreeMap::new();
    for &n in &norms {
        // Per seed, the mean over its probes after step 0 (the probe at step 0 sees the
        // untrained net; the claim is about training); then mean ± spread over seeds.
        let runs: Vec<_> = r.landscape.iter().filter(|x| x.norm == n).collect();
        let over_seeds = |f: &dyn Fn(&Probe) -> f64| {
            let per_seed: Vec<f64> = runs
                .iter()
                .map(|x| {
                    mean_std(
                        &x.probes
                            .iter()
                            .filter(|p| p.step > 0)
                            .map(f)
                            .filter(|v| v.is_finite())
                            .collect::<Vec<_>>(),
                    )
                    .0
                })
                .filter(|v| v.is_finite())
                .collect();
            mean_std(&per_seed)
        };
        let range = over_seeds(&|p| p.loss_max - p.loss_min);
        let (c, b) = (over_seeds(&|p| p.grad_change_max), over_seeds(&|p| p.beta));
        let acc = mean_std(&runs.iter().map(|x| 100.0 * x.test_accuracy).collect::<Vec<_>>());
        let diverged = runs.iter().filter(|x| x.diverged).count();
        avg.insert(n, (range.0, c.0, b.0, acc.0));
        rows.push(vec![
            n.to_string(),
            fmt_mean(range, 4),
            fmt_mean(c, 4),
            fmt_mean(b, 3),
            fmt_mean(acc, 2),
            diverged.to_string(),
        ]);
    }
    let (b, o) = (avg["bn"], avg["none"]);
    // Per seed: the mean over its probes after step 0 of a landscape measure.
    let per_run = |norm: &str, f: &dyn Fn(&Probe) -> f64| -> Vec<f64> {
        (0..r.seeds as u64)
            .map(|s| {
                r.landscape
                    .iter()
                    .find(|x| x.norm == norm && x.seed == s && !x.diverged)
                    .map_or(f64::NAN, |x| {
                        mean_std(
                            &x.probes
                                .iter()
                                .filter(|p| p.step > 0)
                                .map(f)
                                .filter(|v| v.is_finite())
                                .collect::<Vec<_>>(),
                        )
                        .0
                    })
            })
            .collect()
    };
    let reduction = |f: &dyn Fn(&Probe) -> f64| -> Vec<f64> {
        per_run("none", f)
            .iter()
            .zip(per_run("bn", f))
            .map(|(n, b)| 100.0 * (n - b) / n)
            .collect()
    };
    let acc = |norm: &str| -> Vec<f64> {
        (0..r.seeds as u64)
            .map(|s| {
                r.landscape
                    .iter()
                    .find(|x| x.norm == norm && x.seed == s)
                    .map_or(f64::NAN, |x| if x.diverged { 10.0 } else { 100.0 * x.test_accuracy })
            })
            .collect()
    };
    let smoother = |what: &str, metric: &str, f: &dyn Fn(&Probe) -> f64| {
        Claim::new(
            format!("BN makes {what}"),
            format!("{metric}, mean over the probes after step 0: reduction with BN (% of none's)"),
            &["none", "bn"],
            Kind::Greater,
            reduction(f),
            10.0,
            r.quick,
        )
    };
    let mut claims = vec![
        smoother(
            "the loss along the gradient vary less",
            "range of the loss at θ − ηg",
            &|p| p.loss_max - p.loss_min,
        ),
        smoother(
            "gradients more predictive",
            "largest ‖∇L(θ − ηg) − ∇L(θ)‖",
            &|p| p.grad_change_max,
        ),
        smoother(
            "the landscape smoother (smaller effective β)",
            "effective β-smoothness",
            &|p| p.beta,
        ),
    ];
    for lp in ["bn-l1", "bn-linf"] {
        if norms.contains(&lp) {
            claims.push(Claim::new(
                format!("{lp} trains about as well as BN"),
                format!("final test accuracy (points), {lp} minus BN"),
                &[lp, "bn"],
                Kind::Equivalent,
                minus(&acc(lp), &acc("bn")),
                2.0,
                r.quick,
            ));
        }
    }
    if norms.contains(&"bn-noisy") {
        claims.push(Claim::new(
            "noisy BN (covariate shift put back) trains at least as well as no BN",
            "final test accuracy (points), bn-noisy minus none",
            &["bn-noisy", "none"],
            Kind::Greater,
            minus(&acc("bn-noisy"), &acc("none")),
            0.0,
            r.quick,
        ));
    }
    let finding = format!(
        "Averaged over the probes after step 0, the loss along the gradient varies over {:.4} with BN and {:.4} without; the gradient changes by up to {:.4} vs {:.4}; effective β-smoothness {:.3} vs {:.3}. Test accuracy {:.2}% with BN, {:.2}% without. {}",
        b.0, o.0, b.1, o.1, b.2, o.2, b.3, o.3,
        verdict_lines(&claims)
    );
    Ok(Analysis {
        title: "Loss landscape: is training with BN smoother?".into(),
        claims,
        claim: "Santurkar et al. 2018: BN's benefit comes mainly from a smoother loss landscape — a smaller range of loss along the gradient, more predictive gradients and a smaller effective β-smoothness (VGG on CIFAR-10, SGD lr 0.1).".into(),
        finding,
        tables: vec![Table {
            caption: "Means over the probes after step 0: loss range along g, largest gradient change, β-smoothness; final test accuracy".into(),
            header: vec!["norm".into(), "loss range".into(), "max ‖Δ∇L‖".into(), "β".into(), "test acc (%)".into(), "diverged".into()],
            rows,
        }],
        plots,
    })
}
