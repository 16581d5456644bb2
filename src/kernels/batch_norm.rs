//! BatchNorm kernels on an (N, C, S) view of NCHW data (S = H*W; S = 1 for BatchNorm1d).
//! A channel's statistics set is its N strided runs `x[n, c, :]`. Two ways through it:
//! - runs of at least 64 values (conv feature maps): stream over samples in memory order, one
//!   pass for the sums of every channel (per fixed chunk of samples, combined in chunk order),
//!   one for the affine (forward) or dx (backward). Forward moves three tensor-sizes (x twice,
//!   y), backward five (x, dy twice, dx); the second read usually comes from L3, and sequential
//!   reads beat strided runs 2-3x here.
//! - short runs (7x7 maps, BatchNorm1d): one channel at a time (channels in parallel), the first
//!   pass bringing the channel's runs into cache and the second reading them from there.
//!
//! Sums run in f32 over 32 lanes within a run and in f64 across runs; results do not depend on
//! the thread count. An optional ReLU is fused after the affine.

use rayon::prelude::*;

use std::ops::Range;

use crate::kernels::reduce::{self, mean_var, relu_mask, shift_estimate, shifted_mean_var, Center, PairSums};
pub use crate::kernels::shape::Ncs;
use crate::kernels::simd::{multiversion, SharedOut};

/// A channel's batch statistics: f64 mean and biased variance.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ChannelStats {
    pub mean: f64,
    pub var: f32,
}

/// invstd = 1 / sqrt(var + eps), computed in f64 then rounded once.
pub fn inverse_std(var: f32, eps: f64) -> f32 {
    (1.0 / (var as f64 + eps).sqrt()) as f32
}

/// y = (x - mean)·a + b over one run, then max(·, 0) when `relu`.
#[inline(always)]
pub fn apply_run(x: &[f32], y: &mut [f32], center: Center, a: f32, b: f32, relu: bool) {
    if relu {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = reduce::relu(center.sub(v) * a + b);
        }
    } else {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = center.sub(v) * a + b;
        }
    }
}

multiversion! {
    /// Per-channel statistics over the channel's runs (corrected two-pass, f64 mean).
    pub fn channel_stats(x: &[f32], shape: Ncs, ch: usize) -> ChannelStats {
        let (mean, var) = mean_var((0..shape.n).map(|i| &x[shape.run(i, ch)]));
        ChannelStats { mean, var }
    }
}

/// Training forward: per channel, statistics, then y = act((x - mean)·scale + shift) where
/// `affine(ch, stats)` gives (scale, shift) — γ·invstd and β for BatchNorm, with Batch Renorm's
/// r and d folded in for it. `stats` receives each channel's statistics.
pub fn batch_norm_forward_train(
    x: &[f32],
    y: &mut [f32],
    shape: Ncs,
    relu: bool,
    stats: &mut [ChannelStats],
    affine: &(dyn Fn(usize, ChannelStats) -> (f32, f32) + Sync),
    ws: &mut Workspace,
) {
    debug_assert_eq!(x.len(), shape.len());
    if streams(shape.s) {
        forward_train_streaming(x, y, shape, relu, stats, affine, ws);
        return;
    }
    let out = SharedOut::new(y);
    stats
        .par_iter_mut()
        .enumerate()
        .for_each(|(ch, st)| forward_channel(x, &out, shape, ch, relu, st, affine));
}

multiversion! {
    /// One channel of the training forward: statistics, then the affine over its runs.
    fn forward_channel(x: &[f32], out: &SharedOut, shape: Ncs, ch: usize, relu: bool, st: &mut ChannelStats, affine: &(dyn Fn(usize, ChannelStats) -> (f32, f32) + Sync)) {
        let (mean, var) = mean_var((0..shape.n).map(|i| &x[shape.run(i, ch)]));
        *st = ChannelStats { mean, var };
        let (a, b) = affine(ch, *st);
        let center = Center::new(mean);
        for i in 0..shape.n {
            let r = shape.run(i, ch);
            // SAFETY: run (i, ch) belongs to this channel's task alone.
            let yr = unsafe { out.run(r.start, shape.s) };
            apply_run(&x[r], yr, center, a, b, relu);
        }
    }
}

