//! Which outputs a command may write, decided before it does any work: never one of its
//! inputs, never a link or a folder in place of a file, and an existing file or another run's
//! folder only with `--force`. Paths are compared after resolving them the way the write will
//! (`R/new/..` is R, even while R/new does not exist yet), and files by device and inode.

use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// Files that mark a folder as holding a run or a study's results.
pub const RUN_MARKERS: [&str; 6] = [
    "metrics.json",
    "model.safetensors",
    "train_state.safetensors",
    "results.json",
    "steps.csv",
    "tb/events.out.tfevents.normlab",
];

/// A folder path as the file system will resolve it once missing folders are created: the
/// longest existing prefix canonicalized, the rest applied component by component.
pub fn resolve_dir(dir: &Path) -> Result<PathBuf> {
    let abs = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir().map_err(|e| Error::io(".", e))?.join(dir)
    };
    let comps: Vec<Component> = abs.components().collect();
    let mut k = comps.len();
    let base = loop {
        let prefix: PathBuf = comps[..k].iter().collect();
        if let Ok(c) = prefix.canonicalize() {
            break c;
        }
        if k == 1 {
            break prefix;
        }
        k -= 1;
    };
    let mut out = base;
    for c in &comps[k..] {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    Ok(out)
}

/// A file path resolved like `resolve_dir` for its folder; the file name itself is not
/// followed, so a link stays visible as a link.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    match (path.parent(), path.components().next_back()) {
        (Some(parent), Some(Component::Normal(name))) => Ok(resolve_dir(parent)?.join(name)),
        _ => resolve_dir(path),
    }
}

/// A command's inputs, and whether the user said `--force`.
#[derive(Default)]
pub struct OutputGuard {
    force: bool,
    /// The command has a --force flag to suggest.
    has_force: bool,
    inputs: Vec<Input>,
}

/// A file a command reads: as given, resolved, and its device and inode when it exists.
struct Input {
    given: PathBuf,
    resolved: PathBuf,
    id: Option<(u64, u64)>,
}

fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl OutputGuard {
    pub fn new(force: bool) -> Self {
        OutputGuard {
            force,
            has_force: true,
            inputs: Vec::new(),
        }
    }

    /// For a command without --force: existing outputs are always refused.
    pub fn without_force() -> Self {
        OutputGuard {
            has_force: false,
            ..Self::new(false)
        }
    }

    fn or_force(&self) -> &'static str {
        if self.has_force {
            ", or pass --force to replace it"
        } else {
            ""
        }
    }

    /// Registers a file the command reads: it is never written.
    pub fn input(mut self, path: &Path) -> Self {
        let resolved = resolve(path).unwrap_or_else(|_| path.to_path_buf());
        self.inputs.push(Input {
            given: path.to_path_buf(),
            resolved,
            id: identity(path),
        });
        self
    }

    fn input_behind(&self, resolved: &Path) -> Option<&Path> {
        let id = identity(resolved);
        self.inputs
            .iter()
            .find(|i| i.resolved == resolved || (id.is_some() && i.id == id))
            .map(|i| i.given.as_path())
    }

    /// Checks a file the command will write for `flag`; returns the resolved path to write to.
    pub fn file(&self, flag: &str, path: &Path) -> Result<PathBuf> {
        let resolved = resolve(path)?;
        if let Some(input) = self.input_behind(&resolved) {
            return Err(Error::invalid(format!(
                "{flag} {} is the input {}; normlab never overwrites its input: choose another file",
                path.display(),
                input.display()
            )));
        }
        match std::fs::symlink_metadata(&resolved) {
            Ok(m) if m.file_type().is_symlink() => Err(Error::invalid(format!(
                "{flag} {} is a symbolic link; normlab never replaces a link: give the path it points to",
                path.display()
            ))),
            Ok(m) if m.is_dir() => Err(Error::invalid(format!(
                "{flag} {} is a folder; give a file name",
                path.display()
            ))),
            Ok(m) if m.is_file() && !self.force => Err(Error::invalid(format!(
                "{flag} {} already exists; choose another file{}",
                path.display(),
                self.or_force()
            ))),
            _ => Ok(resolved),
        }
    }

    /// Checks a folder the command will fill with `names`: it must not hold an input among
    /// them, nor (without `--force`) any of them or another run's files. Returns it resolved.
    pub fn folder(&self, flag: &str, dir: &Path, names: &[&str]) -> Result<PathBuf> {
        let resolved = resolve_dir(dir)?;
        if let Ok(m) = std::fs::metadata(&resolved) {
            if !m.is_dir() {
                return Err(Error::invalid(format!(
                    "{flag} {} is a file, not a folder; give a folder",
                    dir.display()
                )));
            }
        }
        for name in names {
            let f = resolved.join(name);
            if let Some(input) = self.input_behind(&f) {
                return Err(Error::invalid(format!(
                    "{flag} {} would overwrite the input {}; choose another folder",
                    dir.display(),
                    input.display()
                )));
            }
        }
        if !self.force {
            let held: Vec<&str> = names
                .iter()
                .chain(RUN_MARKERS.iter())
                .filter(|n| resolved.join(n).exists())
                .copied()
                .collect();
            if let Some(first) = held.first() {
                return Err(Error::invalid(format!(
                    "{flag} {} already holds {first} (another run's output); choose another folder{}",
                    dir.display(),
                    self.or_force()
                )));
            }
        }
        Ok(resolved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_missing_folders_and_parent_steps() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path().canonicalize().unwrap();
        assert_eq!(resolve_dir(&t.path().join("new/..")).unwrap(), r);
        assert_eq!(resolve_dir(&t.path().join("a/b/../c")).unwrap(), r.join("a/c"));
        assert_eq!(resolve(&t.path().join("new/../f.json")).unwrap(), r.join("f.json"));
    }

    #[test]
    fn refuses_inputs_existing_files_and_run_folders() {
        let t = tempfile::tempdir().unwrap();
        let run = t.path().join("run");
        std::fs::create_dir(&run).unwrap();
        let model = run.join("model.safetensors");
        crate::files::write_atomic(&model, b"m").unwrap();
        let g = OutputGuard::new(false).input(&model);
        assert!(g
            .folder("--out", &run.join("nonexistent/.."), &["model.safetensors"])
            .unwrap_err()
            .to_string()
            .contains("input"));
        assert!(g
            .file("--predictions", &model)
            .unwrap_err()
            .to_string()
            .contains("input"));
        let other = t.path().join("other");
        std::fs::create_dir(&other).unwrap();
        crate::files::write_atomic(&other.join("metrics.json"), b"{}").unwrap();
        assert!(g
            .folder("--out", &other, &["fold.json"])
            .unwrap_err()
            .to_string()
            .contains("--force"));
        assert!(OutputGuard::new(true)
            .input(&model)
            .folder("--out", &other, &["fold.json"])
            .is_ok());
        let existing = t.path().join("p.json");
        crate::files::write_atomic(&existing, b"[]").unwrap();
        assert!(g.file("--json", &existing).unwrap_err().to_string().contains("--force"));
        assert!(OutputGuard::new(true).file("--json", &existing).is_ok());
        // A device is written through, so it is a valid output (only inspected here).
        assert!(g.file("--json", Path::new("/dev/null")).is_ok());
        // Even with --force, an input is never an output (through a hard link too).
        let hard = t.path().join("hard.safetensors");
        std::fs::hard_link(&model, &hard).unwrap();
        assert!(OutputGuard::new(true).input(&model).file("--output", &hard).is_err());
    }
}
