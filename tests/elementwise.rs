//! `shaders/elementwise.wgsl` against candle: fill, scale, axpy, add, ReLU forward/backward.

mod common;

use common::*;
use featreplay::kernels::elementwise as ew;

// Sizes include an odd count and one past the 65535-workgroup limit of one grid dimension.
const SIZES: &[usize] = &[1, 7, 1000, 256 * 65535 + 3];

#[test]
fn fill_scale_axpy() {
    for (s, &n) in SIZES.iter().enumerate() {
        let x = gpu().zeros(&[n]).unwrap();
        ew::fill(&x, 1.5).unwrap();
        ew::scale(&x, -2.0).unwrap();
        let got = x.to_vec().unwrap();
        assert!(got.iter().all(|&v| v == -3.0), "fill then scale, n = {n}");

        let a = random(n, s as u64);
        let b = random(n, 100 + s as u64);
        let (ta, tb) = (gpu().tensor(&[n], &a).unwrap(), gpu().tensor(&[n], &b).unwrap());
        ew::axpy(0.25, &ta, &tb).unwrap();
        let want: Vec<f32> = a.iter().zip(&b).map(|(a, b)| b + 0.25 * a).collect();
        // One fused multiply-add per element: within one rounding of the separate ops.
        assert_close("axpy", &tb.to_vec().unwrap(), &want, 2.0 * f32::EPSILON, 0.0);
    }
}

#[test]
fn add_and_relu_match_candle() {
    for (s, &n) in SIZES.iter().enumerate().take(3) {
        let (ga, ca) = pair(&[n], 10 + s as u64);
        let (gb, cb) = pair(&[n], 20 + s as u64);
        let sum = ew::add(&ga, &gb).unwrap();
        assert_close("add", &sum.to_vec().unwrap(), &cvec(&(&ca + &cb).unwrap()), 0.0, 0.0);

        // Candle autograd for ReLU: y = relu(x), dL/dx for L = sum(y * g).
        let x = candle_core::Var::from_tensor(&ca).unwrap();
        let y = x.as_tensor().relu().unwrap();
        let (gg, cg) = pair(&[n], 30 + s as u64);
        let grads = (&y * &cg).unwrap().sum_all().unwrap().backward().unwrap();
        let gy = ew::relu_forward(&ga).unwrap();
        assert_close("relu forward", &gy.to_vec().unwrap(), &cvec(&y), 0.0, 0.0);
        let gdx = ew::relu_backward(&gy, &gg).unwrap();
        let want = cvec(grads.get(x.as_tensor()).unwrap());
        assert_close("relu backward", &gdx.to_vec().unwrap(), &want, 0.0, 0.0);
    }
}

#[test]
fn shape_mismatch_is_an_error() {
    let a = gpu().zeros(&[2, 3]).unwrap();
    let b = gpu().zeros(&[3, 2]).unwrap();
    let err = ew::add(&a, &b).unwrap_err();
    assert!(err.to_string().contains("shape mismatch in add"), "{err}");
}
