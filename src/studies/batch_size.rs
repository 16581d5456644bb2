//! The batch-size study: test error of BN, GN, LN, IN, BRN, Ghost BN and no norm at batch sizes 2..128 (GN paper, Table 2). Its plan, its probes and its reading of the runs.

use super::analysis::*;
use super::*;

/// The batch-size study's models and their norms: the within-sample norm each is compared
/// with first (LayerNorm for the MLP, GroupNorm for the conv net), then BRN and Ghost BN.
pub const BATCH_SIZE_MODELS: [(&str, &[&str]); 2] = [
    ("mlp", &["bn", "layernorm", "brn:warmup=200", "ghost:2", "none"]),
    (
        "vgg:16,M,32,M,64,M",
        &["bn", "gn:8", "brn:warmup=200", "ghost:2", "none"],
    ),
];

pub struct BatchSize;

impl Study for BatchSize {
    fn name(&self) -> &'static str {
        "batch-size"
    }

    fn about(&self) -> &'static str {
        "test error of BN, GN, LN, IN, BRN, Ghost BN and no norm at batch sizes 2..128 (GN paper, Table 2)"
    }

    fn plan(&self, opts: &StudyOptions) -> Result<Plan> {
        let mut out = Vec::new();
        let mut settings = Settings::new();
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
                    config.model = Arch::builtin(model);
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
            "0.02 x batch / 32, SGD momentum 0.9; linear warm-up over the first epoch, then cosine annealing per epoch"
                .into(),
        );
        settings.insert("epochs".into(), format!("{epochs} at every batch size"));
        settings.insert("training images (at most)".into(), train.to_string());
        settings.insert("test images (at most)".into(), test.to_string());
        settings.insert(
                "BN evaluations".into(),
                "running (EMA) statistics; population statistics over up to 100 training batches of 128 after training; each test batch's own statistics at the training batch size".into(),
            );
        Ok((out, settings))
    }

    fn analyze(&self, r: &StudyResults) -> Result<Analysis> {
        batch_size(r)
    }
}

/// Values pooled into each statistic of a per-channel BN at batch `b`, per norm layer.
pub(crate) fn pooled_values(model: &str, b: usize) -> String {
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

pub(crate) fn batch_size(r: &StudyResults) -> Result<Analysis> {
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
        // The arms take different numbers of steps at different rates: their final errors
        // compare what each can reach only once both curves have flattened.
        let flat = |norm: &str| {
            let arms: Vec<(String, Vec<&RunRecord>)> = [b_small, b_ref]
                .iter()
                .map(|b| {
                    (
                        format!("{norm} at batch {b}"),
                        select(&runs, &[("norm", norm), ("batch_size", &b.to_string())]),
                    )
                })
                .collect();
            (
                format!("{norm}'s training curves at batch {b_small} and {b_ref} flattened (last epoch's fall under {FLAT_SHARE}% of the whole)"),
                unflattened(&arms),
            )
        };
        let (requires, broken) = flat("bn");
        claims.push(
            Claim::new(
                format!("BN degrades at small batches ({model})"),
                metric("bn"),
                &[&format!("bn @ {b_small}"), &format!("bn @ {b_ref}")],
                Kind::Greater,
                minus(&cell("bn", b_small), &cell("bn", b_ref)),
                2.0,
                r.quick,
            )
            .given(requires, broken),
        );
        if let Some(within) = norms
            .iter()
            .find(|n| n.starts_with("gn") || n.starts_with("layernorm") || n.starts_with("ln"))
        {
            let (requires, broken) = flat(within);
            claims.push(
                Claim::new(
                    format!("{within} does not degrade at small batches ({model})"),
                    metric(within),
                    &[&format!("{within} @ {b_small}"), &format!("{within} @ {b_ref}")],
                    Kind::Equivalent,
                    minus(&cell(within, b_small), &cell(within, b_ref)),
                    2.0,
                    r.quick,
                )
                .given(requires, broken),
            );
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
