//! Untrusted input gets one clear error, never a panic or an abort; outputs never replace
//! what they must not; numbers never hide a NaN; and the help a newcomer reads is complete.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::cli::*;
use normlab::checkpoint::{serialize, Entry};

fn trained(t: &tempfile::TempDir) -> (PathBuf, PathBuf) {
    trained_run(t, 64, 32, "32")
}

fn bytes_of(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

#[test]
fn outputs_never_replace_devices_links_inputs_or_other_runs() {
    let t = tmp();
    let (data, run) = trained(&t);
    let (d, model) = (s(&data), run.join("model.safetensors"));
    let m = s(&model);
    let before = bytes_of(&model);

    // A device is written through, not replaced (as root the old rename replaced /dev/null,
    // which is why this test makes its own null device: a regression must not break the
    // machine's). mknod needs root; without it the FIFO below covers write-through.
    let null = t.path().join("null");
    let made = Command::new("mknod")
        .args([s(&null), "c", "1", "3"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|st| st.success());
    if made {
        ok(&["eval", "--checkpoint", m, "--data", d, "--predictions", s(&null)]);
        assert!(std::fs::symlink_metadata(&null).unwrap().file_type().is_char_device());
    }
    // A FIFO is written through: its reader gets the predictions.
    let fifo = t.path().join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read_to_string(fifo).unwrap())
    };
    ok(&["eval", "--checkpoint", m, "--data", d, "--predictions", s(&fifo)]);
    let got: Vec<u8> = serde_json::from_str(&reader.join().unwrap()).unwrap();
    assert_eq!(got.len(), 32);
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    // A link is never replaced, and what it points to is untouched.
    let target = t.path().join("target.json");
    std::fs::write(&target, b"keep").unwrap();
    let link = t.path().join("link.json");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let err = fails(&["eval", "--checkpoint", m, "--data", d, "--predictions", s(&link)]);
    assert!(err.contains("symbolic link"), "{err}");
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert_eq!(bytes_of(&target), b"keep");

    // No command overwrites its input or another run's files without --force.
    let err = fails(&["eval", "--checkpoint", m, "--data", d, "--predictions", m]);
    assert!(err.contains("never overwrites its input"), "{err}");
    let err = fails(&["eval", "--checkpoint", m, "--data", d, "--predictions", m, "--force"]);
    assert!(err.contains("never overwrites its input"), "{err}");
    let nowhere = run.join("nonexistent/..");
    let err = fails(&["fold", "--checkpoint", m, "--data", d, "--out", s(&nowhere)]);
    assert!(err.contains("input"), "{err}");
    assert!(!run.join("nonexistent").exists(), "a refused command creates nothing");
    let other = t.path().join("other");
    ok(&[
        "train",
        "--data",
        d,
        "--out",
        s(&other),
        "--epochs",
        "1",
        "--batch-size",
        "32",
    ]);
    let other_model = bytes_of(&other.join("model.safetensors"));
    let err = fails(&["fold", "--checkpoint", m, "--data", d, "--out", s(&other)]);
    assert!(err.contains("already holds") && err.contains("--force"), "{err}");
    let err = fails(&[
        "prune",
        "--checkpoint",
        m,
        "--data",
        d,
        "--out",
        s(&other),
        "--percent",
        "0.5",
    ]);
    assert!(err.contains("already holds"), "{err}");
    assert_eq!(bytes_of(&other.join("model.safetensors")), other_model);
    ok(&["fold", "--checkpoint", m, "--data", d, "--out", s(&other), "--force"]);
    let metrics = run.join("metrics.json");
    let metrics_before = bytes_of(&metrics);
    let err = fails(&["bench", "--quick", "--filter", "nothing", "--json", s(&metrics)]);
    assert!(err.contains("already exists") && err.contains("--force"), "{err}");
    assert_eq!(bytes_of(&metrics), metrics_before);
    let input = t.path().join("in.safetensors");
    let x: Vec<f32> = (0..16).map(|i| i as f32).collect();
    std::fs::write(
        &input,
        serialize(&[Entry::f32("x".into(), &[4, 4], &x)], HashMap::new()).unwrap(),
    )
    .unwrap();
    let layer_in = bytes_of(&input);
    let err = fails(&[
        "layer",
        "--spec",
        "bn",
        "--input",
        s(&input),
        "--output",
        s(&input),
        "--force",
    ]);
    assert!(err.contains("never overwrites its input"), "{err}");
    assert_eq!(bytes_of(&input), layer_in);
    // A study never writes into a training run's folder.
    let err = fails(&["study", "ics", "--quick", "--data", d, "--out", s(&run)]);
    assert!(err.contains("already holds"), "{err}");
    assert_eq!(bytes_of(&model), before, "the input checkpoint is never modified");
}

