//! Data: IDX files, CIFAR-10 batches, image folders, in-memory datasets, augmentation, seeded
//! batching.

/// The largest image side a model takes (data are checked against it before decoding).
pub const MAX_INPUT_SIDE: usize = 1024;
/// Labels are bytes.
pub const MAX_CLASSES: usize = 256;

pub mod augment;
pub mod cifar;
pub mod dataset;
pub mod folder;
pub mod idx;
pub mod pack;
pub mod shards;
pub mod stats;
pub mod stream;

pub use dataset::{
    data_format, describe_data, epoch_order, load_split, load_split_with, load_test_for, resolve_data_dir, DataFormat,
    Dataset, InputNorm, Source,
};
pub use folder::FolderOptions;
pub use stream::{normalize_batch, Batches, Fed};
pub use stream::{FeedOptions, Pixels};
