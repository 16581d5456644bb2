//! WebDataset shards: `train-*.tar` and `test-*.tar` in one folder (or a pattern such as
//! `shards/train-{000..099}.tar` naming the training shards; the test shards are then the
//! folder's `test-*.tar`). A sample is the consecutive members sharing a key (the member's
//! path up to the first dot of its file name): `KEY.png|jpg|jpeg` and `KEY.cls` (the class
//! index as text); other members are counted and left out. One pass over the tar headers
//! (seeking past the data) builds an index of where each image's bytes lie; the images are
//! then read by offset, in webdataset's order: shards shuffled per epoch, then a seeded
//! shuffle buffer (`shard_epoch_order`). Class names come from `classes.txt` beside the
//! shards when it is there (`normlab data pack` writes it), else they are the indices.

use std::fs::File;
use std::io::{Cursor, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::ImageReader;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::data::folder::{
    bad_image, caches, decode_all, header_of, image_to_sample, limits, readable_headers, split_shape,
};
use crate::data::stream::{Pixels, SampleReader};
use crate::data::{DataFormat, Dataset, FolderOptions, Source, MAX_CLASSES};
use crate::error::{Error, Result};

/// An image member may take at most this many bytes.
pub const MAX_MEMBER_BYTES: u64 = 64 << 20;
/// At most this many shards per split.
pub const MAX_SHARDS: usize = 100_000;
/// At most this many samples per split.
pub const MAX_SAMPLES: usize = 50_000_000;
/// The shuffle buffer's default size (webdataset's usual `.shuffle(1000)`).
pub const DEFAULT_SHUFFLE_BUFFER: usize = 1000;
const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// True when `path` is a folder with `train-*.tar` and `test-*.tar`, or a brace pattern whose
/// training shards exist beside `test-*.tar`.
pub fn holds_shards(path: &Path) -> bool {
    shard_files(path, true).is_ok_and(|f| !f.is_empty()) && shard_files(path, false).is_ok_and(|f| !f.is_empty())
}

fn is_pattern(path: &Path) -> bool {
    path.to_string_lossy().contains('{')
}

/// The shards of a split, sorted by name (a pattern's in its own order).
pub fn shard_files(path: &Path, train: bool) -> Result<Vec<PathBuf>> {
    if is_pattern(path) {
        let dir = path.parent().unwrap_or(Path::new("")).to_path_buf();
        if train {
            let files = expand_braces(&path.to_string_lossy())?;
            let files: Vec<PathBuf> = files.into_iter().map(PathBuf::from).collect();
            if let Some(missing) = files.iter().find(|f| !f.is_file()) {
                return Err(Error::data(missing, "is named by the shard pattern but is not a file"));
            }
            return Ok(files);
        }
        return list_prefixed(&dir, "test-");
    }
    list_prefixed(path, if train { "train-" } else { "test-" })
}

fn list_prefixed(dir: &Path, prefix: &str) -> Result<Vec<PathBuf>> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(prefix) && name.ends_with(".tar") {
            out.push(e.path());
        }
    }
    out.sort();
    if out.len() > MAX_SHARDS {
        return Err(Error::data(
            dir,
            format!("has more than {MAX_SHARDS} {prefix}*.tar shards"),
        ));
    }
    Ok(out)
}

/// `a{000..012}b` → a000b ... a012b (zero-padded as the first bound is); one numeric range at
/// most, as webdataset's shard specs use.
pub fn expand_braces(spec: &str) -> Result<Vec<String>> {
    let bad = || {
        Error::invalid(format!(
            "--data {spec}: a shard pattern holds one numeric range {{FIRST..LAST}}, e.g. shards/train-{{000..099}}.tar"
        ))
    };
    let (head, rest) = spec.split_once('{').ok_or_else(bad)?;
    let (range, tail) = rest.split_once('}').ok_or_else(bad)?;
    if tail.contains('{') {
        return Err(bad());
    }
    let (a, b) = range.split_once("..").ok_or_else(bad)?;
    let (lo, hi): (usize, usize) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
    if hi < lo || hi - lo >= MAX_SHARDS {
        return Err(bad());
    }
    let width = a.len();
    Ok((lo..=hi).map(|k| format!("{head}{k:0width$}{tail}")).collect())
}

/// Where one sample's image lies.
#[derive(Clone, Debug)]
struct Member {
    shard: u32,
    offset: u64,
    len: u64,
    key: String,
    ext: String,
}

/// A split of shards read on demand: sample `i`'s bytes read by offset and decoded.
pub struct ShardReader {
    shards: Vec<PathBuf>,
    members: Vec<Member>,
    shape: [usize; 3],
    resize: bool,
}

