//! The GPU runtime: exact memory accounting, batching, the pipeline cache, adapter
//! selection and typed errors.

mod common;

use common::*;
use featreplay::gpu::{adapter, AdapterSelector, Arg, Kernel, MAX_BATCH};
use featreplay::kernels::elementwise as ew;
use featreplay::{Error, Gpu};

/// A device of its own so that other tests' allocations do not move its counters.
fn private_gpu() -> Gpu {
    Gpu::open_default().unwrap()
}

#[test]
fn memory_accounting_is_exact() {
    let g = private_gpu();
    let base = g.memory();
    assert_eq!(base.live_tensor_bytes, 0);
    // Buffers are the element bytes rounded up to 16 (at least 16).
    let a = g.zeros(&[1000]).unwrap(); // 4000 bytes
    let b = g.zeros(&[3, 5]).unwrap(); // 60 -> 64 bytes
    let c = g.tensor(&[1], &[1.0]).unwrap(); // 4 -> 16 bytes
    assert_eq!((a.buffer_bytes(), b.buffer_bytes(), c.buffer_bytes()), (4000, 64, 16));
    let m = g.memory();
    assert_eq!(m.live_tensor_bytes, 4080);
    assert_eq!(m.peak_tensor_bytes, 4080);
    drop(a);
    let m = g.memory();
    assert_eq!(m.live_tensor_bytes, 80);
    assert_eq!(m.peak_tensor_bytes, 4080, "peak survives the free");
    // Clones and reshapes share the buffer: no new bytes.
    let b2 = b.clone();
    let b3 = b.reshape(&[15]).unwrap();
    assert!(b3.same_buffer(&b2));
    assert_eq!(g.memory().live_tensor_bytes, 80);
    drop((b, b2));
    assert_eq!(g.memory().live_tensor_bytes, 80, "b3 still holds the buffer");
    drop(b3);
    assert_eq!(g.memory().live_tensor_bytes, 16);
    g.reset_peak_memory();
    assert_eq!(g.memory().peak_tensor_bytes, 16);
    let d = g.zeros(&[256]).unwrap();
    assert_eq!(g.memory().peak_tensor_bytes, 16 + 1024);
    drop((c, d));
    // Kernels' outputs are counted too; staging and parameter buffers are internal.
    let x = g.tensor(&[4], &[1.0, -2.0, 3.0, -4.0]).unwrap();
    let y = ew::relu_forward(&x).unwrap();
    assert_eq!(y.to_vec().unwrap(), vec![1.0, 0.0, 3.0, 0.0]);
    assert_eq!(g.memory().live_tensor_bytes, 32);
    drop((x, y));
    g.sync().unwrap();
    let end = g.memory();
    assert_eq!(end.live_tensor_bytes, 0);
    assert_eq!(end.live_bytes, 0, "internal staging and parameter buffers are freed after use");
    assert!(end.peak_bytes >= end.peak_tensor_bytes);
}

#[test]
fn many_dispatches_are_batched_without_waiting() {
    let g = gpu();
    let x = g.zeros(&[1024]).unwrap();
    // More dispatches than one batch holds: the recorder submits without waiting and the
    // order of operations is kept across submits and uploads.
    let n = 2 * MAX_BATCH + 17;
    for _ in 0..n {
        ew::scale(&x, 1.0).unwrap();
        ew::fill(&x, 1.0).unwrap();
    }
    g.write(&x, &vec![2.0; 1024]).unwrap();
    for _ in 0..3 {
        ew::scale(&x, 2.0).unwrap();
    }
    assert!(x.to_vec().unwrap().iter().all(|&v| v == 16.0));
}

#[test]
fn pipelines_are_compiled_once_per_device() {
    let g = private_gpu();
    let x = g.zeros(&[10]).unwrap();
    ew::fill(&x, 1.0).unwrap();
    ew::scale(&x, 2.0).unwrap();
    let after_first = g.pipelines_compiled();
    assert_eq!(after_first, 2);
    for _ in 0..10 {
        ew::fill(&x, 1.0).unwrap();
        ew::scale(&x, 2.0).unwrap();
    }
    assert_eq!(g.pipelines_compiled(), after_first);
    assert_eq!(x.to_vec().unwrap(), vec![2.0; 10]);
}

