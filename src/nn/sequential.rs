//! Sequential: named layers run in order; names give the state-dict prefixes.

use crate::error::Result;
use crate::nn::layer::{BufferMut, Layer, Mode, Param};
use crate::tensor::Tensor;

#[derive(Default)]
pub struct Sequential {
    pub layers: Vec<(String, Box<dyn Layer>)>,
}

impl Sequential {
    /// Adds a layer; `name` is its state-dict prefix ("conv1"), empty for parameterless ones.
    pub fn push(&mut self, name: &str, layer: impl Layer + 'static) {
        self.layers.push((name.to_string(), Box::new(layer)));
    }

    pub fn forward(&mut self, x: Tensor, mode: Mode) -> Result<Tensor> {
        let mut h = x;
        for (_, layer) in self.layers.iter_mut() {
            h = layer.forward(h, mode)?;
        }
        Ok(h)
    }

    pub fn backward(&mut self, dy: Tensor) -> Result<Tensor> {
        let mut g = dy;
        for (_, layer) in self.layers.iter_mut().rev() {
            g = layer.backward(g)?;
        }
        Ok(g)
    }

    /// Every parameter as ("conv1.weight", param), in a fixed order.
    pub fn named_params(&mut self) -> Vec<(String, &mut Param)> {
        let mut out = Vec::new();
        for (name, layer) in self.layers.iter_mut() {
            for (key, p) in layer.params() {
                out.push((format!("{name}.{key}"), p));
            }
        }
        out
    }

    /// Every buffer as ("bn1.running_mean", buffer), in a fixed order.
    pub fn named_buffers(&mut self) -> Vec<(String, BufferMut<'_>)> {
        let mut out = Vec::new();
        for (name, layer) in self.layers.iter_mut() {
            for (key, b) in layer.buffers() {
                out.push((format!("{name}.{key}"), b));
            }
        }
        out
    }

    pub fn zero_grad(&mut self) {
        for (_, p) in self.named_params() {
            p.grad.data.fill(0.0);
        }
    }

    pub fn set_step_seed(&mut self, seed: u64) {
        for (i, (_, layer)) in self.layers.iter_mut().enumerate() {
            layer.set_step_seed(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(i as u64));
        }
    }
}
