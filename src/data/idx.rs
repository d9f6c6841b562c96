//! IDX files (<http://yann.lecun.com/exdb/mnist/>), plain or gzip, and the MNIST and
//! Fashion-MNIST datasets stored in them.
//!
//! An IDX file is a magic number `00 00 TT DD` (TT the element type, 0x08 for unsigned
//! bytes, DD the number of dimensions), DD big-endian u32 dimensions, then the elements
//! row-major. Images are `N x H x W`, labels `N`. Gzip is recognised by its magic bytes, not
//! by the file name.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;

use crate::data::{data_err, io_err, read_file, Dataset, Split};
use crate::error::Result;

/// Where Debian's `dataset-fashion-mnist` package puts the four `.gz` files.
pub const DEBIAN_FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

/// Fashion-MNIST's class names, by label.
pub const FASHION_MNIST_CLASSES: [&str; 10] =
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];

/// The element type code of unsigned bytes, the only one featreplay reads.
const TYPE_U8: u8 = 0x08;

/// An IDX array of unsigned bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxArray {
    /// Dimensions, outermost first.
    pub dims: Vec<usize>,
    /// Elements, row-major.
    pub data: Vec<u8>,
}

/// Decompresses `bytes` if they start with the gzip magic `1f 8b`; `path` is for errors.
pub fn maybe_gunzip(bytes: Vec<u8>, path: &Path) -> Result<Vec<u8>> {
    if bytes.len() >= 2 && bytes[0] == 0x1f && bytes[1] == 0x8b {
        let mut out = Vec::with_capacity(bytes.len() * 2);
        GzDecoder::new(&bytes[..]).read_to_end(&mut out).map_err(|e| {
            data_err(path, format!("corrupt or truncated gzip data ({} bytes compressed): {e}", bytes.len()))
        })?;
        Ok(out)
    } else {
        Ok(bytes)
    }
}

/// Parses an IDX file of unsigned bytes held in memory (gzip or not). `path` names the
/// file in errors. Checks the magic number, the type, and that the length is exactly the
/// header plus the product of the dimensions.
pub fn parse_idx(bytes: Vec<u8>, path: &Path) -> Result<IdxArray> {
    let bytes = maybe_gunzip(bytes, path)?;
    if bytes.len() < 4 {
        return Err(data_err(
            path,
            format!("truncated: {} bytes, shorter than the 4-byte IDX magic number", bytes.len()),
        ));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(data_err(
            path,
            format!(
                "bad magic number {:02x} {:02x} {:02x} {:02x}: not an IDX file (expected 00 00 08 <dims>)",
                bytes[0], bytes[1], bytes[2], bytes[3]
            ),
        ));
    }
    if bytes[2] != TYPE_U8 {
        return Err(data_err(
            path,
            format!("IDX element type 0x{:02x} is not supported (only 0x08, unsigned bytes)", bytes[2]),
        ));
    }
    let nd = bytes[3] as usize;
    if nd == 0 {
        return Err(data_err(path, "IDX file with zero dimensions"));
    }
    let header = 4 + 4 * nd;
    if bytes.len() < header {
        return Err(data_err(
            path,
            format!(
                "truncated: {} bytes, shorter than the {header}-byte header of a {nd}-dimensional IDX file",
                bytes.len()
            ),
        ));
    }
    let dims: Vec<usize> =
        bytes[4..header].chunks_exact(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize).collect();
    let dims_text = dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x");
    let count = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let expected = count.and_then(|c| c.checked_add(header));
    if expected != Some(bytes.len()) {
        let what = if expected.is_none_or(|e| bytes.len() < e) { "truncated" } else { "trailing data" };
        return Err(data_err(
            path,
            format!(
                "{what}: {} bytes, expected {} (a {header}-byte header and {dims_text} bytes)",
                bytes.len(),
                expected.map(|e| e.to_string()).unwrap_or_else(|| "more than fits in memory".into())
            ),
        ));
    }
    let mut data = bytes;
    data.drain(..header);
    Ok(IdxArray { dims, data })
}

/// Reads an IDX file of unsigned bytes, plain or gzip.
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    parse_idx(read_file(path)?, path)
}

/// Encodes an IDX file of unsigned bytes, gzip-compressed (best compression, mtime 0, so
/// the output is a fixed function of the input) if `gzip`. Errors if `data` does not hold
/// the product of `dims`, or there are more than 255 dimensions or a dimension over u32.
pub fn encode_idx(dims: &[usize], data: &[u8], gzip: bool) -> Result<Vec<u8>> {
    let count = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if dims.is_empty() || dims.len() > 255 || dims.iter().any(|&d| d > u32::MAX as usize) || count != Some(data.len()) {
        return Err(crate::error::Error::ShapeMismatch {
            op: "encode_idx",
            detail: format!("{} bytes for dimensions {dims:?}", data.len()),
        });
    }
    let mut raw = Vec::with_capacity(4 + 4 * dims.len() + data.len());
    raw.extend_from_slice(&[0, 0, TYPE_U8, dims.len() as u8]);
    for &d in dims {
        raw.extend_from_slice(&(d as u32).to_be_bytes());
    }
    raw.extend_from_slice(data);
    if !gzip {
        return Ok(raw);
    }
    let mut enc = GzEncoder::new(Vec::new(), Compression::best());
    // Writing to a Vec cannot fail.
    enc.write_all(&raw)
        .and_then(|_| enc.finish())
        .map_err(|e| crate::error::Error::Io { path: "<gzip in memory>".into(), source: e })
}

