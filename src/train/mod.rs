//! Training schedules over a network split into stages. For now plain backprop (BP): on one
//! device, or model-parallel over K devices (forward 1..K, then backward K..1, one device at
//! a time: the baseline Features Replay is measured against).
//!
//! Schedules know stages and layers, never kernels; tensors cross devices only through the
//! [`Transport`](crate::pipeline::Transport).

pub mod ddg;
pub mod dni;
pub mod fr;
pub mod run;
pub mod schedule;
pub mod sigma;

use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::kernels::sgd::SgdConfig;
use crate::layers::loss::{self, LossOutput};
use crate::model::{ModelSpec, Stage};
use crate::pipeline::{HostTransport, Transport};

/// SGD and its learning-rate schedule (PyTorch semantics; the paper's defaults).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OptimConfig {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
    pub nesterov: bool,
    /// Epochs (0-based, at their start) at which the learning rate is multiplied by the
    /// matching entry of `gammas` (the reference main.py's `--schedule` and `--gammas`).
    pub schedule: Vec<usize>,
    pub gammas: Vec<f32>,
    /// Learning-rate factor of the first stage (the reference FR code uses 2).
    pub first_stage_lr_scale: f32,
}

impl OptimConfig {
    /// The paper's setup: lr 0.1, Nesterov momentum 0.9, weight decay 5e-4, lr divided by 10
    /// at 50% and 75% of `epochs`.
    pub fn paper(epochs: usize) -> OptimConfig {
        OptimConfig {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 5e-4,
            nesterov: true,
            schedule: vec![epochs / 2, epochs * 3 / 4],
            gammas: vec![0.1, 0.1],
            first_stage_lr_scale: 1.0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.schedule.len() != self.gammas.len() {
            return Err(Error::Unsupported {
                op: "optimizer",
                detail: format!(
                    "--schedule has {} entries but --gammas has {}: give one gamma per schedule step",
                    self.schedule.len(),
                    self.gammas.len()
                ),
            });
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.first_stage_lr_scale.is_finite()) {
            return Err(Error::Unsupported {
                op: "optimizer",
                detail: format!("learning rate {} must be > 0", self.lr),
            });
        }
        self.sgd(self.lr).validate()
    }

    /// Learning rate during `epoch` (0-based).
    pub fn lr_at(&self, epoch: usize) -> f32 {
        self.schedule.iter().zip(&self.gammas).filter(|(s, _)| epoch >= **s).fold(self.lr, |lr, (_, g)| lr * g)
    }

    pub fn sgd(&self, lr: f32) -> SgdConfig {
        SgdConfig {
            lr,
            momentum: self.momentum,
            dampening: 0.0,
            weight_decay: self.weight_decay,
            nesterov: self.nesterov,
        }
    }
}

/// A model split into stages, each on its device.
pub struct Network {
    pub spec: ModelSpec,
    pub stages: Vec<Stage>,
    pub(crate) transport: Box<dyn Transport>,
    /// SGD steps taken (the first step initialises the momentum buffers).
    pub steps: u64,
}

impl Network {
    /// Instantiates `spec` split as `ranges`, stage k on `gpus[k]`, weights from `seed`.
    pub fn new(spec: ModelSpec, ranges: &[std::ops::Range<usize>], gpus: &[Gpu], seed: u64) -> Result<Network> {
        if gpus.len() != ranges.len() {
            return Err(Error::Unsupported {
                op: "network",
                detail: format!("{} stages but {} devices", ranges.len(), gpus.len()),
            });
        }
        let stages = ranges
            .iter()
            .zip(gpus)
            .enumerate()
            .map(|(k, (r, g))| Stage::new(k, g, &spec, r.clone(), seed))
            .collect::<Result<Vec<_>>>()?;
        Ok(Network { spec, stages, transport: Box::new(HostTransport), steps: 0 })
    }

    fn first_gpu(&self) -> &Gpu {
        &self.stages[0].gpu
    }

    fn last_gpu(&self) -> &Gpu {
        &self.stages[self.stages.len() - 1].gpu
    }

    fn input(&self, images: &[f32], batch: usize) -> Result<Tensor> {
        let mut shape = vec![batch];
        shape.extend(&self.spec.input);
        self.first_gpu().tensor(&shape, images)
    }

    /// One backprop iteration on a batch: forward through stages 1..K, loss, backward K..1,
    /// SGD on every stage. Returns the loss output (on the last device).
    pub fn bp_step(&mut self, images: &[f32], labels: &[u32], optim: &OptimConfig, lr: f32) -> Result<LossOutput> {
        let batch = labels.len();
        let mut h = self.input(images, batch)?;
        let y = loss::labels(self.last_gpu(), labels, self.spec.classes)?;
        let mut acts = Vec::with_capacity(self.stages.len());
        for k in 0..self.stages.len() {
            h = self.transport.transfer(&h, &self.stages[k].gpu)?;
            let (out, a) = self.stages[k].forward_train(&h, true)?;
            acts.push(a);
            h = out;
        }
        let (out, mut grad) = loss::forward_backward(&h, &y)?;
        for k in (0..self.stages.len()).rev() {
            let a = acts.pop().ok_or(Error::Unsupported { op: "bp", detail: "missing activations".into() })?;
            grad = self.transport.transfer(&grad, &self.stages[k].gpu)?;
            if let Some(g) = self.stages[k].backward(a, &grad, k > 0)? {
                grad = g;
            }
        }
        self.sgd_step(optim, lr)?;
        Ok(out)
    }

    /// One SGD step on every stage with its current gradients.
    pub fn sgd_step(&mut self, optim: &OptimConfig, lr: f32) -> Result<()> {
        let first = self.steps == 0;
        for (k, s) in self.stages.iter().enumerate() {
            let stage_lr = if k == 0 { lr * optim.first_stage_lr_scale } else { lr };
            let cfg = optim.sgd(stage_lr);
            for p in s.params() {
                p.sgd_step(&cfg, first)?;
            }
        }
        self.steps += 1;
        Ok(())
    }

    /// Evaluation-mode forward and loss on a batch (running BN statistics).
    pub fn eval_batch(&self, images: &[f32], labels: &[u32]) -> Result<LossOutput> {
        let mut h = self.input(images, labels.len())?;
        for s in &self.stages {
            h = self.transport.transfer(&h, &s.gpu)?;
            h = s.forward_eval(&h)?;
        }
        loss::forward(&h, &loss::labels(self.last_gpu(), labels, self.spec.classes)?)
    }

    /// Waits until every stage's device has finished its recorded work. Called once per
    /// iteration so the host never runs more than one iteration ahead of the devices.
    pub fn sync(&self) -> Result<()> {
        for s in &self.stages {
            s.gpu.sync()?;
        }
        Ok(())
    }

    /// Every tensor of the training state with PyTorch-style names: parameters, BN running
    /// statistics and SGD momentum buffers (`optimizer.momentum.<param>`).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for s in &self.stages {
            for p in s.params() {
                out.push((p.name.clone(), p.value.clone()));
            }
            for (name, t) in s.buffers() {
                out.push((name, t.clone()));
            }
            for p in s.params() {
                out.push((format!("optimizer.momentum.{}", p.name), p.momentum.clone()));
            }
        }
        out
    }
}
