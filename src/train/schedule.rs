//! The decoupled schedules of `docs/schedules.md` (Features Replay, DDG and
//! DNI) on one worker thread per stage, with bounded channels between neighbours: features
//! (with the labels) go up, gradients go down. This module owns the machinery every method
//! shares (receiving the input, the last module's exact step, sending, the gradient one
//! iteration late, epoch boundaries, failures); each method's step for a module k < K - 1 is
//! in its own file: [`super::fr`], [`super::ddg`], [`super::dni`].
//!
//! Module k (0-based here; the spec's k is 1-based) has delay `d_k = K - 1 - k`. In every
//! method the last module runs forward, loss and backward on its fresh input, sends the input
//! gradient down and updates its weights (with K = 1 every method is backprop).
//!
//! Ordering: the spec lists play, replay, then "wait for the gradient sent during this
//! iteration". A module here plays iteration t first and only then waits for the gradient
//! sent during t-1, which it needs at t. The numbers are the same (gradients are consumed in
//! the order they were sent), but no module waits for the module above it to finish an
//! iteration before starting the next one, so modules really run concurrently.

use std::collections::VecDeque;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use super::{Network, OptimConfig};
use crate::error::{Error, Result};
use crate::gpu::Tensor;
use crate::layers::loss::{self, MetricsAccumulator};
use crate::layers::predictor::{GradientPredictor, PredictorActivations, PredictorConfig};
use crate::model::{Stage, StageActivations};
use crate::pipeline::{InFlight, Transport};
use crate::trace::Tracer;

/// Which decoupled method a pipeline runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Features Replay: keep inputs, replay them with current weights.
    Fr,
    /// Delayed gradients: keep whole graphs (activations and the weights that built them).
    Ddg,
    /// Synthetic gradients from a per-module predictor.
    Dni(PredictorConfig),
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Method::Fr => "fr",
            Method::Ddg => "ddg",
            Method::Dni(_) => "dni",
        }
    }

    /// Iterations between module k computing on a batch and receiving the gradient the module
    /// above sends for it: d_k for FR and DDG (the gradient arrives d_k iterations later),
    /// 1 for DNI (the true gradient trains the predictor one iteration later).
    fn lag(&self, delay: u64) -> u64 {
        match self {
            Method::Fr | Method::Ddg => delay,
            Method::Dni(_) => 1,
        }
    }
}

/// A forward graph kept by DDG until its gradient arrives: the activations and the weights
/// that produced them (the gradient is evaluated at those stale weights).
pub struct StoredGraph {
    pub acts: StageActivations,
    pub weights: Vec<Tensor>,
}

/// What one stage carries from one iteration (and epoch) to the next.
#[derive(Default)]
pub struct StageState {
    /// FR: inputs played but not yet replayed, oldest first (at most d_k + 1 during a step).
    pub input_history: VecDeque<Tensor>,
    /// DDG: graphs built but not yet backpropagated, oldest first (at most d_k + 1).
    pub graph_history: VecDeque<StoredGraph>,
    /// DNI: this module's gradient predictor M_k (modules k < K - 1).
    pub predictor: Option<GradientPredictor>,
    /// DNI: the last prediction, waiting for the true gradient to train M_k.
    pub prediction: Option<PredictorActivations>,
    /// DNI: SGD steps of the predictor.
    pub predictor_steps: u64,
    /// A gradient from the module above that arrived but has not been used yet (held across
    /// epoch boundaries).
    pub pending_grad: Option<Tensor>,
    /// SGD steps this stage has taken (its first step initialises momentum buffers).
    pub steps: u64,
}

/// The state of a decoupled pipeline over a whole network.
pub struct PipelineState {
    pub method: Method,
    /// Iterations run so far (the spec's t of the next iteration).
    pub iteration: u64,
    pub stages: Vec<StageState>,
    /// The last K batches fed, oldest first (for measurements on the batch a module's
    /// gradient belongs to).
    pub recent_batches: VecDeque<HostBatch>,
}

impl PipelineState {
    /// A fresh pipeline of `stages` modules; for DNI, `net` gets a predictor per module k <
    /// K - 1 on that module's device.
    pub fn new(method: Method, net: &Network, seed: u64) -> Result<PipelineState> {
        let k_total = net.stages.len();
        let mut stages: Vec<StageState> = (0..k_total).map(|_| StageState::default()).collect();
        if let Method::Dni(cfg) = method {
            for (k, st) in stages.iter_mut().enumerate().take(k_total.saturating_sub(1)) {
                let stage = &net.stages[k];
                let features = net.spec.input_of(stage.first_layer + stage.layers.len())?;
                st.predictor = Some(GradientPredictor::new(
                    &stage.gpu,
                    &format!("{}dni.stage{k}", super::run::TRAINING_PREFIX),
                    &features,
                    &cfg,
                    seed.wrapping_add(k as u64),
                )?);
            }
        }
        Ok(PipelineState { method, iteration: 0, stages, recent_batches: VecDeque::new() })
    }

