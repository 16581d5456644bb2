//! `normlab train`: a fresh run, or `--resume` of one.

use std::path::PathBuf;

use clap::Args;

use normlab::nn::norm_spec::NormSpec;
use normlab::optim::{OptimizerConfig, OptimizerKind};
use normlab::train::{self, RunFiles, Start, TrainConfig};
use normlab::{Error, Result};

use super::*;

pub const MODEL_HELP: &str = "seed-cnn[:W] (the articles' net: conv 3x3 with W filters, default 32, \
    norm, ReLU, max-pool, linear), mlp (784-100-100-100-10 sigmoid, the BN paper's), vgg[:CFG] (3x3 \
    conv widths and M for max-pool; default 32,32,M,64,64,M,128,128,M), resnet[:W1,...,W6] (six basic \
    blocks' inner widths; default 16,16,32,32,64,64), lstm[:H[,L]], vit[:D,L,H,P[,R][,post]] (a Vision \
    Transformer in timm's layout: width D, L blocks of H heads, PxP patches, MLP ratio R (default 4), pre-norm \
    or post-norm; default 64,4,4,4; --norm layernorm:eps=1e-6 unless given, or rms, bn, none). Widths up to 4096";

#[derive(Args)]
#[command(
    after_long_help = "Examples:\n  normlab train --epochs 3\n  normlab train --model vgg \
    --optimizer sgd --lr 0.05 --schedule cosine --out runs/vgg\n  normlab train --resume runs/vgg --epochs 20"
)]
pub struct TrainArgs {
    /// The network [default: seed-cnn]: seed-cnn[:W], mlp, vgg[:CFG], resnet[:W1,...,W6],
    /// lstm[:H[,L]] or vit[:D,L,H,P[,R][,post]].
    #[arg(long, value_name = "MODEL", value_parser = model_arch, long_help = format!("{MODEL_HELP} [default: seed-cnn]"))]
    pub model: Option<normlab::models::Arch>,
    /// Normalization after each conv/linear layer [default: bn]; `normlab norms` lists every
    /// spec (bn[:opts], gn:G, ln, layernorm, in, brn, ghost:V, bn-l1, bn-linf, bn-noisy, none).
    #[arg(long, value_name = "SPEC", value_parser = norm_spec)]
    pub norm: Option<NormSpec>,
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
    /// new total), --threads and the loader's --decode-threads, --cache-limit and
    /// --skip-bad-images may be given.
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
    /// Also evaluate the model (eval mode) on the training images after every epoch: the fit
    /// without dropout's noise or batch statistics, in metrics.json as each epoch's `fit`.
    #[arg(long)]
    pub eval_train: bool,
    /// Frozen BN: every BatchNorm runs in eval mode while training (running statistics used,
    /// never updated). stats: γ and β still train; all: they are frozen too (FrozenBatchNorm2d).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(["stats", "all"]))]
    pub freeze_bn: Option<String>,
    /// Image folders and shards: hold a split in memory when its decoded images take at most
    /// SIZE (e.g. 0, 512MB, 4GB), else stream it from disk with background decoding [default: a
    /// quarter of the memory available]; results are the same either way. May change on --resume.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub cache_limit: Option<u64>,
    /// Threads that decode a streamed split ahead of the training step [default: the cores the
    /// training threads leave, at least 1]. May change on --resume.
    #[arg(long, value_name = "N", value_parser = threads)]
    pub decode_threads: Option<usize>,
    /// Count and leave out images that do not decode (recorded in metrics.json) instead of
    /// stopping the run. May be added on --resume.
    #[arg(long)]
    pub skip_bad_images: bool,
    /// Train on the samples in the data's own order every epoch (no shuffle).
    #[arg(long)]
    pub no_shuffle: bool,
    /// WebDataset shards: the shuffle buffer's size in samples, as webdataset's .shuffle(N)
    /// (shards are shuffled per epoch too) [default: 1000].
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub shuffle_buffer: Option<usize>,
}

/// A size in bytes: a number with an optional unit (B, KB, MB, GB, TB as powers of 1024; KiB,
/// MiB, GiB too).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("'{s}' is not a size such as 0, 512MB or 4GB");
    let value: f64 = num.parse().map_err(|_| bad())?;
    let scale: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => return Err(bad()),
    };
    let bytes = value * scale as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// `--resize HxW`: two sides in 1..=1024.
