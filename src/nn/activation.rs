//! Pointwise activations. Backward reads the stored output, so they keep no state.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::kernels::reduce::relu_mask;
use crate::nn::layer::{Layer, Mode};
use crate::onnx::graph::OnnxGraph;
use crate::tensor::Tensor;

const CHUNK: usize = 1 << 14;

fn check(layer: &str, y: &Tensor, dy: &Tensor) -> Result<()> {
    if dy.shape != y.shape {
        return Err(Error::shape(
            layer,
            format!("gradient {:?} does not match output {:?}", dy.shape, y.shape),
        ));
    }
    Ok(())
}

#[derive(Default)]
pub struct ReLU;

impl Layer for ReLU {
    fn kind(&self) -> &'static str {
        "ReLU"
    }

    fn export_onnx(&self, g: &mut OnnxGraph, x: &str, _name: &str) -> Result<String> {
        let rank = g.rank(x)?;
        Ok(g.node("Relu", &[x], &[], rank))
    }

    // y = max(x, 0)
    fn forward(&mut self, x: &Tensor, y: &mut Tensor, _mode: Mode) -> Result<()> {
        y.resize_to(&x.shape)?;
        y.data
            .par_chunks_mut(CHUNK)
            .zip(x.data.par_chunks(CHUNK))
            .for_each(|(o, i)| {
                o.iter_mut()
                    .zip(i)
                    .for_each(|(o, &v)| *o = crate::kernels::reduce::relu(v));
            });
        Ok(())
    }

    // dx = dy · [y > 0]
    fn backward(&mut self, _x: &Tensor, y: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
        check("ReLU", y, dy)?;
        dx.resize_to(&dy.shape)?;
        dx.data
            .par_chunks_mut(CHUNK)
            .zip(dy.data.par_chunks(CHUNK).zip(y.data.par_chunks(CHUNK)))
            .for_each(|(o, (d, y))| {
                for ((o, &g), &v) in o.iter_mut().zip(d).zip(y) {
                    *o = relu_mask(v, g);
                }
            });
        Ok(())
    }
}

#[derive(Default)]
pub struct Sigmoid;

impl Layer for Sigmoid {
    fn kind(&self) -> &'static str {
        "Sigmoid"
    }

    fn export_onnx(&self, g: &mut OnnxGraph, x: &str, _name: &str) -> Result<String> {
        let rank = g.rank(x)?;
        Ok(g.node("Sigmoid", &[x], &[], rank))
    }

    // y = 1 / (1 + e^-x)
    fn forward(&mut self, x: &Tensor, y: &mut Tensor, _mode: Mode) -> Result<()> {
        y.resize_to(&x.shape)?;
        y.data
            .par_chunks_mut(CHUNK)
            .zip(x.data.par_chunks(CHUNK))
            .for_each(|(o, i)| {
                o.iter_mut().zip(i).for_each(|(o, &v)| *o = 1.0 / (1.0 + (-v).exp()));
            });
        Ok(())
    }

    // dx = dy · y · (1 - y)
    fn backward(&mut self, _x: &Tensor, y: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
        check("Sigmoid", y, dy)?;
        dx.resize_to(&dy.shape)?;
        dx.data
            .par_chunks_mut(CHUNK)
            .zip(dy.data.par_chunks(CHUNK).zip(y.data.par_chunks(CHUNK)))
            .for_each(|(o, (d, y))| {
                for ((o, &g), &v) in o.iter_mut().zip(d).zip(y) {
                    *o = g * v * (1.0 - v);
                }
            });
        Ok(())
    }
}
