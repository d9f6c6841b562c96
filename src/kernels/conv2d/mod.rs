//! 2-D convolution (NCHW input, OIHW weight, no bias): forward, backward-data and
//! backward-filter, in two variants chosen per adapter and shape.
//!
//! Why two: on a CPU adapter (lavapipe) every storage or workgroup-memory load costs about
//! the same and uniform loads are about 4x cheaper, so the fast kernel is a direct
//! convolution with weights in a uniform buffer and many FMAs per load, with no shared
//! memory (`Direct`, `shaders/conv2d_direct.wgsl`). On a discrete GPU the classic
//! shared-memory tiled implicit GEMM wins (`Tiled`, `shaders/conv2d_tiled.wgsl`). See
//! `docs/lavapipe.md` for the measurements behind this.
//!
//! Choice order: a variant forced on the device ([`Gpu::force_variant`] with op [`OP`]:
//! `direct`, `tiled`, or `tune` to time both once per shape and cache the winner; the CLI's
//! `--conv-variant` and a run's configuration force it this way), else by adapter type.

mod direct;
mod tiled;

pub use tiled::Tile as TiledTile;

use std::fmt;
use std::str::FromStr;

use super::check_same_device;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};

/// Op family name used for forcing and caching variants.
pub const OP: &str = "conv2d";

/// A conv kernel implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConvVariant {
    /// Register-blocked direct convolution, weights in uniform buffers: fast on CPU adapters.
    Direct,
    /// Shared-memory tiled implicit GEMM: fast on discrete GPUs.
    Tiled,
}

impl ConvVariant {
    /// Every variant, for tests and benchmarks.
    pub const ALL: [ConvVariant; 2] = [ConvVariant::Direct, ConvVariant::Tiled];

    pub fn name(self) -> &'static str {
        match self {
            ConvVariant::Direct => "direct",
            ConvVariant::Tiled => "tiled",
        }
    }
}

impl fmt::Display for ConvVariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ConvVariant {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "direct" => Ok(ConvVariant::Direct),
            "tiled" => Ok(ConvVariant::Tiled),
            _ => Err(Error::UnknownVariant { op: OP, name: s.to_string(), choices: "direct, tiled, tune".into() }),
        }
    }
}

/// The geometry of one convolution. Output size follows PyTorch:
/// `out = (in + 2 * pad - kernel) / stride + 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConvShape {
    pub batch: usize,
    pub in_channels: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub pad: usize,
}

impl ConvShape {
    /// Validates and builds the geometry from an input shape `[N, C, H, W]` and a weight
    /// shape `[O, C, K, K]`.
    pub fn new(x: &[usize], w: &[usize], stride: usize, pad: usize) -> Result<ConvShape> {
        let bad = |detail: String| Error::ShapeMismatch { op: "conv2d", detail };
        let [n, c, h, wd]: [usize; 4] =
            x.try_into().map_err(|_| bad(format!("input must be [N, C, H, W], got {x:?}")))?;
        let [o, ci, kh, kw]: [usize; 4] =
            w.try_into().map_err(|_| bad(format!("weight must be [O, C, K, K], got {w:?}")))?;
        if ci != c {
            return Err(bad(format!("input has {c} channels but the weight {w:?} expects {ci}")));
        }
        if kh != kw {
            return Err(Error::Unsupported { op: "conv2d", detail: format!("non-square kernel {kh}x{kw}") });
        }
        if stride == 0 {
            return Err(Error::Unsupported { op: "conv2d", detail: "stride 0".into() });
        }
        if h + 2 * pad < kh || wd + 2 * pad < kw {
            return Err(bad(format!("kernel {kh}x{kw} with padding {pad} is larger than the input {h}x{wd}")));
        }
        if [n, c, h, wd, o].contains(&0) {
            return Err(bad(format!("empty dimension in input {x:?} or weight {w:?}")));
        }
        Ok(ConvShape { batch: n, in_channels: c, in_h: h, in_w: wd, out_channels: o, kernel: kh, stride, pad })
    }

    pub fn out_h(&self) -> usize {
        (self.in_h + 2 * self.pad - self.kernel) / self.stride + 1
    }
    pub fn out_w(&self) -> usize {
        (self.in_w + 2 * self.pad - self.kernel) / self.stride + 1
    }
    pub fn input_shape(&self) -> [usize; 4] {
        [self.batch, self.in_channels, self.in_h, self.in_w]
    }
    pub fn weight_shape(&self) -> [usize; 4] {
        [self.out_channels, self.in_channels, self.kernel, self.kernel]
    }
    pub fn output_shape(&self) -> [usize; 4] {
        [self.batch, self.out_channels, self.out_h(), self.out_w()]
    }
    /// Multiply-adds of the forward pass times two (each of the three passes costs the same).
    pub fn flops(&self) -> f64 {
        2.0 * (self.batch
            * self.out_channels
            * self.out_h()
            * self.out_w()
            * self.in_channels
            * self.kernel
            * self.kernel) as f64
    }
    fn key(&self) -> String {
        format!(
            "{OP}:{}x{}x{}x{}:{}k{}s{}p{}",
            self.batch, self.in_channels, self.in_h, self.in_w, self.out_channels, self.kernel, self.stride, self.pad
        )
    }
}

