//! Decoupled Greedy Learning (DGL; Belilovsky, Eickenberg and Oyallon, ICML 2020), as
//! `docs/schedules.md` describes it: every module k < K - 1 has an auxiliary head that
//! classifies its output, and trains on that head's cross-entropy alone; no gradient flows
//! between modules. Module k sends its output up (computed before its update), runs the
//! head, backpropagates the local loss through head and module, and updates both. The last
//! module trains on the network's own loss, without sending a gradient down.
//!
//! Pipelining: module k's step on batch t uses the features module k-1 produced for batch t
//! with its weights of that moment, so in the sequential form of the schedule module k
//! trains on the features module k-1 produced one iteration earlier, and all modules run at
//! once (nothing waits for anything from above). With K = 1 it is backprop.
//!
//! The head (after the DGL paper's CIFAR setup, smaller): `depth` layers of 3x3 conv
//! (padding 1, stride 1) + BN + ReLU of `width` channels (0: as many as the features have),
//! then global average pooling and a linear classifier. Its parameters train with the
//! module's optimiser and learning rate; its BN running statistics are updated by every
//! step. Features without spatial dimensions get the linear classifier alone.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::method::{
    ExtraMemory, MemoryQuery, MethodOptions, ModuleMethod, SavedFields, SavedModule, SigmaInput, TrainingMethod,
};
use super::schedule::{HostBatch, Worker};
use super::sigma::{input_of_stage, stage_grads};
use super::Network;
use crate::checkpoint::{self, Checkpoint};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::layers::loss::{self, MetricsAccumulator};
use crate::model::{LayerSpec, ModelSpec, PendingCheck, Stage, StageActivations};

/// Shape of DGL's auxiliary heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuxConfig {
    /// conv + BN + ReLU layers before the pooling (0: pooling and the classifier only).
    pub depth: usize,
    /// Channels of those layers; 0: as many as the features have.
    pub width: usize,
}

impl Default for AuxConfig {
    fn default() -> Self {
        AuxConfig { depth: 1, width: 0 }
    }
}

impl AuxConfig {
    /// The head of module `k` on per-sample features `features` for `classes` classes,
    /// its tensors named `training.dgl.stage<k>.*`.
    pub fn head(&self, k: usize, features: &[usize], classes: usize) -> ModelSpec {
        let prefix = format!("{}dgl.stage{k}", super::run::TRAINING_PREFIX);
        let mut layers = Vec::new();
        let mut c = features[0];
        if features.len() == 3 {
            let w = if self.width == 0 { c } else { self.width };
            for i in 0..self.depth {
                layers.push(LayerSpec::Conv {
                    name: format!("{prefix}.conv{i}"),
                    in_channels: c,
                    out_channels: w,
                    kernel: 3,
                    stride: 1,
                    pad: 1,
                });
                layers.push(LayerSpec::BatchNorm { name: format!("{prefix}.bn{i}"), channels: w });
                layers.push(LayerSpec::Relu);
                c = w;
            }
            layers.push(LayerSpec::GlobalAvgPool);
        }
        layers.push(LayerSpec::Linear { name: format!("{prefix}.linear"), in_features: c, out_features: classes });
        ModelSpec { name: format!("DGL head of module {}", k + 1), input: features.to_vec(), classes, layers }
    }
}

/// Decoupled Greedy Learning with heads shaped by `aux`.
#[derive(Debug)]
pub struct Dgl {
    pub aux: AuxConfig,
}

pub fn method(opts: &MethodOptions) -> Result<Arc<dyn TrainingMethod>> {
    Ok(Arc::new(Dgl { aux: opts.dgl }))
}

/// Seeds of the heads' weights: apart from the model's layers (seeded by layer index).
const HEAD_SEED: u64 = 0xD61_0000;

impl TrainingMethod for Dgl {
    /// Its modules' own networks (predictors, heads) learn from each replica's data alone.
    fn replicable(&self) -> bool {
        false
    }

