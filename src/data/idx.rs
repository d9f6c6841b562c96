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

use crate::data::{
    alloc_zeroed, check_host_bytes, data_err, default_max_host_bytes, fmt_bytes, io_err, open_regular,
    regular_file_len, Dataset, Split,
};
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

/// The most dimensions an IDX header can declare (its 4th byte).
const MAX_DIMS: usize = 255;

/// The longest IDX header: the magic number and [`MAX_DIMS`] dimensions.
const MAX_HEADER: u64 = 4 + 4 * MAX_DIMS as u64;

/// How many dimensions an error message lists before "... and N more": a 255-dimension
/// header would otherwise make a message of thousands of characters.
const SHOWN_DIMS: usize = 8;

/// `dims` as `60000x28x28`, at most [`SHOWN_DIMS`] of them (`1x2x3x4x5x6x7x8 ... and 247
/// more`).
fn fmt_dims(dims: &[usize]) -> String {
    let shown: Vec<String> = dims.iter().take(SHOWN_DIMS).map(|d| d.to_string()).collect();
    let mut text = shown.join("x");
    if dims.len() > SHOWN_DIMS {
        text.push_str(&format!(" ... and {} more", dims.len() - SHOWN_DIMS));
    }
    text
}

/// What an IDX file is read as, for the dimension check made right after the magic number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Any number of dimensions (1 to 255).
    Any,
    /// An images file, `N x H x W`.
    Images,
    /// A labels file, `N`.
    Labels,
}

/// Reads up to `buf.len()` bytes, fewer only at the end of the stream.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// The largest file (plain or gzip) that can hold an IDX array of at most `max_data`
/// bytes: the longest header plus the data, plus, for gzip, deflate's worst-case growth
/// (5 bytes per 64 KiB stored block) and a generous allowance for the gzip header's
/// optional name, comment and extra fields.
fn max_idx_file_len(max_data: u64) -> u64 {
    MAX_HEADER.saturating_add(max_data).saturating_add(max_data / 8192).saturating_add(1 << 20)
}

/// Reads an IDX array of unsigned bytes from `source`, gzip or not (told by the first two
/// bytes). `source_len` is the size of the file (compressed, for gzip). Streams: it reads
/// the magic number and the dimensions first, refuses a header whose data would exceed
/// `max_data` bytes, then reads exactly the declared data and one byte more to detect
/// trailing data, so a small gzip file that expands to gigabytes is refused after reading
/// what its header declares, not after decompressing all of it.
fn read_idx_stream(source: impl Read, source_len: u64, path: &Path, expect: Expect, max_data: u64) -> Result<IdxArray> {
    let mut source = source;
    let mut head = [0u8; 2];
    let n = read_up_to(&mut source, &mut head).map_err(|e| io_err(path, e))?;
    let gzip = n == 2 && head == [0x1f, 0x8b];
    let rest = (&head[..n]).chain(source);
    let mut stream: Box<dyn Read + '_> = if gzip { Box::new(GzDecoder::new(rest)) } else { Box::new(rest) };
    // A read error inside the gzip stream means the file is damaged; on a plain file it is
    // the file system's error.
    let read_err = |e: std::io::Error| {
        if gzip {
            data_err(path, format!("corrupt or truncated gzip data ({source_len} bytes compressed): {e}"))
        } else {
            io_err(path, e)
        }
    };
    // How much of the file the messages say was read: decompressed bytes for gzip.
    let bytes = |n: u64| if gzip { format!("decompresses to {n} bytes") } else { format!("{n} bytes") };

    let mut magic = [0u8; 4];
    let got = read_up_to(&mut stream, &mut magic).map_err(read_err)?;
    if got < 4 {
        return Err(data_err(
            path,
            format!("truncated: {}, shorter than the 4-byte IDX magic number", bytes(got as u64)),
        ));
    }
    if magic[0] != 0 || magic[1] != 0 {
        return Err(data_err(
            path,
            format!(
                "bad magic number {:02x} {:02x} {:02x} {:02x}: not an IDX file (expected 00 00 08 <dims>)",
                magic[0], magic[1], magic[2], magic[3]
            ),
        ));
    }
    if magic[2] != TYPE_U8 {
        return Err(data_err(
            path,
            format!("IDX element type 0x{:02x} is not supported (only 0x08, unsigned bytes)", magic[2]),
        ));
    }
    let nd = magic[3] as usize;
    if nd == 0 {
        return Err(data_err(path, "IDX file with zero dimensions"));
    }
    // Refused here, before the dimensions are even read, so the message stays short.
    match expect {
        Expect::Images if nd != 3 => {
            return Err(data_err(path, format!("an images file must have 3 dimensions (N x H x W), this one has {nd}")))
        }
        Expect::Labels if nd != 1 => {
            return Err(data_err(path, format!("a labels file must have 1 dimension (N), this one has {nd}")))
        }
        _ => {}
    }
    let header = 4 + 4 * nd;
    let mut raw = vec![0u8; 4 * nd];
    let got = read_up_to(&mut stream, &mut raw).map_err(read_err)?;
    if got < raw.len() {
        return Err(data_err(
            path,
            format!(
                "truncated: {}, shorter than the {header}-byte header of a {nd}-dimensional IDX file",
                bytes((4 + got) as u64)
            ),
        ));
    }
    let dims: Vec<usize> = raw.chunks_exact(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize).collect();
    let dims_text = fmt_dims(&dims);
    let count = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64));
    let expected = count.and_then(|c| c.checked_add(header as u64));
    let layout = format!("a {header}-byte header and {dims_text} bytes");
    if !gzip && expected != Some(source_len) {
        // A plain file's size is known: a wrong one is refused before its data is read.
        let text = expected.map(|e| e.to_string()).unwrap_or_else(|| "more than 2^64".into());
        let message = if expected.is_none_or(|e| source_len < e) {
            format!("truncated: {source_len} bytes, expected {text} ({layout})")
        } else {
            format!("trailing data: {source_len} bytes, more than the {text} bytes its header declares ({layout})")
        };
        return Err(data_err(path, message));
    }
    // `expected.and(count)`: a count so near 2^64 that the header overflows it counts as
    // an overflow too.
    check_host_bytes(path, &format!("the {dims_text} bytes its header declares"), expected.and(count), max_data)?;
    let (count, expected) = (count.unwrap_or(0), expected.unwrap_or(0));
    let mut data = alloc_zeroed(count, path)?;
    let got = read_up_to(&mut stream, &mut data).map_err(read_err)?;
    if (got as u64) < count {
        return Err(data_err(
            path,
            format!("truncated: {}, expected {expected} ({layout})", bytes(header as u64 + got as u64)),
        ));
    }
    // One byte more tells trailing data apart without reading it; at the end of a gzip
    // stream this read also checks its CRC and length.
    let mut probe = [0u8; 1];
    if read_up_to(&mut stream, &mut probe).map_err(read_err)? > 0 {
        let what = if gzip { "decompresses to " } else { "" };
        return Err(data_err(
            path,
            format!("trailing data: {what}more than the {expected} bytes its header declares ({layout})"),
        ));
    }
    Ok(IdxArray { dims, data })
}

