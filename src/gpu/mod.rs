//! The GPU runtime: adapters, one device handle per pipeline stage, device-resident tensors,
//! a pipeline cache, command batching and exact memory accounting.
//!
//! Kernels record dispatches into a per-device command encoder; nothing waits on the GPU
//! until a host read ([`Gpu::read`]) or an explicit [`Gpu::sync`]. The encoder is submitted
//! when it holds [`MAX_BATCH`] dispatches, so long runs never block on the CPU side either.

pub mod adapter;
pub mod memory;
pub mod pipeline;
mod tensor;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use adapter::{list_adapters, AdapterSelector, AdapterSummary};
use memory::TrackedBuffer;
pub use memory::{BufferKind, MemoryStats, MemoryTracker};
pub use tensor::Tensor;

use crate::error::{Error, Result};

/// Dispatches recorded before the encoder is submitted without waiting.
pub const MAX_BATCH: usize = 256;
/// Bytes of the per-batch uniform buffer that holds every dispatch's parameters.
const PARAMS_CAPACITY: u64 = 64 * 1024;

/// A copy to the host in flight (see [`Gpu::read_async`]).
pub struct PendingRead {
    gpu: Gpu,
    staging: TrackedBuffer,
    index: Option<wgpu::SubmissionIndex>,
    rx: std::sync::mpsc::Receiver<std::result::Result<(), wgpu::BufferAsyncError>>,
    numel: usize,
}

impl PendingRead {
    /// Waits for the copy's submission (not for work submitted after it) and returns the data.
    pub fn wait(self) -> Result<Vec<f32>> {
        let g = &self.gpu;
        g.inner
            .device
            .poll(wgpu::PollType::Wait { submission_index: self.index, timeout: None })
            .map_err(|e| Error::DeviceLost { adapter: g.inner.adapter.name.clone(), message: e.to_string() })?;
        g.check_fault()?;
        let mapped = self.rx.recv_timeout(Duration::from_secs(60)).map_err(|e| g.map_error(e))?;
        mapped.map_err(|e| g.map_error(e))?;
        let out = {
            let view = self.staging.buffer.slice(..).get_mapped_range().map_err(|e| g.map_error(e))?;
            bytemuck::cast_slice::<u8, f32>(&view)[..self.numel].to_vec()
        };
        self.staging.buffer.unmap();
        Ok(out)
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
    encoder: Option<wgpu::CommandEncoder>,
    /// Parameters of this batch's dispatches, copied into `params_buffer` at submit.
    params: Vec<u8>,
    params_buffer: Option<TrackedBuffer>,
    dispatches: usize,
}

struct Inner {
    id: u64,
    device: wgpu::Device,
    queue: wgpu::Queue,
    adapter: AdapterSummary,
    limits: wgpu::Limits,
    memory: Arc<MemoryTracker>,
    pipelines: pipeline::PipelineCache,
    recorder: Mutex<Recorder>,
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
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("featreplay"),
            required_features: wgpu::Features::empty(),
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

