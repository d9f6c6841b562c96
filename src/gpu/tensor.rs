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
    /// Byte offset of element 0 in the buffer (non-zero for [`Tensor::views`]).
    pub(crate) offset: u64,
    /// Made by [`Tensor::views`] (a part of a larger tensor, even where it spans all of it).
    pub(crate) view: bool,
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

    /// Bytes of the tensor on the device (the element bytes rounded up to 16, at least 16).
    pub fn buffer_bytes(&self) -> u64 {
        // The rounding `Gpu::zeros` allocates with, so a whole tensor reports its buffer.
        (self.numel() as u64 * 4).div_ceil(16).max(1) * 16
    }

    /// Consecutive views of this tensor's buffer with `shapes`, each starting at a multiple of
    /// the device's [`Gpu::view_alignment`] (the views share the buffer: writing one changes
    /// this tensor). Errors when they do not fit.
    pub fn views(&self, shapes: &[Vec<usize>]) -> Result<Vec<Tensor>> {
        let align = self.gpu.view_alignment();
        let mut at = self.offset;
        let mut out = Vec::with_capacity(shapes.len());
        for shape in shapes {
            let bytes = (shape.iter().product::<usize>() as u64 * 4).div_ceil(16).max(1) * 16;
            if at + bytes > self.offset + self.buffer_bytes() {
                return Err(Error::ShapeMismatch {
                    op: "views",
                    detail: format!("views {shapes:?} do not fit a tensor of {:?}", self.shape),
                });
            }
            out.push(Tensor {
                buf: self.buf.clone(),
                offset: at,
                view: true,
                shape: shape.clone(),
                gpu: self.gpu.clone(),
            });
            at = (at + bytes).div_ceil(align) * align;
        }
        Ok(out)
    }

    /// Elements a tensor needs to hold [`Tensor::views`] of `shapes` on `gpu`.
    pub fn packed_len(gpu: &Gpu, shapes: &[Vec<usize>]) -> usize {
        let align = gpu.view_alignment();
        let mut at = 0u64;
        for shape in shapes {
            let bytes = (shape.iter().product::<usize>() as u64 * 4).div_ceil(16).max(1) * 16;
            at = (at + bytes).div_ceil(align) * align;
        }
        (at / 4) as usize
    }

    /// Whether this tensor is a view into a larger buffer.
    pub fn is_view(&self) -> bool {
        self.view
    }

    /// Byte offset of this tensor in its buffer.
    pub fn byte_offset(&self) -> u64 {
        self.offset
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
        Ok(Tensor {
            buf: self.buf.clone(),
            offset: self.offset,
            view: self.view,
            shape: shape.to_vec(),
            gpu: self.gpu.clone(),
        })
    }

    /// True when both handles share memory (the same buffer and overlapping bytes).
    pub fn same_buffer(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.buf, &other.buf)
            && self.offset < other.offset + other.buffer_bytes()
            && other.offset < self.offset + self.buffer_bytes()
    }
}
