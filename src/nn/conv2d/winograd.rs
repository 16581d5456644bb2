//! Conv2d's Winograd driver: which method each pass takes (the measured `auto` table), the
//! scratch per sample group, and the forward and backward passes in the transformed domain
//! (the transforms themselves are kernels::winograd).

use super::*;
use crate::kernels::conv_direct::{direct_is_vectorized, vectors_run_at_half_rate};
use crate::kernels::conv_direct_lanes::LANE_CHANNELS;
use crate::kernels::lanes::LANES;

impl GroupScratch {
    /// out = the 3x3 padding-1 conv of `src` (the planned samples × cin × h × w) with the
    /// Winograd-domain kernels `u` [t²][cin][cout] (+ bias, + residual, then ReLU; with `pool`
    /// the 2x2 max-pool first, no residual): `winograd_sums`, then out = Aᵀ M A.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn winograd_conv(
        &mut self,
        src: &[f32],
        cin: usize,
        u: &[f32],
        cout: usize,
        out: &mut [f32],
        bias: Option<&[f32]>,
        relu: bool,
        pool: bool,
        residual: Option<&[f32]>,
        threads: usize,
    ) {
        self.winograd_sums(src, cin, u, cout, threads);
        winograd_output_transform(
            &self.plan,
            &self.wb,
            cout,
            out,
            bias,
            relu,
            pool,
            residual,
            &mut self.staging,
        );
    }

    /// V = Bᵀ src B into `wa`, then M_ξ = V_ξ · U_ξ into `wb` (one channel sum per position,
    /// rows t² apart).
    pub(super) fn winograd_sums(&mut self, src: &[f32], cin: usize, u: &[f32], cout: usize, threads: usize) {
        let Some(tile) = self.plan.tile else { return };
        let (t2, p) = (tile.t() * tile.t(), self.plan.tiles());
        winograd_input_transform(&self.plan, src, cin, &mut self.wa, &mut self.staging);
        let own_product = threads == 1 && product_is_ahead(cin, cout);
        for xi in 0..t2 {
            let (m_xi, v_xi, u_xi) = (&mut self.wb[xi * cout..], &self.wa[xi * cin..], &u[xi * cin * cout..]);
            if own_product {
                register_product(m_xi, t2 * cout, (v_xi, t2 * cin, Op::N), u_xi, p, cin, cout);
            } else {
                let (v_xi, u_xi) = ((v_xi, t2 * cin, Op::N), (u_xi, cout, Op::N));
                matmul_strided(m_xi, t2 * cout, p, cout, cin, v_xi, u_xi, false, threads);
            }
        }
    }
}

/// Whether `register_product` beats the gemm crate on one position's channel sum of C -> OC
/// channels. A scratch probe (one thread, the rows of 512 KB Winograd batches, 36 positions
/// per call, the two alternating, two runs on the Intel host, with the sum in L1-sized chunks
/// of k): 16->16 1.22-1.26x, 21->22 1.64-1.72x, 22->40 1.33-1.34x, 40->40 1.26-1.29x, 40->93
/// 1.22-1.24x, 93->40 1.31x, 32->32 1.08-1.12x, 32->64 0.98x, 64->64 1.00x, 64->128 0.96x,
/// 128->64 0.95x, 128->128 0.91-0.93x (0.73x before the chunks). Ahead or level while U_ξ is
/// at most 64x64 values, where the kernel runs on AVX-512 (its portable twin is no match for
/// gemm's own kernels).
fn product_is_ahead(c: usize, oc: usize) -> bool {
    c * oc <= 64 * 64 && direct_is_vectorized()
}

