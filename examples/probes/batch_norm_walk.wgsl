// Probe kernels for examples/wgsl_probe.rs: two ways for batch norm's per-chunk sums
// (sum dy, sum dy * x_hat over one channel of an NCHW tensor) to walk the values, the figures
// behind the run layout of shaders/batch_norm.wgsl (docs/lavapipe.md). For [128, 16, 28, 28]
// (100352 values per channel), 2 buffers of 1605632 floats, parameters c hw m:
//
//   P=target/release/examples/wgsl_probe
//   $P examples/probes/batch_norm_walk.wgsl sums_walk 2 1605632 25 16 1 40 16 784 100352
//   $P examples/probes/batch_norm_walk.wgsl sums_runs 2 1605632 28 16 1 40 16 784 100352 --override RUN=56
//
// sums_walk: invocation i of chunk k takes values j = 4096 k + i + 64 t (t < 64) of the channel,
// stepping the address by 64 values with a wrap test into the next image plane (the layout
// before the runs). sums_runs: invocation i takes run 64 k + i, RUN consecutive values of one
// plane (RUN divides H * W here), at a base address plus t.

struct Params { c: u32, hw: u32, m: u32, pad: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> dy: array<f32>;

override RUN: u32 = 64u;

var<workgroup> slots: array<vec2<f32>, 64>;

// The workgroup's sums into x[k * 2 ..] of an unused region (keeps the loads alive).
fn finish(l: u32, k: u32, c: u32, s: vec2<f32>) {
    slots[l] = s;
    workgroupBarrier();
    if (l == 0u) {
        var t = vec2<f32>(0.0);
        for (var i = 0u; i < 64u; i++) {
            t += slots[i];
        }
        dy[(c * 64u + k) * 2u] = t.x;
        dy[(c * 64u + k) * 2u + 1u] = t.y;
    }
}

@compute @workgroup_size(64)
fn sums_walk(@builtin(local_invocation_index) l: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let k = wg.x;
    let c = wg.y;
    let j0 = k * 4096u + l;
    let end = min(k * 4096u + 4096u, p.m);
    let n = j0 / p.hw;
    var s = j0 - n * p.hw;
    var a = (n * p.c + c) * p.hw + s;
    let wrap = p.c * p.hw - p.hw;
    var s_dy = vec4<f32>(0.0);
    var s_dyx = vec4<f32>(0.0);
    for (var t = 0u; t < 64u; t++) {
        if (j0 + t * 64u < end) {
            let g = dy[a];
            s_dy[t & 3u] += g;
            s_dyx[t & 3u] += g * ((x[a] - 0.25) * 1.5);
        }
        s += 64u;
        let wraps = s >= p.hw;
        a = select(a + 64u, a + 64u + wrap, wraps);
        s = select(s, s - p.hw, wraps);
    }
    finish(l, k, c, vec2<f32>((s_dy.x + s_dy.y) + (s_dy.z + s_dy.w), (s_dyx.x + s_dyx.y) + (s_dyx.z + s_dyx.w)));
}

@compute @workgroup_size(64)
fn sums_runs(@builtin(local_invocation_index) l: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let k = wg.x;
    let c = wg.y;
    let rpp = p.hw / RUN;
    let nruns = p.m / RUN;
    let r0 = k * 64u + l;
    let r = min(r0, nruns - 1u);
    let n = r / rpp;
    let a = (n * p.c + c) * p.hw + (r - n * rpp) * RUN;
    var s_dy = vec4<f32>(0.0);
    var s_dyx = vec4<f32>(0.0);
    for (var t = 0u; t < RUN; t++) {
        let g = dy[a + t];
        s_dy[t & 3u] += g;
        s_dyx[t & 3u] += g * ((x[a + t] - 0.25) * 1.5);
    }
    let keep = select(0.0, 1.0, r0 < nruns);
    finish(l, k, c, keep * vec2<f32>((s_dy.x + s_dy.y) + (s_dy.z + s_dy.w), (s_dyx.x + s_dyx.y) + (s_dyx.z + s_dyx.w)));
}