/// Per-channel fixed statistics and affine of `batch_norm_forward_fixed`.
#[derive(Clone, Copy, Debug)]
pub struct ChannelAffine<'a> {
    pub mean: &'a [f64],
    pub scale: &'a [f32],
    pub shift: &'a [f32],
}

/// Eval (or any fixed-statistics) forward: y = act((x - mean[c])·scale[c] + shift[c]),
/// parallel over samples (`shape.n` is not read: any number of whole samples).
pub fn batch_norm_forward_fixed(x: &[f32], y: &mut [f32], shape: Ncs, affine: ChannelAffine, relu: bool) {
    let ChannelAffine { mean, scale, shift } = affine;
    let (cs, s) = (shape.sample_len(), shape.s);
    y.par_chunks_mut(cs)
        .zip(x.par_chunks(cs))
        .for_each(|(ys, xs)| apply_sample(xs, ys, s, mean, scale, shift, relu));
}

multiversion! {
    /// One sample's channels with fixed statistics.
    fn apply_sample(xs: &[f32], ys: &mut [f32], s: usize, mean: &[f64], scale: &[f32], shift: &[f32], relu: bool) {
        for (ch, (xr, yr)) in xs.chunks(s).zip(ys.chunks_mut(s)).enumerate() {
            apply_run(xr, yr, Center::new(mean[ch]), scale[ch], shift[ch], relu);
        }
    }
}

/// What backward needs per channel.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ChannelGrad {
    pub mean: f64,
    pub invstd: f32,
    /// The factor on x̂ in the output: γ (γ·r for Batch Renorm).
    pub gain: f32,
}

/// Σdy and Σdy·x̂ of a channel (dy masked by y > 0 when `relu`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ChannelSums {
    pub sum_dy: f64,
    pub sum_dy_xhat: f64,
}

impl ChannelGrad {
    /// From Σg and Σg·(x - mean) over the channel's m values: the parameter-gradient sums and
    /// dx = k·(g - a - (x - mean)·b) with k = gain·invstd, a = Σg/m, b = Σg·x̂/m·invstd.
    fn dx_terms(&self, sum_dy: f64, sum_dy_centered: f64, m: f64) -> (ChannelSums, f32, f32, f32) {
        let sums = ChannelSums {
            sum_dy,
            sum_dy_xhat: sum_dy_centered * self.invstd as f64,
        };
        let k = self.gain * self.invstd;
        let a = (sum_dy / m) as f32;
        let b = (sums.sum_dy_xhat / m * self.invstd as f64) as f32;
        (sums, k, a, b)
    }
}

/// dx = k·(g - a - (x - mean)·b) over a run, g = dy (· [y > 0] when `relu`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dx_run(x: &[f32], y: &[f32], dy: &[f32], dx: &mut [f32], center: Center, k: f32, a: f32, b: f32, relu: bool) {
    if relu {
        for (((o, &xv), &yv), &g) in dx.iter_mut().zip(x).zip(y).zip(dy) {
            let g = relu_mask(yv, g);
            *o = k * (g - a - center.sub(xv) * b);
        }
    } else {
        for ((o, &xv), &g) in dx.iter_mut().zip(x).zip(dy) {
            *o = k * (g - a - center.sub(xv) * b);
        }
    }
}

