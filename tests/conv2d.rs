//! `shaders/conv2d_*.wgsl` against candle-core autograd: forward, backward-data and
//! backward-filter, for the variant the chooser picks and for every variant forced, over a
//! grid of shapes that includes awkward ones.

mod common;

use candle_core::Var;
use common::*;
use featreplay::kernels::conv2d::{self, ConvPass, ConvShape, ConvVariant, TiledTile};
use featreplay::{Gpu, Tensor};

/// (batch, in_channels, h, w, out_channels, kernel, stride, pad)
type Case = (usize, usize, usize, usize, usize, usize, usize, usize);

const SHAPES: &[Case] = &[
    (1, 3, 7, 7, 5, 3, 1, 1),
    (3, 5, 8, 8, 17, 3, 2, 1),
    (3, 17, 7, 7, 64, 1, 1, 0),
    (1, 64, 8, 8, 64, 3, 1, 1),
    (3, 16, 32, 32, 16, 3, 1, 1),
    (2, 16, 32, 32, 32, 3, 2, 1),
    (3, 16, 32, 32, 32, 1, 2, 0),
    (1, 5, 7, 7, 3, 3, 2, 0),
    (3, 17, 8, 8, 5, 1, 1, 1),
    (1, 3, 32, 32, 16, 3, 1, 1),
    (2, 64, 8, 8, 17, 3, 1, 0),
    (3, 32, 16, 16, 64, 1, 2, 0),
    // Planes whose sides are multiples of 7 (the direct variant's 7x7 blocks).
    (2, 16, 28, 28, 16, 3, 1, 1),
    (3, 5, 14, 14, 17, 3, 1, 1),
];

struct Reference {
    x: Vec<f32>,
    w: Vec<f32>,
    dy: Vec<f32>,
    y: Vec<f32>,
    dx: Vec<f32>,
    dw: Vec<f32>,
}

/// candle's conv2d and its autograd gradients for L = sum(y * dy).
fn reference(s: &ConvShape, seed: u64) -> Reference {
    let x = random(s.input_shape().iter().product(), seed);
    let w = random(s.weight_shape().iter().product(), seed + 1);
    let dy = random(s.output_shape().iter().product(), seed + 2);
    let xv = Var::from_tensor(&ct(&x, &s.input_shape())).unwrap();
    let wv = Var::from_tensor(&ct(&w, &s.weight_shape())).unwrap();
    let y = xv.as_tensor().conv2d(wv.as_tensor(), s.pad, s.stride, 1, 1).unwrap();
    assert_eq!(y.dims(), s.output_shape(), "output shape formula");
    let grads = (&y * &ct(&dy, &s.output_shape())).unwrap().sum_all().unwrap().backward().unwrap();
    Reference {
        x,
        w,
        dy,
        y: cvec(&y),
        dx: cvec(grads.get(xv.as_tensor()).unwrap()),
        dw: cvec(grads.get(wv.as_tensor()).unwrap()),
    }
}

/// How a check runs the passes: the chooser, a forced variant, or one tiled configuration.
#[derive(Debug, Clone, Copy)]
enum Run {
    Chosen,
    Variant(ConvVariant),
    Tile(TiledTile),
}

/// `pass` with the tiled variant in configuration `t`, into a tensor of garbage (every
/// element must be overwritten).
fn tiled(t: TiledTile, pass: ConvPass, s: &ConvShape, inputs: [&Tensor; 2], shape: [usize; 4]) -> Tensor {
    let out = inputs[0].gpu().tensor(&shape, &random(shape.iter().product(), 77)).unwrap();
    conv2d::run_tiled(t, pass, s, inputs, &out, false).unwrap();
    out
}