#[test]
fn tensors_round_trip_and_copy() {
    let g = gpu();
    let data = random(1001, 7);
    let t = g.tensor(&[7, 11, 13], &data).unwrap();
    assert_eq!(t.to_vec().unwrap(), data);
    let u = g.zeros(&[1001]).unwrap();
    g.copy(&t, &u).unwrap();
    assert_eq!(u.to_vec().unwrap(), data);
    let empty = g.zeros(&[0, 4]).unwrap();
    assert_eq!(empty.to_vec().unwrap(), Vec::<f32>::new());
}

#[test]
fn typed_errors_for_bad_input() {
    let g = gpu();
    // Too large for the device.
    let e = g.zeros(&[1 << 20, 1 << 20]).unwrap_err();
    assert!(matches!(e, Error::TensorTooLarge { .. }), "{e}");
    assert!(e.to_string().contains("more than the device allows"), "{e}");
    let e = g.zeros(&[usize::MAX, 2]).unwrap_err();
    assert!(matches!(e, Error::TensorTooLarge { .. }), "{e}");
    // Data that does not fill the shape.
    let e = g.tensor(&[2, 2], &[1.0; 3]).unwrap_err();
    assert!(matches!(e, Error::DataLength { got: 3, want: 4, .. }), "{e}");
    let t = g.zeros(&[4]).unwrap();
    assert!(matches!(g.write(&t, &[0.0; 5]), Err(Error::DataLength { .. })));
    assert!(matches!(t.reshape(&[3]), Err(Error::ShapeMismatch { .. })));
    // A kernel or shader that does not exist.
    let e = g.dispatch(&Kernel::new("no_such_shader", "main"), &[0u32; 4], &[], [1, 1, 1]).unwrap_err();
    assert!(matches!(e, Error::UnknownShader(_)), "{e}");
    let e = g.dispatch(&Kernel::new("elementwise", "no_such_entry"), &[0u32; 4], &[], [1, 1, 1]).unwrap_err();
    assert!(matches!(e, Error::UnknownShader(_)), "{e}");
    // Too many workgroups in one dimension.
    let e = g.dispatch(&Kernel::new("elementwise", "fill"), &[0u32; 4], &[Arg::Storage(&t)], [u32::MAX, 1, 1]);
    assert!(matches!(e, Err(Error::Unsupported { .. })));
    // A kernel missing an argument it uses.
    let e = g.dispatch(&Kernel::new("elementwise", "add"), &[0u32; 4], &[Arg::Storage(&t)], [1, 1, 1]).unwrap_err();
    assert!(e.to_string().contains("uses binding 2"), "{e}");
}

#[test]
fn tensors_of_another_device_are_rejected() {
    let other = private_gpu();
    let a = gpu().zeros(&[4]).unwrap();
    let b = other.zeros(&[4]).unwrap();
    let e = ew::add(&a, &b).unwrap_err();
    assert!(e.to_string().contains("different devices"), "{e}");
    assert!(gpu().read(&b).is_err());
    assert!(gpu().copy(&a, &b).is_err());
}

#[test]
fn lost_device_is_a_typed_error() {
    let g = private_gpu();
    let x = g.zeros(&[16]).unwrap();
    ew::fill(&x, 1.0).unwrap();
    g.sync().unwrap();
    g.device().destroy();
    let e = g.sync().and_then(|_| x.to_vec().map(|_| ())).unwrap_err();
    assert!(matches!(e, Error::DeviceLost { .. } | Error::Gpu { .. }), "{e}");
    // And stays an error: later operations do not hang or panic.
    assert!(ew::fill(&x, 2.0).is_err());
    assert!(x.to_vec().is_err());
}

