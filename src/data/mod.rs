//! Datasets in memory, their loaders, augmentation and a background batch loader.
//!
//! - [`Dataset`]: images as `u8` NCHW (CIFAR-10's training set is 150 MB this way; f32 would
//!   be 600 MB), labels `u32`, shape, classes and a name.
//! - Loaders: CIFAR-10 / CIFAR-100 binary ([`cifar`]), IDX files plain or gzip, MNIST and
//!   Fashion-MNIST ([`idx`]), image folders `root/<class>/*.png|jpg` ([`folder`]) and the
//!   embedded Fashion-MNIST subset that works offline ([`embedded`]). [`DatasetKind::load`]
//!   picks one by name.
//! - [`Normalization`] and [`Augment`] ([`transform`]): the paper's pipeline, random crop with
//!   4 pixels of zero padding and random horizontal flip for training, then
//!   `(x / 255 - mean) / std` per channel.
//! - [`Loader`] ([`loader`]): shuffled, augmented, normalised f32 batches made on a background
//!   thread, reproducible from `(seed, epoch)` alone so a resumed run sees the same batches.
//!
//! Every loader returns a typed [`crate::Error`] that names the file and says what is
//! wrong with it; none panics on bad input.

pub mod cifar;
pub mod embedded;
pub mod folder;
pub mod idx;
pub mod loader;
mod rng;
pub mod transform;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::{Error, Result};

pub use loader::{epoch_order, make_batch, num_batches, Batch, LastBatch, Loader, LoaderConfig};
pub use transform::{augment_params, transform_image, Augment, CropFlip, Normalization};

/// Which part of a dataset: the training set or the held-out test set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    /// `"train"` or `"test"`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Split {
    type Err = String;

    /// `train`, or `test` (also `val`, `validation`, `eval`).
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "train" | "training" => Ok(Split::Train),
            "test" | "val" | "valid" | "validation" | "eval" => Ok(Split::Test),
            other => Err(format!("unknown split '{other}': use 'train' or 'test'")),
        }
    }
}

/// The datasets featreplay knows how to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DatasetKind {
    /// CIFAR-10 binary version (`cifar-10-batches-bin`).
    Cifar10,
    /// CIFAR-100 binary version (`cifar-100-binary`), fine labels.
    Cifar100,
    /// Fashion-MNIST IDX files, plain or gzip.
    FashionMnist,
    /// MNIST IDX files, plain or gzip.
    Mnist,
    /// An image folder `root/<class>/*.png|jpg|jpeg`, optionally split into `train/` and
    /// `test/` (or `val/`).
    Folder,
    /// The Fashion-MNIST subset compiled into the library (4000 train, 1000 test images).
    Embedded,
}

impl DatasetKind {
    /// Every kind, in the order of the CLI's help.
    pub const ALL: [DatasetKind; 6] = [
        DatasetKind::Cifar10,
        DatasetKind::Cifar100,
        DatasetKind::FashionMnist,
        DatasetKind::Mnist,
        DatasetKind::Folder,
        DatasetKind::Embedded,
    ];

