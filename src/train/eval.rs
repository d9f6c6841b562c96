//! Inference from a saved model: `featreplay eval` (a checkpoint on its test set or another)
//! and the model loading that `featreplay predict` shares. A model comes from a featreplay
//! checkpoint (its architecture, data shape and normalisation are in the metadata) or from a
//! plain PyTorch `state_dict` saved as safetensors (the architecture and data come from the
//! options, the normalisation from the options or, as a new run would compute it, from the
//! dataset's training images).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::run::{
    evaluate, evaluate_on, force_conv_variant, load_weights, open_devices, open_devices_sharing, prepare,
    restore_model, stored_config, test_subset, DataInfo, RunConfig,
};
use super::Network;
use crate::checkpoint;
use crate::data::{Dataset, DatasetKind, LoadOptions, Normalization, Split};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::kernels::shortcut::ChannelPad;
use crate::layers::loss::Metrics;
use crate::model::resnet::{build, ResNetConfig};
use crate::model::split;
use crate::pipeline::cluster::Cluster;

/// Which test images to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestSubset {
    /// The run's own `--test-subset` (all images when it had none, or for a plain file).
    Stored,
    /// The first N images.
    First(usize),
    /// Every image.
    All,
}

/// Where a model and its data come from, for `eval` and `predict`.
#[derive(Debug, Clone)]
pub struct InferenceOptions {
    /// Another dataset kind than the run's (None: the run's; `embedded` for a plain file).
    pub dataset: Option<String>,
    /// Another data directory (None: the run's).
    pub data_dir: Option<PathBuf>,
    pub test_subset: TestSubset,
    pub batch_size: usize,
    /// Adapter selectors (one, or one per stage).
    pub devices: Vec<String>,
    /// The architecture of a plain state_dict (for a checkpoint: must equal the stored one).
    pub arch: Option<String>,
    pub depth: Option<usize>,
    /// Folder images' side for a plain state_dict (a checkpoint stores its input shape).
    pub image_size: Option<usize>,
    /// The normalisation of a plain state_dict (per channel, on the [0, 1] scale).
    pub mean: Option<Vec<f32>>,
    pub std: Option<Vec<f32>>,
    /// Conv kernel variant to force (`direct`, `tiled`, `tune`).
    pub conv_variant: Option<String>,
    /// The option-A shortcut layout of a plain state_dict (a checkpoint stores its own).
    pub shortcut_pad: Option<ChannelPad>,
}

impl InferenceOptions {
    /// Defaults: the run's own data and subset, batch 256, the best adapter.
    pub fn new() -> InferenceOptions {
        InferenceOptions {
            dataset: None,
            data_dir: None,
            test_subset: TestSubset::Stored,
            batch_size: 256,
            devices: vec!["auto".into()],
            arch: None,
            depth: None,
            image_size: None,
            mean: None,
            std: None,
            conv_variant: None,
            shortcut_pad: None,
        }
    }
}

impl Default for InferenceOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// A model ready for inference, with what it expects of its input.
pub struct LoadedModel {
    pub net: Network,
    pub norm: Normalization,
    /// The configuration the data is read with (the run's, with the options applied).
    pub cfg: RunConfig,
    /// Per-sample input shape [C, H, W] and class count.
    pub input: Vec<usize>,
    pub classes: usize,
    pub class_names: Option<Vec<String>>,
    /// Epochs trained (None for a plain state_dict).
    pub epoch: Option<usize>,
}

impl LoadedModel {
    /// The name of class `c` (its index when the model has no names).
    pub fn class_name(&self, c: usize) -> String {
        self.class_names.as_ref().and_then(|n| n.get(c).cloned()).unwrap_or_else(|| c.to_string())
    }
}

fn bad(detail: String) -> Error {
    Error::InvalidConfig { op: "eval", detail }
}

fn load_options(cfg: &RunConfig) -> LoadOptions {
    LoadOptions {
        root: cfg.data_dir.clone(),
        image_size: (cfg.image_size as u32, cfg.image_size as u32),
        ..Default::default()
    }
}

fn kind_of(cfg: &RunConfig) -> Result<DatasetKind> {
    cfg.dataset.parse().map_err(|m: String| Error::InvalidConfig { op: "data", detail: m })
}

