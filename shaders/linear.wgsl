// Fully connected layer in PyTorch layout: x [N, in], W [out, in], b [out], y [N, out].
// One register-blocked matrix product serves the forward and both backward products:
//
//   out[r, c] = sum_k A[r * a_row + k * a_k] * B[c * b_col + k * b_k]   (+ bias[c])
//
//   forward          y  = x W^T + b   rows N,   cols out, depth in   A = x  (in, 1)   B = W (in, 1)
//   backward_input   dx = dy W        rows N,   cols in,  depth out  A = dy (out, 1)  B = W (1, in)
//   backward_params  dW = dy^T x      rows out, cols in,  depth N    A = dy (1, out)  B = x (1, in)
//                    db = sum_n dy    (the row sums of A, written by the column-block-0 invocations)
//
// Each invocation computes an 8 x 8 block of `out`: per step of k it loads 8 scalars of A and
// 8 of B and does 64 FMAs (16 on vec4s). On lavapipe every storage load costs the same per
// component (a vec4 load costs four scalar ones; measured) and loads dominate, so FMAs per
// load is what counts: 4 here. Row and column indices past the matrix are clamped for loads
// (the inner loop has no bounds checks) and skipped for stores. One pipeline for all three.
//
// One invocation per block, column blocks fastest; the grid may be 2-D
// (index = gid.x + gid.y * num_workgroups.x * 64).

