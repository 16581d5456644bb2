//! Data-parallel training under mpirun (`cargo test --release --features mpi`; needs OpenMPI's
//! mpirun). Every mpirun has a deadline, so a hang fails the test instead of stalling it.

#![cfg(feature = "mpi")]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::cli::{idx_bytes, normlab, s, write_dataset};

const DEADLINE: Duration = Duration::from_secs(120);

fn mpirun_command(args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "--bind-to", "none"])
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl", "self,vader,tcp")
        .env_remove("NORMLAB_DATA")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn wait_with_deadline(mut child: Child, deadline: Duration) -> Output {
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if t0.elapsed() > deadline {
            let _ = child.kill();
            panic!("mpirun did not end within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `mpirun -n K normlab ARGS`.
fn mpirun(k: usize, args: &[&str]) -> Output {
    let bin = env!("CARGO_BIN_EXE_normlab");
    let k = k.to_string();
    let mut all = vec!["-n", &k, bin];
    all.extend_from_slice(args);
    wait_with_deadline(mpirun_command(&all).spawn().unwrap(), DEADLINE)
}

fn ok(out: Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "mpirun failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The one `error` line of a failed job (mpirun's own banner aside), checked to be the only one
/// and without a panic.
fn one_error(out: Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "the job should fail");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "want one error line, got: {stderr}");
    errors[0].to_string()
}

fn losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("steps.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(2).unwrap().parse().unwrap())
        .collect()
}

/// Every tensor of a checkpoint as f64 (running statistics and num_batches_tracked included).
fn tensors(path: &Path) -> HashMap<String, Vec<f64>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, t)| {
            let v: Vec<f64> = match t.dtype() {
                safetensors::Dtype::F32 => t
                    .data()
                    .chunks(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::I64 => t
                    .data()
                    .chunks(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                d => panic!("{name}: unexpected {d:?}"),
            };
            (name, v)
        })
        .collect()
}

/// The largest |a - b| of a tensor over its largest |a|, across all tensors, with its name.
fn worst_tensor(a: &Path, b: &Path) -> (f64, String) {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(ta.len(), tb.len());
    let mut worst = (0.0, String::new());
    for (name, va) in &ta {
        let vb = &tb[name];
        let scale = va.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
        let d = va.iter().zip(vb).fold(0.0f64, |m, (x, y)| m.max((x - y).abs())) / scale;
        if d > worst.0 {
            worst = (d, name.clone());
        }
    }
    worst
}

/// Images of hashed noise with labels unrelated to them: the loss stays near ln 10, where a
/// relative comparison means something, and no two pixels tie (a real image's flat background
/// does: ReLU and max-pool then switch on rounding noise, which no reordering of sums survives).
fn write_noise_dataset(dir: &Path, train: usize, test: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let hash = |i: u64| {
        let mut z = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB) >> 40
    };
    for (name, n, salt) in [("train", train, 0u64), ("t10k", test, 1 << 40)] {
        let images: Vec<u8> = (0..n as u64 * 784).map(|i| hash(i + salt) as u8).collect();
        let labels: Vec<u8> = (0..n as u64).map(|i| (hash(i + salt + (1 << 50)) % 10) as u8).collect();
        std::fs::write(
            dir.join(format!("{name}-images-idx3-ubyte")),
            idx_bytes(&[n as u32, 28, 28], &images),
        )
        .unwrap();
        std::fs::write(
            dir.join(format!("{name}-labels-idx1-ubyte")),
            idx_bytes(&[n as u32], &labels),
        )
        .unwrap();
    }
}

/// `train_args` with another learning rate.
fn with_lr<'a>(mut args: Vec<&'a str>, lr: &'a str) -> Vec<&'a str> {
    let at = args.len() - 3;
    args[at] = lr;
    args
}

fn train_args<'a>(data: &'a str, out: &'a str, model: &'a str, norm: &'a str, limit: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--data",
        data,
        "--out",
        out,
        "--model",
        model,
        "--norm",
        norm,
        "--train-limit",
        limit,
        "--test-limit",
        "40",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--optimizer",
        "sgd",
        "--lr",
        "0.05",
        "--threads",
        "1",
    ]
}

