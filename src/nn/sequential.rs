//! Sequential: named layers run in order; names give the state-dict prefixes. It owns the
//! activations between layers (and their gradients), reused from step to step.

use crate::error::{Error, Result};
use crate::nn::layer::{BufferMut, Layer, Mode, Param, ParamKind};
use crate::tensor::Tensor;

/// A state-dict key: the layer's prefix and its own key ("conv1.weight"); a layer pushed
/// without a name keeps its own key at the top level (the ViT's "cls_token").
fn qualified(name: &str, key: &str) -> String {
    if name.is_empty() {
        key.to_string()
    } else {
        format!("{name}.{key}")
    }
}

#[derive(Default)]
pub struct Sequential {
    pub layers: Vec<(String, Box<dyn Layer>)>,
    /// acts[0] is the input, acts[i + 1] the output of layer i.
    acts: Vec<Tensor>,
    /// grads[i] is dL/d acts[i].
    grads: Vec<Tensor>,
}

impl Sequential {
    /// Adds a layer; `name` is its state-dict prefix ("conv1"), empty for parameterless ones.
    pub fn push(&mut self, name: &str, layer: impl Layer + 'static) {
        self.push_boxed(name, Box::new(layer));
    }

    pub fn push_boxed(&mut self, name: &str, layer: Box<dyn Layer>) {
        self.layers.push((name.to_string(), layer));
    }

    fn size_buffers(&mut self) {
        let n = self.layers.len() + 1;
        self.acts.resize_with(n, Tensor::default);
        self.grads.resize_with(n, Tensor::default);
    }

    /// The input tensor, to be filled in place (by the data loader) before `forward`.
    pub fn input_mut(&mut self) -> &mut Tensor {
        self.size_buffers();
        &mut self.acts[0]
    }

    /// The output of layer `i` in the last forward (probes such as the ICS study read one).
    pub fn activation(&self, i: usize) -> Option<&Tensor> {
        self.acts.get(i + 1)
    }

    /// The values held at the layer boundaries after the last forward, input included (for
    /// the memory estimate of a run).
    pub fn boundary_values(&self) -> usize {
        self.acts.iter().map(Tensor::len).sum()
    }

    /// Runs every layer on the input set through `input_mut`; returns the output.
    pub fn forward(&mut self, mode: Mode) -> Result<&Tensor> {
        self.size_buffers();
        for (i, (_, layer)) in self.layers.iter_mut().enumerate() {
            let (done, rest) = self.acts.split_at_mut(i + 1);
            layer.forward(&done[i], &mut rest[0], mode)?;
        }
        Ok(&self.acts[self.layers.len()])
    }

    /// `forward`, with each layer's seconds written into `seconds[i]` (a profile of where the
    /// time of a forward goes; `normlab bench --inference --layers`).
    pub fn forward_timed(&mut self, mode: Mode, seconds: &mut [f64]) -> Result<&Tensor> {
        self.size_buffers();
        for (i, (_, layer)) in self.layers.iter_mut().enumerate() {
            let (done, rest) = self.acts.split_at_mut(i + 1);
            let t0 = std::time::Instant::now();
            layer.forward(&done[i], &mut rest[0], mode)?;
            if let Some(s) = seconds.get_mut(i) {
                *s = t0.elapsed().as_secs_f64();
            }
        }
        Ok(&self.acts[self.layers.len()])
    }

    /// Backward through every layer after a training forward; the first layer skips dL/dx.
    pub fn backward(&mut self) -> Result<()> {
        let last = self.layers.len();
        if self.acts.len() != last + 1 || self.grads[last].shape != self.acts[last].shape {
            return Err(Error::invalid(
                "backward needs a training forward and dL/doutput of the output's shape",
            ));
        }
        for (i, (_, layer)) in self.layers.iter_mut().enumerate().rev() {
            let (lower, upper) = self.grads.split_at_mut(i + 1);
            layer.backward(&self.acts[i], &self.acts[i + 1], &upper[0], &mut lower[i])?;
        }
        Ok(())
    }

