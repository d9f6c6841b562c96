//! Launcher for `shaders/nonfinite.wgsl`: counts the NaN and infinite values of a tensor
//! into one slot of a device-side counter buffer, without a host round trip. Divergence
//! detection ([`crate::layers::watch`]) is built on it; the watched SGD step
//! ([`super::sgd::step_watched`]) counts into the same kind of buffer.

use bytemuck::{Pod, Zeroable};

use super::check_same_device;
use crate::error::{Error, Result};
use crate::gpu::{Arg, Gpu, Kernel, Tensor};

const OP: &str = "nonfinite";
/// Invocations per workgroup; each checks 4 elements.
const WG: u32 = 256;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    slot: u32,
    _pad: [u32; 2],
}

/// A buffer of `slots` u32 counters, zero, on `gpu` (stored in a tensor's buffer; read it
/// with [`read_counters`]).
pub fn counters(gpu: &Gpu, slots: usize) -> Result<Tensor> {
    if slots == 0 {
        return Err(Error::Unsupported { op: OP, detail: "a counter buffer needs at least one slot".into() });
    }
    gpu.zeros(&[slots])
}

/// The counters' values (waits for the device).
pub fn read_counters(counters: &Tensor) -> Result<Vec<u32>> {
    Ok(counters.to_vec()?.into_iter().map(f32::to_bits).collect())
}

/// Checks that `slot` is a counter of `counters` and both tensors share a device.
pub(crate) fn check_slot(op: &'static str, x: &Tensor, counters: &Tensor, slot: usize) -> Result<()> {
    check_same_device(op, x, counters)?;
    if counters.shape().len() != 1 || slot >= counters.numel() {
        return Err(Error::ShapeMismatch {
            op,
            detail: format!("counter slot {slot} outside a counter buffer of shape {:?}", counters.shape()),
        });
    }
    if x.same_buffer(counters) {
        return Err(Error::ShapeMismatch { op, detail: "a tensor cannot count into its own buffer".into() });
    }
    if x.numel() >= (u32::MAX - 4) as usize {
        return Err(Error::Unsupported { op, detail: format!("{:?} exceeds 32-bit indexing", x.shape()) });
    }
    Ok(())
}

/// Records `counters[slot] += number of non-finite values of x` (one dispatch, no wait).
pub fn count(x: &Tensor, counters: &Tensor, slot: usize) -> Result<()> {
    check_slot(OP, x, counters, slot)?;
    let gpu = x.gpu();
    let params = Params { n: x.numel() as u32, slot: slot as u32, _pad: [0; 2] };
    gpu.dispatch(
        &Kernel::new(OP, "count"),
        &params,
        &[Arg::Storage(x), Arg::Storage(counters)],
        gpu.grid_1d(x.numel().div_ceil(4), WG),
    )
}
