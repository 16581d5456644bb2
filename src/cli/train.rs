//! `normlab train`: a fresh run, or `--resume` of one.

use std::path::PathBuf;

use clap::Args;

use normlab::optim::{OptimizerConfig, OptimizerKind, Schedule};
use normlab::train::{self, RunFiles, Start, TrainConfig};
use normlab::{Error, Result};

use super::*;

pub const MODEL_HELP: &str = "seed-cnn[:W] (the articles' net: conv 3x3 with W filters, default 32, \
    norm, ReLU, max-pool, linear), mlp (784-100-100-100-10 sigmoid, the BN paper's), vgg[:CFG] (3x3 \
    conv widths and M for max-pool; default 32,32,M,64,64,M,128,128,M), resnet[:W1,...,W6] (six basic \
    blocks' inner widths; default 16,16,32,32,64,64). Widths up to 4096";

#[derive(Args)]
#[command(
    after_long_help = "Examples:\n  normlab train --epochs 3\n  normlab train --model vgg \
    --optimizer sgd --lr 0.05 --schedule cosine --out runs/vgg\n  normlab train --resume runs/vgg --epochs 20"
)]
pub struct TrainArgs {
    /// The network [default: seed-cnn]: seed-cnn[:W], mlp, vgg[:CFG] or resnet[:W1,...,W6].
    #[arg(long, long_help = format!("{MODEL_HELP} [default: seed-cnn]"))]
    pub model: Option<String>,
    /// Normalization after each conv/linear layer [default: bn]; `normlab norms` lists every
    /// spec (bn[:opts], gn:G, ln, layernorm, in, brn, ghost:V, bn-l1, bn-linf, bn-noisy, none).
    #[arg(long, value_name = "SPEC")]
    pub norm: Option<String>,
    /// Number of epochs [default: 10]; on --resume, the new total.
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub epochs: Option<usize>,
    /// Images per batch [default: 128].
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub batch_size: Option<usize>,
    /// sgd, adam or adamw [default: adam].
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(["sgd", "adam", "adamw"]))]
    pub optimizer: Option<String>,
    /// Learning rate, finite and > 0 [default: 1e-3 for adam/adamw, 0.01 for sgd].
    #[arg(long, value_parser = positive)]
    pub lr: Option<f64>,
    /// SGD momentum, or Adam's beta1, in [0, 1) [default: 0.9].
    #[arg(long, value_parser = fraction)]
    pub momentum: Option<f64>,
    /// Nesterov momentum (SGD with --momentum > 0 only).
    #[arg(long)]
    pub nesterov: bool,
    /// L2 penalty (SGD, Adam) or decoupled decay (AdamW), >= 0 [default: 0].
    #[arg(long, value_parser = non_negative)]
    pub weight_decay: Option<f64>,
    /// Exempt norm parameters (γ, β) and biases from weight decay.
    #[arg(long)]
    pub no_decay_norm_bias: bool,
    /// Learning-rate schedule per epoch [default: constant]: constant; step (x0.1 at 50% and
    /// again at 75% of the epochs); cosine (from --lr down toward 0).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(["constant", "step", "cosine"]))]
    pub schedule: Option<String>,
    /// Linear learning-rate warm-up over the first N epochs, step by step up to the schedule's
    /// rate (for large batches with a linearly scaled rate) [default: 0].
    #[arg(long, value_name = "N")]
    pub warmup: Option<usize>,
    /// Seed of the initial weights, the sample order and dropout [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Worker threads, 1 to 256 [default: one per core]; results do not depend on it.
    #[arg(long, value_name = "N", value_parser = threads)]
    pub threads: Option<usize>,
    /// Train on the first N training images only [default: all].
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub train_limit: Option<usize>,
    /// Evaluate on the first N test images only [default: all].
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub test_limit: Option<usize>,
    /// Data folder: the four MNIST-format IDX files, CIFAR-10's binary batches, or
    /// train/<class>/ and test/<class>/ image folders [default: $NORMLAB_DATA if set, else
    /// ./data/fashion-mnist, else /usr/share/datasets/fashion-mnist].
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Run folder [default: runs/<model>-<norm>, or -2, -3, ... so no earlier run is touched].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Continue the run in DIR where it stopped. Its saved settings apply; only --epochs (the
    /// new total) and --threads may be given.
    #[arg(long, value_name = "DIR", conflicts_with = "out")]
    pub resume: Option<PathBuf>,
    /// Network slimming: add LAMBDA·sign(γ) to the gradient of every BN scale γ [default: 0].
    #[arg(long, value_name = "LAMBDA", value_parser = non_negative)]
    pub sparsity: Option<f64>,
    /// Initial value of every BN scale γ [default: 1, as PyTorch; slimming uses 0.5].
    #[arg(long, value_parser = finite_f32)]
    pub gamma_init: Option<f32>,
    /// Dropout probability before the classifier, in [0, 1) [default: 0].
    #[arg(long, value_parser = fraction)]
    pub dropout: Option<f64>,
    /// Multiply every conv/linear weight after initialization by this, > 0 [default: 1].
    #[arg(long, value_parser = positive)]
    pub init_scale: Option<f64>,
    /// Start from the weights in FILE: a normlab checkpoint of the same model, or a plain
    /// PyTorch state dict saved as safetensors (names and shapes checked strictly).
    #[arg(long, value_name = "FILE")]
    pub init_from: Option<PathBuf>,
    /// Training-time augmentation, comma-separated: crop (random crop with 4 pixels of zero
    /// padding), flip (horizontal, p = 0.5); seeded per step, so --resume replays it exactly.
    #[arg(long, value_name = "crop,flip")]
    pub augment: Option<String>,
    /// Image folders: resize every image to H x W (bilinear) [default: the images' own size,
    /// which must then be one size for all].
    #[arg(long, value_name = "HxW", value_parser = parse_resize)]
    pub resize: Option<[usize; 2]>,
    /// Also write TensorBoard event files to RUN/tb/: per-step loss, lr and images/s,
    /// per-epoch accuracy and loss, and a histogram of each norm layer's |γ| every epoch.
    #[arg(long)]
    pub tensorboard: bool,
    /// Frozen BN: every BatchNorm runs in eval mode while training (running statistics used,
    /// never updated). stats: γ and β still train; all: they are frozen too (FrozenBatchNorm2d).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(["stats", "all"]))]
    pub freeze_bn: Option<String>,
}

