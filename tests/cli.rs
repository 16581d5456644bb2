//! The `normlab` binary end to end on small synthetic IDX data: determinism, exact resume,
//! eval of a checkpoint, and a clear one-line error (never a panic) for bad input.

mod common;

use std::path::{Path, PathBuf};

use common::cli::*;

const QUICK: &[&str] = &["--batch-size", "32", "--seed", "3"];

#[test]
fn training_is_deterministic_across_threads_and_resumes_exactly() {
    let t = tmp();
    let data = t.path().join("data");
    write_dataset(&data, 300, 100, true);
    let run = |out: &PathBuf, extra: &[&str]| {
        let mut args = vec!["train", "--data", s(&data), "--out", s(out)];
        args.extend_from_slice(QUICK);
        args.extend_from_slice(extra);
        ok(&args)
    };
    let (a, b, c) = (t.path().join("a"), t.path().join("b"), t.path().join("c"));
    run(&a, &["--epochs", "2", "--threads", "2"]);
    run(&b, &["--epochs", "2", "--threads", "1"]);
    assert_eq!(learning_curve(&metrics(&a)), learning_curve(&metrics(&b)));
    assert_eq!(
        tensors(&a.join("model.safetensors")),
        tensors(&b.join("model.safetensors"))
    );

    // One epoch, then --resume to two, lands exactly where the uninterrupted run did.
    run(&c, &["--epochs", "1", "--threads", "2"]);
    assert_eq!(metrics(&c)["epochs"].as_array().unwrap().len(), 1);
    ok(&["train", "--resume", s(&c), "--epochs", "2"]);
    assert_eq!(learning_curve(&metrics(&a)), learning_curve(&metrics(&c)));
    assert_eq!(
        tensors(&a.join("model.safetensors")),
        tensors(&c.join("model.safetensors"))
    );
    // The commit records agree in everything but the step log's timings (images/s, wall time).
    let no_log = |p: &Path| -> Vec<(String, Vec<u8>)> {
        tensors(p).into_iter().filter(|(n, _)| !n.starts_with("log.")).collect()
    };
    assert_eq!(
        no_log(&a.join("train_state.safetensors")),
        no_log(&c.join("train_state.safetensors"))
    );
    let losses = |dir: &Path| -> Vec<String> {
        let csv = std::fs::read_to_string(dir.join("steps.csv")).unwrap();
        csv.lines()
            .map(|l| l.split(',').take(4).collect::<Vec<_>>().join(","))
            .collect()
    };
    assert_eq!(losses(&a), losses(&c));

    let m = metrics(&a);
    assert_eq!(m["status"], "complete");
    for key in ["test_accuracy", "test_loss", "train_images_per_sec"] {
        assert!(m[key].as_f64().unwrap() > 0.0, "{key}");
    }
    assert!(
        m["test_accuracy"].as_f64().unwrap() > 0.5,
        "the toy set is learnable: {}",
        m["test_accuracy"]
    );

    // eval rebuilds the model from the checkpoint's metadata and reproduces the test accuracy.
    let json = ok(&[
        "eval",
        "--checkpoint",
        s(&a.join("model.safetensors")),
        "--data",
        s(&data),
        "--json",
    ]);
    let e: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(e["test_accuracy"], m["test_accuracy"]);
    assert!((e["test_loss"].as_f64().unwrap() - m["test_loss"].as_f64().unwrap()).abs() < 1e-9);

    // --eval-train adds each epoch's fit (eval mode on the training images) and changes
    // nothing that trains; --resume keeps it.
    let d = t.path().join("d");
    run(&d, &["--epochs", "1", "--threads", "2", "--eval-train"]);
    ok(&["train", "--resume", s(&d), "--epochs", "2"]);
    assert_eq!(learning_curve(&metrics(&a)), learning_curve(&metrics(&d)));
    assert_eq!(
        tensors(&a.join("model.safetensors")),
        tensors(&d.join("model.safetensors"))
    );
    let md = metrics(&d);
    for e in md["epochs"].as_array().unwrap() {
        let (loss, acc) = (
            e["fit"]["loss"].as_f64().unwrap(),
            e["fit"]["accuracy"].as_f64().unwrap(),
        );
        assert!(loss.is_finite() && loss > 0.0 && (0.0..=1.0).contains(&acc), "{e}");
    }
    assert!(m["epochs"][0].get("fit").is_none(), "no fit without --eval-train");

    // A fresh run never overwrites an existing one.
    let err = fails(&["train", "--data", s(&data), "--out", s(&a), "--epochs", "1"]);
    assert!(err.contains("already holds a run"), "{err}");
}