/// Training backward: per channel, Σdy and Σdy·x̂, then
/// dx = gain·invstd/m · (m·dy - Σdy - x̂·Σdy·x̂) (m = N·S); `sums` receives the sums for the
/// parameter gradients. With `relu`, dy is first masked by y > 0 (y is the fused output).
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_backward_train(
    x: &[f32],
    y: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    shape: Ncs,
    relu: bool,
    grads: &[ChannelGrad],
    sums: &mut [ChannelSums],
    ws: &mut Workspace,
) {
    if streams(shape.s) {
        backward_train_streaming(x, y, dy, dx, shape, relu, grads, sums, ws);
        return;
    }
    let out = SharedOut::new(dx);
    sums.par_iter_mut()
        .zip(grads.par_iter())
        .enumerate()
        .for_each(|(ch, (sum, g))| backward_channel(x, y, dy, &out, shape, ch, relu, g, sum));
}

multiversion! {
    /// One channel of the training backward: its sums, then dx over its runs.
    fn backward_channel(x: &[f32], y: &[f32], dy: &[f32], out: &SharedOut, shape: Ncs, ch: usize, relu: bool, g: &ChannelGrad, sum: &mut ChannelSums) {
        let center = Center::new(g.mean);
        let mut acc = PairSums::new();
        for i in 0..shape.n {
            let r = shape.run(i, ch);
            acc.add_grad(&x[r.clone()], relu.then(|| &y[r.clone()]), &dy[r], center);
        }
        let (sd, sdx) = acc.totals();
        let (channel_sums, k, a, b) = g.dx_terms(sd, sdx, shape.per_channel() as f64);
        *sum = channel_sums;
        for i in 0..shape.n {
            let r = shape.run(i, ch);
            // SAFETY: run (i, ch) belongs to this channel's task alone.
            let dr = unsafe { out.run(r.start, shape.s) };
            dx_run(&x[r.clone()], &y[r.clone()], &dy[r], dr, center, k, a, b, relu);
        }
    }
}

/// Sample chunks of the streaming kernels: set by N alone, so sums do not depend on threads.
const CHUNKS: usize = 16;

/// Scratch of the streaming kernels, kept by the layer so that a training step allocates nothing.
#[derive(Clone, Default)]
pub struct Workspace {
    accs: Vec<PairSums>,
    centers: Vec<Center>,
    mean: Vec<f64>,
    scale: Vec<f32>,
    shift: Vec<f32>,
    slope: Vec<f32>,
}

impl Workspace {
    fn reset(&mut self, chunks: usize, c: usize) {
        self.accs.clear();
        self.accs.resize(chunks * c, PairSums::new());
        for v in [&mut self.scale, &mut self.shift, &mut self.slope] {
            v.resize(c, 0.0);
        }
        self.mean.resize(c, 0.0);
        self.centers.clear();
    }
}

/// Whether the training kernels stream over samples (two sequential passes over memory) rather
/// than work channel by channel (strided runs, the second pass from cache).
/// Measured on the benchmark shapes: streaming wins 2-3x once runs are long (s >= 64); with short
/// runs its per-run bookkeeping costs more than the strided reads.
fn streams(s: usize) -> bool {
    s >= 64
}

fn chunk_range(n: usize, chunks: usize, j: usize) -> Range<usize> {
    j * n / chunks..(j + 1) * n / chunks
}

/// Channel `ch`'s two sums over all sample chunks (`accs` holds one row of C per chunk), added
/// in chunk order.
fn chunk_totals(accs: &[PairSums], c: usize, ch: usize) -> (f64, f64) {
    accs.chunks(c)
        .map(|row| row[ch].totals())
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y))
}

