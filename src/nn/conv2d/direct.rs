//! Conv2d's direct forward (kernels::conv_direct, 3x3 padding 1, stride 1 or 2): a lone
//! sample splits over the threads in bands of output rows (maps of 14 rows and more), or in
//! runs of output channels, one per thread with its own padded copy (smaller maps); at larger
//! batches each sample group pads and convolves its own samples. The epilogue takes each block
//! of channels from the padded output grid while it is in cache: + bias, ReLU, and with `pool`
//! the 2x2 max-pool of ConvPool, or with `residual` the shortcut of a residual block before the
//! ReLU.

use super::*;
use crate::kernels::conv_direct::{
    copy_rows_bias_relu, direct_conv3x3_block, direct_pad_input, direct_pad_rows, DirectGrid, DIRECT_CHANNELS,
};
use crate::kernels::conv_direct_lanes::{lanes_conv3x3_group, pack_lane_weights, LANE_CHANNELS};
use crate::kernels::conv_direct_pooled::{
    direct_conv3x3_pooled_block, direct_conv3x3_pooled_planes, pooled_grid, pooled_lanes, KeptLanes, PooledPlanes,
};
use crate::kernels::lanes::LANES;
use crate::kernels::pool::{max_pool_2x2_values, max_pool_2x2_values_even_rows};
use crate::kernels::simd::SharedOut;

/// A lone sample is split into bands of at least this many output rows (`Epilogue::bands`);
/// smaller maps into blocks of channels. Folded vgg and resnet at batch 1, 2 threads, per
/// layer: bands took 28x28 and 14x14 maps from 66-90 to 44-76 µs, but 7x7 maps from 40-79 to
/// 57-83 (a 4-row band of a 7x7 map fills 3 vectors of 16 with 36 positions: 5 vectors in
/// all where the whole map takes 4).
const BAND_ROWS: usize = 7;

impl Conv2d {
    // y = act(conv(x) + b), or with `pool` = Some(relu) act(maxpool2x2(conv(x)) + b), a ReLU
    // after the pool when `relu` (max(v + b) = max(v) + b exactly), or with `residual` r (y's
    // shape, no pool) ReLU(conv(x) + b + r).
    pub(super) fn forward_direct(
        &mut self,
        x: &Tensor,
        y: &mut Tensor,
        g: &ConvGeometry,
        lanes: bool,
        pool: Option<bool>,
        residual: Option<&[f32]>,
    ) -> Result<()> {
        assert!(
            pool.is_none() || residual.is_none(),
            "forward_direct: a residual with a pool"
        );
        let n = x.batch();
        let oc = self.out_channels;
        let grid = DirectGrid {
            channels: g.channels,
            h: g.height,
            w: g.width,
            stride: g.stride,
        };
        let (oh, ow) = if pool.is_some() {
            (grid.out_h() / 2, grid.out_w() / 2)
        } else {
            (grid.out_h(), grid.out_w())
        };
        let (ys, xs) = (oh * ow, x.sample_len());
        y.resize_to(&[n, oc, oh, ow])?;
        assert!(
            residual.is_none_or(|r| r.len() == y.data.len()),
            "forward_direct: residual"
        );
        if n == 0 || oc == 0 {
            return Ok(());
        }
        let threads = rayon::current_num_threads();
        let bands = threads.min(grid.out_h() / BAND_ROWS);
        if lanes && !self.lane_weights_current {
            let len = oc.div_ceil(LANE_CHANNELS) * g.channels * 9 * LANE_CHANNELS;
            try_resize(&mut self.lane_weights, len, 0.0, "the packed convolution weights")?;
            pack_lane_weights(&self.weight.value.data, oc, g.channels, &mut self.lane_weights);
            self.lane_weights_current = true;
        }
        let phases = pool.is_some() && g.stride == 1 && !lanes;
        let mut kept = Vec::new();
        if phases {
            pooled_lanes(pooled_grid(g.channels, g.height, g.width), &mut kept);
        }
        let epilogue = Epilogue {
            w: &self.weight.value.data,
            lanes: lanes.then_some(self.lane_weights.as_slice()),
            bias: self.bias.as_ref().map(|b| b.value.data.as_slice()),
            relu: self.relu || pool == Some(true),
            pool: pool.is_some(),
            phases,
            kept: &kept,
            oc,
            grid,
        };
        let padded = epilogue.padded(grid);
        let unit = if pool.is_some() { 2 } else { 1 };
        // Bands (of whole pooled row pairs) only where they come out about even: a pooled
        // 14-row map would split 8 + 6 rows; vgg's conv4 at batch 1 took 76-78 µs split that
        // way against 71-74 in channel runs (3 alternating runs).
        let units = grid.out_h() / unit;
        if n == 1 && bands > 1 && (units.is_multiple_of(bands) || units / bands >= BAND_ROWS) {
            return epilogue.bands(&x.data, bands, unit, &mut self.groups, &mut y.data, residual);
        }
        let per_group = n.div_ceil(GROUPS).max(1);
        // A lone sample (a small map): one run of channel blocks per thread, each padding its
        // own copy of the input. One shared copy padded by one thread had every other thread
        // pull all its lines from that core (vgg's conv6, 7x7 128->128: 76 -> 59-67 µs). Four
        // tasks per thread served when a worker woke late; crate::workers keeps them awake.
        let block_channels = epilogue.step();
        let tasks = match n {
            1 => threads.clamp(1, oc.div_ceil(block_channels)),
            _ => n.div_ceil(per_group),
        };
        self.groups.resize_with(tasks, GroupScratch::default);
        for s in self.groups.iter_mut() {
            let what = "the direct convolution's scratch";
            try_grow(&mut s.staging, padded.padded_len(), 0.0, what)?;
            try_grow(&mut s.out, padded.block_len(block_channels), 0.0, what)?;
            if pool.is_some() {
                try_grow(&mut s.col, padded.out_h() * padded.row(), 0.0, what)?;
            }
        }
        if n == 1 {
            let per_task = oc.div_ceil(block_channels).div_ceil(tasks) * block_channels;
            y.data
                .par_chunks_mut(per_task * ys)
                .zip(self.groups.par_iter_mut())
                .enumerate()
                .for_each(|(i, (yt, s))| {
                    direct_pad_input(&x.data, padded, &mut s.staging);
                    let r = residual.map(|r| &r[i * per_task * ys..]);
                    epilogue.channels(&s.staging, i * per_task, yt, r, &mut s.out, &mut s.col)
                });
        } else {
            y.data
                .par_chunks_mut(per_group * oc * ys)
                .zip(x.data.par_chunks(per_group * xs))
                .zip(self.groups.par_iter_mut())
                .enumerate()
                .for_each(|(k, ((yg, xg), s))| {
                    for (i, (yn, xn)) in yg.chunks_mut(oc * ys).zip(xg.chunks(xs)).enumerate() {
                        direct_pad_input(xn, padded, &mut s.staging);
                        let r = residual.map(|r| &r[(k * per_group + i) * oc * ys..]);
                        epilogue.channels(&s.staging, 0, yn, r, &mut s.out, &mut s.col);
                    }
                });
        }
        Ok(())
    }
}

