//! A whole training run: data, model, split over devices, epochs of training and
//! evaluation, metrics, plots and checkpoints, with exact resume.
//!
//! Determinism: weights come from the seed (per layer), the data order and augmentation of
//! each batch from (seed, epoch, batch), so a run is a function of its configuration, and a
//! resumed run continues exactly where the checkpoint left off: same batches, same weights,
//! same momentum, same BN statistics.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::schedule::{self, EpochOptions, HostBatch, Method, PipelineState};
use super::{sigma, Network, OptimConfig};
use crate::checkpoint::{self, Checkpoint, CheckpointMeta};
use crate::data::{Dataset, DatasetKind, LoadOptions, Loader, LoaderConfig, Normalization};
use crate::error::{Error, Result};
use crate::gpu::{adapter, AdapterSelector, Gpu};
use crate::layers::loss::{Metrics, MetricsAccumulator};
use crate::layers::predictor::PredictorConfig;
use crate::model::resnet::{build, Arch, ResNetConfig};
use crate::model::{split, ModelSpec, SplitPolicy};
use crate::report::{EpochRecord, MetricsLog, SigmaLog, SigmaRecord};
use crate::trace::Tracer;

/// Everything that defines a run (stored in its checkpoints).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    pub dataset: String,
    pub data_dir: Option<PathBuf>,
    /// Side of folder images after resizing.
    pub image_size: usize,
    /// Use only the first N training images (after a seeded shuffle); None: all.
    pub train_subset: Option<usize>,
    /// Evaluate on the first N test images only (None: all).
    #[serde(default)]
    pub test_subset: Option<usize>,
    pub arch: String,
    pub depth: usize,
    pub splits: usize,
    pub split: String,
    pub epochs: usize,
    pub batch_size: usize,
    pub optim: OptimConfig,
    pub seed: u64,
    /// Adapter selectors, one per stage or one for all; stages in order.
    pub devices: Vec<String>,
    /// bp, fr, ddg or dni.
    pub algo: String,
    /// Measure sigma every N iterations (None: never).
    #[serde(default)]
    pub measure_sigma: Option<usize>,
    /// DNI's gradient predictors.
    #[serde(default)]
    pub dni: PredictorConfig,
}

impl RunConfig {
    /// The paper's setup on the embedded dataset with a ResNet-20 on one device.
    pub fn default_for(epochs: usize) -> RunConfig {
        RunConfig {
            dataset: "embedded".into(),
            data_dir: None,
            image_size: 32,
            train_subset: None,
            test_subset: None,
            arch: "resnet".into(),
            depth: 20,
            splits: 1,
            split: "even".into(),
            epochs,
            batch_size: 128,
            optim: OptimConfig::paper(epochs),
            seed: 0,
            devices: vec!["auto".into()],
            algo: "bp".into(),
            measure_sigma: None,
            dni: PredictorConfig::default(),
        }
    }

    /// The decoupled method of `algo` (None for backprop).
    pub fn method(&self) -> Result<Option<Method>> {
        Ok(match self.algo.as_str() {
            "bp" => None,
            "fr" => Some(Method::Fr),
            "ddg" => Some(Method::Ddg),
            "dni" => Some(Method::Dni(self.dni)),
            other => {
                return Err(Error::Unsupported {
                    op: "train",
                    detail: format!("--algo {other}: choose bp, fr, ddg or dni"),
                })
            }
        })
    }

    fn check(&self) -> Result<()> {
        let bad = |detail: String| Error::Unsupported { op: "train", detail };
        if self.epochs == 0 {
            return Err(bad("--epochs must be at least 1".into()));
        }
        if self.batch_size == 0 {
            return Err(bad("--batch-size must be at least 1".into()));
        }
        self.method()?;
        if self.measure_sigma == Some(0) {
            return Err(bad("--measure-sigma must be at least 1 (iterations between measurements)".into()));
        }
        if self.dni.depth == 0 {
            return Err(bad("--dni-depth must be at least 1 (the output conv)".into()));
        }
        if self.devices.is_empty() || (self.devices.len() != 1 && self.devices.len() != self.splits) {
            return Err(bad(format!(
                "{} devices for {} stages: give one or one per stage",
                self.devices.len(),
                self.splits
            )));
        }
        self.optim.validate()
    }
}

