//! The lstm model through the ordinary commands: training with every recurrent norm, resume,
//! PyTorch loading its plain checkpoint, and one clear error for each kind of bad input.

mod common;

use std::path::Path;

use common::cli::*;

#[test]
fn every_recurrent_norm_trains_and_resumes_exactly() {
    let t = tmp();
    let data = t.path().join("data");
    write_dataset(&data, 96, 40, false);
    for norm in ["none", "ln", "bn", "bn-shared"] {
        let whole = resumes_exactly(&t, &data, norm, &["--model", "lstm:8", "--norm", norm]);
        let names: Vec<String> = tensors(&whole.join("model.safetensors"))
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert!(names.contains(&"lstm.weight_ih_l0".to_string()) && names.contains(&"fc.weight".to_string()));
        if norm == "bn" {
            // Per-step running statistics: one row per time step.
            assert!(names.contains(&"lstm.bn_c_l0.running_mean".to_string()), "{names:?}");
        }
        let ckpt = whole.join("model.safetensors");
        ok(&["eval", "--checkpoint", s(&ckpt), "--data", s(&data)]);
        if norm != "none" {
            // Nothing outside the recurrence can absorb its norm; the error says so.
            let err = fails(&["eval", "--checkpoint", s(&ckpt), "--data", s(&data), "--fold"]);
            assert!(err.contains("inside its recurrence"), "{err}");
        }
    }
}

#[test]
fn pytorch_loads_the_plain_lstm_and_predicts_the_same_classes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv-torch/bin/python");
    if !python.exists() {
        eprintln!("skipped: needs .venv-torch (PyTorch)");
        return;
    }
    let t = tmp();
    let data = t.path().join("data");
    write_dataset(&data, 96, 40, false);
    let run = train_batch16(
        &t,
        &data,
        "plain",
        &["--norm", "none", "--epochs", "1", "--model", "lstm:6,2"],
    );
    let out = std::process::Command::new(&python)
        .arg(root.join("scripts/check_pytorch_load.py"))
        .arg(run.join("model.safetensors"))
        .arg(&data)
        .env("NORMLAB", env!("CARGO_BIN_EXE_normlab"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("differ: 0 of 40"), "{stdout}");
}

#[test]
fn bad_lstm_input_gets_one_clear_line() {
    let t = tmp();
    let data = t.path().join("data");
    write_dataset(&data, 33, 10, false);
    let out = t.path().join("never");
    let run = |extra: &[&str]| {
        let mut args = vec!["train", "--data", s(&data), "--out", s(&out), "--epochs", "1"];
        args.extend_from_slice(extra);
        fails(&args)
    };
    assert!(run(&["--model", "lstm:0"]).contains("hidden size"));
    assert!(run(&["--model", "lstm:8,99"]).contains("layer count"));
    for norm in ["gn:2", "in", "ghost:2"] {
        let err = run(&["--model", "lstm:8", "--norm", norm]);
        assert!(err.contains("none, ln") && err.contains("bn-shared"), "{err}");
    }
    // 33 samples in batches of 16 leave a last batch of 1.
    let err = run(&["--model", "lstm:8", "--norm", "bn", "--batch-size", "16"]);
    assert!(err.contains("batch of 1"), "{err}");
    let err = run(&[
        "--model",
        "lstm:8",
        "--norm",
        "bn",
        "--batch-size",
        "11",
        "--freeze-bn",
        "stats",
    ]);
    assert!(err.contains("per-time-step"), "{err}");
    let err = run(&["--model", "seed-cnn", "--norm", "bn-shared"]);
    assert!(err.contains("time steps"), "{err}");
    // Colour images are not a sequence of grey rows.
    let cifar = t.path().join("cifar");
    std::fs::create_dir_all(&cifar).unwrap();
    let record: Vec<u8> = std::iter::once(1u8).chain(std::iter::repeat_n(9u8, 3072)).collect();
    for b in 1..=5 {
        std::fs::write(cifar.join(format!("data_batch_{b}.bin")), record.repeat(4)).unwrap();
    }
    std::fs::write(cifar.join("test_batch.bin"), record.repeat(2)).unwrap();
    let err = fails(&["train", "--data", s(&cifar), "--out", s(&out), "--model", "lstm:8"]);
    assert!(err.contains("grey image row by row"), "{err}");
    assert!(!out.exists());
}