/// What every task of one direct forward shares.
struct Epilogue<'a> {
    w: &'a [f32],
    /// The weights packed for kernels::conv_direct_lanes, when `channels` runs that kernel.
    lanes: Option<&'a [f32]>,
    bias: Option<&'a [f32]>,
    relu: bool,
    pool: bool,
    /// Pooled in registers (kernels::conv_direct_pooled): a stride-1 pooled conv off the
    /// lanes kernel, on the input padded into its stride-2 phases.
    phases: bool,
    /// With `phases`: where each vector of the whole map's pooled grid goes in a plane.
    kept: &'a [KeptLanes],
    oc: usize,
    /// The conv's grid.
    grid: DirectGrid,
}

impl Epilogue<'_> {
    /// Output channels o_start.. of one sample (as many as `y` holds) from its padded input;
    /// `res`: the residual from channel o_start on, added before the ReLU; `hp` is the pool's
    /// scratch.
    #[allow(clippy::too_many_arguments)]
    fn channels(
        &self,
        xp: &[f32],
        o_start: usize,
        y: &mut [f32],
        res: Option<&[f32]>,
        block: &mut [f32],
        hp: &mut [f32],
    ) {
        let (h, w) = (self.grid.out_h(), self.grid.out_w());
        let padded = self.padded(self.grid);
        let span = padded.vectors() * LANES;
        let plane = if self.pool { (h / 2) * (w / 2) } else { h * w };
        let step = self.step();
        for (b, yb) in y.chunks_mut(step * plane).enumerate() {
            let o0 = o_start + b * step;
            if self.phases {
                // Pooled, biased and stored in place by the kernel (bands take `block`: a
                // band's rows of each channel are not one run of y).
                let e = PooledPlanes {
                    bias: self.bias,
                    relu: self.relu,
                    lanes: self.kept,
                };
                direct_conv3x3_pooled_planes(xp, padded, self.w, self.oc, o0, e, yb);
                continue;
            }
            self.block(xp, padded, o0, block);
            for (r, yo) in yb.chunks_mut(plane).enumerate() {
                let at = (b * step + r) * plane;
                let res = res.map(|res| &res[at..at + plane]);
                self.finish(padded, &block[r * span..(r + 1) * span], o0 + r, yo, res, hp);
            }
        }
    }

    /// The whole output of one sample in `bands` bands of output rows (each a multiple of
    /// `unit` rows: 2 when pooled), one task per band: each pads its own rows of the input
    /// and computes every channel of its rows. Blocks of channels over the threads with one
    /// shared padded input had every thread read what one thread had just written: on the
    /// 2-core host the first block after the pad took 35 µs instead of 13 (the lines move
    /// between the cores), and vgg's 32->32 conv on 28x28 maps ran 1.2x faster on 2 threads
    /// than on 1. Here a band reads the input rows the previous layer's band of the same rows
    /// wrote (the same task index, usually the same worker).
    fn bands(
        &self,
        x: &[f32],
        bands: usize,
        unit: usize,
        groups: &mut Vec<GroupScratch>,
        y: &mut [f32],
        residual: Option<&[f32]>,
    ) -> Result<()> {
        let rows = self.grid.out_h() / unit * unit;
        let per = rows.div_ceil(bands).next_multiple_of(unit);
        let count = rows.div_ceil(per);
        let band = |b: usize| {
            let (r0, r1) = (b * per, (b * per + per).min(rows));
            let s = self.grid.stride;
            let sub = DirectGrid {
                h: s * (r1 - r0) + 1 - s,
                ..self.grid
            };
            (s * r0, r0, r1, self.padded(sub))
        };
        if groups.len() < count {
            groups.resize_with(count, GroupScratch::default);
        }
        for (b, s) in groups[..count].iter_mut().enumerate() {
            let (.., sub) = band(b);
            let what = "the direct convolution's scratch";
            try_grow(&mut s.staging, sub.padded_len(), 0.0, what)?;
            try_grow(&mut s.out, sub.block_len(self.step()), 0.0, what)?;
            if self.pool {
                try_grow(&mut s.col, sub.out_h() * sub.row(), 0.0, what)?;
            }
        }
        let (ow, plane) = match self.pool {
            true => (self.grid.out_w() / 2, (self.grid.out_h() / 2) * (self.grid.out_w() / 2)),
            false => (self.grid.out_w(), self.grid.out_h() * self.grid.out_w()),
        };
        let out = SharedOut::new(y);
        groups[..count].par_iter_mut().enumerate().for_each(|(b, s)| {
            let (first, r0, r1, sub) = band(b);
            direct_pad_rows(x, self.grid.h, first, sub, &mut s.staging);
            let span = sub.vectors() * LANES;
            let (start, len) = (r0 / unit * ow, (r1 - r0) / unit * ow);
            let step = self.step();
            for o0 in (0..self.oc).step_by(step) {
                self.block(&s.staging, sub, o0, &mut s.out);
                for r in 0..step.min(self.oc - o0) {
                    let at = (o0 + r) * plane + start;
                    // SAFETY: band b writes rows r0..r1 of each channel, no other band does.
                    let yo = unsafe { out.run(at, len) };
                    let res = residual.map(|res| &res[at..at + len]);
                    self.finish(sub, &s.out[r * span..(r + 1) * span], o0 + r, yo, res, &mut s.col);
                }
            }
        });
        Ok(())
    }

    /// The grid the input is padded on and `block` computes on for the conv grid `grid` (the
    /// whole map's or a band's).
    fn padded(&self, grid: DirectGrid) -> DirectGrid {
        match self.phases {
            true => pooled_grid(grid.channels, grid.h, grid.w),
            false => grid,
        }
    }

    /// Output channels per `block`.
    fn step(&self) -> usize {
        if self.lanes.is_some() {
            LANE_CHANNELS
        } else {
            DIRECT_CHANNELS
        }
    }

    /// Output channels o0.. (a block of DIRECT_CHANNELS, or a group of LANE_CHANNELS) of the
    /// padded sample `xp` on `grid`'s output grid (a `padded` grid) into `out`.
    fn block(&self, xp: &[f32], grid: DirectGrid, o0: usize, out: &mut [f32]) {
        match self.lanes {
            None if self.phases => direct_conv3x3_pooled_block(xp, grid, self.w, self.oc, o0, out),
            Some(packed) => {
                let len = grid.channels * 9 * LANE_CHANNELS;
                lanes_conv3x3_group(xp, grid, &packed[o0 / LANE_CHANNELS * len..][..len], out);
            }
            None => direct_conv3x3_block(xp, grid, self.w, self.oc, o0, out),
        }
    }

    /// One channel `o` of the output from its block rows `src` on `grid`'s output grid: the
    /// grid's rows + bias (+ `res`), ReLU, in one pass; or the pool, then + bias and ReLU.
    fn finish(&self, grid: DirectGrid, src: &[f32], o: usize, yo: &mut [f32], res: Option<&[f32]>, hp: &mut [f32]) {
        let (w, row) = (grid.out_w(), grid.row());
        if !self.pool {
            let bias = self.bias.map(|bs| bs[o]);
            copy_rows_bias_relu(src, row, yo, w, bias, res, self.relu);
            return;
        }
        // A pooled output has no residual (forward_direct asserts it).
        if self.phases {
            // Pooled already: the grid's rows hold the pooled rows.
            let bias = self.bias.map(|bs| bs[o]);
            copy_rows_bias_relu(src, row, yo, grid.w / 2, bias, None, self.relu);
            return;
        }
        if row % 2 == 0 {
            // The grid's rows are W + 2 apart: the pool reads each row's first W, then adds
            // the bias and applies the ReLU in the same pass.
            let bias = self.bias.map(|bs| bs[o]);
            max_pool_2x2_values_even_rows(src, row, w / 2, bias, self.relu, yo, hp);
            return;
        }
        max_pool_2x2_values(src, row, w / 2, false, yo);
        let bias = self.bias.map(|bs| &bs[o..o + 1]);
        if bias.is_some() || self.relu {
            add_bias_relu(yo, yo.len(), bias, self.relu);
        }
    }
}
