// Counts the non-finite values (NaN, +infinity, -infinity) of a tensor into one slot of a
// counter buffer: counts[slot] += #{i < n : x_i is not finite}. Divergence detection runs it
// on what training produces (stage outputs, gradients sent between stages, batch-norm running
// statistics); the counters stay on the device until the host reads them.
//
// The test reads the exponent bits (all ones: NaN or infinity) instead of comparing floats,
// because WGSL lets compilers assume floats are finite and fold `x != x` away. One invocation
// per 4 elements (vec4 loads; buffers are padded to 16 bytes); the last, partial vec4 counts
// only the elements below n. The grid may be 2-D (index = gid.x + gid.y * nwg.x * 256).

struct Params {
    n: u32,
    slot: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> counts: array<atomic<u32>>;

const EXPONENT: u32 = 0x7f800000u;

@compute @workgroup_size(256)
fn count(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    let e = 4u * i;
    if (e >= p.n) {
        return;
    }
    let bad = (x[i] & vec4<u32>(EXPONENT)) == vec4<u32>(EXPONENT);
    // Lanes at or past n are padding.
    let inside = vec4<u32>(e, e + 1u, e + 2u, e + 3u) < vec4<u32>(p.n);
    let hits = select(vec4<u32>(0u), vec4<u32>(1u), bad & inside);
    let total = hits.x + hits.y + hits.z + hits.w;
    if (total > 0u) {
        atomicAdd(&counts[p.slot], total);
    }
}
