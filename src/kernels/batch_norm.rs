//! Launchers for `shaders/batch_norm.wgsl`: 2-d batch normalisation of NCHW tensors with
//! PyTorch's semantics (`torch.nn.BatchNorm2d`).
//!
//! Training mode normalises with the batch statistics over (N, H, W), the biased variance,
//! and updates the running statistics in place with
//! `running = (1 - momentum) * running + momentum * stat`, the unbiased variance
//! `M2 / (M - 1)` for `running_var` (M = N*H*W). Evaluation mode normalises with the running
//! statistics.
//!
//! Each image plane of a channel is cut into runs of [`run_length`] consecutive values (the
//! last run of a plane may be shorter), each invocation takes one run, and each workgroup
//! [`WG`] runs: a chunk (so a channel of 128 planes of 32x32 runs on 32 workgroups). Numerics:
//! statistics are taken of `x - x0`, `x0` the channel's first value, so a channel at 100 +- 1
//! loses no digits to the 100; within a chunk the variance is an exact two-pass over values
//! held in registers (x is read once); chunks are merged with Chan et al.'s pairwise update.
//! `sum(x^2) - sum(x)^2 / M` is never formed. Dispatches: forward 2 (statistics, normalise),
//! backward 2 (per-chunk sums, dx; dx also writes dgamma and dbeta), eval 1; or forward 1 and
//! backward 1 where one workgroup per channel is parallel enough and the dispatch is what costs
//! ([`Passes`]: channels of at most [`SINGLE_MAX_CHUNKS`] chunks, on GPUs), bit-for-bit the
//! same results. A grid-wide merge inside one dispatch of the split grid would need a "last
//! workgroup finalises" atomic handshake, which WGSL's relaxed atomics and workgroup-scoped
//! barriers do not make safe, and would still leave the element-wise pass in a second dispatch.
//!
//! Fusion: the forward can end with the ops that follow a batch norm in a residual block
//! ([`Epilogue`]): a ReLU, or the residual add (identity, or the option-A shortcut read in
//! place from the block input) then a ReLU, so the BN output, the shortcut tensor and the sum
//! are never written. The backward can fold in the following ReLU's backward (the gradient is
//! masked by the sign of that ReLU's output as it is read) and write the shortcut's gradient of
//! the block input ([`ShortcutGrad`]) in the same pass, for the block's input gradient to be
//! accumulated onto. Same dispatch counts as the plain ops; the fused entry points are the
//! plain ones specialised by pipeline overrides (`RELU`, `RES`, `MASK`: the branches fold away
//! when the pipeline is compiled), so the plain results are unchanged.
//!
//! Memory: [`forward_train`] keeps only [`BnSaved::stats`], `3 * C` floats, for the backward;
//! the backward recomputes `x_hat` from `x`, which the caller keeps (it is the previous conv's
//! output). Each call also allocates a temporary of `2 * C * P` floats (P = ceil(N * runs per
//! plane / [`WG`]), the chunks per channel), freed when the call's work completes.

use bytemuck::{Pod, Zeroable};

use super::shortcut::{self, ChannelPad};
use super::{check_same_device, dims};
use crate::error::{Error, Result};
use crate::gpu::{Arg, Kernel, Tensor};

/// PyTorch's default momentum of the running statistics.
pub const DEFAULT_MOMENTUM: f32 = 0.1;
/// PyTorch's default epsilon added to the variance.
pub const DEFAULT_EPS: f32 = 1e-5;

/// Op family name for [`crate::gpu::Gpu::force_variant`]: `split` or `single` (see
/// [`Passes`]).
pub const OP: &str = "batch_norm";

/// How a training-mode forward or backward is dispatched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Passes {
    /// Two dispatches over a (chunks, C) grid: per-chunk sums, then the merge (repeated by each
    /// workgroup) and the element-wise pass. The most parallel.
    Split,
    /// One dispatch over a (1, C) grid: each workgroup does its channel's chunks one after the
    /// other. The same operations in the same order, so the same bits; one dispatch fewer and
    /// the merge done once per channel, but only C workgroups (ResNet-20 at batch 128: the
    /// 8x8 stage, 2 chunks per channel).
    Single,
}