impl ShardReader {
    fn bytes(&self, i: usize) -> Result<Vec<u8>> {
        let m = &self.members[i];
        let path = &self.shards[m.shard as usize];
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut buf = vec![0u8; m.len as usize];
        f.read_exact_at(&mut buf, m.offset).map_err(|e| {
            Error::data(
                path,
                format!(
                    "member {}.{} cannot be read ({e}): the shard changed or was truncated since it was indexed",
                    m.key, m.ext
                ),
            )
        })?;
        Ok(buf)
    }
}

impl SampleReader for ShardReader {
    fn read(&self, i: usize, dst: &mut [u8]) -> Result<()> {
        let bytes = self.bytes(i)?;
        let name = PathBuf::from(self.name(i));
        let mut r = ImageReader::new(Cursor::new(&bytes[..]))
            .with_guessed_format()
            .map_err(|e| Error::io(&name, e))?;
        r.limits(limits());
        let img = r.decode().map_err(|e| bad_image(&name, e))?;
        image_to_sample(img, self.shape, self.resize, &name, dst)
    }

    fn name(&self, i: usize) -> String {
        let m = &self.members[i];
        format!("{}: {}.{}", self.shards[m.shard as usize].display(), m.key, m.ext)
    }
}

/// The index of one split: its members, labels and what was left out.
struct ShardIndex {
    members: Vec<Member>,
    labels: Vec<u8>,
    /// Samples per shard, in order.
    per_shard: Vec<usize>,
    others: usize,
}

/// `path/to/KEY.ext` → ("path/to/KEY", "ext"): the extension starts at the file name's first dot.
fn split_key(name: &str) -> Option<(String, String)> {
    let (dir, file) = match name.rsplit_once('/') {
        Some((d, f)) => (format!("{d}/"), f),
        None => (String::new(), name),
    };
    let (stem, ext) = file.split_once('.')?;
    Some((format!("{dir}{stem}"), ext.to_lowercase()))
}

fn malformed(shard: &Path, after: &str, e: impl std::fmt::Display) -> Error {
    Error::data(
        shard,
        format!("is not a readable tar file after member '{after}' ({e}); re-pack it or remove it from the data"),
    )
}

/// One shard's samples, in order; `shard` is its number in the split.
fn index_shard(path: &Path, shard: u32, out: &mut ShardIndex) -> Result<()> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut archive = tar::Archive::new(f);
    let mut last = String::from("(start of the shard)");
    // The sample being gathered: key, image member, label.
    let mut open: Option<(String, Option<Member>, Option<u8>)> = None;
    let before = out.members.len();
    let close = |open: &mut Option<(String, Option<Member>, Option<u8>)>, out: &mut ShardIndex| -> Result<()> {
        if let Some((key, image, label)) = open.take() {
            match (image, label) {
                (Some(m), Some(l)) => {
                    out.members.push(m);
                    out.labels.push(l);
                }
                (None, None) => out.others += 1,
                (None, Some(_)) => {
                    return Err(Error::data(
                        path,
                        format!(
                        "sample '{key}' has a .cls member but no .png, .jpg or .jpeg image; every sample needs both"
                    ),
                    ))
                }
                (Some(_), None) => {
                    return Err(Error::data(
                        path,
                        format!(
                            "sample '{key}' has an image but no .cls member (its class index); every sample needs both"
                        ),
                    ))
                }
            }
        }
        Ok(())
    };
    let entries = archive.entries_with_seek().map_err(|e| malformed(path, &last, e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| malformed(path, &last, e))?;
        let name = entry
            .path()
            .map_err(|e| malformed(path, &last, e))?
            .to_string_lossy()
            .to_string();
        last.clone_from(&name);
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let Some((key, ext)) = split_key(&name) else {
            out.others += 1;
            continue;
        };
        if open.as_ref().is_some_and(|(k, _, _)| *k != key) {
            close(&mut open, out)?;
        }
        let slot = open.get_or_insert_with(|| (key.clone(), None, None));
        let (size, offset) = (entry.size(), entry.raw_file_position());
        if offset.checked_add(size).is_none_or(|end| end > file_len) {
            return Err(Error::data(
                path,
                format!("member '{name}' is truncated: {size} bytes from offset {offset} run past the shard's end ({file_len} bytes); re-pack it"),
            ));
        }
        if IMAGE_EXTENSIONS.contains(&ext.as_str()) {
            if size > MAX_MEMBER_BYTES {
                return Err(Error::data(
                    path,
                    format!("member '{name}' takes {size} bytes, more than {MAX_MEMBER_BYTES} for one image"),
                ));
            }
            if slot.1.is_some() {
                return Err(Error::data(
                    path,
                    format!("sample '{key}' has two images ('{name}' is the second)"),
                ));
            }
            slot.1 = Some(Member {
                shard,
                offset,
                len: size,
                key,
                ext,
            });
        } else if ext == "cls" {
            let bad = |why: String| {
                Error::data(
                    path,
                    format!(
                        "member '{name}' {why}; it must hold a class index 0..{}",
                        MAX_CLASSES - 1
                    ),
                )
            };
            if size > 32 {
                return Err(bad(format!("takes {size} bytes")));
            }
            let mut text = String::new();
            entry
                .read_to_string(&mut text)
                .map_err(|e| bad(format!("cannot be read as text ({e})")))?;
            let label = text
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|&l| l < MAX_CLASSES)
                .ok_or_else(|| bad(format!("holds '{}'", text.trim())))?;
            slot.2 = Some(label as u8);
        } else {
            out.others += 1;
        }
        if out.members.len() > MAX_SAMPLES {
            return Err(Error::data(
                path,
                format!("the split has more than {MAX_SAMPLES} samples"),
            ));
        }
    }
    close(&mut open, out)?;
    out.per_shard.push(out.members.len() - before);
    Ok(())
}

