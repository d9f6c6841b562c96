//! Synthetic gradients (DNI; Jaderberg et al., 2017), the step of a module k < K - 1 as
//! `docs/schedules.md` describes it: module k runs forward on the fresh
//! input keeping activations, sends h_k up, asks its predictor M_k for dL/dh_k, backpropagates
//! the prediction and updates at once. M_k learns with a squared error against the true delta_k
//! (at per-sample scale, see [`GradientPredictor`]) that module k+1 sends back (computed with module
//! k+1's own, possibly synthetic, gradient: the usual bootstrapped targets).
//!
//! Timing: module k+1 sends delta_k^t during iteration t; module k trains M_k on it at the
//! end of iteration t+1 (after its own update there), so modules never wait for each other
//! within an iteration. At the end of an epoch the last true gradient trains M_k right away,
//! so no prediction is in flight at a checkpoint. The predictor uses the module's optimiser
//! and learning rate. BN running statistics are updated by the module's (single) forward.

use super::schedule::{Method, Worker};
use crate::error::{Error, Result};
use crate::gpu::Tensor;
use crate::layers::predictor::GradientPredictor;

impl Worker<'_> {
    pub(super) fn dni_step(&mut self, x: Tensor, labels: Vec<u32>, t: u64) -> Result<()> {
        let (h, acts) = self.phase("forward", t, |w| w.stage.forward_train(&x, true))?;
        drop(x);
        let (synthetic, prediction) = self.phase("predict", t, |w| {
            let (pred, acts) = w
                .state
                .predictor
                .as_ref()
                .ok_or_else(|| Error::Unsupported {
                    op: "dni",
                    detail: format!("stage {} has no gradient predictor", w.k),
                })?
                .forward(&h)?;
            Ok((GradientPredictor::synthetic_gradient(&pred)?, acts))
        })?;
        self.send_up(h, labels, t)?;
        let dx = self.phase("backward", t, |w| w.stage.backward(acts, &synthetic, w.k > 0))?;
        drop(synthetic);
        self.send_down(dx, t)?;
        self.phase("update", t, |w| w.sgd())?;
        // The true gradient of the previous iteration's features trains the predictor.
        if t >= 1 && self.state.prediction.is_some() {
            let g = self.take_gradient(t)?;
            self.train_predictor(g, t)?;
        }
        self.state.prediction = Some(prediction);
        Ok(())
    }

    /// One SGD step of M_k on the stored prediction against the true gradient `g`.
    fn train_predictor(&mut self, g: Tensor, t: u64) -> Result<()> {
        let acts = self.state.prediction.take().ok_or_else(|| Error::Unsupported {
            op: "dni",
            detail: format!("stage {} got a true gradient but made no prediction", self.k),
        })?;
        self.phase("train predictor", t, |w| {
            let p = w.state.predictor.as_mut().ok_or_else(|| Error::Unsupported {
                op: "dni",
                detail: format!("stage {} has no gradient predictor", w.k),
            })?;
            let dpred = GradientPredictor::loss_gradient(&acts.output, &g)?;
            p.backward(&acts, &dpred)?;
            w.predictor_sgd()
        })
    }

    /// At the end of an epoch: DNI trains on the gradient that arrived last.
    pub(super) fn finish_epoch(&mut self) -> Result<()> {
        if matches!(self.method, Method::Dni(_)) && self.state.prediction.is_some() {
            if let Some(g) = self.state.pending_grad.take() {
                self.train_predictor(g, u64::MAX)?;
            }
        }
        Ok(())
    }
}
