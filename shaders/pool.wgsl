// Global average pooling over H x W: [N, C, H, W] -> [N, C] and its backward.
// Both grids are 1-D over 256-invocation workgroups, possibly split in 2-D when the count
// exceeds the per-dimension limit (index = gid.x + gid.y * num_workgroups.x * 256).

struct Params {
    planes: u32, // N * C
    hw: u32,     // H * W
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

fn index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 256u;
}

// dst[plane] = sum(src[plane, :]) / hw: one invocation per (n, c) plane; the plane is summed in
// blocks of 16 whose sums are then added, so round-off grows with 16 + hw / 16, not hw.
@compute @workgroup_size(256)
fn avg_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i >= p.planes) {
        return;
    }
    let base = i * p.hw;
    var total = 0.0;
    for (var s = 0u; s < p.hw; s += 16u) {
        let e = min(s + 16u, p.hw);
        var block = 0.0;
        for (var t = s; t < e; t++) {
            block += src[base + t];
        }
        total += block;
    }
    dst[i] = total / f32(p.hw);
}

// dst[plane, s] = src[plane] / hw: one invocation per input element.
@compute @workgroup_size(256)
fn avg_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i >= p.planes * p.hw) {
        return;
    }
    dst[i] = src[i / p.hw] / f32(p.hw);
}
