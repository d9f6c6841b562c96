//! Launchers for `shaders/cross_entropy.wgsl`: softmax cross-entropy, mean over the batch,
//! with its gradient and top-1 / top-5 correct counts, all reduced on the device.
//!
//! Labels are a `[N]` f32 tensor of class indices (exact for up to 2^24 classes); build it
//! with [`labels_tensor`], which rejects out-of-range labels. The shader also treats a label
//! that is not an integer in `[0, C)` as an ignored row (zero loss, zero gradient, not
//! correct; the mean still divides by N), so bad device-side labels never read out of bounds.

use bytemuck::{Pod, Zeroable};

use super::{check_same_device, dims};
use crate::error::{Error, Result};
use crate::gpu::{Arg, Gpu, Kernel, Tensor};

const OP: &str = "cross_entropy";
/// Invocations per workgroup of the per-row entry points.
const WG_ROWS: u32 = 64;
/// The largest class count whose indices f32 represents exactly.
pub const MAX_CLASSES: usize = 1 << 24;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    rows: u32,
    classes: u32,
    topk: u32,
    _pad: u32,
}

/// What [`forward_backward`] and [`forward`] return; every field stays on the device.
#[derive(Clone, Debug)]
pub struct CrossEntropyOut {
    /// `[1]`: mean over the batch of `logsumexp(logits_n) - logits_n[label_n]`.
    pub loss: Tensor,
    /// `[N, C]`: `(softmax(logits) - onehot(labels)) / N`, the gradient of `loss`; `None` from
    /// [`forward`].
    pub dlogits: Option<Tensor>,
    /// `[2]`: the number of rows whose label is the top-1 and within the top-5 logits (as
    /// f32; top-k uses k = min(5, C)). Ties are broken as PyTorch's `argmax` and `topk` do,
    /// lowest class index first: the label counts as within the top k when fewer than k
    /// classes rank ahead of it, a class ranking ahead when its logit is greater, or equal
    /// with a lower index. A row with a NaN or infinite logit is never correct.
    pub correct: Tensor,
}

impl CrossEntropyOut {
    /// Reads `(loss, top-1 count, top-5 count)` back to the host (two small reads, each of
    /// which waits for the device).
    pub fn read(&self) -> Result<(f32, f32, f32)> {
        let loss = self.loss.to_vec()?;
        let correct = self.correct.to_vec()?;
        Ok((loss[0], correct[0], correct[1]))
    }
}

/// Uploads class labels as the `[N]` f32 tensor the kernels take, after checking that each
/// is below `num_classes` (and that the class count is representable).
pub fn labels_tensor(gpu: &Gpu, labels: &[u32], num_classes: usize) -> Result<Tensor> {
    check_classes(num_classes)?;
    if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= num_classes) {
        return Err(Error::ShapeMismatch {
            op: OP,
            detail: format!("label {l} at position {i} is out of range for {num_classes} classes"),
        });
    }
    let data: Vec<f32> = labels.iter().map(|&l| l as f32).collect();
    gpu.tensor(&[labels.len()], &data)
}

fn check_classes(c: usize) -> Result<()> {
    if c == 0 || c > MAX_CLASSES {
        return Err(Error::Unsupported {
            op: OP,
            detail: format!("{c} classes: the class count must be in 1..={MAX_CLASSES}"),
        });
    }
    Ok(())
}

/// Loss, gradient and correct counts (two dispatches; nothing waits on the device).
/// `logits` is `[N, C]` with N >= 1, `labels` a `[N]` tensor from [`labels_tensor`].
pub fn forward_backward(logits: &Tensor, labels: &Tensor) -> Result<CrossEntropyOut> {
    run(logits, labels, true)
}

/// Loss and correct counts without the gradient (evaluation); `dlogits` is `None`.
pub fn forward(logits: &Tensor, labels: &Tensor) -> Result<CrossEntropyOut> {
    run(logits, labels, false)
}

fn run(logits: &Tensor, labels: &Tensor, grad: bool) -> Result<CrossEntropyOut> {
    let [n, c] = dims(OP, "logits", logits)?;
    let [ln] = dims(OP, "labels", labels)?;
    check_same_device(OP, logits, labels)?;
    if ln != n {
        return Err(Error::ShapeMismatch { op: OP, detail: format!("{ln} labels for logits {:?}", logits.shape()) });
    }
    if n == 0 {
        return Err(Error::ShapeMismatch { op: OP, detail: "the mean over an empty batch is undefined".into() });
    }
    check_classes(c)?;
    if n.checked_mul(c).is_none_or(|e| e >= u32::MAX as usize) || n >= (u32::MAX / 3) as usize {
        return Err(Error::Unsupported {
            op: OP,
            detail: format!("logits {:?} exceed 32-bit indexing", logits.shape()),
        });
    }
    let gpu = logits.gpu();
    let params = Params { rows: n as u32, classes: c as u32, topk: c.min(5) as u32, _pad: 0 };
    let part = gpu.empty(&[n, 3])?;
    let loss = gpu.zeros(&[1])?;
    let correct = gpu.zeros(&[2])?;
    let dlogits = if grad { Some(gpu.empty(&[n, c])?) } else { None };
    let grid = gpu.grid_1d(n, WG_ROWS);
    match &dlogits {
        Some(dl) => gpu.dispatch(
            &Kernel::new("cross_entropy", "rows_grad"),
            &params,
            &[Arg::Storage(logits), Arg::Storage(labels), Arg::Storage(&part), Arg::Storage(dl)],
            grid,
        )?,
        None => gpu.dispatch(
            &Kernel::new("cross_entropy", "rows"),
            &params,
            &[Arg::Storage(logits), Arg::Storage(labels), Arg::Storage(&part)],
            grid,
        )?,
    }
    // Bindings 1, 2 and 4 are unused by `reduce`; `part` fills their slots.
    gpu.dispatch(
        &Kernel::new("cross_entropy", "reduce"),
        &params,
        &[
            Arg::Storage(&part),
            Arg::Storage(&part),
            Arg::Storage(&part),
            Arg::Storage(&part),
            Arg::Storage(&loss),
            Arg::Storage(&correct),
        ],
        [1, 1, 1],
    )?;
    Ok(CrossEntropyOut { loss, dlogits, correct })
}
