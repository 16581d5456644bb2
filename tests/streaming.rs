//! Data larger than memory: a streamed image folder trains bit for bit as the cached one;
//! WebDataset shards packed from the folder train as the folder does when the order is the
//! same (`--no-shuffle`), and replay on resume when shuffled; a corrupt image mid-epoch stops
//! the run with its name and the resume command (or is skipped and counted); a malformed
//! shard gets one line naming the shard and member.

mod common;

use std::path::Path;

use common::cli::*;

/// An ImageFolder of three classes, `n` images each per split, of two sizes (so --resize
/// matters) and varied colour, PNG and JPEG mixed.
fn write_folder(dir: &Path, n: usize) {
    for split in ["train", "test"] {
        for (c, class) in ["ant", "bee", "cow"].iter().enumerate() {
            let d = dir.join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..n {
                let (w, h) = if i % 2 == 0 { (12, 10) } else { (9, 14) };
                let img = image::RgbImage::from_fn(w, h, |x, y| {
                    let v = (x * 17 + y * 5 + (i * 29) as u32 + c as u32 * 70) as u8;
                    image::Rgb([v, v.wrapping_mul(3), (c as u8) * 90 + (y as u8) * 4])
                });
                let ext = if i % 3 == 0 { "jpg" } else { "png" };
                img.save(d.join(format!("{i:03}.{ext}"))).unwrap();
            }
        }
    }
}

fn run(t: &tempfile::TempDir, data: &Path, name: &str, extra: &[&str]) -> (std::path::PathBuf, String) {
    let out = t.path().join(name);
    let mut args = vec![
        "train",
        "--data",
        s(data),
        "--out",
        s(&out),
        "--batch-size",
        "8",
        "--resize",
        "8x8",
    ];
    args.extend_from_slice(extra);
    if !extra.contains(&"--epochs") {
        args.extend(["--epochs", "2"]);
    }
    let printed = ok(&args);
    (out, printed)
}

fn model(run: &Path) -> Vec<(String, Vec<u8>)> {
    tensors(&run.join("model.safetensors"))
}

#[test]
fn a_streamed_folder_trains_bit_for_bit_as_the_cached_one() {
    let t = tmp();
    let data = t.path().join("data");
    write_folder(&data, 10);
    let aug = ["--augment", "random-resized-crop,flip"];
    let (cached, said) = run(&t, &data, "cached", &aug);
    assert!(said.contains("training set cached in memory"), "{said}");
    let (streamed, said) = run(&t, &data, "streamed", &[&aug[..], &["--cache-limit", "0"]].concat());
    assert!(
        said.contains("training set streamed from disk") && said.contains("> --cache-limit 0 B"),
        "{said}"
    );
    // Three decode threads deliver in the same order as one.
    let (threads, _) = run(
        &t,
        &data,
        "threads",
        &[&aug[..], &["--cache-limit", "0", "--decode-threads", "3"]].concat(),
    );
    assert_eq!(model(&cached), model(&streamed));
    assert_eq!(model(&cached), model(&threads));
    assert_eq!(learning_curve(&metrics(&cached)), learning_curve(&metrics(&streamed)));
    // The loader's rate and wait are recorded for the streamed run, per epoch and per step.
    let m = metrics(&streamed);
    assert!(m["epochs"][0]["loader_images_per_sec"].as_f64().unwrap() > 0.0);
    assert!(m["epochs"][0]["data_wait_seconds"].as_f64().unwrap() >= 0.0);
    let steps = std::fs::read_to_string(streamed.join("steps.csv")).unwrap();
    assert!(
        steps.starts_with("step,epoch,loss,lr,images_per_sec,wall_time,data_wait_s,loader_images_per_sec\n"),
        "{steps}"
    );
    assert_eq!(metrics(&cached)["epochs"][0]["loader_images_per_sec"], 0.0);
}

