//! Trust, round two: no silently missing data (every command says what it read), no abort
//! when memory runs out, no panic on a full or closed stdout, and counters from files checked
//! before use. Each test here failed on the code before this round.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::cli::*;

fn write_cifar(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let record: Vec<u8> = std::iter::once(3u8).chain(std::iter::repeat_n(100u8, 3072)).collect();
    for b in 1..=5 {
        std::fs::write(dir.join(format!("data_batch_{b}.bin")), record.repeat(4)).unwrap();
    }
    std::fs::write(dir.join("test_batch.bin"), record.repeat(4)).unwrap();
}

/// One epoch of a tiny vgg on `data` into `out`, as arguments.
fn tiny_train(data: &Path, out: &Path) -> Vec<String> {
    let args = [
        "train",
        "--data",
        s(data),
        "--out",
        s(out),
        "--model",
        "vgg:4,M",
        "--epochs",
        "1",
        "--batch-size",
        "4",
    ];
    args.map(String::from).to_vec()
}

#[test]
fn a_cifar_folder_missing_a_batch_is_an_error_naming_it_and_a_whole_one_is_counted() {
    let t = tmp();
    let data = t.path().join("cifar");
    write_cifar(&data);
    let out = t.path().join("run");
    let args = |out: &Path| tiny_train(&data, out);
    let run = |out: &Path| fails(&args(out).iter().map(String::as_str).collect::<Vec<_>>());
    let second = data.join("data_batch_2.bin");
    let keep = std::fs::read(&second).unwrap();
    // Missing, a folder, a dangling link, a looping link, a link to a device.
    std::fs::remove_file(&second).unwrap();
    let err = run(&out);
    assert!(err.contains("data_batch_2.bin") && err.contains("missing"), "{err}");
    std::fs::create_dir(&second).unwrap();
    assert!(run(&out).contains("data_batch_2.bin"));
    std::fs::remove_dir(&second).unwrap();
    std::os::unix::fs::symlink(t.path().join("nowhere"), &second).unwrap();
    assert!(run(&out).contains("data_batch_2.bin"));
    std::fs::remove_file(&second).unwrap();
    std::os::unix::fs::symlink(&second, &second).unwrap();
    assert!(run(&out).contains("data_batch_2.bin"));
    std::fs::remove_file(&second).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &second).unwrap();
    assert!(run(&out).contains("data_batch_2.bin"));
    assert!(!out.exists(), "a refused run wrote its folder");
    // Whole: one line says what was read.
    std::fs::remove_file(&second).unwrap();
    std::fs::write(&second, keep).unwrap();
    let stdout = ok(&args(&out).iter().map(String::as_str).collect::<Vec<_>>());
    let line = stdout.lines().find(|l| l.starts_with("data: ")).unwrap();
    assert!(
        line.contains("(CIFAR-10)")
            && line.contains("20 training and 4 test images")
            && line.contains("10 classes, 3x32x32"),
        "{line}"
    );
}

#[test]
fn an_image_folder_counts_what_it_skips_and_refuses_links_it_cannot_follow() {
    let t = tmp();
    let data = t.path().join("folder");
    for split in ["train", "test"] {
        for class in ["a", "b"] {
            let d = data.join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..4 {
                image::GrayImage::from_fn(8, 8, |x, y| image::Luma([(x * y + i) as u8]))
                    .save(d.join(format!("{i}.png")))
                    .unwrap();
            }
        }
    }
    std::fs::write(data.join("train/a/.DS_Store"), b"x").unwrap();
    std::fs::write(data.join("train/b/notes.txt"), b"x").unwrap();
    std::fs::write(data.join("train/README"), b"x").unwrap();
    let out = t.path().join("run");
    let train = |out: &Path| tiny_train(&data, out);
    let stdout = ok(&train(&out).iter().map(String::as_str).collect::<Vec<_>>());
    let line = stdout.lines().find(|l| l.starts_with("data: ")).unwrap();
    assert!(
        line.contains("(image folder)")
            && line.contains("8 training and 8 test images, 2 classes, 1x8x8")
            && line.contains("skipped 3 files (1 hidden, 1 not .png/.jpg/.jpeg, 1 beside the class folders)"),
        "{line}"
    );
    // A class folder that is a looping or dangling link, an image name that is a folder.
    let looped = data.join("train/c");
    std::os::unix::fs::symlink(&looped, &looped).unwrap();
    let other = t.path().join("run2");
    let err = fails(&train(&other).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("train/c") && err.contains("looping link"), "{err}");
    std::fs::remove_file(&looped).unwrap();
    std::os::unix::fs::symlink(t.path().join("gone"), &looped).unwrap();
    let err = fails(&train(&other).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("train/c"), "{err}");
    std::fs::remove_file(&looped).unwrap();
    std::fs::create_dir(data.join("train/a/9.png")).unwrap();
    let err = fails(&train(&other).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("9.png") && err.contains("not a regular file"), "{err}");
    assert!(!other.exists());
}

#[test]
fn eval_says_what_it_read() {
    let t = tmp();
    let (data, run) = trained_run(&t, 40, 20, "20");
    let stdout = ok(&[
        "eval",
        "--checkpoint",
        s(&run.join("model.safetensors")),
        "--data",
        s(&data),
        "--test-limit",
        "10",
    ]);
    assert!(
        stdout.contains("(IDX): 10 of 20 test images, 10 classes, 1x28x28"),
        "{stdout}"
    );
}

