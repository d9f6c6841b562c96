//! Exact accounting of device memory: every buffer this crate creates on a device goes
//! through one tracker, so live and peak bytes per device are exact sums of buffer sizes.
//! Later issues report per-stage peak memory from it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::pool::BufferPool;

/// What a buffer is for: tensors are the model's memory; staging and parameter buffers are
/// the runtime's transient overhead, counted separately so reports can show both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferKind {
    Tensor,
    Internal,
}

#[derive(Debug, Default)]
struct Counters {
    live: AtomicU64,
    peak: AtomicU64,
    allocations: AtomicU64,
}

impl Counters {
    fn alloc(&self, bytes: u64) {
        let live = self.live.fetch_add(bytes, Ordering::SeqCst) + bytes;
        self.peak.fetch_max(live, Ordering::SeqCst);
        self.allocations.fetch_add(1, Ordering::SeqCst);
    }
    fn free(&self, bytes: u64) {
        self.live.fetch_sub(bytes, Ordering::SeqCst);
    }
}

/// Live and peak bytes of one device, total and for tensors alone.
#[derive(Debug, Default)]
pub struct MemoryTracker {
    total: Counters,
    tensors: Counters,
}

/// A snapshot of a [`MemoryTracker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryStats {
    /// Bytes of every live buffer (tensors and internal).
    pub live_bytes: u64,
    /// Highest `live_bytes` since creation or the last [`MemoryTracker::reset_peak`].
    pub peak_bytes: u64,
    /// Bytes of live tensors.
    pub live_tensor_bytes: u64,
    /// Highest `live_tensor_bytes` since creation or the last reset.
    pub peak_tensor_bytes: u64,
    /// Tensors and internal buffers ever handed out (from the pool or newly created).
    pub allocations: u64,
    /// Bytes of every buffer the device's caching allocator owns, in use or free: the memory
    /// the driver really holds for tensors and reused staging buffers.
    pub pool_bytes: u64,
}

impl MemoryTracker {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub(crate) fn alloc(&self, kind: BufferKind, bytes: u64) {
        self.total.alloc(bytes);
        if kind == BufferKind::Tensor {
            self.tensors.alloc(bytes);
        }
    }

    pub(crate) fn free(&self, kind: BufferKind, bytes: u64) {
        self.total.free(bytes);
        if kind == BufferKind::Tensor {
            self.tensors.free(bytes);
        }
    }

    /// Current counters.
    pub fn stats(&self) -> MemoryStats {
        MemoryStats {
            live_bytes: self.total.live.load(Ordering::SeqCst),
            peak_bytes: self.total.peak.load(Ordering::SeqCst),
            live_tensor_bytes: self.tensors.live.load(Ordering::SeqCst),
            peak_tensor_bytes: self.tensors.peak.load(Ordering::SeqCst),
            allocations: self.total.allocations.load(Ordering::SeqCst),
            pool_bytes: 0,
        }
    }

    /// Starts a new peak measurement from the current live bytes.
    pub fn reset_peak(&self) {
        self.total.peak.store(self.total.live.load(Ordering::SeqCst), Ordering::SeqCst);
        self.tensors.peak.store(self.tensors.live.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

/// A wgpu buffer whose bytes are counted in its device's tracker until it is dropped; a
/// pooled one then goes back to its pool for reuse.
#[derive(Debug)]
pub struct TrackedBuffer {
    pub(crate) buffer: wgpu::Buffer,
    /// The bytes asked for (what the tracker counts); a pooled buffer may be larger.
    pub(crate) bytes: u64,
    kind: BufferKind,
    tracker: Arc<MemoryTracker>,
    pool: Option<Pooled>,
}

struct Pooled {
    pool: Arc<BufferPool>,
    class: u64,
    usage: wgpu::BufferUsages,
}

impl std::fmt::Debug for Pooled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pooled({} bytes)", self.class)
    }
}

impl TrackedBuffer {
    /// `buffer` (of size class `class`, from or for `pool`) lent out for `bytes`.
    pub(crate) fn pooled(
        buffer: wgpu::Buffer,
        tracker: &Arc<MemoryTracker>,
        kind: BufferKind,
        bytes: u64,
        pool: &Arc<BufferPool>,
        class: u64,
        usage: wgpu::BufferUsages,
    ) -> Self {
        tracker.alloc(kind, bytes);
        TrackedBuffer {
            buffer,
            bytes,
            kind,
            tracker: tracker.clone(),
            pool: Some(Pooled { pool: pool.clone(), class, usage }),
        }
    }

    /// The underlying wgpu buffer.
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    /// Keeps this buffer out of the pool when it drops (e.g. a staging buffer whose mapping
    /// may still be pending).
    pub(crate) fn unpool(&mut self) {
        if let Some(p) = self.pool.take() {
            p.pool.forget(p.class);
        }
    }
}

impl Drop for TrackedBuffer {
    fn drop(&mut self) {
        self.tracker.free(self.kind, self.bytes);
        if let Some(p) = self.pool.take() {
            p.pool.put(p.class, p.usage, self.buffer.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_track_live_and_peak() {
        let t = MemoryTracker::new();
        t.alloc(BufferKind::Tensor, 100);
        t.alloc(BufferKind::Internal, 50);
        t.free(BufferKind::Tensor, 100);
        t.alloc(BufferKind::Tensor, 30);
        let s = t.stats();
        assert_eq!(s.live_bytes, 80);
        assert_eq!(s.peak_bytes, 150);
        assert_eq!(s.live_tensor_bytes, 30);
        assert_eq!(s.peak_tensor_bytes, 100);
        assert_eq!(s.allocations, 3);
        t.reset_peak();
        assert_eq!(t.stats().peak_bytes, 80);
        assert_eq!(t.stats().peak_tensor_bytes, 30);
    }
}