    /// Every parameter as ("conv1.weight", param), in a fixed order.
    pub fn named_params(&mut self) -> Vec<(String, &mut Param)> {
        let mut out = Vec::new();
        for (name, layer) in self.layers.iter_mut() {
            for (key, p) in layer.params() {
                out.push((qualified(name, key), p));
            }
        }
        out
    }

    /// Every buffer as ("bn1.running_mean", buffer), in a fixed order.
    pub fn named_buffers(&mut self) -> Vec<(String, BufferMut<'_>)> {
        let mut out = Vec::new();
        for (name, layer) in self.layers.iter_mut() {
            for (key, b) in layer.buffers() {
                out.push((qualified(name, key), b));
            }
        }
        out
    }

    /// Calls `f` with every parameter in `named_params` order, without allocating.
    pub fn visit_params(&mut self, f: &mut dyn FnMut(&mut Param)) {
        for (_, layer) in self.layers.iter_mut() {
            layer.visit_params(&mut |_, p| f(p));
        }
    }

    /// Network slimming's L1 subgradient: grad(γ) += λ·sign(γ) for the scale γ of every norm
    /// layer (sign(0) = 0, as torch.sign).
    pub fn add_norm_scale_l1(&mut self, lambda: f32) {
        for (_, layer) in self.layers.iter_mut() {
            layer.visit_params(&mut |key, p| {
                if key == "weight" && p.kind == ParamKind::Norm && !p.frozen {
                    for (g, &w) in p.grad.data.iter_mut().zip(&p.value.data) {
                        *g += lambda
                            * if w > 0.0 {
                                1.0
                            } else if w < 0.0 {
                                -1.0
                            } else {
                                0.0
                            };
                    }
                }
            });
        }
    }

    /// Sets the scale γ of every norm layer to `value` (slimming starts from γ = 0.5).
    pub fn set_norm_scales(&mut self, value: f32) {
        for (_, layer) in self.layers.iter_mut() {
            layer.visit_params(&mut |key, p| {
                if key == "weight" && p.kind == ParamKind::Norm {
                    p.value.data.fill(value);
                }
            });
        }
    }

    /// Sets how every norm with running statistics uses them; returns how many there are.
    pub fn set_stats_mode(&mut self, mode: crate::nn::StatsMode) -> usize {
        self.layers.iter_mut().map(|(_, l)| l.set_stats_mode(mode)).sum()
    }

    /// Sets how every convolution computes its passes; returns how many there are.
    pub fn set_conv_algorithm(&mut self, algorithm: crate::nn::conv_algorithm::ConvAlgorithm) -> usize {
        let mut n = 0;
        self.visit_parts(&mut |part| {
            if let Some(conv) = part.downcast_mut::<crate::nn::conv2d::Conv2d>() {
                conv.algorithm = algorithm;
                n += 1;
            }
        });
        n
    }

    /// Gives every SyncBN the processes of a data-parallel job; returns how many there are.
    pub fn set_communicator(&mut self, comm: &std::sync::Arc<dyn crate::dist::Communicator>) -> usize {
        let mut n = 0;
        self.visit_parts(&mut |part| {
            if let Some(bn) = part.downcast_mut::<crate::nn::batch_norm::BatchNorm>() {
                n += bn.set_communicator(comm);
            }
        });
        n
    }

    /// Every layer's parts (`Layer::visit_parts`), in order.
    pub fn visit_parts(&mut self, f: &mut dyn FnMut(&mut dyn std::any::Any)) {
        for (_, layer) in self.layers.iter_mut() {
            layer.visit_parts(f);
        }
    }

    pub fn zero_grad(&mut self) {
        self.visit_params(&mut |p| p.grad.data.fill(0.0));
    }

    /// The output of the last forward and its gradient buffer, for the loss to fill.
    pub fn output_and_grad(&mut self) -> (&Tensor, &mut Tensor) {
        self.size_buffers();
        let last = self.layers.len();
        (&self.acts[last], &mut self.grads[last])
    }

    pub fn set_step_seed(&mut self, seed: u64) {
        for (i, (_, layer)) in self.layers.iter_mut().enumerate() {
            layer.set_step_seed(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(i as u64));
        }
    }
}
