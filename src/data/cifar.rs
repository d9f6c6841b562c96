//! CIFAR-10 and CIFAR-100, binary version (<https://www.cs.toronto.edu/~kriz/cifar.html>).
//!
//! CIFAR-10: `data_batch_1.bin` .. `data_batch_5.bin` (training) and `test_batch.bin`, each
//! 10000 records of 1 label byte and 3072 pixel bytes (1024 red, 1024 green, 1024 blue,
//! row-major 32x32), i.e. already channel-planar. CIFAR-100: `train.bin` (50000 records) and
//! `test.bin` (10000), each record a coarse label byte, a fine label byte and 3072 pixel
//! bytes; featreplay uses the fine label (100 classes), as the paper does.

use std::path::{Path, PathBuf};

use crate::data::{
    check_host_bytes, data_err, default_max_host_bytes, fmt_bytes, io_err, read_file, regular_file_len, Dataset, Split,
};
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
/// The host-memory limit is [`default_max_host_bytes`] (see [`load_cifar10_limited`]).
pub fn load_cifar10(path: &Path, split: Split) -> Result<Dataset> {
    load_cifar10_limited(path, split, default_max_host_bytes())
}

/// [`load_cifar10`] whose pixels may take at most `max_host_bytes`, checked from the file
/// sizes before any file is read.
pub fn load_cifar10_limited(path: &Path, split: Split, max_host_bytes: u64) -> Result<Dataset> {
    let dir = resolve(path, &CIFAR10)?;
    let (images, labels) = read_split(&dir, &CIFAR10, split, max_host_bytes)?;
    let names = read_names(&dir.join("batches.meta.txt"), 10)?
        .unwrap_or_else(|| CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect());
    Dataset::new(format!("cifar10-{split}"), images, labels, 3, 32, 32, 10, Some(names))
}

/// Loads CIFAR-100 with its fine labels (100 classes). `path` is the directory holding
/// `train.bin` / `test.bin` or its parent containing `cifar-100-binary`. Class names come
/// from `fine_label_names.txt` if present. The host-memory limit is
/// [`default_max_host_bytes`] (see [`load_cifar100_limited`]).
pub fn load_cifar100(path: &Path, split: Split) -> Result<Dataset> {
    load_cifar100_limited(path, split, default_max_host_bytes())
}

/// [`load_cifar100`] whose pixels may take at most `max_host_bytes`, checked from the file
/// sizes before any file is read.
pub fn load_cifar100_limited(path: &Path, split: Split, max_host_bytes: u64) -> Result<Dataset> {
    let dir = resolve(path, &CIFAR100)?;
    let (images, labels) = read_split(&dir, &CIFAR100, split, max_host_bytes)?;
    let names = read_names(&dir.join("fine_label_names.txt"), 100)?;
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

/// The size of a CIFAR file, checked from its metadata (so before it is read) to be a
/// regular file of a nonzero whole number of records.
fn record_file_len(path: &Path, f: &Format, std_records: usize) -> Result<u64> {
    let len = regular_file_len(path)?;
    let rec = (f.label_bytes + CIFAR_IMAGE_BYTES) as u64;
    if len == 0 || len % rec != 0 {
        return Err(length_err(path, len, f, std_records));
    }
    Ok(len)
}

/// The error for a file whose length is not a nonzero whole number of records.
fn length_err(path: &Path, len: u64, f: &Format, std_records: usize) -> crate::error::Error {
    let rec = f.label_bytes + CIFAR_IMAGE_BYTES;
    data_err(
        path,
        format!(
            "{}: {len} bytes, expected {} ({std_records} records of {rec}) or another whole number of {rec}-byte {} records",
            if len == 0 { "empty" } else { "truncated" },
            std_records * rec,
            f.name
        ),
    )
}

fn read_split(dir: &Path, f: &Format, split: Split, max_host_bytes: u64) -> Result<(Vec<u8>, Vec<u32>)> {
    let (files, std_records) = match split {
        Split::Train => (f.train, f.train_records),
        Split::Test => (f.test, f.test_records),
    };
    let rec = (f.label_bytes + CIFAR_IMAGE_BYTES) as u64;
    // Every file's size first: the split's decoded size is known from them, and is
    // refused before a single file is read.
    let mut records = 0u64;
    for name in files {
        records += record_file_len(&dir.join(name), f, std_records)? / rec;
    }
    let what = format!("the {records} {} images of 3x32x32 of the {split} split", f.name);
    let needed = records.checked_mul(CIFAR_IMAGE_BYTES as u64);
    // Named after the file when there is one, the directory otherwise.
    let named = if files.len() == 1 { dir.join(files[0]) } else { dir.to_path_buf() };
    check_host_bytes(&named, &what, needed, max_host_bytes)?;
    let mut images = Vec::new();
    images.try_reserve_exact(needed.unwrap_or(0) as usize).map_err(|_| {
        data_err(&named, format!("cannot allocate {} of host memory for {what}", fmt_bytes(needed.unwrap_or(0))))
    })?;
    let mut labels = Vec::with_capacity(records as usize);
    for name in files {
        let path = dir.join(name);
        // The largest file the limit allows; its size was checked above, this only guards
        // against it growing meanwhile.
        let max_len = (max_host_bytes / CIFAR_IMAGE_BYTES as u64).saturating_mul(rec);
        let bytes = read_file(&path, max_len, &format!("a {} file within the host-memory limit", f.name))?;
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
    // Checked again on the bytes read: the file may have changed since its size was.
    if bytes.is_empty() || !bytes.len().is_multiple_of(rec) {
        return Err(length_err(path, bytes.len() as u64, f, std_records));
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

/// The largest class-names file read: 100 names of a few dozen bytes take 1 KiB.
const MAX_NAMES_BYTES: u64 = 1 << 20;

/// One class name a line, if the file is there and has exactly `n` non-empty lines
/// (`Ok(None)` otherwise: the names are optional). A path that is there but is not a
/// regular file, or is larger than [`MAX_NAMES_BYTES`], is an error: reading a FIFO would
/// block forever.
fn read_names(path: &Path, n: usize) -> Result<Option<Vec<String>>> {
    // Missing (or a dangling symlink): no names, as before.
    if std::fs::metadata(path).is_err() {
        return Ok(None);
    }
    let bytes = read_file(path, MAX_NAMES_BYTES, "a class-names file")?;
    let Ok(text) = String::from_utf8(bytes) else { return Ok(None) };
    let names: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    Ok((names.len() == n).then_some(names))
}
