//! `shaders/batch_norm.wgsl` against a batch norm built from candle-core ops, with candle's
//! autograd for the gradients.
//!
//! The reference runs in f64 on the same f32 inputs, so it is the exact answer to far below
//! f32 round-off, and each tolerance is the round-off of the GPU's f32 computation alone:
//! [`ErrorModel`] replays the shader's arithmetic in f64, in the shader's order (4 interleaved
//! sums per invocation, 8 groups of 8 invocations, chunk statistics merged in the same
//! sequence), and propagates every rounding to first order. Each rounding contributes `delta * s`
//! with `|delta| <= u` (u = 2^-24, the unit roundoff; 2.5 ulp = 5 u for divisions and square
//! roots, the WGSL accuracy); `E::e2` is the sum of `s^2` over the roundings that reach a
//! result, and the tolerance is `LAMBDA * u * sqrt(e2)`. For a chain of at most LAMBDA^2 = 36
//! roundings that is at least the worst case (Cauchy-Schwarz: sum |s| <= sqrt(n) sqrt(sum s^2)),
//! so every per-element bound is rigorous; for the long channel sums it is the probabilistic
//! bound of Higham and Mary (SIAM J. Sci. Comput. 2019): independent mean-zero roundings
//! exceed it with probability at most 2 exp(-LAMBDA^2 / 2) = 3e-8 (Hoeffding). Errors shared
//! by a whole channel (its mean and invstd) are added to per-element bounds as standard
//! deviations, not in quadrature. Set `BN_REPORT=1` to print, for each quantity, the worst
//! error as a fraction of its tolerance.
//!
//! The fused kernels are checked in the same cases: the forward epilogues (ReLU; residual add,
//! identity or option-A, then ReLU) against candle's `relu(bn(x) [+ shortcut])` with the
//! batch norm's tolerance plus one rounding of the add (ReLU adds no error); the backward with
//! the ReLU mask folded in against candle's batch-norm gradients of the masked gradient, the
//! mask taken from the GPU's own ReLU output (a value within round-off of 0 may take the other
//! sign in f64, which would flip a whole gradient element), with the same error model; the
//! shortcut gradients against candle's autograd of the shortcut, exactly (they only move
//! values).

mod common;

use candle_core::{DType, Tensor as CTensor, Var};
use common::reference::shortcut_a;
use common::*;
use featreplay::kernels::batch_norm::{self as bn, Epilogue, Residual, ShortcutGrad};
use featreplay::kernels::shortcut::ChannelPad;
use featreplay::Tensor;

/// Unit roundoff of f32 (half an ulp at 1).
const UR: f64 = f32::EPSILON as f64 / 2.0;
/// Weight of a division or square-root rounding (WGSL allows 2.5 ulp).
const DIV: f64 = 5.0;
/// Multiplier of the error bounds (see the module comment).
const LAMBDA: f64 = 6.0;
const MOMENTUM: f32 = bn::DEFAULT_MOMENTUM;
const EPS: f32 = bn::DEFAULT_EPS;
/// Workgroup width and fan-in of the shader's reductions.
const WG: usize = bn::WG;
const FAN: usize = 8;

/// Shapes [N, C, H, W]: batch 1, 3, 8, 16 and 128; channels 2, 3, 5, 17, 64; spatial 7x7, 8x8,
/// 5x13, 28x28, 32x32 and 64x64. Runs ([`bn::run_length`]): 49 for 7x7, 64 for 8x8, 32x32 and
/// 64x64, 56 for 28x28, and 33 for 5x13 (a plane of 65 is one run of 33 and a short one of 32,
/// padded). [128, 16, 32, 32] has 131072 values per channel (32 chunks per channel);
/// [257, 2, 64, 64] has 1052672 (257 chunks, more than one per invocation in the merge).
const SHAPES: &[[usize; 4]] = &[
    [1, 3, 7, 7],
    [3, 5, 5, 13],
    [5, 3, 28, 28],
    [3, 5, 8, 8],
    [3, 17, 7, 7],
    [8, 64, 8, 8],
    [16, 3, 32, 32],
    [1, 17, 32, 32],
    [3, 64, 32, 32],
    [128, 16, 32, 32],
    [257, 2, 64, 64],
];

/// Random NCHW input; channel 1 is shifted by 100 (a large mean over a unit-scale spread, the
/// case where `E[x^2] - E[x]^2` in f32 loses all digits) and channel 2 is `0.01 x + 3`
/// (variance near eps).
fn input(shape: [usize; 4], seed: u64) -> Vec<f32> {
    let mut x = random(shape.iter().product(), seed);
    let hw = shape[2] * shape[3];
    for (i, v) in x.iter_mut().enumerate() {
        match (i / hw) % shape[1] {
            1 => *v += 100.0,
            2 => *v = 0.01 * *v + 3.0,
            _ => {}
        }
    }
    x
}

fn f64t(data: &[f32], shape: &[usize]) -> CTensor {
    ct(data, shape).to_dtype(DType::F64).unwrap()
}

