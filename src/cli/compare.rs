//! `normlab compare`: any grid of models x norms x batch sizes x learning rates x seeds.

use std::path::PathBuf;

use clap::Args;

use normlab::optim::{OptimizerConfig, OptimizerKind};
use normlab::train::{self, TrainConfig};
use normlab::{Error, Result};

use super::*;

#[derive(Args)]
#[command(
    after_long_help = "Example:\n  normlab compare --models seed-cnn --norms 'bn;gn:8;none' \
    --batch-sizes 8,128 --lrs 0.001 --seeds 2"
)]
pub struct CompareArgs {
    /// Models separated by ';' (or ',' when no model contains a comma), e.g.
    /// 'seed-cnn;vgg:16,M,32,M' [default: seed-cnn]; see `normlab train --help` for the models.
    #[arg(long, default_value = "seed-cnn")]
    pub models: String,
    /// Norm specs separated by ',' or, when a spec has options, ';', e.g. 'bn;gn:8,eps=1e-3;none'
    /// [default: bn,none]; `normlab norms` lists them.
    #[arg(long, default_value = "bn,none")]
    pub norms: String,
    /// Batch sizes, whole numbers >= 1, separated by ',' [default: 128].
    #[arg(long, default_value = "128")]
    pub batch_sizes: String,
    /// Learning rates, finite and > 0, separated by ',' [default: 0.001].
    #[arg(long, default_value = "0.001")]
    pub lrs: String,
    /// Seeds per configuration [default: 1].
    #[arg(long, value_name = "N", value_parser = at_least_one, default_value_t = 1)]
    pub seeds: usize,
    /// Epochs per run [default: 1].
    #[arg(long, value_name = "N", value_parser = at_least_one, default_value_t = 1)]
    pub epochs: usize,
    /// sgd, adam or adamw [default: adam].
    #[arg(long, default_value = "adam",
          value_parser = clap::builder::PossibleValuesParser::new(["sgd", "adam", "adamw"]))]
    pub optimizer: String,
    /// Train on the first N training images only [default: all].
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub train_limit: Option<usize>,
    /// Evaluate on the first N test images only [default: all].
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub test_limit: Option<usize>,
    /// Results folder [default: studies/compare, or -2, -3, ...].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Folder with the four MNIST-format IDX files [default: as for train].
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Worker threads, 1 to 256 [default: one per core].
    #[arg(long, value_name = "N", value_parser = threads)]
    pub threads: Option<usize>,
}

fn split_list(s: &str) -> Vec<String> {
    let sep = if s.contains(';') { ';' } else { ',' };
    s.split(sep)
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Each item of a list flag through `parse`, the error naming the flag and the item.
fn parse_list<T>(flag: &str, s: &str, parse: fn(&str) -> std::result::Result<T, String>) -> Result<Vec<T>> {
    let items: Vec<String> = s.split(',').map(|t| t.trim().to_string()).collect();
    items
        .iter()
        .map(|t| parse(t).map_err(|e| Error::invalid(format!("{flag}: '{t}' {e}"))))
        .collect()
}

pub fn run(a: CompareArgs) -> Result<()> {
    let batch_sizes = parse_list("--batch-sizes", &a.batch_sizes, at_least_one)?;
    let lrs = parse_list("--lrs", &a.lrs, positive)?;
    let threads = init_threads(a.threads)?;
    let kind: OptimizerKind = a.optimizer.parse()?;
    let base = TrainConfig {
        epochs: a.epochs,
        optimizer: OptimizerConfig {
            kind,
            lr: 1e-3,
            ..OptimizerConfig::default()
        },
        threads,
        train_limit: a.train_limit,
        test_limit: a.test_limit,
        data: a.data.clone(),
        ..TrainConfig::default()
    };
    let grid = normlab::studies::CompareGrid {
        models: split_list(&a.models)
            .iter()
            .map(|m| super::model_arch(m).map_err(|e| Error::invalid(format!("--models: '{m}': {e}"))))
            .collect::<Result<_>>()?,
        norms: split_list(&a.norms)
            .iter()
            .map(|n| norm_spec(n).map_err(|e| Error::invalid(format!("--norms: '{n}': {e}"))))
            .collect::<Result<_>>()?,
        batch_sizes,
        lrs,
        base,
    };
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| train::fresh_run_dir(&PathBuf::from("studies"), "compare"));
    print_data_line(a.data.as_deref())?;
    let bar = run_bar();
    let results = in_pool(|| {
        normlab::studies::run_compare(&grid, a.seeds, &out, &mut |i, n, what| {
            bar.set_length(n as u64);
            bar.set_position(i as u64);
            bar.set_message(what.to_string());
            Ok(())
        })
    });
    bar.finish_and_clear();
    let an = normlab::studies::analysis::analyze(&results?)?;
    print_analysis(&an)?;
    outln!("wrote {}", out.join("report.html").display())?;
    Ok(())
}
