//! A whole training run: data, model, split over devices, epochs of training and
//! evaluation, metrics, plots and checkpoints, with exact resume; and the evaluation of a
//! checkpoint.
//!
//! Determinism: weights come from the seed (per layer), the data order and augmentation of
//! each batch from (seed, epoch, batch), so a run is a function of its configuration, and a
//! resumed run continues exactly where the checkpoint left off: same batches, same weights,
//! same momentum, same BN statistics.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::dgl::AuxConfig;
use super::method::{self, MemoryQuery, MethodOptions, SavedFields, TrainingMethod};
use super::resume::{open_resume, resume_config, Resumed, RESUMABLE_FLAGS};
use super::schedule::{self, EpochOptions, HostBatch, PipelineState};
use super::stage_state::{self, EpochReport};
use super::{sigma, Network, OptimConfig};
use crate::checkpoint::{self, Checkpoint, CheckpointMeta};
use crate::data::{Dataset, DatasetKind, LastBatch, LoadOptions, Loader, LoaderConfig, Normalization};
use crate::error::{Error, Result};
use crate::gpu::{adapter, AdapterSelector, Gpu};
use crate::kernels::shortcut::ChannelPad;
use crate::layers::loss::{Metrics, MetricsAccumulator};
use crate::layers::predictor::PredictorConfig;
use crate::model::resnet::{build, Arch, ResNetConfig};
use crate::model::{split, ModelSpec, SplitPolicy};
use crate::pipeline::cluster::{Allreduce, Cluster, Layout, Topology};
use crate::report::{EpochRecord, MetricsLog, SigmaLog, SigmaRecord};
use crate::rundir;
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
    /// The method's name (see [`method::METHODS`]).
    pub algo: String,
    /// Measure sigma every N iterations (None: never).
    #[serde(default)]
    pub measure_sigma: Option<usize>,
    /// FR: which passes update the BN running statistics.
    #[serde(default)]
    pub fr_bn_update: super::fr::BnUpdate,
    /// DNI's gradient predictors.
    #[serde(default)]
    pub dni: PredictorConfig,
    /// GPipe's micro-batches per batch.
    #[serde(default = "default_microbatches")]
    pub microbatches: usize,
    /// DGL's auxiliary heads.
    #[serde(default)]
    pub dgl: AuxConfig,
    /// Start from the model in this file (a featreplay checkpoint or a plain PyTorch
    /// state_dict) instead of the seeded initialisation.
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    /// Where basic blocks' option-A shortcuts put their zero channels.
    #[serde(default)]
    pub shortcut_pad: ChannelPad,
    /// What becomes of each epoch's final partial training batch.
    #[serde(default)]
    pub last_batch: LastBatch,
    /// The conv kernel variant forced on every device (`direct`, `tiled` or `tune`; None:
    /// chosen by adapter type).
    #[serde(default)]
    pub conv_variant: Option<String>,
    /// Data-parallel replicas of the pipeline (over processes: `--transport mpi`); each
    /// stage's gradients are averaged over them before every update.
    #[serde(default = "one")]
    pub replicas: usize,
    /// How the replicas' gradients are summed.
    #[serde(default)]
    pub allreduce: Allreduce,
    /// Which rank runs which stage of which replica (no effect on what is computed).
    #[serde(default)]
    pub layout: Layout,
    /// A test hook: fail at this stage and iteration (not stored: a resumed run does not
    /// fail again).
    #[serde(skip)]
    pub inject_failure: Option<schedule::InjectedFailure>,
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
            fr_bn_update: Default::default(),
            dni: PredictorConfig::default(),
            microbatches: default_microbatches(),
            dgl: AuxConfig::default(),
            init_from: None,
            shortcut_pad: ChannelPad::Both,
            last_batch: LastBatch::Keep,
            conv_variant: None,
            replicas: 1,
            allreduce: Allreduce::Ordered,
            layout: Layout::PipelineMajor,
            inject_failure: None,
        }
    }

    /// True when every choice `--reference` sets is the reference FR code's.
    pub fn is_reference(&self) -> bool {
        self.fr_bn_update == super::fr::BnUpdate::Both
            && self.optim.first_stage_lr_scale == 2.0
            && self.shortcut_pad == ChannelPad::After
            && self.last_batch == LastBatch::Pad
    }

    /// The shape of this run over processes.
    pub fn topology(&self) -> Topology {
        Topology { stages: self.splits, replicas: self.replicas, layout: self.layout }
    }

    /// The training loader's configuration.
    pub fn train_loader(&self) -> LoaderConfig {
        LoaderConfig { last_batch: self.last_batch, ..LoaderConfig::train(self.batch_size, self.seed) }
    }

    /// Training batches per epoch on `images` training images.
    pub fn batches_per_epoch(&self, images: usize) -> usize {
        crate::data::num_batches(images, self.batch_size, self.last_batch)
    }

    /// The options of the methods that have any.
    pub fn method_options(&self) -> MethodOptions {
        MethodOptions { fr_bn_update: self.fr_bn_update, dni: self.dni, microbatches: self.microbatches, dgl: self.dgl }
    }

    /// The training method `algo` names.
    pub fn method(&self) -> Result<Arc<dyn TrainingMethod>> {
        method::by_name(&self.algo, &self.method_options())
    }

    /// Checks every field that can be checked without data or devices.
    pub fn check(&self) -> Result<()> {
        let bad = |detail: String| Error::InvalidConfig { op: "train", detail };
        if self.epochs == 0 {
            return Err(bad("--epochs must be at least 1".into()));
        }
        if self.batch_size == 0 {
            return Err(bad("--batch-size must be at least 1".into()));
        }
        if self.image_size == 0 || self.image_size > crate::data::MAX_IMAGE_SIZE as usize {
            return Err(bad(format!(
                "--image-size {}: each side must be 1 to {} pixels",
                self.image_size,
                crate::data::MAX_IMAGE_SIZE
            )));
        }
        self.method()?;
        if let Some(v) = self.conv_variant.as_deref().filter(|v| v.trim() != "tune") {
            v.parse::<crate::kernels::conv2d::ConvVariant>()?;
        }
        if self.replicas == 0 {
            return Err(bad("--replicas must be at least 1".into()));
        }
        if self.replicas > 1 {
            let m = self.method()?;
            if !m.replicable() {
                return Err(bad(format!(
                    "--algo {} trains more than the stages (predictors or auxiliary heads), which --replicas does not average: use bp, fr, ddg or gpipe",
                    self.algo
                )));
            }
            if !self.batch_size.is_multiple_of(self.replicas) {
                return Err(bad(format!(
                    "--batch-size {} does not split evenly over --replicas {}",
                    self.batch_size, self.replicas
                )));
            }
        }
        if self.measure_sigma == Some(0) {
            return Err(bad("--measure-sigma must be at least 1 (iterations between measurements)".into()));
        }
        let n = self.devices.len();
        // Over processes each takes the selector at its rank on its machine: one per
        // process of a pipeline's replicas is also a whole list.
        if n == 0 || (n != 1 && n != self.splits && n != self.splits * self.replicas) {
            return Err(bad(format!(
                "{n} devices for {} stages: give one or one per stage{}",
                self.splits,
                if self.replicas > 1 {
                    format!(" (or one per process, {})", self.splits * self.replicas)
                } else {
                    String::new()
                }
            )));
        }
        self.optim.validate()
    }
}

