//! The internal-covariate-shift study (BN paper, Fig. 1): the 784-100-100-100-10 sigmoid MLP
//! with and without BN, batch 60, SGD; every few steps the test accuracy and the 15th, 50th
//! and 85th percentiles, over a fixed probe batch, of the input to one sigmoid of the last
//! hidden layer.

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::analysis::*;
use super::{Settings, Study, StudyOptions, StudyResults};
use crate::data::{load_split, resolve_data_dir, Dataset};
use crate::error::{Error, Result};
use crate::models::{Arch, Model, ModelSpec};
use crate::nn::norm_spec::NormSpec;
use crate::nn::Mode;
use crate::optim::{Optimizer, OptimizerConfig, OptimizerKind};
use crate::train::{evaluate, train_step};

/// One measurement during training.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IcsPoint {
    pub step: usize,
    #[serde(deserialize_with = "crate::studies::verdict::null_as_nan")]
    pub test_accuracy: f64,
    /// 15th, 50th, 85th percentile of the probed sigmoid's input.
    pub p15: f32,
    pub p50: f32,
    pub p85: f32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IcsRun {
    pub norm: String,
    pub seed: u64,
    pub diverged: bool,
    pub points: Vec<IcsPoint>,
}

fn percentile(sorted: &[f32], q: f64) -> f32 {
    if sorted.is_empty() {
        return f32::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Trains one MLP for `steps` and measures every `every` steps.
pub fn ics_run(
    norm: &'static str,
    seed: u64,
    train: &Dataset,
    test: &Dataset,
    steps: usize,
    every: usize,
) -> Result<IcsRun> {
    let spec = ModelSpec::new(Arch::Mlp, NormSpec::builtin(norm), train.shape, train.classes)?;
    let mut model = Model::build(&spec, seed)?;
    let mut opt = Optimizer::new(OptimizerConfig {
        kind: OptimizerKind::Sgd,
        lr: 0.5,
        momentum: 0.0,
        ..OptimizerConfig::default()
    });
    let input_norm = train.pixel_stats()?;
    // The last hidden layer's pre-activation: the layer just before the third Sigmoid.
    let probe_layer = model
        .net
        .layers
        .iter()
        .enumerate()
        .filter(|(_, (_, l))| l.kind() == "Sigmoid")
        .nth(2)
        .map(|(i, _)| i - 1)
        .ok_or_else(|| Error::invalid("mlp has no third sigmoid"))?;
    let probe_idx: Vec<usize> = (0..test.len().min(1000)).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x1C5);
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut cursor = order.len();
    let mut labels = Vec::new();
    let mut points = Vec::new();
    let mut diverged = false;
    for step in 0..=steps {
        if step % every == 0 || step == steps {
            let acc = evaluate(&mut model, test, input_norm, 1000)?.accuracy;
            let mut probe_labels = Vec::new();
            test.batch(&probe_idx, input_norm, model.input_mut(), &mut probe_labels)?;
            model.forward(Mode::Eval)?;
            let act = model
                .net
                .activation(probe_layer)
                .ok_or_else(|| Error::invalid("probe layer has no output"))?;
            let width = act.sample_len();
            let mut unit: Vec<f32> = act.data.iter().step_by(width).copied().collect();
            unit.sort_by(|a, b| a.total_cmp(b));
            points.push(IcsPoint {
                step,
                test_accuracy: acc,
                p15: percentile(&unit, 0.15),
                p50: percentile(&unit, 0.50),
                p85: percentile(&unit, 0.85),
            });
        }
        if step == steps {
            break;
        }
        if cursor + 60 > order.len() {
            order.shuffle(&mut rng);
            cursor = 0;
        }
        let idx = &order[cursor..cursor + 60];
        cursor += 60;
        train.batch(idx, input_norm, model.input_mut(), &mut labels)?;
        let (loss, _) = train_step(&mut model, &mut opt, &labels, train.classes, 0.5, 0.0)?;
        if !loss.is_finite() {
            diverged = true;
            break;
        }
    }
    Ok(IcsRun {
        norm: norm.into(),
        seed,
        diverged,
        points,
    })
}

/// The study: both MLPs for every seed.
pub fn run(
    opts: &StudyOptions,
    progress: &mut dyn FnMut(usize, usize, &str) -> Result<()>,
) -> Result<(Vec<IcsRun>, BTreeMap<String, String>)> {
    let dir = resolve_data_dir(opts.data.as_deref())?;
    let mut train = load_split(&dir, true)?;
    let mut test = load_split(&dir, false)?;
    let (steps, every, ntrain, ntest) = if opts.quick {
        (1500, 100, 12000, 1000)
    } else {
        (20000, 500, 60000, 5000)
    };
    train.truncate(ntrain);
    test.truncate(ntest);
    let mut runs = Vec::new();
    let total = 2 * opts.seeds;
    for (k, (norm, seed)) in ["bn", "none"]
        .iter()
        .flat_map(|n| (0..opts.seeds as u64).map(move |s| (*n, s)))
        .enumerate()
    {
        progress(k, total, &format!("mlp norm={norm} seed {seed}"))?;
        runs.push(ics_run(norm, seed, &train, &test, steps, every)?);
    }
    progress(total, total, "done")?;
    let mut settings = BTreeMap::new();
    settings.insert(
        "model".into(),
        "mlp 784-100-100-100-10, sigmoid (BN after each hidden linear layer, or none)".into(),
    );
    settings.insert(
        "optimizer".into(),
        "SGD lr 0.5, batch 60 (the BN paper's MNIST setting, on Fashion-MNIST)".into(),
    );
    settings.insert("steps".into(), format!("{steps}, measured every {every}"));
    settings.insert(
        "probe".into(),
        "input to the first sigmoid of the last hidden layer, over the first 1000 test images".into(),
    );
    settings.insert("training images (at most)".into(), ntrain.to_string());
    Ok((runs, settings))
}

pub struct Ics;

impl Study for Ics {
    fn name(&self) -> &'static str {
        "ics"
    }

    fn about(&self) -> &'static str {
        "the BN paper's sigmoid MLP with and without BN: one hidden unit's input distribution over training"
    }

    /// Its own training loop with probes, instead of a grid.
    fn run(
        &self,
        opts: &StudyOptions,
        progress: &mut dyn FnMut(usize, usize, &str) -> Result<()>,
        results: &mut StudyResults,
    ) -> Result<(Settings, Option<crate::files::RunLock>)> {
        let (runs, settings, lock) = super::study::own_loop(opts, || run(opts, progress))?;
        results.ics = runs;
        Ok((settings, Some(lock)))
    }

    fn analyze(&self, r: &StudyResults) -> Result<Analysis> {
        ics(r)
    }
}

pub(crate) fn ics(r: &StudyResults) -> Result<Analysis> {
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