#[test]
fn checkpoint_uses_pytorch_names_layouts_and_dtypes() {
    let t = tmp();
    let data = t.path().join("data");
    write_dataset(&data, 64, 20, false);
    let out = t.path().join("run");
    ok(&[
        "train",
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--epochs",
        "1",
        "--batch-size",
        "32",
    ]);
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let want: &[(&str, &[usize], safetensors::Dtype)] = &[
        ("conv1.weight", &[32, 1, 3, 3], safetensors::Dtype::F32),
        ("bn1.weight", &[32], safetensors::Dtype::F32),
        ("bn1.bias", &[32], safetensors::Dtype::F32),
        ("bn1.running_mean", &[32], safetensors::Dtype::F32),
        ("bn1.running_var", &[32], safetensors::Dtype::F32),
        ("bn1.num_batches_tracked", &[], safetensors::Dtype::I64),
        ("fc1.weight", &[10, 6272], safetensors::Dtype::F32),
        ("fc1.bias", &[10], safetensors::Dtype::F32),
    ];
    assert_eq!(st.names().len(), want.len());
    for (name, shape, dtype) in want {
        let t = st.tensor(name).unwrap();
        assert_eq!(t.shape(), *shape, "{name}");
        assert_eq!(t.dtype(), *dtype, "{name}");
    }
    let nbt = i64::from_le_bytes(st.tensor("bn1.num_batches_tracked").unwrap().data().try_into().unwrap());
    assert_eq!(nbt, 2, "two batches of 32 were tracked");
}

#[test]
fn bad_data_gives_one_clear_error() {
    let t = tmp();
    let good = t.path().join("good");
    write_dataset(&good, 40, 20, false);
    let variant = |name: &str, file: &str, bytes: Vec<u8>| {
        let dir = t.path().join(name);
        write_dataset(&dir, 40, 20, false);
        std::fs::write(dir.join(file), bytes).unwrap();
        dir
    };
    let img = std::fs::read(good.join("train-images-idx3-ubyte")).unwrap();
    let truncated = variant("trunc", "train-images-idx3-ubyte", img[..img.len() - 100].to_vec());
    let mut magic = img.clone();
    magic[2] = 0x0d;
    let bad_magic = variant("magic", "train-images-idx3-ubyte", magic);
    let mismatch = variant("count", "train-labels-idx1-ubyte", idx_bytes(&[39], &[1; 39]));
    let bad_label = variant("label", "train-labels-idx1-ubyte", idx_bytes(&[40], &[11; 40]));
    let corrupt_gz = {
        let dir = t.path().join("gz");
        write_dataset(&dir, 40, 20, false);
        std::fs::remove_file(dir.join("train-images-idx3-ubyte")).unwrap();
        std::fs::write(dir.join("train-images-idx3-ubyte.gz"), b"\x1f\x8b\x08\x00garbage").unwrap();
        dir
    };
    let cases: &[(&Path, &str)] = &[
        (&truncated, "truncated"),
        (&bad_magic, "magic"),
        (&mismatch, "39 labels but"),
        (&bad_label, "label 11"),
        (&corrupt_gz, "gzip"),
        (Path::new("/nonexistent/dir"), "dataset-fashion-mnist"),
    ];
    for (dir, want) in cases {
        let out = t.path().join("never");
        let err = fails(&["train", "--data", s(dir), "--out", s(&out), "--epochs", "1"]);
        assert!(err.contains(want), "{}: want '{want}' in: {err}", dir.display());
        assert!(!out.exists(), "nothing is written when the data is bad");
    }
}