#[test]
fn adapter_selection() {
    let list = adapter::list_adapters();
    assert!(!list.is_empty());
    for (i, a) in list.iter().enumerate() {
        assert_eq!(a.index, i);
    }
    // Auto prefers real GPUs: the first adapter is never a CPU adapter while a GPU exists.
    if list.iter().any(|a| !a.is_cpu()) {
        assert!(!list[0].is_cpu());
    }
    let inst = adapter::new_instance();
    let (_, by_index) = adapter::select(&inst, &AdapterSelector::Index(0)).unwrap();
    assert_eq!(by_index, list[0]);
    let name_part = list[0].name.to_uppercase();
    let (_, by_name) = adapter::select(&inst, &AdapterSelector::Name(name_part)).unwrap();
    assert_eq!(by_name.name, list[0].name);
    let (_, by_type) = adapter::select(&inst, &AdapterSelector::Type(list[0].device_type)).unwrap();
    assert_eq!(by_type.device_type, list[0].device_type);
    let e = adapter::select(&inst, &AdapterSelector::Index(list.len())).unwrap_err();
    assert!(matches!(e, Error::AdapterNotFound { .. }));
    assert!(e.to_string().contains(&list[0].name), "the error lists the adapters: {e}");
    let e = adapter::select(&inst, &AdapterSelector::Name("no such adapter xyz".into())).unwrap_err();
    assert!(matches!(e, Error::AdapterNotFound { .. }));
    // Several devices (stages) from one adapter.
    let sel = AdapterSelector::Index(0);
    let g1 = Gpu::open_on(&inst, &sel).unwrap();
    let g2 = Gpu::open_on(&inst, &sel).unwrap();
    assert_ne!(g1.id(), g2.id());
    assert_eq!(g1.adapter(), g2.adapter());
    // The adapter's own limits are requested, not wgpu's defaults.
    assert_eq!(
        g1.limits().max_compute_invocations_per_workgroup,
        g1.device().limits().max_compute_invocations_per_workgroup
    );
}

#[test]
fn no_adapter_is_a_typed_error_with_install_hint() {
    // What a machine without any driver sees: an empty adapter list.
    let e = adapter::choose(Vec::new(), &AdapterSelector::Auto).unwrap_err();
    assert!(matches!(e, Error::NoAdapter { .. }), "{e}");
    assert!(e.to_string().contains("mesa-vulkan-drivers"), "{e}");
}

