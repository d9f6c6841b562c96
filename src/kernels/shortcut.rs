//! Launchers for `shaders/shortcut.wgsl`: the option-A shortcut of CIFAR ResNets (He et al.
//! 2016), the reference code's `LambdaLayer`:
//! `F.pad(x[:, :, ::stride, ::stride], (0, 0, 0, 0, pad, pad))` with
//! `pad = (out_channels - in_channels) / 2` zero channels on each side ([`ChannelPad::Both`]),
//! or the reference FR code's layout with every zero channel after the input channels
//! ([`ChannelPad::After`]). The two give the same function up to a permutation of the
//! channels the next layer reads, so they train differently from the same seed only through
//! the initial weights each channel meets.
//!
//! One dispatch per call, no saved state; the output (or dx) is zero-filled first, then the
//! sampled values are copied, so zero channels and unsampled pixels cost nothing.

use std::fmt;
use std::str::FromStr;

use bytemuck::{Pod, Zeroable};
use serde::{Deserialize, Serialize};

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

/// Where the option-A shortcut puts the zero channels it adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelPad {
    /// Half before and half after the input channels (akamaster's CIFAR ResNets; the
    /// difference must be even).
    #[default]
    Both,
    /// All after the input channels (the reference FR code's layout).
    After,
}

impl ChannelPad {
    /// Zero channels before the input channels, from `cin` to `cout` channels.
    pub fn leading(self, cin: usize, cout: usize) -> usize {
        match self {
            ChannelPad::Both => (cout - cin) / 2,
            ChannelPad::After => 0,
        }
    }
}

impl FromStr for ChannelPad {
    type Err = Error;
    fn from_str(s: &str) -> Result<ChannelPad> {
        match s.trim().to_ascii_lowercase().as_str() {
            "both" => Ok(ChannelPad::Both),
            "after" => Ok(ChannelPad::After),
            _ => Err(Error::InvalidConfig {
                op: "shortcut",
                detail: format!("unknown shortcut padding '{s}'; choose both or after"),
            }),
        }
    }
}

impl fmt::Display for ChannelPad {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChannelPad::Both => "both",
            ChannelPad::After => "after",
        })
    }
}

/// Checks the arguments; returns the input and output shapes.
fn shapes(
    op: &'static str,
    in_shape: &[usize],
    out_channels: usize,
    stride: usize,
    pad: ChannelPad,
) -> Result<([usize; 4], [usize; 4])> {
    let [n, cin, h, w]: [usize; 4] = in_shape.try_into().map_err(|_| Error::ShapeMismatch {
        op,
        detail: format!("input must have 4 dimensions [N, C, H, W], got {in_shape:?}"),
    })?;
    if stride == 0 {
        return Err(Error::Unsupported { op, detail: "stride must be at least 1".into() });
    }
    if out_channels < cin || (pad == ChannelPad::Both && !(out_channels - cin).is_multiple_of(2)) {
        let rule = match pad {
            ChannelPad::Both => "out_channels >= in_channels with an even difference",
            ChannelPad::After => "out_channels >= in_channels",
        };
        return Err(Error::ShapeMismatch {
            op,
            detail: format!("option-A padding ({pad}) needs {rule}, got {cin} -> {out_channels}"),
        });
    }
    Ok(([n, cin, h, w], [n, out_channels, h.div_ceil(stride), w.div_ceil(stride)]))
}

/// Output shape of the shortcut for input `in_shape` `[N, Cin, H, W]`:
/// `[N, out_channels, ceil(H / stride), ceil(W / stride)]`; errors like [`forward`].
pub fn output_shape(in_shape: &[usize], out_channels: usize, stride: usize, pad: ChannelPad) -> Result<[usize; 4]> {
    Ok(shapes("shortcut::output_shape", in_shape, out_channels, stride, pad)?.1)
}

fn launch(
    src: &Tensor,
    dst: &Tensor,
    large: [usize; 4],
    small: [usize; 4],
    stride: usize,
    pad: ChannelPad,
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
        pad: pad.leading(cin, cout) as u32,
        backward: backward as u32,
        _pad: [0; 3],
    };
    let grid = [(ho * wo).div_ceil(256) as u32, cin as u32, n as u32];
    src.gpu().dispatch(&Kernel::new("shortcut", "subsample_pad"), &p, &[Arg::Storage(src), Arg::Storage(dst)], grid)
}

/// Forward: `x` `[N, Cin, H, W]` -> `[N, out_channels, ceil(H / stride), ceil(W / stride)]`,
/// taking pixels `0, stride, 2 * stride, ...` and adding `out_channels - Cin` zero channels
/// as `pad` places them. Errors if the channel difference is negative (or odd for
/// [`ChannelPad::Both`]), or stride is 0.
pub fn forward(x: &Tensor, out_channels: usize, stride: usize, pad: ChannelPad) -> Result<Tensor> {
    const OP: &str = "shortcut::forward";
    let (large, small) = shapes(OP, x.shape(), out_channels, stride, pad)?;
    let y = x.gpu().zeros(&small)?;
    launch(x, &y, large, small, stride, pad, false)?;
    Ok(y)
}

/// Backward: `dy` of the forward's output shape -> `dx` of shape `in_shape`, zero where the
/// forward did not sample.
pub fn backward(dy: &Tensor, in_shape: &[usize], stride: usize, pad: ChannelPad) -> Result<Tensor> {
    const OP: &str = "shortcut::backward";
    let small = dims::<4>(OP, "dy", dy)?;
    let (large, want) = shapes(OP, in_shape, small[1], stride, pad)?;
    if small != want {
        return Err(Error::ShapeMismatch {
            op: OP,
            detail: format!("dy must have shape {want:?} for input {in_shape:?} and stride {stride}, got {small:?}"),
        });
    }
    let dx = dy.gpu().zeros(in_shape)?;
    launch(dy, &dx, large, small, stride, pad, true)?;
    Ok(dx)
}