    /// A fresh Features Replay pipeline of `stages` modules.
    pub fn fr(stages: usize) -> PipelineState {
        PipelineState {
            method: Method::Fr,
            iteration: 0,
            stages: (0..stages).map(|_| StageState::default()).collect(),
            recent_batches: VecDeque::new(),
        }
    }

    /// Inputs held by each stage (FR: d_k + 1 at most, d_k between iterations).
    pub fn history_lengths(&self) -> Vec<usize> {
        self.stages.iter().map(|s| s.input_history.len()).collect()
    }

    /// Graphs held by each stage (DDG: d_k + 1 at most, d_k between iterations).
    pub fn graph_counts(&self) -> Vec<usize> {
        self.stages.iter().map(|s| s.graph_history.len()).collect()
    }
}

/// A batch as module 0 receives it.
#[derive(Debug, Clone)]
pub struct HostBatch {
    pub images: Vec<f32>,
    pub labels: Vec<u32>,
}

/// Features going up, with the labels the last module needs.
pub(super) struct Up {
    h: Tensor,
    labels: Vec<u32>,
}

pub(super) fn stopped(k: usize, what: &str) -> Error {
    Error::Unsupported { op: "pipeline", detail: format!("stage {k} stopped: {what} (another stage failed)") }
}

/// Everything one stage's worker needs for an epoch.
pub(super) struct Worker<'a> {
    pub(super) k: usize,
    stages: usize,
    pub(super) method: Method,
    pub(super) stage: &'a mut Stage,
    pub(super) state: &'a mut StageState,
    first_iteration: u64,
    iterations: usize,
    end_of_epoch: bool,
    classes: usize,
    optim: &'a OptimConfig,
    lr: f32,
    transport: &'a dyn Transport,
    next_gpu: Option<crate::gpu::Gpu>,
    prev_gpu: Option<crate::gpu::Gpu>,
    data_in: Option<Receiver<HostBatch>>,
    up_in: Option<Receiver<Up>>,
    up_out: Option<SyncSender<Up>>,
    down_in: Option<Receiver<Tensor>>,
    down_out: Option<SyncSender<Tensor>>,
    /// Per-sample input shape (module 0 builds its input tensor from host batches).
    input_shape: Vec<usize>,
    /// Test hook: fail at this global iteration.
    fail_at: Option<u64>,
    tracer: Option<&'a Tracer>,
}

