//! Launchers for `shaders/batch_norm.wgsl`: 2-d batch normalisation of NCHW tensors with
//! PyTorch's semantics (`torch.nn.BatchNorm2d`).
//!
//! Training mode normalises with the batch statistics over (N, H, W), the biased variance,
//! and updates the running statistics in place with
//! `running = (1 - momentum) * running + momentum * stat`, the unbiased variance
//! `M2 / (M - 1)` for `running_var` (M = N*H*W). Evaluation mode normalises with the running
//! statistics.
//!
//! Each per-channel reduction is cut into chunks of [`CHUNK`] values, one workgroup each (so
//! a channel of 131072 values runs on 32 workgroups). Numerics: statistics are taken of
//! `x - x0`, `x0` the channel's first value, so a channel at 100 +- 1 loses no digits to the
//! 100; within a chunk the variance is an exact two-pass over values held in registers (x is
//! read once); chunks are merged with Chan et al.'s pairwise update. `sum(x^2) - sum(x)^2 / M`
//! is never formed. Dispatches: forward 2 (statistics, normalise), backward 2 (per-chunk sums,
//! dx; dx also writes dgamma and dbeta), eval 1. Four pipelines in all.
//!
//! Memory: [`forward_train`] keeps only [`BnSaved::stats`], `3 * C` floats, for the backward;
//! the backward recomputes `x_hat` from `x`, which the caller keeps (it is the previous conv's
//! output). Each call also allocates a temporary of `2 * C * P` floats
//! (P = ceil(N*H*W / CHUNK)), freed when the call's work completes.

use bytemuck::{Pod, Zeroable};

use super::{check_same_device, dims};
use crate::error::{Error, Result};
use crate::gpu::{Arg, Kernel, Tensor};

/// PyTorch's default momentum of the running statistics.
pub const DEFAULT_MOMENTUM: f32 = 0.1;
/// PyTorch's default epsilon added to the variance.
pub const DEFAULT_EPS: f32 = 1e-5;

/// Invocations per workgroup (must match `WG` in the shader).
const WG: usize = 64;
/// Values of one channel per workgroup (must match `CHUNK` in the shader).
pub const CHUNK: usize = 4096;

/// What [`backward`] needs from [`forward_train`].
#[derive(Clone, Debug)]
pub struct BnSaved {
    /// `[3, C]`: row 0 the shift `x0 = x[0, c, 0, 0]`, row 1 the batch mean of `x - x0` (the
    /// batch mean is row 0 + row 1), row 2 `1 / sqrt(biased batch variance + eps)`.
    /// `x_hat = ((x - x0) - mean_shifted) * invstd`.
    pub stats: Tensor,
}

/// The output of [`forward_train`].
#[derive(Clone, Debug)]
pub struct BnForward {
    /// The normalised output, shaped like the input.
    pub y: Tensor,
    /// The batch statistics the backward needs (`3 * C` floats).
    pub saved: BnSaved,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    c: u32,
    hw: u32,
    m: u32,
    chunks: u32,
    step_s: u32,
    step_a: u32,
    wrap: u32,
    train: u32,
    momentum: f32,
    eps: f32,
    _pad: [u32; 2],
}

/// Shape facts of one call: channels, values per channel (N*H*W) and chunks per channel.
struct Geometry {
    c: usize,
    m: usize,
    chunks: usize,
}

fn geometry(op: &'static str, x: &Tensor) -> Result<Geometry> {
    let [n, c, h, w] = dims::<4>(op, "x", x)?;
    // The shaders index with u32 (and step addresses past the end for the last chunk's unused
    // slots, which wraps harmlessly); keep every valid index and the counts well inside u32.
    if x.numel() >= 1 << 31 {
        return Err(Error::Unsupported { op, detail: format!("{:?} has 2^31 values or more", x.shape()) });
    }
    let m = n * h * w;
    Ok(Geometry { c, m, chunks: m.div_ceil(CHUNK) })
}

