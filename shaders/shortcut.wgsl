// Option-A shortcut of CIFAR ResNets (He et al. 2016; the reference code's LambdaLayer
// `F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, pad, pad))`): subsample by `stride` and put the
// Cin input channels at output channels pad .. pad + Cin of Cout; the other channels are zero.
//
// One entry point for both directions: invocation (pixel o of the small grid, channel c < Cin,
// image n) pairs the small tensor's element [n, c + pad, oh, ow] of [N, Cout, Ho, Wo] with the
// large tensor's element [n, c, oh * stride, ow * stride] of [N, Cin, H, W].
// Forward copies large -> small, backward small -> large. Every other element of the
// destination is never written: launchers pass a zero-filled destination.
// Grid: (ceil(Ho * Wo / 256), Cin, N).

struct Params {
    cin: u32,
    cout: u32,
    h: u32,
    w: u32,
    ho: u32,
    wo: u32,
    stride: u32,
    pad: u32,
    backward: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(256)
fn subsample_pad(@builtin(global_invocation_id) gid: vec3<u32>) {
    let o = gid.x;
    if (o >= p.ho * p.wo) {
        return;
    }
    let c = gid.y;
    let n = gid.z;
    let oh = o / p.wo;
    let ow = o - oh * p.wo;
    let small = ((n * p.cout + c + p.pad) * p.ho + oh) * p.wo + ow;
    let large = ((n * p.cin + c) * p.h + oh * p.stride) * p.w + ow * p.stride;
    if (p.backward == 0u) {
        dst[small] = src[large];
    } else {
        dst[large] = src[small];
    }
}
