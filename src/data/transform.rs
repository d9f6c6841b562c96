//! Per-channel normalisation and the paper's augmentation (random crop with zero padding,
//! random horizontal flip), applied while converting `u8` pixels to `f32`.
//!
//! The order is torchvision's `RandomCrop(32, padding=4)`, `RandomHorizontalFlip()`,
//! `ToTensor()`, `Normalize(mean, std)`: padding happens on the `u8` image BEFORE
//! normalisation, so a padded pixel has pixel value 0 and becomes `(0 - mean) / std` (the
//! normalised value of black), not 0. featreplay does the same.

use crate::data::rng::StableRng;
use crate::data::{Dataset, DatasetKind};
use crate::error::{Error, Result};

/// Per-channel mean and standard deviation on the `[0, 1]` scale: a pixel `x` of channel `c`
/// becomes `(x / 255 - mean[c]) / std[c]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Normalization {
    mean: Vec<f32>,
    std: Vec<f32>,
    /// `lut[c * 256 + x]`: the normalised value of pixel value `x` in channel `c`, computed in
    /// f64 and rounded once.
    lut: Vec<f32>,
}

impl Normalization {
    /// From means and standard deviations on the `[0, 1]` scale (one per channel). Errors if
    /// the lengths differ or are zero, or a value is not finite, or a std is not positive.
    pub fn new(mean: &[f32], std: &[f32]) -> Result<Self> {
        let bad = |detail: String| Error::ShapeMismatch { op: "Normalization::new", detail };
        if mean.is_empty() || mean.len() != std.len() {
            return Err(bad(format!("{} means and {} standard deviations", mean.len(), std.len())));
        }
        if mean.iter().any(|m| !m.is_finite()) || std.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            return Err(bad(format!("means {mean:?} must be finite and standard deviations {std:?} positive")));
        }
        let mut lut = Vec::with_capacity(mean.len() * 256);
        for (&m, &s) in mean.iter().zip(std) {
            for x in 0..256 {
                lut.push(((x as f64 / 255.0 - m as f64) / s as f64) as f32);
            }
        }
        Ok(Normalization { mean: mean.to_vec(), std: std.to_vec(), lut })
    }

    /// CIFAR-10's statistics as in the reference code: mean 125.3/123.0/113.9 and std
    /// 63.0/62.1/66.7, over 255.
    pub fn cifar10() -> Self {
        Self::from_255([125.3, 123.0, 113.9], [63.0, 62.1, 66.7])
    }

    /// CIFAR-100's statistics as in the reference code: mean 129.3/124.1/112.4 and std
    /// 68.2/65.4/70.4, over 255.
    pub fn cifar100() -> Self {
        Self::from_255([129.3, 124.1, 112.4], [68.2, 65.4, 70.4])
    }

    fn from_255(mean: [f64; 3], std: [f64; 3]) -> Self {
        let m: Vec<f32> = mean.iter().map(|v| (v / 255.0) as f32).collect();
        let s: Vec<f32> = std.iter().map(|v| (v / 255.0) as f32).collect();
        Self::new(&m, &s).expect("constants are valid")
    }

    /// No centring: `x / 255` (mean 0, std 1) for `channels` channels (at least 1).
    pub fn identity(channels: usize) -> Self {
        let c = channels.max(1);
        Self::new(&vec![0.0; c], &vec![1.0; c]).expect("constants are valid")
    }

    /// The exact per-channel mean and population standard deviation (dividing by the number
    /// of pixels) of a dataset, on the `[0, 1]` scale. Sums are exact integers (u64 / u128)
    /// and the division is done once in f64. A constant channel (std 0) gets std 1 so that
    /// normalising never divides by zero; an empty dataset gives [`identity`](Self::identity).
    pub fn from_dataset(data: &Dataset) -> Self {
        let c = data.channels();
        if data.is_empty() {
            return Self::identity(c);
        }
        let hw = data.height() * data.width();
        let mut sum = vec![0u64; c];
        let mut sum_sq = vec![0u64; c];
        for img in data.images().chunks_exact(c * hw) {
            for ch in 0..c {
                let (mut s, mut q) = (0u64, 0u64);
                for &x in &img[ch * hw..(ch + 1) * hw] {
                    s += x as u64;
                    q += (x as u64) * (x as u64);
                }
                sum[ch] += s;
                sum_sq[ch] += q;
            }
        }
        let count = (data.len() * hw) as u128;
        let mut mean = Vec::with_capacity(c);
        let mut std = Vec::with_capacity(c);
        for ch in 0..c {
            let (s, q) = (sum[ch] as u128, sum_sq[ch] as u128);
            // count^2 * var = count * sum_sq - sum^2, exact in u128.
            let var_num = count * q - s * s;
            let m = s as f64 / count as f64 / 255.0;
            let sd = (var_num as f64).sqrt() / count as f64 / 255.0;
            mean.push(m as f32);
            std.push(if sd > 0.0 { sd as f32 } else { 1.0 });
        }
        Self::new(&mean, &std).expect("statistics are valid")
    }

    /// The statistics the paper uses for CIFAR-10 / CIFAR-100, and for every other kind
    /// those computed from `train` (the training split) with [`from_dataset`](Self::from_dataset).
    pub fn for_kind(kind: DatasetKind, train: &Dataset) -> Self {
        match kind {
            DatasetKind::Cifar10 if train.channels() == 3 => Self::cifar10(),
            DatasetKind::Cifar100 if train.channels() == 3 => Self::cifar100(),
            _ => Self::from_dataset(train),
        }
    }

    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.mean.len()
    }
    /// Means on the `[0, 1]` scale.
    pub fn mean(&self) -> &[f32] {
        &self.mean
    }
    /// Standard deviations on the `[0, 1]` scale.
    pub fn std(&self) -> &[f32] {
        &self.std
    }
    /// The normalised value of pixel value `x` in channel `c` (panics if `c >= channels()`).
    pub fn apply(&self, c: usize, x: u8) -> f32 {
        self.lut[c * 256 + x as usize]
    }
}