/// A checkpoint whose metadata says `key` = `value`, with the tensors of `model`.
fn with_metadata(model: &Path, out: &Path, key: &str, value: &str) {
    rewrite_safetensors(model, out, &mut |_, md| {
        md.get_or_insert_with(HashMap::new).insert(key.into(), value.into());
    });
}

#[test]
fn hostile_files_get_an_error_never_a_panic_or_an_abort() {
    let t = tmp();
    let (data, run) = trained(&t);
    let d = s(&data);
    let model = run.join("model.safetensors");
    let md: HashMap<String, String> = {
        let b = bytes_of(&model);
        let (_, m) = safetensors::SafeTensors::read_metadata(&b).unwrap();
        m.metadata().clone().unwrap()
    };
    let spec: serde_json::Value = serde_json::from_str(&md["normlab.model"]).unwrap();
    let forged = t.path().join("forged.safetensors");
    let cases: Vec<(serde_json::Value, &str)> = vec![
        (serde_json::json!({"input": [1, 1, 1]}), "at least 2x2"),
        (serde_json::json!({"input": [1, 0, 0]}), "input shape"),
        (serde_json::json!({"classes": 1u64 << 40}), "classes"),
        (serde_json::json!({"model": "seed-cnn:100000000"}), "1..=4096"),
        (
            serde_json::json!({"model": "vgg:4096,4096,4096,4096,4096,4096,4096,4096,4096,4096,4096,4096,4096,4096,4096,4096,4096,4096,4096,4096"}),
            "limit",
        ),
        (serde_json::json!({"model": "seed-cnn:4096"}), "more than the file"),
    ];
    for (patch, want) in cases {
        let mut s2 = spec.clone();
        for (k, v) in patch.as_object().unwrap() {
            s2[k] = v.clone();
        }
        with_metadata(&model, &forged, "normlab.model", &s2.to_string());
        let err = fails(&["eval", "--checkpoint", s(&forged), "--data", d]);
        assert!(err.contains(want), "{patch}: want '{want}' in {err}");
    }
    let err = fails(&["eval", "--checkpoint", "/dev/zero", "--data", d]);
    assert!(err.contains("not a regular file"), "{err}");
    let err = fails(&["eval", "--checkpoint", s(&run), "--data", d]);
    assert!(
        err.contains("did you mean") && err.contains("model.safetensors"),
        "{err}"
    );

    // IDX images of 1x28 and 28x1 are refused for seed-cnn with a reason, not a panic.
    for (h, w) in [(1u32, 28u32), (28, 1)] {
        let dir = t.path().join(format!("idx{h}x{w}"));
        write_dataset(&dir, 20, 10, false);
        let n = (h * w) as usize;
        std::fs::write(
            dir.join("train-images-idx3-ubyte"),
            idx_bytes(&[20, h, w], &vec![7; 20 * n]),
        )
        .unwrap();
        std::fs::write(
            dir.join("t10k-images-idx3-ubyte"),
            idx_bytes(&[10, h, w], &vec![7; 10 * n]),
        )
        .unwrap();
        let err = fails(&["train", "--data", s(&dir), "--out", s(&dir.join("r")), "--epochs", "1"]);
        assert!(err.contains("at least 2x2"), "{err}");
    }
    // Model widths beyond the documented limits.
    for m in ["vgg:100000", "seed-cnn:18446744073709551615", "seed-cnn:0"] {
        let err = fails(&["train", "--data", d, "--model", m, "--out", s(&t.path().join("w"))]);
        assert!(err.contains("4096"), "{m}: {err}");
    }

    // A multi-member gzip (pigz, bgzip, cat a.gz b.gz) is read whole.
    let multi = t.path().join("multi");
    write_dataset(&multi, 40, 10, false);
    let raw = bytes_of(&multi.join("train-images-idx3-ubyte"));
    let gz = |b: &[u8]| {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    };
    let mut two = gz(&raw[..1000]);
    two.extend(gz(&raw[1000..]));
    std::fs::remove_file(multi.join("train-images-idx3-ubyte")).unwrap();
    std::fs::write(multi.join("train-images-idx3-ubyte.gz"), two).unwrap();
    ok(&[
        "train",
        "--data",
        s(&multi),
        "--out",
        s(&multi.join("r")),
        "--epochs",
        "1",
        "--batch-size",
        "8",
    ]);
    // A gzip bomb: the header promises 40 images, 400 MB of zeros follow; refused at once.
    let mut bomb = raw.clone();
    bomb.extend(std::iter::repeat_n(0u8, 400 << 20));
    std::fs::remove_file(multi.join("train-images-idx3-ubyte.gz")).unwrap();
    std::fs::write(multi.join("train-images-idx3-ubyte.gz"), gz(&bomb)).unwrap();
    let t0 = std::time::Instant::now();
    let err = fails(&[
        "train",
        "--data",
        s(&multi),
        "--out",
        s(&multi.join("r2")),
        "--epochs",
        "1",
    ]);
    assert!(err.contains("has more"), "{err}");
    assert!(
        t0.elapsed().as_secs() < 5,
        "the bomb was decompressed: {:?}",
        t0.elapsed()
    );
}

