// SGD with momentum, dampening, Nesterov and weight decay, in place, with the semantics and
// operation order of torch.optim.SGD (single-tensor path, each `add(x, alpha=a)` fused):
//   d = g + wd * p                                  (when wd != 0)
//   buf = first ? d : momentum * buf + (1 - dampening) * d   (when momentum != 0)
//   d = nesterov ? d + momentum * buf : buf                  (when momentum != 0)
//   p = p - lr * d
// `step_watched` also counts non-finite values (divergence detection, see below).
// One invocation per 4 elements (vec4 loads; buffers are padded to 16 bytes); the last,
// partial vec4 stores only the elements below n. The grid may be 2-D
// (index = gid.x + gid.y * num_workgroups.x * 256).

const NESTEROV: u32 = 1u;
const FIRST: u32 = 2u;
const MOMENTUM: u32 = 4u;
const DECAY: u32 = 8u;

struct Params {
    n: u32,
    flags: u32,
    lr: f32,
    momentum: f32,
    one_minus_dampening: f32,
    weight_decay: f32,
    slot: u32,  // step_watched: first of the three counters (gradient, parameter, buffer)
    chunk: u32, // step_packed: vec4s per entry of `chunk_slot`
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> param: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> grad: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> buf: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> counts: array<atomic<u32>>;
@group(0) @binding(5) var<storage, read> chunk_slot: array<u32>;

struct Update {
    grad: vec4<f32>,
    param: vec4<f32>,
    buf: vec4<f32>,
}

// Updates the elements of vec4 i (e = 4i < n) and returns what was read and written.
fn update(i: u32, e: u32) -> Update {
    let pv = param[i];
    let g = grad[i];
    var d = g;
    if ((p.flags & DECAY) != 0u) {
        d = fma(pv, vec4<f32>(p.weight_decay), d);
    }
    let momentum = (p.flags & MOMENTUM) != 0u;
    var b = vec4<f32>();
    if (momentum) {
        if ((p.flags & FIRST) != 0u) {
            b = d;
        } else {
            b = fma(d, vec4<f32>(p.one_minus_dampening), buf[i] * p.momentum);
        }
        if ((p.flags & NESTEROV) != 0u) {
            d = fma(b, vec4<f32>(p.momentum), d);
        } else {
            d = b;
        }
    }
    let np = fma(d, vec4<f32>(-p.lr), pv);
    if (e + 4u <= p.n) {
        param[i] = np;
        if (momentum) {
            buf[i] = b;
        }
    } else {
        for (var c = 0u; e + c < p.n; c++) {
            param[i][c] = np[c];
            if (momentum) {
                buf[i][c] = b[c];
            }
        }
    }
    return Update(g, np, b);
}

@compute @workgroup_size(256)
fn step(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    let e = 4u * i;
    if (e >= p.n) {
        return;
    }
    _ = update(i, e);
}

const EXPONENT: u32 = 0x7f800000u;

// The number of lanes of v below n that are NaN or infinite (exponent bits all ones: WGSL
// lets compilers assume floats are finite, so comparisons cannot be trusted to find them).
fn non_finite(v: vec4<f32>, e: u32) -> u32 {
    let bad = (bitcast<vec4<u32>>(v) & vec4<u32>(EXPONENT)) == vec4<u32>(EXPONENT);
    let inside = vec4<u32>(e, e + 1u, e + 2u, e + 3u) < vec4<u32>(p.n);
    let hits = select(vec4<u32>(0u), vec4<u32>(1u), bad & inside);
    return hits.x + hits.y + hits.z + hits.w;
}

fn count(u: Update, e: u32, slot: u32) {
    let g = non_finite(u.grad, e);
    let w = non_finite(u.param, e);
    let b = select(0u, non_finite(u.buf, e), (p.flags & MOMENTUM) != 0u);
    if (g > 0u) {
        atomicAdd(&counts[slot], g);
    }
    if (w > 0u) {
        atomicAdd(&counts[slot + 1u], w);
    }
    if (b > 0u) {
        atomicAdd(&counts[slot + 2u], b);
    }
}

// step, and counts the non-finite values of the gradient, the new parameter and the new
// momentum buffer into counts[slot], counts[slot + 1] and counts[slot + 2]: divergence is
// seen in the step that produces it, with no extra pass over the weights.
@compute @workgroup_size(256)
fn step_watched(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    let e = 4u * i;
    if (e >= p.n) {
        return;
    }
    count(update(i, e), e, p.slot);
}

// step_watched over all parameters of a stage packed in one buffer each (values, gradients,
// momentum): one dispatch per stage. Each parameter starts at an aligned chunk of `p.chunk`
// vec4s, and chunk_slot[c] is the first counter of the parameter chunk c belongs to, so the
// counts still name the tensor. Padding between parameters is zero and stays zero.
@compute @workgroup_size(256)
fn step_packed(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    let e = 4u * i;
    if (e >= p.n) {
        return;
    }
    count(update(i, e), e, chunk_slot[i / p.chunk]);
}
