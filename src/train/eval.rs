//! `featreplay eval`: a checkpoint on its test set or another, with the normalisation the
//! run stored.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::run::{evaluate, open_devices, prepare, restore_model, stored_config, test_subset, DataInfo};
use super::Network;
use crate::checkpoint;
use crate::data::{DatasetKind, LoadOptions};
use crate::error::{Error, Result};
use crate::layers::loss::Metrics;
use crate::model::resnet::{build, ResNetConfig};
use crate::model::split;

/// Which test images `eval` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestSubset {
    /// The run's own `--test-subset` (all images when it had none).
    Stored,
    /// The first N test images.
    First(usize),
    /// Every test image.
    All,
}

/// What `featreplay eval` evaluates, and where.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Another dataset kind than the run's (None: the run's).
    pub dataset: Option<String>,
    /// Another data directory (None: the run's).
    pub data_dir: Option<PathBuf>,
    pub test_subset: TestSubset,
    pub batch_size: usize,
    /// Adapter selectors (one, or one per stage).
    pub devices: Vec<String>,
}

/// What `eval` measured.
#[derive(Debug, Clone)]
pub struct EvalReport {
    pub model: String,
    pub epoch: usize,
    pub data: String,
    pub metrics: Metrics,
}

/// Evaluates the checkpoint in `dir` on its test set (or another, per `opts`), with the
/// normalisation stored in the checkpoint (recomputed from the training data only for
/// checkpoints that predate storing it). Training state in the checkpoint (momentum, pipeline
/// state, DNI predictors) is ignored. With another dataset or data directory, every test
/// image is used unless `opts.test_subset` says otherwise (the run's subset referred to its
/// own test set).
pub fn evaluate_checkpoint(dir: &Path, opts: &EvalOptions, conv_variant: Option<&str>) -> Result<EvalReport> {
    if opts.batch_size == 0 {
        return Err(Error::Unsupported { op: "eval", detail: "--batch-size must be at least 1".into() });
    }
    let mut ck = checkpoint::load(dir)?;
    let mut cfg = stored_config(&ck.meta, dir)?;
    let elsewhere = opts.dataset.is_some() || opts.data_dir.is_some();
    if let Some(d) = &opts.dataset {
        cfg.dataset = d.clone();
    }
    if opts.data_dir.is_some() {
        cfg.data_dir = opts.data_dir.clone();
    }
    cfg.test_subset = match opts.test_subset {
        TestSubset::Stored if elsewhere => None,
        TestSubset::Stored => cfg.test_subset,
        TestSubset::First(n) => Some(n),
        TestSubset::All => None,
    };
    cfg.devices = if opts.devices.len() == 1 || opts.devices.len() == cfg.splits {
        opts.devices.clone()
    } else {
        vec![opts.devices[0].clone()]
    };
    let data: Option<DataInfo> = ck.meta.extra.get("data").and_then(|d| serde_json::from_value(d.clone()).ok());
    let file = dir.join(checkpoint::SAFETENSORS_FILE);
    let (spec, ranges, test, norm) = match &data {
        Some(info) => {
            // Only the test split is needed: the model's shape and normalisation are stored.
            cfg.check()?;
            let kind: DatasetKind =
                cfg.dataset.parse().map_err(|m: String| Error::Unsupported { op: "data", detail: m })?;
            let opts = LoadOptions {
                root: cfg.data_dir.clone(),
                image_size: (cfg.image_size as u32, cfg.image_size as u32),
                ..Default::default()
            };
            let test = test_subset(kind.load(crate::data::Split::Test, &opts)?, cfg.test_subset)?;
            let shape = test.image_shape().to_vec();
            if shape != info.input || test.num_classes() > info.classes {
                return Err(Error::Data {
                    path: file.display().to_string(),
                    message: format!(
                        "the model takes {:?} images in {} classes, but {} holds {:?} images in {} classes",
                        info.input,
                        info.classes,
                        test.name(),
                        shape,
                        test.num_classes()
                    ),
                });
            }
            let spec = build(&ResNetConfig {
                arch: cfg.arch.parse()?,
                depth: cfg.depth,
                input: info.input.clone(),
                classes: info.classes,
            })?;
            let ranges = split(&spec, cfg.splits, cfg.split.parse()?)?;
            (spec, ranges, Arc::new(test), info.normalization()?)
        }
        None => {
            log::warn!("{}: no stored normalisation (an older checkpoint); recomputing it", file.display());
            let p = prepare(&cfg)?;
            (p.spec, p.ranges, p.test, p.norm)
        }
    };
    let gpus = open_devices(&cfg.devices, ranges.len())?;
    if let Some(v) = conv_variant {
        for g in &gpus {
            g.force_variant(crate::kernels::conv2d::OP, Some(v));
        }
    }
    let mut net = Network::new(spec.clone(), &ranges, &gpus, cfg.seed)?;
    restore_model(&mut net, &mut ck, &file)?;
    let metrics = evaluate(&net, test.clone(), &norm, opts.batch_size)?;
    Ok(EvalReport { model: spec.name, epoch: ck.meta.epoch, data: test.name().to_string(), metrics })
}
