//! Any `--norm` spec through the engine's own layer, as `normlab layer` runs it on a file.

use numpy::{IntoPyArray, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::*;

/// One normlab layer from a `--norm` spec on arrays, as `normlab layer` runs it on a file: `x`,
/// optionally `dy`, `weight`, `bias`, `running_mean`, `running_var` (float32 arrays) and
/// `num_batches_tracked` (int). Returns `y`, with `dy` also `dx`, `dweight`, `dbias`, and the
/// buffers after the call.
#[pyfunction]
#[pyo3(signature = (spec, tensors, training=true))]
fn norm_layer<'py>(
    py: Python<'py>,
    spec: &str,
    tensors: &Bound<'py, PyDict>,
    training: bool,
) -> PyResult<Bound<'py, PyDict>> {
    crate::start_pool(None)?;
    let norm: normlab::nn::norm_spec::NormSpec = spec.parse().map_err(crate::to_py)?;
    let mut inputs = normlab::conformance::NamedTensors::default();
    for (k, v) in tensors.iter() {
        let key: String = k.extract()?;
        if v.is_none() {
            continue;
        }
        if key == "num_batches_tracked" {
            inputs.i64.insert(key, v.extract::<i64>()?);
            continue;
        }
        let a: PyReadonlyArrayDyn<f32> = v
            .extract()
            .map_err(|_| bad(format!("'{key}' must be a float32 numpy array")))?;
        let t = normlab::tensor::Tensor {
            shape: a.shape().to_vec(),
            data: a.as_array().iter().copied().collect(),
        };
        inputs.f32.insert(key, t);
    }
    let entries = py
        .detach(|| normlab::conformance::run_layer(norm, &inputs, !training))
        .map_err(crate::to_py)?;
    let out = PyDict::new(py);
    for e in entries {
        match e.dtype {
            safetensors::Dtype::I64 => {
                let v = i64::from_le_bytes(e.bytes[..8].try_into().expect("8 bytes"));
                out.set_item(&e.name, v)?;
            }
            _ => {
                let data: Vec<f32> = normlab::checkpoint::le_f32s(&e.bytes).collect();
                let a: Bound<'py, PyArrayDyn<f32>> = data.into_pyarray(py).reshape(e.shape.clone())?;
                out.set_item(&e.name, a)?;
            }
        }
    }
    Ok(out)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(norm_layer, m)?)?;
    Ok(())
}