/// The datasets, model description and split of a configuration.
pub struct Prepared {
    pub train: Arc<Dataset>,
    pub test: Arc<Dataset>,
    pub norm: Normalization,
    pub spec: ModelSpec,
    pub ranges: Vec<std::ops::Range<usize>>,
}

/// Loads the data and describes the model (no device needed).
pub fn prepare(cfg: &RunConfig) -> Result<Prepared> {
    cfg.check()?;
    let kind: DatasetKind = cfg.dataset.parse().map_err(|m: String| Error::Unsupported { op: "data", detail: m })?;
    let opts = LoadOptions {
        root: cfg.data_dir.clone(),
        image_size: (cfg.image_size as u32, cfg.image_size as u32),
        ..LoadOptions::default()
    };
    let (mut train, mut test) = kind.load_train_test(&opts)?;
    if let Some(n) = cfg.test_subset {
        if n == 0 || n > test.len() {
            return Err(Error::Unsupported {
                op: "data",
                detail: format!("--test-subset {n}: the test set has {} images", test.len()),
            });
        }
        let first: Vec<usize> = (0..n).collect();
        test = test.subset(&first, format!("{}-first{n}", test.name()))?;
    }
    if let Some(n) = cfg.train_subset {
        if n == 0 || n > train.len() {
            return Err(Error::Unsupported {
                op: "data",
                detail: format!("--train-subset {n}: the training set has {} images", train.len()),
            });
        }
        let order = crate::data::epoch_order(train.len(), cfg.seed, u64::MAX);
        train = train.subset(&order[..n], format!("{}-subset{n}", train.name()))?;
    }
    let norm = Normalization::for_kind(kind, &train);
    let arch: Arch = cfg.arch.parse()?;
    let spec = build(&ResNetConfig {
        arch,
        depth: cfg.depth,
        input: train.image_shape().to_vec(),
        classes: train.num_classes(),
    })?;
    let policy: SplitPolicy = cfg.split.parse()?;
    let ranges = split(&spec, cfg.splits, policy)?;
    Ok(Prepared { train: Arc::new(train), test: Arc::new(test), norm, spec, ranges })
}

/// Opens one device per stage on the adapters the selectors name.
///
/// - One selector: every stage on that adapter, each stage with its own device and queue.
///   `auto` with several real GPUs spreads the stages over them in contiguous blocks.
/// - A list: stage k on the k-th adapter (several stages may name the same one).
///
/// On a CPU adapter (lavapipe), devices of one instance share one thread pool and do not
/// run at the same time, so each stage gets its own wgpu instance with an equal share of
/// the cores (`LP_NUM_THREADS`), as `../shared/spec/kernel-performance-facts.md` measured.
pub fn open_devices(selectors: &[String], stages: usize) -> Result<Vec<Gpu>> {
    let mut chosen: Vec<AdapterSelector> = Vec::with_capacity(stages);
    for k in 0..stages {
        let s = if selectors.len() == 1 { &selectors[0] } else { &selectors[k] };
        chosen.push(s.parse()?);
    }
    let list = adapter::list_adapters();
    if selectors.len() == 1 && chosen[0] == AdapterSelector::Auto && stages > 1 {
        let gpus: Vec<usize> = list.iter().filter(|a| !a.is_cpu()).map(|a| a.index).collect();
        if gpus.len() > 1 {
            let per = stages.div_ceil(gpus.len());
            chosen = (0..stages).map(|k| AdapterSelector::Index(gpus[k / per])).collect();
        }
    }
    let shared = adapter::new_instance();
    let mut out = Vec::with_capacity(stages);
    for sel in &chosen {
        let probe = Gpu::open_on(&shared, sel)?;
        if stages > 1 && probe.adapter().is_cpu() && probe.adapter().backend == wgpu::Backend::Vulkan {
            drop(probe);
            let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            let threads = (cores / stages).max(1);
            // Read by llvmpipe when the instance enumerates its devices; stages are opened
            // one after the other before any worker thread exists.
            std::env::set_var("LP_NUM_THREADS", threads.to_string());
            let own = adapter::new_instance();
            out.push(Gpu::open_on(&own, sel)?);
        } else {
            out.push(probe);
        }
    }
    Ok(out)
}

