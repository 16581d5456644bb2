//! Network slimming and BN folding: the L1 subgradient on γ, pruning that removes exactly the
//! dead channels (logits unchanged), folding within 1e-4 of the unfolded model, and bad input
//! that fails clearly without touching the input checkpoint.

mod common;

use std::path::Path;

use common::cli::*;
use normlab::checkpoint::{load_model, save_model, CheckpointMeta};
use normlab::fold::{fold, max_logit_difference};
use normlab::models::{Model, ModelSpec};
use normlab::nn::Mode;
use normlab::slimming;
use normlab::Tensor;

#[test]
fn sparsity_adds_lambda_sign_gamma_to_bn_scales_only() {
    let spec = ModelSpec::new(
        normlab::models::Arch::builtin("vgg:4,M"),
        normlab::nn::norm_spec::NormSpec::builtin("bn"),
        [1, 8, 8],
        3,
    )
    .unwrap();
    let mut m = Model::build(&spec, 1).unwrap();
    m.net.set_norm_scales(0.5);
    for (name, p) in m.net.named_params() {
        if name == "bn1.weight" {
            p.value.data = vec![0.5, -0.25, 0.0, 2.0];
        }
    }
    m.net.zero_grad();
    m.net.add_norm_scale_l1(0.1);
    for (name, p) in m.net.named_params() {
        let want: Vec<f32> = if name == "bn1.weight" {
            vec![0.1, -0.1, 0.0, 0.1]
        } else {
            vec![0.0; p.grad.len()]
        };
        assert_eq!(p.grad.data, want, "{name}");
    }
}

/// A vgg whose channels `dead` in each BN have γ = β = 0: after BN+ReLU they are exactly 0.
fn model_with_dead_channels(dead: &[usize]) -> Model {
    model_with_dead("vgg:6,M,8,M", dead, |_| true)
}

/// `model` with γ = β = 0 for channels `dead` of the norms whose name passes `which`.
fn model_with_dead(model: &'static str, dead: &[usize], which: impl Fn(&str) -> bool) -> Model {
    let spec = ModelSpec::new(
        normlab::models::Arch::builtin(model),
        normlab::nn::norm_spec::NormSpec::builtin("bn"),
        [1, 12, 12],
        5,
    )
    .unwrap();
    let mut m = Model::build(&spec, 7).unwrap();
    // Give the running statistics something non-trivial, as after training.
    for (name, b) in m.net.named_buffers() {
        if let normlab::nn::BufferMut::F32(t) = b {
            for (i, v) in t.data.iter_mut().enumerate() {
                *v = if name.ends_with("running_var") {
                    0.5 + 0.1 * i as f32
                } else {
                    0.05 * i as f32 - 0.1
                };
            }
        }
    }
    for (name, p) in m.net.named_params() {
        let layer = name.rsplit_once('.').map_or("", |(l, _)| l);
        if layer.ends_with("bn1") || layer.ends_with("bn2") || layer.ends_with("shortcut.1") {
            let kill = which(layer);
            for (i, v) in p.value.data.iter_mut().enumerate() {
                *v = if kill && dead.contains(&i) {
                    0.0
                } else if name.ends_with("weight") {
                    0.8 + 0.1 * i as f32
                } else {
                    0.05
                };
            }
        }
    }
    m
}

#[test]
fn resnet_pruning_cuts_only_inside_blocks_and_keeps_the_logits() {
    // Inner channels 0 and 3 of every block are dead: 2 x 6 of the 16+16+32+32+64+64 inner ones.
    let mut m = model_with_dead("resnet", &[0, 3], |layer| {
        layer.starts_with("layer") && layer.ends_with("bn1")
    });
    let total: usize = [16, 16, 32, 32, 64, 64].iter().sum();
    let plan = slimming::plan(&mut m, 12.0 / total as f64, 1).unwrap();
    assert!(plan
        .layers
        .iter()
        .all(|l| l.conv.ends_with("conv1") && l.consumer.ends_with("conv2")));
    let mut pruned = slimming::apply(&mut m, &plan).unwrap();
    assert_eq!(pruned.spec.model.to_string(), "resnet:14,14,30,30,62,62");
    let x = random_input(&mut m, 3);
    let (a, b) = (logits(&mut m, &x), logits(&mut pruned, &x));
    for (p, q) in a.iter().zip(&b) {
        assert!((p - q).abs() < 1e-4, "logits changed: {a:?} vs {b:?}");
    }
}

fn random_input(m: &mut Model, n: usize) -> Tensor {
    let [c, h, w] = m.spec.input;
    Tensor {
        shape: vec![n, c, h, w],
        data: (0..n * c * h * w)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect(),
    }
}

fn logits(m: &mut Model, x: &Tensor) -> Vec<f32> {
    m.input_mut().clone_from(x);
    m.forward(Mode::Eval).unwrap().data.clone()
}

