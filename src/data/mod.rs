//! Data: IDX files, CIFAR-10 batches, image folders, in-memory datasets, augmentation, seeded
//! batching.

pub mod augment;
pub mod cifar;
pub mod dataset;
pub mod folder;
pub mod idx;

pub use dataset::{
    data_format, describe_data, epoch_order, load_split, load_split_with, load_test_for, resolve_data_dir, DataFormat,
    Dataset, InputNorm, Source,
};
pub use folder::FolderOptions;
