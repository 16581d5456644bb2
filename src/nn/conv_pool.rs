//! ConvPool: a conv and the ReLU + 2x2 max-pool after it as one layer, for inference. In eval
//! mode it runs `Conv2d::forward_max_pooled` (the conv's output pooled while in cache); in
//! training, or where the conv takes another algorithm, the two layers run one after the other
//! through a kept intermediate, so it is a correct layer in every mode. `fuse_conv_pools`
//! makes these from a built network (the folded model: `fold::fold`).

use std::any::Any;

use crate::error::Result;
use crate::nn::conv2d::Conv2d;
use crate::nn::layer::{BufferMut, Layer, Mode, Param};
use crate::nn::pool::MaxPool2d;
use crate::nn::sequential::Sequential;
use crate::onnx::graph::OnnxGraph;
use crate::tensor::Tensor;

pub struct ConvPool {
    pub conv: Conv2d,
    pub pool: MaxPool2d,
    /// The conv's output and its gradient, when the two layers run one after the other.
    mid: Tensor,
    dmid: Tensor,
}

impl ConvPool {
    pub fn new(conv: Conv2d, pool: MaxPool2d) -> Self {
        ConvPool {
            conv,
            pool,
            mid: Tensor::default(),
            dmid: Tensor::default(),
        }
    }
}

impl Layer for ConvPool {
    fn kind(&self) -> &'static str {
        "Conv2d+ReLU+MaxPool2d"
    }

    fn forward(&mut self, x: &Tensor, y: &mut Tensor, mode: Mode) -> Result<()> {
        if mode == Mode::Eval && self.conv.forward_max_pooled(x, y, self.pool.relu)? {
            return Ok(());
        }
        self.conv.forward(x, &mut self.mid, mode)?;
        self.pool.forward(&self.mid, y, mode)
    }

    fn backward(&mut self, x: &Tensor, y: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
        self.pool.backward(&self.mid, y, dy, &mut self.dmid)?;
        self.conv.backward(x, &self.mid, &self.dmid, dx)
    }

    fn visit_params<'a>(&'a mut self, f: &mut dyn FnMut(&'static str, &'a mut Param)) {
        self.conv.visit_params(f);
    }

    fn buffers(&mut self) -> Vec<(&'static str, BufferMut<'_>)> {
        self.conv.buffers()
    }

    fn set_input_grad(&mut self, needed: bool) {
        self.conv.set_input_grad(needed);
    }

    fn export_onnx(&self, g: &mut OnnxGraph, x: &str, name: &str) -> Result<String> {
        let c = self.conv.export_onnx(g, x, name)?;
        self.pool.export_onnx(g, &c, name)
    }

    fn visit_parts(&mut self, f: &mut dyn FnMut(&mut dyn Any)) {
        self.conv.visit_parts(f);
    }
}

/// Replaces every conv (without a ReLU of its own) directly followed by a 2x2 stride-2
/// ReLU+MaxPool2d with one `ConvPool` under the conv's name: the same state dict, the same
/// outputs, one pass fewer over memory in eval mode.
pub fn fuse_conv_pools(net: &mut Sequential) {
    let layers = std::mem::take(&mut net.layers);
    let mut fused: Vec<(String, Box<dyn Layer>)> = Vec::with_capacity(layers.len());
    let mut it = layers.into_iter().peekable();
    while let Some((name, layer)) = it.next() {
        // A conv without its own ReLU (kind "Conv2d"), then a ReLU + 2x2 stride-2 max-pool.
        let conv_ok = layer.kind() == "Conv2d" && (layer.as_ref() as &dyn Any).is::<Conv2d>();
        let pool_ok = it.peek().is_some_and(|(_, next)| {
            (next.as_ref() as &dyn Any)
                .downcast_ref::<MaxPool2d>()
                .is_some_and(|p| p.relu && p.kernel == 2 && p.stride == 2)
        });
        if !(conv_ok && pool_ok) {
            fused.push((name, layer));
            continue;
        }
        let (_, pool) = it.next().expect("peeked");
        let conv = (layer as Box<dyn Any>).downcast::<Conv2d>().expect("checked");
        let pool = (pool as Box<dyn Any>).downcast::<MaxPool2d>().expect("checked");
        fused.push((name, Box::new(ConvPool::new(*conv, *pool))));
    }
    net.layers = fused;
}
