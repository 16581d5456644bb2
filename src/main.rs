//! The `normlab` command: parses the command line and hands each subcommand to its file in
//! `cli/`; an error becomes one line on stderr and a non-zero exit.

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "normlab",
    version,
    about = "Batch Normalization and its relatives in CNN training, exact to PyTorch",
    after_long_help = "Start with:\n  normlab train --epochs 3      # seed-cnn with BN on Fashion-MNIST\n  \
        normlab norms                 # every normalization\n  normlab <command> --help      # a command's flags"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the largest variant (train's flags) does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Train a model on IDX (Fashion-MNIST by default), CIFAR-10 or image-folder data, or --resume a run.
    #[command(allow_negative_numbers = true)]
    Train(cli::train::TrainArgs),
    /// Evaluate a checkpoint on the test set in eval mode (running statistics).
    Eval(cli::eval::EvalArgs),
    /// Fold every eval-mode BatchNorm into the conv/linear layer before it.
    Fold(cli::fold::FoldArgs),
    /// Write a checkpoint as an ONNX model (opset 21) for ONNX Runtime and other runtimes.
    Export(cli::export::ExportArgs),
    /// Network slimming: remove the channels with the smallest BN |γ|, optionally fine-tune.
    #[command(allow_negative_numbers = true)]
    Prune(cli::prune::PruneArgs),
    /// Recompute every BatchNorm's running statistics over N training batches (PreciseBN).
    Recalibrate(cli::recalibrate::RecalibrateArgs),
    /// Run a study of the articles' claims (`normlab study --help` lists them): tables, plots, report.html.
    Study(cli::study::StudyArgs),
    /// Run any grid of models x norms x batch sizes x learning rates x seeds.
    Compare(cli::compare::CompareArgs),
    /// Rebuild the CSV, plots and report.html of a study folder from its results.json.
    Report(cli::report::ReportArgs),
    /// List every --norm spec with what it does.
    Norms,
    /// Time the norm kernels and end-to-end training on this machine.
    Bench(cli::bench::BenchArgs),
    /// Run one normalization layer on tensors from a safetensors file (conformance checks).
    Layer(cli::layer::LayerArgs),
    /// Data tools: pack an image folder into WebDataset shards; time the loader.
    Data(cli::data::DataArgs),
}

fn main() -> ExitCode {
    // Command-line errors end the process here, before MPI starts.
    let command = Cli::parse().command;
    let launch = match cli::launch::start() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let processes = cli::launch::world().size();
    if processes > 1 && !matches!(command, Command::Train(_) | Command::Study(_) | Command::Bench(_)) {
        let e = match cli::launch::world().rank() {
            0 => normlab::Error::invalid(
                "under mpirun normlab runs train, study sync-bn and bench --all-reduce; start every other command as one process",
            ),
            _ => normlab::Error::OtherRank(0),
        };
        let code = cli::launch::finish(Err(normlab::dist::stop_together(e)));
        launch.end();
        return code;
    }
    let result = match command {
        Command::Train(a) => cli::train::run(a),
        Command::Eval(a) => cli::eval::run(a),
        Command::Fold(a) => cli::fold::run(a),
        Command::Export(a) => cli::export::run(a),
        Command::Prune(a) => cli::prune::run(a),
        Command::Recalibrate(a) => cli::recalibrate::run(a),
        Command::Study(a) => cli::study::run(a),
        Command::Compare(a) => cli::compare::run(a),
        Command::Report(a) => cli::report::run(a),
        Command::Norms => cli::norms::run(),
        Command::Bench(a) => cli::bench::run(a),
        Command::Layer(a) => cli::layer::run(a),
        Command::Data(a) => cli::data::run(a),
    };
    let code = cli::launch::finish(result);
    // MPI_Finalize, before the process ends.
    launch.end();
    code
}