/// Runs all three passes with `run` over `shapes` (indices into [`SHAPES`]) and checks them.
/// Tolerances: each output is a sum of `terms` products of values in [-1, 1]; see `sum_atol`.
fn check(run: Run, shapes: &[usize]) {
    let gpu = gpu();
    for &i in shapes {
        let (n, c, h, w, o, k, st, p) = SHAPES[i];
        let s = ConvShape::new(&[n, c, h, w], &[o, c, k, k], st, p).unwrap();
        let r = reference(&s, 1000 + i as u64);
        let label = format!("{run:?} shape {:?} w {:?} stride {st} pad {p}", s.input_shape(), s.weight_shape());
        let x = gpu.tensor(&s.input_shape(), &r.x).unwrap();
        let wt = gpu.tensor(&s.weight_shape(), &r.w).unwrap();
        let dy = gpu.tensor(&s.output_shape(), &r.dy).unwrap();
        let (y, dx, dw) = match run {
            Run::Variant(v) => (
                conv2d::forward_with(v, &x, &wt, st, p).unwrap(),
                conv2d::backward_data_with(v, &dy, &wt, &s.input_shape(), st, p).unwrap(),
                conv2d::backward_filter_with(v, &x, &dy, &s.weight_shape(), st, p).unwrap(),
            ),
            Run::Tile(t) => (
                tiled(t, ConvPass::Forward, &s, [&x, &wt], s.output_shape()),
                tiled(t, ConvPass::BackwardData, &s, [&dy, &wt], s.input_shape()),
                tiled(t, ConvPass::BackwardFilter, &s, [&x, &dy], s.weight_shape()),
            ),
            Run::Chosen => (
                conv2d::forward(&x, &wt, st, p).unwrap(),
                conv2d::backward_data(&dy, &wt, &s.input_shape(), st, p).unwrap(),
                conv2d::backward_filter(&x, &dy, &s.weight_shape(), st, p).unwrap(),
            ),
        };
        let fwd_terms = c * k * k;
        let data_terms = o * k.div_ceil(st) * k.div_ceil(st);
        let filter_terms = n * s.out_h() * s.out_w();
        assert_close(&format!("forward {label}"), &y.to_vec().unwrap(), &r.y, 1e-5, sum_atol(fwd_terms, 1.0));
        assert_close(&format!("backward-data {label}"), &dx.to_vec().unwrap(), &r.dx, 1e-5, sum_atol(data_terms, 1.0));
        assert_close(
            &format!("backward-filter {label}"),
            &dw.to_vec().unwrap(),
            &r.dw,
            1e-5,
            sum_atol(filter_terms, 1.0),
        );
        // Accumulating backward-data: dx += conv_backward_data(dy) onto a tensor that already
        // holds something (the shortcut gradient of a residual block), and the overwriting
        // form of the same call on a tensor full of garbage.
        let prior = random(r.dx.len(), 2000 + i as u64);
        let want: Vec<f32> = r.dx.iter().zip(&prior).map(|(a, b)| a + b).collect();
        for accumulate in [true, false] {
            let acc = gpu.tensor(&s.input_shape(), &prior).unwrap();
            match run {
                Run::Variant(v) => conv2d::backward_data_into_with(v, &dy, &wt, st, p, &acc, accumulate).unwrap(),
                Run::Tile(t) => conv2d::run_tiled(t, ConvPass::BackwardData, &s, [&dy, &wt], &acc, accumulate).unwrap(),
                Run::Chosen => conv2d::backward_data_into(&dy, &wt, st, p, &acc, accumulate).unwrap(),
            }
            let (what, want) = if accumulate { ("accumulated", &want) } else { ("into", &r.dx) };
            assert_close(
                &format!("backward-data {what} {label}"),
                &acc.to_vec().unwrap(),
                want,
                1e-5,
                sum_atol(data_terms + 1, 1.0),
            );
        }
    }
}

/// Every index of [`SHAPES`].
fn all_shapes() -> Vec<usize> {
    (0..SHAPES.len()).collect()
}

#[test]
fn chosen_variant_matches_candle() {
    check(Run::Chosen, &all_shapes());
}

#[test]
fn direct_variant_matches_candle() {
    check(Run::Variant(ConvVariant::Direct), &all_shapes());
}

#[test]
fn tiled_variant_matches_candle() {
    check(Run::Variant(ConvVariant::Tiled), &all_shapes());
}

/// Every tile shape of the tiled variant at the depth the launcher would give it on this
/// device, and the first shape at every depth (double-buffered or not, BK 8 and 16), whatever
/// the launcher would pick for these small GEMMs. The shapes cover each kernel size and stride
/// (one pipeline set per pair), few and many channels, padding and none.
#[test]
fn every_tiled_configuration_matches_candle() {
    let tiles = conv2d::tiled_tiles(gpu());
    let first_block = tiles[0].block();
    let mut blocks = Vec::new();
    for &t in &tiles {
        let new_block = !blocks.contains(&t.block());
        if new_block || t.block() == first_block {
            blocks.push(t.block());
            check(Run::Tile(t), &[0, 1, 2, 3, 6, 7]);
        }
    }
    blocks.dedup();
    assert_eq!(blocks.len(), 6, "every tile shape ran: {blocks:?}");
}