struct Params {
    rows: u32,
    cols: u32,
    depth: u32,
    total: u32,   // blocks = ceil(rows / 8) * max(ceil(cols / 8), 1)
    a_row: u32,
    a_k: u32,
    b_col: u32,
    b_k: u32,
    mode: u32,    // 0: plain; 1: add bias[c]; 2: also write the row sums of A to row_sums
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

const MODE_BIAS: u32 = 1u;
const MODE_ROW_SUMS: u32 = 2u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
// Written only in MODE_ROW_SUMS; the launcher binds `out` here otherwise.
@group(0) @binding(5) var<storage, read_write> row_sums: array<f32>;

// out[r, c0 .. c0+7] = (lo, hi) + bias for the columns that exist.
fn put8(r: u32, c0: u32, lo: vec4<f32>, hi: vec4<f32>, blo: vec4<f32>, bhi: vec4<f32>) {
    if (r >= p.rows) {
        return;
    }
    let base = r * p.cols + c0;
    let vlo = lo + blo;
    let vhi = hi + bhi;
    if (c0 + 8u <= p.cols) {
        out[base] = vlo.x;
        out[base + 1u] = vlo.y;
        out[base + 2u] = vlo.z;
        out[base + 3u] = vlo.w;
        out[base + 4u] = vhi.x;
        out[base + 5u] = vhi.y;
        out[base + 6u] = vhi.z;
        out[base + 7u] = vhi.w;
    } else {
        for (var j = 0u; j < 4u && c0 + j < p.cols; j++) {
            out[base + j] = vlo[j];
        }
        for (var j = 4u; j < 8u && c0 + j < p.cols; j++) {
            out[base + j] = vhi[j - 4u];
        }
    }
}

@compute @workgroup_size(64)
fn matmul(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.x + gid.y * nwg.x * 64u;
    if (t >= p.total) {
        return;
    }
    let cb = max((p.cols + 7u) / 8u, 1u);
    let c0 = (t % cb) * 8u;
    let r0 = (t / cb) * 8u;
    let lr = max(p.rows, 1u) - 1u;
    let lc = max(p.cols, 1u) - 1u;
    let a0 = min(r0, lr) * p.a_row;
    let a1 = min(r0 + 1u, lr) * p.a_row;
    let a2 = min(r0 + 2u, lr) * p.a_row;
    let a3 = min(r0 + 3u, lr) * p.a_row;
    let a4 = min(r0 + 4u, lr) * p.a_row;
    let a5 = min(r0 + 5u, lr) * p.a_row;
    let a6 = min(r0 + 6u, lr) * p.a_row;
    let a7 = min(r0 + 7u, lr) * p.a_row;
    // Clamped column indices.
    let cc0 = min(c0, lc);
    let cc1 = min(c0 + 1u, lc);
    let cc2 = min(c0 + 2u, lc);
    let cc3 = min(c0 + 3u, lc);
    let cc4 = min(c0 + 4u, lc);
    let cc5 = min(c0 + 5u, lc);
    let cc6 = min(c0 + 6u, lc);
    let cc7 = min(c0 + 7u, lc);
    let b0 = cc0 * p.b_col;
    let b1 = cc1 * p.b_col;
    let b2 = cc2 * p.b_col;
    let b3 = cc3 * p.b_col;
    let b4 = cc4 * p.b_col;
    let b5 = cc5 * p.b_col;
    let b6 = cc6 * p.b_col;
    let b7 = cc7 * p.b_col;
    // s<r>l / s<r>h: row r0 + r, columns c0 .. c0+3 / c0+4 .. c0+7.
    var s0l = vec4<f32>(); var s0h = vec4<f32>(); var s1l = vec4<f32>(); var s1h = vec4<f32>();
    var s2l = vec4<f32>(); var s2h = vec4<f32>(); var s3l = vec4<f32>(); var s3h = vec4<f32>();
    var s4l = vec4<f32>(); var s4h = vec4<f32>(); var s5l = vec4<f32>(); var s5h = vec4<f32>();
    var s6l = vec4<f32>(); var s6h = vec4<f32>(); var s7l = vec4<f32>(); var s7h = vec4<f32>();
    // Row sums of A (rows r0 .. r0+3, r0+4 .. r0+7).
    var rl = vec4<f32>();
    var rh = vec4<f32>();
    var ak = 0u;
    var bk = 0u;
    for (var k = 0u; k < p.depth; k++) {
        let gl = vec4<f32>(a[a0 + ak], a[a1 + ak], a[a2 + ak], a[a3 + ak]);
        let gh = vec4<f32>(a[a4 + ak], a[a5 + ak], a[a6 + ak], a[a7 + ak]);
        let bl = vec4<f32>(b[b0 + bk], b[b1 + bk], b[b2 + bk], b[b3 + bk]);
        let bh = vec4<f32>(b[b4 + bk], b[b5 + bk], b[b6 + bk], b[b7 + bk]);
        s0l = fma(vec4<f32>(gl.x), bl, s0l); s0h = fma(vec4<f32>(gl.x), bh, s0h);
        s1l = fma(vec4<f32>(gl.y), bl, s1l); s1h = fma(vec4<f32>(gl.y), bh, s1h);
        s2l = fma(vec4<f32>(gl.z), bl, s2l); s2h = fma(vec4<f32>(gl.z), bh, s2h);
        s3l = fma(vec4<f32>(gl.w), bl, s3l); s3h = fma(vec4<f32>(gl.w), bh, s3h);
        s4l = fma(vec4<f32>(gh.x), bl, s4l); s4h = fma(vec4<f32>(gh.x), bh, s4h);
        s5l = fma(vec4<f32>(gh.y), bl, s5l); s5h = fma(vec4<f32>(gh.y), bh, s5h);
        s6l = fma(vec4<f32>(gh.z), bl, s6l); s6h = fma(vec4<f32>(gh.z), bh, s6h);
        s7l = fma(vec4<f32>(gh.w), bl, s7l); s7h = fma(vec4<f32>(gh.w), bh, s7h);
        rl += gl;
        rh += gh;
        ak += p.a_k;
        bk += p.b_k;
    }
    var blo = vec4<f32>();
    var bhi = vec4<f32>();
    if (p.mode == MODE_BIAS) {
        blo = vec4<f32>(bias[cc0], bias[cc1], bias[cc2], bias[cc3]);
        bhi = vec4<f32>(bias[cc4], bias[cc5], bias[cc6], bias[cc7]);
    }
    put8(r0, c0, s0l, s0h, blo, bhi);
    put8(r0 + 1u, c0, s1l, s1h, blo, bhi);
    put8(r0 + 2u, c0, s2l, s2h, blo, bhi);
    put8(r0 + 3u, c0, s3l, s3h, blo, bhi);
    put8(r0 + 4u, c0, s4l, s4h, blo, bhi);
    put8(r0 + 5u, c0, s5l, s5h, blo, bhi);
    put8(r0 + 6u, c0, s6l, s6h, blo, bhi);
    put8(r0 + 7u, c0, s7l, s7h, blo, bhi);
    if (p.mode == MODE_ROW_SUMS && c0 == 0u) {
        for (var j = 0u; j < 4u && r0 + j < p.rows; j++) {
            row_sums[r0 + j] = rl[j];
        }
        for (var j = 4u; j < 8u && r0 + j < p.rows; j++) {
            row_sums[r0 + j] = rh[j - 4u];
        }
    }
}