impl Passes {
    /// [`Passes::Single`] where a channel has at most [`SINGLE_MAX_CHUNKS`] chunks (the split
    /// grid would not be much wider) on adapters other than CPUs, else [`Passes::Split`]. On a
    /// GPU a dispatch (launch and the barrier after it) costs about as much as such a small
    /// pass; on lavapipe a dispatch is ~50 us against 30-100 ms for a ResNet-20 batch norm,
    /// and the single pass measured 10-30% slower there ([128, 64, 8, 8], 2 chunks; one
    /// workgroup's longer loop), so CPU adapters keep the split passes. A variant forced on the
    /// device for [`OP`] wins, except that a single pass is never run over more than
    /// [`SINGLE_LIMIT_CHUNKS`] chunks.
    pub fn choose(x: &Tensor, chunks: usize) -> Result<Passes> {
        let single = match x.gpu().forced_variant(OP).as_deref() {
            Some("split") => false,
            Some("single") => true,
            Some(other) => {
                return Err(Error::UnknownVariant { op: OP, name: other.to_string(), choices: "split, single".into() })
            }
            None => chunks <= SINGLE_MAX_CHUNKS && x.gpu().adapter().device_type != wgpu::DeviceType::Cpu,
        };
        Ok(if single && chunks <= SINGLE_LIMIT_CHUNKS { Passes::Single } else { Passes::Split })
    }
}

/// Chunks per channel up to which [`Passes::choose`] takes [`Passes::Single`] by itself.
pub const SINGLE_MAX_CHUNKS: usize = 2;

/// Chunks per channel beyond which [`Passes::Single`] is never used. On lavapipe (Mesa 22.3,
/// measured with the stride-64 layout before runs) one workgroup looping over 257 chunks of
/// 4096 values lost the writes of its last ~10 chunks in the backward (the same place for 1,
/// 2 and 4 channels; 400 chunks lost more), with no error reported; 32 chunks were bit-exact.
/// The cause is not known, so the single pass stays within what tests/batch_norm.rs checks
/// bit-for-bit against the split passes.
pub const SINGLE_LIMIT_CHUNKS: usize = 32;

/// Invocations per workgroup, each taking one run (must match `WG` in the shader).
pub const WG: usize = 64;
/// The longest run (must match `MAX_RUN` in the shader).
pub const MAX_RUN: usize = 64;

/// Values per run for image planes of `hw` values: the length in 16..=[`MAX_RUN`] (all of
/// the plane when it is shorter) whose runs pad the plane least, the longest of those on a
/// tie. 28x28 planes get 56, 14x14 and 7x7 get 49, 32x32, 16x16 and 8x8 get 64. Padding is
/// computed and discarded (a short last run repeats its last value).
pub fn run_length(hw: usize) -> usize {
    if hw <= 16 {
        return hw.max(1);
    }
    (16..=MAX_RUN).rev().min_by_key(|&r| hw.div_ceil(r) * r).unwrap_or(MAX_RUN)
}

/// What [`backward`] needs from [`forward_train`].
#[derive(Clone, Debug)]
pub struct BnSaved {
    /// `[3, C]`: row 0 the shift `x0 = x[0, c, 0, 0]`, row 1 the batch mean of `x - x0` (the
    /// batch mean is row 0 + row 1), row 2 `1 / sqrt(biased batch variance + eps)`.
    /// `x_hat = ((x - x0) - mean_shifted) * invstd`.
    pub stats: Tensor,
}

/// The residual a fused forward adds before its ReLU.
#[derive(Clone, Copy, Debug)]
pub enum Residual<'a> {
    /// A tensor of the output's shape (the identity shortcut, or a projection's output).
    Identity(&'a Tensor),
    /// The option-A shortcut of the block input `x` `[N, Cin, H, W]`, read in place:
    /// `x[:, :, ::stride, ::stride]` at channels `lead .. lead + Cin` of the output's C,
    /// `lead = pad.leading(Cin, C)`, zero elsewhere (see [`shortcut`]).
    OptionA { x: &'a Tensor, stride: usize, pad: ChannelPad },
}

/// What a fused forward does after normalising: `y = bn(x) [+ residual]`, then `max(y, 0)`
/// when `relu`. [`Epilogue::NONE`] is the plain batch norm.
#[derive(Clone, Copy, Debug, Default)]
pub struct Epilogue<'a> {
    pub residual: Option<Residual<'a>>,
    pub relu: bool,
}

impl<'a> Epilogue<'a> {
    /// The plain batch norm.
    pub const NONE: Epilogue<'static> = Epilogue { residual: None, relu: false };
    /// Batch norm then ReLU.
    pub const RELU: Epilogue<'static> = Epilogue { residual: None, relu: true };

