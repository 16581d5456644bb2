//! Conv2d: im2col + gemm per sample, over a fixed number of sample groups in parallel. Each
//! group owns its im2col scratch and its weight-gradient partial sum, kept between steps.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::kernels::im2col::{col2im, im2col, ConvGeometry};
use crate::kernels::matmul::{matmul, Op};
use crate::kernels::reduce::{add_bias_relu, relu_mask};
use crate::nn::layer::{visit_weight_bias, Layer, Mode, Param, ParamKind};
use crate::tensor::Tensor;

/// Samples are split into this many fixed groups; partial weight gradients are added in group
/// order, so dW is bit-identical for any thread count.
const GROUPS: usize = 8;

pub struct Conv2d {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub weight: Param,
    pub bias: Option<Param>,
    input_grad: bool,
    /// A ReLU fused after the bias (forward and backward), when no norm sits between.
    pub relu: bool,
    groups: Vec<GroupScratch>,
}

/// What one sample group works in: its im2col buffer, its [dW | db] partial sum, and (with a
/// fused ReLU) one sample's masked output gradient.
#[derive(Default)]
struct GroupScratch {
    col: Vec<f32>,
    partial: Vec<f32>,
    masked: Vec<f32>,
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
            relu: false,
            groups: Vec::new(),
        }
    }

    /// The same layer with a ReLU fused after it.
    pub fn with_relu(mut self) -> Self {
        self.relu = true;
        self
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

    /// Samples per group, and the scratch sized for `groups` groups.
    fn prepare(&mut self, n: usize, g: &ConvGeometry) -> usize {
        let per_group = n.div_ceil(GROUPS).max(1);
        let groups = n.div_ceil(per_group);
        let col_len = g.col_rows() * g.col_cols();
        let partial_len = self.out_channels * (g.col_rows() + 1);
        self.groups.resize_with(groups, GroupScratch::default);
        let masked_len = if self.relu { self.out_channels * g.col_cols() } else { 0 };
        for s in self.groups.iter_mut() {
            s.col.resize(col_len, 0.0);
            s.partial.resize(partial_len, 0.0);
            s.masked.resize(masked_len, 0.0);
        }
        per_group
    }
}

/// gemm's own threads for a lone sample (latency at batch 1); otherwise samples run in parallel.
fn gemm_threads(n: usize) -> usize {
    if n == 1 {
        rayon::current_num_threads()
    } else {
        1
    }
}

impl Layer for Conv2d {
    fn kind(&self) -> &'static str {
        if self.relu {
            "Conv2d+ReLU"
        } else {
            "Conv2d"
        }
    }

    // y_n = W[OC, C*k*k] · im2col(x_n) + b
    fn forward(&mut self, x: &Tensor, y: &mut Tensor, _mode: Mode) -> Result<()> {
        let g = self.geometry(x)?;
        let n = x.batch();
        let (rows, cols) = (g.col_rows(), g.col_cols());
        let oc = self.out_channels;
        let per_group = self.prepare(n, &g);
        y.resize_to(&[n, oc, g.out_h(), g.out_w()]);
        let (w, bias) = (&self.weight.value.data, self.bias.as_ref().map(|b| &b.value.data));
        let xs = x.sample_len();
        let threads = gemm_threads(n);
        let relu = self.relu;
        y.data
            .par_chunks_mut(per_group * oc * cols)
            .zip(x.data.par_chunks(per_group * xs))
            .zip(self.groups.par_iter_mut())
            .for_each(|((yg, xg), scratch)| {
                let col = &mut scratch.col;
                for (ys, xi) in yg.chunks_mut(oc * cols).zip(xg.chunks(xs)) {
                    im2col(xi, &g, col);
                    matmul(ys, oc, cols, rows, w, Op::N, col, Op::N, false, threads);
                    // Epilogue while the sample's output is in cache: + bias, then ReLU.
                    if bias.is_some() || relu {
                        add_bias_relu(ys, cols, bias.map(|b| b.as_slice()), relu);
                    }
                }
            });
        Ok(())
    }

    // dW = Σ_n dy_n · im2col(x_n)ᵀ,  db = Σ dy,  dx_n = col2im(Wᵀ · dy_n)
    fn backward(&mut self, x: &Tensor, y: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
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
        let per_group = self.prepare(n, &g);
        let xs = x.sample_len();
        let input_grad = self.input_grad;
        dx.resize_to(&x.shape);
        let w = &self.weight.value.data;
        let threads = gemm_threads(n);
        let relu = self.relu;
        if y.shape != dy.shape {
            return Err(Error::shape(
                "Conv2d",
                format!("output {:?} does not match gradient {:?}", y.shape, dy.shape),
            ));
        }
        self.groups
            .par_iter_mut()
            .zip(
                dy.data
                    .par_chunks(per_group * oc * cols)
                    .zip(y.data.par_chunks(per_group * oc * cols)),
            )
            .zip(x.data.par_chunks(per_group * xs))
            .zip(dx.data.par_chunks_mut(per_group * xs))
            .for_each(|(((scratch, (dyg, yg)), xg), dxg)| {
                let GroupScratch { col, partial, masked } = scratch;
                partial.fill(0.0);
                let (dw, db) = partial.split_at_mut(oc * rows);
                let samples = dyg.chunks(oc * cols).zip(yg.chunks(oc * cols));
                for (((dyi, yi), xi), dxi) in samples.zip(xg.chunks(xs)).zip(dxg.chunks_mut(xs)) {
                    // With a fused ReLU the gradient reaching the conv is dy·[y > 0].
                    let dyi: &[f32] = if relu {
                        for ((m, &g), &v) in masked.iter_mut().zip(dyi).zip(yi) {
                            *m = relu_mask(v, g);
                        }
                        masked
                    } else {
                        dyi
                    };
                    im2col(xi, &g, col);
                    matmul(dw, oc, rows, cols, dyi, Op::N, col, Op::T, true, threads);
                    for (o, plane) in db.iter_mut().zip(dyi.chunks(cols)) {
                        *o += plane.iter().sum::<f32>();
                    }
                    if input_grad {
                        // The column buffer is free again: reuse it for Wᵀ·dy.
                        matmul(col, rows, cols, oc, w, Op::T, dyi, Op::N, false, threads);
                        col2im(col, &g, dxi);
                    }
                }
            });
        let wg = &mut self.weight.grad.data;
        for s in &self.groups {
            wg.iter_mut().zip(&s.partial[..oc * rows]).for_each(|(a, b)| *a += b);
            if let Some(b) = self.bias.as_mut() {
                b.grad
                    .data
                    .iter_mut()
                    .zip(&s.partial[oc * rows..])
                    .for_each(|(a, v)| *a += v);
            }
        }
        // Without input_grad (the network's first layer) dx is sized but left unspecified.
        Ok(())
    }

    fn visit_params<'a>(&'a mut self, f: &mut dyn FnMut(&'static str, &'a mut Param)) {
        visit_weight_bias(Some(&mut self.weight), self.bias.as_mut(), f);
    }

    fn set_input_grad(&mut self, needed: bool) {
        self.input_grad = needed;
    }
}
