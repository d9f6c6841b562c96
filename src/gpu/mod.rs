//! The GPU runtime: adapters, one device handle per pipeline stage, device-resident tensors,
//! a pipeline cache, command batching and exact memory accounting.
//!
//! Kernels record dispatches into one compute pass of a per-device command encoder; nothing
//! waits on the GPU until a host read ([`Gpu::read`]) or an explicit [`Gpu::sync`]. The
//! encoder is submitted early after the device went idle (after [`FIRST_SUBMIT`]
//! dispatches, so it starts working while the host records the rest) and then every
//! [`MAX_BATCH`] dispatches. Tensors come from a caching allocator ([`pool`]); bind groups
//! are cached per pipeline and buffers, and each dispatch's parameters go into one
//! persistent uniform buffer at a dynamic offset, so a steady-state step creates nothing.

pub mod adapter;
pub mod counters;
pub mod memory;
pub mod pipeline;
mod pool;
mod tensor;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use adapter::{list_adapters, AdapterSelector, AdapterSummary};
pub use counters::Counters;
use counters::RuntimeCounters;
use memory::TrackedBuffer;
pub use memory::{BufferKind, MemoryStats, MemoryTracker};
use pool::{size_class, BufferPool};
pub use tensor::Tensor;

use crate::error::{Error, Result};

/// Dispatches recorded before the encoder is submitted without waiting.
pub const MAX_BATCH: usize = 256;
/// Dispatches recorded after the device went idle before the first submit: small, so the
/// device starts while the host records the rest of the step; later batches double up to
/// [`MAX_BATCH`].
pub const FIRST_SUBMIT: usize = 16;
/// Bind groups kept per device before the cache starts over (a ResNet-20 step on a CPU
/// adapter binds about 4,400 distinct windows; a pipeline of steps may cycle through a few).
const BIND_GROUP_CACHE: usize = 65536;

/// Whether shader modules keep wgpu's runtime bounds checks (see [`set_shader_runtime_checks`]):
/// 0 by adapter type, 1 always, 2 never.
static RUNTIME_CHECKS: AtomicU8 = AtomicU8::new(0);

/// Builds the shader modules of devices opened from now on with (`Some(true)`) or without
/// (`Some(false)`) wgpu's runtime bounds checks, or by adapter type (`None`, the default):
/// without them on GPUs, where every kernel guards its own indices and naga validates each
/// module, so the checks only cost time; with them on CPU adapters, where leaving them out
/// measured no faster (lavapipe, ResNet-20: 26.7-32.6 img/s without, 33.0-34.0 with).
/// `--shader-checks on` helps rule out an out-of-bounds access when a result looks wrong.
pub fn set_shader_runtime_checks(on: Option<bool>) {
    RUNTIME_CHECKS.store(
        match on {
            None => 0,
            Some(true) => 1,
            Some(false) => 2,
        },
        Ordering::Relaxed,
    );
}
/// Bytes of the per-batch uniform buffer that holds every dispatch's parameters.
const PARAMS_CAPACITY: u64 = 64 * 1024;

/// A copy to the host in flight (see [`Gpu::read_async`]).
pub struct PendingRead {
    gpu: Gpu,
    /// A pooled staging buffer; back in the pool once read and unmapped.
    staging: Option<TrackedBuffer>,
    index: Option<wgpu::SubmissionIndex>,
    rx: std::sync::mpsc::Receiver<std::result::Result<(), wgpu::BufferAsyncError>>,
    numel: usize,
}

impl PendingRead {
    /// Waits for the copy's submission (not for work submitted after it) and returns the data.
    pub fn wait(mut self) -> Result<Vec<f32>> {
        let g = self.gpu.clone();
        g.inner.counters.host_wait();
        g.inner
            .device
            .poll(wgpu::PollType::Wait { submission_index: self.index.take(), timeout: None })
            .map_err(|e| Error::DeviceLost { adapter: g.inner.adapter.name.clone(), message: e.to_string() })?;
        g.idle();
        g.check_fault()?;
        let mapped = self.rx.recv_timeout(Duration::from_secs(60)).map_err(|e| g.map_error(e))?;
        mapped.map_err(|e| g.map_error(e))?;
        let staging = self.staging.take().expect("staging buffer of an unread PendingRead");
        let out = {
            let bytes = (self.numel as u64 * 4).max(4);
            let view = staging.buffer.slice(..bytes).get_mapped_range().map_err(|e| g.map_error(e))?;
            bytemuck::cast_slice::<u8, f32>(&view)[..self.numel].to_vec()
        };
        staging.buffer.unmap();
        Ok(out)
    }
}

impl Drop for PendingRead {
    fn drop(&mut self) {
        // Never waited for: the mapping may still be pending, so the buffer cannot be reused.
        if let Some(s) = self.staging.as_mut() {
            s.unpool();
        }
    }
}

