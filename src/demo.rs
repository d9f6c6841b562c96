//! The foundation's demo job: a small residual network (stem conv-BN-ReLU, an identity basic
//! block, a downsampling option-A block, global average pool, linear) trained with SGD on a
//! fixed random dataset until it memorises it. It exercises every kernel, forward and
//! backward, on the chosen device. The next issue replaces it with real training.

use std::time::Instant;

use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::kernels::shortcut::ChannelPad;
use crate::layers::loss::MetricsAccumulator;
use crate::layers::normal;
use crate::model::{LayerSpec, ModelSpec};
use crate::train::{Network, OptimConfig};

/// What the demo trains on and how.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    pub samples: usize,
    pub batch: usize,
    pub channels: usize,
    pub size: usize,
    pub classes: usize,
    pub width: usize,
    pub epochs: usize,
    pub lr: f32,
    pub seed: u64,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            samples: 512,
            batch: 64,
            channels: 3,
            size: 16,
            classes: 10,
            width: 16,
            epochs: 8,
            lr: 0.05,
            seed: 0,
        }
    }
}

/// One epoch's summary.
#[derive(Debug, Clone, Copy)]
pub struct EpochReport {
    pub epoch: usize,
    pub loss: f32,
    pub accuracy: f32,
    pub seconds: f64,
    pub images_per_second: f64,
    pub peak_memory_bytes: u64,
}

/// stem conv-BN-ReLU -> block(w, w) -> block(w, 2w, stride 2) -> pool -> linear, as a
/// model description trained by the same [`Network`] as real runs.
pub fn tiny_resnet(cfg: &DemoConfig) -> ModelSpec {
    let w = cfg.width;
    ModelSpec {
        name: format!("tiny-resnet-{w}"),
        input: vec![cfg.channels, cfg.size, cfg.size],
        classes: cfg.classes,
        layers: vec![
            LayerSpec::Conv {
                name: "conv1".into(),
                in_channels: cfg.channels,
                out_channels: w,
                kernel: 3,
                stride: 1,
                pad: 1,
            },
            LayerSpec::BatchNorm { name: "bn1".into(), channels: w },
            LayerSpec::Relu,
            LayerSpec::Basic {
                name: "layer1.0".into(),
                in_channels: w,
                out_channels: w,
                stride: 1,
                shortcut_pad: ChannelPad::Both,
            },
            LayerSpec::Basic {
                name: "layer2.0".into(),
                in_channels: w,
                out_channels: 2 * w,
                stride: 2,
                shortcut_pad: ChannelPad::Both,
            },
            LayerSpec::GlobalAvgPool,
            LayerSpec::Linear { name: "linear".into(), in_features: 2 * w, out_features: cfg.classes },
        ],
    }
}

impl DemoConfig {
    /// Checks the configuration and its memory (the random images on the host, one training
    /// step on the device) before anything is allocated.
    pub fn check(&self) -> Result<()> {
        let cfg = self;
        if cfg.batch == 0
            || cfg.samples < cfg.batch
            || cfg.classes < 2
            || cfg.size < 4
            || cfg.width < 2
            || !cfg.width.is_multiple_of(2)
        {
            return Err(Error::InvalidConfig {
                op: "demo",
                detail: format!(
                    "need batch >= 1, samples >= batch, classes >= 2, size >= 4 and an even width >= 2 (got {cfg:?})"
                ),
            });
        }
        let spec = tiny_resnet(cfg);
        let whole = crate::model::split(&spec, 1, crate::model::SplitPolicy::Even)?;
        let step = crate::model::plan(&spec, &whole, cfg.batch)?[0].training_bytes();
        let images = (cfg.samples as u64)
            .saturating_mul(cfg.channels as u64)
            .saturating_mul((cfg.size as u64).saturating_mul(cfg.size as u64))
            .saturating_mul(4);
        let what =
            format!("--samples {} of {}x{} images with --width {} need", cfg.samples, cfg.size, cfg.size, cfg.width);
        crate::data::refuse_beyond_host_memory("demo", &what, step.saturating_add(images), "", "")
    }
}

/// Trains [`tiny_resnet`] on a fixed random dataset, calling `on_epoch` after each epoch.
pub fn run(gpu: &Gpu, cfg: &DemoConfig, mut on_epoch: impl FnMut(&EpochReport)) -> Result<Vec<EpochReport>> {
    cfg.check()?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let spec = tiny_resnet(cfg);
    let one_module = crate::model::split(&spec, 1, crate::model::SplitPolicy::Even)?;
    let mut net = Network::new(spec, &one_module, std::slice::from_ref(gpu), cfg.seed)?;
    let image = cfg.channels * cfg.size * cfg.size;
    let images = normal(&mut rng, cfg.samples * image, 1.0);
    let labels: Vec<u32> = (0..cfg.samples).map(|_| rng.random_range(0..cfg.classes as u32)).collect();
    let optim = OptimConfig { lr: cfg.lr, schedule: vec![], gammas: vec![], ..OptimConfig::paper(cfg.epochs) };
    let batches = cfg.samples / cfg.batch;
    let mut reports = Vec::new();
    for epoch in 1..=cfg.epochs {
        gpu.reset_peak_memory();
        let t0 = Instant::now();
        // Loss and correct counts accumulate on the device: one read per epoch, not per step.
        let mut acc = MetricsAccumulator::new(gpu)?;
        for b in 0..batches {
            let range = b * cfg.batch..(b + 1) * cfg.batch;
            let out = net.bp_step(&images[range.start * image..range.end * image], &labels[range], &optim, cfg.lr)?;
            acc.add(&out, cfg.batch)?;
        }
        let m = acc.read()?;
        let (loss, accuracy) = (m.loss as f32, m.top1 as f32);
        let seconds = t0.elapsed().as_secs_f64();
        let report = EpochReport {
            epoch,
            loss,
            accuracy,
            seconds,
            images_per_second: (batches * cfg.batch) as f64 / seconds,
            peak_memory_bytes: gpu.memory().peak_bytes,
        };
        if !loss.is_finite() {
            return Err(Error::Diverged { epoch, reason: format!("loss {loss}") });
        }
        on_epoch(&report);
        reports.push(report);
    }
    Ok(reports)
}
