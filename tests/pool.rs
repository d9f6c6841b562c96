//! `shaders/pool.wgsl` (global average pooling) against candle-core: `mean_keepdim((2, 3))`
//! in f64 on the same f32 inputs (the exact answer to well below f32 round-off), gradients by
//! candle's autograd.

mod common;

use candle_core::{DType, Var};
use common::*;
use featreplay::kernels::pool;

/// Unit roundoff of f32 (half an ulp at 1).
const UR: f64 = f32::EPSILON as f64 / 2.0;
/// Multiplier of the error bound (see [`forward_tol`]).
const LAMBDA: f64 = 6.0;

/// Error bound of the shader's mean of one plane: blocks of 16 values summed serially, the
/// block sums added serially, then a division by hw (2.5 ulp = 5 u allowed by WGSL). Each
/// addition rounds by `delta * s` with |delta| <= u and s its result; the bound is
/// `LAMBDA * u * sqrt(sum s^2)`, which covers the worst case for up to LAMBDA^2 = 36 roundings
/// (Cauchy-Schwarz) and, beyond, independent roundings except with probability
/// 2 exp(-LAMBDA^2 / 2) = 3e-8 (Higham and Mary 2019, Hoeffding).
fn forward_tol(plane: &[f32], mean: f64) -> f64 {
    let mut s2 = 0.0;
    let mut total = 0.0f64;
    for (b, block) in plane.chunks(16).enumerate() {
        let mut sum = block[0] as f64;
        for &v in &block[1..] {
            sum += v as f64;
            s2 += sum * sum;
        }
        total += sum;
        if b > 0 {
            s2 += total * total;
        }
    }
    let hw = plane.len() as f64;
    LAMBDA * UR * (s2 / (hw * hw) + (5.0 * mean).powi(2)).sqrt()
}

/// Batch 1, 3, 8, 16, 128; channels 3, 5, 17, 64; spatial 7x7, 8x8, 32x32.
const SHAPES: &[[usize; 4]] =
    &[[1, 3, 7, 7], [3, 5, 8, 8], [3, 17, 7, 7], [8, 64, 8, 8], [16, 3, 32, 32], [1, 17, 32, 32], [128, 64, 8, 8]];

#[test]
fn forward_and_backward_match_candle() {
    for (i, &shape) in SHAPES.iter().enumerate() {
        let what = format!("{shape:?}");
        let [n, c, h, w] = shape;
        let hw = h * w;
        let (gx, cx) = pair(&shape, 40 + i as u64);
        let x = Var::from_tensor(&cx.to_dtype(DType::F64).unwrap()).unwrap();
        let want = x.as_tensor().mean_keepdim((2, 3)).unwrap().reshape((n, c)).unwrap();
        let got = pool::global_avg_forward(&gx).unwrap();
        assert_eq!(got.shape(), [n, c]);
        let got = got.to_vec().unwrap();
        let want64 = want.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let xs = cvec(&cx);
        for (p, (&g, &m)) in got.iter().zip(&want64).enumerate() {
            let tol = forward_tol(&xs[p * hw..][..hw], m);
            assert!((g as f64 - m).abs() <= tol, "forward {what}, plane {p}: {g} vs {m} (tol {tol})");
        }

        // L = sum(y * g): dx[n, c, h, w] = g[n, c] / hw.
        let (gg, cg) = pair(&[n, c], 140 + i as u64);
        let loss = (&want * cg.to_dtype(DType::F64).unwrap()).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let want_dx: Vec<f32> = grads
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .map(|&v| v as f32)
            .collect();
        let dx = pool::global_avg_backward(&gg, &shape).unwrap();
        assert_eq!(dx.shape(), shape);
        // One division (2.5 ulp in WGSL) against the correctly rounded f64 result.
        assert_close(&format!("backward {what}"), &dx.to_vec().unwrap(), &want_dx, 3.0 * f32::EPSILON, 0.0);
    }
}

/// More than 65535 * 256 input values: the backward's grid is split in two dimensions.
#[test]
fn backward_with_a_2d_grid() {
    let shape = [2, 2050, 64, 64];
    let hw = 64 * 64;
    let dy = random(2 * 2050, 9);
    let gdy = gpu().tensor(&[2, 2050], &dy).unwrap();
    let dx = pool::global_avg_backward(&gdy, &shape).unwrap().to_vec().unwrap();
    assert_eq!(dx.len(), 2 * 2050 * hw);
    let want: Vec<f32> = (0..dx.len()).map(|i| dy[i / hw] / hw as f32).collect();
    // Division by a power of two: exact.
    assert_close("backward, 2-d grid", &dx, &want, 0.0, 0.0);
}

#[test]
fn bad_shapes_are_errors() {
    let g = gpu();
    let err = |r: featreplay::Result<featreplay::Tensor>, want: &str| {
        let e = r.map(|_| ()).unwrap_err().to_string();
        assert!(e.contains(want), "expected '{want}' in: {e}");
    };
    err(pool::global_avg_forward(&g.zeros(&[3, 8, 8]).unwrap()), "4 dimensions");
    err(pool::global_avg_forward(&g.zeros(&[2, 3, 0, 8]).unwrap()), "empty");
    let dy = g.zeros(&[2, 3]).unwrap();
    err(pool::global_avg_backward(&dy, &[2, 4, 8, 8]), "dy must have shape");
    err(pool::global_avg_backward(&dy, &[2, 3, 8]), "4 dimensions");
    err(pool::global_avg_backward(&g.zeros(&[6]).unwrap(), &[2, 3, 8, 8]), "dy must have shape");
}