/// One argument of a kernel dispatch, bound at `binding = position + 1` (binding 0 always
/// holds the dispatch's parameter struct).
#[derive(Clone, Copy)]
pub enum Arg<'a> {
    /// The whole tensor as a storage buffer.
    Storage(&'a Tensor),
    /// A byte range of the tensor as a uniform buffer (uniform loads are about 4x cheaper on
    /// CPU adapters; bindings are limited to 64 KiB, hence the range). `offset` must be a
    /// multiple of the device's `min_uniform_buffer_offset_alignment`.
    Uniform { tensor: &'a Tensor, offset: u64, size: u64 },
}

/// A kernel: entry point `entry` of `shaders/<shader>.wgsl` specialised by WGSL `override`
/// constants.
#[derive(Clone, Copy, Debug)]
pub struct Kernel<'a> {
    pub shader: &'static str,
    pub entry: &'static str,
    pub constants: &'a [(&'static str, f64)],
}

impl<'a> Kernel<'a> {
    pub const fn new(shader: &'static str, entry: &'static str) -> Self {
        Kernel { shader, entry, constants: &[] }
    }
    pub const fn with(shader: &'static str, entry: &'static str, constants: &'a [(&'static str, f64)]) -> Self {
        Kernel { shader, entry, constants }
    }
}

struct Recorder {
    /// The open compute pass (declared before the encoder: it must end first). Dispatches
    /// share it until a copy, a clear or a submit needs the encoder.
    pass: Option<wgpu::ComputePass<'static>>,
    encoder: Option<wgpu::CommandEncoder>,
    /// Parameters of this batch's dispatches, written to the persistent parameter buffer
    /// right before the batch is submitted.
    params: Vec<u8>,
    dispatches: usize,
    /// Dispatches after which the batch is submitted (grows from [`FIRST_SUBMIT`]).
    submit_after: usize,
}

type BindKey = (u64, Vec<(u32, wgpu::Buffer, u64, u64)>);

/// Per-dispatch device time by kernel, while [`Gpu::start_op_timing`] is on.
struct OpTiming {
    times: HashMap<(&'static str, &'static str), (u64, f64)>,
    /// Timestamp queries (adapters with `TIMESTAMP_QUERY`): query set, resolve buffer and
    /// read-back buffer for one dispatch.
    timestamps: Option<(wgpu::QuerySet, wgpu::Buffer, wgpu::Buffer)>,
}

/// How [`Gpu::op_times`] measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum OpTimingMethod {
    /// GPU timestamps written at the start and end of each dispatch's compute pass.
    Timestamps,
    /// The adapter has no timestamp queries: each dispatch is submitted alone and timed on
    /// the host until the device reports it done (includes the submit's overhead).
    HostWait,
}

/// Device time of one kernel (shader file and entry point) while op timing was on.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OpTime {
    pub shader: &'static str,
    pub entry: &'static str,
    pub calls: u64,
    pub seconds: f64,
}

struct Inner {
    id: u64,
    device: wgpu::Device,
    queue: wgpu::Queue,
    adapter: AdapterSummary,
    limits: wgpu::Limits,
    memory: Arc<MemoryTracker>,
    pool: Arc<BufferPool>,
    counters: RuntimeCounters,
    pipelines: pipeline::PipelineCache,
    runtime_checks: bool,
    timestamps: bool,
    bind_groups: Mutex<HashMap<BindKey, wgpu::BindGroup>>,
    /// Every dispatch's parameter struct, at a dynamic offset (written at submit).
    params_buffer: wgpu::Buffer,
    recorder: Mutex<Recorder>,
    op_timing: Mutex<Option<OpTiming>>,
    /// First uncaptured error or loss reported by wgpu: (lost, message).
    fault: Arc<Mutex<Option<(bool, String)>>>,
    /// Kernel variants forced by the user, per op family.
    forced_variants: Mutex<HashMap<String, String>>,
    /// Variant choices made by timing, per op and shape key.
    tuned_choices: Mutex<HashMap<String, String>>,
}

