//! Batches of normalised, augmented f32 images made on a background thread.
//!
//! Everything random is a fixed function of the seed: epoch `e`'s order is
//! [`epoch_order`]`(n, seed, e)` and batch `b`'s augmentation is
//! [`augment_params`]`(aug, seed, e, b, len)`. A run resumed at epoch `e`, batch `b` (see
//! [`Loader::starting_at`]) therefore sees exactly the batches the uninterrupted run would
//! have, with no RNG state saved in the checkpoint.
//!
//! The final partial batch of an epoch is kept by default ([`LastBatch::Keep`], like
//! PyTorch's `DataLoader`), so every sample is seen once per epoch; [`LastBatch::Drop`] skips
//! it (PyTorch's `drop_last`) and [`LastBatch::Pad`] fills it up to the batch size with the
//! epoch's first samples, so every batch has the same size and those samples are seen twice.

use std::fmt;
use std::str::FromStr;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::data::rng;
use crate::data::transform::{augment_params, transform_image, Augment, Normalization};
use crate::data::Dataset;
use crate::error::{Error, Result};

/// What becomes of an epoch's final partial batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LastBatch {
    /// Trained on as it is (smaller than the others).
    #[default]
    Keep,
    /// Skipped.
    Drop,
    /// Filled up to the batch size with the first samples of the epoch's order (cycling
    /// through them when the dataset is smaller than a batch).
    Pad,
}

impl FromStr for LastBatch {
    type Err = Error;
    fn from_str(s: &str) -> Result<LastBatch> {
        match s.trim().to_ascii_lowercase().as_str() {
            "keep" => Ok(LastBatch::Keep),
            "drop" => Ok(LastBatch::Drop),
            "pad" => Ok(LastBatch::Pad),
            _ => Err(Error::InvalidConfig {
                op: "data",
                detail: format!("unknown last-batch handling '{s}'; choose keep, drop or pad"),
            }),
        }
    }
}

impl fmt::Display for LastBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LastBatch::Keep => "keep",
            LastBatch::Drop => "drop",
            LastBatch::Pad => "pad",
        })
    }
}

/// How a [`Loader`] makes batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoaderConfig {
    /// Samples per batch (> 0).
    pub batch_size: usize,
    /// Shuffle each epoch (from `seed` and the epoch); otherwise dataset order.
    pub shuffle: bool,
    /// Augmentation; [`Augment::none`] for evaluation.
    pub augment: Augment,
    /// What becomes of the final partial batch (default: kept).
    pub last_batch: LastBatch,
    /// Seed of the shuffle and the augmentation.
    pub seed: u64,
    /// Batches made ahead of the consumer (the bound of the channel; at least 1).
    pub prefetch: usize,
}

impl LoaderConfig {
    /// Training: shuffled, the paper's augmentation (crop with 4-pixel padding, flip), final
    /// partial batch kept, 4 batches prefetched.
    pub fn train(batch_size: usize, seed: u64) -> Self {
        LoaderConfig {
            batch_size,
            shuffle: true,
            augment: Augment::paper(),
            last_batch: LastBatch::Keep,
            seed,
            prefetch: 4,
        }
    }

    /// Evaluation: dataset order, no augmentation, every sample (partial batch kept).
    pub fn eval(batch_size: usize) -> Self {
        LoaderConfig {
            batch_size,
            shuffle: false,
            augment: Augment::none(),
            last_batch: LastBatch::Keep,
            seed: 0,
            prefetch: 4,
        }
    }
}

/// A batch: `images` is `len * C * H * W` normalised f32 values (NCHW), `labels` the
/// `len` labels, `indices` the dataset index of each sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// The epoch this batch belongs to.
    pub epoch: u64,
    /// Its index within the epoch (0-based).
    pub index: usize,
    /// `[len, C, H, W]`.
    pub shape: [usize; 4],
    /// Normalised (and for training augmented) pixels, NCHW.
    pub images: Vec<f32>,
    /// Labels.
    pub labels: Vec<u32>,
    /// Dataset index of each sample.
    pub indices: Vec<usize>,
}

impl Batch {
    /// Number of samples (the last batch of an epoch may be smaller than the batch size).
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    /// True if the batch holds no sample (never produced by a loader).
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Stream tag for the shuffle.
const SHUFFLE_STREAM: u64 = 0x5348_5546; // "SHUF"

/// The order of the `n` samples in epoch `epoch`: a uniformly random permutation that is a
/// fixed function of `(seed, epoch)` (it does not depend on the rand crate's version).
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    rng::permutation(n, &[seed, SHUFFLE_STREAM, epoch])
}

/// Batches per epoch: `ceil(len / batch_size)`, or `floor` when the last batch is dropped.
/// 0 if `batch_size` is 0.
pub fn num_batches(len: usize, batch_size: usize, last_batch: LastBatch) -> usize {
    if batch_size == 0 {
        0
    } else if last_batch == LastBatch::Drop {
        len / batch_size
    } else {
        len.div_ceil(batch_size)
    }
}

fn check(data: &Dataset, norm: &Normalization, config: &LoaderConfig) -> Result<()> {
    if config.batch_size == 0 {
        return Err(Error::InvalidConfig { op: "Loader", detail: "batch size 0".into() });
    }
    if norm.channels() != data.channels() {
        return Err(Error::ShapeMismatch {
            op: "Loader",
            detail: format!(
                "normalisation has {} channels but dataset '{}' has {}",
                norm.channels(),
                data.name(),
                data.channels()
            ),
        });
    }
    Ok(())
}