#[test]
fn bad_options_and_checkpoints_give_one_clear_error() {
    let t = tmp();
    let data = t.path().join("data");
    write_dataset(&data, 64, 20, false);
    let d = s(&data);
    let out = t.path().join("o");
    let o = s(&out);
    for (args, want) in [
        (
            vec!["train", "--data", d, "--out", o, "--optimizer", "rmsprop"],
            "rmsprop",
        ),
        (vec!["train", "--data", d, "--out", o, "--lr", "-1"], "--lr"),
        (
            vec!["train", "--data", d, "--out", o, "--batch-size", "0"],
            "--batch-size",
        ),
        (vec!["train", "--data", d, "--out", o, "--norm", "bn:eps=0"], "eps"),
        (
            vec!["train", "--data", d, "--out", o, "--norm", "bn:momentum=2"],
            "momentum",
        ),
        (
            vec!["train", "--data", d, "--out", o, "--norm", "whitening"],
            "unknown norm",
        ),
        (vec!["train", "--data", d, "--out", o, "--model", "vgg:32,X"], "vgg cfg"),
        (vec!["train", "--data", d, "--out", o, "--schedule", "linear"], "linear"),
        (vec!["train", "--data", d, "--out", o, "--epochs", "0"], "--epochs"),
        (vec!["train", "--data", d, "--out", o, "--threads", "0"], "--threads"),
        (
            vec![
                "train",
                "--data",
                d,
                "--out",
                o,
                "--model",
                "mlp",
                "--train-limit",
                "33",
                "--batch-size",
                "32",
            ],
            "last batch of 1",
        ),
    ] {
        let err = fails(&args);
        assert!(err.contains(want), "{args:?}: want '{want}' in: {err}");
    }
    assert!(!out.exists());

    // Checkpoints: missing, not safetensors, tensors that do not match the metadata.
    let garbage = t.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"this is not a checkpoint").unwrap();
    let err = fails(&["eval", "--checkpoint", s(&garbage), "--data", d]);
    assert!(err.contains("not a readable safetensors"), "{err}");
    let err = fails(&["eval", "--checkpoint", "/nonexistent.safetensors", "--data", d]);
    assert!(err.contains("/nonexistent.safetensors"), "{err}");

    let run = t.path().join("run");
    ok(&[
        "train",
        "--data",
        d,
        "--out",
        s(&run),
        "--epochs",
        "1",
        "--batch-size",
        "32",
    ]);
    let ckpt = run.join("model.safetensors");
    let bytes = std::fs::read(&ckpt).unwrap();
    let text = String::from_utf8_lossy(&bytes).to_string();
    // Same tensors, metadata claiming a VGG: a mismatch, reported by tensor name.
    let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = &text[8..header_end];
    let lied = header.replace("seed-cnn", "vgg:8,M");
    let mut forged = Vec::new();
    forged.extend_from_slice(&(lied.len() as u64).to_le_bytes());
    forged.extend_from_slice(lied.as_bytes());
    forged.extend_from_slice(&bytes[header_end..]);
    let mismatched = t.path().join("mismatched.safetensors");
    std::fs::write(&mismatched, forged).unwrap();
    let err = fails(&["eval", "--checkpoint", s(&mismatched), "--data", d]);
    assert!(
        err.contains("conv1.weight") || err.contains("unexpected tensors"),
        "{err}"
    );
    // Truncated file.
    let cut = t.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = fails(&["eval", "--checkpoint", s(&cut), "--data", d]);
    assert!(err.contains("not a readable safetensors"), "{err}");
    // Resume from a folder that does not exist, or holds no run.
    let err = fails(&["train", "--resume", s(&t.path().join("empty"))]);
    assert!(err.contains("no such folder"), "{err}");
    std::fs::create_dir(t.path().join("empty")).unwrap();
    let err = fails(&["train", "--resume", s(&t.path().join("empty"))]);
    assert!(err.contains("holds no normlab training run"), "{err}");
}

#[test]
fn divergence_stops_with_a_clear_message_and_keeps_the_last_checkpoint() {
    let t = tmp();
    let data = t.path().join("data");
    write_dataset(&data, 64, 20, false);
    let out = t.path().join("run");
    // An absurd rate without BN: ReLU activations overflow f32 within a few steps.
    let err = fails(&[
        "train",
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--norm",
        "none",
        "--optimizer",
        "sgd",
        "--lr",
        "1e30",
        "--epochs",
        "3",
        "--batch-size",
        "16",
    ]);
    // It diverges in epoch 1: there is no checkpoint, and the message must not claim one.
    assert!(
        err.contains("training diverged") && err.contains("no checkpoint exists yet"),
        "{err}"
    );
    assert_eq!(metrics(&out)["status"], "diverged");
    assert!(!out.join("model.safetensors").exists());
}

#[test]
fn layer_command_runs_a_norm_and_rejects_bad_input() {
    use normlab::checkpoint::{serialize, Entry};
    use std::collections::HashMap;
    let t = tmp();
    let write = |name: &str, entries: Vec<Entry>| {
        let p = t.path().join(name);
        std::fs::write(&p, serialize(&entries, HashMap::new()).unwrap()).unwrap();
        p
    };
    let x: Vec<f32> = (0..4 * 6 * 2 * 2).map(|i| (i as f32 * 0.37).sin()).collect();
    let good = write(
        "in.safetensors",
        vec![
            Entry::f32("x".into(), &[4, 6, 2, 2], &x),
            Entry::f32("dy".into(), &[4, 6, 2, 2], &x),
        ],
    );
    let out = t.path().join("out.safetensors");
    ok(&["layer", "--spec", "gn:3", "--input", s(&good), "--output", s(&out)]);
    let names: Vec<String> = tensors(&out).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["dbias", "dweight", "dx", "y"]);
    ok(&[
        "layer",
        "--spec",
        "bn",
        "--input",
        s(&good),
        "--output",
        s(&out),
        "--force",
    ]);
    let names: Vec<String> = tensors(&out).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "dbias",
            "dweight",
            "dx",
            "num_batches_tracked",
            "running_mean",
            "running_var",
            "y"
        ]
    );

    let no_x = write("nox.safetensors", vec![Entry::f32("dy".into(), &[2, 2], &[1.0; 4])]);
    let bad_dy = write(
        "baddy.safetensors",
        vec![
            Entry::f32("x".into(), &[4, 6, 2, 2], &x),
            Entry::f32("dy".into(), &[4, 6, 4], &x),
        ],
    );
    let bad_w = write(
        "badw.safetensors",
        vec![
            Entry::f32("x".into(), &[4, 6, 2, 2], &x),
            Entry::f32("weight".into(), &[5], &[1.0; 5]),
        ],
    );
    let garbage = t.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"nope").unwrap();
    for (spec, input, want) in [
        ("gn:4", &good, "C % G"),
        ("ghost:3", &good, "virtual batch 3"),
        ("bn:eps=0", &good, "eps"),
        ("bn:momentum=1.5", &good, "momentum"),
        ("in:momentum=-1", &good, "momentum"),
        ("whiten", &good, "unknown norm spec"),
        ("gn:2,foo=1", &good, "unknown option 'foo'"),
        ("bn", &no_x, "no tensor 'x'"),
        ("bn", &bad_dy, "'dy' has shape"),
        ("bn", &bad_w, "'weight' has shape"),
        ("bn", &garbage, "not a readable safetensors"),
    ] {
        let fresh = t.path().join("fresh.safetensors");
        let err = fails(&["layer", "--spec", spec, "--input", s(input), "--output", s(&fresh)]);
        assert!(err.contains(want), "{spec}: want '{want}' in: {err}");
    }
}