/// Progress callbacks (the CLI draws a progress bar from them).
pub trait Observer {
    /// Before the first batch of an epoch (1-based) of `batches` batches.
    fn epoch_start(&mut self, _epoch: usize, _batches: usize) {}
    /// After each training batch; `images_per_second` since the epoch started.
    fn batch(&mut self, _epoch: usize, _index: usize, _images_per_second: f64) {}
    /// After each epoch's evaluation.
    fn epoch_end(&mut self, _record: &EpochRecord) {}
}

/// An observer that ignores everything.
pub struct Quiet;
impl Observer for Quiet {}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub records: Vec<EpochRecord>,
    pub best_test_top1: f64,
    pub out: PathBuf,
}

/// Evaluates `net` on `data` (evaluation mode, no augmentation, every sample).
pub fn evaluate(net: &Network, data: Arc<Dataset>, norm: &Normalization, batch_size: usize) -> Result<Metrics> {
    let last = &net.stages[net.stages.len() - 1].gpu;
    let mut acc = MetricsAccumulator::new(last)?;
    for batch in Loader::new(data, norm.clone(), LoaderConfig::eval(batch_size), 0)? {
        let out = net.eval_batch(&batch.images, &batch.labels)?;
        acc.add(&out, batch.len())?;
        net.sync()?;
    }
    acc.read()
}

/// The DNI predictors' tensors with checkpoint names: `<predictor param>` and
/// `optimizer.momentum.<predictor param>`.
fn predictor_tensors(st: &PipelineState) -> Vec<(String, crate::gpu::Tensor)> {
    let mut out = Vec::new();
    for s in &st.stages {
        if let Some(p) = &s.predictor {
            for p in p.params() {
                out.push((p.name.clone(), p.value.clone()));
                out.push((format!("optimizer.momentum.{}", p.name), p.momentum.clone()));
            }
        }
    }
    out
}

/// Host copies of every state tensor, for a checkpoint. Under FR the pipeline's state (each
/// stage's input history and the gradient in flight) is saved too, so a resumed run
/// continues the same pipeline; under DNI the predictors (the epoch boundary leaves no
/// prediction in flight). DDG's stored graphs are not saved (see [`train`]).
fn checkpoint_of(
    net: &Network,
    pipeline: Option<&PipelineState>,
    cfg: &RunConfig,
    epoch: usize,
    best: f64,
) -> Result<Checkpoint> {
    let config =
        serde_json::to_value(cfg).map_err(|e| Error::Data { path: "config".into(), message: e.to_string() })?;
    let mut meta = CheckpointMeta::new(epoch, net.steps, cfg.seed, config);
    meta.best_top1 = Some(best);
    if let Some(st) = pipeline {
        meta.extra = serde_json::json!({
            "pipeline": {
                "method": st.method.name(),
                "iteration": st.iteration,
                "steps": st.stages.iter().map(|s| s.steps).collect::<Vec<_>>(),
                "predictor_steps": st.stages.iter().map(|s| s.predictor_steps).collect::<Vec<_>>(),
                "history": st.stages.iter().map(|s| s.input_history.len()).collect::<Vec<_>>(),
                "pending_grad": st.stages.iter().map(|s| s.pending_grad.is_some()).collect::<Vec<_>>(),
            }
        });
    }
    let mut ck = Checkpoint::new(meta);
    for (name, t) in net.state() {
        ck.push(name, t.shape(), t.to_vec()?)?;
    }
    if let Some(st) = pipeline {
        for (k, s) in st.stages.iter().enumerate() {
            for (i, t) in s.input_history.iter().enumerate() {
                ck.push(format!("pipeline.stage{k}.input_history.{i}"), t.shape(), t.to_vec()?)?;
            }
            if let Some(g) = &s.pending_grad {
                ck.push(format!("pipeline.stage{k}.pending_grad"), g.shape(), g.to_vec()?)?;
            }
        }
        for (name, t) in predictor_tensors(st) {
            ck.push(name, t.shape(), t.to_vec()?)?;
        }
    }
    Ok(ck)
}