pub fn parse_resize(s: &str) -> std::result::Result<[usize; 2], String> {
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
    /// A fresh run's settings: the defaults with every option given put in their place.
    fn config(&self, threads: usize) -> Result<TrainConfig> {
        let kind: OptimizerKind = self.optimizer.as_deref().unwrap_or("adam").parse()?;
        let defaults = TrainConfig {
            optimizer: OptimizerConfig {
                kind,
                lr: if kind == OptimizerKind::Sgd { 0.01 } else { 1e-3 },
                ..OptimizerConfig::default()
            },
            ..TrainConfig::default()
        };
        let mut config = self.over(defaults, threads)?;
        if self.norm.is_none() {
            config.norm = config.model.default_norm();
        }
        config.validate()?;
        Ok(config)
    }

    /// `base` with every option given on the command line in place of its own value.
    fn over(&self, base: TrainConfig, threads: usize) -> Result<TrainConfig> {
        let o = base.optimizer;
        let kind = self.optimizer.as_deref().map(str::parse).transpose()?;
        Ok(TrainConfig {
            model: self.model.clone().unwrap_or(base.model),
            norm: self.norm.unwrap_or(base.norm),
            epochs: self.epochs.unwrap_or(base.epochs),
            batch_size: self.batch_size.unwrap_or(base.batch_size),
            optimizer: OptimizerConfig {
                kind: kind.unwrap_or(o.kind),
                lr: self.lr.unwrap_or(o.lr),
                momentum: self.momentum.unwrap_or(o.momentum),
                nesterov: self.nesterov || o.nesterov,
                weight_decay: self.weight_decay.unwrap_or(o.weight_decay),
                no_decay_norm_and_bias: self.no_decay_norm_bias || o.no_decay_norm_and_bias,
                ..o
            },
            schedule: self
                .schedule
                .as_deref()
                .map(str::parse)
                .transpose()?
                .unwrap_or(base.schedule),
            seed: self.seed.unwrap_or(base.seed),
            threads,
            train_limit: self.train_limit.or(base.train_limit),
            test_limit: self.test_limit.or(base.test_limit),
            data: self.data.clone().or(base.data),
            sparsity: self.sparsity.unwrap_or(base.sparsity),
            gamma_init: self.gamma_init.or(base.gamma_init),
            init_from: self.init_from.clone().or(base.init_from),
            dropout: self.dropout.map_or(base.dropout, |d| d as f32),
            init_scale: self.init_scale.map(|k| k as f32).or(base.init_scale),
            freeze_bn: self
                .freeze_bn
                .as_deref()
                .map(str::parse)
                .transpose()?
                .or(base.freeze_bn),
            warmup_epochs: self.warmup.unwrap_or(base.warmup_epochs),
            augment: self
                .augment
                .as_deref()
                .map(str::parse)
                .transpose()?
                .unwrap_or(base.augment),
            resize: self.resize.or(base.resize),
            tensorboard: self.tensorboard || base.tensorboard,
            eval_train: self.eval_train || base.eval_train,
            cache_limit: self.cache_limit.or(base.cache_limit),
            decode_threads: self.decode_threads.or(base.decode_threads),
            skip_bad_images: self.skip_bad_images || base.skip_bad_images,
            shuffle: !self.no_shuffle && base.shuffle,
            shuffle_buffer: self.shuffle_buffer.unwrap_or(base.shuffle_buffer),
        })
    }

    /// The options given with --resume that change the saved run, as "--flag value (the run has
    /// saved)"; only --epochs and --threads may. The two configurations are compared field by
    /// field as parsed values (a new field of `TrainConfig` is compared without a line here),
    /// so `--norm bn:momentum=0.1` on a run saved as `bn` is the same layer, not a conflict.
    fn resume_conflicts(&self, saved: &TrainConfig) -> Result<Vec<String>> {
        let given = self.over(saved.clone(), saved.threads)?;
        let value = |c: &TrainConfig| serde_json::to_value(c).map_err(|e| Error::invalid(format!("settings: {e}")));
        let mut out = Vec::new();
        differences("", &value(&given)?, &value(saved)?, &mut out);
        Ok(out)
    }
}

/// The fields (dotted paths) where `given` and `saved` differ, as "--flag given (the run has
/// saved)"; the epochs and threads of a resumed run may change.
fn differences(path: &str, given: &serde_json::Value, saved: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    if let (Value::Object(g), Value::Object(s)) = (given, saved) {
        for (key, gv) in g {
            let sub = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            differences(&sub, gv, s.get(key).unwrap_or(&Value::Null), out);
        }
        return;
    }
    // The loader's settings do not change what a run computes (skipping only what stopped it).
    let free = ["epochs", "threads", "decode_threads", "cache_limit", "skip_bad_images"];
    if given == saved || free.contains(&path) {
        return;
    }
    let show = |v: &Value| match v {
        Value::Null => "none".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    out.push(format!("{} {} (the run has {})", flag(path), show(given), show(saved)));
}

/// The command-line flag of a `TrainConfig` field.
fn flag(path: &str) -> String {
    match path {
        "optimizer.kind" => "--optimizer".into(),
        "optimizer.no_decay_norm_and_bias" => "--no-decay-norm-bias".into(),
        "warmup_epochs" => "--warmup".into(),
        "shuffle" => "--no-shuffle".into(),
        p => format!("--{}", p.rsplit('.').next().unwrap_or(p).replace('_', "-")),
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
                    loader: train::LoaderOverrides {
                        decode_threads: a.decode_threads,
                        cache_limit: a.cache_limit,
                        skip_bad_images: a.skip_bad_images,
                    },
                },
                dir.clone(),
            )
        }
        None => {
            let threads = init_threads(a.threads)?;
            let config = a.config(threads)?;
            let name = format!(
                "{}-{}",
                config.model.short().replace([':', ','], "_"),
                config.norm.short().replace([':', ',', '='], "_")
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
    let conflicts = a.resume_conflicts(&saved)?;
    if !conflicts.is_empty() {
        return Err(Error::invalid(format!(
            "--resume {} keeps the run's own settings, and these differ: {}; only --epochs, \
             --threads, --decode-threads, --cache-limit and --skip-bad-images may be given with --resume",
            dir.display(),
            conflicts.join(", ")
        )));
    }
    // A run of several processes saved each one's share of the cores, not this machine's.
    let processes = commit.map_or(1, |c| c.metrics.processes);
    Ok((processes == 1).then_some(saved.threads))
}
