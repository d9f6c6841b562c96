//! Divergence detection on the device: a [`FiniteWatch`] owns one counter per watched tensor
//! and counts the NaN and infinite values that training produces in it. A diverged run must
//! stop, however its loss looks: NaN activations can vanish on their way to the loss (a ReLU
//! or a max on some drivers returns 0 for NaN), so the loss alone stays finite while a
//! module's weights are all NaN.
//!
//! What is watched, per stage: its output and the input gradient it sends down (every
//! iteration, one small pass each), each parameter's gradient, value and momentum buffer
//! (counted inside the SGD step itself, no extra pass), and the batch-norm running statistics
//! (at the end of an epoch, before evaluation and checkpointing). Counters stay on the device;
//! reading them ([`FiniteWatch::read`]) is one 4-byte-per-slot copy.

use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::kernels::nonfinite;
use crate::kernels::sgd::{self, SgdConfig};

use super::Param;

/// A watched tensor's counter and its name (what an error reports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NonFiniteCount {
    pub name: String,
    pub count: u32,
}

/// Counters of non-finite values, one per named slot, on one device.
pub struct FiniteWatch {
    counters: Tensor,
    names: std::sync::Arc<Vec<String>>,
}

/// A read of a watch's counters in flight ([`FiniteWatch::read_async`]).
pub struct PendingCounts {
    read: crate::gpu::PendingRead,
    names: std::sync::Arc<Vec<String>>,
}

impl PendingCounts {
    /// Waits for the copy and returns the watched tensors that held non-finite values.
    pub fn wait(self) -> Result<Vec<NonFiniteCount>> {
        let counts: Vec<u32> = self.read.wait()?.into_iter().map(f32::to_bits).collect();
        Ok(found(&self.names, counts))
    }
}

fn found(names: &[String], counts: Vec<u32>) -> Vec<NonFiniteCount> {
    names
        .iter()
        .zip(counts)
        .filter(|(_, c)| *c > 0)
        .map(|(n, c)| NonFiniteCount { name: n.clone(), count: c })
        .collect()
}

/// Slot of a stage's output.
pub const OUTPUT: usize = 0;
/// Slot of the gradient a stage sends to the stage below.
pub const INPUT_GRAD: usize = 1;

impl FiniteWatch {
    /// A watch over `params` (three slots each: gradient, value, momentum) and `buffers`
    /// (one each), after the two slots of the output and the input gradient.
    pub fn new(gpu: &Gpu, params: &[&Param], buffers: &[(String, &Tensor)]) -> Result<FiniteWatch> {
        let mut names = vec!["output".to_string(), "input gradient".to_string()];
        for p in params {
            names.push(format!("{}.grad", p.name));
            names.push(p.name.clone());
            names.push(crate::checkpoint::momentum_name(&p.name));
        }
        names.extend(buffers.iter().map(|(n, _)| n.clone()));
        Ok(FiniteWatch { counters: nonfinite::counters(gpu, names.len())?, names: std::sync::Arc::new(names) })
    }

    /// The first slot of parameter `index` (in the order given to [`Self::new`]).
    pub fn param_slot(index: usize) -> usize {
        2 + 3 * index
    }

    /// The counter buffer (for kernels that count into the slots themselves).
    pub fn counters(&self) -> &Tensor {
        &self.counters
    }

    /// Counts the non-finite values of `t` into `slot` ([`OUTPUT`] or [`INPUT_GRAD`]).
    pub fn check(&self, t: &Tensor, slot: usize) -> Result<()> {
        nonfinite::count(t, &self.counters, slot)
    }

    /// Counts the non-finite values of the buffers (same order as given to [`Self::new`]).
    pub fn check_buffers(&self, params: usize, buffers: &[(String, &Tensor)]) -> Result<()> {
        let first = Self::param_slot(params);
        if first + buffers.len() != self.names.len() {
            return Err(Error::ShapeMismatch {
                op: "watch",
                detail: format!("{} buffers for a watch of {} slots", buffers.len(), self.names.len()),
            });
        }
        for (i, (_, t)) in buffers.iter().enumerate() {
            nonfinite::count(t, &self.counters, first + i)?;
        }
        Ok(())
    }

    /// One SGD step of parameter `index` that counts its non-finite values.
    pub fn sgd_step(&self, index: usize, p: &Param, cfg: &SgdConfig, first_step: bool) -> Result<()> {
        let slot = Self::param_slot(index);
        if slot + 2 >= self.names.len() || self.names[slot + 1] != p.name {
            return Err(Error::ShapeMismatch {
                op: "watch",
                detail: format!("parameter {index} ('{}') is not the one this watch was built for", p.name),
            });
        }
        sgd::step_watched(&p.value, &p.grad, &p.momentum, cfg, first_step, &self.counters, slot)
    }

    /// The watched tensors that held non-finite values so far, in slot order (waits for the
    /// device). Empty when training is sound.
    pub fn read(&self) -> Result<Vec<NonFiniteCount>> {
        Ok(found(&self.names, nonfinite::read_counters(&self.counters)?))
    }

    /// Starts copying the counters as they stand after all work recorded so far, without
    /// waiting: the host records the next iteration while the device finishes this one.
    pub fn read_async(&self) -> Result<PendingCounts> {
        Ok(PendingCounts { read: self.counters.gpu().read_async(&self.counters)?, names: self.names.clone() })
    }
}

/// One line naming the first few tensors of `found` (for errors).
pub fn describe(found: &[NonFiniteCount]) -> String {
    let mut parts: Vec<String> = found.iter().take(4).map(|f| format!("{} ({} values)", f.name, f.count)).collect();
    if found.len() > 4 {
        parts.push(format!("and {} more tensors", found.len() - 4));
    }
    format!("NaN or infinite values in {}", parts.join(", "))
}
