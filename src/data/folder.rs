//! Image folders: `root/<class_name>/*.png|jpg|jpeg`, one directory per class, classes
//! sorted by name (label = position), files sorted by name within a class.
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
//! not decode is an error naming the file. Decoding runs on all cores.

use std::path::{Path, PathBuf};

use image::imageops::{self, FilterType};
use image::ImageReader;

use crate::data::{data_err, io_err, Dataset, Split};
use crate::error::{Error, Result};

/// Extensions (lower case) of the files read as images.
pub const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

fn is_hidden(p: &Path) -> bool {
    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'))
}

/// The sorted, non-hidden entries of `dir` that satisfy `keep`.
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

fn is_image(p: &Path) -> bool {
    p.is_file()
        && p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn dir_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Class names of a split directory: its subdirectories, sorted.
fn classes_of(dir: &Path) -> Result<Vec<String>> {
    let classes: Vec<String> = list(dir, |p| p.is_dir())?.iter().map(|p| dir_name(p)).collect();
    if classes.is_empty() {
        return Err(data_err(dir, "no class directories: expected <class_name>/*.png|jpg|jpeg inside"));
    }
    Ok(classes)
}

/// Decodes one image and resizes it to `h x w` RGB; returns the pixels HWC and whether
/// the source was grayscale.
fn decode(path: &Path, h: u32, w: u32) -> Result<(Vec<u8>, bool)> {
    let reader = ImageReader::open(path).map_err(|e| io_err(path, e))?;
    let reader = reader.with_guessed_format().map_err(|e| io_err(path, e))?;
    let img = reader.decode().map_err(|e| data_err(path, format!("cannot decode image: {e}")))?;
    let gray = !img.color().has_color();
    let rgb = img.to_rgb8();
    let rgb = if rgb.dimensions() == (w, h) { rgb } else { imageops::resize(&rgb, w, h, FilterType::Triangle) };
    Ok((rgb.into_raw(), gray))
}

/// Decodes all `files` on up to `available_parallelism` threads, in order.
fn decode_all(files: &[PathBuf], h: u32, w: u32) -> Result<Vec<(Vec<u8>, bool)>> {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(files.len().max(1));
    let chunk = files.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = files
            .chunks(chunk)
            .map(|part| s.spawn(move || part.iter().map(|p| decode(p, h, w)).collect::<Result<Vec<_>>>()))
            .collect();
        let mut out = Vec::with_capacity(files.len());
        for handle in handles {
            match handle.join() {
                Ok(r) => out.extend(r?),
                Err(p) => std::panic::resume_unwind(p),
            }
        }
        Ok(out)
    })
}

/// Loads one split of an image folder (see the module doc), resized to `height x width`.
pub fn load_folder(root: &Path, split: Split, height: u32, width: u32) -> Result<Dataset> {
    if height == 0 || width == 0 {
        return Err(Error::Unsupported { op: "load_folder", detail: format!("image size {height}x{width}") });
    }
    if !root.is_dir() {
        return Err(io_err(root, std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory")));
    }
    let train_dir = root.join("train");
    let (classes, dir) = if train_dir.is_dir() {
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

    // Class directories of this split; each must be a known class.
    let mut files = Vec::new();
    let mut labels = Vec::new();
    for class_dir in list(&dir, |p| p.is_dir())? {
        let name = dir_name(&class_dir);
        let Some(label) = classes.iter().position(|c| *c == name) else {
            return Err(data_err(
                &class_dir,
                format!("class '{name}' is not among the training classes ({})", classes.join(", ")),
            ));
        };
        let images = list(&class_dir, is_image)?;
        if images.is_empty() && split == Split::Train {
            return Err(data_err(&class_dir, "class directory holds no .png/.jpg/.jpeg image"));
        }
        labels.extend(std::iter::repeat_n(label as u32, images.len()));
        files.extend(images);
    }
    if files.is_empty() {
        return Err(data_err(&dir, "no .png/.jpg/.jpeg images in the class directories"));
    }

    let decoded = decode_all(&files, height, width)?;
    let gray = decoded.iter().all(|(_, g)| *g);
    let (h, w) = (height as usize, width as usize);
    let channels = if gray { 1 } else { 3 };
    let mut pixels = Vec::with_capacity(files.len() * channels * h * w);
    for (hwc, _) in &decoded {
        // HWC RGB to CHW (for grayscale sources R = G = B, so the red plane is the image).
        for c in 0..channels {
            pixels.extend(hwc.iter().skip(c).step_by(3));
        }
    }
    let name = format!("folder:{}-{split}", dir_name(root));
    let num_classes = classes.len();
    Dataset::new(name, pixels, labels, channels, h, w, num_classes, Some(classes))
}
