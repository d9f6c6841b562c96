// SGD with momentum, dampening, Nesterov and weight decay, in place, with the semantics and
// operation order of torch.optim.SGD (single-tensor path, each `add(x, alpha=a)` fused):
//   d = g + wd * p                                  (when wd != 0)
//   buf = first ? d : momentum * buf + (1 - dampening) * d   (when momentum != 0)
//   d = nesterov ? d + momentum * buf : buf                  (when momentum != 0)
//   p = p - lr * d
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
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> param: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> grad: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> buf: array<vec4<f32>>;

@compute @workgroup_size(256)
fn step(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    let e = 4u * i;
    if (e >= p.n) {
        return;
    }
    let pv = param[i];
    var d = grad[i];
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
}
