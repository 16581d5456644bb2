//! The regularization study: does BN's batch noise regularize? Arms with and without BN, with
//! smaller ghost batches, and with and without dropout are compared at matched fit (the epoch
//! at which each run's loss on its own training images first reaches a common target), in a
//! regime that overfits. Its plan and its reading of the runs.
//!
//! Why matched fit: after a fixed budget a net that has not fit its training set has no room to
//! overfit, so a smaller train/test gap says nothing about regularization. Each arm is read at
//! the point where it fits its training images equally well; an arm that never gets there makes
//! the comparison impossible, and the claim says so instead of giving a verdict.

use super::analysis::*;
use super::*;
use crate::plot::{lines_marked_svg, Mark};

pub struct Regularization;

/// The loss (eval mode, on the run's own training images) that defines matched fit.
pub const FIT_TARGET: f64 = 0.05;

/// The model: wide enough to reach 100% training accuracy on the subset without BN.
pub const REGULARIZATION_MODEL: &str = "vgg:64,M,128,M";

/// Each arm: (norm, dropout before the classifier).
const ARMS: [(&str, &str); 5] = [
    ("none", "0"),
    ("bn", "0"),
    ("ghost:16", "0"),
    ("none", "0.5"),
    ("bn", "0.5"),
];

/// The practical threshold of every claim: a reduction of the test loss at matched fit by 5%
/// of the other arm's. The claims read test loss rather than accuracy: at a constant rate the
/// test accuracy of these nets moves by about a point from one epoch to the next, while the
/// loss, the quantity the fit is matched in, moves smoothly (both are in the table).
const THRESHOLD: f64 = 5.0;

impl Study for Regularization {
    fn name(&self) -> &'static str {
        "regularization"
    }

    fn about(&self) -> &'static str {
        "does BN regularize? no BN, BN, ghost BN and dropout compared at matched fit, in a regime that overfits"
    }

    fn plan(&self, opts: &StudyOptions) -> Result<Plan> {
        let (epochs, train, test) = if opts.quick { (3, 512, 500) } else { (45, 2048, 2000) };
        let mut out = Vec::new();
        for (norm, dropout) in ARMS {
            let mut config = base_config(opts, epochs, train, test);
            config.model = Arch::builtin(REGULARIZATION_MODEL);
            config.norm = NormSpec::builtin(norm);
            config.dropout = dropout.parse().unwrap_or(0.0);
            config.eval_train = true;
            out.push(Planned {
                labels: labels(&[("norm", norm.into()), ("dropout", dropout.into())]),
                config,
                bn_evals: false,
            });
        }
        let mut settings = Settings::new();
        settings.insert(
            "model".into(),
            format!(
                "{REGULARIZATION_MODEL} (two 3x3 convs of 64 and 128 filters, norm+ReLU, max-pools, dropout, linear)"
            ),
        );
        settings.insert(
            "optimizer".into(),
            "Adam lr 1e-3, batch 128, constant rate, no weight decay".into(),
        );
        settings.insert("epochs".into(), format!("{epochs} (the budget every arm gets)"));
        settings.insert(
            "training images".into(),
            format!("{train} (few, so that every arm can fit them and overfit)"),
        );
        settings.insert("test images (at most)".into(), test.to_string());
        settings.insert(
            "matched fit".into(),
            format!(
                "the first epoch at which the loss in eval mode on the run's own training images is at most {FIT_TARGET}; test loss and accuracy are read there (mean of that epoch and its two neighbours); the claims compare test losses"
            ),
        );
        settings.insert(
            "ghost batches".into(),
            "ghost:16: BN statistics over 16 images of each batch of 128".into(),
        );
        Ok((out, settings))
    }

    fn analyze(&self, r: &StudyResults) -> Result<Analysis> {
        regularization(r)
    }
}

/// One arm's name in tables and plots.
fn arm_name(norm: &str, dropout: &str) -> String {
    if dropout == "0" {
        norm.to_string()
    } else {
        format!("{norm} + dropout {dropout}")
    }
}

/// The index of the first epoch whose eval-mode training loss is at most `FIT_TARGET`.
pub(crate) fn matched_epoch(run: &RunRecord) -> Option<usize> {
    run.epochs
        .iter()
        .position(|e| e.fit.is_some_and(|f| f.loss <= FIT_TARGET))
}

