//! Image folders: `root/<class_name>/*.png|jpg|jpeg`, one directory per class, classes
//! sorted by name (label = position), files sorted by name within a class. Names are
//! compared as raw bytes: class directories whose names are not UTF-8 stay distinct
//! classes, shown with their invalid bytes as `\xNN`.
//!
//! If `root/train/` exists the dataset is split: the training split is `root/train/<class>/`
//! and the test split `root/test/<class>/` (or `root/val/<class>/`); the classes are those
//! of `train/`, and a test class directory that is not among them is an error. Without
//! `train/`, all of `root` is the training split and asking for the test split is an error
//! (hold samples out with [`Dataset::split_holdout`](crate::data::Dataset::split_holdout)).
//!
//! Images are decoded with the `image` crate (the format is guessed from the content),
//! converted to RGB, or kept grayscale when every image of the split is grayscale, and
//! resized to `height x width` with `image::imageops::resize` and the Triangle (bilinear)
//! filter. Files with other extensions and hidden entries are ignored; an image that does
//! not decode is an error naming the file. An entry with an image extension that is not a
//! regular file (a FIFO, a device) or larger than [`MAX_IMAGE_FILE_BYTES`] is refused before
//! any image is decoded, and so is a split whose decoded size exceeds the host-memory limit.
//! Decoding runs on all cores, into one buffer allocated up front.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use image::imageops::{self, FilterType};
use image::ImageReader;

use crate::data::{
    alloc_zeroed, check_host_bytes, data_err, default_max_host_bytes, fmt_bytes, io_err, open_regular,
    regular_file_len, Dataset, Split, MAX_IMAGE_SIZE,
};
use crate::error::Result;

/// Extensions (lower case) of the files read as images.
pub const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// The largest image file read: 512 MiB, the `image` crate's default decoding allocation
/// limit. PNG and JPEG files are no larger than their decoded pixels (bar headers), so a
/// larger file could not be decoded within that limit anyway; it is refused from its size
/// before anything is read.
pub const MAX_IMAGE_FILE_BYTES: u64 = 512 << 20;

fn is_hidden(p: &Path) -> bool {
    p.file_name().is_some_and(|n| n.as_encoded_bytes().first() == Some(&b'.'))
}

