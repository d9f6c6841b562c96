//! Synthetic gradients (DNI; Jaderberg et al., 2017), the step of a module k < K - 1 as
//! `docs/schedules.md` describes it: module k runs forward on the fresh
//! input keeping activations, sends h_k up, asks its predictor M_k for dL/dh_k, backpropagates
//! the prediction and updates at once. M_k learns with a squared error against the true delta_k
//! (at per-sample scale, see [`GradientPredictor`]) that module k+1 sends back (computed with module
//! k+1's own, possibly synthetic, gradient: the usual bootstrapped targets).
//!
//! Timing: module k+1 sends delta_k^t during iteration t; module k trains M_k on it at the
//! end of iteration t+1 (after its own update there), so modules never wait for each other
//! within an iteration. At the end of an epoch the last true gradient trains M_k right away,
//! so no prediction is in flight at a checkpoint. The predictor uses the module's optimiser
//! and learning rate. BN running statistics are updated by the module's (single) forward.

use std::path::Path;
use std::sync::Arc;

use super::method::{
    ExtraMemory, MemoryQuery, MethodOptions, ModuleMethod, SavedFields, SavedModule, SigmaInput, TrainingMethod,
};
use super::schedule::{HostBatch, Worker};
use super::sigma::{input_of_stage, stage_grads};
use super::Network;
use crate::checkpoint::{self, Checkpoint};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::layers::predictor::{GradientPredictor, PredictorActivations, PredictorConfig};

/// Synthetic gradients with predictors shaped by `cfg`.
#[derive(Debug)]
pub struct Dni {
    pub cfg: PredictorConfig,
}

pub fn method(opts: &MethodOptions) -> Result<Arc<dyn TrainingMethod>> {
    if opts.dni.depth == 0 {
        return Err(Error::InvalidConfig {
            op: "train",
            detail: "--dni-depth must be at least 1 (the output conv)".into(),
        });
    }
    Ok(Arc::new(Dni { cfg: opts.dni }))
}

impl TrainingMethod for Dni {
    /// Its modules' own networks (predictors, heads) learn from each replica's data alone.
    fn replicable(&self) -> bool {
        false
    }

    fn name(&self) -> &'static str {
        "dni"
    }

    /// Modules k < K - 1 get a predictor on their device; the last module has none.
    fn module(&self, net: &Network, k: usize, seed: u64) -> Result<Box<dyn ModuleMethod>> {
        let mut m = DniModule { predictor: None, prediction: None, predictor_steps: 0 };
        if k + 1 < net.stages.len() {
            let stage = &net.stages[k];
            let features = net.spec.input_of(stage.first_layer + stage.layers.len())?;
            m.predictor = Some(GradientPredictor::new(
                &stage.gpu,
                &format!("{}dni.stage{k}", super::run::TRAINING_PREFIX),
                &features,
                &self.cfg,
                seed.wrapping_add(k as u64),
            )?);
        }
        Ok(Box::new(m))
    }

    /// The predictor's parameters (value, gradient, momentum) and its hidden activations.
    fn extra_memory(&self, q: &MemoryQuery) -> Result<ExtraMemory> {
        if q.is_last() {
            return Ok(ExtraMemory::default());
        }
        let d = self.cfg;
        let batch = q.batch as u64;
        let features = q.spec.input_of(q.plan.layers.end)?;
        let c = features[0] as u64;
        let spatial: u64 = features[1..].iter().map(|&v| v as u64).product::<u64>().max(1);
        let w = if d.width == 0 { c } else { d.width as u64 };
        let hidden = d.depth.saturating_sub(1) as u64;
        let weights = 9 * (if hidden == 0 { c * c } else { c * w + hidden.saturating_sub(1) * w * w + w * c });
        Ok(ExtraMemory {
            bytes: 12 * weights + 16 * batch * spatial * (hidden * w + c),
            largest_tensor: (36 * w.max(c) * w.max(c)).max(4 * batch * w * spatial),
        })
    }

    fn memory_hint(&self) -> &'static str {
        "; lower --batch-size, --depth or --dni-width"
    }
}

/// Module k's state under DNI.
pub struct DniModule {
    /// This module's gradient predictor M_k (modules k < K - 1).
    pub predictor: Option<GradientPredictor>,
    /// The last prediction, waiting for the true gradient to train M_k.
    pub prediction: Option<PredictorActivations>,
    /// SGD steps of the predictor.
    pub predictor_steps: u64,
}

impl DniModule {
    fn predictor(&self, k: usize) -> Result<&GradientPredictor> {
        self.predictor
            .as_ref()
            .ok_or_else(|| Error::Schedule { detail: format!("DNI: stage {k} has no gradient predictor") })
    }

