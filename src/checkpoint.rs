//! Checkpoints as safetensors under PyTorch state-dict names and layouts, written atomically.
//! The metadata records the model spec and input normalization so a file rebuilds its model.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::data::InputNorm;
use crate::error::{Error, Result};
use crate::models::{Model, ModelSpec};
use crate::nn::BufferMut;

const META_MODEL: &str = "normlab.model";
const META_INPUT_NORM: &str = "normlab.input_norm";
const META_EPOCH: &str = "normlab.epoch";

/// What a checkpoint says about itself beyond its tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointMeta {
    pub spec: ModelSpec,
    pub input_norm: InputNorm,
    /// Completed training epochs when it was written.
    pub epoch: usize,
}

/// An owned tensor ready for serialization.
pub struct Entry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl Entry {
    pub fn f32(name: String, shape: &[usize], data: &[f32]) -> Self {
        let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        Entry {
            name,
            dtype: Dtype::F32,
            shape: shape.to_vec(),
            bytes,
        }
    }
    pub fn i64(name: String, value: i64) -> Self {
        Entry {
            name,
            dtype: Dtype::I64,
            shape: vec![],
            bytes: value.to_le_bytes().to_vec(),
        }
    }
}

/// Serializes entries with metadata into safetensors bytes.
pub fn serialize(entries: &[Entry], metadata: HashMap<String, String>) -> Result<Vec<u8>> {
    let views = entries
        .iter()
        .map(|e| {
            TensorView::new(e.dtype, e.shape.clone(), &e.bytes)
                .map(|v| (e.name.clone(), v))
                .map_err(|err| Error::invalid(format!("tensor {}: {err}", e.name)))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes =
        safetensors::serialize(views, &Some(metadata)).map_err(|e| Error::invalid(format!("safetensors: {e}")))?;
    canonical_header(bytes)
}

/// The same file with its JSON header's keys sorted (the metadata among them): safetensors
/// writes the metadata in a HashMap's order, which changes from process to process, so the
/// same weights made a different file at every run. Offsets are relative to the data, which
/// does not move; the header keeps safetensors' 8-byte alignment (space padding).
fn canonical_header(bytes: Vec<u8>) -> Result<Vec<u8>> {
    use std::collections::BTreeMap;
    let bad = |e: String| Error::invalid(format!("safetensors header: {e}"));
    let n = u64::from_le_bytes(bytes[..8].try_into().map_err(|_| bad("short file".into()))?) as usize;
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).map_err(|e| bad(e.to_string()))?;
    let sorted: BTreeMap<&String, serde_json::Value> = header
        .iter()
        .map(|(k, v)| {
            let v = match v {
                serde_json::Value::Object(m) => {
                    serde_json::to_value(m.iter().collect::<BTreeMap<_, _>>()).unwrap_or_else(|_| v.clone())
                }
                other => other.clone(),
            };
            (k, v)
        })
        .collect();
    let mut head = serde_json::to_vec(&sorted).map_err(|e| bad(e.to_string()))?;
    head.resize(head.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + head.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(head.len() as u64).to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}

/// The model's state dict, in PyTorch names and layouts.
pub fn state_dict(model: &mut Model) -> Vec<Entry> {
    let mut out: Vec<Entry> = Vec::new();
    for (name, p) in model.net.named_params() {
        out.push(Entry::f32(name, &p.value.shape, &p.value.data));
    }
    for (name, b) in model.net.named_buffers() {
        out.push(match b {
            BufferMut::F32(t) => Entry::f32(name, &t.shape, &t.data),
            BufferMut::I64(v) => Entry::i64(name, *v),
        });
    }
    out
}

/// The metadata that lets a file rebuild its model.
pub fn model_metadata(meta: &CheckpointMeta) -> HashMap<String, String> {
    let mut md = HashMap::new();
    md.insert("format".to_string(), "pt".to_string());
    md.insert(
        META_MODEL.to_string(),
        serde_json::to_string(&meta.spec).expect("spec serializes"),
    );
    md.insert(
        META_INPUT_NORM.to_string(),
        serde_json::to_string(&meta.input_norm).expect("norm serializes"),
    );
    md.insert(META_EPOCH.to_string(), meta.epoch.to_string());
    md
}

pub fn save_model(path: &Path, model: &mut Model, meta: &CheckpointMeta) -> Result<()> {
    let bytes = serialize(&state_dict(model), model_metadata(meta))?;
    crate::files::write_atomic(path, &bytes)
}

/// The largest checkpoint or tensor file normlab reads (a file is checked before it is read).
pub const FILE_LIMIT: u64 = 4 << 30;

/// Reads a file and parses its safetensors header, with errors naming the file.
pub fn read_safetensors(path: &Path) -> Result<Vec<u8>> {
    let bytes = crate::files::read_limited(path, FILE_LIMIT, "safetensors")?;
    SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::checkpoint(path, format!("not a readable safetensors file ({e})")))?;
    Ok(bytes)
}

/// The metadata map of safetensors bytes (empty when there is none).
pub fn metadata(path: &Path, bytes: &[u8]) -> Result<HashMap<String, String>> {
    let (_, md) = SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::checkpoint(path, format!("not a readable safetensors file ({e})")))?;
    Ok(md.metadata().clone().unwrap_or_default())
}

