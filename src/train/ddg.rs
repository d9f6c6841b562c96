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

use super::schedule::{StoredGraph, Worker};
use crate::error::{Error, Result};
use crate::gpu::Tensor;

impl Worker<'_> {
    pub(super) fn ddg_step(&mut self, x: Tensor, labels: Vec<u32>, t: u64) -> Result<()> {
        let (h, acts) = self.phase("forward", t, |w| w.stage.forward_train(&x, true))?;
        drop(x);
        let weights = self.stage.snapshot_weights()?;
        self.state.graph_history.push_back(StoredGraph { acts, weights });
        self.send_up(h, labels, t)?;
        if t >= self.delay() {
            let g = self.take_gradient(t)?;
            let oldest = self.state.graph_history.pop_front().ok_or_else(|| Error::Unsupported {
                op: "pipeline",
                detail: format!("stage {} has no stored graph at iteration {t}", self.k),
            })?;
            let dx = self.phase("backward", t, |w| {
                let current = w.stage.snapshot_weights()?;
                w.stage.load_weights(&oldest.weights)?;
                let dx = w.stage.backward(oldest.acts, &g, w.k > 0)?;
                w.stage.load_weights(&current)?;
                Ok(dx)
            })?;
            drop(g);
            self.send_down(dx, t)?;
            self.phase("update", t, |w| w.sgd())?;
        }
        self.check_held(self.state.graph_history.len(), "graphs", t)
    }
}