/// Which pass of the convolution a choice is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvPass {
    Forward,
    BackwardData,
    BackwardFilter,
}

/// The variant the chooser picks for `pass` of `shape` on `gpu`.
pub fn choose(gpu: &Gpu, shape: &ConvShape, pass: ConvPass) -> Result<ConvVariant> {
    let forced = gpu.forced_variant(OP);
    match forced.as_deref().map(|s| s.trim().to_ascii_lowercase()) {
        Some(s) if s == "tune" => tune(gpu, shape, pass),
        Some(s) => s.parse(),
        None => Ok(if gpu.adapter().is_cpu() { ConvVariant::Direct } else { ConvVariant::Tiled }),
    }
}

/// Times every variant once on random data of this shape and caches the fastest (the
/// approach of cuDNN's benchmark mode).
fn tune(gpu: &Gpu, shape: &ConvShape, pass: ConvPass) -> Result<ConvVariant> {
    let key = format!("{}:{pass:?}", shape.key());
    if let Some(v) = gpu.tuned_choice(&key) {
        return v.parse();
    }
    let x = gpu.zeros(&shape.input_shape())?;
    let w = gpu.zeros(&shape.weight_shape())?;
    let y = gpu.zeros(&shape.output_shape())?;
    let mut best = (f64::INFINITY, ConvVariant::Direct);
    for v in ConvVariant::ALL {
        let run = || match pass {
            ConvPass::Forward => run_forward(v, shape, &x, &w, &y),
            ConvPass::BackwardData => run_backward_data(v, shape, &y, &w, &x, false),
            ConvPass::BackwardFilter => run_backward_filter(v, shape, &x, &y, &w),
        };
        run()?; // first run compiles the pipelines
        let ((), secs) = gpu.time(run)?;
        if secs < best.0 {
            best = (secs, v);
        }
    }
    gpu.set_tuned_choice(&key, best.1.name());
    Ok(best.1)
}

fn run_forward(v: ConvVariant, s: &ConvShape, x: &Tensor, w: &Tensor, y: &Tensor) -> Result<()> {
    match v {
        ConvVariant::Direct => direct::forward(s, x, w, y),
        ConvVariant::Tiled => tiled::forward(s, x, w, y, None),
    }
}
fn run_backward_data(v: ConvVariant, s: &ConvShape, dy: &Tensor, w: &Tensor, dx: &Tensor, acc: bool) -> Result<()> {
    match v {
        ConvVariant::Direct => direct::backward_data(s, dy, w, dx, acc),
        ConvVariant::Tiled => tiled::backward_data(s, dy, w, dx, acc, None),
    }
}
fn run_backward_filter(v: ConvVariant, s: &ConvShape, x: &Tensor, dy: &Tensor, dw: &Tensor) -> Result<()> {
    match v {
        ConvVariant::Direct => direct::backward_filter(s, x, dy, dw),
        ConvVariant::Tiled => tiled::backward_filter(s, x, dy, dw, None),
    }
}

/// Every configuration of the tiled variant `gpu` can run (each tile shape at every K-tile
/// depth its workgroup memory holds), for tests and benchmarks; the launcher picks one per shape.
pub fn tiled_tiles(gpu: &Gpu) -> Vec<TiledTile> {
    tiled::all_tiles(gpu.limits())
}

/// Runs `pass` of `shape` with the tiled variant in configuration `tile`, from the two inputs
/// the pass reads into `out`: forward (x, w) into y, backward-data (dy, w) into dx (added to it
/// with `accumulate`), backward-filter (x, dy) into dw.
pub fn run_tiled(
    tile: TiledTile,
    pass: ConvPass,
    shape: &ConvShape,
    inputs: [&Tensor; 2],
    out: &Tensor,
    accumulate: bool,
) -> Result<()> {
    let [a, b] = inputs;
    check_output("run_tiled", ("the output", out), [("the first input", a), ("the second", b)])?;
    match pass {
        ConvPass::Forward => tiled::forward(shape, a, b, out, Some(tile)),
        ConvPass::BackwardData => tiled::backward_data(shape, a, b, out, accumulate, Some(tile)),
        ConvPass::BackwardFilter => tiled::backward_filter(shape, a, b, out, Some(tile)),
    }
}

/// An `_into` pass's output `out` and inputs: one device, and the output aliasing neither input.
fn check_output(pass: &str, out: (&str, &Tensor), inputs: [(&str, &Tensor); 2]) -> Result<()> {
    let [(na, a), (nb, b)] = inputs;
    check_same_device("conv2d", a, b)?;
    check_same_device("conv2d", a, out.1)?;
    if out.1.same_buffer(a) || out.1.same_buffer(b) {
        return Err(Error::Unsupported {
            op: "conv2d",
            detail: format!("{pass}: {} shares a buffer with {na} or {nb}", out.0),
        });
    }
    Ok(())
}

