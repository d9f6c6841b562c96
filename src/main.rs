//! The `featreplay` command-line tool.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use featreplay::compare::{self, CompareConfig};
use featreplay::data::LastBatch;
use featreplay::demo::{self, DemoConfig};
use featreplay::gpu::{list_adapters, AdapterSelector};
use featreplay::kernels::conv2d;
use featreplay::kernels::shortcut::ChannelPad;
use featreplay::layers::predictor::PredictorConfig;
use featreplay::model::plan;
use featreplay::pipeline::cluster::{Allreduce, Layout};
use featreplay::predict;
use featreplay::report::EpochRecord;
use featreplay::train::dgl::AuxConfig;
use featreplay::train::eval::{self, InferenceOptions, TestSubset};
use featreplay::train::fr::BnUpdate;
use featreplay::train::resume;
use featreplay::train::run::{self, Observer, RunConfig, Start};
use featreplay::train::schedule::InjectedFailure;
use featreplay::train::OptimConfig;
use featreplay::Gpu;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(name = "featreplay", version, about = "Features Replay training of deep conv nets on any wgpu GPU")]
struct Cli {
    /// Adapter(s): an index from `featreplay devices`, `type:discrete|integrated|cpu`,
    /// `backend:vulkan|metal|dx12|gl`, a name substring, or `auto` (the best real GPU). A
    /// comma-separated list gives one adapter per stage.
    #[arg(long, global = true, env = "FEATREPLAY_ADAPTER", default_value = "auto")]
    device: String,

    /// Conv kernel variant: `direct` (CPU adapters), `tiled` (GPUs) or `tune` (time both per
    /// shape). Default: chosen by adapter type.
    #[arg(long, global = true, env = "FEATREPLAY_CONV_VARIANT")]
    conv_variant: Option<String>,

    /// wgpu's runtime bounds checks in the shaders: `auto` keeps them on CPU adapters and
    /// leaves them out on GPUs (every kernel guards its own indices); `on` to rule out an
    /// out-of-bounds access, `off` to leave them out everywhere.
    #[arg(long, global = true, default_value = "auto", value_parser = ["auto", "on", "off"])]
    shader_checks: String,

    #[command(subcommand)]
    command: Command,
}

/// Model and data flags shared by `train` and `plan` (named like the reference main.py).
#[derive(Args, Clone)]
struct ModelArgs {
    /// cifar10, cifar100, fashion-mnist, mnist, folder, or embedded (a Fashion-MNIST subset
    /// shipped in the binary).
    #[arg(long, default_value = "embedded")]
    dataset: String,
    /// Directory of the dataset files (CIFAR binary batches, IDX files, or class folders).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// resnet (basic blocks, depth 6n+2), resnet-bottleneck (9n+2), resnet101, resnet152.
    #[arg(long, default_value = "resnet")]
    arch: String,
    #[arg(long, default_value_t = 20)]
    depth: usize,
    /// Number of modules K the network is split into (one device each).
    #[arg(long, default_value_t = 1)]
    splits: usize,
    /// even (the reference's ceil(len/K) layers per module) or balanced (cost model).
    #[arg(long, default_value = "even")]
    split: String,
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Side of folder images after resizing.
    #[arg(long, default_value_t = 32)]
    image_size: usize,
}

/// Where `eval` and `predict` get the model's data and, for a plain state_dict, its shape.
#[derive(Args, Clone)]
struct SourceArgs {
    #[arg(long)]
    dataset: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The first N test images, or `all`. Default: the run's own --test-subset, or all
    /// images with --dataset / --data-dir (the run's subset was of its own test set).
    #[arg(long, value_name = "N|all")]
    test_subset: Option<String>,
    /// For a plain state_dict: resnet, resnet-bottleneck, resnet101, resnet152 (a checkpoint
    /// stores its own; a different value is an error).
    #[arg(long)]
    arch: Option<String>,
    /// For a plain state_dict: the depth (default 20).
    #[arg(long)]
    depth: Option<usize>,
    /// For a plain state_dict: where its option-A shortcuts put their zero channels, both
    /// (default) or after (the reference FR code's models).
    #[arg(long, value_parser = parse_shortcut_pad)]
    shortcut_pad: Option<ChannelPad>,
    /// For a plain state_dict of a folder dataset: the image side.
    #[arg(long)]
    image_size: Option<usize>,
    /// Input normalisation, per channel on the [0, 1] scale, comma-separated (default: the
    /// checkpoint's; for a plain state_dict, the dataset's statistics).
    #[arg(long, value_delimiter = ',')]
    mean: Option<Vec<f32>>,
    #[arg(long, value_delimiter = ',')]
    std: Option<Vec<f32>>,
}

