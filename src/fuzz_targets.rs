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
    if let Ok(spec) = crate::models::ModelSpec::new(model, norm, [1, 28, 28], 10) {
        let _ = spec.flops();
    }
    if let Ok(n) = norm.parse::<crate::nn::norm_spec::NormSpec>() {
        let _ = n.to_string().parse::<crate::nn::norm_spec::NormSpec>();
        let _ = n.build(&[4, 2, 2], "fuzz", true);
        let _ = n.check_batches(4, 1);
    }
}
