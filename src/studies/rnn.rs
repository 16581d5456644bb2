//! The rnn study: LSTM without a norm, with LN, per-step BN and BN shared across steps: gate statistics per step, batch sizes, convergence. Its plan, its probes and its reading of the runs.

use super::analysis::*;
use super::*;

/// The rnn study's model and the test accuracy its convergence claim counts steps to.
pub const RNN_MODEL: &str = "lstm:64";
pub const RNN_TARGET: f64 = 0.8;

pub struct Rnn;

impl Study for Rnn {
    fn name(&self) -> &'static str {
        "rnn"
    }

    fn about(&self) -> &'static str {
        "LSTM without a norm, with LN, per-step BN and BN shared across steps: gate statistics per step, batch sizes, convergence"
    }

    fn plan(&self, opts: &StudyOptions) -> Result<Plan> {
        let mut out = Vec::new();
        let mut settings = Settings::new();
        // An LSTM reading each image's 28 rows. Norms at batch 32 (claims 1 and 3), then LN
        // and per-step BN at batches 4 and 128 too (claim 2); Adam with the square-root
        // scaling of its rate with the batch, the same epochs for every batch.
        let (epochs, train, test) = if opts.quick { (2, 512, 300) } else { (10, 12000, 5000) };
        let mut push = |norm: &'static str, b: usize| {
            let mut config = base_config(opts, epochs, train, test);
            config.model = Arch::builtin(RNN_MODEL);
            config.norm = NormSpec::builtin(norm);
            config.batch_size = b;
            config.optimizer.lr = 1e-3 * (b as f64 / 32.0).sqrt();
            out.push(Planned {
                labels: labels(&[("norm", norm.into()), ("batch_size", b.to_string())]),
                config,
                bn_evals: false,
            });
        };
        for norm in ["none", "ln", "bn", "bn-shared"] {
            push(norm, 32);
        }
        let sizes: &[usize] = if opts.quick { &[8] } else { &[4, 128] };
        for &b in sizes {
            for norm in ["ln", "bn"] {
                push(norm, b);
            }
        }
        settings.insert(
            "model".into(),
            format!("{RNN_MODEL} (an LSTM reading 28 rows of 28 pixels, a linear classifier on its last hidden state)"),
        );
        settings.insert("optimizer".into(), "Adam, lr 1e-3 x sqrt(batch / 32)".into());
        settings.insert("epochs".into(), epochs.to_string());
        settings.insert("training images (at most)".into(), train.to_string());
        settings.insert("test images (at most)".into(), test.to_string());
        settings.insert(
            "convergence target".into(),
            format!(
                "{:.0}% test accuracy (steps counted at the end of the first epoch that reaches it)",
                100.0 * RNN_TARGET
            ),
        );
        Ok((out, settings))
    }

    fn probe(&self, planned: &[Planned], results: &mut StudyResults, opts: &StudyOptions) -> Result<()> {
        results.gates = rnn_gate_stats(planned, &results.runs, opts)?;
        Ok(())
    }

    fn analyze(&self, r: &StudyResults) -> Result<Analysis> {
        rnn(r)
    }
}

/// Why BN does not fit a recurrence: each plain LSTM (batch 32) of the rnn study, run on 512
/// test images, gives its first layer's gate pre-activation statistics at every time step.
pub(crate) fn rnn_gate_stats(planned: &[Planned], runs: &[RunRecord], opts: &StudyOptions) -> Result<Vec<GateStats>> {
    let dir = resolve_data_dir(opts.data.as_deref())?;
    let test = crate::data::load_split(&dir, false)?;
    let mut out = Vec::new();
    for p in planned
        .iter()
        .filter(|p| p.labels.get("norm").map(String::as_str) == Some("none"))
    {
        for (k, r) in runs.iter().enumerate() {
            if r.labels != p.labels || r.status != "complete" {
                continue;
            }
            let path = opts.out.join("runs").join(format!("{k:03}")).join("model.safetensors");
            let (mut model, meta) = crate::checkpoint::load_model(&path)?;
            let idx: Vec<usize> = (0..test.len().min(512)).collect();
            let mut labels = Vec::new();
            test.batch(&idx, meta.input_norm, model.input_mut(), &mut labels)?;
            model.forward(crate::nn::Mode::Eval)?;
            let mut steps = None;
            if let Some((_, first)) = model.net.layers.first_mut() {
                first.visit_parts(&mut |part| {
                    if let Some(lstm) = part.downcast_mut::<crate::nn::lstm::Lstm>() {
                        steps = Some(lstm.gate_preactivation_stats(idx.len()));
                    }
                });
            }
            let steps = steps.ok_or_else(|| Error::invalid("the rnn study's model has no LSTM first layer"))?;
            out.push(GateStats { seed: r.seed, steps });
        }
    }
    Ok(out)
}