#[test]
fn options_are_checked_and_errors_name_the_flag() {
    let t = tmp();
    let (data, run) = trained(&t);
    let (d, m) = (s(&data), run.join("model.safetensors"));
    let o_path = t.path().join("o");
    let o = s(&o_path);
    for (args, want) in [
        (
            vec!["train", "--data", d, "--out", o, "--threads", "10000"],
            "--threads",
        ),
        (vec!["train", "--data", d, "--out", o, "--lr", "nan"], "--lr"),
        (vec!["train", "--data", d, "--out", o, "--lr", "inf"], "--lr"),
        (
            vec!["train", "--data", d, "--out", o, "--test-limit", "0"],
            "--test-limit",
        ),
        (
            vec!["eval", "--checkpoint", s(&m), "--data", d, "--test-limit", "0"],
            "--test-limit",
        ),
        (
            vec![
                "fold",
                "--checkpoint",
                s(&m),
                "--data",
                d,
                "--out",
                o,
                "--test-limit",
                "0",
            ],
            "--test-limit",
        ),
        (
            vec!["compare", "--data", d, "--out", o, "--batch-sizes", "8.5"],
            "--batch-sizes",
        ),
        (vec!["compare", "--data", d, "--out", o, "--lrs", "0.1,nan"], "--lrs"),
        (vec!["bench", "--shape", "8,0,4,4"], "--shape"),
        (vec!["bench", "--shape", "65536,65536,1,1"], "2^26 values"),
        (vec!["bench", "--shape", "8,4,4"], "--shape"),
        (
            vec!["train", "--resume", s(&run), "--lr", "0.5", "--seed", "9"],
            "--lr 0.5",
        ),
        (vec!["train", "--resume", s(&run), "--model", "mlp"], "--model mlp"),
        (
            vec!["train", "--resume", s(&run), "--batch-size", "7"],
            "--batch-size 7",
        ),
    ] {
        let err = fails(&args);
        assert!(err.contains(want), "{args:?}: want '{want}' in {err}");
    }
    ok(&["train", "--resume", s(&run), "--epochs", "2", "--batch-size", "32"]);
    let err = fails(&["train", "--resume", s(&run), "--epochs", "1"]);
    assert!(err.contains("fewer than the 2 epochs"), "{err}");
    // A NORMLAB_DATA that does not hold the files is an error, not a silent fall back.
    let out = Command::new(env!("CARGO_BIN_EXE_normlab"))
        .args(["train", "--out", o, "--epochs", "1"])
        .env("NORMLAB_DATA", t.path().join("nowhere"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NORMLAB_DATA="));
    // Validate first, announce after: a bad spec prints no run folder or table header.
    let out = normlab(&["train", "--data", d, "--out", o, "--norm", "whiten"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
    // The data folder in use is on screen.
    let text = ok(&["eval", "--checkpoint", s(&m), "--data", d]);
    assert!(text.contains(&format!("data: {d}")), "{text}");
}

#[test]
fn numbers_never_hide_a_nan_or_a_divergence() {
    let t = tmp();
    let (data, run) = trained(&t);
    let d = s(&data);
    // A NaN weight gives a NaN loss (JSON null), not 0 (the fused ReLU used to zero it).
    let model = run.join("model.safetensors");
    let nan = t.path().join("nan.safetensors");
    rewrite_safetensors(&model, &nan, &mut |entries, _| {
        let w = entries.iter_mut().find(|e| e.name == "conv1.weight").unwrap();
        w.bytes[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    let j: serde_json::Value =
        serde_json::from_str(ok(&["eval", "--checkpoint", s(&nan), "--data", d, "--json"]).trim()).unwrap();
    assert!(j["test_loss"].is_null(), "NaN loss must not read as a number: {j}");

    // SGD at lr 1000 with BN: running_var overflows; AdamW with weight decay 1e10: the test
    // loss is NaN. Both are divergence, not a complete run.
    for (i, extra) in [
        vec!["--optimizer", "sgd", "--lr", "1000"],
        vec!["--optimizer", "adamw", "--weight-decay", "1e10"],
    ]
    .into_iter()
    .enumerate()
    {
        let out = t.path().join(format!("div{i}"));
        let mut args = vec![
            "train",
            "--data",
            d,
            "--out",
            s(&out),
            "--epochs",
            "2",
            "--batch-size",
            "16",
        ];
        args.extend(extra);
        let err = fails(&args);
        assert!(err.contains("training diverged"), "{err}");
        assert_eq!(metrics(&out)["status"], "diverged");
    }
    // Near the f32 limit, a clear error instead of NaN.
    let input = t.path().join("big.safetensors");
    let x: Vec<f32> = (0..16).map(|i| if (i / 4) % 2 == 0 { 3e38 } else { -3e38 }).collect();
    std::fs::write(
        &input,
        serialize(&[Entry::f32("x".into(), &[4, 4], &x)], HashMap::new()).unwrap(),
    )
    .unwrap();
    let err = fails(&[
        "layer",
        "--spec",
        "bn",
        "--input",
        s(&input),
        "--output",
        s(&t.path().join("y")),
    ]);
    assert!(err.contains("overflow"), "{err}");
}

#[test]
fn help_lists_every_flag_with_what_it_takes() {
    let subcommands = [
        "train", "eval", "fold", "prune", "study", "compare", "report", "bench", "layer",
    ];
    for sub in subcommands {
        let help = ok(&[sub, "--help"]);
        assert!(help.contains("Example"), "{sub} --help has no example:\n{help}");
        // Every option line is followed by a description (clap puts it on the next line).
        let lines: Vec<&str> = help.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            let l = l.trim_start();
            if l.starts_with("--") && !l.starts_with("--help") && !l.starts_with("--version") {
                let desc = lines.get(i + 1).map_or("", |n| n.trim());
                assert!(!desc.is_empty(), "{sub}: {l} has no description");
            }
        }
    }
    let train = ok(&["train", "--help"]);
    for want in [
        "resnet",
        "seed-cnn[:W]",
        "normlab norms",
        "[default: 128]",
        "sgd, adam or adamw",
        "50%",
    ] {
        assert!(train.contains(want), "train --help lacks '{want}'");
    }
    assert!(ok(&["norms"]).contains("bn-noisy"));
    let err = fails(&["study", "nonsense"]);
    for study in ["batch-size", "learning-rate", "regularization", "ics", "landscape"] {
        assert!(err.contains(study), "{err}");
    }
}
