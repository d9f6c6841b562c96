//! CIFAR-10 and CIFAR-100, binary version (<https://www.cs.toronto.edu/~kriz/cifar.html>).
//!
//! CIFAR-10: `data_batch_1.bin` .. `data_batch_5.bin` (training) and `test_batch.bin`, each
//! 10000 records of 1 label byte and 3072 pixel bytes (1024 red, 1024 green, 1024 blue,
//! row-major 32x32), i.e. already channel-planar. CIFAR-100: `train.bin` (50000 records) and
//! `test.bin` (10000), each record a coarse label byte, a fine label byte and 3072 pixel
//! bytes; featreplay uses the fine label (100 classes), as the paper does.

use std::path::{Path, PathBuf};

use crate::data::{data_err, io_err, read_file, Dataset, Split};
use crate::error::Result;

/// CIFAR-10's class names, by label.
pub const CIFAR10_CLASSES: [&str; 10] =
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];

/// Pixel bytes per image (3 x 32 x 32).
pub const CIFAR_IMAGE_BYTES: usize = 3 * 32 * 32;

/// The CIFAR-10 training files, in order.
pub const CIFAR10_TRAIN_FILES: [&str; 5] =
    ["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"];
/// The CIFAR-10 test file.
pub const CIFAR10_TEST_FILE: &str = "test_batch.bin";

/// Which CIFAR and what its files look like.
struct Format {
    name: &'static str,
    subdir: &'static str,
    train: &'static [&'static str],
    test: &'static [&'static str],
    /// Label bytes before the pixels; the last one is the label used.
    label_bytes: usize,
    /// Range of each label byte.
    label_ranges: &'static [u32],
    /// Records in a standard file of the split (for error messages).
    train_records: usize,
    test_records: usize,
}

const CIFAR10: Format = Format {
    name: "CIFAR-10",
    subdir: "cifar-10-batches-bin",
    train: &CIFAR10_TRAIN_FILES,
    test: &[CIFAR10_TEST_FILE],
    label_bytes: 1,
    label_ranges: &[10],
    train_records: 10000,
    test_records: 10000,
};

const CIFAR100: Format = Format {
    name: "CIFAR-100",
    subdir: "cifar-100-binary",
    train: &["train.bin"],
    test: &["test.bin"],
    label_bytes: 2,
    label_ranges: &[20, 100],
    train_records: 50000,
    test_records: 10000,
};

/// Loads CIFAR-10. `path` is the directory holding the `.bin` files or its parent
/// containing `cifar-10-batches-bin`. Class names come from `batches.meta.txt` if present.
pub fn load_cifar10(path: &Path, split: Split) -> Result<Dataset> {
    let dir = resolve(path, &CIFAR10)?;
    let (images, labels) = read_split(&dir, &CIFAR10, split)?;
    let names = read_names(&dir.join("batches.meta.txt"), 10)
        .unwrap_or_else(|| CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect());
    Dataset::new(format!("cifar10-{split}"), images, labels, 3, 32, 32, 10, Some(names))
}

/// Loads CIFAR-100 with its fine labels (100 classes). `path` is the directory holding
/// `train.bin` / `test.bin` or its parent containing `cifar-100-binary`. Class names come
/// from `fine_label_names.txt` if present.
pub fn load_cifar100(path: &Path, split: Split) -> Result<Dataset> {
    let dir = resolve(path, &CIFAR100)?;
    let (images, labels) = read_split(&dir, &CIFAR100, split)?;
    let names = read_names(&dir.join("fine_label_names.txt"), 100);
    Dataset::new(format!("cifar100-{split}"), images, labels, 3, 32, 32, 100, names)
}

/// The directory holding the files: `path` itself or `path/<subdir>`.
fn resolve(path: &Path, f: &Format) -> Result<PathBuf> {
    let has_files = |d: &Path| f.train.iter().chain(f.test).any(|name| d.join(name).is_file());
    if has_files(path) {
        return Ok(path.to_path_buf());
    }
    let sub = path.join(f.subdir);
    if has_files(&sub) {
        return Ok(sub);
    }
    if !path.exists() {
        return Err(io_err(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory")));
    }
    let mut names: Vec<&str> = f.train.to_vec();
    names.extend_from_slice(f.test);
    Err(data_err(
        path,
        format!(
            "no {} binary files here: expected {} in this directory or in {}/ inside it",
            f.name,
            names.join(", "),
            f.subdir
        ),
    ))
}

fn read_split(dir: &Path, f: &Format, split: Split) -> Result<(Vec<u8>, Vec<u32>)> {
    let (files, std_records) = match split {
        Split::Train => (f.train, f.train_records),
        Split::Test => (f.test, f.test_records),
    };
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for name in files {
        let path = dir.join(name);
        let bytes = read_file(&path)?;
        parse_records(&bytes, f, std_records, &path, &mut images, &mut labels)?;
    }
    Ok((images, labels))
}

/// Appends the records of one file to `images` / `labels`, checking its length and labels.
fn parse_records(
    bytes: &[u8],
    f: &Format,
    std_records: usize,
    path: &Path,
    images: &mut Vec<u8>,
    labels: &mut Vec<u32>,
) -> Result<()> {
    let rec = f.label_bytes + CIFAR_IMAGE_BYTES;
    if bytes.is_empty() || !bytes.len().is_multiple_of(rec) {
        return Err(data_err(
            path,
            format!(
                "{}: {} bytes, expected {} ({} records of {rec}) or another whole number of {rec}-byte {} records",
                if bytes.is_empty() { "empty" } else { "truncated" },
                bytes.len(),
                std_records * rec,
                std_records,
                f.name
            ),
        ));
    }
    let n = bytes.len() / rec;
    images.reserve(n * CIFAR_IMAGE_BYTES);
    labels.reserve(n);
    for (i, r) in bytes.chunks_exact(rec).enumerate() {
        for (k, &range) in f.label_ranges.iter().enumerate() {
            if r[k] as u32 >= range {
                let which = match (f.label_bytes, k) {
                    (2, 0) => "coarse label",
                    (2, _) => "fine label",
                    _ => "label",
                };
                return Err(data_err(
                    path,
                    format!("record {i}: {which} {} out of range (expected 0..{range}) - not a {} file?", r[k], f.name),
                ));
            }
        }
        labels.push(r[f.label_bytes - 1] as u32);
        images.extend_from_slice(&r[f.label_bytes..]);
    }
    Ok(())
}

/// One class name a line, if the file is there and has exactly `n` non-empty lines.
fn read_names(path: &Path, n: usize) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(path).ok()?;
    let names: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    (names.len() == n).then_some(names)
}
