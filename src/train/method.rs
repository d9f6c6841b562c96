//! The seam between the pipeline and the training methods (PyTorch's pipelining keeps one
//! schedule per class over one stage abstraction; this is the same idea).
//!
//! A method is two things:
//! - a [`TrainingMethod`]: its name, the per-module state it builds, the memory it expects to
//!   hold on top of backprop, whether a checkpoint holds all of its state;
//! - a [`ModuleMethod`] per module: one iteration of that module on the
//!   [`Worker`](super::schedule::Worker) (receive, compute, send, update, through the
//!   worker's stage and links), the state it keeps between iterations and epochs, the
//!   tensors it checkpoints and restores, and the gradient sigma compares.
//!
//! The scheduler ([`super::schedule`]), checkpointing ([`super::run`]), sigma
//! ([`super::sigma`]) and the CLI know no method by name: they go through these traits and
//! [`METHODS`]. Each method lives in one file: [`super::bp`], [`super::fr`], [`super::ddg`],
//! [`super::dni`], [`super::gpipe`], [`super::dgl`]. Adding a method is one file and one
//! line in [`METHODS`]; `docs/schedules.md` describes each schedule.

use std::any::Any;
use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;

use super::schedule::{HostBatch, Worker};
use super::Network;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::layers::loss::MetricsAccumulator;
use crate::layers::predictor::PredictorConfig;
use crate::model::{ModelSpec, StagePlan};

/// A training method over a network split into K stages.
pub trait TrainingMethod: Send + Sync + std::fmt::Debug {
    /// The `--algo` name (also stored in checkpoints).
    fn name(&self) -> &'static str;

    /// Module `k`'s part of the method for `net` (its state starts empty; predictors and
    /// auxiliary heads are built on the stage's device from `seed`).
    fn module(&self, net: &Network, k: usize, seed: u64) -> Result<Box<dyn ModuleMethod>>;

    /// Device bytes module `q.k` holds on top of a backprop step, and the largest tensor it
    /// adds (checked before anything is allocated).
    fn extra_memory(&self, _q: &MemoryQuery) -> Result<ExtraMemory> {
        Ok(ExtraMemory::default())
    }

    /// Whether a checkpoint holds everything the method keeps, so `--resume` continues the
    /// run exactly (DDG's stored graphs are not checkpointed).
    fn resumable(&self) -> bool {
        true
    }

    /// Whether a module keeps anything between iterations (BP and GPipe keep nothing: a
    /// checkpoint without pipeline state, as BP runs wrote before every method ran on the
    /// pipeline, is a valid start for them).
    fn keeps_state(&self) -> bool {
        true
    }

    /// Whether data-parallel replicas stay identical when only the stages' gradients are
    /// averaged (DNI's predictors and DGL's heads are trained apart from the stages).
    fn replicable(&self) -> bool {
        true
    }

    /// What to lower when the run does not fit in memory.
    fn memory_hint(&self) -> &'static str {
        "; lower --batch-size, --depth or the image size"
    }
}

/// What [`TrainingMethod::extra_memory`] is asked about.
pub struct MemoryQuery<'a> {
    pub spec: &'a ModelSpec,
    pub plan: &'a StagePlan,
    /// The module (0-based) and the number of modules.
    pub k: usize,
    pub stages: usize,
    pub batch: usize,
}

impl MemoryQuery<'_> {
    /// d_k = K - 1 - k.
    pub fn delay(&self) -> u64 {
        (self.stages - 1 - self.k) as u64
    }

    /// Whether this is the last module.
    pub fn is_last(&self) -> bool {
        self.k + 1 == self.stages
    }
}

/// Memory a method adds to a module (see [`TrainingMethod::extra_memory`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExtraMemory {
    pub bytes: u64,
    pub largest_tensor: u64,
}

/// One module's part of a method: its step and the state it keeps.
pub trait ModuleMethod: Send + Any {
    /// One iteration of this module. The default receives the input, runs the exact
    /// backprop step on the last module ([`Worker::last_step`]) and [`Self::step`] on the
    /// others; methods whose modules exchange more than one message per iteration (GPipe) or
    /// whose last module differs (DGL) override it.
    fn iteration(&mut self, w: &mut Worker, t: u64, metrics: &mut Option<MetricsAccumulator>) -> Result<()> {
        let (x, labels) = w.phase("receive", t, |w| w.receive_input())?;
        if w.is_last() {
            w.last_step(x, labels, t, metrics, true)
        } else {
            self.step(w, x, labels, t)
        }
    }

    /// The step of a module k < K - 1 on its input `x` of iteration `t`.
    fn step(&mut self, w: &mut Worker, x: Tensor, labels: Vec<u32>, t: u64) -> Result<()>;

    /// Whether, after iterations `..next_iteration`, the module above has sent a gradient
    /// this module has not taken yet (it is kept for the next call). `delay` is d_k.
    fn gradient_in_flight(&self, delay: u64, next_iteration: u64) -> bool;

    /// At the end of an epoch, with the pipeline drained (DNI trains its predictor on the
    /// last true gradient).
    fn finish_epoch(&mut self, _w: &mut Worker) -> Result<()> {
        Ok(())
    }

