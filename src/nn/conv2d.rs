//! Conv2d: im2col + gemm per sample, samples in parallel.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::kernels::im2col::{col2im, im2col, ConvGeometry};
use crate::kernels::matmul::{matmul, Op};
use crate::nn::layer::{Layer, Mode, Param, ParamKind};
use crate::tensor::Tensor;

/// Weight-gradient partial sums are taken over this many fixed groups of samples, then added
/// in order, so dW is bit-identical for any thread count.
const GRAD_GROUPS: usize = 8;

pub struct Conv2d {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub weight: Param,
    pub bias: Option<Param>,
    input_grad: bool,
    input: Tensor,
}

impl Conv2d {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        bias: bool,
        rng: &mut impl rand::Rng,
    ) -> Self {
        let fan_in = in_channels * kernel * kernel;
        let w = crate::nn::init::uniform_fan_in(rng, out_channels * fan_in, fan_in);
        let weight = Param::new(
            Tensor {
                shape: vec![out_channels, in_channels, kernel, kernel],
                data: w,
            },
            ParamKind::Weight,
        );
        let bias = bias.then(|| {
            let b = crate::nn::init::uniform_fan_in(rng, out_channels, fan_in);
            Param::new(
                Tensor {
                    shape: vec![out_channels],
                    data: b,
                },
                ParamKind::Bias,
            )
        });
        Conv2d {
            in_channels,
            out_channels,
            kernel,
            stride,
            padding,
            weight,
            bias,
            input_grad: true,
            input: Tensor::default(),
        }
    }

    fn geometry(&self, x: &Tensor) -> Result<ConvGeometry> {
        let [_, c, h, w] = x.shape[..] else {
            return Err(Error::shape(
                "Conv2d",
                format!("expected input [N, C, H, W], got {:?}", x.shape),
            ));
        };
        if c != self.in_channels {
            return Err(Error::shape(
                "Conv2d",
                format!("expected {} input channels, got input {:?}", self.in_channels, x.shape),
            ));
        }
        if h + 2 * self.padding < self.kernel || w + 2 * self.padding < self.kernel {
            return Err(Error::shape(
                "Conv2d",
                format!(
                    "input {:?} is smaller than the {}x{} kernel",
                    x.shape, self.kernel, self.kernel
                ),
            ));
        }
        Ok(ConvGeometry {
            channels: c,
            height: h,
            width: w,
            kernel_h: self.kernel,
            kernel_w: self.kernel,
            stride: self.stride,
            padding: self.padding,
        })
    }
}

impl Layer for Conv2d {
    fn kind(&self) -> &'static str {
        "Conv2d"
    }

    // y_n = W[OC, C*k*k] · im2col(x_n) + b
    fn forward(&mut self, x: Tensor, mode: Mode) -> Result<Tensor> {
        let g = self.geometry(&x)?;
        let n = x.batch();
        let (rows, cols) = (g.col_rows(), g.col_cols());
        let oc = self.out_channels;
        let mut y = Tensor::zeros(&[n, oc, g.out_h(), g.out_w()]);
        let w = &self.weight.value.data;
        let bias = self.bias.as_ref().map(|b| &b.value.data);
        y.data
            .par_chunks_mut(oc * cols)
            .zip(x.data.par_chunks(x.sample_len()))
            .for_each_init(
                || vec![0.0f32; rows * cols],
                |col, (ys, xs)| {
                    im2col(xs, &g, col);
                    matmul(ys, oc, cols, rows, w, Op::N, col, Op::N, false, 1);
                    if let Some(b) = bias {
                        for (plane, &bv) in ys.chunks_mut(cols).zip(b.iter()) {
                            plane.iter_mut().for_each(|v| *v += bv);
                        }
                    }
                },
            );
        if mode == Mode::Train {
            self.input = x;
        }
        Ok(y)
    }

    // dW = Σ_n dy_n · im2col(x_n)ᵀ,  db = Σ dy,  dx_n = col2im(Wᵀ · dy_n)
    fn backward(&mut self, dy: Tensor) -> Result<Tensor> {
        let x = &self.input;
        if x.is_empty() {
            return Err(Error::invalid("Conv2d backward called without a training forward"));
        }
        let g = self.geometry(x)?;
        let n = x.batch();
        let (rows, cols) = (g.col_rows(), g.col_cols());
        let oc = self.out_channels;
        if dy.shape != [n, oc, g.out_h(), g.out_w()] {
            return Err(Error::shape(
                "Conv2d",
                format!("gradient {:?} does not match output", dy.shape),
            ));
        }
        let per_group = n.div_ceil(GRAD_GROUPS).max(1);
        let xs = x.sample_len();
        let partials: Vec<Vec<f32>> = (0..n.div_ceil(per_group))
            .into_par_iter()
            .map(|grp| {
                let mut dw = vec![0.0f32; oc * rows];
                let mut col = vec![0.0f32; rows * cols];
                for i in grp * per_group..((grp + 1) * per_group).min(n) {
                    im2col(&x.data[i * xs..(i + 1) * xs], &g, &mut col);
                    let dyi = &dy.data[i * oc * cols..(i + 1) * oc * cols];
                    matmul(&mut dw, oc, rows, cols, dyi, Op::N, &col, Op::T, true, 1);
                }
                dw
            })
            .collect();
        let dw = &mut self.weight.grad.data;
        for p in &partials {
            dw.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        }
        if let Some(b) = self.bias.as_mut() {
            for i in 0..n {
                for (o, plane) in b
                    .grad
                    .data
                    .iter_mut()
                    .zip(dy.data[i * oc * cols..].chunks(cols).take(oc))
                {
                    *o += plane.iter().sum::<f32>();
                }
            }
        }
        let mut dx = Tensor::zeros(&x.shape);
        if self.input_grad {
            let w = &self.weight.value.data;
            dx.data
                .par_chunks_mut(xs)
                .zip(dy.data.par_chunks(oc * cols))
                .for_each_init(
                    || vec![0.0f32; rows * cols],
                    |dcol, (dxs, dys)| {
                        matmul(dcol, rows, cols, oc, w, Op::T, dys, Op::N, false, 1);
                        col2im(dcol, &g, dxs);
                    },
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