// The property PyTorch's SyncBN tests check: K processes with B/K samples each and syncbn train
// as one process with the batch B and bn, step by step (SGD with momentum 0.9, lr 0.05, 10
// steps). The resnet's trajectory is chaotic at this scale: a 1e-6 relative change of eps in a
// single process already moves its loss by 3e-5 within five steps (ReLU masks flip on rounding
// noise), so it is held to one step (a batch of 8, and an uneven one of 6), whose gradients
// carry no earlier step's rounding.
#[test]
fn syncbn_over_k_processes_equals_bn_over_the_global_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_noise_dataset(&data, 80, 40);
    let data = s(&data).to_string();
    // 80 images: ten batches of 8; 78: the last batch of 6 splits unevenly over 4 (1, 2, 1, 2).
    let cases = [
        ("seed-cnn", "0.05", ["80", "78"]),
        ("mlp", "0.05", ["80", "78"]),
        ("vgg:8,M,16,M", "0.05", ["80", "78"]),
        ("resnet:4,4,8,8,8,8", "0.05", ["8", "6"]),
    ];
    for (model, lr, limits) in cases {
        for limit in limits {
            let one = tmp.path().join(format!("{model}-{limit}-1"));
            let out = normlab(&with_lr(train_args(&data, s(&one), model, "bn", limit), lr));
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let reference = losses(&one);
            let steps = limit.parse::<usize>().unwrap().div_ceil(8);
            assert_eq!(reference.len(), steps);
            for k in [2, 4] {
                let dir = tmp.path().join(format!("{model}-{limit}-{k}"));
                ok(mpirun(
                    k,
                    &with_lr(train_args(&data, s(&dir), model, "syncbn", limit), lr),
                ));
                let got = losses(&dir);
                assert_eq!(got.len(), steps, "{model} K={k}");
                for (step, (a, b)) in reference.iter().zip(&got).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * a.abs(),
                        "{model} train-limit {limit}, K={k}, step {}: loss {b} vs {a} in one process",
                        step + 1
                    );
                }
                let (worst, name) = worst_tensor(&one.join("model.safetensors"), &dir.join("model.safetensors"));
                assert!(
                    worst <= 1e-5,
                    "{model} train-limit {limit}, K={k}: {name} differs by {worst:e} of its largest value"
                );
            }
        }
    }
}

#[test]
fn syncbn_in_one_process_is_bn_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_dataset(&data, 80, 40, false);
    let data = s(&data).to_string();
    let (a, b) = (tmp.path().join("bn"), tmp.path().join("syncbn"));
    for (dir, norm) in [(&a, "bn"), (&b, "syncbn")] {
        let out = normlab(&train_args(&data, s(dir), "vgg:8,M,16,M", norm, "80"));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(losses(&a), losses(&b));
    assert_eq!(
        tensors(&a.join("model.safetensors")),
        tensors(&b.join("model.safetensors"))
    );
    // Under mpirun with one process too.
    let c = tmp.path().join("mpi1");
    ok(mpirun(1, &train_args(&data, s(&c), "vgg:8,M,16,M", "syncbn", "80")));
    assert_eq!(losses(&a), losses(&c));
    assert_eq!(
        tensors(&a.join("model.safetensors")),
        tensors(&c.join("model.safetensors"))
    );
}

#[test]
fn every_model_and_norm_trains_over_two_processes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_dataset(&data, 64, 40, false);
    let data = s(&data).to_string();
    for (model, norm) in [
        ("seed-cnn", "bn"),
        ("seed-cnn", "gn:4"),
        ("seed-cnn", "ln"),
        ("seed-cnn", "in"),
        ("seed-cnn", "ghost:2"),
        ("seed-cnn", "brn"),
        ("seed-cnn", "bn-l1"),
        ("seed-cnn", "bn-noisy"),
        ("seed-cnn", "none"),
        ("mlp", "bn"),
        ("resnet:4,4,8,8,8,8", "bn"),
        ("lstm:8", "ln"),
    ] {
        let dir = tmp.path().join(format!("{model}-{norm}"));
        let out = ok(mpirun(2, &train_args(&data, s(&dir), model, norm, "64")));
        assert!(out.contains("over 2 processes"), "{model} {norm}: {out}");
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("metrics.json")).unwrap()).unwrap();
        assert_eq!(m["processes"], 2);
        assert_eq!(m["status"], "complete", "{model} {norm}");
    }
}