    /// The canonical name, as accepted by [`FromStr`]: `cifar10`, `cifar100`,
    /// `fashion-mnist`, `mnist`, `folder`, `embedded`.
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::Cifar10 => "cifar10",
            DatasetKind::Cifar100 => "cifar100",
            DatasetKind::FashionMnist => "fashion-mnist",
            DatasetKind::Mnist => "mnist",
            DatasetKind::Folder => "folder",
            DatasetKind::Embedded => "embedded",
        }
    }

    /// Where the dataset is found when no directory is given: the Debian package's
    /// Fashion-MNIST (`/usr/share/datasets/fashion-mnist`) if it is there, nothing otherwise.
    pub fn default_root(self) -> Option<PathBuf> {
        match self {
            DatasetKind::FashionMnist => {
                let p = PathBuf::from(idx::DEBIAN_FASHION_MNIST);
                p.is_dir().then_some(p)
            }
            _ => None,
        }
    }

    /// Loads one split. `options.root` is the data directory (ignored by `Embedded`; for
    /// `FashionMnist` it defaults to [`default_root`](Self::default_root));
    /// `options.image_size` is the size folder images are resized to.
    pub fn load(self, split: Split, options: &LoadOptions) -> Result<Dataset> {
        if self == DatasetKind::Embedded {
            return embedded::load_embedded(split);
        }
        let root = match options.root.clone().or_else(|| self.default_root()) {
            Some(r) => r,
            None => {
                return Err(Error::Data {
                    path: self.name().to_string(),
                    message: format!("no data directory given. {}", self.download_hint()),
                })
            }
        };
        let limit = options.max_host_bytes;
        let data = match self {
            DatasetKind::Cifar10 => cifar::load_cifar10_limited(&root, split, limit),
            DatasetKind::Cifar100 => cifar::load_cifar100_limited(&root, split, limit),
            DatasetKind::FashionMnist => idx::load_fashion_mnist_limited(&root, split, limit),
            DatasetKind::Mnist => idx::load_mnist_limited(&root, split, limit),
            DatasetKind::Folder => {
                let (h, w) = options.image_size;
                folder::load_folder_limited(&root, split, h, w, limit)
            }
            DatasetKind::Embedded => unreachable!("handled above"),
        }?;
        // Each loader already refuses an empty file or directory with a precise message;
        // this is the backstop for all of them: an empty training set would "train" for
        // zero steps and an empty test set report an accuracy of 0/0.
        if data.is_empty() {
            return Err(data_err(&root, format!("the {split} split holds no images")));
        }
        Ok(data)
    }

    /// Loads the training and the test split. Their channel counts are made to agree (an
    /// image folder whose training images are all grayscale but whose test split holds a
    /// colour image is widened to RGB on both sides), and so are their class counts.
    pub fn load_train_test(self, options: &LoadOptions) -> Result<(Dataset, Dataset)> {
        let mut train = self.load(Split::Train, options)?;
        let mut test = self.load(Split::Test, options)?;
        if train.channels() != test.channels() {
            if train.channels() == 1 && test.channels() == 3 {
                train = train.to_rgb();
            } else if train.channels() == 3 && test.channels() == 1 {
                test = test.to_rgb();
            }
        }
        if (train.height(), train.width()) != (test.height(), test.width()) || train.channels() != test.channels() {
            return Err(Error::Data {
                path: options.root.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| self.name().into()),
                message: format!(
                    "training images are {}x{}x{} but test images are {}x{}x{}",
                    train.channels(),
                    train.height(),
                    train.width(),
                    test.channels(),
                    test.height(),
                    test.width()
                ),
            });
        }
        let classes = train.num_classes().max(test.num_classes());
        train.num_classes = classes;
        test.num_classes = classes;
        Ok((train, test))
    }

    fn download_hint(self) -> &'static str {
        match self {
            DatasetKind::Cifar10 => {
                "Download https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz, extract it and pass the \
                 directory holding cifar-10-batches-bin"
            }
            DatasetKind::Cifar100 => {
                "Download https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz, extract it and pass the \
                 directory holding cifar-100-binary"
            }
            DatasetKind::FashionMnist => {
                "Install it (Debian/Ubuntu: apt install dataset-fashion-mnist, into /usr/share/datasets/fashion-mnist) \
                 or download the four .gz files from https://github.com/zalandoresearch/fashion-mnist and pass their \
                 directory"
            }
            DatasetKind::Mnist => "Download the four MNIST IDX files (.gz or not) and pass their directory",
            DatasetKind::Folder => {
                "Pass the root of an image folder: root/<class>/*.png|jpg, or root/train/<class>/..."
            }
            DatasetKind::Embedded => "",
        }
    }
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DatasetKind {
    type Err = String;

    /// The canonical names (`cifar10`, `cifar100`, `fashion-mnist`, `mnist`, `folder`,
    /// `embedded`), case-insensitive, with a few spellings more (`cifar-10`, `fashion_mnist`,
    /// `fashionmnist`, `imagefolder`, ...).
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let key: String = s.trim().to_ascii_lowercase().chars().filter(|c| !matches!(c, '-' | '_' | ' ')).collect();
        match key.as_str() {
            "cifar10" => Ok(DatasetKind::Cifar10),
            "cifar100" => Ok(DatasetKind::Cifar100),
            "fashionmnist" | "fmnist" => Ok(DatasetKind::FashionMnist),
            "mnist" => Ok(DatasetKind::Mnist),
            "folder" | "imagefolder" | "images" => Ok(DatasetKind::Folder),
            "embedded" | "default" | "fashionmnistmini" => Ok(DatasetKind::Embedded),
            _ => Err(format!(
                "unknown dataset '{}': choose one of {}",
                s.trim(),
                DatasetKind::ALL.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
            )),
        }
    }
}

