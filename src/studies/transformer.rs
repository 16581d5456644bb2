//! The transformer study: a small ViT on Fashion-MNIST testing the normalization claims of the
//! transformer papers. Post-norm needs a learning-rate warm-up and pre-norm does not (Xiong et
//! al. 2020); RMSNorm trains as well as LayerNorm in less time (Zhang & Sennrich 2019);
//! BatchNorm in the blocks trains worse than LayerNorm (the PowerNorm premise, Shen et al.
//! 2020); and Xiong et al.'s probe: per-block gradient norms at initialization, pre and post.

use super::analysis::*;
use super::*;

/// The study's model: timm's layout, width 64, 4 blocks of 4 heads, 4x4 patches (50 tokens).
pub const TRANSFORMER_MODEL: &str = "vit:64,4,4,4";
/// The two learning rates (AdamW): the norms are compared at the lower, warm-up at the higher.
const LR_LOW: f64 = 1e-3;
const LR_HIGH: f64 = 3e-3;

pub struct Transformer;

/// Kernel timings measured beside the runs (alternating, one round per seed): RMSNorm's and
/// LayerNorm's forward + backward on the model's token rows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KernelTiming {
    pub kernel: String,
    pub shape: [usize; 4],
    /// Median milliseconds per round.
    pub ms: Vec<f64>,
}

fn arm(placement: &str, warmup: usize, norm: &str, lr: f64) -> BTreeMap<String, String> {
    labels(&[
        ("placement", placement.into()),
        ("warmup", warmup.to_string()),
        ("norm", norm.into()),
        ("lr", lr.to_string()),
    ])
}

/// The spec of each arm's norm name.
fn norm_spec(norm: &str) -> NormSpec {
    match norm {
        "rms" => NormSpec::builtin("rms"),
        "bn" => NormSpec::builtin("bn"),
        _ => NormSpec::builtin("layernorm:eps=1e-6"),
    }
}

fn model(quick: bool, placement: &str) -> Arch {
    let base = if quick { "vit:32,2,2,7" } else { TRANSFORMER_MODEL };
    Arch::builtin(if placement == "post" {
        if quick {
            "vit:32,2,2,7,4,post"
        } else {
            "vit:64,4,4,4,4,post"
        }
    } else {
        base
    })
}

