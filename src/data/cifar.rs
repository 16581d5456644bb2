//! CIFAR-10's binary version: `data_batch_1.bin` ... `data_batch_5.bin` and `test_batch.bin`,
//! each a run of 3073-byte records (one label byte, then the 32x32 red, green and blue planes),
//! and `batches.meta.txt` with the class names. normlab never downloads them: get
//! `cifar-10-binary.tar.gz` from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it.

use std::path::Path;

use crate::data::{DataFormat, Dataset, Pixels, Source};
use crate::error::{Error, Result};
use crate::files::read_limited;
use crate::memory::try_reserve;

pub const SIDE: usize = 32;
/// One record: the label, then 3 planes of 32x32 bytes.
pub const RECORD: usize = 1 + 3 * SIDE * SIDE;
/// A real batch file is 30,730,000 bytes (10,000 records); anything beyond this is not one.
pub const MAX_FILE_BYTES: u64 = 64 << 20;
pub const CLASSES: usize = 10;

/// The training batches of the layout; every one must be there.
pub const TRAIN_BATCHES: usize = 5;

/// True when `dir` has entries named like the first training batch and the test batch (links
/// and non-files too: the loader then names what is wrong with them, instead of the folder
/// silently passing for another layout).
pub fn holds_cifar(dir: &Path) -> bool {
    let present = |name: &str| dir.join(name).symlink_metadata().is_ok();
    present("data_batch_1.bin") && present("test_batch.bin")
}

/// The training split (`data_batch_1.bin` ... `data_batch_5.bin`, all of them) or the test
/// split, with every file's length and every label checked. A missing, unreadable or
/// non-regular batch is an error naming it: four batches of five would train on 40,000 images
/// without a word.
pub fn load_cifar(dir: &Path, train: bool) -> Result<Dataset> {
    let files: Vec<_> = if train {
        (1..=TRAIN_BATCHES)
            .map(|k| dir.join(format!("data_batch_{k}.bin")))
            .collect()
    } else {
        vec![dir.join("test_batch.bin")]
    };
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    for path in &files {
        if path.symlink_metadata().is_err() {
            return Err(Error::data(
                path,
                format!(
                    "is missing: CIFAR-10's training split is data_batch_1.bin ... data_batch_{TRAIN_BATCHES}.bin, \
                     all of them; unpack cifar-10-binary.tar.gz again"
                ),
            ));
        }
        let bytes = read_limited(path, MAX_FILE_BYTES, "CIFAR-10 batch")?;
        parse_batch(path, &bytes, &mut images, &mut labels)?;
    }
    let read = labels.len();
    Ok(Dataset {
        images: Pixels::Memory(images),
        labels,
        shape: [3, SIDE, SIDE],
        classes: CLASSES,
        class_names: class_names(dir),
        source: Source::new(DataFormat::Cifar, read),
    })
}

/// Appends the records of one batch file's bytes (`path` names it in errors).
pub fn parse_batch(path: &Path, bytes: &[u8], images: &mut Vec<u8>, labels: &mut Vec<u8>) -> Result<()> {
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
    let records = bytes.len() / RECORD;
    try_reserve(images, records * (RECORD - 1), "the CIFAR-10 images")?;
    try_reserve(labels, records, "the CIFAR-10 labels")?;
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
    Ok(())
}

/// The names in `batches.meta.txt` (one per line), or class0..class9 without it.
fn class_names(dir: &Path) -> Vec<String> {
    read_limited(&dir.join("batches.meta.txt"), 1 << 16, "CIFAR-10 meta")
        .ok()
        .and_then(|b| parse_class_names(&b))
        .unwrap_or_else(|| (0..CLASSES).map(|k| format!("class{k}")).collect())
}

/// The meta file's class names: ten non-empty lines of UTF-8, else None.
pub fn parse_class_names(bytes: &[u8]) -> Option<Vec<String>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    (names.len() == CLASSES).then_some(names)
}
