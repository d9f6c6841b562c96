// Batch norm 2d on NCHW tensors (PyTorch semantics), in four entry points:
//
//   stats_partial  grid (P, C): per-chunk mean and M2 = sum((x - mean)^2) of channel c
//   normalize      grid (P, C): train: every workgroup merges the P chunk statistics of
//                  channel c (in the same order, so all get the same result); workgroup k = 0
//                  saves them and updates the running statistics; then
//                  y = (x - mean) * (gamma * invstd) + beta; eval: the same with the running
//                  statistics. Fused epilogue (RES, RELU): y += the residual (identity, or
//                  the option-A shortcut of the block input read in place), then y = max(y, 0)
//   grad_partial   grid (P, C): per-chunk sum(g) and sum(g * x_hat)
//   dx             grid (P, C): merges those sums, writes dbeta and dgamma (workgroup k = 0),
//                  then dx = gamma * invstd * (g - sum(g) / M - x_hat * sum(g * x_hat) / M);
//                  with RES also the shortcut's gradient of the block input (dres)
//
// g is dy, or with MASK the following ReLU's backward folded in: g = dy where that ReLU's
// output `act` is > 0, else 0 (PyTorch's threshold_backward on the result), so no separate
// masked-gradient tensor is written and read back.
//
// The M = N*H*W values of a channel are numbered j = n * HW + s. Each image plane (HW values)
// is cut into runs of RUN consecutive values (RPP = ceil(HW / RUN) runs per plane, the last one
// HW - (RPP - 1) * RUN long), and the channel's N * RPP runs into P chunks of WG runs; workgroup
// (k, c) handles chunk k of channel c, invocation i run k * WG + i, value t < RUN of it at
// address run start + t. A run never crosses a plane, so the addresses are a base plus a
// constant: on lavapipe that ran grad_partial's sums 1.6-1.7x faster than a walk of stride WG
// over the channel with a wrap test per value (examples/probes/batch_norm_walk.wgsl). Past a
// run's end (the short last run of a plane) the address is clamped to its last value and the
// value counts 0 in the sums; an invocation past the channel's last run repeats that run,
// counting 0, and stores the same values to the same addresses as its owner (bit-identical:
// the same operations on the same operands).
//
// Reductions: each invocation accumulates its run's values into 4 interleaved partial sums
// (value t into sum t % 4), combined as (s0 + s1) + (s2 + s3); the workgroup then sums its 64
// results in 8 groups of 8 (serially within a group) and the 8 group sums serially; the
// cross-chunk merges go the same way (invocation i takes chunks i, i + 64, ...). Two barriers
// per reduction: on lavapipe, 16 barrier rounds in each 256-wide workgroup of 4096 values cost
// about as much as an element-wise add over the whole tensor (a version with 8-level trees
// ran the forward 1.3-1.5x slower than this one), so barriers are few and workgroups small.
// tests/batch_norm.rs replays this order in its error model: change both together.
//
// Numerics. All statistics are of the shifted values v = x - x0, x0 = the channel's first
// value x[0, c, 0, 0], so their magnitude is the spread of the channel, not its mean: a
// channel at 100 +- 1 loses no digits to the 100. Within a chunk the variance is an exact
// two-pass over values held in registers: the chunk mean from the workgroup sum, then
// M2 = sum((v - mean)^2) - (sum(v - mean))^2 / n (the second term corrects the mean's
// round-off). Chunks are merged with Chan et al.'s pairwise update. sum(x^2) - sum(x)^2 / n is
// never formed. x_hat is computed as ((x - x0) - mean_v) * invstd everywhere.
//
// saved ([3, C]): row 0 the shift x0, row 1 the shifted batch mean mean_v (the batch mean is
// x0 + mean_v), row 2 1 / sqrt(biased variance + eps).

// Fused ops of normalize / forward_single: RELU = max(y, 0) after the residual add; RES = 0 no
// residual, 1 identity (same shape), 2 option A. Of grad_partial / dx / backward_single:
// MASK = g is dy masked by act > 0; RES = 1 or 2 also writes the shortcut gradient (dres).
// Overrides, not parameters: llvmpipe keeps a branch on a uniform parameter in every value's
// loop body, and the specialised pipelines ran normalize and dx 1.3-1.4x faster there
// ([128, 16, 28, 28], the fused flags on; examples/wgsl_probe.rs).
override RELU: bool = false;
override RES: u32 = 0u;
override MASK: bool = false;
// Values per run, 1..=MAX_RUN: chosen per plane size by the launcher (src/kernels/batch_norm.rs,
// `run_length`) so that the runs pad the plane least.
override RUN: u32 = 64u;