fn v64(t: &CTensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// The f64 reference of one training step.
struct Reference {
    y: Vec<f64>,
    mean: Vec<f64>,
    /// Biased batch variance.
    var: Vec<f64>,
    dx: Vec<f64>,
    dgamma: Vec<f64>,
    dbeta: Vec<f64>,
}

/// BatchNorm2d in training mode from candle ops; gradients of `sum(y * dy)` by autograd.
fn reference(x: &[f32], shape: [usize; 4], gamma: &[f32], beta: &[f32], dy: &[f32]) -> Reference {
    let c = shape[1];
    let xv = Var::from_tensor(&f64t(x, &shape)).unwrap();
    let gv = Var::from_tensor(&f64t(gamma, &[1, c, 1, 1])).unwrap();
    let bv = Var::from_tensor(&f64t(beta, &[1, c, 1, 1])).unwrap();
    let mean = xv.mean_keepdim((0, 2, 3)).unwrap();
    let xc = xv.broadcast_sub(&mean).unwrap();
    let var = xc.sqr().unwrap().mean_keepdim((0, 2, 3)).unwrap();
    let invstd = (&var + EPS as f64).unwrap().sqrt().unwrap().recip().unwrap();
    let xhat = xc.broadcast_mul(&invstd).unwrap();
    let y = xhat.broadcast_mul(gv.as_tensor()).unwrap().broadcast_add(bv.as_tensor()).unwrap();
    let grads = (&y * f64t(dy, &shape)).unwrap().sum_all().unwrap().backward().unwrap();
    Reference {
        y: v64(&y),
        mean: v64(&mean),
        var: v64(&var),
        dx: v64(grads.get(xv.as_tensor()).unwrap()),
        dgamma: v64(grads.get(gv.as_tensor()).unwrap()),
        dbeta: v64(grads.get(bv.as_tensor()).unwrap()),
    }
}

/// Evaluation-mode batch norm from candle ops, in f64.
fn reference_eval(x: &[f32], shape: [usize; 4], gamma: &[f32], beta: &[f32], rm: &[f32], rv: &[f32]) -> Vec<f64> {
    let cs = [1, shape[1], 1, 1];
    let std = (f64t(rv, &cs) + EPS as f64).unwrap().sqrt().unwrap();
    let y = f64t(x, &shape)
        .broadcast_sub(&f64t(rm, &cs))
        .unwrap()
        .broadcast_div(&std)
        .unwrap()
        .broadcast_mul(&f64t(gamma, &cs))
        .unwrap()
        .broadcast_add(&f64t(beta, &cs))
        .unwrap();
    v64(&y)
}

/// Values of channel `c` of an NCHW tensor, in the shader's order j = n * H * W + s.
fn channel<T: Copy>(v: &[T], shape: [usize; 4], c: usize) -> Vec<T> {
    let hw = shape[2] * shape[3];
    (0..shape[0]).flat_map(|n| v[(n * shape[1] + c) * hw..][..hw].iter().copied()).collect()
}

fn sq(v: f64) -> f64 {
    v * v
}

/// A value and the sum of squares `e2` of the rounding terms `s` that reach it (see the module
/// comment): its error bound is `LAMBDA * UR * sqrt(e2)`.
#[derive(Clone, Copy, Default)]
struct E {
    v: f64,
    e2: f64,
}

impl E {
    /// The error bound's standard-deviation-like part, `sqrt(e2)`, in units of u.
    fn sd(&self) -> f64 {
        self.e2.sqrt()
    }
}

/// a += b, one rounding of the result (adding to an empty slot is exact).
fn add_into(a: &mut E, b: E, a_empty: bool) {
    a.v += b.v;
    a.e2 += b.e2 + if a_empty { 0.0 } else { sq(a.v) };
}

/// Serial sum, starting from the first element.
fn serial(items: &[E]) -> E {
    let mut s = items[0];
    for &b in &items[1..] {
        add_into(&mut s, b, false);
    }
    s
}

/// The shader's workgroup sum of the WG slots: FAN groups of FAN summed serially, then the
/// group sums serially.
fn fan_in(slots: &[E]) -> E {
    let groups: Vec<E> = slots.chunks(FAN).map(serial).collect();
    serial(&groups)
}

/// The shader's work layout of one channel: for each chunk, for each of its WG invocations, the
/// indices j of its run's values in the order it takes them (empty past the channel's last run;
/// the shader's padding adds exact zeros and is left out).
type Layout = Vec<Vec<Vec<usize>>>;

/// The [`Layout`] of a channel of image planes of `hw` values, `m` values in all (order j).
fn layout(hw: usize, m: usize) -> Layout {
    let run = bn::run_length(hw);
    let rpp = hw.div_ceil(run);
    let nruns = m / hw * rpp;
    (0..nruns.div_ceil(WG))
        .map(|k| {
            (0..WG)
                .map(|i| {
                    let r = k * WG + i;
                    if r >= nruns {
                        return Vec::new();
                    }
                    let (n, s) = (r / rpp, r % rpp * run);
                    (n * hw + s..n * hw + (s + run).min(hw)).collect()
                })
                .collect()
        })
        .collect()
}

/// Per-chunk sums of `terms` (each with its own rounding terms `term_e2`) in the shader's order
/// (`lay`): each invocation adds its run's values t into 4 interleaved sums (t % 4), combined
/// as (s0 + s1) + (s2 + s3), then [`fan_in`].
fn chunk_sums(lay: &Layout, terms: &[f64], term_e2: &[f64]) -> Vec<E> {
    lay.iter().map(|lanes| lane_sums(lanes, |j| E { v: terms[j], e2: term_e2[j] })).collect()
}

/// One chunk of [`chunk_sums`]: `lanes` as [`layout`] gives them, `term(j)` the value j with
/// its rounding terms.
fn lane_sums(lanes: &[Vec<usize>], term: impl Fn(usize) -> E) -> E {
    let slots: Vec<E> = lanes
        .iter()
        .map(|run| {
            let mut acc = [E::default(); 4];
            for (k, &j) in run.iter().enumerate() {
                add_into(&mut acc[k % 4], term(j), k < 4);
            }
            let (mut lo, mut hi) = (acc[0], acc[2]);
            add_into(&mut lo, acc[1], false);
            add_into(&mut hi, acc[3], false);
            add_into(&mut lo, hi, false);
            lo
        })
        .collect();
    fan_in(&slots)
}

/// The dx kernel's sum of the chunk sums: invocation i adds chunks i, i + WG, ... serially,
/// then [`fan_in`].
fn cross_sum(parts: &[E]) -> E {
    let mut slots = vec![E::default(); WG];
    for (i, &p) in parts.iter().enumerate() {
        add_into(&mut slots[i % WG], p, i < WG);
    }
    fan_in(&slots)
}

/// Chunk statistics (count, mean, M2) with their errors.
#[derive(Clone, Copy, Default)]
struct Moments {
    n: f64,
    mean: E,
    m2: E,
}

/// Chan et al.'s merge as the shader computes it: d = mb - ma, f = nb / n, mean = ma + d * f,
/// M2 = (qa + qb) + d * d * na * f. An empty side is exact.
fn chan(a: Moments, b: Moments) -> Moments {
    if a.n == 0.0 {
        return b;
    }
    if b.n == 0.0 {
        return a;
    }
    let n = a.n + b.n;
    let f = b.n / n;
    let d = b.mean.v - a.mean.v;
    let df = d * f;
    let mean = a.mean.v + df;
    // mean = (1 - f) ma + f mb; roundings of d, f (a division), d * f and the sum.
    let mean_e2 = sq(1.0 - f) * a.mean.e2 + sq(f) * b.mean.e2 + sq(df) * (2.0 + sq(DIV)) + sq(mean);
    let t = d * d * a.n * f;
    let q = a.m2.v + b.m2.v;
    // t: roundings of d * d, * na, * f and f itself; d's error reaches t as 2 d na f per unit.
    let m2_e2 = a.m2.e2
        + b.m2.e2
        + sq(2.0 * d * a.n * f) * (a.mean.e2 + b.mean.e2 + sq(d))
        + sq(t) * (3.0 + sq(DIV))
        + sq(q)
        + sq(q + t);
    Moments { n, mean: E { v: mean, e2: mean_e2 }, m2: E { v: q + t, e2: m2_e2 } }
}

/// The normalize kernel's merge of the chunk moments: invocation i merges chunks i, i + WG, ...
/// serially into an empty start, then FAN groups of FAN slots serially, then the groups.
fn cross_merge(parts: &[Moments]) -> Moments {
    let mut slots = vec![Moments::default(); WG];
    for (i, &p) in parts.iter().enumerate() {
        slots[i % WG] = chan(slots[i % WG], p);
    }
    let serial_merge = |items: &[Moments]| items[1..].iter().fold(items[0], |a, &b| chan(a, b));
    let groups: Vec<Moments> = slots.chunks(FAN).map(serial_merge).collect();
    serial_merge(&groups)
}

/// The training-mode statistics of one channel with their errors, replayed in the shader's
/// order from the channel's values `x` (order j).
struct ErrorModel {
    /// The shift x0 = x[0] and the exact mean.
    x0: f64,
    mean: f64,
    /// Shifted mean mean_v, M2 and invstd = 1 / sqrt(M2 / M + eps).
    mean_v: E,
    m2: E,
    invstd: E,
}

impl ErrorModel {
    /// From a channel's values `x` in order j, taken by the shader in the layout `lay`.
    fn new(x: &[f64], lay: &Layout) -> ErrorModel {
        let m = x.len() as f64;
        let x0 = x[0];
        // v = x - x0 rounds once.
        let v: Vec<f64> = x.iter().map(|&x| x - x0).collect();
        let v_e2: Vec<f64> = v.iter().map(|&v| sq(v)).collect();
        let sums = chunk_sums(lay, &v, &v_e2);
        let chunks: Vec<Moments> = lay
            .iter()
            .zip(&sums)
            .map(|(lanes, s)| {
                let n = lanes.iter().map(Vec::len).sum::<usize>() as f64;
                let mu = s.v / n;
                let mean = E { v: mu, e2: s.e2 / sq(n) + sq(DIV * mu) };
                // q = (v - mean)^2: the rounding of v - mean (2 q), of the square (q), and of
                // v itself (2 (v - mean) v); the mean's own error cancels to first order
                // through the correction - C^2 / n.
                let qs = lane_sums(lanes, |j| {
                    let q = sq(v[j] - mu);
                    E { v: q, e2: sq(2.0 * q) + sq(q) + sq(2.0 * (v[j] - mu) * v[j]) }
                });
                // M2 = Q - C^2 / n, C ~ 0: one rounding of the result.
                Moments { n, mean, m2: E { v: qs.v, e2: qs.e2 + sq(qs.v) } }
            })
            .collect();
        let all = cross_merge(&chunks);
        let var = all.m2.v / m;
        let var_e = E { v: var, e2: all.m2.e2 / sq(m) + sq(DIV * var) };
        // invstd = 1 / sqrt(var + eps): the add, then sqrt and division (5 u each).
        let s = var + EPS as f64;
        let inv = 1.0 / s.sqrt();
        let inv_e2 = sq(inv) * ((var_e.e2 + sq(s)) / sq(2.0 * s) + 2.0 * sq(DIV));
        ErrorModel { x0, mean: x0 + all.mean.v, mean_v: all.mean, m2: all.m2, invstd: E { v: inv, e2: inv_e2 } }
    }

    /// invstd's relative error part (in units of u).
    fn invstd_rel(&self) -> f64 {
        self.invstd.sd() / self.invstd.v
    }

    /// x_hat = ((x - x0) - mean_v) * invstd of one value: (its value, the root-sum-square of
    /// its own roundings, the sum of the channel-wide error parts), errors in units of u.
    fn xhat(&self, x: f64) -> (f64, f64, f64) {
        let dev = x - self.x0 - self.mean_v.v;
        let xh = dev * self.invstd.v;
        let own = (sq(self.invstd.v) * (sq(x - self.x0) + sq(dev)) + sq(xh)).sqrt();
        let shared = self.invstd.v * self.mean_v.sd() + xh.abs() * self.invstd_rel();
        (xh, own, shared)
    }
}

/// Asserts `|got - want| <= tol` elementwise and reports the worst element.
fn check(what: &str, got: &[f32], want: &[f64], tol: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let (mut worst, mut at) = (0.0f64, 0);
    for (i, ((&g, &w), &t)) in got.iter().zip(want).zip(tol).enumerate() {
        assert!(g.is_finite(), "{what}: non-finite value {g} at {i}");
        // An exact result meets even a zero tolerance (a channel whose ReLU mask is all 0 has
        // exact zero sums); NaN errors count as the worst.
        let err = (g as f64 - w).abs();
        let r = if err == 0.0 { 0.0 } else { err / t };
        if r.is_nan() || r > worst {
            (worst, at) = (r, i);
        }
    }
    if std::env::var_os("BN_REPORT").is_some() {
        eprintln!("{what}: worst error {worst:.3} of the tolerance");
    }
    assert!(
        worst <= 1.0,
        "{what}: element {at} is {} but the reference is {} (|err| {:e} > tolerance {:e})",
        got[at],
        want[at],
        (got[at] as f64 - want[at]).abs(),
        tol[at]
    );
}

/// `LAMBDA * u * sd` for a value whose error parts add up to `sd` (in units of u).
fn bound(sd: f64) -> f64 {
    LAMBDA * UR * sd
}

fn run_case(shape: [usize; 4], seed: u64) {
    let [_, c, h, w] = shape;
    let hw = h * w;
    let numel: usize = shape.iter().product();
    let name = format!("{shape:?}");
    let x1 = input(shape, seed);
    let x2 = input(shape, seed + 1);
    let gamma: Vec<f32> = random(c, seed + 2).iter().map(|v| 1.0 + 0.5 * v).collect();
    let beta = random(c, seed + 3);
    let rm0: Vec<f32> = random(c, seed + 4).iter().map(|v| 0.1 * v).collect();
    let rv0: Vec<f32> = random(c, seed + 5).iter().map(|v| 1.0 + 0.5 * v).collect();
    let dy = random(numel, seed + 6);

    let g = gpu();
    let t = |d: &[f32], s: &[usize]| -> Tensor { g.tensor(s, d).unwrap() };
    let (gx1, gx2, ggamma, gbeta) = (t(&x1, &shape), t(&x2, &shape), t(&gamma, &[c]), t(&beta, &[c]));
    let (grm, grv, gdy) = (t(&rm0, &[c]), t(&rv0, &[c]), t(&dy, &shape));

    let f1 = bn::forward_train(&gx1, &ggamma, &gbeta, &grm, &grv, MOMENTUM, EPS).unwrap();
    let (gdx, gdgamma, gdbeta) = bn::backward(&gx1, &gdy, &ggamma, &f1.saved).unwrap();
    let y1 = f1.y.to_vec().unwrap();
    let stats = f1.saved.stats.to_vec().unwrap();
    let (rm1, rv1) = (grm.to_vec().unwrap(), grv.to_vec().unwrap());
    let (dx, dgamma, dbeta) = (gdx.to_vec().unwrap(), gdgamma.to_vec().unwrap(), gdbeta.to_vec().unwrap());

    // The fused forwards on x1, with momentum 0 so the running statistics stay those of one
    // update: ReLU, identity residual + ReLU, option-A residual + ReLU. The option-A block input
    // has 2 fewer channels (1 zero channel each side) where C >= 3, and 2H - (H odd) rows, so
    // the stride-2 subsample has H rows (odd H: the last input row is sampled, no row after it).
    let res_id = random(numel, seed + 7);
    let in_shape = [shape[0], if c >= 3 { c - 2 } else { c }, 2 * shape[2] - shape[2] % 2, 2 * shape[3] - shape[3] % 2];
    let res_a = random(in_shape.iter().product(), seed + 8);
    let (gres_id, gres_a) = (t(&res_id, &shape), t(&res_a, &in_shape));
    let fused = |epi: Epilogue| bn::forward_train_fused(&gx1, &ggamma, &gbeta, &grm, &grv, 0.0, EPS, epi).unwrap();
    let f_relu = fused(Epilogue::RELU);
    let f_id = fused(Epilogue::add_relu(Residual::Identity(&gres_id)));
    let f_a = fused(Epilogue::add_relu(Residual::OptionA { x: &gres_a, stride: 2, pad: ChannelPad::Both }));
    for (what, f) in [("relu", &f_relu), ("identity residual", &f_id), ("option-A residual", &f_a)] {
        // The same statistics kernel: bit-for-bit the plain forward's.
        assert_eq!(f.saved.stats.to_vec().unwrap(), stats, "saved statistics of the fused forward ({what}), {name}");
    }
    assert_eq!(grm.to_vec().unwrap(), rm1, "momentum 0 keeps the running mean, {name}");
    assert_eq!(grv.to_vec().unwrap(), rv1, "momentum 0 keeps the running var, {name}");
    let (y_relu, y_id, y_a) = (f_relu.y.to_vec().unwrap(), f_id.y.to_vec().unwrap(), f_a.y.to_vec().unwrap());
    // The fused backwards, each masked by its forward's output; two also write the shortcut
    // gradient.
    let b_relu = bn::backward_fused(&gx1, &gdy, &ggamma, &f1.saved, Some(&f_relu.y), None).unwrap();
    assert!(b_relu.dshortcut.is_none());
    let b_id = bn::backward_fused(&gx1, &gdy, &ggamma, &f1.saved, Some(&f_id.y), Some(ShortcutGrad::Identity)).unwrap();
    let b_a = bn::backward_fused(
        &gx1,
        &gdy,
        &ggamma,
        &f1.saved,
        Some(&f_a.y),
        Some(ShortcutGrad::OptionA { in_shape: &in_shape, stride: 2, pad: ChannelPad::Both }),
    )
    .unwrap();
    let host = |b: &bn::BnGrads| (b.dx.to_vec().unwrap(), b.dgamma.to_vec().unwrap(), b.dbeta.to_vec().unwrap());
    let fused_grads = [host(&b_relu), host(&b_id), host(&b_a)];
    let (ds_id, ds_a) = (b_id.dshortcut.unwrap().to_vec().unwrap(), b_a.dshortcut.unwrap().to_vec().unwrap());

    bn::forward_train(&gx2, &ggamma, &gbeta, &grm, &grv, MOMENTUM, EPS).unwrap();
    let (rm2, rv2) = (grm.to_vec().unwrap(), grv.to_vec().unwrap());
    let eval = bn::forward_eval(&gx1, &ggamma, &gbeta, &grm, &grv, EPS).unwrap().to_vec().unwrap();
    let eval_fused =
        |epi: Epilogue| bn::forward_eval_fused(&gx1, &ggamma, &gbeta, &grm, &grv, EPS, epi).unwrap().to_vec().unwrap();
    let eval_relu = eval_fused(Epilogue::RELU);
    let eval_a = eval_fused(Epilogue::add_relu(Residual::OptionA { x: &gres_a, stride: 2, pad: ChannelPad::Both }));

    let r1 = reference(&x1, shape, &gamma, &beta, &dy);
    // The residuals as candle computes them, and the masked gradients of the fused backwards.
    let short_a = cvec(&shortcut_a(&ct(&res_a, &in_shape), c, 2, ChannelPad::Both));
    let masked = |y: &[f32]| -> Vec<f32> { dy.iter().zip(y).map(|(&g, &y)| if y > 0.0 { g } else { 0.0 }).collect() };
    let dy_masked = [masked(&y_relu), masked(&y_id), masked(&y_a)];
    let r_fused: Vec<Reference> = dy_masked.iter().map(|d| reference(&x1, shape, &gamma, &beta, d)).collect();
    // Identity: the shortcut gradient is the masked gradient itself. Option A: candle's
    // autograd of the shortcut.
    assert_close(&format!("identity shortcut gradient, {name}"), &ds_id, &dy_masked[1], 0.0, 0.0);
    let xa = Var::from_tensor(&ct(&res_a, &in_shape)).unwrap();
    let ga_grads = (shortcut_a(xa.as_tensor(), c, 2, ChannelPad::Both) * ct(&dy_masked[2], &shape))
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_close(
        &format!("option-A shortcut gradient, {name}"),
        &ds_a,
        &cvec(ga_grads.get(xa.as_tensor()).unwrap()),
        0.0,
        0.0,
    );
    let r2 = reference(&x2, shape, &gamma, &beta, &dy);
    // Eval reference from the GPU's running statistics, so it checks the eval kernel alone.
    let want_eval = reference_eval(&x1, shape, &gamma, &beta, &rm2, &rv2);
    let m = (numel / c) as f64;
    // The shader's order over each channel (the same for every channel).
    let lay = layout(hw, numel / c);
    // The f32 momentum's exact value: the reference updates with the same number.
    let mom = MOMENTUM as f64;

    for ch in 0..c {
        let what = |q: &str| format!("{q}, {name}, channel {ch}");
        let xc1: Vec<f64> = channel(&x1, shape, ch).iter().map(|&v| v as f64).collect();
        let xc2: Vec<f64> = channel(&x2, shape, ch).iter().map(|&v| v as f64).collect();
        let (e1, e2) = (ErrorModel::new(&xc1, &lay), ErrorModel::new(&xc2, &lay));
        let ga = gamma[ch] as f64;

        // Saved statistics: the shift is x[0, c, 0, 0] exactly.
        assert_eq!(stats[ch] as f64, e1.x0, "saved shift, {name}, channel {ch}");
        check(&what("saved shifted mean"), &[stats[c + ch]], &[r1.mean[ch] - e1.x0], &[bound(e1.mean_v.sd())]);
        check(&what("saved invstd"), &[stats[2 * c + ch]], &[e1.invstd.v], &[bound(e1.invstd.sd())]);

        // Running statistics: r = (1 - mom) r + mom s, with s = x0 + mean_v (one more rounding)
        // or M2 / (M - 1) (a division); roundings of 1 - mom, both products and the sum.
        let update = |prev: E, stat: E| {
            let v = (1.0 - mom) * prev.v + mom * stat.v;
            let e2 =
                sq(1.0 - mom) * prev.e2 + sq(mom) * stat.e2 + 2.0 * sq((1.0 - mom) * prev.v) + sq(mom * stat.v) + sq(v);
            E { v, e2 }
        };
        let mean_stat = |e: &ErrorModel| E { v: e.mean, e2: e.mean_v.e2 + sq(e.mean) };
        let var_stat = |e: &ErrorModel| {
            let v = e.m2.v / (m - 1.0);
            E { v, e2: e.m2.e2 / sq(m - 1.0) + sq(DIV * v) }
        };
        let rm1_e = update(E { v: rm0[ch] as f64, e2: 0.0 }, mean_stat(&e1));
        let rv1_e = update(E { v: rv0[ch] as f64, e2: 0.0 }, var_stat(&e1));
        let rm2_e = update(rm1_e, mean_stat(&e2));
        let rv2_e = update(rv1_e, var_stat(&e2));
        // The reference values come from candle's statistics, the errors from the model.
        let unb = m / (m - 1.0);
        let want_rm1 = (1.0 - mom) * rm0[ch] as f64 + mom * r1.mean[ch];
        let want_rv1 = (1.0 - mom) * rv0[ch] as f64 + mom * r1.var[ch] * unb;
        let want_rm2 = (1.0 - mom) * want_rm1 + mom * r2.mean[ch];
        let want_rv2 = (1.0 - mom) * want_rv1 + mom * r2.var[ch] * unb;
        check(&what("running mean, 1 update"), &[rm1[ch]], &[want_rm1], &[bound(rm1_e.sd())]);
        check(&what("running var, 1 update"), &[rv1[ch]], &[want_rv1], &[bound(rv1_e.sd())]);
        check(&what("running mean, 2 updates"), &[rm2[ch]], &[want_rm2], &[bound(rm2_e.sd())]);
        check(&what("running var, 2 updates"), &[rv2[ch]], &[want_rv2], &[bound(rv2_e.sd())]);

        // y = ((x - x0) - mean_v) * (gamma * invstd) + beta: x_hat's errors times |gamma|, the
        // roundings of gamma * invstd and of the product on |gamma x_hat|, the add on |y|.
        let want_y = channel(&r1.y, shape, ch);
        let xh: Vec<(f64, f64, f64)> = xc1.iter().map(|&x| e1.xhat(x)).collect();
        let y_tol: Vec<f64> = xh
            .iter()
            .zip(&want_y)
            .map(|(&(v, own, shared), &y)| {
                // The x_hat product rounding is not in y's chain (y multiplies by gamma * invstd).
                let own_y = (sq(ga) * (sq(own) - sq(v)).max(0.0) + 2.0 * sq(ga * v) + sq(y)).sqrt();
                bound(own_y + ga.abs() * shared)
            })
            .collect();
        check(&what("y"), &channel(&y1, shape, ch), &want_y, &y_tol);
        // Fused epilogues: max(y + r, 0) adds one rounding of the sum; max is exact and
        // 1-Lipschitz, so y's tolerance carries over.
        let epilogue = |q: &str, got: &[f32], want_bn: &[f64], tol_bn: &[f64], r: Option<&[f32]>| {
            let r = r.map(|r| channel(r, shape, ch));
            let sum: Vec<f64> =
                want_bn.iter().enumerate().map(|(i, &y)| y + r.as_ref().map_or(0.0, |r| r[i] as f64)).collect();
            let want: Vec<f64> = sum.iter().map(|&v| v.max(0.0)).collect();
            let tol: Vec<f64> =
                tol_bn.iter().zip(&sum).map(|(&t, &v)| t + if r.is_some() { bound(v.abs()) } else { 0.0 }).collect();
            check(&what(q), &channel(got, shape, ch), &want, &tol);
        };
        epilogue("y, fused relu", &y_relu, &want_y, &y_tol, None);
        epilogue("y, fused identity residual + relu", &y_id, &want_y, &y_tol, Some(&res_id));
        epilogue("y, fused option-A residual + relu", &y_a, &want_y, &y_tol, Some(&short_a));

        let check_backward = |label: &str, dy_all: &[f32], r: &Reference, dx: &[f32], dgamma: &[f32], dbeta: &[f32]| {
            // dbeta = sum(dy), dgamma = sum(dy * x_hat) in the shader's order: per-chunk sums, then
            // the dx kernel's cross-chunk sum. dgamma's terms carry x_hat's own roundings and the
            // product's; the channel-wide x_hat errors enter through sum(dy) and dgamma itself.
            let dyc: Vec<f64> = channel(dy_all, shape, ch).iter().map(|&v| v as f64).collect();
            let dbeta_e = cross_sum(&chunk_sums(&lay, &dyc, &vec![0.0; dyc.len()]));
            let t: Vec<f64> = dyc.iter().zip(&xh).map(|(g, x)| g * x.0).collect();
            let t_e2: Vec<f64> = dyc.iter().zip(&xh).zip(&t).map(|((g, x), t)| sq(g * x.1) + sq(*t)).collect();
            let dgamma_sum = cross_sum(&chunk_sums(&lay, &t, &t_e2));
            let dgamma_sd =
                dgamma_sum.sd() + dbeta_e.v.abs() * e1.invstd.v * e1.mean_v.sd() + dgamma_sum.v.abs() * e1.invstd_rel();
            check(&what(&format!("dbeta{label}")), &[dbeta[ch]], &[r.dbeta[ch]], &[bound(dbeta_e.sd())]);
            check(&what(&format!("dgamma{label}")), &[dgamma[ch]], &[r.dgamma[ch]], &[bound(dgamma_sd)]);

            // dx = a * ((dy - b) - x_hat * d), a = gamma * invstd, b = dbeta / M, d = dgamma / M.
            let a = ga * e1.invstd.v;
            let (b, d) = (dbeta_e.v / m, dgamma_sum.v / m);
            let b_sd = (dbeta_e.e2 / sq(m) + sq(DIV * b)).sqrt();
            let d_sd = dgamma_sd / m + DIV * d.abs();
            let want_dx = channel(&r.dx, shape, ch);
            let dx_tol: Vec<f64> = dyc
                .iter()
                .zip(&xh)
                .zip(&want_dx)
                .map(|((&g, &(v, own, shared)), &dxv)| {
                    let inner = g - b - v * d;
                    let own_dx = (sq(a) * (sq(g - b) + sq(v * d) + sq(inner) + sq(d * own)) + sq(dxv)).sqrt();
                    let shared_dx =
                        a.abs() * (b_sd + v.abs() * d_sd + d.abs() * shared) + dxv.abs() * (e1.invstd_rel() + 1.0);
                    bound(own_dx + shared_dx)
                })
                .collect();
            check(&what(&format!("dx{label}")), &channel(dx, shape, ch), &want_dx, &dx_tol);
        };
        check_backward("", &dy, &r1, &dx, &dgamma, &dbeta);
        let fused = [", fused relu mask", ", fused identity residual mask", ", fused option-A residual mask"];
        for ((label, (fdx, fdgamma, fdbeta)), (d, r)) in
            fused.iter().zip(&fused_grads).zip(dy_masked.iter().zip(&r_fused))
        {
            check_backward(label, d, r, fdx, fdgamma, fdbeta);
        }

        // Eval: ((x - rm) - 0) * (gamma * rstd) + beta, rstd = 1 / sqrt(rv + eps): x - rm rounds
        // on |x - rm|; rv + eps (half its relative error reaches rstd), sqrt and division (5 u
        // each), gamma * rstd and the product on |gamma (x - rm) rstd|; the add on |y|.
        let rstd = 1.0 / (rv2[ch] as f64 + EPS as f64).sqrt();
        let want_e = channel(&want_eval, shape, ch);
        let eval_tol: Vec<f64> = xc1
            .iter()
            .zip(&want_e)
            .map(|(&x, &y)| {
                let p = ga * rstd * (x - rm2[ch] as f64);
                bound((sq(p) * (1.0 + 0.25 + 2.0 * sq(DIV) + 2.0) + sq(y)).sqrt())
            })
            .collect();
        check(&what("eval y"), &channel(&eval, shape, ch), &want_e, &eval_tol);
        epilogue("eval y, fused relu", &eval_relu, &want_e, &eval_tol, None);
        epilogue("eval y, fused option-A residual + relu", &eval_a, &want_e, &eval_tol, Some(&short_a));
    }
}

#[test]
fn train_forward_backward_and_eval_match_candle() {
    for (i, &shape) in SHAPES.iter().enumerate() {
        run_case(shape, 1000 * i as u64);
    }
}

/// Everything a fused training step produces, on the host: y, saved statistics, running
/// statistics, dx, dgamma, dbeta and the shortcut gradient.
fn fused_step(g: &featreplay::Gpu, shape: [usize; 4], seed: u64) -> Vec<Vec<f32>> {
    let c = shape[1];
    let numel: usize = shape.iter().product();
    let in_shape = [shape[0], c - 2, 2 * shape[2], 2 * shape[3]];
    let t = |d: &[f32], s: &[usize]| -> Tensor { g.tensor(s, d).unwrap() };
    let x = t(&input(shape, seed), &shape);
    let gamma = t(&random(c, seed + 1).iter().map(|v| 1.0 + 0.5 * v).collect::<Vec<_>>(), &[c]);
    let beta = t(&random(c, seed + 2), &[c]);
    let (rm, rv) = (t(&random(c, seed + 3), &[c]), t(&vec![1.0; c], &[c]));
    let block_in = t(&random(in_shape.iter().product(), seed + 4), &in_shape);
    let dy = t(&random(numel, seed + 5), &shape);
    let epi = Epilogue::add_relu(Residual::OptionA { x: &block_in, stride: 2, pad: ChannelPad::Both });
    let f = bn::forward_train_fused(&x, &gamma, &beta, &rm, &rv, MOMENTUM, EPS, epi).unwrap();
    let sg = Some(ShortcutGrad::OptionA { in_shape: &in_shape, stride: 2, pad: ChannelPad::Both });
    let b = bn::backward_fused(&x, &dy, &gamma, &f.saved, Some(&f.y), sg).unwrap();
    [&f.y, &f.saved.stats, &rm, &rv, &b.dx, &b.dgamma, &b.dbeta, b.dshortcut.as_ref().unwrap()]
        .iter()
        .map(|t| t.to_vec().unwrap())
        .collect()
}

#[test]
fn split_and_single_passes_agree_bitwise() {
    // A device of its own: forcing the passes must not change what the other tests run.
    let g = featreplay::Gpu::open_default().unwrap();
    // 1, 2 (the automatic threshold), 4 and 32 (the limit) chunks per channel; at 257 a
    // forced single pass must fall back to the split passes.
    for (i, shape) in
        [[3, 5, 7, 7], [128, 4, 8, 8], [16, 3, 32, 32], [128, 4, 32, 32], [257, 3, 64, 64]].into_iter().enumerate()
    {
        g.force_variant(bn::OP, Some("split"));
        let split = fused_step(&g, shape, 50 + i as u64);
        g.force_variant(bn::OP, Some("single"));
        let single = fused_step(&g, shape, 50 + i as u64);
        let names = ["y", "saved", "running mean", "running var", "dx", "dgamma", "dbeta", "dshortcut"];
        for ((name, a), b) in names.iter().zip(&split).zip(&single) {
            let same = a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same && a.len() == b.len(), "{name} of {shape:?}: split and single passes differ");
        }
    }
    // The choice: by itself up to 2 chunks on GPUs (never on CPU adapters); forced, never
    // beyond 32.
    let x = g.zeros(&[2, 3, 4, 4]).unwrap();
    let choose = |chunks| bn::Passes::choose(&x, chunks).unwrap();
    assert_eq!((choose(32), choose(33), choose(257)), (bn::Passes::Single, bn::Passes::Split, bn::Passes::Split));
    g.force_variant(bn::OP, None);
    let single = if g.adapter().device_type == wgpu::DeviceType::Cpu { bn::Passes::Split } else { bn::Passes::Single };
    assert_eq!((choose(1), choose(2), choose(3)), (single, single, bn::Passes::Split));
    g.force_variant(bn::OP, Some("triple"));
    let c3 = g.zeros(&[3]).unwrap();
    let (rm, rv) = (g.zeros(&[3]).unwrap(), g.zeros(&[3]).unwrap());
    let err = bn::forward_train(&x, &c3, &c3, &rm, &rv, MOMENTUM, EPS).unwrap_err().to_string();
    assert!(err.contains("split, single"), "{err}");
}

