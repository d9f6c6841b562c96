// Element-wise helpers: fill, scale, accumulate (axpy), add, ReLU forward/backward.
// One invocation per element; the grid may be 2-D when n exceeds 65535 workgroups
// (index = gid.x + gid.y * num_workgroups.x * 256).

struct Params {
    n: u32,
    alpha: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> a: array<f32>;
@group(0) @binding(2) var<storage, read_write> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

fn index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 256u;
}

// a[i] = alpha
@compute @workgroup_size(256)
fn fill(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i < p.n) { a[i] = p.alpha; }
}

// a[i] = alpha * a[i]
@compute @workgroup_size(256)
fn scale(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i < p.n) { a[i] = p.alpha * a[i]; }
}

// b[i] += alpha * a[i]  (gradient accumulation)
@compute @workgroup_size(256)
fn axpy(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i < p.n) { b[i] = b[i] + p.alpha * a[i]; }
}

// c[i] = a[i] + b[i]  (residual add)
@compute @workgroup_size(256)
fn add(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i < p.n) { c[i] = a[i] + b[i]; }
}

// b[i] = max(a[i], 0)
@compute @workgroup_size(256)
fn relu_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i < p.n) { b[i] = max(a[i], 0.0); }
}

// c[i] = b[i] if a[i] > 0 else 0, where a is the ReLU output and b the output gradient
// (PyTorch's threshold_backward on the result).
@compute @workgroup_size(256)
fn relu_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i < p.n) { c[i] = select(0.0, b[i], a[i] > 0.0); }
}