    fn name(&self) -> &'static str {
        "dgl"
    }

    /// Modules k < K - 1 get a head on their device; the last module has the model's own.
    fn module(&self, net: &Network, k: usize, seed: u64) -> Result<Box<dyn ModuleMethod>> {
        let mut m = DglModule { head: None, head_steps: 0, pending: None };
        if k + 1 < net.stages.len() {
            let stage = &net.stages[k];
            let features = net.spec.input_of(stage.first_layer + stage.layers.len())?;
            let spec = self.aux.head(k, &features, net.spec.classes);
            spec.costs()?;
            let n = spec.layers.len();
            m.head = Some(Stage::new(k, &stage.gpu, &spec, 0..n, seed.wrapping_add(HEAD_SEED + k as u64))?);
        }
        Ok(Box::new(m))
    }

    /// The head's parameters (value, gradient, momentum) and the activations its backward
    /// keeps.
    fn extra_memory(&self, q: &MemoryQuery) -> Result<ExtraMemory> {
        if q.is_last() {
            return Ok(ExtraMemory::default());
        }
        let features = q.spec.input_of(q.plan.layers.end)?;
        let head = self.aux.head(q.k, &features, q.spec.classes);
        let costs = head.costs()?;
        let params: u64 = costs.iter().map(|c| c.params as u64).sum();
        let kept: u64 = costs.iter().map(|c| c.kept_values as u64).sum();
        let largest = costs.iter().map(|c| 4 * q.batch as u64 * c.out_shape.iter().product::<usize>() as u64).max();
        Ok(ExtraMemory {
            bytes: 12 * params + 4 * q.batch as u64 * kept,
            largest_tensor: largest.unwrap_or(0).max(4 * params),
        })
    }

    fn memory_hint(&self) -> &'static str {
        "; lower --batch-size, --depth or --dgl-width"
    }
}

/// Module k's state under DGL.
pub struct DglModule {
    /// The auxiliary head (modules k < K - 1).
    pub head: Option<Stage>,
    /// SGD steps of the head.
    pub head_steps: u64,
    /// The head's divergence check of the previous iteration, read while this one runs.
    pending: Option<PendingCheck>,
}

impl DglModule {
    fn head_mut(&mut self, k: usize) -> Result<&mut Stage> {
        self.head.as_mut().ok_or_else(|| Error::Schedule { detail: format!("DGL: stage {k} has no auxiliary head") })
    }

    /// The head's tensors with checkpoint names: parameters, their momentum (under
    /// `optimizer.momentum.`) and the BN running statistics.
    fn tensors(&self) -> Vec<(String, Tensor)> {
        let Some(h) = &self.head else { return vec![] };
        let mut out = Vec::new();
        for p in h.params() {
            out.push((p.name.clone(), p.value.clone()));
            out.push((checkpoint::momentum_name(&p.name), p.momentum.clone()));
        }
        for (name, t) in h.buffers() {
            out.push((name, t.clone()));
        }
        out
    }

    /// The local loss of the module's output `h` through the head, backpropagated through
    /// head and module (`acts`, the module's forward on its input): writes both's parameter
    /// gradients. Training-mode BN, running statistics updated when `update_running`.
    fn local_backward(
        &mut self,
        stage: &mut Stage,
        h: &Tensor,
        acts: StageActivations,
        labels: &[u32],
        classes: usize,
        update_running: bool,
    ) -> Result<loss::LossOutput> {
        let k = stage.index;
        let head = self.head_mut(k)?;
        let (logits, head_acts) = head.forward_train(h, update_running)?;
        let y = loss::labels(&head.gpu, labels, classes)?;
        let (lo, dlogits) = loss::forward_backward(&logits, &y)?;
        let dh = head
            .backward(head_acts, &dlogits, true)?
            .ok_or_else(|| Error::Schedule { detail: format!("DGL: stage {k}'s head gave no input gradient") })?;
        // Nothing flows down: the module's input gradient is not computed.
        stage.backward(acts, &dh, false)?;
        Ok(lo)
    }
}