/// A tensor's values as f32, checking dtype and shape.
pub fn tensor_f32(path: &Path, st: &SafeTensors, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let t = st
        .tensor(name)
        .map_err(|_| Error::checkpoint(path, format!("missing tensor '{name}'")))?;
    if t.dtype() != Dtype::F32 {
        return Err(Error::checkpoint(
            path,
            format!("tensor '{name}' is {:?}, expected F32", t.dtype()),
        ));
    }
    if t.shape() != shape {
        return Err(Error::checkpoint(
            path,
            format!("tensor '{name}' has shape {:?}, the model expects {shape:?}", t.shape()),
        ));
    }
    Ok(le_f32s(t.data()).collect())
}

/// The little-endian f32 values of a tensor's bytes (safetensors checked the length).
pub fn le_f32s(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn tensor_i64(path: &Path, st: &SafeTensors, name: &str) -> Result<i64> {
    let t = st
        .tensor(name)
        .map_err(|_| Error::checkpoint(path, format!("missing tensor '{name}'")))?;
    let v = match <[u8; 8]>::try_from(t.data()) {
        Ok(b) if t.dtype() == Dtype::I64 => i64::from_le_bytes(b),
        _ => return Err(Error::checkpoint(path, format!("tensor '{name}' must be a scalar I64"))),
    };
    // The only I64 entries are batch counters (num_batches_tracked), which momentum=None turns
    // into the factor 1/count: a negative or absurd count is a damaged file, not a count.
    if !(0..=MAX_BATCH_COUNT).contains(&v) {
        return Err(Error::checkpoint(
            path,
            format!("'{name}' is {v}, not a count of batches (0 to 2^53); the file is damaged"),
        ));
    }
    Ok(v)
}

/// The largest batch counter a checkpoint may hold (exact as an f64).
pub const MAX_BATCH_COUNT: i64 = 1 << 53;

/// Copies every state-dict entry from the file into `model`; like PyTorch's strict loading,
/// a missing, extra, or differently shaped tensor is an error.
pub fn load_state_dict(path: &Path, bytes: &[u8], model: &mut Model) -> Result<()> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::checkpoint(path, format!("not a readable safetensors file ({e})")))?;
    let expected = load_prefixed(path, &st, model, "")?;
    let mut extra: Vec<String> = st
        .names()
        .into_iter()
        .filter(|n| !expected.contains(n))
        .cloned()
        .collect();
    if !extra.is_empty() {
        extra.sort();
        return Err(Error::checkpoint(
            path,
            format!("unexpected tensors for this model: {}", extra.join(", ")),
        ));
    }
    Ok(())
}

