//! BatchNorm in practice: frozen BN while training, exact population statistics, evaluation
//! with batch statistics, and weights saved by PyTorch without normlab's metadata.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::cli::*;

fn trained(t: &tempfile::TempDir) -> (PathBuf, PathBuf) {
    trained_run(t, 96, 40, "16")
}

fn tensor_map(p: &Path) -> HashMap<String, Vec<u8>> {
    tensors(p).into_iter().collect()
}

#[test]
fn frozen_bn_keeps_its_statistics_and_all_keeps_gamma_and_beta() {
    let t = tmp();
    let (data, run) = trained(&t);
    let (d, start) = (s(&data), run.join("model.safetensors"));
    let before = tensor_map(&start);
    for (mode, affine_frozen) in [("stats", false), ("all", true)] {
        let out = t.path().join(format!("frozen-{mode}"));
        ok(&[
            "train",
            "--data",
            d,
            "--out",
            s(&out),
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--init-from",
            s(&start),
            "--freeze-bn",
            mode,
            "--optimizer",
            "sgd",
            "--lr",
            "0.1",
            "--weight-decay",
            "0.1",
        ]);
        // --resume keeps the run frozen.
        ok(&["train", "--resume", s(&out), "--epochs", "2"]);
        let after = tensor_map(&out.join("model.safetensors"));
        for key in ["bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked"] {
            assert_eq!(after[key], before[key], "{mode}: {key} changed");
        }
        for key in ["bn1.weight", "bn1.bias"] {
            assert_eq!(after[key] == before[key], affine_frozen, "{mode}: {key}");
        }
        assert_ne!(after["conv1.weight"], before["conv1.weight"], "{mode}: the conv trains");
    }
    // A model without BatchNorm, nothing written.
    let out = t.path().join("gn");
    let err = fails(&[
        "train",
        "--data",
        d,
        "--out",
        s(&out),
        "--norm",
        "gn:4",
        "--freeze-bn",
        "stats",
    ]);
    assert!(err.contains("no BatchNorm with running statistics"), "{err}");
    assert!(!out.exists());
}

