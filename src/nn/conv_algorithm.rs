//! Which method a convolution uses for its passes (`normlab bench --filter conv` times each); its own file so that
//! the Layer trait and Conv2d need not import each other.

use crate::kernels::winograd::WinogradTile;

/// How a convolution computes its passes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConvAlgorithm {
    /// The fastest measured method for the layer's shape (see `Conv2d::passes`).
    #[default]
    Auto,
    /// im2col + gemm for every pass.
    Im2col,
    /// Winograd with this tile for every pass where the geometry allows it (3x3, stride 1,
    /// padding 1), im2col elsewhere.
    Winograd(WinogradTile),
    /// The direct kernel (kernels::conv_direct) for the forward where the geometry allows it
    /// (3x3, padding 1, stride 1 or 2), im2col for the rest and for the backward passes.
    Direct,
    /// As `Direct`, with the output channels in the vector lanes (kernels::conv_direct_lanes).
    DirectLanes,
}

impl std::str::FromStr for ConvAlgorithm {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(ConvAlgorithm::Auto),
            "im2col" => Ok(ConvAlgorithm::Im2col),
            "winograd2" => Ok(ConvAlgorithm::Winograd(WinogradTile::F2)),
            "winograd4" => Ok(ConvAlgorithm::Winograd(WinogradTile::F4)),
            "direct" => Ok(ConvAlgorithm::Direct),
            "direct-lanes" => Ok(ConvAlgorithm::DirectLanes),
            _ => Err(format!(
                "unknown convolution algorithm '{s}': use auto, im2col, winograd2, winograd4, direct or direct-lanes"
            )),
        }
    }
}