fn params(x: &Tensor, g: &Geometry, train: bool, momentum: f32, eps: f32) -> Params {
    let s = x.shape();
    let hw = s[2] * s[3];
    let chw = g.c * hw;
    // hw == 0 means m == 0: no workgroup runs, the steps are never used.
    let (step_n, step_s) = WG.checked_div(hw).map_or((0, 0), |n| (n, WG - n * hw));
    Params {
        c: g.c as u32,
        hw: hw as u32,
        m: g.m as u32,
        chunks: g.chunks as u32,
        step_s: step_s as u32,
        step_a: (step_n * chw + step_s) as u32,
        wrap: chw.saturating_sub(hw) as u32,
        train: train as u32,
        momentum,
        eps,
        _pad: [0; 2],
    }
}

/// Errors unless `t` is a vector of `c` values on `x`'s device.
fn check_channel_vec(op: &'static str, what: &str, t: &Tensor, x: &Tensor, c: usize) -> Result<()> {
    check_same_device(op, x, t)?;
    if t.shape() != [c] {
        return Err(Error::ShapeMismatch {
            op,
            detail: format!("{what} must have shape [{c}] for input {:?}, got {:?}", x.shape(), t.shape()),
        });
    }
    Ok(())
}

/// Errors if a tensor the kernels write shares its buffer with another argument (wgpu forbids
/// a buffer bound writable and readable in one dispatch; the device would record a fault).
fn check_distinct(op: &'static str, written: &[(&str, &Tensor)], all: &[(&str, &Tensor)]) -> Result<()> {
    for (wn, w) in written {
        for (an, a) in all {
            if wn != an && w.same_buffer(a) {
                return Err(Error::Unsupported { op, detail: format!("{wn} and {an} must be different tensors") });
            }
        }
    }
    Ok(())
}

fn check_eps(op: &'static str, eps: f32) -> Result<()> {
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::Unsupported { op, detail: format!("eps must be finite and >= 0, got {eps}") });
    }
    Ok(())
}

fn kernel(entry: &'static str) -> Kernel<'static> {
    Kernel::new("batch_norm", entry)
}

/// Training-mode forward: normalises `x` `[N, C, H, W]` with its batch statistics, scales by
/// `gamma` and shifts by `beta` (both `[C]`), and updates `running_mean` and `running_var`
/// (`[C]`) in place. `momentum = 0` leaves the running statistics bit-for-bit unchanged (for
/// a pass that must not update them). Errors if N*H*W < 2, like PyTorch.
pub fn forward_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    momentum: f32,
    eps: f32,
) -> Result<BnForward> {
    const OP: &str = "batch_norm::forward_train";
    let g = geometry(OP, x)?;
    for (what, t) in [("gamma", gamma), ("beta", beta), ("running_mean", running_mean), ("running_var", running_var)] {
        check_channel_vec(OP, what, t, x, g.c)?;
    }
    let all =
        [("x", x), ("gamma", gamma), ("beta", beta), ("running_mean", running_mean), ("running_var", running_var)];
    check_distinct(OP, &all[3..], &all)?;
    check_eps(OP, eps)?;
    if !momentum.is_finite() {
        return Err(Error::Unsupported { op: OP, detail: format!("momentum must be finite, got {momentum}") });
    }
    if g.m < 2 {
        return Err(Error::Unsupported {
            op: OP,
            detail: format!("training needs more than one value per channel, input {:?}", x.shape()),
        });
    }
    let gpu = x.gpu();
    let p = params(x, &g, true, momentum, eps);
    let grid = [g.chunks as u32, g.c as u32, 1];
    let partials = gpu.zeros(&[g.c, g.chunks, 2])?;
    let stats = gpu.zeros(&[3, g.c])?;
    let y = gpu.zeros(x.shape())?;
    gpu.dispatch(
        &kernel("stats_partial"),
        &p,
        &[
            Arg::Storage(x),
            Arg::Storage(gamma),
            Arg::Storage(beta),
            Arg::Storage(running_mean),
            Arg::Storage(running_var),
            Arg::Storage(&partials),
        ],
        grid,
    )?;
    gpu.dispatch(
        &kernel("normalize"),
        &p,
        &[
            Arg::Storage(x),
            Arg::Storage(gamma),
            Arg::Storage(beta),
            Arg::Storage(running_mean),
            Arg::Storage(running_var),
            Arg::Storage(&partials),
            Arg::Storage(&stats),
            Arg::Storage(&y),
        ],
        grid,
    )?;
    Ok(BnForward { y, saved: BnSaved { stats } })
}

