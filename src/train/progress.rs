//! What a run shows while it trains, for every front end (the CLI, the Python package): the
//! per-epoch progress bar with its rate and ETA, and the epoch table's header and rows.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use super::{EpochMetrics, LoaderProgress};

/// The bar of one epoch's batches (drawn on standard error; hidden when that is not a
/// terminal).
pub fn epoch_bar(epoch: usize, epochs: usize, batches: usize) -> ProgressBar {
    let bar = ProgressBar::new(batches as u64);
    bar.set_style(
        ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} batches {msg} ({elapsed}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{epoch}/{epochs}"));
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}

/// One step done: the running mean loss, the rate and, for a streamed split, what the loader
/// can deliver and the share of the epoch spent waiting for it, on the bar.
pub fn advance(bar: &ProgressBar, mean_loss: f64, images_per_sec: f64, data: Option<LoaderProgress>) {
    let wait = match data {
        Some(d) => format!(
            "  loader {:.0} img/s, data wait {:.0}%",
            d.images_per_sec,
            100.0 * d.wait_share
        ),
        None => String::new(),
    };
    bar.set_message(format!("loss {mean_loss:.4}  {images_per_sec:.0} img/s{wait}"));
    bar.inc(1);
}

/// The bar of a grid's runs (studies, compare).
pub fn runs_bar() -> ProgressBar {
    let bar = ProgressBar::new(1);
    bar.set_style(
        ProgressStyle::with_template("runs [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(500));
    bar
}

/// The epoch table's header line.
pub fn epoch_header() -> String {
    format!(
        "{:>5}  {:>9}  {:>10}  {:>9}  {:>9}  {:>8}  {:>7}  {:>8}",
        "epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds", "img/s"
    )
}

/// One epoch's row of the table.
pub fn epoch_row(m: &EpochMetrics) -> String {
    format!(
        "{:>5}  {:>9.2e}  {:>10.4}  {:>9.4}  {:>9.4}  {:>8.4}  {:>7.1}  {:>8.0}",
        m.epoch, m.lr, m.train_loss, m.train_accuracy, m.test_loss, m.test_accuracy, m.seconds, m.images_per_sec
    )
}
