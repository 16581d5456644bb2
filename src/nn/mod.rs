//! Layers: plain structs with `forward` and `backward` side by side.

pub mod activation;
pub mod batch_norm;
pub mod conv2d;
pub mod conv_algorithm;
pub mod conv_pool;
pub mod dropout;
pub mod group_norm;
pub mod init;
pub mod layer;
pub mod linear;
pub mod lstm;
pub mod noisy_batch_norm;
pub mod norm_spec;
pub mod pool;
pub mod residual;
pub mod rms_norm;
pub mod sequential;
pub mod shared_scratch;
pub mod vit;

pub use layer::{BufferMut, Layer, Mode, Param, ParamKind, StatsMode};
pub use sequential::Sequential;