impl SourceArgs {
    fn options(&self, cli: &Cli, batch_size: usize) -> Result<InferenceOptions> {
        let test_subset = match self.test_subset.as_deref().map(str::trim) {
            None => TestSubset::Stored,
            Some("all") => TestSubset::All,
            Some(n) => TestSubset::First(
                n.parse().map_err(|_| anyhow::anyhow!("--test-subset {n}: give a number of images or 'all'"))?,
            ),
        };
        if let Some(v) = cli.conv_variant.as_deref().filter(|v| v.trim() != "tune") {
            v.parse::<conv2d::ConvVariant>().context("reading --conv-variant")?;
        }
        Ok(InferenceOptions {
            dataset: self.dataset.clone(),
            data_dir: self.data_dir.clone(),
            test_subset,
            batch_size,
            devices: selectors(&cli.device),
            arch: self.arch.clone(),
            depth: self.depth,
            image_size: self.image_size,
            mean: self.mean.clone(),
            std: self.std.clone(),
            conv_variant: cli.conv_variant.as_ref().map(|v| v.trim().to_string()),
            shortcut_pad: self.shortcut_pad,
        })
    }
}

/// Optimisation and run flags shared by `train` and `compare`.
#[derive(Args, Clone)]
struct TrainArgs {
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    #[arg(long, default_value_t = 0.1)]
    lr: f32,
    #[arg(long, default_value_t = 0.9)]
    momentum: f32,
    /// Weight decay.
    #[arg(long, default_value_t = 5e-4)]
    decay: f32,
    /// Points of training, in epochs, at which the learning rate is multiplied by the
    /// matching --gammas (default 0.1 each). A fraction falls inside an epoch (1.5: the
    /// middle of the second). Default: 50% and 75% of --epochs, placed at the nearest
    /// iteration, so a 1-, 2- or 3-epoch run spends half its iterations at --lr. Give
    /// `--schedule` with no value for a constant rate.
    #[arg(long, num_args = 0.., value_delimiter = ' ')]
    schedule: Option<Vec<f64>>,
    #[arg(long, num_args = 0.., value_delimiter = ' ')]
    gammas: Option<Vec<f32>>,
    /// Learning-rate factor of the first module (the reference FR code uses 2).
    #[arg(long, default_value_t = 1.0)]
    first_module_lr_scale: f32,
    /// FR: which passes of a module below the last update its batch-norm running statistics:
    /// play (this project's choice) or both (play and replay, as the reference code does).
    #[arg(long, default_value = "play", value_parser = parse_bn_update)]
    fr_bn_update: BnUpdate,
    /// Where the option-A shortcut of basic blocks puts its zero channels: both (half on each
    /// side, this project's choice) or after (all after the input channels, as the reference
    /// FR code does).
    #[arg(long, default_value = "both", value_parser = parse_shortcut_pad)]
    shortcut_pad: ChannelPad,
    /// The final partial training batch of each epoch: keep (trained on as it is), drop, or
    /// pad (filled up to the batch size with the epoch's first samples, as the reference FR
    /// code's loader does).
    #[arg(long, default_value = "keep", value_parser = parse_last_batch)]
    last_batch: LastBatch,
    /// The reference FR code's choices where featreplay differs: BN running statistics
    /// updated in play and replay (--fr-bn-update both), the first module at twice the
    /// learning rate (--first-module-lr-scale 2), shortcut zero channels after the input
    /// channels (--shortcut-pad after) and a padded last batch (--last-batch pad); these
    /// override those flags.
    #[arg(long)]
    reference: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Train on the first N images of a seeded shuffle of the training set.
    #[arg(long)]
    train_subset: Option<usize>,
    /// Evaluate on the first N images of the test set.
    #[arg(long)]
    test_subset: Option<usize>,
    /// Every N iterations, measure sigma_k = <g_k, g_BP_k> / ||g_BP_k||^2 per stage on the
    /// same batch (into sigma.jsonl; the training trajectory is unchanged).
    #[arg(long, value_name = "N")]
    measure_sigma: Option<usize>,
    /// DNI: conv layers of each gradient predictor (the last one zero-initialised).
    #[arg(long, default_value_t = 3)]
    dni_depth: usize,
    /// DNI: channels of the predictor's hidden layers (0: as many as the features).
    #[arg(long, default_value_t = 0)]
    dni_width: usize,
    /// GPipe: micro-batches per batch (1: model-parallel backprop exactly).
    #[arg(long, default_value_t = 4)]
    microbatches: usize,
    /// DGL: conv + BN + ReLU layers of each auxiliary head before its pooling and linear
    /// classifier.
    #[arg(long, default_value_t = 1)]
    dgl_depth: usize,
    /// DGL: channels of the head's conv layers (0: as many as the features).
    #[arg(long, default_value_t = 0)]
    dgl_width: usize,
    /// No progress bar (one line per epoch only).
    #[arg(long)]
    quiet: bool,
    /// Data-parallel replicas of the pipeline, over processes (--transport mpi under
    /// mpirun -np splits x replicas): replica r trains on shard r of every batch and each
    /// stage's gradients are averaged over its replicas before every update. Batch norm is
    /// per replica (PyTorch DDP without SyncBN); the checkpoint keeps replica 0's statistics.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// ordered (gathered and summed in replica order: bit-reproducible) or mpi
    /// (MPI_Allreduce: faster, its own summation order).
    #[arg(long, default_value = "ordered")]
    allreduce: Allreduce,
    /// pipeline-major (rank = replica x splits + stage: a whole pipeline on consecutive
    /// ranks) or stage-major (rank = stage x replicas + replica).
    #[arg(long, default_value = "pipeline-major")]
    layout: Layout,
    /// Test hook: fail in stage STAGE (0-based) at iteration ITERATION.
    #[arg(long, hide = true, value_name = "STAGE:ITERATION", value_parser = parse_failure)]
    inject_failure: Option<InjectedFailure>,
    /// Start from the model in FILE (a featreplay checkpoint or run directory, or a plain
    /// PyTorch state_dict saved as safetensors) instead of the seeded initialisation; its
    /// tensors must match the model (the error lists what differs). Momentum starts at zero.
    #[arg(long, value_name = "FILE")]
    init_from: Option<PathBuf>,
}

