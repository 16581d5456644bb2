//! Conv2d: im2col + gemm over a fixed number of sample groups in parallel. Inside a group, small
//! feature maps are batched: the columns of several samples sit side by side in one matrix, so
//! gemm sees up to `BATCH_COLS` columns in at most `COL_BYTES` (and dW a longer sum than one
//! 7x7 map's 49 terms). Each group has its scratch and its weight-gradient partial sum; the
//! groups' scratch is one set shared by every conv (nn::shared_scratch), borrowed for a call.

mod direct;
mod pooled;
mod residual_sum;
mod winograd;
mod winograd_bands;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::kernels::im2col::{col2im, im2col, ConvGeometry};
use crate::kernels::matmul::{matmul, matmul_strided, Op};
use crate::kernels::reduce::{add_bias_relu, add_row_sums, relu_mask};
use crate::kernels::register_product::register_product;
use crate::kernels::winograd::{
    winograd_filter_gradient, winograd_filter_transform, winograd_gradient_transform, winograd_input_transform,
    winograd_output_transform, TilePlan, WinogradTile,
};
use crate::memory::{try_grow, try_resize};
pub use crate::nn::conv_algorithm::ConvAlgorithm;
use crate::nn::layer::{visit_weight_bias, Layer, Mode, Param, ParamKind};
use crate::nn::shared_scratch::{SharedScratch, SHARE_FROM_VALUES};
use crate::onnx::graph::{relu_if, Attr, OnnxGraph};
use crate::tensor::Tensor;

/// Samples are split into this many fixed groups; partial weight gradients are added in group
/// order, so dW is bit-identical for any thread count.
const GROUPS: usize = 8;

/// Samples are batched into one gemm until it has about this many columns...
const BATCH_COLS: usize = 512;

/// ... or its column matrix about this many bytes, so that im2col's output is still in L2 when
/// gemm packs it (vgg's 128->128 conv on 7x7 maps: 3 samples, not 10; fwd+bwd 8% faster).
const COL_BYTES: usize = 768 * 1024;

pub struct Conv2d {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    weight: Param,
    bias: Option<Param>,
    input_grad: bool,
    /// A ReLU fused after the bias (forward and backward), when no norm sits between.
    pub relu: bool,
    /// How the 3x3 stride-1 passes are computed (`Auto`: the measured table in `passes`).
    pub algorithm: ConvAlgorithm,
    groups: Vec<GroupScratch>,
    /// Winograd-domain kernels: U [t²][C][OC] for the forward pass, and U' [t²][OC][C] of the
    /// 180°-rotated kernels for dx.
    wino_u: Vec<f32>,
    wino_u_adjoint: Vec<f32>,
    /// The tile `wino_u` holds the current weights' transform for; None once the weights may
    /// have changed (see `weights_may_change`).
    wino_u_tile: Option<WinogradTile>,
    /// U in runs of output channels for a lone sample split by channels (winograd_bands.rs):
    /// run k, channels o0..o1, at t²·C·o0 as [t²][C][o1 - o0]; `wino_u_runs_of` the run width
    /// it was cut for (None whenever `wino_u` is derived anew, for new weights or another tile).
    wino_u_runs: Vec<f32>,
    wino_u_runs_of: Option<usize>,
    /// The weights packed for kernels::conv_direct_lanes, and whether they are the current
    /// weights' (dropped with `wino_u_tile`).
    lane_weights: Vec<f32>,
    lane_weights_current: bool,
}

/// How a conv's forward is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardMethod {
    Im2col,
    Winograd(WinogradTile),
    /// kernels::conv_direct (3x3, padding 1, stride 1 or 2); with `lanes`
    /// kernels::conv_direct_lanes (output channels in the vector lanes).
    Direct {
        lanes: bool,
    },
}

/// The method of each pass of one conv; for the backward passes None is im2col + gemm,
/// Some(tile) Winograd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvPasses {
    pub forward: ForwardMethod,
    pub input_grad: Option<WinogradTile>,
    pub weight_grad: Option<WinogradTile>,
}