/// Writes an IDX file (see [`encode_idx`]).
pub fn write_idx(path: &Path, dims: &[usize], data: &[u8], gzip: bool) -> Result<()> {
    let bytes = encode_idx(dims, data, gzip)?;
    std::fs::write(path, bytes).map_err(|e| io_err(path, e))
}

/// A dataset from an images IDX array (`N x H x W`) and a labels IDX array (`N`), checking
/// their shapes, that their counts agree and every label is `< num_classes`. The paths name
/// the files in errors.
#[allow(clippy::too_many_arguments)]
pub fn dataset_from_idx(
    name: impl Into<String>,
    images: IdxArray,
    images_path: &Path,
    labels: IdxArray,
    labels_path: &Path,
    num_classes: usize,
    class_names: Option<Vec<String>>,
) -> Result<Dataset> {
    if images.dims.len() != 3 {
        return Err(data_err(
            images_path,
            format!("an images file must have 3 dimensions (N x H x W), this one has {:?}", images.dims),
        ));
    }
    if labels.dims.len() != 1 {
        return Err(data_err(
            labels_path,
            format!("a labels file must have 1 dimension, this one has {:?}", labels.dims),
        ));
    }
    let (n, h, w) = (images.dims[0], images.dims[1], images.dims[2]);
    if h == 0 || w == 0 {
        return Err(data_err(images_path, format!("images of size {h}x{w}")));
    }
    if labels.dims[0] != n {
        return Err(data_err(
            labels_path,
            format!("{} labels but {} holds {n} images", labels.dims[0], images_path.display()),
        ));
    }
    if let Some((i, &l)) = labels.data.iter().enumerate().find(|(_, &l)| l as usize >= num_classes) {
        return Err(data_err(labels_path, format!("label {l} of sample {i} out of range (expected 0..{num_classes})")));
    }
    let labels: Vec<u32> = labels.data.iter().map(|&l| l as u32).collect();
    Dataset::new(name, images.data, labels, 1, h, w, num_classes, class_names)
}

/// Reads an images file and a labels file (each plain or gzip) into a dataset.
pub fn load_idx_pair(
    images_path: &Path,
    labels_path: &Path,
    name: impl Into<String>,
    num_classes: usize,
    class_names: Option<Vec<String>>,
) -> Result<Dataset> {
    let images = read_idx(images_path)?;
    let labels = read_idx(labels_path)?;
    dataset_from_idx(name, images, images_path, labels, labels_path, num_classes, class_names)
}

/// Subdirectories where the files may also be (torchvision's layouts among them).
const SUBDIRS: [&str; 9] = [
    "raw",
    "FashionMNIST/raw",
    "fashion-mnist",
    "fashion_mnist",
    "FashionMNIST",
    "MNIST/raw",
    "mnist",
    "MNIST",
    "data/fashion",
];

/// Finds `<prefix>-<kind>-idx<d>-ubyte[.gz]` (or `<prefix>-<kind>.idx<d>-ubyte[.gz]`) in `dir`
/// or one of [`SUBDIRS`].
fn find_idx(dir: &Path, prefix: &str, kind: &str, d: u8) -> Result<PathBuf> {
    let names = [
        format!("{prefix}-{kind}-idx{d}-ubyte"),
        format!("{prefix}-{kind}-idx{d}-ubyte.gz"),
        format!("{prefix}-{kind}.idx{d}-ubyte"),
        format!("{prefix}-{kind}.idx{d}-ubyte.gz"),
    ];
    let dirs = std::iter::once(dir.to_path_buf()).chain(SUBDIRS.iter().map(|s| dir.join(s)));
    for d in dirs {
        for n in &names {
            let p = d.join(n);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    if !dir.is_dir() {
        return Err(io_err(dir, std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory")));
    }
    Err(data_err(
        dir,
        format!(
            "{}[.gz] not found in this directory (nor in raw/ or FashionMNIST/raw/ or MNIST/raw/ inside it)",
            names[0]
        ),
    ))
}

/// Loads the split of an MNIST-like dataset from a directory holding
/// `train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`, `t10k-images-idx3-ubyte[.gz]`
/// and `t10k-labels-idx1-ubyte[.gz]` (or in `raw/`, `MNIST/raw/`, `FashionMNIST/raw/` inside it).
pub fn load_idx_dir(
    dir: &Path,
    split: Split,
    name: &str,
    num_classes: usize,
    class_names: Option<Vec<String>>,
) -> Result<Dataset> {
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    let images = find_idx(dir, prefix, "images", 3)?;
    let labels = find_idx(dir, prefix, "labels", 1)?;
    load_idx_pair(&images, &labels, format!("{name}-{split}"), num_classes, class_names)
}

/// Loads MNIST (10 classes, `"0"` .. `"9"`) from a directory (see [`load_idx_dir`]).
pub fn load_mnist(dir: &Path, split: Split) -> Result<Dataset> {
    let names = (0..10).map(|d| d.to_string()).collect();
    load_idx_dir(dir, split, "mnist", 10, Some(names))
}

/// Loads Fashion-MNIST (10 classes) from a directory (see [`load_idx_dir`]), e.g.
/// [`DEBIAN_FASHION_MNIST`].
pub fn load_fashion_mnist(dir: &Path, split: Split) -> Result<Dataset> {
    let names = FASHION_MNIST_CLASSES.iter().map(|s| s.to_string()).collect();
    load_idx_dir(dir, split, "fashion-mnist", 10, Some(names))
}
