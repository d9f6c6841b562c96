//! Features Replay (Huo, Gu and Huang, NeurIPS 2018): the step of a module k < K - 1, exactly
//! as `docs/schedules.md` schedules it (the shared pipeline machinery and the
//! last module's step are in [`super::schedule`]).
//!
//! Every iteration t:
//! - play: module k appends its input to its `input_history` (at most d_k + 1 inputs) and
//!   computes its output with its current weights without keeping activations, then sends
//!   it up; module 0 reads the batch and sends the labels along to the last module;
//! - replay (once t >= d_k): module k recomputes its forward on the OLDEST input in its
//!   history with its current weights, keeping activations, backpropagates the gradient
//!   module k+1 sent during iteration t-1, updates its weights and sends the gradient of
//!   that old input down.
//!
//! Batch normalisation: modules k < K-1 run BN in training mode in both play and replay;
//! by default the running statistics are updated in the PLAY pass only (fresh data, the
//! weights that produced this iteration's features) and the replay leaves them untouched.
//! The spec allows this choice; the reference code updates them in both
//! (`--fr-bn-update both`, part of `--reference`).

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;

use super::method::{
    ExtraMemory, MemoryQuery, MethodOptions, ModuleMethod, SavedFields, SavedModule, SigmaInput, TrainingMethod,
};
use super::schedule::{HostBatch, Worker};
use super::sigma::stage_grads;
use super::Network;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};

/// Which passes of a module k < K - 1 update its batch-norm running statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BnUpdate {
    /// The play only (fresh data, the weights that produced this iteration's features):
    /// this project's choice.
    #[default]
    Play,
    /// Play and replay, as the reference FR code does.
    Both,
}

impl std::str::FromStr for BnUpdate {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "play" => Ok(BnUpdate::Play),
            "both" => Ok(BnUpdate::Both),
            _ => Err(Error::InvalidConfig { op: "train", detail: format!("--fr-bn-update {s}: choose play or both") }),
        }
    }
}

/// Features Replay.
#[derive(Debug, Default)]
pub struct Fr {
    pub bn_update: BnUpdate,
}

pub fn method(opts: &MethodOptions) -> Result<Arc<dyn TrainingMethod>> {
    Ok(Arc::new(Fr { bn_update: opts.fr_bn_update }))
}

impl TrainingMethod for Fr {
    fn name(&self) -> &'static str {
        "fr"
    }

    fn module(&self, _: &Network, _: usize, _: u64) -> Result<Box<dyn ModuleMethod>> {
        Ok(Box::new(FrModule { update_in_replay: self.bn_update == BnUpdate::Both, ..FrModule::default() }))
    }

    /// d_k + 1 stored inputs at most (during a step).
    fn extra_memory(&self, q: &MemoryQuery) -> Result<ExtraMemory> {
        Ok(ExtraMemory { bytes: (q.delay() + 1) * q.plan.input_bytes, largest_tensor: 0 })
    }
}

/// The checkpoint names of module k's stored inputs: `training.pipeline.stage<k>.input_history.<i>`.
fn history_name(k: usize, i: usize) -> String {
    format!("{}.stage{k}.input_history.{i}", super::run::PIPELINE)
}

/// Module k's state under FR.
#[derive(Default)]
pub struct FrModule {
    /// Inputs played but not yet replayed, oldest first (at most d_k + 1 during a step).
    pub input_history: VecDeque<Tensor>,
    /// The replay updates the BN running statistics too ([`BnUpdate::Both`]).
    pub update_in_replay: bool,
}

impl ModuleMethod for FrModule {
    fn step(&mut self, w: &mut Worker, x: Tensor, labels: Vec<u32>, t: u64) -> Result<()> {
        // Play: keep the input, forward without activations, send the features up.
        self.input_history.push_back(x.clone());
        let h = w.phase("play", t, |w| w.stage.forward_play(&x, true))?;
        drop(x);
        w.send_up(h, labels, t)?;
        // Replay, once the warm-up of d_k iterations is over.
        if t >= w.delay() {
            let g = w.take_gradient(t)?;
            let oldest = self.input_history.pop_front().ok_or_else(|| Error::Schedule {
                detail: format!("stage {} has no stored input to replay at iteration {t}", w.k),
            })?;
            let update = self.update_in_replay;
            let (_, acts) = w.phase("replay", t, |w| w.stage.forward_train(&oldest, update))?;
            drop(oldest);
            let dx = w.phase("backward", t, |w| w.stage.backward(acts, &g, w.k > 0))?;
            drop(g);
            w.send_down(dx, t)?;
            w.phase("update", t, |w| w.sgd())?;
        }
        w.check_held(self.input_history.len(), "inputs", t)
    }

    /// The gradient of batch t - d_k arrives d_k iterations after the batch.
    fn gradient_in_flight(&self, delay: u64, next_iteration: u64) -> bool {
        next_iteration >= delay
    }

    fn held(&self) -> usize {
        self.input_history.len()
    }

    fn save(&self, k: usize) -> Result<SavedModule> {
        Ok(SavedModule {
            fields: vec![("history", serde_json::json!(self.input_history.len()))],
            tensors: self.input_history.iter().enumerate().map(|(i, t)| (history_name(k, i), t.clone())).collect(),
            counters: vec![],
        })
    }

    fn restore(&mut self, saved: &SavedFields, ck: &mut Checkpoint, gpu: &Gpu, path: &Path) -> Result<()> {
        let n = saved.get("history").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
        for i in 0..n {
            let name = history_name(saved.module(), i);
            let shape = ck
                .get(&name)
                .ok_or_else(|| Error::Data { path: path.display().to_string(), message: format!("missing {name}") })?
                .shape
                .clone();
            let data = ck.take(&name, &shape)?;
            self.input_history.push_back(gpu.tensor(&shape, &data)?);
        }
        Ok(())
    }

    /// Module k replays batch t - d_k (its oldest stored input) with the gradient it holds
    /// from module k+1; that replay's weight gradient.
    fn sigma_gradient(
        &mut self,
        net: &mut Network,
        k: usize,
        at: &SigmaInput,
    ) -> Result<Option<(Vec<f32>, HostBatch)>> {
        let delay = net.stages.len() - 1 - k;
        let (Some(x), Some(g), Some(batch)) = (self.input_history.front(), at.pending_grad, at.delayed(delay)) else {
            return Ok(None);
        };
        let stage = &mut net.stages[k];
        let (_, acts) = stage.forward_train(x, false)?;
        stage.backward(acts, g, false)?;
        Ok(Some((stage_grads(stage)?, batch)))
    }
}
