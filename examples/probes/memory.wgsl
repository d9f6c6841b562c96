// Probe kernels for examples/wgsl_probe.rs (the figures in docs/lavapipe.md). Run with
// `--uniform-windows 1` and 3 buffers of 1048576 floats: binding 1 is a 64 KiB uniform
// window, bindings 2 and 3 storage buffers. Grid 64 1 1 for the first four. The texture
// kernels need a 4th binding, an R32Float texture of the same values:
// `4 1048576 64 1 1 100 0 --uniform-windows 1 --textures 1`.

struct Params { n: u32, a: u32, b: u32, c: u32 }

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> u: array<vec4<f32>, 4096>;
@group(0) @binding(2) var<storage, read_write> a: array<f32>;
@group(0) @binding(3) var<storage, read_write> b: array<f32>;
// 4096 texels per row.
@group(0) @binding(4) var t: texture_2d<f32>;

var<workgroup> slots: array<f32, 64>;

// The workgroup's 64 partial sums into b[w] (keeps the loads alive).
fn finish(l: u32, w: u32, s: f32) {
    slots[l] = s;
    workgroupBarrier();
    if (l == 0u) {
        var t = 0.0;
        for (var k = 0u; k < 64u; k++) {
            t += slots[k];
        }
        b[w] = t;
    }
}

// Each workgroup sums the whole window: 16384 scalar uniform loads (cache-resident).
@compute @workgroup_size(64)
fn sum_uniform(@builtin(local_invocation_index) l: u32, @builtin(workgroup_id) w: vec3<u32>) {
    var s = 0.0;
    for (var i = l; i < 16384u; i += 64u) {
        s += u[i >> 2u][i & 3u];
    }
    finish(l, w.x, s);
}

// The same 16384 floats from the storage buffer: scalar storage loads.
@compute @workgroup_size(64)
fn sum_storage(@builtin(local_invocation_index) l: u32, @builtin(workgroup_id) w: vec3<u32>) {
    var s = 0.0;
    for (var i = l; i < 16384u; i += 64u) {
        s += a[i];
    }
    finish(l, w.x, s);
}

// Each workgroup stores 16384 floats of its own: scalar storage stores.
@compute @workgroup_size(64)
fn store(@builtin(local_invocation_index) l: u32, @builtin(workgroup_id) w: vec3<u32>) {
    let o = w.x * 16384u;
    for (var i = l; i < 16384u; i += 64u) {
        b[o + i] = f32(i);
    }
}

// Nothing: the cost of a dispatch and of its workgroups.
@compute @workgroup_size(64)
fn empty(@builtin(local_invocation_index) l: u32) {
    if (p.n == 12345u) {
        b[l] = 1.0;
    }
}

// b = max(a, 0) over p.n values, one per invocation (grid ceil(n / 256) 1 1): streaming.
@compute @workgroup_size(256)
fn relu(@builtin(global_invocation_id) g: vec3<u32>) {
    if (g.x < p.n) {
        b[g.x] = max(a[g.x], 0.0);
    }
}

// Workgroup w sums its own 16384 floats of the storage buffer (grid 64 1 1) ...
@compute @workgroup_size(64)
fn stream_storage(@builtin(local_invocation_index) l: u32, @builtin(workgroup_id) w: vec3<u32>) {
    var s = 0.0;
    let o = w.x * 16384u;
    for (var i = l; i < 16384u; i += 64u) {
        s += a[o + i];
    }
    finish(l, w.x, s);
}

// ... or of the texture, with textureLoad.
@compute @workgroup_size(64)
fn stream_texture(@builtin(local_invocation_index) l: u32, @builtin(workgroup_id) w: vec3<u32>) {
    var s = 0.0;
    let o = w.x * 16384u;
    for (var i = l; i < 16384u; i += 64u) {
        let j = o + i;
        s += textureLoad(t, vec2<u32>(j & 4095u, j >> 12u), 0).x;
    }
    finish(l, w.x, s);
}
