//! im2col / col2im for one sample: turn a convolution into a matrix product. The column matrix
//! has C·kh·kw rows of oh·ow values; rows lie `ld` values apart, so several samples can sit side
//! by side in one matrix (sample p at column offset p·oh·ow, ld = P·oh·ow) for one larger gemm.

/// Geometry of a 2-D convolution over one sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub kernel_h: usize,
    pub kernel_w: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvGeometry {
    pub fn out_h(&self) -> usize {
        (self.height + 2 * self.padding - self.kernel_h) / self.stride + 1
    }
    pub fn out_w(&self) -> usize {
        (self.width + 2 * self.padding - self.kernel_w) / self.stride + 1
    }
    /// Rows of the column matrix: C * kh * kw.
    pub fn col_rows(&self) -> usize {
        self.channels * self.kernel_h * self.kernel_w
    }
    /// Columns of the column matrix: out_h * out_w.
    pub fn col_cols(&self) -> usize {
        self.out_h() * self.out_w()
    }
}

/// For stride 1, the output columns ox whose input column ox + j - p lies inside the image:
/// `lo..hi`, reading input from `lo + j - p`.
#[inline]
fn valid_cols(g: &ConvGeometry, j: usize, ow: usize) -> (usize, usize) {
    let lo = g.padding.saturating_sub(j).min(ow);
    let hi = (g.width + g.padding).saturating_sub(j).min(ow).max(lo);
    (lo, hi)
}

/// col[(c,i,j), (oy,ox)] = x[c, oy*s + i - p, ox*s + j - p], zero outside the image.
pub fn im2col(x: &[f32], g: &ConvGeometry, col: &mut [f32], ld: usize) {
    let (oh, ow) = (g.out_h(), g.out_w());
    assert!(ld >= oh * ow && col.len() >= (g.col_rows() - 1) * ld + oh * ow);
    if g.stride == 1 {
        return im2col_stride1(x, g, col, oh, ow, ld);
    }
    let mut row = 0;
    for c in 0..g.channels {
        let plane = &x[c * g.height * g.width..(c + 1) * g.height * g.width];
        for i in 0..g.kernel_h {
            for j in 0..g.kernel_w {
                let out = &mut col[row * ld..row * ld + oh * ow];
                for oy in 0..oh {
                    let iy = (oy * g.stride + i) as isize - g.padding as isize;
                    let out_row = &mut out[oy * ow..(oy + 1) * ow];
                    if iy < 0 || iy >= g.height as isize {
                        out_row.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * g.width..(iy as usize + 1) * g.width];
                    for (ox, o) in out_row.iter_mut().enumerate() {
                        let ix = (ox * g.stride + j) as isize - g.padding as isize;
                        *o = if ix >= 0 && ix < g.width as isize {
                            src[ix as usize]
                        } else {
                            0.0
                        };
                    }
                }
                row += 1;
            }
        }
    }
}

/// Where a "same"-width (ow = w) stride-1 tap (i, j) reads: output position k takes input
/// k + shift, and only output rows `rows` and columns `cols` lie inside the image.
struct SameWidthTap {
    shift: isize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
}

impl SameWidthTap {
    fn new(g: &ConvGeometry, i: usize, j: usize, oh: usize) -> Self {
        let (h, w, p) = (g.height, g.width, g.padding);
        let (lo, hi) = valid_cols(g, j, w);
        // Output row oy reads input row oy + i - p.
        let first_row = p.saturating_sub(i).min(oh);
        SameWidthTap {
            shift: (i as isize - p as isize) * w as isize + j as isize - p as isize,
            rows: first_row..(h + p).saturating_sub(i).min(oh).max(first_row),
            cols: lo..hi,
        }
    }

    /// The output positions of the valid rows that have an input at k + shift (the valid rows
    /// minus at most a border value at either end).
    fn span(&self, w: usize, len: usize) -> std::ops::Range<usize> {
        let (lo, hi) = (self.rows.start * w, self.rows.end * w);
        let start = lo.max((-self.shift).max(0) as usize).min(hi);
        let end = hi.min((len as isize - self.shift).max(0) as usize).max(start);
        start..end
    }
}

