//! The pipeline every training method runs on: one worker thread per stage, with bounded
//! channels between neighbours: features (with the labels) go up, gradients go down. This
//! module owns the machinery every method shares (receiving the input, the last module's
//! exact step, sending, a gradient kept across epoch boundaries, the one host wait per
//! iteration, failures); what a module does with it is its method's
//! [`ModuleMethod`](super::method::ModuleMethod), one file per method (see
//! [`super::method`]). The scheduler moves tensors and never does math.
//!
//! Module k (0-based here; `docs/schedules.md` counts from 1) has delay `d_k = K - 1 - k`.
//! In every method but DGL and GPipe the last module runs forward, loss and backward on its
//! fresh input, sends the input gradient down and updates its weights (with K = 1 every
//! method is backprop).
//!
//! Ordering: the spec lists play, replay, then "wait for the gradient sent during this
//! iteration". A module here plays iteration t first and only then waits for the gradient
//! sent during t-1, which it needs at t. The numbers are the same (gradients are consumed in
//! the order they were sent), but no module waits for the module above it to finish an
//! iteration before starting the next one, so modules really run concurrently.

use std::collections::VecDeque;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use super::method::{ModuleMethod, TrainingMethod};
use super::{Network, OptimConfig};
use crate::error::{Error, Result};
use crate::gpu::Tensor;
use crate::layers::loss::{self, MetricsAccumulator};
use crate::model::Stage;
use crate::pipeline::cluster::{Cluster, GradientReducer, ThreadReducers};
use crate::pipeline::link::{stopped, ChannelLinks, Features, StageLinks};
use crate::pipeline::Transport;
use crate::trace::Tracer;

/// What one stage carries from one iteration (and epoch) to the next: its method's own
/// state ([`ModuleMethod`]) and what every method shares.
pub struct StageState {
    /// The method's part on this module: its step and the state it keeps.
    pub module: Box<dyn ModuleMethod>,
    /// A gradient from the module above that arrived but has not been used yet (held across
    /// epoch boundaries).
    pub pending_grad: Option<Tensor>,
    /// SGD steps this stage has taken (its first step initialises momentum buffers).
    pub steps: u64,
}

/// The state of a pipeline over a whole network, for any [`TrainingMethod`].
pub struct PipelineState {
    pub method: Arc<dyn TrainingMethod>,
    /// Iterations run so far (the spec's t of the next iteration).
    pub iteration: u64,
    pub stages: Vec<StageState>,
    /// The last K batches fed, oldest first (for measurements on the batch a module's
    /// gradient belongs to).
    pub recent_batches: VecDeque<HostBatch>,
}

impl PipelineState {
    /// A fresh pipeline running `method` over the network's stages (each module's state is
    /// built on its stage's device: DNI's predictors, DGL's auxiliary heads).
    pub fn new(method: Arc<dyn TrainingMethod>, net: &Network, seed: u64) -> Result<PipelineState> {
        let k_total = net.stages.len();
        let stages = (0..k_total)
            .map(|k| Ok(StageState { module: method.module(net, k, seed)?, pending_grad: None, steps: 0 }))
            .collect::<Result<Vec<_>>>()?;
        Ok(PipelineState { method, iteration: 0, stages, recent_batches: VecDeque::new() })
    }

    /// A fresh Features Replay pipeline of `stages` modules.
    pub fn fr(stages: usize) -> PipelineState {
        PipelineState {
            method: Arc::new(super::fr::Fr::default()),
            iteration: 0,
            stages: (0..stages)
                .map(|_| StageState { module: Box::new(super::fr::FrModule::default()), pending_grad: None, steps: 0 })
                .collect(),
            recent_batches: VecDeque::new(),
        }
    }

    /// What each stage holds between iterations: FR's stored inputs, DDG's stored graphs
    /// (d_k at most), nothing for the other methods.
    pub fn held(&self) -> Vec<usize> {
        self.stages.iter().map(|s| s.module.held()).collect()
    }