/// What [`DatasetKind::load`] needs besides the kind and the split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// The data directory (see each loader for what it accepts). `None`: the kind's
    /// [`default_root`](DatasetKind::default_root), if any.
    pub root: Option<PathBuf>,
    /// `(height, width)` that folder images are resized to; other kinds have a fixed size.
    /// Each side must be `1..=`[`MAX_IMAGE_SIZE`].
    pub image_size: (u32, u32),
    /// The most host memory, in bytes, that one split's decoded pixels may take
    /// (`N x C x H x W`). Every loader checks it against the size that the headers, file
    /// sizes or file count announce, before it allocates or decodes anything, so a hostile
    /// or mistaken input is refused with an error instead of exhausting memory. Default:
    /// [`default_max_host_bytes`], read when the options are made.
    pub max_host_bytes: u64,
}

impl Default for LoadOptions {
    /// No directory, 32x32 folder images, [`default_max_host_bytes`].
    fn default() -> Self {
        LoadOptions { root: None, image_size: (32, 32), max_host_bytes: default_max_host_bytes() }
    }
}

impl LoadOptions {
    /// Options with this data directory, 32x32 folder images and the default host-memory
    /// limit.
    pub fn with_root(root: impl Into<PathBuf>) -> Self {
        LoadOptions { root: Some(root.into()), ..Default::default() }
    }
}

/// The largest side, in pixels, that folder images may be resized to. Far beyond any
/// network featreplay trains (CIFAR is 32, ImageNet crops 224); a larger value is a typo,
/// and one such image already takes 48 MiB.
pub const MAX_IMAGE_SIZE: u32 = 4096;

/// The host-memory limit used where `/proc/meminfo` cannot be read (not Linux, say): 8 GiB.
pub const FALLBACK_MAX_HOST_BYTES: u64 = 8 << 30;

/// The default of [`LoadOptions::max_host_bytes`]: the memory available now
/// (`MemAvailable` of `/proc/meminfo`), or [`FALLBACK_MAX_HOST_BYTES`] where that cannot be
/// read. Loading more than is available would only end in swapping or the OOM killer.
pub fn default_max_host_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| parse_mem_available(&text))
        .unwrap_or(FALLBACK_MAX_HOST_BYTES)
}

/// Errors when `need` bytes exceed the host memory available now ([`default_max_host_bytes`]):
/// `"<what> about X GiB of memory<detail> but Y GiB are available<hint>"`, where `what` ends
/// in its verb ("this configuration needs").
pub fn refuse_beyond_host_memory(op: &'static str, what: &str, need: u64, detail: &str, hint: &str) -> Result<()> {
    let limit = default_max_host_bytes();
    if need <= limit {
        return Ok(());
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    Err(Error::InsufficientMemory {
        op,
        detail: format!(
            "{what} about {:.1} GiB of memory{detail} but {:.1} GiB are available{hint}",
            gib(need),
            gib(limit)
        ),
    })
}

/// The `MemAvailable:` line of a `/proc/meminfo` text, in bytes (the file gives kB, i.e.
/// KiB). `None` if the line is missing or malformed.
pub fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?;
    let mut words = line.split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => value.checked_mul(1024),
        _ => None,
    }
}

/// `bytes` for people: `"44.9 MiB (47040000 bytes)"`; plain `"999 bytes"` below 1 KiB.
pub(crate) fn fmt_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {} ({bytes} bytes)", UNITS[unit])
}

/// Refuses, naming `path`, a split whose decoded pixels (`needed` bytes; `None` when the
/// count overflows u64) would exceed `limit`. `what` says what needs them, e.g. "the 30
/// images of 3x64x64 of the train split". Called before anything is allocated or decoded.
pub(crate) fn check_host_bytes(path: &Path, what: &str, needed: Option<u64>, limit: u64) -> Result<()> {
    match needed {
        Some(n) if n <= limit => Ok(()),
        _ => Err(data_err(
            path,
            format!(
                "{what} need {} of host memory, more than the limit of {}",
                needed.map(fmt_bytes).unwrap_or_else(|| "more than 2^64 bytes".into()),
                fmt_bytes(limit)
            ),
        )),
    }
}

/// A labelled image dataset in memory: `u8` pixels NCHW (channel-planar), `u32` labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dataset {
    name: String,
    images: Vec<u8>,
    labels: Vec<u32>,
    channels: usize,
    height: usize,
    width: usize,
    num_classes: usize,
    class_names: Option<Vec<String>>,
}

