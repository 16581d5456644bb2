//! im2col / col2im for one sample: turn a convolution into a matrix product.

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

/// col[(c,i,j), (oy,ox)] = x[c, oy*s + i - p, ox*s + j - p], zero outside the image.
pub fn im2col(x: &[f32], g: &ConvGeometry, col: &mut [f32]) {
    let (oh, ow) = (g.out_h(), g.out_w());
    debug_assert_eq!(col.len(), g.col_rows() * oh * ow);
    let mut row = 0;
    for c in 0..g.channels {
        let plane = &x[c * g.height * g.width..(c + 1) * g.height * g.width];
        for i in 0..g.kernel_h {
            for j in 0..g.kernel_w {
                let out = &mut col[row * oh * ow..(row + 1) * oh * ow];
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

/// The adjoint of im2col: dx[c, y, x] = sum of dcol over every (i, j, oy, ox) that read it.
pub fn col2im(dcol: &[f32], g: &ConvGeometry, dx: &mut [f32]) {
    let (oh, ow) = (g.out_h(), g.out_w());
    dx.fill(0.0);
    let mut row = 0;
    for c in 0..g.channels {
        let plane = &mut dx[c * g.height * g.width..(c + 1) * g.height * g.width];
        for i in 0..g.kernel_h {
            for j in 0..g.kernel_w {
                let src = &dcol[row * oh * ow..(row + 1) * oh * ow];
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