/// Training augmentation: random crop of the original size from the image zero-padded by
/// `pad` pixels on every side, then a random horizontal flip if `flip`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Augment {
    /// Zero padding on each side before the random crop (0: no crop).
    pub pad: usize,
    /// Random horizontal flip with probability 1/2.
    pub flip: bool,
}

impl Augment {
    /// The paper's (and the reference code's): 4 pixels of padding, random flip.
    pub fn paper() -> Self {
        Augment { pad: 4, flip: true }
    }
    /// No augmentation (evaluation).
    pub fn none() -> Self {
        Augment { pad: 0, flip: false }
    }
    /// True if this does nothing.
    pub fn is_none(&self) -> bool {
        self.pad == 0 && !self.flip
    }
}

impl Default for Augment {
    /// [`Augment::paper`].
    fn default() -> Self {
        Self::paper()
    }
}

/// One sample's augmentation. Output pixel `(y, x)` of an `h x w` image is input pixel
/// `(y + dy, x' + dx)` with `x' = w - 1 - x` if `flip` else `x`, or pixel value 0 where that
/// falls outside the image. In torchvision's terms the crop's top-left corner in the padded
/// image is `(pad + dy, pad + dx)`, so `dy, dx` lie in `-pad..=pad`; the flip follows the crop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CropFlip {
    pub dy: i32,
    pub dx: i32,
    pub flip: bool,
}

impl CropFlip {
    /// No crop, no flip.
    pub const IDENTITY: CropFlip = CropFlip { dy: 0, dx: 0, flip: false };
}

/// Stream tag for augmentation randomness (shuffling uses another).
pub(crate) const AUGMENT_STREAM: u64 = 0x4155_474d; // "AUGM"

/// The augmentation of the `count` samples of batch `batch` in epoch `epoch`: a fixed
/// function of `(seed, epoch, batch)` and the sample's position in the batch, so a resumed
/// run reproduces it without saved RNG state. All identity when `aug` does nothing.
pub fn augment_params(aug: &Augment, seed: u64, epoch: u64, batch: u64, count: usize) -> Vec<CropFlip> {
    if aug.is_none() {
        return vec![CropFlip::IDENTITY; count];
    }
    let mut rng = StableRng::from_key(&[seed, AUGMENT_STREAM, epoch, batch]);
    let span = 2 * aug.pad as u64 + 1;
    (0..count)
        .map(|_| {
            let dy = rng.below(span) as i32 - aug.pad as i32;
            let dx = rng.below(span) as i32 - aug.pad as i32;
            let flip = aug.flip && rng.coin();
            CropFlip { dy, dx, flip }
        })
        .collect()
}

/// Writes the normalised, augmented image `src` (`u8` CHW of `shape = [c, h, w]`) into `out`
/// (`c * h * w` f32). Padding uses pixel value 0 before normalisation (see the module doc).
pub fn transform_image(
    src: &[u8],
    shape: [usize; 3],
    params: CropFlip,
    norm: &Normalization,
    out: &mut [f32],
) -> Result<()> {
    let [c, h, w] = shape;
    let n = c * h * w;
    if src.len() != n || out.len() != n || norm.channels() != c {
        return Err(Error::ShapeMismatch {
            op: "transform_image",
            detail: format!(
                "image of shape {shape:?} needs {n} values: got {} input and {} output values, {} normalisation channels",
                src.len(),
                out.len(),
                norm.channels()
            ),
        });
    }
    let (hi, wi) = (h as i64, w as i64);
    for ch in 0..c {
        let lut = &norm.lut[ch * 256..(ch + 1) * 256];
        let black = lut[0];
        let plane = &src[ch * h * w..(ch + 1) * h * w];
        let out_plane = &mut out[ch * h * w..(ch + 1) * h * w];
        for (y, out_row) in out_plane.chunks_exact_mut(w).enumerate() {
            let sy = y as i64 + params.dy as i64;
            if sy < 0 || sy >= hi {
                out_row.fill(black);
                continue;
            }
            let row = &plane[sy as usize * w..(sy as usize + 1) * w];
            if params.dx == 0 && !params.flip {
                for (o, &p) in out_row.iter_mut().zip(row) {
                    *o = lut[p as usize];
                }
                continue;
            }
            for (x, o) in out_row.iter_mut().enumerate() {
                let xs = if params.flip { wi - 1 - x as i64 } else { x as i64 };
                let sx = xs + params.dx as i64;
                *o = if sx < 0 || sx >= wi { black } else { lut[row[sx as usize] as usize] };
            }
        }
    }
    Ok(())
}
