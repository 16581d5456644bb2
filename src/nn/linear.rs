//! Linear: y = x Wᵀ + b with PyTorch's [out, in] weight layout. An input [N, ...] is read as
//! [N, in] (what nn.Flatten before it would give), so models need no flatten copy.

use crate::error::{Error, Result};
use crate::kernels::dense::{dense_backward, dense_forward, dense_scratch_len, DenseThen, DENSE_MAX_WEIGHTS};
use crate::kernels::gelu::{gelu_backward_from_slope, gelu_forward_keeping_slope};
use crate::kernels::matmul::{matmul, Op};
use crate::kernels::narrow_product::{narrow_product, NARROW_MAX};
use crate::nn::layer::{visit_weight_bias, Layer, Mode, Param, ParamKind};
use crate::onnx::graph::{Attr, OnnxGraph};
use crate::tensor::Tensor;

pub struct Linear {
    pub in_features: usize,
    pub out_features: usize,
    pub weight: Param,
    pub bias: Option<Param>,
    input_grad: bool,
    /// dW and db per span of rows (`dense_backward`).
    scratch: Vec<f32>,
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
            scratch: Vec::new(),
        }
    }

    fn check(&self, x: &Tensor) -> Result<()> {
        if x.shape.len() < 2 || x.sample_len() != self.in_features {
            return Err(Error::shape(
                "Linear",
                format!(
                    "expected input [N, {}] (or [N, ...] of that size), got {:?}",
                    self.in_features, x.shape
                ),
            ));
        }
        Ok(())
    }

    /// y = x Wᵀ + b, then `then` on y: fused into each block of rows where the products run
    /// by blocks, separate passes otherwise.
    pub fn forward_then(&mut self, x: &Tensor, y: &mut Tensor, then: DenseThen) -> Result<()> {
        self.check(x)?;
        let (n, i, o) = (x.batch(), self.in_features, self.out_features);
        y.resize_to(&[n, o])?;
        let narrow = (1..=NARROW_MAX).contains(&o) && i > 0;
        if !narrow && self.by_blocks(n) {
            let bias = self.bias.as_ref().map(|b| &b.value.data[..]);
            dense_forward(&x.data, &self.weight.value.data, bias, i, o, &mut y.data, then);
            return Ok(());
        }
        if narrow {
            // A classifier head: gemm packed all of x on every call (seed-cnn's 6272 -> 10 at
            // batch 128, 2 threads: 0.36 ms through gemm, 0.10 ms here).
            narrow_product(&x.data, &self.weight.value.data, i, o, &mut y.data);
        } else {
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
        }
        if let Some(b) = &self.bias {
            for row in y.data.chunks_mut(o) {
                row.iter_mut().zip(&b.value.data).for_each(|(v, bv)| *v += bv);
            }
        }
        match then {
            DenseThen::Nothing => {}
            DenseThen::AddResidual(r) => y.data.iter_mut().zip(r).for_each(|(v, r)| *v += r),
            DenseThen::GeluKeepingSlope(g) => gelu_forward_keeping_slope(&mut y.data, g),
        }
        Ok(())
    }

    /// dW += dyᵀ · x, db += Σ_n dy, dx = dy · W; with `gelu_slope` s (x = GELU(u), s = GELU'(u),
    /// as `DenseThen::GeluKeepingSlope` leaves it), dx is the gradient at u: (dy · W) ⊙ s.
    pub fn backward_into(
        &mut self,
        x: &Tensor,
        dy: &Tensor,
        dx: &mut Tensor,
        gelu_slope: Option<&Tensor>,
    ) -> Result<()> {
        self.check(x)?;
        let (n, i, o) = (x.batch(), self.in_features, self.out_features);
        if dy.shape != [n, o] {
            return Err(Error::shape(
                "Linear",
                format!("gradient {:?} does not match the output [{n}, {o}]", dy.shape),
            ));
        }
        if let Some(u) = gelu_slope.filter(|u| u.data.len() != x.data.len()) {
            return Err(Error::shape(
                "Linear",
                format!("the GELU's slope {:?} does not match the input {:?}", u.shape, x.shape),
            ));
        }
        let gelu_slope = gelu_slope.map(|u| &u.data[..]);
        dx.resize_to(&x.shape)?;
        if self.by_blocks(n) {
            self.scratch.resize(dense_scratch_len(n, i, o), 0.0);
            dense_backward(
                &x.data,
                &self.weight.value.data,
                &dy.data,
                i,
                o,
                &mut self.weight.grad.data,
                self.bias.as_mut().map(|b| &mut b.grad.data[..]),
                self.input_grad.then_some(&mut dx.data[..]),
                gelu_slope,
                &mut self.scratch,
            );
            return Ok(());
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
            if let Some(s) = gelu_slope {
                gelu_backward_from_slope(s, &mut dx.data);
            }
        }
        Ok(())
    }

    /// Whether the products run block by block (`kernels::dense`): many rows of a layer whose
    /// per-span partial dW stays small. vit:64 at batch 128 (6400 token rows), a step's Linear
    /// layers: 52 ms a step by gemm over the whole batch; vit:64 training went 1444 -> 1557-1585
    /// images/s with this alone.
    fn by_blocks(&self, rows: usize) -> bool {
        rows >= DENSE_MIN_ROWS && self.in_features * self.out_features <= DENSE_MAX_WEIGHTS
    }
}

/// Rows from which `by_blocks` holds.
const DENSE_MIN_ROWS: usize = 512;

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

    // PyTorch's Flatten before the classifier is implicit here (Linear reads [N, C, H, W] as
    // [N, C·H·W]); ONNX's Gemm needs it spelled out.
    fn export_onnx(&self, g: &mut OnnxGraph, x: &str, name: &str) -> Result<String> {
        let x = if g.rank(x)? > 2 {
            g.node("Flatten", &[x], &[("axis", Attr::Int(1))], 2)
        } else {
            x.to_string()
        };
        let w = g.constant(
            &format!("{name}.weight"),
            &self.weight.value.shape,
            &self.weight.value.data,
        )?;
        let mut inputs = vec![x, w];
        if let Some(b) = &self.bias {
            inputs.push(g.constant(&format!("{name}.bias"), &b.value.shape, &b.value.data)?);
        }
        let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        Ok(g.node("Gemm", &inputs, &[("transB", Attr::Int(1))], 2))
    }

    // y[N, out] = x[N, in] · Wᵀ + b
    fn forward(&mut self, x: &Tensor, y: &mut Tensor, _mode: Mode) -> Result<()> {
        self.forward_then(x, y, DenseThen::Nothing)
    }

    // dW = dyᵀ · x,  db = Σ_n dy,  dx = dy · W
    fn backward(&mut self, x: &Tensor, _y: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
        self.backward_into(x, dy, dx, None)
    }

    fn visit_params<'a>(&'a mut self, f: &mut dyn FnMut(&'static str, &'a mut Param)) {
        visit_weight_bias(Some(&mut self.weight), self.bias.as_mut(), f);
    }

    fn set_input_grad(&mut self, needed: bool) {
        self.input_grad = needed;
    }
}
