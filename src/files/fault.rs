//! Crash injection for the tests: with `NORMLAB_CRASH_AT=K` the K-th crash point the process
//! passes (1-based, counting every write, fsync and rename of `write_atomic`) aborts the
//! process on the spot, as a kill -9 would: no destructor, no flush, no cleanup.
//! `NORMLAB_CRASH_AT=list` prints each point's number and label to stderr instead.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

enum Plan {
    Off,
    List,
    At(usize),
}

fn plan() -> &'static Plan {
    static PLAN: OnceLock<Plan> = OnceLock::new();
    PLAN.get_or_init(|| match std::env::var("NORMLAB_CRASH_AT") {
        Ok(v) if v == "list" => Plan::List,
        Ok(v) => v.parse().map_or(Plan::Off, Plan::At),
        Err(_) => Plan::Off,
    })
}

/// Marks a point where a crash must leave the files consistent.
pub(crate) fn point(label: &str, path: &std::path::Path) {
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    match plan() {
        Plan::Off => {}
        Plan::List => {
            let k = COUNT.fetch_add(1, Ordering::SeqCst) + 1;
            eprintln!("crash point {k}: {label} {}", path.display());
        }
        Plan::At(n) => {
            let k = COUNT.fetch_add(1, Ordering::SeqCst) + 1;
            if k == *n {
                eprintln!("crash injected at point {k}: {label} {}", path.display());
                std::process::abort();
            }
        }
    }
}
