//! CIFAR-10's binary version: `data_batch_1.bin` ... `data_batch_5.bin` and `test_batch.bin`,
//! each a run of 3073-byte records (one label byte, then the 32x32 red, green and blue planes),
//! and `batches.meta.txt` with the class names. normlab never downloads them: get
//! `cifar-10-binary.tar.gz` from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it.

use std::path::Path;

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::files::read_limited;

pub const SIDE: usize = 32;
/// One record: the label, then 3 planes of 32x32 bytes.
pub const RECORD: usize = 1 + 3 * SIDE * SIDE;
/// A real batch file is 30,730,000 bytes (10,000 records); anything beyond this is not one.
pub const MAX_FILE_BYTES: u64 = 64 << 20;
pub const CLASSES: usize = 10;

/// True when `dir` holds the first training batch and the test batch.
pub fn holds_cifar(dir: &Path) -> bool {
    dir.join("data_batch_1.bin").is_file() && dir.join("test_batch.bin").is_file()
}

/// The training split (every `data_batch_K.bin` from K = 1 while they exist, at most 5) or the
/// test split, with every file's length and every label checked.
pub fn load_cifar(dir: &Path, train: bool) -> Result<Dataset> {
    let files: Vec<_> = if train {
        (1..=5)
            .map(|k| dir.join(format!("data_batch_{k}.bin")))
            .take_while(|p| p.is_file())
            .collect()
    } else {
        vec![dir.join("test_batch.bin")]
    };
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    for path in &files {
        let bytes = read_limited(path, MAX_FILE_BYTES, "CIFAR-10 batch")?;
        if bytes.is_empty() || !bytes.len().is_multiple_of(RECORD) {
            return Err(Error::data(
                path,
                format!(
                    "is {} bytes, not a whole number of {RECORD}-byte records (a label byte and 3x32x32 \
                     pixels); truncated or not CIFAR-10's binary version? unpack cifar-10-binary.tar.gz again",
                    bytes.len()
                ),
            ));
        }
        images.reserve(bytes.len() / RECORD * (RECORD - 1));
        for (k, record) in bytes.chunks_exact(RECORD).enumerate() {
            if record[0] as usize >= CLASSES {
                return Err(Error::data(
                    path,
                    format!("record {k} has label {}, outside 0..{}", record[0], CLASSES - 1),
                ));
            }
            labels.push(record[0]);
            images.extend_from_slice(&record[1..]);
        }
    }
    Ok(Dataset {
        images,
        labels,
        shape: [3, SIDE, SIDE],
        classes: CLASSES,
        class_names: class_names(dir),
    })
}

/// The names in `batches.meta.txt` (one per line), or class0..class9 without it.
fn class_names(dir: &Path) -> Vec<String> {
    let names: Vec<String> = read_limited(&dir.join("batches.meta.txt"), 1 << 16, "CIFAR-10 meta")
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .map(|t| {
            t.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    if names.len() == CLASSES {
        names
    } else {
        (0..CLASSES).map(|k| format!("class{k}")).collect()
    }
}
