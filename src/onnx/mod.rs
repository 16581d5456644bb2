//! The ONNX graph builder that each layer appends its eval-mode nodes to (graph.rs: nodes,
//! initializers, attributes over the onnx-protobuf messages; norms.rs: BatchNormalization shared
//! by BN and tracked IN). Below `nn`; writing a model to a file is `export`'s.

pub mod graph;
pub mod norms;
