//! Dropout (inverted, as PyTorch): in training each value is zeroed with probability p and
//! the survivors are scaled by 1/(1-p); identity in eval mode.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::nn::layer::{Layer, Mode};
use crate::onnx::graph::OnnxGraph;
use crate::tensor::Tensor;

pub struct Dropout {
    pub p: f32,
    seed: u64,
    /// 0 or 1/(1-p) per value of the last training forward.
    mask: Vec<f32>,
}

impl Dropout {
    pub fn new(p: f32) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::invalid(format!(
                "dropout probability must be in [0, 1), got {p}"
            )));
        }
        Ok(Dropout {
            p,
            seed: 0,
            mask: Vec::new(),
        })
    }
}

impl Layer for Dropout {
    fn kind(&self) -> &'static str {
        "Dropout"
    }

    /// Dropout is the identity in eval mode.
    fn export_onnx(&self, _g: &mut OnnxGraph, x: &str, _name: &str) -> Result<String> {
        Ok(x.to_string())
    }

    // y = x · mask / (1 - p), mask ~ Bernoulli(1 - p)
    fn forward(&mut self, x: &Tensor, y: &mut Tensor, mode: Mode) -> Result<()> {
        y.resize_to(&x.shape)?;
        self.mask.resize(x.len(), 1.0);
        if mode == Mode::Eval || self.p == 0.0 {
            self.mask.fill(1.0);
        } else {
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
            let scale = 1.0 / (1.0 - self.p);
            for m in self.mask.iter_mut() {
                *m = if rng.gen::<f32>() < self.p { 0.0 } else { scale };
            }
        }
        y.data
            .iter_mut()
            .zip(&x.data)
            .zip(&self.mask)
            .for_each(|((o, v), m)| *o = v * m);
        Ok(())
    }

    // dx = dy · mask / (1 - p)
    fn backward(&mut self, _x: &Tensor, _y: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
        if dy.len() != self.mask.len() {
            return Err(Error::shape(
                "Dropout",
                format!("gradient {:?} does not match output", dy.shape),
            ));
        }
        dx.resize_to(&dy.shape)?;
        dx.data
            .iter_mut()
            .zip(&dy.data)
            .zip(&self.mask)
            .for_each(|((o, g), m)| *o = g * m);
        Ok(())
    }

    fn set_step_seed(&mut self, seed: u64) {
        self.seed = seed;
    }
}
