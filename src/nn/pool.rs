//! MaxPool2d (with stored argmax), AvgPool2d and global average pooling.

use crate::error::{Error, Result};
use crate::kernels::pool;
use crate::nn::layer::{Layer, Mode};
use crate::onnx::graph::{relu_if, Attr, OnnxGraph};
use crate::tensor::Tensor;

fn pooled_shape(layer: &str, x: &Tensor, k: usize, s: usize) -> Result<[usize; 4]> {
    let [n, c, h, w] = x.shape[..] else {
        return Err(Error::shape(
            layer,
            format!("expected input [N, C, H, W], got {:?}", x.shape),
        ));
    };
    if h < k || w < k {
        return Err(Error::shape(
            layer,
            format!("input {:?} is smaller than the {k}x{k} window", x.shape),
        ));
    }
    Ok([n, c, (h - k) / s + 1, (w - k) / s + 1])
}

fn check_grad(layer: &str, y: &Tensor, dy: &Tensor) -> Result<()> {
    if dy.shape != y.shape {
        return Err(Error::shape(
            layer,
            format!("gradient {:?} does not match output {:?}", dy.shape, y.shape),
        ));
    }
    Ok(())
}

pub struct MaxPool2d {
    pub kernel: usize,
    pub stride: usize,
    /// A ReLU fused before the pool (applied after it: the two commute), for a conv without a norm.
    pub relu: bool,
    /// The flat in-plane index of each output's winner, from the last forward.
    argmax: Vec<u32>,
}

impl MaxPool2d {
    pub fn new(kernel: usize, stride: usize) -> Self {
        MaxPool2d {
            kernel,
            stride,
            relu: false,
            argmax: Vec::new(),
        }
    }

    /// The same pool with the preceding ReLU fused into it.
    pub fn with_relu(mut self) -> Self {
        self.relu = true;
        self
    }
}

impl Layer for MaxPool2d {
    fn kind(&self) -> &'static str {
        if self.relu {
            "ReLU+MaxPool2d"
        } else {
            "MaxPool2d"
        }
    }

    fn export_onnx(&self, g: &mut OnnxGraph, x: &str, _name: &str) -> Result<String> {
        let (k, s) = (self.kernel as i64, self.stride as i64);
        let attrs = [
            ("kernel_shape", Attr::Ints(vec![k, k])),
            ("strides", Attr::Ints(vec![s, s])),
        ];
        let y = g.node("MaxPool", &[x], &attrs, 4);
        Ok(relu_if(g, y, self.relu))
    }

    fn forward(&mut self, x: &Tensor, y: &mut Tensor, mode: Mode) -> Result<()> {
        let out = pooled_shape("MaxPool2d", x, self.kernel, self.stride)?;
        y.resize_to(&out)?;
        // Only a training forward is followed by a backward; inference skips the winners.
        let argmax = if mode == Mode::Train {
            self.argmax.resize(y.len(), 0);
            Some(&mut self.argmax[..])
        } else {
            self.argmax.clear();
            None
        };
        let [n, c, h, w] = x.shape[..] else {
            unreachable!("checked by pooled_shape")
        };
        pool::max_pool_forward(
            &x.data,
            n * c,
            h,
            w,
            self.kernel,
            self.stride,
            self.relu,
            &mut y.data,
            argmax,
        );
        Ok(())
    }

    fn backward(&mut self, x: &Tensor, y: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
        check_grad("MaxPool2d", y, dy)?;
        if self.argmax.len() != y.len() {
            return Err(Error::invalid("MaxPool2d backward needs a training forward first"));
        }
        dx.resize_to(&x.shape)?;
        let plane_in = x.shape[2] * x.shape[3];
        let plane_out = dy.shape[2] * dy.shape[3];
        let relu_out = self.relu.then_some(y.data.as_slice());
        pool::max_pool_backward(&dy.data, relu_out, &self.argmax, plane_in, plane_out, &mut dx.data);
        Ok(())
    }
}

pub struct AvgPool2d {
    pub kernel: usize,
    pub stride: usize,
}

impl AvgPool2d {
    pub fn new(kernel: usize, stride: usize) -> Self {
        AvgPool2d { kernel, stride }
    }
}

impl Layer for AvgPool2d {
    fn kind(&self) -> &'static str {
        "AvgPool2d"
    }

    fn export_onnx(&self, g: &mut OnnxGraph, x: &str, _name: &str) -> Result<String> {
        let (k, s) = (self.kernel as i64, self.stride as i64);
        let attrs = [
            ("kernel_shape", Attr::Ints(vec![k, k])),
            ("strides", Attr::Ints(vec![s, s])),
        ];
        Ok(g.node("AveragePool", &[x], &attrs, 4))
    }

    fn forward(&mut self, x: &Tensor, y: &mut Tensor, _mode: Mode) -> Result<()> {
        let out = pooled_shape("AvgPool2d", x, self.kernel, self.stride)?;
        y.resize_to(&out)?;
        pool::avg_pool_forward(&x.data, x.shape[2], x.shape[3], self.kernel, self.stride, &mut y.data);
        Ok(())
    }

    fn backward(&mut self, x: &Tensor, y: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
        check_grad("AvgPool2d", y, dy)?;
        dx.resize_to(&x.shape)?;
        pool::avg_pool_backward(&dy.data, x.shape[2], x.shape[3], self.kernel, self.stride, &mut dx.data);
        Ok(())
    }
}

/// [N, C, H, W] -> [N, C]: the mean of each plane.
#[derive(Default)]
pub struct GlobalAvgPool;

impl Layer for GlobalAvgPool {
    fn kind(&self) -> &'static str {
        "AdaptiveAvgPool2d"
    }

    fn export_onnx(&self, g: &mut OnnxGraph, x: &str, _name: &str) -> Result<String> {
        let y = g.node("GlobalAveragePool", &[x], &[], 4);
        Ok(g.node("Flatten", &[&y], &[("axis", Attr::Int(1))], 2))
    }

    fn forward(&mut self, x: &Tensor, y: &mut Tensor, _mode: Mode) -> Result<()> {
        let [n, c, h, w] = x.shape[..] else {
            return Err(Error::shape(
                "GlobalAvgPool",
                format!("expected [N, C, H, W], got {:?}", x.shape),
            ));
        };
        y.resize_to(&[n, c])?;
        let inv = 1.0 / (h * w) as f32;
        for (o, p) in y.data.iter_mut().zip(x.data.chunks(h * w)) {
            *o = p.iter().sum::<f32>() * inv;
        }
        Ok(())
    }

    fn backward(&mut self, x: &Tensor, y: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
        check_grad("GlobalAvgPool", y, dy)?;
        dx.resize_to(&x.shape)?;
        let inv = 1.0 / (x.shape[2] * x.shape[3]) as f32;
        for (plane, &g) in dx.data.chunks_mut(x.shape[2] * x.shape[3]).zip(&dy.data) {
            plane.fill(g * inv);
        }
        Ok(())
    }
}
