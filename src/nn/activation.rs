//! Pointwise activations, computed in place on the tensor they receive.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::nn::layer::{Layer, Mode};
use crate::tensor::Tensor;

const CHUNK: usize = 1 << 14;

/// ReLU keeps a one-byte mask of the positive inputs, a quarter of a copy of the output.
#[derive(Default)]
pub struct ReLU {
    mask: Vec<u8>,
    shape: Vec<usize>,
}

impl Layer for ReLU {
    fn kind(&self) -> &'static str {
        "ReLU"
    }

    // y = max(x, 0)
    fn forward(&mut self, mut x: Tensor, mode: Mode) -> Result<Tensor> {
        if mode == Mode::Train {
            self.mask.resize(x.len(), 0);
            self.shape.clone_from(&x.shape);
            x.data
                .par_chunks_mut(CHUNK)
                .zip(self.mask.par_chunks_mut(CHUNK))
                .for_each(|(c, m)| {
                    for (v, k) in c.iter_mut().zip(m) {
                        *k = (*v > 0.0) as u8;
                        *v = v.max(0.0);
                    }
                });
        } else {
            x.data
                .par_chunks_mut(CHUNK)
                .for_each(|c| c.iter_mut().for_each(|v| *v = v.max(0.0)));
        }
        Ok(x)
    }

    // dx = dy · [x > 0]
    fn backward(&mut self, mut dy: Tensor) -> Result<Tensor> {
        if dy.shape != self.shape {
            return Err(Error::shape(
                "ReLU",
                format!("gradient {:?} does not match output", dy.shape),
            ));
        }
        dy.data
            .par_chunks_mut(CHUNK)
            .zip(self.mask.par_chunks(CHUNK))
            .for_each(|(d, m)| {
                d.iter_mut().zip(m).for_each(|(g, &k)| *g *= k as f32);
            });
        Ok(dy)
    }
}

#[derive(Default)]
pub struct Sigmoid {
    output: Tensor,
}

impl Layer for Sigmoid {
    fn kind(&self) -> &'static str {
        "Sigmoid"
    }

    // y = 1 / (1 + e^-x)
    fn forward(&mut self, mut x: Tensor, mode: Mode) -> Result<Tensor> {
        x.data
            .par_chunks_mut(CHUNK)
            .for_each(|c| c.iter_mut().for_each(|v| *v = 1.0 / (1.0 + (-*v).exp())));
        if mode == Mode::Train {
            self.output.clone_from(&x);
        }
        Ok(x)
    }

    // dx = dy · y · (1 - y)
    fn backward(&mut self, mut dy: Tensor) -> Result<Tensor> {
        if dy.shape != self.output.shape {
            return Err(Error::shape(
                "Sigmoid",
                format!("gradient {:?} does not match output", dy.shape),
            ));
        }
        dy.data
            .par_chunks_mut(CHUNK)
            .zip(self.output.data.par_chunks(CHUNK))
            .for_each(|(d, y)| d.iter_mut().zip(y).for_each(|(g, &v)| *g *= v * (1.0 - v)));
        Ok(dy)
    }
}