impl Conv2d {
    /// The method of each pass for geometry `g`, a batch of n samples and the forward's `mode`
    /// (the backward's is Train). Winograd needs a 3x3 kernel, stride 1 and padding 1 (then dx
    /// is again such a conv), the direct forward a 3x3 kernel, padding 1 and stride 1 or 2;
    /// `Auto` takes the measured table below, and the direct forward for stride 2.
    pub fn passes(&self, g: &ConvGeometry, n: usize, mode: Mode) -> ConvPasses {
        let eligible = self.kernel == 3 && self.stride == 1 && self.padding == 1;
        // The direct kernel also takes stride 2 (its four phase planes).
        let direct_eligible = self.kernel == 3 && self.padding == 1 && self.stride <= 2;
        let all = |t: Option<WinogradTile>| ConvPasses {
            forward: t.map_or(ForwardMethod::Im2col, ForwardMethod::Winograd),
            input_grad: t,
            weight_grad: t,
        };
        let direct = |lanes| ConvPasses {
            forward: ForwardMethod::Direct { lanes },
            ..all(None)
        };
        match self.algorithm {
            ConvAlgorithm::Direct if direct_eligible => direct(false),
            ConvAlgorithm::DirectLanes if direct_eligible => direct(true),
            ConvAlgorithm::Auto if direct_eligible && !eligible && direct_is_vectorized() => {
                direct(direct_lanes_pay(n, self.out_channels, (g.height - 1) / self.stride + 1))
            }
            _ if !eligible => all(None),
            ConvAlgorithm::Im2col | ConvAlgorithm::Direct | ConvAlgorithm::DirectLanes => all(None),
            ConvAlgorithm::Winograd(t) => all(Some(t)),
            ConvAlgorithm::Auto => auto_passes(n, g.channels, self.out_channels, g.height, g.width, mode),
        }
    }