#[test]
fn a_batch_that_does_not_split_or_bad_input_on_one_process_fails_the_job_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_dataset(&data, 64, 40, false);
    let d = s(&data).to_string();
    let out = |n: &str| s(&tmp.path().join(n)).to_string();
    let o = out("a");
    let mut args = train_args(&d, &o, "seed-cnn", "syncbn", "64");
    let at = args.len() - 7;
    args[at] = "6";
    let e = one_error(mpirun(4, &args));
    assert!(e.contains("must be a multiple of 4"), "{e}");
    let o = out("b");
    let e = one_error(mpirun(4, &train_args(&d, &o, "seed-cnn", "syncbn", "58")));
    assert!(e.contains("fewer than the 4 processes"), "{e}");
    // Per-process BN on the MLP: a share of one sample has no batch statistics.
    let o = out("c");
    let mut args = train_args(&d, &o, "mlp", "bn", "64");
    let at = args.len() - 7;
    args[at] = "4";
    let e = one_error(mpirun(4, &args));
    assert!(e.contains("use syncbn"), "{e}");
    // Process 1 alone cannot read its data (MPMD launch: its own command line).
    let bin = env!("CARGO_BIN_EXE_normlab");
    let (o, missing) = (out("d"), out("no-such-data"));
    let mut all = vec!["-n", "1", bin];
    all.extend(train_args(&d, &o, "seed-cnn", "bn", "64"));
    all.extend([":", "-n", "1", bin]);
    all.extend(train_args(&missing, &o, "seed-cnn", "bn", "64"));
    let e = one_error(wait_with_deadline(mpirun_command(&all).spawn().unwrap(), DEADLINE));
    assert!(e.starts_with("error (process 1 of 2)"), "{e}");
    assert!(
        !tmp.path().join("d").join("metrics.json").exists(),
        "nothing is written"
    );
    // Other options on process 1.
    let o = out("e");
    let mut all = vec!["-n", "1", bin];
    all.extend(train_args(&d, &o, "seed-cnn", "bn", "64"));
    all.extend([":", "-n", "1", bin]);
    all.extend(train_args(&d, &o, "seed-cnn", "gn:4", "64"));
    let e = one_error(wait_with_deadline(mpirun_command(&all).spawn().unwrap(), DEADLINE));
    assert!(e.contains("other training options than process 0"), "{e}");
    // A command that runs in one process.
    let e = one_error(mpirun(2, &["norms"]));
    assert!(e.contains("start every other command as one process"), "{e}");
}

