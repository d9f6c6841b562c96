// 2-D convolution (NCHW input, OIHW weight, no bias) as a shared-memory tiled implicit GEMM:
// the `Tiled` variant, meant for discrete and integrated GPUs. Launchers: src/kernels/conv2d/tiled.rs.
//
// Every pass is one GEMM  D[m][j] = sum_k A[m][k] * B[k][j]  whose operands are gathered from
// the tensors on the fly (no im2col buffer):
//   forward          M = out-channels o, N = batch x output pixels,  K = in-channels x taps
//   backward_data    M = in-channels c,  N = batch x input pixels,   K = taps x out-channels
//   backward_filter  M = out-channels o, N = in-channels x taps,     K = batch x output pixels
//
// Tiling. A workgroup of WG invocations (256, 128 or 64) computes a BM x BN block of D;
// invocation (tm, tn) holds an 8 x 4 register block (rows 8tm.., columns 4tn..), so
// BM = 8 * WG_M and BN = 4 * (WG / WG_M). The launcher picks the shape per GEMM from six:
// 64x128, 32x256 (256 invocations), 64x64, 32x128 (128), 64x32, 32x64 (64). The big tiles reuse
// each loaded element most (64x128: 43 FMAs per element loaded); the small ones give a GEMM
// with few outputs (the 64-channel layers at 8x8: 64 x 8192) enough workgroups for about two
// waves on a GPU of ~128 compute units (256 workgroups of 64x32 instead of 64 of 64x128), and
// the 32-row ones keep 16- and 32-channel layers from computing mostly padding.
// The K loop walks tiles of BK = 8 or 16: each step every invocation loads BM*BK/WG elements
// of A and BN*BK/WG of B from global memory into registers, stores them in workgroup memory,
// and after a barrier does BK x 32 FMAs, from three vec4 workgroup loads per k.
// The global loads for step t+1 are issued before the FMAs of step t (register prefetch), so
// their latency hides behind the arithmetic.
//
// Workgroup memory: per buffer, an A tile BK x (BM + 4) floats and a B tile BK x (BN + 4),
// stored k-major as vec4s so the FMA loop reads 8 rows and 4 columns with three 16-byte loads.
// The +4 pad (one vec4 per row) spreads the stores of invocations that write different k of
// the same column over different banks. With DB there are two buffers: step kt stores into
// buffer kt % 2, waits at one barrier and computes from it. The barrier after the FMAs that a
// single buffer needs (nobody may overwrite the tile while others still read it) is not needed:
// an invocation can only store tile kt + 1, into the other buffer, after every invocation has
// reached step kt's barrier, so after every invocation finished the FMAs of step kt - 1 on that
// buffer. The arrays are sized per pipeline (override-sized workgroup arrays); the launcher
// takes the deepest BK, double-buffered first, that fits the device's workgroup memory: under
// WebGPU's guaranteed 16 KiB, 64x128 runs BK 8 double-buffered (12.5 KiB), 32x256 BK 8
// single (9.25 KiB), 64x32 BK 16 double-buffered (13 KiB); a device with 32 KiB or more (most
// discrete GPUs) gets BK 16 double-buffered for 64x128 (25 KiB).
//
// Global loads are coalesced: consecutive invocations read consecutive addresses of the
// operand's contiguous dimension (pixels of x and dy, k along the weight rows in forward), so
// a warp touches few 32-byte sectors. The exception is the weight in backward_data (read with
// a stride of K*K floats along the input channels), which is small and stays in cache.
//
// backward_data handles the stride by phases: input pixels (h, w) with h % S = ph, w % S = pw
// receive exactly the taps kh = (ph + pad) % S + S*i (likewise kw), from output row
// oh = (ph + pad) / S + h / S - i. One dispatch covers all S*S phases (workgroup_id.z), each a
// dense GEMM over its own taps, so no FMA is spent on the zero terms of the gather formula
// dx[h] = sum over kh with (h + pad - kh) divisible by S. Its K is ordered tap-major with the
// out-channels inner, so a K tile never straddles two taps and needs no division per element.
//
// backward_filter has a short M and N (channels x taps) but a long K (batch x pixels), so the
// launcher splits K over workgroup_id.z (split-K): split s writes its partial sums to slice s
// of a [splits][O][C*K*K] buffer and `reduce_splits` adds the slices. Splits are few and long
// (at least 1024 K values each, about two waves of workgroups in all), so the partial buffer
// stays small; the reduce is parallel: 8 invocations per output each sum every 8th slice
// (coalesced: 32 consecutive outputs per row of the workgroup), then a workgroup tree adds the
// 8 partial sums. The order is fixed, so results are deterministic. With one split the GEMM
// writes dw directly.
//
// The kernel size KS and stride are override constants (divisions by them become
// multiplications); channel counts and spatial sizes are runtime parameters. Every entry point
// overwrites its output, except backward_data with ACC, which adds to it (dx += ...: the
// shortcut gradient of a residual block is already there).

