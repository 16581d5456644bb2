//! Reading files whose size is not yet trusted.

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// The whole of a regular file of at most `limit` bytes. A device, FIFO or folder is refused
/// before anything is read (`/dev/zero` would never end), and so is a larger file, before
/// anything is allocated; `what` names the file's role in the message.
pub fn read_limited(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Err(Error::invalid(format!(
            "{} is a folder, not a {what} file; give the file inside it",
            path.display()
        )));
    }
    if !meta.is_file() {
        return Err(Error::invalid(format!(
            "{} is not a regular file (a device or pipe); give a {what} file",
            path.display()
        )));
    }
    if meta.len() > limit {
        return Err(Error::invalid(format!(
            "{} is {} bytes, more than the {} bytes a {what} file may have here; is it the right file?",
            path.display(),
            meta.len(),
            limit
        )));
    }
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // take(): the file may have grown since the size check.
    f.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(Error::invalid(format!(
            "{} grew past {limit} bytes while being read",
            path.display()
        )));
    }
    Ok(bytes)
}
