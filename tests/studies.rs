//! Studies end to end on toy data: every study's --quick run writes results.json, results.csv,
//! its plots and a self-contained report.html; `normlab report` rebuilds them; bad input fails
//! before any training starts.

mod common;

use common::cli::*;

#[test]
fn every_quick_study_writes_parseable_outputs_and_report_rebuilds_them() {
    let t = tmp();
    let data = t.path().join("data");
    write_dataset(&data, 256, 64, false);
    for study in [
        "batch-size",
        "learning-rate",
        "regularization",
        "ics",
        "landscape",
        "rnn",
        "transformer",
    ] {
        let out = t.path().join(study);
        let text = ok(&[
            "study",
            study,
            "--quick",
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--seeds",
            "2",
        ]);
        assert!(
            text.contains("claims") && text.contains("quick run: a smoke test"),
            "{study}: {text}"
        );
        let results: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
        // Claims with every field, and no verdict from a smoke run.
        let claims = results["claims"].as_array().unwrap();
        assert!(!claims.is_empty(), "{study}: no claims");
        for c in claims {
            for k in [
                "claim",
                "metric",
                "arms",
                "per_seed",
                "mean_difference",
                "interval",
                "threshold",
                "seeds",
                "verdict",
            ] {
                assert!(c.get(k).is_some(), "{study}: claim lacks {k}: {c}");
            }
            assert_eq!(c["verdict"], "inconclusive (quick run)", "{study}: {c}");
        }
        let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
        if study == "landscape" {
            let runs = results["landscape"].as_array().unwrap();
            assert_eq!(runs.len(), 6, "bn, none and bn-noisy, two seeds");
            let probes: usize = runs.iter().map(|r| r["probes"].as_array().unwrap().len()).sum();
            assert_eq!(csv.lines().count(), probes + 1, "one CSV row per probe");
        } else if study == "ics" {
            let ics = results["ics"].as_array().unwrap();
            assert_eq!(ics.len(), 4, "bn and none, two seeds");
            let points: usize = ics.iter().map(|r| r["points"].as_array().unwrap().len()).sum();
            assert_eq!(csv.lines().count(), points + 1, "one CSV row per measurement");
        } else {
            let runs = results["runs"].as_array().unwrap();
            assert!(
                runs.len() >= 4 && runs.len().is_multiple_of(2),
                "{study}: {} runs",
                runs.len()
            );
            assert!(runs
                .iter()
                .all(|r| r["status"] == "complete" || r["status"] == "diverged"));
            assert_eq!(csv.lines().count(), runs.len() + 1, "{study}: one CSV row per run");
            if study == "regularization" {
                // Each epoch's fit is the model in eval mode on the run's training images: at the
                // last epoch, what the grid measures on the final checkpoint.
                for run in runs {
                    let fit = &run["epochs"].as_array().unwrap().last().unwrap()["fit"];
                    let (a, b) = (fit["loss"].as_f64().unwrap(), run["train_loss"].as_f64().unwrap());
                    assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "fit {a} vs final {b}");
                }
            }
            if study == "rnn" {
                // One trained plain LSTM per seed, 28 steps of four gates each.
                let gates = results["gates"].as_array().unwrap();
                assert_eq!(gates.len(), 2);
                assert_eq!(gates[0]["steps"].as_array().unwrap().len(), 28);
            }
            if study == "transformer" {
                // Gradient norms at init, pre and post per seed; the two kernels, one round each.
                let grads = results["gradients"].as_array().unwrap();
                assert_eq!(grads.len(), 4);
                let kernels = results["kernels"].as_array().unwrap();
                assert_eq!(kernels.len(), 2);
                assert!(kernels.iter().all(|k| k["ms"].as_array().unwrap().len() == 2));
            }
        }
        let html = std::fs::read_to_string(out.join("report.html")).unwrap();
        assert!(html.contains("<svg") && html.contains("What this run found"));
        assert!(
            !html.contains("<script") && !html.contains("src=\"http"),
            "{study}: report must be self-contained"
        );
        let svgs: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "svg"))
            .collect();
        assert!(!svgs.is_empty(), "{study}: no SVG plot");
        // report rebuilds everything from results.json alone.
        std::fs::remove_file(out.join("report.html")).unwrap();
        std::fs::remove_file(out.join("results.csv")).unwrap();
        ok(&["report", s(&out)]);
        assert!(out.join("report.html").exists() && out.join("results.csv").exists());
        // An existing results folder is never overwritten.
        let err = fails(&["study", study, "--quick", "--data", s(&data), "--out", s(&out)]);
        assert!(err.contains("already holds results.json"), "{err}");
    }
}

#[test]
fn compare_runs_a_grid_and_bad_input_fails_before_training() {
    let t = tmp();
    let data = t.path().join("data");
    write_dataset(&data, 128, 64, false);
    let out = t.path().join("cmp");
    ok(&[
        "compare",
        "--models",
        "seed-cnn",
        "--norms",
        "bn;gn:8;none",
        "--batch-sizes",
        "32,64",
        "--lrs",
        "0.001",
        "--seeds",
        "2",
        "--data",
        s(&data),
        "--out",
        s(&out),
    ]);
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(results["runs"].as_array().unwrap().len(), 3 * 2 * 2);
    assert!(std::fs::read_to_string(out.join("report.html"))
        .unwrap()
        .contains("<svg"));

    let bad = t.path().join("bad");
    let err = fails(&["study", "nonsense", "--quick", "--data", s(&data), "--out", s(&bad)]);
    assert!(err.contains("unknown study"), "{err}");
    let err = fails(&["compare", "--norms", "bn;gn:5", "--data", s(&data), "--out", s(&bad)]);
    assert!(err.contains("C % G"), "{err}");
    let err = fails(&["compare", "--norms", "bn;whiten", "--data", s(&data), "--out", s(&bad)]);
    assert!(err.contains("unknown norm spec"), "{err}");
    assert!(!bad.exists(), "nothing is written when the grid is invalid");
    let file = t.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let err = fails(&[
        "study",
        "batch-size",
        "--quick",
        "--data",
        s(&data),
        "--out",
        s(&file.join("sub")),
    ]);
    assert!(err.contains("a-file"), "{err}");
    let err = fails(&["report", s(&t.path().join("empty"))]);
    assert!(err.contains("results.json"), "{err}");
}