/// What one sample group works in: its im2col buffer (`batch` samples side by side), its
/// [dWᵀ | db] partial sum, and the batched output or output gradient [OC, batch·cols] (unused
/// when batch = 1 and no ReLU is fused: then gemm reads and writes the tensors directly).
#[derive(Default)]
struct GroupScratch {
    col: Vec<f32>,
    partial: Vec<f32>,
    out: Vec<f32>,
    /// Winograd: the tiles of the current batch, the channels-last staging map, the two
    /// transformed buffers ([P][t²][channels]) and the Winograd-domain weight-gradient sum
    /// [t²][C][OC].
    plan: TilePlan,
    staging: Vec<f32>,
    wa: Vec<f32>,
    wb: Vec<f32>,
    du: Vec<f32>,
}

/// The pass a conv's scratch is sized for. A buffer the pass does not read keeps its length
/// (another conv's: the scratch is shared, nn::shared_scratch) instead of being cut and grown
/// back, which refills it with zeros: in folded vgg at batch 128 those fills took 8% of the
/// forward (`perf`) once one scratch served every conv.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    Forward,
    /// The forward with a 2x2 max-pool fused (the gemm always writes into `out`).
    PooledForward,
    Backward,
}

/// Winograd batches samples until the larger transformed buffer holds about this many bytes,
/// so that V and M stay near the core. On the AMD host (1 MB L2 per core) vgg bn training ran
/// 955-1020 images/s at 512 KB, 904-990 at 2 MB; on the Intel host (2 MB L2, `normlab bench`,
/// alternating runs) 256 KB against 512 KB: folded inference at batch 128 vgg 21.7-24.3 ms
/// against 24.3-26.1, vgg pruned 9.9-10.9 against 13.0-14.2, resnet 28.2-28.6 against
/// 36.4-37.2; training vgg bn level, resnet 990-1030 images/s against 906-917. (192 KB: level
/// with 256 in inference, vgg training 3-5% slower; 1 MB: 30-40% slower in inference.)
const WINOGRAD_BYTES: usize = 256 * 1024;

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
            algorithm: ConvAlgorithm::Auto,
            groups: Vec::new(),
            wino_u: Vec::new(),
            wino_u_adjoint: Vec::new(),
            wino_u_tile: None,
            wino_u_runs: Vec::new(),
            wino_u_runs_of: None,
            lane_weights: Vec::new(),
            lane_weights_current: false,
        }
    }

    /// The weights (the field is private: what is derived from them is kept in step through
    /// `weight_mut` and `visit_params`, the only ways to change them).
    pub fn weight(&self) -> &Param {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Param> {
        self.bias.as_ref()
    }

    /// The weights, to change: what was derived from them is dropped.
    pub fn weight_mut(&mut self) -> &mut Param {
        self.weights_may_change();
        &mut self.weight
    }

    pub fn bias_mut(&mut self) -> Option<&mut Param> {
        self.bias.as_mut()
    }

    /// Drops what was derived from the weights (Winograd's U, the packed weights of the
    /// channels-in-lanes kernel): called wherever a `&mut` to them
    /// leaves the layer, so a forward after an optimizer step, a loaded checkpoint or a
    /// fold derives it anew. Comparing the weights bit for bit with a copy at every call cost
    /// as much as it saved at batch 1 (13.6-15.1 µs for 128x128x9 weights on one thread).
    fn weights_may_change(&mut self) {
        self.wino_u_tile = None;
        self.wino_u_runs_of = None;
        self.lane_weights_current = false;
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

    /// Samples per group and samples per gemm, with the scratch that `pass` reads sized for
    /// them (the pooled forward's gemm writes into the group's `out` even one sample at a time).
    fn prepare(&mut self, n: usize, g: &ConvGeometry, pass: Pass) -> Result<(usize, usize)> {
        let per_group = n.div_ceil(GROUPS).max(1);
        let groups = n.div_ceil(per_group);
        let cols = g.col_cols();
        let batch = (BATCH_COLS / cols)
            .min(COL_BYTES / (4 * g.col_rows() * cols))
            .clamp(1, per_group);
        let col_len = g.col_rows() * batch * cols;
        let partial_len = self.out_channels * (g.col_rows() + 1);
        let own_out = batch > 1 || self.relu || pass == Pass::PooledForward;
        self.groups.resize_with(groups, GroupScratch::default);
        for s in self.groups.iter_mut() {
            let what = "the convolution's scratch";
            try_grow(&mut s.col, col_len, 0.0, "the convolution's im2col scratch")?;
            if pass == Pass::Backward {
                // Grown, never cut (shared by convs of other sizes); the backward zeroes its part.
                try_grow(&mut s.partial, partial_len, 0.0, what)?;
            }
            if own_out {
                try_grow(&mut s.out, self.out_channels * batch * cols, 0.0, what)?;
            }
        }
        Ok((per_group, batch))
    }
}

/// A lone sample's conv is split over the threads (columns of its gemm, channels of its im2col)
/// from this many multiply-adds: vgg's 32->32 conv at 28x28 (7.2M) went from 0.19 to 0.095 ms;
/// below it (seed-cnn's 1->32 stem, 0.23M) the split's dispatch cost more than it saved
/// (0.019 -> 0.029 ms for the whole seed-cnn at batch 1).
const SPLIT_FROM_MACS: usize = 1 << 20;

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

    fn export_onnx(&self, g: &mut OnnxGraph, x: &str, name: &str) -> Result<String> {
        let w = g.constant(
            &format!("{name}.weight"),
            &self.weight.value.shape,
            &self.weight.value.data,
        )?;
        let mut inputs = vec![x.to_string(), w];
        if let Some(b) = &self.bias {
            inputs.push(g.constant(&format!("{name}.bias"), &b.value.shape, &b.value.data)?);
        }
        let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let (k, s, p) = (self.kernel as i64, self.stride as i64, self.padding as i64);
        let y = g.node(
            "Conv",
            &inputs,
            &[
                ("kernel_shape", Attr::Ints(vec![k, k])),
                ("strides", Attr::Ints(vec![s, s])),
                ("pads", Attr::Ints(vec![p, p, p, p])),
            ],
            4,
        );
        Ok(relu_if(g, y, self.relu))
    }

    fn forward(&mut self, x: &Tensor, y: &mut Tensor, mode: Mode) -> Result<()> {
        self.with_shared_scratch(x, |conv| conv.forward_any(x, y, mode))
    }

    fn backward(&mut self, x: &Tensor, y: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
        self.with_shared_scratch(x, |conv| conv.backward_any(x, y, dy, dx))
    }

    fn visit_params<'a>(&'a mut self, f: &mut dyn FnMut(&'static str, &'a mut Param)) {
        self.weights_may_change();
        visit_weight_bias(Some(&mut self.weight), self.bias.as_mut(), f);
    }

    fn set_input_grad(&mut self, needed: bool) {
        self.input_grad = needed;
    }

    fn visit_parts(&mut self, f: &mut dyn FnMut(&mut dyn std::any::Any)) {
        f(self);
    }
}

