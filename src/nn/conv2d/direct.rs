//! Conv2d's direct forward (kernels::conv_direct, 3x3 padding 1, stride 1 or 2): at batch 1 the blocks of output channels
//! split over the threads; at larger batches each sample group pads and convolves its own
//! samples. The epilogue takes each block of channels from the padded output grid while it is
//! in cache: + bias, ReLU, and with `pool` the 2x2 max-pool of ConvPool, or with `residual`
//! the shortcut of a residual block before the ReLU.

use super::*;
use crate::kernels::conv_direct::{direct_conv3x3_block, direct_pad_input, DirectGrid, DIRECT_CHANNELS};
use crate::kernels::lanes::LANES;
use crate::kernels::pool::{max_pool_2x2_values, max_pool_2x2_values_even_rows};

/// Tasks per thread for a lone sample.
const TASKS_PER_THREAD: usize = 4;

impl Conv2d {
    // y = act(conv(x) + b), or with `pool` = Some(relu) act(maxpool2x2(conv(x)) + b), a ReLU
    // after the pool when `relu` (max(v + b) = max(v) + b exactly), or with `residual` r (y's
    // shape, no pool) ReLU(conv(x) + b + r).
    pub(super) fn forward_direct(
        &mut self,
        x: &Tensor,
        y: &mut Tensor,
        g: &ConvGeometry,
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
        let blocks = oc.div_ceil(DIRECT_CHANNELS);
        let per_group = n.div_ceil(GROUPS).max(1);
        // A lone sample: a few blocks of channels per thread, so that a worker that wakes late
        // still takes its share (one task per thread: the other often ran both).
        let tasks = if n == 1 {
            (TASKS_PER_THREAD * rayon::current_num_threads()).clamp(1, blocks)
        } else {
            n.div_ceil(per_group)
        };
        self.groups.resize_with(tasks, GroupScratch::default);
        for s in self.groups.iter_mut() {
            let what = "the direct convolution's scratch";
            try_resize(&mut s.staging, grid.padded_len(), 0.0, what)?;
            try_resize(&mut s.out, grid.block_len(), 0.0, what)?;
            if pool.is_some() {
                try_resize(&mut s.col, grid.out_h() * grid.row(), 0.0, what)?;
            }
        }
        let epilogue = Epilogue {
            w: &self.weight.value.data,
            bias: self.bias.as_ref().map(|b| b.value.data.as_slice()),
            relu: self.relu || pool == Some(true),
            pool: pool.is_some(),
            oc,
            grid,
        };
        if n == 1 {
            let mut xp = std::mem::take(&mut self.groups[0].staging);
            direct_pad_input(&x.data, grid, &mut xp);
            let per_task = blocks.div_ceil(tasks) * DIRECT_CHANNELS;
            y.data
                .par_chunks_mut(per_task * ys)
                .zip(self.groups.par_iter_mut())
                .enumerate()
                .for_each(|(i, (yt, s))| {
                    let r = residual.map(|r| &r[i * per_task * ys..]);
                    epilogue.channels(&xp, i * per_task, yt, r, &mut s.out, &mut s.col)
                });
            self.groups[0].staging = xp;
        } else {
            y.data
                .par_chunks_mut(per_group * oc * ys)
                .zip(x.data.par_chunks(per_group * xs))
                .zip(self.groups.par_iter_mut())
                .enumerate()
                .for_each(|(k, ((yg, xg), s))| {
                    for (i, (yn, xn)) in yg.chunks_mut(oc * ys).zip(xg.chunks(xs)).enumerate() {
                        direct_pad_input(xn, grid, &mut s.staging);
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
    bias: Option<&'a [f32]>,
    relu: bool,
    pool: bool,
    oc: usize,
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
        let (row, span) = (self.grid.row(), self.grid.vectors() * LANES);
        let plane = if self.pool { (h / 2) * (w / 2) } else { h * w };
        for (b, yb) in y.chunks_mut(DIRECT_CHANNELS * plane).enumerate() {
            let o0 = o_start + b * DIRECT_CHANNELS;
            direct_conv3x3_block(xp, self.grid, self.w, self.oc, o0, block);
            for (r, yo) in yb.chunks_mut(plane).enumerate() {
                let src = &block[r * span..(r + 1) * span];
                if self.pool && row % 2 == 0 {
                    // The grid's rows are W + 2 apart: the pool reads each row's first W.
                    max_pool_2x2_values_even_rows(src, row, w / 2, false, yo, hp);
                } else if self.pool {
                    max_pool_2x2_values(src, row, w / 2, false, yo);
                } else {
                    for (yy, yr) in yo.chunks_mut(w).enumerate() {
                        yr.copy_from_slice(&src[yy * row..yy * row + w]);
                    }
                }
                let bias = self.bias.map(|bs| &bs[o0 + r..o0 + r + 1]);
                match res {
                    Some(res) => {
                        // (conv + b) + r, then the ReLU: the separate passes' order.
                        let at = (b * DIRECT_CHANNELS + r) * plane;
                        if bias.is_some() {
                            add_bias_relu(yo, plane, bias, false);
                        }
                        yo.iter_mut()
                            .zip(&res[at..at + plane])
                            .for_each(|(v, s)| *v = crate::kernels::reduce::relu(*v + s));
                    }
                    None if bias.is_some() || self.relu => add_bias_relu(yo, plane, bias, self.relu),
                    None => {}
                }
            }
        }
    }
}