#[test]
fn every_norm_spec_trains_evaluates_and_resumes() {
    let t = tmp();
    let data = t.path().join("data");
    write_dataset(&data, 64, 20, false);
    for spec in [
        "none",
        "bn",
        "gn:4",
        "gn",
        "ln",
        "layernorm",
        "rms",
        "in",
        "in:affine=true,track=true",
        "brn",
        "ghost:8",
        "bn-l1",
        "bn-linf",
        "bn-noisy",
    ] {
        let out = t.path().join(spec.replace([':', ',', '='], "_"));
        let args = [
            "train",
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--norm",
            spec,
        ];
        ok(&args);
        ok(&["train", "--resume", s(&out), "--epochs", "2"]);
        assert_eq!(metrics(&out)["epochs"].as_array().unwrap().len(), 2, "{spec}");
        let json = ok(&[
            "eval",
            "--checkpoint",
            s(&out.join("model.safetensors")),
            "--data",
            s(&data),
            "--json",
        ]);
        let e: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
        assert_eq!(e["test_accuracy"], metrics(&out)["test_accuracy"], "{spec}");
    }
    let err = fails(&[
        "train",
        "--data",
        s(&data),
        "--out",
        s(&t.path().join("x")),
        "--norm",
        "gn:5",
    ]);
    assert!(err.contains("bn1") && err.contains("C % G"), "{err}");
    let err = fails(&[
        "train",
        "--data",
        s(&data),
        "--out",
        s(&t.path().join("y")),
        "--norm",
        "ghost:5",
        "--batch-size",
        "16",
    ]);
    assert!(
        err.contains("virtual batch 5") && err.contains("batch size (16)"),
        "{err}"
    );
    // 60 images in batches of 16 leave a last batch of 12, which 8 does not divide.
    let err = fails(&[
        "train",
        "--data",
        s(&data),
        "--out",
        s(&t.path().join("z")),
        "--norm",
        "ghost:8",
        "--batch-size",
        "16",
        "--train-limit",
        "60",
    ]);
    assert!(err.contains("last batch of the epoch (12)"), "{err}");
    let err = fails(&[
        "train",
        "--data",
        s(&data),
        "--out",
        s(&t.path().join("w")),
        "--model",
        "mlp",
        "--norm",
        "in",
    ]);
    assert!(err.contains("InstanceNorm needs spatial values"), "{err}");
    assert!(!t.path().join("y").exists() && !t.path().join("z").exists() && !t.path().join("w").exists());
}

#[test]
fn resume_compares_the_parsed_settings_not_their_spelling() {
    let t = tmp();
    let (_, run) = trained_run(&t, 40, 20, "20");
    // The same layer spelled out is no conflict; another norm, rate or flag is, by name.
    ok(&[
        "train",
        "--resume",
        s(&run),
        "--epochs",
        "2",
        "--norm",
        "bn:momentum=0.1,eps=1e-5",
    ]);
    let err = fails(&[
        "train",
        "--resume",
        s(&run),
        "--epochs",
        "3",
        "--norm",
        "gn:4",
        "--lr",
        "0.5",
        "--nesterov",
    ]);
    assert!(
        err.contains("--norm gn:4 (the run has bn)")
            && err.contains("--lr 0.5 (the run has 0.001)")
            && err.contains("--nesterov true (the run has false)"),
        "{err}"
    );
    assert!(!err.contains("--epochs 3"), "{err}");
}