#[test]
fn pruning_dead_channels_leaves_the_logits_unchanged() {
    // Channels 1 and 4 are dead in both BN layers: 4 of the 14 channels.
    let mut m = model_with_dead_channels(&[1, 4]);
    let plan = slimming::plan(&mut m, 4.0 / 14.0, 1).unwrap();
    assert_eq!(
        plan.layers.iter().map(|l| (l.before, l.after)).collect::<Vec<_>>(),
        [(6, 4), (8, 6)]
    );
    let mut pruned = slimming::apply(&mut m, &plan).unwrap();
    assert_eq!(pruned.spec.model.to_string(), "vgg:4,M,6,M");
    let x = random_input(&mut m, 3);
    let (a, b) = (logits(&mut m, &x), logits(&mut pruned, &x));
    for (p, q) in a.iter().zip(&b) {
        assert!((p - q).abs() < 1e-5, "logits changed: {a:?} vs {b:?}");
    }
    assert!(pruned.parameter_count() < m.parameter_count());
    assert!(pruned.spec.flops().unwrap() < m.spec.flops().unwrap());
    // Each layer keeps at least one channel, even at 99%.
    let plan = slimming::plan(&mut m, 0.99, 1).unwrap();
    assert!(plan.layers.iter().all(|l| l.after >= 1));
    // --multiple-of 4: the counts rounded up (6 -> 4 stays 4, 8 -> 6 becomes 8, capped at the
    // width), taking back the largest |γ| removed: here the dead channels, so the logits hold.
    let plan = slimming::plan(&mut m, 4.0 / 14.0, 4).unwrap();
    assert_eq!(
        plan.layers.iter().map(|l| (l.before, l.after)).collect::<Vec<_>>(),
        [(6, 4), (8, 8)]
    );
    let mut rounded = slimming::apply(&mut m, &plan).unwrap();
    assert_eq!(rounded.spec.model.to_string(), "vgg:4,M,8,M");
    let c = logits(&mut rounded, &x);
    for (p, q) in a.iter().zip(&c) {
        assert!((p - q).abs() < 1e-5, "logits changed: {a:?} vs {c:?}");
    }
    let plan = slimming::plan(&mut m, 0.5, 3).unwrap();
    assert!(plan.layers.iter().all(|l| l.after % 3 == 0 || l.after == l.before));
    assert!(slimming::plan(&mut m, 0.5, 0).is_err());
}

#[test]
fn folding_matches_the_unfolded_model() {
    let mut m = model_with_dead_channels(&[2]);
    let mut folded = fold(&mut m).unwrap();
    // vgg:6,M,8,M: without the norms each ReLU moves into the max-pool after its conv.
    assert!(folded.summary().contains("ReLU+MaxPool2d") && !folded.summary().contains("BatchNorm"));
    let x = random_input(&mut m, 4);
    let (a, b) = (logits(&mut m, &x), logits(&mut folded, &x));
    let worst = a.iter().zip(&b).fold(0.0f32, |w, (p, q)| w.max((p - q).abs()));
    assert!(worst <= 1e-4, "largest logit difference {worst}");
    // A resnet: the norms inside the blocks fold into the convs inside the blocks.
    let mut res = model_with_dead("resnet", &[1], |_| true);
    let mut folded_res = fold(&mut res).unwrap();
    let x = random_input(&mut res, 2);
    let (a, b) = (logits(&mut res, &x), logits(&mut folded_res, &x));
    let worst = a.iter().zip(&b).fold(0.0f32, |w, (p, q)| w.max((p - q).abs()));
    assert!(worst <= 1e-4, "resnet: largest logit difference {worst}");
    // Through the dataset path too.
    let t = tmp();
    write_dataset(&t.path().join("d"), 20, 20, false);
    let data = normlab::data::load_split(&t.path().join("d"), false).unwrap();
    let spec = ModelSpec::new(
        normlab::models::Arch::builtin("seed-cnn"),
        normlab::nn::norm_spec::NormSpec::builtin("bn"),
        [1, 28, 28],
        10,
    )
    .unwrap();
    let mut seed = Model::build(&spec, 3).unwrap();
    let mut folded = fold(&mut seed).unwrap();
    let norm = normlab::data::InputNorm::uniform(1, 0.3, 0.3);
    assert!(max_logit_difference(&mut seed, &mut folded, &data, norm, 7).unwrap() <= 1e-4);
}