fn one() -> usize {
    1
}

/// GPipe's default: 4 micro-batches per batch.
fn default_microbatches() -> usize {
    4
}

/// The datasets, model description and split of a configuration.
#[derive(Clone)]
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
    let kind: DatasetKind = cfg.dataset.parse().map_err(|m: String| Error::InvalidConfig { op: "data", detail: m })?;
    let opts = LoadOptions {
        root: cfg.data_dir.clone(),
        image_size: (cfg.image_size as u32, cfg.image_size as u32),
        ..Default::default()
    };
    let (mut train, test) = kind.load_train_test(&opts)?;
    let test = test_subset(test, cfg.test_subset)?;
    if let Some(n) = cfg.train_subset {
        if n == 0 || n > train.len() {
            return Err(Error::InvalidConfig {
                op: "data",
                detail: format!("--train-subset {n}: the training set has {} images", train.len()),
            });
        }
        let order = crate::data::epoch_order(train.len(), cfg.seed, u64::MAX);
        train = train.subset(&order[..n], format!("{}-subset{n}", train.name()))?;
    }
    if cfg.batches_per_epoch(train.len()) == 0 {
        return Err(Error::InvalidConfig {
            op: "data",
            detail: format!(
                "--last-batch drop with --batch-size {} leaves no batch of the {} training images",
                cfg.batch_size,
                train.len()
            ),
        });
    }
    let norm = Normalization::for_kind(kind, &train);
    let arch: Arch = cfg.arch.parse()?;
    let spec = build(&ResNetConfig {
        shortcut_pad: cfg.shortcut_pad,
        arch,
        depth: cfg.depth,
        input: train.image_shape().to_vec(),
        classes: train.num_classes(),
    })?;
    let policy: SplitPolicy = cfg.split.parse()?;
    let ranges = split(&spec, cfg.splits, policy)?;
    Ok(Prepared { train: Arc::new(train), test: Arc::new(test), norm, spec, ranges })
}

/// The first `n` images of `test` (all of them for None).
pub(super) fn test_subset(test: Dataset, n: Option<usize>) -> Result<Dataset> {
    let Some(n) = n else { return Ok(test) };
    if n == 0 || n > test.len() {
        return Err(Error::InvalidConfig {
            op: "data",
            detail: format!("--test-subset {n}: the test set has {} images", test.len()),
        });
    }
    let first: Vec<usize> = (0..n).collect();
    test.subset(&first, format!("{}-first{n}", test.name()))
}

/// Opens one device per stage on the adapters the selectors name.
///
/// - One selector: every stage on that adapter, each stage with its own device and queue.
///   `auto` with several real GPUs spreads the stages over them in contiguous blocks.
/// - A list: stage k on the k-th adapter (several stages may name the same one).
///
/// On a CPU adapter (lavapipe) the size of llvmpipe's thread pool is chosen per device
/// (`LP_NUM_THREADS`, see [`lavapipe_threads`]): devices of one instance share one pool and do
/// not run at the same time, so each of several stages gets its own wgpu instance with an
/// equal share of the cores, and a device alone on the machine gets two threads per core.
pub fn open_devices(selectors: &[String], stages: usize) -> Result<Vec<Gpu>> {
    open_devices_sharing(selectors, stages, 1)
}

/// [`open_devices`] in one of `processes` processes of one machine that open devices at once
/// (a run over MPI): a CPU adapter's share of the cores is divided among them all.
pub fn open_devices_sharing(selectors: &[String], stages: usize, processes: usize) -> Result<Vec<Gpu>> {
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
    let user = user_lavapipe_threads();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let sharers = stages * processes.max(1);
    let pool = lavapipe_threads(cores, sharers, user.is_some()).map(|t| t.to_string()).or(user);
    let shared = adapter::new_instance();
    let mut out = Vec::with_capacity(stages);
    for sel in &chosen {
        // The adapter alone says whether it is lavapipe: no device is opened to find out.
        let (_, summary) = adapter::select(&shared, sel)?;
        if summary.is_lavapipe() {
            // Read by llvmpipe when the instance enumerates its devices; stages are opened one
            // after the other before any worker thread exists. Set (or cleared) every time: an
            // earlier call in this process may have left another stage count's value.
            match &pool {
                Some(threads) => std::env::set_var("LP_NUM_THREADS", threads),
                None => std::env::remove_var("LP_NUM_THREADS"),
            }
            let own = adapter::new_instance();
            out.push(Gpu::open_on(&own, sel)?);
        } else {
            out.push(Gpu::open_on(&shared, sel)?);
        }
    }
    Ok(out)
}

/// `LP_NUM_THREADS` as the process started with it (the user's choice), read before
/// [`open_devices_sharing`] first sets it.
fn user_lavapipe_threads() -> Option<String> {
    static USER: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    USER.get_or_init(|| std::env::var("LP_NUM_THREADS").ok()).clone()
}

/// llvmpipe threads per core for a device that has the CPU to itself.
pub const LAVAPIPE_THREADS_PER_CORE: usize = 2;

/// The size of llvmpipe's thread pool for one of `sharers` CPU devices (stages times
/// processes) on a machine of `cores` cores, or None to leave llvmpipe's default (one thread
/// per core) or the user's own `LP_NUM_THREADS` (as the process started with it).
///
/// - Several sharers: an equal share of the cores each, at least one thread; the user's
///   setting is overridden, so that K stages emulate K devices of equal size.
/// - One device: [`LAVAPIPE_THREADS_PER_CORE`] threads per core, unless the user set
///   `LP_NUM_THREADS`. llvmpipe hands each thread an equal, fixed share of a dispatch's
///   workgroups, so a dispatch lasts as long as its slowest share, and a core that also runs
///   the recording thread or another process is slower. With two threads per core a core
///   that finishes early runs another thread's share (`docs/lavapipe.md`, "Thread pool").
///   Not for several sharers: an idle stage's cores would then work for a busy one.
pub fn lavapipe_threads(cores: usize, sharers: usize, user_set: bool) -> Option<usize> {
    if sharers > 1 {
        Some((cores / sharers).max(1))
    } else if !user_set && cores > 1 {
        Some(cores * LAVAPIPE_THREADS_PER_CORE)
    } else {
        None
    }
}

/// Forces conv kernel variant `variant` on every device (None: each device's chooser decides).
pub fn force_conv_variant(gpus: &[Gpu], variant: Option<&str>) {
    if let Some(v) = variant {
        for g in gpus {
            g.force_variant(crate::kernels::conv2d::OP, Some(v.trim()));
        }
    }
}