/// The class names: `classes.txt` beside the shards (one per line) when it names at least
/// `count` classes, else "0", "1", ....
fn class_names(dir: &Path, count: usize) -> Result<Vec<String>> {
    let file = dir.join("classes.txt");
    if file.is_file() {
        let text = crate::files::read_limited(&file, 1 << 20, "the class names")?;
        let names: Vec<String> = String::from_utf8_lossy(&text)
            .lines()
            .map(|l| l.trim().to_string())
            .collect();
        if names.len() > MAX_CLASSES {
            return Err(Error::data(
                &file,
                format!("names {} classes, more than {MAX_CLASSES}", names.len()),
            ));
        }
        if names.len() >= count {
            return Ok(names);
        }
        return Err(Error::data(
            &file,
            format!(
                "names {} classes but the shards hold class index {}; fix or remove it",
                names.len(),
                count - 1
            ),
        ));
    }
    Ok((0..count).map(|k| k.to_string()).collect())
}

/// One split of a shards set: index, headers checked, then cached or streamed as an image
/// folder's split is.
pub fn load_shards(path: &Path, train: bool, opts: FolderOptions) -> Result<Dataset> {
    let split = if train { "train" } else { "test" };
    let shards = shard_files(path, train)?;
    if shards.is_empty() {
        return Err(Error::DataMissing(format!(
            "{} has no {split}-*.tar shard",
            path.display()
        )));
    }
    let mut index = ShardIndex {
        members: Vec::new(),
        labels: Vec::new(),
        per_shard: Vec::new(),
        others: 0,
    };
    for (k, s) in shards.iter().enumerate() {
        index_shard(s, k as u32, &mut index)?;
    }
    if index.members.is_empty() {
        return Err(Error::data(
            path,
            format!("the {split} shards hold no image with a .cls member"),
        ));
    }
    let mut reader = ShardReader {
        shards,
        members: index.members,
        shape: [0; 3],
        resize: opts.resize.is_some(),
    };
    // Headers of every image, read by offset, before any pixel is decoded.
    let headers: Vec<Result<(u32, u32, bool)>> = (0..reader.members.len())
        .into_par_iter()
        .map(|i| {
            let bytes = reader.bytes(i)?;
            let mut r = ImageReader::new(Cursor::new(&bytes[..]))
                .with_guessed_format()
                .map_err(|e| Error::io(reader.name(i), e))?;
            r.limits(limits());
            header_of(r, Path::new(&reader.name(i)))
        })
        .collect();
    let (dims, keep, bad) = readable_headers(headers, opts.skip_bad, path, split)?;
    let mut labels = index.labels;
    if bad > 0 {
        // Drop the unreadable samples from the index and the per-shard counts.
        let mut per_shard = vec![0; index.per_shard.len()];
        reader.members = keep.iter().map(|&i| reader.members[i].clone()).collect();
        labels = keep.iter().map(|&i| labels[i]).collect();
        for m in &reader.members {
            per_shard[m.shard as usize] += 1;
        }
        index.per_shard = per_shard;
    }
    let names: Vec<String> = (0..reader.members.len()).map(|i| reader.name(i)).collect();
    reader.shape = split_shape(&dims, opts, |k| Path::new(&names[k]))?;
    drop(names);
    let shape = reader.shape;
    let classes = labels.iter().map(|&l| l as usize + 1).max().unwrap_or(1);
    let dir = if is_pattern(path) {
        path.parent().unwrap_or(Path::new("."))
    } else {
        path
    };
    let class_names = class_names(dir, classes)?;
    let bytes = (labels.len() as u64).saturating_mul(shape.iter().product::<usize>() as u64);
    let (cached, limit) = caches(bytes, &opts);
    let mut source = Source {
        not_images: index.others,
        bad_images: bad,
        shards: index.per_shard,
        ..Source::new(DataFormat::Shards, labels.len())
    };
    source.set_cache(cached, bytes, limit);
    let images = if cached {
        let n = labels.len();
        let (images, bad_now) = decode_all(&reader, n, shape, split, opts.skip_bad, &mut labels)?;
        if bad_now > 0 {
            // The order follows the shards: a cached set with holes keeps its shard counts
            // only approximately, so say it plainly instead.
            return Err(Error::invalid(format!(
                "{bad_now} {split} images in {} decode badly though their headers read; remove them, or pass --cache-limit 0 --skip-bad-images to stream and skip them",
                path.display()
            )));
        }
        Pixels::Memory(images)
    } else {
        Pixels::Stream(Arc::new(reader))
    };
    Ok(Dataset {
        images,
        labels,
        shape,
        classes: class_names.len().max(classes),
        class_names,
        source,
    })
}

