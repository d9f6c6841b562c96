//! The foundation's demo job: a small residual network (stem conv-BN-ReLU, an identity basic
//! block, a downsampling option-A block, global average pool, linear) trained with SGD on a
//! fixed random dataset until it memorises it. It exercises every kernel, forward and
//! backward, on the chosen device. The next issue replaces it with real training.

use std::time::Instant;

use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::kernels::sgd::SgdConfig;
use crate::kernels::{cross_entropy, elementwise as ew, pool};
use crate::layers::{normal, BasicBlock, BasicBlockActivations, BatchNorm2d, Conv2d, Linear, Param};

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

/// stem -> block(w, w) -> block(w, 2w, stride 2) -> pool -> linear.
pub struct TinyResNet {
    pub stem: Conv2d,
    pub stem_bn: BatchNorm2d,
    pub blocks: Vec<BasicBlock>,
    pub fc: Linear,
}

struct Activations {
    x: Tensor,
    stem_out: Tensor,
    stem_bn: crate::kernels::batch_norm::BnSaved,
    stem_relu: Tensor,
    blocks: Vec<BasicBlockActivations>,
    pooled: Tensor,
    features_shape: Vec<usize>,
}

impl TinyResNet {
    pub fn new(gpu: &Gpu, cfg: &DemoConfig, rng: &mut impl Rng) -> Result<TinyResNet> {
        let w = cfg.width;
        Ok(TinyResNet {
            stem: Conv2d::new(gpu, "conv1", cfg.channels, w, 3, 1, 1, rng)?,
            stem_bn: BatchNorm2d::new(gpu, "bn1", w)?,
            blocks: vec![
                BasicBlock::new(gpu, "layer1.0", w, w, 1, rng)?,
                BasicBlock::new(gpu, "layer2.0", w, 2 * w, 2, rng)?,
            ],
            fc: Linear::new(gpu, "fc", 2 * w, cfg.classes, rng)?,
        })
    }

    pub fn params(&self) -> Vec<&Param> {
        let mut p = vec![&self.stem.weight, &self.stem_bn.gamma, &self.stem_bn.beta];
        for b in &self.blocks {
            p.extend(b.params());
        }
        p.extend([&self.fc.weight, &self.fc.bias]);
        p
    }

    fn forward_train(&self, x: &Tensor) -> Result<(Tensor, Activations)> {
        let stem_out = self.stem.forward(x)?;
        let (bn, stem_bn) = self.stem_bn.forward_train(&stem_out, true)?;
        let stem_relu = ew::relu_forward(&bn)?;
        let mut h = stem_relu.clone();
        let mut blocks = Vec::new();
        for b in &self.blocks {
            let (out, acts) = b.forward_train(&h, true)?;
            blocks.push(acts);
            h = out;
        }
        let pooled = pool::global_avg_forward(&h)?;
        let logits = self.fc.forward(&pooled)?;
        let features_shape = h.shape().to_vec();
        Ok((logits, Activations { x: x.clone(), stem_out, stem_bn, stem_relu, blocks, pooled, features_shape }))
    }

    fn backward(&mut self, acts: &Activations, dlogits: &Tensor) -> Result<()> {
        let dpooled = self.fc.backward(&acts.pooled, dlogits)?;
        let mut dh = pool::global_avg_backward(&dpooled, &acts.features_shape)?;
        for (b, a) in self.blocks.iter_mut().zip(&acts.blocks).rev() {
            dh = b.backward(a, &dh)?;
        }
        let dbn = ew::relu_backward(&acts.stem_relu, &dh)?;
        let dstem = self.stem_bn.backward(&acts.stem_out, &dbn, &acts.stem_bn)?;
        self.stem.backward_weight(&acts.x, &dstem)
    }
}

/// Trains [`TinyResNet`] on a fixed random dataset, calling `on_epoch` after each epoch.
pub fn run(gpu: &Gpu, cfg: &DemoConfig, mut on_epoch: impl FnMut(&EpochReport)) -> Result<Vec<EpochReport>> {
    if cfg.batch == 0
        || cfg.samples < cfg.batch
        || cfg.classes < 2
        || cfg.size < 4
        || cfg.width < 2
        || !cfg.width.is_multiple_of(2)
    {
        return Err(Error::Unsupported {
            op: "demo",
            detail: format!(
                "need batch >= 1, samples >= batch, classes >= 2, size >= 4 and an even width >= 2 (got {cfg:?})"
            ),
        });
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let mut model = TinyResNet::new(gpu, cfg, &mut rng)?;
    let image = cfg.channels * cfg.size * cfg.size;
    let images = normal(&mut rng, cfg.samples * image, 1.0);
    let labels: Vec<u32> = (0..cfg.samples).map(|_| rng.random_range(0..cfg.classes as u32)).collect();
    let sgd = SgdConfig { lr: cfg.lr, momentum: 0.9, dampening: 0.0, weight_decay: 5e-4, nesterov: true };
    let batches = cfg.samples / cfg.batch;
    let mut reports = Vec::new();
    let mut first_step = true;
    for epoch in 1..=cfg.epochs {
        gpu.reset_peak_memory();
        let t0 = Instant::now();
        // Loss and correct counts accumulate on the device: one read per epoch, not per step.
        let loss_sum = gpu.zeros(&[1])?;
        let correct_sum = gpu.zeros(&[2])?;
        for b in 0..batches {
            let range = b * cfg.batch..(b + 1) * cfg.batch;
            let x = gpu.tensor(
                &[cfg.batch, cfg.channels, cfg.size, cfg.size],
                &images[range.start * image..range.end * image],
            )?;
            let y = cross_entropy::labels_tensor(gpu, &labels[range], cfg.classes)?;
            let (logits, acts) = model.forward_train(&x)?;
            let out = cross_entropy::forward_backward(&logits, &y)?;
            let dlogits = out.dlogits.as_ref().ok_or(Error::Unsupported {
                op: "demo",
                detail: "cross_entropy::forward_backward returned no gradient".into(),
            })?;
            model.backward(&acts, dlogits)?;
            for p in model.params() {
                p.sgd_step(&sgd, first_step)?;
            }
            first_step = false;
            ew::axpy(1.0, &out.loss, &loss_sum)?;
            ew::axpy(1.0, &out.correct, &correct_sum)?;
        }
        let loss = loss_sum.to_vec()?[0] / batches as f32;
        let accuracy = correct_sum.to_vec()?[0] / (batches * cfg.batch) as f32;
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
            return Err(Error::Unsupported {
                op: "demo",
                detail: format!("loss became {loss} at epoch {epoch}; lower --lr"),
            });
        }
        on_epoch(&report);
        reports.push(report);
    }
    Ok(reports)
}
