//! The training criterion: softmax cross-entropy averaged over the batch, with top-1/top-5
//! correct counts, all kept on the device so a step needs no host round trip.

use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::kernels::cross_entropy;

/// Device-side results of one batch.
pub struct LossOutput {
    /// `[1]`: mean loss over the batch.
    pub loss: Tensor,
    /// `[2]`: top-1 and top-5 correct counts.
    pub correct: Tensor,
}

/// Uploads labels after checking their range.
pub fn labels(gpu: &Gpu, labels: &[u32], classes: usize) -> Result<Tensor> {
    cross_entropy::labels_tensor(gpu, labels, classes)
}

/// Loss, correct counts and the gradient with respect to the logits.
pub fn forward_backward(logits: &Tensor, labels: &Tensor) -> Result<(LossOutput, Tensor)> {
    let out = cross_entropy::forward_backward(logits, labels)?;
    let dlogits = out
        .dlogits
        .ok_or(Error::Internal { op: "cross_entropy", detail: "forward_backward returned no gradient".into() })?;
    Ok((LossOutput { loss: out.loss, correct: out.correct }, dlogits))
}

/// `dlogits *= factor`, in place (a micro-batch's share of a batch-mean loss).
pub fn scale(dlogits: &Tensor, factor: f32) -> Result<()> {
    crate::kernels::elementwise::scale(dlogits, factor)
}

/// Loss and correct counts only (evaluation).
pub fn forward(logits: &Tensor, labels: &Tensor) -> Result<LossOutput> {
    let out = cross_entropy::forward(logits, labels)?;
    Ok(LossOutput { loss: out.loss, correct: out.correct })
}

/// Sums of loss and correct counts over many batches, and each batch's loss, kept on the
/// device until read.
pub struct MetricsAccumulator {
    loss_sum: Tensor,
    correct: Tensor,
    samples: usize,
    /// Each batch's mean loss, in order: the first `batches` values.
    batch_losses: Tensor,
    batches: usize,
}

/// Batch losses a [`MetricsAccumulator`] holds before it grows: one size class of the
/// caching allocator for any call of up to this many iterations, so a steady state
/// creates no buffer.
const MIN_BATCH_SLOTS: usize = 1024;

/// Averages over the samples seen, and each batch's mean loss.
#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    pub loss: f64,
    pub top1: f64,
    pub top5: f64,
    pub samples: usize,
    /// The mean loss of each batch, in order (for per-iteration curves).
    pub batch_losses: Vec<f32>,
}

impl Metrics {
    /// No samples.
    pub fn empty() -> Metrics {
        Metrics { loss: 0.0, top1: 0.0, top5: 0.0, samples: 0, batch_losses: vec![] }
    }
}

impl MetricsAccumulator {
    pub fn new(gpu: &Gpu) -> Result<MetricsAccumulator> {
        Ok(MetricsAccumulator {
            loss_sum: gpu.zeros(&[1])?,
            correct: gpu.zeros(&[2])?,
            samples: 0,
            batch_losses: gpu.empty(&[MIN_BATCH_SLOTS])?,
            batches: 0,
        })
    }

    /// Adds one batch (its mean loss weighted by its size, so partial batches count right).
    pub fn add(&mut self, out: &LossOutput, batch: usize) -> Result<()> {
        crate::kernels::elementwise::axpy(batch as f32, &out.loss, &self.loss_sum)?;
        crate::kernels::elementwise::axpy(1.0, &out.correct, &self.correct)?;
        self.samples += batch;
        let gpu = self.loss_sum.gpu().clone();
        if self.batches == self.batch_losses.numel() {
            let grown = gpu.empty(&[2 * self.batches])?;
            gpu.copy_region(&self.batch_losses, 0, &grown, 0, self.batches)?;
            self.batch_losses = grown;
        }
        gpu.copy_region(&out.loss, 0, &self.batch_losses, self.batches, 1)?;
        self.batches += 1;
        Ok(())
    }

    /// Reads the averages and the batch losses (one wait for the device).
    pub fn read(&self) -> Result<Metrics> {
        let all = self.loss_sum.gpu().gather(&[&self.loss_sum, &self.correct, &self.batch_losses])?.to_vec()?;
        let n = self.samples.max(1) as f64;
        Ok(Metrics {
            loss: all[0] as f64 / n,
            top1: all[1] as f64 / n,
            top5: all[2] as f64 / n,
            samples: self.samples,
            batch_losses: all[3..3 + self.batches].to_vec(),
        })
    }
}
