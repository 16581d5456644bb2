//! The Layer abstraction: explicit forward (train or eval) and backward, parameters with
//! gradients, and buffers, all under PyTorch state-dict names.
//!
//! Activations live outside the layers (the Sequential keeps one tensor per layer boundary),
//! as in llm.c: forward writes `y` from `x`, backward reads the same `x` and `y` and writes
//! `dx`. Output tensors are reused from step to step, so a training step allocates nothing
//! once the first batch has sized every buffer.

use crate::error::{Error, Result};
use crate::onnx::graph::OnnxGraph;
use crate::tensor::Tensor;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Train,
    Eval,
}

/// How a norm that keeps running statistics uses them, beyond the network's `Mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StatsMode {
    /// PyTorch's behaviour: batch statistics in training (updating the running ones), the
    /// running ones in eval.
    #[default]
    Normal,
    /// The running statistics always, never updated: frozen BN (torchvision's
    /// FrozenBatchNorm2d, Keras' `trainable = False`); backward is the eval-mode backward.
    /// With `affine`, γ and β are frozen too.
    Frozen { affine: bool },
    /// Batch statistics always, the running ones untouched (`eval --bn-stats batch`).
    Batch,
    /// Batch statistics always, accumulated into the running ones as an equal-weight average
    /// over the batches (momentum None), as `torch.optim.swa_utils.update_bn` does.
    Accumulate,
}

impl StatsMode {
    /// Whether a layer with running statistics normalizes with them in `mode`.
    pub fn uses_running(self, mode: Mode) -> bool {
        match self {
            StatsMode::Normal => mode == Mode::Eval,
            StatsMode::Frozen { .. } => true,
            StatsMode::Batch | StatsMode::Accumulate => false,
        }
    }

    /// Whether a forward in `mode` updates the running statistics.
    pub fn updates_running(self, mode: Mode) -> bool {
        match self {
            StatsMode::Normal => mode == Mode::Train,
            StatsMode::Accumulate => true,
            StatsMode::Frozen { .. } | StatsMode::Batch => false,
        }
    }
}

/// What a parameter is, so an optimizer can exempt norm parameters and biases from decay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    Weight,
    Bias,
    Norm,
}

/// A learnable tensor and its gradient (accumulated by backward, cleared by `zero_grad`).
#[derive(Clone, Debug)]
pub struct Param {
    pub value: Tensor,
    pub grad: Tensor,
    pub kind: ParamKind,
    /// Not trained (PyTorch's requires_grad = False): the optimizer leaves it as it is.
    pub frozen: bool,
}

impl Param {
    pub fn new(value: Tensor, kind: ParamKind) -> Self {
        let grad = Tensor::zeros(&value.shape);
        Param {
            value,
            grad,
            kind,
            frozen: false,
        }
    }
}

/// A mutable view of one non-learnable state-dict entry.
pub enum BufferMut<'a> {
    F32(&'a mut Tensor),
    I64(&'a mut i64),
}

pub trait Layer: std::any::Any + Send {
    /// The PyTorch class this layer corresponds to, for messages ("Conv2d", "BatchNorm2d").
    fn kind(&self) -> &'static str;

    /// Writes the output for `x` into `y`, resizing it in place (its allocation is reused). In
    /// `Mode::Train` it keeps the small state backward needs (statistics, argmax, masks).
    fn forward(&mut self, x: &Tensor, y: &mut Tensor, mode: Mode) -> Result<()>;

    /// Given the last training forward's `x` and `y` and dL/dy, adds parameter gradients and
    /// writes dL/dx into `dx` (resized in place).
    fn backward(&mut self, x: &Tensor, y: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()>;

    /// Calls `f` with each learnable parameter and its state-dict key ("weight", "bias").
    fn visit_params<'a>(&'a mut self, _f: &mut dyn FnMut(&'static str, &'a mut Param)) {}

    /// The learnable parameters with their keys (allocates; not for the training step).
    fn params(&mut self) -> Vec<(&'static str, &mut Param)> {
        let mut v = Vec::new();
        self.visit_params(&mut |k, p| v.push((k, p)));
        v
    }

    /// Buffers with their state-dict keys ("running_mean", "num_batches_tracked").
    fn buffers(&mut self) -> Vec<(&'static str, BufferMut<'_>)> {
        Vec::new()
    }

    /// The first layer of a network need not compute dL/dx; it may skip that work.
    fn set_input_grad(&mut self, _needed: bool) {}

    /// Seeds the layer's randomness for the coming step (dropout), so runs replay exactly.
    fn set_step_seed(&mut self, _seed: u64) {}

    /// Appends this layer's eval-mode computation on the graph value `x` to an ONNX graph and
    /// returns its output's name; `name` is the layer's state-dict prefix ("bn1", "layer1.0"),
    /// which names its initializers as PyTorch names the tensors.
    fn export_onnx(&self, _g: &mut OnnxGraph, _x: &str, name: &str) -> Result<String> {
        Err(Error::invalid(format!("{name}: {} has no ONNX export", self.kind())))
    }

    /// The parts of this layer that optional abilities reach by type: the layer itself, or for
    /// a block the layers inside it. Callers downcast what they need (a Conv2d's algorithm, a
    /// SyncBN's communicator, the LSTM's gate probe; see `Sequential::set_conv_algorithm`), so
    /// no layer carries a stub for an ability it lacks; a layer without any hands over nothing.
    fn visit_parts(&mut self, _f: &mut dyn FnMut(&mut dyn std::any::Any)) {}

    /// Sets how the norms with running statistics in this layer use them; returns how many
    /// such norms it holds (0 for every other layer).
    fn set_stats_mode(&mut self, _mode: StatsMode) -> usize {
        0
    }
}

/// Visits an optional weight and bias as "weight" and "bias": the parameters of conv, linear
/// and every norm layer.
pub fn visit_weight_bias<'a>(
    weight: Option<&'a mut Param>,
    bias: Option<&'a mut Param>,
    f: &mut dyn FnMut(&'static str, &'a mut Param),
) {
    if let Some(w) = weight {
        f("weight", w);
    }
    if let Some(b) = bias {
        f("bias", b);
    }
}

/// A norm layer's running statistics under PyTorch's names (`var_key` is "running_var", or
/// "running_scale" for Lp BN); none when the layer keeps none.
pub fn running_buffers<'a>(
    mean: Option<&'a mut Tensor>,
    var: Option<&'a mut Tensor>,
    var_key: &'static str,
    count: &'a mut i64,
) -> Vec<(&'static str, BufferMut<'a>)> {
    match (mean, var) {
        (Some(m), Some(v)) => vec![
            ("running_mean", BufferMut::F32(m)),
            (var_key, BufferMut::F32(v)),
            ("num_batches_tracked", BufferMut::I64(count)),
        ],
        _ => Vec::new(),
    }
}

/// Runs one layer on its own, allocating its output: for tests and the conformance command.
pub fn forward_once(layer: &mut dyn Layer, x: &Tensor, mode: Mode) -> Result<Tensor> {
    let mut y = Tensor::default();
    layer.forward(x, &mut y, mode)?;
    Ok(y)
}

/// Backward of one layer on its own after `forward_once`, allocating dx.
pub fn backward_once(layer: &mut dyn Layer, x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let mut dx = Tensor::default();
    layer.backward(x, y, dy, &mut dx)?;
    Ok(dx)
}