/// Loads the model in `path` (a run directory, a checkpoint file or a plain safetensors
/// state_dict) onto the devices of `opts`, checking its tensors' names and shapes against the
/// model (the error lists what differs).
pub fn load_model(path: &Path, opts: &InferenceOptions) -> Result<LoadedModel> {
    load_model_placed(path, opts, None)
}

/// [`load_model`], or with `placed = Some((stages, gpu))` the model split evenly into
/// `stages` stages, every one on `gpu` (a process of a run over a cluster, which runs one).
fn load_model_placed(path: &Path, opts: &InferenceOptions, placed: Option<(usize, &Gpu)>) -> Result<LoadedModel> {
    if opts.batch_size == 0 {
        return Err(bad("--batch-size must be at least 1".into()));
    }
    if opts.mean.is_some() != opts.std.is_some() {
        return Err(bad("give --mean and --std together".into()));
    }
    let mut ck = load_weights(path)?;
    let file = if path.is_dir() { path.join(checkpoint::SAFETENSORS_FILE) } else { path.to_path_buf() };
    let plain = ck.is_plain();
    let mut cfg = if plain { RunConfig::default_for(1) } else { stored_config(&ck.meta, &file)? };
    if !plain {
        for (flag, given, stored) in [
            ("--arch", opts.arch.clone(), cfg.arch.clone()),
            ("--depth", opts.depth.map(|d| d.to_string()), cfg.depth.to_string()),
            ("--shortcut-pad", opts.shortcut_pad.map(|p| p.to_string()), cfg.shortcut_pad.to_string()),
        ] {
            if let Some(g) = given.filter(|g| *g != stored) {
                return Err(bad(format!(
                    "{flag} {g}: the checkpoint holds a {} of depth {} with shortcut padding {} ({flag} is for plain state_dict files)",
                    cfg.arch, cfg.depth, cfg.shortcut_pad
                )));
            }
        }
    }
    if let Some(a) = &opts.arch {
        cfg.arch = a.clone();
    }
    if let Some(d) = opts.depth {
        cfg.depth = d;
    }
    if let Some(p) = opts.shortcut_pad {
        cfg.shortcut_pad = p;
    }
    if let Some(s) = opts.image_size {
        cfg.image_size = s;
    }
    if let Some(d) = &opts.dataset {
        cfg.dataset = d.clone();
    }
    if opts.data_dir.is_some() {
        cfg.data_dir = opts.data_dir.clone();
    }
    let elsewhere = opts.dataset.is_some() || opts.data_dir.is_some();
    cfg.test_subset = match opts.test_subset {
        TestSubset::Stored if elsewhere || plain => None,
        TestSubset::Stored => cfg.test_subset,
        TestSubset::First(n) => Some(n),
        TestSubset::All => None,
    };
    cfg.train_subset = None;
    cfg.splits = match placed {
        Some((stages, _)) => stages,
        None if opts.devices.len() == cfg.splits => cfg.splits,
        None => 1,
    };
    cfg.split = "even".into();
    cfg.devices = if placed.is_some() { vec!["auto".into()] } else { opts.devices.clone() };
    cfg.check()?;
    let stored: Option<DataInfo> = ck.meta.extra.get("data").and_then(|d| serde_json::from_value(d.clone()).ok());
    let given_norm = match (&opts.mean, &opts.std) {
        (Some(m), Some(s)) => Some(Normalization::new(m, s)?),
        _ => None,
    };
    let (input, classes, class_names, norm) = match (&stored, given_norm) {
        (Some(info), norm) => (
            info.input.clone(),
            info.classes,
            info.class_names.clone(),
            match norm {
                Some(n) => n,
                None => info.normalization()?,
            },
        ),
        (None, norm) => {
            // A plain file, or a checkpoint from before the data description was stored: the
            // data says the shape; the normalisation is given or computed as a run would.
            let p = prepare(&cfg)?;
            let names = p.train.class_names().map(|c| c.to_vec());
            if !plain {
                log::warn!("{}: no stored normalisation (an older checkpoint); recomputing it", file.display());
            }
            (p.spec.input.clone(), p.spec.classes, names, norm.unwrap_or(p.norm))
        }
    };
    if norm.channels() != input[0] {
        return Err(bad(format!("--mean/--std give {} channels but the model takes {}", norm.channels(), input[0])));
    }
    let spec = build(&ResNetConfig {
        shortcut_pad: cfg.shortcut_pad,
        arch: cfg.arch.parse()?,
        depth: cfg.depth,
        input: input.clone(),
        classes,
    })?;
    let ranges = split(&spec, cfg.splits, cfg.split.parse()?)?;
    let gpus = match placed {
        Some((_, gpu)) => vec![gpu.clone(); ranges.len()],
        None => open_devices(&cfg.devices, ranges.len())?,
    };
    force_conv_variant(&gpus, opts.conv_variant.as_deref());
    let mut net = Network::new(spec, &ranges, &gpus, cfg.seed)?;
    restore_model(&mut net, &mut ck, &file)?;
    let epoch = (!plain).then_some(ck.meta.epoch);
    Ok(LoadedModel { net, norm, cfg, input, classes, class_names, epoch })
}

