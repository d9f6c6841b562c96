//! Resuming a run: which flags may change, the checks that the configuration continues
//! the checkpoint's run, and what the checkpoint says about the run so far.

use std::path::Path;

use super::run::{stored_config, DataInfo, History, Prepared, RunConfig};
use super::OptimConfig;
use crate::checkpoint::{self, Checkpoint};
use crate::error::{Error, Result};
use crate::report;

/// Flags of `train` that a resumed run may change (the others must equal the checkpoint's
/// or be left out): they do not change what the run computes, or extend it.
pub const RESUMABLE_FLAGS: [&str; 11] = [
    "epochs",
    "data-dir",
    "device",
    "schedule",
    "gammas",
    "measure-sigma",
    "quiet",
    "trace",
    "conv-variant",
    "transport",
    "layout",
];

/// The value of a flag that fixes what a run computes, for comparison and messages.
fn fixed_value(c: &RunConfig, flag: &str) -> Option<String> {
    let opt = |v: Option<usize>| v.map_or_else(|| "none".to_string(), |v| v.to_string());
    Some(match flag {
        "dataset" => c.dataset.clone(),
        "arch" => c.arch.clone(),
        "depth" => c.depth.to_string(),
        "splits" => c.splits.to_string(),
        "split" => c.split.clone(),
        "batch-size" => c.batch_size.to_string(),
        "image-size" => c.image_size.to_string(),
        "lr" => c.optim.lr.to_string(),
        "momentum" => c.optim.momentum.to_string(),
        "decay" => c.optim.weight_decay.to_string(),
        "first-module-lr-scale" => c.optim.first_stage_lr_scale.to_string(),
        "seed" => c.seed.to_string(),
        "train-subset" => opt(c.train_subset),
        "test-subset" => opt(c.test_subset),
        "algo" => c.algo.clone(),
        "dni-depth" => c.dni.depth.to_string(),
        "dni-width" => c.dni.width.to_string(),
        "microbatches" => c.microbatches.to_string(),
        "fr-bn-update" => format!("{:?}", c.fr_bn_update).to_lowercase(),
        "reference" => c.is_reference().to_string(),
        "shortcut-pad" => c.shortcut_pad.to_string(),
        "last-batch" => c.last_batch.to_string(),
        "dgl-depth" => c.dgl.depth.to_string(),
        "dgl-width" => c.dgl.width.to_string(),
        "replicas" => c.replicas.to_string(),
        "allreduce" => c.allreduce.to_string(),
        "init-from" => c.init_from.as_ref().map_or_else(|| "none".to_string(), |p| p.display().to_string()),
        _ => return None,
    })
}

/// Every flag [`fixed_value`] knows.
const FIXED_FLAGS: [&str; 26] = [
    "init-from",
    "replicas",
    "allreduce",
    "dataset",
    "arch",
    "depth",
    "splits",
    "split",
    "batch-size",
    "image-size",
    "lr",
    "momentum",
    "decay",
    "first-module-lr-scale",
    "seed",
    "train-subset",
    "test-subset",
    "algo",
    "dni-depth",
    "dni-width",
    "microbatches",
    "fr-bn-update",
    "dgl-depth",
    "dgl-width",
    "shortcut-pad",
    "last-batch",
];

