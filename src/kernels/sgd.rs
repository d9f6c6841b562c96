//! Launcher for `shaders/sgd.wgsl`: stochastic gradient descent with momentum, dampening,
//! Nesterov momentum and weight decay, with the semantics of `torch.optim.SGD`, in place.

use bytemuck::{Pod, Zeroable};

use super::check_same_shape;
use crate::error::{Error, Result};
use crate::gpu::{Arg, Kernel, Tensor};

const OP: &str = "sgd";
/// Invocations per workgroup; each updates 4 elements.
const WG: u32 = 256;

const NESTEROV: u32 = 1;
const FIRST: u32 = 2;
const MOMENTUM: u32 = 4;
const DECAY: u32 = 8;

/// The hyper-parameters of `torch.optim.SGD` (without `maximize`). The learning rate may
/// change from step to step (schedules): pass the current one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdConfig {
    pub lr: f32,
    pub momentum: f32,
    pub dampening: f32,
    pub weight_decay: f32,
    pub nesterov: bool,
}

impl SgdConfig {
    /// Errors on what PyTorch rejects (negative or non-finite lr, momentum or weight decay;
    /// Nesterov without momentum or with dampening), and on a non-finite dampening.
    pub fn validate(&self) -> Result<()> {
        let bad = |detail: String| Err(Error::Unsupported { op: OP, detail });
        for (name, v) in [("learning rate", self.lr), ("momentum", self.momentum), ("weight decay", self.weight_decay)]
        {
            if !(v.is_finite() && v >= 0.0) {
                return bad(format!("invalid {name} {v}: it must be finite and >= 0"));
            }
        }
        if !self.dampening.is_finite() {
            return bad(format!("invalid dampening {}", self.dampening));
        }
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            return bad(format!(
                "Nesterov momentum requires a momentum > 0 and zero dampening (momentum {}, dampening {})",
                self.momentum, self.dampening
            ));
        }
        Ok(())
    }
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    flags: u32,
    lr: f32,
    momentum: f32,
    one_minus_dampening: f32,
    weight_decay: f32,
    slot: u32,
    chunk: u32,
}

fn check(param: &Tensor, grad: &Tensor, momentum_buf: &Tensor) -> Result<()> {
    check_same_shape(OP, param, grad)?;
    check_same_shape(OP, param, momentum_buf)?;
    if param.same_buffer(grad) || param.same_buffer(momentum_buf) || grad.same_buffer(momentum_buf) {
        return Err(Error::ShapeMismatch {
            op: OP,
            detail: "parameter, gradient and momentum buffer must be three different tensors".into(),
        });
    }
    if param.numel() >= (u32::MAX - 4) as usize {
        return Err(Error::Unsupported { op: OP, detail: format!("{:?} exceeds 32-bit indexing", param.shape()) });
    }
    Ok(())
}

/// How a step counts non-finite values.
#[derive(Clone, Copy)]
enum Watch<'a> {
    None,
    /// Into three counters from a slot.
    Slot(&'a Tensor, usize),
    /// Packed parameters: the counters, the chunk -> slot table and vec4s per chunk.
    Packed(&'a Tensor, &'a Tensor, u32),
}

fn dispatch(
    param: &Tensor,
    grad: &Tensor,
    momentum_buf: &Tensor,
    cfg: &SgdConfig,
    first_step: bool,
    watch: Watch,
) -> Result<()> {
    let flag = |on: bool, bit: u32| if on { bit } else { 0 };
    let params = Params {
        n: param.numel() as u32,
        flags: flag(cfg.nesterov, NESTEROV)
            | flag(first_step, FIRST)
            | flag(cfg.momentum != 0.0, MOMENTUM)
            | flag(cfg.weight_decay != 0.0, DECAY),
        lr: cfg.lr,
        momentum: cfg.momentum,
        // PyTorch computes 1 - dampening in double precision, then rounds it to the tensor's
        // dtype.
        one_minus_dampening: (1.0 - cfg.dampening as f64) as f32,
        weight_decay: cfg.weight_decay,
        slot: if let Watch::Slot(_, slot) = watch { slot as u32 } else { 0 },
        chunk: if let Watch::Packed(_, _, chunk) = watch { chunk } else { 1 },
    };
    let gpu = param.gpu();
    let grid = gpu.grid_1d(param.numel().div_ceil(4), WG);
    match watch {
        Watch::None => gpu.dispatch(
            &Kernel::new("sgd", "step"),
            &params,
            &[Arg::Storage(param), Arg::Storage(grad), Arg::Storage(momentum_buf)],
            grid,
        ),
        Watch::Slot(counters, _) => gpu.dispatch(
            &Kernel::new("sgd", "step_watched"),
            &params,
            &[Arg::Storage(param), Arg::Storage(grad), Arg::Storage(momentum_buf), Arg::Storage(counters)],
            grid,
        ),
        Watch::Packed(counters, slots, _) => gpu.dispatch(
            &Kernel::new("sgd", "step_packed"),
            &params,
            &[
                Arg::Storage(param),
                Arg::Storage(grad),
                Arg::Storage(momentum_buf),
                Arg::Storage(counters),
                Arg::Storage(slots),
            ],
            grid,
        ),
    }
}