/// Stride 1: each output row is a shifted copy of an input row, zero-padded at the ends.
fn im2col_stride1(x: &[f32], g: &ConvGeometry, col: &mut [f32], oh: usize, ow: usize, ld: usize) {
    let (h, w, p) = (g.height, g.width, g.padding);
    if let Some(pp) = PaddedPlane::new(g, oh, IM2COL_PADDED_MAX) {
        return im2col_padded(x, g, col, oh, ld, &pp);
    }
    if ow == w {
        return im2col_same_width(x, g, col, oh, ld);
    }
    let mut row = 0;
    for c in 0..g.channels {
        let plane = &x[c * h * w..(c + 1) * h * w];
        for i in 0..g.kernel_h {
            for j in 0..g.kernel_w {
                let out = &mut col[row * ld..row * ld + oh * ow];
                row += 1;
                let (lo, hi) = valid_cols(g, j, ow);
                for (oy, out_row) in out.chunks_exact_mut(ow).enumerate() {
                    let iy = oy + i;
                    if iy < p || iy >= h + p {
                        out_row.fill(0.0);
                        continue;
                    }
                    let src = &plane[(iy - p) * w..(iy - p + 1) * w];
                    out_row[..lo].fill(0.0);
                    out_row[lo..hi].copy_from_slice(&src[lo + j - p..hi + j - p]);
                    out_row[hi..].fill(0.0);
                }
            }
        }
    }
}

/// im2col takes the padded-plane path for output planes up to this many values (16x16 maps),
/// col2im up to `COL2IM_PADDED_MAX` (7x7 and 8x8): per sample, on 64->64 convs at 14x14, it
/// made im2col 16.1 -> 14.0 µs but col2im 18.5 -> 19.0 µs; at 7x7 both gain (128 channels:
/// 18.5 -> 8.2 and 16.5 -> 11.4 µs); at 28x28 both lose (20 -> 30 and 28 -> 39 µs).
const IM2COL_PADDED_MAX: usize = 256;
const COL2IM_PADDED_MAX: usize = 64;
/// A padded plane's buffer: the largest plane plus margins of a 3x3 conv with padding 1.
const PADDED_MAX: usize = 384;

/// A stride-1, same-width geometry small enough for the padded-plane path: the plane sits in a
/// zeroed buffer with `margin` values before it, so every tap reads one unbroken run; kw <= 3
/// keeps the column masks to three.
struct PaddedPlane {
    margin: usize,
    len: usize,
}

impl PaddedPlane {
    fn new(g: &ConvGeometry, oh: usize, max_out: usize) -> Option<Self> {
        let (h, w, p) = (g.height, g.width, g.padding);
        if g.stride != 1 || g.out_w() != w || g.kernel_w > 3 || oh * w > max_out {
            return None;
        }
        // Lowest read: shift -(p·w + p); highest: (oh - 1 + kh - 1 - p)·w + w - 1 + kw - 1 - p.
        let margin = p * w + p;
        let top = (oh + g.kernel_h - 1).saturating_sub(p) * w + (g.kernel_w - 1).saturating_sub(p);
        let len = margin + top.max(h * w);
        (len <= PADDED_MAX).then_some(PaddedPlane { margin, len })
    }

    /// mask[j][k]: all ones where output column k % w reads inside the image for tap column j.
    fn column_masks(g: &ConvGeometry, oh: usize) -> [[u32; IM2COL_PADDED_MAX]; 3] {
        let mut masks = [[0u32; IM2COL_PADDED_MAX]; 3];
        for (j, mask) in masks.iter_mut().enumerate().take(g.kernel_w) {
            let (lo, hi) = valid_cols(g, j, g.width);
            for (k, m) in mask[..oh * g.width].iter_mut().enumerate() {
                *m = if (lo..hi).contains(&(k % g.width)) { u32::MAX } else { 0 };
            }
        }
        masks
    }

    /// The taps of one plane in row order: where each tap's run starts in the buffer (margin +
    /// shift with margin = p·w + p and shift = (i - p)·w + j - p, i.e. i·w + j) and its mask.
    fn taps<'m>(
        g: &ConvGeometry,
        masks: &'m [[u32; IM2COL_PADDED_MAX]; 3],
    ) -> impl Iterator<Item = (usize, &'m [u32; IM2COL_PADDED_MAX])> + 'm {
        let (kw, w) = (g.kernel_w, g.width);
        (0..g.kernel_h).flat_map(move |i| masks.iter().take(kw).enumerate().map(move |(j, m)| (i * w + j, m)))
    }
}

/// Small same-width planes (7x7 to 16x16 maps): the per-tap copies of `im2col_same_width` are
/// 30 to 200 values, where a memcpy call and the fix-ups cost more than the copy. Here each
/// plane is copied once into a zero-margined buffer; then every tap row is one vectorized pass
/// out[k] = buf[margin + k + shift] & mask[j][k], the margin supplying the rows outside the
/// image and the mask the columns the shift wrapped in.
fn im2col_padded(x: &[f32], g: &ConvGeometry, col: &mut [f32], oh: usize, ld: usize, pp: &PaddedPlane) {
    let (h, w) = (g.height, g.width);
    let (plane_len, out_len) = (h * w, oh * w);
    let masks = PaddedPlane::column_masks(g, oh);
    let mut buf = [0.0f32; PADDED_MAX];
    let mut row = 0;
    for plane in x.chunks_exact(plane_len).take(g.channels) {
        buf[pp.margin..pp.margin + plane_len].copy_from_slice(plane);
        for (start, mask) in PaddedPlane::taps(g, &masks) {
            let src = &buf[start..start + out_len];
            let out = &mut col[row * ld..row * ld + out_len];
            row += 1;
            for ((o, &v), &m) in out.iter_mut().zip(src).zip(&mask[..out_len]) {
                *o = f32::from_bits(v.to_bits() & m);
            }
        }
    }
}