/// A run read at its matched fit: (epoch, training accuracy %, test accuracy %, test loss),
/// the accuracies and loss the mean over the matched epoch and its two neighbours (with a
/// constant rate, test accuracy moves by a point from one epoch to the next).
fn at_match(run: &RunRecord) -> Option<(usize, f64, f64, f64)> {
    let i = matched_epoch(run)?;
    let window = &run.epochs[i.saturating_sub(1)..(i + 2).min(run.epochs.len())];
    let n = window.len() as f64;
    let mean = |f: &dyn Fn(&EpochMetrics) -> f64| window.iter().map(f).sum::<f64>() / n;
    Some((
        i + 1,
        mean(&|e| 100.0 * e.fit.map_or(f64::NAN, |f| f.accuracy)),
        mean(&|e| 100.0 * e.test_accuracy),
        mean(&|e| e.test_loss),
    ))
}

/// Mean ± std over the seeds of one value per epoch, up to the shortest run.
fn curve(runs: &[&RunRecord], value: &dyn Fn(&EpochMetrics) -> f64) -> Vec<(f64, f64, f64)> {
    let n = runs.iter().map(|x| x.epochs.len()).min().unwrap_or(0);
    (0..n)
        .map(|i| {
            let v: Vec<f64> = runs
                .iter()
                .map(|x| value(&x.epochs[i]))
                .filter(|v| v.is_finite())
                .collect();
            let (m, s) = mean_std(&v);
            ((i + 1) as f64, m, s)
        })
        .collect()
}