#[test]
fn shards_train_as_the_folder_in_the_same_order_and_replay_on_resume() {
    let t = tmp();
    let data = t.path().join("data");
    write_folder(&data, 10);
    let shards = t.path().join("shards");
    let said = ok(&[
        "data",
        "pack",
        "--data",
        s(&data),
        "--out",
        s(&shards),
        "--shard-size",
        "1MB",
    ]);
    assert!(said.contains("train: 30 images in 1 shards"), "{said}");
    assert!(std::fs::read_to_string(shards.join("classes.txt")).unwrap() == "ant\nbee\ncow\n");
    // Packing again is refused without --force.
    let err = fails(&["data", "pack", "--data", s(&data), "--out", s(&shards)]);
    assert!(err.contains("--force"), "{err}");
    // Without shuffling, the folder's order and the shards' are the same: the same model, from
    // the folder cached, the shards cached, and the shards streamed.
    let fixed = ["--no-shuffle"];
    let (folder, _) = run(&t, &data, "folder", &fixed);
    let (packed, said) = run(&t, &shards, "packed", &fixed);
    assert!(
        said.contains("(WebDataset shards): 30 training and 30 test images, 3 classes"),
        "{said}"
    );
    let (packed_streamed, _) = run(
        &t,
        &shards,
        "packed-streamed",
        &[&fixed[..], &["--cache-limit", "0"]].concat(),
    );
    assert_eq!(model(&folder), model(&packed));
    assert_eq!(model(&folder), model(&packed_streamed));
    // Shuffled shards follow their own order (by design), replayed exactly by --resume.
    let (shuffled, _) = run(
        &t,
        &shards,
        "shuffled",
        &["--shuffle-buffer", "7", "--cache-limit", "0"],
    );
    assert_ne!(model(&shuffled), model(&packed));
    let half = t.path().join("half");
    ok(&[
        "train",
        "--data",
        s(&shards),
        "--out",
        s(&half),
        "--batch-size",
        "8",
        "--resize",
        "8x8",
        "--epochs",
        "1",
        "--shuffle-buffer",
        "7",
        "--cache-limit",
        "0",
    ]);
    ok(&["train", "--resume", s(&half), "--epochs", "2"]);
    assert_eq!(model(&half), model(&shuffled));
    // A pattern names the training shards; the test shards are the folder's test-*.tar.
    let pattern = shards.join("train-{000000..000000}.tar");
    let (by_pattern, _) = run(&t, &pattern, "pattern", &fixed);
    assert_eq!(model(&by_pattern), model(&packed));
}

#[test]
fn a_corrupt_image_mid_run_stops_with_its_name_and_the_resume_command_or_is_skipped() {
    let t = tmp();
    let data = t.path().join("data");
    write_folder(&data, 10);
    let (runf, _) = run(&t, &data, "run", &["--cache-limit", "0", "--epochs", "1"]);
    // The PNG keeps its header (so the run's start reads it) and loses its pixels.
    let victim = data.join("train/bee/004.png");
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &bytes[..60]).unwrap();
    let err = fails(&["train", "--resume", s(&runf), "--epochs", "2"]);
    assert!(
        err.contains("004.png") && err.contains("not a readable PNG or JPEG"),
        "{err}"
    );
    assert!(
        err.contains(&format!("normlab train --resume {}", runf.display())),
        "{err}"
    );
    assert!(err.contains("--skip-bad-images"), "{err}");
    assert_eq!(metrics(&runf)["epochs"].as_array().unwrap().len(), 1);
    // Resumed with --skip-bad-images, the epoch finishes without it and says so.
    ok(&["train", "--resume", s(&runf), "--epochs", "2", "--skip-bad-images"]);
    let m = metrics(&runf);
    assert_eq!(m["epochs"][1]["skipped_images"], 1);
    assert_eq!(m["status"], "complete");
}

#[test]
fn malformed_shards_get_one_line_naming_the_shard_and_member() {
    let t = tmp();
    let data = t.path().join("data");
    write_folder(&data, 4);
    let shards = t.path().join("shards");
    ok(&["data", "pack", "--data", s(&data), "--out", s(&shards)]);
    let shard = shards.join("train-000000.tar");
    let bytes = std::fs::read(&shard).unwrap();
    // Cut inside the third member's data: its size runs past the end.
    std::fs::write(&shard, &bytes[..512 * 6 + 100]).unwrap();
    let err = fails(&[
        "train",
        "--data",
        s(&shards),
        "--out",
        s(&t.path().join("r1")),
        "--resize",
        "8x8",
    ]);
    assert!(err.contains("train-000000.tar") && err.contains("truncated"), "{err}");
    assert!(err.contains("00000001") || err.contains("00000002"), "{err}");
    // A member without its class index.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    let png = std::fs::read(data.join("train/ant/001.png")).unwrap();
    h.set_size(png.len() as u64);
    h.set_mode(0o644);
    b.append_data(&mut h, "k1.png", &png[..]).unwrap();
    std::fs::write(&shard, b.into_inner().unwrap()).unwrap();
    let err = fails(&[
        "train",
        "--data",
        s(&shards),
        "--out",
        s(&t.path().join("r2")),
        "--resize",
        "8x8",
    ]);
    assert!(err.contains("sample 'k1'") && err.contains(".cls"), "{err}");
    // Not a tar at all.
    std::fs::write(&shard, vec![7u8; 2000]).unwrap();
    let err = fails(&[
        "train",
        "--data",
        s(&shards),
        "--out",
        s(&t.path().join("r3")),
        "--resize",
        "8x8",
    ]);
    assert!(err.contains("train-000000.tar") && err.contains("tar"), "{err}");
}
