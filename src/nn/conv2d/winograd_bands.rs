//! Winograd at batch 1 on several threads: the map's tile rows split into one band per
//! thread, each transforming its own rows (their halo read from the image), running its own
//! channel sums on its tiles and writing its rows of y. The sample-parallel driver has one
//! sample to give out; splitting each position's product over the threads instead (gemm's
//! own threading) ran a 28x28 32->32 conv slower on 2 threads than on 1 (59.7 against 52.8 µs).

use super::*;
use crate::kernels::simd::SharedOut;

impl Conv2d {
    /// `forward_winograd` of one sample in `bands` bands of tile rows (at least 2 tile rows);
    /// the same values, bit for bit: every tile is computed as in the whole map.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward_winograd_bands(
        &mut self,
        x: &Tensor,
        y: &mut Tensor,
        g: &ConvGeometry,
        tile: WinogradTile,
        pool: Option<bool>,
        residual: Option<&[f32]>,
        bands: usize,
    ) -> Result<()> {
        let (c, oc, (h, w)) = (g.channels, self.out_channels, (g.height, g.width));
        let (m, t) = (tile.m(), tile.t());
        let tiles_h = h.div_ceil(m);
        let per = tiles_h.div_ceil(bands);
        let bands = tiles_h.div_ceil(per);
        let halve = usize::from(pool.is_some());
        let (oh, ow) = (h >> halve, w >> halve);
        self.transform_kernels(tile, c)?;
        y.resize_to(&[1, oc, oh, ow])?;
        assert!(
            residual.is_none_or(|r| r.len() == y.len()),
            "forward_winograd_bands: residual"
        );
        let widest = c.max(oc);
        let band_tiles = per * w.div_ceil(m);
        self.groups
            .resize_with(self.groups.len().max(bands), GroupScratch::default);
        for s in &mut self.groups[..bands] {
            let what = "the Winograd convolution's scratch";
            let staging = (per * m + 2) * (w.div_ceil(m) * m + 2) * widest.next_multiple_of(16);
            try_grow(&mut s.staging, staging, 0.0, what)?;
            try_grow(&mut s.wa, t * t * widest * band_tiles, 0.0, what)?;
            try_grow(&mut s.wb, t * t * widest * band_tiles, 0.0, what)?;
            try_grow(&mut s.out, oc * ((per * m) >> halve) * ow, 0.0, what)?;
        }
        let (u, bias) = (&self.wino_u, self.bias.as_ref().map(|b| b.value.data.as_slice()));
        // The output transform's activation: the pool's ReLU, or the conv's own; with a
        // residual the ReLU follows the sum, made here while the band's rows are copied.
        let act = pool.unwrap_or(self.relu && residual.is_none());
        let out = SharedOut::new(&mut y.data);
        self.groups[..bands].par_iter_mut().enumerate().for_each(|(b, s)| {
            let first = b * per * m;
            let rows = ((b + 1) * per * m).min(h) - first;
            s.plan.update_band(tile, h, w, first, rows);
            s.winograd_sums(&x.data, c, u, oc, 1);
            let (first_out, rows_out) = (first >> halve, rows >> halve);
            let band = &mut s.out[..oc * rows_out * ow];
            winograd_output_transform(
                &s.plan,
                &s.wb,
                oc,
                band,
                bias,
                act,
                pool.is_some(),
                None,
                &mut s.staging,
            );
            let len = rows_out * ow;
            for (o, src) in band.chunks_exact(len).enumerate() {
                let at = (o * oh + first_out) * ow;
                // SAFETY: band b writes rows first_out..first_out + rows_out of each channel,
                // no other band does, and y is not otherwise used until all bands are done.
                let dst = unsafe { out.run(at, len) };
                match residual {
                    Some(r) => dst
                        .iter_mut()
                        .zip(src.iter().zip(&r[at..at + len]))
                        .for_each(|(d, (&v, &r))| *d = crate::kernels::reduce::relu(v + r)),
                    None => dst.copy_from_slice(src),
                }
            }
        });
        Ok(())
    }

    /// `forward_winograd` of one sample in runs of `run` output channels, one task per run:
    /// each transforms the whole input (the transform is a sixth of the work), runs its
    /// channels' sums and output transform. Bands leave each thread a tile row or two of a
    /// small map, too few tiles for the channel sums' registers.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward_winograd_channel_runs(
        &mut self,
        x: &Tensor,
        y: &mut Tensor,
        g: &ConvGeometry,
        tile: WinogradTile,
        pool: Option<bool>,
        residual: Option<&[f32]>,
        run: usize,
    ) -> Result<()> {
        let (c, oc, (h, w)) = (g.channels, self.out_channels, (g.height, g.width));
        let t2 = tile.t() * tile.t();
        let halve = usize::from(pool.is_some());
        let (oh, ow) = (h >> halve, w >> halve);
        let plane = oh * ow;
        self.transform_kernels(tile, c)?;
        if self.wino_u_runs_of != Some(run) {
            try_resize(&mut self.wino_u_runs, t2 * c * oc, 0.0, "the Winograd kernels")?;
            for o0 in (0..oc).step_by(run) {
                let width = run.min(oc - o0);
                let dst = &mut self.wino_u_runs[t2 * c * o0..][..t2 * c * width];
                for (d, s) in dst.chunks_exact_mut(width).zip(self.wino_u.chunks_exact(oc)) {
                    d.copy_from_slice(&s[o0..o0 + width]);
                }
            }
            self.wino_u_runs_of = Some(run);
        }
        y.resize_to(&[1, oc, oh, ow])?;
        assert!(
            residual.is_none_or(|r| r.len() == y.len()),
            "forward_winograd_channel_runs: residual"
        );
        let runs = oc.div_ceil(run);
        self.groups
            .resize_with(self.groups.len().max(runs), GroupScratch::default);
        let mut plan = TilePlan::default();
        plan.update(tile, 1, h, w);
        for s in &mut self.groups[..runs] {
            let what = "the Winograd convolution's scratch";
            try_grow(&mut s.staging, plan.staging_len(c.max(run)), 0.0, what)?;
            try_grow(&mut s.wa, t2 * c.max(run) * plan.tiles(), 0.0, what)?;
            try_grow(&mut s.wb, t2 * c.max(run) * plan.tiles(), 0.0, what)?;
        }
        let (u, bias) = (&self.wino_u_runs, self.bias.as_ref().map(|b| b.value.data.as_slice()));
        let relu = self.relu || residual.is_some();
        y.data
            .par_chunks_mut(run * plane)
            .zip(self.groups[..runs].par_iter_mut())
            .enumerate()
            .for_each(|(k, (yk, s))| {
                let (o0, width) = (k * run, yk.len() / plane);
                let u = &u[t2 * c * o0..][..t2 * c * width];
                let bias = bias.map(|b| &b[o0..o0 + width]);
                s.plan.update(tile, 1, h, w);
                let r = residual.map(|r| &r[o0 * plane..][..yk.len()]);
                let act = pool.unwrap_or(relu);
                s.winograd_conv(&x.data, c, u, width, yk, bias, act, pool.is_some(), r, 1)
            });
        Ok(())
    }
}
