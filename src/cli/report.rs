//! `normlab report`: a study folder's CSV, plots and report.html rebuilt from results.json.

use std::path::PathBuf;

use clap::Args;

use normlab::Result;

#[derive(Args)]
#[command(after_long_help = "Example:\n  normlab report studies/batch-size")]
pub struct ReportArgs {
    /// A folder written by `normlab study` or `normlab compare`.
    pub dir: PathBuf,
}

pub fn run(a: ReportArgs) -> Result<()> {
    let an = normlab::studies::report::rebuild(&a.dir)?;
    super::print_analysis(&an)?;
    outln!("rebuilt {}", a.dir.join("report.html").display())?;
    Ok(())
}
