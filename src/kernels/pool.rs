//! Launchers for `shaders/pool.wgsl`: global average pooling (`AdaptiveAvgPool2d(1)` then
//! flatten, as in CIFAR ResNets) and its backward. One dispatch each, no saved state.

use bytemuck::{Pod, Zeroable};

use super::{dims, WG_1D};
use crate::error::{Error, Result};
use crate::gpu::{Arg, Kernel, Tensor};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    planes: u32,
    hw: u32,
    _pad: [u32; 2],
}

fn check(op: &'static str, in_shape: &[usize]) -> Result<Params> {
    let [n, c, h, w]: [usize; 4] = in_shape.try_into().map_err(|_| Error::ShapeMismatch {
        op,
        detail: format!("input must have 4 dimensions [N, C, H, W], got {in_shape:?}"),
    })?;
    if h * w == 0 {
        return Err(Error::ShapeMismatch { op, detail: format!("cannot average over an empty plane: {in_shape:?}") });
    }
    if n * c * h * w >= 1 << 32 {
        return Err(Error::Unsupported { op, detail: format!("{in_shape:?} has 2^32 values or more") });
    }
    Ok(Params { planes: (n * c) as u32, hw: (h * w) as u32, _pad: [0; 2] })
}

/// `x` `[N, C, H, W]` -> `[N, C]`, the mean over H x W.
pub fn global_avg_forward(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "pool::global_avg_forward";
    let [n, c, _, _] = dims::<4>(OP, "x", x)?;
    let p = check(OP, x.shape())?;
    let gpu = x.gpu();
    let y = gpu.empty(&[n, c])?;
    gpu.dispatch(
        &Kernel::new("pool", "avg_forward"),
        &p,
        &[Arg::Storage(x), Arg::Storage(&y)],
        gpu.grid_1d(n * c, WG_1D),
    )?;
    Ok(y)
}

/// `dy` `[N, C]` -> `dx` of shape `in_shape` `[N, C, H, W]`: `dx[n, c, h, w] = dy[n, c] / (H * W)`.
pub fn global_avg_backward(dy: &Tensor, in_shape: &[usize]) -> Result<Tensor> {
    const OP: &str = "pool::global_avg_backward";
    let p = check(OP, in_shape)?;
    if dy.shape() != &in_shape[..2] {
        return Err(Error::ShapeMismatch {
            op: OP,
            detail: format!("dy must have shape {:?} for input {in_shape:?}, got {:?}", &in_shape[..2], dy.shape()),
        });
    }
    let gpu = dy.gpu();
    let dx = gpu.empty(in_shape)?;
    gpu.dispatch(
        &Kernel::new("pool", "avg_backward"),
        &p,
        &[Arg::Storage(dy), Arg::Storage(&dx)],
        gpu.grid_1d(dx.numel(), WG_1D),
    )?;
    Ok(dx)
}
