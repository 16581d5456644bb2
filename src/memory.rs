//! Memory a run may take: what is available to this process (the address-space limit and the
//! machine's available memory), an estimate checked against it before a run starts, and
//! fallible allocation for the large buffers, so that running out is an error naming the size,
//! never an abort.

use crate::error::{Error, Result};

/// Bytes this process can still allocate: the smaller of the address space left under its
/// limit (`ulimit -v`) and the machine's available memory. None where neither can be read.
pub fn available() -> Option<u64> {
    let limit = address_space_left();
    let free = meminfo_available();
    match (limit, free) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// RLIMIT_AS minus the address space in use (both from /proc/self), or None when unlimited.
fn address_space_left() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max address space"))?;
    let soft: u64 = line.split_whitespace().nth(3)?.parse().ok()?;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let used_kb: u64 = kb_field(&status, "VmSize:")?;
    Some(soft.saturating_sub(used_kb * 1024))
}

fn meminfo_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    Some(kb_field(&text, "MemAvailable:")? * 1024)
}

fn kb_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// What a run needs, part by part, for the message when it does not fit.
#[derive(Clone, Debug, Default)]
pub struct Need {
    pub parts: Vec<(&'static str, u64)>,
}

impl Need {
    pub fn add(&mut self, what: &'static str, bytes: u64) {
        self.parts.push((what, bytes));
    }

    pub fn total(&self) -> u64 {
        self.parts.iter().fold(0u64, |t, (_, b)| t.saturating_add(*b))
    }

    /// An error naming the need, what is available and `fix` when the total exceeds what this
    /// process can allocate; Ok where availability cannot be read.
    pub fn check(&self, task: &str, fix: &str) -> Result<()> {
        self.check_against(available(), task, fix)
    }

    pub fn check_against(&self, available: Option<u64>, task: &str, fix: &str) -> Result<()> {
        let (total, Some(avail)) = (self.total(), available) else {
            return Ok(());
        };
        if total <= avail {
            return Ok(());
        }
        let parts: Vec<String> = self
            .parts
            .iter()
            .filter(|(_, b)| *b > 0)
            .map(|(w, b)| format!("{w} {}", human(*b)))
            .collect();
        Err(Error::OutOfMemory(format!(
            "{task} needs about {} of memory ({}) but this process can allocate {}; {fix}",
            human(total),
            parts.join(", "),
            human(avail)
        )))
    }
}

/// Bytes as "1.5 GiB".
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    match bytes {
        0..=1023 => format!("{bytes} B"),
        1024..=1_048_575 => format!("{:.1} KiB", b / 1024.0),
        1_048_576..=1_073_741_823 => format!("{:.1} MiB", b / 1_048_576.0),
        _ => format!("{:.1} GiB", b / 1_073_741_824.0),
    }
}

/// `v.try_reserve(additional)`, with a failure as an error naming `what` and the size.
pub fn try_reserve<T>(v: &mut Vec<T>, additional: usize, what: &str) -> Result<()> {
    v.try_reserve(additional).map_err(|_| {
        let bytes = (additional as u64).saturating_mul(std::mem::size_of::<T>() as u64);
        Error::OutOfMemory(format!(
            "cannot allocate {} for {what}; use a smaller --batch-size or --resize, or free memory",
            human(bytes)
        ))
    })
}

/// `v.resize(len, value)` that returns an error instead of aborting when memory runs out.
pub fn try_resize<T: Clone>(v: &mut Vec<T>, len: usize, value: T, what: &str) -> Result<()> {
    if len > v.len() {
        try_reserve(v, len - v.len(), what)?;
    }
    v.resize(len, value);
    Ok(())
}

/// Makes `v` at least `len` long and keeps a longer length: for scratch that a pass writes
/// before it reads, shared by layers of different sizes (nn::shared_scratch), where cutting it
/// to each layer's length and growing it back refilled it with zeros at every call.
pub fn try_grow<T: Clone>(v: &mut Vec<T>, len: usize, value: T, what: &str) -> Result<()> {
    if len > v.len() {
        try_resize(v, len, value, what)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_need_over_what_is_available_names_both_and_the_fix() {
        let mut need = Need::default();
        need.add("activations", 3 << 30);
        need.add("weights", 1 << 20);
        let e = need
            .check_against(Some(1 << 30), "training", "use a smaller --batch-size")
            .unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("3.0 GiB") && m.contains("1.0 GiB") && m.contains("smaller --batch-size"),
            "{m}"
        );
        assert!(need.check_against(Some(4 << 30), "training", "x").is_ok());
        assert!(need.check_against(None, "training", "x").is_ok());
    }

    #[test]
    fn an_impossible_reservation_is_an_error_not_an_abort() {
        let mut v: Vec<f32> = Vec::new();
        let e = try_reserve(&mut v, usize::MAX / 8, "a test buffer").unwrap_err();
        assert!(e.to_string().contains("a test buffer"), "{e}");
    }

    #[test]
    fn this_process_reads_its_available_memory_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(available().is_some_and(|b| b > 0));
        }
    }
}