/// `--resize HxW`: two sides in 1..=1024.
fn parse_resize(s: &str) -> std::result::Result<[usize; 2], String> {
    let bad = || {
        format!(
            "'{s}' is not HxW with sides in 1..={}, e.g. 32x32",
            normlab::models::MAX_INPUT_SIDE
        )
    };
    let (h, w) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    let side = |v: &str| {
        v.trim()
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=normlab::models::MAX_INPUT_SIDE).contains(n))
            .ok_or_else(bad)
    };
    Ok([side(h)?, side(w)?])
}

impl TrainArgs {
    fn config(&self, threads: usize) -> Result<TrainConfig> {
        let kind: OptimizerKind = self.optimizer.as_deref().unwrap_or("adam").parse()?;
        let schedule: Schedule = self.schedule.as_deref().unwrap_or("constant").parse()?;
        let d = TrainConfig::default();
        let config = TrainConfig {
            model: self.model.clone().unwrap_or(d.model),
            norm: self.norm.clone().unwrap_or(d.norm),
            epochs: self.epochs.unwrap_or(d.epochs),
            batch_size: self.batch_size.unwrap_or(d.batch_size),
            optimizer: OptimizerConfig {
                kind,
                lr: self.lr.unwrap_or(if kind == OptimizerKind::Sgd { 0.01 } else { 1e-3 }),
                momentum: self.momentum.unwrap_or(0.9),
                nesterov: self.nesterov,
                weight_decay: self.weight_decay.unwrap_or(0.0),
                no_decay_norm_and_bias: self.no_decay_norm_bias,
                ..OptimizerConfig::default()
            },
            schedule,
            seed: self.seed.unwrap_or(0),
            threads,
            train_limit: self.train_limit,
            test_limit: self.test_limit,
            data: self.data.clone(),
            sparsity: self.sparsity.unwrap_or(0.0),
            gamma_init: self.gamma_init,
            init_from: self.init_from.clone(),
            dropout: self.dropout.unwrap_or(0.0) as f32,
            init_scale: self.init_scale.map(|k| k as f32),
            freeze_bn: self.freeze_bn.as_deref().map(str::parse).transpose()?,
            warmup_epochs: self.warmup.unwrap_or(0),
            augment: self.augment.as_deref().unwrap_or("").parse()?,
            resize: self.resize,
            tensorboard: self.tensorboard,
        };
        config.validate()?;
        Ok(config)
    }

