//! Data: IDX files, in-memory datasets, seeded batching.

pub mod dataset;
pub mod idx;

pub use dataset::{epoch_order, load_split, load_test_for, resolve_data_dir, Dataset, InputNorm};
