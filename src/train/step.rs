//! One training step and evaluation: forward, loss, backward, the optimizer update (alone or
//! data-parallel), the warm-up rate, and eval-mode loss and accuracy over a dataset.

use super::*;

/// A model's results on a dataset in eval mode.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    pub loss: f64,
    pub accuracy: f64,
    /// The predicted class of every sample, in order.
    pub predictions: Vec<u8>,
    /// The logits of every sample, [N, classes] row-major.
    pub logits: Vec<f32>,
}

/// Mean loss, accuracy and predictions of `model` in eval mode over `data`.
pub fn evaluate(model: &mut Model, data: &Dataset, norm: InputNorm, batch_size: usize) -> Result<Evaluation> {
    let order: Vec<usize> = (0..data.len()).collect();
    evaluate_samples(model, data, &order, norm, batch_size)
}

/// (mean loss, accuracy) of `model` in eval mode over `data`, each process of `comm` taking
/// its share of the samples (all of them alone).
pub fn evaluate_shared(
    model: &mut Model,
    data: &Dataset,
    norm: InputNorm,
    batch_size: usize,
    comm: &dyn Communicator,
) -> Result<(f64, f64)> {
    if comm.size() == 1 {
        let e = evaluate(model, data, norm, batch_size)?;
        return Ok((e.loss, e.accuracy));
    }
    let order: Vec<usize> = (0..data.len()).collect();
    let mine = data_parallel::shard(&order, comm.rank(), comm.size());
    let e = evaluate_samples(model, data, mine, norm, batch_size)?;
    let n = mine.len() as f64;
    let mut sums = [e.loss * n, (e.accuracy * n).round()];
    comm.all_reduce_sum_f64(&mut sums);
    let all = data.len().max(1) as f64;
    Ok((sums[0] / all, sums[1] / all))
}

/// `evaluate` over the samples `order` of `data` (a process's share of a test set).
pub fn evaluate_samples(
    model: &mut Model,
    data: &Dataset,
    order: &[usize],
    norm: InputNorm,
    batch_size: usize,
) -> Result<Evaluation> {
    let mut y = Vec::new();
    let (mut loss_sum, mut correct) = (0.0f64, 0usize);
    let mut predictions = Vec::with_capacity(order.len());
    let mut all_logits = Vec::with_capacity(order.len() * data.classes);
    // A streamed split is decoded ahead by one thread per core while the model runs.
    let batches: Vec<Vec<usize>> = order.chunks(batch_size.max(1)).map(<[usize]>::to_vec).collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut feed = data.feed(batches, crate::data::FeedOptions::new(cores, false))?;
    for idx in order.chunks(batch_size.max(1)) {
        feed.next_into(norm, model.input_mut(), &mut y)
            .ok_or_else(|| Error::invalid("the loader ended before the last test batch"))??;
        model.forward(Mode::Eval)?;
        let (logits, dlogits) = model.net.output_and_grad();
        dlogits.resize_to(&logits.shape)?;
        let (loss, c) = softmax_cross_entropy(&logits.data, &y, data.classes, &mut dlogits.data);
        loss_sum += loss * idx.len() as f64;
        correct += c;
        predictions.extend(logits.data.chunks(data.classes).map(|z| argmax(z) as u8));
        all_logits.extend_from_slice(&logits.data);
    }
    let n = order.len().max(1) as f64;
    Ok(Evaluation {
        loss: loss_sum / n,
        accuracy: correct as f64 / n,
        predictions,
        logits: all_logits,
    })
}

/// Forward in train mode, softmax cross-entropy against `labels`, and (for a finite loss)
/// backward: the parameters' gradients hold dL/dθ of this batch afterwards. Returns the mean
/// loss and the number of correct predictions.
pub fn loss_and_grad(model: &mut Model, labels: &[u8], classes: usize) -> Result<(f64, usize)> {
    let (loss, correct) = forward_loss(model, labels, classes, 1.0)?;
    if loss.is_finite() {
        model.backward()?;
    }
    Ok((loss, correct))
}

/// Zeroes the gradients, runs the training forward and the loss: the mean cross-entropy over
/// this batch, and its gradient times `share` in the output's gradient (a process's share of a
/// global batch, so that the gradients of all processes add up to the global batch's).
pub(super) fn forward_loss(model: &mut Model, labels: &[u8], classes: usize, share: f32) -> Result<(f64, usize)> {
    model.net.zero_grad();
    model.forward(Mode::Train)?;
    let (logits, dlogits) = model.net.output_and_grad();
    dlogits.resize_to(&logits.shape)?;
    let (loss, correct) = softmax_cross_entropy(&logits.data, labels, classes, &mut dlogits.data);
    if share != 1.0 {
        dlogits.data.iter_mut().for_each(|g| *g *= share);
    }
    Ok((loss, correct))
}

/// A data-parallel training step on this process's share (already in the model's input) of a
/// global batch of `global` samples: forward and loss, the global loss (every process sees the
/// same, so all stop together on a non-finite one), backward, the gradients summed over the
/// processes, the L1 term, the update. With one process this is `train_step`, bit for bit.
#[allow(clippy::too_many_arguments)]
pub(super) fn parallel_step(
    model: &mut Model,
    opt: &mut Optimizer,
    labels: &[u8],
    classes: usize,
    global: usize,
    lr: f64,
    sparsity: f64,
    comm: &dyn Communicator,
    sync: &mut GradientSync,
) -> Result<(f64, usize)> {
    let share = labels.len() as f64 / global as f64;
    let (loss, correct) = forward_loss(model, labels, classes, share as f32)?;
    let (loss, correct) = if comm.size() > 1 {
        let mut sums = [loss * share, correct as f64];
        comm.all_reduce_sum_f64(&mut sums);
        (sums[0], sums[1] as usize)
    } else {
        (loss, correct)
    };
    if !loss.is_finite() {
        return Ok((loss, correct));
    }
    model.backward()?;
    sync.all_reduce(comm, &mut model.net);
    if sparsity > 0.0 {
        model.net.add_norm_scale_l1(sparsity as f32);
    }
    opt.step(&mut model.net, lr);
    Ok((loss, correct))
}

/// One training step on the batch already in `model.input_mut()`: `loss_and_grad`, then the
/// optimizer update. A non-finite loss returns before any update. With `sparsity` λ > 0,
/// λ·sign(γ) is added to every norm scale's gradient after backward.
pub fn train_step(
    model: &mut Model,
    opt: &mut Optimizer,
    labels: &[u8],
    classes: usize,
    lr: f64,
    sparsity: f64,
) -> Result<(f64, usize)> {
    // One chain of parallel regions from the forward to the update (crate::workers).
    crate::workers::with_workers_awake(move || {
        let (loss, correct) = loss_and_grad(model, labels, classes)?;
        if !loss.is_finite() {
            return Ok((loss, correct));
        }
        if sparsity > 0.0 {
            model.net.add_norm_scale_l1(sparsity as f32);
        }
        opt.step(&mut model.net, lr);
        Ok((loss, correct))
    })
}

/// Linear warm-up: step k (0-based) of `steps` warm-up steps trains at lr·(k+1)/steps.
pub(super) fn warmup(lr: f64, step: usize, steps: usize) -> f64 {
    if step < steps {
        lr * (step + 1) as f64 / steps as f64
    } else {
        lr
    }
}