/// The configuration of a resumed run: the checkpoint's `stored` one, with what the user
/// gave on the command line (`given`: flag names without `--`, values in `requested`)
/// where a resumed run may change it ([`RESUMABLE_FLAGS`]). A given flag that would change
/// what the run computes is an error naming it; `--out` is one too (a resumed run writes
/// into its own directory). Returns the configuration and one line per change, which the
/// run records in its checkpoints.
pub fn resume_config(stored: &RunConfig, requested: &RunConfig, given: &[&str]) -> Result<(RunConfig, Vec<String>)> {
    let bad = |detail: String| Error::InvalidConfig { op: "resume", detail };
    let mut cfg = stored.clone();
    let mut changes = Vec::new();
    for flag in given {
        match *flag {
            "out" => {
                return Err(bad(
                    "--out cannot be combined with --resume: a resumed run writes into the directory it resumes".into(),
                ))
            }
            "epochs" => cfg.epochs = requested.epochs,
            "data-dir" => cfg.data_dir = requested.data_dir.clone(),
            "device" => cfg.devices = requested.devices.clone(),
            "schedule" => cfg.optim.schedule = requested.optim.schedule.clone(),
            "gammas" => cfg.optim.gammas = requested.optim.gammas.clone(),
            "measure-sigma" => cfg.measure_sigma = requested.measure_sigma,
            "conv-variant" => cfg.conv_variant = requested.conv_variant.clone(),
            "layout" => cfg.layout = requested.layout,
            // How and where the run goes on, not what it computes.
            "quiet" | "trace" | "transport" | "inject-failure" => {}
            f => {
                let (Some(want), Some(have)) = (fixed_value(requested, f), fixed_value(stored, f)) else { continue };
                if want != have {
                    return Err(bad(format!(
                        "--{f} {want} conflicts with the checkpoint, which was trained with {f} {have}; a resumed run keeps its configuration (only --{} may change)",
                        RESUMABLE_FLAGS.join(", --")
                    )));
                }
            }
        }
    }
    if given.contains(&"schedule") && !given.contains(&"gammas") {
        // --schedule alone means one gamma of 0.1 per step, as for a new run.
        cfg.optim.gammas = requested.optim.gammas.clone();
    }
    let show = |v: &dyn std::fmt::Debug| format!("{v:?}");
    for (flag, was, now) in [
        ("epochs", show(&stored.epochs), show(&cfg.epochs)),
        ("data-dir", show(&stored.data_dir), show(&cfg.data_dir)),
        ("device", show(&stored.devices), show(&cfg.devices)),
        ("schedule", show(&stored.optim.schedule), show(&cfg.optim.schedule)),
        ("gammas", show(&stored.optim.gammas), show(&cfg.optim.gammas)),
        ("measure-sigma", show(&stored.measure_sigma), show(&cfg.measure_sigma)),
        ("conv-variant", show(&stored.conv_variant), show(&cfg.conv_variant)),
        ("layout", show(&stored.layout), show(&cfg.layout)),
    ] {
        if was != now {
            changes.push(format!("--{flag}: {was} -> {now}"));
        }
    }
    Ok((cfg, changes))
}

/// A run being continued: its checkpoint and what it says about the run so far.
pub(super) struct Resumed {
    pub(super) ck: Checkpoint,
    pub(super) epoch: usize,
    pub(super) iteration: u64,
    pub(super) best: f64,
    pub(super) history: History,
    pub(super) data: Option<DataInfo>,
    pub(super) resumes: Vec<serde_json::Value>,
    /// The run's `--init-from` record.
    pub(super) init_from: Option<String>,
}

