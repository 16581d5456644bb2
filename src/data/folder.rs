//! A folder of images in torchvision's ImageFolder layout: `DIR/train/<class>/*.png|jpg|jpeg`
//! and `DIR/test/<class>/*`. Classes are the training folder's subfolders sorted by name (as
//! torchvision sorts them); a test class must be one of them. Every header is read and checked
//! first; then the split is decoded once, in parallel, and held (`Pixels::Memory`) when its
//! bytes fit under the cache limit, or else read and decoded on demand (`Pixels::Stream`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::{DynamicImage, ImageDecoder, ImageReader, Limits};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

use crate::data::stream::{Pixels, SampleReader};
use crate::data::{DataFormat, Dataset, Source};
use crate::data::{MAX_CLASSES, MAX_INPUT_SIDE};
use crate::error::{Error, Result};
use crate::memory::try_resize;

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
    /// Hold the decoded split in memory when it takes at most this many bytes, else stream
    /// it [default: `default_cache_limit()`].
    pub cache_limit: Option<u64>,
    /// Count and leave out images that do not decode instead of stopping.
    pub skip_bad: bool,
}

/// The default cache limit: a quarter of the memory this process can allocate when the split
/// is read (8 GiB where that cannot be read), never above `MAX_DATASET_BYTES`.
pub fn default_cache_limit() -> u64 {
    crate::memory::available()
        .map_or(8 << 30, |a| a / 4)
        .min(MAX_DATASET_BYTES as u64)
}

/// Cached or streamed: the split's decoded bytes against the limit.
pub fn caches(bytes: u64, opts: &FolderOptions) -> (bool, u64) {
    let limit = opts
        .cache_limit
        .unwrap_or_else(default_cache_limit)
        .min(MAX_DATASET_BYTES as u64);
    (bytes <= limit, limit)
}

/// True when `dir` has `train/` and `test/` subfolders.
pub fn holds_folder(dir: &Path) -> bool {
    dir.join("train").is_dir() && dir.join("test").is_dir()
}

/// What is left out of a split on purpose, counted (`Source`'s fields).
#[derive(Default)]
pub struct Skips {
    pub hidden: usize,
    pub not_images: usize,
    pub stray: usize,
}

/// A split's image files in order (classes sorted by name, files sorted in each), their labels
/// (indices into the training folder's sorted classes), the class names, and what was skipped.
pub struct FolderIndex {
    pub files: Vec<(PathBuf, u8)>,
    pub names: Vec<String>,
    pub skips: Skips,
}

/// The files of `split` ("train" or "test") in the order every reader uses.
pub fn index_folder(dir: &Path, split: &str) -> Result<FolderIndex> {
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
    Ok(FolderIndex { files, names, skips })
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

pub(crate) fn limits() -> Limits {
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SOURCE_SIDE);
    limits.max_image_height = Some(MAX_SOURCE_SIDE);
    limits.max_alloc = Some(1 << 30);
    limits
}

