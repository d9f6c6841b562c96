//! Launchers for `shaders/elementwise.wgsl`: fill, scale, axpy, add, ReLU forward/backward.

use bytemuck::{Pod, Zeroable};

use super::{check_same_shape, WG_1D};
use crate::error::Result;
use crate::gpu::{Arg, Gpu, Kernel, Tensor};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    alpha: f32,
    _pad: [u32; 2],
}

fn launch(gpu: &Gpu, entry: &'static str, n: usize, alpha: f32, args: &[Arg]) -> Result<()> {
    let params = Params { n: n as u32, alpha, _pad: [0; 2] };
    gpu.dispatch(&Kernel::new("elementwise", entry), &params, args, gpu.grid_1d(n, WG_1D))
}

/// `x[i] = value`.
pub fn fill(x: &Tensor, value: f32) -> Result<()> {
    launch(x.gpu(), "fill", x.numel(), value, &[Arg::Storage(x)])
}

/// `x[i] *= alpha`.
pub fn scale(x: &Tensor, alpha: f32) -> Result<()> {
    launch(x.gpu(), "scale", x.numel(), alpha, &[Arg::Storage(x)])
}

/// `y[i] += alpha * x[i]`: gradient accumulation.
pub fn axpy(alpha: f32, x: &Tensor, y: &Tensor) -> Result<()> {
    check_same_shape("axpy", x, y)?;
    launch(x.gpu(), "axpy", x.numel(), alpha, &[Arg::Storage(x), Arg::Storage(y)])
}

/// `out = a + b` into a new tensor (the residual add; its backward passes the gradient to
/// both inputs unchanged).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    check_same_shape("add", a, b)?;
    let out = a.gpu().zeros(a.shape())?;
    launch(a.gpu(), "add", a.numel(), 0.0, &[Arg::Storage(a), Arg::Storage(b), Arg::Storage(&out)])?;
    Ok(out)
}

/// `y = max(x, 0)` into a new tensor.
pub fn relu_forward(x: &Tensor) -> Result<Tensor> {
    let y = x.gpu().zeros(x.shape())?;
    launch(x.gpu(), "relu_forward", x.numel(), 0.0, &[Arg::Storage(x), Arg::Storage(&y)])?;
    Ok(y)
}

/// `dx = dy * (y > 0)` where `y` is the ReLU's output.
pub fn relu_backward(y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    check_same_shape("relu_backward", y, dy)?;
    let dx = y.gpu().zeros(y.shape())?;
    launch(y.gpu(), "relu_backward", y.numel(), 0.0, &[Arg::Storage(y), Arg::Storage(dy), Arg::Storage(&dx)])?;
    Ok(dx)
}
