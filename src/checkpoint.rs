//! Checkpoints as safetensors under PyTorch state-dict names and layouts, written atomically.
//! The metadata records the model spec and input normalization so a file rebuilds its model.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

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

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so a
/// reader sees the old file or the new one, never half of one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp: PathBuf = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// An error when writing `out` would replace `input` (compared after resolving the paths), so
/// a command never overwrites the checkpoint it reads.
pub fn refuse_overwrite(out: &Path, input: &Path) -> Result<()> {
    let same = match (out.canonicalize(), input.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => out == input,
    };
    if same {
        return Err(Error::invalid(
            "--out would overwrite the input checkpoint; choose another folder",
        ));
    }
    Ok(())
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
    safetensors::serialize(views, &Some(metadata)).map_err(|e| Error::invalid(format!("safetensors: {e}")))
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

pub fn save_model(path: &Path, model: &mut Model, meta: &CheckpointMeta) -> Result<()> {
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
    let bytes = serialize(&state_dict(model), md)?;
    write_atomic(path, &bytes)
}

/// Reads a file and parses its safetensors header, with errors naming the file.
pub fn read_safetensors(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
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
    Ok(t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect())
}

fn tensor_i64(path: &Path, st: &SafeTensors, name: &str) -> Result<i64> {
    let t = st
        .tensor(name)
        .map_err(|_| Error::checkpoint(path, format!("missing tensor '{name}'")))?;
    if t.dtype() != Dtype::I64 || t.data().len() != 8 {
        return Err(Error::checkpoint(path, format!("tensor '{name}' must be a scalar I64")));
    }
    Ok(i64::from_le_bytes(t.data().try_into().expect("8 bytes")))
}

/// Copies every state-dict entry from the file into `model`; like PyTorch's strict loading,
/// a missing, extra, or differently shaped tensor is an error.
pub fn load_state_dict(path: &Path, bytes: &[u8], model: &mut Model) -> Result<()> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::checkpoint(path, format!("not a readable safetensors file ({e})")))?;
    let mut expected = Vec::new();
    for (name, p) in model.net.named_params() {
        p.value.data = tensor_f32(path, &st, &name, &p.value.shape)?;
        expected.push(name);
    }
    for (name, b) in model.net.named_buffers() {
        match b {
            BufferMut::F32(t) => t.data = tensor_f32(path, &st, &name, &t.shape)?,
            BufferMut::I64(v) => *v = tensor_i64(path, &st, &name)?,
        }
        expected.push(name);
    }
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

/// Rebuilds the model a checkpoint describes and loads its weights and buffers.
pub fn load_model(path: &Path) -> Result<(Model, CheckpointMeta)> {
    let bytes = read_safetensors(path)?;
    let md = metadata(path, &bytes)?;
    let get = |key: &str| {
        md.get(key)
            .ok_or_else(|| Error::checkpoint(path, format!("metadata has no '{key}' (not written by normlab train?)")))
    };
    let spec: ModelSpec = serde_json::from_str(get(META_MODEL)?)
        .map_err(|e| Error::checkpoint(path, format!("bad '{META_MODEL}' metadata: {e}")))?;
    let input_norm: InputNorm = serde_json::from_str(get(META_INPUT_NORM)?)
        .map_err(|e| Error::checkpoint(path, format!("bad '{META_INPUT_NORM}' metadata: {e}")))?;
    let epoch = get(META_EPOCH)?
        .parse()
        .map_err(|_| Error::checkpoint(path, format!("bad '{META_EPOCH}' metadata")))?;
    let mut model = Model::build(&spec, 0).map_err(|e| Error::checkpoint(path, e.to_string()))?;
    load_state_dict(path, &bytes, &mut model)?;
    Ok((
        model,
        CheckpointMeta {
            spec,
            input_norm,
            epoch,
        },
    ))
}
