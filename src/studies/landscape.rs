//! The loss-landscape study (Santurkar et al. 2018): while a VGG-style net trains with and
//! without BN, at regular steps take the batch gradient g and, for step sizes η in
//! [0.5, 4]·lr, measure the loss at θ − ηg (its range: how smooth the landscape is along g),
//! the gradient change ‖∇L(θ − ηg) − g‖ (gradient predictiveness) and the effective
//! β-smoothness max ‖∇L(θ − ηg) − g‖ / ‖ηg‖. Parameters and BN buffers are restored after
//! each probe, so training itself is unaffected.

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::analysis::*;
use super::{Settings, Study, StudyOptions, StudyResults};
use crate::data::{load_split, resolve_data_dir, Dataset};
use crate::error::Result;
use crate::models::{Arch, Model, ModelSpec};
use crate::nn::norm_spec::NormSpec;
use crate::nn::BufferMut;
use crate::optim::{Optimizer, OptimizerConfig, OptimizerKind};
use crate::train::{evaluate, loss_and_grad};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Probe {
    pub step: usize,
    #[serde(deserialize_with = "crate::studies::verdict::null_as_nan")]
    pub loss: f64,
    #[serde(deserialize_with = "crate::studies::verdict::null_as_nan")]
    pub loss_min: f64,
    #[serde(deserialize_with = "crate::studies::verdict::null_as_nan")]
    pub loss_max: f64,
    #[serde(deserialize_with = "crate::studies::verdict::null_as_nan")]
    pub grad_change_min: f64,
    #[serde(deserialize_with = "crate::studies::verdict::null_as_nan")]
    pub grad_change_max: f64,
    #[serde(deserialize_with = "crate::studies::verdict::null_as_nan")]
    pub beta: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LandscapeRun {
    pub norm: String,
    pub seed: u64,
    pub diverged: bool,
    pub probes: Vec<Probe>,
    #[serde(deserialize_with = "crate::studies::verdict::null_as_nan")]
    pub test_accuracy: f64,
}

fn params(model: &mut Model) -> Vec<f32> {
    let mut v = Vec::new();
    model.net.visit_params(&mut |p| v.extend_from_slice(&p.value.data));
    v
}

fn grads(model: &mut Model) -> Vec<f32> {
    let mut v = Vec::new();
    model.net.visit_params(&mut |p| v.extend_from_slice(&p.grad.data));
    v
}

fn set_params(model: &mut Model, values: &[f32]) {
    let mut at = 0;
    model.net.visit_params(&mut |p| {
        let n = p.value.len();
        p.value.data.copy_from_slice(&values[at..at + n]);
        at += n;
    });
}

/// Running statistics and counters, to put back after a probe's training-mode forwards.
fn buffers(model: &mut Model) -> Vec<(Vec<f32>, i64)> {
    model
        .net
        .named_buffers()
        .into_iter()
        .map(|(_, b)| match b {
            BufferMut::F32(t) => (t.data.clone(), 0),
            BufferMut::I64(v) => (Vec::new(), *v),
        })
        .collect()
}

fn set_buffers(model: &mut Model, saved: &[(Vec<f32>, i64)]) {
    for ((_, b), (data, count)) in model.net.named_buffers().into_iter().zip(saved) {
        match b {
            BufferMut::F32(t) => t.data.copy_from_slice(data),
            BufferMut::I64(v) => *v = *count,
        }
    }
}

fn norm(v: impl Iterator<Item = f64>) -> f64 {
    v.map(|x| x * x).sum::<f64>().sqrt()
}

/// The probe at the current parameters, on the batch in the model's input.
fn probe(model: &mut Model, labels: &[u8], classes: usize, lr: f64, etas: &[f64], step: usize) -> Result<Probe> {
    let base = params(model);
    let saved = buffers(model);
    let (loss, _) = loss_and_grad(model, labels, classes)?;
    let g = grads(model);
    let g_norm = norm(g.iter().map(|&x| x as f64));
    let (mut lmin, mut lmax, mut cmin, mut cmax, mut beta) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN, 0.0f64);
    let mut moved = base.clone();
    for &k in etas {
        let eta = (k * lr) as f32;
        for ((m, &b), &gi) in moved.iter_mut().zip(&base).zip(&g) {
            *m = b - eta * gi;
        }
        set_params(model, &moved);
        let (l, _) = loss_and_grad(model, labels, classes)?;
        let g2 = grads(model);
        let change = norm(g2.iter().zip(&g).map(|(&a, &b)| (a - b) as f64));
        lmin = lmin.min(l);
        lmax = lmax.max(l);
        cmin = cmin.min(change);
        cmax = cmax.max(change);
        if g_norm > 0.0 {
            beta = beta.max(change / (eta as f64 * g_norm));
        }
    }
    set_params(model, &base);
    set_buffers(model, &saved);
    Ok(Probe {
        step,
        loss,
        loss_min: lmin,
        loss_max: lmax,
        grad_change_min: cmin,
        grad_change_max: cmax,
        beta,
    })
}