/// Decompresses `bytes` if they start with the gzip magic `1f 8b`, refusing output beyond
/// [`default_max_host_bytes`]; `path` is for errors.
pub fn maybe_gunzip(bytes: Vec<u8>, path: &Path) -> Result<Vec<u8>> {
    if bytes.len() < 2 || bytes[0] != 0x1f || bytes[1] != 0x8b {
        return Ok(bytes);
    }
    let limit = default_max_host_bytes();
    let mut out = Vec::new();
    GzDecoder::new(&bytes[..]).take(limit.saturating_add(1)).read_to_end(&mut out).map_err(|e| {
        data_err(path, format!("corrupt or truncated gzip data ({} bytes compressed): {e}", bytes.len()))
    })?;
    if out.len() as u64 > limit {
        return Err(data_err(path, format!("decompresses to more than the host-memory limit of {}", fmt_bytes(limit))));
    }
    Ok(out)
}

/// Parses an IDX file of unsigned bytes held in memory (gzip or not). `path` names the
/// file in errors. Checks the magic number, the type, and that the length is exactly the
/// header plus the product of the dimensions, which must fit [`default_max_host_bytes`].
pub fn parse_idx(bytes: Vec<u8>, path: &Path) -> Result<IdxArray> {
    read_idx_stream(&bytes[..], bytes.len() as u64, path, Expect::Any, default_max_host_bytes())
}

/// Reads an IDX file of unsigned bytes, plain or gzip, with the default host-memory limit
/// (see [`read_idx_limited`]).
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    read_idx_limited(path, default_max_host_bytes())
}

/// Reads an IDX file of unsigned bytes, plain or gzip, whose data (the product of its
/// dimensions) may take at most `max_host_bytes`. Refuses anything but a regular file, and
/// a file larger than such an array can be, before reading; then streams (see the module
/// doc): at most the header, the declared data and one byte are read or decompressed.
pub fn read_idx_limited(path: &Path, max_host_bytes: u64) -> Result<IdxArray> {
    read_idx_file(path, Expect::Any, max_host_bytes)
}

