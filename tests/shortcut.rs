//! `shaders/shortcut.wgsl` (option-A shortcut) against candle-core: the reference is
//! `x[:, :, ::s, ::s]` by `index_select` on H and W, then `pad_with_zeros` on C, and its
//! gradient comes from candle's autograd. Both directions only move values, so results must be
//! bit-exact (tolerance 0), and are also checked against a plain loop.

mod common;

use candle_core::{Tensor as CTensor, Var};
use common::*;
use featreplay::kernels::shortcut::{self, ChannelPad};

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

fn candle_reference(x: &CTensor, out_channels: usize, stride: usize, pad: ChannelPad) -> CTensor {
    let (_, cin, h, w) = x.dims4().unwrap();
    let idx = |n: usize| {
        let v: Vec<u32> = (0..n).step_by(stride).map(|i| i as u32).collect();
        CTensor::new(v.as_slice(), x.device()).unwrap()
    };
    let lead = pad.leading(cin, out_channels);
    x.index_select(&idx(h), 2)
        .unwrap()
        .index_select(&idx(w), 3)
        .unwrap()
        .pad_with_zeros(1, lead, out_channels - cin - lead)
        .unwrap()
}

/// The forward as a plain loop over the output.
fn loop_reference(x: &[f32], [n, cin, h, w]: [usize; 4], cout: usize, s: usize, lead: ChannelPad) -> Vec<f32> {
    let (ho, wo, pad) = (h.div_ceil(s), w.div_ceil(s), lead.leading(cin, cout));
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
    // Every case with the zero channels on both sides, then all after the input channels
    // (which also allows an odd difference).
    let both = CASES.iter().map(|&(s, c, st)| (s, c, st, ChannelPad::Both));
    let after = CASES.iter().chain(&[([2, 3, 8, 8], 6, 2)]).map(|&(s, c, st)| (s, c, st, ChannelPad::After));
    for (i, (shape, cout, stride, pad)) in both.chain(after).enumerate() {
        let what = format!("{shape:?} -> {cout} channels, stride {stride}, pad {pad}");
        let (gx, cx) = pair(&shape, 10 + i as u64);
        let x = Var::from_tensor(&cx).unwrap();
        let want_y = candle_reference(x.as_tensor(), cout, stride, pad);
        let y = shortcut::forward(&gx, cout, stride, pad).unwrap();
        assert_eq!(y.shape(), want_y.dims(), "{what}: output shape");
        assert_eq!(shortcut::output_shape(&shape, cout, stride, pad).unwrap().as_slice(), want_y.dims(), "{what}");
        let got_y = y.to_vec().unwrap();
        // A copy: exact.
        assert_close(&format!("forward, {what}"), &got_y, &cvec(&want_y), 0.0, 0.0);
        assert_close(
            &format!("forward vs loop, {what}"),
            &got_y,
            &loop_reference(&cvec(&cx), shape, cout, stride, pad),
            0.0,
            0.0,
        );

        // Backward of L = sum(y * g): dx = g at the sampled pixels of the kept channels, else 0.
        let (gg, cg) = pair(want_y.dims(), 100 + i as u64);
        let grads = (&want_y * &cg).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = shortcut::backward(&gg, &shape, stride, pad).unwrap();
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
    let (both, after) = (ChannelPad::Both, ChannelPad::After);
    // Odd channel difference (both sides only), fewer output channels, stride 0.
    err(shortcut::forward(&x, 6, 2, both), "even difference");
    assert!(shortcut::forward(&x, 6, 2, after).is_ok());
    err(shortcut::forward(&x, 1, 2, both), "even difference");
    err(shortcut::forward(&x, 1, 2, after), "out_channels >= in_channels");
    err(shortcut::forward(&x, 5, 0, both), "stride");
    // Rank-3 input.
    err(shortcut::forward(&g.zeros(&[3, 8, 8]).unwrap(), 5, 2, both), "4 dimensions");
    assert!(shortcut::output_shape(&[3, 8, 8], 5, 2, both).is_err());
    // Backward: dy that does not match in_shape and stride, bad in_shape.
    let dy = g.zeros(&[2, 5, 4, 4]).unwrap();
    assert!(shortcut::backward(&dy, &[2, 3, 8, 8], 2, both).is_ok());
    err(shortcut::backward(&dy, &[2, 3, 8, 8], 1, both), "dy must have shape");
    err(shortcut::backward(&dy, &[2, 3, 9, 8], 2, both), "dy must have shape");
    err(shortcut::backward(&dy, &[2, 4, 8, 8], 2, both), "even difference");
    assert!(shortcut::backward(&dy, &[2, 4, 8, 8], 2, after).is_ok());
    err(shortcut::backward(&dy, &[2, 3, 8], 2, both), "4 dimensions");
    err(shortcut::backward(&g.zeros(&[2, 5, 4]).unwrap(), &[2, 3, 8, 8], 2, both), "4 dimensions");
    assert_eq!("after".parse::<ChannelPad>().unwrap(), after);
    assert!("left".parse::<ChannelPad>().unwrap_err().to_string().contains("choose both or after"));
}