#[allow(clippy::too_many_arguments)]
fn landscape_run(
    norm_spec: &'static str,
    seed: u64,
    train: &Dataset,
    test: &Dataset,
    steps: usize,
    every: usize,
    lr: f64,
    etas: &[f64],
    model_name: &'static str,
) -> Result<LandscapeRun> {
    let spec = ModelSpec::new(
        Arch::builtin(model_name),
        NormSpec::builtin(norm_spec),
        train.shape,
        train.classes,
    )?;
    let mut model = Model::build(&spec, seed)?;
    let mut opt = Optimizer::new(OptimizerConfig {
        kind: OptimizerKind::Sgd,
        lr,
        momentum: 0.0,
        ..OptimizerConfig::default()
    });
    let input_norm = train.pixel_stats()?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x1A5D);
    let mut order: Vec<usize> = (0..train.len()).collect();
    let (mut cursor, bs) = (order.len(), 128);
    let (mut labels, mut probes, mut diverged) = (Vec::new(), Vec::new(), false);
    for step in 0..steps {
        if cursor + bs > order.len() {
            order.shuffle(&mut rng);
            cursor = 0;
        }
        train.batch(&order[cursor..cursor + bs], input_norm, model.input_mut(), &mut labels)?;
        cursor += bs;
        model
            .net
            .set_step_seed(seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        if step % every == 0 {
            probes.push(probe(&mut model, &labels, train.classes, lr, etas, step)?);
        }
        let (loss, _) = loss_and_grad(&mut model, &labels, train.classes)?;
        if !loss.is_finite() {
            diverged = true;
            break;
        }
        opt.step(&mut model.net, lr);
    }
    let test_accuracy = if diverged {
        f64::NAN
    } else {
        evaluate(&mut model, test, input_norm, 1000)?.accuracy
    };
    Ok(LandscapeRun {
        norm: norm_spec.into(),
        seed,
        diverged,
        probes,
        test_accuracy,
    })
}

/// The study: the net with BN, without, and with noisy BN, for every seed.
pub fn run(
    opts: &StudyOptions,
    progress: &mut dyn FnMut(usize, usize, &str) -> Result<()>,
) -> Result<(Vec<LandscapeRun>, BTreeMap<String, String>)> {
    let dir = resolve_data_dir(opts.data.as_deref())?;
    let mut train = load_split(&dir, true)?;
    let mut test = load_split(&dir, false)?;
    let (model, steps, every, etas, ntest): (&str, usize, usize, Vec<f64>, usize) = if opts.quick {
        ("vgg:8,M,16,M", 120, 20, vec![0.5, 1.0, 2.0, 4.0], 1000)
    } else {
        (
            "vgg:16,16,M,32,32,M",
            1200,
            100,
            vec![0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0],
            5000,
        )
    };
    test.truncate(ntest);
    train.truncate(60000);
    let lr = 0.1;
    let mut runs = Vec::new();
    // Lp BN (Santurkar et al.'s second claim) in the full run only: --quick stays a smoke run.
    let norms: &[&str] = if opts.quick {
        &["bn", "none", "bn-noisy"]
    } else {
        &["bn", "none", "bn-noisy", "bn-l1", "bn-linf"]
    };
    let total = norms.len() * opts.seeds;
    for (k, (norm, seed)) in norms
        .iter()
        .flat_map(|n| (0..opts.seeds as u64).map(move |s| (*n, s)))
        .enumerate()
    {
        progress(k, total, &format!("{model} norm={norm} seed {seed}"))?;
        runs.push(landscape_run(
            norm, seed, &train, &test, steps, every, lr, &etas, model,
        )?);
    }
    progress(total, total, "done")?;
    let mut settings = BTreeMap::new();
    settings.insert("model".into(), format!("{model} (BN+ReLU after each conv, or no norm)"));
    settings.insert("optimizer".into(), format!("SGD lr {lr}, batch 128"));
    settings.insert("steps".into(), format!("{steps}, probed every {every}"));
    settings.insert(
        "step sizes".into(),
        format!("η = {etas:?} × lr along the batch gradient"),
    );
    settings.insert(
        "noisy BN".into(),
        "bn-noisy: BN, then per sample and unit y = s·x + m, s ~ N(σ_j, 0.1), m ~ U(μ_j ± 0.1), μ_j ~ U(−0.5, 0.5), σ_j ~ U(1, 1.25), redrawn every step".into(),
    );
    Ok((runs, settings))
}

pub struct Landscape;

impl Study for Landscape {
    fn name(&self) -> &'static str {
        "landscape"
    }

    fn about(&self) -> &'static str {
        "VGG with BN, without, and noisy BN: loss and gradient change along the gradient (Santurkar et al.)"
    }

    /// Its own training loop with probes, instead of a grid.
    fn run(
        &self,
        opts: &StudyOptions,
        progress: &mut dyn FnMut(usize, usize, &str) -> Result<()>,
        results: &mut StudyResults,
    ) -> Result<(Settings, Option<crate::files::RunLock>)> {
        let (runs, settings, lock) = super::study::own_loop(opts, || run(opts, progress))?;
        results.landscape = runs;
        Ok((settings, Some(lock)))
    }

    fn analyze(&self, r: &StudyResults) -> Result<Analysis> {
        landscape(r)
    }
}

pub(crate) fn landscape(r: &StudyResults) -> Result<Analysis> {
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