impl Study for Transformer {
    fn name(&self) -> &'static str {
        "transformer"
    }

    fn about(&self) -> &'static str {
        "a small ViT: post- vs pre-norm with and without warm-up, RMSNorm vs LayerNorm (quality and time), BN in the blocks, gradient norms at init"
    }

    fn plan(&self, opts: &StudyOptions) -> Result<Plan> {
        let (epochs, train, test) = if opts.quick { (2, 512, 200) } else { (6, 10000, 2000) };
        let mut out = Vec::new();
        let arms = [
            ("post", 0, "layernorm", LR_HIGH),
            ("post", 1, "layernorm", LR_HIGH),
            ("pre", 0, "layernorm", LR_HIGH),
            ("pre", 1, "layernorm", LR_HIGH),
            ("pre", 0, "layernorm", LR_LOW),
            ("pre", 0, "rms", LR_LOW),
            ("pre", 0, "bn", LR_LOW),
        ];
        for (placement, warmup, norm, lr) in arms {
            let mut config = base_config(opts, epochs, train, test);
            config.model = model(opts.quick, placement);
            config.norm = norm_spec(norm);
            config.warmup_epochs = warmup;
            config.optimizer = OptimizerConfig {
                kind: OptimizerKind::Adamw,
                lr,
                weight_decay: 0.01,
                ..OptimizerConfig::default()
            };
            out.push(Planned {
                labels: arm(placement, warmup, norm, lr),
                config,
                bn_evals: false,
            });
        }
        let mut settings = Settings::new();
        settings.insert(
            "model".into(),
            format!(
                "{} (timm's VisionTransformer layout: width, blocks, heads, patch side; MLP ratio 4; pre-norm unless post)",
                model(opts.quick, "pre")
            ),
        );
        settings.insert(
            "optimizer".into(),
            format!("AdamW (weight decay 0.01), lr {LR_HIGH} for the warm-up arms, {LR_LOW} for the norm arms; constant after any warm-up"),
        );
        settings.insert(
            "warm-up".into(),
            "linear over the first epoch, step by step (warmup 1), or none (0)".into(),
        );
        settings.insert(
            "norms".into(),
            "layernorm (eps 1e-6, timm's), rms (eps 1e-6), bn (BatchNorm1d over batch × tokens)".into(),
        );
        settings.insert("epochs".into(), epochs.to_string());
        settings.insert("batch size".into(), "128".into());
        settings.insert("training images (at most)".into(), train.to_string());
        settings.insert("test images (at most)".into(), test.to_string());
        Ok((out, settings))
    }

    fn probe(&self, planned: &[Planned], results: &mut StudyResults, opts: &StudyOptions) -> Result<()> {
        let dir = resolve_data_dir(opts.data.as_deref())?;
        let train_set = crate::data::load_split(&dir, true)?;
        let input_norm = train_set.pixel_stats()?;
        // Gradient norms at initialization, pre and post (layernorm, no warm-up, the high rate).
        for p in planned.iter().filter(|p| {
            p.labels["warmup"] == "0" && p.labels["norm"] == "layernorm" && p.config.optimizer.lr == LR_HIGH
        }) {
            for seed in 0..opts.seeds as u64 {
                for mut g in gradients::probe(&p.config, seed, None, &train_set, input_norm)? {
                    g.norm = p.labels["placement"].clone();
                    results.gradients.push(g);
                }
            }
        }
        // RMSNorm against LayerNorm on the model's token rows [128·T, D], alternating, one
        // round per seed.
        let spec = ModelSpec::new(
            model(opts.quick, "pre"),
            NormSpec::None,
            train_set.shape,
            train_set.classes,
        )?;
        let Arch::Vit(v) = spec.model else {
            return Err(Error::invalid("the transformer study's model is not a vit"));
        };
        let [_, h, w] = spec.input;
        let tokens = (h / v.patch) * (w / v.patch) + 1;
        let shape = [128 * tokens, v.dim, 1, 1];
        let reps = if opts.quick { 3 } else { 31 };
        let mut times: Vec<KernelTiming> = ["layernorm", "rms"]
            .iter()
            .map(|k| KernelTiming {
                kernel: k.to_string(),
                shape,
                ms: Vec::new(),
            })
            .collect();
        for _ in 0..opts.seeds {
            for t in times.iter_mut() {
                let kernel = format!("{}_fwd_bwd", t.kernel);
                let secs = crate::bench::bench_kernel(
                    &kernel,
                    if t.kernel == "rms" { "rms" } else { "layernorm" },
                    "fwd+bwd",
                    shape,
                    reps,
                )?;
                t.ms.push(secs * 1e3);
            }
        }
        results.kernels = times;
        Ok(())
    }

    fn analyze(&self, r: &StudyResults) -> Result<Analysis> {
        transformer(r)
    }
}

/// Mean images per second of a run's epochs.
fn images_per_sec(r: &RunRecord) -> f64 {
    mean_std(&r.epochs.iter().map(|e| e.images_per_sec).collect::<Vec<_>>()).0
}

/// The combined ‖∂L/∂W‖ of each block's weights (qkv, proj, fc1, fc2), in block order.
fn per_block(layers: &[(String, f64)]) -> Vec<f64> {
    let mut blocks: BTreeMap<usize, f64> = BTreeMap::new();
    for (name, n) in layers {
        if let Some(i) = name
            .strip_prefix("blocks.")
            .and_then(|s| s.split('.').next())
            .and_then(|s| s.parse().ok())
        {
            *blocks.entry(i).or_default() += n * n;
        }
    }
    blocks.values().map(|s| s.sqrt()).collect()
}