fn read_idx_file(path: &Path, expect: Expect, max_host_bytes: u64) -> Result<IdxArray> {
    let (file, len) = open_regular(path)?;
    let max_len = max_idx_file_len(max_host_bytes);
    if len > max_len {
        return Err(data_err(
            path,
            format!(
                "is {}, more than an IDX file within the host-memory limit of {} can be ({})",
                fmt_bytes(len),
                fmt_bytes(max_host_bytes),
                fmt_bytes(max_len)
            ),
        ));
    }
    read_idx_stream(std::io::BufReader::new(file), len, path, expect, max_host_bytes)
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
/// their shapes, that their counts agree, that there is at least one image and every label
/// is `< num_classes`. The paths name the files in errors.
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
            format!(
                "an images file must have 3 dimensions (N x H x W), this one has {} ({})",
                images.dims.len(),
                fmt_dims(&images.dims)
            ),
        ));
    }
    if labels.dims.len() != 1 {
        return Err(data_err(
            labels_path,
            format!(
                "a labels file must have 1 dimension (N), this one has {} ({})",
                labels.dims.len(),
                fmt_dims(&labels.dims)
            ),
        ));
    }
    let (n, h, w) = (images.dims[0], images.dims[1], images.dims[2]);
    if h == 0 || w == 0 {
        return Err(data_err(images_path, format!("images of size {h}x{w}")));
    }
    // A dataset of no images would be "trained" for zero steps or evaluated to 0/0.
    if n == 0 {
        return Err(data_err(images_path, format!("holds no images (its header declares 0x{h}x{w})")));
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

/// Reads an images file and a labels file (each plain or gzip) into a dataset, with the
/// default host-memory limit (see [`load_idx_pair_limited`]).
pub fn load_idx_pair(
    images_path: &Path,
    labels_path: &Path,
    name: impl Into<String>,
    num_classes: usize,
    class_names: Option<Vec<String>>,
) -> Result<Dataset> {
    load_idx_pair_limited(images_path, labels_path, name, num_classes, class_names, default_max_host_bytes())
}

/// Reads an images file and a labels file (each plain or gzip) into a dataset whose
/// pixels may take at most `max_host_bytes`; the images header is checked against it
/// before any pixel is read.
pub fn load_idx_pair_limited(
    images_path: &Path,
    labels_path: &Path,
    name: impl Into<String>,
    num_classes: usize,
    class_names: Option<Vec<String>>,
    max_host_bytes: u64,
) -> Result<Dataset> {
    let images = read_idx_file(images_path, Expect::Images, max_host_bytes)?;
    let labels = read_idx_file(labels_path, Expect::Labels, max_host_bytes)?;
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
            // A directory of that name is skipped (some archives hold
            // train-images-idx3-ubyte/train-images-idx3-ubyte); a FIFO, socket or device
            // is refused by name rather than reported missing.
            match std::fs::metadata(&p) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    regular_file_len(&p)?;
                    return Ok(p);
                }
                Err(_) => {}
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
/// and `t10k-labels-idx1-ubyte[.gz]` (or in `raw/`, `MNIST/raw/`, `FashionMNIST/raw/` inside it),
/// with the default host-memory limit.
pub fn load_idx_dir(
    dir: &Path,
    split: Split,
    name: &str,
    num_classes: usize,
    class_names: Option<Vec<String>>,
) -> Result<Dataset> {
    load_idx_dir_limited(dir, split, name, num_classes, class_names, default_max_host_bytes())
}

/// [`load_idx_dir`] whose pixels may take at most `max_host_bytes`.
pub fn load_idx_dir_limited(
    dir: &Path,
    split: Split,
    name: &str,
    num_classes: usize,
    class_names: Option<Vec<String>>,
    max_host_bytes: u64,
) -> Result<Dataset> {
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    let images = find_idx(dir, prefix, "images", 3)?;
    let labels = find_idx(dir, prefix, "labels", 1)?;
    load_idx_pair_limited(&images, &labels, format!("{name}-{split}"), num_classes, class_names, max_host_bytes)
}

/// Loads MNIST (10 classes, `"0"` .. `"9"`) from a directory (see [`load_idx_dir`]).
pub fn load_mnist(dir: &Path, split: Split) -> Result<Dataset> {
    load_mnist_limited(dir, split, default_max_host_bytes())
}

/// [`load_mnist`] whose pixels may take at most `max_host_bytes`.
pub fn load_mnist_limited(dir: &Path, split: Split, max_host_bytes: u64) -> Result<Dataset> {
    let names = (0..10).map(|d| d.to_string()).collect();
    load_idx_dir_limited(dir, split, "mnist", 10, Some(names), max_host_bytes)
}

/// Loads Fashion-MNIST (10 classes) from a directory (see [`load_idx_dir`]), e.g.
/// [`DEBIAN_FASHION_MNIST`].
pub fn load_fashion_mnist(dir: &Path, split: Split) -> Result<Dataset> {
    load_fashion_mnist_limited(dir, split, default_max_host_bytes())
}

/// [`load_fashion_mnist`] whose pixels may take at most `max_host_bytes`.
pub fn load_fashion_mnist_limited(dir: &Path, split: Split, max_host_bytes: u64) -> Result<Dataset> {
    let names = FASHION_MNIST_CLASSES.iter().map(|s| s.to_string()).collect();
    load_idx_dir_limited(dir, split, "fashion-mnist", 10, Some(names), max_host_bytes)
}
