//! The learning-rate study: with and without BN across learning rates spanning 100x and three init scales: divergence, accuracy, speed. Its plan, its probes and its reading of the runs.

use super::analysis::*;
use super::*;

/// The learning-rate study's net: six conv layers.
pub const LR_MODEL: &str = "vgg:16,16,M,32,32,M,64,64,M";

pub struct LearningRate;

impl Study for LearningRate {
    fn name(&self) -> &'static str {
        "learning-rate"
    }

    fn about(&self) -> &'static str {
        "with and without BN across learning rates spanning 100x and three init scales: divergence, accuracy, speed"
    }

    fn plan(&self, opts: &StudyOptions) -> Result<Plan> {
        let mut out = Vec::new();
        let mut settings = Settings::new();
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
                    config.model = Arch::builtin(LR_MODEL);
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
        Ok((out, settings))
    }

    fn probe(&self, planned: &[Planned], results: &mut StudyResults, opts: &StudyOptions) -> Result<()> {
        results.gradients = learning_rate_gradients(planned, &results.runs, opts)?;
        Ok(())
    }

    fn analyze(&self, r: &StudyResults) -> Result<Analysis> {
        learning_rate(r)
    }
}

/// The gradient probe of the learning-rate study: for each norm and seed, at initialization
/// (init scale 1) and for the final model trained at the middle rate.
pub(crate) fn learning_rate_gradients(
    planned: &[Planned],
    runs: &[RunRecord],
    opts: &StudyOptions,
) -> Result<Vec<gradients::GradientNorms>> {
    let dir = resolve_data_dir(opts.data.as_deref())?;
    let train_set = crate::data::load_split(&dir, true)?;
    let input_norm = train_set.pixel_stats()?;
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

pub(crate) fn learning_rate(r: &StudyResults) -> Result<Analysis> {
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
pub(crate) fn gradient_analysis(r: &StudyResults) -> Result<(Option<Plot>, Vec<Claim>)> {
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
pub(crate) const FAIL_ACCURACY: f64 = 50.0;

/// The learning-rate study's claims, per seed at init scale 1 unless stated.
pub(crate) fn learning_rate_claims(r: &StudyResults, lrs: &[f64], target: f64) -> Vec<Claim> {
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
    // The highest rate is measured only where the grid brackets it: an arm that still learns
    // at the grid's top rate has its limit somewhere above. Without BN that leaves nothing
    // measured; with BN the difference is a lower bound, which can confirm the claim but not
    // refute it.
    let still_learns_at_top = |norm: &str| -> Vec<u64> {
        let Some(&top) = lrs.last() else { return Vec::new() };
        (0..r.seeds as u64)
            .filter(|&s| {
                cell(norm, "1", top)
                    .iter()
                    .any(|x| x.seed == s && acc_of(x) >= FAIL_ACCURACY)
            })
            .collect()
    };
    let top = lrs.last().copied().unwrap_or(f64::NAN);
    let higher = Claim::new(
        "BN trains at higher learning rates",
        format!("log10 of the highest rate reaching {FAIL_ACCURACY}% test accuracy, BN minus none (init scale 1)"),
        &["bn", "none"],
        Kind::Greater,
        minus(&highest("bn"), &highest("none")),
        0.3,
        r.quick,
    );
    let seeds_text = |s: &[u64]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ");
    let (none_top, bn_top) = (still_learns_at_top("none"), still_learns_at_top("bn"));
    let broken = if !none_top.is_empty() {
        Some(format!(
            "none still reaches {FAIL_ACCURACY}% at the grid's highest rate {top} (seed {}): its limit lies above the grid",
            seeds_text(&none_top)
        ))
    } else if !bn_top.is_empty() && higher.verdict != "agrees" {
        Some(format!(
            "bn still reaches {FAIL_ACCURACY}% at the grid's highest rate {top} (seed {}): the difference is only a lower bound",
            seeds_text(&bn_top)
        ))
    } else {
        None
    };
    vec![
        higher.given(
            "the grid brackets the highest rate: none fails at the grid's top rate (and so does BN, unless the lower bound already agrees)",
            broken,
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
