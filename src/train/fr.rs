//! Features Replay (Huo, Gu and Huang, NeurIPS 2018), exactly as
//! `../shared/spec/features-replay.md` schedules it, on one worker thread per stage.
//!
//! Module k (0-based here; the spec's k is 1-based) has delay `d_k = K - 1 - k`. Every
//! iteration t:
//! - play: module k appends its input to its `input_history` (at most d_k + 1 inputs) and
//!   computes its output with its current weights without keeping activations, then sends
//!   it up; module 0 reads the batch and sends the labels along to the last module;
//! - the last module runs forward, loss and backward on its input, sends the input gradient
//!   down and updates its weights (with K = 1 this is exactly backprop);
//! - replay (k < K-1, once t >= d_k): module k recomputes its forward on the OLDEST input
//!   in its history with its current weights, keeping activations, backpropagates the
//!   gradient module k+1 sent during iteration t-1, updates its weights and sends the
//!   gradient of that old input down.
//!
//! Ordering: the spec lists play, replay, then "wait for the gradient sent during this
//! iteration". A module here plays iteration t first and only then waits for the gradient
//! sent during t-1, which it needs for its replay at t. The numbers are the same (play and
//! replay both use the weights from before this iteration's update, and gradients are
//! consumed in the order they were sent), but no module waits for the module above it to
//! finish an iteration before starting the next play, so modules really run concurrently.
//!
//! Batch normalisation: modules k < K-1 run BN in training mode in both play and replay;
//! the running statistics are updated in the PLAY pass only (fresh data, the weights that
//! produced this iteration's features); the replay pass leaves them untouched. The spec
//! allows this choice; the reference code updates them in both.

use std::collections::VecDeque;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use super::{Network, OptimConfig};
use crate::error::{Error, Result};
use crate::gpu::Tensor;
use crate::layers::loss::{self, MetricsAccumulator};
use crate::model::Stage;
use crate::pipeline::{InFlight, Transport};
use crate::trace::Tracer;

/// What one stage carries from one iteration (and epoch) to the next.
#[derive(Default)]
pub struct FrStageState {
    /// Inputs played but not yet replayed, oldest first (at most d_k + 1 during a step).
    pub input_history: VecDeque<Tensor>,
    /// A gradient from the module above that arrived but has not been replayed yet
    /// (held across epoch boundaries).
    pub pending_grad: Option<Tensor>,
    /// SGD steps this stage has taken (its first step initialises momentum buffers).
    pub steps: u64,
}

/// Features Replay state of a whole network.
pub struct FrState {
    /// Iterations run so far (the spec's t of the next iteration).
    pub iteration: u64,
    pub stages: Vec<FrStageState>,
}

impl FrState {
    pub fn new(stages: usize) -> FrState {
        FrState { iteration: 0, stages: (0..stages).map(|_| FrStageState::default()).collect() }
    }

    /// Inputs held by each stage (the spec: d_k + 1 at most, d_k between iterations).
    pub fn history_lengths(&self) -> Vec<usize> {
        self.stages.iter().map(|s| s.input_history.len()).collect()
    }
}

/// A batch as module 0 receives it.
pub struct HostBatch {
    pub images: Vec<f32>,
    pub labels: Vec<u32>,
}

/// Features going up, with the labels the last module needs.
struct Up {
    h: Tensor,
    labels: Vec<u32>,
}

fn stopped(k: usize, what: &str) -> Error {
    Error::Unsupported { op: "pipeline", detail: format!("stage {k} stopped: {what} (another stage failed)") }
}

