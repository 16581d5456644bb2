//! The sync-bn study: under mpirun -n K: per-process BN, SyncBN and LayerNorm at 2, 4 and 8 images per process, against one process with the global batch. Its plan, its probes and its reading of the runs.

use super::analysis::*;
use super::*;

/// The sync-bn study's model.
pub const SYNC_BN_MODEL: &str = "mlp";

pub struct SyncBn;

impl Study for SyncBn {
    fn name(&self) -> &'static str {
        "sync-bn"
    }

    fn about(&self) -> &'static str {
        "under mpirun -n K: per-process BN, SyncBN and LayerNorm at 2, 4 and 8 images per process, against one process with the global batch"
    }

    fn plan(&self, opts: &StudyOptions) -> Result<Plan> {
        let mut out = Vec::new();
        let mut settings = Settings::new();
        // The MLP of the BN paper, whose BatchNorm1d at 2 images per process has two values per
        // statistic: per-process BN (DDP's default), SyncBN and LayerNorm over K processes, and
        // plain BN in one process with the same global batch (which SyncBN equals in exact
        // arithmetic). Adam, the same epochs for every batch.
        let k = opts.comm.size();
        if k < 2 {
            return Err(Error::invalid(
                    "the sync-bn study compares several processes: start it with mpirun -n 4 normlab study sync-bn (normlab built with --features mpi)",
                ));
        }
        let (epochs, train, test) = if opts.quick { (1, 96 * k, 500) } else { (5, 12000, 5000) };
        let per_process: &[usize] = if opts.quick { &[2] } else { &[2, 4, 8] };
        for &b in per_process {
            let arms = [("bn", k), ("syncbn", k), ("layernorm", k), ("bn", 1)];
            for (norm, processes) in arms {
                let mut config = base_config(opts, epochs, train, test);
                config.model = Arch::builtin(SYNC_BN_MODEL);
                config.norm = NormSpec::builtin(norm);
                config.batch_size = b * k;
                let arm = if processes == 1 {
                    format!("{norm} (1 process)")
                } else {
                    norm.to_string()
                };
                out.push(Planned {
                    labels: labels(&[
                        ("norm", arm),
                        ("per_process_batch", b.to_string()),
                        ("processes", processes.to_string()),
                    ]),
                    config,
                    bn_evals: false,
                });
            }
        }
        settings.insert(
            "model".into(),
            format!("{SYNC_BN_MODEL} (784-100-100-100-10, sigmoid, BatchNorm1d)"),
        );
        settings.insert("processes".into(), k.to_string());
        settings.insert("optimizer".into(), "Adam, lr 1e-3".into());
        settings.insert("epochs".into(), epochs.to_string());
        settings.insert("global batch".into(), format!("{k} x the per-process batch"));
        settings.insert("training images (at most)".into(), train.to_string());
        settings.insert("test images (at most)".into(), test.to_string());
        Ok((out, settings))
    }

    fn analyze(&self, r: &StudyResults) -> Result<Analysis> {
        sync_bn(r)
    }
}

/// sync-bn: test error of per-process BN, SyncBN, LayerNorm and one-process BN by the batch
/// each process sees.
pub(crate) fn sync_bn(r: &StudyResults) -> Result<Analysis> {
    let k = r.settings.get("processes").cloned().unwrap_or_else(|| "K".into());
    let one = "bn (1 process)".to_string();
    let arms = [
        "bn".to_string(),
        "syncbn".to_string(),
        "layernorm".to_string(),
        one.clone(),
    ];
    let mut batches: Vec<usize> = values(&r.runs, "per_process_batch")
        .iter()
        .filter_map(|b| b.parse().ok())
        .collect();
    batches.sort();
    let (header, rows, series) = error_by(&r.runs, &arms, "per_process_batch", &batches, &|b| {
        format!("{b} per process")
    });
    let tables = vec![Table {
        caption: format!(
            "Test error (%) by images per process, {k} processes (global batch = {k} x that), and plain BN in one process with the same global batch (mean ± std over seeds)"
        ),
        header,
        rows,
    }];
    let plots = vec![Plot {
        file: "sync_bn_error.svg".into(),
        caption: "Test error against the images each process sees (bars: std over seeds)".into(),
        svg: lines_svg(
            "Per-process BN, SyncBN and LayerNorm across processes",
            "images per process (log scale)",
            "test error (%)",
            &series,
            true,
        )?,
    }];
    let small = batches.first().copied().unwrap_or(2).to_string();
    let err = |arm: &str| {
        per_seed(
            &select(&r.runs, &[("norm", arm), ("per_process_batch", &small)]),
            r.seeds,
            &error_of,
        )
    };
    let claims = vec![
        Claim::new(
            "SyncBN recovers BN's accuracy at small per-process batches",
            format!("test error (%) at {small} images per process, syncbn over {k} processes minus bn in one process with the global batch"),
            &["syncbn", &one],
            Kind::Equivalent,
            minus(&err("syncbn"), &err(&one)),
            1.0,
            r.quick,
        ),
        Claim::new(
            "Per-process BN (DDP's default) loses accuracy at small per-process batches",
            format!("test error (%) at {small} images per process, bn minus syncbn"),
            &["bn", "syncbn"],
            Kind::Greater,
            minus(&err("bn"), &err("syncbn")),
            2.0,
            r.quick,
        ),
    ];
    let finding = format!(
        "With {small} images per process each per-process BatchNorm1d statistic pools {small} values; SyncBN pools the global batch's. {}",
        verdict_lines(&claims)
    );
    Ok(Analysis {
        title: "Synchronized BatchNorm across processes".into(),
        claims,
        claim: "Data-parallel training with per-process BN statistics suffers at small per-process batches; synchronized BN (statistics over the global batch) recovers the accuracy of BN with the global batch.".into(),
        finding,
        tables,
        plots,
    })
}