    /// Inputs held by each stage (FR: d_k + 1 at most, d_k between iterations).
    pub fn history_lengths(&self) -> Vec<usize> {
        self.held()
    }

    /// Graphs held by each stage (DDG: d_k + 1 at most, d_k between iterations).
    pub fn graph_counts(&self) -> Vec<usize> {
        self.held()
    }

    /// Stage k's method state as its concrete type (tests and measurements look inside).
    pub fn module<T: 'static>(&self, k: usize) -> Option<&T> {
        let m: &dyn std::any::Any = self.stages.get(k)?.module.as_ref();
        m.downcast_ref::<T>()
    }
}

/// A batch as module 0 receives it.
#[derive(Debug, Clone)]
pub struct HostBatch {
    pub images: Vec<f32>,
    pub labels: Vec<u32>,
}

/// Everything one stage's worker needs for an epoch: its stage, the links to its neighbours
/// and the state every method shares. The method's own state is not here: it is the
/// [`ModuleMethod`] that drives the worker.
pub struct Worker<'a> {
    pub(super) k: usize,
    stages: usize,
    pub(super) stage: &'a mut Stage,
    /// A gradient from above that arrived and waits for this module's next step.
    pending_grad: &'a mut Option<Tensor>,
    /// SGD steps of the stage.
    steps: &'a mut u64,
    first_iteration: u64,
    iterations: usize,
    end_of_epoch: bool,
    pub(super) classes: usize,
    optim: &'a OptimConfig,
    lr: f32,
    /// Features up and gradients down, to and from the neighbouring stages.
    links: Box<dyn StageLinks + 'a>,
    /// Averages the gradients with the stage's other replicas before each update.
    reducer: Option<Box<dyn GradientReducer>>,
    data_in: Option<Receiver<HostBatch>>,
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

    /// Whether this is the last module (the one with the loss).
    pub(super) fn is_last(&self) -> bool {
        self.k + 1 == self.stages
    }

    /// d_k = K - 1 - k: iterations between this module's forward on a batch and the arrival
    /// of that batch's gradient under FR and DDG.
    pub(super) fn delay(&self) -> u64 {
        (self.stages - 1 - self.k) as u64
    }

    /// Between iterations a module holds at most d_k stored inputs or graphs: more means the
    /// schedule lost track of the gradients it owes.
    pub(super) fn check_held(&self, held: usize, what: &str, t: u64) -> Result<()> {
        if held > self.delay() as usize {
            return Err(Error::Schedule {
                detail: format!("stage {} holds {held} {what} after iteration {t}, more than its delay", self.k),
            });
        }
        Ok(())
    }

    /// The optimiser of this module's updates (the first module's learning rate scaled).
    pub(super) fn sgd_config(&self) -> crate::kernels::sgd::SgdConfig {
        let lr = if self.k == 0 { self.lr * self.optim.first_stage_lr_scale } else { self.lr };
        self.optim.sgd(lr)
    }

    /// SGD on the stage's parameters with their current gradients (first averaged over the
    /// stage's replicas, if it has any).
    pub(super) fn sgd(&mut self) -> Result<()> {
        if let Some(r) = self.reducer.as_mut() {
            // One read and one write of the stage's packed gradients per update.
            let mut grads = self.stage.read_grads()?;
            r.average(&mut grads)?;
            self.stage.write_grads(&grads)?;
        }
        let cfg = self.sgd_config();
        self.stage.sgd_step(&cfg, *self.steps == 0)?;
        *self.steps += 1;
        Ok(())
    }

    /// Sends the gradient of this module's input down (module 0 has nobody to send to).
    pub(super) fn send_down(&mut self, dx: Option<Tensor>, t: u64) -> Result<()> {
        let Some(dx) = dx else { return Ok(()) };
        self.stage.watch_input_grad(&dx)?;
        if !self.links.has_below() {
            return Ok(());
        }
        self.phase("send", t, |w| w.links.send_down(dx))
    }

    /// Sends this module's output (with the labels) to the module above.
    pub(super) fn send_up(&mut self, h: Tensor, labels: Vec<u32>, t: u64) -> Result<()> {
        self.send_up_part(h, labels, 1, t)
    }

    /// [`Self::send_up`] for one of the `parts` messages of this iteration's output.
    pub(super) fn send_up_part(&mut self, h: Tensor, labels: Vec<u32>, parts: usize, t: u64) -> Result<()> {
        self.stage.watch_output(&h)?;
        // The features leave now, before the replay is recorded: on lavapipe, waiting for a
        // copy submitted before the replay also waited for the replay (measured: FR fell from
        // 1.39x to 0.91x of BP at K = 2), so deferring the wait serialised the stages. See
        // the README.
        self.phase("send", t, |w| w.links.send_up(Features { h, labels, parts }))
    }

    /// The gradient from the module above: the one kept from the previous call (an epoch
    /// boundary), or the next one sent, waited for.
    pub(super) fn take_gradient(&mut self, t: u64) -> Result<Tensor> {
        match self.pending_grad.take() {
            Some(g) => Ok(g),
            None => self.phase("wait gradient", t, |w| w.links.receive_down()),
        }
    }

    /// The gradient kept for this module's next step, if one is (DNI trains its predictor
    /// on it at an epoch's end).
    pub(super) fn take_pending_gradient(&mut self) -> Option<Tensor> {
        self.pending_grad.take()
    }

    /// The next batch from the data feed (module 0 only), on the host.
    pub(super) fn receive_batch(&mut self) -> Result<HostBatch> {
        let rx = self.data_in.as_ref().ok_or_else(|| stopped(self.k, "no data feed"))?;
        rx.recv().map_err(|_| Error::Schedule { detail: format!("stage {}: the data feed ended early", self.k) })
    }

    /// Uploads images of this module's input shape to its device.
    pub(super) fn upload(&self, images: &[f32], n: usize) -> Result<Tensor> {
        let mut shape = vec![n];
        shape.extend(&self.input_shape);
        self.stage.gpu.tensor(&shape, images)
    }

    /// The per-sample input shape of module 0.
    pub(super) fn input_shape(&self) -> &[usize] {
        &self.input_shape
    }

    /// The next input: a batch for module 0, the features from below else.
    pub(super) fn receive_input(&mut self) -> Result<(Tensor, Vec<u32>)> {
        if self.data_in.is_some() {
            let b = self.receive_batch()?;
            return Ok((self.upload(&b.images, b.labels.len())?, b.labels));
        }
        let (h, labels, _) = self.receive_part()?;
        Ok((h, labels))
    }

    /// The next message from below (modules k > 0): features, labels and how many
    /// messages make up this iteration's input.
    pub(super) fn receive_part(&mut self) -> Result<(Tensor, Vec<u32>, usize)> {
        let f = self.links.receive_up()?;
        Ok((f.h, f.labels, f.parts))
    }

    /// The last module, in every method but DGL and GPipe: forward, loss, backward, update
    /// (exact backprop on its input); the input gradient goes down when `send_grad`.
    pub(super) fn last_step(
        &mut self,
        x: Tensor,
        labels: Vec<u32>,
        t: u64,
        metrics: &mut Option<MetricsAccumulator>,
        send_grad: bool,
    ) -> Result<()> {
        let y = loss::labels(&self.stage.gpu, &labels, self.classes)?;
        let (out, acts) = self.phase("forward", t, |w| w.stage.forward_train(&x, true))?;
        drop(x);
        self.stage.watch_output(&out)?;
        let (lo, dlogits) = self.phase("loss", t, |_| loss::forward_backward(&out, &y))?;
        let need_dx = send_grad && self.k > 0;
        let dx = self.phase("backward", t, |w| w.stage.backward(acts, &dlogits, need_dx))?;
        // A stage may return its input gradient even when not asked (its first layer
        // computes it anyway): only what was asked for goes down.
        self.send_down(dx.filter(|_| need_dx), t)?;
        self.phase("update", t, |w| w.sgd())?;
        if let Some(m) = metrics.as_mut() {
            m.add(&lo, labels.len())?;
        }
        Ok(())
    }

    fn run(mut self, module: &mut dyn ModuleMethod, metrics: &mut Option<MetricsAccumulator>) -> Result<()> {
        // The divergence counters of the previous iteration, read while this one runs.
        let mut pending: Option<crate::model::PendingCheck> = None;
        for i in 0..self.iterations {
            let t = self.first_iteration + i as u64;
            if self.fail_at == Some(t) {
                return Err(Error::InjectedFailure { stage: self.k, iteration: t });
            }
            module.iteration(&mut self, t, metrics)?;
            // The one host wait of the iteration: this iteration's counters are copied behind
            // its work, then the previous iteration's are waited for, so the device runs this
            // iteration while the stage receives and records the next one.
            let next = self.stage.start_check_finite(t)?;
            if let Some(p) = pending.replace(next) {
                p.finish()?;
            }
            module.check_finite(self.k, t)?;
        }
        if let Some(p) = pending.take() {
            p.finish()?;
        }
        module.finish_checks()?;
        // A gradient the module above sent during the last iteration is kept for this
        // module's next step (next call).
        let last = self.first_iteration + self.iterations as u64;
        if !self.is_last()
            && self.iterations > 0
            && module.gradient_in_flight(self.delay(), last)
            && self.pending_grad.is_none()
        {
            *self.pending_grad = Some(self.links.receive_down()?);
        }
        if self.end_of_epoch {
            module.finish_epoch(&mut self)?;
            // The running statistics are checked once an epoch, before evaluation and the
            // checkpoint read them.
            self.stage.watch_buffers()?;
            let t = last.saturating_sub(1);
            self.stage.check_finite(t)?;
            module.check_finite(self.k, t)?;
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
    /// The stages run in other processes too: this one runs only its own stage (of its
    /// replica), over the cluster's links and reducer (None: every stage runs here).
    pub cluster: Option<&'a dyn Cluster>,
    /// This pipeline is replica r of several in this process's threads, whose gradients
    /// are averaged through the reducers (a simulation of a run over processes).
    pub thread_replicas: Option<(&'a ThreadReducers, usize)>,
}

impl<'a> EpochOptions<'a> {
    pub fn new(optim: &'a OptimConfig, lr: f32) -> Self {
        EpochOptions { optim, lr, end_of_epoch: true, fail: None, tracer: None, cluster: None, thread_replicas: None }
    }
}

/// Where a worker's links come from: channels to the stages of this process, or the
/// cluster (made on the worker's thread).
enum LinkSource<'a> {
    Channel(ChannelLinks<'a>),
    Cluster(&'a dyn Cluster),
}

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
///
/// With a [`Cluster`] only this process's stage runs (the others' state here is left as
/// it is): `batches` are read only on the first stage's process, and the metrics are empty
/// except on the last stage's.
pub fn run_epoch(
    net: &mut Network,
    state: &mut PipelineState,
    batches: impl Iterator<Item = HostBatch>,
    iterations: usize,
    opts: &EpochOptions,
) -> Result<crate::layers::loss::Metrics> {
    let EpochOptions { optim, lr, end_of_epoch, fail, tracer, cluster, thread_replicas } = *opts;
    let k_total = net.stages.len();
    if state.stages.len() != k_total {
        return Err(Error::Schedule {
            detail: format!("pipeline state for {} stages used with {k_total}", state.stages.len()),
        });
    }
    if let Some(c) = cluster.filter(|c| c.topology().stages != k_total || c.topology().size() != c.size()) {
        return Err(Error::Schedule { detail: format!("{k_total} stages on a cluster of {:?}", c.topology()) });
    }
    let here = |k: usize| cluster.is_none_or(|c| c.place().0 == k);
    let feeds_data = here(0);
    let classes = net.spec.classes;
    let input_shape = net.spec.input.clone();
    let gpus: Vec<crate::gpu::Gpu> = net.stages.iter().map(|s| s.gpu.clone()).collect();
    let mut metrics = if here(k_total - 1) { Some(MetricsAccumulator::new(&gpus[k_total - 1])?) } else { None };
    let first_iteration = state.iteration;
    let transport: &dyn Transport = net.transport.as_ref();
    let mut recent = std::mem::take(&mut state.recent_batches);

    // Data -> stage 0 (two batches ahead); stage k -> k+1 (features) and k+1 -> k
    // (gradients) through the links.
    let (data_tx, data_rx) = sync_channel::<HostBatch>(2);
    let links: Vec<LinkSource> = match cluster {
        None => ChannelLinks::line(&gpus, transport).into_iter().map(LinkSource::Channel).collect(),
        Some(c) => (0..k_total).map(|_| LinkSource::Cluster(c)).collect(),
    };
    let mut data_rx = Some(data_rx);
    let results: Vec<Result<()>> = std::thread::scope(|scope| {
        let mut handles = Vec::new();
        let mut metrics_slot = metrics.take();
        let stages = net.stages.iter_mut().zip(state.stages.iter_mut()).zip(links).enumerate();
        for (k, ((stage, st), links)) in stages.filter(|(k, _)| here(*k)) {
            let StageState { module, pending_grad, steps } = st;
            let data_in = if k == 0 { data_rx.take() } else { None };
            let input_shape = input_shape.clone();
            let fail_at = fail.filter(|f| f.stage == k).map(|f| f.iteration);
            let mut m = if k + 1 == k_total { metrics_slot.take() } else { None };
            // The worker is built on its own thread: a link may live on one thread only (an
            // MPI communicator does).
            handles.push(scope.spawn(move || {
                let links: Box<dyn StageLinks + '_> = match links {
                    LinkSource::Channel(l) => Box::new(l),
                    LinkSource::Cluster(c) => c.stage_links(&stage.gpu),
                };
                let reducer: Option<Box<dyn GradientReducer>> = match (cluster, thread_replicas) {
                    (Some(c), _) => c.reducer(),
                    (None, Some((group, r))) => Some(group.reducer(k, r)),
                    (None, None) => None,
                };
                let worker = Worker {
                    k,
                    stages: k_total,
                    stage,
                    pending_grad,
                    steps,
                    first_iteration,
                    iterations,
                    end_of_epoch,
                    classes,
                    optim,
                    lr,
                    links,
                    reducer,
                    data_in,
                    input_shape,
                    fail_at,
                    tracer,
                };
                let r = worker.run(module.as_mut(), &mut m);
                (r, m)
            }));
        }
        // Feed the batches; stop early if stage 0 is gone (it failed).
        let mut fed = 0;
        for b in batches.take(if feeds_data { iterations } else { 0 }) {
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
        let here_stages: Vec<usize> = (0..k_total).filter(|&k| here(k)).collect();
        for (k, h) in here_stages.into_iter().zip(handles) {
            match h.join() {
                Ok((r, m)) => {
                    if m.is_some() {
                        metrics = m;
                    }
                    out.push(r);
                }
                Err(_) => out.push(Err(Error::StagePanicked { stage: k })),
            }
        }
        if feeds_data && fed < iterations && out.iter().all(|r| r.is_ok()) {
            out.push(Err(Error::Schedule {
                detail: format!("the data feed gave {fed} batches of the {iterations} announced"),
            }));
        }
        out
    });
    // Report the root cause, not the stops it caused in the other stages.
    let mut errors: Vec<Error> = results.into_iter().filter_map(|r| r.err()).collect();
    if !errors.is_empty() {
        let root = errors.iter().position(|e| !matches!(e, Error::StageStopped { .. })).unwrap_or(0);
        return Err(errors.swap_remove(root));
    }
    state.recent_batches = recent;
    state.iteration += iterations as u64;
    net.steps = state.iteration;
    match metrics {
        Some(m) => m.read(),
        None if !here(k_total - 1) => Ok(crate::layers::loss::Metrics::empty()),
        None => Err(Error::Schedule { detail: "no metrics from the last stage".into() }),
    }
}
