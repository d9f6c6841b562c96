//! Kernel launchers, one module per op family, each named like its WGSL file in `shaders/`,
//! its reference test in `tests/` and, for conv, its benchmark in `benches/`.
//!
//! Launchers check shapes and devices, then record dispatches; they never wait on the GPU.
//! Each dispatch gets a small parameter struct at binding 0 and its tensors at bindings 1..

pub mod batch_norm;
pub mod conv2d;
pub mod cross_entropy;
pub mod elementwise;
pub mod linear;
pub mod nonfinite;
pub mod pool;
pub mod sgd;
pub mod shortcut;

use crate::error::{Error, Result};
use crate::gpu::Tensor;

/// Workgroup size of the one-invocation-per-element kernels.
pub const WG_1D: u32 = 256;

/// Errors unless `a` and `b` have the same shape and live on the same device.
pub(crate) fn check_same_shape(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(Error::ShapeMismatch { op, detail: format!("{:?} vs {:?}", a.shape(), b.shape()) });
    }
    check_same_device(op, a, b)
}

/// Errors unless both tensors live on one device.
pub(crate) fn check_same_device(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.gpu().id() != b.gpu().id() {
        return Err(Error::ShapeMismatch { op, detail: "tensors live on different devices".into() });
    }
    Ok(())
}

/// Errors unless `t` has exactly `rank` dimensions; returns them.
pub(crate) fn dims<const R: usize>(op: &'static str, what: &str, t: &Tensor) -> Result<[usize; R]> {
    t.shape().try_into().map_err(|_| Error::ShapeMismatch {
        op,
        detail: format!("{what} must have {R} dimensions, got {:?}", t.shape()),
    })
}
