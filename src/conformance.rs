//! `normlab layer`: run one normalization layer on tensors from a safetensors file, so anyone
//! can compare normlab with another framework on their own data. The golden tests use it too.

use std::path::Path;

use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

use crate::checkpoint::{self, Entry};
use crate::error::{Error, Result};
use crate::nn::layer::{backward_once, forward_once};
use crate::nn::norm_spec::NormSpec;
use crate::nn::{BufferMut, Mode};
use crate::tensor::Tensor;

/// Where a layer's input tensors come from, by name: `x`, and optionally `dy`, `weight`,
/// `bias` and the buffers (a safetensors file for `normlab layer`, arrays in memory for the
/// Python API).
pub trait TensorSource {
    fn f32(&self, name: &str) -> Result<Option<Tensor>>;
    fn i64(&self, name: &str) -> Result<Option<i64>>;
    /// An error about the inputs, naming where they came from.
    fn error(&self, message: String) -> Error;
}

/// Input tensors held in memory.
#[derive(Default)]
pub struct NamedTensors {
    pub f32: std::collections::HashMap<String, Tensor>,
    pub i64: std::collections::HashMap<String, i64>,
}

impl TensorSource for NamedTensors {
    fn f32(&self, name: &str) -> Result<Option<Tensor>> {
        Ok(self.f32.get(name).cloned())
    }
    fn i64(&self, name: &str) -> Result<Option<i64>> {
        Ok(self.i64.get(name).copied())
    }
    fn error(&self, message: String) -> Error {
        Error::invalid(message)
    }
}

/// Input tensors from a safetensors file.
pub struct LayerInputs<'a> {
    path: &'a Path,
    st: SafeTensors<'a>,
}

impl<'a> LayerInputs<'a> {
    pub fn parse(path: &'a Path, bytes: &'a [u8]) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| Error::checkpoint(path, format!("not a readable safetensors file ({e})")))?;
        Ok(LayerInputs { path, st })
    }
}

impl TensorSource for LayerInputs<'_> {
    fn error(&self, message: String) -> Error {
        Error::checkpoint(self.path, message)
    }

    fn f32(&self, name: &str) -> Result<Option<Tensor>> {
        let Ok(t) = self.st.tensor(name) else { return Ok(None) };
        if t.dtype() != Dtype::F32 {
            return Err(Error::checkpoint(
                self.path,
                format!("tensor '{name}' is {:?}, expected F32", t.dtype()),
            ));
        }
        let data = checkpoint::le_f32s(t.data()).collect();
        Ok(Some(Tensor {
            shape: t.shape().to_vec(),
            data,
        }))
    }

    fn i64(&self, name: &str) -> Result<Option<i64>> {
        let Ok(t) = self.st.tensor(name) else { return Ok(None) };
        match <[u8; 8]>::try_from(t.data()) {
            Ok(b) if t.dtype() == Dtype::I64 => Ok(Some(i64::from_le_bytes(b))),
            _ => Err(Error::checkpoint(
                self.path,
                format!("tensor '{name}' must be a scalar I64"),
            )),
        }
    }
}