/// Copies the tensors `<prefix><state-dict name>` into `model`, each checked for dtype and
/// shape; returns the names read.
pub fn load_prefixed(path: &Path, st: &SafeTensors, model: &mut Model, prefix: &str) -> Result<Vec<String>> {
    let mut read = Vec::new();
    for (name, p) in model.net.named_params() {
        let key = format!("{prefix}{name}");
        p.value.data = tensor_f32(path, st, &key, &p.value.shape)?;
        read.push(key);
    }
    for (name, b) in model.net.named_buffers() {
        let key = format!("{prefix}{name}");
        match b {
            BufferMut::F32(t) => t.data = tensor_f32(path, st, &key, &t.shape)?,
            BufferMut::I64(v) => *v = tensor_i64(path, st, &key)?,
        }
        read.push(key);
    }
    Ok(read)
}

/// What the metadata of `path` says about its model.
pub fn parse_metadata(path: &Path, md: &HashMap<String, String>) -> Result<CheckpointMeta> {
    let get = |key: &str| {
        md.get(key).ok_or_else(|| {
            Error::checkpoint(
                path,
                format!(
                    "metadata has no '{key}': not written by normlab (a plain state dict?); give \
                         its architecture with --model SPEC [--norm SPEC]"
                ),
            )
        })
    };
    let spec: ModelSpec = serde_json::from_str(get(META_MODEL)?)
        .map_err(|e| Error::checkpoint(path, format!("bad '{META_MODEL}' metadata: {e}")))?;
    let input_norm: InputNorm = serde_json::from_str(get(META_INPUT_NORM)?)
        .map_err(|e| Error::checkpoint(path, format!("bad '{META_INPUT_NORM}' metadata: {e}")))?;
    let epoch = get(META_EPOCH)?
        .parse()
        .map_err(|_| Error::checkpoint(path, format!("bad '{META_EPOCH}' metadata")))?;
    if input_norm.channels != spec.input[0] {
        return Err(Error::checkpoint(
            path,
            format!(
                "'{META_INPUT_NORM}' normalizes {} channel(s) but the model takes {}",
                input_norm.channels, spec.input[0]
            ),
        ));
    }
    Ok(CheckpointMeta {
        spec,
        input_norm,
        epoch,
    })
}

/// Rebuilds the model a checkpoint describes and loads its weights and buffers. The spec in
/// the metadata is untrusted: it is checked against the model-size limits and against the
/// file's own size before the model is allocated.
pub fn load_model(path: &Path) -> Result<(Model, CheckpointMeta)> {
    if path.is_dir() {
        let hint = if path.join("model.safetensors").is_file() {
            format!("; did you mean {}?", path.join("model.safetensors").display())
        } else {
            String::new()
        };
        return Err(Error::invalid(format!(
            "{} is a folder; a checkpoint is a model file such as model.safetensors{hint}",
            path.display()
        )));
    }
    let is_run_model = path.file_name().is_some_and(|n| n == "model.safetensors");
    if !path.exists() && is_run_model && path.parent().is_some_and(|d| d.join("metrics.json").is_file()) {
        return Err(Error::invalid(format!(
            "{} does not exist yet: its run has not finished an epoch",
            path.display()
        )));
    }
    let bytes = read_safetensors(path)?;
    load_model_bytes(path, &bytes)
}

/// `load_model` on bytes already read (`path` names them in errors).
pub fn load_model_bytes(path: &Path, bytes: &[u8]) -> Result<(Model, CheckpointMeta)> {
    let md = metadata(path, bytes)?;
    let meta = parse_metadata(path, &md)?;
    let mut model = build_checked(path, &meta.spec, bytes.len())?;
    load_state_dict(path, bytes, &mut model)?;
    Ok((model, meta))
}

/// Whether safetensors bytes carry normlab's model metadata (a file written by normlab), or
/// are a plain state dict (saved by PyTorch, say).
pub fn has_model_metadata(path: &Path, bytes: &[u8]) -> Result<bool> {
    Ok(metadata(path, bytes)?.contains_key(META_MODEL))
}

