//! What the pipeline tests (FR, DDG, DNI, sigma) share: a ResNet-8 on 3x8x8 images with 5
//! classes, a constant-rate optimiser, seeded batches and fresh devices.
#![allow(dead_code)]

use featreplay::model::resnet::{build, ResNetConfig};
use featreplay::model::ModelSpec;
use std::sync::Arc;

use featreplay::layers::predictor::PredictorConfig;
use featreplay::train::method::{by_name, MethodOptions, TrainingMethod};
use featreplay::train::schedule::HostBatch;
use featreplay::train::OptimConfig;
use featreplay::Gpu;

use super::random;

pub fn resnet8() -> ModelSpec {
    build(&ResNetConfig::basic(8, &[3, 8, 8], 5)).unwrap()
}

/// The paper's SGD at learning rate 0.05, without steps.
pub fn optim() -> OptimConfig {
    OptimConfig::constant(0.05)
}

/// `n` seeded batches of `batch` images and labels for [`resnet8`].
pub fn batches_of(n: usize, batch: usize, seed: u64) -> Vec<(Vec<f32>, Vec<u32>)> {
    (0..n as u64)
        .map(|i| {
            let x = random(batch * 3 * 8 * 8, seed + 2 * i);
            let y = random(batch, seed + 2 * i + 1).iter().map(|v| ((v + 1.0) * 2.5) as u32 % 5).collect();
            (x, y)
        })
        .collect()
}

/// `n` seeded batches of 4.
pub fn batches(n: usize, seed: u64) -> Vec<(Vec<f32>, Vec<u32>)> {
    batches_of(n, 4, seed)
}

/// The batches as module 0 receives them.
pub fn host(b: &[(Vec<f32>, Vec<u32>)]) -> impl Iterator<Item = HostBatch> + '_ {
    b.iter().map(|(x, y)| HostBatch { images: x.clone(), labels: y.clone() })
}

/// `k` fresh devices (their memory accounting starts at zero).
pub fn devices(k: usize) -> Vec<Gpu> {
    (0..k).map(|_| Gpu::open_default().unwrap()).collect()
}

/// The method named `name` with default options.
pub fn method(name: &str) -> Arc<dyn TrainingMethod> {
    by_name(name, &MethodOptions::default()).unwrap()
}

/// DNI with predictors shaped by `cfg`.
pub fn dni(cfg: PredictorConfig) -> Arc<dyn TrainingMethod> {
    by_name("dni", &MethodOptions { dni: cfg, ..MethodOptions::default() }).unwrap()
}
