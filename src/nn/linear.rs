//! Linear: y = x Wᵀ + b with PyTorch's [out, in] weight layout.

use crate::error::{Error, Result};
use crate::kernels::matmul::{matmul, Op};
use crate::nn::layer::{Layer, Mode, Param, ParamKind};
use crate::tensor::Tensor;

pub struct Linear {
    pub in_features: usize,
    pub out_features: usize,
    pub weight: Param,
    pub bias: Option<Param>,
    input_grad: bool,
    input: Tensor,
}

impl Linear {
    pub fn new(in_features: usize, out_features: usize, bias: bool, rng: &mut impl rand::Rng) -> Self {
        let w = crate::nn::init::uniform_fan_in(rng, out_features * in_features, in_features);
        let weight = Param::new(
            Tensor {
                shape: vec![out_features, in_features],
                data: w,
            },
            ParamKind::Weight,
        );
        let bias = bias.then(|| {
            let b = crate::nn::init::uniform_fan_in(rng, out_features, in_features);
            Param::new(
                Tensor {
                    shape: vec![out_features],
                    data: b,
                },
                ParamKind::Bias,
            )
        });
        Linear {
            in_features,
            out_features,
            weight,
            bias,
            input_grad: true,
            input: Tensor::default(),
        }
    }

    fn check(&self, x: &Tensor) -> Result<()> {
        if x.shape.len() != 2 || x.shape[1] != self.in_features {
            return Err(Error::shape(
                "Linear",
                format!("expected input [N, {}], got {:?}", self.in_features, x.shape),
            ));
        }
        Ok(())
    }
}

/// Threads for gemm's own split of a product: worth it only for large outputs.
fn gemm_threads(work: usize) -> usize {
    if work >= 1 << 18 {
        rayon::current_num_threads()
    } else {
        1
    }
}

impl Layer for Linear {
    fn kind(&self) -> &'static str {
        "Linear"
    }

    // y[N, out] = x[N, in] · Wᵀ + b
    fn forward(&mut self, x: Tensor, mode: Mode) -> Result<Tensor> {
        self.check(&x)?;
        let (n, i, o) = (x.batch(), self.in_features, self.out_features);
        let mut y = Tensor::zeros(&[n, o]);
        matmul(
            &mut y.data,
            n,
            o,
            i,
            &x.data,
            Op::N,
            &self.weight.value.data,
            Op::T,
            false,
            gemm_threads(n * o * i),
        );
        if let Some(b) = &self.bias {
            for row in y.data.chunks_mut(o) {
                row.iter_mut().zip(&b.value.data).for_each(|(v, bv)| *v += bv);
            }
        }
        if mode == Mode::Train {
            self.input = x;
        }
        Ok(y)
    }

    // dW = dyᵀ · x,  db = Σ_n dy,  dx = dy · W
    fn backward(&mut self, dy: Tensor) -> Result<Tensor> {
        let x = &self.input;
        let (n, i, o) = (x.batch(), self.in_features, self.out_features);
        if x.is_empty() || dy.shape != [n, o] {
            return Err(Error::shape(
                "Linear",
                format!("gradient {:?} does not match the last forward", dy.shape),
            ));
        }
        let t = gemm_threads(n * o * i);
        matmul(
            &mut self.weight.grad.data,
            o,
            i,
            n,
            &dy.data,
            Op::T,
            &x.data,
            Op::N,
            true,
            t,
        );
        if let Some(b) = self.bias.as_mut() {
            for row in dy.data.chunks(o) {
                b.grad.data.iter_mut().zip(row).for_each(|(g, d)| *g += d);
            }
        }
        let mut dx = Tensor::zeros(&[n, i]);
        if self.input_grad {
            matmul(
                &mut dx.data,
                n,
                i,
                o,
                &dy.data,
                Op::N,
                &self.weight.value.data,
                Op::N,
                false,
                t,
            );
        }
        Ok(dx)
    }

    fn params(&mut self) -> Vec<(&'static str, &mut Param)> {
        let mut v = vec![("weight", &mut self.weight)];
        if let Some(b) = self.bias.as_mut() {
            v.push(("bias", b));
        }
        v
    }

    fn set_input_grad(&mut self, needed: bool) {
        self.input_grad = needed;
    }
}