/// The group scratch every conv borrows for a call (nn::shared_scratch).
static GROUP_SCRATCH: SharedScratch<Vec<GroupScratch>> = SharedScratch::new();

impl Conv2d {
    /// Runs `f` with the shared group scratch in `self.groups` for an input `x` of at least
    /// SHARE_FROM_VALUES values, with the conv's own below.
    pub(super) fn with_shared_scratch<R>(&mut self, x: &Tensor, f: impl FnOnce(&mut Self) -> R) -> R {
        if x.len() < SHARE_FROM_VALUES {
            return f(self);
        }
        GROUP_SCRATCH.lend(self, |c| &mut c.groups, f)
    }

    // y_n = W[OC, C*k*k] · im2col(x_n) + b, for `batch` samples at a time:
    // [OC, batch·cols] = W · [im2col(x_p) side by side]
    fn forward_any(&mut self, x: &Tensor, y: &mut Tensor, mode: Mode) -> Result<()> {
        let g = self.geometry(x)?;
        match self.passes(&g, x.batch(), mode).forward {
            ForwardMethod::Winograd(tile) => return self.forward_winograd(x, y, &g, tile, None, None),
            ForwardMethod::Direct { lanes } => return self.forward_direct(x, y, &g, lanes, None, None),
            ForwardMethod::Im2col => {}
        }
        let n = x.batch();
        let (rows, cols) = (g.col_rows(), g.col_cols());
        let oc = self.out_channels;
        let (per_group, batch) = self.prepare(n, &g, Pass::Forward)?;
        y.resize_to(&[n, oc, g.out_h(), g.out_w()])?;
        let (w, bias) = (
            &self.weight.value.data,
            self.bias.as_ref().map(|b| b.value.data.as_slice()),
        );
        let xs = x.sample_len();
        let threads = gemm_threads(n);
        let relu = self.relu;
        y.data
            .par_chunks_mut(per_group * oc * cols)
            .zip(x.data.par_chunks(per_group * xs))
            .zip(self.groups.par_iter_mut())
            .for_each(|((yg, xg), scratch)| {
                let GroupScratch { col, out, .. } = scratch;
                for (yb, xb) in yg.chunks_mut(batch * oc * cols).zip(xg.chunks(batch * xs)) {
                    let p = xb.len() / xs;
                    let ld = p * cols;
                    let split = p == 1 && threads > 1 && oc * cols * rows >= SPLIT_FROM_MACS;
                    if split && g.channels >= 2 * threads {
                        // A lone sample's im2col by channel runs over the threads (each
                        // channel's k·k rows of the column matrix are its own).
                        let per = g.channels.div_ceil(threads);
                        let plane = g.height * g.width;
                        let taps = g.kernel_h * g.kernel_w;
                        col[..rows * cols]
                            .par_chunks_mut(per * taps * cols)
                            .zip(xb.par_chunks(per * plane))
                            .for_each(|(ct, xt)| {
                                let sub = ConvGeometry {
                                    channels: xt.len() / plane,
                                    ..g
                                };
                                im2col(xt, &sub, ct, cols);
                            });
                    } else {
                        for (i, xi) in xb.chunks(xs).enumerate() {
                            im2col(xi, &g, &mut col[i * cols..], ld);
                        }
                    }
                    if split {
                        // A lone sample: the columns (output positions) split over the threads,
                        // each a gemm of W against its block of the column matrix into its own
                        // [OC, block] buffer, copied into y's rows (gemm's own threading left
                        // this size on one core: batch 1 ran as fast on 1 thread as on 2).
                        let block = cols.div_ceil(threads).div_ceil(16) * 16;
                        let starts: Vec<usize> = (0..cols).step_by(block).collect();
                        let parts: Vec<Vec<f32>> = starts
                            .par_iter()
                            .map(|&c0| {
                                let bw = block.min(cols - c0);
                                let mut part = vec![0.0f32; oc * bw];
                                matmul_strided(
                                    &mut part,
                                    bw,
                                    oc,
                                    bw,
                                    rows,
                                    (w, rows, Op::N),
                                    (&col[c0..], cols, Op::N),
                                    false,
                                    1,
                                );
                                part
                            })
                            .collect();
                        for (&c0, part) in starts.iter().zip(&parts) {
                            let bw = part.len() / oc;
                            for (o, yr) in yb.chunks_mut(cols).enumerate() {
                                yr[c0..c0 + bw].copy_from_slice(&part[o * bw..(o + 1) * bw]);
                            }
                        }
                        if bias.is_some() || relu {
                            add_bias_relu(yb, cols, bias, relu);
                        }
                        continue;
                    }
                    if p == 1 {
                        matmul(yb, oc, cols, rows, w, Op::N, col, Op::N, false, threads);
                        // Epilogue while the sample's output is in cache: + bias, then ReLU.
                        if bias.is_some() || relu {
                            add_bias_relu(yb, cols, bias, relu);
                        }
                        continue;
                    }
                    matmul(out, oc, ld, rows, w, Op::N, col, Op::N, false, threads);
                    // Scatter [OC, p·cols] into the samples' [OC, cols] blocks, with the epilogue.
                    for (i, ys) in yb.chunks_mut(oc * cols).enumerate() {
                        for (o, yr) in ys.chunks_mut(cols).enumerate() {
                            yr.copy_from_slice(&out[o * ld + i * cols..o * ld + (i + 1) * cols]);
                        }
                        if bias.is_some() || relu {
                            add_bias_relu(ys, cols, bias, relu);
                        }
                    }
                }
            });
        Ok(())
    }

