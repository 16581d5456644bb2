//! The one way normlab writes a file.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use super::fault::point;
use crate::error::{Error, Result};

/// Writes `bytes` to `path` so that a reader, or a crash at any instant, sees the old file or
/// the new one, never half of one: a temporary file in the same folder, fsync, rename over the
/// target, fsync of the folder. What is not a regular file is never replaced: a symbolic link
/// or a folder is an error, and a character device or FIFO (`/dev/null`, a pipe) is written
/// through, as a shell redirection would.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) => {
            let t = m.file_type();
            if t.is_symlink() {
                return Err(Error::invalid(format!(
                    "{} is a symbolic link; normlab never replaces a link: give the path it points to \
                     or another file name",
                    path.display()
                )));
            }
            if t.is_dir() {
                return Err(Error::invalid(format!(
                    "{} is a folder, not a file; give a file name",
                    path.display()
                )));
            }
            if t.is_char_device() || t.is_fifo() {
                return write_through(path, bytes);
            }
            if !t.is_file() {
                return Err(Error::invalid(format!(
                    "{} is neither a regular file nor a device or pipe that can be written through; \
                     give another file name",
                    path.display()
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(path, e)),
    }
    replace(path, bytes)
}

/// Writes into an existing device or FIFO without replacing it.
fn write_through(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))
}

fn replace(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{} does not name a file", path.display())))?
        .to_string_lossy()
        .to_string();
    remove_stale_temporaries(dir, &name);
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        // Half, a crash point, the rest: a kill in the middle of a write leaves a torn
        // temporary file, which must never be mistaken for the target.
        let half = bytes.len() / 2;
        f.write_all(&bytes[..half])?;
        point("write", path);
        f.write_all(&bytes[half..])?;
        f.sync_all()?;
        point("fsync", path);
        std::fs::rename(&tmp, path)?;
        point("rename", path);
        // The rename is durable only once the folder's entry is on disk.
        File::open(dir)?.sync_all()?;
        point("fsync-folder", path);
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Temporary files `.NAME.tmpPID` that a killed process left beside `NAME`: the ones whose
/// process no longer runs are removed (only where /proc tells which processes run).
fn remove_stale_temporaries(dir: &Path, name: &str) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let prefix = format!(".{name}.tmp");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().to_string();
        if let Some(pid) = file.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok()) {
            let alive = PathBuf::from(format!("/proc/{pid}")).exists();
            if !alive && entry.file_type().is_ok_and(|t| t.is_file()) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// Every stale temporary file in `dir` (any name), for a folder that has just been locked.
pub fn remove_stale_temporaries_in(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().to_string();
        if let Some((name, _)) = file.strip_prefix('.').and_then(|f| f.rsplit_once(".tmp")) {
            remove_stale_temporaries(dir, name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_regular_files_and_refuses_links_and_folders() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("a.json");
        write_atomic(&f, b"one").unwrap();
        write_atomic(&f, b"two").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"two");
        let link = t.path().join("link.json");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        let e = write_atomic(&link, b"three").unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read(&f).unwrap(), b"two");
        assert!(write_atomic(t.path(), b"x").unwrap_err().to_string().contains("folder"));
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(t.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn writes_through_devices_without_replacing_them() {
        // A private null device (mknod needs root), so that a regression cannot replace the
        // machine's /dev/null; and a FIFO, which needs no privilege.
        let t = tempfile::tempdir().unwrap();
        let null = t.path().join("null");
        let made = std::process::Command::new("mknod")
            .args([null.to_str().unwrap(), "c", "1", "3"])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if made {
            write_atomic(&null, b"discarded").unwrap();
            assert!(std::fs::symlink_metadata(&null).unwrap().file_type().is_char_device());
        }
        let fifo = t.path().join("fifo");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read(fifo).unwrap())
        };
        write_atomic(&fifo, b"through").unwrap();
        assert_eq!(reader.join().unwrap(), b"through");
        assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    }

    #[test]
    fn removes_temporaries_of_dead_processes_only() {
        let t = tempfile::tempdir().unwrap();
        // pid 4194304 is above Linux's pid_max: never a running process. These imitate the
        // temporaries a killed write leaves, so they are written directly, not atomically.
        let dead = t.path().join(".m.safetensors.tmp4194304");
        let live = t.path().join(format!(".m.safetensors.tmp{}", std::process::id()));
        std::fs::write(&dead, b"torn").unwrap();
        std::fs::write(&live, b"mine").unwrap();
        remove_stale_temporaries_in(t.path());
        assert!(!dead.exists());
        assert!(live.exists());
    }
}