pub(crate) fn reader(path: &Path) -> Result<ImageReader<std::io::BufReader<std::fs::File>>> {
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

/// What a header says: width, height and whether the pixels have colour.
pub(crate) fn header_of<R: std::io::BufRead + std::io::Seek>(
    r: ImageReader<R>,
    path: &Path,
) -> Result<(u32, u32, bool)> {
    let d = r.into_decoder().map_err(|e| bad_image(path, e))?;
    let (w, h) = d.dimensions();
    if w > MAX_SOURCE_SIDE || h > MAX_SOURCE_SIDE {
        return Err(bad_image(path, format!("{w}x{h} is over {MAX_SOURCE_SIDE} a side")));
    }
    Ok((w, h, d.color_type().has_color()))
}

/// One decoded image to the split's [C, H, W] bytes: made 8-bit RGB, resized to `shape` when
/// its size differs (bilinear convolution with antialiasing, as PIL's and torchvision's
/// Resize, by fast_image_resize: measured 41% + 9% of a 128 to 64 JPEG's decode time in the
/// image crate's resize, see ARCHITECTURE.md), then grey (`to_luma8`) or RGB planes. The
/// cache and the stream both go through here, so their bytes are equal.
pub(crate) fn image_to_sample(
    img: DynamicImage,
    shape: [usize; 3],
    resize: bool,
    path: &Path,
    dst: &mut [u8],
) -> Result<()> {
    let [c, h, w] = shape;
    let (ih, iw) = (img.height() as usize, img.width() as usize);
    let rgb = img.into_rgb8();
    let rgb = if (ih, iw) != (h, w) {
        if !resize {
            return Err(Error::data(
                path,
                format!(
                    "is {ih}x{iw} (HxW) but the split's images are {h}x{w}; all images must share one size, or pass --resize HxW"
                ),
            ));
        }
        resize_rgb(rgb, w as u32, h as u32, path)?
    } else {
        rgb
    };
    if c == 1 {
        // Equal R, G and B give back the grey value exactly.
        dst.copy_from_slice(DynamicImage::ImageRgb8(rgb).to_luma8().as_raw());
    } else {
        // Interleaved RGB to the planes [C, H, W].
        let plane = h * w;
        for (k, px) in rgb.as_raw().chunks_exact(3).enumerate() {
            dst[k] = px[0];
            dst[plane + k] = px[1];
            dst[2 * plane + k] = px[2];
        }
    }
    Ok(())
}

thread_local! {
    /// Each decode thread keeps its resizer (and the resizer its buffers) across images.
    static RESIZER: std::cell::RefCell<fast_image_resize::Resizer> = std::cell::RefCell::new(fast_image_resize::Resizer::new());
}

/// Bilinear resize of 8-bit RGB with the filter widened by the scale when shrinking.
fn resize_rgb(rgb: image::RgbImage, w: u32, h: u32, path: &Path) -> Result<image::RgbImage> {
    use fast_image_resize::{images::Image, FilterType, PixelType, ResizeAlg, ResizeOptions};
    let (iw, ih) = rgb.dimensions();
    let fail = |e: &dyn std::fmt::Display| Error::data(path, format!("cannot be resized ({e})"));
    let src = Image::from_vec_u8(iw, ih, rgb.into_raw(), PixelType::U8x3).map_err(|e| fail(&e))?;
    let mut dst = Image::new(w, h, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    RESIZER
        .with(|r| r.borrow_mut().resize(&src, &mut dst, &options))
        .map_err(|e| fail(&e))?;
    image::RgbImage::from_raw(w, h, dst.into_vec()).ok_or_else(|| fail(&"the resized buffer has the wrong size"))
}

/// An image folder's split read on demand: file `i` decoded into sample `i`.
pub struct FolderReader {
    files: Vec<PathBuf>,
    shape: [usize; 3],
    resize: bool,
}

impl SampleReader for FolderReader {
    fn read(&self, i: usize, dst: &mut [u8]) -> Result<()> {
        let p = &self.files[i];
        let img = reader(p)?.decode().map_err(|e| bad_image(p, e))?;
        image_to_sample(img, self.shape, self.resize, p, dst)
    }

    fn name(&self, i: usize) -> String {
        self.files[i].display().to_string()
    }
}

pub(crate) fn bad_image(path: &Path, e: impl std::fmt::Display) -> Error {
    // The decoders' messages may span lines; the error is one.
    let why = e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
    Error::data(
        path,
        format!("is not a readable PNG or JPEG image ({why}); replace or remove it (or pass --skip-bad-images)"),
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
    let FolderIndex { files, names, skips } = index_folder(dir, split)?;
    if let Some([h, w]) = opts.resize {
        if !(1..=MAX_INPUT_SIDE).contains(&h) || !(1..=MAX_INPUT_SIDE).contains(&w) {
            return Err(Error::invalid(format!(
                "--resize {h}x{w}: each side must be in 1..={MAX_INPUT_SIDE}"
            )));
        }
    }
    // Headers first: every size is known and checked before any pixel is decoded.
    let headers: Vec<Result<(u32, u32, bool)>> = files.par_iter().map(|(p, _)| header_of(reader(p)?, p)).collect();
    let (dims, keep, bad) = readable_headers(headers, opts.skip_bad, dir, split)?;
    let files: Vec<(PathBuf, u8)> = keep.into_iter().map(|i| files[i].clone()).collect();
    let shape = split_shape(&dims, opts, |k| files[k].0.as_path())?;
    let sample = shape.iter().product::<usize>();
    let bytes = (files.len() as u64).saturating_mul(sample as u64);
    let (cached, limit) = caches(bytes, &opts);
    let mut source = Source {
        hidden: skips.hidden,
        not_images: skips.not_images,
        stray: skips.stray,
        bad_images: bad,
        ..Source::new(DataFormat::Folder, files.len())
    };
    source.set_cache(cached, bytes, limit);
    let (paths, mut labels): (Vec<PathBuf>, Vec<u8>) = files.into_iter().unzip();
    let reader = FolderReader {
        files: paths,
        shape,
        resize: opts.resize.is_some(),
    };
    let images = if cached {
        let n = reader.files.len();
        let (images, bad_now) = decode_all(&reader, n, shape, split, opts.skip_bad, &mut labels)?;
        source.bad_images += bad_now;
        Pixels::Memory(images)
    } else {
        Pixels::Stream(Arc::new(reader))
    };
    Ok(Dataset {
        images,
        labels,
        shape,
        classes: names.len(),
        class_names: names,
        source,
    })
}

/// What a header says: width, height, and whether the pixels have colour.
pub(crate) type Header = (u32, u32, bool);

/// The headers that read (width, height, colour) and their indices in the split, and how many
/// did not: with `skip_bad` those are counted and left out, else the first one's error stops it.
pub(crate) fn readable_headers(
    headers: Vec<Result<Header>>,
    skip_bad: bool,
    dir: &Path,
    split: &str,
) -> Result<(Vec<Header>, Vec<usize>, usize)> {
    let (mut dims, mut keep, mut bad) = (Vec::with_capacity(headers.len()), Vec::new(), 0);
    for (i, h) in headers.into_iter().enumerate() {
        match h {
            Ok(d) => {
                dims.push(d);
                keep.push(i);
            }
            Err(_) if skip_bad => bad += 1,
            Err(e) => return Err(e),
        }
    }
    if keep.is_empty() {
        return Err(Error::data(dir, format!("has no readable {split} image")));
    }
    Ok((dims, keep, bad))
}

/// The [C, H, W] of a split from its headers (width, height, colour): `--resize` or the one
/// size all share, and the channels asked for or 3 when any image has colour.
pub(crate) fn split_shape<'a>(
    dims: &[(u32, u32, bool)],
    opts: FolderOptions,
    name: impl Fn(usize) -> &'a Path,
) -> Result<[usize; 3]> {
    let [h, w] = match opts.resize {
        Some(hw) => hw,
        None => {
            let (w0, h0, _) = dims[0];
            if let Some(k) = dims.iter().position(|&(w, h, _)| (w, h) != (w0, h0)) {
                return Err(Error::data(
                    name(k),
                    format!(
                        "is {}x{} (HxW) but {} is {h0}x{w0}; all images must share one size, or pass --resize HxW",
                        dims[k].1,
                        dims[k].0,
                        name(0).display()
                    ),
                ));
            }
            if h0 as usize > MAX_INPUT_SIDE || w0 as usize > MAX_INPUT_SIDE {
                return Err(Error::data(
                    name(0),
                    format!("is {h0}x{w0}, larger than {MAX_INPUT_SIDE} a side; pass --resize HxW"),
                ));
            }
            [h0 as usize, w0 as usize]
        }
    };
    let channels = opts.channels.unwrap_or(if dims.iter().any(|d| d.2) { 3 } else { 1 });
    Ok([channels, h, w])
}

/// Decodes every sample of `reader` into one buffer, in parallel, with a progress bar; with
/// `skip_bad`, an image that does not decode is left out (with its label) and counted.
pub(crate) fn decode_all(
    reader: &dyn SampleReader,
    n: usize,
    shape: [usize; 3],
    split: &str,
    skip_bad: bool,
    labels: &mut Vec<u8>,
) -> Result<(Vec<u8>, usize)> {
    let s: usize = shape.iter().product();
    let mut images = Vec::new();
    try_resize(&mut images, n * s, 0u8, "the decoded images")?;
    let bar = ProgressBar::new(n as u64);
    bar.set_style(
        ProgressStyle::with_template("decoding {msg} [{bar:30}] {pos}/{len} ({per_sec}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(format!("{split} images"));
    let ok: Vec<bool> = images
        .par_chunks_mut(s)
        .enumerate()
        .map(|(i, dst)| {
            let r = reader.read(i, dst);
            bar.inc(1);
            match r {
                Ok(()) => Ok(true),
                Err(_) if skip_bad => Ok(false),
                Err(e) => Err(e),
            }
        })
        .collect::<Result<_>>()?;
    bar.finish_and_clear();
    let bad = ok.iter().filter(|&&k| !k).count();
    if bad > 0 {
        // Close the gaps left by the images skipped.
        let mut at = 0;
        for (i, &k) in ok.iter().enumerate() {
            if k {
                images.copy_within(i * s..(i + 1) * s, at * s);
                labels[at] = labels[i];
                at += 1;
            }
        }
        images.truncate(at * s);
        labels.truncate(at);
    }
    Ok((images, bad))
}
