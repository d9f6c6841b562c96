//! Device-resident f32 tensors with shapes.

use std::sync::Arc;

use super::memory::TrackedBuffer;
use super::Gpu;
use crate::error::{Error, Result};

/// A dense, row-major f32 tensor living on one device. Cloning shares the buffer (like an
/// `Arc`); the bytes are freed, and uncounted, when the last clone drops.
#[derive(Clone)]
pub struct Tensor {
    pub(crate) buf: Arc<TrackedBuffer>,
    pub(crate) shape: Vec<usize>,
    pub(crate) gpu: Gpu,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor{:?} on {}", self.shape, self.gpu.adapter().name)
    }
}

impl Tensor {
    /// The dimensions, outermost first (NCHW for images, OIHW for conv weights).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of the device buffer (the element bytes rounded up to 16, at least 16).
    pub fn buffer_bytes(&self) -> u64 {
        self.buf.bytes
    }

    /// The wgpu buffer, for code that records its own commands.
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buf.buffer
    }

    /// The device this tensor lives on.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Copies the tensor to the host (submits pending work and waits for it).
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        self.gpu.read(self)
    }

    /// The same buffer seen with another shape of the same element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != self.numel() {
            return Err(Error::ShapeMismatch {
                op: "reshape",
                detail: format!("{:?} ({} values) into {:?} ({n} values)", self.shape, self.numel(), shape),
            });
        }
        Ok(Tensor { buf: self.buf.clone(), shape: shape.to_vec(), gpu: self.gpu.clone() })
    }

    /// True when both handles share one buffer.
    pub fn same_buffer(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.buf, &other.buf)
    }
}
