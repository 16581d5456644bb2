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

use crate::data::{load_split, resolve_data_dir, Dataset};
use crate::error::Result;
use crate::models::{Model, ModelSpec};
use crate::nn::norm_spec::NormSpec;
use crate::nn::BufferMut;
use crate::optim::{Optimizer, OptimizerConfig, OptimizerKind};
use crate::studies::StudyOptions;
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
    model_name: &str,
) -> Result<LandscapeRun> {
    let spec = ModelSpec::new(model_name, NormSpec::builtin(norm_spec), train.shape, train.classes)?;
    let mut model = Model::build(&spec, seed)?;
    let mut opt = Optimizer::new(OptimizerConfig {
        kind: OptimizerKind::Sgd,
        lr,
        momentum: 0.0,
        ..OptimizerConfig::default()
    });
    let input_norm = train.pixel_stats();
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
    progress: &mut dyn FnMut(usize, usize, &str),
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
        progress(k, total, &format!("{model} norm={norm} seed {seed}"));
        runs.push(landscape_run(
            norm, seed, &train, &test, steps, every, lr, &etas, model,
        )?);
    }
    progress(total, total, "done");
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