fn checksum(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn prune_and_fold_commands_work_and_reject_bad_input() {
    let t = tmp();
    let data = t.path().join("data");
    write_dataset(&data, 96, 40, false);
    let run = t.path().join("run");
    let d = s(&data);
    ok(&[
        "train",
        "--data",
        d,
        "--out",
        s(&run),
        "--model",
        "vgg:8,M,8,M",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--sparsity",
        "1e-4",
        "--gamma-init",
        "0.5",
    ]);
    let ckpt = run.join("model.safetensors");
    let original = checksum(&ckpt);
    let out = t.path().join("pruned");
    let text = ok(&[
        "prune",
        "--checkpoint",
        s(&ckpt),
        "--percent",
        "0.5",
        "--out",
        s(&out),
        "--data",
        d,
        "--finetune",
        "1",
    ]);
    // The pruning summary first, then the fine-tuning rows under their header, and the last
    // line names the fine-tuned model as the result.
    let summary = text.find("parameters").expect("pruning summary");
    let header = text.find("train_loss").expect("fine-tuning header");
    assert!(summary < header, "{text}");
    let last = text.lines().last().unwrap();
    assert!(
        last.starts_with("result: ") && last.contains("finetune/model.safetensors (fine-tuned"),
        "{text}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("prune.json")).unwrap()).unwrap();
    assert_eq!(
        report["model_after"]
            .as_str()
            .unwrap()
            .split(',')
            .filter(|w| *w != "M")
            .count(),
        2
    );
    assert!(report["parameters_after"].as_u64() < report["parameters_before"].as_u64());
    assert!(std::fs::read_to_string(out.join("gamma.svg")).unwrap().contains("<svg"));
    // The pruned checkpoint and the fine-tuned one load and evaluate; the fine-tune resumes.
    ok(&["eval", "--checkpoint", s(&out.join("model.safetensors")), "--data", d]);
    ok(&[
        "eval",
        "--checkpoint",
        s(&out.join("finetune/model.safetensors")),
        "--data",
        d,
    ]);
    ok(&["train", "--resume", s(&out.join("finetune")), "--epochs", "2"]);
    // Folding, and eval --fold.
    let folded = t.path().join("folded");
    let text = ok(&["fold", "--checkpoint", s(&ckpt), "--out", s(&folded), "--data", d]);
    assert!(text.contains("largest |logit difference|"), "{text}");
    let fj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(folded.join("fold.json")).unwrap()).unwrap();
    assert!(fj["max_abs_logit_difference"].as_f64().unwrap() <= 1e-4);
    let plain = ok(&["eval", "--checkpoint", s(&ckpt), "--data", d, "--json"]);
    let with_fold = ok(&["eval", "--checkpoint", s(&ckpt), "--data", d, "--json", "--fold"]);
    let acc = |j: &str| serde_json::from_str::<serde_json::Value>(j.trim()).unwrap()["test_accuracy"].clone();
    assert_eq!(acc(&plain), acc(&with_fold));

    // Bad input: a percent outside [0, 1), no BN, a pruned checkpoint with lying metadata.
    for p in ["1", "1.5", "-0.1"] {
        let err = fails(&[
            "prune",
            "--checkpoint",
            s(&ckpt),
            "--percent",
            p,
            "--out",
            s(&t.path().join("x")),
            "--data",
            d,
        ]);
        assert!(err.contains("--percent"), "{err}");
    }
    let none_run = t.path().join("none");
    ok(&[
        "train",
        "--data",
        d,
        "--out",
        s(&none_run),
        "--norm",
        "none",
        "--epochs",
        "1",
        "--batch-size",
        "16",
    ]);
    let none_ckpt = none_run.join("model.safetensors");
    let err = fails(&[
        "prune",
        "--checkpoint",
        s(&none_ckpt),
        "--percent",
        "0.5",
        "--out",
        s(&t.path().join("y")),
        "--data",
        d,
    ]);
    assert!(err.contains("no BatchNorm"), "{err}");
    let err = fails(&[
        "fold",
        "--checkpoint",
        s(&none_ckpt),
        "--out",
        s(&t.path().join("z")),
        "--data",
        d,
    ]);
    assert!(err.contains("no BatchNorm"), "{err}");
    let (mut pruned, meta) = load_model(&out.join("model.safetensors")).unwrap();
    let lying = CheckpointMeta {
        spec: ModelSpec {
            model: normlab::models::Arch::builtin("vgg:8,M,8,M"),
            ..meta.spec.clone()
        },
        ..meta
    };
    let forged = t.path().join("forged.safetensors");
    save_model(&forged, &mut pruned, &lying).unwrap();
    let err = fails(&["eval", "--checkpoint", s(&forged), "--data", d]);
    // Caught before the model is built (its weights cannot fit the file), or by the shapes.
    assert!(err.contains("more than the file") || err.contains("shape"), "{err}");
    // Writing over the input is refused; the input checkpoint is never modified.
    let err = fails(&[
        "prune",
        "--checkpoint",
        s(&ckpt),
        "--percent",
        "0.5",
        "--out",
        s(&run),
        "--data",
        d,
    ]);
    assert!(err.contains("overwrite"), "{err}");
    assert_eq!(checksum(&ckpt), original);
}
