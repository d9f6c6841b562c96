//! GPipe (Huang et al., 2019): synchronous micro-batch pipelining, as `docs/schedules.md`
//! describes it. Module 0 cuts each batch of N samples into M micro-batches (near-equal
//! sizes, the first N mod M one sample larger; fewer when N < M) that flow up the K modules
//! one after the other, so module k runs the forward of micro-batch m while module k+1 runs
//! that of m-1. Every module keeps each micro-batch's activations (fill), the last module
//! then runs loss and backward of every micro-batch in order and sends each input gradient
//! down as it is computed, every module backpropagates them in the same order (drain), and
//! each module takes one SGD step with the sum of its micro-batch gradients.
//!
//! The update is the gradient of the whole batch's mean loss: micro-batch m's logit
//! gradient is scaled by n_m / N, so the sum over micro-batches is the batch mean. Batch norm
//! normalises per micro-batch and updates its running statistics once per micro-batch (as
//! PyTorch's GPipe and DDP do), so for M > 1 the numbers differ from backprop on the whole
//! batch by that alone. With M = 1 nothing is scaled or summed: it is model-parallel
//! backprop, operation for operation.
//!
//! Bubble: of the M + K - 1 forward slots of an iteration each module is idle in K - 1, a
//! fraction (K - 1) / (M + K - 1). Memory: a module holds the activations of all M
//! micro-batches (those of one full batch, as backprop) plus one gradient accumulator.

use std::sync::Arc;

use super::method::{ExtraMemory, MemoryQuery, MethodOptions, ModuleMethod, SigmaInput, TrainingMethod};
use super::schedule::{HostBatch, Worker};
use super::sigma::bp_gradients;
use super::Network;
use crate::error::{Error, Result};
use crate::gpu::Tensor;
use crate::layers::loss::{self, MetricsAccumulator};
use crate::model::StageActivations;

/// GPipe with `microbatches` micro-batches per batch.
#[derive(Debug)]
pub struct Gpipe {
    pub microbatches: usize,
}

pub fn method(opts: &MethodOptions) -> Result<Arc<dyn TrainingMethod>> {
    if opts.microbatches == 0 {
        return Err(Error::InvalidConfig { op: "train", detail: "--microbatches must be at least 1".into() });
    }
    Ok(Arc::new(Gpipe { microbatches: opts.microbatches }))
}

impl TrainingMethod for Gpipe {
    fn name(&self) -> &'static str {
        "gpipe"
    }

    fn module(&self, _: &Network, _: usize, _: u64) -> Result<Box<dyn ModuleMethod>> {
        Ok(Box::new(GpipeModule { microbatches: self.microbatches, acc: None }))
    }

    fn keeps_state(&self) -> bool {
        false
    }

    /// The gradient accumulator (the micro-batches' activations together are one batch's).
    fn extra_memory(&self, q: &MemoryQuery) -> Result<ExtraMemory> {
        let bytes = if self.microbatches > 1 { 4 * q.plan.params as u64 } else { 0 };
        Ok(ExtraMemory { bytes, largest_tensor: 0 })
    }
}

/// The fraction of an iteration a module idles: (K - 1) / (M + K - 1).
pub fn bubble_fraction(stages: usize, microbatches: usize) -> f64 {
    let k = stages.max(1) as f64;
    (k - 1.0) / (microbatches.max(1) as f64 + k - 1.0)
}

/// Sizes of the micro-batches of a batch of `n`: min(m, n) near-equal parts, the first
/// `n mod parts` one larger.
pub fn micro_batch_sizes(n: usize, m: usize) -> Vec<usize> {
    let parts = m.min(n).max(1);
    (0..parts).map(|i| n / parts + usize::from(i < n % parts)).collect()
}

/// GPipe keeps nothing between iterations but its gradient accumulator (allocated once).
pub struct GpipeModule {
    microbatches: usize,
    acc: Option<Tensor>,
}

impl GpipeModule {
    /// This iteration's micro-batches: module 0 cuts the batch, the others receive them.
    fn inputs(&self, w: &mut Worker, t: u64) -> Result<Vec<(Tensor, Vec<u32>)>> {
        if w.k == 0 {
            let b = w.phase("receive", t, |w| w.receive_batch())?;
            let per: usize = w.input_shape().iter().product();
            let mut out = Vec::new();
            let mut start = 0;
            for n in micro_batch_sizes(b.labels.len(), self.microbatches) {
                let x = w.upload(&b.images[start * per..(start + n) * per], n)?;
                out.push((x, b.labels[start..start + n].to_vec()));
                start += n;
            }
            return Ok(out);
        }
        let (x, labels, parts) = w.phase("receive", t, |w| w.receive_part())?;
        let mut out = vec![(x, labels)];
        while out.len() < parts {
            let (x, labels, _) = w.phase("receive", t, |w| w.receive_part())?;
            out.push((x, labels));
        }
        Ok(out)
    }
}