/// Loads the weights and buffers of `path` into `model`, strictly by name and shape: a normlab
/// checkpoint must describe the same architecture; a plain state dict (no normlab metadata,
/// as `safetensors.torch.save_file(model.state_dict(), ...)` writes it) is taken as it is.
pub fn load_weights_into(path: &Path, model: &mut Model) -> Result<()> {
    let bytes = read_safetensors(path)?;
    if has_model_metadata(path, &bytes)? {
        let meta = parse_metadata(path, &metadata(path, &bytes)?)?;
        if meta.spec != model.spec {
            return Err(Error::checkpoint(
                path,
                format!(
                    "holds {} ({}, input {:?}), the run trains {} ({}, input {:?})",
                    meta.spec.model,
                    meta.spec.norm,
                    meta.spec.input,
                    model.spec.model,
                    model.spec.norm,
                    model.spec.input
                ),
            ));
        }
    }
    load_state_dict(path, &bytes, model)
}

/// A model of architecture `spec` with the weights of a plain state dict (or of a normlab
/// checkpoint of the same architecture).
pub fn load_foreign(path: &Path, spec: &ModelSpec) -> Result<Model> {
    let bytes = read_safetensors(path)?;
    // The spec comes from the user's flags (bounded by the model limits), so the strict load
    // names the first tensor that does not fit rather than a size check.
    let mut model = Model::build(spec, 0)?;
    load_state_dict(path, &bytes, &mut model)?;
    Ok(model)
}

/// Builds the model of an untrusted spec once its parameters can fit in a file of
/// `file_bytes` bytes (4 bytes each) and the spec passes the model limits.
pub fn build_checked(path: &Path, spec: &ModelSpec, file_bytes: usize) -> Result<Model> {
    let params = spec
        .parameter_count()
        .map_err(|e| Error::checkpoint(path, e.to_string()))?;
    if params.saturating_mul(4) > file_bytes {
        return Err(Error::checkpoint(
            path,
            format!(
                "its metadata describes {} ({} parameters), more than the file's {file_bytes} bytes can hold",
                spec.model, params
            ),
        ));
    }
    Model::build(spec, 0).map_err(|e| Error::checkpoint(path, e.to_string()))
}

#[cfg(test)]
mod canonical_tests {
    use super::*;

    /// A run folder given where a model file belongs: one line naming the file to pass, and
    /// no command's flag (the library's callers spell it differently).
    #[test]
    fn a_folder_is_refused_with_the_model_file_to_pass() {
        let dir = std::env::temp_dir().join(format!("normlab-folder-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        crate::files::write_atomic(&dir.join("model.safetensors"), b"").unwrap();
        let err = load_model(&dir).err().expect("a folder must be refused").to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            err.contains("is a folder") && err.contains("model.safetensors?"),
            "{err}"
        );
        assert!(!err.contains("--"), "{err}");
    }

    #[test]
    fn the_same_tensors_and_metadata_make_the_same_file() {
        let entries = [
            Entry::f32("b.weight".into(), &[2], &[1.0, 2.0]),
            Entry::i64("a.count".into(), 7),
        ];
        let files: Vec<Vec<u8>> = (0..8)
            .map(|_| {
                // Each HashMap has its own random order.
                let md: HashMap<String, String> = (0..12).map(|k| (format!("key{k}"), k.to_string())).collect();
                serialize(&entries, md).unwrap()
            })
            .collect();
        assert!(
            files.windows(2).all(|w| w[0] == w[1]),
            "the file depends on the metadata's order"
        );
        let st = SafeTensors::deserialize(&files[0]).unwrap();
        assert_eq!(
            st.tensor("b.weight").unwrap().data(),
            [1.0f32.to_le_bytes(), 2.0f32.to_le_bytes()].concat()
        );
        assert_eq!(files[0][8..].len() % 8, 0);
    }
}
