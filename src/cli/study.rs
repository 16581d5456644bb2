//! `normlab study`: one of the studies in `normlab::studies::STUDIES`; its help lists them from
//! the registry, so a new study needs no line here.

use std::path::PathBuf;

use clap::Args;

use normlab::{train, Result};

use super::*;

#[derive(Args)]
#[command(after_long_help = "Example:\n  normlab study batch-size --quick --seeds 3 --out studies/bs")]
pub struct StudyArgs {
    /// The study; every one with what it shows is listed below.
    #[arg(value_name = "NAME", long_help = study_list())]
    pub name: String,
    /// A smoke run that finishes in about two minutes: it gives no verdicts.
    #[arg(long)]
    pub quick: bool,
    /// Seeds per configuration [default: 3]; each claim's verdict needs at least 3 (tables and
    /// plots show mean and spread).
    #[arg(long, value_name = "N", value_parser = at_least_one, default_value_t = 3)]
    pub seeds: usize,
    /// Results folder [default: studies/<name>, or -2, -3, ... so no earlier study is touched].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Folder with the four MNIST-format IDX files [default: as for train].
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Worker threads, 1 to 256 [default: one per core].
    #[arg(long, value_name = "N", value_parser = threads)]
    pub threads: Option<usize>,
}

/// Every study of the registry with its line (sync-bn runs under mpirun).
fn study_list() -> String {
    let lines: Vec<String> = normlab::studies::STUDIES
        .iter()
        .map(|s| format!("  {:<15} {}", s.name(), s.about()))
        .collect();
    format!("The study:\n{}", lines.join("\n"))
}

pub fn run(a: StudyArgs) -> Result<()> {
    let threads = init_threads(a.threads)?;
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| train::fresh_run_dir(&PathBuf::from("studies"), &a.name));
    let world = launch::world();
    let lead = world.rank() == 0;
    let opts = normlab::studies::StudyOptions {
        comm: world.clone(),
        quick: a.quick,
        seeds: a.seeds,
        out: out.clone(),
        data: a.data.clone(),
        threads,
    };
    normlab::studies::find(&a.name)?;
    if lead {
        print_data_line(a.data.as_deref())?;
    }
    let bar = if lead {
        run_bar()
    } else {
        indicatif::ProgressBar::hidden()
    };
    let results = in_pool(|| {
        normlab::studies::run_study(&a.name, &opts, &mut |i, n, what| {
            bar.set_length(n as u64);
            bar.set_position(i as u64);
            bar.set_message(what.to_string());
            Ok(())
        })
    });
    bar.finish_and_clear();
    let results = results?;
    if !lead {
        return Ok(());
    }
    let an = normlab::studies::analysis::analyze(&results)?;
    if a.quick {
        outln!("quick run: a smoke test, not evidence; every claim is inconclusive (quick run)")?;
    }
    print_analysis(&an)?;
    let n = results.runs.len() + results.ics.len() + results.landscape.len();
    outln!(
        "{n} runs in {:.0} s; wrote {}",
        results.seconds,
        out.join("report.html").display()
    )?;
    Ok(())
}