impl Worker<'_> {
    /// Runs `f` as phase `name` of iteration `t`: when tracing, a span that ends once the
    /// device has finished the phase's work.
    pub(super) fn phase<T>(&mut self, name: &'static str, t: u64, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        match self.tracer {
            None => f(self),
            Some(tr) => {
                let span = tr.span(self.k, name, t);
                let out = f(self)?;
                self.stage.gpu.sync()?;
                span.end();
                Ok(out)
            }
        }
    }

    pub(super) fn delay(&self) -> u64 {
        (self.stages - 1 - self.k) as u64
    }

    /// Between iterations a module holds at most d_k stored inputs or graphs: more means the
    /// schedule lost track of the gradients it owes.
    pub(super) fn check_held(&self, held: usize, what: &str, t: u64) -> Result<()> {
        if held > self.delay() as usize {
            return Err(Error::Unsupported {
                op: "pipeline",
                detail: format!("stage {} holds {held} {what} after iteration {t}, more than its delay", self.k),
            });
        }
        Ok(())
    }

    pub(super) fn step_lr(&self) -> f32 {
        if self.k == 0 {
            self.lr * self.optim.first_stage_lr_scale
        } else {
            self.lr
        }
    }

    /// SGD on the stage's parameters with their current gradients.
    pub(super) fn sgd(&mut self) -> Result<()> {
        let cfg = self.optim.sgd(self.step_lr());
        self.stage.sgd_step(&cfg, self.state.steps == 0)?;
        self.state.steps += 1;
        Ok(())
    }

    /// SGD on the DNI predictor's parameters (same optimiser and learning rate as its module).
    pub(super) fn predictor_sgd(&mut self) -> Result<()> {
        let cfg = self.optim.sgd(self.step_lr());
        if let Some(p) = &self.state.predictor {
            p.sgd_step(&cfg, self.state.predictor_steps == 0)?;
        }
        self.state.predictor_steps += 1;
        Ok(())
    }

    /// Sends the gradient of this module's input down (module 0 has nobody to send to).
    pub(super) fn send_down(&mut self, dx: Option<Tensor>, t: u64) -> Result<()> {
        let Some(dx) = dx else { return Ok(()) };
        self.stage.watch_input_grad(&dx)?;
        let moving: Option<InFlight> = match &self.prev_gpu {
            Some(prev) if self.down_out.is_some() => Some(self.transport.start(&dx, prev)?),
            _ => None,
        };
        drop(dx);
        if let Some(moving) = moving {
            self.phase("send", t, |w| {
                let dx = moving.finish()?;
                w.down_out
                    .as_ref()
                    .ok_or_else(|| stopped(w.k, "no stage below"))?
                    .send(dx)
                    .map_err(|_| stopped(w.k, "the stage below is gone"))
            })?;
        }
        Ok(())
    }

    /// Sends this module's output (with the labels) to the module above.
    pub(super) fn send_up(&mut self, h: Tensor, labels: Vec<u32>, t: u64) -> Result<()> {
        let next = self.next_gpu.clone().ok_or_else(|| stopped(self.k, "no stage above"))?;
        self.stage.watch_output(&h)?;
        // The features leave now, before the replay is recorded: on lavapipe, waiting for a
        // copy submitted before the replay also waited for the replay (measured: FR fell from
        // 1.39x to 0.91x of BP at K = 2), so deferring the wait serialised the stages. See
        // the README.
        let up = self.transport.start(&h, &next)?;
        drop(h);
        self.phase("send", t, |w| {
            let h = up.finish()?;
            w.up_out
                .as_ref()
                .ok_or_else(|| stopped(w.k, "no stage above"))?
                .send(Up { h, labels })
                .map_err(|_| stopped(w.k, "the stage above is gone"))
        })
    }

    /// The gradient the module above sent one iteration ago (kept from the previous epoch,
    /// or waited for).
    pub(super) fn take_gradient(&mut self, t: u64) -> Result<Tensor> {
        match self.state.pending_grad.take() {
            Some(g) => Ok(g),
            None => self.phase("wait gradient", t, |w| {
                w.down_in
                    .as_ref()
                    .ok_or_else(|| stopped(w.k, "no gradient source"))?
                    .recv()
                    .map_err(|_| stopped(w.k, "the stage above is gone"))
            }),
        }
    }

    /// The input of this iteration: the batch for module 0, the features from below else.
    fn receive_input(&mut self) -> Result<(Tensor, Vec<u32>)> {
        if let Some(rx) = &self.data_in {
            let b = rx.recv().map_err(|_| stopped(self.k, "the data feed ended early"))?;
            let mut shape = vec![b.labels.len()];
            shape.extend(&self.input_shape);
            return Ok((self.stage.gpu.tensor(&shape, &b.images)?, b.labels));
        }
        let up = self.up_in.as_ref().ok_or_else(|| stopped(self.k, "no input"))?;
        let m = up.recv().map_err(|_| stopped(self.k, "the stage below is gone"))?;
        Ok((m.h, m.labels))
    }

    /// The last module, in every method: forward, loss, backward, update (exact backprop on
    /// its input).
    fn last_step(
        &mut self,
        x: Tensor,
        labels: Vec<u32>,
        t: u64,
        metrics: &mut Option<MetricsAccumulator>,
    ) -> Result<()> {
        let y = loss::labels(&self.stage.gpu, &labels, self.classes)?;
        let (out, acts) = self.phase("forward", t, |w| w.stage.forward_train(&x, true))?;
        drop(x);
        self.stage.watch_output(&out)?;
        let (lo, dlogits) = self.phase("loss", t, |_| loss::forward_backward(&out, &y))?;
        let dx = self.phase("backward", t, |w| w.stage.backward(acts, &dlogits, w.k > 0))?;
        self.send_down(dx, t)?;
        self.phase("update", t, |w| w.sgd())?;
        if let Some(m) = metrics.as_mut() {
            m.add(&lo, labels.len())?;
        }
        Ok(())
    }

    fn run(mut self, metrics: &mut Option<MetricsAccumulator>) -> Result<()> {
        // The divergence counters of the previous iteration, read while this one runs.
        let mut pending: Option<crate::model::PendingCheck> = None;
        for i in 0..self.iterations {
            let t = self.first_iteration + i as u64;
            if self.fail_at == Some(t) {
                return Err(Error::Unsupported {
                    op: "pipeline",
                    detail: format!("injected failure in stage {} at iteration {t}", self.k),
                });
            }
            let (x, labels) = self.phase("receive", t, |w| w.receive_input())?;
            if self.k + 1 == self.stages {
                self.last_step(x, labels, t, metrics)?;
            } else {
                match self.method {
                    Method::Fr => self.fr_step(x, labels, t)?,
                    Method::Ddg => self.ddg_step(x, labels, t)?,
                    Method::Dni(_) => self.dni_step(x, labels, t)?,
                }
            }
            // The one host wait of the iteration: this iteration's counters are copied behind
            // its work, then the previous iteration's are waited for, so the device runs this
            // iteration while the stage receives and records the next one.
            let next = self.stage.start_check_finite(t)?;
            if let Some(p) = pending.replace(next) {
                p.finish()?;
            }
            self.check_predictor(t)?;
        }
        if let Some(p) = pending.take() {
            p.finish()?;
        }
        // The module above sent a gradient during the last iteration if it was past its own
        // warm-up then; keep it for this module's next step (next call).
        let last = self.first_iteration + self.iterations as u64;
        if self.k + 1 < self.stages
            && self.iterations > 0
            && last >= self.method.lag(self.delay())
            && self.state.pending_grad.is_none()
        {
            let rx = self.down_in.as_ref().ok_or_else(|| stopped(self.k, "no gradient source"))?;
            self.state.pending_grad = Some(rx.recv().map_err(|_| stopped(self.k, "the stage above is gone"))?);
        }
        if self.end_of_epoch {
            self.finish_epoch()?;
            // The running statistics are checked once an epoch, before evaluation and the
            // checkpoint read them.
            self.stage.watch_buffers()?;
            self.check_finite(last.saturating_sub(1))?;
        }
        Ok(())
    }

    /// Errors when anything this stage (or its DNI predictor) trains or produces has held a
    /// NaN or an infinity: a diverged module stops the run at once, whatever the loss says.
    fn check_finite(&self, t: u64) -> Result<()> {
        self.stage.check_finite(t)?;
        self.check_predictor(t)
    }

    /// The DNI predictor's part of [`Self::check_finite`].
    fn check_predictor(&self, t: u64) -> Result<()> {
        if let Some(p) = &self.state.predictor {
            let found = p.non_finite()?;
            if !found.is_empty() {
                return Err(Error::NonFinite {
                    stage: self.k,
                    iteration: t,
                    detail: format!("{} (its DNI gradient predictor)", crate::layers::watch::describe(&found)),
                });
            }
        }
        Ok(())
    }
}