#[test]
fn chooser_follows_adapter_type_and_forcing() {
    // A device of its own, so forcing does not affect the tests sharing `gpu()`.
    let g = Gpu::open_default().unwrap();
    let s = ConvShape::new(&[2, 4, 8, 8], &[4, 4, 3, 3], 1, 1).unwrap();
    let want = if g.adapter().is_cpu() { ConvVariant::Direct } else { ConvVariant::Tiled };
    assert_eq!(conv2d::choose(&g, &s, ConvPass::Forward).unwrap(), want);
    for v in ConvVariant::ALL {
        g.force_variant(conv2d::OP, Some(v.name()));
        assert_eq!(conv2d::choose(&g, &s, ConvPass::BackwardFilter).unwrap(), v);
    }
    g.force_variant(conv2d::OP, Some("tune"));
    let tuned = conv2d::choose(&g, &s, ConvPass::Forward).unwrap();
    assert!(ConvVariant::ALL.contains(&tuned));
    // The timed choice is cached per shape and pass.
    assert_eq!(conv2d::choose(&g, &s, ConvPass::Forward).unwrap(), tuned);
    g.force_variant(conv2d::OP, Some("winograd"));
    let err = conv2d::choose(&g, &s, ConvPass::Forward).unwrap_err();
    assert!(err.to_string().contains("unknown kernel variant 'winograd'"), "{err}");
}

#[test]
fn bad_shapes_are_errors() {
    let g = gpu();
    let x = g.zeros(&[2, 3, 8, 8]).unwrap();
    let w_bad_c = g.zeros(&[4, 5, 3, 3]).unwrap();
    let e = conv2d::forward(&x, &w_bad_c, 1, 1).unwrap_err();
    assert!(e.to_string().contains("input has 3 channels"), "{e}");
    let w_rect = g.zeros(&[4, 3, 3, 1]).unwrap();
    assert!(conv2d::forward(&x, &w_rect, 1, 1).is_err());
    let x3 = g.zeros(&[3, 8, 8]).unwrap();
    let w = g.zeros(&[4, 3, 3, 3]).unwrap();
    assert!(conv2d::forward(&x3, &w, 1, 1).is_err());
    assert!(conv2d::forward(&x, &w, 0, 1).is_err());
    let small = g.zeros(&[1, 3, 1, 1]).unwrap();
    assert!(conv2d::forward(&small, &w, 1, 0).is_err());
    let dy_wrong = g.zeros(&[2, 4, 7, 7]).unwrap();
    assert!(conv2d::backward_data(&dy_wrong, &w, &[2, 3, 8, 8], 1, 1).is_err());
    assert!(conv2d::backward_filter(&x, &dy_wrong, &[4, 3, 3, 3], 1, 1).is_err());
    let dx = g.zeros(&[2, 3, 8, 8]).unwrap();
    assert!(conv2d::backward_data_into(&dy_wrong, &w, 1, 1, &dx, true).is_err());
    // dx may not alias an input of the same call.
    let dy = g.zeros(&[2, 4, 8, 8]).unwrap();
    let w_sq = g.zeros(&[4, 4, 3, 3]).unwrap();
    let e = conv2d::backward_data_into(&dy, &w_sq, 1, 1, &dy, true).unwrap_err();
    assert!(e.to_string().contains("shares a buffer"), "{e}");
    // A forced tiled configuration: tensors that do not match the shape, or an output that
    // aliases an input, are errors before anything runs.
    let tile = conv2d::tiled_tiles(g)[0];
    let s = ConvShape::new(&[2, 3, 8, 8], &[4, 3, 3, 3], 1, 1).unwrap();
    let y = g.zeros(&s.output_shape()).unwrap();
    let e = conv2d::run_tiled(tile, ConvPass::Forward, &s, [&x, &w], &dy_wrong, false).unwrap_err();
    assert!(e.to_string().contains("expected [2, 4, 8, 8]"), "{e}");
    let fine = conv2d::run_tiled(tile, ConvPass::BackwardData, &s, [&y, &w], &x, false);
    assert!(fine.is_ok(), "{fine:?}");
    let e = conv2d::run_tiled(tile, ConvPass::BackwardFilter, &s, [&x, &y], &x, false).unwrap_err();
    assert!(e.to_string().contains("shares a buffer"), "{e}");
}
