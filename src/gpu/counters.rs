//! What a device's runtime did: dispatches, compute passes, submits, host waits, buffers
//! created, bytes zero-filled and the CPU time spent recording. `featreplay profile` reports
//! the difference of two snapshots per steady-state iteration.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub(crate) struct RuntimeCounters {
    dispatches: AtomicU64,
    passes: AtomicU64,
    copies: AtomicU64,
    submits: AtomicU64,
    host_waits: AtomicU64,
    buffers_created: AtomicU64,
    bytes_created: AtomicU64,
    bytes_zero_filled: AtomicU64,
    bind_groups_created: AtomicU64,
    record_ns: AtomicU64,
    submit_ns: AtomicU64,
}

/// A snapshot of a device's runtime counters (see [`crate::Gpu::counters`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// Kernel dispatches recorded.
    pub dispatches: u64,
    /// Compute passes begun (several dispatches share one).
    pub passes: u64,
    /// Buffer copies and clears recorded (outside compute passes).
    pub copies: u64,
    /// Command buffers submitted to the queue.
    pub submits: u64,
    /// Times the host waited for the device (reads of results, syncs).
    pub host_waits: u64,
    /// wgpu buffers created (the pool had none of the size class).
    pub buffers_created: u64,
    /// Bytes of those buffers.
    pub bytes_created: u64,
    /// Bytes cleared to zero: explicit clears of reused buffers, and new buffers that wgpu
    /// zero-fills before their first use.
    pub bytes_zero_filled: u64,
    /// Bind groups created (the rest came from the cache).
    pub bind_groups_created: u64,
    /// CPU nanoseconds spent recording dispatches and copies (submits excluded).
    pub record_ns: u64,
    /// CPU nanoseconds spent in `queue.submit` (a CPU adapter such as lavapipe may run the
    /// work right there).
    pub submit_ns: u64,
}

impl std::ops::Sub for Counters {
    type Output = Counters;
    fn sub(self, o: Counters) -> Counters {
        Counters {
            dispatches: self.dispatches - o.dispatches,
            passes: self.passes - o.passes,
            copies: self.copies - o.copies,
            submits: self.submits - o.submits,
            host_waits: self.host_waits - o.host_waits,
            buffers_created: self.buffers_created - o.buffers_created,
            bytes_created: self.bytes_created - o.bytes_created,
            bytes_zero_filled: self.bytes_zero_filled - o.bytes_zero_filled,
            bind_groups_created: self.bind_groups_created - o.bind_groups_created,
            record_ns: self.record_ns - o.record_ns,
            submit_ns: self.submit_ns - o.submit_ns,
        }
    }
}

impl std::ops::Add for Counters {
    type Output = Counters;
    fn add(self, o: Counters) -> Counters {
        Counters {
            dispatches: self.dispatches + o.dispatches,
            passes: self.passes + o.passes,
            copies: self.copies + o.copies,
            submits: self.submits + o.submits,
            host_waits: self.host_waits + o.host_waits,
            buffers_created: self.buffers_created + o.buffers_created,
            bytes_created: self.bytes_created + o.bytes_created,
            bytes_zero_filled: self.bytes_zero_filled + o.bytes_zero_filled,
            bind_groups_created: self.bind_groups_created + o.bind_groups_created,
            record_ns: self.record_ns + o.record_ns,
            submit_ns: self.submit_ns + o.submit_ns,
        }
    }
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl RuntimeCounters {
    pub fn dispatch(&self) {
        add(&self.dispatches, 1)
    }
    pub fn pass(&self) {
        add(&self.passes, 1)
    }
    pub fn copy(&self) {
        add(&self.copies, 1)
    }
    pub fn host_wait(&self) {
        add(&self.host_waits, 1)
    }
    pub fn buffer_created(&self, bytes: u64) {
        add(&self.buffers_created, 1);
        add(&self.bytes_created, bytes);
    }
    pub fn zero_filled(&self, bytes: u64) {
        add(&self.bytes_zero_filled, bytes)
    }
    pub fn bind_group_created(&self) {
        add(&self.bind_groups_created, 1)
    }
    /// Time since `since`, less the `submit_ns` counted meanwhile, as recording time.
    pub fn recorded(&self, since: std::time::Instant, submit_ns_before: u64) {
        let submitted = self.submit_ns.load(Ordering::Relaxed) - submit_ns_before;
        add(&self.record_ns, (since.elapsed().as_nanos() as u64).saturating_sub(submitted))
    }
    pub fn submit_ns(&self) -> u64 {
        self.submit_ns.load(Ordering::Relaxed)
    }
    pub fn submitted(&self, since: std::time::Instant) {
        add(&self.submits, 1);
        add(&self.submit_ns, since.elapsed().as_nanos() as u64)
    }

    pub fn snapshot(&self) -> Counters {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counters {
            dispatches: l(&self.dispatches),
            passes: l(&self.passes),
            copies: l(&self.copies),
            submits: l(&self.submits),
            host_waits: l(&self.host_waits),
            buffers_created: l(&self.buffers_created),
            bytes_created: l(&self.bytes_created),
            bytes_zero_filled: l(&self.bytes_zero_filled),
            bind_groups_created: l(&self.bind_groups_created),
            record_ns: l(&self.record_ns),
            submit_ns: l(&self.submit_ns),
        }
    }
}