#[test]
fn option_a_strides_and_layouts_match_candle() {
    // The general cell loop of the option-A gradient (stride 2 has its own branch): stride 3
    // from 7x7 (cells of 3, 3 and 1 rows) and stride 1 (pure channel padding), each with the
    // zero channels on both sides and all after; stride 2 with them all after.
    let g = gpu();
    let cases = [([3usize, 3, 7, 7], 3usize, ChannelPad::Both), ([2, 3, 5, 5], 1, ChannelPad::Both)]
        .into_iter()
        .chain([([3usize, 3, 7, 7], 3usize, ChannelPad::After), ([2, 3, 5, 5], 1, ChannelPad::After)])
        .chain([([2usize, 3, 8, 8], 2usize, ChannelPad::After)]);
    for (i, (in_shape, stride, pad)) in cases.enumerate() {
        let shape = [in_shape[0], 5, in_shape[2].div_ceil(stride), in_shape[3].div_ceil(stride)];
        let numel: usize = shape.iter().product();
        let (gx, _) = pair(&shape, 70 + i as u64);
        let (gin, cin) = pair(&in_shape, 80 + i as u64);
        let (gdy, _) = pair(&shape, 90 + i as u64);
        let ones = g.tensor(&[5], &[1.0; 5]).unwrap();
        let zeros = g.zeros(&[5]).unwrap();
        let (rm, rv) = (g.zeros(&[5]).unwrap(), g.tensor(&[5], &[1.0; 5]).unwrap());
        let plain = bn::forward_train(&gx, &ones, &zeros, &rm, &rv, 0.0, EPS).unwrap();
        let epi = Epilogue::add_relu(Residual::OptionA { x: &gin, stride, pad });
        let fused = bn::forward_train_fused(&gx, &ones, &zeros, &rm, &rv, 0.0, EPS, epi).unwrap();
        // max(bn + r, 0) from the plain kernel's bn and candle's shortcut: one rounding of the add.
        let short = cvec(&shortcut_a(&cin, 5, stride, pad));
        let want: Vec<f32> = plain.y.to_vec().unwrap().iter().zip(&short).map(|(y, r)| (y + r).max(0.0)).collect();
        let y = fused.y.to_vec().unwrap();
        assert_close(&format!("option-A residual, stride {stride}, pad {pad}"), &y, &want, 0.0, 0.0);
        let sg = Some(ShortcutGrad::OptionA { in_shape: &in_shape, stride, pad });
        let b = bn::backward_fused(&gx, &gdy, &ones, &plain.saved, Some(&fused.y), sg).unwrap();
        let dy = gdy.to_vec().unwrap();
        let masked: Vec<f32> = dy.iter().zip(&y).map(|(&d, &y)| if y > 0.0 { d } else { 0.0 }).collect();
        assert_eq!(masked.len(), numel);
        let xv = Var::from_tensor(&cin).unwrap();
        let grads = (shortcut_a(xv.as_tensor(), 5, stride, pad) * ct(&masked, &shape))
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_close(
            &format!("option-A shortcut gradient, stride {stride}, pad {pad}"),
            &b.dshortcut.unwrap().to_vec().unwrap(),
            &cvec(grads.get(xv.as_tensor()).unwrap()),
            0.0,
            0.0,
        );
    }
}