impl ModuleMethod for GpipeModule {
    fn iteration(&mut self, w: &mut Worker, t: u64, metrics: &mut Option<MetricsAccumulator>) -> Result<()> {
        let inputs = self.inputs(w, t)?;
        let parts = inputs.len();
        let total: usize = inputs.iter().map(|(_, l)| l.len()).sum();
        if parts > 1 && self.acc.is_none() {
            self.acc = Some(w.stage.grad_accumulator()?);
        }
        // Fill: every micro-batch's forward, activations kept (and the logits, on the last
        // module; the others send their output up).
        let mut kept: Vec<(StageActivations, Option<Tensor>, Vec<u32>)> = Vec::with_capacity(parts);
        for (x, labels) in inputs {
            let (h, acts) = w.phase("forward", t, |w| w.stage.forward_train(&x, true))?;
            drop(x);
            if w.is_last() {
                w.stage.watch_output(&h)?;
                kept.push((acts, Some(h), labels));
            } else {
                w.send_up_part(h, labels, parts, t)?;
                kept.push((acts, None, Vec::new()));
            }
        }
        // Drain: every micro-batch's backward in the same order, gradients summed in order:
        // the first stored, the middle ones added to the sum, the sum added to the last.
        for (m, (acts, logits, labels)) in kept.into_iter().enumerate() {
            let need_dx = w.k > 0;
            let dx = if let Some(h) = logits {
                let y = loss::labels(&w.stage.gpu, &labels, w.classes)?;
                let (lo, dlogits) = w.phase("loss", t, |_| loss::forward_backward(&h, &y))?;
                drop(h);
                if parts > 1 {
                    loss::scale(&dlogits, labels.len() as f32 / total as f32)?;
                }
                if let Some(mt) = metrics.as_mut() {
                    mt.add(&lo, labels.len())?;
                }
                w.phase("backward", t, |w| w.stage.backward(acts, &dlogits, need_dx))?
            } else {
                let g = w.take_gradient(t)?;
                w.phase("backward", t, |w| w.stage.backward(acts, &g, need_dx))?
            };
            if let (true, Some(acc)) = (parts > 1, &self.acc) {
                match m {
                    0 => w.stage.store_grads(acc)?,
                    m if m + 1 < parts => w.stage.accumulate_grads(acc)?,
                    _ => w.stage.add_to_grads(acc)?,
                }
            }
            w.send_down(dx, t)?;
        }
        w.phase("update", t, |w| w.sgd())
    }

    /// Not called: [`Self::iteration`] handles every module.
    fn step(&mut self, _: &mut Worker, _: Tensor, _: Vec<u32>, _: u64) -> Result<()> {
        Err(Error::Schedule { detail: "GPipe steps whole iterations".into() })
    }

    /// Every micro-batch's gradient comes back within its iteration.
    fn gradient_in_flight(&self, _delay: u64, _next_iteration: u64) -> bool {
        false
    }

    /// The sum over the most recent batch's micro-batches of their weighted backprop
    /// gradients (per-micro-batch batch norm), as the update would use it.
    fn sigma_gradient(
        &mut self,
        net: &mut Network,
        k: usize,
        at: &SigmaInput,
    ) -> Result<Option<(Vec<f32>, HostBatch)>> {
        let Some(batch) = at.latest() else { return Ok(None) };
        let n = batch.labels.len();
        let per = batch.images.len() / n.max(1);
        let mut sum: Vec<f32> = Vec::new();
        let mut start = 0;
        for size in micro_batch_sizes(n, self.microbatches) {
            let part = HostBatch {
                images: batch.images[start * per..(start + size) * per].to_vec(),
                labels: batch.labels[start..start + size].to_vec(),
            };
            let g = bp_gradients(net, &part)?.swap_remove(k);
            let share = size as f32 / n as f32;
            if sum.is_empty() {
                sum = vec![0.0; g.len()];
            }
            for (s, v) in sum.iter_mut().zip(g) {
                *s += share * v;
            }
            start += size;
        }
        Ok(Some((sum, batch)))
    }
}
