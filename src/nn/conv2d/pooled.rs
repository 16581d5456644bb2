//! Inference's conv → ReLU → 2x2 max-pool in one pass: each sample's conv output is pooled while
//! it is in cache, so the full-size map never goes to memory (seed-cnn's folded forward spent
//! a third of its time writing its conv's output and reading it back for the pool).

use rayon::prelude::*;

use super::{gemm_threads, Conv2d, ForwardMethod, GroupScratch, Pass, SPLIT_FROM_MACS};
use crate::error::Result;
use crate::kernels::im2col::im2col;
use crate::kernels::matmul::{matmul, Op};
use crate::kernels::pool::{max_pool_2x2_values, max_pool_2x2_values_even_rows};
use crate::kernels::reduce::add_bias_relu;
use crate::nn::layer::Mode;
use crate::tensor::Tensor;

impl Conv2d {
    // y_n = act(maxpool2x2(W · im2col(x_n)) + b): max(v + b) = max(v) + b exactly (rounding is
    // monotonic), so the bias and the ReLU go on the pooled quarter.
    /// The eval forward followed by a 2x2 stride-2 max-pool (and a ReLU when `relu`), the same
    /// values as the three layers one after another, through the direct kernel's epilogue,
    /// Winograd's output transform or im2col's. Returns false, doing nothing, for a Winograd or
    /// im2col conv with a fused ReLU of its own, a map under 2x2, or a lone sample im2col
    /// splits over the threads; the caller then runs the layers one by one.
    pub fn forward_max_pooled(&mut self, x: &Tensor, y: &mut Tensor, relu: bool) -> Result<bool> {
        self.with_shared_scratch(x, |conv| conv.forward_max_pooled_any(x, y, relu))
    }

    fn forward_max_pooled_any(&mut self, x: &Tensor, y: &mut Tensor, relu: bool) -> Result<bool> {
        let g = self.geometry(x)?;
        let (oh, ow) = (g.out_h(), g.out_w());
        let n = x.batch();
        let (rows, cols) = (g.col_rows(), g.col_cols());
        let oc = self.out_channels;
        // A lone sample big enough to be split over the threads keeps the plain forward's split
        // (this path runs one sample on one thread: vgg at batch 1 went 0.44 -> 0.72 ms).
        let split = n == 1 && rayon::current_num_threads() > 1 && oc * cols * rows >= SPLIT_FROM_MACS;
        let forward = self.passes(&g, n, Mode::Eval).forward;
        if let (ForwardMethod::Direct { lanes }, true) = (forward, oh >= 2 && ow >= 2) {
            self.forward_direct(x, y, &g, lanes, Some(relu), None)?;
            return Ok(true);
        }
        // Winograd pools in its output transform; with a ReLU of the conv's own the pool's
        // max-then-ReLU would differ from ReLU-then-max where a window holds a NaN.
        if let ForwardMethod::Winograd(tile) = forward {
            if self.relu || oh < 2 || ow < 2 {
                return Ok(false);
            }
            self.forward_winograd(x, y, &g, tile, Some(relu), None)?;
            return Ok(true);
        }
        if self.relu || split || oh < 2 || ow < 2 || forward != ForwardMethod::Im2col {
            return Ok(false);
        }
        let (per_group, batch) = self.prepare(n, &g, Pass::PooledForward)?;
        let (ph, pw) = (oh / 2, ow / 2);
        let pooled = ph * pw;
        y.resize_to(&[n, oc, ph, pw])?;
        let (w, bias) = (
            &self.weight.value.data,
            self.bias.as_ref().map(|b| b.value.data.as_slice()),
        );
        let xs = x.sample_len();
        let threads = gemm_threads(n);
        y.data
            .par_chunks_mut(per_group * oc * pooled)
            .zip(x.data.par_chunks(per_group * xs))
            .zip(self.groups.par_iter_mut())
            .for_each(|((yg, xg), scratch)| {
                let GroupScratch { col, out, .. } = scratch;
                for (yb, xb) in yg.chunks_mut(batch * oc * pooled).zip(xg.chunks(batch * xs)) {
                    let p = xb.len() / xs;
                    let ld = p * cols;
                    for (i, xi) in xb.chunks(xs).enumerate() {
                        im2col(xi, &g, &mut col[i * cols..], ld);
                    }
                    matmul(out, oc, ld, rows, w, Op::N, col, Op::N, false, threads);
                    // The column matrix is spent: its first half-plane is the pool's scratch.
                    // Even widths: the bias and ReLU in the pool's own pass.
                    let fused = ow % 2 == 0;
                    for (i, ys) in yb.chunks_mut(oc * pooled).enumerate() {
                        for (o, yp) in ys.chunks_mut(pooled).enumerate() {
                            let plane = &out[o * ld + i * cols..o * ld + (i + 1) * cols];
                            if fused {
                                let b = bias.map(|b| b[o]);
                                max_pool_2x2_values_even_rows(plane, ow, pw, b, relu, yp, col);
                            } else {
                                max_pool_2x2_values(plane, ow, pw, false, yp);
                            }
                        }
                        if !fused && (bias.is_some() || relu) {
                            add_bias_relu(ys, pooled, bias, relu);
                        }
                    }
                }
            });
        Ok(true)
    }
}