    /// One SGD step of M_k on the stored prediction against the true gradient `g`.
    fn train_predictor(&mut self, w: &mut Worker, g: Tensor, t: u64) -> Result<()> {
        let acts = self.prediction.take().ok_or_else(|| Error::Schedule {
            detail: format!("DNI: stage {} got a true gradient but made no prediction", w.k),
        })?;
        let k = w.k;
        let cfg = w.sgd_config();
        w.phase("train predictor", t, |_| {
            let first = self.predictor_steps == 0;
            let p = self
                .predictor
                .as_mut()
                .ok_or_else(|| Error::Schedule { detail: format!("DNI: stage {k} has no gradient predictor") })?;
            let dpred = GradientPredictor::loss_gradient(&acts.output, &g)?;
            p.backward(&acts, &dpred)?;
            // The predictor uses its module's optimiser and learning rate.
            p.sgd_step(&cfg, first)?;
            self.predictor_steps += 1;
            Ok(())
        })
    }

    /// The predictor's tensors with checkpoint names: `<param>` and
    /// `optimizer.momentum.<param>`.
    fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        if let Some(p) = &self.predictor {
            for p in p.params() {
                out.push((p.name.clone(), p.value.clone()));
                out.push((checkpoint::momentum_name(&p.name), p.momentum.clone()));
            }
        }
        out
    }
}

impl ModuleMethod for DniModule {
    fn step(&mut self, w: &mut Worker, x: Tensor, labels: Vec<u32>, t: u64) -> Result<()> {
        let (h, acts) = w.phase("forward", t, |w| w.stage.forward_train(&x, true))?;
        drop(x);
        let predictor = self.predictor(w.k)?;
        let (synthetic, prediction) = w.phase("predict", t, |_| {
            let (pred, acts) = predictor.forward(&h)?;
            Ok((GradientPredictor::synthetic_gradient(&pred)?, acts))
        })?;
        w.send_up(h, labels, t)?;
        let dx = w.phase("backward", t, |w| w.stage.backward(acts, &synthetic, w.k > 0))?;
        drop(synthetic);
        w.send_down(dx, t)?;
        w.phase("update", t, |w| w.sgd())?;
        // The true gradient of the previous iteration's features trains the predictor.
        if t >= 1 && self.prediction.is_some() {
            let g = w.take_gradient(t)?;
            self.train_predictor(w, g, t)?;
        }
        self.prediction = Some(prediction);
        Ok(())
    }

    /// The true gradient of batch t trains the predictor one iteration later.
    fn gradient_in_flight(&self, _delay: u64, next_iteration: u64) -> bool {
        next_iteration >= 1
    }

    /// At the end of an epoch: train on the gradient that arrived last, so no prediction is
    /// in flight at a checkpoint.
    fn finish_epoch(&mut self, w: &mut Worker) -> Result<()> {
        if self.prediction.is_some() {
            if let Some(g) = w.take_pending_gradient() {
                self.train_predictor(w, g, u64::MAX)?;
            }
        }
        Ok(())
    }

    fn check_finite(&mut self, k: usize, t: u64) -> Result<()> {
        if let Some(p) = &self.predictor {
            let found = p.non_finite()?;
            if !found.is_empty() {
                return Err(Error::NonFinite {
                    stage: k,
                    iteration: t,
                    detail: format!("{} (its DNI gradient predictor)", crate::layers::watch::describe(&found)),
                });
            }
        }
        Ok(())
    }

    fn save(&self, _k: usize) -> Result<SavedModule> {
        Ok(SavedModule {
            fields: vec![("predictor_steps", serde_json::json!(self.predictor_steps))],
            tensors: self.tensors(),
            counters: vec![],
        })
    }

    fn restore(&mut self, saved: &SavedFields, ck: &mut Checkpoint, _gpu: &Gpu, path: &Path) -> Result<()> {
        self.predictor_steps = saved.get("predictor_steps").and_then(|v| v.as_u64()).unwrap_or(0);
        for (name, t) in self.tensors() {
            let data = ck.take(&name, t.shape()).map_err(|e| Error::Data {
                path: path.display().to_string(),
                message: format!("DNI predictor: {e}"),
            })?;
            t.gpu().write(&t, &data)?;
        }
        Ok(())
    }

    /// Module k backpropagates its predictor's gradient on the most recent batch t-1,
    /// computed through the modules below at their current weights.
    fn sigma_gradient(
        &mut self,
        net: &mut Network,
        k: usize,
        at: &SigmaInput,
    ) -> Result<Option<(Vec<f32>, HostBatch)>> {
        let (Some(p), Some(batch)) = (&self.predictor, at.latest()) else {
            return Ok(None);
        };
        let x = input_of_stage(net, &batch, k)?;
        let stage = &mut net.stages[k];
        let (h, acts) = stage.forward_train(&x, false)?;
        let synthetic = GradientPredictor::synthetic_gradient(&p.forward(&h)?.0)?;
        stage.backward(acts, &synthetic, false)?;
        Ok(Some((stage_grads(stage)?, batch)))
    }
}
