//! Backward in eval mode against PyTorch's autograd (float64 references on float32 inputs):
//! every spec, with running statistics (constants: dx = dy·γ/√(rv + eps)) and without (batch
//! statistics in eval too, so the training backward), through `normlab layer --eval`'s code
//! path. The buffers never change in eval mode.

mod common;

use std::path::Path;

use common::{assert_close, assert_close_scaled, layer_inputs, layer_outputs, serialize_run, Golden};
use serde_json::Value;

#[test]
fn eval_mode_backward_matches_pytorch_for_every_spec() {
    let g = Golden::open("eval_backward.safetensors");
    let cases: Vec<Value> = serde_json::from_str(&g.metadata()["cases"]).unwrap();
    let bytes = std::fs::read(common::golden_path("eval_backward.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names: Vec<&str> = st.names().into_iter().map(|s| s.as_str()).collect();
    assert!(cases.len() >= 20);
    for (i, case) in cases.iter().enumerate() {
        let spec = case["spec"].as_str().unwrap();
        let what = format!("case {i} {spec} {:?}", case["shape"]);
        let input = layer_inputs(&g, &names, &format!("case{i}.in."), &[]);
        let out = serialize_run(spec, Path::new("golden"), &input, true).unwrap_or_else(|e| panic!("{what}: {e}"));
        let got = layer_outputs(&out);
        let dy_scale = g.tensor(&format!("case{i}.in.dy")).max_abs();
        for key in ["y", "dx", "dweight", "dbias"] {
            let golden_key = format!("case{i}.out.{key}");
            if !g.has(&golden_key) {
                assert!(!got.contains_key(key), "{what}: normlab wrote {key}, PyTorch has none");
                continue;
            }
            let t = got.get(key).unwrap_or_else(|| panic!("{what}: no {key}"));
            let want = g.tensor(&golden_key).data;
            if key == "y" {
                assert_close(&format!("{what} {key}"), t, &want, 1e-5);
            } else {
                assert_close_scaled(&format!("{what} {key}"), t, &want, 1e-4, dy_scale);
            }
        }
        // Running statistics are inputs only: returned bit for bit.
        for key in ["running_mean", "running_var", "running_scale"] {
            let golden_key = format!("case{i}.in.{key}");
            if g.has(&golden_key) {
                assert_eq!(
                    got[key],
                    g.tensor(&golden_key).data,
                    "{what}: {key} changed in eval mode"
                );
            }
        }
    }
}
