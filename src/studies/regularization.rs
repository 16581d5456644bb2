//! The regularization study: train/test gap with and without BN, dropout and weight decay. Its plan, its probes and its reading of the runs.

use super::analysis::*;
use super::*;

pub struct Regularization;

impl Study for Regularization {
    fn name(&self) -> &'static str {
        "regularization"
    }

    fn about(&self) -> &'static str {
        "train/test gap with and without BN, dropout and weight decay"
    }

    fn plan(&self, opts: &StudyOptions) -> Result<Plan> {
        let mut out = Vec::new();
        let mut settings = Settings::new();
        let (epochs, train, test) = if opts.quick { (2, 1024, 500) } else { (10, 4096, 2000) };
        for norm in ["bn", "none"] {
            for dropout in [0.0f32, 0.5] {
                for wd in [0.0f64, 5e-4] {
                    let mut config = base_config(opts, epochs, train, test);
                    config.norm = NormSpec::builtin(norm);
                    config.dropout = dropout;
                    config.optimizer.weight_decay = wd;
                    let l = labels(&[
                        ("norm", norm.into()),
                        ("dropout", dropout.to_string()),
                        ("weight_decay", wd.to_string()),
                    ]);
                    out.push(Planned {
                        labels: l,
                        config,
                        bn_evals: false,
                    });
                }
            }
        }
        settings.insert("optimizer".into(), "Adam lr 1e-3, batch 128 (L2 weight decay)".into());
        settings.insert("epochs".into(), epochs.to_string());
        settings.insert(
            "training images".into(),
            format!("{train} (small, so that models can overfit)"),
        );
        settings.insert("test images (at most)".into(), test.to_string());

        settings.insert(
            "model".into(),
            "vgg:16,M,32,M (two conv layers, BN+ReLU, max-pool, linear)".into(),
        );
        Ok((out, settings))
    }

    fn analyze(&self, r: &StudyResults) -> Result<Analysis> {
        regularization(r)
    }
}

pub(crate) fn regularization(r: &StudyResults) -> Result<Analysis> {
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