#[test]
fn async_read_sees_the_tensor_at_its_place_in_the_stream() {
    let g = gpu();
    let x = g.tensor(&[4], &[1.0, 2.0, 3.0, 4.0]).unwrap();
    let pending = g.read_async(&x).unwrap();
    // Work submitted after the read does not change what it returns.
    ew::scale(&x, 10.0).unwrap();
    g.flush().unwrap();
    assert_eq!(pending.wait().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    assert_eq!(x.to_vec().unwrap(), vec![10.0, 20.0, 30.0, 40.0]);
    g.sync().unwrap();
}

#[test]
fn pooled_memory_is_reused_and_zeros_are_zero() {
    let g = private_gpu();
    let a = g.zeros(&[1000]).unwrap();
    ew::fill(&a, 3.0).unwrap();
    assert!(a.to_vec().unwrap().iter().all(|&v| v == 3.0));
    drop(a);
    let before = g.counters();
    // Same size class: the freed buffer comes back, cleared by `zeros`, not by a new buffer.
    let b = g.zeros(&[990]).unwrap();
    assert_eq!(g.counters().buffers_created, before.buffers_created, "a pooled buffer is reused");
    assert!(b.to_vec().unwrap().iter().all(|&v| v == 0.0), "a reused buffer is cleared");
    // Exact accounting still counts the tensor, not the size class.
    assert_eq!(g.memory().live_tensor_bytes, 990 * 4 + 8);
    assert!(g.memory().pool_bytes >= 4000);
    ew::fill(&b, 5.0).unwrap();
    drop(b);
    // `empty` reuses without clearing; a kernel that overwrites makes it whole again.
    let c = g.empty(&[1000]).unwrap();
    ew::fill(&c, 1.0).unwrap();
    assert!(c.to_vec().unwrap().iter().all(|&v| v == 1.0));
    drop(c);
    assert!(g.trim_pool() > 0);
}

#[test]
fn a_steady_step_creates_no_buffer_and_no_bind_group() {
    let g = private_gpu();
    let x = g.tensor(&[4096], &random(4096, 3)).unwrap();
    // Outputs from `empty` and in-place kernels: nothing to clear, so no copy splits the pass.
    let step = || {
        let y = g.empty(&[4096]).unwrap();
        ew::fill(&y, 1.0).unwrap();
        ew::axpy(2.0, &x, &y).unwrap();
        ew::scale(&y, 0.5).unwrap();
        g.read(&y).unwrap()
    };
    let first = step();
    let before = g.counters();
    for _ in 0..3 {
        assert_eq!(step(), first);
    }
    let d = g.counters() - before;
    assert_eq!(d.buffers_created, 0, "{d:?}");
    assert_eq!(d.bind_groups_created, 0, "{d:?}");
    assert_eq!(d.dispatches, 9);
    assert_eq!(d.host_waits, 3);
    assert_eq!(d.passes, 3, "the dispatches of a step share one compute pass: {d:?}");
    assert_eq!(d.bytes_zero_filled, 0, "{d:?}");
}

#[test]
fn views_read_write_and_bind_only_their_elements() {
    let g = private_gpu();
    let shapes = vec![vec![3], vec![2, 5], vec![7]];
    let n = featreplay::Tensor::packed_len(&g, &shapes);
    let whole = g.zeros(&[n]).unwrap();
    let v = whole.views(&shapes).unwrap();
    assert!(v.iter().all(|t| t.is_view()) && !whole.is_view());
    // A single view spanning the whole buffer is still a view.
    assert!(g.zeros(&[64]).unwrap().views(&[vec![64]]).unwrap()[0].is_view());
    assert_eq!(v[1].byte_offset() % g.view_alignment(), 0);
    g.write(&v[1], &[1.0; 10]).unwrap();
    ew::fill(&v[2], 2.0).unwrap();
    assert_eq!(v[0].to_vec().unwrap(), vec![0.0; 3]);
    assert_eq!(v[1].to_vec().unwrap(), vec![1.0; 10]);
    assert_eq!(v[2].to_vec().unwrap(), vec![2.0; 7]);
    let all = whole.to_vec().unwrap();
    assert_eq!(all.iter().filter(|&&x| x == 1.0).count(), 10);
    assert_eq!(all.iter().filter(|&&x| x == 2.0).count(), 7, "a kernel on a view writes only the view");
    assert!(!v[0].same_buffer(&v[1]) && v[1].same_buffer(&v[1].reshape(&[10]).unwrap()));
    assert!(whole.views(&[vec![n + 1]]).is_err());
}

#[test]
fn op_timing_reports_every_kernel_dispatched() {
    let g = private_gpu();
    let x = g.tensor(&[1024], &random(1024, 5)).unwrap();
    let _ = ew::relu_forward(&x).unwrap();
    g.start_op_timing().unwrap();
    let y = ew::relu_forward(&x).unwrap();
    let _ = ew::add(&y, &x).unwrap();
    let times = g.op_times().unwrap();
    let names: Vec<_> = times.iter().map(|t| (t.shader, t.entry, t.calls)).collect();
    assert!(names.contains(&("elementwise", "relu_forward", 1)), "{names:?}");
    assert!(names.contains(&("elementwise", "add", 1)), "{names:?}");
    assert!(times.iter().all(|t| t.seconds >= 0.0 && t.seconds.is_finite()));
    // Timing stops with the report; results stay right.
    assert!(g.op_times().unwrap().is_empty());
    let host: Vec<f32> = random(1024, 5).iter().map(|v| v.max(0.0)).collect();
    assert_eq!(y.to_vec().unwrap(), host);
}