/// Progress callbacks (the CLI draws a progress bar from them).
pub trait Observer {
    /// Once every check has passed and the devices are open, before the first epoch: what
    /// is about to be trained (data and model as prepared once for the run).
    fn run_start(&mut self, _cfg: &RunConfig, _prepared: &Prepared) {}
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

/// The prefix of checkpoint tensors that are training state other than the optimizer's: a
/// decoupled pipeline's stored inputs and gradient in flight (`training.pipeline.`) and DNI's
/// gradient predictors (`training.dni.`).
pub const TRAINING_PREFIX: &str = "training.";

/// Prefixes of checkpoint tensors that are not the model: the optimizer's state (SGD
/// momentum, `optimizer.momentum.<param>`) and the rest of the training state. Everything
/// else is exactly the model's PyTorch `state_dict()`: `eval` ignores these, `--resume`
/// restores them, and a PyTorch user drops them before `load_state_dict(strict=True)`.
pub const TRAINING_STATE_PREFIXES: [&str; 2] = ["optimizer.", TRAINING_PREFIX];

/// The prefix of a pipeline's state: `training.pipeline.stage<k>.pending_grad` and what a
/// method keeps per module (FR: `training.pipeline.stage<k>.input_history.<i>`).
pub const PIPELINE: &str = "training.pipeline";

/// [`evaluate`] over a [`Cluster`] of one replica: this process runs its own stage of `net`
/// over the whole test set (the first stage's process reads the data; features and labels
/// travel up the links, as in training) and the last stage's measures. The metrics (the
/// same bits as [`evaluate`]'s) arrive on rank 0; the other ranks return None.
pub fn evaluate_on(
    net: &Network,
    data: Arc<Dataset>,
    norm: &Normalization,
    batch_size: usize,
    c: &dyn Cluster,
) -> Result<Option<Metrics>> {
    let (k, _) = c.place();
    let last = net.stages.len() - 1;
    let stage = &net.stages[k];
    let batches = crate::data::num_batches(data.len(), batch_size, LastBatch::Keep);
    let mut loader =
        if k == 0 { Some(Loader::new(data, norm.clone(), LoaderConfig::eval(batch_size), 0)?) } else { None };
    let mut acc = if k == last { Some(MetricsAccumulator::new(&stage.gpu)?) } else { None };
    let mut links = c.stage_links(&stage.gpu);
    for _ in 0..batches {
        let (x, labels) = match loader.as_mut() {
            Some(l) => {
                let b = l.next().ok_or(Error::Internal { op: "eval", detail: "the test loader ended early".into() })?;
                let mut shape = vec![b.len()];
                shape.extend(&net.spec.input);
                (stage.gpu.tensor(&shape, &b.images)?, b.labels)
            }
            None => {
                let f = links.receive_up()?;
                (f.h, f.labels)
            }
        };
        let h = stage.forward_eval(&x)?;
        match acc.as_mut() {
            Some(a) => {
                let y = crate::layers::loss::labels(&stage.gpu, &labels, net.spec.classes)?;
                a.add(&crate::layers::loss::forward(&h, &y)?, labels.len())?;
            }
            None => links.send_up(crate::pipeline::link::Features { h, labels, parts: 1 })?,
        }
        stage.gpu.sync()?;
    }
    drop(links);
    let metrics = acc.map(|a| a.read()).transpose()?;
    match (c.rank(), metrics) {
        (0, Some(m)) => Ok(Some(m)),
        (0, None) => Ok(stage_state::read_report(last, &c.receive_state(c.topology().rank(last, 0))?)?.metrics),
        (_, Some(m)) => {
            c.send_state(0, stage_state::report_bytes(last, &EpochReport { metrics: Some(m), peak_bytes: 0 })?)?;
            Ok(None)
        }
        (_, None) => Ok(None),
    }
}

/// Whether the checkpoint tensor `name` is training state (see [`TRAINING_STATE_PREFIXES`]).
pub fn is_training_state(name: &str) -> bool {
    TRAINING_STATE_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// The epochs and sigma measurements of a run so far. Checkpoints carry it, so the metrics
/// files can always be rewritten from the checkpoint (the source of truth): a kill between
/// the checkpoint and the metrics files loses no row.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct History {
    pub epochs: Vec<EpochRecord>,
    #[serde(default)]
    pub sigma: Vec<SigmaRecord>,
}

/// What the data looked like when a run started (stored in its checkpoints): `eval` uses
/// the normalisation as it was, and `--resume` refuses data that would change the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataInfo {
    /// Per-sample input shape [C, H, W].
    pub input: Vec<usize>,
    pub classes: usize,
    #[serde(default)]
    pub class_names: Option<Vec<String>>,
    /// Per-channel mean and standard deviation on the [0, 1] scale: x' = (x / 255 - mean) / std.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub train_images: usize,
    pub test_images: usize,
}

impl DataInfo {
    pub(super) fn of(p: &Prepared) -> DataInfo {
        DataInfo {
            input: p.spec.input.clone(),
            classes: p.spec.classes,
            class_names: p.train.class_names().map(|c| c.to_vec()),
            mean: p.norm.mean().to_vec(),
            std: p.norm.std().to_vec(),
            train_images: p.train.len(),
            test_images: p.test.len(),
        }
    }

    /// The stored normalisation.
    pub fn normalization(&self) -> Result<Normalization> {
        Normalization::new(&self.mean, &self.std)
    }
}

/// The JSON value of `v` (these types always serialise).
fn json<T: Serialize>(v: &T) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| Error::Data { path: "checkpoint metadata".into(), message: e.to_string() })
}

/// Renames the tensors of a checkpoint of format version 1 to today's names: the classifier
/// was `fc` (now `linear`, as in the CIFAR ResNets PyTorch users have), and the training state
/// was under `pipeline.` (or `fr.`) and `dni.` (now under [`TRAINING_PREFIX`]).
fn upgrade_names(ck: &mut Checkpoint) {
    if ck.meta.format_version != 1 {
        return;
    }
    let rename = |name: &str| -> String {
        let (head, rest) = match name.strip_prefix(checkpoint::MOMENTUM_PREFIX) {
            Some(rest) => (checkpoint::MOMENTUM_PREFIX, rest),
            None => ("", name),
        };
        let rest = if let Some(r) = rest.strip_prefix("fc.") {
            format!("linear.{r}")
        } else if let Some(r) = rest.strip_prefix("pipeline.").or_else(|| rest.strip_prefix("fr.")) {
            format!("{TRAINING_PREFIX}pipeline.{r}")
        } else if let Some(r) = rest.strip_prefix("dni.") {
            format!("{TRAINING_PREFIX}dni.{r}")
        } else {
            rest.to_string()
        };
        format!("{head}{rest}")
    };
    for t in &mut ck.tensors {
        t.name = rename(&t.name);
    }
}

/// Reads a checkpoint (checksum verified) with today's tensor names.
pub fn load_checkpoint(dir_or_file: &Path) -> Result<Checkpoint> {
    let mut ck = checkpoint::load(dir_or_file)?;
    upgrade_names(&mut ck);
    Ok(ck)
}

/// Reads weights from a featreplay checkpoint (as [`load_checkpoint`]) or a plain PyTorch
/// `state_dict` saved as safetensors ([`checkpoint::load_weights`]).
pub fn load_weights(file: &Path) -> Result<Checkpoint> {
    let mut ck = checkpoint::load_weights(file)?;
    upgrade_names(&mut ck);
    Ok(ck)
}

