//! Conv2d: im2col + gemm per sample, over a fixed number of sample groups in parallel. Each
//! group owns its im2col scratch and its weight-gradient partial sum, kept between steps.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::kernels::im2col::{col2im, im2col, ConvGeometry};
use crate::kernels::matmul::{matmul, Op};
use crate::nn::layer::{Layer, Mode, Param, ParamKind};
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
    groups: Vec<GroupScratch>,
}

/// What one sample group works in: its im2col buffer and its [dW | db] partial sum.
#[derive(Default)]
struct GroupScratch {
    col: Vec<f32>,
    partial: Vec<f32>,
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
            groups: Vec::new(),
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

    /// Samples per group, and the scratch sized for `groups` groups.
    fn prepare(&mut self, n: usize, g: &ConvGeometry) -> usize {
        let per_group = n.div_ceil(GROUPS).max(1);
        let groups = n.div_ceil(per_group);
        let col_len = g.col_rows() * g.col_cols();
        let partial_len = self.out_channels * (g.col_rows() + 1);
        self.groups.resize_with(groups, GroupScratch::default);
        for s in self.groups.iter_mut() {
            s.col.resize(col_len, 0.0);
            s.partial.resize(partial_len, 0.0);
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
        "Conv2d"
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
        y.data
            .par_chunks_mut(per_group * oc * cols)
            .zip(x.data.par_chunks(per_group * xs))
            .zip(self.groups.par_iter_mut())
            .for_each(|((yg, xg), scratch)| {
                let col = &mut scratch.col;
                for (ys, xi) in yg.chunks_mut(oc * cols).zip(xg.chunks(xs)) {
                    im2col(xi, &g, col);
                    matmul(ys, oc, cols, rows, w, Op::N, col, Op::N, false, threads);
                    if let Some(b) = bias {
                        for (plane, &bv) in ys.chunks_mut(cols).zip(b.iter()) {
                            plane.iter_mut().for_each(|v| *v += bv);
                        }
                    }
                }
            });
        Ok(())
    }

    // dW = Σ_n dy_n · im2col(x_n)ᵀ,  db = Σ dy,  dx_n = col2im(Wᵀ · dy_n)
    fn backward(&mut self, x: &Tensor, _y: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
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
        self.groups
            .par_iter_mut()
            .zip(dy.data.par_chunks(per_group * oc * cols))
            .zip(x.data.par_chunks(per_group * xs))
            .zip(dx.data.par_chunks_mut(per_group * xs))
            .for_each(|(((scratch, dyg), xg), dxg)| {
                let GroupScratch { col, partial } = scratch;
                partial.fill(0.0);
                let (dw, db) = partial.split_at_mut(oc * rows);
                for ((dyi, xi), dxi) in dyg.chunks(oc * cols).zip(xg.chunks(xs)).zip(dxg.chunks_mut(xs)) {
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
        f("weight", &mut self.weight);
        if let Some(b) = self.bias.as_mut() {
            f("bias", b);
        }
    }

    fn set_input_grad(&mut self, needed: bool) {
        self.input_grad = needed;
    }
}