struct Params {
    batch: u32,
    in_c: u32,
    in_h: u32,
    in_w: u32,
    out_c: u32,
    out_h: u32,
    out_w: u32,
    pad: u32,
    // Row tiles of the GEMM: workgroup_id.z = tile_m + tiles_m * (phase or split).
    tiles_m: u32,
    // backward_filter: K tiles (of BK) per split.
    chunk_tiles: u32,
    // reduce_splits: number of slices and elements per slice.
    splits: u32,
    n_out: u32,
}

// Binding use per entry point:
//   forward          in0 = x,        in1 = w,  dst = y
//   backward_data    in0 = dy,       in1 = w,  dst = dx
//   backward_filter  in0 = x,        in1 = dy, dst = dw, or the split-K partial sums
//   reduce_splits    in0 = partials, (none),   dst = dw
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> in0: array<f32>;
@group(0) @binding(2) var<storage, read> in1: array<f32>;
// Seen as vec4s so a row of a register block (4 consecutive columns) is one 16-byte store
// where the columns are contiguous and aligned; scalar stores go through `st`. Tensor buffers
// are padded to 16 bytes, so the view covers every element.
@group(0) @binding(3) var<storage, read_write> dst: array<vec4<f32>>;

override KS: u32 = 3u;
override STRIDE: u32 = 1u;
// Invocations per workgroup: 256, 128 or 64 (the launcher's tile shapes).
override WG: u32 = 256u;
// Invocations along M: 8 (BM = 64) or 4 (BM = 32).
override WG_M: u32 = 8u;
// Depth of a K tile: 8 or 16.
override BK: u32 = 8u;
// Double-buffered workgroup tiles: one barrier per K step instead of two.
override DB: bool = false;
// backward_data: add to dst instead of overwriting it.
override ACC: bool = false;

override KK: u32 = KS * KS;
override WG_N: u32 = WG / WG_M;
override BM: u32 = 8u * WG_M;
override BN: u32 = 4u * WG_N;
// Elements of the A and B tiles each invocation moves per K step (at most 16 each, the
// sizes of `ra` and `rb`).
override A_PER: u32 = (BM * BK + WG - 1u) / WG;
override B_PER: u32 = BN * BK / WG;
// Row strides of the tiles in vec4s (one vec4 of padding, see above).
override AS: u32 = BM / 4u + 1u;
override BS: u32 = WG_N + 1u;
// One buffer of each tile, in vec4s, and the workgroup arrays (two buffers with DB).
override A_BUF: u32 = BK * AS;
override B_BUF: u32 = BK * BS;
override NBUF: u32 = select(1u, 2u, DB);
override A_TILE: u32 = NBUF * A_BUF;
override B_TILE: u32 = NBUF * B_BUF;

var<workgroup> a_tile: array<vec4<f32>, A_TILE>;
var<workgroup> b_tile: array<vec4<f32>, B_TILE>;