#[test]
fn momentum_zero_keeps_running_statistics() {
    let (x, _) = pair(&[3, 4, 5, 5], 7);
    let rm_data = [0.5f32, -0.25, 3.0, 1e-3];
    let rv_data = [1.5f32, 0.25, 7.0, 2.0];
    let rm = gpu().tensor(&[4], &rm_data).unwrap();
    let rv = gpu().tensor(&[4], &rv_data).unwrap();
    let ones = gpu().tensor(&[4], &[1.0; 4]).unwrap();
    // gamma and beta may share a buffer: both are only read.
    bn::forward_train(&x, &ones, &ones, &rm, &rv, 0.0, EPS).unwrap();
    assert_eq!(rm.to_vec().unwrap(), rm_data);
    assert_eq!(rv.to_vec().unwrap(), rv_data);
}

#[test]
fn bad_shapes_are_errors() {
    let g = gpu();
    let x = g.zeros(&[2, 3, 4, 4]).unwrap();
    let (c3, rm, rv) = (g.zeros(&[3]).unwrap(), g.zeros(&[3]).unwrap(), g.zeros(&[3]).unwrap());
    let (c4, rm4, rv4) = (g.zeros(&[4]).unwrap(), g.zeros(&[4]).unwrap(), g.zeros(&[4]).unwrap());
    let train_err = |r: featreplay::Result<bn::BnForward>, want: &str| {
        let err = r.map(|_| ()).unwrap_err().to_string();
        assert!(err.contains(want), "expected '{want}' in: {err}");
    };
    let eval_err = |r: featreplay::Result<featreplay::Tensor>, want: &str| {
        let err = r.map(|_| ()).unwrap_err().to_string();
        assert!(err.contains(want), "expected '{want}' in: {err}");
    };

    // Wrong gamma / beta / running statistics length.
    train_err(bn::forward_train(&x, &c4, &c3, &rm, &rv, MOMENTUM, EPS), "gamma must have shape [3]");
    train_err(bn::forward_train(&x, &c3, &c4, &rm, &rv, MOMENTUM, EPS), "beta must have shape [3]");
    train_err(bn::forward_train(&x, &c3, &c3, &rm4, &rv, MOMENTUM, EPS), "running_mean must have shape [3]");
    train_err(bn::forward_train(&x, &c3, &c3, &rm, &rv4, MOMENTUM, EPS), "running_var must have shape [3]");
    eval_err(bn::forward_eval(&x, &c4, &c3, &rm, &rv, EPS), "gamma must have shape [3]");
    // Rank-3 input.
    let x3 = g.zeros(&[3, 4, 4]).unwrap();
    train_err(bn::forward_train(&x3, &c3, &c3, &rm, &rv, MOMENTUM, EPS), "4 dimensions");
    eval_err(bn::forward_eval(&x3, &c3, &c3, &rm, &rv, EPS), "4 dimensions");
    // One value per channel cannot be normalised in training mode (PyTorch refuses too).
    let x1 = g.zeros(&[1, 3, 1, 1]).unwrap();
    train_err(bn::forward_train(&x1, &c3, &c3, &rm, &rv, MOMENTUM, EPS), "more than one value per channel");
    // Bad eps and momentum.
    train_err(bn::forward_train(&x, &c3, &c3, &rm, &rv, MOMENTUM, -1.0), "eps");
    train_err(bn::forward_train(&x, &c3, &c3, &rm, &rv, f32::NAN, EPS), "momentum");
    // Running statistics that alias another argument (the device would record a fault).
    train_err(bn::forward_train(&x, &c3, &c3, &rm, &rm, MOMENTUM, EPS), "different tensors");
    train_err(bn::forward_train(&x, &c3, &c3, &c3, &rv, MOMENTUM, EPS), "different tensors");
    eval_err(bn::forward_eval(&x, &rm, &c3, &rm, &rv, EPS), "different tensors");

    // Backward: dy of another shape, wrong gamma, saved stats of another channel count.
    let f = bn::forward_train(&x, &c3, &c3, &rm, &rv, MOMENTUM, EPS).unwrap();
    let dy_bad = g.zeros(&[2, 3, 4, 5]).unwrap();
    assert!(bn::backward(&x, &dy_bad, &c3, &f.saved).is_err());
    assert!(bn::backward(&x, &x, &c4, &f.saved).is_err());
    let x4 = g.zeros(&[2, 4, 4, 4]).unwrap();
    assert!(bn::backward(&x4, &x4, &c4, &f.saved).is_err());
    assert!(bn::backward(&x3, &x3, &c3, &f.saved).is_err());
    // Fused: a residual of another shape, an option-A input whose shortcut is not x's shape or
    // whose channel difference is odd, a ReLU output or shortcut input of the wrong shape.
    let fused = |epi: Epilogue| bn::forward_train_fused(&x, &c3, &c3, &rm, &rv, MOMENTUM, EPS, epi);
    let bad_res = g.zeros(&[2, 3, 4, 5]).unwrap();
    train_err(fused(Epilogue::add_relu(Residual::Identity(&bad_res))), "must have the shape of x");
    let big = g.zeros(&[2, 1, 8, 8]).unwrap();
    train_err(fused(Epilogue::add_relu(Residual::OptionA { x: &big, stride: 1, pad: ChannelPad::Both })), "not x's");
    let even = g.zeros(&[2, 2, 8, 8]).unwrap();
    train_err(
        fused(Epilogue::add_relu(Residual::OptionA { x: &even, stride: 2, pad: ChannelPad::Both })),
        "even difference",
    );
    train_err(fused(Epilogue::add_relu(Residual::OptionA { x: &big, stride: 0, pad: ChannelPad::Both })), "stride");
    train_err(fused(Epilogue::add_relu(Residual::Identity(&rm))), "must have the shape of x");
    eval_err(
        bn::forward_eval_fused(&x, &c3, &c3, &rm, &rv, EPS, Epilogue::add_relu(Residual::Identity(&bad_res))),
        "must have the shape of x",
    );
    assert!(fused(Epilogue::add_relu(Residual::OptionA { x: &big, stride: 2, pad: ChannelPad::Both })).is_ok());
    let grads_err = |r: featreplay::Result<bn::BnGrads>, want: &str| {
        let err = r.map(|_| ()).unwrap_err().to_string();
        assert!(err.contains(want), "expected '{want}' in: {err}");
    };
    grads_err(bn::backward_fused(&x, &x, &c3, &f.saved, Some(&bad_res), None), "relu_out");
    let a =
        |in_shape: &'static [usize], stride| Some(ShortcutGrad::OptionA { in_shape, stride, pad: ChannelPad::Both });
    grads_err(bn::backward_fused(&x, &x, &c3, &f.saved, None, a(&[2, 1, 8, 9], 2)), "not x's");
    grads_err(bn::backward_fused(&x, &x, &c3, &f.saved, None, a(&[2, 1, 8], 2)), "4 dimensions");
    assert!(bn::backward_fused(&x, &x, &c3, &f.saved, Some(&x), a(&[2, 1, 7, 8], 2)).is_ok());
    // The device is still healthy after all of these.
    let (_, _, dbeta) = bn::backward(&x, &x, &c3, &f.saved).unwrap();
    assert_eq!(dbeta.to_vec().unwrap(), vec![0.0; 3]);
}