fn order_for(data: &Dataset, config: &LoaderConfig, epoch: u64) -> Vec<usize> {
    if config.shuffle {
        epoch_order(data.len(), config.seed, epoch)
    } else {
        (0..data.len()).collect()
    }
}

/// Builds batch `index` of `epoch` from the epoch's order.
fn build(
    data: &Dataset,
    norm: &Normalization,
    config: &LoaderConfig,
    order: &[usize],
    epoch: u64,
    index: usize,
) -> Result<Batch> {
    let start = index * config.batch_size;
    let end = (start + config.batch_size).min(order.len());
    let mut indices = order[start..end].to_vec();
    if config.last_batch == LastBatch::Pad {
        indices.extend(order.iter().cycle().take(config.batch_size - indices.len()));
    }
    let n = data.image_len();
    let shape = [indices.len(), data.channels(), data.height(), data.width()];
    let mut images = vec![0f32; indices.len() * n];
    let params = augment_params(&config.augment, config.seed, epoch, index as u64, indices.len());
    for ((&i, out), p) in indices.iter().zip(images.chunks_exact_mut(n.max(1))).zip(params) {
        transform_image(data.image(i), data.image_shape(), p, norm, out)?;
    }
    let labels = indices.iter().map(|&i| data.label(i)).collect();
    Ok(Batch { epoch, index, shape, images, labels, indices })
}

/// Batch `index` of epoch `epoch`, made on the calling thread: the same batch a [`Loader`]
/// yields at that position. Errors on a batch index past the epoch's end, a zero batch size
/// or a normalisation whose channel count differs from the dataset's.
pub fn make_batch(
    data: &Dataset,
    norm: &Normalization,
    config: &LoaderConfig,
    epoch: u64,
    index: usize,
) -> Result<Batch> {
    check(data, norm, config)?;
    let total = num_batches(data.len(), config.batch_size, config.last_batch);
    if index >= total {
        return Err(Error::InvalidConfig {
            op: "make_batch",
            detail: format!("batch {index} of an epoch of {total} batches"),
        });
    }
    let order = order_for(data, config, epoch);
    build(data, norm, config, &order, epoch, index)
}

/// One epoch of batches, made on a background thread that stays up to `prefetch` batches
/// ahead. Iterate it; dropping it early stops the thread (it is joined, and never hangs:
/// a thread blocked on the full channel wakes when the receiver goes away).
pub struct Loader {
    rx: Option<Receiver<Batch>>,
    handle: Option<JoinHandle<()>>,
    epoch: u64,
    next: usize,
    total: usize,
}

impl Loader {
    /// The batches of epoch `epoch`, from the first.
    pub fn new(data: Arc<Dataset>, norm: Normalization, config: LoaderConfig, epoch: u64) -> Result<Self> {
        Self::starting_at(data, norm, config, epoch, 0)
    }

    /// The batches of epoch `epoch` from batch `start` on (for a run resumed mid-epoch): the
    /// same batches, in the same order and with the same augmentation, that an uninterrupted
    /// epoch yields from that point. `start == num_batches` gives an empty loader; beyond is
    /// an error.
    pub fn starting_at(
        data: Arc<Dataset>,
        norm: Normalization,
        config: LoaderConfig,
        epoch: u64,
        start: usize,
    ) -> Result<Self> {
        check(&data, &norm, &config)?;
        let total = num_batches(data.len(), config.batch_size, config.last_batch);
        if start > total {
            return Err(Error::InvalidConfig {
                op: "Loader",
                detail: format!("starting at batch {start} of an epoch of {total} batches"),
            });
        }
        let (tx, rx) = sync_channel(config.prefetch.max(1));
        let handle = std::thread::Builder::new()
            .name("featreplay-loader".into())
            .spawn(move || {
                let order = order_for(&data, &config, epoch);
                for index in start..total {
                    // Shapes were checked above, so building cannot fail.
                    let batch = match build(&data, &norm, &config, &order, epoch, index) {
                        Ok(b) => b,
                        Err(e) => panic!("data loader: {e}"),
                    };
                    if tx.send(batch).is_err() {
                        return; // the Loader was dropped
                    }
                }
            })
            .map_err(|e| Error::Io { path: "featreplay-loader thread".into(), source: e })?;
        Ok(Loader { rx: Some(rx), handle: Some(handle), epoch, next: start, total })
    }

    /// The epoch this loader walks.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    /// Batches in the whole epoch.
    pub fn num_batches(&self) -> usize {
        self.total
    }
    /// Index of the next batch to be yielded.
    pub fn next_index(&self) -> usize {
        self.next
    }
}

impl Iterator for Loader {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        if self.next >= self.total {
            return None;
        }
        match self.rx.as_ref()?.recv() {
            Ok(b) => {
                self.next += 1;
                Some(b)
            }
            Err(_) => {
                // The thread ended early: it can only have panicked (a bug). Pass it on.
                self.rx = None;
                if let Some(h) = self.handle.take() {
                    if let Err(p) = h.join() {
                        std::panic::resume_unwind(p);
                    }
                }
                None
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.total.saturating_sub(self.next);
        (n, Some(n))
    }
}

impl ExactSizeIterator for Loader {}

impl Drop for Loader {
    fn drop(&mut self) {
        // Dropping the receiver first makes a blocked `send` return, so the join is prompt.
        self.rx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
