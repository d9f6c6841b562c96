//! Shared test helpers: one device per test binary (lavapipe compiles each pipeline on first
//! use, so tests share it), seeded random data, candle conversions and tolerance checks.
#![allow(dead_code)]

use std::sync::OnceLock;

use candle_core::{Device, Tensor as CTensor};
use featreplay::{Gpu, Tensor};
use rand::{Rng, SeedableRng};

/// The device every test in this binary uses (FEATREPLAY_ADAPTER picks it, as for users).
pub fn gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| Gpu::open_default().unwrap_or_else(|e| panic!("no GPU adapter for tests: {e}")))
}

/// `n` values uniform in [-1, 1) from `seed`.
pub fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// A device tensor and the same values as a candle CPU tensor.
pub fn pair(shape: &[usize], seed: u64) -> (Tensor, CTensor) {
    let data = random(shape.iter().product(), seed);
    (gpu().tensor(shape, &data).unwrap(), CTensor::from_vec(data, shape, &Device::Cpu).unwrap())
}

/// Candle tensor from host data.
pub fn ct(data: &[f32], shape: &[usize]) -> CTensor {
    CTensor::from_vec(data.to_vec(), shape, &Device::Cpu).unwrap()
}

/// Candle tensor flattened to a Vec (of f32, whatever its dtype).
pub fn cvec(t: &CTensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_dtype(candle_core::DType::F32).unwrap().to_vec1::<f32>().unwrap()
}

/// Asserts `|got - want| <= atol + rtol * |want|` elementwise and reports the worst element.
/// Tolerances are f32 round-off scaled by the reduction length, stated at each call.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], rtol: f32, atol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length {} vs {}", got.len(), want.len());
    let mut worst = (0usize, 0f32);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{what}: non-finite value {g} at {i}");
        let err = (g - w).abs();
        let excess = err - (atol + rtol * w.abs());
        if excess > worst.1 {
            worst = (i, excess);
        }
    }
    let (i, excess) = worst;
    assert!(
        excess <= 0.0,
        "{what}: element {i} is {} but the reference is {} (|err| {} > atol {atol} + rtol {rtol} * |ref|)",
        got[i],
        want[i],
        (got[i] - want[i]).abs()
    );
}

/// Round-off bound for a sum of `terms` products of magnitude at most `scale`, computed in
/// two different orders (ours and the reference's): the partial sums of random-sign terms
/// reach about sqrt(terms) * scale, each of the terms additions rounds by at most half an ulp
/// of that, and the error of a random walk of roundings is about sqrt(terms) of them. We allow
/// 4x that for both sides: 4 * eps * terms * scale.
pub fn sum_atol(terms: usize, scale: f32) -> f32 {
    4.0 * f32::EPSILON * terms.max(1) as f32 * scale
}

pub mod fr_sim;
pub mod pipeline;
pub mod reference;
