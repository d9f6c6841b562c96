//! One stage's whole training state as bytes, for a run spread over processes
//! ([`crate::pipeline::cluster`]): at each epoch's end every other rank sends its stage's
//! state to rank 0, which loads it into its own copy of that stage and then evaluates and
//! checkpoints the whole network as a single process would.
//!
//! The bytes are a safetensors file ([`checkpoint::to_bytes`], checksum verified on
//! arrival) holding the stage's weights, BN statistics and counters, momentum, the gradient
//! it holds from above, what its method keeps ([`ModuleMethod::save`]), and the epoch's
//! training metrics (last stage) and peak memory. Numbers travel as their bits, so what rank
//! 0 writes is what one process would have written.

use std::path::Path;
use std::sync::atomic::Ordering;

use super::method::SavedFields;
use super::run::PIPELINE;
use super::schedule::PipelineState;
use super::Network;
use crate::checkpoint::{self, Checkpoint, CheckpointMeta};
use crate::error::{Error, Result};
use crate::layers::loss::Metrics;
use crate::pipeline::cluster::Cluster;

/// What travels besides the stage's state: the epoch's training metrics (the last stage's
/// process has them) and the stage's peak device memory.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochReport {
    pub metrics: Option<Metrics>,
    pub peak_bytes: u64,
}

const METRICS: &str = "epoch.metrics";
const BATCH_LOSSES: &str = "epoch.batch_losses";
const PEAK: &str = "epoch.peak_bytes";

/// How messages are named in errors.
fn source(k: usize) -> std::path::PathBuf {
    Path::new(&format!("<state of stage {k}>")).to_path_buf()
}

/// Stage `k`'s state and `report`, as bytes for [`restore_stage`].
pub fn stage_bytes(net: &Network, st: &PipelineState, k: usize, report: &EpochReport) -> Result<Vec<u8>> {
    let stage = &st.stages[k];
    let saved = stage.module.save(k)?;
    let fields: serde_json::Map<String, serde_json::Value> =
        saved.fields.iter().map(|(key, v)| (key.to_string(), v.clone())).collect();
    let mut meta = CheckpointMeta::new(0, st.iteration, 0, serde_json::Value::Null);
    meta.extra = serde_json::json!({
        "stage": k,
        "steps": stage.steps,
        "fields": fields,
    });
    let mut ck = Checkpoint::new(meta);
    for (name, t) in net.stage_state(k) {
        ck.push(name, t.shape(), t.to_vec()?)?;
    }
    for (name, c) in net.stages[k].counters() {
        ck.push_i64(name, &[], vec![c.load(Ordering::Relaxed) as i64])?;
    }
    if let Some(g) = &stage.pending_grad {
        ck.push(pending_name(k), g.shape(), g.to_vec()?)?;
    }
    for (name, t) in saved.tensors {
        ck.push(name, t.shape(), t.to_vec()?)?;
    }
    for (name, v) in saved.counters {
        ck.push_i64(name, &[], vec![v as i64])?;
    }
    push_report(&mut ck, report)?;
    checkpoint::to_bytes(&source(k), &ck)
}

/// The bytes of `report` alone, from a replica r > 0 of stage `k` (rank 0 keeps only
/// replica 0's stage state).
pub fn report_bytes(k: usize, report: &EpochReport) -> Result<Vec<u8>> {
    let mut meta = CheckpointMeta::new(0, 0, 0, serde_json::Value::Null);
    meta.extra = serde_json::json!({ "stage": k });
    let mut ck = Checkpoint::new(meta);
    push_report(&mut ck, report)?;
    checkpoint::to_bytes(&source(k), &ck)
}

/// The report [`report_bytes`] made.
pub fn read_report(k: usize, bytes: &[u8]) -> Result<EpochReport> {
    let path = source(k);
    let mut ck = checkpoint::from_bytes(&path, bytes)?;
    let report = take_report(&mut ck, &path)?;
    refuse_leftovers(&ck, &path, k)?;
    Ok(report)
}

fn push_report(ck: &mut Checkpoint, report: &EpochReport) -> Result<()> {
    if let Some(m) = &report.metrics {
        let bits = [m.loss.to_bits(), m.top1.to_bits(), m.top5.to_bits(), m.samples as u64];
        ck.push_i64(METRICS, &[4], bits.iter().map(|&b| b as i64).collect())?;
        ck.push(BATCH_LOSSES, &[m.batch_losses.len()], m.batch_losses.clone())?;
    }
    ck.push_i64(PEAK, &[], vec![report.peak_bytes as i64])
}