impl Dataset {
    /// A dataset from its parts, checked: `images.len() == labels.len() * c * h * w`, every
    /// label `< num_classes`, nonzero dimensions, and `class_names` (if given) of length
    /// `num_classes`. An empty dataset (no samples) is allowed. `name` is also used as the
    /// path in the error.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: impl Into<String>,
        images: Vec<u8>,
        labels: Vec<u32>,
        channels: usize,
        height: usize,
        width: usize,
        num_classes: usize,
        class_names: Option<Vec<String>>,
    ) -> Result<Self> {
        let name = name.into();
        let bad = |message: String| Error::Data { path: name.clone(), message };
        if channels == 0 || height == 0 || width == 0 {
            return Err(bad(format!("image shape {channels}x{height}x{width} has a zero dimension")));
        }
        if num_classes == 0 {
            return Err(bad("zero classes".into()));
        }
        let per = channels
            .checked_mul(height)
            .and_then(|x| x.checked_mul(width))
            .ok_or_else(|| bad(format!("image shape {channels}x{height}x{width} overflows")))?;
        if Some(images.len()) != labels.len().checked_mul(per) {
            return Err(bad(format!(
                "{} pixel bytes do not hold {} images of {channels}x{height}x{width} ({per} bytes each)",
                images.len(),
                labels.len()
            )));
        }
        if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= num_classes) {
            return Err(bad(format!("label {l} of sample {i} is out of range (dataset has {num_classes} classes)")));
        }
        if let Some(names) = &class_names {
            if names.len() != num_classes {
                return Err(bad(format!("{} class names for {num_classes} classes", names.len())));
            }
        }
        Ok(Dataset { name, images, labels, channels, height, width, num_classes, class_names })
    }

    /// The dataset's name, e.g. `cifar10-train`.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    /// True when there are no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// Channels per image (1 or 3).
    pub fn channels(&self) -> usize {
        self.channels
    }
    /// Image height in pixels.
    pub fn height(&self) -> usize {
        self.height
    }
    /// Image width in pixels.
    pub fn width(&self) -> usize {
        self.width
    }
    /// `[channels, height, width]`.
    pub fn image_shape(&self) -> [usize; 3] {
        [self.channels, self.height, self.width]
    }
    /// Values per image: `channels * height * width`.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }
    /// Number of classes; labels are `0..num_classes`.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }
    /// Class names, when the format carries them (index = label).
    pub fn class_names(&self) -> Option<&[String]> {
        self.class_names.as_deref()
    }
    /// All pixels, NCHW.
    pub fn images(&self) -> &[u8] {
        &self.images
    }
    /// All labels.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }
    /// Image `i`'s pixels, CHW. Panics if `i >= len()` (like slice indexing).
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_len();
        &self.images[i * n..(i + 1) * n]
    }
    /// Label of sample `i`. Panics if `i >= len()`.
    pub fn label(&self, i: usize) -> u32 {
        self.labels[i]
    }
    /// Samples per class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.num_classes];
        for &l in &self.labels {
            counts[l as usize] += 1;
        }
        counts
    }

    /// A new dataset holding the given samples, in that order (indices may repeat). Errors
    /// on an index out of range.
    pub fn subset(&self, indices: &[usize], name: impl Into<String>) -> Result<Dataset> {
        let name = name.into();
        let n = self.image_len();
        let mut images = Vec::with_capacity(indices.len() * n);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            if i >= self.len() {
                return Err(Error::Data {
                    path: self.name.clone(),
                    message: format!("subset index {i} out of range ({} samples)", self.len()),
                });
            }
            images.extend_from_slice(self.image(i));
            labels.push(self.labels[i]);
        }
        Dataset::new(
            name,
            images,
            labels,
            self.channels,
            self.height,
            self.width,
            self.num_classes,
            self.class_names.clone(),
        )
    }

    /// The first `n` samples (all of them if `n >= len()`).
    pub fn take(&self, n: usize) -> Dataset {
        let n = n.min(self.len());
        let mut d = self.clone();
        d.images.truncate(n * self.image_len());
        d.labels.truncate(n);
        d
    }

    /// Splits off `holdout` samples chosen at random from `seed` (for an image folder with no
    /// `test/` directory, say): returns `(rest, held_out)`, each in the original order.
    pub fn split_holdout(&self, holdout: usize, seed: u64) -> (Dataset, Dataset) {
        let holdout = holdout.min(self.len());
        let order = rng::permutation(self.len(), &[seed, 0x484f_4c44]);
        let mut held: Vec<usize> = order[..holdout].to_vec();
        let mut rest: Vec<usize> = order[holdout..].to_vec();
        held.sort_unstable();
        rest.sort_unstable();
        // Indices are in range by construction.
        let a = self.subset(&rest, format!("{}-rest", self.name)).expect("indices in range");
        let b = self.subset(&held, format!("{}-holdout", self.name)).expect("indices in range");
        (a, b)
    }

    /// The same images with 3 channels (a grayscale channel repeated); a no-op on RGB.
    pub fn to_rgb(&self) -> Dataset {
        if self.channels != 1 {
            return self.clone();
        }
        let hw = self.height * self.width;
        let mut images = Vec::with_capacity(self.images.len() * 3);
        for img in self.images.chunks_exact(hw) {
            for _ in 0..3 {
                images.extend_from_slice(img);
            }
        }
        Dataset {
            name: self.name.clone(),
            images,
            labels: self.labels.clone(),
            channels: 3,
            height: self.height,
            width: self.width,
            num_classes: self.num_classes,
            class_names: self.class_names.clone(),
        }
    }

    /// Sets the dataset's name.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
}

