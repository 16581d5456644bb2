//! Conv2d: im2col + gemm over a fixed number of sample groups in parallel. Inside a group, small
//! feature maps are batched: the columns of several samples sit side by side in one matrix, so
//! gemm sees up to `BATCH_COLS` columns in at most `COL_BYTES` (and dW a longer sum than one
//! 7x7 map's 49 terms). Each group owns its scratch and its weight-gradient partial sum, kept
//! between steps.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::kernels::im2col::{col2im, im2col, ConvGeometry};
use crate::kernels::matmul::{matmul, matmul_strided, Op};
use crate::kernels::reduce::{add_bias_relu, add_row_sums, relu_mask};
use crate::kernels::winograd::{
    winograd_filter_gradient, winograd_filter_transform, winograd_gradient_transform, winograd_input_transform,
    winograd_output_transform, TilePlan, WinogradTile,
};
use crate::memory::try_resize;
pub use crate::nn::conv_algorithm::ConvAlgorithm;
use crate::nn::layer::{visit_weight_bias, Layer, Mode, Param, ParamKind};
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
    pub weight: Param,
    pub bias: Option<Param>,
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
}

/// The method of each pass of one conv: None is im2col + gemm, Some(tile) Winograd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvPasses {
    pub forward: Option<WinogradTile>,
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

impl GroupScratch {
    /// out = the 3x3 padding-1 conv of `src` (the planned samples × cin × h × w) with the
    /// Winograd-domain kernels `u` [t²][cin][cout] (+ bias, then ReLU): V = Bᵀ src B into `wa`,
    /// M_ξ = V_ξ · U_ξ into `wb` (one gemm per position, rows t² apart), out = Aᵀ M A.
    #[allow(clippy::too_many_arguments)]
    fn winograd_conv(
        &mut self,
        src: &[f32],
        cin: usize,
        u: &[f32],
        cout: usize,
        out: &mut [f32],
        bias: Option<&[f32]>,
        relu: bool,
        threads: usize,
    ) {
        let Some(tile) = self.plan.tile else { return };
        let (t2, p) = (tile.t() * tile.t(), self.plan.tiles());
        winograd_input_transform(&self.plan, src, cin, &mut self.wa, &mut self.staging);
        for xi in 0..t2 {
            let v_xi = (&self.wa[xi * cin..], t2 * cin, Op::N);
            let u_xi = (&u[xi * cin * cout..], cout, Op::N);
            matmul_strided(
                &mut self.wb[xi * cout..],
                t2 * cout,
                p,
                cout,
                cin,
                v_xi,
                u_xi,
                false,
                threads,
            );
        }
        winograd_output_transform(&self.plan, &self.wb, cout, out, bias, relu, &mut self.staging);
    }
}

/// Winograd batches samples until the larger transformed buffer holds about this many bytes:
/// half of L2, so V and M stay near the core (vgg bn training, 3 alternating runs: 955-1020
/// images/s at 512 KB, 904-990 at 2 MB).
const WINOGRAD_BYTES: usize = 512 * 1024;

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

    /// Samples per group and samples per gemm, with the scratch sized for them.
    fn prepare(&mut self, n: usize, g: &ConvGeometry) -> Result<(usize, usize)> {
        let per_group = n.div_ceil(GROUPS).max(1);
        let groups = n.div_ceil(per_group);
        let cols = g.col_cols();
        let batch = (BATCH_COLS / cols)
            .min(COL_BYTES / (4 * g.col_rows() * cols))
            .clamp(1, per_group);
        let col_len = g.col_rows() * batch * cols;
        let partial_len = self.out_channels * (g.col_rows() + 1);
        let out_len = if batch > 1 || self.relu {
            self.out_channels * batch * cols
        } else {
            0
        };
        self.groups.resize_with(groups, GroupScratch::default);
        for s in self.groups.iter_mut() {
            try_resize(&mut s.col, col_len, 0.0, "the convolution's im2col scratch")?;
            try_resize(&mut s.partial, partial_len, 0.0, "the convolution's scratch")?;
            try_resize(&mut s.out, out_len, 0.0, "the convolution's scratch")?;
        }
        Ok((per_group, batch))
    }
}