    /// The options given with --resume that differ from the saved run, as "--flag value (the
    /// run has saved)"; only --epochs and --threads may change.
    fn resume_conflicts(&self, saved: &TrainConfig) -> Vec<String> {
        let mut out = Vec::new();
        let mut differs = |flag: &str, given: Option<String>, saved: String| {
            if let Some(g) = given {
                if g != saved {
                    out.push(format!("{flag} {g} (the run has {saved})"));
                }
            }
        };
        let o = &saved.optimizer;
        differs("--model", self.model.clone(), saved.model.clone());
        differs("--norm", self.norm.clone(), saved.norm.clone());
        differs(
            "--batch-size",
            self.batch_size.map(|v| v.to_string()),
            saved.batch_size.to_string(),
        );
        differs(
            "--optimizer",
            self.optimizer.clone(),
            format!("{:?}", o.kind).to_lowercase(),
        );
        differs("--lr", self.lr.map(|v| v.to_string()), o.lr.to_string());
        differs(
            "--momentum",
            self.momentum.map(|v| v.to_string()),
            o.momentum.to_string(),
        );
        differs(
            "--nesterov",
            self.nesterov.then(|| "on".into()),
            if o.nesterov { "on" } else { "off" }.into(),
        );
        differs(
            "--weight-decay",
            self.weight_decay.map(|v| v.to_string()),
            o.weight_decay.to_string(),
        );
        differs(
            "--no-decay-norm-bias",
            self.no_decay_norm_bias.then(|| "on".into()),
            if o.no_decay_norm_and_bias { "on" } else { "off" }.into(),
        );
        differs(
            "--schedule",
            self.schedule.clone(),
            format!("{:?}", saved.schedule).to_lowercase(),
        );
        differs(
            "--warmup",
            self.warmup.map(|v| v.to_string()),
            saved.warmup_epochs.to_string(),
        );
        differs(
            "--augment",
            self.augment.as_ref().map(|a| {
                a.parse::<normlab::data::augment::Augment>()
                    .map_or(a.clone(), |x| format!("{x:?}"))
            }),
            format!("{:?}", saved.augment),
        );
        let size = |r: Option<[usize; 2]>| r.map_or("the images' own size".to_string(), |[h, w]| format!("{h}x{w}"));
        differs("--resize", self.resize.map(|r| size(Some(r))), size(saved.resize));
        differs(
            "--tensorboard",
            self.tensorboard.then(|| "on".into()),
            if saved.tensorboard { "on" } else { "off" }.into(),
        );
        differs("--seed", self.seed.map(|v| v.to_string()), saved.seed.to_string());
        let limit = |l: Option<usize>| l.map_or("no limit".to_string(), |n| n.to_string());
        differs(
            "--train-limit",
            self.train_limit.map(|v| v.to_string()),
            limit(saved.train_limit),
        );
        differs(
            "--test-limit",
            self.test_limit.map(|v| v.to_string()),
            limit(saved.test_limit),
        );
        differs(
            "--data",
            self.data.as_ref().map(|p| p.display().to_string()),
            saved
                .data
                .as_ref()
                .map_or("the default data folder".into(), |p| p.display().to_string()),
        );
        differs(
            "--sparsity",
            self.sparsity.map(|v| v.to_string()),
            saved.sparsity.to_string(),
        );
        differs(
            "--gamma-init",
            self.gamma_init.map(|v| v.to_string()),
            saved.gamma_init.map_or("1".into(), |v| v.to_string()),
        );
        differs(
            "--dropout",
            self.dropout.map(|v| (v as f32).to_string()),
            saved.dropout.to_string(),
        );
        differs(
            "--init-from",
            self.init_from.as_ref().map(|p| p.display().to_string()),
            saved
                .init_from
                .as_ref()
                .map_or("none".into(), |p| p.display().to_string()),
        );
        differs(
            "--freeze-bn",
            self.freeze_bn.clone(),
            saved
                .freeze_bn
                .map_or("off".into(), |f| format!("{f:?}").to_lowercase()),
        );
        differs(
            "--init-scale",
            self.init_scale.map(|v| (v as f32).to_string()),
            saved.init_scale.map_or("1".into(), |v| v.to_string()),
        );
        out
    }
}

