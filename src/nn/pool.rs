//! MaxPool2d (with stored argmax), AvgPool2d and global average pooling.

use crate::error::{Error, Result};
use crate::kernels::pool;
use crate::nn::layer::{Layer, Mode};
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

pub struct MaxPool2d {
    pub kernel: usize,
    pub stride: usize,
    in_shape: Vec<usize>,
    argmax: Vec<u32>,
}

impl MaxPool2d {
    pub fn new(kernel: usize, stride: usize) -> Self {
        MaxPool2d {
            kernel,
            stride,
            in_shape: Vec::new(),
            argmax: Vec::new(),
        }
    }
}

impl Layer for MaxPool2d {
    fn kind(&self) -> &'static str {
        "MaxPool2d"
    }

    fn forward(&mut self, x: Tensor, _mode: Mode) -> Result<Tensor> {
        let out = pooled_shape("MaxPool2d", &x, self.kernel, self.stride)?;
        let mut y = Tensor::zeros(&out);
        self.argmax.resize(y.len(), 0);
        let [n, c, h, w] = x.shape[..] else { unreachable!() };
        pool::max_pool_forward(
            &x.data,
            n * c,
            h,
            w,
            self.kernel,
            self.stride,
            &mut y.data,
            &mut self.argmax,
        );
        self.in_shape.clone_from(&x.shape);
        Ok(y)
    }

    fn backward(&mut self, dy: Tensor) -> Result<Tensor> {
        if dy.len() != self.argmax.len() || self.in_shape.len() != 4 {
            return Err(Error::shape(
                "MaxPool2d",
                format!("gradient {:?} does not match output", dy.shape),
            ));
        }
        let mut dx = Tensor::zeros(&self.in_shape);
        let plane_in = self.in_shape[2] * self.in_shape[3];
        let plane_out = dy.shape[2] * dy.shape[3];
        pool::max_pool_backward(&dy.data, &self.argmax, plane_in, plane_out, &mut dx.data);
        Ok(dx)
    }
}

pub struct AvgPool2d {
    pub kernel: usize,
    pub stride: usize,
    in_shape: Vec<usize>,
}

impl AvgPool2d {
    pub fn new(kernel: usize, stride: usize) -> Self {
        AvgPool2d {
            kernel,
            stride,
            in_shape: Vec::new(),
        }
    }
}

impl Layer for AvgPool2d {
    fn kind(&self) -> &'static str {
        "AvgPool2d"
    }

    fn forward(&mut self, x: Tensor, _mode: Mode) -> Result<Tensor> {
        let out = pooled_shape("AvgPool2d", &x, self.kernel, self.stride)?;
        let mut y = Tensor::zeros(&out);
        pool::avg_pool_forward(&x.data, x.shape[2], x.shape[3], self.kernel, self.stride, &mut y.data);
        self.in_shape.clone_from(&x.shape);
        Ok(y)
    }

    fn backward(&mut self, dy: Tensor) -> Result<Tensor> {
        if self.in_shape.len() != 4 {
            return Err(Error::invalid("AvgPool2d backward called without a forward"));
        }
        let mut dx = Tensor::zeros(&self.in_shape);
        let (h, w) = (self.in_shape[2], self.in_shape[3]);
        pool::avg_pool_backward(&dy.data, h, w, self.kernel, self.stride, &mut dx.data);
        Ok(dx)
    }
}

/// [N, C, H, W] -> [N, C]: the mean of each plane.
#[derive(Default)]
pub struct GlobalAvgPool {
    in_shape: Vec<usize>,
}

impl Layer for GlobalAvgPool {
    fn kind(&self) -> &'static str {
        "AdaptiveAvgPool2d"
    }

    fn forward(&mut self, x: Tensor, _mode: Mode) -> Result<Tensor> {
        let [n, c, h, w] = x.shape[..] else {
            return Err(Error::shape(
                "GlobalAvgPool",
                format!("expected [N, C, H, W], got {:?}", x.shape),
            ));
        };
        let inv = 1.0 / (h * w) as f32;
        let data = x.data.chunks(h * w).map(|p| p.iter().sum::<f32>() * inv).collect();
        self.in_shape.clone_from(&x.shape);
        Tensor::from_vec(&[n, c], data)
    }

    fn backward(&mut self, dy: Tensor) -> Result<Tensor> {
        let [_, _, h, w] = self.in_shape[..] else {
            return Err(Error::invalid("GlobalAvgPool backward called without a forward"));
        };
        let inv = 1.0 / (h * w) as f32;
        let mut dx = Tensor::zeros(&self.in_shape);
        for (plane, &g) in dx.data.chunks_mut(h * w).zip(&dy.data) {
            plane.fill(g * inv);
        }
        Ok(dx)
    }
}

/// [N, ...] -> [N, prod(...)], PyTorch's nn.Flatten.
#[derive(Default)]
pub struct Flatten {
    in_shape: Vec<usize>,
}

impl Layer for Flatten {
    fn kind(&self) -> &'static str {
        "Flatten"
    }

    fn forward(&mut self, x: Tensor, _mode: Mode) -> Result<Tensor> {
        self.in_shape.clone_from(&x.shape);
        let shape = [x.batch(), x.sample_len()];
        x.reshaped(&shape)
    }

    fn backward(&mut self, dy: Tensor) -> Result<Tensor> {
        dy.reshaped(&self.in_shape)
    }
}