impl Conv2d {
    /// The method of each pass for geometry `g` and a batch of n samples. Winograd needs a 3x3
    /// kernel, stride 1 and padding 1 (then dx is again such a conv); `Auto` takes the
    /// measured table below.
    pub fn passes(&self, g: &ConvGeometry, n: usize) -> ConvPasses {
        let eligible = self.kernel == 3 && self.stride == 1 && self.padding == 1;
        let all = |t: Option<WinogradTile>| ConvPasses {
            forward: t,
            input_grad: t,
            weight_grad: t,
        };
        match self.algorithm {
            _ if !eligible => all(None),
            ConvAlgorithm::Im2col => all(None),
            ConvAlgorithm::Winograd(t) => all(Some(t)),
            ConvAlgorithm::Auto => auto_passes(n, g.channels, self.out_channels),
        }
    }

    /// Samples per group and per Winograd batch, with the scratch sized for them.
    fn prepare_winograd(
        &mut self,
        n: usize,
        g: &ConvGeometry,
        tile: WinogradTile,
        im2col_dw: bool,
    ) -> Result<(usize, usize)> {
        let per_group = n.div_ceil(GROUPS).max(1);
        let groups = n.div_ceil(per_group);
        let (m, t) = (tile.m(), tile.t());
        let tiles = g.height.div_ceil(m) * g.width.div_ceil(m);
        let widest = g.channels.max(self.out_channels);
        let batch = (WINOGRAD_BYTES / (4 * t * t * widest * tiles)).clamp(1, per_group);
        let transformed = t * t * widest * tiles * batch;
        let staging = (g.height.div_ceil(m) * m + 2) * (g.width.div_ceil(m) * m + 2) * widest.next_multiple_of(16);
        let (oc, rows, cols) = (self.out_channels, g.col_rows(), g.col_cols());
        self.groups.resize_with(groups, GroupScratch::default);
        for s in self.groups.iter_mut() {
            let what = "the Winograd convolution's scratch";
            try_resize(&mut s.staging, staging, 0.0, what)?;
            try_resize(&mut s.wa, transformed, 0.0, what)?;
            try_resize(&mut s.wb, transformed, 0.0, what)?;
            try_resize(&mut s.du, t * t * oc * g.channels, 0.0, what)?;
            try_resize(&mut s.partial, oc * (rows + 1), 0.0, what)?;
            try_resize(&mut s.out, if self.relu { oc * cols * batch } else { 0 }, 0.0, what)?;
            try_resize(&mut s.col, if im2col_dw { rows * cols } else { 0 }, 0.0, what)?;
        }
        Ok((per_group, batch))
    }

    // Winograd forward: U = G W Gᵀ once, then per batch of samples V = Bᵀ x B, M_ξ = V_ξ · U_ξ
    // (t² gemms), y = Aᵀ M A + b (then ReLU).
    fn forward_winograd(&mut self, x: &Tensor, y: &mut Tensor, g: &ConvGeometry, tile: WinogradTile) -> Result<()> {
        let n = x.batch();
        let (c, oc, t2) = (g.channels, self.out_channels, tile.t() * tile.t());
        let (per_group, batch) = self.prepare_winograd(n, g, tile, false)?;
        self.wino_u.resize(t2 * oc * c, 0.0);
        winograd_filter_transform(tile, &self.weight.value.data, oc, c, false, &mut self.wino_u);
        y.resize_to(&[n, oc, g.out_h(), g.out_w()])?;
        let (xs, ys) = (x.sample_len(), oc * g.col_cols());
        let (u, bias, relu) = (
            &self.wino_u,
            self.bias.as_ref().map(|b| b.value.data.as_slice()),
            self.relu,
        );
        let threads = gemm_threads(n);
        y.data
            .par_chunks_mut(per_group * ys)
            .zip(x.data.par_chunks(per_group * xs))
            .zip(self.groups.par_iter_mut())
            .for_each(|((yg, xg), s)| {
                for (yb, xb) in yg.chunks_mut(batch * ys).zip(xg.chunks(batch * xs)) {
                    s.plan.update(tile, xb.len() / xs, g.height, g.width);
                    s.winograd_conv(xb, c, u, oc, yb, bias, relu, threads);
                }
            });
        Ok(())
    }