    /// Samples per group and per Winograd batch, with the scratch that `pass` reads sized for
    /// them (`im2col_dw`: the backward's dW through im2col).
    pub(super) fn prepare_winograd(
        &mut self,
        n: usize,
        g: &ConvGeometry,
        tile: WinogradTile,
        pass: Pass,
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
            try_grow(&mut s.staging, staging, 0.0, what)?;
            try_grow(&mut s.wa, transformed, 0.0, what)?;
            try_grow(&mut s.wb, transformed, 0.0, what)?;
            if pass != Pass::Backward {
                continue;
            }
            // Grown, never cut: the set is shared by convs of other sizes (nn::shared_scratch),
            // and each call overwrites dU and zeroes its part of the partial sums itself.
            try_grow(&mut s.du, t * t * oc * g.channels, 0.0, what)?;
            try_grow(&mut s.partial, oc * (rows + 1), 0.0, what)?;
            if self.relu {
                try_grow(&mut s.out, oc * cols * batch, 0.0, what)?;
            }
            if im2col_dw {
                try_grow(&mut s.col, rows * cols, 0.0, what)?;
            }
        }
        Ok((per_group, batch))
    }

    /// U = G W Gᵀ (C = `c` input channels) into `wino_u`, unless it already holds the
    /// transform of these weights (`wino_u_tile`, dropped whenever they may change). Folded
    /// inference at batch 128, 5 alternating pairs of builds, against transforming at every
    /// call: resnet 23.0-24.0 -> 22.1-23.4 ms, vgg 16.7-17.1 -> 16.3-16.7 (the transforms were
    /// 2% of resnet's profile).
    pub(super) fn transform_kernels(&mut self, tile: WinogradTile, c: usize) -> Result<()> {
        let (oc, t2) = (self.out_channels, tile.t() * tile.t());
        if self.wino_u_tile == Some(tile) && self.wino_u.len() == t2 * oc * c {
            return Ok(());
        }
        try_resize(&mut self.wino_u, t2 * oc * c, 0.0, "the Winograd kernels")?;
        winograd_filter_transform(tile, &self.weight.value.data, oc, c, false, &mut self.wino_u);
        self.wino_u_tile = Some(tile);
        self.wino_u_runs_of = None;
        Ok(())
    }

    // Winograd forward: U = G W Gᵀ once, then per batch of samples V = Bᵀ x B, M_ξ = V_ξ · U_ξ
    // (t² gemms), y = Aᵀ M A + b (then ReLU).
    // With `pool` = Some(relu): act(maxpool2x2(conv(x)) + b) instead (inference's ConvPool),
    // pooled from the output transform's staging buffer while it is in cache. With `residual`
    // r (y's shape): y = ReLU(conv(x) + b + r), the sum made in the output transform.
    pub(super) fn forward_winograd(
        &mut self,
        x: &Tensor,
        y: &mut Tensor,
        g: &ConvGeometry,
        tile: WinogradTile,
        pool: Option<bool>,
        residual: Option<&[f32]>,
    ) -> Result<()> {
        let n = x.batch();
        let (threads, tiles_h) = (rayon::current_num_threads(), g.height.div_ceil(tile.m()));
        if n == 1 && threads > 1 {
            if let Some(run) = channel_run(self.out_channels, tiles_h, threads) {
                return self.forward_winograd_channel_runs(x, y, g, tile, pool, residual, run);
            }
            if tiles_h > 1 {
                return self.forward_winograd_bands(x, y, g, tile, pool, residual, threads.min(tiles_h));
            }
        }
        let (c, oc) = (g.channels, self.out_channels);
        let (per_group, batch) = self.prepare_winograd(n, g, tile, Pass::Forward, false)?;
        self.transform_kernels(tile, c)?;
        let (oh, ow) = match pool {
            Some(_) => (g.out_h() / 2, g.out_w() / 2),
            None => (g.out_h(), g.out_w()),
        };
        y.resize_to(&[n, oc, oh, ow])?;
        let (xs, ys) = (x.sample_len(), oc * oh * ow);
        assert!(residual.is_none_or(|r| r.len() == n * ys), "forward_winograd: residual");
        let (u, bias, relu) = (
            &self.wino_u,
            self.bias.as_ref().map(|b| b.value.data.as_slice()),
            self.relu || residual.is_some(),
        );
        let threads = gemm_threads(n);
        y.data
            .par_chunks_mut(per_group * ys)
            .zip(x.data.par_chunks(per_group * xs))
            .zip(self.groups.par_iter_mut())
            .enumerate()
            .for_each(|(k, ((yg, xg), s))| {
                for (i, (yb, xb)) in yg.chunks_mut(batch * ys).zip(xg.chunks(batch * xs)).enumerate() {
                    s.plan.update(tile, xb.len() / xs, g.height, g.width);
                    let at = k * per_group * ys + i * batch * ys;
                    let r = residual.map(|r| &r[at..at + yb.len()]);
                    let act = pool.unwrap_or(relu);
                    s.winograd_conv(xb, c, u, oc, yb, bias, act, pool.is_some(), r, threads)
                }
            });
        Ok(())
    }

    // Winograd backward, per batch of samples: grad = dy (· [y > 0] with a fused ReLU);
    // dU_ξ += (Bᵀ x B)_ξᵀ · (A grad Aᵀ)_ξ, or dWᵀ += im2col(x) · gradᵀ when `passes` says so;
    // dx = Aᵀ [(Bᵀ grad B)_ξ · U'_ξ] A with U' the flipped kernels.
    pub(super) fn backward_winograd(
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
        let (per_group, batch) = self.prepare_winograd(n, g, tile, Pass::Backward, dw_tile.is_none())?;
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
                // Winograd's dW goes to dU: only the db part of the partial sums is read.
                let zeroed = if dw_tile.is_some() { oc * rows } else { 0 };
                s.partial[zeroed..oc * (rows + 1)].fill(0.0);
                // dU is overwritten by the group's first batch, not zeroed first (8 groups'
                // 2.4 MB each on vgg's 128->128 conv: most of a step's memset).
                let mut du_written = false;
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
                    let (dw_t, db) = s.partial[..oc * (rows + 1)].split_at_mut(oc * rows);
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
                            matmul_strided(&mut s.du[xi * c * oc..], oc, c, oc, p, v_t, dm, du_written, threads);
                        }
                        du_written = true;
                    } else {
                        for (xi, gs) in xb.chunks(xs).zip(grad.chunks(ys)) {
                            im2col(xi, g, &mut s.col, cols);
                            matmul(dw_t, rows, oc, cols, &s.col, Op::N, gs, Op::T, true, threads);
                        }
                    }
                    if dx_tile.is_some() {
                        s.winograd_conv(grad, oc, u_adj, c, dxb, None, false, false, None, threads);
                    }
                }
                s.out = masked;
            });
        self.add_group_partials(rows, dw_tile.is_none());
        // An empty batch has no groups and adds nothing.
        if let (Some(tile), Some((first, rest))) = (dw_tile, self.groups.split_first_mut()) {
            let len = tile.t() * tile.t() * oc * c;
            for s in rest.iter() {
                first.du[..len].iter_mut().zip(&s.du[..len]).for_each(|(a, v)| *a += v);
            }
            winograd_filter_gradient(tile, &first.du[..len], oc, c, &mut self.weight.grad.data);
        }
        Ok(())
    }

    /// Adds the groups' [dWᵀ | db] partial sums into the gradients, in group order (dWᵀ only
    /// when im2col computed the weight gradient).
    pub(super) fn add_group_partials(&mut self, rows: usize, im2col_dw: bool) {
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
                    .zip(&s.partial[oc * rows..oc * (rows + 1)])
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
/// weight gradient takes F(4x4) from 16 channels: 16->16 at 28x28 1.81 ms against im2col's
/// 3.02, and its dx 1.64 against 2.05 once dW and dx share the gradient's transform; resnet
/// training 1,159-1,171 -> 1,227-1,254 images/s, 3 alternating runs (an older measurement,
/// before the channel sums ran in registers, had it 1.4x slower). The forward pass keeps F(4x4) to 128 input channels, the widest the goldens hold
/// within 1e-5. Below 16 samples the forward takes F(4x4) on maps of 14 rows and columns and
/// more with C·OC·h·w of at least 32·64·14·14 (the kernels transformed once per weights, a
/// lone sample in bands of tile rows over the threads): 2 threads, µs at batch 1, direct
/// against Winograd, with bias and ReLU: 32->32 28x28 62.5/37.3, 32->64 14x14 39.4/28.1,
/// 64->64 14x14 69.8/41.4, pooled 64->64 14x14 67.2/42.7; at 2, 4 and 8 samples Winograd
/// 1.3-1.9x ahead on the same shapes. Below that product the direct kernel stays: 32->32
/// 14x14 level (19.7/18.8, pooled 18.2/20.4), 16->16 14x14 7.5/9.7, and 16->16 28x28, ahead
/// alone (17.4/14.9) but 2-4 µs slower per block inside resnet's batch-1 forward (`bench
/// --inference --layers`, alternating builds); on 7x7 maps too (64->128 34.4/37.1, 128->128
/// 67.7/108.6). Those figures are the Intel host's. Where AVX-512 runs at half rate (AMD's
/// Zen 4: the direct kernel's multiply-adds cost twice as much) an eval forward takes F(4x4)
/// for every such conv on maps of 7 and more: folded resnet at batch 1 on the AMD host, 2 threads, min of 8
/// alternating runs of `bench --inference --layers`, 0.263 -> 0.228 ms (its 28x28 16->16
/// blocks 45 -> 37 µs, 7x7 64->64 41 -> 34), vgg 0.219 -> 0.201 (7x7 128->128 70 -> 53),
/// pruned vgg 0.129 -> 0.098, pruned resnet 0.178 -> 0.168, no layer slower. Every other
/// forward takes the direct kernel where the CPU runs it on vectors (AVX-512). Training keeps
/// the Intel rule there (not measured on the AMD host; and a small batch's gradients then
/// follow the direct forward's ties: vgg_golden's max-pools route a tied window's gradient as
/// PyTorch does, which F(4x4)'s position-dependent rounding breaks).
pub(super) fn auto_passes(n: usize, c: usize, oc: usize, h: usize, w: usize, mode: Mode) -> ConvPasses {
    let wide = n >= 16 && c >= 16 && oc >= 16;
    let f4 = Some(WinogradTile::F4);
    let small_batch = n < 16
        && direct_is_vectorized()
        && c.min(oc) >= 16
        && match vectors_run_at_half_rate() && mode == Mode::Eval {
            true => h.min(w) >= 7,
            false => h.min(w) >= 14 && c * oc * h * w >= 32 * 64 * 14 * 14,
        };
    let forward = if (wide || small_batch) && c <= 128 {
        ForwardMethod::Winograd(WinogradTile::F4)
    } else if direct_is_vectorized() {
        ForwardMethod::Direct {
            lanes: direct_lanes_pay(n, oc, h),
        }
    } else {
        ForwardMethod::Im2col
    };
    ConvPasses {
        forward,
        input_grad: f4.filter(|_| wide),
        weight_grad: f4.filter(|_| wide),
    }
}

/// The run of output channels per task when a lone sample's Winograd forward splits by
/// channels rather than bands of tile rows (`threads` > 1, a map `tiles_h` tiles high): where
/// the bands would leave a thread one tile row and every thread gets at least LANES channels.
/// None: bands. A scratch probe of one eval conv + ReLU at batch 1, 2 threads, AMD host,
/// min of two alternating runs' medians, µs, runs / bands: 7x7 128->128 42.7 / 69.3, 64->128
/// 17.4 / 30.0, 64->64 15.0 / 14.7; 14x14 (two tile rows per band) 32->64 20.4 / 22.3 but
/// 32->32 17.9 / 16.7, 64->64 67.4 / 60.5.
pub(super) fn channel_run(oc: usize, tiles_h: usize, threads: usize) -> Option<usize> {
    let run = oc.div_ceil(threads).next_multiple_of(LANES);
    (tiles_h < 2 * threads && oc >= threads * LANES).then_some(run)
}

/// Whether the direct forward puts the output channels in the lanes (kernels::conv_direct_lanes)
/// rather than positions, for OC output channels on maps of `out_h` output rows, a batch of n.
/// Measured (a scratch probe of Conv2d's eval forward + ReLU inside a 2-thread pool, min of 3
/// alternating rounds' medians, µs, direct against lanes), batch 1: 7x7 outputs 64->128 35.7 /
/// 28.6, 128->128 66.4 / 50.8, 64->64 18.7 / 15.6, 32->64 11.2 / 9.6, but 32->32 6.7 / 8.4 and
/// 16->32 4.3 / 7.3 (one group of 32 leaves a thread idle); stride 2 64->128 14x14 43.4 /
/// 34.0, 32->64 13.1 / 11.0; 14x14 outputs (in bands of rows, every thread busy) 32->32 19.4 /
/// 16.7, 16->32 11.5 / 9.7, stride 2 16->32 28x28 12.9 / 11.7; 16->16 14x14 7.0 / 9.7 and
/// 28x28 17.5 / 29.5 (half of each vector wasted). Batch 8 (outside a pool) 7x7 128->128 526 /
/// 420, 32->32 46.2 / 40.6, but 14x14 32->32 133 / 138. Uneven groups lose: slimmed vgg's
/// 43->79 on 7x7 maps (3 groups on 2 threads) 17-18 -> 22-24 µs in the folded model.
pub(super) fn direct_lanes_pay(n: usize, oc: usize, out_h: usize) -> bool {
    let groups = oc.div_ceil(LANE_CHANNELS);
    // The lanes computed: the last group's padding, and at batch 1 on maps too small for
    // bands the groups split over the threads (one group of 32 leaves a thread idle).
    let slots = match n == 1 && out_h < 14 {
        true => groups.next_multiple_of(rayon::current_num_threads()),
        false => groups,
    } * LANE_CHANNELS;
    oc >= LANE_CHANNELS && 4 * oc >= 3 * slots && (out_h < 14 || (n == 1 && out_h < 28))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::layer::Mode;
    use rand::{Rng, SeedableRng};

    /// Convs of 2^18 input values and more share their group scratch (nn::shared_scratch), which
    /// is grown and never cut: a conv's gradients do not depend on what a wider conv left in
    /// it (dU, the [dWᵀ | db] partial sums), by Winograd and by im2col.
    #[test]
    fn backward_ignores_what_a_wider_conv_left_in_the_shared_scratch() {
        let mut g = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let (n, c, hw) = (8, 32, 32);
        let mut values = |len: usize| -> Vec<f32> { (0..len).map(|_| g.gen_range(-1.0..1.0)).collect() };
        let x = Tensor::from_vec(&[n, c, hw, hw], values(n * c * hw * hw)).unwrap();
        assert!(x.len() >= crate::nn::shared_scratch::SHARE_FROM_VALUES);
        let dy_narrow = Tensor::from_vec(&[n, 16, hw, hw], values(n * 16 * hw * hw)).unwrap();
        let dy_wide = Tensor::from_vec(&[n, 64, hw, hw], values(n * 64 * hw * hw)).unwrap();
        for algorithm in [ConvAlgorithm::Winograd(WinogradTile::F4), ConvAlgorithm::Im2col] {
            let mut g = rand_chacha::ChaCha8Rng::seed_from_u64(12);
            let mut narrow = Conv2d::new(c, 16, 3, 1, 1, true, &mut g);
            let mut wide = Conv2d::new(c, 64, 3, 1, 1, true, &mut g);
            narrow.algorithm = algorithm;
            wide.algorithm = algorithm;
            let (mut y, mut dx) = (Tensor::default(), Tensor::default());
            let mut gradients = |conv: &mut Conv2d, dy: &Tensor| {
                conv.weight.grad.data.fill(0.0);
                conv.bias.as_mut().unwrap().grad.data.fill(0.0);
                conv.forward(&x, &mut y, Mode::Train).unwrap();
                conv.backward(&x, &y, dy, &mut dx).unwrap();
                (
                    conv.weight.grad.data.clone(),
                    conv.bias.as_ref().unwrap().grad.data.clone(),
                    dx.data.clone(),
                )
            };
            let first = gradients(&mut narrow, &dy_narrow);
            for scale in [1.0f32, -3.0] {
                let dy = Tensor::from_vec(&dy_wide.shape, dy_wide.data.iter().map(|v| v * scale).collect()).unwrap();
                gradients(&mut wide, &dy);
                assert!(
                    gradients(&mut narrow, &dy_narrow) == first,
                    "{algorithm:?} after the wide conv, scale {scale}"
                );
            }
        }
    }

    /// The forward reuses its transformed kernels until the weights may have changed: after a
    /// change through `weight_mut` or `visit_params` (an optimizer, a loaded checkpoint, BN
    /// folding) the output is that of a conv built with the new weights.
    #[test]
    fn transformed_kernels_follow_the_weights() {
        let mut g = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let (n, c, oc, hw) = (16, 16, 16, 6);
        let mut conv = Conv2d::new(c, oc, 3, 1, 1, true, &mut g);
        conv.algorithm = ConvAlgorithm::Winograd(WinogradTile::F4);
        let data: Vec<f32> = (0..n * c * hw * hw).map(|_| g.gen_range(-1.0..1.0)).collect();
        let x = Tensor::from_vec(&[n, c, hw, hw], data).unwrap();
        let (mut first, mut again) = (Tensor::default(), Tensor::default());
        conv.forward(&x, &mut first, Mode::Eval).unwrap();
        conv.forward(&x, &mut again, Mode::Eval).unwrap();
        assert_eq!(first.data, again.data);
        let k = conv.weight.value.data.len() / 2;
        let changes: [&dyn Fn(&mut Conv2d); 2] = [&|conv| conv.weight_mut().value.data[k] += 0.5, &|conv| {
            conv.visit_params(&mut |name, p| {
                if name == "weight" {
                    p.value.data[k + 1] -= 0.25;
                }
            })
        }];
        for change in changes {
            let before = again.clone();
            change(&mut conv);
            conv.forward(&x, &mut again, Mode::Eval).unwrap();
            let mut fresh = Conv2d::new(c, oc, 3, 1, 1, true, &mut g);
            fresh.algorithm = conv.algorithm;
            fresh.weight.value.data.clone_from(&conv.weight.value.data);
            fresh
                .bias
                .as_mut()
                .unwrap()
                .value
                .data
                .clone_from(&conv.bias.as_ref().unwrap().value.data);
            let mut want = Tensor::default();
            fresh.forward(&x, &mut want, Mode::Eval).unwrap();
            assert_ne!(before.data, again.data, "the changed weight changed nothing");
            assert_eq!(again.data, want.data);
        }
    }
}