/// The sorted, non-hidden entries of `dir` that satisfy `keep`. Sorting compares the raw
/// names (bytes on Unix), so it is a total order even for names that are not UTF-8.
fn list(dir: &Path, keep: impl Fn(&Path) -> bool) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| io_err(dir, e))?;
    let mut out = Vec::new();
    for entry in rd {
        let p = entry.map_err(|e| io_err(dir, e))?.path();
        if !is_hidden(&p) && keep(&p) {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

fn has_image_extension(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The image files of a class directory, sorted. A directory whose name ends in `.png` is
/// skipped; any other entry with an image extension must be a regular file of at most
/// [`MAX_IMAGE_FILE_BYTES`], checked here before any image is opened: a FIFO would block
/// the decoder forever, and skipping one silently would drop an image without a word.
fn images_of(class_dir: &Path) -> Result<Vec<PathBuf>> {
    let candidates = list(class_dir, |p| has_image_extension(p) && !p.is_dir())?;
    for p in &candidates {
        let len = regular_file_len(p)?;
        if len > MAX_IMAGE_FILE_BYTES {
            return Err(data_err(
                p,
                format!(
                    "is {}, more than an image file may be ({}, the image decoder's memory limit)",
                    fmt_bytes(len),
                    fmt_bytes(MAX_IMAGE_FILE_BYTES)
                ),
            ));
        }
    }
    Ok(candidates)
}

/// The raw name of a directory: the identity of a class. Two names that are not UTF-8 may
/// read the same once made lossy (both `a\u{fffd}`), yet be two classes.
fn raw_name(p: &Path) -> OsString {
    p.file_name().map(OsStr::to_os_string).unwrap_or_default()
}

/// A name for people: the UTF-8 parts as they are, every byte that is not UTF-8 as `\xNN`,
/// so names that differ only there still read differently (`a\xfe`, `a\xff`).
fn display_name(name: &OsStr) -> String {
    let mut out = String::new();
    for chunk in name.as_encoded_bytes().utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// Class directories of a split directory, sorted by raw name: `(raw names, display names)`.
fn classes_of(dir: &Path) -> Result<(Vec<OsString>, Vec<String>)> {
    let raw: Vec<OsString> = list(dir, |p| p.is_dir())?.iter().map(|p| raw_name(p)).collect();
    if raw.is_empty() {
        return Err(data_err(dir, "no class directories: expected <class_name>/*.png|jpg|jpeg inside"));
    }
    let shown = raw.iter().map(|n| display_name(n)).collect();
    Ok((raw, shown))
}

/// Decodes one image, resizes it to `h x w` RGB and writes it CHW into `out`
/// (`3 * h * w` bytes); returns whether the source was grayscale.
fn decode_into(path: &Path, h: u32, w: u32, out: &mut [u8]) -> Result<bool> {
    // Checked again on the open file: the path may have been replaced since it was listed.
    let (file, _) = open_regular(path)?;
    let reader = ImageReader::new(std::io::BufReader::new(file));
    let reader = reader.with_guessed_format().map_err(|e| io_err(path, e))?;
    let img = reader.decode().map_err(|e| data_err(path, format!("cannot decode image: {e}")))?;
    let gray = !img.color().has_color();
    let rgb = img.to_rgb8();
    drop(img);
    let rgb = if rgb.dimensions() == (w, h) { rgb } else { imageops::resize(&rgb, w, h, FilterType::Triangle) };
    // HWC RGB to CHW.
    let plane = h as usize * w as usize;
    for (k, px) in rgb.as_raw().chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + k] = px[c];
        }
    }
    Ok(gray)
}

/// Decodes one image file for a model that takes `channels x h x w` inputs (1: grayscale,
/// luma of a colour image; 3: RGB), resized as folder datasets are, CHW bytes. For
/// `featreplay predict --images`.
pub fn decode_image(path: &Path, channels: usize, h: u32, w: u32) -> Result<Vec<u8>> {
    if channels != 1 && channels != 3 {
        return Err(data_err(path, format!("images for a model of {channels} input channels: only 1 or 3 are read")));
    }
    let (file, len) = open_regular(path)?;
    if len > MAX_IMAGE_FILE_BYTES {
        return Err(data_err(path, format!("is {len} bytes, more than an image file may be ({MAX_IMAGE_FILE_BYTES})")));
    }
    let reader = ImageReader::new(std::io::BufReader::new(file)).with_guessed_format().map_err(|e| io_err(path, e))?;
    let img = reader.decode().map_err(|e| data_err(path, format!("cannot decode image: {e}")))?;
    let plane = h as usize * w as usize;
    if channels == 1 {
        let luma = img.to_luma8();
        let luma = if luma.dimensions() == (w, h) { luma } else { imageops::resize(&luma, w, h, FilterType::Triangle) };
        return Ok(luma.into_raw());
    }
    let mut out = vec![0u8; 3 * plane];
    let rgb = img.to_rgb8();
    let rgb = if rgb.dimensions() == (w, h) { rgb } else { imageops::resize(&rgb, w, h, FilterType::Triangle) };
    for (k, px) in rgb.as_raw().chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + k] = px[c];
        }
    }
    Ok(out)
}

/// Decodes all `files` on up to `available_parallelism` threads into `out` (`3 * h * w`
/// bytes per file, CHW, in order); returns which sources were grayscale.
fn decode_all(files: &[PathBuf], h: u32, w: u32, out: &mut [u8]) -> Result<Vec<bool>> {
    let per = 3 * h as usize * w as usize;
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(files.len().max(1));
    let chunk = files.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = files
            .chunks(chunk)
            .zip(out.chunks_mut(chunk * per))
            .map(|(part, dst)| {
                s.spawn(move || {
                    part.iter()
                        .zip(dst.chunks_exact_mut(per))
                        .map(|(p, img)| decode_into(p, h, w, img))
                        .collect::<Result<Vec<bool>>>()
                })
            })
            .collect();
        let mut gray = Vec::with_capacity(files.len());
        for handle in handles {
            match handle.join() {
                Ok(r) => gray.extend(r?),
                Err(p) => std::panic::resume_unwind(p),
            }
        }
        Ok(gray)
    })
}

