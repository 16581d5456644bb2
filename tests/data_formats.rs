//! Colour data: CIFAR-10's binary batches and folders of images (written here), per-channel
//! normalization, augmentation that replays exactly, steps.csv and TensorBoard logs, and one
//! clear error line for each kind of bad input.

mod common;

use std::path::Path;

use common::cli::*;
use normlab::data::{load_split, load_split_with, FolderOptions};

/// `n` CIFAR records; record k has label k % 10 and pixel values that encode (k, channel).
fn cifar_records(n: usize) -> Vec<u8> {
    cifar_records_from(0, n)
}

fn cifar_records_from(first: usize, n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for k in first..first + n {
        out.push((k % 10) as u8);
        for c in 0..3 {
            out.extend(std::iter::repeat_n((k * 3 + c) as u8, 1024));
        }
    }
    out
}

fn write_cifar(dir: &Path, train: usize, test: usize) {
    std::fs::create_dir_all(dir).unwrap();
    // The training records in order over the five batch files, as CIFAR-10 ships them.
    let per = train.div_ceil(5);
    for b in 0..5 {
        let first = (b * per).min(train);
        let n = per.min(train - first);
        std::fs::write(
            dir.join(format!("data_batch_{}.bin", b + 1)),
            cifar_records_from(first, n),
        )
        .unwrap();
    }
    std::fs::write(dir.join("test_batch.bin"), cifar_records(test)).unwrap();
    std::fs::write(
        dir.join("batches.meta.txt"),
        "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n\n",
    )
    .unwrap();
}

/// An ImageFolder tree: classes b_dog and a_cat (sorted: a_cat = 0), `n` images each per split;
/// a_cat grey, b_dog red, so the set is colour.
fn write_folder(dir: &Path, n: usize, size: (u32, u32)) {
    for split in ["train", "test"] {
        for (class, colour) in [("b_dog", true), ("a_cat", false)] {
            let d = dir.join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..n {
                let path = d.join(format!("{i}.png"));
                if colour {
                    image::RgbImage::from_fn(size.0, size.1, |x, _| image::Rgb([200, (x * 7) as u8, i as u8]))
                        .save(&path)
                        .unwrap();
                } else {
                    image::GrayImage::from_fn(size.0, size.1, |x, y| image::Luma([(x + y + i as u32) as u8]))
                        .save(&path)
                        .unwrap();
                }
            }
        }
    }
}

#[test]
fn cifar_batches_load_as_colour_planes_with_their_labels() {
    let t = tmp();
    write_cifar(t.path(), 25, 7);
    let train = load_split(t.path(), true).unwrap();
    assert_eq!((train.shape, train.len(), train.classes), ([3, 32, 32], 25, 10));
    assert_eq!(train.labels[13], 3);
    // Record 13: red plane 39, green 40, blue 41.
    let s = 3 * 1024;
    assert_eq!(
        [
            train.cached_bytes().unwrap()[13 * s],
            train.cached_bytes().unwrap()[13 * s + 1024],
            train.cached_bytes().unwrap()[13 * s + 2048]
        ],
        [39, 40, 41]
    );
    assert_eq!(train.class_names[3], "cat");
    assert_eq!(load_split(t.path(), false).unwrap().len(), 7);
    // Per-channel statistics: channel c of record k is (3k + c)/255.
    let norm = train.pixel_stats().unwrap();
    assert_eq!(norm.channels, 3);
    let mean_r: f64 = (0..25).map(|k| (3 * k) as f64 / 255.0).sum::<f64>() / 25.0;
    assert!((norm.mean[0] as f64 - mean_r).abs() < 1e-6);
    assert!((norm.mean[2] - norm.mean[0] - 2.0 / 255.0).abs() < 1e-6);
}