/// How a call of [`run_epoch`] runs: the optimiser and learning rate, whether it ends an
/// epoch, and optionally a timeline and an injected failure.
#[derive(Clone, Copy)]
pub struct EpochOptions<'a> {
    pub optim: &'a OptimConfig,
    pub lr: f32,
    /// The call ends an epoch (DNI then trains its predictors on the last true gradients,
    /// so nothing is in flight at a checkpoint). False for a chunk within an epoch (between
    /// measurements), which must leave the trajectory exactly as one call would.
    pub end_of_epoch: bool,
    pub fail: Option<InjectedFailure>,
    pub tracer: Option<&'a Tracer>,
}

impl<'a> EpochOptions<'a> {
    pub fn new(optim: &'a OptimConfig, lr: f32) -> Self {
        EpochOptions { optim, lr, end_of_epoch: true, fail: None, tracer: None }
    }
}

/// Both ends of a bounded channel, taken by the two workers it links.
type Link<T> = (Option<SyncSender<T>>, Option<Receiver<T>>);

/// Where and when to inject a failure (tests of error propagation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InjectedFailure {
    pub stage: usize,
    pub iteration: u64,
}

/// Runs `batches` (one iteration each) through the network's stages with the state's method,
/// one worker thread per stage, and returns the training metrics of the last module. The
/// pipeline state (histories, a gradient in flight, step counts) carries over between
/// calls, so epochs continue one pipeline. A failing stage ends the epoch with its error; the others stop
/// when their channels close, so nothing waits forever.
pub fn run_epoch(
    net: &mut Network,
    state: &mut PipelineState,
    batches: impl Iterator<Item = HostBatch>,
    iterations: usize,
    opts: &EpochOptions,
) -> Result<crate::layers::loss::Metrics> {
    let EpochOptions { optim, lr, end_of_epoch, fail, tracer } = *opts;
    let k_total = net.stages.len();
    if state.stages.len() != k_total {
        return Err(Error::Unsupported {
            op: "pipeline",
            detail: format!("pipeline state for {} stages used with {k_total}", state.stages.len()),
        });
    }
    let classes = net.spec.classes;
    let input_shape = net.spec.input.clone();
    let gpus: Vec<crate::gpu::Gpu> = net.stages.iter().map(|s| s.gpu.clone()).collect();
    let mut metrics = Some(MetricsAccumulator::new(&gpus[k_total - 1])?);
    let first_iteration = state.iteration;
    let transport: &dyn Transport = net.transport.as_ref();
    let method = state.method;
    let mut recent = std::mem::take(&mut state.recent_batches);

    // Channels: data -> stage 0; stage k -> k+1 (features); stage k+1 -> k (gradients).
    // Capacity 1: a stage may run one message ahead of its neighbour, no more, which bounds
    // the memory in flight.
    let (data_tx, data_rx) = sync_channel::<HostBatch>(2);
    let mut up: Vec<Link<Up>> = Vec::new();
    let mut down: Vec<Link<Tensor>> = Vec::new();
    for _ in 0..k_total.saturating_sub(1) {
        let (a, b) = sync_channel::<Up>(1);
        up.push((Some(a), Some(b)));
        let (c, d) = sync_channel::<Tensor>(1);
        down.push((Some(c), Some(d)));
    }
    let mut data_rx = Some(data_rx);
    let results: Vec<Result<()>> = std::thread::scope(|scope| {
        let mut handles = Vec::new();
        let mut metrics_slot = metrics.take();
        for (k, (stage, st)) in net.stages.iter_mut().zip(state.stages.iter_mut()).enumerate() {
            let worker = Worker {
                k,
                stages: k_total,
                method,
                stage,
                state: st,
                first_iteration,
                iterations,
                end_of_epoch,
                classes,
                optim,
                lr,
                transport,
                next_gpu: gpus.get(k + 1).cloned(),
                prev_gpu: if k > 0 { Some(gpus[k - 1].clone()) } else { None },
                data_in: if k == 0 { data_rx.take() } else { None },
                up_in: if k > 0 { up[k - 1].1.take() } else { None },
                up_out: if k + 1 < k_total { up[k].0.take() } else { None },
                down_in: if k + 1 < k_total { down[k].1.take() } else { None },
                down_out: if k > 0 { down[k - 1].0.take() } else { None },
                input_shape: input_shape.clone(),
                fail_at: fail.filter(|f| f.stage == k).map(|f| f.iteration),
                tracer,
            };
            let mut m = if k + 1 == k_total { metrics_slot.take() } else { None };
            handles.push(scope.spawn(move || {
                let r = worker.run(&mut m);
                (r, m)
            }));
        }
        // Feed the batches; stop early if stage 0 is gone (it failed).
        let mut fed = 0;
        for b in batches.take(iterations) {
            recent.push_back(b.clone());
            if recent.len() > k_total {
                recent.pop_front();
            }
            if data_tx.send(b).is_err() {
                break;
            }
            fed += 1;
        }
        drop(data_tx);
        let mut out = Vec::new();
        for h in handles {
            match h.join() {
                Ok((r, m)) => {
                    if m.is_some() {
                        metrics = m;
                    }
                    out.push(r);
                }
                Err(_) => {
                    out.push(Err(Error::Unsupported { op: "pipeline", detail: "a stage thread panicked".into() }))
                }
            }
        }
        if fed < iterations && out.iter().all(|r| r.is_ok()) {
            out.push(Err(Error::Unsupported {
                op: "pipeline",
                detail: format!("the data feed gave {fed} batches of the {iterations} announced"),
            }));
        }
        out
    });
    // Report the root cause, not the "another stage failed" errors it caused.
    let mut errors: Vec<Error> = results.into_iter().filter_map(|r| r.err()).collect();
    if !errors.is_empty() {
        let root = errors.iter().position(|e| !e.to_string().contains("another stage failed")).unwrap_or(0);
        return Err(errors.swap_remove(root));
    }
    state.recent_batches = recent;
    state.iteration += iterations as u64;
    net.steps = state.iteration;
    metrics.ok_or(Error::Unsupported { op: "pipeline", detail: "no metrics from the last stage".into() })?.read()
}