        Ok(Gpu {
            inner: Arc::new(Inner {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                device,
                queue,
                adapter: summary,
                limits,
                memory: MemoryTracker::new(),
                pipelines: Default::default(),
                recorder: Mutex::new(Recorder {
                    encoder: None,
                    params: Vec::new(),
                    params_buffer: None,
                    dispatches: 0,
                }),
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

    /// Live and peak memory of this device.
    pub fn memory(&self) -> MemoryStats {
        self.inner.memory.stats()
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

    fn new_buffer(
        &self,
        kind: BufferKind,
        label: &str,
        bytes: u64,
        usage: wgpu::BufferUsages,
        mapped: bool,
    ) -> TrackedBuffer {
        TrackedBuffer::new(&self.inner.device, &self.inner.memory, kind, label, bytes, usage, mapped)
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

    /// A zero-filled tensor (wgpu zero-initialises buffers).
    pub fn zeros(&self, shape: &[usize]) -> Result<Tensor> {
        let bytes = self.check_size(shape)?;
        let buf = self.new_buffer(BufferKind::Tensor, "tensor", bytes, Self::TENSOR_USAGE, false);
        Ok(Tensor { buf: Arc::new(buf), shape: shape.to_vec(), gpu: self.clone() })
    }

    /// A tensor whose contents are unspecified: for outputs a kernel overwrites entirely
    /// (reused memory is not cleared). Use [`Gpu::zeros`] where a kernel accumulates.
    pub fn empty(&self, shape: &[usize]) -> Result<Tensor> {
        self.zeros(shape)
    }

    /// A tensor holding `data` (row-major, `shape`'s element count).
    pub fn tensor(&self, shape: &[usize], data: &[f32]) -> Result<Tensor> {
        let want: usize = shape.iter().product();
        if data.len() != want {
            return Err(Error::DataLength { shape: shape.to_vec(), got: data.len(), want });
        }
        let bytes = self.check_size(shape)?;
        let buf = self.new_buffer(BufferKind::Tensor, "tensor", bytes, Self::TENSOR_USAGE, true);
        if !data.is_empty() {
            let mut view =
                buf.buffer.slice(..(data.len() * 4) as u64).get_mapped_range_mut().map_err(|e| self.map_error(e))?;
            view.copy_from_slice(bytemuck::cast_slice(data));
        }
        buf.buffer.unmap();
        Ok(Tensor { buf: Arc::new(buf), shape: shape.to_vec(), gpu: self.clone() })
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

    /// Overwrites `tensor` with `data`, in order with the work recorded before (the upload is
    /// a copy recorded in the same command stream, so no flush or wait is needed).
    pub fn write(&self, tensor: &Tensor, data: &[f32]) -> Result<()> {
        self.check_owned(tensor, "write")?;
        if data.len() != tensor.numel() {
            return Err(Error::DataLength { shape: tensor.shape.clone(), got: data.len(), want: tensor.numel() });
        }
        if data.is_empty() {
            return Ok(());
        }
        let bytes = (data.len() * 4) as u64;
        let padded = bytes;
        let staging = self.new_buffer(BufferKind::Internal, "upload", padded, wgpu::BufferUsages::COPY_SRC, true);
        staging
            .buffer
            .slice(..bytes)
            .get_mapped_range_mut()
            .map_err(|e| self.map_error(e))?
            .copy_from_slice(bytemuck::cast_slice(data));
        staging.buffer.unmap();
        let mut rec = self.inner.recorder.lock().unwrap();
        let enc = Self::encoder(&self.inner.device, &mut rec);
        enc.copy_buffer_to_buffer(&staging.buffer, 0, &tensor.buf.buffer, 0, padded);
        Ok(())
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
        let enc = Self::encoder(&self.inner.device, &mut rec);
        enc.copy_buffer_to_buffer(&src.buf.buffer, 0, &dst.buf.buffer, 0, bytes);
        Ok(())
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
        let pipe = self.inner.pipelines.get(&self.inner.device, kernel.shader, kernel.entry, kernel.constants)?;

        let align = self.inner.limits.min_uniform_buffer_offset_alignment as u64;
        let pbytes = bytemuck::bytes_of(params);
        let psize = (pbytes.len() as u64).div_ceil(16).max(1) * 16;
        let mut rec = self.inner.recorder.lock().unwrap();
        let mut offset = (rec.params.len() as u64).div_ceil(align) * align;
        if offset + psize > PARAMS_CAPACITY || rec.dispatches >= MAX_BATCH {
            self.submit_locked(&mut rec);
            offset = 0;
        }
        if rec.params_buffer.is_none() {
            rec.params_buffer = Some(self.new_buffer(
                BufferKind::Internal,
                "dispatch params",
                PARAMS_CAPACITY,
                wgpu::BufferUsages::UNIFORM,
                true,
            ));
        }
        rec.params.resize(offset as usize, 0);
        rec.params.extend_from_slice(pbytes);
        rec.params.resize((offset + psize) as usize, 0);

        let params_buffer = &rec.params_buffer.as_ref().unwrap().buffer;
        let mut entries = Vec::with_capacity(args.len() + 1);
        for &b in &pipe.used_bindings {
            let resource = if b == 0 {
                wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: params_buffer,
                    offset,
                    size: wgpu::BufferSize::new(psize),
                })
            } else {
                match args.get(b as usize - 1) {
                    Some(Arg::Storage(t)) => t.buf.buffer.as_entire_binding(),
                    Some(Arg::Uniform { tensor, offset, size }) => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: &tensor.buf.buffer,
                        offset: *offset,
                        size: wgpu::BufferSize::new(*size),
                    }),
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
            entries.push(wgpu::BindGroupEntry { binding: b, resource });
        }
        let bind_group = self.inner.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(kernel.entry),
            layout: &pipe.layout,
            entries: &entries,
        });
        let enc = Self::encoder(&self.inner.device, &mut rec);
        {
            let mut pass = enc
                .begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some(kernel.entry), timestamp_writes: None });
            pass.set_pipeline(&pipe.pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(workgroups[0], workgroups[1], workgroups[2]);
        }
        rec.dispatches += 1;
        Ok(())
    }

    fn submit_locked(&self, rec: &mut Recorder) -> Option<wgpu::SubmissionIndex> {
        if let Some(pb) = rec.params_buffer.take() {
            if !rec.params.is_empty() {
                // The params length is a multiple of 16 and within the buffer: mapping succeeds.
                if let Ok(mut view) = pb.buffer.slice(..rec.params.len() as u64).get_mapped_range_mut() {
                    view.copy_from_slice(&rec.params);
                }
            }
            pb.buffer.unmap();
            // `pb` drops here: wgpu keeps the buffer alive until the submission completes.
            drop(pb);
        }
        rec.params.clear();
        rec.dispatches = 0;
        rec.encoder.take().map(|enc| self.inner.queue.submit([enc.finish()]))
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
        self.inner
            .device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::DeviceLost { adapter: self.inner.adapter.name.clone(), message: e.to_string() })?;
        self.check_fault()
    }

    /// Copies `tensor` to the host, after all work recorded before.
    pub fn read(&self, tensor: &Tensor) -> Result<Vec<f32>> {
        self.read_async(tensor)?.wait()
    }

    /// Starts copying `tensor` to the host without waiting: records the copy into a staging
    /// buffer of its own after all work recorded so far, submits, and returns. The device goes
    /// on with whatever is submitted next while the copy is read with [`PendingRead::wait`],
    /// which waits for this submission only. Each read has its own staging buffer, so any
    /// number of transfers can be in flight.
    pub fn read_async(&self, tensor: &Tensor) -> Result<PendingRead> {
        self.check_owned(tensor, "read")?;
        let bytes = (tensor.numel() as u64 * 4).max(4);
        let staging = self.new_buffer(
            BufferKind::Internal,
            "read-back",
            bytes,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            false,
        );
        let index = {
            let mut rec = self.inner.recorder.lock().unwrap();
            if tensor.numel() > 0 {
                Self::encoder(&self.inner.device, &mut rec).copy_buffer_to_buffer(
                    &tensor.buf.buffer,
                    0,
                    &staging.buffer,
                    0,
                    bytes,
                );
            }
            self.submit_locked(&mut rec)
        };
        let (tx, rx) = std::sync::mpsc::channel();
        staging.buffer.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        Ok(PendingRead { gpu: self.clone(), staging, index, rx, numel: tensor.numel() })
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
