//! A folder of images in torchvision's ImageFolder layout: `DIR/train/<class>/*.png|jpg|jpeg`
//! and `DIR/test/<class>/*`. Classes are the training folder's subfolders sorted by name (as
//! torchvision sorts them); a test class must be one of them. Images are decoded once per run,
//! in parallel, after every header has been read and the total size checked.

use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageReader, Limits};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

use crate::data::{DataFormat, Dataset, Source};
use crate::data::{MAX_CLASSES, MAX_INPUT_SIDE};
use crate::error::{Error, Result};
use crate::memory::{try_reserve, Need};

/// The decoded dataset may take at most this many bytes (one per pixel and channel).
pub const MAX_DATASET_BYTES: usize = 8 << 30;
/// At most this many image files per split.
pub const MAX_IMAGES: usize = 10_000_000;
/// Source images (before --resize) may be at most this wide and high.
pub const MAX_SOURCE_SIDE: u32 = 16384;
const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// How a split is loaded.
#[derive(Clone, Copy, Debug, Default)]
pub struct FolderOptions {
    /// Resize every image to [H, W] (bilinear); without it all images must share one size.
    pub resize: Option<[usize; 2]>,
    /// 1 (grey) or 3 (RGB); without it, 3 when any image has colour, else 1.
    pub channels: Option<usize>,
}

/// True when `dir` has `train/` and `test/` subfolders.
pub fn holds_folder(dir: &Path) -> bool {
    dir.join("train").is_dir() && dir.join("test").is_dir()
}

/// What is left out of a split on purpose, counted (`Source`'s fields).
#[derive(Default)]
struct Skips {
    hidden: usize,
    not_images: usize,
    stray: usize,
}

fn is_hidden(entry: &std::fs::DirEntry) -> bool {
    entry.file_name().to_string_lossy().starts_with('.')
}

/// What an entry is, following a link; a link that cannot be followed (dangling, looping, no
/// permission) is an error naming it, since it stands where data was meant to be.
fn entry_type(path: &Path) -> Result<std::fs::Metadata> {
    std::fs::metadata(path).map_err(|e| {
        Error::data(
            path,
            format!("cannot be read ({e}): a dangling or looping link, or no permission; fix or remove it"),
        )
    })
}

/// The class folders of `split_dir`, sorted by name; hidden entries and files beside them are
/// counted in `skips`.
fn class_dirs(split_dir: &Path, skips: &mut Skips) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(split_dir).map_err(|e| Error::io(split_dir, e))? {
        let entry = entry.map_err(|e| Error::io(split_dir, e))?;
        if is_hidden(&entry) {
            skips.hidden += 1;
            continue;
        }
        let path = entry.path();
        if entry_type(&path)?.is_dir() {
            let name = entry.file_name().to_string_lossy().to_string();
            out.push((name, path));
        } else {
            skips.stray += 1;
        }
    }
    out.sort();
    if out.is_empty() {
        return Err(Error::data(
            split_dir,
            "has no class folders; put each class's images in their own subfolder (train/cat/1.png)",
        ));
    }
    if out.len() > MAX_CLASSES {
        return Err(Error::data(
            split_dir,
            format!("has {} class folders, more than {MAX_CLASSES}", out.len()),
        ));
    }
    Ok(out)
}

/// The image files of one class folder, sorted by name. Hidden entries and other files are
/// counted in `skips`; an image name that is not a readable regular file is an error.
fn image_files(class_dir: &Path, skips: &mut Skips) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(class_dir).map_err(|e| Error::io(class_dir, e))? {
        let entry = entry.map_err(|e| Error::io(class_dir, e))?;
        if is_hidden(&entry) {
            skips.hidden += 1;
            continue;
        }
        let path = entry.path();
        let ext = path.extension().map(|e| e.to_string_lossy().to_lowercase());
        if !ext.is_some_and(|e| EXTENSIONS.contains(&e.as_str())) {
            skips.not_images += 1;
            continue;
        }
        if !entry_type(&path)?.is_file() {
            return Err(Error::data(
                &path,
                "has an image's name but is not a regular file (a folder, device or pipe); remove or rename it",
            ));
        }
        files.push(path);
    }
    files.sort();
    if files.is_empty() {
        return Err(Error::data(
            class_dir,
            "holds no .png, .jpg or .jpeg image; add images or remove the empty class folder",
        ));
    }
    Ok(files)
}

fn limits() -> Limits {
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SOURCE_SIDE);
    limits.max_image_height = Some(MAX_SOURCE_SIDE);
    limits.max_alloc = Some(1 << 30);
    limits
}

fn reader(path: &Path) -> Result<ImageReader<std::io::BufReader<std::fs::File>>> {
    let mut r = ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    r.limits(limits());
    Ok(r)
}

/// The folder reader's checks on one image file's bytes: its header's size within the source
/// limits, then, when it is at most `decode_side` a side, its decode (for the fuzz target).
pub fn check_image_bytes(bytes: &[u8], decode_side: u32) -> Result<(u32, u32)> {
    let path = Path::new("image");
    let open = || -> Result<ImageReader<std::io::Cursor<&[u8]>>> {
        let mut r = ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| Error::io(path, e))?;
        r.limits(limits());
        Ok(r)
    };
    let (w, h) = open()?.into_dimensions().map_err(|e| bad_image(path, e))?;
    if w > MAX_SOURCE_SIDE || h > MAX_SOURCE_SIDE {
        return Err(bad_image(path, format!("{w}x{h} is over {MAX_SOURCE_SIDE} a side")));
    }
    if w <= decode_side && h <= decode_side {
        open()?.decode().map_err(|e| bad_image(path, e))?;
    }
    Ok((w, h))
}