/// The adjoint of `im2col_padded`: every tap row is added (masked) into a zero-margined buffer
/// in one vectorized pass, in the same tap order as the other paths; the plane is then copied
/// out of the buffer and the margins dropped.
fn col2im_padded(dcol: &[f32], g: &ConvGeometry, dx: &mut [f32], oh: usize, ld: usize, pp: &PaddedPlane) {
    let (h, w) = (g.height, g.width);
    let (plane_len, out_len) = (h * w, oh * w);
    let masks = PaddedPlane::column_masks(g, oh);
    let mut buf = [0.0f32; PADDED_MAX];
    let mut row = 0;
    for plane in dx.chunks_exact_mut(plane_len).take(g.channels) {
        buf[..pp.len].fill(0.0);
        for (start, mask) in PaddedPlane::taps(g, &masks) {
            let src = &dcol[row * ld..row * ld + out_len];
            row += 1;
            for ((d, &v), &m) in buf[start..start + out_len].iter_mut().zip(src).zip(&mask[..out_len]) {
                *d += f32::from_bits(v.to_bits() & m);
            }
        }
        plane.copy_from_slice(&buf[pp.margin..pp.margin + plane_len]);
    }
}

/// Stride 1 with ow = w ("same" padding): a tap's whole row is the input plane shifted by
/// (i - p)·w + (j - p), so it is one contiguous copy; then the out-of-image rows and the border
/// columns (which the shift wrapped in from the neighbouring row) are zeroed. One long copy
/// instead of oh short ones (7 to 28 values each on the models' maps).
fn im2col_same_width(x: &[f32], g: &ConvGeometry, col: &mut [f32], oh: usize, ld: usize) {
    let (h, w) = (g.height, g.width);
    let plane_len = h * w;
    let mut row = 0;
    for c in 0..g.channels {
        let plane = &x[c * plane_len..(c + 1) * plane_len];
        for i in 0..g.kernel_h {
            for j in 0..g.kernel_w {
                let out = &mut col[row * ld..row * ld + oh * w];
                row += 1;
                let tap = SameWidthTap::new(g, i, j, oh);
                let span = tap.span(w, plane_len);
                out[..span.start].fill(0.0);
                if !span.is_empty() {
                    let src = (span.start as isize + tap.shift) as usize;
                    out[span.clone()].copy_from_slice(&plane[src..src + span.len()]);
                }
                out[span.end..].fill(0.0);
                if tap.cols.len() < w {
                    for out_row in out[tap.rows.start * w..tap.rows.end * w].chunks_exact_mut(w) {
                        out_row[..tap.cols.start].fill(0.0);
                        out_row[tap.cols.end..].fill(0.0);
                    }
                }
            }
        }
    }
}

/// The adjoint of im2col: dx[c, y, x] = sum of dcol over every (i, j, oy, ox) that read it.
/// `dcol` is scratch: the same-width path zeroes its border columns.
pub fn col2im(dcol: &mut [f32], g: &ConvGeometry, dx: &mut [f32], ld: usize) {
    let (oh, ow) = (g.out_h(), g.out_w());
    assert!(ld >= oh * ow && dcol.len() >= (g.col_rows() - 1) * ld + oh * ow);
    if let Some(pp) = PaddedPlane::new(g, oh, COL2IM_PADDED_MAX) {
        return col2im_padded(dcol, g, dx, oh, ld, &pp);
    }
    dx.fill(0.0);
    if g.stride == 1 && ow == g.width {
        return col2im_same_width(dcol, g, dx, oh, ld);
    }
    if g.stride == 1 {
        let (h, w, p) = (g.height, g.width, g.padding);
        let mut row = 0;
        for c in 0..g.channels {
            let plane = &mut dx[c * h * w..(c + 1) * h * w];
            for i in 0..g.kernel_h {
                for j in 0..g.kernel_w {
                    let src = &dcol[row * ld..row * ld + oh * ow];
                    row += 1;
                    let (lo, hi) = valid_cols(g, j, ow);
                    for (oy, src_row) in src.chunks_exact(ow).enumerate() {
                        let iy = oy + i;
                        if iy < p || iy >= h + p {
                            continue;
                        }
                        let dst = &mut plane[(iy - p) * w + lo + j - p..(iy - p) * w + hi + j - p];
                        for (d, &v) in dst.iter_mut().zip(&src_row[lo..hi]) {
                            *d += v;
                        }
                    }
                }
            }
        }
        return;
    }
    let mut row = 0;
    for c in 0..g.channels {
        let plane = &mut dx[c * g.height * g.width..(c + 1) * g.height * g.width];
        for i in 0..g.kernel_h {
            for j in 0..g.kernel_w {
                let src = &dcol[row * ld..row * ld + oh * ow];
                for oy in 0..oh {
                    let iy = (oy * g.stride + i) as isize - g.padding as isize;
                    if iy < 0 || iy >= g.height as isize {
                        continue;
                    }
                    let dst = &mut plane[iy as usize * g.width..(iy as usize + 1) * g.width];
                    for ox in 0..ow {
                        let ix = (ox * g.stride + j) as isize - g.padding as isize;
                        if ix >= 0 && ix < g.width as isize {
                            dst[ix as usize] += src[oy * ow + ox];
                        }
                    }
                }
                row += 1;
            }
        }
    }
}

