//! The `direct` conv variant (being written).

use super::ConvShape;
use crate::error::{Error, Result};
use crate::gpu::Tensor;

fn todo() -> Result<()> {
    Err(Error::Unsupported { op: "conv2d", detail: "the direct variant is not written yet".into() })
}

/// y = conv(x, w); overwrites y.
pub(super) fn forward(_s: &ConvShape, _x: &Tensor, _w: &Tensor, _y: &Tensor) -> Result<()> {
    todo()
}
/// dx = conv_transpose(dy, w); overwrites dx.
pub(super) fn backward_data(_s: &ConvShape, _dy: &Tensor, _w: &Tensor, _dx: &Tensor) -> Result<()> {
    todo()
}
/// dw = sum over batch and pixels of dy * x; overwrites dw.
pub(super) fn backward_filter(_s: &ConvShape, _x: &Tensor, _dy: &Tensor, _dw: &Tensor) -> Result<()> {
    todo()
}