/// Loads one split of an image folder (see the module doc), resized to `height x width`,
/// with the default host-memory limit (see [`load_folder_limited`]).
pub fn load_folder(root: &Path, split: Split, height: u32, width: u32) -> Result<Dataset> {
    load_folder_limited(root, split, height, width, default_max_host_bytes())
}

/// Loads one split of an image folder, resized to `height x width` (each `1..=`
/// [`MAX_IMAGE_SIZE`]). Its decoded pixels, `files x 3 x height x width` bytes (RGB while
/// decoding; kept as 1 channel if every image is grayscale), may take at most
/// `max_host_bytes`: checked from the number of files before any image is decoded.
pub fn load_folder_limited(root: &Path, split: Split, height: u32, width: u32, max_host_bytes: u64) -> Result<Dataset> {
    if !(1..=MAX_IMAGE_SIZE).contains(&height) || !(1..=MAX_IMAGE_SIZE).contains(&width) {
        return Err(data_err(
            root,
            format!("image size {height}x{width}: each side must be 1 to {MAX_IMAGE_SIZE} pixels"),
        ));
    }
    if !root.is_dir() {
        return Err(io_err(root, std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory")));
    }
    let train_dir = root.join("train");
    let ((classes, class_names), dir) = if train_dir.is_dir() {
        let classes = classes_of(&train_dir)?;
        let dir = match split {
            Split::Train => train_dir,
            Split::Test => ["test", "val"]
                .iter()
                .map(|d| root.join(d))
                .find(|d| d.is_dir())
                .ok_or_else(|| data_err(root, "has train/ but neither test/ nor val/: no test split"))?,
        };
        (classes, dir)
    } else {
        if split == Split::Test {
            return Err(data_err(
                root,
                "no test split: expected root/train/<class>/ and root/test/<class>/ (or val/); \
                 hold samples out of the training split instead",
            ));
        }
        (classes_of(root)?, root.to_path_buf())
    };

    // Class directories of this split; each must be a known class, matched by raw name.
    let mut files = Vec::new();
    let mut labels = Vec::new();
    for class_dir in list(&dir, |p| p.is_dir())? {
        let name = raw_name(&class_dir);
        let Some(label) = classes.iter().position(|c| *c == name) else {
            return Err(data_err(
                &class_dir,
                format!(
                    "class '{}' is not among the training classes ({})",
                    display_name(&name),
                    class_names.join(", ")
                ),
            ));
        };
        let images = images_of(&class_dir)?;
        if images.is_empty() && split == Split::Train {
            return Err(data_err(&class_dir, "class directory holds no .png/.jpg/.jpeg image"));
        }
        labels.extend(std::iter::repeat_n(label as u32, images.len()));
        files.extend(images);
    }
    if files.is_empty() {
        return Err(data_err(&dir, "no .png/.jpg/.jpeg images in the class directories"));
    }

    // The whole split is decoded into one RGB buffer, so this is the peak it takes.
    let (h, w) = (height as usize, width as usize);
    let needed = (files.len() as u64).checked_mul(3 * height as u64 * width as u64);
    let what = format!("the {} images of 3x{height}x{width} of the {split} split", files.len());
    check_host_bytes(&dir, &what, needed, max_host_bytes)?;
    let mut pixels = alloc_zeroed(needed.unwrap_or(0), &dir)?;
    let gray = decode_all(&files, height, width, &mut pixels)?;
    let channels = if gray.iter().all(|&g| g) {
        // For grayscale sources R = G = B: keep the red plane of each image, moved down in
        // place (image i's plane goes to i * plane, never past where it was read from).
        let plane = h * w;
        for i in 0..files.len() {
            pixels.copy_within(3 * i * plane..(3 * i + 1) * plane, i * plane);
        }
        pixels.truncate(files.len() * plane);
        pixels.shrink_to_fit();
        1
    } else {
        3
    };
    let name = format!("folder:{}-{split}", root.file_name().map(display_name).unwrap_or_default());
    let num_classes = classes.len();
    Dataset::new(name, pixels, labels, channels, h, w, num_classes, Some(class_names))
}
