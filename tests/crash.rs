//! Nothing written is lost: a kill at every write, fsync and rename of a run leaves a folder
//! that `eval` loads and `train --resume` continues to exactly the uninterrupted result, and
//! two trainings never write one folder at once.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::cli::*;

fn train_with_crash(data: &Path, out: &Path, at: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_normlab"))
        .args(["train", "--data", s(data), "--out", s(out), "--epochs", "2"])
        .args(["--batch-size", "32", "--seed", "5", "--threads", "1"])
        .env_remove("NORMLAB_DATA")
        .env("NORMLAB_CRASH_AT", at)
        .output()
        .unwrap()
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".tmp"))
        .collect()
}

/// Waits until process `pid` holds the lock of run folder `dir` (it writes its pid there).
fn wait_for_lock(dir: &Path, pid: u32) {
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(dir.join(".lock")).unwrap_or_default().trim() != pid.to_string() {
        assert!(
            t0.elapsed().as_secs() < 60,
            "pid {pid} never took the lock of {}",
            dir.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_kill_at_any_write_leaves_a_run_that_loads_and_resumes_exactly() {
    let t = tmp();
    let data = t.path().join("data");
    write_dataset(&data, 96, 40, false);
    let reference = t.path().join("reference");
    let listed = train_with_crash(&data, &reference, "list");
    assert!(listed.status.success());
    let stderr = String::from_utf8_lossy(&listed.stderr);
    let points: Vec<&str> = stderr.lines().filter(|l| l.starts_with("crash point")).collect();
    // The opening metrics.json and steps.csv, then per epoch: model, commit record, metrics,
    // steps.csv (4 points each).
    assert_eq!(points.len(), 8 + 2 * 16, "{stderr}");
    for k in 1..=points.len() {
        let out = t.path().join(format!("crash{k}"));
        let crashed = train_with_crash(&data, &out, &k.to_string());
        assert!(!crashed.status.success(), "point {k} did not crash");
        let err = String::from_utf8_lossy(&crashed.stderr);
        assert!(err.contains(&format!("crash injected at point {k}")), "{err}");
        // Whatever exists loads: the model file is whole or absent.
        let model = out.join("model.safetensors");
        if model.exists() {
            ok(&["eval", "--checkpoint", s(&model), "--data", s(&data)]);
        }
        if out.join("metrics.json").exists() {
            ok(&["train", "--resume", s(&out)]);
        } else {
            // Killed before its first record: nothing to resume, and the same command
            // starts it again in the same folder.
            let err = fails(&["train", "--resume", s(&out)]);
            assert!(err.contains("start it again"), "{err}");
            assert!(train_with_crash(&data, &out, "0").status.success());
        }
        assert_eq!(
            learning_curve(&metrics(&out)),
            learning_curve(&metrics(&reference)),
            "resumed after a kill at point {k} ({})",
            points[k - 1]
        );
        assert_eq!(
            tensors(&out.join("model.safetensors")),
            tensors(&reference.join("model.safetensors")),
            "weights after a kill at point {k} ({})",
            points[k - 1]
        );
        // The step log: every step once, with the reference's losses and rates.
        let steps = |dir: &Path| -> Vec<String> {
            let csv = std::fs::read_to_string(dir.join("steps.csv")).unwrap();
            csv.lines()
                .map(|l| l.split(',').take(4).collect::<Vec<_>>().join(","))
                .collect()
        };
        assert_eq!(steps(&out), steps(&reference), "steps.csv after a kill at point {k}");
        assert_eq!(metrics(&out)["status"], "complete");
        assert!(leftovers(&out).is_empty(), "point {k}: {:?}", leftovers(&out));
    }
}

#[test]
fn two_trainings_into_one_folder_never_both_write_it() {
    let t = tmp();
    let data = t.path().join("data");
    write_dataset(&data, 600, 100, false);
    let out = t.path().join("run");
    let start = || {
        Command::new(env!("CARGO_BIN_EXE_normlab"))
            .args(["train", "--data", s(&data), "--out", s(&out), "--epochs", "2"])
            .args(["--batch-size", "16", "--threads", "1"])
            .env_remove("NORMLAB_DATA")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (start(), start());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let succeeded = [&a, &b].iter().filter(|o| o.status.success()).count();
    assert_eq!(succeeded, 1, "exactly one of two trainings into one folder may run");
    let loser = if a.status.success() { &b } else { &a };
    let err = String::from_utf8_lossy(&loser.stderr);
    assert!(
        err.contains("being written by another normlab process") || err.contains("already holds a run"),
        "{err}"
    );
    // A resume while the folder is being written is refused too, naming the writer's pid.
    let mut running = Command::new(env!("CARGO_BIN_EXE_normlab"))
        .args(["train", "--resume", s(&out), "--epochs", "30"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = running.id();
    wait_for_lock(&out, pid);
    let err = fails(&["train", "--resume", s(&out), "--epochs", "31"]);
    assert!(err.contains(&format!("pid {pid}")), "{err}");
    // Once the writer is gone (Ctrl-C), its lock is released and the run continues.
    Command::new("kill").args(["-INT", &pid.to_string()]).status().unwrap();
    assert_eq!(running.wait().unwrap().code(), Some(130));
    ok(&["train", "--resume", s(&out), "--epochs", "3"]);
}

#[test]
fn ctrl_c_names_the_checkpoint_and_the_resume_command() {
    let t = tmp();
    let data = t.path().join("data");
    write_dataset(&data, 600, 100, false);
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
        "64",
    ]);
    let running = Command::new(env!("CARGO_BIN_EXE_normlab"))
        .args(["train", "--resume", s(&out), "--epochs", "50"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = running.id();
    wait_for_lock(&out, pid);
    std::thread::sleep(std::time::Duration::from_millis(200));
    Command::new("kill").args(["-INT", &pid.to_string()]).status().unwrap();
    let o = running.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(
        err.contains("model.safetensors") && err.contains(&format!("normlab train --resume {}", out.display())),
        "{err}"
    );
}

#[test]
fn a_run_folder_of_the_older_layout_still_resumes() {
    // Before the commit record, train_state held only the optimizer (weights in
    // model.safetensors, metrics in metrics.json): such folders resume as they did.
    let t = tmp();
    let data = t.path().join("data");
    write_dataset(&data, 96, 40, false);
    let (old, reference) = (t.path().join("old"), t.path().join("reference"));
    assert!(train_with_crash(&data, &reference, "0").status.success());
    let args = ["--batch-size", "32", "--seed", "5", "--threads", "1", "--epochs", "1"];
    let mut first = vec!["train", "--data", s(&data), "--out", s(&old)];
    first.extend_from_slice(&args);
    ok(&first);
    let state = old.join("train_state.safetensors");
    rewrite_safetensors(&state, &state, &mut |entries, md| {
        entries.retain(|e| !e.name.starts_with("model."));
        let md = md.as_mut().unwrap();
        md.retain(|k, _| k == "step" || k == "epoch");
    });
    ok(&["train", "--resume", s(&old), "--epochs", "2"]);
    assert_eq!(learning_curve(&metrics(&old)), learning_curve(&metrics(&reference)));
    assert_eq!(
        tensors(&old.join("model.safetensors")),
        tensors(&reference.join("model.safetensors"))
    );
}
