//! Launchers for `shaders/shortcut.wgsl`: the option-A shortcut of CIFAR ResNets (He et al.
//! 2016), the reference code's `LambdaLayer`:
//! `F.pad(x[:, :, ::stride, ::stride], (0, 0, 0, 0, pad, pad))` with
//! `pad = (out_channels - in_channels) / 2` zero channels on each side.
//!
//! One dispatch per call, no saved state; the output (or dx) is zero-filled first, then the
//! sampled values are copied, so zero channels and unsampled pixels cost nothing.

use bytemuck::{Pod, Zeroable};

use super::dims;
use crate::error::{Error, Result};
use crate::gpu::{Arg, Kernel, Tensor};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    cin: u32,
    cout: u32,
    h: u32,
    w: u32,
    ho: u32,
    wo: u32,
    stride: u32,
    pad: u32,
    backward: u32,
    _pad: [u32; 3],
}

/// Checks the arguments; returns the input and output shapes.
fn shapes(
    op: &'static str,
    in_shape: &[usize],
    out_channels: usize,
    stride: usize,
) -> Result<([usize; 4], [usize; 4])> {
    let [n, cin, h, w]: [usize; 4] = in_shape.try_into().map_err(|_| Error::ShapeMismatch {
        op,
        detail: format!("input must have 4 dimensions [N, C, H, W], got {in_shape:?}"),
    })?;
    if stride == 0 {
        return Err(Error::Unsupported { op, detail: "stride must be at least 1".into() });
    }
    if out_channels < cin || !(out_channels - cin).is_multiple_of(2) {
        return Err(Error::ShapeMismatch {
            op,
            detail: format!(
                "option-A padding needs out_channels >= in_channels with an even difference, got {cin} -> \
                 {out_channels}"
            ),
        });
    }
    Ok(([n, cin, h, w], [n, out_channels, h.div_ceil(stride), w.div_ceil(stride)]))
}

/// Output shape of the shortcut for input `in_shape` `[N, Cin, H, W]`:
/// `[N, out_channels, ceil(H / stride), ceil(W / stride)]`; errors like [`forward`].
pub fn output_shape(in_shape: &[usize], out_channels: usize, stride: usize) -> Result<[usize; 4]> {
    Ok(shapes("shortcut::output_shape", in_shape, out_channels, stride)?.1)
}

fn launch(
    src: &Tensor,
    dst: &Tensor,
    large: [usize; 4],
    small: [usize; 4],
    stride: usize,
    backward: bool,
) -> Result<()> {
    let [n, cin, h, w] = large;
    let [_, cout, ho, wo] = small;
    let p = Params {
        cin: cin as u32,
        cout: cout as u32,
        h: h as u32,
        w: w as u32,
        ho: ho as u32,
        wo: wo as u32,
        stride: stride as u32,
        pad: ((cout - cin) / 2) as u32,
        backward: backward as u32,
        _pad: [0; 3],
    };
    let grid = [(ho * wo).div_ceil(256) as u32, cin as u32, n as u32];
    src.gpu().dispatch(&Kernel::new("shortcut", "subsample_pad"), &p, &[Arg::Storage(src), Arg::Storage(dst)], grid)
}

/// Forward: `x` `[N, Cin, H, W]` -> `[N, out_channels, ceil(H / stride), ceil(W / stride)]`,
/// taking pixels `0, stride, 2 * stride, ...` and zero-padding `(out_channels - Cin) / 2`
/// channels on each side. Errors if the channel difference is negative or odd, or stride is 0.
pub fn forward(x: &Tensor, out_channels: usize, stride: usize) -> Result<Tensor> {
    const OP: &str = "shortcut::forward";
    let (large, small) = shapes(OP, x.shape(), out_channels, stride)?;
    let y = x.gpu().zeros(&small)?;
    launch(x, &y, large, small, stride, false)?;
    Ok(y)
}

/// Backward: `dy` of the forward's output shape -> `dx` of shape `in_shape`, zero where the
/// forward did not sample.
pub fn backward(dy: &Tensor, in_shape: &[usize], stride: usize) -> Result<Tensor> {
    const OP: &str = "shortcut::backward";
    let small = dims::<4>(OP, "dy", dy)?;
    let (large, want) = shapes(OP, in_shape, small[1], stride)?;
    if small != want {
        return Err(Error::ShapeMismatch {
            op: OP,
            detail: format!("dy must have shape {want:?} for input {in_shape:?} and stride {stride}, got {small:?}"),
        });
    }
    let dx = dy.gpu().zeros(in_shape)?;
    launch(dy, &dx, large, small, stride, true)?;
    Ok(dx)
}