/// Restores the pipeline state saved by [`checkpoint_of`] into `st` (fresh, with its
/// predictors built).
fn restore_pipeline(net: &Network, st: &mut PipelineState, ck: &mut Checkpoint, path: &Path) -> Result<()> {
    let bad = |message: String| Error::Data { path: path.display().to_string(), message };
    // Checkpoints written before DDG and DNI existed hold an FR pipeline under "fr".
    let (mut saved, prefix) = match (ck.meta.extra.get("pipeline"), ck.meta.extra.get("fr")) {
        (Some(p), _) => (p.clone(), "pipeline"),
        (None, Some(f)) => (f.clone(), "fr"),
        _ => return Err(bad("no pipeline state in the checkpoint (another --algo?)".into())),
    };
    if prefix == "fr" {
        saved["method"] = serde_json::json!("fr");
    }
    if saved["method"].as_str() != Some(st.method.name()) {
        return Err(bad(format!("the checkpoint's pipeline runs {}, not {}", saved["method"], st.method.name())));
    }
    st.iteration = saved["iteration"].as_u64().ok_or_else(|| bad("pipeline state without iteration".into()))?;
    for (s, stage) in st.stages.iter_mut().enumerate() {
        stage.steps =
            saved["steps"][s].as_u64().ok_or_else(|| bad(format!("pipeline state without steps of stage {s}")))?;
        stage.predictor_steps = saved["predictor_steps"][s].as_u64().unwrap_or(0);
        let n = saved["history"][s].as_u64().unwrap_or(0);
        let mut names: Vec<(String, bool)> =
            (0..n).map(|i| (format!("{prefix}.stage{s}.input_history.{i}"), true)).collect();
        if saved["pending_grad"][s].as_bool().unwrap_or(false) {
            names.push((format!("{prefix}.stage{s}.pending_grad"), false));
        }
        for (name, is_input) in names {
            let shape = ck.get(&name).ok_or_else(|| bad(format!("missing {name}")))?.shape.clone();
            let data = ck.take(&name, &shape)?;
            let t = net.stages[s].gpu.tensor(&shape, &data)?;
            if is_input {
                stage.input_history.push_back(t);
            } else {
                stage.pending_grad = Some(t);
            }
        }
    }
    for (name, t) in predictor_tensors(st) {
        let data = ck.take(&name, t.shape()).map_err(|e| bad(format!("DNI predictor: {e}")))?;
        t.gpu().write(&t, &data)?;
    }
    Ok(())
}

/// Loads a checkpoint's tensors into `net` (every tensor must be there with its shape).
pub fn restore(net: &mut Network, ck: &mut Checkpoint, path: &Path) -> Result<()> {
    for (name, t) in net.state() {
        let data = ck.take(&name, t.shape()).map_err(|e| Error::Data {
            path: path.display().to_string(),
            message: format!("does not fit this model: {e}"),
        })?;
        t.gpu().write(&t, &data)?;
    }
    if let Some(extra) = ck.names().next() {
        return Err(Error::Data {
            path: path.display().to_string(),
            message: format!("holds tensor '{extra}' that this model does not have (another architecture?)"),
        });
    }
    net.steps = ck.meta.iteration;
    Ok(())
}

/// The configuration stored in a checkpoint.
pub fn checkpoint_config(dir: &Path) -> Result<(RunConfig, CheckpointMeta)> {
    let meta = checkpoint::load_meta(dir)?;
    let cfg: RunConfig = serde_json::from_value(meta.config.clone()).map_err(|e| Error::Data {
        path: dir.join(checkpoint::SAFETENSORS_FILE).display().to_string(),
        message: format!("the stored run configuration is unreadable: {e}"),
    })?;
    Ok((cfg, meta))
}