/// Reads the checkpoint a run resumes from and checks that `cfg` continues it: the same
/// model, data, method and optimiser (only [`RESUMABLE_FLAGS`] may differ) and more epochs
/// than it has trained. A DDG run cannot be resumed: its stored graphs are not checkpointed.
pub(super) fn open_resume(cfg: &RunConfig, out: &Path) -> Result<Resumed> {
    let ck = super::run::load_checkpoint(out)?;
    let stored = stored_config(&ck.meta, out)?;
    let method = stored.method()?;
    if !method.resumable() {
        return Err(Error::InvalidConfig {
            op: "resume",
            detail: format!(
                "{}: a {} run cannot be resumed (its state between iterations is not checkpointed); the checkpoint is left as it is: start a new run or evaluate it (featreplay eval {})",
                out.display(),
                method.name().to_uppercase(),
                out.display()
            ),
        });
    }
    let fixed: Vec<&str> = FIXED_FLAGS.to_vec();
    resume_config(&stored, cfg, &fixed)?;
    let epoch = ck.meta.epoch;
    if cfg.epochs <= epoch {
        return Err(Error::InvalidConfig {
            op: "resume",
            detail: format!(
                "{} has trained {epoch} of {} epochs already; pass --epochs N with N > {epoch} to train longer",
                out.display(),
                stored.epochs
            ),
        });
    }
    let history = match ck.meta.extra.get("history") {
        Some(h) => serde_json::from_value(h.clone()).map_err(|e| Error::Data {
            path: out.join(checkpoint::SAFETENSORS_FILE).display().to_string(),
            message: format!("the stored history is unreadable: {e}"),
        })?,
        // Checkpoints from before the history was stored: the metrics files up to the
        // checkpoint's epoch are all there is.
        None => {
            let keep = |p: &Path| p.exists();
            let jsonl = out.join("metrics.jsonl");
            let sigma = out.join("sigma.jsonl");
            History {
                epochs: if keep(&jsonl) { report::read_metrics(&jsonl)? } else { vec![] }
                    .into_iter()
                    .filter(|r| r.epoch <= epoch)
                    .collect(),
                sigma: if keep(&sigma) { report::read_sigma(&sigma)? } else { vec![] }
                    .into_iter()
                    .filter(|r| r.epoch <= epoch)
                    .collect(),
            }
        }
    };
    let data = ck.meta.extra.get("data").and_then(|d| serde_json::from_value(d.clone()).ok());
    let resumes = ck.meta.extra.get("resumes").and_then(|r| r.as_array().cloned()).unwrap_or_default();
    let init_from = ck.meta.extra.get("init_from").and_then(|r| r.as_str().map(String::from));
    Ok(Resumed {
        epoch,
        iteration: ck.meta.iteration,
        best: ck.meta.best_top1.unwrap_or(0.0),
        history,
        data,
        resumes,
        init_from,
        ck,
    })
}

impl Resumed {
    /// Checks what may only be checked with the data loaded: the same data (a moved
    /// `--data-dir` must hold the same images) and a `--schedule` that changes nothing
    /// already trained.
    pub(super) fn check_continues(&self, cfg: &RunConfig, stored: &RunConfig, p: &Prepared) -> Result<()> {
        let bad = |detail: String| Error::InvalidConfig { op: "resume", detail };
        if let Some(d) = &self.data {
            let now = DataInfo::of(p);
            if (d.train_images, d.test_images, &d.input, d.classes)
                != (now.train_images, now.test_images, &now.input, now.classes)
            {
                return Err(bad(format!(
                    "the data is not what the run was trained on: {} training and {} test images of shape {:?} in {} classes then, {} and {} of {:?} in {} now",
                    d.train_images, d.test_images, d.input, d.classes, now.train_images, now.test_images, now.input, now.classes
                )));
            }
        }
        let per_epoch = cfg.batches_per_epoch(p.train.len());
        let done = self.iteration;
        let past = |o: &OptimConfig| -> Vec<(u64, u32)> {
            let mut v: Vec<(u64, u32)> = o
                .schedule
                .iter()
                .zip(&o.gammas)
                .map(|(s, g)| (OptimConfig::step_iteration(*s, per_epoch), g.to_bits()))
                .filter(|(i, _)| *i < done)
                .collect();
            v.sort_unstable();
            v
        };
        if past(&cfg.optim) != past(&stored.optim) {
            return Err(bad(format!(
                "--schedule {:?} --gammas {:?} changes the learning rate of iterations already trained (the run used --schedule {:?} --gammas {:?}); steps may only be added or moved after epoch {}",
                cfg.optim.schedule, cfg.optim.gammas, stored.optim.schedule, stored.optim.gammas, self.epoch
            )));
        }
        Ok(())
    }
}
