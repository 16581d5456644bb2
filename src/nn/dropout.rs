//! Dropout (inverted, as PyTorch): in training each value is zeroed with probability p and
//! the survivors are scaled by 1/(1-p); identity in eval mode.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::nn::layer::{Layer, Mode};
use crate::tensor::Tensor;

pub struct Dropout {
    pub p: f32,
    seed: u64,
    mask: Tensor,
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
            mask: Tensor::default(),
        })
    }
}

impl Layer for Dropout {
    fn kind(&self) -> &'static str {
        "Dropout"
    }

    // y = x · mask / (1 - p), mask ~ Bernoulli(1 - p)
    fn forward(&mut self, mut x: Tensor, mode: Mode) -> Result<Tensor> {
        if mode == Mode::Eval || self.p == 0.0 {
            self.mask = Tensor::full(&x.shape, 1.0);
            return Ok(x);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let scale = 1.0 / (1.0 - self.p);
        self.mask.resize_to(&x.shape);
        for m in self.mask.data.iter_mut() {
            *m = if rng.gen::<f32>() < self.p { 0.0 } else { scale };
        }
        x.data.iter_mut().zip(&self.mask.data).for_each(|(v, m)| *v *= m);
        Ok(x)
    }

    // dx = dy · mask / (1 - p)
    fn backward(&mut self, mut dy: Tensor) -> Result<Tensor> {
        if dy.shape != self.mask.shape {
            return Err(Error::shape(
                "Dropout",
                format!("gradient {:?} does not match output", dy.shape),
            ));
        }
        dy.data.iter_mut().zip(&self.mask.data).for_each(|(v, m)| *v *= m);
        Ok(dy)
    }

    fn set_step_seed(&mut self, seed: u64) {
        self.seed = seed;
    }
}
