//! The Layer abstraction: explicit forward (train or eval) and backward, parameters with
//! gradients, and buffers, all under PyTorch state-dict names.

use crate::error::Result;
use crate::tensor::Tensor;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Train,
    Eval,
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
}

impl Param {
    pub fn new(value: Tensor, kind: ParamKind) -> Self {
        let grad = Tensor::zeros(&value.shape);
        Param { value, grad, kind }
    }
}

/// A mutable view of one non-learnable state-dict entry.
pub enum BufferMut<'a> {
    F32(&'a mut Tensor),
    I64(&'a mut i64),
}

pub trait Layer: Send {
    /// The PyTorch class this layer corresponds to, for messages ("Conv2d", "BatchNorm2d").
    fn kind(&self) -> &'static str;

    /// Computes the output; in `Mode::Train` it also caches what `backward` needs. Tensors move
    /// through the network by value so a layer can keep its input or work in place, uncopied.
    fn forward(&mut self, x: Tensor, mode: Mode) -> Result<Tensor>;

    /// Given dL/dy of the last training forward, adds parameter gradients and returns dL/dx.
    fn backward(&mut self, dy: Tensor) -> Result<Tensor>;

    /// Learnable parameters with their state-dict keys ("weight", "bias").
    fn params(&mut self) -> Vec<(&'static str, &mut Param)> {
        Vec::new()
    }

    /// Buffers with their state-dict keys ("running_mean", "num_batches_tracked").
    fn buffers(&mut self) -> Vec<(&'static str, BufferMut<'_>)> {
        Vec::new()
    }

    /// The first layer of a network need not compute dL/dx; it may skip that work.
    fn set_input_grad(&mut self, _needed: bool) {}

    /// Seeds the layer's randomness for the coming step (dropout), so runs replay exactly.
    fn set_step_seed(&mut self, _seed: u64) {}
}
