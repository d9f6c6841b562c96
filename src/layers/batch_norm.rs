//! BatchNorm2d layer with PyTorch semantics (momentum 0.1, eps 1e-5, unbiased running var).

use std::sync::atomic::{AtomicU64, Ordering};

use super::Param;
use crate::error::Result;
use crate::gpu::{Gpu, Tensor};
use crate::kernels::batch_norm::{self as bn, BnSaved, Epilogue, ShortcutGrad};

/// Per-channel batch normalisation of NCHW tensors.
pub struct BatchNorm2d {
    pub gamma: Param,
    pub beta: Param,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub momentum: f32,
    pub eps: f32,
    /// Training-mode passes that updated the running statistics (PyTorch's
    /// `num_batches_tracked`, saved as an int64 scalar like PyTorch's).
    pub num_batches_tracked: AtomicU64,
}

impl BatchNorm2d {
    /// gamma 1, beta 0, running mean 0 and running var 1, as PyTorch (and the spec) do.
    pub fn new(gpu: &Gpu, name: &str, channels: usize) -> Result<BatchNorm2d> {
        Ok(BatchNorm2d {
            gamma: Param::new(gpu, &format!("{name}.weight"), &[channels], &vec![1.0; channels])?,
            beta: Param::new(gpu, &format!("{name}.bias"), &[channels], &vec![0.0; channels])?,
            running_mean: gpu.zeros(&[channels])?,
            running_var: gpu.tensor(&[channels], &vec![1.0; channels])?,
            momentum: bn::DEFAULT_MOMENTUM,
            eps: bn::DEFAULT_EPS,
            num_batches_tracked: AtomicU64::new(0),
        })
    }

    /// Training-mode forward with batch statistics; updates the running statistics when
    /// `update_running` (a replay pass may choose not to). Returns the output and what
    /// backward needs (3 floats per channel; backward also needs the input `x`).
    pub fn forward_train(&self, x: &Tensor, update_running: bool) -> Result<(Tensor, BnSaved)> {
        self.forward_train_fused(x, update_running, Epilogue::NONE)
    }

    /// [`BatchNorm2d::forward_train`] with the following ReLU (and residual add) fused in: the
    /// output is `epi` applied to the batch norm's (see [`bn::forward_train_fused`]).
    pub fn forward_train_fused(&self, x: &Tensor, update_running: bool, epi: Epilogue) -> Result<(Tensor, BnSaved)> {
        let momentum = if update_running { self.momentum } else { 0.0 };
        let out = bn::forward_train_fused(
            x,
            &self.gamma.value,
            &self.beta.value,
            &self.running_mean,
            &self.running_var,
            momentum,
            self.eps,
            epi,
        )?;
        if update_running {
            self.num_batches_tracked.fetch_add(1, Ordering::Relaxed);
        }
        Ok((out.y, out.saved))
    }

    /// Evaluation-mode forward with the running statistics.
    pub fn forward_eval(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_eval_fused(x, Epilogue::NONE)
    }

    /// [`BatchNorm2d::forward_eval`] followed by `epi` in the same pass.
    pub fn forward_eval_fused(&self, x: &Tensor, epi: Epilogue) -> Result<Tensor> {
        let (g, b) = (&self.gamma.value, &self.beta.value);
        bn::forward_eval_fused(x, g, b, &self.running_mean, &self.running_var, self.eps, epi)
    }

    /// The running statistics with PyTorch's names (`<name>.running_mean`, `.running_var`).
    pub fn buffers(&self) -> Vec<(String, &Tensor)> {
        let base = self.gamma.name.strip_suffix(".weight").unwrap_or(&self.gamma.name);
        vec![(format!("{base}.running_mean"), &self.running_mean), (format!("{base}.running_var"), &self.running_var)]
    }

    /// PyTorch's name of the update counter (`<name>.num_batches_tracked`) and the counter.
    pub fn counter(&self) -> (String, &AtomicU64) {
        let base = self.gamma.name.strip_suffix(".weight").unwrap_or(&self.gamma.name);
        (format!("{base}.num_batches_tracked"), &self.num_batches_tracked)
    }

    /// Writes the gamma and beta gradients and returns the input gradient.
    pub fn backward(&mut self, x: &Tensor, dy: &Tensor, saved: &BnSaved) -> Result<Tensor> {
        Ok(self.backward_fused(x, dy, saved, None, None)?.0)
    }

    /// [`BatchNorm2d::backward`] with the following ReLU's backward folded in (`relu_out`: that
    /// ReLU's output, whose sign masks `dy`) and, with `shortcut`, the shortcut's gradient of
    /// the block input returned beside the input gradient (see [`bn::backward_fused`]).
    pub fn backward_fused(
        &mut self,
        x: &Tensor,
        dy: &Tensor,
        saved: &BnSaved,
        relu_out: Option<&Tensor>,
        shortcut: Option<ShortcutGrad>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        // Packed gradients (a stage's) are written in place; standalone ones replaced.
        if self.gamma.grad.is_view() && self.beta.grad.is_view() {
            let (dg, db) = (&self.gamma.grad, &self.beta.grad);
            let g = bn::backward_fused_into(x, dy, &self.gamma.value, saved, relu_out, shortcut, dg, db)?;
            return Ok((g.dx, g.dshortcut));
        }
        let g = bn::backward_fused(x, dy, &self.gamma.value, saved, relu_out, shortcut)?;
        self.gamma.set_grad(g.dgamma)?;
        self.beta.set_grad(g.dbeta)?;
        Ok((g.dx, g.dshortcut))
    }
}
