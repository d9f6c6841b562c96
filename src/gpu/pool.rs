//! The caching allocator of one device: buffers are grouped in size classes and handed back
//! to the pool when the last tensor using them drops, so a steady-state training step creates
//! no buffer (and wgpu zero-fills nothing, as it would for every new buffer).
//!
//! Reuse is safe without waiting: a device executes its commands in recording order, and
//! wgpu orders every dispatch and copy after the earlier ones touching the same buffer, so a
//! buffer freed by a kernel recorded earlier may be written by one recorded later.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Buffers of one size class waiting for reuse, and the bytes of all buffers the pool owns.
#[derive(Default)]
pub(crate) struct BufferPool {
    /// Free buffers by (size class, usage), ordered by wgpu's id: the lowest is taken, so the
    /// buffer a tensor gets depends only on which buffers are free, and a training step that
    /// repeats the same allocations gets the same buffers every iteration (and so the same
    /// cached bind groups).
    free: Mutex<HashMap<(u64, wgpu::BufferUsages), BTreeSet<wgpu::Buffer>>>,
    /// Bytes of every buffer created through the pool, in use or free.
    capacity: AtomicU64,
}

/// The size class of a request: powers of two up to 4 KiB, then four classes per octave
/// (at most 25% above the request), so shapes that differ a little share buffers.
pub(crate) fn size_class(bytes: u64) -> u64 {
    let bytes = bytes.max(16);
    if bytes <= 4096 {
        return bytes.next_power_of_two();
    }
    let octave = bytes.next_power_of_two() / 2;
    let step = octave / 4;
    bytes.div_ceil(step) * step
}

impl BufferPool {
    /// A free buffer of `class` bytes and `usage`, if the pool holds one.
    pub fn take(&self, class: u64, usage: wgpu::BufferUsages) -> Option<wgpu::Buffer> {
        self.free.lock().unwrap().get_mut(&(class, usage)).and_then(|v| v.pop_first())
    }

    /// Counts a buffer created for the pool.
    pub fn created(&self, class: u64) {
        self.capacity.fetch_add(class, Ordering::Relaxed);
    }

    /// Hands a buffer back for reuse.
    pub fn put(&self, class: u64, usage: wgpu::BufferUsages, buffer: wgpu::Buffer) {
        self.free.lock().unwrap().entry((class, usage)).or_default().insert(buffer);
    }

    /// Stops counting a buffer that will not come back.
    pub fn forget(&self, class: u64) {
        self.capacity.fetch_sub(class, Ordering::Relaxed);
    }

    /// Bytes of every buffer the pool owns, in use or free.
    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Relaxed)
    }

    /// Destroys the free buffers (the memory goes back to the driver); returns their bytes.
    pub fn trim(&self) -> u64 {
        let mut free = self.free.lock().unwrap();
        let mut bytes = 0;
        for ((class, _), v) in free.drain() {
            bytes += class * v.len() as u64;
            for b in v {
                b.destroy();
            }
        }
        self.capacity.fetch_sub(bytes, Ordering::Relaxed);
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_round_up_by_at_most_a_quarter() {
        assert_eq!(size_class(1), 16);
        assert_eq!(size_class(16), 16);
        assert_eq!(size_class(17), 32);
        assert_eq!(size_class(4096), 4096);
        assert_eq!(size_class(4097), 5120);
        assert_eq!(size_class(8192), 8192);
        for b in [5000u64, 65_537, 1 << 20, 3 << 20, 1_000_003, 8_388_608 + 4] {
            let c = size_class(b);
            assert!(c >= b && c as f64 <= b as f64 * 1.25, "{b} -> {c}");
            assert_eq!(size_class(c), c, "a class is its own class");
        }
    }
}
