//! Helpers shared by the integration tests: golden files and tolerance checks.
#![allow(dead_code)]

pub mod cli;

use std::collections::HashMap;
use std::path::PathBuf;

use normlab::Tensor;
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

pub fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/goldens")
        .join(name)
}

/// A golden file written by scripts/make_goldens.py.
pub struct Golden {
    bytes: Vec<u8>,
}

impl Golden {
    pub fn open(name: &str) -> Golden {
        let path = golden_path(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Golden { bytes }
    }

    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("golden parses")
    }

    pub fn metadata(&self) -> HashMap<String, String> {
        let (_, md) = SafeTensors::read_metadata(&self.bytes).expect("golden header");
        md.metadata().clone().unwrap_or_default()
    }

    /// Every tensor name in the file.
    pub fn names(&self) -> Vec<String> {
        self.st().names().into_iter().cloned().collect()
    }

    pub fn has(&self, key: &str) -> bool {
        self.st().tensor(key).is_ok()
    }

    /// An F32 tensor (F64 is narrowed).
    pub fn tensor(&self, key: &str) -> Tensor {
        let st = self.st();
        let t = st.tensor(key).unwrap_or_else(|_| panic!("golden has no {key}"));
        let data: Vec<f32> = match t.dtype() {
            Dtype::F32 => t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            Dtype::F64 => t
                .data()
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32)
                .collect(),
            d => panic!("{key}: unexpected dtype {d:?}"),
        };
        Tensor {
            shape: t.shape().to_vec(),
            data,
        }
    }

    pub fn f64s(&self, key: &str) -> Vec<f64> {
        let st = self.st();
        let t = st.tensor(key).unwrap();
        assert_eq!(t.dtype(), Dtype::F64);
        t.data()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    pub fn i64s(&self, key: &str) -> Vec<i64> {
        let st = self.st();
        let t = st.tensor(key).unwrap();
        assert_eq!(t.dtype(), Dtype::I64);
        t.data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
}

/// max|got - want| <= rel * max(1e-6, max|want|): the tolerance relative to the largest magnitude.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f32) {
    assert_close_scaled(what, got, want, rel, 1e-6);
}

/// As `assert_close`, with the scale at least `floor`: for a result that is analytically zero
/// (dx of a batch of two), the natural scale is the incoming gradient's, not the noise's.
pub fn assert_close_scaled(what: &str, got: &[f32], want: &[f32], rel: f32, floor: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length {} vs {}", got.len(), want.len());
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(floor);
    let (mut worst, mut at) = (0.0f32, 0);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        if d > worst || d.is_nan() {
            worst = d;
            at = i;
        }
    }
    assert!(
        worst <= rel * scale,
        "{what}: max |diff| {worst:e} at {at} (got {}, want {}) exceeds {rel:e} x {scale:e}",
        got[at],
        want[at]
    );
}

// Cases of the layer goldens, through `normlab layer`'s code path.

/// The case's tensors under `prefix`, renamed to the conformance names, as safetensors bytes.
pub fn layer_inputs(g: &Golden, names: &[&str], prefix: &str, rename: &[(&str, &str)]) -> Vec<u8> {
    let mut entries = Vec::new();
    for name in names {
        let Some(local) = name.strip_prefix(prefix) else {
            continue;
        };
        let local = rename
            .iter()
            .find(|(from, _)| *from == local)
            .map_or(local, |(_, to)| *to);
        if local == "num_batches_tracked" {
            entries.push(normlab::checkpoint::Entry::i64(local.into(), g.i64s(name)[0]));
        } else {
            let t = g.tensor(name);
            entries.push(normlab::checkpoint::Entry::f32(local.into(), &t.shape, &t.data));
        }
    }
    normlab::checkpoint::serialize(&entries, HashMap::new()).unwrap()
}

pub fn layer_outputs(bytes: &[u8]) -> HashMap<String, Vec<f32>> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    st.tensors()
        .into_iter()
        .filter(|(_, t)| t.dtype() == Dtype::F32)
        .map(|(n, t)| {
            (
                n,
                t.data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
            )
        })
        .collect()
}

pub fn serialize_run(spec: &str, path: &std::path::Path, input: &[u8], eval: bool) -> normlab::Result<Vec<u8>> {
    let parsed = normlab::conformance::LayerInputs::parse(path, input)?;
    normlab::checkpoint::serialize(
        &normlab::conformance::run_layer(spec.parse()?, &parsed, eval)?,
        HashMap::new(),
    )
}

/// Sets a model's parameters and buffers to a golden's `{prefix}.{name}` tensors.
pub fn load_state(model: &mut normlab::models::Model, g: &Golden, prefix: &str) {
    for (name, p) in model.net.named_params() {
        p.value = g.tensor(&format!("{prefix}.{name}"));
    }
    for (name, b) in model.net.named_buffers() {
        match b {
            normlab::nn::BufferMut::F32(t) => *t = g.tensor(&format!("{prefix}.{name}")),
            normlab::nn::BufferMut::I64(v) => *v = g.i64s(&format!("{prefix}.{name}"))[0],
        }
    }
}

/// One step's forward and backward on batch `s` of a golden (`x{s}`, `y{s}`), gradients
/// zeroed first: returns the cross-entropy loss.
pub fn golden_step(model: &mut normlab::models::Model, g: &Golden, s: usize) -> f64 {
    let y: Vec<u8> = g.i64s(&format!("y{s}")).iter().map(|&v| v as u8).collect();
    model.net.zero_grad();
    *model.input_mut() = g.tensor(&format!("x{s}"));
    model.forward(normlab::nn::Mode::Train).unwrap();
    let (logits, dlogits) = model.net.output_and_grad();
    dlogits.resize_to(&logits.shape).unwrap();
    let (loss, _) = normlab::kernels::loss::softmax_cross_entropy(&logits.data, &y, 10, &mut dlogits.data);
    model.backward().unwrap();
    loss
}