    // Winograd backward, per batch of samples: grad = dy (· [y > 0] with a fused ReLU);
    // dU_ξ += (Bᵀ x B)_ξᵀ · (A grad Aᵀ)_ξ, or dWᵀ += im2col(x) · gradᵀ when `passes` says so;
    // dx = Aᵀ [(Bᵀ grad B)_ξ · U'_ξ] A with U' the flipped kernels.
    fn backward_winograd(
        &mut self,
        x: &Tensor,
        y: &Tensor,
        dy: &Tensor,
        dx: &mut Tensor,
        g: &ConvGeometry,
        passes: ConvPasses,
    ) -> Result<()> {
        let n = x.batch();
        let (c, oc, rows, cols) = (g.channels, self.out_channels, g.col_rows(), g.col_cols());
        let Some(tile) = passes.input_grad.or(passes.weight_grad) else {
            return Ok(());
        };
        let t2 = tile.t() * tile.t();
        let dw_tile = passes.weight_grad;
        let dx_tile = passes.input_grad.filter(|_| self.input_grad);
        let (per_group, batch) = self.prepare_winograd(n, g, tile, dw_tile.is_none())?;
        if dx_tile.is_some() {
            self.wino_u_adjoint.resize(t2 * c * oc, 0.0);
            winograd_filter_transform(tile, &self.weight.value.data, oc, c, true, &mut self.wino_u_adjoint);
        }
        dx.resize_to(&x.shape)?;
        let (xs, ys) = (x.sample_len(), oc * cols);
        let (u_adj, has_bias, relu) = (&self.wino_u_adjoint, self.bias.is_some(), self.relu);
        let threads = gemm_threads(n);
        self.groups
            .par_iter_mut()
            .zip(
                dy.data
                    .par_chunks(per_group * ys)
                    .zip(y.data.par_chunks(per_group * ys)),
            )
            .zip(x.data.par_chunks(per_group * xs))
            .zip(dx.data.par_chunks_mut(per_group * xs))
            .for_each(|(((s, (dyg, yg)), xg), dxg)| {
                s.partial.fill(0.0);
                s.du.fill(0.0);
                // The ReLU-masked gradient, held apart from the scratch the convs below borrow.
                let mut masked = std::mem::take(&mut s.out);
                let batches = dyg.chunks(batch * ys).zip(yg.chunks(batch * ys));
                for (((dyb, yb), xb), dxb) in batches.zip(xg.chunks(batch * xs)).zip(dxg.chunks_mut(batch * xs)) {
                    let samples = xb.len() / xs;
                    let grad: &[f32] = if relu {
                        for ((m, &gv), &v) in masked.iter_mut().zip(dyb).zip(yb) {
                            *m = relu_mask(v, gv);
                        }
                        &masked[..samples * ys]
                    } else {
                        dyb
                    };
                    let (dw_t, db) = s.partial.split_at_mut(oc * rows);
                    if has_bias {
                        for gs in grad.chunks(ys) {
                            add_row_sums(gs, cols, db);
                        }
                    }
                    s.plan.update(tile, samples, g.height, g.width);
                    let p = s.plan.tiles();
                    if dw_tile.is_some() {
                        winograd_input_transform(&s.plan, xb, c, &mut s.wa, &mut s.staging);
                        winograd_gradient_transform(&s.plan, grad, oc, &mut s.wb, &mut s.staging);
                        for xi in 0..t2 {
                            let v_t = (&s.wa[xi * c..], t2 * c, Op::T);
                            let dm = (&s.wb[xi * oc..], t2 * oc, Op::N);
                            matmul_strided(&mut s.du[xi * c * oc..], oc, c, oc, p, v_t, dm, true, threads);
                        }
                    } else {
                        for (xi, gs) in xb.chunks(xs).zip(grad.chunks(ys)) {
                            im2col(xi, g, &mut s.col, cols);
                            matmul(dw_t, rows, oc, cols, &s.col, Op::N, gs, Op::T, true, threads);
                        }
                    }
                    if dx_tile.is_some() {
                        s.winograd_conv(grad, oc, u_adj, c, dxb, None, false, threads);
                    }
                }
                s.out = masked;
            });
        self.add_group_partials(rows, dw_tile.is_none());
        // An empty batch has no groups and adds nothing.
        if let (Some(tile), Some((first, rest))) = (dw_tile, self.groups.split_first_mut()) {
            for s in rest.iter() {
                first.du.iter_mut().zip(&s.du).for_each(|(a, v)| *a += v);
            }
            winograd_filter_gradient(tile, &first.du, oc, c, &mut self.weight.grad.data);
        }
        Ok(())
    }