pub(crate) fn regularization(r: &StudyResults) -> Result<Analysis> {
    let epochs_budget = r.runs.iter().map(|x| x.epochs.len()).max().unwrap_or(0);
    let cell = |norm: &str, dropout: &str| select(&r.runs, &[("norm", norm), ("dropout", dropout)]);
    let arms: Vec<(&str, &str)> = ARMS.iter().copied().filter(|(n, d)| !cell(n, d).is_empty()).collect();

    // Per arm: its matched points and its curves.
    let (mut match_rows, mut end_rows, mut bars) = (Vec::new(), Vec::new(), Vec::new());
    let (mut fit_series, mut test_series): (Vec<Series>, Vec<Series>) = (Vec::new(), Vec::new());
    let (mut fit_marks, mut test_marks): (Vec<Mark>, Vec<Mark>) = (Vec::new(), Vec::new());
    let mut reached_text = Vec::new();
    for (k, &(norm, dropout)) in arms.iter().enumerate() {
        let runs = cell(norm, dropout);
        let name = arm_name(norm, dropout);
        let matched: Vec<(usize, f64, f64, f64)> = runs.iter().filter_map(|x| at_match(x)).collect();
        let col = |f: fn(&(usize, f64, f64, f64)) -> f64| mean_std(&matched.iter().map(f).collect::<Vec<_>>());
        let missing = runs.len() - matched.len();
        let epoch = col(|m| m.0 as f64);
        let reached = if matched.is_empty() {
            format!("never ({} runs)", runs.len())
        } else if missing > 0 {
            format!("{} ({missing} of {} never)", fmt_mean(epoch, 1), runs.len())
        } else {
            fmt_mean(epoch, 1)
        };
        reached_text.push(if matched.is_empty() {
            format!("{name} never in {epochs_budget} epochs")
        } else {
            format!("{name} at epoch {reached}")
        });
        let (train_acc, test_acc, test_loss) = (col(|m| m.1), col(|m| m.2), col(|m| m.3));
        let gap = mean_std(&matched.iter().map(|m| m.1 - m.2).collect::<Vec<_>>());
        match_rows.push(vec![
            name.clone(),
            reached,
            fmt_mean(train_acc, 2),
            fmt_mean(test_acc, 2),
            fmt_mean(test_loss, 3),
            fmt_mean(gap, 2),
        ]);
        if !matched.is_empty() {
            bars.push((name.clone(), test_loss.0, test_loss.1));
        }
        let last = |f: fn(&RunRecord) -> f64| mean_std(&runs.iter().map(|x| f(x)).collect::<Vec<_>>());
        let best = mean_std(
            &runs
                .iter()
                .map(|x| {
                    x.epochs
                        .iter()
                        .map(|e| 100.0 * e.test_accuracy)
                        .fold(f64::NAN, f64::max)
                })
                .collect::<Vec<_>>(),
        );
        let fit_loss = |x: &RunRecord| x.epochs.last().and_then(|e| e.fit).map_or(f64::NAN, |f| f.loss);
        end_rows.push(vec![
            name.clone(),
            fmt_mean(last(fit_loss), 4),
            fmt_mean(last(|x| 100.0 * x.test_accuracy), 2),
            fmt_mean(last(|x| x.test_loss), 3),
            fmt_mean(best, 2),
        ]);
        fit_series.push((
            name.clone(),
            curve(&runs, &|e| e.fit.map_or(f64::NAN, |f| f.loss.log10())),
        ));
        test_series.push((name, curve(&runs, &|e| e.test_loss)));
        if !matched.is_empty() {
            let fit_at = mean_std(
                &runs
                    .iter()
                    .filter_map(|x| matched_epoch(x).and_then(|i| x.epochs[i].fit).map(|f| f.loss))
                    .collect::<Vec<_>>(),
            );
            fit_marks.push((k, epoch.0, fit_at.0.log10()));
            test_marks.push((k, epoch.0, test_loss.0));
        }
    }
    if epochs_budget > 0 {
        fit_series.push((
            format!("target {FIT_TARGET}"),
            vec![
                (1.0, FIT_TARGET.log10(), 0.0),
                (epochs_budget as f64, FIT_TARGET.log10(), 0.0),
            ],
        ));
    }

    // The claims, each read at matched fit and fair only when its arms got there.
    let loss = |norm: &str, dropout: &str| {
        per_seed(&cell(norm, dropout), r.seeds, &|x| {
            at_match(x).map_or(f64::NAN, |m| m.3)
        })
    };
    // Per seed, how much lower (% of `base`'s) `arm`'s test loss is than `base`'s.
    let reduction = |arm: (&str, &str), base: (&str, &str)| -> Vec<f64> {
        loss(arm.0, arm.1)
            .iter()
            .zip(loss(base.0, base.1))
            .map(|(a, b)| 100.0 * (b - a) / b)
            .collect()
    };
    let never = |arms: &[(&str, &str)]| -> Option<String> {
        let lines: Vec<String> = arms
            .iter()
            .filter_map(|&(norm, dropout)| {
                let runs = cell(norm, dropout);
                let seeds: Vec<String> = (0..r.seeds as u64)
                    .filter(|&s| {
                        runs.iter()
                            .find(|x| x.seed == s)
                            .is_none_or(|x| matched_epoch(x).is_none())
                    })
                    .map(|s| s.to_string())
                    .collect();
                (!seeds.is_empty()).then(|| {
                    format!(
                        "{} never reached training loss {FIT_TARGET} in {epochs_budget} epochs (seed {}): it has no matched point, so the comparison is not possible",
                        arm_name(norm, dropout),
                        seeds.join(", ")
                    )
                })
            })
            .collect();
        (!lines.is_empty()).then(|| lines.join("; "))
    };
    let requires = |arms: &[(&str, &str)]| {
        let names: Vec<String> = arms.iter().map(|&(n, d)| arm_name(n, d)).collect();
        format!(
            "matched fit: {} reach training loss {FIT_TARGET} on every seed",
            names.join(", ")
        )
    };
    let metric =
        |what: &str| format!("test loss at the epoch each run's training loss first reaches {FIT_TARGET}: {what}");
    // `arm` lowers `base`'s test loss at matched fit, fair only if both reached it.
    let lowers = |claim: &str, what: &str, arm: (&str, &str), base: (&str, &str)| {
        let both = [base, arm];
        Claim::new(
            claim,
            metric(what),
            &[&arm_name(arm.0, arm.1), &arm_name(base.0, base.1)],
            Kind::Greater,
            reduction(arm, base),
            THRESHOLD,
            r.quick,
        )
        .given(requires(&both), never(&both))
    };
    let mut claims = vec![
        lowers(
            "BN regularizes: at matched fit, a lower test loss than without BN",
            "reduction with BN (% of none's)",
            ("bn", "0"),
            ("none", "0"),
        ),
        lowers(
            "Smaller ghost batches (more noise) regularize more",
            "reduction with ghost:16 (% of BN's over the whole batch of 128)",
            ("ghost:16", "0"),
            ("bn", "0"),
        ),
    ];
    let regime = lowers(
        "The regime needs regularization: dropout helps the net without BN",
        "reduction with dropout 0.5, no BN (% of none's)",
        ("none", "0.5"),
        ("none", "0"),
    );
    let four = [("none", "0"), ("none", "0.5"), ("bn", "0"), ("bn", "0.5")];
    let less = {
        let broken = never(&four).or_else(|| {
            (regime.verdict != "agrees" && !r.quick).then(|| {
                format!(
                    "dropout does not clearly help the net without BN here ({}), so there is no benefit for BN to shrink",
                    regime.verdict
                )
            })
        });
        Claim::new(
            "Dropout helps a BN net less than a net without BN",
            metric("dropout's reduction without BN minus its reduction with BN (points of %)"),
            &["none + dropout 0.5", "none", "bn + dropout 0.5", "bn"],
            Kind::Greater,
            minus(
                &reduction(("none", "0.5"), ("none", "0")),
                &reduction(("bn", "0.5"), ("bn", "0")),
            ),
            THRESHOLD,
            r.quick,
        )
        .given(
            format!(
                "{}; and dropout helps the net without BN (the claim above agrees)",
                requires(&four)
            ),
            broken,
        )
    };
    claims.push(regime);
    claims.push(less);

    let finding = format!(
        "Training loss (eval mode, on the run's own training images) first reached {FIT_TARGET}: {}. {}",
        reached_text.join("; "),
        verdict_lines(&claims)
    );
    let fit_svg = lines_marked_svg(
        "Loss on the training images (eval mode) per epoch",
        "epoch",
        "log10 training loss",
        &fit_series,
        false,
        &fit_marks,
        "matched fit",
    )?;
    let test_svg = lines_marked_svg(
        "Test loss per epoch",
        "epoch",
        "test loss",
        &test_series,
        false,
        &test_marks,
        "matched fit",
    )?;
    let bars_svg = bars_svg(
        &format!("Test loss at matched fit (training loss {FIT_TARGET})"),
        "test loss",
        &bars,
    )?;
    Ok(Analysis {
        title: "Regularization: does BN's batch noise regularize, at matched fit?".into(),
        claims,
        claim: "The articles: BN has some regularizing effect from the noise of batch statistics (less overfitting, less need for dropout), and combines with dropout and L1/L2 penalties. The noise story predicts more regularization from smaller (ghost) batches.".into(),
        finding,
        tables: vec![
            Table {
                caption: format!(
                    "At matched fit: the first epoch each run's training loss (eval mode) is at most {FIT_TARGET}, and its accuracies there (each run: mean of that epoch and its neighbours; then mean ± std over seeds; gap = train − test accuracy, points)"
                ),
                header: vec![
                    "arm".into(),
                    "epoch reached".into(),
                    "train acc".into(),
                    "test acc".into(),
                    "test loss".into(),
                    "gap".into(),
                ],
                rows: match_rows,
            },
            Table {
                caption: format!("At the end of the budget ({epochs_budget} epochs), for the curves' sake: a longer run overfits further"),
                header: vec![
                    "arm".into(),
                    "train loss (eval)".into(),
                    "test acc".into(),
                    "test loss".into(),
                    "best test acc".into(),
                ],
                rows: end_rows,
            },
        ],
        plots: vec![
            Plot {
                file: "training_loss.svg".into(),
                caption: format!(
                    "log10 of the loss on the training images in eval mode per epoch (mean; bars: std over seeds), the target {FIT_TARGET} and where each arm first reached it (mean epoch)"
                ),
                svg: fit_svg,
            },
            Plot {
                file: "test_loss.svg".into(),
                caption: "Test loss per epoch; the diamonds mark each arm's matched fit: past it, the net overfits".into(),
                svg: test_svg,
            },
            Plot {
                file: "matched_test_loss.svg".into(),
                caption: "Test loss at matched fit per arm, what the claims compare (bars: std over seeds)".into(),
                svg: bars_svg,
            },
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::Fit;

    /// A run whose eval-mode training loss falls by `rate` per epoch from 1 and whose test
    /// loss is `test` throughout.
    fn run(norm: &str, dropout: &str, seed: u64, rate: f64, test: f64) -> RunRecord {
        let epochs = (1..=20)
            .map(|e| {
                let loss = (1.0 - rate * e as f64).max(0.001);
                EpochMetrics {
                    epoch: e,
                    lr: 1e-3,
                    train_loss: loss,
                    train_accuracy: 0.9,
                    test_loss: test,
                    test_accuracy: 0.87 + 0.001 * seed as f64,
                    seconds: 1.0,
                    images_per_sec: 1.0,
                    communication_seconds: 0.0,
                    data_wait_seconds: 0.0,
                    loader_images_per_sec: 0.0,
                    skipped_images: 0,
                    decoded_images: 0,
                    fit: Some(Fit {
                        loss,
                        accuracy: 1.0 - loss / 10.0,
                    }),
                }
            })
            .collect();
        RunRecord {
            labels: labels(&[("norm", norm.into()), ("dropout", dropout.into())]),
            seed,
            status: "complete".into(),
            epochs,
            steps_per_epoch: 16,
            test_accuracy: test,
            test_loss: 0.4,
            train_accuracy: 1.0,
            train_loss: 0.001,
            seconds: 1.0,
            bn_evals: None,
        }
    }

    fn results(none_dropout_rate: f64) -> StudyResults {
        let mut runs = Vec::new();
        for seed in 0..3 {
            runs.push(run("none", "0", seed, 0.06, 0.5));
            runs.push(run("bn", "0", seed, 0.1, 0.4));
            runs.push(run("ghost:16", "0", seed, 0.1, 0.399));
            runs.push(run("none", "0.5", seed, none_dropout_rate, 0.45));
            runs.push(run("bn", "0.5", seed, 0.1, 0.396));
        }
        StudyResults {
            study: "regularization".into(),
            quick: false,
            seeds: 3,
            settings: Settings::new(),
            runs,
            ics: Vec::new(),
            landscape: Vec::new(),
            seconds: 1.0,
            claims: Vec::new(),
            gradients: Vec::new(),
            gates: Vec::new(),
            kernels: Vec::new(),
        }
    }

    #[test]
    fn arms_are_read_where_their_training_loss_first_reaches_the_target() {
        let r = results(0.05);
        // 1 − 0.06·16 = 0.04 ≤ 0.05 first at epoch 16; 1 − 0.1·10 = 0 at epoch 10.
        assert_eq!(matched_epoch(&r.runs[0]), Some(15));
        assert_eq!(matched_epoch(&r.runs[1]), Some(9));
        let a = regularization(&r).unwrap();
        let verdict = |name: &str| a.claims.iter().find(|c| c.claim.starts_with(name)).unwrap().clone();
        // (0.5 − 0.4) / 0.5: 20% lower with BN.
        let bn = verdict("BN regularizes");
        assert!((bn.mean_difference - 20.0).abs() < 1e-6, "{bn:?}");
        assert_eq!(bn.verdict, "agrees");
        assert!(!bn.confounded());
        // ghost:16's is 0.25% lower: below the threshold, so the claimed effect is absent.
        assert_eq!(verdict("Smaller ghost").verdict, "disagrees");
        assert_eq!(verdict("The regime").verdict, "agrees");
        // Dropout lowers the test loss by 10% without BN, by 1% with it.
        let less = verdict("Dropout helps a BN net less");
        assert!((less.mean_difference - 9.0).abs() < 1e-6, "{less:?}");
        assert_eq!(less.verdict, "agrees");
        assert!(a.plots.iter().any(|p| p.svg.contains("matched fit")));
    }

    #[test]
    fn an_arm_that_never_fits_makes_its_comparisons_confounded() {
        // none + dropout never gets below 1 − 0.04·20 = 0.2.
        let a = regularization(&results(0.04)).unwrap();
        let verdict = |name: &str| a.claims.iter().find(|c| c.claim.starts_with(name)).unwrap().clone();
        for name in ["The regime", "Dropout helps a BN net less"] {
            let c = verdict(name);
            assert!(c.confounded(), "{c:?}");
            assert!(
                c.verdict.starts_with("inconclusive (confounded: none + dropout 0.5 never reached training loss 0.05 in 20 epochs (seed 0, 1, 2)"),
                "{}",
                c.verdict
            );
        }
        // The other comparisons do not involve that arm.
        assert_eq!(verdict("BN regularizes").verdict, "agrees");
        assert!(
            a.finding.contains("none + dropout 0.5 never in 20 epochs"),
            "{}",
            a.finding
        );
    }
}