/// Optimizer steps until the test accuracy first reaches `target` (counted at the end of that
/// epoch); a run that never reaches it counts one epoch past its last (censored).
pub(crate) fn steps_to(r: &RunRecord, target: f64) -> f64 {
    let k = r
        .epochs
        .iter()
        .position(|e| e.test_accuracy >= target)
        .unwrap_or(r.epochs.len());
    ((k + 1) * r.steps_per_epoch) as f64
}

pub(crate) fn rnn(r: &StudyResults) -> Result<Analysis> {
    let target = crate::studies::RNN_TARGET;
    let at = |norm: &str, b: &str| select(&r.runs, &[("norm", norm), ("batch_size", b)]);
    let err = |norm: &str, b: &str| per_seed(&at(norm, b), r.seeds, &error_of);
    let mut batches: Vec<usize> = values(&r.runs, "batch_size")
        .iter()
        .filter_map(|b| b.parse().ok())
        .collect();
    batches.sort();
    let (small, large) = (
        batches.first().copied().unwrap_or(32).to_string(),
        batches.last().copied().unwrap_or(32).to_string(),
    );
    let norms = ["none", "ln", "bn", "bn-shared"];
    let (mut tables, mut plots) = (Vec::new(), Vec::new());

    // Norms at batch 32: test error, steps to the target, and the learning curves.
    let mut rows = Vec::new();
    let mut curves: Vec<Series> = Vec::new();
    for norm in norms {
        let cell = at(norm, "32");
        let steps: Vec<f64> = cell
            .iter()
            .filter(|x| x.status == "complete")
            .map(|x| steps_to(x, target))
            .collect();
        rows.push(vec![
            norm.to_string(),
            fmt_cell(error_cell(&cell)),
            fmt_mean(mean_std(&steps), 0),
        ]);
        let epochs = cell.iter().map(|x| x.epochs.len()).min().unwrap_or(0);
        let pts = (0..epochs)
            .map(|e| {
                let v: Vec<f64> = cell.iter().map(|x| 100.0 * x.epochs[e].test_accuracy).collect();
                let (m, sd) = mean_std(&v);
                (((e + 1) * cell[0].steps_per_epoch) as f64, m, sd)
            })
            .collect();
        curves.push((norm.to_string(), pts));
    }
    tables.push(Table {
        caption: format!(
            "Batch 32: test error (%) and optimizer steps to {:.0}% test accuracy (mean ± std over seeds; a run that never gets there counts one epoch past its last)",
            100.0 * target
        ),
        header: vec!["norm".into(), "test error (%)".into(), "steps to target".into()],
        rows,
    });
    plots.push(Plot {
        file: "rnn_test_accuracy.svg".into(),
        caption: "Test accuracy after each epoch at batch 32, one line per norm (bars: std over seeds)".into(),
        svg: lines_svg(
            "LSTM test accuracy during training (batch 32)",
            "optimizer steps",
            "test accuracy (%)",
            &curves,
            false,
        )?,
    });

    // LN and per-step BN across batch sizes.
    let (header, rows, series) = error_by_batch(&r.runs, &["ln".to_string(), "bn".to_string()], &batches);
    tables.push(Table {
        caption: "Test error (%) by batch size (Adam, lr 1e-3·sqrt(B/32), the same epochs for every batch)".into(),
        header,
        rows,
    });
    plots.push(Plot {
        file: "rnn_error_vs_batch.svg".into(),
        caption: "Test error against batch size for LN-LSTM and per-step BN-LSTM (bars: std over seeds)".into(),
        svg: lines_svg(
            "LSTM test error against batch size",
            "batch size (log scale)",
            "test error (%)",
            &series,
            true,
        )?,
    });

    // Why BN does not fit: the gate pre-activations' statistics move from step to step.
    let gate_names = ["input i", "forget f", "cell g", "output o"];
    let mut gate_series: Vec<Series> = Vec::new();
    let mut gate_rows = Vec::new();
    let mut drift = Vec::new();
    for (k, gate) in gate_names.iter().enumerate() {
        let steps = r.gates.iter().map(|g| g.steps.len()).min().unwrap_or(0);
        let (mut means, mut stds) = (Vec::new(), Vec::new());
        let pts: Vec<(f64, f64, f64)> = (0..steps)
            .map(|t| {
                let m: Vec<f64> = r.gates.iter().map(|g| g.steps[t][k].0).collect();
                let sd: Vec<f64> = r.gates.iter().map(|g| g.steps[t][k].1).collect();
                let (m, sd) = (mean_std(&m).0, mean_std(&sd).0);
                means.push(m);
                stds.push(sd);
                ((t + 1) as f64, m, sd)
            })
            .collect();
        if steps > 0 {
            let lo = means.iter().copied().fold(f64::MAX, f64::min);
            let hi = means.iter().copied().fold(f64::MIN, f64::max);
            let (slo, shi) = stds
                .iter()
                .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
            let within = mean_std(&stds).0;
            drift.push((gate.to_string(), (hi - lo) / within, shi / slo));
            gate_rows.push(vec![
                gate.to_string(),
                format!("{lo:.3} … {hi:.3}"),
                format!("{slo:.3} … {shi:.3}"),
                format!("{:.2}", (hi - lo) / within),
                format!("{:.2}", shi / slo),
            ]);
        }
        gate_series.push((gate.to_string(), pts));
    }
    if !gate_rows.is_empty() {
        tables.push(Table {
            caption: "A trained plain LSTM's gate pre-activations over 512 test images, per time step: the range of the per-step means and standard deviations across the 28 steps (mean over seeds)".into(),
            header: vec![
                "gate".into(),
                "per-step mean".into(),
                "per-step std".into(),
                "range of means / mean std".into(),
                "largest / smallest std".into(),
            ],
            rows: gate_rows,
        });
        plots.push(Plot {
            file: "rnn_gate_statistics.svg".into(),
            caption: "Mean of each gate's pre-activation at every time step of a trained plain LSTM (bars: the standard deviation within the step, over images and units)".into(),
            svg: lines_svg("Gate pre-activations per time step (plain LSTM)", "time step (image row)", "pre-activation", &gate_series, false)?,
        });
    }

    // Batch `small` and `large` take different numbers of steps at different rates for the
    // same epochs: their final errors compare only once the curves have flattened. (The
    // claims at batch 32 compare arms that take the same steps: no condition.)
    let flat_requires = |norms: &[&str]| {
        format!(
            "the training curves of {} at batch {small} and {large} flattened (last epoch's fall under {FLAT_SHARE}% of the whole)",
            norms.join(" and ")
        )
    };
    let flat_broken = |norms: &[&str]| {
        let arms: Vec<(String, Vec<&RunRecord>)> = norms
            .iter()
            .flat_map(|n| [(*n, small.as_str()), (*n, large.as_str())])
            .map(|(n, b)| (format!("{n} at batch {b}"), at(n, b)))
            .collect();
        unflattened(&arms)
    };
    let claims = vec![
        Claim::new(
            "BN with statistics shared across time steps trains worse than per-step BN",
            "test error (%) at batch 32, bn-shared minus bn",
            &["bn-shared", "bn"],
            Kind::Greater,
            minus(&err("bn-shared", "32"), &err("bn", "32")),
            1.0,
            r.quick,
        ),
        Claim::new(
            "BN with statistics shared across time steps trains worse than LN",
            "test error (%) at batch 32, bn-shared minus ln",
            &["bn-shared", "ln"],
            Kind::Greater,
            minus(&err("bn-shared", "32"), &err("ln", "32")),
            1.0,
            r.quick,
        ),
        Claim::new(
            "LN does not depend on the batch size",
            format!("test error (%) of ln, batch {small} minus batch {large}"),
            &[&format!("ln @ {small}"), &format!("ln @ {large}")],
            Kind::Equivalent,
            minus(&err("ln", &small), &err("ln", &large)),
            2.0,
            r.quick,
        )
        .given(flat_requires(&["ln"]), flat_broken(&["ln"])),
        Claim::new(
            "Per-step BN depends on the batch size (more than LN does)",
            format!("(bn − ln) test error (%) at batch {small} minus the same at batch {large}"),
            &[
                &format!("bn @ {small}"),
                &format!("ln @ {small}"),
                &format!("bn @ {large}"),
                &format!("ln @ {large}"),
            ],
            Kind::Greater,
            minus(
                &minus(&err("bn", &small), &err("ln", &small)),
                &minus(&err("bn", &large), &err("ln", &large)),
            ),
            2.0,
            r.quick,
        )
        .given(flat_requires(&["bn", "ln"]), flat_broken(&["bn", "ln"])),
        Claim::new(
            "LN-LSTM converges faster than the plain LSTM",
            format!(
                "optimizer steps to {:.0}% test accuracy at batch 32, none minus ln",
                100.0 * target
            ),
            &["none", "ln"],
            Kind::Greater,
            minus(
                &per_seed(&at("none", "32"), r.seeds, &|x| steps_to(x, target)),
                &per_seed(&at("ln", "32"), r.seeds, &|x| steps_to(x, target)),
            ),
            at("none", "32").first().map_or(1.0, |x| x.steps_per_epoch as f64),
            r.quick,
        ),
    ];
    let drift_text = drift
        .iter()
        .map(|(g, d, s)| format!("{g}: means span {d:.2} within-step stds, stds vary {s:.2}x"))
        .collect::<Vec<_>>()
        .join("; ");
    let finding = format!(
        "Across the 28 time steps of a trained plain LSTM the gate pre-activation statistics move ({drift_text}), so one set of normalization statistics cannot fit every step. {}",
        verdict_lines(&claims)
    );
    Ok(Analysis {
        title: "Recurrent networks: where BatchNorm does not fit, and LayerNorm does".into(),
        claims,
        claim: "The articles: BN is not used in recurrent networks because the activations at each time step have different distributions; Layer Normalization (Ba et al. 2016) fits there, and recurrent BN needs separate statistics per time step (Cooijmans et al. 2016).".into(),
        finding,
        tables,
        plots,
    })
}