fn bad_image(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::data(
        path,
        format!("is not a readable PNG or JPEG image ({e}); replace or remove it"),
    )
}

/// One split of the folder dataset. `split` is "train" or "test"; the labels index the
/// training folder's sorted classes.
pub fn load_folder(dir: &Path, split: &str, opts: FolderOptions) -> Result<Dataset> {
    if let Some(c) = opts.channels.filter(|c| ![1, 3].contains(c)) {
        return Err(Error::invalid(format!(
            "{} holds grey or RGB images, but the model takes {c} input channels",
            dir.display()
        )));
    }
    let mut skips = Skips::default();
    let classes = class_dirs(&dir.join("train"), &mut skips)?;
    let names: Vec<String> = classes.iter().map(|(n, _)| n.clone()).collect();
    let wanted = if split == "train" {
        classes
    } else {
        // Only this split's own skips are counted.
        skips = Skips::default();
        class_dirs(&dir.join(split), &mut skips)?
    };
    let mut files: Vec<(PathBuf, u8)> = Vec::new();
    for (name, path) in &wanted {
        let Some(label) = names.iter().position(|n| n == name) else {
            return Err(Error::data(
                path,
                format!(
                    "is a {split} class that train/ lacks (its classes: {}); every {split} class needs training images",
                    names.join(", ")
                ),
            ));
        };
        for f in image_files(path, &mut skips)? {
            files.push((f, label as u8));
        }
        if files.len() > MAX_IMAGES {
            return Err(Error::data(dir, format!("has more than {MAX_IMAGES} {split} images")));
        }
    }
    if let Some([h, w]) = opts.resize {
        if !(1..=MAX_INPUT_SIDE).contains(&h) || !(1..=MAX_INPUT_SIDE).contains(&w) {
            return Err(Error::invalid(format!(
                "--resize {h}x{w}: each side must be in 1..={MAX_INPUT_SIDE}"
            )));
        }
    }
    // Headers first: every size is known and checked before any pixel is decoded.
    let dims: Vec<(u32, u32)> = files
        .par_iter()
        .map(|(p, _)| reader(p)?.into_dimensions().map_err(|e| bad_image(p, e)))
        .collect::<Result<_>>()?;
    let [h, w] = match opts.resize {
        Some(hw) => hw,
        None => {
            let (w0, h0) = dims[0];
            if let Some(k) = dims.iter().position(|&d| d != (w0, h0)) {
                return Err(Error::data(
                    &files[k].0,
                    format!(
                        "is {}x{} (HxW) but {} is {h0}x{w0}; all images must share one size, or pass --resize HxW",
                        dims[k].1,
                        dims[k].0,
                        files[0].0.display()
                    ),
                ));
            }
            if h0 as usize > MAX_INPUT_SIDE || w0 as usize > MAX_INPUT_SIDE {
                return Err(Error::data(
                    &files[0].0,
                    format!("is {h0}x{w0}, larger than {MAX_INPUT_SIDE} a side; pass --resize HxW"),
                ));
            }
            [h0 as usize, w0 as usize]
        }
    };
    let total = files.len().saturating_mul(3 * h * w);
    if total > MAX_DATASET_BYTES {
        return Err(Error::data(
            dir,
            format!(
                "{} {split} images of {h}x{w} would take {total} bytes, more than {MAX_DATASET_BYTES}; pass a smaller --resize",
                files.len()
            ),
        ));
    }
    // The decoded RGB images and the dataset made from them are both held for a moment.
    let mut need = Need::default();
    need.add("decoded images", total as u64);
    need.add("the dataset", total as u64);
    need.check(
        &format!("decoding {} {split} images of {h}x{w}", files.len()),
        "pass a smaller --resize",
    )?;
    let bar = ProgressBar::new(files.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("decoding {msg} [{bar:30}] {pos}/{len} ({per_sec}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(format!("{split} images"));
    // Each image is kept as 8-bit RGB right after decoding (and resizing), so the decoded set
    // never takes more than the checked total, whatever the files' own pixel formats.
    let decoded: Vec<(image::RgbImage, bool)> = files
        .par_iter()
        .map(|(p, _)| {
            let img = reader(p)?.decode().map_err(|e| bad_image(p, e))?;
            let img = match opts.resize {
                Some([rh, rw]) if (img.height() as usize, img.width() as usize) != (rh, rw) => {
                    img.resize_exact(rw as u32, rh as u32, image::imageops::FilterType::Triangle)
                }
                _ => img,
            };
            bar.inc(1);
            Ok((img.to_rgb8(), img.color().has_color()))
        })
        .collect::<Result<_>>()?;
    bar.finish_and_clear();
    let channels = opts.channels.unwrap_or(if decoded.iter().any(|(_, colour)| *colour) {
        3
    } else {
        1
    });
    let mut images = Vec::new();
    try_reserve(&mut images, files.len() * channels * h * w, "the decoded images")?;
    for (rgb, _) in &decoded {
        if channels == 1 {
            // Equal R, G and B give back the grey value exactly.
            images.extend_from_slice(DynamicImage::ImageRgb8(rgb.clone()).to_luma8().as_raw());
        } else {
            // Interleaved RGB to the planes [C, H, W].
            for c in 0..3 {
                images.extend(rgb.as_raw().iter().skip(c).step_by(3));
            }
        }
    }
    Ok(Dataset {
        images,
        labels: files.iter().map(|(_, l)| *l).collect(),
        shape: [channels, h, w],
        classes: names.len(),
        class_names: names,
        source: Source {
            hidden: skips.hidden,
            not_images: skips.not_images,
            stray: skips.stray,
            ..Source::new(DataFormat::Folder, files.len())
        },
    })
}