    /// Batch norm, the residual add, then ReLU (the end of a residual block).
    pub fn add_relu(residual: Residual<'a>) -> Epilogue<'a> {
        Epilogue { residual: Some(residual), relu: true }
    }
}

/// The shortcut gradient a fused backward also writes: the gradient the shortcut passes to the
/// block input, for the input gradient of the main path to be accumulated onto.
#[derive(Clone, Copy, Debug)]
pub enum ShortcutGrad<'a> {
    /// The identity: the (masked) incoming gradient itself, shaped like `x`.
    Identity,
    /// The adjoint of the option-A shortcut from a block input of shape `in_shape`
    /// `[N, Cin, H, W]` with `stride`: the gradient at the sampled pixels of the kept
    /// channels, 0 elsewhere, shaped `in_shape`.
    OptionA { in_shape: &'a [usize], stride: usize, pad: ChannelPad },
}

/// The result of [`backward_fused`].
#[derive(Clone, Debug)]
pub struct BnGrads {
    pub dx: Tensor,
    pub dgamma: Tensor,
    pub dbeta: Tensor,
    /// The shortcut's gradient of the block input, when asked for.
    pub dshortcut: Option<Tensor>,
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
    rpp: u32,
    nruns: u32,
    train: u32,
    momentum: f32,
    eps: f32,
    wo: u32,
    res_cin: u32,
    res_h: u32,
    res_w: u32,
    res_stride: u32,
    res_pad: u32,
    ho: u32,
}

/// Shape facts of one call: channels, values per channel (N*H*W), values per run, runs per
/// image plane and per channel, and chunks per channel.
struct Geometry {
    c: usize,
    m: usize,
    run: usize,
    rpp: usize,
    nruns: usize,
    chunks: usize,
}

/// The fused ops of a call, the shader's pipeline overrides `RELU`, `RES` (0 none, 1 identity,
/// 2 option A) and `MASK` (see `shaders/batch_norm.wgsl`), with the run length `RUN`.
#[derive(Clone, Copy, Default)]
struct Fused {
    relu: bool,
    res: u32,
    mask: bool,
    run: usize,
}

impl Fused {
    fn new(g: &Geometry) -> Fused {
        Fused { run: g.run, ..Fused::default() }
    }