#[test]
fn image_folders_sort_classes_and_decide_grey_or_colour() {
    let t = tmp();
    write_folder(t.path(), 3, (6, 4));
    let train = load_split(t.path(), true).unwrap();
    assert_eq!(train.class_names, vec!["a_cat", "b_dog"]);
    assert_eq!((train.shape, train.len()), ([3, 4, 6], 6));
    assert_eq!(train.labels, vec![0, 0, 0, 1, 1, 1]);
    // A grey image becomes three equal planes; the red one has R = 200 everywhere.
    let s = 3 * 24;
    assert_eq!(
        train.cached_bytes().unwrap()[0..24],
        train.cached_bytes().unwrap()[24..48]
    );
    assert!(train.cached_bytes().unwrap()[3 * s..3 * s + 24]
        .iter()
        .all(|&v| v == 200));
    let grey = load_split_with(
        t.path(),
        true,
        FolderOptions {
            resize: Some([8, 5]),
            channels: Some(1),
            ..FolderOptions::default()
        },
    )
    .unwrap();
    assert_eq!(grey.shape, [1, 8, 5]);
    // A checkpoint asking for another channel count gets an error, not mislaid planes.
    let err = load_split_with(
        t.path(),
        false,
        FolderOptions {
            resize: None,
            channels: Some(2),
            ..FolderOptions::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("2 input channels"), "{err}");
}

#[test]
fn colour_training_with_augmentation_replays_exactly_and_logs_every_step() {
    let t = tmp();
    let data = t.path().join("cifar");
    write_cifar(&data, 40, 10);
    let run = |name: &str, epochs: &str| {
        let out = t.path().join(name);
        ok(&[
            "train",
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--model",
            "vgg:4,M,8,M",
            "--epochs",
            epochs,
            "--batch-size",
            "8",
            "--augment",
            "crop,flip",
            "--tensorboard",
        ]);
        out
    };
    let a = run("a", "2");
    let b = run("b", "2");
    assert_eq!(learning_curve(&metrics(&a)), learning_curve(&metrics(&b)));
    assert_eq!(
        tensors(&a.join("model.safetensors")),
        tensors(&b.join("model.safetensors"))
    );
    // Per-channel normalization is recorded with the checkpoint.
    let m = metrics(&a);
    assert_eq!(m["input_norm"]["mean"].as_array().unwrap().len(), 3);
    // One epoch, then --resume to two: the same weights as two at once, and no repeated step.
    let c = run("c", "1");
    ok(&["train", "--resume", s(&c), "--epochs", "2"]);
    assert_eq!(
        tensors(&a.join("model.safetensors")),
        tensors(&c.join("model.safetensors"))
    );
    let steps = std::fs::read_to_string(c.join("steps.csv")).unwrap();
    let ids: Vec<&str> = steps.lines().skip(1).map(|l| l.split(',').next().unwrap()).collect();
    assert_eq!(ids, (1..=10).map(|k| k.to_string()).collect::<Vec<_>>());
    assert!(c.join("tb/events.out.tfevents.normlab").is_file());
    // Without augmentation the run differs: the flag is not a no-op.
    let plain = t.path().join("plain");
    ok(&[
        "train",
        "--data",
        s(&data),
        "--out",
        s(&plain),
        "--model",
        "vgg:4,M,8,M",
        "--epochs",
        "2",
        "--batch-size",
        "8",
    ]);
    assert_ne!(learning_curve(&metrics(&a)), learning_curve(&metrics(&plain)));
    assert!(!plain.join("tb").exists());
}

#[test]
fn tensorboard_reads_the_events_back() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let Some(python) = venv_python("tensorboard") else {
        return;
    };
    let t = tmp();
    let data = t.path().join("images");
    write_folder(&data, 6, (8, 8));
    let run = t.path().join("run");
    ok(&[
        "train",
        "--data",
        s(&data),
        "--out",
        s(&run),
        "--model",
        "resnet:2,2,2,2,2,2",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--tensorboard",
    ]);
    let out = std::process::Command::new(&python)
        .arg(root.join("scripts/check_tensorboard.py"))
        .arg(&run)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("gamma_abs/layer1.0.bn1"), "{stdout}");
}