// The 8 x 4 register block: acc[row][column]; rows 8tm + r of the tile.
const TM: u32 = 8u;
var<private> acc: array<vec4<f32>, 8>;
var<private> ra: array<f32, 16>; // prefetched A elements (A_PER <= 16)
var<private> rb: array<f32, 16>; // prefetched B elements (B_PER <= 16)

fn st(i: u32, v: f32) {
    dst[i >> 2u][i & 3u] = v;
}

fn st_add(i: u32, v: f32) {
    dst[i >> 2u][i & 3u] += v;
}

fn zero_acc() {
    for (var r = 0u; r < TM; r++) {
        acc[r] = vec4<f32>(0.0);
    }
}

fn put_a(buf: u32, kk: u32, m: u32, v: f32) {
    a_tile[buf * A_BUF + kk * AS + m / 4u][m % 4u] = v;
}

fn put_b(buf: u32, kk: u32, j: u32, v: f32) {
    b_tile[buf * B_BUF + kk * BS + j / 4u][j % 4u] = v;
}

// Where each invocation's prefetched elements go. "k-major": consecutive invocations take
// consecutive k (column li % BK of the tile, rows li / BK + 32 i); "m-/n-major": consecutive
// invocations take consecutive rows (columns) and walk k.
fn store_a_kmajor(buf: u32, li: u32) {
    for (var i = 0u; i < A_PER; i++) {
        let m = li / BK + i * (WG / BK);
        if (m < BM) {
            put_a(buf, li % BK, m, ra[i]);
        }
    }
}

fn store_a_mmajor(buf: u32, li: u32) {
    for (var i = 0u; i < A_PER; i++) {
        let kk = li / BM + i * (WG / BM);
        if (kk < BK) {
            put_a(buf, kk, li % BM, ra[i]);
        }
    }
}

fn store_b_nmajor(buf: u32, li: u32) {
    for (var i = 0u; i < B_PER; i++) {
        put_b(buf, li / BN + i * (WG / BN), li % BN, rb[i]);
    }
}

fn store_b_kmajor(buf: u32, li: u32) {
    for (var i = 0u; i < B_PER; i++) {
        put_b(buf, li % BK, li / BK + i * (WG / BK), rb[i]);
    }
}

// acc += A_tile[8tm.., :] x B_tile[:, 4tn..]: 32 FMAs per three vec4 workgroup loads.
fn mma(buf: u32, tm: u32, tn: u32) {
    let a_row = buf * A_BUF + 2u * tm;
    let b_row = buf * B_BUF + tn;
    for (var kk = 0u; kk < BK; kk++) {
        let a0 = a_tile[a_row + kk * AS];
        let a1 = a_tile[a_row + kk * AS + 1u];
        let b = b_tile[b_row + kk * BS];
        acc[0] = fma(vec4<f32>(a0.x), b, acc[0]);
        acc[1] = fma(vec4<f32>(a0.y), b, acc[1]);
        acc[2] = fma(vec4<f32>(a0.z), b, acc[2]);
        acc[3] = fma(vec4<f32>(a0.w), b, acc[3]);
        acc[4] = fma(vec4<f32>(a1.x), b, acc[4]);
        acc[5] = fma(vec4<f32>(a1.y), b, acc[5]);
        acc[6] = fma(vec4<f32>(a1.z), b, acc[6]);
        acc[7] = fma(vec4<f32>(a1.w), b, acc[7]);
    }
}

// ---------------------------------------------------------------------------------------------
// forward: y[n][o][oh][ow] = sum_{c, kh, kw} w[o][c][kh][kw] * x[n][c][oh*S - pad + kh][ow*S - pad + kw]
// A[o][k] = w row o (k = c * KK + kh * KS + kw, contiguous), B[k][j] = im2col(x), j = n * OH*OW + pixel.

// The B column an invocation loads, fixed for the whole K loop.
struct FwdCol {
    ok: bool,
    base: u32, // offset of image n in x
    ih0: i32,  // oh * S - pad
    iw0: i32,  // ow * S - pad
}