/// The adjoint of `im2col_same_width`: zero each tap's border columns in dcol (they hold the
/// gradient of padding, which the shift would add to the neighbouring row), then add the valid
/// rows to the plane in one contiguous pass.
fn col2im_same_width(dcol: &mut [f32], g: &ConvGeometry, dx: &mut [f32], oh: usize, ld: usize) {
    let (h, w) = (g.height, g.width);
    let plane_len = h * w;
    let mut row = 0;
    for c in 0..g.channels {
        let plane = &mut dx[c * plane_len..(c + 1) * plane_len];
        for i in 0..g.kernel_h {
            for j in 0..g.kernel_w {
                let src = &mut dcol[row * ld..row * ld + oh * w];
                row += 1;
                let tap = SameWidthTap::new(g, i, j, oh);
                if tap.cols.len() < w {
                    for src_row in src[tap.rows.start * w..tap.rows.end * w].chunks_exact_mut(w) {
                        src_row[..tap.cols.start].fill(0.0);
                        src_row[tap.cols.end..].fill(0.0);
                    }
                }
                let span = tap.span(w, plane_len);
                if span.is_empty() {
                    continue;
                }
                let at = (span.start as isize + tap.shift) as usize;
                for (d, &v) in plane[at..at + span.len()].iter_mut().zip(&src[span]) {
                    *d += v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stride-1 fast paths (padded planes, same-width shifted planes, per-row copies) agree
    /// with the definition, with rows `ld` apart and NaN between them (batched samples).
    #[test]
    fn stride_one_paths_match_the_definition() {
        for (k, p, h, w) in [
            (3, 1, 5, 6),
            (3, 0, 4, 4),
            (5, 2, 6, 5),
            (1, 0, 3, 3),
            (3, 2, 2, 3),
            (5, 2, 3, 7),
            (7, 3, 5, 4),
            (3, 1, 1, 4),
            (3, 1, 7, 2),
            (5, 2, 2, 6),
            // Output planes of 81 and 272 values: past col2im's and im2col's padded-plane limits.
            (3, 1, 9, 9),
            (3, 1, 17, 16),
        ] {
            let g = ConvGeometry {
                channels: 2,
                height: h,
                width: w,
                kernel_h: k,
                kernel_w: k,
                stride: 1,
                padding: p,
            };
            let x: Vec<f32> = (0..2 * h * w).map(|i| i as f32 + 1.0).collect();
            let (oh, ow) = (g.out_h(), g.out_w());
            let ld = oh * ow + 3;
            let mut col = vec![f32::NAN; g.col_rows() * ld];
            im2col(&x, &g, &mut col, ld);
            // A gradient that is non-zero everywhere, padding positions included.
            let dcol: Vec<f32> = (0..col.len()).map(|i| (i % 7) as f32 - 2.5).collect();
            let mut dx = vec![0.0f32; x.len()];
            col2im(&mut dcol.clone(), &g, &mut dx, ld);
            let mut want_dx = vec![0.0f32; x.len()];
            for c in 0..2 {
                for i in 0..k {
                    for j in 0..k {
                        for oy in 0..oh {
                            for ox in 0..ow {
                                let (iy, ix) = (
                                    oy as isize + i as isize - p as isize,
                                    ox as isize + j as isize - p as isize,
                                );
                                let inside = iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w;
                                let v = if inside {
                                    x[c * h * w + iy as usize * w + ix as usize]
                                } else {
                                    0.0
                                };
                                let row = (c * k + i) * k + j;
                                assert_eq!(col[row * ld + oy * ow + ox], v, "k{k} p{p} row {row} ({oy},{ox})");
                                if inside {
                                    want_dx[c * h * w + iy as usize * w + ix as usize] += dcol[row * ld + oy * ow + ox];
                                }
                            }
                        }
                    }
                }
            }
            assert_eq!(dx, want_dx, "col2im k{k} p{p}");
        }
    }
}