impl ModuleMethod for DglModule {
    /// The last module runs the exact step but sends nothing down.
    fn iteration(&mut self, w: &mut Worker, t: u64, metrics: &mut Option<MetricsAccumulator>) -> Result<()> {
        let (x, labels) = w.phase("receive", t, |w| w.receive_input())?;
        if w.is_last() {
            w.last_step(x, labels, t, metrics, false)
        } else {
            self.step(w, x, labels, t)
        }
    }

    fn step(&mut self, w: &mut Worker, x: Tensor, labels: Vec<u32>, t: u64) -> Result<()> {
        let classes = w.classes;
        let (h, acts) = w.phase("forward", t, |w| w.stage.forward_train(&x, true))?;
        drop(x);
        // The output leaves before the local backward is recorded, so the module above
        // starts at once.
        w.send_up(h.clone(), labels.clone(), t)?;
        w.phase("local loss", t, |w| self.local_backward(w.stage, &h, acts, &labels, classes, true))?;
        drop(h);
        let cfg = w.sgd_config();
        w.phase("update", t, |w| w.sgd())?;
        let first = self.head_steps == 0;
        self.head_mut(w.k)?.sgd_step(&cfg, first)?;
        self.head_steps += 1;
        Ok(())
    }

    fn gradient_in_flight(&self, _delay: u64, _next_iteration: u64) -> bool {
        false
    }

    /// The head's check of iteration t starts; that of t - 1 is finished.
    fn check_finite(&mut self, _k: usize, t: u64) -> Result<()> {
        let Some(head) = &self.head else { return Ok(()) };
        let next = head.start_check_finite(t)?;
        if let Some(p) = self.pending.replace(next) {
            p.finish()?;
        }
        Ok(())
    }

    fn finish_checks(&mut self) -> Result<()> {
        match self.pending.take() {
            Some(p) => p.finish(),
            None => Ok(()),
        }
    }

    /// The head's running statistics are checked once an epoch, as the stage's are.
    fn finish_epoch(&mut self, _w: &mut Worker) -> Result<()> {
        match &self.head {
            Some(h) => h.watch_buffers(),
            None => Ok(()),
        }
    }

    fn save(&self, _k: usize) -> Result<SavedModule> {
        let counters = match &self.head {
            Some(h) => h.counters().into_iter().map(|(n, c)| (n, c.load(Ordering::Relaxed))).collect(),
            None => vec![],
        };
        Ok(SavedModule {
            fields: vec![("head_steps", serde_json::json!(self.head_steps))],
            tensors: self.tensors(),
            counters,
        })
    }

    fn restore(&mut self, saved: &SavedFields, ck: &mut Checkpoint, _gpu: &Gpu, path: &Path) -> Result<()> {
        self.head_steps = saved.get("head_steps").and_then(|v| v.as_u64()).unwrap_or(0);
        let bad = |e: Error| Error::Data { path: path.display().to_string(), message: format!("DGL head: {e}") };
        for (name, t) in self.tensors() {
            let data = ck.take(&name, t.shape()).map_err(bad)?;
            t.gpu().write(&t, &data)?;
        }
        if let Some(h) = &self.head {
            for (name, c) in h.counters() {
                let v = ck.take_i64(&name, &[]).map_err(bad)?[0];
                c.store(v.max(0) as u64, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// The local loss's gradient of module k on the most recent batch t - 1, through the
    /// modules below at their current weights (running statistics untouched).
    fn sigma_gradient(
        &mut self,
        net: &mut Network,
        k: usize,
        at: &SigmaInput,
    ) -> Result<Option<(Vec<f32>, HostBatch)>> {
        let Some(batch) = at.latest() else { return Ok(None) };
        if self.head.is_none() {
            return Ok(None);
        }
        let x = input_of_stage(net, &batch, k)?;
        let classes = net.spec.classes;
        let stage = &mut net.stages[k];
        let (h, acts) = stage.forward_train(&x, false)?;
        self.local_backward(stage, &h, acts, &batch.labels, classes, false)?;
        Ok(Some((stage_grads(&net.stages[k])?, batch)))
    }
}
