//! Moving tensors between pipeline stages. The scheduler moves tensors and never does math.
//!
//! All transport between devices goes through [`Transport`], so a later issue can replace
//! the in-process implementation by one that crosses processes or machines.

use crate::error::Result;
use crate::gpu::{Gpu, Tensor};

/// Moves a tensor to another stage's device.
pub trait Transport: Send + Sync {
    /// `t` on `to`: the same tensor when `to` is `t`'s device (no copy), else a copy.
    fn transfer(&self, t: &Tensor, to: &Gpu) -> Result<Tensor>;
}

/// Devices in one process: a host round trip through mapped staging buffers (wgpu devices
/// cannot share memory), or nothing at all when both stages share a device.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostTransport;

impl Transport for HostTransport {
    fn transfer(&self, t: &Tensor, to: &Gpu) -> Result<Tensor> {
        if t.gpu().id() == to.id() {
            return Ok(t.clone());
        }
        to.tensor(t.shape(), &t.to_vec()?)
    }
}
