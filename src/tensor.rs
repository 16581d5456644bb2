//! An owned f32 buffer with a shape (NCHW for images). Nothing clever.

use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn zeros(shape: &[usize]) -> Self {
        Tensor {
            shape: shape.to_vec(),
            data: vec![0.0; shape.iter().product()],
        }
    }

    pub fn full(shape: &[usize], value: f32) -> Self {
        Tensor {
            shape: shape.to_vec(),
            data: vec![value; shape.iter().product()],
        }
    }

    /// Wraps `data`; an error when its length does not match the shape.
    pub fn from_vec(shape: &[usize], data: Vec<f32>) -> Result<Self> {
        let expected: usize = shape.iter().product();
        if expected != data.len() {
            return Err(Error::invalid(format!(
                "tensor of shape {shape:?} needs {expected} values, got {}",
                data.len()
            )));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            data,
        })
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Size of dimension 0 (the batch), or 0 for a scalar.
    pub fn batch(&self) -> usize {
        self.shape.first().copied().unwrap_or(0)
    }

    /// Number of values per sample: the product of all dimensions after the first.
    pub fn sample_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    /// Resizes in place to `shape`, reusing the allocation when it is large enough; an error
    /// (not an abort) when the memory for a larger one cannot be had. Activations, their
    /// gradients and each batch are sized here, the largest buffers of a run.
    pub fn resize_to(&mut self, shape: &[usize]) -> Result<()> {
        let len = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| {
            Error::OutOfMemory(format!(
                "a tensor of shape {shape:?} has more values than memory can hold"
            ))
        })?;
        if len > self.data.len() {
            // The message is built only on failure: a training step allocates nothing.
            self.data.try_reserve(len - self.data.len()).map_err(|_| {
                Error::OutOfMemory(format!(
                    "cannot allocate {} for a tensor of shape {shape:?}; use a smaller --batch-size or --resize",
                    crate::memory::human(len as u64 * 4)
                ))
            })?;
        }
        self.data.resize(len, 0.0);
        self.shape.clear();
        self.shape.extend_from_slice(shape);
        Ok(())
    }

    pub fn max_abs(&self) -> f32 {
        self.data.iter().fold(0.0f32, |m, v| m.max(v.abs()))
    }
}
