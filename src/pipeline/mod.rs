//! Moving tensors between pipeline stages. The scheduler moves tensors and never does math.
//!
//! Two layers: [`Transport`] moves one tensor between two devices of this process, and
//! [`link::StageLinks`] carries a stage's messages (features and labels up, gradients down)
//! to and from its neighbours, wherever they run.

pub mod cluster;
pub mod link;
#[cfg(feature = "mpi")]
pub mod mpi;

use crate::error::Result;
use crate::gpu::{Gpu, PendingRead, Tensor};

/// A transfer started by [`Transport::start`].
pub enum InFlight {
    /// Nothing to move (same device), or already moved.
    Ready(Tensor),
    /// A copy to the host in flight, to be uploaded to `to`.
    Host { read: PendingRead, shape: Vec<usize>, to: Gpu },
}

impl InFlight {
    /// Completes the transfer: the tensor on the destination device.
    pub fn finish(self) -> Result<Tensor> {
        match self {
            InFlight::Ready(t) => Ok(t),
            InFlight::Host { read, shape, to } => to.tensor(&shape, &read.wait()?),
        }
    }
}

/// Moves a tensor to another stage's device.
pub trait Transport: Send + Sync {
    /// Starts moving `t` to `to` without waiting, so the sending stage can submit more work
    /// before the data must leave.
    fn start(&self, t: &Tensor, to: &Gpu) -> Result<InFlight>;

    /// `t` on `to`, waiting for it.
    fn transfer(&self, t: &Tensor, to: &Gpu) -> Result<Tensor> {
        self.start(t, to)?.finish()
    }
}

/// Devices in one process: a host round trip through mapped staging buffers (wgpu devices
/// cannot share memory), or nothing at all when both stages share a device. Each transfer
/// has its own staging buffer, so a stage's next transfer never waits for the previous one.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostTransport;

impl Transport for HostTransport {
    fn start(&self, t: &Tensor, to: &Gpu) -> Result<InFlight> {
        if t.gpu().id() == to.id() {
            return Ok(InFlight::Ready(t.clone()));
        }
        Ok(InFlight::Host { read: t.gpu().read_async(t)?, shape: t.shape().to_vec(), to: to.clone() })
    }
}