    /// Errors when what the method trains besides the stage (a predictor, an auxiliary head)
    /// has held a NaN or an infinity by iteration `t` (a method may defer the check by one
    /// iteration, as the stage's own check is, and finish it in [`Self::finish_checks`]).
    fn check_finite(&mut self, _k: usize, _t: u64) -> Result<()> {
        Ok(())
    }

    /// Finishes any check [`Self::check_finite`] deferred (after a call's last iteration).
    fn finish_checks(&mut self) -> Result<()> {
        Ok(())
    }

    /// Inputs or graphs held between iterations (d_k at most).
    fn held(&self) -> usize {
        0
    }

    /// What a checkpoint stores of this module's state.
    fn save(&self, _k: usize) -> Result<SavedModule> {
        Ok(SavedModule::default())
    }

    /// Restores what [`Self::save`] stored (the state is fresh, its tensors built).
    fn restore(&mut self, _saved: &SavedFields, _ck: &mut Checkpoint, _gpu: &Gpu, _path: &Path) -> Result<()> {
        Ok(())
    }

    /// The weight gradient this method would apply to module k < K - 1 at the pipeline's
    /// current boundary, and the batch it is for; None while the module warms up. See
    /// [`super::sigma`].
    fn sigma_gradient(&mut self, net: &mut Network, k: usize, at: &SigmaInput)
        -> Result<Option<(Vec<f32>, HostBatch)>>;
}

/// What a checkpoint stores of a module (see [`ModuleMethod::save`]).
#[derive(Default)]
pub struct SavedModule {
    /// Fields of the checkpoint's pipeline metadata: `pipeline.<key>[k]` for module k.
    pub fields: Vec<(&'static str, serde_json::Value)>,
    /// f32 tensors with their checkpoint names (under `training.` or `optimizer.`).
    pub tensors: Vec<(String, Tensor)>,
    /// Integer counters (BN `num_batches_tracked`) with their checkpoint names.
    pub counters: Vec<(String, u64)>,
}

/// The fields a module saved, as [`ModuleMethod::restore`] reads them back.
pub struct SavedFields<'a> {
    pub(super) pipeline: &'a serde_json::Value,
    pub(super) k: usize,
}

impl SavedFields<'_> {
    /// Field `key` of this module.
    pub fn get(&self, key: &str) -> Option<&serde_json::Value> {
        self.pipeline.get(key)?.get(self.k)
    }

    /// The module this is for (0-based).
    pub fn module(&self) -> usize {
        self.k
    }
}

/// The pipeline's boundary as a sigma measurement sees it.
pub struct SigmaInput<'a> {
    /// The last K batches fed, oldest first.
    pub recent: &'a VecDeque<HostBatch>,
    /// The gradient from above waiting for the module's next step.
    pub pending_grad: Option<&'a Tensor>,
}

impl SigmaInput<'_> {
    /// The most recent batch (t - 1), if any was fed.
    pub fn latest(&self) -> Option<HostBatch> {
        self.recent.back().cloned()
    }

    /// The batch of iteration t - d, t being the next iteration (d >= 1; d = 1 is the most
    /// recent batch).
    pub fn delayed(&self, d: usize) -> Option<HostBatch> {
        self.recent.len().checked_sub(d).and_then(|i| self.recent.get(i)).cloned()
    }
}

/// The options of the methods that have any (from the run configuration).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MethodOptions {
    /// FR: which passes update the BN running statistics.
    pub fr_bn_update: super::fr::BnUpdate,
    pub dni: PredictorConfig,
    /// GPipe: micro-batches per batch.
    pub microbatches: usize,
    pub dgl: super::dgl::AuxConfig,
}

impl Default for MethodOptions {
    fn default() -> Self {
        MethodOptions {
            fr_bn_update: Default::default(),
            dni: PredictorConfig::default(),
            microbatches: 4,
            dgl: Default::default(),
        }
    }
}

/// Builds a method from its options.
pub type Constructor = fn(&MethodOptions) -> Result<Arc<dyn TrainingMethod>>;

/// Every method by its `--algo` name, in the order `compare` runs them.
pub const METHODS: [(&str, Constructor); 6] = [
    ("bp", super::bp::method),
    ("fr", super::fr::method),
    ("ddg", super::ddg::method),
    ("dni", super::dni::method),
    ("gpipe", super::gpipe::method),
    ("dgl", super::dgl::method),
];

/// The method named `name` with `opts`.
pub fn by_name(name: &str, opts: &MethodOptions) -> Result<Arc<dyn TrainingMethod>> {
    match METHODS.iter().find(|(n, _)| *n == name) {
        Some((_, make)) => make(opts),
        None => Err(Error::InvalidConfig { op: "train", detail: format!("--algo {name}: choose {}", choices()) }),
    }
}

/// "bp, fr, ... or dgl".
pub fn choices() -> String {
    let names: Vec<&str> = METHODS.iter().map(|(n, _)| *n).collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => names.join(""),
    }
}