/// A key of the epoch's order: the shard order and buffer draws depend on (seed, epoch) alone.
fn epoch_rng(seed: u64, epoch: usize, salt: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ salt ^ (epoch as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03))
}

/// The order of the first `len` samples of shards holding `per_shard` samples each, in
/// 0-based `epoch`: without `shuffle`, the shards' own order; with it, the shards permuted and
/// their samples passed through a shuffle buffer of `buffer` samples, webdataset's `_shuffle`
/// (fill to `min(100, buffer)` first; each incoming sample then pushes out a random one).
pub fn shard_epoch_order(
    per_shard: &[usize],
    len: usize,
    seed: u64,
    epoch: usize,
    shuffle: bool,
    buffer: usize,
) -> Vec<usize> {
    let mut starts = Vec::with_capacity(per_shard.len());
    let mut at = 0;
    for &n in per_shard {
        starts.push(at);
        at += n;
    }
    let mut shards: Vec<usize> = (0..per_shard.len()).collect();
    let mut rng = epoch_rng(seed, epoch, 0x5EED_5A4D);
    if shuffle {
        use rand::seq::SliceRandom;
        shards.shuffle(&mut rng);
    }
    let stream = shards
        .into_iter()
        .flat_map(|s| starts[s]..starts[s] + per_shard[s])
        .filter(|&i| i < len);
    if !shuffle || buffer <= 1 {
        return stream.collect();
    }
    let initial = buffer.min(100);
    let mut out = Vec::with_capacity(len);
    let mut buf: Vec<usize> = Vec::with_capacity(buffer);
    let pick = |buf: &mut Vec<usize>, rng: &mut ChaCha8Rng| {
        let k = rng.gen_range(0..buf.len());
        buf.swap_remove(k)
    };
    let mut stream = stream.peekable();
    while let Some(s) = stream.next() {
        buf.push(s);
        if buf.len() < buffer {
            if let Some(t) = stream.next() {
                buf.push(t);
            }
        }
        if buf.len() >= initial {
            out.push(pick(&mut buf, &mut rng));
        }
    }
    while !buf.is_empty() {
        out.push(pick(&mut buf, &mut rng));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braces_expand_with_their_padding() {
        assert_eq!(
            expand_braces("s/train-{08..11}.tar").unwrap(),
            vec!["s/train-08.tar", "s/train-09.tar", "s/train-10.tar", "s/train-11.tar"]
        );
        assert!(expand_braces("s/train-{3..1}.tar").is_err());
        assert!(expand_braces("s/train-{a..b}.tar").is_err());
    }

    #[test]
    fn keys_end_at_the_first_dot_of_the_file_name() {
        assert_eq!(split_key("a.b/x.seg.png"), Some(("a.b/x".into(), "seg.png".into())));
        assert_eq!(split_key("000001.cls"), Some(("000001".into(), "cls".into())));
        assert_eq!(split_key("README"), None);
    }

    #[test]
    fn the_order_is_a_permutation_replayed_by_its_seed() {
        let per = [40, 25, 35];
        let a = shard_epoch_order(&per, 100, 7, 3, true, 30);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(a, shard_epoch_order(&per, 100, 7, 3, true, 30));
        assert_ne!(a, shard_epoch_order(&per, 100, 7, 4, true, 30));
        assert_eq!(
            shard_epoch_order(&per, 100, 7, 3, false, 30),
            (0..100).collect::<Vec<_>>()
        );
        // A limit keeps the first samples of the index.
        assert_eq!(shard_epoch_order(&per, 50, 7, 3, true, 30).len(), 50);
    }
}