    // dW = Σ_n dy_n · im2col(x_n)ᵀ,  db = Σ dy,  dx_n = col2im(Wᵀ · dy_n), `batch` samples at a
    // time: dW += [dy_p side by side] · [im2col(x_p) side by side]ᵀ
    fn backward_any(&mut self, x: &Tensor, y: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
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
        if y.shape != dy.shape {
            return Err(Error::shape(
                "Conv2d",
                format!("output {:?} does not match gradient {:?}", y.shape, dy.shape),
            ));
        }
        let passes = self.passes(&g, n, Mode::Train);
        if passes.weight_grad.is_some() || (passes.input_grad.is_some() && self.input_grad) {
            self.backward_winograd(x, y, dy, dx, &g, passes)?;
            return Ok(());
        }
        let (per_group, batch) = self.prepare(n, &g, Pass::Backward)?;
        let xs = x.sample_len();
        let input_grad = self.input_grad;
        dx.resize_to(&x.shape)?;
        let w = &self.weight.value.data;
        let threads = gemm_threads(n);
        let has_bias = self.bias.is_some();
        let relu = self.relu;
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
                let GroupScratch { col, partial, out, .. } = scratch;
                let partial = &mut partial[..oc * (rows + 1)];
                partial.fill(0.0);
                let (dw_t, db) = partial.split_at_mut(oc * rows);
                let batches = dyg.chunks(batch * oc * cols).zip(yg.chunks(batch * oc * cols));
                for (((dyb, yb), xb), dxb) in batches.zip(xg.chunks(batch * xs)).zip(dxg.chunks_mut(batch * xs)) {
                    let p = xb.len() / xs;
                    let ld = p * cols;
                    // The gradient reaching the conv, [OC, p·cols]: dy (· [y > 0] with a fused
                    // ReLU), gathered side by side when batching.
                    let grad: &[f32] = if p == 1 && !relu {
                        dyb
                    } else {
                        for (i, (dys, ys)) in dyb.chunks(oc * cols).zip(yb.chunks(oc * cols)).enumerate() {
                            for (o, (dr, yr)) in dys.chunks(cols).zip(ys.chunks(cols)).enumerate() {
                                let dst = &mut out[o * ld + i * cols..o * ld + (i + 1) * cols];
                                if relu {
                                    for ((m, &gv), &v) in dst.iter_mut().zip(dr).zip(yr) {
                                        *m = relu_mask(v, gv);
                                    }
                                } else {
                                    dst.copy_from_slice(dr);
                                }
                            }
                        }
                        &out[..oc * ld]
                    };
                    for (i, xi) in xb.chunks(xs).enumerate() {
                        im2col(xi, &g, &mut col[i * cols..], ld);
                    }
                    // dWᵀ[rows, OC] += col · gradᵀ: in this orientation gemm reads col without
                    // repacking it (32->32 conv on 28x28 maps: 70 -> 104 GFLOP/s per core).
                    matmul(dw_t, rows, oc, ld, col, Op::N, grad, Op::T, true, threads);
                    if has_bias {
                        add_row_sums(grad, ld, db);
                    }
                    if input_grad {
                        // The column buffer is free again: reuse it for Wᵀ·dy.
                        matmul(col, rows, ld, oc, w, Op::T, grad, Op::N, false, threads);
                        for (i, dxi) in dxb.chunks_mut(xs).enumerate() {
                            col2im(&mut col[i * cols..], &g, dxi, ld);
                        }
                    }
                }
            });
        self.add_group_partials(rows, true);
        // Without input_grad (the network's first layer) dx is sized but left unspecified.
        Ok(())
    }
}