/// Evaluation-mode forward: `y = (x - running_mean) / sqrt(running_var + eps) * gamma + beta`.
pub fn forward_eval(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    const OP: &str = "batch_norm::forward_eval";
    let g = geometry(OP, x)?;
    for (what, t) in [("gamma", gamma), ("beta", beta), ("running_mean", running_mean), ("running_var", running_var)] {
        check_channel_vec(OP, what, t, x, g.c)?;
    }
    let all =
        [("x", x), ("gamma", gamma), ("beta", beta), ("running_mean", running_mean), ("running_var", running_var)];
    check_distinct(OP, &all[3..], &all)?;
    check_eps(OP, eps)?;
    let gpu = x.gpu();
    let p = params(x, &g, false, 0.0, eps);
    let y = gpu.zeros(x.shape())?;
    // The training branch's buffers are bound but not touched.
    let (unused_partials, unused_stats) = (gpu.zeros(&[1])?, gpu.zeros(&[1])?);
    gpu.dispatch(
        &kernel("normalize"),
        &p,
        &[
            Arg::Storage(x),
            Arg::Storage(gamma),
            Arg::Storage(beta),
            Arg::Storage(running_mean),
            Arg::Storage(running_var),
            Arg::Storage(&unused_partials),
            Arg::Storage(&unused_stats),
            Arg::Storage(&y),
        ],
        [g.chunks as u32, g.c as u32, 1],
    )?;
    Ok(y)
}

/// Training-mode backward: from the forward's input `x`, the output gradient `dy` (shaped
/// like `x`), `gamma` and the forward's saved statistics, returns `(dx, dgamma, dbeta)`:
/// `dbeta = sum(dy)`, `dgamma = sum(dy * x_hat)` over (N, H, W) and
/// `dx = gamma * invstd * (dy - dbeta / M - x_hat * dgamma / M)`.
pub fn backward(x: &Tensor, dy: &Tensor, gamma: &Tensor, saved: &BnSaved) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "batch_norm::backward";
    let g = geometry(OP, x)?;
    if dy.shape() != x.shape() {
        return Err(Error::ShapeMismatch {
            op: OP,
            detail: format!("dy {:?} must have the shape of x {:?}", dy.shape(), x.shape()),
        });
    }
    check_same_device(OP, x, dy)?;
    check_channel_vec(OP, "gamma", gamma, x, g.c)?;
    check_same_device(OP, x, &saved.stats)?;
    if saved.stats.shape() != [3, g.c] {
        return Err(Error::ShapeMismatch {
            op: OP,
            detail: format!("saved stats must have shape [3, {}], got {:?}", g.c, saved.stats.shape()),
        });
    }
    let gpu = x.gpu();
    let p = params(x, &g, true, 0.0, 0.0);
    let grid = [g.chunks as u32, g.c as u32, 1];
    let partials = gpu.zeros(&[g.c, g.chunks, 2])?;
    let dx = gpu.zeros(x.shape())?;
    let dgamma = gpu.zeros(&[g.c])?;
    let dbeta = gpu.zeros(&[g.c])?;
    let args = [
        Arg::Storage(x),
        Arg::Storage(gamma),
        // Bindings 3-5 (beta, running statistics) are not used by the backward entry points.
        Arg::Storage(gamma),
        Arg::Storage(gamma),
        Arg::Storage(gamma),
        Arg::Storage(&partials),
        Arg::Storage(&saved.stats),
        Arg::Storage(&dx),
        Arg::Storage(dy),
        Arg::Storage(&dgamma),
        Arg::Storage(&dbeta),
    ];
    gpu.dispatch(&kernel("grad_partial"), &p, &args, grid)?;
    gpu.dispatch(&kernel("dx"), &p, &args, grid)?;
    Ok((dx, dgamma, dbeta))
}
