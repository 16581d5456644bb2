//! `normlab export`: ONNX files that parse, bad input refused with nothing written, and (where
//! the venv of scripts/ has onnx and onnxruntime) the same logits in ONNX Runtime as in normlab.

mod common;

use std::path::{Path, PathBuf};

use common::cli::*;

/// Trains `model` with `norm` for one epoch on the toy set in `data`; returns its checkpoint.
fn train(t: &tempfile::TempDir, data: &Path, model: &str, norm: &str) -> PathBuf {
    let run = t.path().join(format!("{model}-{norm}").replace([':', ',', '='], "_"));
    ok(&[
        "train",
        "--data",
        s(data),
        "--out",
        s(&run),
        "--model",
        model,
        "--norm",
        norm,
        "--epochs",
        "1",
        "--batch-size",
        "16",
    ]);
    run.join("model.safetensors")
}

#[test]
fn export_writes_a_checked_file_and_refuses_bad_input_writing_nothing() {
    let t = tmp();
    let data = t.path().join("data");
    write_dataset(&data, 64, 20, false);
    let ckpt = train(&t, &data, "seed-cnn:4", "bn");
    let out = t.path().join("m.onnx");
    let printed = ok(&["export", "--checkpoint", s(&ckpt), "--out", s(&out)]);
    assert!(
        printed.contains("opset 21") && printed.contains("parsed back"),
        "{printed}"
    );
    let bytes = std::fs::read(&out).unwrap();
    // An ONNX ModelProto starts with field 1 (ir_version, varint 10).
    assert_eq!(&bytes[..2], &[0x08, 10]);

    // An existing file is kept without --force, replaced with it.
    std::fs::write(&out, b"keep me").unwrap();
    let err = fails(&["export", "--checkpoint", s(&ckpt), "--out", s(&out)]);
    assert!(err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    ok(&[
        "export",
        "--checkpoint",
        s(&ckpt),
        "--out",
        s(&out),
        "--force",
        "--fold",
    ]);
    assert_ne!(std::fs::read(&out).unwrap(), b"keep me");

    // The checkpoint is never the output.
    let err = fails(&["export", "--checkpoint", s(&ckpt), "--out", s(&ckpt), "--force"]);
    assert!(err.contains("input"), "{err}");

    let nothing = t.path().join("nothing.onnx");
    let missing = t.path().join("missing.safetensors");
    let err = fails(&["export", "--checkpoint", s(&missing), "--out", s(&nothing)]);
    assert!(err.contains("missing.safetensors"), "{err}");
    let junk = t.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a model at all").unwrap();
    fails(&["export", "--checkpoint", s(&junk), "--out", s(&nothing)]);

    // BN without running statistics has no eval-mode form; GroupNorm has nothing to fold.
    let untracked = train(&t, &data, "seed-cnn:4", "bn:track=false");
    let err = fails(&["export", "--checkpoint", s(&untracked), "--out", s(&nothing)]);
    assert!(err.contains("track=false") && err.contains("bn1"), "{err}");
    let ln_lstm = train(&t, &data, "lstm:4", "ln");
    let err = fails(&["export", "--checkpoint", s(&ln_lstm), "--out", s(&nothing)]);
    assert!(err.contains("--norm none"), "{err}");
    let gn = train(&t, &data, "seed-cnn:4", "gn:2");
    let err = fails(&["export", "--checkpoint", s(&gn), "--out", s(&nothing), "--fold"]);
    assert!(err.contains("fold"), "{err}");
    let vit_bn = train(&t, &data, "vit:8,1,2,14", "bn");
    let err = fails(&["export", "--checkpoint", s(&vit_bn), "--out", s(&nothing), "--fold"]);
    assert!(
        err.contains("residual sums") && err.contains("nothing to fold"),
        "{err}"
    );
    assert!(!nothing.exists(), "a refused export wrote {}", nothing.display());
}

/// Every model and every norm with an eval-mode form, plain and folded, against ONNX Runtime
/// (scripts/check_onnx.py: onnx.checker, logits within 1e-4, same classes).
#[test]
fn onnx_runtime_gives_normlabs_logits() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let Some(python) = venv_python("onnx, onnxruntime, safetensors") else {
        return;
    };
    let t = tmp();
    let data = t.path().join("data");
    write_dataset(&data, 64, 40, false);
    let mut checkpoints: Vec<PathBuf> = [
        ("seed-cnn:6", "bn"),
        ("mlp", "bn"),
        ("vgg:4,M,8,M", "bn"),
        ("resnet:2,2,3,3,4,4", "bn"),
        ("vgg:4,M,8,M", "gn:2"),
        ("mlp", "ln"),
        ("seed-cnn:6", "layernorm"),
        ("seed-cnn:6", "rms"),
        ("mlp", "rms"),
        ("seed-cnn:6", "in:affine=true"),
        ("seed-cnn:6", "in:track=true"),
        ("seed-cnn:6", "bn-l1"),
        ("seed-cnn:6", "brn"),
        ("vgg:4,M,8,M", "none"),
        ("lstm:6,2", "none"),
        ("vit:8,1,2,7", "layernorm:eps=1e-6"),
        ("vit:8,2,2,7,2,post", "rms"),
        ("vit:8,1,2,14", "bn"),
    ]
    .iter()
    .map(|(m, n)| train(&t, &data, m, n))
    .collect();
    // Pruned by network slimming: narrower layers under the same names.
    for (i, ckpt) in checkpoints
        .clone()
        .iter()
        .enumerate()
        .filter(|(i, _)| [2, 3].contains(i))
    {
        let pruned = t.path().join(format!("pruned-{i}"));
        ok(&[
            "prune",
            "--checkpoint",
            s(ckpt),
            "--percent",
            "0.3",
            "--out",
            s(&pruned),
            "--data",
            s(&data),
        ]);
        checkpoints.push(pruned.join("model.safetensors"));
    }
    let out = std::process::Command::new(&python)
        .arg(root.join("scripts/check_onnx.py"))
        .args(["--normlab", env!("CARGO_BIN_EXE_normlab"), "--work"])
        .arg(t.path().join("onnx"))
        .args(["--data", s(&data)])
        .args(&checkpoints)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    // Plain and folded for the six BN-family checkpoints and the two pruned ones, plain for
    // the other nine (the LSTM as ONNX's LSTM operator; RMSNorm as its decomposition) and the
    // three ViTs (their norms follow residual sums: nothing to fold).
    assert_eq!(stdout.matches("PASS").count(), 2 * 8 + 9 + 3, "{stdout}");
}