/// Runs normlab under `ulimit -v KB` in a shell.
fn limited(kb: usize, args: &[&str]) -> std::process::Output {
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    Command::new("bash")
        .args([
            "-c",
            &format!(
                "ulimit -v {kb} && exec '{}' {}",
                env!("CARGO_BIN_EXE_normlab"),
                quoted.join(" ")
            ),
        ])
        .env_remove("NORMLAB_DATA")
        .output()
        .unwrap()
}

#[test]
fn a_run_larger_than_memory_is_refused_with_its_need_not_aborted() {
    let t = tmp();
    let data = t.path().join("folder");
    for split in ["train", "test"] {
        for class in ["a", "b"] {
            let d = data.join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..4u8 {
                image::GrayImage::from_fn(8, 8, |x, _| image::Luma([x as u8 * 9 + i]))
                    .save(d.join(format!("{i}.png")))
                    .unwrap();
            }
        }
    }
    let out = t.path().join("run");
    // vgg at 1024x1024 keeps ~200 MB of activations per image: 8 images do not fit in 1.5 GB.
    let o = limited(
        1_500_000,
        &[
            "train",
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--model",
            "vgg:16,M,32,M",
            "--resize",
            "1024x1024",
            "--batch-size",
            "8",
            "--epochs",
            "1",
            "--threads",
            "1",
        ],
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    assert_eq!(o.status.code(), Some(1), "killed by a signal (an abort?): {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("out of memory") && errors[0].contains("activations") && errors[0].contains("--batch-size"),
        "{stderr}"
    );
    assert!(!out.exists(), "a refused run wrote its folder");
}

#[test]
fn a_tensor_too_large_for_memory_is_an_error() {
    let mut x = normlab::Tensor::default();
    let e = x.resize_to(&[1 << 20, 1 << 20, 1 << 10]).unwrap_err();
    assert!(e.to_string().contains("out of memory"), "{e}");
    let e = x.resize_to(&[usize::MAX, 2]).unwrap_err();
    assert!(e.to_string().contains("out of memory"), "{e}");
}

#[test]
fn a_full_stdout_is_one_error_line_and_the_run_stays_resumable() {
    let t = tmp();
    let data = t.path().join("data");
    write_dataset(&data, 40, 20, false);
    let out = t.path().join("run");
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_normlab"))
        .args([
            "train",
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--epochs",
            "2",
            "--batch-size",
            "20",
        ])
        .stdout(full)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains("standard output"), "{stderr}");
    // The folder resumes and finishes.
    ok(&["train", "--resume", s(&out)]);
    assert_eq!(metrics(&out)["status"], "complete");

    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_normlab"))
        .arg("norms")
        .stdout(full)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("standard output"));
}

#[test]
fn a_closed_pipe_ends_the_command_quietly() {
    // The pipe's reading end is closed before the command starts, so its first write fails
    // with EPIPE whatever the timing (as `normlab norms | head -0` would).
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let o = Command::new(env!("CARGO_BIN_EXE_normlab"))
        .arg("norms")
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.is_empty(), "{stderr}");
    assert_eq!(o.status.code(), Some(141));
}

#[test]
fn counters_from_files_are_checked_before_use() {
    let t = tmp();
    let data = t.path().join("data");
    write_dataset(&data, 40, 20, false);
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
        "20",
        "--optimizer",
        "adam",
    ]);
    let state = run.join("train_state.safetensors");
    let good = std::fs::read(&state).unwrap();
    // A step of 2^64-1 reached Adam as t = -1 and was reported as divergence.
    rewrite_safetensors(&state, &state, &mut |_, md| {
        md.as_mut().unwrap().insert("step".into(), u64::MAX.to_string());
    });
    let err = fails(&["train", "--resume", s(&run), "--epochs", "2"]);
    assert!(
        err.contains("train_state.safetensors") && err.contains("step counter is 18446744073709551615"),
        "{err}"
    );
    assert!(!err.contains("diverged"), "{err}");
    // A batch counter beyond the steps done, and a negative one.
    for count in [1_000_000i64, -5] {
        std::fs::write(&state, &good).unwrap();
        rewrite_safetensors(&state, &state, &mut |entries, _| {
            let e = entries
                .iter_mut()
                .find(|e| e.name.ends_with("num_batches_tracked"))
                .unwrap();
            e.bytes = count.to_le_bytes().to_vec();
        });
        let err = fails(&["train", "--resume", s(&run), "--epochs", "2"]);
        assert!(
            err.contains("num_batches_tracked") && err.contains(&count.to_string()),
            "{err}"
        );
    }
    // The same negative count in a checkpoint given to eval.
    let model = run.join("model.safetensors");
    let bad = t.path().join("bad.safetensors");
    rewrite_safetensors(&model, &bad, &mut |entries, _| {
        let e = entries
            .iter_mut()
            .find(|e| e.name.ends_with("num_batches_tracked"))
            .unwrap();
        e.bytes = (-1i64).to_le_bytes().to_vec();
    });
    let err = fails(&["eval", "--checkpoint", s(&bad), "--data", s(&data)]);
    assert!(err.contains("num_batches_tracked") && err.contains("damaged"), "{err}");
    // The good record still resumes.
    std::fs::write(&state, &good).unwrap();
    ok(&["train", "--resume", s(&run), "--epochs", "2"]);
}