/// The pid of rank `rank` of the job whose command line names `run`: the tests run side by
/// side, and another test's rank 1 is not this job's.
fn rank_pid(rank: usize, run: &Path) -> Option<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(exe) = std::fs::read_link(entry.path().join("exe")) else {
            continue;
        };
        if exe != Path::new(env!("CARGO_BIN_EXE_normlab")) {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if !cmdline.split(|&b| b == 0).any(|a| a == s(run).as_bytes()) {
            continue;
        }
        let env = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        if env.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

#[test]
fn killing_one_process_ends_the_job_quickly_and_resume_continues_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_dataset(&data, 3000, 100, false);
    let d = s(&data).to_string();
    let args = |out: &Path, epochs: &str| -> Vec<String> {
        [
            "train",
            "--data",
            &d,
            "--out",
            s(out),
            "--model",
            "vgg:16,M,32,M",
            "--norm",
            "syncbn",
            "--epochs",
            epochs,
            "--batch-size",
            "32",
            "--threads",
            "1",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let bin = env!("CARGO_BIN_EXE_normlab");
    let whole = tmp.path().join("whole");
    let a: Vec<String> = args(&whole, "3");
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    ok(mpirun(2, &a));

    let run = tmp.path().join("killed");
    let a: Vec<String> = args(&run, "3");
    let mut all = vec!["-n".to_string(), "2".into(), bin.into()];
    all.extend(a);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let child = mpirun_command(&all).spawn().unwrap();
    // Wait for the first commit, then kill rank 1 in the middle of epoch 2.
    let t0 = Instant::now();
    while !std::fs::read_to_string(run.join("metrics.json")).is_ok_and(|m| m.contains("\"epoch\": 1")) {
        assert!(t0.elapsed() < DEADLINE, "no first epoch");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let pid = rank_pid(1, &run).expect("rank 1 of this job runs");
    let killed = Instant::now();
    assert!(Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let out = wait_with_deadline(child, Duration::from_secs(30));
    let ended = killed.elapsed();
    assert!(!out.status.success());
    assert!(ended <= Duration::from_secs(10), "the job took {ended:?} to end");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("process 0 of 2 stopped") && stderr.contains("--resume"),
        "no clear message: {stderr}"
    );
    ok(mpirun(2, &["train", "--resume", s(&run), "--threads", "1"]));
    assert_eq!(
        losses(&run),
        losses(&whole),
        "the resumed run replays the uninterrupted one"
    );
    assert_eq!(
        tensors(&run.join("model.safetensors")),
        tensors(&whole.join("model.safetensors"))
    );
}

#[test]
fn resume_takes_another_process_count_that_divides_the_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_dataset(&data, 64, 40, false);
    let d = s(&data).to_string();
    let run = tmp.path().join("run");
    let a = train_args(&d, s(&run), "seed-cnn", "syncbn", "64");
    // Without --threads: each process takes its share of the cores.
    ok(mpirun(2, &a[..a.len() - 2]));
    ok(mpirun(4, &["train", "--resume", s(&run), "--epochs", "2"]));
    let out = normlab(&["train", "--resume", s(&run), "--epochs", "3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m["epochs"].as_array().unwrap().len(), 3);
    assert_eq!(losses(&run).len(), 24);
    let e = one_error(mpirun(3, &["train", "--resume", s(&run), "--epochs", "4"]));
    assert!(e.contains("multiple of 3"), "{e}");
}

#[test]
fn a_streamed_folder_over_two_processes_decodes_each_share_once_and_equals_the_cached_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("images");
    for split in ["train", "test"] {
        for (c, class) in ["a", "b"].iter().enumerate() {
            let d = data.join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..24u32 {
                image::RgbImage::from_fn(10, 10, |x, y| {
                    image::Rgb([(x * 20 + i) as u8, (y * 9) as u8, 100 * c as u8])
                })
                .save(d.join(format!("{i}.png")))
                .unwrap();
            }
        }
    }
    let data = s(&data).to_string();
    let run = |name: &str, extra: &[&str]| {
        let dir = tmp.path().join(name);
        let mut args = vec![
            "train",
            "--data",
            &data,
            "--out",
            s(&dir),
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--threads",
            "1",
        ];
        args.extend_from_slice(extra);
        ok(mpirun(2, &args));
        dir
    };
    let cached = run("cached", &[]);
    let streamed = run("streamed", &["--cache-limit", "0", "--decode-threads", "1"]);
    assert_eq!(losses(&cached), losses(&streamed));
    assert_eq!(
        tensors(&cached.join("model.safetensors")),
        tensors(&streamed.join("model.safetensors"))
    );
    // Process 0 decoded its half of the 48 training images in each epoch, no more.
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(streamed.join("metrics.json")).unwrap()).unwrap();
    for e in m["epochs"].as_array().unwrap() {
        assert_eq!(e["decoded_images"], 24, "{e}");
        assert!(e["loader_images_per_sec"].as_f64().unwrap() > 0.0, "{e}");
    }
}