/// Streaming training forward: shifted sums per (sample chunk, channel) in one sequential pass,
/// combined in chunk order, then the affine in a second sequential pass (three tensor-sizes of
/// traffic, each pass at full streaming speed).
fn forward_train_streaming(
    x: &[f32],
    y: &mut [f32],
    shape: Ncs,
    relu: bool,
    stats: &mut [ChannelStats],
    affine: &(dyn Fn(usize, ChannelStats) -> (f32, f32) + Sync),
    ws: &mut Workspace,
) {
    let Ncs { n, c, .. } = shape;
    let chunks = n.min(CHUNKS);
    ws.reset(chunks, c);
    for ch in 0..c {
        let shift = shift_estimate((0..n).map(|i| &x[shape.run(i, ch)]));
        ws.centers.push(shift.unwrap_or(Center::new(0.0)));
    }
    let centers = &ws.centers;
    ws.accs
        .par_chunks_mut(c)
        .enumerate()
        .for_each(|(j, accs)| stats_chunk(x, shape, chunk_range(n, chunks, j), centers, accs));
    for (ch, st) in stats.iter_mut().enumerate() {
        let (sd, sq) = chunk_totals(&ws.accs, c, ch);
        let (mean, var) = shifted_mean_var(ws.centers[ch], sd, sq, shape.per_channel());
        *st = ChannelStats { mean, var };
        let (a, b) = affine(ch, *st);
        (ws.mean[ch], ws.scale[ch], ws.shift[ch]) = (mean, a, b);
    }
    let affine = ChannelAffine {
        mean: &ws.mean,
        scale: &ws.scale,
        shift: &ws.shift,
    };
    batch_norm_forward_fixed(x, y, shape, affine, relu);
}

multiversion! {
    /// Σ(x - K) and Σ(x - K)² per channel over a chunk of samples, read in memory order.
    fn stats_chunk(x: &[f32], shape: Ncs, samples: Range<usize>, centers: &[Center], accs: &mut [PairSums]) {
        for i in samples {
            for (ch, acc) in accs.iter_mut().enumerate() {
                acc.add_centered_and_sq(&x[shape.run(i, ch)], centers[ch]);
            }
        }
    }
}

/// Streaming training backward: Σg and Σg·(x - mean) per (sample chunk, channel) in one
/// sequential pass, then dx per sample in a second.
#[allow(clippy::too_many_arguments)]
fn backward_train_streaming(
    x: &[f32],
    y: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    shape: Ncs,
    relu: bool,
    grads: &[ChannelGrad],
    sums: &mut [ChannelSums],
    ws: &mut Workspace,
) {
    let Ncs { n, c, s } = shape;
    let chunks = n.min(CHUNKS);
    let m = shape.per_channel() as f64;
    ws.reset(chunks, c);
    ws.centers.extend(grads.iter().map(|g| Center::new(g.mean)));
    let centers = &ws.centers;
    ws.accs
        .par_chunks_mut(c)
        .enumerate()
        .for_each(|(j, accs)| grad_chunk(x, y, dy, shape, chunk_range(n, chunks, j), relu, centers, accs));
    for (ch, g) in grads.iter().enumerate() {
        let (sd, sdx) = chunk_totals(&ws.accs, c, ch);
        (sums[ch], ws.scale[ch], ws.shift[ch], ws.slope[ch]) = g.dx_terms(sd, sdx, m);
    }
    let cs = c * s;
    dx.par_chunks_mut(cs)
        .zip(x.par_chunks(cs).zip(y.par_chunks(cs)).zip(dy.par_chunks(cs)))
        .for_each(|(dxs, ((xs, ys), ds))| {
            dx_sample(xs, ys, ds, dxs, s, relu, centers, &ws.scale, &ws.shift, &ws.slope)
        });
}

multiversion! {
    /// Σg and Σg·(x - mean) per channel over a chunk of samples, read in memory order.
    fn grad_chunk(x: &[f32], y: &[f32], dy: &[f32], shape: Ncs, samples: Range<usize>, relu: bool, centers: &[Center], accs: &mut [PairSums]) {
        for i in samples {
            for (ch, acc) in accs.iter_mut().enumerate() {
                let r = shape.run(i, ch);
                let mask = relu.then(|| &y[r.clone()]);
                acc.add_grad(&x[r.clone()], mask, &dy[r], centers[ch]);
            }
        }
    }
}

