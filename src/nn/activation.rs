//! Pointwise activations. Each keeps its output, which is all its backward needs.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::nn::layer::{Layer, Mode};
use crate::tensor::Tensor;

const CHUNK: usize = 1 << 14;

#[derive(Default)]
pub struct ReLU {
    output: Tensor,
}

impl Layer for ReLU {
    fn kind(&self) -> &'static str {
        "ReLU"
    }

    // y = max(x, 0)
    fn forward(&mut self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let mut y = x.clone();
        y.data
            .par_chunks_mut(CHUNK)
            .for_each(|c| c.iter_mut().for_each(|v| *v = v.max(0.0)));
        if mode == Mode::Train {
            self.output.clone_from(&y);
        }
        Ok(y)
    }

    // dx = dy · [y > 0]
    fn backward(&mut self, dy: &Tensor) -> Result<Tensor> {
        if dy.shape != self.output.shape {
            return Err(Error::shape(
                "ReLU",
                format!("gradient {:?} does not match output", dy.shape),
            ));
        }
        let mut dx = dy.clone();
        dx.data
            .par_chunks_mut(CHUNK)
            .zip(self.output.data.par_chunks(CHUNK))
            .for_each(|(d, y)| {
                d.iter_mut().zip(y).for_each(|(g, &v)| {
                    if v <= 0.0 {
                        *g = 0.0
                    }
                })
            });
        Ok(dx)
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
    fn forward(&mut self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let mut y = x.clone();
        y.data
            .par_chunks_mut(CHUNK)
            .for_each(|c| c.iter_mut().for_each(|v| *v = 1.0 / (1.0 + (-*v).exp())));
        if mode == Mode::Train {
            self.output.clone_from(&y);
        }
        Ok(y)
    }

    // dx = dy · y · (1 - y)
    fn backward(&mut self, dy: &Tensor) -> Result<Tensor> {
        if dy.shape != self.output.shape {
            return Err(Error::shape(
                "Sigmoid",
                format!("gradient {:?} does not match output", dy.shape),
            ));
        }
        let mut dx = dy.clone();
        dx.data
            .par_chunks_mut(CHUNK)
            .zip(self.output.data.par_chunks(CHUNK))
            .for_each(|(d, y)| d.iter_mut().zip(y).for_each(|(g, &v)| *g *= v * (1.0 - v)));
        Ok(dx)
    }
}
