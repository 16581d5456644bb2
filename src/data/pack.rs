//! `normlab data pack`: an image folder written as WebDataset shards. Samples go in the folder's
//! own order (classes sorted, files sorted), keyed by their place in the split (`00000042`),
//! the image bytes copied as they are (`KEY.png|jpg|jpeg`) beside `KEY.cls`; a shard closes
//! before the member that would take it over the size asked. Each shard and `classes.txt` go
//! through the atomic write, so a killed pack leaves whole shards only.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::ImageReader;

use crate::data::folder::{header_of, index_folder, limits};
use crate::data::shards::MAX_MEMBER_BYTES;
use crate::error::{Error, Result};
use crate::files::{read_limited, write_atomic};

/// What one split became.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PackedSplit {
    pub split: String,
    pub images: usize,
    pub shards: Vec<PathBuf>,
    pub bytes: u64,
}

/// The shard names a pack of `split` writes, in order.
pub fn shard_name(split: &str, k: usize) -> String {
    format!("{split}-{k:06}.tar")
}

fn append(builder: &mut tar::Builder<Vec<u8>>, name: &str, bytes: &[u8]) -> Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_size(bytes.len() as u64);
    h.set_mode(0o644);
    // A fixed time: the same folder packs to the same bytes.
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    builder
        .append_data(&mut h, name, bytes)
        .map_err(|e| Error::invalid(format!("cannot add {name} to a shard: {e}")))
}

/// Packs the `train` and `test` splits of `folder` into `out` as shards of at most
/// `shard_size` bytes (a larger image gets a shard of its own), calling `progress` per image.
pub fn pack_folder(folder: &Path, out: &Path, shard_size: u64, progress: &dyn Fn(&str)) -> Result<Vec<PackedSplit>> {
    let mut report = Vec::new();
    let mut names = Vec::new();
    for split in ["train", "test"] {
        let index = index_folder(folder, split)?;
        names = index.names.clone();
        let mut packed = PackedSplit {
            split: split.into(),
            images: 0,
            shards: Vec::new(),
            bytes: 0,
        };
        let mut builder = tar::Builder::new(Vec::new());
        let mut in_shard = 0usize;
        let flush = |builder: tar::Builder<Vec<u8>>, packed: &mut PackedSplit| -> Result<()> {
            let bytes = builder
                .into_inner()
                .map_err(|e| Error::invalid(format!("cannot finish a shard: {e}")))?;
            let path = out.join(shard_name(split, packed.shards.len()));
            write_atomic(&path, &bytes)?;
            packed.bytes += bytes.len() as u64;
            packed.shards.push(path);
            Ok(())
        };
        for (i, (path, label)) in index.files.iter().enumerate() {
            let bytes = read_limited(path, MAX_MEMBER_BYTES, "an image")?;
            // The header is read as training will read it: a file it would refuse is refused now.
            let mut r = ImageReader::new(Cursor::new(&bytes[..]))
                .with_guessed_format()
                .map_err(|e| Error::io(path, e))?;
            r.limits(limits());
            header_of(r, path)?;
            let ext = path
                .extension()
                .map_or("png".into(), |e| e.to_string_lossy().to_lowercase());
            let key = format!("{i:08}");
            let member = 512 + bytes.len().div_ceil(512) * 512 + 1024;
            if in_shard > 0 && (builder.get_ref().len() + member) as u64 > shard_size {
                flush(
                    std::mem::replace(&mut builder, tar::Builder::new(Vec::new())),
                    &mut packed,
                )?;
                in_shard = 0;
            }
            append(&mut builder, &format!("{key}.{ext}"), &bytes)?;
            append(&mut builder, &format!("{key}.cls"), label.to_string().as_bytes())?;
            in_shard += 1;
            packed.images += 1;
            progress(split);
        }
        if in_shard > 0 {
            flush(builder, &mut packed)?;
        }
        report.push(packed);
    }
    let mut classes = names.join("\n");
    classes.push('\n');
    write_atomic(&out.join("classes.txt"), classes.as_bytes())?;
    Ok(report)
}
