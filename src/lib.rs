//! normlab: Batch Normalization and its relatives in CNN training, exact to PyTorch and fast
//! on a CPU. See ARCHITECTURE.md for the map.

pub mod bench;
pub mod checkpoint;
pub mod conformance;
pub mod data;
pub mod dist;
pub mod error;
pub mod export;
pub mod files;
pub mod fold;
pub mod fuzz_targets;
pub mod kernels;
pub mod memory;
pub mod models;
pub mod nn;
pub mod onnx;
pub mod optim;
pub mod plot;
pub mod recalibrate;
pub mod slimming;
pub mod studies;
pub mod tensor;
pub mod train;
pub mod workers;

pub use error::{Error, Result};
pub use tensor::Tensor;