/// Timing of the CIFAR ResNet's largest batch-norm shape, against an element-wise add of the
/// same size (two loads and a store per value): `cargo test --release --test batch_norm --
/// --ignored --nocapture`.
#[test]
#[ignore]
fn timing() {
    let g = gpu();
    let shape = [128, 16, 32, 32];
    let c = shape[1];
    let (x, _) = pair(&shape, 1);
    let (dy, _) = pair(&shape, 2);
    let ones = g.tensor(&[c], &vec![1.0; c]).unwrap();
    let zeros = g.zeros(&[c]).unwrap();
    let (rm, rv) = (g.zeros(&[c]).unwrap(), g.tensor(&[c], &vec![1.0; c]).unwrap());
    let saved = bn::forward_train(&x, &ones, &zeros, &rm, &rv, MOMENTUM, EPS).unwrap().saved;
    bn::backward(&x, &dy, &ones, &saved).unwrap();
    bn::forward_eval(&x, &ones, &zeros, &rm, &rv, EPS).unwrap();
    featreplay::kernels::elementwise::add(&x, &dy).unwrap();
    // Each trial times 5 calls of the op right after 5 adds; the fastest trial of 9 counts
    // (other work on the machine only slows trials), with the add of the same trial.
    let add = || drop(featreplay::kernels::elementwise::add(&x, &dy).unwrap());
    let time = |f: &dyn Fn()| -> (f64, f64) {
        (0..9)
            .map(|_| {
                let t_add =
                    g.time(|| {
                        (0..5).for_each(|_| add());
                        Ok(())
                    })
                    .unwrap()
                    .1 / 5.0
                        * 1e3;
                let t_op =
                    g.time(|| {
                        (0..5).for_each(|_| f());
                        Ok(())
                    })
                    .unwrap()
                    .1 / 5.0
                        * 1e3;
                (t_op, t_add)
            })
            .fold((f64::INFINITY, 0.0), |a, b| if b.0 < a.0 { b } else { a })
    };
    let (fwd, fwd_add) = time(&|| drop(bn::forward_train(&x, &ones, &zeros, &rm, &rv, MOMENTUM, EPS).unwrap()));
    let (bwd, bwd_add) = time(&|| drop(bn::backward(&x, &dy, &ones, &saved).unwrap()));
    let (eval, eval_add) = time(&|| drop(bn::forward_eval(&x, &ones, &zeros, &rm, &rv, EPS).unwrap()));
    eprintln!(
        "{shape:?}: forward_train {fwd:.2} ms ({:.2} adds), backward {bwd:.2} ms ({:.2} adds), forward_eval \
         {eval:.2} ms ({:.2} adds)",
        fwd / fwd_add,
        bwd / bwd_add,
        eval / eval_add
    );
}
