//! Delayed gradients (DDG; Huo et al., ICML 2018), the step of a module k < K - 1 as
//! `docs/schedules.md` describes it: module k runs its forward on the fresh
//! input with its current weights and KEEPS the whole graph, then backpropagates the graph
//! it built d_k iterations earlier with the gradient that has just arrived (the one module
//! k+1 sent during iteration t-1, as in FR).
//!
//! "The graph" is the activations and the weights that produced them: the backward runs with
//! those stale weights (swapped in for the backward, then the current weights are put back
//! and updated), so the weight gradient is evaluated at stale weights, as in the DDG paper.
//! Memory: d_k + 1 activation sets (and weight copies) in module k, the "memory explosion"
//! the FR paper measures. BN running statistics are updated by the (single) forward.

use std::collections::VecDeque;
use std::sync::Arc;

use super::method::{ExtraMemory, MemoryQuery, MethodOptions, ModuleMethod, SigmaInput, TrainingMethod};
use super::schedule::{HostBatch, Worker};
use super::sigma::stage_grads;
use super::Network;
use crate::error::{Error, Result};
use crate::gpu::Tensor;
use crate::model::StageActivations;

/// Delayed gradients.
#[derive(Debug)]
pub struct Ddg;

pub fn method(_: &MethodOptions) -> Result<Arc<dyn TrainingMethod>> {
    Ok(Arc::new(Ddg))
}

impl TrainingMethod for Ddg {
    fn name(&self) -> &'static str {
        "ddg"
    }

    fn module(&self, _: &Network, _: usize, _: u64) -> Result<Box<dyn ModuleMethod>> {
        Ok(Box::new(DdgModule::default()))
    }

    /// d_k stored graphs (activations and weights) on top of the one backprop keeps.
    fn extra_memory(&self, q: &MemoryQuery) -> Result<ExtraMemory> {
        let params = 4 * q.plan.params as u64;
        Ok(ExtraMemory { bytes: q.delay() * (q.plan.activation_bytes + params), largest_tensor: 0 })
    }

    /// The stored graphs (d_k activation sets per module) are not checkpointed.
    fn resumable(&self) -> bool {
        false
    }
}

/// A forward graph kept by DDG until its gradient arrives: the activations and the weights
/// that produced them (the gradient is evaluated at those stale weights).
pub struct StoredGraph {
    pub acts: StageActivations,
    pub weights: Vec<Tensor>,
}

/// Module k's state under DDG.
#[derive(Default)]
pub struct DdgModule {
    /// Graphs built but not yet backpropagated, oldest first (at most d_k + 1).
    pub graph_history: VecDeque<StoredGraph>,
}

impl ModuleMethod for DdgModule {
    fn step(&mut self, w: &mut Worker, x: Tensor, labels: Vec<u32>, t: u64) -> Result<()> {
        let (h, acts) = w.phase("forward", t, |w| w.stage.forward_train(&x, true))?;
        drop(x);
        let weights = w.stage.snapshot_weights()?;
        self.graph_history.push_back(StoredGraph { acts, weights });
        w.send_up(h, labels, t)?;
        if t >= w.delay() {
            let g = w.take_gradient(t)?;
            let oldest = self.graph_history.pop_front().ok_or_else(|| Error::Schedule {
                detail: format!("stage {} has no stored graph at iteration {t}", w.k),
            })?;
            let dx = w.phase("backward", t, |w| {
                let current = w.stage.snapshot_weights()?;
                w.stage.load_weights(&oldest.weights)?;
                let dx = w.stage.backward(oldest.acts, &g, w.k > 0)?;
                w.stage.load_weights(&current)?;
                Ok(dx)
            })?;
            drop(g);
            w.send_down(dx, t)?;
            w.phase("update", t, |w| w.sgd())?;
        }
        w.check_held(self.graph_history.len(), "graphs", t)
    }

    /// As in FR, the gradient of batch t - d_k arrives d_k iterations after the batch.
    fn gradient_in_flight(&self, delay: u64, next_iteration: u64) -> bool {
        next_iteration >= delay
    }

    fn held(&self) -> usize {
        self.graph_history.len()
    }

    /// Module k backpropagates its oldest stored graph (batch t - d_k, stale weights) with
    /// the gradient it holds.
    fn sigma_gradient(
        &mut self,
        net: &mut Network,
        k: usize,
        at: &SigmaInput,
    ) -> Result<Option<(Vec<f32>, HostBatch)>> {
        let delay = net.stages.len() - 1 - k;
        let (Some(graph), Some(g), Some(batch)) = (self.graph_history.front(), at.pending_grad, at.delayed(delay))
        else {
            return Ok(None);
        };
        let stage = &mut net.stages[k];
        let current = stage.snapshot_weights()?;
        stage.load_weights(&graph.weights)?;
        stage.backward_keeping(&graph.acts, g, false)?;
        stage.load_weights(&current)?;
        Ok(Some((stage_grads(stage)?, batch)))
    }
}