multiversion! {
    /// One sample's dx = k·(g - a - (x - mean)·b) with per-channel k, a, b.
    fn dx_sample(xs: &[f32], ys: &[f32], ds: &[f32], dxs: &mut [f32], s: usize, relu: bool, centers: &[Center], k: &[f32], a: &[f32], b: &[f32]) {
        for (ch, dxr) in dxs.chunks_mut(s).enumerate() {
            let r = ch * s..(ch + 1) * s;
            dx_run(&xs[r.clone()], &ys[r.clone()], &ds[r], dxr, centers[ch], k[ch], a[ch], b[ch], relu);
        }
    }
}

// Backward of y = act((x − mean)·inv·γ + β) with fixed statistics (eval mode):
// dx = g·γ·inv, dγ = Σ g·(x − mean)·inv, dβ = Σ g, where g = dy masked by a fused ReLU.
/// One task per channel, as the training backward: the channel's sums (the same `PairSums`
/// accumulation), then its dx runs (`dx_run` with no centring terms). `dx` may be None when
/// the layer's input needs no gradient; `sums[ch]` gets Σg and Σg·x̂.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_backward_fixed(
    x: &[f32],
    y: &[f32],
    dy: &[f32],
    dx: Option<&mut [f32]>,
    shape: Ncs,
    mean: &[f64],
    inv: &[f32],
    gain: &[f32],
    relu: bool,
    sums: &mut [ChannelSums],
) {
    let s = shape.s;
    let out = dx.map(SharedOut::new);
    sums.par_iter_mut().enumerate().for_each(|(ch, sum)| {
        let center = Center::new(mean[ch]);
        let mut acc = PairSums::new();
        for i in 0..shape.n {
            let r = shape.run(i, ch);
            acc.add_grad(&x[r.clone()], relu.then(|| &y[r.clone()]), &dy[r], center);
        }
        let (sd, sdx) = acc.totals();
        *sum = ChannelSums {
            sum_dy: sd,
            sum_dy_xhat: sdx * inv[ch] as f64,
        };
        if let Some(out) = &out {
            let k = gain[ch] * inv[ch];
            for i in 0..shape.n {
                let r = shape.run(i, ch);
                // SAFETY: run (i, ch) belongs to this channel's task alone.
                let dr = unsafe { out.run(r.start, s) };
                dx_run(&x[r.clone()], &y[r.clone()], &dy[r], dr, center, k, 0.0, 0.0, relu);
            }
        }
    });
}

// SyncBN's pieces: the statistics and dx of BatchNorm when the sums come from several processes.

/// dx = gain·invstd·(g - Σg/m - (x - mean)·invstd·Σg·x̂/m) with Σg and Σg·x̂ (in `sums`) taken
/// over all m values of every process; g = dy masked by y > 0 when `relu`. Samples in parallel.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_backward_dx(
    x: &[f32],
    y: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    shape: Ncs,
    relu: bool,
    grads: &[ChannelGrad],
    sums: &[ChannelSums],
    m: f64,
    ws: &mut Workspace,
) {
    let Ncs { c, s, .. } = shape;
    ws.reset(0, c);
    ws.centers.extend(grads.iter().map(|g| Center::new(g.mean)));
    for (ch, (g, sum)) in grads.iter().zip(sums).enumerate() {
        ws.scale[ch] = g.gain * g.invstd;
        ws.shift[ch] = (sum.sum_dy / m) as f32;
        ws.slope[ch] = (sum.sum_dy_xhat / m * g.invstd as f64) as f32;
    }
    let cs = c * s;
    let (centers, k, a, b) = (&ws.centers, &ws.scale, &ws.shift, &ws.slope);
    dx.par_chunks_mut(cs)
        .zip(x.par_chunks(cs).zip(y.par_chunks(cs)).zip(dy.par_chunks(cs)))
        .for_each(|(dxs, ((xs, ys), ds))| dx_sample(xs, ys, ds, dxs, s, relu, centers, k, a, b));
}
