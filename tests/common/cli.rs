//! Running the `normlab` binary on small synthetic IDX data.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};

pub fn normlab(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_normlab"))
        .args(args)
        .env_remove("NORMLAB_DATA")
        .output()
        .unwrap()
}

pub fn ok(args: &[&str]) -> String {
    let out = normlab(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "normlab {args:?} failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Runs a command that must fail; returns its error line after checking there is exactly one
/// `error:` line and no panic.
pub fn fails(args: &[&str]) -> String {
    let out = normlab(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "normlab {args:?} should fail");
    assert!(!stderr.contains("panicked"), "normlab {args:?} panicked: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "want one error line for {args:?}, got: {stderr}");
    errors[0].to_string()
}

pub fn idx_bytes(dims: &[u32], payload: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        b.extend_from_slice(&d.to_be_bytes());
    }
    b.extend_from_slice(payload);
    b
}

/// A learnable toy set in MNIST format: class k lights rows 2k..2k+3, plus noise.
pub fn write_dataset(dir: &Path, train: usize, test: usize, gz_train: bool) {
    std::fs::create_dir_all(dir).unwrap();
    let make = |n: usize, salt: u32| {
        let (mut images, mut labels) = (Vec::new(), Vec::new());
        for i in 0..n {
            let label = (i % 10) as u8;
            labels.push(label);
            for p in 0..784u32 {
                let row = p / 28;
                let noise = ((p.wrapping_mul(2654435761) ^ (i as u32 + salt).wrapping_mul(40503)) >> 7) % 60;
                let on = row >= 2 * label as u32 && row < 2 * label as u32 + 3;
                images.push(if on { 180 + noise as u8 } else { noise as u8 });
            }
        }
        (images, labels)
    };
    let (ti, tl) = make(train, 0);
    let (vi, vl) = make(test, 99);
    let img = idx_bytes(&[train as u32, 28, 28], &ti);
    if gz_train {
        let f = std::fs::File::create(dir.join("train-images-idx3-ubyte.gz")).unwrap();
        let mut e = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        e.write_all(&img).unwrap();
        e.finish().unwrap();
    } else {
        std::fs::write(dir.join("train-images-idx3-ubyte"), img).unwrap();
    }
    std::fs::write(dir.join("train-labels-idx1-ubyte"), idx_bytes(&[train as u32], &tl)).unwrap();
    std::fs::write(
        dir.join("t10k-images-idx3-ubyte"),
        idx_bytes(&[test as u32, 28, 28], &vi),
    )
    .unwrap();
    std::fs::write(dir.join("t10k-labels-idx1-ubyte"), idx_bytes(&[test as u32], &vl)).unwrap();
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn metrics(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("metrics.json")).unwrap()).unwrap()
}

/// The per-epoch numbers without the timings, which legitimately differ between runs.
pub fn learning_curve(m: &serde_json::Value) -> Vec<(f64, f64, f64, f64)> {
    m["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let f = |k: &str| e[k].as_f64().unwrap();
            (f("train_loss"), f("train_accuracy"), f("test_loss"), f("test_accuracy"))
        })
        .collect()
}

pub fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<u8>)> = st.tensors().into_iter().map(|(n, t)| (n, t.data().to_vec())).collect();
    v.sort();
    v
}

pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// A safetensors file's metadata (None: the file has none).
pub type Metadata = Option<std::collections::HashMap<String, String>>;

/// Rewrites a safetensors file: `edit` may change each tensor and the metadata.
pub fn rewrite_safetensors(
    from: &Path,
    to: &Path,
    edit: &mut dyn FnMut(&mut Vec<normlab::checkpoint::Entry>, &mut Metadata),
) {
    let bytes = std::fs::read(from).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, md) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut md = md.metadata().clone();
    let mut entries: Vec<normlab::checkpoint::Entry> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| normlab::checkpoint::Entry {
            name: n,
            dtype: v.dtype(),
            shape: v.shape().to_vec(),
            bytes: v.data().to_vec(),
        })
        .collect();
    edit(&mut entries, &mut md);
    std::fs::write(
        to,
        normlab::checkpoint::serialize(&entries, md.unwrap_or_default()).unwrap(),
    )
    .unwrap();
}

/// A toy data set of `train`/`test` images in `t/data` and a 1-epoch run on it in `t/run`
/// with `--batch-size batch`; returns (data folder, run folder).
pub fn trained_run(
    t: &tempfile::TempDir,
    train: usize,
    test: usize,
    batch: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let data = t.path().join("data");
    write_dataset(&data, train, test, false);
    let run = t.path().join("run");
    ok(&[
        "train",
        "--data",
        s(&data),
        "--out",
        s(&run),
        "--epochs",
        "1",
        "--batch-size",
        batch,
    ]);
    (data, run)
}

/// The venv of scripts/ when it exists and imports every one of `modules` (comma-separated, as
/// Python's import takes them); None, and a note on stderr, otherwise: such tests skip.
pub fn venv_python(modules: &str) -> Option<std::path::PathBuf> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-torch/bin/python");
    let ok = python.exists()
        && Command::new(&python)
            .args(["-c", &format!("import {modules}")])
            .status()
            .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipped: needs .venv-torch with {modules}");
    }
    ok.then_some(python)
}

/// `normlab train` on `data` into `t/name` with batch 16 and the `extra` options.
pub fn train_batch16(t: &tempfile::TempDir, data: &Path, name: &str, extra: &[&str]) -> std::path::PathBuf {
    let out = t.path().join(name);
    let mut args = vec!["train", "--data", s(data), "--out", s(&out), "--batch-size", "16"];
    args.extend_from_slice(extra);
    ok(&args);
    out
}

/// Trains `extra` for 2 epochs in one go and for 1 then `--resume` to 2, and asserts both give
/// the same learning curve and weights; returns the two-epoch run.
pub fn resumes_exactly(t: &tempfile::TempDir, data: &Path, name: &str, extra: &[&str]) -> std::path::PathBuf {
    let whole = train_batch16(t, data, &format!("{name}-2"), &[extra, &["--epochs", "2"]].concat());
    let half = train_batch16(t, data, &format!("{name}-1"), &[extra, &["--epochs", "1"]].concat());
    ok(&["train", "--resume", s(&half), "--epochs", "2"]);
    assert_eq!(
        learning_curve(&metrics(&whole)),
        learning_curve(&metrics(&half)),
        "{name}"
    );
    assert_eq!(
        tensors(&whole.join("model.safetensors")),
        tensors(&half.join("model.safetensors")),
        "{name}"
    );
    whole
}