/// Host copies of every state tensor, for a checkpoint, with the run's history and data
/// description in the metadata. The pipeline's state is saved too: the iteration, each
/// stage's step count and gradient in flight, and what its method keeps
/// ([`ModuleMethod::save`](super::method::ModuleMethod::save): FR's stored inputs, DNI's
/// predictors, DGL's heads), so a resumed run continues the same pipeline. A non-finite
/// value anywhere is divergence: nothing is returned to write.
fn checkpoint_of(net: &Network, st: &PipelineState, run: &RunState, epoch: usize) -> Result<Checkpoint> {
    let mut meta = CheckpointMeta::new(epoch, net.steps, run.cfg.seed, json(&run.cfg)?);
    meta.best_top1 = Some(run.best);
    let mut extra = serde_json::json!({
        "history": json(&run.history)?,
        "data": json(&run.data)?,
    });
    if !run.resumes.is_empty() {
        extra["resumes"] = serde_json::Value::Array(run.resumes.clone());
    }
    if let Some(i) = &run.init_from {
        extra["init_from"] = serde_json::json!(i);
    }
    let saved = st.stages.iter().enumerate().map(|(k, s)| s.module.save(k)).collect::<Result<Vec<_>>>()?;
    let mut pipeline = serde_json::json!({
        "method": st.method.name(),
        "iteration": st.iteration,
        "steps": st.stages.iter().map(|s| s.steps).collect::<Vec<_>>(),
        "pending_grad": st.stages.iter().map(|s| s.pending_grad.is_some()).collect::<Vec<_>>(),
    });
    // A module's field `key` is stored as `pipeline.<key>[k]`.
    for (k, sv) in saved.iter().enumerate() {
        for (key, v) in &sv.fields {
            if pipeline.get(*key).is_none() {
                pipeline[*key] = serde_json::Value::Array(vec![serde_json::Value::Null; st.stages.len()]);
            }
            pipeline[*key][k] = v.clone();
        }
    }
    extra["pipeline"] = pipeline;
    meta.extra = extra;
    let mut ck = Checkpoint::new(meta);
    for (name, t) in net.state() {
        ck.push(name, t.shape(), t.to_vec()?)?;
    }
    for (name, c) in net.counter_state() {
        ck.push_i64(name, &[], vec![c.load(Ordering::Relaxed) as i64])?;
    }
    for (k, s) in st.stages.iter().enumerate() {
        if let Some(g) = &s.pending_grad {
            ck.push(stage_state::pending_name(k), g.shape(), g.to_vec()?)?;
        }
    }
    for sv in saved {
        for (name, t) in sv.tensors {
            ck.push(name, t.shape(), t.to_vec()?)?;
        }
        for (name, v) in sv.counters {
            ck.push_i64(name, &[], vec![v as i64])?;
        }
    }
    if let Some((name, count)) = ck.non_finite_tensors(|_| true).first() {
        return Err(Error::Diverged { epoch, reason: format!("{name} holds {count} NaN or infinite values") });
    }
    Ok(ck)
}

/// Restores the pipeline state saved by [`checkpoint_of`] into `st` (fresh, with its
/// predictors and heads built). A checkpoint of a backprop run written before every method
/// ran on the pipeline has no pipeline state: nothing but the step counts to restore.
fn restore_pipeline(net: &Network, st: &mut PipelineState, ck: &mut Checkpoint, path: &Path) -> Result<()> {
    let bad = |message: String| Error::Data { path: path.display().to_string(), message };
    // Checkpoints written before DDG and DNI existed describe an FR pipeline under "fr".
    let saved = match (ck.meta.extra.get("pipeline"), ck.meta.extra.get("fr")) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => {
            let mut f = f.clone();
            f["method"] = serde_json::json!("fr");
            f
        }
        (None, None) if !st.method.keeps_state() => {
            st.iteration = ck.meta.iteration;
            for s in &mut st.stages {
                s.steps = ck.meta.iteration;
            }
            return Ok(());
        }
        _ => return Err(bad("no pipeline state in the checkpoint (another --algo?)".into())),
    };
    if saved["method"].as_str() != Some(st.method.name()) {
        return Err(bad(format!("the checkpoint's pipeline runs {}, not {}", saved["method"], st.method.name())));
    }
    st.iteration = saved["iteration"].as_u64().ok_or_else(|| bad("pipeline state without iteration".into()))?;
    for (k, stage) in st.stages.iter_mut().enumerate() {
        stage.steps =
            saved["steps"][k].as_u64().ok_or_else(|| bad(format!("pipeline state without steps of stage {k}")))?;
        if saved["pending_grad"][k].as_bool().unwrap_or(false) {
            let name = stage_state::pending_name(k);
            let shape = ck.get(&name).ok_or_else(|| bad(format!("missing {name}")))?.shape.clone();
            let data = ck.take(&name, &shape)?;
            stage.pending_grad = Some(net.stages[k].gpu.tensor(&shape, &data)?);
        }
        let fields = SavedFields { pipeline: &saved, k };
        stage.module.restore(&fields, ck, &net.stages[k].gpu, path)?;
    }
    Ok(())
}

/// Loads `tensors` (name, device tensor) from the checkpoint, each with its exact shape.
fn take_into(tensors: Vec<(String, crate::gpu::Tensor)>, ck: &mut Checkpoint, path: &Path) -> Result<()> {
    for (name, t) in tensors {
        let data = ck.take(&name, t.shape()).map_err(|e| Error::Data {
            path: path.display().to_string(),
            message: format!("does not fit this model: {e}"),
        })?;
        t.gpu().write(&t, &data)?;
    }
    Ok(())
}

/// Errors naming the first checkpoint tensor the model does not have.
fn refuse_leftovers(ck: &Checkpoint, path: &Path) -> Result<()> {
    if let Some(extra) = ck.names().next() {
        return Err(Error::Data {
            path: path.display().to_string(),
            message: format!("holds tensor '{extra}' that this model does not have (another architecture?)"),
        });
    }
    Ok(())
}