#[test]
fn frozen_bn_in_training_is_the_eval_mode_layer() {
    use normlab::nn::layer::{backward_once, forward_once};
    use normlab::nn::norm_spec::NormSpec;
    use normlab::nn::{Mode, StatsMode};
    use normlab::Tensor;
    let (n, c, h, w) = (4, 3, 5, 5);
    let x = Tensor::from_vec(
        &[n, c, h, w],
        (0..n * c * h * w).map(|i| ((i * 37) % 11) as f32 * 0.3 - 1.2).collect(),
    )
    .unwrap();
    let dy = Tensor::from_vec(
        &[n, c, h, w],
        (0..n * c * h * w).map(|i| ((i * 13) % 7) as f32 * 0.2 - 0.5).collect(),
    )
    .unwrap();
    for spec in ["bn", "brn", "ghost:2", "bn-l1", "bn-noisy", "in:affine=true,track=true"] {
        let norm: NormSpec = spec.parse().unwrap();
        let make = || {
            let mut l = norm.build(&[c, h, w], "t", true).unwrap().unwrap();
            for (_, b) in l.buffers() {
                if let normlab::nn::BufferMut::F32(t) = b {
                    t.data
                        .iter_mut()
                        .enumerate()
                        .for_each(|(i, v)| *v = 0.7 + 0.1 * i as f32);
                }
            }
            l
        };
        let (mut eval, mut frozen) = (make(), make());
        frozen.set_stats_mode(StatsMode::Frozen { affine: false });
        let ye = forward_once(eval.as_mut(), &x, Mode::Eval).unwrap();
        let yf = forward_once(frozen.as_mut(), &x, Mode::Train).unwrap();
        assert_eq!(ye.data, yf.data, "{spec}: y");
        let dxe = backward_once(eval.as_mut(), &x, &ye, &dy).unwrap();
        let dxf = backward_once(frozen.as_mut(), &x, &yf, &dy).unwrap();
        assert_eq!(dxe.data, dxf.data, "{spec}: dx");
        let grads = |l: &mut Box<dyn normlab::nn::Layer>| -> Vec<Vec<f32>> {
            l.params().into_iter().map(|(_, p)| p.grad.data.clone()).collect()
        };
        assert_eq!(grads(&mut eval), grads(&mut frozen), "{spec}: dγ, dβ");
        // And the buffers did not move in a training forward.
        let bufs = |l: &mut Box<dyn normlab::nn::Layer>| -> Vec<Vec<f32>> {
            l.buffers()
                .into_iter()
                .filter_map(|(_, b)| match b {
                    normlab::nn::BufferMut::F32(t) => Some(t.data.clone()),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(bufs(&mut eval), bufs(&mut frozen), "{spec}: buffers");
    }
}

#[test]
fn recalibrate_averages_the_batches_exactly_and_refuses_what_it_cannot_do() {
    let t = tmp();
    let (data, run) = trained(&t);
    let d = s(&data);
    let model = run.join("model.safetensors");
    let out = t.path().join("precise");
    let text = ok(&[
        "recalibrate",
        "--checkpoint",
        s(&model),
        "--data",
        d,
        "--batches",
        "4",
        "--batch-size",
        "16",
        "--out",
        s(&out),
    ]);
    assert!(text.contains("population statistics"), "{text}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("recalibrate.json")).unwrap()).unwrap();
    assert_eq!(r["norms_updated"], 1);
    ok(&["eval", "--checkpoint", s(&out.join("model.safetensors")), "--data", d]);

    // Exact: running_mean = mean of the 4 batch means of conv1's output, running_var = mean of
    // the 4 unbiased batch variances, num_batches_tracked = 4.
    use normlab::nn::Mode;
    let (mut m, meta) = normlab::checkpoint::load_model(&model).unwrap();
    let train = normlab::data::load_split(&data, true).unwrap();
    let order = normlab::data::epoch_order(train.len(), 0, 0, true);
    let mut labels = Vec::new();
    let c = 32;
    let (mut means, mut vars) = (vec![0.0f64; c], vec![0.0f64; c]);
    for idx in order.chunks_exact(16).take(4) {
        train.batch(idx, meta.input_norm, m.input_mut(), &mut labels).unwrap();
        m.forward(Mode::Eval).unwrap();
        let h = m.net.activation(0).unwrap(); // conv1's output, bn1's input
        let s = h.shape[2] * h.shape[3];
        for ch in 0..c {
            let vals: Vec<f64> = (0..16)
                .flat_map(|i| h.data[(i * c + ch) * s..(i * c + ch + 1) * s].iter().map(|&v| v as f64))
                .collect();
            let mean = vals.iter().sum::<f64>() / vals.len() as f64;
            let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (vals.len() - 1) as f64;
            means[ch] += mean / 4.0;
            vars[ch] += var / 4.0;
        }
    }
    let got = tensor_map(&out.join("model.safetensors"));
    let f = |k: &str| -> Vec<f32> {
        got[k]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    for (ch, (rm, rv)) in f("bn1.running_mean").iter().zip(f("bn1.running_var")).enumerate() {
        assert!(
            (*rm as f64 - means[ch]).abs() <= 1e-5 * (1.0 + means[ch].abs()),
            "mean {ch}: {rm} vs {}",
            means[ch]
        );
        assert!(
            (rv as f64 - vars[ch]).abs() <= 1e-5 * (1.0 + vars[ch]),
            "var {ch}: {rv} vs {}",
            vars[ch]
        );
    }
    assert_eq!(got["bn1.num_batches_tracked"], 4i64.to_le_bytes().to_vec());

    // Bad input: N = 0, more batches than the data holds, a model without running statistics.
    let x = t.path().join("x");
    let err = fails(&[
        "recalibrate",
        "--checkpoint",
        s(&model),
        "--data",
        d,
        "--batches",
        "0",
        "--out",
        s(&x),
    ]);
    assert!(err.contains("--batches"), "{err}");
    let err = fails(&[
        "recalibrate",
        "--checkpoint",
        s(&model),
        "--data",
        d,
        "--batches",
        "100",
        "--out",
        s(&x),
    ]);
    assert!(err.contains("training set has 96"), "{err}");
    let gn = t.path().join("gn");
    ok(&[
        "train",
        "--data",
        d,
        "--out",
        s(&gn),
        "--epochs",
        "1",
        "--norm",
        "gn:4",
        "--batch-size",
        "16",
    ]);
    let err = fails(&[
        "recalibrate",
        "--checkpoint",
        s(&gn.join("model.safetensors")),
        "--data",
        d,
        "--batches",
        "2",
        "--out",
        s(&x),
    ]);
    assert!(err.contains("no running statistics"), "{err}");
    assert!(!x.exists(), "a refused recalibration writes nothing");
}

#[test]
fn eval_with_batch_statistics_leaves_the_running_ones_alone() {
    let t = tmp();
    let (data, run) = trained(&t);
    let d = s(&data);
    let model = run.join("model.safetensors");
    let before = std::fs::read(&model).unwrap();
    let json = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["eval", "--checkpoint", s(&model), "--data", d, "--json"];
        args.extend_from_slice(extra);
        serde_json::from_str(ok(&args).trim()).unwrap()
    };
    let running = json(&[]);
    let batch = json(&["--bn-stats", "batch"]);
    assert_eq!(batch["bn_stats"], "batch");
    assert_ne!(
        running["test_loss"], batch["test_loss"],
        "batch statistics must change the result"
    );
    // Batches of 40 (the whole test set) and of 8 differ: each batch normalizes itself.
    assert_ne!(
        json(&["--bn-stats", "batch", "--batch-size", "8"])["test_loss"],
        batch["test_loss"]
    );
    assert_eq!(std::fs::read(&model).unwrap(), before);
    // The MLP's BatchNorm1d with one image per batch has one value per channel.
    let mlp = t.path().join("mlp");
    ok(&[
        "train",
        "--data",
        d,
        "--out",
        s(&mlp),
        "--epochs",
        "1",
        "--model",
        "mlp",
        "--batch-size",
        "16",
    ]);
    let err = fails(&[
        "eval",
        "--checkpoint",
        s(&mlp.join("model.safetensors")),
        "--data",
        d,
        "--bn-stats",
        "batch",
        "--batch-size",
        "1",
    ]);
    assert!(err.contains("more than one value"), "{err}");
    let gn = t.path().join("gn");
    ok(&[
        "train",
        "--data",
        d,
        "--out",
        s(&gn),
        "--epochs",
        "1",
        "--norm",
        "gn:4",
        "--batch-size",
        "16",
    ]);
    let err = fails(&[
        "eval",
        "--checkpoint",
        s(&gn.join("model.safetensors")),
        "--data",
        d,
        "--bn-stats",
        "batch",
    ]);
    assert!(err.contains("keeps no running statistics"), "{err}");
}

/// The state dict of a normlab checkpoint without its metadata, as PyTorch's save_file writes it.
fn strip_metadata(from: &Path, to: &Path) {
    rewrite_safetensors(from, to, &mut |_, md| *md = None);
}

#[test]
fn a_plain_state_dict_evaluates_and_initializes_with_the_architecture_from_flags() {
    let t = tmp();
    let (data, run) = trained(&t);
    let d = s(&data);
    let plain = t.path().join("plain.safetensors");
    strip_metadata(&run.join("model.safetensors"), &plain);
    let err = fails(&["eval", "--checkpoint", s(&plain), "--data", d]);
    assert!(err.contains("--model"), "{err}");
    let a: serde_json::Value = serde_json::from_str(
        ok(&[
            "eval",
            "--checkpoint",
            s(&run.join("model.safetensors")),
            "--data",
            d,
            "--json",
        ])
        .trim(),
    )
    .unwrap();
    let b: serde_json::Value = serde_json::from_str(
        ok(&[
            "eval",
            "--checkpoint",
            s(&plain),
            "--model",
            "seed-cnn",
            "--data",
            d,
            "--json",
        ])
        .trim(),
    )
    .unwrap();
    assert_eq!(a["test_accuracy"], b["test_accuracy"]);
    assert_eq!(
        a["test_loss"], b["test_loss"],
        "the default input normalization is the run's"
    );
    // Tensors that do not fit --model: the first one is named.
    let err = fails(&["eval", "--checkpoint", s(&plain), "--model", "seed-cnn:16", "--data", d]);
    assert!(err.contains("conv1.weight"), "{err}");
    let err = fails(&["eval", "--checkpoint", s(&plain), "--model", "mlp", "--data", d]);
    assert!(err.contains("fc1.weight") || err.contains("missing tensor"), "{err}");
    // --init-from a plain state dict starts a run from it.
    let out = t.path().join("from-plain");
    ok(&[
        "train",
        "--data",
        d,
        "--out",
        s(&out),
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--init-from",
        s(&plain),
        "--lr",
        "1e-9",
        "--optimizer",
        "sgd",
        "--momentum",
        "0",
    ]);
    let m = metrics(&out);
    assert!(m["epochs"][0]["test_accuracy"].as_f64().unwrap() >= a["test_accuracy"].as_f64().unwrap() - 0.1);
    let err = fails(&[
        "train",
        "--data",
        d,
        "--out",
        s(&t.path().join("bad")),
        "--model",
        "seed-cnn:8",
        "--init-from",
        s(&plain),
    ]);
    assert!(err.contains("conv1.weight"), "{err}");
}

/// PyTorch's own training, imported: needs the venv of scripts/ (skipped without it) and the
/// Fashion-MNIST package.
#[test]
fn pytorch_weights_give_pytorch_predictions() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv-torch/bin/python");
    let data = Path::new("/usr/share/datasets/fashion-mnist");
    if !python.exists() || !data.join("train-images-idx3-ubyte.gz").exists() {
        eprintln!("skipped: needs .venv-torch (PyTorch) and dataset-fashion-mnist");
        return;
    }
    let t = tmp();
    let out = t.path().join("pt");
    let status = std::process::Command::new(&python)
        .arg(root.join("scripts/pytorch_weights.py"))
        .args([s(&out), "--train-limit", "3000", "--test-limit", "1000"])
        .status()
        .unwrap();
    assert!(status.success());
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("expected.json")).unwrap()).unwrap();
    for (model, e) in expected.as_object().unwrap() {
        let file = out.join(e["file"].as_str().unwrap());
        let pred = t.path().join(format!("{}.json", e["file"].as_str().unwrap()));
        let j: serde_json::Value = serde_json::from_str(
            ok(&[
                "eval",
                "--checkpoint",
                s(&file),
                "--model",
                model,
                "--test-limit",
                "1000",
                "--json",
                "--predictions",
                s(&pred),
            ])
            .trim(),
        )
        .unwrap();
        // PyTorch's accuracy is a float32 mean.
        let (a, b) = (
            j["test_accuracy"].as_f64().unwrap(),
            e["test_accuracy"].as_f64().unwrap(),
        );
        assert!((a - b).abs() < 1e-6, "{model}: {a} vs {b}");
        let got: Vec<u64> = serde_json::from_str(&std::fs::read_to_string(&pred).unwrap()).unwrap();
        let want: Vec<u64> = e["predictions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(got, want, "{model}: predictions");
    }
}