    /// The override `stats_partial` reads.
    fn stats(&self) -> [(&'static str, f64); 1] {
        [("RUN", self.run as f64)]
    }

    /// The overrides the forward entry points read.
    fn forward(&self) -> [(&'static str, f64); 3] {
        [("RELU", self.relu as u8 as f64), ("RES", self.res as f64), ("RUN", self.run as f64)]
    }

    /// The overrides `dx` and `backward_single` read.
    fn backward(&self) -> [(&'static str, f64); 3] {
        [("MASK", self.mask as u8 as f64), ("RES", self.res as f64), ("RUN", self.run as f64)]
    }

    /// The overrides `grad_partial` reads (it writes no shortcut gradient).
    fn grad_sums(&self) -> [(&'static str, f64); 2] {
        [("MASK", self.mask as u8 as f64), ("RUN", self.run as f64)]
    }
}

fn geometry(op: &'static str, x: &Tensor) -> Result<Geometry> {
    let [n, c, h, w] = dims::<4>(op, "x", x)?;
    // The shaders index with u32; keep every index and count well inside it.
    if x.numel() >= 1 << 31 {
        return Err(Error::Unsupported { op, detail: format!("{:?} has 2^31 values or more", x.shape()) });
    }
    let hw = h * w;
    let run = run_length(hw);
    let rpp = hw.div_ceil(run);
    Ok(Geometry { c, m: n * hw, run, rpp, nruns: n * rpp, chunks: (n * rpp).div_ceil(WG) })
}

fn params(x: &Tensor, g: &Geometry, train: bool, momentum: f32, eps: f32) -> Params {
    let s = x.shape();
    Params {
        c: g.c as u32,
        hw: (s[2] * s[3]) as u32,
        m: g.m as u32,
        chunks: g.chunks as u32,
        rpp: g.rpp as u32,
        nruns: g.nruns as u32,
        train: train as u32,
        momentum,
        eps,
        wo: s[3] as u32,
        res_cin: 0,
        res_h: 0,
        res_w: 0,
        res_stride: 1,
        res_pad: 0,
        ho: s[2] as u32,
    }
}

/// Storage buffers the `dx` entry point binds (the most of the four).
const STORAGE_BINDINGS: u32 = 10;

/// Errors unless the device can bind [`STORAGE_BINDINGS`] storage buffers in one shader
/// (WebGPU's default limit is 8; desktop Vulkan, Metal and DX12 adapters allow more, and the
/// device is opened with the adapter's own limits).
fn check_bindings(op: &'static str, x: &Tensor) -> Result<()> {
    let have = x.gpu().limits().max_storage_buffers_per_shader_stage;
    if have < STORAGE_BINDINGS {
        return Err(Error::Unsupported {
            op,
            detail: format!("the device binds {have} storage buffers per shader, batch norm needs {STORAGE_BINDINGS}"),
        });
    }
    Ok(())
}

/// Checks an option-A shortcut from a block input of `in_shape` onto `x` and sets its
/// parameters (`res = 2`); errors unless the shortcut's output shape is `x`'s.
fn set_option_a(
    op: &'static str,
    p: &mut Params,
    fused: &mut Fused,
    x: &Tensor,
    in_shape: &[usize],
    stride: usize,
    pad: ChannelPad,
) -> Result<()> {
    let want = shortcut::output_shape(in_shape, x.shape()[1], stride, pad).map_err(|e| match e {
        Error::ShapeMismatch { detail, .. } => Error::ShapeMismatch { op, detail },
        Error::Unsupported { detail, .. } => Error::Unsupported { op, detail },
        other => other,
    })?;
    if want != x.shape() {
        return Err(Error::ShapeMismatch {
            op,
            detail: format!(
                "the option-A shortcut of a block input {in_shape:?} with stride {stride} has shape {want:?}, not x's {:?}",
                x.shape()
            ),
        });
    }
    if in_shape.iter().product::<usize>() >= 1 << 31 {
        return Err(Error::Unsupported { op, detail: format!("block input {in_shape:?} has 2^31 values or more") });
    }
    fused.res = 2;
    p.res_cin = in_shape[1] as u32;
    p.res_h = in_shape[2] as u32;
    p.res_w = in_shape[3] as u32;
    p.res_stride = stride as u32;
    p.res_pad = pad.leading(in_shape[1], x.shape()[1]) as u32;
    Ok(())
}

/// Checks the epilogue against `x` and sets its parameters; returns the residual tensor to bind
/// (`x` itself when there is none: binding 12 is read-only, so any tensor will do).
fn set_epilogue<'t>(
    op: &'static str,
    p: &mut Params,
    fused: &mut Fused,
    x: &'t Tensor,
    epi: &Epilogue<'t>,
) -> Result<&'t Tensor> {
    fused.relu = epi.relu;
    match epi.residual {
        None => Ok(x),
        Some(Residual::Identity(r)) => {
            check_same_device(op, x, r)?;
            if r.shape() != x.shape() {
                return Err(Error::ShapeMismatch {
                    op,
                    detail: format!("the residual {:?} must have the shape of x {:?}", r.shape(), x.shape()),
                });
            }
            fused.res = 1;
            Ok(r)
        }
        Some(Residual::OptionA { x: r, stride, pad }) => {
            check_same_device(op, x, r)?;
            set_option_a(op, p, fused, x, r.shape(), stride, pad)?;
            Ok(r)
        }
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

fn kernel<'a>(entry: &'static str, constants: &'a [(&'static str, f64)]) -> Kernel<'a> {
    Kernel::with("batch_norm", entry, constants)
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
    forward_train_fused(x, gamma, beta, running_mean, running_var, momentum, eps, Epilogue::NONE)
}

/// [`forward_train`] followed by `epi` in the same pass (the same 1 or 2 dispatches): `y` is
/// `max(bn(x) + residual, 0)` for [`Epilogue::add_relu`], `max(bn(x), 0)` for
/// [`Epilogue::RELU`]. The saved statistics are those of the batch norm alone. Errors if the
/// residual does not fit `x` (identity: same shape; option A: its output shape is `x`'s).
#[allow(clippy::too_many_arguments)]
pub fn forward_train_fused(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    momentum: f32,
    eps: f32,
    epi: Epilogue,
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
    check_bindings(OP, x)?;
    if !momentum.is_finite() {
        return Err(Error::Unsupported { op: OP, detail: format!("momentum must be finite, got {momentum}") });
    }
    if g.m < 2 {
        return Err(Error::Unsupported {
            op: OP,
            detail: format!("training needs more than one value per channel, input {:?}", x.shape()),
        });
    }
    let mut p = params(x, &g, true, momentum, eps);
    let mut fused = Fused::new(&g);
    let res = set_epilogue(OP, &mut p, &mut fused, x, &epi)?;
    if let Some(r) = epi.residual.map(|r| match r {
        Residual::Identity(t) | Residual::OptionA { x: t, .. } => t,
    }) {
        check_distinct(OP, &all[3..], &[("residual", r)])?;
    }
    let gpu = x.gpu();
    let grid = [g.chunks as u32, g.c as u32, 1];
    // Every element of the three is written by the kernels.
    let partials = gpu.empty(&[g.c, g.chunks, 2])?;
    let stats = gpu.empty(&[3, g.c])?;
    let y = gpu.empty(x.shape())?;
    let args = [
        Arg::Storage(x),
        Arg::Storage(gamma),
        Arg::Storage(beta),
        Arg::Storage(running_mean),
        Arg::Storage(running_var),
        Arg::Storage(&partials),
        Arg::Storage(&stats),
        Arg::Storage(&y),
        // Bindings 9-11 (dy, dgamma, dbeta) are not used by the forward entry points.
        Arg::Storage(x),
        Arg::Storage(x),
        Arg::Storage(x),
        Arg::Storage(res),
    ];
    let constants = fused.forward();
    match Passes::choose(x, g.chunks)? {
        Passes::Single => gpu.dispatch(&kernel("forward_single", &constants), &p, &args, [1, g.c as u32, 1])?,
        Passes::Split => {
            gpu.dispatch(&kernel("stats_partial", &fused.stats()), &p, &args, grid)?;
            gpu.dispatch(&kernel("normalize", &constants), &p, &args, grid)?;
        }
    }
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
    forward_eval_fused(x, gamma, beta, running_mean, running_var, eps, Epilogue::NONE)
}

/// [`forward_eval`] followed by `epi` in the same dispatch (see [`forward_train_fused`]).
pub fn forward_eval_fused(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f32,
    epi: Epilogue,
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
    check_bindings(OP, x)?;
    let mut p = params(x, &g, false, 0.0, eps);
    let mut fused = Fused::new(&g);
    let res = set_epilogue(OP, &mut p, &mut fused, x, &epi)?;
    if let Some(r) = epi.residual.map(|r| match r {
        Residual::Identity(t) | Residual::OptionA { x: t, .. } => t,
    }) {
        check_distinct(OP, &all[3..], &[("residual", r)])?;
    }
    let gpu = x.gpu();
    let y = gpu.empty(x.shape())?;
    // The training branch's buffers are bound but not touched.
    let (unused_partials, unused_stats) = (gpu.empty(&[1])?, gpu.empty(&[1])?);
    gpu.dispatch(
        &kernel("normalize", &fused.forward()),
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
            Arg::Storage(x),
            Arg::Storage(x),
            Arg::Storage(x),
            Arg::Storage(res),
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
    let g = backward_fused(x, dy, gamma, saved, None, None)?;
    Ok((g.dx, g.dgamma, g.dbeta))
}

/// [`backward`] of a batch norm followed by a ReLU (and, before it, a residual add), in the
/// same 1 or 2 dispatches: with `relu_out` (the ReLU's output, shaped like `x`) the incoming
/// gradient is `g = dy * (relu_out > 0)` (the ReLU's backward, folded in), else `g = dy`.
/// With `shortcut`, also writes the shortcut's gradient of the block input into
/// [`BnGrads::dshortcut`]: `g` itself for [`ShortcutGrad::Identity`], the option-A adjoint
/// (shaped like the block input, every element written) for [`ShortcutGrad::OptionA`].
pub fn backward_fused(
    x: &Tensor,
    dy: &Tensor,
    gamma: &Tensor,
    saved: &BnSaved,
    relu_out: Option<&Tensor>,
    shortcut: Option<ShortcutGrad>,
) -> Result<BnGrads> {
    backward_fused_impl(x, dy, gamma, saved, relu_out, shortcut, None)
}

/// [`backward_fused`] writing dgamma and dbeta into the given `[C]` tensors (e.g. views of
/// a stage's packed gradients) instead of new ones; the returned [`BnGrads`] holds them.
#[allow(clippy::too_many_arguments)]
pub fn backward_fused_into(
    x: &Tensor,
    dy: &Tensor,
    gamma: &Tensor,
    saved: &BnSaved,
    relu_out: Option<&Tensor>,
    shortcut: Option<ShortcutGrad>,
    dgamma: &Tensor,
    dbeta: &Tensor,
) -> Result<BnGrads> {
    backward_fused_impl(x, dy, gamma, saved, relu_out, shortcut, Some((dgamma, dbeta)))
}

#[allow(clippy::too_many_arguments)]
fn backward_fused_impl(
    x: &Tensor,
    dy: &Tensor,
    gamma: &Tensor,
    saved: &BnSaved,
    relu_out: Option<&Tensor>,
    shortcut: Option<ShortcutGrad>,
    into: Option<(&Tensor, &Tensor)>,
) -> Result<BnGrads> {
    const OP: &str = "batch_norm::backward";
    let g = geometry(OP, x)?;
    for (what, t) in [("dy", Some(dy)), ("relu_out", relu_out)] {
        let Some(t) = t else { continue };
        if t.shape() != x.shape() {
            return Err(Error::ShapeMismatch {
                op: OP,
                detail: format!("{what} {:?} must have the shape of x {:?}", t.shape(), x.shape()),
            });
        }
        check_same_device(OP, x, t)?;
    }
    check_channel_vec(OP, "gamma", gamma, x, g.c)?;
    check_same_device(OP, x, &saved.stats)?;
    if saved.stats.shape() != [3, g.c] {
        return Err(Error::ShapeMismatch {
            op: OP,
            detail: format!("saved stats must have shape [3, {}], got {:?}", g.c, saved.stats.shape()),
        });
    }
    check_bindings(OP, x)?;
    let gpu = x.gpu();
    let mut p = params(x, &g, true, 0.0, 0.0);
    let mut fused = Fused { mask: relu_out.is_some(), ..Fused::new(&g) };
    let dshortcut = match shortcut {
        None => None,
        Some(ShortcutGrad::Identity) => {
            fused.res = 1;
            Some(gpu.empty(x.shape())?)
        }
        Some(ShortcutGrad::OptionA { in_shape, stride, pad }) => {
            set_option_a(OP, &mut p, &mut fused, x, in_shape, stride, pad)?;
            Some(gpu.empty(in_shape)?)
        }
    };
    let grid = [g.chunks as u32, g.c as u32, 1];
    // Every element of these is written by the kernels.
    let partials = gpu.empty(&[g.c, g.chunks, 2])?;
    let dx = gpu.empty(x.shape())?;
    // Written by the dx kernel's first workgroup of each channel; with no values at all no
    // workgroup runs, and the sums over nothing are 0.
    let (dgamma, dbeta) = match into {
        Some((dg, db)) => {
            for (what, t) in [("dgamma", dg), ("dbeta", db)] {
                if t.shape() != [g.c] {
                    return Err(Error::ShapeMismatch {
                        op: OP,
                        detail: format!("{what} has shape {:?}, expected [{}]", t.shape(), g.c),
                    });
                }
                check_same_device(OP, x, t)?;
                if g.chunks == 0 {
                    crate::kernels::elementwise::fill(t, 0.0)?;
                }
            }
            (dg.clone(), db.clone())
        }
        None if g.chunks == 0 => (gpu.zeros(&[g.c])?, gpu.zeros(&[g.c])?),
        None => (gpu.empty(&[g.c])?, gpu.empty(&[g.c])?),
    };
    let args = [
        Arg::Storage(x),
        Arg::Storage(gamma),
        // Bindings 3-5 (beta, running statistics) and 12 (residual) are not used by the
        // backward entry points.
        Arg::Storage(gamma),
        Arg::Storage(gamma),
        Arg::Storage(gamma),
        Arg::Storage(&partials),
        Arg::Storage(&saved.stats),
        Arg::Storage(&dx),
        Arg::Storage(dy),
        Arg::Storage(&dgamma),
        Arg::Storage(&dbeta),
        Arg::Storage(gamma),
        // Read only with MASK; any read-only tensor otherwise.
        Arg::Storage(relu_out.unwrap_or(dy)),
        // Written only when RES != 0. Otherwise dx stands in: wgpu accepts one buffer in two
        // read_write bindings of a dispatch (only a read-only plus a read_write use conflicts),
        // and the kernel does not touch this one.
        Arg::Storage(dshortcut.as_ref().unwrap_or(&dx)),
    ];
    let constants = fused.backward();
    match Passes::choose(x, g.chunks)? {
        Passes::Single => gpu.dispatch(&kernel("backward_single", &constants), &p, &args, [1, g.c as u32, 1])?,
        Passes::Split => {
            gpu.dispatch(&kernel("grad_partial", &fused.grad_sums()), &p, &args, grid)?;
            gpu.dispatch(&kernel("dx", &constants), &p, &args, grid)?;
        }
    }
    Ok(BnGrads { dx, dgamma, dbeta, dshortcut })
}
