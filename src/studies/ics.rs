//! The internal-covariate-shift study (BN paper, Fig. 1): the 784-100-100-100-10 sigmoid MLP
//! with and without BN, batch 60, SGD; every few steps the test accuracy and the 15th, 50th
//! and 85th percentiles, over a fixed probe batch, of the input to one sigmoid of the last
//! hidden layer.

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::{load_split, resolve_data_dir, Dataset};
use crate::error::{Error, Result};
use crate::models::{Model, ModelSpec};
use crate::nn::norm_spec::NormSpec;
use crate::nn::Mode;
use crate::optim::{Optimizer, OptimizerConfig, OptimizerKind};
use crate::studies::StudyOptions;
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
    let spec = ModelSpec::new("mlp", NormSpec::builtin(norm), train.shape, train.classes)?;
    let mut model = Model::build(&spec, seed)?;
    let mut opt = Optimizer::new(OptimizerConfig {
        kind: OptimizerKind::Sgd,
        lr: 0.5,
        momentum: 0.0,
        ..OptimizerConfig::default()
    });
    let input_norm = train.pixel_stats();
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
    progress: &mut dyn FnMut(usize, usize, &str),
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
        progress(k, total, &format!("mlp norm={norm} seed {seed}"));
        runs.push(ics_run(norm, seed, &train, &test, steps, every)?);
    }
    progress(total, total, "done");
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