/// Trains as `cfg` says, writing metrics, plots and a checkpoint per epoch into `out`. With
/// `resume`, continues the run whose checkpoint is in `out` (its configuration wins, except
/// `epochs`, which may be raised to train longer). A DDG run cannot be resumed: its stored
/// graphs (d_k activation sets per module) are not checkpointed.
///
/// With `measure_sigma = Some(n)`, sigma is measured every n iterations (see
/// [`super::sigma`]) into `sigma.jsonl`, and each epoch record holds the epoch's mean per
/// stage. The measurements change nothing in the trajectory; their time is left out of the
/// epoch time and their memory out of the peak memory.
pub fn train(
    cfg: &RunConfig,
    out: &Path,
    resume: bool,
    trace: Option<&Path>,
    obs: &mut dyn Observer,
) -> Result<RunSummary> {
    let (cfg, start_epoch, mut best, ck) = if resume {
        let (mut stored, meta) = checkpoint_config(out)?;
        if stored.algo == "ddg" {
            return Err(Error::Unsupported {
                op: "resume",
                detail: format!(
                    "{}: a DDG run cannot be resumed (its stored graphs are not checkpointed); the checkpoint is left as it is: start a new run or evaluate it",
                    out.display()
                ),
            });
        }
        stored.epochs = stored.epochs.max(cfg.epochs);
        let ck = checkpoint::load(out)?;
        (stored, meta.epoch, meta.best_top1.unwrap_or(0.0), Some(ck))
    } else {
        (cfg.clone(), 0, 0.0, None)
    };
    let p = prepare(&cfg)?;
    let method = cfg.method()?;
    let gpus = open_devices(&cfg.devices, p.ranges.len())?;
    let mut net = Network::new(p.spec.clone(), &p.ranges, &gpus, cfg.seed)?;
    let mut pipeline = match method {
        Some(m) => Some(PipelineState::new(m, &net, cfg.seed)?),
        None => None,
    };
    if let Some(mut ck) = ck {
        let file = out.join(checkpoint::SAFETENSORS_FILE);
        if let Some(st) = pipeline.as_mut() {
            restore_pipeline(&net, st, &mut ck, &file)?;
        }
        restore(&mut net, &mut ck, &file)?;
    }
    let tracer = trace.map(Tracer::new);
    let mut log = MetricsLog::open(out, start_epoch + 1)?;
    let mut sigma_log = SigmaLog::open(out, start_epoch + 1)?;
    let mut records = log.records().to_vec();
    for epoch in start_epoch..cfg.epochs {
        let lr = cfg.optim.lr_at(epoch);
        let loader =
            Loader::new(p.train.clone(), p.norm.clone(), LoaderConfig::train(cfg.batch_size, cfg.seed), epoch as u64)?;
        let n = loader.num_batches();
        obs.epoch_start(epoch + 1, n);
        let mut peak = vec![0u64; gpus.len()];
        let note_peak = |peak: &mut Vec<u64>| {
            for (p, g) in peak.iter_mut().zip(&gpus) {
                *p = (*p).max(g.memory().peak_bytes);
            }
        };
        let mut sigmas: Vec<SigmaRecord> = Vec::new();
        let mut measuring = 0.0f64;
        let t0 = Instant::now();
        let mut seen = 0usize;
        // Iterations until the next measurement (None: no measurements).
        let until_measure = |iteration: u64| cfg.measure_sigma.map(|m| m - (iteration % m as u64) as usize);
        let train_metrics = if let Some(st) = pipeline.as_mut() {
            let mut feed = loader.map(|b| {
                seen += b.len();
                obs.batch(epoch + 1, b.index, seen as f64 / t0.elapsed().as_secs_f64());
                HostBatch { images: b.images, labels: b.labels }
            });
            let mut done = 0usize;
            let mut total = crate::layers::loss::Metrics { loss: 0.0, top1: 0.0, top5: 0.0, samples: 0 };
            while done < n {
                let chunk = until_measure(st.iteration).unwrap_or(n).min(n - done);
                for g in &gpus {
                    g.reset_peak_memory();
                }
                let m = schedule::run_epoch(
                    &mut net,
                    st,
                    feed.by_ref().take(chunk),
                    chunk,
                    &EpochOptions {
                        tracer: tracer.as_ref(),
                        end_of_epoch: done + chunk == n,
                        ..EpochOptions::new(&cfg.optim, lr)
                    },
                )?;
                note_peak(&mut peak);
                total = combine(total, m);
                done += chunk;
                if cfg.measure_sigma.is_some() && st.iteration % cfg.measure_sigma.unwrap_or(1) as u64 == 0 {
                    let t = Instant::now();
                    let sigma = sigma::measure(&mut net, st)?;
                    sigmas.push(SigmaRecord { epoch: epoch + 1, iteration: st.iteration, sigma });
                    measuring += t.elapsed().as_secs_f64();
                }
            }
            total
        } else {
            let mut acc = MetricsAccumulator::new(&gpus[gpus.len() - 1])?;
            for g in &gpus {
                g.reset_peak_memory();
            }
            for batch in loader {
                let out = net.bp_step(&batch.images, &batch.labels, &cfg.optim, lr)?;
                acc.add(&out, batch.len())?;
                // One iteration in flight at most: the host never races ahead of the devices.
                net.sync()?;
                seen += batch.len();
                obs.batch(epoch + 1, batch.index, seen as f64 / t0.elapsed().as_secs_f64());
                if let Some(m) = cfg.measure_sigma {
                    if net.steps.is_multiple_of(m as u64) {
                        note_peak(&mut peak);
                        let t = Instant::now();
                        let hb = HostBatch { images: batch.images, labels: batch.labels };
                        let sigma = sigma::measure_bp(&mut net, &hb)?;
                        sigmas.push(SigmaRecord { epoch: epoch + 1, iteration: net.steps, sigma });
                        measuring += t.elapsed().as_secs_f64();
                        for g in &gpus {
                            g.reset_peak_memory();
                        }
                    }
                }
            }
            note_peak(&mut peak);
            acc.read()?
        };
        if let Some(tr) = &tracer {
            tr.write()?;
        }
        let epoch_seconds = t0.elapsed().as_secs_f64() - measuring;
        if !train_metrics.loss.is_finite() {
            return Err(Error::Diverged { epoch: epoch + 1, loss: train_metrics.loss });
        }
        let test = evaluate(&net, p.test.clone(), &p.norm, cfg.batch_size)?;
        // Weights that overflowed give a finite training loss on the last batch but NaN on
        // the test set: diverged too (and nothing NaN reaches the metrics or the checkpoint).
        if !test.loss.is_finite() {
            return Err(Error::Diverged { epoch: epoch + 1, loss: test.loss });
        }
        best = best.max(test.top1);
        let record = EpochRecord {
            epoch: epoch + 1,
            lr: lr as f64,
            train_loss: train_metrics.loss,
            train_top1: train_metrics.top1,
            test_loss: test.loss,
            test_top1: test.top1,
            test_top5: test.top5,
            best_test_top1: best,
            epoch_seconds,
            images_per_second: train_metrics.samples as f64 / epoch_seconds,
            peak_memory_bytes: peak,
            sigma: SigmaRecord::mean(&sigmas, gpus.len()),
        };
        checkpoint::save(out, &checkpoint_of(&net, pipeline.as_ref(), &cfg, epoch + 1, best)?)?;
        for s in sigmas {
            sigma_log.push(s)?;
        }
        log.push(record.clone())?;
        obs.epoch_end(&record);
        records.push(record);
    }
    Ok(RunSummary { records, best_test_top1: best, out: out.to_path_buf() })
}

/// Metrics of two parts of an epoch, weighted by their samples.
fn combine(a: Metrics, b: Metrics) -> Metrics {
    let n = a.samples + b.samples;
    if n == 0 {
        return a;
    }
    let w = |x: f64, y: f64| (x * a.samples as f64 + y * b.samples as f64) / n as f64;
    Metrics { loss: w(a.loss, b.loss), top1: w(a.top1, b.top1), top5: w(a.top5, b.top5), samples: n }
}