fn take_report(ck: &mut Checkpoint, path: &Path) -> Result<EpochReport> {
    let metrics = match ck.int_tensors.iter().any(|t| t.name == METRICS) {
        false => None,
        true => {
            let bits = ck.take_i64(METRICS, &[4])?;
            let n = ck.get(BATCH_LOSSES).map(|t| t.shape.clone()).ok_or_else(|| Error::Data {
                path: path.display().to_string(),
                message: format!("no {BATCH_LOSSES}"),
            })?;
            let f = |i: usize| f64::from_bits(bits[i] as u64);
            Some(Metrics {
                loss: f(0),
                top1: f(1),
                top5: f(2),
                samples: bits[3] as usize,
                batch_losses: ck.take(BATCH_LOSSES, &n)?,
            })
        }
    };
    let peak_bytes = ck.take_i64(PEAK, &[])?[0] as u64;
    Ok(EpochReport { metrics, peak_bytes })
}

fn refuse_leftovers(ck: &Checkpoint, path: &Path, k: usize) -> Result<()> {
    match ck.names().next() {
        Some(extra) => Err(Error::Data {
            path: path.display().to_string(),
            message: format!("holds tensor '{extra}' that stage {k} does not have"),
        }),
        None => Ok(()),
    }
}

/// A hash of stage `k`'s weights and momentum (not its BN statistics, which each replica
/// keeps from its own data): replicas of a stage must agree on it after every epoch.
pub fn weights_hash(net: &Network, k: usize) -> Result<String> {
    let mut ck = Checkpoint::new(CheckpointMeta::new(0, 0, 0, serde_json::Value::Null));
    let s = &net.stages[k];
    for p in s.params() {
        ck.push(p.name.clone(), p.value.shape(), p.value.to_vec()?)?;
        ck.push(checkpoint::momentum_name(&p.name), p.momentum.shape(), p.momentum.to_vec()?)?;
    }
    Ok(ck.checksum())
}

/// The checkpoint name of the gradient stage `k` holds from above.
pub(super) fn pending_name(k: usize) -> String {
    format!("{PIPELINE}.stage{k}.pending_grad")
}

/// Loads the bytes [`stage_bytes`] made on stage `k`'s process into this process's copy of
/// stage `k` (its method's state rebuilt fresh from `seed` first, then restored), and returns
/// the report that came with them.
pub fn restore_stage(net: &Network, st: &mut PipelineState, k: usize, bytes: &[u8], seed: u64) -> Result<EpochReport> {
    let path = source(k);
    let bad = |message: String| Error::Data { path: path.display().to_string(), message };
    let mut ck = checkpoint::from_bytes(&path, bytes)?;
    if ck.meta.extra["stage"].as_u64() != Some(k as u64) || ck.meta.iteration != st.iteration {
        return Err(bad(format!(
            "holds stage {} at iteration {}, not stage {k} at iteration {}",
            ck.meta.extra["stage"], ck.meta.iteration, st.iteration
        )));
    }
    let report = take_report(&mut ck, &path)?;
    for (name, t) in net.stage_state(k) {
        let data = ck.take(&name, t.shape())?;
        t.gpu().write(&t, &data)?;
    }
    for (name, c) in net.stages[k].counters() {
        c.store(ck.take_i64(&name, &[])?[0].max(0) as u64, Ordering::Relaxed);
    }
    let extra = ck.meta.extra.clone();
    let stage = &mut st.stages[k];
    stage.steps = extra["steps"].as_u64().ok_or_else(|| bad("no step count".into()))?;
    stage.pending_grad = match ck.get(&pending_name(k)).map(|t| t.shape.clone()) {
        Some(shape) => Some(net.stages[k].gpu.tensor(&shape, &ck.take(&pending_name(k), &shape)?)?),
        None => None,
    };
    // The fields as a whole checkpoint's pipeline holds them: `<key>[k]`.
    let mut pipeline = serde_json::json!({});
    if let Some(fields) = extra["fields"].as_object() {
        for (key, v) in fields {
            let mut per_stage = vec![serde_json::Value::Null; k + 1];
            per_stage[k] = v.clone();
            pipeline[key] = serde_json::Value::Array(per_stage);
        }
    }
    stage.module = st.method.module(net, k, seed)?;
    stage.module.restore(&SavedFields { pipeline: &pipeline, k }, &mut ck, &net.stages[k].gpu, &path)?;
    refuse_leftovers(&ck, &path, k)?;
    Ok(report)
}

/// With replicas, every replica of this rank's stage must hold the same weights after an
/// epoch: replicas r > 0 send a hash of theirs to replica 0, which compares.
pub fn check_replicas(c: &dyn Cluster, net: &Network, epoch: usize) -> Result<()> {
    let t = c.topology();
    if t.replicas == 1 {
        return Ok(());
    }
    let (k, r) = c.place();
    let hash = weights_hash(net, k)?;
    if r > 0 {
        return c.send_state(t.rank(k, 0), hash.into_bytes());
    }
    for replica in 1..t.replicas {
        if c.receive_state(t.rank(k, replica))? != hash.as_bytes() {
            return Err(Error::ReplicasDiffer { stage: k, replica, epoch });
        }
    }
    Ok(())
}