    /// Adds the groups' [dWᵀ | db] partial sums into the gradients, in group order (dWᵀ only
    /// when im2col computed the weight gradient).
    fn add_group_partials(&mut self, rows: usize, im2col_dw: bool) {
        let oc = self.out_channels;
        let wg = &mut self.weight.grad.data;
        for s in &self.groups {
            if im2col_dw {
                for (r, dw_row) in s.partial[..oc * rows].chunks(oc).enumerate() {
                    for (o, &v) in dw_row.iter().enumerate() {
                        wg[o * rows + r] += v;
                    }
                }
            }
            if let Some(b) = self.bias.as_mut() {
                b.grad
                    .data
                    .iter_mut()
                    .zip(&s.partial[oc * rows..])
                    .for_each(|(a, v)| *a += v);
            }
        }
    }
}

/// The measured choice for a 3x3, stride-1, padding-1 conv of C -> OC channels on h×w maps
/// for a batch of n samples (`normlab bench --filter conv`, batch 128, 2 threads;
/// ARCHITECTURE.md has the table). F(4x4,3x3) took the forward pass and dx 1.2-1.8x faster
/// than im2col on every shape with C, OC >= 32 and was level on 16->16 at 28x28 (0.9-1.2x
/// across runs); F(2x2,3x3) was never ahead of it; with
/// one input channel (the stem) the transforms cost more than the 9-row gemm they save. The
/// weight gradient gained only from 32 channels up (on 16->16 at 28x28 Winograd was 1.4x
/// slower). Below 16 samples the kernel transforms, redone at every call, cost more than the
/// samples save (`bench/inference_vs_runtimes.py`, vgg at batch 1: 2.1-2.4 ms with Winograd,
/// 0.68 ms with im2col, on this session's host). The forward
/// pass keeps F(4x4) to 128 input channels, the widest the goldens hold within 1e-5.
fn auto_passes(n: usize, c: usize, oc: usize) -> ConvPasses {
    let wide = n >= 16 && c >= 16 && oc >= 16;
    let f4 = Some(WinogradTile::F4);
    ConvPasses {
        forward: f4.filter(|_| wide && c <= 128),
        input_grad: f4.filter(|_| wide),
        weight_grad: f4.filter(|_| wide && c >= 32),
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

    // y_n = W[OC, C*k*k] · im2col(x_n) + b, for `batch` samples at a time:
    // [OC, batch·cols] = W · [im2col(x_p) side by side]
    fn forward(&mut self, x: &Tensor, y: &mut Tensor, _mode: Mode) -> Result<()> {
        let g = self.geometry(x)?;
        if let Some(tile) = self.passes(&g, x.batch()).forward {
            self.forward_winograd(x, y, &g, tile)?;
            return Ok(());
        }
        let n = x.batch();
        let (rows, cols) = (g.col_rows(), g.col_cols());
        let oc = self.out_channels;
        let (per_group, batch) = self.prepare(n, &g)?;
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
                    for (i, xi) in xb.chunks(xs).enumerate() {
                        im2col(xi, &g, &mut col[i * cols..], ld);
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
        if y.shape != dy.shape {
            return Err(Error::shape(
                "Conv2d",
                format!("output {:?} does not match gradient {:?}", y.shape, dy.shape),
            ));
        }
        let passes = self.passes(&g, n);
        if passes.weight_grad.is_some() || (passes.input_grad.is_some() && self.input_grad) {
            self.backward_winograd(x, y, dy, dx, &g, passes)?;
            return Ok(());
        }
        let (per_group, batch) = self.prepare(n, &g)?;
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

    fn visit_params<'a>(&'a mut self, f: &mut dyn FnMut(&'static str, &'a mut Param)) {
        visit_weight_bias(Some(&mut self.weight), self.bias.as_mut(), f);
    }

    fn set_input_grad(&mut self, needed: bool) {
        self.input_grad = needed;
    }

    fn visit_parts(&mut self, f: &mut dyn FnMut(&mut dyn std::any::Any)) {
        f(self);
    }
}
