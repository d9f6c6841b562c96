// Softmax cross-entropy over logits [N, C] with class-index labels [N] (f32, exact for
// C <= 2^24), mean over the batch, plus top-1 / top-5 correct counts.
//
// Two dispatches: `rows` or `rows_grad` (one invocation per row) writes each row's loss and
// correct flags to part [N, 3] (and, for rows_grad, the row of dlogits); `reduce` (one
// workgroup) sums part over the batch in a fixed order into loss [1] and correct [2]. So the
// result is deterministic and only three floats need to come back to the host.
//
// Per row n with label l and z = logits[n, :]:
//   m = max_c z_c, s = sum_c exp(z_c - m), loss_n = (m - z_l) + log(s),
//   dlogits[n, c] = (exp(z_c - m) / s - [c == l]) / N,
//   rank = #{c : z_c > z_l} + #{c < l : z_c == z_l}: top-1 when rank < 1, top-k when
//   rank < topk (= min(5, C)). Ties go to the lowest class index, as PyTorch's argmax and
//   topk order them, so a tie with a lower class counts against the label (all-equal logits
//   are correct for class 0 only, never for every class).
// A row holding a non-finite logit (NaN or infinity: a diverged net) is never correct. The
// test reads the exponent bits, because WGSL lets compilers assume floats are finite, so
// comparisons with NaN may be folded away.
// A label that is not an integer in [0, C) (or NaN) makes the row count as ignored: zero loss,
// zero gradient, not correct (the mean still divides by N). The host validates labels it
// uploads, so this only keeps bad data from reading out of bounds.

struct Params {
    rows: u32,     // N
    classes: u32,  // C
    topk: u32,     // min(5, C)
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> labels: array<f32>;
@group(0) @binding(3) var<storage, read_write> part: array<f32>;
@group(0) @binding(4) var<storage, read_write> dlogits: array<f32>;
@group(0) @binding(5) var<storage, read_write> loss: array<f32>;
@group(0) @binding(6) var<storage, read_write> correct: array<f32>;

struct Row {
    base: u32,   // index of z_0
    label: u32,  // 0 when invalid
    valid: bool,
    m: f32,      // max_c z_c
    s: f32,      // sum_c exp(z_c - m)
}

fn index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 64u;
}

// Computes row n's statistics and writes its part entries.
fn row_stats(n: u32) -> Row {
    let base = n * p.classes;
    let lf = labels[n];
    // False for NaN, negative, fractional and too-large labels.
    let valid = lf >= 0.0 && lf < f32(p.classes) && floor(lf) == lf;
    let label = select(0u, u32(clamp(lf, 0.0, f32(p.classes - 1u))), valid);
    let zl = logits[base + label];
    var m = zl;
    var ahead = 0u;
    var finite = true;
    for (var c = 0u; c < p.classes; c++) {
        let z = logits[base + c];
        m = max(m, z);
        finite = finite && (bitcast<u32>(z) & 0x7f800000u) != 0x7f800000u;
        ahead += select(0u, 1u, z > zl || (z == zl && c < label));
    }
    var s = 0.0;
    for (var c = 0u; c < p.classes; c++) {
        s += exp(logits[base + c] - m);
    }
    part[3u * n] = select(0.0, (m - zl) + log(s), valid);
    part[3u * n + 1u] = select(0.0, 1.0, valid && finite && ahead < 1u);
    part[3u * n + 2u] = select(0.0, 1.0, valid && finite && ahead < p.topk);
    return Row(base, label, valid, m, s);
}

// Loss and correct flags per row (evaluation).
@compute @workgroup_size(64)
fn rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let n = index(gid, nwg);
    if (n < p.rows) {
        _ = row_stats(n);
    }
}

// Loss and correct flags per row, and the row of dlogits.
@compute @workgroup_size(64)
fn rows_grad(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let n = index(gid, nwg);
    if (n >= p.rows) {
        return;
    }
    let r = row_stats(n);
    let batch = f32(p.rows);
    if (!r.valid) {
        for (var c = 0u; c < p.classes; c++) {
            dlogits[r.base + c] = 0.0;
        }
        return;
    }
    for (var c = 0u; c < p.classes; c++) {
        let q = exp(logits[r.base + c] - r.m) / r.s;
        dlogits[r.base + c] = select(q, q - 1.0, c == r.label) / batch;
    }
}

var<workgroup> red: array<vec4<f32>, 256>;

// loss[0] = sum_n part[n, 0] / N, correct = [sum_n part[n, 1], sum_n part[n, 2]]: a strided
// sum per invocation, then a tree over the workgroup.
@compute @workgroup_size(256)
fn reduce(@builtin(local_invocation_index) li: u32) {
    var acc = vec4<f32>();
    for (var i = li; i < p.rows; i += 256u) {
        acc += vec4<f32>(part[3u * i], part[3u * i + 1u], part[3u * i + 2u], 0.0);
    }
    red[li] = acc;
    for (var half = 128u; half > 0u; half >>= 1u) {
        workgroupBarrier();
        if (li < half) {
            red[li] += red[li + half];
        }
    }
    if (li == 0u) {
        let t = red[0];
        loss[0] = t.x / f32(p.rows);
        correct[0] = t.y;
        correct[1] = t.z;
    }
}