/// Sets the BN update counters from the checkpoint. Checkpoints of format version 1 have
/// none: their BN layers were updated once per iteration, so the iteration count stands in.
/// With `missing_ok` (weights from another tool), an absent counter is left at zero.
fn take_counters(net: &Network, ck: &mut Checkpoint, path: &Path, missing_ok: bool) -> Result<()> {
    for (name, c) in net.counter_state() {
        let value = if ck.meta.format_version == 1 && ck.int_tensors.iter().all(|t| t.name != name) {
            ck.meta.iteration as i64
        } else if missing_ok && ck.int_tensors.iter().all(|t| t.name != name) {
            0
        } else {
            ck.take_i64(&name, &[]).map_err(|e| Error::Data {
                path: path.display().to_string(),
                message: format!("does not fit this model: {e}"),
            })?[0]
        };
        c.store(value.max(0) as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// Loads a checkpoint's whole training state into `net`: weights, BN statistics and their
/// counters, and SGD momentum (every tensor must be there with its shape; the pipeline state,
/// if any, must have been taken by [`restore_pipeline`] first).
pub fn restore(net: &mut Network, ck: &mut Checkpoint, path: &Path) -> Result<()> {
    check_fits(net, ck, path)?;
    take_into(net.state(), ck, path)?;
    take_counters(net, ck, path, false)?;
    refuse_leftovers(ck, path)?;
    net.steps = ck.meta.iteration;
    Ok(())
}

/// Errors when the checkpoint's model tensors are not exactly the model's (names and
/// shapes), listing what differs, as PyTorch's `load_state_dict(strict=True)` does.
/// Training state is not compared; a missing `num_batches_tracked` is tolerated (it does not
/// change what the model computes).
fn check_fits(net: &Network, ck: &Checkpoint, path: &Path) -> Result<()> {
    let model: Vec<(String, Vec<usize>)> = net
        .model_state()
        .into_iter()
        .map(|(n, t)| (n, t.shape().to_vec()))
        .chain(net.counter_state().into_iter().map(|(n, _)| (n, vec![])))
        .collect();
    let file: Vec<(&str, &[usize])> = ck
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t.shape.as_slice()))
        .chain(ck.int_tensors.iter().map(|t| (t.name.as_str(), t.shape.as_slice())))
        .filter(|(n, _)| !is_training_state(n))
        .collect();
    let counter = |n: &str| n.ends_with(".num_batches_tracked");
    let missing: Vec<&str> = model
        .iter()
        .filter(|(n, _)| !counter(n) && !file.iter().any(|(f, _)| f == n))
        .map(|(n, _)| n.as_str())
        .collect();
    let unexpected: Vec<&str> =
        file.iter().filter(|(f, _)| !model.iter().any(|(n, _)| n == f)).map(|(f, _)| *f).collect();
    let shapes: Vec<String> = model
        .iter()
        .filter_map(|(n, s)| {
            let (_, fs) = file.iter().find(|(f, _)| f == n)?;
            (*fs != s.as_slice()).then(|| format!("{n}: {fs:?} in the file, {s:?} in the model"))
        })
        .collect();
    if missing.is_empty() && unexpected.is_empty() && shapes.is_empty() {
        return Ok(());
    }
    let list = |v: &[&str]| {
        let mut s = v.iter().take(4).copied().collect::<Vec<_>>().join(", ");
        if v.len() > 4 {
            s.push_str(&format!(", and {} more", v.len() - 4));
        }
        s
    };
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("missing {} ({})", missing.len(), list(&missing)));
    }
    if !unexpected.is_empty() {
        parts.push(format!("unexpected {} ({})", unexpected.len(), list(&unexpected)));
    }
    if !shapes.is_empty() {
        let v: Vec<&str> = shapes.iter().map(String::as_str).collect();
        parts.push(format!("other shapes for {} ({})", shapes.len(), list(&v)));
    }
    Err(Error::Data {
        path: path.display().to_string(),
        message: format!(
            "does not fit {}: {} (another --arch, --depth, dataset or number of classes?)",
            net.spec.name,
            parts.join("; ")
        ),
    })
}

/// Loads only the model (weights and BN statistics) for evaluation: training state
/// (momentum, pipeline state, DNI predictors) is ignored, any other unknown tensor is an
/// error, and a model tensor holding a NaN or an infinity is refused (a diverged run's
/// weights would give meaningless numbers).
pub fn restore_model(net: &mut Network, ck: &mut Checkpoint, path: &Path) -> Result<()> {
    check_fits(net, ck, path)?;
    if let Some((name, bad)) = ck.non_finite_tensors(|n| !is_training_state(n)).first() {
        return Err(Error::Data {
            path: path.display().to_string(),
            message: format!(
                "tensor '{name}' holds {bad} NaN or infinite values: these weights come from a diverged run"
            ),
        });
    }
    take_into(net.model_state(), ck, path)?;
    take_counters(net, ck, path, true)?;
    ck.tensors.retain(|t| !is_training_state(&t.name));
    ck.int_tensors.retain(|t| !is_training_state(&t.name));
    refuse_leftovers(ck, path)
}

/// The configuration stored in a checkpoint.
pub fn checkpoint_config(dir: &Path) -> Result<(RunConfig, CheckpointMeta)> {
    let meta = checkpoint::load_meta(dir)?;
    let cfg = stored_config(&meta, dir)?;
    Ok((cfg, meta))
}

/// The run configuration in a checkpoint's metadata (`dir` names the file in errors).
pub(super) fn stored_config(meta: &CheckpointMeta, dir: &Path) -> Result<RunConfig> {
    serde_json::from_value(meta.config.clone()).map_err(|e| Error::Data {
        path: dir.join(checkpoint::SAFETENSORS_FILE).display().to_string(),
        message: format!("the stored run configuration is unreadable: {e}"),
    })
}

/// How a run starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A new run: its directory must be empty unless `overwrite`, which deletes the previous
    /// run's outputs there.
    New { overwrite: bool },
    /// Continue the run whose checkpoint is in the output directory.
    Resume,
}

/// A run's state between epochs, as its checkpoints record it.
struct RunState {
    cfg: RunConfig,
    best: f64,
    history: History,
    data: DataInfo,
    resumes: Vec<serde_json::Value>,
    /// Where the initial weights came from (`--init-from`), for the record.
    init_from: Option<String>,
}

/// Estimated peak device bytes per stage for `cfg` (parameters with their gradients and
/// momentum, the activations one backward keeps, and what the method stores on top), and
/// the largest single tensor. Checked before anything is allocated, so an absurd size is a
/// one-line error instead of an abort.
pub fn estimate_memory(cfg: &RunConfig, p: &Prepared) -> Result<(Vec<u64>, u64)> {
    let plans = crate::model::plan(&p.spec, &p.ranges, cfg.batch_size)?;
    let k = plans.len();
    let costs = p.spec.costs()?;
    let batch = cfg.batch_size as u64;
    let mut largest = 4 * batch * p.spec.input.iter().product::<usize>() as u64;
    for c in &costs {
        largest = largest.max(4 * batch * c.out_shape.iter().product::<usize>() as u64).max(4 * c.params as u64);
    }
    let method = cfg.method()?;
    let mut out = Vec::with_capacity(k);
    for (i, m) in plans.iter().enumerate() {
        let q = MemoryQuery { spec: &p.spec, plan: m, k: i, stages: k, batch: cfg.batch_size };
        let extra = method.extra_memory(&q)?;
        largest = largest.max(extra.largest_tensor);
        out.push(m.training_bytes() + extra.bytes);
    }
    Ok((out, largest))
}

/// Refuses a run whose estimated memory exceeds what the machine has: the host must hold a
/// copy of the training state for checkpoints, and on CPU adapters device memory is host
/// memory.
pub fn check_memory(cfg: &RunConfig, p: &Prepared) -> Result<()> {
    let (stages, largest) = estimate_memory(cfg, p)?;
    let detail =
        format!(" ({} stage(s), largest tensor {:.2} GiB)", stages.len(), largest as f64 / (1u64 << 30) as f64);
    let hint = cfg.method()?.memory_hint();
    crate::data::refuse_beyond_host_memory("train", "this configuration needs", stages.iter().sum(), &detail, hint)
}

/// Refuses a run whose largest tensor exceeds a device's buffer limits, before allocating.
fn check_device_limits(gpus: &[Gpu], cfg: &RunConfig, p: &Prepared) -> Result<()> {
    let (_, largest) = estimate_memory(cfg, p)?;
    for g in gpus {
        let l = g.limits();
        let limit = l.max_buffer_size.min(l.max_storage_buffer_binding_size);
        if largest > limit {
            return Err(Error::TensorTooLarge {
                shape: vec![],
                bytes: largest,
                limit,
                what: "the largest tensor of this configuration vs max_storage_buffer_binding_size",
            });
        }
    }
    Ok(())
}