/// A handle to one wgpu device and its queue: one pipeline stage. Cheap to clone.
#[derive(Clone)]
pub struct Gpu {
    inner: Arc<Inner>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl Gpu {
    /// Opens a device on the adapter `selector` names, on a new wgpu instance.
    pub fn open(selector: &AdapterSelector) -> Result<Gpu> {
        Self::open_on(&adapter::new_instance(), selector)
    }

    /// Opens a device on the adapter chosen by `FEATREPLAY_ADAPTER` (or the preferred one).
    pub fn open_default() -> Result<Gpu> {
        Self::open(&AdapterSelector::from_env()?)
    }

    /// Opens a device on `instance`. Call it K times for K stages on one adapter: each call
    /// takes a fresh `wgpu::Adapter` (WebGPU allows one device per adapter object).
    pub fn open_on(instance: &wgpu::Instance, selector: &AdapterSelector) -> Result<Gpu> {
        let (adapter, summary) = adapter::select(instance, selector)?;
        // The adapter's real limits: wgpu's defaults ask for less than most devices have
        // (16 KiB of workgroup memory, 256 invocations).
        let limits = adapter.limits();
        // Timestamps let `featreplay profile` time each kernel on the device itself.
        let features = adapter.features() & wgpu::Features::TIMESTAMP_QUERY;
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("featreplay"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| Error::RequestDevice { adapter: summary.name.clone(), message: e.to_string() })?;

        let fault: Arc<Mutex<Option<(bool, String)>>> = Arc::new(Mutex::new(None));
        let f = fault.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let mut f = f.lock().unwrap();
            if f.is_none() {
                *f = Some((false, e.to_string()));
            }
        }));
        let f = fault.clone();
        device.set_device_lost_callback(move |reason, msg| {
            // Also fires (as `Destroyed`) when the last handle drops; then nobody reads it.
            let mut f = f.lock().unwrap();
            if f.as_ref().is_none_or(|(lost, _)| !lost) {
                *f = Some((true, format!("{reason:?}: {msg}")));
            }
        });

        let is_cpu = summary.is_cpu();
        let params_buffer = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("dispatch params"),
            size: PARAMS_CAPACITY,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let pool: Arc<BufferPool> = Default::default();
        pool.created(PARAMS_CAPACITY);
        Ok(Gpu {
            inner: Arc::new(Inner {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                device,
                queue,
                adapter: summary,
                limits,
                memory: MemoryTracker::new(),
                pool,
                counters: Default::default(),
                pipelines: Default::default(),
                runtime_checks: match RUNTIME_CHECKS.load(Ordering::Relaxed) {
                    1 => true,
                    2 => false,
                    _ => is_cpu,
                },
                timestamps: features.contains(wgpu::Features::TIMESTAMP_QUERY),
                bind_groups: Mutex::new(HashMap::new()),
                params_buffer,
                recorder: Mutex::new(Recorder {
                    pass: None,
                    encoder: None,
                    params: Vec::new(),
                    dispatches: 0,
                    submit_after: FIRST_SUBMIT,
                }),
                op_timing: Mutex::new(None),
                fault,
                forced_variants: Mutex::new(HashMap::new()),
                tuned_choices: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The adapter this device was opened on.
    pub fn adapter(&self) -> &AdapterSummary {
        &self.inner.adapter
    }

    /// The limits the device was opened with (the adapter's own).
    pub fn limits(&self) -> &wgpu::Limits {
        &self.inner.limits
    }

    /// The wgpu device, for code that needs it directly.
    pub fn device(&self) -> &wgpu::Device {
        &self.inner.device
    }

    /// Process-unique id of this device handle.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// Live and peak memory of this device, and the caching allocator's capacity.
    pub fn memory(&self) -> MemoryStats {
        MemoryStats { pool_bytes: self.inner.pool.capacity(), ..self.inner.memory.stats() }
    }

    /// Destroys the buffers the caching allocator holds for reuse, returning their memory to
    /// the driver (e.g. between training and a large evaluation); returns the bytes freed.
    pub fn trim_pool(&self) -> u64 {
        self.inner.pool.trim()
    }

    /// What the runtime has done on this device so far (subtract two snapshots).
    pub fn counters(&self) -> Counters {
        self.inner.counters.snapshot()
    }

    /// Whether the device writes GPU timestamps (`TIMESTAMP_QUERY`).
    pub fn has_timestamps(&self) -> bool {
        self.inner.timestamps
    }

    /// Whether shader modules keep wgpu's runtime bounds checks.
    pub fn runtime_checks(&self) -> bool {
        self.inner.runtime_checks
    }

    /// Starts a new peak-memory measurement.
    pub fn reset_peak_memory(&self) {
        self.inner.memory.reset_peak()
    }

    /// Number of compute pipelines compiled on this device.
    pub fn pipelines_compiled(&self) -> usize {
        self.inner.pipelines.len()
    }

    /// Forces kernel variant `variant` for op family `op` (None: let the chooser decide).
    pub fn force_variant(&self, op: &str, variant: Option<&str>) {
        let mut m = self.inner.forced_variants.lock().unwrap();
        match variant {
            Some(v) => m.insert(op.to_string(), v.to_string()),
            None => m.remove(op),
        };
    }

    /// The variant forced for `op`, if any.
    pub fn forced_variant(&self, op: &str) -> Option<String> {
        self.inner.forced_variants.lock().unwrap().get(op).cloned()
    }

    /// A cached variant choice (made by timing) for `key`.
    pub fn tuned_choice(&self, key: &str) -> Option<String> {
        self.inner.tuned_choices.lock().unwrap().get(key).cloned()
    }

    /// Remembers a variant choice for `key`.
    pub fn set_tuned_choice(&self, key: &str, variant: &str) {
        self.inner.tuned_choices.lock().unwrap().insert(key.to_string(), variant.to_string());
    }

    fn check_fault(&self) -> Result<()> {
        if let Some((lost, message)) = self.inner.fault.lock().unwrap().clone() {
            let adapter = self.inner.adapter.name.clone();
            return Err(if lost { Error::DeviceLost { adapter, message } } else { Error::Gpu { adapter, message } });
        }
        Ok(())
    }

    /// A buffer of at least `bytes` from the pool (or newly created for it); the flag says
    /// whether it was created now (wgpu zero-fills a new buffer before its first use).
    fn pooled_buffer(
        &self,
        kind: BufferKind,
        label: &str,
        bytes: u64,
        usage: wgpu::BufferUsages,
    ) -> (TrackedBuffer, bool) {
        let mut class = size_class(bytes);
        if class > self.inner.limits.max_buffer_size.min(self.inner.limits.max_storage_buffer_binding_size) {
            class = bytes;
        }
        let inner = &self.inner;
        match inner.pool.take(class, usage) {
            Some(b) => (TrackedBuffer::pooled(b, &inner.memory, kind, bytes, &inner.pool, class, usage), false),
            None => {
                let b = inner.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(label),
                    size: class,
                    usage,
                    mapped_at_creation: false,
                });
                inner.pool.created(class);
                inner.counters.buffer_created(class);
                (TrackedBuffer::pooled(b, &inner.memory, kind, bytes, &inner.pool, class, usage), true)
            }
        }
    }

    fn map_error(&self, e: impl std::fmt::Display) -> Error {
        Error::ReadBack { adapter: self.inner.adapter.name.clone(), message: e.to_string() }
    }

    fn check_size(&self, shape: &[usize]) -> Result<u64> {
        let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let bytes = numel.and_then(|n| n.checked_mul(4)).map(|b| b as u64).unwrap_or(u64::MAX);
        let l = &self.inner.limits;
        if bytes > l.max_buffer_size {
            return Err(Error::TensorTooLarge {
                shape: shape.to_vec(),
                bytes,
                limit: l.max_buffer_size,
                what: "max_buffer_size",
            });
        }
        let storage = l.max_storage_buffer_binding_size;
        if bytes > storage {
            return Err(Error::TensorTooLarge {
                shape: shape.to_vec(),
                bytes,
                limit: storage,
                what: "max_storage_buffer_binding_size",
            });
        }
        // Rounded to 16 so kernels may read any tensor as vec4s.
        Ok(bytes.div_ceil(16).max(1) * 16)
    }

    const TENSOR_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
        .union(wgpu::BufferUsages::UNIFORM)
        .union(wgpu::BufferUsages::COPY_SRC)
        .union(wgpu::BufferUsages::COPY_DST);

    /// A zero-filled tensor: a reused buffer is cleared on the device (recorded in order), a
    /// new one is zero-filled by wgpu.
    pub fn zeros(&self, shape: &[usize]) -> Result<Tensor> {
        let bytes = self.check_size(shape)?;
        let (buf, new) = self.pooled_buffer(BufferKind::Tensor, "tensor", bytes, Self::TENSOR_USAGE);
        let (t0, sub0) = (Instant::now(), self.inner.counters.submit_ns());
        if !new {
            let mut rec = self.inner.recorder.lock().unwrap();
            rec.pass = None;
            Self::encoder(&self.inner.device, &mut rec).clear_buffer(&buf.buffer, 0, Some(bytes));
            self.inner.counters.copy();
        }
        self.inner.counters.zero_filled(bytes);
        self.inner.counters.recorded(t0, sub0);
        Ok(Tensor { buf: Arc::new(buf), offset: 0, view: false, shape: shape.to_vec(), gpu: self.clone() })
    }

    /// A tensor whose contents are unspecified: for outputs a kernel overwrites entirely
    /// (reused memory is not cleared). Use [`Gpu::zeros`] where a kernel accumulates.
    pub fn empty(&self, shape: &[usize]) -> Result<Tensor> {
        let bytes = self.check_size(shape)?;
        let (buf, new) = self.pooled_buffer(BufferKind::Tensor, "tensor", bytes, Self::TENSOR_USAGE);
        if new {
            self.inner.counters.zero_filled(bytes);
        }
        Ok(Tensor { buf: Arc::new(buf), offset: 0, view: false, shape: shape.to_vec(), gpu: self.clone() })
    }

    /// Byte alignment of [`Tensor::views`]: every view may be bound as a storage or uniform
    /// buffer at its offset.
    pub fn view_alignment(&self) -> u64 {
        let l = &self.inner.limits;
        (l.min_storage_buffer_offset_alignment.max(l.min_uniform_buffer_offset_alignment) as u64).max(16)
    }

    /// A tensor holding `data` (row-major, `shape`'s element count).
    pub fn tensor(&self, shape: &[usize], data: &[f32]) -> Result<Tensor> {
        let want: usize = shape.iter().product();
        if data.len() != want {
            return Err(Error::DataLength { shape: shape.to_vec(), got: data.len(), want });
        }
        let bytes = self.check_size(shape)?;
        let (buf, _) = self.pooled_buffer(BufferKind::Tensor, "tensor", bytes, Self::TENSOR_USAGE);
        let t = Tensor { buf: Arc::new(buf), offset: 0, view: false, shape: shape.to_vec(), gpu: self.clone() };
        self.upload(&t, data)?;
        Ok(t)
    }

    /// Writes `data` at the start of `t`'s buffer after all work recorded so far: the
    /// recorded work is submitted first, and the queue runs a write after what was
    /// submitted before it (no staging buffer of ours, no wait).
    fn upload(&self, t: &Tensor, data: &[f32]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let mut rec = self.inner.recorder.lock().unwrap();
        self.submit_locked(&mut rec);
        self.inner.queue.write_buffer(&t.buf.buffer, t.offset, bytemuck::cast_slice(data));
        self.inner.counters.copy();
        Ok(())
    }

    fn check_owned(&self, t: &Tensor, op: &'static str) -> Result<()> {
        if t.gpu.id() != self.id() {
            return Err(Error::ShapeMismatch {
                op,
                detail: format!(
                    "tensor {:?} lives on device {} ({}), not on device {} ({})",
                    t.shape,
                    t.gpu.id(),
                    t.gpu.adapter().name,
                    self.id(),
                    self.adapter().name
                ),
            });
        }
        Ok(())
    }

    /// Overwrites `tensor` with `data`, in order with the work recorded before.
    pub fn write(&self, tensor: &Tensor, data: &[f32]) -> Result<()> {
        self.check_owned(tensor, "write")?;
        if data.len() != tensor.numel() {
            return Err(Error::DataLength { shape: tensor.shape.clone(), got: data.len(), want: tensor.numel() });
        }
        self.upload(tensor, data)
    }

    /// Copies `src` into `dst` (same element count) on the device.
    pub fn copy(&self, src: &Tensor, dst: &Tensor) -> Result<()> {
        self.check_owned(src, "copy")?;
        self.check_owned(dst, "copy")?;
        if src.numel() != dst.numel() {
            return Err(Error::ShapeMismatch { op: "copy", detail: format!("{:?} into {:?}", src.shape, dst.shape) });
        }
        let bytes = (src.numel() as u64 * 4).div_ceil(4) * 4;
        if bytes == 0 {
            return Ok(());
        }
        let mut rec = self.inner.recorder.lock().unwrap();
        rec.pass = None;
        let enc = Self::encoder(&self.inner.device, &mut rec);
        enc.copy_buffer_to_buffer(&src.buf.buffer, src.offset, &dst.buf.buffer, dst.offset, bytes);
        self.inner.counters.copy();
        Ok(())
    }

    /// Copies `n` values of `src` from element `src_at` into `dst` from element `dst_at`.
    pub fn copy_region(&self, src: &Tensor, src_at: usize, dst: &Tensor, dst_at: usize, n: usize) -> Result<()> {
        self.check_owned(src, "copy")?;
        self.check_owned(dst, "copy")?;
        if src_at + n > src.numel() || dst_at + n > dst.numel() {
            return Err(Error::ShapeMismatch {
                op: "copy",
                detail: format!("{n} values from {src_at} of {:?} to {dst_at} of {:?}", src.shape, dst.shape),
            });
        }
        if n == 0 {
            return Ok(());
        }
        let mut rec = self.inner.recorder.lock().unwrap();
        rec.pass = None;
        let enc = Self::encoder(&self.inner.device, &mut rec);
        enc.copy_buffer_to_buffer(
            &src.buf.buffer,
            src.offset + 4 * src_at as u64,
            &dst.buf.buffer,
            dst.offset + 4 * dst_at as u64,
            4 * n as u64,
        );
        self.inner.counters.copy();
        Ok(())
    }

    /// One tensor `[sum of numel]` holding `parts` one after the other (copies only), so many
    /// small tensors are read back with one wait.
    pub fn gather(&self, parts: &[&Tensor]) -> Result<Tensor> {
        let total: usize = parts.iter().map(|t| t.numel()).sum();
        let out = self.empty(&[total.max(1)])?;
        let mut rec = self.inner.recorder.lock().unwrap();
        rec.pass = None;
        let mut at = 0u64;
        for t in parts {
            self.check_owned(t, "gather")?;
            let bytes = t.numel() as u64 * 4;
            if bytes > 0 {
                let enc = Self::encoder(&self.inner.device, &mut rec);
                enc.copy_buffer_to_buffer(&t.buf.buffer, t.offset, &out.buf.buffer, out.offset + at, bytes);
                self.inner.counters.copy();
            }
            at += bytes;
        }
        drop(rec);
        Ok(out)
    }

    fn encoder<'r>(device: &wgpu::Device, rec: &'r mut Recorder) -> &'r mut wgpu::CommandEncoder {
        rec.encoder.get_or_insert_with(|| {
            device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("featreplay batch") })
        })
    }

    /// Records one dispatch of `kernel` over `workgroups`. `params` is bound at binding 0 as a
    /// uniform; `args[i]` at binding i+1. Bindings the entry point does not use are skipped.
    pub fn dispatch<P: bytemuck::Pod>(
        &self,
        kernel: &Kernel,
        params: &P,
        args: &[Arg],
        workgroups: [u32; 3],
    ) -> Result<()> {
        self.check_fault()?;
        let max = self.inner.limits.max_compute_workgroups_per_dimension;
        if workgroups.iter().any(|&w| w > max) {
            return Err(Error::Unsupported {
                op: kernel.shader,
                detail: format!(
                    "{}: {workgroups:?} workgroups exceed the device limit of {max} per dimension",
                    kernel.entry
                ),
            });
        }
        if workgroups.contains(&0) {
            return Ok(());
        }
        for a in args {
            let t = match a {
                Arg::Storage(t) | Arg::Uniform { tensor: t, .. } => t,
            };
            self.check_owned(t, kernel.shader)?;
        }
        let inner = &self.inner;
        let pipe =
            inner.pipelines.get(&inner.device, kernel.shader, kernel.entry, kernel.constants, inner.runtime_checks)?;
        let (t0, sub0) = (Instant::now(), inner.counters.submit_ns());

        let align = inner.limits.min_uniform_buffer_offset_alignment as u64;
        let pbytes = bytemuck::bytes_of(params);
        let psize = (pbytes.len() as u64).div_ceil(16).max(1) * 16;
        let mut rec = inner.recorder.lock().unwrap();
        let mut offset = (rec.params.len() as u64).div_ceil(align) * align;
        if offset + psize > PARAMS_CAPACITY || rec.dispatches >= rec.submit_after {
            self.submit_locked(&mut rec);
            offset = 0;
        }
        rec.params.resize(offset as usize, 0);
        rec.params.extend_from_slice(pbytes);
        rec.params.resize((offset + psize) as usize, 0);

        let mut key: BindKey = (pipe.id, Vec::with_capacity(pipe.used_bindings.len()));
        for &b in &pipe.used_bindings {
            let entry = if b == 0 {
                (0, inner.params_buffer.clone(), 0, psize)
            } else {
                match args.get(b as usize - 1) {
                    Some(Arg::Storage(t)) => (b, t.buf.buffer.clone(), t.offset, t.buffer_bytes()),
                    Some(Arg::Uniform { tensor, offset, size }) => {
                        (b, tensor.buf.buffer.clone(), tensor.offset + *offset, *size)
                    }
                    None => {
                        return Err(Error::Unsupported {
                            op: kernel.shader,
                            detail: format!(
                                "{} uses binding {b} but only {} arguments were passed",
                                kernel.entry,
                                args.len()
                            ),
                        })
                    }
                }
            };
            key.1.push(entry);
        }
        let bind_group = {
            let mut cache = inner.bind_groups.lock().unwrap();
            match cache.get(&key) {
                Some(bg) => bg.clone(),
                None => {
                    let entries: Vec<wgpu::BindGroupEntry> = key
                        .1
                        .iter()
                        .map(|(binding, buffer, offset, size)| wgpu::BindGroupEntry {
                            binding: *binding,
                            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                buffer,
                                offset: *offset,
                                size: wgpu::BufferSize::new(*size),
                            }),
                        })
                        .collect();
                    let bg = inner.device.create_bind_group(&wgpu::BindGroupDescriptor {
                        label: Some(kernel.entry),
                        layout: &pipe.layout,
                        entries: &entries,
                    });
                    inner.counters.bind_group_created();
                    if cache.len() >= BIND_GROUP_CACHE {
                        cache.clear();
                    }
                    cache.insert(key, bg.clone());
                    bg
                }
            }
        };
        let dynamic = [offset as u32];
        let dynamic: &[u32] = if pipe.used_bindings.first() == Some(&0) { &dynamic } else { &[] };
        let timing = inner.op_timing.lock().unwrap().is_some();
        if timing {
            drop(rec);
            return self.timed_dispatch(kernel, &pipe, &bind_group, dynamic, workgroups);
        }
        if rec.pass.is_none() {
            let enc = Self::encoder(&inner.device, &mut rec);
            let pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
            rec.pass = Some(pass.forget_lifetime());
            inner.counters.pass();
        }
        let pass = rec.pass.as_mut().unwrap();
        pass.set_pipeline(&pipe.pipeline);
        pass.set_bind_group(0, &bind_group, dynamic);
        pass.dispatch_workgroups(workgroups[0], workgroups[1], workgroups[2]);
        rec.dispatches += 1;
        inner.counters.dispatch();
        inner.counters.recorded(t0, sub0);
        Ok(())
    }

    /// Op-timing mode: submits the dispatch alone and records its device time.
    fn timed_dispatch(
        &self,
        kernel: &Kernel,
        pipe: &pipeline::CachedPipeline,
        bind_group: &wgpu::BindGroup,
        dynamic: &[u32],
        workgroups: [u32; 3],
    ) -> Result<()> {
        let inner = &self.inner;
        // Everything recorded before runs first, untimed.
        let mut rec = inner.recorder.lock().unwrap();
        let params = std::mem::take(&mut rec.params);
        rec.pass = None;
        let mut timing = inner.op_timing.lock().unwrap();
        let Some(timing) = timing.as_mut() else { return Ok(()) };
        let prior = rec.encoder.take();
        let mut enc = inner.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("timed") });
        {
            let ts = timing.timestamps.as_ref().map(|(q, _, _)| wgpu::ComputePassTimestampWrites {
                query_set: q,
                beginning_of_pass_write_index: Some(0),
                end_of_pass_write_index: Some(1),
            });
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: ts });
            pass.set_pipeline(&pipe.pipeline);
            pass.set_bind_group(0, bind_group, dynamic);
            pass.dispatch_workgroups(workgroups[0], workgroups[1], workgroups[2]);
        }
        if let Some((q, resolve, read)) = timing.timestamps.as_ref() {
            enc.resolve_query_set(q, 0..2, resolve, 0);
            enc.copy_buffer_to_buffer(resolve, 0, read, 0, 16);
        }
        inner.queue.write_buffer(&inner.params_buffer, 0, &params);
        if let Some(p) = prior {
            inner.queue.submit([p.finish()]);
        }
        rec.dispatches = 0;
        let wait = |index| {
            inner
                .device
                .poll(wgpu::PollType::Wait { submission_index: Some(index), timeout: None })
                .map_err(|e| Error::DeviceLost { adapter: inner.adapter.name.clone(), message: e.to_string() })
        };
        wait(inner.queue.submit([]))?;
        let t0 = Instant::now();
        let index = inner.queue.submit([enc.finish()]);
        wait(index)?;
        let mut seconds = t0.elapsed().as_secs_f64();
        if let Some((_, _, read)) = timing.timestamps.as_ref() {
            let (tx, rx) = std::sync::mpsc::channel();
            read.slice(..).map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
            wait(inner.queue.submit([]))?;
            rx.recv_timeout(Duration::from_secs(60)).map_err(|e| self.map_error(e))?.map_err(|e| self.map_error(e))?;
            {
                let view = read.slice(..).get_mapped_range().map_err(|e| self.map_error(e))?;
                let t: &[u64] = bytemuck::cast_slice(&view);
                let period = inner.queue.get_timestamp_period() as f64;
                seconds = t[1].saturating_sub(t[0]) as f64 * period * 1e-9;
            }
            read.unmap();
        }
        let e = timing.times.entry((kernel.shader, kernel.entry)).or_insert((0, 0.0));
        e.0 += 1;
        e.1 += seconds;
        inner.counters.dispatch();
        self.check_fault()
    }

    /// Starts timing every dispatch on its own (slow: each is submitted and waited for);
    /// [`Gpu::op_times`] returns the times and stops.
    pub fn start_op_timing(&self) -> Result<OpTimingMethod> {
        self.sync()?;
        let timestamps = self.inner.timestamps.then(|| {
            let d = &self.inner.device;
            let q = d.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("op timing"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            });
            let buf = |usage| {
                d.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("op timing"),
                    size: 16,
                    usage,
                    mapped_at_creation: false,
                })
            };
            let resolve = buf(wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC);
            let read = buf(wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST);
            (q, resolve, read)
        });
        let method = if timestamps.is_some() { OpTimingMethod::Timestamps } else { OpTimingMethod::HostWait };
        *self.inner.op_timing.lock().unwrap() = Some(OpTiming { times: HashMap::new(), timestamps });
        Ok(method)
    }

    /// The device time per kernel since [`Gpu::start_op_timing`], longest first; stops timing.
    pub fn op_times(&self) -> Result<Vec<OpTime>> {
        self.sync()?;
        let timing = self.inner.op_timing.lock().unwrap().take();
        let mut v: Vec<OpTime> = timing
            .map(|t| t.times)
            .unwrap_or_default()
            .into_iter()
            .map(|((shader, entry), (calls, seconds))| OpTime { shader, entry, calls, seconds })
            .collect();
        v.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        Ok(v)
    }

    fn submit_locked(&self, rec: &mut Recorder) -> Option<wgpu::SubmissionIndex> {
        rec.pass = None;
        if !rec.params.is_empty() {
            self.inner.queue.write_buffer(&self.inner.params_buffer, 0, &rec.params);
            rec.params.clear();
        }
        rec.dispatches = 0;
        let enc = rec.encoder.take()?;
        rec.submit_after = (rec.submit_after * 2).min(MAX_BATCH);
        let t0 = Instant::now();
        let index = self.inner.queue.submit([enc.finish()]);
        self.inner.counters.submitted(t0);
        Some(index)
    }

    /// After a host wait the device is idle: the next batch is submitted early again.
    fn idle(&self) {
        self.inner.recorder.lock().unwrap().submit_after = FIRST_SUBMIT;
    }

    /// Submits recorded work without waiting for it.
    pub fn flush(&self) -> Result<()> {
        let mut rec = self.inner.recorder.lock().unwrap();
        self.submit_locked(&mut rec);
        drop(rec);
        self.check_fault()
    }

    /// Submits recorded work and waits until the device has finished it.
    pub fn sync(&self) -> Result<()> {
        self.flush()?;
        self.inner.counters.host_wait();
        self.inner
            .device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::DeviceLost { adapter: self.inner.adapter.name.clone(), message: e.to_string() })?;
        self.idle();
        self.check_fault()
    }

    /// Copies `tensor` to the host, after all work recorded before.
    pub fn read(&self, tensor: &Tensor) -> Result<Vec<f32>> {
        self.read_async(tensor)?.wait()
    }

    /// Starts copying `tensor` to the host without waiting: records the copy into a pooled
    /// staging buffer after all work recorded so far, submits, and returns. The device goes
    /// on with whatever is submitted next while the copy is read with [`PendingRead::wait`],
    /// which waits for this submission only. Each read has its own staging buffer, so any
    /// number of transfers can be in flight.
    pub fn read_async(&self, tensor: &Tensor) -> Result<PendingRead> {
        self.check_owned(tensor, "read")?;
        let bytes = (tensor.numel() as u64 * 4).max(4).div_ceil(16) * 16;
        let usage = wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST;
        let (staging, _) = self.pooled_buffer(BufferKind::Internal, "read-back", bytes, usage);
        let index = {
            let mut rec = self.inner.recorder.lock().unwrap();
            if tensor.numel() > 0 {
                rec.pass = None;
                Self::encoder(&self.inner.device, &mut rec).copy_buffer_to_buffer(
                    &tensor.buf.buffer,
                    tensor.offset,
                    &staging.buffer,
                    0,
                    (tensor.numel() as u64 * 4).div_ceil(4) * 4,
                );
                self.inner.counters.copy();
            }
            // An empty encoder still gives a submission index to wait for.
            Self::encoder(&self.inner.device, &mut rec);
            self.submit_locked(&mut rec)
        };
        let (tx, rx) = std::sync::mpsc::channel();
        staging.buffer.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        Ok(PendingRead { gpu: self.clone(), staging: Some(staging), index, rx, numel: tensor.numel() })
    }

    /// Seconds `f` takes on the device, from an idle device to its completion.
    pub fn time<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
        self.sync()?;
        let t0 = Instant::now();
        let out = f()?;
        self.sync()?;
        Ok((out, t0.elapsed().as_secs_f64()))
    }

    /// Splits `n` invocations of `workgroup_size` into a grid within the per-dimension limit.
    /// Shaders recover the linear index as `gid.x + gid.y * num_workgroups.x * workgroup_size`.
    pub fn grid_1d(&self, n: usize, workgroup_size: u32) -> [u32; 3] {
        let groups = (n as u64).div_ceil(workgroup_size as u64);
        let max = self.inner.limits.max_compute_workgroups_per_dimension as u64;
        if groups <= max {
            [groups as u32, 1, 1]
        } else {
            let y = groups.div_ceil(max);
            [groups.div_ceil(y) as u32, y as u32, 1]
        }
    }
}
