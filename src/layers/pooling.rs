//! Global average pooling as a layer (no parameters).

use crate::error::Result;
use crate::gpu::Tensor;
use crate::kernels::pool;

/// [N, C, H, W] -> [N, C].
pub fn global_avg_forward(x: &Tensor) -> Result<Tensor> {
    pool::global_avg_forward(x)
}

/// Spreads `dy` [N, C] evenly over the input's H x W.
pub fn global_avg_backward(dy: &Tensor, in_shape: &[usize]) -> Result<Tensor> {
    pool::global_avg_backward(dy, in_shape)
}