#[test]
fn bad_colour_data_gets_one_clear_line() {
    let t = tmp();
    let train = |data: &Path, extra: &[&str]| {
        let out = t.path().join("never");
        let mut args = vec![
            "train",
            "--data",
            s(data),
            "--out",
            s(&out),
            "--epochs",
            "1",
            "--model",
            "vgg:4,M",
        ];
        args.extend_from_slice(extra);
        let err = fails(&args);
        assert!(!out.join("model.safetensors").exists());
        err
    };
    // A truncated CIFAR batch, and a label out of range.
    let cifar = t.path().join("cifar");
    write_cifar(&cifar, 5, 5);
    let mut bytes = cifar_records(5);
    bytes.truncate(bytes.len() - 100);
    std::fs::write(cifar.join("data_batch_1.bin"), &bytes).unwrap();
    let err = train(&cifar, &[]);
    assert!(
        err.contains("data_batch_1.bin") && err.contains("3073-byte records"),
        "{err}"
    );
    let mut bytes = cifar_records(5);
    bytes[3073 * 2] = 12;
    std::fs::write(cifar.join("data_batch_1.bin"), &bytes).unwrap();
    let err = train(&cifar, &[]);
    assert!(err.contains("record 2 has label 12"), "{err}");

    // Image folders: a corrupt PNG, mixed sizes, an empty class, a test class train lacks.
    let folder = |name: &str| {
        let d = t.path().join(name);
        write_folder(&d, 2, (6, 6));
        d
    };
    let d = folder("corrupt");
    std::fs::write(d.join("train/a_cat/1.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let err = train(&d, &[]);
    assert!(err.contains("1.png") && err.contains("not a readable"), "{err}");
    let d = folder("sizes");
    image::GrayImage::new(9, 6).save(d.join("train/a_cat/0.png")).unwrap();
    let err = train(&d, &[]);
    assert!(err.contains("--resize"), "{err}");
    train_ok_with_resize(&d, t.path());
    let d = folder("empty");
    std::fs::create_dir_all(d.join("train/c_empty")).unwrap();
    let err = train(&d, &[]);
    assert!(err.contains("c_empty") && err.contains("no .png"), "{err}");
    let d = folder("extra");
    std::fs::create_dir_all(d.join("test/z_new")).unwrap();
    image::GrayImage::new(6, 6).save(d.join("test/z_new/0.png")).unwrap();
    let err = train(&d, &[]);
    assert!(err.contains("z_new") && err.contains("train/ lacks"), "{err}");
    let err = train(&folder("flags"), &["--augment", "rotate"]);
    assert!(err.contains("rotate"), "{err}");
    let err = train(&folder("flags2"), &["--resize", "0x5"]);
    assert!(err.contains("HxW"), "{err}");
}

fn train_ok_with_resize(data: &Path, root: &Path) {
    let out = root.join("resized");
    ok(&[
        "train",
        "--data",
        s(data),
        "--out",
        s(&out),
        "--epochs",
        "1",
        "--model",
        "vgg:4,M",
        "--resize",
        "6x6",
    ]);
    // Evaluating brings the test images to the checkpoint's size too.
    ok(&[
        "eval",
        "--checkpoint",
        s(&out.join("model.safetensors")),
        "--data",
        s(data),
    ]);
}

#[test]
fn a_new_run_never_overwrites_a_step_log_it_did_not_write() {
    let t = tmp();
    let data = t.path().join("data");
    write_dataset(&data, 40, 10, false);
    let out = t.path().join("run");
    std::fs::create_dir_all(out.join("tb")).unwrap();
    for name in ["steps.csv", "tb/events.out.tfevents.normlab"] {
        std::fs::write(out.join(name), b"someone else's").unwrap();
        let err = fails(&["train", "--data", s(&data), "--out", s(&out), "--epochs", "1"]);
        assert!(err.contains(name), "{err}");
        assert_eq!(std::fs::read(out.join(name)).unwrap(), b"someone else's");
        std::fs::remove_file(out.join(name)).unwrap();
    }
}
