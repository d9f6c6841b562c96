//! `shaders/shortcut.wgsl` (option-A shortcut) against candle-core: the reference is
//! `x[:, :, ::s, ::s]` by `index_select` on H and W, then `pad_with_zeros` on C, and its
//! gradient comes from candle's autograd. Both directions only move values, so results must be
//! bit-exact (tolerance 0), and are also checked against a plain loop.

mod common;

use candle_core::{Tensor as CTensor, Var};
use common::*;
use featreplay::kernels::shortcut;

/// (input shape [N, Cin, H, W], out_channels, stride): batch 1, 3, 8, 16; channels 3, 5, 16,
/// 17, 32, 64; spatial 7x7 (odd: ceil), 8x8, 16x16, 32x32; stride 1 (identity and pure
/// padding), 2 (the CIFAR ResNet transitions 16 -> 32 and 32 -> 64) and 3.
const CASES: &[([usize; 4], usize, usize)] = &[
    ([1, 3, 7, 7], 5, 2),
    ([3, 5, 8, 8], 17, 2),
    ([3, 17, 7, 7], 17, 1),
    ([3, 17, 7, 7], 21, 1),
    ([3, 5, 7, 7], 9, 3),
    ([1, 3, 32, 32], 3, 2),
    ([8, 16, 32, 32], 32, 2),
    ([16, 32, 16, 16], 64, 2),
    ([8, 64, 8, 8], 64, 1),
];

fn candle_reference(x: &CTensor, out_channels: usize, stride: usize) -> CTensor {
    let (_, cin, h, w) = x.dims4().unwrap();
    let idx = |n: usize| {
        let v: Vec<u32> = (0..n).step_by(stride).map(|i| i as u32).collect();
        CTensor::new(v.as_slice(), x.device()).unwrap()
    };
    let pad = (out_channels - cin) / 2;
    x.index_select(&idx(h), 2).unwrap().index_select(&idx(w), 3).unwrap().pad_with_zeros(1, pad, pad).unwrap()
}

/// The forward as a plain loop over the output.
fn loop_reference(x: &[f32], [n, cin, h, w]: [usize; 4], cout: usize, s: usize) -> Vec<f32> {
    let (ho, wo, pad) = (h.div_ceil(s), w.div_ceil(s), (cout - cin) / 2);
    let mut y = vec![0.0; n * cout * ho * wo];
    for b in 0..n {
        for c in pad..pad + cin {
            for i in 0..ho {
                for j in 0..wo {
                    y[((b * cout + c) * ho + i) * wo + j] = x[((b * cin + c - pad) * h + i * s) * w + j * s];
                }
            }
        }
    }
    y
}

#[test]
fn forward_and_backward_match_candle() {
    for (i, &(shape, cout, stride)) in CASES.iter().enumerate() {
        let what = format!("{shape:?} -> {cout} channels, stride {stride}");
        let (gx, cx) = pair(&shape, 10 + i as u64);
        let x = Var::from_tensor(&cx).unwrap();
        let want_y = candle_reference(x.as_tensor(), cout, stride);
        let y = shortcut::forward(&gx, cout, stride).unwrap();
        assert_eq!(y.shape(), want_y.dims(), "{what}: output shape");
        assert_eq!(shortcut::output_shape(&shape, cout, stride).unwrap().as_slice(), want_y.dims(), "{what}");
        let got_y = y.to_vec().unwrap();
        // A copy: exact.
        assert_close(&format!("forward, {what}"), &got_y, &cvec(&want_y), 0.0, 0.0);
        assert_close(
            &format!("forward vs loop, {what}"),
            &got_y,
            &loop_reference(&cvec(&cx), shape, cout, stride),
            0.0,
            0.0,
        );

        // Backward of L = sum(y * g): dx = g at the sampled pixels of the kept channels, else 0.
        let (gg, cg) = pair(want_y.dims(), 100 + i as u64);
        let grads = (&want_y * &cg).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = shortcut::backward(&gg, &shape, stride).unwrap();
        assert_eq!(dx.shape(), shape, "{what}: dx shape");
        assert_close(
            &format!("backward, {what}"),
            &dx.to_vec().unwrap(),
            &cvec(grads.get(x.as_tensor()).unwrap()),
            0.0,
            0.0,
        );
    }
}

#[test]
fn bad_arguments_are_errors() {
    let g = gpu();
    let x = g.zeros(&[2, 3, 8, 8]).unwrap();
    let err = |r: featreplay::Result<featreplay::Tensor>, want: &str| {
        let e = r.map(|_| ()).unwrap_err().to_string();
        assert!(e.contains(want), "expected '{want}' in: {e}");
    };
    // Odd channel difference, fewer output channels, stride 0.
    err(shortcut::forward(&x, 6, 2), "even difference");
    err(shortcut::forward(&x, 1, 2), "even difference");
    err(shortcut::forward(&x, 5, 0), "stride");
    // Rank-3 input.
    err(shortcut::forward(&g.zeros(&[3, 8, 8]).unwrap(), 5, 2), "4 dimensions");
    assert!(shortcut::output_shape(&[3, 8, 8], 5, 2).is_err());
    // Backward: dy that does not match in_shape and stride, bad in_shape.
    let dy = g.zeros(&[2, 5, 4, 4]).unwrap();
    assert!(shortcut::backward(&dy, &[2, 3, 8, 8], 2).is_ok());
    err(shortcut::backward(&dy, &[2, 3, 8, 8], 1), "dy must have shape");
    err(shortcut::backward(&dy, &[2, 3, 9, 8], 2), "dy must have shape");
    err(shortcut::backward(&dy, &[2, 4, 8, 8], 2), "even difference");
    err(shortcut::backward(&dy, &[2, 3, 8], 2), "4 dimensions");
    err(shortcut::backward(&g.zeros(&[2, 5, 4]).unwrap(), &[2, 3, 8, 8], 2), "4 dimensions");
}