/// Turns a stage's non-finite report into the run's divergence error for `epoch`.
fn diverged(epoch: usize) -> impl Fn(Error) -> Error {
    move |e| match e {
        Error::NonFinite { .. } => Error::Diverged { epoch, reason: e.to_string() },
        e => e,
    }
}

/// Trains as `cfg` says, writing metrics, plots and a checkpoint per epoch into `out`.
///
/// The run is a sequence of named steps: [`check_run`] (the data and model, every check of
/// the configuration, sizes and output paths, and for [`Start::Resume`] that `cfg`
/// continues the checkpoint's run, see [`resume_config`]), [`claim_run_dir`] (locking `out`
/// for the run's life, [`rundir::RunLock`]), [`open_run_devices`], [`build_or_restore`],
/// then per epoch [`train_epoch`], [`evaluate_epoch`] and the checkpoint, then the metrics
/// files. Nothing is written before every check has passed.
///
/// A DDG run cannot be resumed: its stored graphs (d_k activation sets per module) are not
/// checkpointed. Divergence (a NaN or infinity in a loss, weight, gradient, momentum, BN
/// statistic or stage output) ends the run with [`Error::Diverged`] before the epoch's
/// checkpoint and metrics are written, so the last good ones stay.
///
/// With `measure_sigma = Some(n)`, sigma is measured every n iterations (see
/// [`super::sigma`]) into `sigma.jsonl`, and each epoch record holds the epoch's mean per
/// stage. The measurements change nothing in the trajectory; their time is left out of the
/// epoch time and their memory out of the peak memory.
pub fn train(
    cfg: &RunConfig,
    out: &Path,
    start: Start,
    trace: Option<&Path>,
    obs: &mut dyn Observer,
) -> Result<RunSummary> {
    train_on(cfg, out, start, trace, obs, None)
}

/// [`train`] as one process of a run spread over a [`Cluster`] (one stage of one replica
/// per process, see [`crate::pipeline::cluster`]); `None` is [`train`]. Every process checks
/// the run, builds the whole network from the seed (or the checkpoint) and trains its own
/// stage; at each epoch's end the others send rank 0 their stage's state (replica 0) and
/// training metrics (last stages), and rank 0 alone writes the run directory: evaluation,
/// checkpoint and metrics as one process would write them. The other ranks return an empty
/// summary.
pub fn train_on(
    cfg: &RunConfig,
    out: &Path,
    start: Start,
    trace: Option<&Path>,
    obs: &mut dyn Observer,
    cluster: Option<&dyn Cluster>,
) -> Result<RunSummary> {
    let lead = cluster.is_none_or(|c| c.rank() == 0);
    let checked = check_run(cfg, out, start, trace, cluster)?;
    let _lock = if lead { Some(claim_run_dir(out, start)?) } else { None };
    let gpus = open_run_devices(cfg, &checked.prepared, cluster)?;
    let Checked { prepared: p, resumed, tracer, init } = checked;
    let Built { mut net, mut pipeline, mut run, start_epoch } = build_or_restore(cfg, out, &p, init, resumed, &gpus)?;

    if let (false, Some(c)) = (lead, cluster) {
        for epoch in start_epoch..cfg.epochs {
            let trained = train_epoch(&mut net, &mut pipeline, &p, cfg, epoch, None, obs, cluster)
                .map_err(diverged(epoch + 1))?;
            report_epoch(c, &net, &pipeline, trained, epoch + 1)?;
        }
        return Ok(RunSummary { records: vec![], best_test_top1: 0.0, out: out.to_path_buf() });
    }
    obs.run_start(cfg, &p);
    // The metrics files say what the checkpoint says, whatever a kill left there before.
    let mut log = MetricsLog::create(out, run.history.epochs.clone())?;
    let mut sigma_log = SigmaLog::create(out, run.history.sigma.clone())?;
    for epoch in start_epoch..cfg.epochs {
        let mut trained = train_epoch(&mut net, &mut pipeline, &p, cfg, epoch, tracer.as_ref(), obs, cluster)
            .map_err(diverged(epoch + 1))?;
        if let Some(c) = cluster {
            gather_stages(c, &net, &mut pipeline, cfg.seed, &mut trained, epoch + 1)?;
        }
        if let Some(tr) = &tracer {
            tr.write()?;
        }
        let (record, sigma) = evaluate_epoch(&net, &p, cfg, epoch, trained, &mut run)?;
        // The checkpoint first: it holds this epoch's row, so a kill before the metrics
        // files are rewritten loses nothing (resume rewrites them from the checkpoint).
        checkpoint::save(out, &checkpoint_of(&net, &pipeline, &run, epoch + 1)?)?;
        for s in sigma {
            sigma_log.push(s)?;
        }
        log.push(record.clone())?;
        obs.epoch_end(&record);
    }
    Ok(RunSummary { records: run.history.epochs, best_test_top1: run.best, out: out.to_path_buf() })
}

/// The end of an epoch on a rank other than 0: its stage's weights checked against the
/// stage's other replicas, then to rank 0 its stage's state (replica 0) and the training
/// metrics (last stages).
fn report_epoch(c: &dyn Cluster, net: &Network, st: &PipelineState, trained: TrainedEpoch, epoch: usize) -> Result<()> {
    let t = c.topology();
    let (k, r) = c.place();
    stage_state::check_replicas(c, net, epoch)?;
    let report = EpochReport { metrics: (k + 1 == t.stages).then_some(trained.metrics), peak_bytes: trained.peak[k] };
    if r == 0 {
        c.send_state(0, stage_state::stage_bytes(net, st, k, &report)?)?;
    } else if report.metrics.is_some() {
        c.send_state(0, stage_state::report_bytes(k, &report)?)?;
    }
    Ok(())
}

/// Rank 0's end of an epoch: its stage's replicas checked, every other stage's state
/// (replica 0) loaded into this process's copies of those stages, each stage's peak memory,
/// and the training metrics of every replica's last stage, combined.
fn gather_stages(
    c: &dyn Cluster,
    net: &Network,
    st: &mut PipelineState,
    seed: u64,
    trained: &mut TrainedEpoch,
    epoch: usize,
) -> Result<()> {
    stage_state::check_replicas(c, net, epoch)?;
    let t = c.topology();
    let mut metrics = Vec::new();
    if t.stages == 1 {
        metrics.push(trained.metrics.clone());
    }
    for k in 1..t.stages {
        let report = stage_state::restore_stage(net, st, k, &c.receive_state(t.rank(k, 0))?, seed)?;
        trained.peak[k] = report.peak_bytes;
        metrics.extend(report.metrics);
    }
    for r in 1..t.replicas {
        let last = t.stages - 1;
        metrics.extend(stage_state::read_report(last, &c.receive_state(t.rank(last, r))?)?.metrics);
    }
    if metrics.len() != t.replicas {
        return Err(Error::Schedule {
            detail: format!("training metrics from {} of {} replicas", metrics.len(), t.replicas),
        });
    }
    trained.metrics = combine_replicas(metrics);
    Ok(())
}

