//! What a training run will take in memory, estimated before it starts and checked against
//! what this process can allocate, so that a run too large for the machine (or its `ulimit -v`)
//! is refused with the need, the limit and the fix instead of aborting mid-epoch.

use crate::error::Result;
use crate::memory::{available, Need};
use crate::models::Model;
use crate::nn::Mode;
use crate::optim::OptimizerKind;

/// The evaluation's batch when memory allows it (evaluation reuses the training activations).
pub const EVAL_BATCH: usize = 1000;

/// Bytes of the layer-boundary activations of one sample, from an eval-mode forward of one
/// zero sample (eval mode leaves the weights and running statistics as they are).
pub fn activation_bytes_per_sample(model: &mut Model) -> Result<u64> {
    let [c, h, w] = model.spec.input;
    model.input_mut().resize_to(&[1, c, h, w])?;
    model.input_mut().data.fill(0.0);
    model.forward(Mode::Eval)?;
    Ok(model.net.boundary_values() as u64 * 4)
}

/// Checks that training `model` in batches of `batch` (this process's share) fits; returns the
/// evaluation batch: `EVAL_BATCH` test images, or fewer where that many would not fit (never
/// fewer than the training batch, which must fit anyway).
pub fn check_training_fits(
    model: &mut Model,
    optimizer: OptimizerKind,
    momentum: f64,
    batch: usize,
    test_images: usize,
) -> Result<usize> {
    let per_sample = activation_bytes_per_sample(model)?;
    let params = model.parameter_count() as u64 * 4;
    let buffers = match optimizer {
        OptimizerKind::Sgd if momentum == 0.0 => 0,
        OptimizerKind::Sgd => 1,
        OptimizerKind::Adam | OptimizerKind::Adamw => 2,
    };
    let need = |eval: usize| {
        let mut n = Need::default();
        n.add("weights and gradients", 2 * params);
        n.add("optimizer state", buffers * params);
        // Activations are kept at the larger of the two batches; their gradients at training's.
        // Layers keep per-sample state of about the same size again (masks, argmax, im2col).
        n.add("activations", per_sample.saturating_mul(batch.max(eval) as u64));
        n.add(
            "activation gradients and layer state",
            per_sample.saturating_mul(2 * batch as u64),
        );
        n
    };
    let avail = available();
    let eval = test_images.clamp(1, EVAL_BATCH);
    let fits = |e: usize| need(e).check_against(avail, "", "").is_ok();
    if fits(eval) {
        return Ok(eval);
    }
    // Halve the evaluation batch down to the training batch while it still does not fit.
    let mut e = eval;
    while e > batch && !fits(e) {
        e = (e / 2).max(batch);
    }
    need(e).check_against(
        avail,
        &format!("training in batches of {batch}"),
        "use a smaller --batch-size or a smaller --resize",
    )?;
    Ok(e)
}
