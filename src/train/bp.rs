//! Backprop (BP), on one device or model-parallel over K: every iteration module k runs its
//! forward keeping activations and sends its output up, then waits for the gradient the
//! module above sends back in the same iteration, backpropagates it, sends its input
//! gradient down and updates. Exact, and backward-locked: on K devices only one module works
//! at a time (the baseline Features Replay is measured against). `docs/schedules.md`.
//!
//! The numbers are those of [`Network::bp_step`](super::Network::bp_step) (same layers,
//! same order of operations per module; tests/bp.rs checks bit equality).

use std::sync::Arc;

use super::method::{MethodOptions, ModuleMethod, SigmaInput, TrainingMethod};
use super::schedule::{HostBatch, Worker};
use super::sigma::bp_gradients;
use super::Network;
use crate::error::Result;
use crate::gpu::Tensor;

/// Backprop.
#[derive(Debug)]
pub struct Bp;

pub fn method(_: &MethodOptions) -> Result<Arc<dyn TrainingMethod>> {
    Ok(Arc::new(Bp))
}

impl TrainingMethod for Bp {
    fn name(&self) -> &'static str {
        "bp"
    }

    fn module(&self, _: &Network, _: usize, _: u64) -> Result<Box<dyn ModuleMethod>> {
        Ok(Box::new(BpModule))
    }

    fn keeps_state(&self) -> bool {
        false
    }
}

/// BP keeps nothing between iterations.
pub struct BpModule;

impl ModuleMethod for BpModule {
    fn step(&mut self, w: &mut Worker, x: Tensor, labels: Vec<u32>, t: u64) -> Result<()> {
        let (h, acts) = w.phase("forward", t, |w| w.stage.forward_train(&x, true))?;
        drop(x);
        w.send_up(h, labels, t)?;
        let g = w.take_gradient(t)?;
        let dx = w.phase("backward", t, |w| w.stage.backward(acts, &g, w.k > 0))?;
        drop(g);
        w.send_down(dx, t)?;
        w.phase("update", t, |w| w.sgd())
    }

    /// The gradient of a batch comes back within its iteration.
    fn gradient_in_flight(&self, _delay: u64, _next_iteration: u64) -> bool {
        false
    }

    /// The exact gradient of the most recent batch (sigma 1 up to round-off).
    fn sigma_gradient(
        &mut self,
        net: &mut Network,
        k: usize,
        at: &SigmaInput,
    ) -> Result<Option<(Vec<f32>, HostBatch)>> {
        let Some(batch) = at.latest() else { return Ok(None) };
        Ok(Some((bp_gradients(net, &batch)?.swap_remove(k), batch)))
    }
}