/// One SGD step on `param`, in place, from its gradient `grad`, updating `momentum_buf` (same
/// shape; read and written only when `cfg.momentum != 0`). `first_step` is PyTorch's "no
/// momentum buffer yet": the buffer is then set to the (decayed) gradient, without
/// dampening, whatever it held before.
pub fn step(param: &Tensor, grad: &Tensor, momentum_buf: &Tensor, cfg: &SgdConfig, first_step: bool) -> Result<()> {
    cfg.validate()?;
    check(param, grad, momentum_buf)?;
    dispatch(param, grad, momentum_buf, cfg, first_step, Watch::None)
}

/// [`step`] that also counts the non-finite values of the gradient, the updated parameter and
/// the updated momentum buffer (when momentum is on) into `counters[slot]`, `[slot + 1]` and
/// `[slot + 2]` (a buffer from [`super::nonfinite::counters`]): divergence is detected in
/// the step that produces it at no extra pass over the weights.
pub fn step_watched(
    param: &Tensor,
    grad: &Tensor,
    momentum_buf: &Tensor,
    cfg: &SgdConfig,
    first_step: bool,
    counters: &Tensor,
    slot: usize,
) -> Result<()> {
    cfg.validate()?;
    check(param, grad, momentum_buf)?;
    super::nonfinite::check_slot(OP, param, counters, slot + 2)?;
    if [grad, momentum_buf].iter().any(|t| t.same_buffer(counters)) {
        return Err(Error::ShapeMismatch { op: OP, detail: "the counters must be a tensor of their own".into() });
    }
    dispatch(param, grad, momentum_buf, cfg, first_step, Watch::Slot(counters, slot))
}

/// [`step`] over a list of `(param, grad, momentum_buf)`: everything is checked before the
/// first dispatch, so an error leaves every parameter untouched. The tensors an entry writes
/// (its parameter, and its buffer when momentum is on) must not appear in another entry.
/// One dispatch per tensor (one pipeline for all); nothing waits on the device.
pub fn step_all(items: &[(&Tensor, &Tensor, &Tensor)], cfg: &SgdConfig, first_step: bool) -> Result<()> {
    cfg.validate()?;
    for (p, g, b) in items {
        check(p, g, b)?;
    }
    let uses_buf = cfg.momentum != 0.0;
    for (i, (p, _, b)) in items.iter().enumerate() {
        let written = if uses_buf { &[*p, *b][..] } else { &[*p][..] };
        let clash = items.iter().enumerate().any(|(j, (q, g, c))| {
            j != i && written.iter().any(|w| w.same_buffer(q) || w.same_buffer(g) || w.same_buffer(c))
        });
        if clash {
            return Err(Error::ShapeMismatch {
                op: OP,
                detail: format!("entry {i}'s parameter or momentum buffer also appears in another entry"),
            });
        }
    }
    for (p, g, b) in items {
        dispatch(p, g, b, cfg, first_step, Watch::None)?;
    }
    Ok(())
}

/// [`step_watched`] over parameters packed into one buffer each (values, gradients,
/// momentum; see [`crate::gpu::Tensor::views`]): a single dispatch. `chunk_slots` maps each
/// chunk of `chunk` floats (the view alignment: every parameter starts at a chunk) to the
/// first of its parameter's three counters in `counters`; it holds u32 values as f32 bits.
#[allow(clippy::too_many_arguments)]
pub fn step_packed(
    param: &Tensor,
    grad: &Tensor,
    momentum_buf: &Tensor,
    cfg: &SgdConfig,
    first_step: bool,
    counters: &Tensor,
    chunk_slots: &Tensor,
    chunk: usize,
) -> Result<()> {
    cfg.validate()?;
    check(param, grad, momentum_buf)?;
    if !chunk.is_multiple_of(4) || chunk == 0 || chunk_slots.numel() * chunk < param.numel() {
        return Err(Error::ShapeMismatch {
            op: OP,
            detail: format!(
                "{} chunk slots of {chunk} floats do not cover {} packed parameter values",
                chunk_slots.numel(),
                param.numel()
            ),
        });
    }
    dispatch(param, grad, momentum_buf, cfg, first_step, Watch::Packed(counters, chunk_slots, (chunk / 4) as u32))
}
