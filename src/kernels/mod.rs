//! Pure functions on slices: the numerical core every layer calls.

pub mod attention;
pub mod batch_norm;
pub mod conv_direct;
pub mod conv_direct_lanes;
pub mod conv_direct_pooled;
pub mod dense;
pub mod gelu;
pub mod group_norm;
pub mod im2col;
pub mod lanes;
pub mod layer_norm;
pub mod layer_norm_tiles;
pub mod loss;
pub mod lp_norm;
pub mod lstm;
pub mod matmul;
pub mod narrow_product;
pub mod pool;
pub mod reduce;
pub mod register_product;
pub mod rms_norm;
pub mod rms_norm_tiles;
pub mod shape;
pub mod simd;
pub mod special;
pub mod winograd;
