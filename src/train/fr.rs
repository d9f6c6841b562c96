//! Features Replay (Huo, Gu and Huang, NeurIPS 2018): the step of a module k < K - 1, exactly
//! as `docs/schedules.md` schedules it (the shared pipeline machinery and the
//! last module's step are in [`super::schedule`]).
//!
//! Every iteration t:
//! - play: module k appends its input to its `input_history` (at most d_k + 1 inputs) and
//!   computes its output with its current weights without keeping activations, then sends
//!   it up; module 0 reads the batch and sends the labels along to the last module;
//! - replay (once t >= d_k): module k recomputes its forward on the OLDEST input in its
//!   history with its current weights, keeping activations, backpropagates the gradient
//!   module k+1 sent during iteration t-1, updates its weights and sends the gradient of
//!   that old input down.
//!
//! Batch normalisation: modules k < K-1 run BN in training mode in both play and replay;
//! the running statistics are updated in the PLAY pass only (fresh data, the weights that
//! produced this iteration's features); the replay pass leaves them untouched. The spec
//! allows this choice; the reference code updates them in both.

use super::schedule::Worker;
use crate::error::{Error, Result};
use crate::gpu::Tensor;

impl Worker<'_> {
    pub(super) fn fr_step(&mut self, x: Tensor, labels: Vec<u32>, t: u64) -> Result<()> {
        // Play: keep the input, forward without activations, send the features up.
        self.state.input_history.push_back(x.clone());
        let h = self.phase("play", t, |w| w.stage.forward_play(&x, true))?;
        drop(x);
        self.send_up(h, labels, t)?;
        // Replay, once the warm-up of d_k iterations is over.
        if t >= self.delay() {
            let g = self.take_gradient(t)?;
            let oldest = self.state.input_history.pop_front().ok_or_else(|| Error::Unsupported {
                op: "pipeline",
                detail: format!("stage {} has no stored input to replay at iteration {t}", self.k),
            })?;
            let (_, acts) = self.phase("replay", t, |w| w.stage.forward_train(&oldest, false))?;
            drop(oldest);
            let dx = self.phase("backward", t, |w| w.stage.backward(acts, &g, w.k > 0))?;
            drop(g);
            self.send_down(dx, t)?;
            self.phase("update", t, |w| w.sgd())?;
        }
        self.check_held(self.state.input_history.len(), "inputs", t)
    }
}
