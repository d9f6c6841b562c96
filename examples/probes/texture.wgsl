// Probe kernels for examples/wgsl_probe.rs: streaming loads from a storage buffer against
// textureLoad from an R32Float texture holding the same values (docs/lavapipe.md). Run with
// `--textures 1` and 3 buffers of 1048576 floats: binding 1 is the texture (4096 texels per
// row), bindings 2 and 3 storage buffers; grid 64 1 1 (each workgroup 16384 values of its own):
//
//   target/release/examples/wgsl_probe examples/probes/texture.wgsl stream_texture 3 1048576 64 1 1 100 0 --textures 1

struct Params { n: u32, a: u32, b: u32, c: u32 }
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var t: texture_2d<f32>;
@group(0) @binding(2) var<storage, read_write> a: array<f32>;
@group(0) @binding(3) var<storage, read_write> b: array<f32>;
var<workgroup> slots: array<f32, 64>;
fn finish(l: u32, w: u32, s: f32) {
    slots[l] = s;
    workgroupBarrier();
    if (l == 0u) {
        var t = 0.0;
        for (var k = 0u; k < 64u; k++) { t += slots[k]; }
        b[w] = t;
    }
}
// Workgroup w sums its own 16384 floats.
@compute @workgroup_size(64)
fn stream_storage(@builtin(local_invocation_index) l: u32, @builtin(workgroup_id) w: vec3<u32>) {
    var s = 0.0;
    let o = w.x * 16384u;
    for (var i = l; i < 16384u; i += 64u) { s += a[o + i]; }
    finish(l, w.x, s);
}
@compute @workgroup_size(64)
fn stream_texture(@builtin(local_invocation_index) l: u32, @builtin(workgroup_id) w: vec3<u32>) {
    var s = 0.0;
    let o = w.x * 16384u;
    for (var i = l; i < 16384u; i += 64u) { let j = o + i; s += textureLoad(t, vec2<u32>(j & 4095u, j >> 12u), 0).x; }
    finish(l, w.x, s);
}
// b = the texture (a load and a store per value).
@compute @workgroup_size(64)
fn copy_texture(@builtin(local_invocation_index) l: u32, @builtin(workgroup_id) w: vec3<u32>) {
    let o = w.x * 16384u;
    for (var i = l; i < 16384u; i += 64u) { let j = o + i; b[j] = textureLoad(t, vec2<u32>(j & 4095u, j >> 12u), 0).x; }
}
@compute @workgroup_size(64)
fn copy_storage(@builtin(local_invocation_index) l: u32, @builtin(workgroup_id) w: vec3<u32>) {
    let o = w.x * 16384u;
    for (var i = l; i < 16384u; i += 64u) { let j = o + i; b[j] = a[j]; }
}
