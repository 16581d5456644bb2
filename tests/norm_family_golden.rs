//! Every normalization spec against its reference, through `normlab layer`'s code path:
//! PyTorch modules (GroupNorm, both LayerNorms, InstanceNorm, BatchNorm) computed in float64 on
//! float32 inputs, and torch-autograd transcriptions of Batch Renorm and Lp-norm BN. Includes
//! N=1, H=W=1, channel counts that are not multiples of 8, large offsets (mean 1e4 with std
//! 1e-2; mean 1e6 with std 1) and a constant channel.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{
    assert_close, assert_close_scaled, layer_inputs as inputs, layer_outputs as outputs, serialize_run, Golden,
};
use normlab::checkpoint::{serialize, Entry};
use serde_json::Value;

#[test]
fn every_spec_matches_its_reference() {
    let g = Golden::open("norm_family.safetensors");
    let cases: Vec<Value> = serde_json::from_str(&g.metadata()["cases"]).unwrap();
    let bytes = std::fs::read(common::golden_path("norm_family.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names: Vec<&str> = st.names().into_iter().map(|s| s.as_str()).collect();
    let path = Path::new("golden");
    assert!(cases.len() >= 40);
    for (i, case) in cases.iter().enumerate() {
        let spec = case["spec"].as_str().unwrap();
        let what = format!("case {i} {spec} {:?}", case["shape"]);
        let input = inputs(&g, &names, &format!("case{i}.in."), &[]);
        let out = serialize_run(spec, path, &input, false).unwrap_or_else(|e| panic!("{what}: {e}"));
        let got = outputs(&out);
        let want = |k: &str| g.tensor(&format!("case{i}.out.{k}")).data;
        let dy_scale = g.tensor(&format!("case{i}.in.dy")).max_abs();
        for key in [
            "y",
            "dx",
            "dweight",
            "dbias",
            "running_mean",
            "running_var",
            "running_scale",
        ] {
            let golden_key = format!("case{i}.out.{key}");
            if !g.has(&golden_key) {
                assert!(
                    !got.contains_key(key) || key == "dx",
                    "{what}: normlab wrote {key}, the reference has none"
                );
                continue;
            }
            let tensor = got.get(key).unwrap_or_else(|| panic!("{what}: no {key} in the output"));
            assert!(tensor.iter().all(|v| v.is_finite()), "{what}: {key} is not finite");
            match key {
                "y" | "running_mean" | "running_var" | "running_scale" => {
                    assert_close(&format!("{what} {key}"), tensor, &want(key), 1e-5)
                }
                _ => assert_close_scaled(&format!("{what} {key}"), tensor, &want(key), 1e-4, dy_scale),
            }
        }
        if case["eval"].as_bool().unwrap() {
            // Eval forward with the updated buffers on fresh data.
            let mut entries = vec![];
            let xe = g.tensor(&format!("case{i}.eval.x"));
            entries.push(Entry::f32("x".into(), &xe.shape, &xe.data));
            for key in ["weight", "bias"] {
                if g.has(&format!("case{i}.in.{key}")) {
                    let t = g.tensor(&format!("case{i}.in.{key}"));
                    entries.push(Entry::f32(key.into(), &t.shape, &t.data));
                }
            }
            for key in ["running_mean", "running_var"] {
                if let Some(v) = got.get(key) {
                    entries.push(Entry::f32(key.into(), &[v.len()], v));
                }
            }
            let input = serialize(&entries, HashMap::new()).unwrap();
            let out = serialize_run(spec, path, &input, true).unwrap();
            let ye = outputs(&out);
            assert_close(
                &format!("{what} y_eval"),
                &ye["y"],
                &g.tensor(&format!("case{i}.eval.y")).data,
                1e-5,
            );
        }
    }
}

#[test]
fn ghost_batch_norm_is_batch_norm_on_each_virtual_batch() {
    use normlab::nn::batch_norm::{BatchNorm, BatchNormConfig, BatchStats};
    use normlab::nn::layer::{backward_once, forward_once};
    use normlab::nn::{Layer, Mode};
    use normlab::Tensor;
    let (n, c, h, w, v) = (8, 3, 4, 4, 2);
    let x: Vec<f32> = (0..n * c * h * w)
        .map(|i| ((i * 37 % 101) as f32 * 0.13).sin() * 2.0 + 0.5)
        .collect();
    let dy: Vec<f32> = (0..n * c * h * w)
        .map(|i| ((i * 53 % 97) as f32 * 0.29).cos())
        .collect();
    let ghost_cfg = BatchNormConfig {
        stats: BatchStats::Ghost(v),
        ..Default::default()
    };
    let mut ghost = BatchNorm::new(2, c, ghost_cfg);
    for (_, p) in ghost.params() {
        p.value
            .data
            .iter_mut()
            .enumerate()
            .for_each(|(i, g)| *g += 0.1 * i as f32);
    }
    let gamma = ghost.weight.as_ref().unwrap().value.clone();
    let beta = ghost.bias.as_ref().unwrap().value.clone();
    let xt = Tensor::from_vec(&[n, c, h, w], x.clone()).unwrap();
    let y = forward_once(&mut ghost, &xt, Mode::Train).unwrap();
    let dx = backward_once(
        &mut ghost,
        &xt,
        &y,
        &Tensor::from_vec(&[n, c, h, w], dy.clone()).unwrap(),
    )
    .unwrap();
    let block = v * c * h * w;
    let (mut dgamma, mut dbeta) = (vec![0.0f32; c], vec![0.0f32; c]);
    let (mut mean_rm, mut mean_rv) = (vec![0.0f32; c], vec![0.0f32; c]);
    for j in 0..n / v {
        let mut bn = BatchNorm::new(2, c, BatchNormConfig::default());
        bn.weight.as_mut().unwrap().value = gamma.clone();
        bn.bias.as_mut().unwrap().value = beta.clone();
        let xs = Tensor::from_vec(&[v, c, h, w], x[j * block..(j + 1) * block].to_vec()).unwrap();
        let ys = forward_once(&mut bn, &xs, Mode::Train).unwrap();
        assert_close(
            &format!("ghost y, virtual batch {j}"),
            &y.data[j * block..(j + 1) * block],
            &ys.data,
            1e-6,
        );
        let ds = Tensor::from_vec(&[v, c, h, w], dy[j * block..(j + 1) * block].to_vec()).unwrap();
        let dxs = backward_once(&mut bn, &xs, &ys, &ds).unwrap();
        assert_close(
            &format!("ghost dx, virtual batch {j}"),
            &dx.data[j * block..(j + 1) * block],
            &dxs.data,
            1e-5,
        );
        for ch in 0..c {
            dgamma[ch] += bn.weight.as_ref().unwrap().grad.data[ch];
            dbeta[ch] += bn.bias.as_ref().unwrap().grad.data[ch];
            mean_rm[ch] += bn.running_mean.as_ref().unwrap().data[ch] / (n / v) as f32;
            mean_rv[ch] += bn.running_var.as_ref().unwrap().data[ch] / (n / v) as f32;
        }
    }
    assert_close("ghost dgamma", &ghost.weight.as_ref().unwrap().grad.data, &dgamma, 1e-5);
    assert_close("ghost dbeta", &ghost.bias.as_ref().unwrap().grad.data, &dbeta, 1e-5);
    // One running update per step with the virtual batches' statistics averaged (Keras).
    assert_close(
        "ghost running_mean",
        &ghost.running_mean.as_ref().unwrap().data,
        &mean_rm,
        1e-5,
    );
    assert_close(
        "ghost running_var",
        &ghost.running_var.as_ref().unwrap().data,
        &mean_rv,
        1e-5,
    );
    assert_eq!(ghost.num_batches_tracked, 1);
    // A virtual batch that does not divide the batch is an error naming both.
    let mut bad = BatchNorm::new(
        2,
        c,
        BatchNormConfig {
            stats: BatchStats::Ghost(3),
            ..Default::default()
        },
    );
    let err = forward_once(&mut bad, &Tensor::zeros(&[8, c, 2, 2]), Mode::Train)
        .unwrap_err()
        .to_string();
    assert!(err.contains("virtual batch 3") && err.contains("8"), "{err}");
}

#[test]
fn a_constant_channel_or_group_gives_beta_and_finite_gradients() {
    use normlab::nn::layer::{backward_once, forward_once};
    use normlab::nn::norm_spec::{NormSpec, CATALOG};
    use normlab::nn::Mode;
    use normlab::Tensor;
    // bn-noisy adds random scale and shift on purpose, so its output is s·β + m, not β;
    // bn-shared exists only inside the LSTM (tests/lstm_golden.rs).
    for (spec, _) in CATALOG
        .iter()
        .filter(|(s, _)| !["none", "bn-noisy", "bn-shared"].contains(s))
    {
        let spec = match *spec {
            "gn:G" => "gn:2",
            "ghost:V" => "ghost:2",
            "in" => "in:affine=true",
            s => s,
        };
        let norm: NormSpec = spec.parse().unwrap();
        let mut layer = norm.build(&[4, 3, 3], "test", true).unwrap().unwrap();
        for (key, p) in layer.params() {
            let fill = if key == "bias" { 0.25 } else { 1.5 };
            p.value.data.fill(fill);
        }
        let x = Tensor::full(&[4, 4, 3, 3], 1234.5);
        let y = forward_once(layer.as_mut(), &x, Mode::Train).unwrap();
        // RMSNorm does not centre and has no β: a constant input gives x/|x|·γ.
        let want = if spec == "rms" { 1.5 } else { 0.25 };
        assert!(
            y.data.iter().all(|&v| (v - want).abs() < 1e-6),
            "{spec}: y = {want} on constant input"
        );
        let dx = backward_once(layer.as_mut(), &x, &y, &Tensor::full(&[4, 4, 3, 3], 0.5)).unwrap();
        assert!(dx.data.iter().all(|v| v.is_finite()), "{spec}: finite dx");
        for (key, p) in layer.params() {
            assert!(p.grad.data.iter().all(|v| v.is_finite()), "{spec}: finite d{key}");
        }
    }
}