impl LoadedModel {
    /// The split of the model's dataset (the test split with its subset, or the whole
    /// training split), checked against the model's input shape and classes.
    pub fn dataset(&self, split: Split) -> Result<Arc<Dataset>> {
        let kind = kind_of(&self.cfg)?;
        let data = kind.load(split, &load_options(&self.cfg))?;
        let data = if split == Split::Test { test_subset(data, self.cfg.test_subset)? } else { data };
        if data.image_shape().as_slice() != self.input.as_slice() || data.num_classes() > self.classes {
            return Err(Error::Data {
                path: data.name().to_string(),
                message: format!(
                    "holds {:?} images in {} classes, but the model takes {:?} images in {} classes",
                    data.image_shape(),
                    data.num_classes(),
                    self.input,
                    self.classes
                ),
            });
        }
        Ok(Arc::new(data))
    }
}

/// What `eval` measured.
#[derive(Debug, Clone)]
pub struct EvalReport {
    pub model: String,
    /// Epochs trained (None for a plain state_dict).
    pub epoch: Option<usize>,
    pub data: String,
    pub metrics: Metrics,
}

/// [`evaluate_checkpoint`] as one process of a [`Cluster`]: the model split evenly into one
/// stage per process, each process running its own on its device (the `--device` at its
/// rank on its machine) over the whole test set. The report (the same metrics as one
/// process's) is rank 0's; the other ranks return None.
pub fn evaluate_checkpoint_on(path: &Path, opts: &InferenceOptions, c: &dyn Cluster) -> Result<Option<EvalReport>> {
    let t = c.topology();
    if t.replicas != 1 || t.size() != c.size() {
        return Err(bad(format!("eval over {} processes runs one stage on each, without replicas", c.size())));
    }
    let selector: Vec<String> =
        opts.devices.get(c.local_rank() % opts.devices.len().max(1)).cloned().into_iter().collect();
    let selector = if selector.is_empty() { vec!["auto".to_string()] } else { selector };
    let gpu = open_devices_sharing(&selector, 1, c.local_size())?.remove(0);
    let m = load_model_placed(path, opts, Some((t.stages, &gpu)))?;
    let test = m.dataset(Split::Test)?;
    let metrics = evaluate_on(&m.net, test.clone(), &m.norm, opts.batch_size, c)?;
    Ok(metrics.map(|metrics| EvalReport {
        model: m.net.spec.name.clone(),
        epoch: m.epoch,
        data: test.name().to_string(),
        metrics,
    }))
}

/// Evaluates the model in `path` on its test set (or another, per `opts`), with the
/// normalisation stored in the checkpoint. Training state in the checkpoint (momentum,
/// pipeline state, DNI predictors) is ignored. With another dataset or data directory, every
/// test image is used unless `opts.test_subset` says otherwise (the run's subset referred to
/// its own test set).
pub fn evaluate_checkpoint(path: &Path, opts: &InferenceOptions) -> Result<EvalReport> {
    let m = load_model(path, opts)?;
    let test = m.dataset(Split::Test)?;
    let metrics = evaluate(&m.net, test.clone(), &m.norm, opts.batch_size)?;
    Ok(EvalReport { model: m.net.spec.name.clone(), epoch: m.epoch, data: test.name().to_string(), metrics })
}
