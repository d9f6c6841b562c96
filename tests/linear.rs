//! `shaders/linear.wgsl` against candle autograd: forward and all three gradients over
//! awkward shapes (N = 1, 3, 128; feature counts that are and are not multiples of 4 and 16).

mod common;

use candle_core::Var;
use common::*;
use featreplay::kernels::linear;

const EPS: f32 = f32::EPSILON;

/// Round-off allowance for a length-`k` dot product of values uniform in [-1, 1) (products
/// of RMS 1/3), computed in two different summation orders (ours: one fused multiply-add
/// chain per output; candle's gemm: its own blocking). Recursive summation errs by at most
/// k * eps * sum|p_i|, but with random signs by about eps * sqrt(k) * |partial sums|, and the
/// partial sums are about sqrt(k)/3; we allow 4 eps * sqrt(k) * (sqrt(k)/3 + 1), the +1 for
/// the bias and tiny k. (Measured: the worst element over all shapes uses under half of it.)
fn dot_atol(k: usize) -> f32 {
    let k = k.max(1) as f32;
    4.0 * EPS * k.sqrt() * (k.sqrt() / 3.0 + 1.0)
}

fn check(n: usize, k_in: usize, k_out: usize, seed: u64) {
    let what = format!("N={n} in={k_in} out={k_out}");
    let (gx, cx) = pair(&[n, k_in], seed);
    let (gw, cw) = pair(&[k_out, k_in], seed + 1);
    let (gb, cb) = pair(&[k_out], seed + 2);
    let (gdy, cdy) = pair(&[n, k_out], seed + 3);

    // Reference: y = x.matmul(w^T) + b, and L = sum(y * dy) so that dL/dy = dy.
    let (x, w, b) = (Var::from_tensor(&cx).unwrap(), Var::from_tensor(&cw).unwrap(), Var::from_tensor(&cb).unwrap());
    let y = x.matmul(&w.t().unwrap().contiguous().unwrap()).unwrap().broadcast_add(&b).unwrap();
    let grads = (&y * &cdy).unwrap().sum_all().unwrap().backward().unwrap();

    let gy = linear::forward(&gx, &gw, &gb).unwrap();
    assert_eq!(gy.shape(), &[n, k_out]);
    let (gdx, gdw, gdb) = linear::backward(&gx, &gw, &gdy).unwrap();
    assert_eq!(gdx.shape(), &[n, k_in]);
    assert_eq!(gdw.shape(), &[k_out, k_in]);
    assert_eq!(gdb.shape(), &[k_out]);

    // y: a length-`in` dot product plus the bias (one more rounding, within 2 eps relative).
    assert_close(&format!("y, {what}"), &gy.to_vec().unwrap(), &cvec(&y), 2.0 * EPS, dot_atol(k_in));
    // dx: length-`out` dot products.
    let want = cvec(grads.get(x.as_tensor()).unwrap());
    assert_close(&format!("dx, {what}"), &gdx.to_vec().unwrap(), &want, 2.0 * EPS, dot_atol(k_out));
    // dW: length-N dot products.
    let want = cvec(grads.get(w.as_tensor()).unwrap());
    assert_close(&format!("dW, {what}"), &gdw.to_vec().unwrap(), &want, 2.0 * EPS, dot_atol(n));
    // db: a length-N sum of values uniform in [-1, 1), whose RMS 1/sqrt(3) is sqrt(3) times
    // the RMS of the products dot_atol assumes.
    let want = cvec(grads.get(b.as_tensor()).unwrap());
    assert_close(&format!("db, {what}"), &gdb.to_vec().unwrap(), &want, 2.0 * EPS, 3f32.sqrt() * dot_atol(n));
}

/// (in, out) pairs around the kernel's 8x8 output blocks: below one block (1, 5), just past a
/// multiple (17, 257, 100) and multiples (64, 1000), in both roles.
const FEATURES: &[(usize, usize)] = &[
    (1, 1),
    (1, 17),
    (5, 3),
    (17, 5),
    (64, 10),
    (64, 100),
    (100, 257),
    (257, 100),
    (1000, 17),
    (17, 1000),
    (1000, 1000),
];

#[test]
fn matches_candle_small_batches() {
    for &n in &[1, 3] {
        for (i, &(k_in, k_out)) in FEATURES.iter().enumerate() {
            check(n, k_in, k_out, 100 * n as u64 + 10 * i as u64);
        }
    }
}

#[test]
fn matches_candle_batch_128() {
    for (i, &(k_in, k_out)) in FEATURES.iter().enumerate() {
        check(128, k_in, k_out, 1000 + 10 * i as u64);
    }
    // An ImageNet-size classifier and an odd batch.
    check(128, 2048, 1000, 2000);
    check(129, 513, 7, 2010);
}

#[test]
fn bad_shapes_are_errors() {
    let g = gpu();
    let x = g.zeros(&[3, 5]).unwrap();
    let w = g.zeros(&[4, 5]).unwrap();
    let b = g.zeros(&[4]).unwrap();
    let dy = g.zeros(&[3, 4]).unwrap();
    assert!(linear::forward(&x, &w, &b).is_ok());
    assert!(linear::backward(&x, &w, &dy).is_ok());

    let err = linear::forward(&x, &g.zeros(&[4, 6]).unwrap(), &b).unwrap_err();
    assert!(err.to_string().contains("shape mismatch in linear forward"), "{err}");
    let err = linear::forward(&x, &w, &g.zeros(&[5]).unwrap()).unwrap_err();
    assert!(err.to_string().contains("bias"), "{err}");
    let err = linear::forward(&g.zeros(&[15]).unwrap(), &w, &b).unwrap_err();
    assert!(err.to_string().contains("2 dimensions"), "{err}");
    let err = linear::backward(&x, &w, &g.zeros(&[3, 5]).unwrap()).unwrap_err();
    assert!(err.to_string().contains("dy"), "{err}");
    let err = linear::backward(&x, &w, &g.zeros(&[2, 4]).unwrap()).unwrap_err();
    assert!(err.to_string().contains("dy"), "{err}");
    let err = linear::backward_params(&x, &g.zeros(&[2, 4]).unwrap()).unwrap_err();
    assert!(err.to_string().contains("batch sizes"), "{err}");
}

#[test]
fn zero_batch_and_zero_features() {
    let g = gpu();
    // N = 0: empty outputs, zero parameter gradients.
    let (x, w, b) = (g.zeros(&[0, 8]).unwrap(), g.tensor(&[2, 8], &[1.0; 16]).unwrap(), g.zeros(&[2]).unwrap());
    assert_eq!(linear::forward(&x, &w, &b).unwrap().shape(), &[0, 2]);
    let (dx, dw, db) = linear::backward(&x, &w, &g.zeros(&[0, 2]).unwrap()).unwrap();
    assert_eq!(dx.shape(), &[0, 8]);
    assert_eq!(dw.to_vec().unwrap(), vec![0.0; 16]);
    assert_eq!(db.to_vec().unwrap(), vec![0.0; 2]);
    // in = 0: y = b broadcast, db still the column sums of dy.
    let (x, w) = (g.zeros(&[2, 0]).unwrap(), g.zeros(&[3, 0]).unwrap());
    let b = g.tensor(&[3], &[1.0, 2.0, 3.0]).unwrap();
    assert_eq!(linear::forward(&x, &w, &b).unwrap().to_vec().unwrap(), vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    let dy = g.tensor(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    let (_, _, db) = linear::backward(&x, &w, &dy).unwrap();
    assert_eq!(db.to_vec().unwrap(), vec![5.0, 7.0, 9.0]);
}