/// The training metrics of a whole batch from its replicas' shards (equal in size): means
/// over the samples, and each batch's loss the mean of its shards' losses, in replica order.
fn combine_replicas(mut replicas: Vec<Metrics>) -> Metrics {
    if replicas.len() == 1 {
        return replicas.remove(0);
    }
    let n: usize = replicas.iter().map(|m| m.samples).sum();
    let mean = |f: fn(&Metrics) -> f64| replicas.iter().map(|m| f(m) * m.samples as f64).sum::<f64>() / n.max(1) as f64;
    let mut batch_losses = replicas[0].batch_losses.clone();
    for m in &replicas[1..] {
        for (b, l) in batch_losses.iter_mut().zip(&m.batch_losses) {
            *b += l;
        }
    }
    let inv = 1.0 / replicas.len() as f32;
    batch_losses.iter_mut().for_each(|b| *b *= inv);
    Metrics { loss: mean(|m| m.loss), top1: mean(|m| m.top1), top5: mean(|m| m.top5), samples: n, batch_losses }
}

/// What [`check_run`] found: everything a run needs that can be had without writing.
struct Checked {
    prepared: Prepared,
    resumed: Option<Resumed>,
    tracer: Option<Tracer>,
    /// `--init-from`'s file and its contents.
    init: Option<(PathBuf, Checkpoint)>,
}

/// Step 1: prepares the data and model and checks the whole configuration (memory, the
/// checkpoint a resumed run continues, the run directory, the initial weights) before
/// anything is written.
fn check_run(
    cfg: &RunConfig,
    out: &Path,
    start: Start,
    trace: Option<&Path>,
    cluster: Option<&dyn Cluster>,
) -> Result<Checked> {
    let resumed = match start {
        Start::Resume => Some(open_resume(cfg, out)?),
        Start::New { .. } => None,
    };
    let prepared = prepare(cfg)?;
    check_memory(cfg, &prepared)?;
    if let Some(c) = cluster {
        check_cluster(c, cfg, &prepared, trace)?;
    }
    check_replicas_config(cfg, &prepared, cluster)?;
    if let Some(r) = &resumed {
        r.check_continues(cfg, &stored_config(&r.ck.meta, out)?, &prepared)?;
    }
    // Only rank 0 writes the run directory (the others would see its lock file).
    if let (Start::New { overwrite }, true) = (start, cluster.is_none_or(|c| c.rank() == 0)) {
        rundir::check_new_run_dir(out, overwrite)?;
    }
    let tracer = trace.map(Tracer::create).transpose()?;
    // Read (and checked as far as it can be without the model) before anything is written.
    let init = match (&start, &cfg.init_from) {
        (Start::New { .. }, Some(f)) => Some((f.clone(), load_weights(f)?)),
        _ => None,
    };
    Ok(Checked { prepared, resumed, tracer, init })
}

/// A run over processes needs one process per stage and replica, and measures what one
/// process can see only.
fn check_cluster(c: &dyn Cluster, cfg: &RunConfig, p: &Prepared, trace: Option<&Path>) -> Result<()> {
    let t = cfg.topology();
    let bad = |detail: String| Err(Error::InvalidConfig { op: "train", detail });
    if c.size() != t.size() || p.ranges.len() != t.stages {
        return bad(format!(
            "--transport mpi runs one stage of one replica per process: --splits {} x --replicas {} need {} processes, not {} (mpirun -np {})",
            t.stages,
            t.replicas,
            t.size(),
            c.size(),
            t.size()
        ));
    }
    if cfg.measure_sigma.is_some() {
        return bad("--measure-sigma needs every stage in one process; leave it out with --transport mpi".into());
    }
    if trace.is_some() {
        return bad("--trace records one process's timeline; leave it out with --transport mpi".into());
    }
    Ok(())
}

/// Replicas run over processes only, and each takes an equal shard of every batch.
fn check_replicas_config(cfg: &RunConfig, p: &Prepared, cluster: Option<&dyn Cluster>) -> Result<()> {
    let r = cfg.replicas;
    if r == 1 {
        return Ok(());
    }
    let bad = |detail: String| Err(Error::InvalidConfig { op: "train", detail });
    if cluster.is_none() {
        return bad(format!(
            "--replicas {r} runs over processes: add --transport mpi and start {} of them (mpirun -np {})",
            cfg.topology().size(),
            cfg.topology().size()
        ));
    }
    let last = p.train.len() % cfg.batch_size;
    if cfg.last_batch == LastBatch::Keep && !last.is_multiple_of(r) {
        return bad(format!(
            "the last batch of {} training images holds {last}, which does not split evenly over --replicas {r}: use --last-batch drop or pad",
            p.train.len()
        ));
    }
    Ok(())
}

/// Step 2: takes the run directory (one run at a time), and clears a previous run's outputs
/// when a new run overwrites it.
fn claim_run_dir(out: &Path, start: Start) -> Result<rundir::RunLock> {
    let lock = rundir::RunLock::acquire(out)?;
    if let Start::New { overwrite } = start {
        rundir::check_new_run_dir(out, overwrite)?;
        if overwrite {
            rundir::clear_run_outputs(out)?;
        }
    }
    Ok(lock)
}

/// Step 3: one device per stage, with the configured conv variant, checked against what the
/// run needs of it.
///
/// Over a cluster, each process opens one device (the `--device` at its node-local rank, in
/// turn) and holds its copy of every stage there: it trains only its own.
fn open_run_devices(cfg: &RunConfig, p: &Prepared, cluster: Option<&dyn Cluster>) -> Result<Vec<Gpu>> {
    let gpus = match cluster {
        None => open_devices(&cfg.devices, p.ranges.len())?,
        Some(c) => {
            let selector: Vec<String> =
                cfg.devices.get(c.local_rank() % cfg.devices.len().max(1)).cloned().into_iter().collect();
            vec![open_devices_sharing(&selector, 1, c.local_size())?.remove(0); p.ranges.len()]
        }
    };
    force_conv_variant(&gpus, cfg.conv_variant.as_deref());
    check_device_limits(&gpus, cfg, p)?;
    Ok(gpus)
}

/// What [`build_or_restore`] made.
struct Built {
    net: Network,
    pipeline: PipelineState,
    run: RunState,
    /// The first epoch (0-based) left to train.
    start_epoch: usize,
}

/// Step 4: the network and the method's pipeline state, from the seed, `--init-from`'s
/// weights, or the checkpoint of the run being resumed.
fn build_or_restore(
    cfg: &RunConfig,
    out: &Path,
    p: &Prepared,
    init: Option<(PathBuf, Checkpoint)>,
    resumed: Option<Resumed>,
    gpus: &[Gpu],
) -> Result<Built> {
    let mut net = Network::new(p.spec.clone(), &p.ranges, gpus, cfg.seed)?;
    let mut pipeline = PipelineState::new(cfg.method()?, &net, cfg.seed)?;
    let mut run = RunState {
        cfg: cfg.clone(),
        best: 0.0,
        history: History::default(),
        data: DataInfo::of(p),
        resumes: Vec::new(),
        init_from: None,
    };
    if let Some((file, mut ck)) = init {
        restore_model(&mut net, &mut ck, &file)?;
        let what = if ck.is_plain() {
            "a plain state_dict".to_string()
        } else {
            format!("a featreplay checkpoint after epoch {}", ck.meta.epoch)
        };
        run.init_from = Some(format!("{} ({what})", file.display()));
    }
    let mut start_epoch = 0;
    if let Some(mut r) = resumed {
        run.init_from = r.init_from.take();
        let file = out.join(checkpoint::SAFETENSORS_FILE);
        restore_pipeline(&net, &mut pipeline, &mut r.ck, &file)?;
        restore(&mut net, &mut r.ck, &file)?;
        start_epoch = r.epoch;
        run.best = r.best;
        run.history = r.history;
        run.resumes = r.resumes;
        let stored = stored_config(&r.ck.meta, out)?;
        let changes = resume_config(&stored, cfg, &RESUMABLE_FLAGS)?.1;
        run.resumes.push(serde_json::json!({ "epoch": r.epoch, "changed": changes }));
    }
    Ok(Built { net, pipeline, run, start_epoch })
}

