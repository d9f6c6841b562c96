//! Training over a network split into stages: the [`Network`] and its optimiser, the
//! pipeline every method runs on ([`schedule`]), the methods behind one seam ([`method`],
//! one file each: [`bp`], [`fr`], [`ddg`], [`dni`], [`gpipe`], [`dgl`]), whole runs
//! ([`run`]), sigma ([`sigma`]) and evaluation ([`eval`]).
//!
//! Schedules know stages and layers, never kernels; tensors cross devices only through the
//! [`Transport`](crate::pipeline::Transport).

pub mod bp;
pub mod ddg;
pub mod dgl;
pub mod dni;
pub mod eval;
pub mod fr;
pub mod gpipe;
pub mod method;
pub mod resume;
pub mod run;
pub mod schedule;
pub mod sigma;
pub mod stage_state;

use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::kernels::sgd::SgdConfig;
use crate::layers::loss::{self, LossOutput};
use crate::model::{ModelSpec, Stage};
use crate::pipeline::{HostTransport, Transport};

/// Divergence checks of every stage in flight ([`Network::start_check_finite`]).
pub struct PendingChecks(Vec<crate::model::PendingCheck>);

impl PendingChecks {
    /// Waits for every stage's counters; the first stage that saw a non-finite value errors.
    pub fn finish(self) -> Result<()> {
        let mut first = Ok(());
        for c in self.0 {
            let r = c.finish();
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

/// SGD and its learning-rate schedule (PyTorch semantics; the paper's defaults).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OptimConfig {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
    pub nesterov: bool,
    /// Points of training, in epochs, at which the learning rate is multiplied by the
    /// matching entry of `gammas` (the reference main.py's `--schedule` and `--gammas`). A
    /// whole number is the start of that (0-based) epoch; a fraction falls inside an epoch
    /// and takes effect at the iteration nearest to it (`round(point * batches per epoch)`),
    /// so 0.5 is the middle of the first epoch.
    pub schedule: Vec<f64>,
    pub gammas: Vec<f32>,
    /// Learning-rate factor of the first stage (the reference FR code uses 2).
    pub first_stage_lr_scale: f32,
}

impl OptimConfig {
    /// The paper's setup: lr 0.1, Nesterov momentum 0.9, weight decay 5e-4, lr divided by 10
    /// at 50% and 75% of training. The steps are placed at 50% and 75% of the run's
    /// iterations, not rounded down to whole epochs: that is the paper's epochs 150 and 225
    /// for 300 epochs, and it leaves a 1-, 2- or 3-epoch run at the base rate for half of its
    /// iterations (rounding to epochs put a 1-epoch run at lr/100 throughout).
    pub fn paper(epochs: usize) -> OptimConfig {
        OptimConfig {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 5e-4,
            nesterov: true,
            schedule: Self::default_schedule(epochs),
            gammas: vec![0.1, 0.1],
            first_stage_lr_scale: 1.0,
        }
    }

    /// The default steps for a run of `epochs`: 50% and 75% of it.
    pub fn default_schedule(epochs: usize) -> Vec<f64> {
        vec![epochs as f64 * 0.5, epochs as f64 * 0.75]
    }

    /// The paper's optimiser at a constant learning rate `lr` (no schedule).
    pub fn constant(lr: f32) -> OptimConfig {
        OptimConfig { lr, schedule: vec![], gammas: vec![], ..OptimConfig::paper(1) }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |detail: String| Err(Error::InvalidConfig { op: "optimizer", detail });
        if self.schedule.len() != self.gammas.len() {
            return bad(format!(
                "--schedule has {} entries but --gammas has {}: give one gamma per schedule step",
                self.schedule.len(),
                self.gammas.len()
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("--lr {} must be a finite number > 0", self.lr));
        }
        if !(self.first_stage_lr_scale.is_finite() && self.first_stage_lr_scale > 0.0) {
            return bad(format!("--first-module-lr-scale {} must be a finite number > 0", self.first_stage_lr_scale));
        }
        if let Some(g) = self.gammas.iter().find(|g| !(g.is_finite() && **g > 0.0)) {
            return bad(format!("--gammas {g}: every gamma must be a finite number > 0"));
        }
        if let Some(s) = self.schedule.iter().find(|s| !(s.is_finite() && **s >= 0.0)) {
            return bad(format!("--schedule {s}: every step must be a finite number of epochs >= 0"));
        }
        if !(self.momentum.is_finite() && (0.0..1.0).contains(&self.momentum)) {
            return bad(format!("--momentum {} must be in [0, 1)", self.momentum));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!("--decay {} must be a finite number >= 0", self.weight_decay));
        }
        // Every rate the run can reach (including the first module's) must be finite.
        let mut lr = self.lr as f64 * self.first_stage_lr_scale.max(1.0) as f64;
        for g in &self.gammas {
            lr *= *g as f64;
            if !(lr.is_finite() && lr <= f32::MAX as f64) {
                return bad(format!("--gammas {:?} take the learning rate beyond f32's range", self.gammas));
            }
        }
        if self.lr as f64 * self.first_stage_lr_scale as f64 > f32::MAX as f64 {
            return bad(format!(
                "--lr {} x --first-module-lr-scale {} is beyond f32's range",
                self.lr, self.first_stage_lr_scale
            ));
        }
        self.sgd(self.lr).validate()
    }

    /// The iteration (0-based, global) at which schedule point `point` (in epochs) takes
    /// effect with `per_epoch` iterations per epoch.
    pub fn step_iteration(point: f64, per_epoch: usize) -> u64 {
        (point * per_epoch as f64).round() as u64
    }

    /// Learning rate of global iteration `iteration` (0-based) with `per_epoch` iterations
    /// per epoch.
    pub fn lr_at(&self, iteration: u64, per_epoch: usize) -> f32 {
        self.schedule
            .iter()
            .zip(&self.gammas)
            .filter(|(s, _)| iteration >= Self::step_iteration(**s, per_epoch))
            .fold(self.lr, |lr, (_, g)| lr * g)
    }

    /// The first iteration after `iteration` at which the learning rate changes, if any.
    pub fn next_change(&self, iteration: u64, per_epoch: usize) -> Option<u64> {
        self.schedule.iter().map(|s| Self::step_iteration(*s, per_epoch)).filter(|&i| i > iteration).min()
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
            return Err(Error::InvalidConfig {
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
            self.stages[k].watch_output(&out)?;
            acts.push(a);
            h = out;
        }
        let (out, mut grad) = loss::forward_backward(&h, &y)?;
        for k in (0..self.stages.len()).rev() {
            let a = acts.pop().ok_or(Error::Internal { op: "bp", detail: "missing activations".into() })?;
            grad = self.transport.transfer(&grad, &self.stages[k].gpu)?;
            if let Some(g) = self.stages[k].backward(a, &grad, k > 0)? {
                self.stages[k].watch_input_grad(&g)?;
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
            s.sgd_step(&optim.sgd(stage_lr), first)?;
        }
        self.steps += 1;
        Ok(())
    }

    /// Errors with [`Error::NonFinite`] when any stage's outputs, gradients, weights, momentum
    /// or (after [`Self::watch_buffers`]) batch-norm statistics have held a NaN or an infinity.
    /// Reads one small counter buffer per stage (waits for the devices).
    pub fn check_finite(&self) -> Result<()> {
        self.start_check_finite()?.finish()
    }

    /// [`Self::check_finite`] without waiting yet: every stage's counters are copied after
    /// the work recorded so far; [`PendingChecks::finish`] waits for those copies only.
    pub fn start_check_finite(&self) -> Result<PendingChecks> {
        Ok(PendingChecks(self.stages.iter().map(|s| s.start_check_finite(self.steps)).collect::<Result<_>>()?))
    }

    /// Counts the non-finite values of every stage's batch-norm running statistics (checked
    /// by the next [`Self::check_finite`]).
    pub fn watch_buffers(&self) -> Result<()> {
        for s in &self.stages {
            s.watch_buffers()?;
        }
        Ok(())
    }

    /// Evaluation-mode logits `[N, classes]` of a batch of `n` images (on the last device).
    pub fn eval_logits(&self, images: &[f32], n: usize) -> Result<Tensor> {
        let mut h = self.input(images, n)?;
        for s in &self.stages {
            h = self.transport.transfer(&h, &s.gpu)?;
            h = s.forward_eval(&h)?;
        }
        Ok(h)
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

    /// The model's tensors with PyTorch-style names: parameters and BN running statistics
    /// (what evaluation needs).
    pub fn model_state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for s in &self.stages {
            for p in s.params() {
                out.push((p.name.clone(), p.value.clone()));
            }
            for (name, t) in s.buffers() {
                out.push((name, t.clone()));
            }
        }
        out
    }

    /// The BN update counters (`<bn>.num_batches_tracked`, int64 scalars in checkpoints).
    pub fn counter_state(&self) -> Vec<(String, &std::sync::atomic::AtomicU64)> {
        self.stages.iter().flat_map(|s| s.counters()).collect()
    }

    /// Stage `k`'s part of [`Self::state`]: its parameters, BN running statistics and SGD
    /// momentum buffers.
    pub fn stage_state(&self, k: usize) -> Vec<(String, Tensor)> {
        let s = &self.stages[k];
        let mut out: Vec<(String, Tensor)> = s.params().iter().map(|p| (p.name.clone(), p.value.clone())).collect();
        out.extend(s.buffers().into_iter().map(|(name, t)| (name, t.clone())));
        out.extend(s.params().iter().map(|p| (crate::checkpoint::momentum_name(&p.name), p.momentum.clone())));
        out
    }

    /// Every f32 tensor of the training state with PyTorch-style names: parameters, BN running
    /// statistics and SGD momentum buffers (`optimizer.momentum.<param>`).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = self.model_state();
        for s in &self.stages {
            for p in s.params() {
                out.push((crate::checkpoint::momentum_name(&p.name), p.momentum.clone()));
            }
        }
        out
    }
}