fn fwd_load(li: u32, kt: u32, m0: u32, col: FwdCol) {
    let k_dim = p.in_c * KK;
    let ka = kt * BK + li % BK;
    for (var i = 0u; i < A_PER; i++) {
        let m = li / BK + i * (WG / BK);
        let o = m0 + m;
        var v = 0.0;
        if (m < BM && ka < k_dim && o < p.out_c) {
            v = in1[o * k_dim + ka];
        }
        ra[i] = v;
    }
    for (var i = 0u; i < B_PER; i++) {
        let k = kt * BK + li / BN + i * (WG / BN);
        let c = k / KK;
        let tap = k % KK;
        let ih = col.ih0 + i32(tap / KS);
        let iw = col.iw0 + i32(tap % KS);
        var v = 0.0;
        if (col.ok && k < k_dim && ih >= 0 && ih < i32(p.in_h) && iw >= 0 && iw < i32(p.in_w)) {
            v = in0[col.base + (c * p.in_h + u32(ih)) * p.in_w + u32(iw)];
        }
        rb[i] = v;
    }
}

@compute @workgroup_size(WG)
fn forward(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let pix_n = p.out_h * p.out_w;
    let n_cols = p.batch * pix_n;
    let n0 = (wg.x + wg.y * nwg.x) * BN;
    if (n0 >= n_cols) {
        return;
    }
    let m0 = wg.z * BM;
    let j = n0 + li % BN;
    let img = j / pix_n;
    let pix = j % pix_n;
    let col = FwdCol(
        j < n_cols,
        img * p.in_c * p.in_h * p.in_w,
        i32(pix / p.out_w * STRIDE) - i32(p.pad),
        i32(pix % p.out_w * STRIDE) - i32(p.pad),
    );
    let k_tiles = (p.in_c * KK + BK - 1u) / BK;
    let tm = li / WG_N;
    let tn = li % WG_N;

    zero_acc();
    fwd_load(li, 0u, m0, col);
    for (var kt = 0u; kt < k_tiles; kt++) {
        // With DB, tile kt + 1 goes to the other buffer (the header says why one barrier is enough).
        let buf = select(0u, kt & 1u, DB);
        store_a_kmajor(buf, li);
        store_b_nmajor(buf, li);
        workgroupBarrier();
        if (kt + 1u < k_tiles) {
            fwd_load(li, kt + 1u, m0, col);
        }
        mma(buf, tm, tn);
        if (!DB) {
            workgroupBarrier();
        }
    }

    // j0 is a multiple of 4; with planes of a multiple of 4 pixels its 4 columns are 4
    // consecutive, 16-byte aligned pixels of one image: one vec4 store per row.
    let j0 = n0 + tn * 4u;
    if (pix_n % 4u == 0u && j0 + 3u < n_cols) {
        let base = (j0 / pix_n) * p.out_c * pix_n + j0 % pix_n;
        for (var r = 0u; r < TM; r++) {
            let o = m0 + tm * TM + r;
            if (o < p.out_c) {
                dst[(base + o * pix_n) >> 2u] = acc[r];
            }
        }
        return;
    }
    for (var c4 = 0u; c4 < 4u; c4++) {
        let jo = j0 + c4;
        if (jo < n_cols) {
            let base = (jo / pix_n) * p.out_c * pix_n + jo % pix_n;
            for (var r = 0u; r < TM; r++) {
                let o = m0 + tm * TM + r;
                if (o < p.out_c) {
                    st(base + o * pix_n, acc[r][c4]);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// backward_data, one stride phase (ph, pw) per workgroup_id.z / tiles_m:
// dx[n][c][h][w] = sum_{o, i, jw} w[o][c][kh0 + S*i][kw0 + S*jw] * dy[n][o][qh + h/S - i][qw + w/S - jw]
// A[c][k] = w (k = tap * O + o, out-channels inner), B[k][j] = dy, j = n * Hp*Wp + (h/S) * Wp + w/S.

struct BwdCol {
    ok: bool,
    base: u32, // offset of image n in dy
    oh0: i32,  // qh + h / S: the dy row of tap row i = 0
    ow0: i32,
}

struct Taps {
    kh0: u32,
    kw0: u32,
    kwp: u32,     // taps per row in this phase
    o_tiles: u32, // K tiles per tap
}

fn bwd_data_load(li: u32, kt: u32, m0: u32, col: BwdCol, t: Taps) {
    let tap = kt / t.o_tiles;
    let o0 = (kt % t.o_tiles) * BK;
    let ti = tap / t.kwp;
    let tj = tap % t.kwp;
    let w_tap = (t.kh0 + STRIDE * ti) * KS + t.kw0 + STRIDE * tj;
    let c = m0 + li % BM;
    for (var i = 0u; i < A_PER; i++) {
        let kk = li / BM + i * (WG / BM);
        let o = o0 + kk;
        var v = 0.0;
        if (kk < BK && o < p.out_c && c < p.in_c) {
            v = in1[(o * p.in_c + c) * KK + w_tap];
        }
        ra[i] = v;
    }
    let oh = col.oh0 - i32(ti);
    let ow = col.ow0 - i32(tj);
    let ok = col.ok && oh >= 0 && oh < i32(p.out_h) && ow >= 0 && ow < i32(p.out_w);
    let pix_n = p.out_h * p.out_w;
    let off = col.base + u32(oh) * p.out_w + u32(ow);
    for (var i = 0u; i < B_PER; i++) {
        let o = o0 + li / BN + i * (WG / BN);
        var v = 0.0;
        if (ok && o < p.out_c) {
            v = in0[off + o * pix_n];
        }
        rb[i] = v;
    }
}

@compute @workgroup_size(WG)
fn backward_data(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let s = STRIDE;
    let tile_m = wg.z % p.tiles_m;
    let phase = wg.z / p.tiles_m;
    let ph = phase / s;
    let pw = phase % s;
    // Input rows/columns of this phase: h = ph + S * hi for hi < hp.
    let hp = select(0u, (p.in_h - ph + s - 1u) / s, p.in_h > ph);
    let wp = select(0u, (p.in_w - pw + s - 1u) / s, p.in_w > pw);
    let n_cols = p.batch * hp * wp;
    let n0 = (wg.x + wg.y * nwg.x) * BN;
    if (n0 >= n_cols) {
        return;
    }
    // Taps that reach this phase: kh = kh0 + S * i for i < khp.
    let kh0 = (ph + p.pad) % s;
    let kw0 = (pw + p.pad) % s;
    let khp = select(0u, (KS - kh0 + s - 1u) / s, KS > kh0);
    let kwp = select(0u, (KS - kw0 + s - 1u) / s, KS > kw0);
    let taps = Taps(kh0, kw0, kwp, (p.out_c + BK - 1u) / BK);
    let k_tiles = khp * kwp * taps.o_tiles;

    let m0 = tile_m * BM;
    let j = n0 + li % BN;
    let r = j % (hp * wp);
    let col = BwdCol(
        j < n_cols,
        (j / (hp * wp)) * p.out_c * p.out_h * p.out_w,
        i32((ph + p.pad) / s + r / wp),
        i32((pw + p.pad) / s + r % wp),
    );
    let tm = li / WG_N;
    let tn = li % WG_N;

    zero_acc();
    if (k_tiles > 0u) {
        bwd_data_load(li, 0u, m0, col, taps);
    }
    for (var kt = 0u; kt < k_tiles; kt++) {
        // With DB, tile kt + 1 goes to the other buffer (the header says why one barrier is enough).
        let buf = select(0u, kt & 1u, DB);
        store_a_mmajor(buf, li);
        store_b_nmajor(buf, li);
        workgroupBarrier();
        if (kt + 1u < k_tiles) {
            bwd_data_load(li, kt + 1u, m0, col, taps);
        }
        mma(buf, tm, tn);
        if (!DB) {
            workgroupBarrier();
        }
    }

    // A phase no tap reaches (e.g. 1x1 kernel, stride 2) writes its zeros here too.
    let plane = p.in_h * p.in_w;
    // Stride 1: columns are the pixels of dx themselves (one phase), so as in forward a row
    // of the block is one aligned vec4 when planes hold a multiple of 4 pixels.
    let j0 = n0 + tn * 4u;
    if (s == 1u && plane % 4u == 0u && j0 + 3u < n_cols) {
        let base = (j0 / plane) * p.in_c * plane + j0 % plane;
        for (var rr = 0u; rr < TM; rr++) {
            let c = m0 + tm * TM + rr;
            if (c < p.in_c) {
                let i4 = (base + c * plane) >> 2u;
                if (ACC) {
                    dst[i4] += acc[rr];
                } else {
                    dst[i4] = acc[rr];
                }
            }
        }
        return;
    }
    for (var c4 = 0u; c4 < 4u; c4++) {
        let jo = j0 + c4;
        if (jo < n_cols) {
            let ro = jo % (hp * wp);
            let h = ph + s * (ro / wp);
            let w = pw + s * (ro % wp);
            let base = (jo / (hp * wp)) * p.in_c * plane + h * p.in_w + w;
            for (var rr = 0u; rr < TM; rr++) {
                let c = m0 + tm * TM + rr;
                if (c < p.in_c) {
                    if (ACC) {
                        st_add(base + c * plane, acc[rr][c4]);
                    } else {
                        st(base + c * plane, acc[rr][c4]);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// backward_filter, one K range (split) per workgroup_id.z / tiles_m:
// dw[o][c][kh][kw] = sum_{n, oh, ow} dy[n][o][oh][ow] * x[n][c][oh*S - pad + kh][ow*S - pad + kw]
// A[o][k] = dy (k = n * OH*OW + pixel), B[k][j] = im2col(x)^T, j = c * KK + kh * KS + kw.
// Both operands are contiguous along k, so both are loaded k-major.
//
// An invocation's k (= kt * BK + li % BK) only ever advances by BK, so its (image, output row,
// output column) is kept in private variables and stepped by BK, instead of recovered by two
// runtime divisions (by OH*OW and OW) per element of every K tile.

var<private> bf_img: u32;
var<private> bf_oh: u32;
var<private> bf_ow: u32;

fn bwd_filter_seek(k: u32) {
    let pix_n = p.out_h * p.out_w;
    bf_img = k / pix_n;
    bf_oh = (k % pix_n) / p.out_w;
    bf_ow = k % p.out_w;
}

fn bwd_filter_step() {
    bf_ow += BK;
    // One pass for rows of at least BK pixels; tiny outputs (e.g. 1x1) take a few.
    while (bf_ow >= p.out_w) {
        bf_ow -= p.out_w;
        bf_oh += 1u;
        if (bf_oh == p.out_h) {
            bf_oh = 0u;
            bf_img += 1u;
        }
    }
}

// Loads the K tile at the invocation's current position, then steps it to the next tile.
fn bwd_filter_load(li: u32, m0: u32, n0: u32) {
    let pix_n = p.out_h * p.out_w;
    let kok = bf_img < p.batch;
    let img = bf_img;
    let pix = bf_oh * p.out_w + bf_ow;
    for (var i = 0u; i < A_PER; i++) {
        let m = li / BK + i * (WG / BK);
        let o = m0 + m;
        var v = 0.0;
        if (m < BM && kok && o < p.out_c) {
            v = in1[(img * p.out_c + o) * pix_n + pix];
        }
        ra[i] = v;
    }
    let ih0 = i32(bf_oh * STRIDE) - i32(p.pad);
    let iw0 = i32(bf_ow * STRIDE) - i32(p.pad);
    let n_dim = p.in_c * KK;
    let x_base = img * p.in_c * p.in_h * p.in_w;
    for (var i = 0u; i < B_PER; i++) {
        let j = n0 + li / BK + i * (WG / BK);
        let c = j / KK;
        let tap = j % KK;
        let ih = ih0 + i32(tap / KS);
        let iw = iw0 + i32(tap % KS);
        var v = 0.0;
        if (kok && j < n_dim && ih >= 0 && ih < i32(p.in_h) && iw >= 0 && iw < i32(p.in_w)) {
            v = in0[x_base + (c * p.in_h + u32(ih)) * p.in_w + u32(iw)];
        }
        rb[i] = v;
    }
    bwd_filter_step();
}

@compute @workgroup_size(WG)
fn backward_filter(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let n_dim = p.in_c * KK;
    let n0 = (wg.x + wg.y * nwg.x) * BN;
    if (n0 >= n_dim) {
        return;
    }
    let tile_m = wg.z % p.tiles_m;
    let split = wg.z / p.tiles_m;
    let k_tiles = (p.batch * p.out_h * p.out_w + BK - 1u) / BK;
    let kt0 = split * p.chunk_tiles;
    let kt1 = min(kt0 + p.chunk_tiles, k_tiles);
    let m0 = tile_m * BM;
    let tm = li / WG_N;
    let tn = li % WG_N;

    zero_acc();
    if (kt0 < kt1) {
        bwd_filter_seek(kt0 * BK + li % BK);
        bwd_filter_load(li, m0, n0);
    }
    for (var kt = kt0; kt < kt1; kt++) {
        // With DB, tile kt + 1 goes to the other buffer (the header says why one barrier is enough).
        let buf = select(0u, kt & 1u, DB);
        store_a_kmajor(buf, li);
        store_b_kmajor(buf, li);
        workgroupBarrier();
        if (kt + 1u < kt1) {
            bwd_filter_load(li, m0, n0);
        }
        mma(buf, tm, tn);
        if (!DB) {
            workgroupBarrier();
        }
    }

    // Slice `split` of the partial sums; with one split that is dw itself.
    let base = split * p.out_c * n_dim;
    let j0 = n0 + tn * 4u;
    // Rows of dw (C*K*K, e.g. 144 or 576) are contiguous: vec4 stores when 16-byte aligned.
    let vec = n_dim % 4u == 0u && j0 + 3u < n_dim;
    for (var r = 0u; r < TM; r++) {
        let o = m0 + tm * TM + r;
        if (vec && o < p.out_c) {
            dst[(base + o * n_dim + j0) >> 2u] = acc[r];
            continue;
        }
        for (var c4 = 0u; c4 < 4u; c4++) {
            let j = j0 + c4;
            if (o < p.out_c && j < n_dim) {
                st(base + o * n_dim + j, acc[r][c4]);
            }
        }
    }
}

// dst[i] = sum over s < splits of in0[s * n_out + i]. Workgroup: 32 consecutive outputs x 8
// invocations per output; invocation row r sums slices r, r + 8, ... (each row of 32 reads
// consecutive addresses), then three tree steps in workgroup memory add the 8 row sums.
const RED_COLS: u32 = 32u;
const RED_ROWS: u32 = 8u;
var<workgroup> red: array<f32, 256>;

@compute @workgroup_size(256)
fn reduce_splits(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let col = li % RED_COLS;
    let row = li / RED_COLS;
    let i = (wg.x + wg.y * nwg.x) * RED_COLS + col;
    var s = 0.0;
    if (i < p.n_out) {
        for (var k = row; k < p.splits; k += RED_ROWS) {
            s += in0[k * p.n_out + i];
        }
    }
    red[li] = s;
    workgroupBarrier();
    for (var h = RED_ROWS / 2u; h > 0u; h /= 2u) {
        if (row < h) {
            red[li] += red[li + h * RED_COLS];
        }
        workgroupBarrier();
    }
    if (row == 0u && i < p.n_out) {
        st(i, red[li]);
    }
}