/// Step 5: the epoch's evaluation on the test set and its metrics row, added to the run's
/// history; returns the row and the epoch's sigma measurements. A non-finite training or test
/// loss is a divergence, and nothing of the epoch is kept.
fn evaluate_epoch(
    net: &Network,
    p: &Prepared,
    cfg: &RunConfig,
    epoch: usize,
    trained: TrainedEpoch,
    run: &mut RunState,
) -> Result<(EpochRecord, Vec<SigmaRecord>)> {
    if !trained.metrics.loss.is_finite() {
        return Err(Error::Diverged { epoch: epoch + 1, reason: format!("training loss {}", trained.metrics.loss) });
    }
    let test = evaluate(net, p.test.clone(), &p.norm, cfg.batch_size)?;
    // Weights that overflowed can give a finite training loss on the last batch but NaN
    // on the test set: diverged too (and nothing NaN reaches the metrics or checkpoint).
    if !test.loss.is_finite() {
        return Err(Error::Diverged { epoch: epoch + 1, reason: format!("test loss {}", test.loss) });
    }
    run.best = run.best.max(test.top1);
    let record = EpochRecord {
        epoch: epoch + 1,
        lr: trained.lr as f64,
        train_loss: trained.metrics.loss,
        train_top1: trained.metrics.top1,
        test_loss: test.loss,
        test_top1: test.top1,
        test_top5: test.top5,
        best_test_top1: run.best,
        epoch_seconds: trained.seconds,
        images_per_second: trained.metrics.samples as f64 / trained.seconds,
        peak_memory_bytes: trained.peak,
        sigma: SigmaRecord::mean(&trained.sigma, net.stages.len()),
        batch_losses: trained.metrics.batch_losses.iter().map(|&l| l as f64).collect(),
    };
    run.history.epochs.push(record.clone());
    run.history.sigma.extend(trained.sigma.iter().cloned());
    Ok((record, trained.sigma))
}

/// What one epoch of training produced.
struct TrainedEpoch {
    metrics: Metrics,
    /// Learning rate at the epoch's first iteration.
    lr: f32,
    /// Training time, measurements left out.
    seconds: f64,
    /// Peak bytes per stage.
    peak: Vec<u64>,
    sigma: Vec<SigmaRecord>,
}

/// One epoch (0-based) of training on the pipeline, with the learning rate of each
/// iteration, sigma measurements and divergence checks (every iteration, and the BN
/// statistics at the end).
///
/// Over a cluster only this process's stage trains, and only the first stage's process
/// reads the data (the others' loader is empty).
#[allow(clippy::too_many_arguments)]
fn train_epoch(
    net: &mut Network,
    st: &mut PipelineState,
    p: &Prepared,
    cfg: &RunConfig,
    epoch: usize,
    tracer: Option<&Tracer>,
    obs: &mut dyn Observer,
    cluster: Option<&dyn Cluster>,
) -> Result<TrainedEpoch> {
    let skip = match cluster {
        Some(c) if c.place().0 > 0 => cfg.batches_per_epoch(p.train.len()),
        _ => 0,
    };
    // Replica r trains on shard r of each batch.
    let (replica, replicas) = cluster.map_or((0, 1), |c| (c.place().1, c.topology().replicas));
    let sample = p.spec.input.iter().product::<usize>();
    let loader = Loader::starting_at(p.train.clone(), p.norm.clone(), cfg.train_loader(), epoch as u64, skip)?;
    let n = loader.num_batches();
    obs.epoch_start(epoch + 1, n);
    let gpus: Vec<Gpu> = net.stages.iter().map(|s| s.gpu.clone()).collect();
    let mut peak = vec![0u64; gpus.len()];
    let note_peak = |peak: &mut Vec<u64>| {
        for (p, g) in peak.iter_mut().zip(&gpus) {
            *p = (*p).max(g.memory().peak_bytes);
        }
    };
    let reset_peak = || gpus.iter().for_each(|g| g.reset_peak_memory());
    let mut sigmas: Vec<SigmaRecord> = Vec::new();
    let mut measuring = 0.0f64;
    let t0 = Instant::now();
    let mut seen = 0usize;
    let first_lr = cfg.optim.lr_at(net.steps, n);
    let mut feed = loader.map(|b| {
        seen += b.len();
        obs.batch(epoch + 1, b.index, seen as f64 / t0.elapsed().as_secs_f64());
        if replicas == 1 {
            return HostBatch { images: b.images, labels: b.labels };
        }
        let n = b.labels.len() / replicas;
        let at = replica * n;
        HostBatch { images: b.images[at * sample..(at + n) * sample].to_vec(), labels: b.labels[at..at + n].to_vec() }
    });
    let mut done = 0usize;
    let mut metrics = Metrics::empty();
    while done < n {
        // A chunk runs at one learning rate and ends at the next measurement.
        let mut chunk = n - done;
        if let Some(m) = cfg.measure_sigma {
            chunk = chunk.min(m - (st.iteration % m as u64) as usize);
        }
        if let Some(next) = cfg.optim.next_change(st.iteration, n) {
            chunk = chunk.min((next - st.iteration) as usize);
        }
        let lr = cfg.optim.lr_at(st.iteration, n);
        reset_peak();
        let m = schedule::run_epoch(
            net,
            st,
            feed.by_ref().take(chunk),
            chunk,
            &EpochOptions {
                tracer,
                cluster,
                fail: cfg.inject_failure,
                end_of_epoch: done + chunk == n,
                ..EpochOptions::new(&cfg.optim, lr)
            },
        )?;
        note_peak(&mut peak);
        metrics = combine(metrics, m);
        done += chunk;
        if let Some(m) = cfg.measure_sigma {
            if st.iteration.is_multiple_of(m as u64) {
                let t = Instant::now();
                let sigma = sigma::measure(net, st)?;
                sigmas.push(SigmaRecord { epoch: epoch + 1, iteration: st.iteration, sigma });
                measuring += t.elapsed().as_secs_f64();
            }
        }
    }
    let seconds = t0.elapsed().as_secs_f64() - measuring;
    Ok(TrainedEpoch { metrics, lr: first_lr, seconds, peak, sigma: sigmas })
}

/// Metrics of two parts of an epoch, weighted by their samples.
fn combine(a: Metrics, b: Metrics) -> Metrics {
    let n = a.samples + b.samples;
    if n == 0 {
        return a;
    }
    let w = |x: f64, y: f64| (x * a.samples as f64 + y * b.samples as f64) / n as f64;
    let mut batch_losses = a.batch_losses.clone();
    batch_losses.extend(&b.batch_losses);
    Metrics { loss: w(a.loss, b.loss), top1: w(a.top1, b.top1), top5: w(a.top5, b.top5), samples: n, batch_losses }
}