fn check_shape(what: &str, t: &Tensor, want: [usize; 4]) -> Result<()> {
    if t.shape() != want {
        return Err(Error::ShapeMismatch {
            op: "conv2d",
            detail: format!("{what} has shape {:?}, expected {want:?}", t.shape()),
        });
    }
    Ok(())
}

/// `y = conv2d(x, w)` with the chosen variant.
pub fn forward(x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> Result<Tensor> {
    let s = ConvShape::new(x.shape(), w.shape(), stride, pad)?;
    forward_with(choose(x.gpu(), &s, ConvPass::Forward)?, x, w, stride, pad)
}

/// `y = conv2d(x, w)` with variant `v`.
pub fn forward_with(v: ConvVariant, x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> Result<Tensor> {
    check_same_device("conv2d", x, w)?;
    let s = ConvShape::new(x.shape(), w.shape(), stride, pad)?;
    // Every kernel overwrites its whole output.
    let y = x.gpu().empty(&s.output_shape())?;
    run_forward(v, &s, x, w, &y)?;
    Ok(y)
}

/// `dx = dL/dx` given `dy = dL/dy`, the weight and the input's shape, with the chosen variant.
pub fn backward_data(dy: &Tensor, w: &Tensor, x_shape: &[usize], stride: usize, pad: usize) -> Result<Tensor> {
    let s = ConvShape::new(x_shape, w.shape(), stride, pad)?;
    backward_data_with(choose(dy.gpu(), &s, ConvPass::BackwardData)?, dy, w, x_shape, stride, pad)
}

/// `dx = dL/dx` with variant `v`.
pub fn backward_data_with(
    v: ConvVariant,
    dy: &Tensor,
    w: &Tensor,
    x_shape: &[usize],
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    check_same_device("conv2d", dy, w)?;
    let s = ConvShape::new(x_shape, w.shape(), stride, pad)?;
    check_shape("output gradient", dy, s.output_shape())?;
    let dx = dy.gpu().empty(&s.input_shape())?;
    run_backward_data(v, &s, dy, w, &dx, false)?;
    Ok(dx)
}

/// Writes `dL/dx` into `dx` (whose shape is the input's), or adds it to `dx` with
/// `accumulate`: a residual block passes the tensor that already holds the shortcut gradient
/// and gets `dx += conv_backward_data(dy)` in the conv's own output stores, with no separate add
/// pass and no extra tensor. Uses the chosen variant.
pub fn backward_data_into(
    dy: &Tensor,
    w: &Tensor,
    stride: usize,
    pad: usize,
    dx: &Tensor,
    accumulate: bool,
) -> Result<()> {
    let s = ConvShape::new(dx.shape(), w.shape(), stride, pad)?;
    backward_data_into_with(choose(dy.gpu(), &s, ConvPass::BackwardData)?, dy, w, stride, pad, dx, accumulate)
}

/// [`backward_data_into`] with variant `v`.
pub fn backward_data_into_with(
    v: ConvVariant,
    dy: &Tensor,
    w: &Tensor,
    stride: usize,
    pad: usize,
    dx: &Tensor,
    accumulate: bool,
) -> Result<()> {
    // dx is written (and with `accumulate` read) while dy and w are read: no aliasing.
    check_output("backward_data_into", ("dx", dx), [("dy", dy), ("the weight", w)])?;
    let s = ConvShape::new(dx.shape(), w.shape(), stride, pad)?;
    check_shape("output gradient", dy, s.output_shape())?;
    run_backward_data(v, &s, dy, w, dx, accumulate)
}

/// `dw = dL/dw` given the input and `dy`, with the chosen variant.
pub fn backward_filter(x: &Tensor, dy: &Tensor, w_shape: &[usize], stride: usize, pad: usize) -> Result<Tensor> {
    let s = ConvShape::new(x.shape(), w_shape, stride, pad)?;
    backward_filter_with(choose(x.gpu(), &s, ConvPass::BackwardFilter)?, x, dy, w_shape, stride, pad)
}

/// `dw = dL/dw` with variant `v`.
pub fn backward_filter_with(
    v: ConvVariant,
    x: &Tensor,
    dy: &Tensor,
    w_shape: &[usize],
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    check_same_device("conv2d", x, dy)?;
    let s = ConvShape::new(x.shape(), w_shape, stride, pad)?;
    check_shape("output gradient", dy, s.output_shape())?;
    let dw = x.gpu().empty(&s.weight_shape())?;
    run_backward_filter(v, &s, x, dy, &dw)?;
    Ok(dw)
}

/// Writes `dL/dw` into `dw` (the weight's shape; e.g. a view of a stage's packed gradients),
/// with the chosen variant.
pub fn backward_filter_into(x: &Tensor, dy: &Tensor, stride: usize, pad: usize, dw: &Tensor) -> Result<()> {
    check_output("backward_filter_into", ("dw", dw), [("x", x), ("dy", dy)])?;
    let s = ConvShape::new(x.shape(), dw.shape(), stride, pad)?;
    check_shape("output gradient", dy, s.output_shape())?;
    run_backward_filter(choose(x.gpu(), &s, ConvPass::BackwardFilter)?, &s, x, dy, dw)
}
