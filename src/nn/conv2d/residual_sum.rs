//! Inference's last conv of a residual block with its norm folded: y = ReLU(conv(x) + r), the
//! sum made in Winograd's output transform (or the direct kernel's epilogue) while each tile is
//! in cache, instead of writing the conv's output and reading it back with the shortcut in a
//! pass of its own.

use super::{Conv2d, ForwardMethod};
use crate::error::Result;
use crate::nn::layer::Mode;
use crate::tensor::Tensor;

impl Conv2d {
    /// y = ReLU(conv(x) + r) in eval mode, the same values as the conv's forward followed by
    /// the sum and the ReLU. Returns false, doing nothing, unless the forward runs Winograd or
    /// the direct kernel (im2col keeps the separate pass), the conv has no ReLU of its own and
    /// r has the output's shape; the caller then runs the passes one by one.
    pub fn forward_add_relu(&mut self, x: &Tensor, y: &mut Tensor, r: &Tensor) -> Result<bool> {
        let g = self.geometry(x)?;
        if self.relu || r.shape != [x.batch(), self.out_channels, g.out_h(), g.out_w()] {
            return Ok(false);
        }
        let r = Some(r.data.as_slice());
        match self.passes(&g, x.batch(), Mode::Eval).forward {
            ForwardMethod::Winograd(tile) => {
                self.with_shared_scratch(x, |conv| conv.forward_winograd(x, y, &g, tile, None, r))?
            }
            ForwardMethod::Direct { lanes } => {
                self.with_shared_scratch(x, |conv| conv.forward_direct(x, y, &g, lanes, None, r))?
            }
            ForwardMethod::Im2col => return Ok(false),
        }
        Ok(true)
    }
}