pub fn run(a: TrainArgs) -> Result<()> {
    let world = launch::world();
    let lead = world.rank() == 0;
    let (start, out) = match &a.resume {
        Some(dir) => {
            // Rank 0 reads the run (the other processes of an MPI job get its state from it).
            let saved_threads = normlab::dist::agree(&*world, if lead { resume_check(&a, dir) } else { Ok(None) })?;
            let threads = match (a.threads, saved_threads) {
                (Some(t), _) => t,
                (None, Some(t)) if world.size() == 1 => t,
                _ => launch::default_threads(),
            };
            init_threads(Some(threads))?;
            (
                Start::Resume {
                    epochs: a.epochs,
                    threads: a.threads,
                },
                dir.clone(),
            )
        }
        None => {
            let threads = init_threads(a.threads)?;
            let config = a.config(threads)?;
            let name = format!(
                "{}-{}",
                config.model.replace([':', ','], "_"),
                config.norm.replace([':', ',', '='], "_")
            );
            let out = a
                .out
                .clone()
                .unwrap_or_else(|| train::fresh_run_dir(&PathBuf::from("runs"), &name));
            (Start::Fresh(Box::new(config)), out)
        }
    };
    on_interrupt_name_the_checkpoint();
    let m = if lead {
        in_pool(|| train::train_on(start, &out, &mut CliReporter::default(), &world))?
    } else {
        in_pool(|| train::train_on(start, &out, &mut train::Quiet, &world))?
    };
    if lead {
        let processes = if m.processes > 1 {
            format!(" over {} processes", m.processes)
        } else {
            String::new()
        };
        outln!(
            "done: test accuracy {:.4}, test loss {:.4}, {:.0} training images/s{processes}; wrote {}",
            m.test_accuracy,
            m.test_loss,
            m.train_images_per_sec,
            out.join("model.safetensors").display()
        )?;
    }
    Ok(())
}

/// The saved run's thread count, after checking that the options given with --resume agree
/// with the run's own.
fn resume_check(a: &TrainArgs, dir: &std::path::Path) -> Result<Option<usize>> {
    let (saved, commit) = train::read_run(&RunFiles { dir: dir.to_path_buf() })?;
    let conflicts = a.resume_conflicts(&saved);
    if !conflicts.is_empty() {
        return Err(Error::invalid(format!(
            "--resume {} keeps the run's own settings, and these differ: {}; only --epochs and \
             --threads may be given with --resume",
            dir.display(),
            conflicts.join(", ")
        )));
    }
    // A run of several processes saved each one's share of the cores, not this machine's.
    let processes = commit.map_or(1, |c| c.metrics.processes);
    Ok((processes == 1).then_some(saved.threads))
}
