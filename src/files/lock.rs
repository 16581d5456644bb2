//! One writer per run folder: `DIR/.lock` holds the writer's pid under an advisory lock
//! (flock). The kernel drops the lock when its holder exits, however it exits, so a lock left
//! by a killed run is stale and the next run takes it over.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Held while a command writes a folder; released on drop or exit.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    pub path: PathBuf,
}

impl RunLock {
    /// Creates `dir` if needed and locks it, or says which process holds it.
    pub fn acquire(dir: &Path) -> Result<RunLock> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(".lock");
        // Only a regular file (or none yet) may be the lock: a link or a device planted there
        // must not be truncated and written with our pid.
        if let Ok(m) = std::fs::symlink_metadata(&path) {
            if !m.file_type().is_file() {
                return Err(Error::invalid(format!(
                    "{} is not a regular file (a link, folder or device); remove it and run again",
                    path.display()
                )));
            }
        }
        // Not through write_atomic, on purpose: flock needs one stable inode that every writer
        // opens, and write_atomic's rename would give the next process a different one. The
        // pid it holds is advisory (it names the holder in a message); a torn write only makes
        // that message say "another normlab process".
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let who = if holder.is_empty() {
                    "another normlab process".to_string()
                } else {
                    format!("another normlab process (pid {holder})")
                };
                return Err(Error::invalid(format!(
                    "{} is being written by {who}; wait for it to finish or choose another folder",
                    dir.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
        }
        let pid = std::process::id().to_string();
        let written = file
            .set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| file.write_all(pid.as_bytes()));
        written.map_err(|e| Error::io(&path, e))?;
        // Now the only writer: what a killed writer left half-written can go.
        super::atomic::remove_stale_temporaries_in(dir);
        Ok(RunLock { _file: file, path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_path_that_is_a_link_is_refused_not_followed() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("precious");
        crate::files::write_atomic(&target, b"keep").unwrap();
        std::os::unix::fs::symlink(&target, t.path().join(".lock")).unwrap();
        let e = RunLock::acquire(t.path()).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    }

    #[test]
    fn a_second_writer_is_refused_until_the_first_releases() {
        let t = tempfile::tempdir().unwrap();
        let a = RunLock::acquire(t.path()).unwrap();
        let e = RunLock::acquire(t.path()).unwrap_err().to_string();
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(a);
        RunLock::acquire(t.path()).unwrap();
    }
}