/// Everything one stage's worker needs for an epoch.
struct Worker<'a> {
    k: usize,
    stages: usize,
    stage: &'a mut Stage,
    state: &'a mut FrStageState,
    first_iteration: u64,
    iterations: usize,
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
    fn phase<T>(&mut self, name: &'static str, t: u64, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
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

    fn delay(&self) -> u64 {
        (self.stages - 1 - self.k) as u64
    }

    fn step_lr(&self) -> f32 {
        if self.k == 0 {
            self.lr * self.optim.first_stage_lr_scale
        } else {
            self.lr
        }
    }

    fn sgd(&mut self) -> Result<()> {
        let cfg = self.optim.sgd(self.step_lr());
        let first = self.state.steps == 0;
        for p in self.stage.params() {
            p.sgd_step(&cfg, first)?;
        }
        self.state.steps += 1;
        Ok(())
    }

    /// Starts moving a gradient to the stage below (module 0 has none).
    fn start_down(&self, dx: Tensor) -> Result<Option<InFlight>> {
        match &self.prev_gpu {
            Some(prev) if self.down_out.is_some() => Ok(Some(self.transport.start(&dx, prev)?)),
            _ => Ok(None),
        }
    }

    /// Completes a transfer started by [`Self::start_down`] and hands it to the stage below.
    fn finish_down(&self, moving: InFlight) -> Result<()> {
        let dx = moving.finish()?;
        self.down_out
            .as_ref()
            .ok_or_else(|| stopped(self.k, "no stage below"))?
            .send(dx)
            .map_err(|_| stopped(self.k, "the stage below is gone"))
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

    fn run(mut self, metrics: &mut Option<MetricsAccumulator>) -> Result<()> {
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
                // The last module: forward, loss, backward, update.
                let y = loss::labels(&self.stage.gpu, &labels, self.classes)?;
                let (out, acts) = self.phase("forward", t, |w| w.stage.forward_train(&x, true))?;
                let (lo, dlogits) = self.phase("loss", t, |_| loss::forward_backward(&out, &y))?;
                let dx = self.phase("backward", t, |w| w.stage.backward(acts, &dlogits, w.k > 0))?;
                if let Some(dx) = dx {
                    if let Some(d) = self.start_down(dx)? {
                        self.phase("send", t, |w| w.finish_down(d))?;
                    }
                }
                self.phase("update", t, |w| w.sgd())?;
                if let Some(m) = metrics.as_mut() {
                    m.add(&lo, labels.len())?;
                }
                self.stage.gpu.sync()?;
                continue;
            }
            // Play: keep the input, forward without activations, start sending the features up.
            self.state.input_history.push_back(x.clone());
            let h = self.phase("play", t, |w| w.stage.forward_play(&x, true))?;
            drop(x);
            let next = self.next_gpu.clone().ok_or_else(|| stopped(self.k, "no stage above"))?;
            // The features leave now, before the replay is recorded: on lavapipe, waiting for
            // a copy submitted before the replay also waited for the replay (measured: FR
            // fell from 1.39x to 0.91x of BP at K = 2), so deferring the wait serialised the
            // stages. See the README.
            let up = self.transport.start(&h, &next)?;
            drop(h);
            self.phase("send", t, |w| {
                let h = up.finish()?;
                w.up_out
                    .as_ref()
                    .ok_or_else(|| stopped(w.k, "no stage above"))?
                    .send(Up { h, labels })
                    .map_err(|_| stopped(w.k, "the stage above is gone"))
            })?;
            // Replay, once the warm-up of d_k iterations is over.
            if t >= self.delay() {
                let g = match self.state.pending_grad.take() {
                    Some(g) => g,
                    None => self.phase("wait gradient", t, |w| {
                        w.down_in
                            .as_ref()
                            .ok_or_else(|| stopped(w.k, "no gradient source"))?
                            .recv()
                            .map_err(|_| stopped(w.k, "the stage above is gone"))
                    })?,
                };
                let oldest = self.state.input_history.pop_front().ok_or_else(|| Error::Unsupported {
                    op: "pipeline",
                    detail: format!("stage {} has no stored input to replay at iteration {t}", self.k),
                })?;
                let (_, acts) = self.phase("replay", t, |w| w.stage.forward_train(&oldest, false))?;
                drop(oldest);
                let dx = self.phase("backward", t, |w| w.stage.backward(acts, &g, w.k > 0))?;
                drop(g);
                if let Some(dx) = dx {
                    if let Some(d) = self.start_down(dx)? {
                        self.phase("send", t, |w| w.finish_down(d))?;
                    }
                }
                self.phase("update", t, |w| w.sgd())?;
            }
            if self.state.input_history.len() > self.delay() as usize {
                return Err(Error::Unsupported {
                    op: "pipeline",
                    detail: format!(
                        "stage {} holds {} inputs after iteration {t}, more than its delay",
                        self.k,
                        self.state.input_history.len()
                    ),
                });
            }
            self.stage.gpu.sync()?;
        }
        // The module above sent a gradient during the last iteration if it was past its own
        // warm-up then; keep it for this module's next replay (next epoch).
        let last = self.first_iteration + self.iterations as u64;
        if self.k + 1 < self.stages && self.iterations > 0 && last >= self.delay() && self.state.pending_grad.is_none()
        {
            let rx = self.down_in.as_ref().ok_or_else(|| stopped(self.k, "no gradient source"))?;
            self.state.pending_grad = Some(rx.recv().map_err(|_| stopped(self.k, "the stage above is gone"))?);
        }
        Ok(())
    }
}

/// How an epoch runs: the optimiser and learning rate, and optionally a timeline and an
/// injected failure.
#[derive(Clone, Copy)]
pub struct EpochOptions<'a> {
    pub optim: &'a OptimConfig,
    pub lr: f32,
    pub fail: Option<InjectedFailure>,
    pub tracer: Option<&'a Tracer>,
}

impl<'a> EpochOptions<'a> {
    pub fn new(optim: &'a OptimConfig, lr: f32) -> Self {
        EpochOptions { optim, lr, fail: None, tracer: None }
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

/// Runs `batches` (one FR iteration each) through the network's stages, one worker thread
/// per stage, and returns the training metrics of the last module. The FR state (input
/// histories, a gradient in flight, step counts) carries over between calls, so epochs
/// continue one pipeline. A failing stage ends the epoch with its error; the others stop
/// when their channels close, so nothing waits forever.
pub fn run_epoch(
    net: &mut Network,
    state: &mut FrState,
    batches: impl Iterator<Item = HostBatch>,
    iterations: usize,
    opts: &EpochOptions,
) -> Result<crate::layers::loss::Metrics> {
    let EpochOptions { optim, lr, fail, tracer } = *opts;
    let k_total = net.stages.len();
    if state.stages.len() != k_total {
        return Err(Error::Unsupported {
            op: "pipeline",
            detail: format!("FR state for {} stages used with {k_total}", state.stages.len()),
        });
    }
    let classes = net.spec.classes;
    let input_shape = net.spec.input.clone();
    let gpus: Vec<crate::gpu::Gpu> = net.stages.iter().map(|s| s.gpu.clone()).collect();
    let mut metrics = Some(MetricsAccumulator::new(&gpus[k_total - 1])?);
    let first_iteration = state.iteration;
    let transport: &dyn Transport = net.transport.as_ref();

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
                stage,
                state: st,
                first_iteration,
                iterations,
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
    state.iteration += iterations as u64;
    net.steps = state.iteration;
    metrics.ok_or(Error::Unsupported { op: "pipeline", detail: "no metrics from the last stage".into() })?.read()
}