const WG: u32 = 64u;
const FAN: u32 = 8u; // WG = FAN * FAN
const MAX_RUN: u32 = 64u;

struct Params {
    c: u32,        // channels
    hw: u32,       // H * W
    m: u32,        // N * H * W, values per channel
    chunks: u32,   // P = ceil(nruns / WG)
    rpp: u32,      // runs per plane, ceil(hw / RUN)
    nruns: u32,    // runs per channel, N * rpp
    train: u32,    // normalize: 1 = batch statistics, 0 = running statistics
    momentum: f32,
    eps: f32,
    wo: u32,       // W of x (option A: splits s into (oh, ow))
    res_cin: u32,  // option A: the block input [N, res_cin, res_h, res_w] ...
    res_h: u32,
    res_w: u32,
    res_stride: u32, // ... subsampled by res_stride ...
    res_pad: u32,  // ... and its channel ci at channel ci + res_pad of x
    ho: u32,       // H of x
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> gamma: array<f32>;
@group(0) @binding(3) var<storage, read> beta: array<f32>;
@group(0) @binding(4) var<storage, read_write> running_mean: array<f32>;
@group(0) @binding(5) var<storage, read_write> running_var: array<f32>;
// [C, P, 2]: (mean, M2) per chunk, or (sum dy, sum dy * x_hat) per chunk.
@group(0) @binding(6) var<storage, read_write> partials: array<f32>;
// [3, C]: shift x0, shifted batch mean, 1 / sqrt(biased variance + eps).
@group(0) @binding(7) var<storage, read_write> saved: array<f32>;
// y (normalize) or dx (dx).
@group(0) @binding(8) var<storage, read_write> out: array<f32>;
@group(0) @binding(9) var<storage, read> dy: array<f32>;
@group(0) @binding(10) var<storage, read_write> dgamma: array<f32>;
@group(0) @binding(11) var<storage, read_write> dbeta: array<f32>;
// normalize: the residual (RES = 1: shaped like x; 2: the block input of option A).
@group(0) @binding(12) var<storage, read> res: array<f32>;
// grad_partial / dx: the output of the ReLU after this batch norm (MASK).
@group(0) @binding(13) var<storage, read> act: array<f32>;
// dx: the shortcut's gradient of the block input (RES = 1: g itself; 2: the option-A
// adjoint, shaped like the block input, every element written).
@group(0) @binding(14) var<storage, read_write> dres: array<f32>;

// One slot per invocation, then one per group of FAN invocations.
var<workgroup> wn: array<f32, WG>;
var<workgroup> wa: array<f32, WG>;
var<workgroup> wb: array<f32, WG>;
var<workgroup> gn: array<f32, FAN>;
var<workgroup> ga: array<f32, FAN>;
var<workgroup> gb: array<f32, FAN>;

// The run of invocation lid in chunk k of channel c (see the top of this file).
struct Run {
    a: u32,     // address of its first value
    last: u32,  // address of its last value: the clamp of t >= len
    len: u32,   // its values (the short last run of a plane has fewer than RUN)
    live: bool, // false for an invocation past the channel's last run (it repeats that run)
    s: u32,     // position of its first value in the image plane
    n: u32,     // its image
}

fn run_of(k: u32, c: u32, lid: u32) -> Run {
    let r0 = k * WG + lid;
    let r = min(r0, p.nruns - 1u);
    let n = r / p.rpp;
    let s = (r - n * p.rpp) * RUN;
    let len = min(RUN, p.hw - s);
    let a = (n * p.c + c) * p.hw + s;
    return Run(a, a + len - 1u, len, r0 < p.nruns, s, n);
}

// Whether value t of the run counts in the sums.
fn counts(run: Run, t: u32) -> bool {
    return run.live && t < run.len;
}

// Values of a channel in its runs before run r (r <= nruns): the counts of the chunks.
fn values_before(r: u32) -> u32 {
    let n = r / p.rpp;
    return select(n * p.hw + (r - n * p.rpp) * RUN, p.m, r >= p.nruns);
}

// Values in chunk k of a channel.
fn chunk_count(k: u32) -> u32 {
    return values_before(min((k + 1u) * WG, p.nruns)) - values_before(k * WG);
}

// The 4 interleaved partial sums combined.
fn total(s: vec4<f32>) -> f32 {
    return (s.x + s.y) + (s.z + s.w);
}

// Whether channel c of x holds an input channel of the option-A shortcut (uniform per
// workgroup: the padded channels add 0 and get no gradient).
fn in_shortcut(c: u32) -> bool {
    return c >= p.res_pad && c - p.res_pad < p.res_cin;
}

// (n, oh, ow) of a run's first value: its image and pixel, for the option-A shortcut, then
// stepped along the run without division (a division per value, scalar on CPU adapters,
// made the option-A backward 30% slower than the unfused passes).
fn pixel_first(run: Run) -> vec3<u32> {
    let oh = run.s / p.wo;
    return vec3<u32>(run.n, oh, run.s - oh * p.wo);
}

// The next pixel of the plane (a run never leaves its plane).
fn pixel_next(q: vec3<u32>) -> vec3<u32> {
    let wraps = q.z + 1u == p.wo;
    return vec3<u32>(q.x, select(q.y, q.y + 1u, wraps), select(q.z + 1u, 0u, wraps));
}

// Address in the option-A block input of the value that lands on x's pixel q of channel c:
// image n, channel c - res_pad, pixel (oh * stride, ow * stride). Only for in_shortcut(c).
fn shortcut_base(q: vec3<u32>, c: u32) -> u32 {
    return ((q.x * p.res_cin + c - p.res_pad) * p.res_h + q.y * p.res_stride) * p.res_w + q.z * p.res_stride;
}

// The incoming gradient of the value at address i: dy, or with the ReLU mask folded in.
fn grad_in(i: u32) -> f32 {
    let g = dy[i];
    if (MASK) {
        return select(0.0, g, act[i] > 0.0);
    }
    return g;
}

// Sums (a, b) over the workgroup; every invocation gets the same result. Uniform control flow
// only. Back-to-back calls are safe: a call writes wa / wb before its first barrier and ga / gb
// after it, when every invocation has finished reading the previous call's ga / gb.
fn sum2(lid: u32, a: f32, b: f32) -> vec2<f32> {
    wa[lid] = a;
    wb[lid] = b;
    workgroupBarrier();
    if (lid < FAN) {
        var sa = wa[lid * FAN];
        var sb = wb[lid * FAN];
        for (var t = 1u; t < FAN; t++) {
            sa += wa[lid * FAN + t];
            sb += wb[lid * FAN + t];
        }
        ga[lid] = sa;
        gb[lid] = sb;
    }
    workgroupBarrier();
    var ra = ga[0];
    var rb = gb[0];
    for (var t = 1u; t < FAN; t++) {
        ra += ga[t];
        rb += gb[t];
    }
    return vec2<f32>(ra, rb);
}

// Count, mean and M2 = sum((v - mean)^2) of a set of values.
struct Moments {
    n: f32,
    mean: f32,
    m2: f32,
}

// Chan et al.'s pairwise merge. Exact when either side is empty (its mean and M2 are 0).
fn chan(a: Moments, b: Moments) -> Moments {
    let n = a.n + b.n;
    let f = select(0.0, b.n / n, n > 0.0);
    let d = b.mean - a.mean;
    return Moments(n, a.mean + d * f, a.m2 + b.m2 + d * d * a.n * f);
}

// Merges the invocations' moments over the workgroup, in the order of sum2; every invocation
// gets the same result. Uniform control flow only.
fn merge_all(lid: u32, mine: Moments) -> Moments {
    wn[lid] = mine.n;
    wa[lid] = mine.mean;
    wb[lid] = mine.m2;
    workgroupBarrier();
    if (lid < FAN) {
        var s = Moments(wn[lid * FAN], wa[lid * FAN], wb[lid * FAN]);
        for (var t = 1u; t < FAN; t++) {
            let i = lid * FAN + t;
            s = chan(s, Moments(wn[i], wa[i], wb[i]));
        }
        gn[lid] = s.n;
        ga[lid] = s.mean;
        gb[lid] = s.m2;
    }
    workgroupBarrier();
    var r = Moments(gn[0], ga[0], gb[0]);
    for (var t = 1u; t < FAN; t++) {
        r = chan(r, Moments(gn[t], ga[t], gb[t]));
    }
    return r;
}

// Chunk k of channel c: its moments (mean, M2) of the shifted values into partials.
// Uniform control flow only (as every function below that reduces over the workgroup).
fn chunk_moments(k: u32, c: u32, lid: u32) {
    let x0 = x[c * p.hw];
    let run = run_of(k, c, lid);
    let n = f32(chunk_count(k));
    var v: array<f32, MAX_RUN>;
    var sum = vec4<f32>(0.0);
    for (var t = 0u; t < RUN; t++) {
        v[t] = x[min(run.a + t, run.last)] - x0;
        sum[t & 3u] += select(0.0, v[t], counts(run, t));
    }
    let mean = sum2(lid, total(sum), 0.0).x / n;
    // Second pass over the registers: sum of squared deviations, and the sum of deviations
    // whose square corrects the mean's round-off.
    var dev = vec4<f32>(0.0);
    var sq = vec4<f32>(0.0);
    for (var t = 0u; t < RUN; t++) {
        let d = select(0.0, v[t] - mean, counts(run, t));
        dev[t & 3u] += d;
        sq[t & 3u] += d * d;
    }
    let r = sum2(lid, total(dev), total(sq));
    if (lid == 0u) {
        let o = (c * p.chunks + k) * 2u;
        partials[o] = mean;
        partials[o + 1u] = max(r.y - r.x * r.x / n, 0.0);
    }
}

// (x0, mean_v, invstd) of channel c: train: merges the chunk moments (every caller in the same
// order, so all get the same result); with `save`, writes them and updates the running
// statistics. Eval: from the running statistics.
fn channel_stats(c: u32, lid: u32, save: bool) -> vec3<f32> {
    if (p.train == 0u) {
        return vec3<f32>(running_mean[c], 0.0, 1.0 / sqrt(running_var[c] + p.eps));
    }
    let x0 = x[c * p.hw];
    var mine = Moments(0.0, 0.0, 0.0);
    for (var i = lid; i < p.chunks; i += WG) {
        let o = (c * p.chunks + i) * 2u;
        mine = chan(mine, Moments(f32(chunk_count(i)), partials[o], partials[o + 1u]));
    }
    let all = merge_all(lid, mine);
    let mean_v = all.mean;
    let invstd = 1.0 / sqrt(all.m2 / f32(p.m) + p.eps);
    if (save && lid == 0u) {
        saved[c] = x0;
        saved[p.c + c] = mean_v;
        saved[2u * p.c + c] = invstd;
        // The running variance takes the unbiased estimate M2 / (M - 1).
        running_mean[c] = (1.0 - p.momentum) * running_mean[c] + p.momentum * (x0 + mean_v);
        running_var[c] = (1.0 - p.momentum) * running_var[c] + p.momentum * (all.m2 / f32(p.m - 1u));
    }
    return vec3<f32>(x0, mean_v, invstd);
}

// y = ((x - x0) - mean_v) * invstd * gamma + beta over chunk k of channel c, then the epilogue.
fn normalize_chunk(k: u32, c: u32, lid: u32, st: vec3<f32>) {
    let x0 = st.x;
    let mean_v = st.y;
    let scale = gamma[c] * st.z;
    let shift = beta[c];
    let run = run_of(k, c, lid);
    // Uniform per workgroup: whether the residual of this channel is read at all.
    let res_a = RES == 2u && in_shortcut(c);
    var q = pixel_first(run);
    for (var t = 0u; t < RUN; t++) {
        let i = min(run.a + t, run.last);
        var v = ((x[i] - x0) - mean_v) * scale + shift;
        if (RES == 1u) {
            v += res[i];
        } else if (res_a) {
            v += res[shortcut_base(q, c)];
        }
        if (RELU) {
            v = max(v, 0.0);
        }
        out[i] = v;
        // The pixel stays with the clamped address past the run's end.
        if (res_a && t + 1u < run.len) {
            q = pixel_next(q);
        }
    }
}

// Chunk k of channel c: (sum g, sum g * x_hat) into partials.
fn chunk_grad_sums(k: u32, c: u32, lid: u32) {
    let x0 = saved[c];
    let mean_v = saved[p.c + c];
    let invstd = saved[2u * p.c + c];
    let run = run_of(k, c, lid);
    var s_dy = vec4<f32>(0.0);
    var s_dyx = vec4<f32>(0.0);
    for (var t = 0u; t < RUN; t++) {
        let i = min(run.a + t, run.last);
        let g = grad_in(i);
        let keep = counts(run, t);
        s_dy[t & 3u] += select(0.0, g, keep);
        s_dyx[t & 3u] += select(0.0, g * (((x[i] - x0) - mean_v) * invstd), keep);
    }
    let r = sum2(lid, total(s_dy), total(s_dyx));
    if (lid == 0u) {
        let o = (c * p.chunks + k) * 2u;
        partials[o] = r.x;
        partials[o + 1u] = r.y;
    }
}

// (sum g, sum g * x_hat) of channel c from the chunk sums, in the same order for every caller;
// with `save`, writes dbeta and dgamma.
fn channel_grad_sums(c: u32, lid: u32, save: bool) -> vec2<f32> {
    var s_dy = 0.0;
    var s_dyx = 0.0;
    for (var i = lid; i < p.chunks; i += WG) {
        let o = (c * p.chunks + i) * 2u;
        s_dy += partials[o];
        s_dyx += partials[o + 1u];
    }
    let r = sum2(lid, s_dy, s_dyx);
    if (save && lid == 0u) {
        dbeta[c] = r.x;
        dgamma[c] = r.y;
    }
    return r;
}

// dx over chunk k of channel c, and the shortcut gradient when RES != 0.
fn dx_chunk(k: u32, c: u32, lid: u32, r: vec2<f32>) {
    let x0 = saved[c];
    let mean_v = saved[p.c + c];
    let invstd = saved[2u * p.c + c];
    let scale = gamma[c] * invstd;
    let b = r.x / f32(p.m);
    let d = r.y / f32(p.m);
    let run = run_of(k, c, lid);
    let res_a = RES == 2u && in_shortcut(c);
    var q = pixel_first(run);
    for (var t = 0u; t < RUN; t++) {
        let i = min(run.a + t, run.last);
        let g = grad_in(i);
        let xh = ((x[i] - x0) - mean_v) * invstd;
        out[i] = scale * ((g - b) - xh * d);
        if (RES == 1u) {
            dres[i] = g;
        } else if (res_a) {
            // The adjoint of the subsample: g at the sampled pixel, 0 at the other pixels
            // of its stride x stride cell (cells cover the input, as H <= Ho * stride), so
            // dres is written entirely and needs no zero fill.
            let base = shortcut_base(q, c);
            dres[base] = g;
            let hn = min(p.res_stride, p.res_h - q.y * p.res_stride);
            let wn = min(p.res_stride, p.res_w - q.z * p.res_stride);
            if (p.res_stride == 2u) {
                // The CIFAR ResNet's stride, without the loops' per-lane trip counts.
                if (wn == 2u) {
                    dres[base + 1u] = 0.0;
                }
                if (hn == 2u) {
                    dres[base + p.res_w] = 0.0;
                    if (wn == 2u) {
                        dres[base + p.res_w + 1u] = 0.0;
                    }
                }
            } else {
                for (var dh = 0u; dh < hn; dh++) {
                    for (var dw = select(0u, 1u, dh == 0u); dw < wn; dw++) {
                        dres[base + dh * p.res_w + dw] = 0.0;
                    }
                }
            }
        }
        if (res_a && t + 1u < run.len) {
            q = pixel_next(q);
        }
    }
}

@compute @workgroup_size(64)
fn stats_partial(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    chunk_moments(wg.x, wg.y, lid);
}

@compute @workgroup_size(64)
fn normalize(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    normalize_chunk(wg.x, wg.y, lid, channel_stats(wg.y, lid, wg.x == 0u));
}

// The forward in one dispatch, grid (1, C): one workgroup per channel runs stats_partial's
// chunks, then normalize's merge once, then every chunk's normalize. The same operations in
// the same order as the two dispatches, so bit-for-bit their results; the chunk moments pass
// through partials, written and read by this workgroup only (storageBarrier orders them).
@compute @workgroup_size(64)
fn forward_single(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let c = wg.y;
    if (p.train != 0u) {
        for (var k = 0u; k < p.chunks; k++) {
            chunk_moments(k, c, lid);
        }
        storageBarrier();
    }
    let st = channel_stats(c, lid, true);
    for (var k = 0u; k < p.chunks; k++) {
        normalize_chunk(k, c, lid, st);
    }
}

@compute @workgroup_size(64)
fn grad_partial(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    chunk_grad_sums(wg.x, wg.y, lid);
}

@compute @workgroup_size(64)
fn dx(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    dx_chunk(wg.x, wg.y, lid, channel_grad_sums(wg.y, lid, wg.x == 0u));
}

// The backward in one dispatch, grid (1, C), as forward_single is the forward's.
@compute @workgroup_size(64)
fn backward_single(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let c = wg.y;
    for (var k = 0u; k < p.chunks; k++) {
        chunk_grad_sums(k, c, lid);
    }
    storageBarrier();
    let r = channel_grad_sums(c, lid, true);
    for (var k = 0u; k < p.chunks; k++) {
        dx_chunk(k, c, lid, r);
    }
}