pub(crate) fn transformer(r: &StudyResults) -> Result<Analysis> {
    let (hi, lo) = (LR_HIGH.to_string(), LR_LOW.to_string());
    let at = |placement: &str, warmup: &str, norm: &str, lr: &str| {
        select(
            &r.runs,
            &[("placement", placement), ("warmup", warmup), ("norm", norm), ("lr", lr)],
        )
    };
    let err = |p: &str, w: &str, n: &str, lr: &str| per_seed(&at(p, w, n, lr), r.seeds, &error_of);
    let arms = [
        ("post", "0", "layernorm", hi.as_str()),
        ("post", "1", "layernorm", hi.as_str()),
        ("pre", "0", "layernorm", hi.as_str()),
        ("pre", "1", "layernorm", hi.as_str()),
        ("pre", "0", "layernorm", lo.as_str()),
        ("pre", "0", "rms", lo.as_str()),
        ("pre", "0", "bn", lo.as_str()),
    ];
    let name = |(p, w, n, lr): (&str, &str, &str, &str)| {
        format!("{n} {p}-norm, lr {lr}{}", if w == "1" { ", warm-up" } else { "" })
    };
    let (mut tables, mut plots) = (Vec::new(), Vec::new());
    let mut rows = Vec::new();
    let mut curves: Vec<Series> = Vec::new();
    for a in arms {
        let cell = at(a.0, a.1, a.2, a.3);
        let ips: Vec<f64> = cell
            .iter()
            .filter(|x| x.status == "complete")
            .map(|x| images_per_sec(x))
            .collect();
        let loss: Vec<f64> = cell
            .iter()
            .filter(|x| x.status == "complete")
            .map(|x| x.train_loss)
            .collect();
        rows.push(vec![
            name(a),
            fmt_cell(error_cell(&cell)),
            fmt_mean(mean_std(&loss), 3),
            fmt_mean(mean_std(&ips), 0),
        ]);
        if a.3 == hi {
            let epochs = cell.iter().map(|x| x.epochs.len()).min().unwrap_or(0);
            let pts = (0..epochs)
                .map(|e| {
                    let v: Vec<f64> = cell.iter().map(|x| 100.0 * x.epochs[e].test_accuracy).collect();
                    let (m, sd) = mean_std(&v);
                    ((e + 1) as f64, m, sd)
                })
                .collect();
            // Named by placement first: the plot colours a line by its label's first word.
            curves.push((
                format!("{}-norm{}", a.0, if a.1 == "1" { ", warm-up" } else { ", no warm-up" }),
                pts,
            ));
        }
    }
    tables.push(Table {
        caption: "Every arm: test error (%), final training loss (eval mode, training images) and training images/s (mean ± std over seeds)".into(),
        header: vec!["arm".into(), "test error (%)".into(), "train loss".into(), "images/s".into()],
        rows,
    });
    plots.push(Plot {
        file: "transformer_warmup.svg".into(),
        caption: format!("Test accuracy after each epoch at lr {hi}, pre- and post-norm, with and without warm-up (bars: std over seeds)"),
        svg: lines_svg("ViT test accuracy: placement and warm-up", "epoch", "test accuracy (%)", &curves, false)?,
    });

    // Gradient norms per block at initialization (Xiong et al.'s figure).
    let mut grad_series: Vec<Series> = Vec::new();
    let mut growth: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for placement in ["pre", "post"] {
        let probes: Vec<Vec<f64>> = r
            .gradients
            .iter()
            .filter(|g| g.norm == placement && g.when == "init")
            .map(|g| per_block(&g.layers))
            .collect();
        let blocks = probes.iter().map(Vec::len).min().unwrap_or(0);
        let pts = (0..blocks)
            .map(|b| {
                let (m, sd) = mean_std(&probes.iter().map(|p| p[b]).collect::<Vec<_>>());
                ((b + 1) as f64, m, sd)
            })
            .collect();
        grad_series.push((format!("{placement}-norm"), pts));
        // log2 of the last block's norm over the first's, per seed.
        growth.insert(
            placement.into(),
            probes
                .iter()
                .filter(|p| p.len() >= 2 && p[0] > 0.0)
                .map(|p| (p[p.len() - 1] / p[0]).log2())
                .collect(),
        );
    }
    if grad_series.iter().any(|(_, p)| !p.is_empty()) {
        plots.push(Plot {
            file: "transformer_gradients.svg".into(),
            caption: "‖∂L/∂W‖ of each block's weights (qkv, proj, fc1, fc2 together) at initialization on 128 training images, pre- and post-norm (bars: std over seeds)".into(),
            svg: lines_svg("Gradient norm per block at initialization", "block (input to output)", "gradient norm", &grad_series, false)?,
        });
    }

    // RMSNorm against LayerNorm: kernel time measured beside the runs, and whole steps.
    let kernel = |k: &str| r.kernels.iter().find(|t| t.kernel == k);
    let mut kernel_saving = Vec::new();
    if let (Some(ln), Some(rms)) = (kernel("layernorm"), kernel("rms")) {
        kernel_saving = ln.ms.iter().zip(&rms.ms).map(|(l, s)| 100.0 * (l - s) / l).collect();
        tables.push(Table {
            caption: format!(
                "LayerNorm and RMSNorm forward + backward on the model's token rows {:?} (median ms per round, rounds alternating)",
                ln.shape
            ),
            header: vec!["kernel".into(), "ms (mean ± std over rounds)".into()],
            rows: vec![
                vec!["layernorm".into(), fmt_mean(mean_std(&ln.ms), 3)],
                vec!["rms".into(), fmt_mean(mean_std(&rms.ms), 3)],
            ],
        });
    }
    let step_saving: Vec<f64> = {
        let ln = per_seed(&at("pre", "0", "layernorm", &lo), r.seeds, &images_per_sec);
        let rms = per_seed(&at("pre", "0", "rms", &lo), r.seeds, &images_per_sec);
        ln.iter().zip(&rms).map(|(l, s)| 100.0 * (s - l) / l).collect()
    };
    let claims = vec![
        Claim::new(
            "Post-norm without warm-up trains worse than with warm-up (at the larger learning rate)",
            format!("test error (%) at lr {hi}, post-norm without minus with warm-up"),
            &["post, no warm-up", "post, warm-up"],
            Kind::Greater,
            minus(&err("post", "0", "layernorm", &hi), &err("post", "1", "layernorm", &hi)),
            1.0,
            r.quick,
        ),
        Claim::new(
            "Pre-norm without warm-up trains about as well as with warm-up",
            format!("test error (%) at lr {hi}, pre-norm without minus with warm-up"),
            &["pre, no warm-up", "pre, warm-up"],
            Kind::Equivalent,
            minus(&err("pre", "0", "layernorm", &hi), &err("pre", "1", "layernorm", &hi)),
            2.0,
            r.quick,
        ),
        Claim::new(
            "RMSNorm trains about as well as LayerNorm",
            format!("test error (%) at lr {lo}, rms minus layernorm"),
            &["rms", "layernorm"],
            Kind::Equivalent,
            minus(&err("pre", "0", "rms", &lo), &err("pre", "0", "layernorm", &lo)),
            1.0,
            r.quick,
        ),
        Claim::new(
            "RMSNorm's normalization takes less time than LayerNorm's (the kernel)",
            "forward + backward time saved by rms (% of layernorm's), per alternating round",
            &["rms", "layernorm"],
            Kind::Greater,
            kernel_saving,
            5.0,
            r.quick,
        ),
        Claim::new(
            "RMSNorm makes the whole training step faster",
            "training images/s of rms over layernorm's, minus 1 (%)",
            &["rms", "layernorm"],
            Kind::Greater,
            step_saving,
            1.0,
            r.quick,
        ),
        Claim::new(
            "BatchNorm in the blocks trains worse than LayerNorm",
            format!("test error (%) at lr {lo}, bn minus layernorm"),
            &["bn", "layernorm"],
            Kind::Greater,
            minus(&err("pre", "0", "bn", &lo), &err("pre", "0", "layernorm", &lo)),
            1.0,
            r.quick,
        ),
        Claim::new(
            "Post-norm's gradients grow toward the output at initialization, pre-norm's do not",
            "log2(last block's ‖∂L/∂W‖ / first block's), post minus pre",
            &["post", "pre"],
            Kind::Greater,
            minus(
                growth.get("post").map(Vec::as_slice).unwrap_or(&[]),
                growth.get("pre").map(Vec::as_slice).unwrap_or(&[]),
            ),
            0.5,
            r.quick,
        ),
    ];
    let finding = verdict_lines(&claims);
    Ok(Analysis {
        title: "Transformers: where the norm sits, RMSNorm against LayerNorm, and BN in the blocks".into(),
        claims,
        claim: "Xiong et al. 2020: post-LN transformers need a learning-rate warm-up and pre-LN ones do not; at initialization post-LN's gradients near the output are large. Zhang & Sennrich 2019: RMSNorm matches LayerNorm's quality in 7-64% less running time. Shen et al. 2020 (PowerNorm): BatchNorm in transformers trains worse than LayerNorm (shown for language).".into(),
        finding,
        tables,
        plots,
    })
}
