//! The bodies of the fuzz targets in `fuzz/` (cargo fuzz), here so that `cargo test` can run
//! them on stable too (tests/fuzz_smoke.rs). Each takes arbitrary bytes and must return,
//! never panic or abort, whatever the bytes are.

use std::path::Path;

/// The IDX reader, plain and gzip, at both ranks the data uses.
pub fn idx(data: &[u8]) {
    for rank in [1, 3] {
        let _ = crate::data::idx::parse_idx(data, rank);
        let _ = crate::data::idx::parse_idx_gz(data, rank);
    }
}

/// The checkpoint loader: safetensors header, normlab metadata, model limits, strict tensors.
pub fn checkpoint(data: &[u8]) {
    let _ = crate::checkpoint::load_model_bytes(Path::new("fuzz.safetensors"), data);
}

/// The model and norm spec parsers: `model|norm`, then the norm built for a small map.
pub fn specs(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (model, norm) = text.split_once('|').unwrap_or((text, "bn"));
    if let (Ok(n), Ok(arch)) = (
        norm.parse::<crate::nn::norm_spec::NormSpec>(),
        model.parse::<crate::models::Arch>(),
    ) {
        let _ = arch.to_string().parse::<crate::models::Arch>();
        if let Ok(spec) = crate::models::ModelSpec::new(arch, n, [1, 28, 28], 10) {
            let _ = spec.flops();
        }
        let _ = n.to_string().parse::<crate::nn::norm_spec::NormSpec>();
        let _ = n.build(&[4, 2, 2], "fuzz", true);
        let _ = n.check_batches(4, 1);
    }
}

/// CIFAR-10's binary batches and their meta file.
pub fn cifar(data: &[u8]) {
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    let _ = crate::data::cifar::parse_batch(Path::new("data_batch_1.bin"), data, &mut images, &mut labels);
    let _ = crate::data::cifar::parse_class_names(data);
}

/// An image file through the folder reader's checks: header sizes against the limits, then
/// the decode of small images.
pub fn image(data: &[u8]) {
    let _ = crate::data::folder::check_image_bytes(data, 256);
}

/// A commit record's run log read back (log.steps, log.gamma.*), then its views: steps.csv
/// and the TensorBoard event file.
pub fn run_log(data: &[u8]) {
    let Ok(st) = safetensors::SafeTensors::deserialize(data) else {
        return;
    };
    for epochs in [1, 3] {
        if let Ok(log) = crate::train::logs::RunLog::from_record(Path::new("train_state.safetensors"), &st, epochs) {
            let _ = log.steps_csv();
            let _ = log.tensorboard_events(&metrics(epochs));
        }
    }
}

/// A run's metrics with `epochs` rows, for the views of a fuzzed log.
fn metrics(epochs: usize) -> crate::train::RunMetrics {
    use crate::train::{EpochMetrics, RunMetrics};
    RunMetrics {
        config: Default::default(),
        data_dir: "data".into(),
        input_norm: crate::data::InputNorm::uniform(1, 0.5, 0.25),
        model_parameters: 1,
        status: "running".into(),
        epochs: (1..=epochs)
            .map(|epoch| EpochMetrics {
                epoch,
                lr: 0.1,
                train_loss: 1.0,
                train_accuracy: 0.5,
                test_loss: 1.0,
                test_accuracy: 0.5,
                seconds: 1.0,
                images_per_sec: 1.0,
                communication_seconds: 0.0,
                data_wait_seconds: 0.0,
                loader_images_per_sec: 0.0,
                skipped_images: 0,
                decoded_images: 0,
                fit: None,
            })
            .collect(),
        test_accuracy: 0.5,
        test_loss: 1.0,
        train_images_per_sec: 1.0,
        processes: 1,
    }
}