fn parse_bn_update(s: &str) -> std::result::Result<BnUpdate, String> {
    s.parse().map_err(|e: featreplay::Error| e.to_string())
}

fn parse_shortcut_pad(s: &str) -> std::result::Result<ChannelPad, String> {
    s.parse().map_err(|e: featreplay::Error| e.to_string())
}

fn parse_last_batch(s: &str) -> std::result::Result<LastBatch, String> {
    s.parse().map_err(|e: featreplay::Error| e.to_string())
}

impl TrainArgs {
    fn optim(&self) -> OptimConfig {
        let mut optim = OptimConfig::paper(self.epochs);
        optim.lr = self.lr;
        optim.momentum = self.momentum;
        optim.weight_decay = self.decay;
        optim.first_stage_lr_scale = if self.reference { 2.0 } else { self.first_module_lr_scale };
        if let Some(s) = &self.schedule {
            optim.schedule = s.clone();
            optim.gammas = self.gammas.clone().unwrap_or_else(|| vec![0.1; s.len()]);
        } else if let Some(g) = &self.gammas {
            optim.gammas = g.clone();
        }
        optim
    }

    fn run_config(&self, model: &ModelArgs, cli: &Cli, algo: &str) -> RunConfig {
        RunConfig {
            dataset: model.dataset.clone(),
            data_dir: model.data_dir.clone(),
            image_size: model.image_size,
            train_subset: self.train_subset,
            test_subset: self.test_subset,
            arch: model.arch.clone(),
            depth: model.depth,
            splits: model.splits,
            split: model.split.clone(),
            epochs: self.epochs,
            batch_size: model.batch_size,
            optim: self.optim(),
            seed: self.seed,
            devices: selectors(&cli.device),
            algo: algo.to_string(),
            measure_sigma: self.measure_sigma,
            fr_bn_update: if self.reference { BnUpdate::Both } else { self.fr_bn_update },
            dni: PredictorConfig { depth: self.dni_depth, width: self.dni_width },
            microbatches: self.microbatches,
            dgl: AuxConfig { depth: self.dgl_depth, width: self.dgl_width },
            init_from: self.init_from.clone(),
            shortcut_pad: if self.reference { ChannelPad::After } else { self.shortcut_pad },
            last_batch: if self.reference { LastBatch::Pad } else { self.last_batch },
            conv_variant: cli.conv_variant.as_ref().map(|v| v.trim().to_string()),
            replicas: self.replicas,
            allreduce: self.allreduce,
            layout: self.layout,
            inject_failure: self.inject_failure,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// List every GPU adapter wgpu can reach.
    Devices,
    /// Train a ResNet with backprop (on one device or model-parallel over --splits devices),
    /// Features Replay, delayed gradients (DDG), synthetic gradients (DNI), GPipe or
    /// Decoupled Greedy Learning (DGL).
    Train {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        train: TrainArgs,
        /// bp (backprop; model-parallel when --splits > 1), fr (Features Replay), ddg
        /// (delayed gradients), dni (synthetic gradients), gpipe (micro-batch pipeline,
        /// --microbatches) or dgl (local losses, --dgl-depth, --dgl-width).
        #[arg(long, default_value = "bp")]
        algo: String,
        /// Write the pipeline's timeline as Chrome trace events (open in ui.perfetto.dev).
        #[arg(long, value_name = "FILE")]
        trace: Option<PathBuf>,
        /// Output directory: metrics.jsonl, metrics.csv, curves.png, checkpoint.*
        #[arg(long, default_value = "runs/latest")]
        out: PathBuf,
        /// Continue the run whose checkpoint is in DIR (writes there too). The run keeps its
        /// configuration: --epochs (to train longer), --data-dir (the data moved), --device,
        /// --schedule/--gammas (steps after the checkpoint only), --measure-sigma, --quiet,
        /// --trace and --conv-variant may change and are recorded in the checkpoint; any other
        /// flag must match the checkpoint or be left out; --out is refused.
        #[arg(long, value_name = "DIR")]
        resume: Option<PathBuf>,
        /// Start a new run in --out even if it holds another run: its checkpoint, metrics and
        /// plots are deleted first. Without it, a non-empty --out is refused.
        #[arg(long)]
        overwrite: bool,
        /// local (every stage in this process) or mpi (one stage per process, under
        /// `mpirun -np <splits>`; needs a build with `--features mpi`). Rank 0 writes --out;
        /// every rank reads the data (and, to resume, --out).
        #[arg(long, default_value = "local", value_parser = ["local", "mpi"])]
        transport: String,
    },
    /// Run BP, FR, DDG, DNI, GPipe and DGL with the same model, data, seed and K and write
    /// metrics, plots (curves, memory, speed, sigma) and a markdown summary (the paper's
    /// comparison).
    Compare {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        train: TrainArgs,
        /// Methods to run, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "bp,fr,ddg,dni,gpipe,dgl")]
        methods: Vec<String>,
        /// Module counts K, comma-separated (runs at the largest K measure sigma, every
        /// --measure-sigma iterations, default 50; --splits is ignored).
        #[arg(long, value_delimiter = ',', default_value = "2,3,4")]
        k: Vec<usize>,
        /// Also run backprop on one device (K = 1) first, and report every run's speedup over
        /// it beside the speedup over BP on the same K devices.
        #[arg(long)]
        single_device_baseline: bool,
        /// Output directory: summary.md, summary.json, *.png and one directory per run.
        #[arg(long, default_value = "runs/compare")]
        out: PathBuf,
        /// Reuse a non-empty --out, deleting the previous comparison's files there.
        #[arg(long)]
        overwrite: bool,
        /// local, or mpi: the methods at one K (--k), each stage in its own process, under
        /// `mpirun -np K x replicas` (as `train --transport mpi`; no sigma).
        #[arg(long, default_value = "local", value_parser = ["local", "mpi"])]
        transport: String,
    },
    /// Evaluate a checkpoint on its dataset's test set (or another --dataset / --data-dir),
    /// with the input normalisation stored in the checkpoint. Training state (momentum, a
    /// pipeline's stored inputs, DNI predictors) is ignored. Also takes a plain PyTorch
    /// state_dict saved as safetensors (give --arch, --depth, --dataset, and --mean/--std
    /// unless the dataset's own statistics apply).
    Eval {
        /// A `train --out` directory, its checkpoint.safetensors, or a plain state_dict file.
        checkpoint: PathBuf,
        #[command(flatten)]
        source: SourceArgs,
        #[arg(long, default_value_t = 256)]
        batch_size: usize,
        /// local, or mpi: the model split evenly into one stage per process, under
        /// `mpirun -np <stages>` (each process runs its own on its device).
        #[arg(long, default_value = "local", value_parser = ["local", "mpi"])]
        transport: String,
    },
    /// Per image, the model's top-k classes and probabilities (CSV or JSON lines), for image
    /// files or a dataset split, with the checkpoint's normalisation.
    Predict {
        /// A `train --out` directory, its checkpoint.safetensors, or a plain state_dict file.
        checkpoint: PathBuf,
        /// Image files (PNG, JPEG), resized to the model's input; without them, the images of
        /// --split of the model's dataset (or --dataset / --data-dir).
        #[arg(long, num_args = 1.., value_name = "FILE")]
        images: Vec<PathBuf>,
        /// The dataset split to predict when no --images are given.
        #[arg(long, default_value = "test")]
        split: String,
        #[command(flatten)]
        source: SourceArgs,
        /// Classes per image.
        #[arg(long, default_value_t = 5)]
        top_k: usize,
        /// csv or jsonl.
        #[arg(long, default_value = "csv")]
        format: String,
        /// Write here instead of standard output.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        #[arg(long, default_value_t = 256)]
        batch_size: usize,
    },
    /// Measure one steady-state training iteration (model, batch, method and K as for
    /// `train`): dispatches, compute passes, submits, host waits, buffers created, bytes
    /// zero-filled and CPU time recording per iteration, and device time by layer type and
    /// kernel; prints a markdown report and writes it as JSON.
    Profile {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        train: TrainArgs,
        /// bp, fr, ddg or dni, as for `train`.
        #[arg(long, default_value = "bp")]
        algo: String,
        /// Iterations run before counting (pipelines compile, the allocator fills).
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Iterations counted and timed.
        #[arg(long, default_value_t = 5)]
        iterations: usize,
        /// Iterations timed kernel by kernel afterwards (0: skip the device-time table).
        #[arg(long, default_value_t = 1)]
        timed_iterations: usize,
        /// Where to write the report as JSON.
        #[arg(long, default_value = "profile.json")]
        json: PathBuf,
        /// Profile on random images of this shape (C,H,W, 10 classes) instead of the dataset,
        /// e.g. 3,32,32 for CIFAR's.
        #[arg(long, value_delimiter = ',', num_args = 3, value_name = "C,H,W")]
        input_shape: Option<Vec<usize>>,
    },
    /// Show how a model splits into modules: layers, parameters, memory and cost per module.
    Plan {
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Train a small residual network on random data (the foundation's smoke test).
    Demo {
        #[arg(long, default_value_t = 8)]
        epochs: usize,
        #[arg(long, default_value_t = 512)]
        samples: usize,
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        /// Image side in pixels.
        #[arg(long, default_value_t = 16)]
        size: usize,
        /// Channels of the first block (the second has twice as many).
        #[arg(long, default_value_t = 16)]
        width: usize,
        #[arg(long, default_value_t = 0.05)]
        lr: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

fn selectors(device: &str) -> Vec<String> {
    device.split(',').map(|s| s.trim().to_string()).collect()
}

fn apply_conv_variant(cli_variant: &Option<String>, gpus: &[Gpu]) -> Result<()> {
    if let Some(v) = cli_variant {
        if v.trim() != "tune" {
            v.parse::<conv2d::ConvVariant>().context("reading --conv-variant")?;
        }
        for g in gpus {
            g.force_variant(conv2d::OP, Some(v.trim()));
        }
    }
    Ok(())
}

fn open_device(cli: &Cli) -> Result<Gpu> {
    let selector: AdapterSelector = cli.device.parse().context("reading --device")?;
    // Through `open_devices`, so a CPU adapter gets the thread pool a training run gets.
    let gpu = run::open_devices(std::slice::from_ref(&cli.device), 1)
        .with_context(|| format!("opening a device on adapter '{selector}'"))?
        .remove(0);
    apply_conv_variant(&cli.conv_variant, std::slice::from_ref(&gpu))?;
    Ok(gpu)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// `--inject-failure STAGE:ITERATION`.
fn parse_failure(v: &str) -> std::result::Result<InjectedFailure, String> {
    let bad = || format!("{v}: give STAGE:ITERATION, e.g. 1:3");
    let (stage, iteration) = v.split_once(':').ok_or_else(bad)?;
    Ok(InjectedFailure { stage: stage.parse().map_err(|_| bad())?, iteration: iteration.parse().map_err(|_| bad())? })
}

/// Progress bar per epoch plus one summary line per epoch.
struct Console {
    bar: Option<ProgressBar>,
    quiet: bool,
}

impl Observer for Console {
    fn run_start(&mut self, cfg: &RunConfig, p: &run::Prepared) {
        println!(
            "{}: {} on {} ({} train / {} test images {:?}), {} module(s), {} parameters",
            cfg.algo,
            p.spec.name,
            p.train.name(),
            p.train.len(),
            p.test.len(),
            p.train.image_shape(),
            p.ranges.len(),
            p.spec.params().unwrap_or(0)
        );
    }

    fn epoch_start(&mut self, epoch: usize, batches: usize) {
        if self.quiet {
            return;
        }
        let bar = ProgressBar::new(batches as u64);
        bar.set_style(
            ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}<{eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(epoch.to_string());
        self.bar = Some(bar);
    }

    fn batch(&mut self, _epoch: usize, _index: usize, images_per_second: f64) {
        if let Some(b) = &self.bar {
            b.set_message(format!("{images_per_second:.0} img/s"));
            b.inc(1);
        }
    }

    fn epoch_end(&mut self, r: &EpochRecord) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        let mem = r.peak_memory_bytes.iter().map(|b| format!("{:.0}", mib(*b))).collect::<Vec<_>>().join("/");
        println!(
            "epoch {:>3}  lr {:.4}  train loss {:.4} top-1 {:>5.2}%  test loss {:.4} top-1 {:>5.2}% top-5 {:>5.2}%  best {:>5.2}%  {:.1}s  {:.0} img/s  peak MiB {mem}",
            r.epoch,
            r.lr,
            r.train_loss,
            100.0 * r.train_top1,
            r.test_loss,
            100.0 * r.test_top1,
            100.0 * r.test_top5,
            100.0 * r.best_test_top1,
            r.epoch_seconds,
            r.images_per_second,
        );
        if !r.sigma.is_empty() {
            let s =
                r.sigma.iter().map(|v| if v.is_finite() { format!("{v:.3}") } else { "-".into() }).collect::<Vec<_>>();
            println!("           mean sigma per stage {}", s.join(" / "));
        }
    }
}

/// The flags of the subcommand the user really gave (on the command line or, for the global
/// ones, through their environment variables), as `--` names without the dashes: a resumed
/// run must tell a flag left at its default from one given with the default's value.
fn given_flags(matches: &clap::ArgMatches) -> Vec<String> {
    use clap::parser::ValueSource;
    let mut out = Vec::new();
    let mut collect = |m: &clap::ArgMatches| {
        for id in m.ids() {
            let id = id.as_str();
            if matches!(m.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable)) {
                out.push(id.replace('_', "-"));
            }
        }
    };
    collect(matches);
    if let Some((_, sub)) = matches.subcommand() {
        collect(sub);
    }
    out.sort();
    out.dedup();
    out
}

fn run(cli: Cli, given: &[&str]) -> Result<()> {
    featreplay::gpu::set_shader_runtime_checks(match cli.shader_checks.as_str() {
        "on" => Some(true),
        "off" => Some(false),
        _ => None,
    });
    match &cli.command {
        Command::Devices => {
            let adapters = list_adapters();
            if adapters.is_empty() {
                anyhow::bail!("no GPU adapter found. {}", featreplay::gpu::adapter::no_adapter_hint());
            }
            for a in &adapters {
                println!("{a}");
            }
            println!("default: [0] (override with --device or FEATREPLAY_ADAPTER)");
        }
        Command::Train { model, train, algo, out, resume, trace, overwrite, transport } => {
            let requested = train.run_config(model, &cli, algo);
            let (dir, cfg, start) = match resume {
                Some(d) => {
                    if *overwrite {
                        anyhow::bail!("--overwrite cannot be combined with --resume");
                    }
                    let (stored, _) =
                        run::checkpoint_config(d).with_context(|| format!("resuming from {}", d.display()))?;
                    let (cfg, changes) = resume::resume_config(&stored, &requested, given)
                        .with_context(|| format!("resuming {}", d.display()))?;
                    for c in &changes {
                        println!("resume: {c}");
                    }
                    (d.clone(), cfg, Start::Resume)
                }
                None => (out.clone(), requested, Start::New { overwrite: *overwrite }),
            };
            let mut console = Console { bar: None, quiet: train.quiet };
            if transport == "mpi" {
                return over_mpi(Some(&cfg), &format!("training into {}", dir.display()), |cluster| {
                    let rank0 = cluster.rank() == 0;
                    let obs: &mut dyn Observer = if rank0 { &mut console } else { &mut run::Quiet };
                    let summary = run::train_on(&cfg, &dir, start, trace.as_deref(), obs, Some(cluster))?;
                    if rank0 {
                        println!(
                            "best test top-1 {:.2}%; metrics, curves.png and checkpoint in {} ({} processes)",
                            100.0 * summary.best_test_top1,
                            summary.out.display(),
                            cluster.size()
                        );
                    }
                    Ok(())
                });
            }
            let summary = run::train(&cfg, &dir, start, trace.as_deref(), &mut console)
                .with_context(|| format!("training into {}", dir.display()))?;
            println!(
                "best test top-1 {:.2}%; metrics, curves.png and checkpoint in {}",
                100.0 * summary.best_test_top1,
                summary.out.display()
            );
        }
        Command::Compare { model, train, methods, k, single_device_baseline, out, overwrite, transport } => {
            let mut base = train.run_config(model, &cli, "bp");
            if transport == "mpi" {
                // Over processes one K runs (the processes' count over --replicas), without
                // sigma (it needs every stage in one process).
                base.splits = k.first().copied().unwrap_or(1);
            } else {
                // The comparison includes sigma: measured every 50 iterations unless told otherwise.
                base.measure_sigma = base.measure_sigma.or(Some(50));
            }
            let cfg = CompareConfig {
                base,
                methods: methods.clone(),
                ks: k.clone(),
                single_device_baseline: *single_device_baseline,
                out: out.clone(),
                overwrite: *overwrite,
            };
            let mut console = Console { bar: None, quiet: train.quiet };
            let announce =
                |m: &str, k: usize, dir: &std::path::Path| println!("== {m} with K = {k} -> {}", dir.display());
            if transport == "mpi" {
                return over_mpi(Some(&cfg.base), &format!("comparing into {}", out.display()), |cluster| {
                    let rank0 = cluster.rank() == 0;
                    let obs: &mut dyn Observer = if rank0 { &mut console } else { &mut run::Quiet };
                    let summary = compare::compare_on(&cfg, announce, obs, Some(cluster))?;
                    if rank0 {
                        print!("{}", compare::summary_markdown(&cfg, &summary));
                        println!("summary.md, summary.json, curves/memory/speed plots in {}", out.display());
                    }
                    Ok(())
                });
            }
            let summary = compare::compare(&cfg, announce, &mut console)
                .with_context(|| format!("comparing into {}", out.display()))?;
            for r in &summary.runs {
                if let compare::Outcome::Diverged { epoch, reason } = &r.outcome {
                    println!("{} with K = {}: diverged in epoch {epoch}: {reason}", r.method, r.k);
                }
            }
            print!("{}", compare::summary_markdown(&cfg, &summary));
            println!("summary.md, summary.json, curves/memory/speed/sigma plots in {}", out.display());
        }
        Command::Eval { checkpoint, source, batch_size, transport } => {
            let opts = source.options(&cli, *batch_size)?;
            if transport == "mpi" {
                return over_mpi(None, &format!("evaluating {}", checkpoint.display()), |cluster| {
                    if let Some(r) = eval::evaluate_checkpoint_on(checkpoint, &opts, cluster)? {
                        print_eval(&r);
                    }
                    Ok(())
                });
            }
            let r = eval::evaluate_checkpoint(checkpoint, &opts)
                .with_context(|| format!("evaluating {}", checkpoint.display()))?;
            print_eval(&r);
        }
        Command::Predict { checkpoint, images, split, source, top_k, format, output, batch_size } => {
            if !["csv", "jsonl"].contains(&format.as_str()) {
                anyhow::bail!("--format {format}: choose csv or jsonl");
            }
            if *top_k == 0 {
                anyhow::bail!("--top-k must be at least 1");
            }
            let split: featreplay::data::Split = split.parse().map_err(|m: String| anyhow::anyhow!(m))?;
            for f in images {
                if !f.is_file() {
                    anyhow::bail!("{}: no such image file", f.display());
                }
            }
            if let Some(o) = output {
                if o.is_dir() {
                    anyhow::bail!("--output {} is a directory; give a file name", o.display());
                }
            }
            let opts = source.options(&cli, *batch_size)?;
            let model =
                eval::load_model(checkpoint, &opts).with_context(|| format!("loading {}", checkpoint.display()))?;
            let inputs = if images.is_empty() {
                predict::Inputs::Dataset(split)
            } else {
                predict::Inputs::Images(images.clone())
            };
            let preds = predict::predict(&model, &inputs, *top_k, *batch_size).context("predicting")?;
            let mut text = Vec::new();
            if format == "csv" {
                predict::write_csv(&mut text, &preds)?;
            } else {
                predict::write_jsonl(&mut text, &preds)?;
            }
            match output {
                Some(o) => featreplay::report::write_atomic(o, &text)?,
                None => std::io::Write::write_all(&mut std::io::stdout().lock(), &text)?,
            }
        }
        Command::Profile { model, train, algo, warmup, iterations, timed_iterations, json, input_shape } => {
            if json.is_dir() {
                anyhow::bail!("--json {} is a directory; give a file name, e.g. profile.json", json.display());
            }
            if let Some(parent) = json.parent().filter(|p| !p.as_os_str().is_empty()) {
                if !parent.is_dir() {
                    anyhow::bail!("--json {}: the directory {} does not exist", json.display(), parent.display());
                }
            }
            if *iterations == 0 {
                anyhow::bail!("--iterations must be at least 1");
            }
            let cfg = featreplay::profile::ProfileConfig {
                run: train.run_config(model, &cli, algo),
                warmup: *warmup,
                iterations: *iterations,
                timed_iterations: *timed_iterations,
                synthetic_input: input_shape.clone(),
            };
            let p = featreplay::profile::profile(&cfg).context("profiling")?;
            print!("{}", p.markdown());
            let text = serde_json::to_string_pretty(&p).context("writing the profile as JSON")?;
            featreplay::report::write_atomic(json, text.as_bytes())
                .with_context(|| format!("writing {}", json.display()))?;
            println!("\nwritten: {}", json.display());
        }
        Command::Plan { model } => {
            let mut cfg = RunConfig::default_for(1);
            cfg.dataset = model.dataset.clone();
            cfg.data_dir = model.data_dir.clone();
            cfg.image_size = model.image_size;
            cfg.arch = model.arch.clone();
            cfg.depth = model.depth;
            cfg.splits = model.splits;
            cfg.split = model.split.clone();
            cfg.batch_size = model.batch_size;
            let p = run::prepare(&cfg).context("planning")?;
            println!(
                "{}: {} layers, {} parameters, input {:?}, batch {}, split {} into {}",
                p.spec.name,
                p.spec.layers.len(),
                p.spec.params()?,
                p.spec.input,
                model.batch_size,
                model.split,
                p.ranges.len()
            );
            println!("module  layers          params   activations MiB  input MiB  cost GFLOP-eq  share");
            for m in plan(&p.spec, &p.ranges, model.batch_size)? {
                println!(
                    "{:>6}  {:>5}..{:<5}  {:>10}  {:>15.2}  {:>9.2}  {:>13.2}  {:>5.1}%",
                    m.index + 1,
                    m.layers.start,
                    m.layers.end,
                    m.params,
                    mib(m.activation_bytes),
                    mib(m.input_bytes),
                    m.cost / 1e9,
                    100.0 * m.cost_share
                );
                println!("        {}", m.labels.join(", "));
            }
        }
        Command::Demo { epochs, samples, batch_size, size, width, lr, seed } => {
            let cfg = DemoConfig {
                samples: *samples,
                batch: *batch_size,
                size: *size,
                width: *width,
                epochs: *epochs,
                lr: *lr,
                seed: *seed,
                ..Default::default()
            };
            cfg.check().context("checking the demo")?;
            let gpu = open_device(&cli)?;
            println!("device: {}", gpu.adapter());
            println!(
                "training a residual net ({width}/{} channels) on {samples} random {size}x{size} images, batch {batch_size}, {epochs} epochs",
                2 * width
            );
            let reports = demo::run(&gpu, &cfg, |r| {
                println!(
                    "epoch {:>3}  loss {:.4}  train top-1 {:>5.1}%  {:>7.1} img/s  {:>6.2} s  peak memory {:.1} MiB",
                    r.epoch,
                    r.loss,
                    100.0 * r.accuracy,
                    r.images_per_second,
                    r.seconds,
                    mib(r.peak_memory_bytes)
                );
            })
            .context("training the demo network")?;
            if let (Some(first), Some(last)) = (reports.first(), reports.last()) {
                println!("loss {:.4} -> {:.4}", first.loss, last.loss);
            }
        }
    }
    Ok(())
}

/// Runs `body` as one rank of an `mpirun` (`--transport mpi`) of `cfg`'s shape. An error on
/// any rank is printed with its rank and stage and ends every rank (the others may be
/// waiting for its messages and would wait forever).
/// `cfg` None: one stage per process, no replicas (eval).
#[cfg(feature = "mpi")]
fn over_mpi(
    cfg: Option<&RunConfig>,
    what: &str,
    body: impl FnOnce(&dyn featreplay::pipeline::cluster::Cluster) -> Result<()>,
) -> Result<()> {
    use featreplay::pipeline::cluster::{Allreduce, Cluster, Layout, Topology};
    use featreplay::pipeline::mpi::{world_rank_and_size, MpiCluster};
    let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Serialized)
        .ok_or_else(|| anyhow::anyhow!("--transport mpi: MPI did not initialise"))?;
    let (topology, allreduce) = match cfg {
        Some(c) => (c.topology(), c.allreduce),
        None => {
            let stages = world_rank_and_size().1;
            (Topology { stages, replicas: 1, layout: Layout::PipelineMajor }, Allreduce::Ordered)
        }
    };
    let replicas = topology.replicas;
    let cluster = MpiCluster::new(topology, allreduce);
    match body(&cluster) {
        Ok(()) => {
            drop(universe);
            Ok(())
        }
        Err(e) => {
            let (stage, replica) = cluster.place();
            let e = e.context(what.to_string());
            let at = if replicas > 1 { format!("stage {stage}, replica {replica}") } else { format!("stage {stage}") };
            eprintln!("featreplay: error: rank {} ({at}): {}", cluster.rank(), one_line(&e));
            cluster.abort(1)
        }
    }
}

#[cfg(not(feature = "mpi"))]
fn over_mpi(
    _cfg: Option<&RunConfig>,
    _what: &str,
    _body: impl FnOnce(&dyn featreplay::pipeline::cluster::Cluster) -> Result<()>,
) -> Result<()> {
    anyhow::bail!(
        "--transport mpi: this featreplay was built without MPI; build it with `cargo build --release --features mpi`"
    )
}

/// `eval`'s one line.
fn print_eval(r: &eval::EvalReport) {
    let after = r.epoch.map_or_else(|| "(plain state_dict)".to_string(), |e| format!("after epoch {e}"));
    println!(
        "{} {after} on {} ({} images): loss {:.4}  top-1 {:.2}%  top-5 {:.2}%",
        r.model,
        r.data,
        r.metrics.samples,
        r.metrics.loss,
        100.0 * r.metrics.top1,
        100.0 * r.metrics.top5
    );
}

/// The context chain on one line; a cause already quoted by the message above it (library
/// errors include their I/O source) is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !msg.contains(&s) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&s);
        }
    }
    msg.replace('\n', " ")
}

fn main() {
    // lavapipe probes Wayland and complains when XDG_RUNTIME_DIR is unset; compute does not
    // need it. Set before any wgpu instance exists (single-threaded here).
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
    env_logger::init();
    let matches = Cli::command().get_matches();
    let result = Cli::from_arg_matches(&matches).map_err(anyhow::Error::from).and_then(|cli| {
        let given = given_flags(&matches);
        run(cli, &given.iter().map(String::as_str).collect::<Vec<_>>())
    });
    if let Err(e) = result {
        eprintln!("featreplay: error: {}", one_line(&e));
        std::process::exit(1);
    }
}
