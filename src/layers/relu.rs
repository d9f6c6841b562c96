//! ReLU as a layer (no parameters): its backward needs only its output's sign.

use crate::error::Result;
use crate::gpu::Tensor;
use crate::kernels::elementwise;

pub fn forward(x: &Tensor) -> Result<Tensor> {
    elementwise::relu_forward(x)
}

/// `dx = dy * (y > 0)` given the forward's output `y`.
pub fn backward(y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    elementwise::relu_backward(y, dy)
}
