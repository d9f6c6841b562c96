//! The sufficient-direction constant of the FR paper's convergence analysis, measured per
//! module: sigma_k = <g_k, g_BP_k> / ||g_BP_k||^2, where g_k is the weight gradient the
//! method would apply to module k now and g_BP_k the true backprop gradient of the same batch
//! at the current weights of every module. sigma_k > 0 means the method still moves module k
//! in a descent direction.
//!
//! Which batch and which g_k at the boundary before iteration t is each method's choice
//! ([`ModuleMethod::sigma_gradient`](super::method::ModuleMethod::sigma_gradient), in the
//! method's file): FR replays batch t-d_k with the gradient it holds, DDG backpropagates its
//! oldest graph, DNI its predictor's gradient on batch t-1, DGL its local loss on batch t-1,
//! BP and GPipe the exact gradient of batch t-1. The last module, every method: forward
//! through the modules below at their current weights, loss and backward on batch t-1 (it
//! gets the true gradient, so sigma is 1 up to round-off; it is measured all the same).
//! [`measure_bp`]: the backprop gradient of a batch computed twice (sigma exactly 1: a check
//! of the measurement itself).
//!
//! Nothing here changes the training trajectory: BN runs in training mode without updating
//! its running statistics, no optimiser step is taken, stored inputs, graphs, gradients and
//! predictions are left in place, and parameter gradients (rewritten by every backward before
//! use) are the only device state touched. Dot products are taken on the host in f64 (the
//! gradients are small and read only every N iterations).

use super::method::SigmaInput;
use super::schedule::{HostBatch, PipelineState};
use super::Network;
use crate::error::{Error, Result};
use crate::gpu::Tensor;
use crate::layers::loss;
use crate::model::Stage;

/// Host copies of a stage's parameter gradients, in [`Stage::params`] order.
pub fn stage_grads(stage: &Stage) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    for p in stage.params() {
        out.extend(p.grad.to_vec()?);
    }
    Ok(out)
}

/// sigma = <g, g_bp> / ||g_bp||^2 (NaN when the reference gradient is zero).
pub fn sigma(g: &[f32], g_bp: &[f32]) -> f64 {
    let dot: f64 = g.iter().zip(g_bp).map(|(a, b)| *a as f64 * *b as f64).sum();
    let norm: f64 = g_bp.iter().map(|b| (*b as f64).powi(2)).sum();
    if norm > 0.0 {
        dot / norm
    } else {
        f64::NAN
    }
}

pub(super) fn images(net: &Network, batch: &HostBatch) -> Result<Tensor> {
    let mut shape = vec![batch.labels.len()];
    shape.extend(&net.spec.input);
    net.stages[0].gpu.tensor(&shape, &batch.images)
}

/// Training-mode forward (no running-statistics update) of stages `0..upto` on `batch`:
/// the input of stage `upto`, on its device.
pub fn input_of_stage(net: &Network, batch: &HostBatch, upto: usize) -> Result<Tensor> {
    let mut h = images(net, batch)?;
    for s in &net.stages[..upto] {
        h = net.transport.transfer(&h, &s.gpu)?;
        h = s.forward_play(&h, false)?;
    }
    net.transport.transfer(&h, &net.stages[upto].gpu)
}

/// The true backprop gradient of `batch` at the current weights, per stage (host copies).
pub fn bp_gradients(net: &mut Network, batch: &HostBatch) -> Result<Vec<Vec<f32>>> {
    let k_total = net.stages.len();
    let mut h = images(net, batch)?;
    let mut acts = Vec::with_capacity(k_total);
    for k in 0..k_total {
        h = net.transport.transfer(&h, &net.stages[k].gpu)?;
        let (out, a) = net.stages[k].forward_train(&h, false)?;
        acts.push(a);
        h = out;
    }
    let y = loss::labels(&net.stages[k_total - 1].gpu, &batch.labels, net.spec.classes)?;
    let (_, mut grad) = loss::forward_backward(&h, &y)?;
    for k in (0..k_total).rev() {
        let a = acts.pop().ok_or(Error::Schedule { detail: "sigma: missing activations".into() })?;
        grad = net.transport.transfer(&grad, &net.stages[k].gpu)?;
        if let Some(g) = net.stages[k].backward(a, &grad, k > 0)? {
            grad = g;
        }
    }
    net.stages.iter().map(stage_grads).collect()
}

/// The last module's gradient on `batch`, as every method computes it.
fn last_module_gradient(net: &mut Network, batch: &HostBatch) -> Result<Vec<f32>> {
    let last = net.stages.len() - 1;
    let x = input_of_stage(net, batch, last)?;
    let stage = &mut net.stages[last];
    let (out, acts) = stage.forward_train(&x, false)?;
    let y = loss::labels(&stage.gpu, &batch.labels, net.spec.classes)?;
    let (_, dlogits) = loss::forward_backward(&out, &y)?;
    stage.backward(acts, &dlogits, false)?;
    stage_grads(stage)
}

/// sigma per stage for a pipeline at its current boundary (NaN for a module still warming
/// up, or before any batch was seen). Module k < K-1's gradient is its method's
/// [`ModuleMethod::sigma_gradient`](super::method::ModuleMethod::sigma_gradient).
pub fn measure(net: &mut Network, state: &mut PipelineState) -> Result<Vec<f64>> {
    let k_total = net.stages.len();
    let mut out = vec![f64::NAN; k_total];
    for (k, slot) in out.iter_mut().enumerate().take(k_total - 1) {
        let st = &mut state.stages[k];
        let at = SigmaInput { recent: &state.recent_batches, pending_grad: st.pending_grad.as_ref() };
        if let Some((g, batch)) = st.module.sigma_gradient(net, k, &at)? {
            let bp = bp_gradients(net, &batch)?;
            *slot = sigma(&g, &bp[k]);
        }
    }
    if let Some(batch) = state.recent_batches.back() {
        let g = last_module_gradient(net, batch)?;
        let bp = bp_gradients(net, batch)?;
        out[k_total - 1] = sigma(&g, &bp[k_total - 1]);
    }
    net.sync()?;
    Ok(out)
}

/// sigma per stage for backprop itself on `batch` (1 by construction: checks the measurement).
pub fn measure_bp(net: &mut Network, batch: &HostBatch) -> Result<Vec<f64>> {
    let g = bp_gradients(net, batch)?;
    let bp = bp_gradients(net, batch)?;
    net.sync()?;
    Ok(g.iter().zip(&bp).map(|(a, b)| sigma(a, b)).collect())
}