/// `Error::Data` naming `path`.
pub(crate) fn data_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Data { path: path.display().to_string(), message: message.into() }
}

/// `Error::Io` naming `path`.
pub(crate) fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io { path: path.display().to_string(), source }
}

/// `len` zero bytes, or an error naming `path` if the allocator cannot provide them (the
/// limit may have been set above what the machine really has): an error, not an abort.
pub(crate) fn alloc_zeroed(len: u64, path: &Path) -> Result<Vec<u8>> {
    let fail = || data_err(path, format!("cannot allocate {} of host memory for its data", fmt_bytes(len)));
    let len = usize::try_from(len).map_err(|_| fail())?;
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| fail())?;
    v.resize(len, 0);
    Ok(v)
}

/// What a path is when it is not a regular file, for the error message.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_char_device() || t.is_block_device() {
            return "a device";
        }
    }
    "not a plain file"
}

/// Refuses `path` unless it is a regular file (following symlinks), returning its size.
/// Opening a FIFO blocks until someone writes to it and reading a device may never end, so
/// this runs before a data file is opened.
pub(crate) fn regular_file_len(path: &Path) -> Result<u64> {
    let meta = std::fs::metadata(path).map_err(|e| io_err(path, e))?;
    if !meta.is_file() {
        return Err(data_err(path, format!("is not a regular file ({})", file_kind(&meta))));
    }
    Ok(meta.len())
}

/// Opens a data file after [`regular_file_len`] accepted it; returns it with its size as
/// seen on the open file (the one that counts, should the path have changed meanwhile).
pub(crate) fn open_regular(path: &Path) -> Result<(std::fs::File, u64)> {
    regular_file_len(path)?;
    let file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let meta = file.metadata().map_err(|e| io_err(path, e))?;
    if !meta.is_file() {
        return Err(data_err(path, format!("is not a regular file ({})", file_kind(&meta))));
    }
    Ok((file, meta.len()))
}

/// Reads a whole regular file of at most `max_len` bytes, naming it in the errors. The
/// size is checked before anything is read or allocated (`what` names the limit in the
/// message, e.g. "a CIFAR-10 file within the host-memory limit"), and at most `max_len + 1`
/// bytes are read, so a file that grows meanwhile cannot take more memory either.
pub(crate) fn read_file(path: &Path, max_len: u64, what: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    let (file, len) = open_regular(path)?;
    let too_big = |found: String| data_err(path, format!("{found}, more than {what} can be ({})", fmt_bytes(max_len)));
    if len > max_len {
        return Err(too_big(format!("is {}", fmt_bytes(len))));
    }
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(len as usize)
        .map_err(|_| data_err(path, format!("cannot allocate {} of host memory to read it", fmt_bytes(len))))?;
    file.take(max_len.saturating_add(1)).read_to_end(&mut bytes).map_err(|e| io_err(path, e))?;
    if bytes.len() as u64 > max_len {
        return Err(too_big("grew while being read".into()));
    }
    Ok(bytes)
}