/// Runs the layer `spec` once: forward in train mode (or eval with `eval`), then backward when
/// `dy` is given: in eval mode the backward of the eval-mode layer, as PyTorch's autograd
/// gives it (running statistics are constants; a norm without them uses batch statistics in
/// eval too, so its backward is the training one). Returns `y`, `dx`, `dweight`, `dbias` and
/// the buffers (unchanged in eval mode).
pub fn run_layer(norm: NormSpec, inputs: &dyn TensorSource, eval: bool) -> Result<Vec<Entry>> {
    let x = inputs
        .f32("x")?
        .ok_or_else(|| inputs.error("has no tensor 'x' (the layer input)".into()))?;
    if !(2..=4).contains(&x.shape.len()) || x.shape.contains(&0) {
        return Err(inputs.error(format!(
            "'x' must be [N, C], [N, C, L] or [N, C, H, W], got {:?}",
            x.shape
        )));
    }
    if x.data.iter().any(|v| !v.is_finite()) {
        return Err(inputs.error("'x' holds NaN or infinite values".into()));
    }
    let dy = inputs.f32("dy")?;
    if let Some(dy) = &dy {
        if dy.shape != x.shape {
            return Err(inputs.error(format!("'dy' has shape {:?}, 'x' has {:?}", dy.shape, x.shape)));
        }
    }
    let mut layer = norm
        .build(&x.shape[1..], "layer", false)?
        .ok_or_else(|| Error::invalid("spec 'none' has no layer to run"))?;
    for (key, p) in layer.params() {
        if let Some(t) = inputs.f32(key)? {
            if t.shape != p.value.shape {
                return Err(inputs.error(format!(
                    "'{key}' has shape {:?}, the layer expects {:?}",
                    t.shape, p.value.shape
                )));
            }
            p.value = t;
        }
    }
    for (key, b) in layer.buffers() {
        match b {
            BufferMut::F32(t) => {
                if let Some(v) = inputs.f32(key)? {
                    if v.shape != t.shape {
                        return Err(inputs.error(format!(
                            "'{key}' has shape {:?}, the layer expects {:?}",
                            v.shape, t.shape
                        )));
                    }
                    *t = v;
                }
            }
            BufferMut::I64(v) => {
                if let Some(n) = inputs.i64(key)? {
                    *v = n;
                }
            }
        }
    }
    let mode = if eval { Mode::Eval } else { Mode::Train };
    let y = forward_once(layer.as_mut(), &x, mode)?;
    let mut out = vec![Entry::f32("y".into(), &y.shape, &y.data)];
    if let Some(dy) = dy {
        let dx = backward_once(layer.as_mut(), &x, &y, &dy)?;
        out.push(Entry::f32("dx".into(), &dx.shape, &dx.data));
        for (key, p) in layer.params() {
            out.push(Entry::f32(format!("d{key}"), &p.grad.shape, &p.grad.data));
        }
    }
    for (key, b) in layer.buffers() {
        out.push(match b {
            BufferMut::F32(t) => Entry::f32(key.to_string(), &t.shape, &t.data),
            BufferMut::I64(v) => Entry::i64(key.to_string(), *v),
        });
    }
    Ok(out)
}

/// The whole command: read `input`, run, write `output` atomically.
pub fn layer_command(spec: NormSpec, input: &Path, output: &Path, eval: bool) -> Result<usize> {
    let bytes = crate::files::read_limited(input, checkpoint::FILE_LIMIT, "safetensors")?;
    let inputs = LayerInputs::parse(input, &bytes)?;
    let entries = run_layer(spec, &inputs, eval)?;
    // Sums of squares run in f32 lanes: finite inputs beyond about 1e19 in magnitude overflow
    // them. Say so instead of writing NaN.
    if all_finite(&bytes)
        && entries
            .iter()
            .any(|e| e.dtype == safetensors::Dtype::F32 && !finite(&e.bytes))
    {
        return Err(Error::invalid(format!(
            "{}: the inputs are finite but the outputs are not: their statistics overflow f32 \
             (normlab sums squares in f32 within a run, so |x| must stay below about 1e19); scale the input down",
            input.display()
        )));
    }
    let mut md = std::collections::HashMap::new();
    md.insert("normlab.spec".to_string(), spec.to_string());
    crate::files::write_atomic(output, &checkpoint::serialize(&entries, md)?)?;
    Ok(entries.len())
}

fn finite(bytes: &[u8]) -> bool {
    checkpoint::le_f32s(bytes).all(f32::is_finite)
}

/// Every F32 tensor of a safetensors file is finite.
fn all_finite(file: &[u8]) -> bool {
    safetensors::SafeTensors::deserialize(file).is_ok_and(|st| {
        st.tensors()
            .iter()
            .all(|(_, t)| t.dtype() != safetensors::Dtype::F32 || finite(t.data()))
    })
}
