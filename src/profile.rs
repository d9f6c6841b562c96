//! `featreplay profile`: what one steady-state training iteration costs the runtime
//! (dispatches, compute passes, submits, host waits, buffers created, bytes zero-filled, CPU
//! time spent recording) and where the device time goes, by layer type and kernel.
//!
//! Counts come from the devices' runtime counters after `warmup` iterations (pipelines
//! compiled, the caching allocator filled, a pipeline's histories full): a call of
//! `iterations` iterations and one of twice as many are counted, and their difference is
//! what `iterations` steady-state iterations cost (a call's own costs cancel). Device time per kernel comes from a separate pass over `timed_iterations` in which
//! every dispatch runs alone: with GPU timestamps where the adapter has them, else timed on
//! the host around a wait (which adds the submit overhead; the report says which).

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use crate::data::loader::Loader;
use crate::error::{Error, Result};
use crate::gpu::{Counters, Gpu, OpTimingMethod};
use crate::model::LayerSpec;
use crate::train::run::{force_conv_variant, open_devices, prepare, RunConfig};
use crate::train::schedule::{self, EpochOptions, HostBatch, PipelineState};
use crate::train::Network;

/// What to profile: the run's model, data, method and K, and how long.
#[derive(Clone, Debug)]
pub struct ProfileConfig {
    pub run: RunConfig,
    /// Iterations before counting (at least 1; a pipeline of K stages also needs K).
    pub warmup: usize,
    /// Iterations counted.
    pub iterations: usize,
    /// Iterations timed kernel by kernel (0: no device-time table).
    pub timed_iterations: usize,
    /// Random images of this per-sample shape [C, H, W] and 10 classes instead of the run's
    /// dataset (e.g. CIFAR's 3x32x32 where the dataset is not at hand).
    pub synthetic_input: Option<Vec<usize>>,
}

/// One row of the device-time table.
#[derive(Debug, Clone, Serialize)]
pub struct OpRow {
    /// The layer type the kernel belongs to (its shader family).
    pub layer: &'static str,
    pub shader: &'static str,
    pub entry: &'static str,
    pub calls_per_iteration: f64,
    pub ms_per_iteration: f64,
    /// Share of the summed device time.
    pub share: f64,
}

/// The result of a profile.
#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    pub adapter: String,
    pub model: String,
    pub method: String,
    pub stages: usize,
    pub batch_size: usize,
    pub iterations: usize,
    /// Basic or bottleneck residual blocks of the model.
    pub blocks: usize,
    /// Runtime counts per iteration, summed over the stages.
    pub per_iteration: Counters,
    /// Runtime counts per iteration of each stage.
    pub per_stage: Vec<Counters>,
    pub seconds_per_iteration: f64,
    pub images_per_second: f64,
    /// Peak tensor bytes per stage during the counted iterations, and the pool capacity.
    pub peak_tensor_bytes: Vec<u64>,
    pub pool_bytes: Vec<u64>,
    /// How device time was measured (None: not measured).
    pub op_timing: Option<OpTimingMethod>,
    pub ops: Vec<OpRow>,
    /// Device time per layer type, ms per iteration.
    pub layers: BTreeMap<&'static str, f64>,
}

/// The layer type a shader's kernels belong to.
pub fn layer_type(shader: &str) -> &'static str {
    match shader {
        s if s.starts_with("conv2d") => "conv",
        "batch_norm" => "batch norm",
        "elementwise" => "relu / add",
        "shortcut" => "shortcut",
        "linear" => "linear",
        "pool" => "pool",
        "cross_entropy" => "loss",
        "sgd" => "sgd",
        "nonfinite" => "divergence check",
        _ => "other",
    }
}

/// Runs the profile.
pub fn profile(cfg: &ProfileConfig) -> Result<Profile> {
    if cfg.iterations == 0 {
        return Err(Error::InvalidConfig { op: "profile", detail: "--iterations must be at least 1".into() });
    }
    let (spec, ranges, batches) = workload(cfg)?;
    let method = cfg.run.method()?;
    let k = ranges.len();
    // Past every module's warm-up (d_k iterations at most).
    let warmup = cfg.warmup.max(1).max(k);
    let gpus = open_devices(&cfg.run.devices, k)?;
    force_conv_variant(&gpus, cfg.run.conv_variant.as_deref());
    let mut net = Network::new(spec.clone(), &ranges, &gpus, cfg.run.seed)?;
    let mut state = PipelineState::new(method, &net, cfg.run.seed)?;
    if batches.len() < warmup + 3 * cfg.iterations + cfg.timed_iterations {
        return Err(Error::InvalidConfig { op: "profile", detail: "too few batches for the profile".into() });
    }
    let optim = &cfg.run.optim;
    let lr = optim.lr;
    // As the training loop runs it: the method's steps on the pipeline.
    let mut run = |net: &mut Network, batches: &[HostBatch]| -> Result<()> {
        let opts = EpochOptions { end_of_epoch: false, ..EpochOptions::new(optim, lr) };
        schedule::run_epoch(net, &mut state, batches.iter().map(copy_batch), batches.len(), &opts)?;
        Ok(())
    };

    run(&mut net, &batches[..warmup])?;
    net.sync()?;
    gpus.iter().for_each(Gpu::reset_peak_memory);
    // A call of the pipeline costs a few things once (its closing checks, the metrics read
    // back, the measurement's sync): a call of n iterations and one of 2n are counted and
    // timed, and their difference is n steady-state iterations.
    let n = cfg.iterations;
    let mut window = |net: &mut Network, from: usize, len: usize| -> Result<(Vec<Counters>, f64)> {
        let before: Vec<Counters> = gpus.iter().map(Gpu::counters).collect();
        let t0 = Instant::now();
        run(net, &batches[from..from + len])?;
        net.sync()?;
        let seconds = t0.elapsed().as_secs_f64();
        Ok((gpus.iter().zip(&before).map(|(g, b)| g.counters() - *b).collect(), seconds))
    };
    let (short, short_s) = window(&mut net, warmup, n)?;
    let (long, long_s) = window(&mut net, warmup + n, 2 * n)?;
    let seconds = (long_s - short_s).max(0.0) / n as f64;
    let mut per_stage: Vec<Counters> = long.iter().zip(&short).map(|(l, s)| per_iter(*l - *s, n)).collect();
    let per_iteration = per_stage.iter_mut().fold(Counters::default(), |a, c| a + *c);
    let peak_tensor_bytes = gpus.iter().map(|g| g.memory().peak_tensor_bytes).collect();
    let pool_bytes = gpus.iter().map(|g| g.memory().pool_bytes).collect();

    let mut op_timing = None;
    let mut ops = Vec::new();
    let mut layers = BTreeMap::new();
    if cfg.timed_iterations > 0 {
        for g in &gpus {
            op_timing = Some(g.start_op_timing()?);
        }
        let timed = run(&mut net, &batches[warmup + 3 * n..]);
        let mut times = Vec::new();
        for g in &gpus {
            times.extend(g.op_times()?);
        }
        timed?;
        let mut merged: BTreeMap<(&'static str, &'static str), (u64, f64)> = BTreeMap::new();
        for t in times {
            let e = merged.entry((t.shader, t.entry)).or_default();
            e.0 += t.calls;
            e.1 += t.seconds;
        }
        let total: f64 = merged.values().map(|v| v.1).sum();
        let n = cfg.timed_iterations as f64;
        for ((shader, entry), (calls, secs)) in merged {
            let layer = layer_type(shader);
            *layers.entry(layer).or_insert(0.0) += secs * 1e3 / n;
            ops.push(OpRow {
                layer,
                shader,
                entry,
                calls_per_iteration: calls as f64 / n,
                ms_per_iteration: secs * 1e3 / n,
                share: if total > 0.0 { secs / total } else { 0.0 },
            });
        }
        ops.sort_by(|a, b| b.ms_per_iteration.total_cmp(&a.ms_per_iteration));
    }
    let blocks =
        spec.layers.iter().filter(|l| matches!(l, LayerSpec::Basic { .. } | LayerSpec::Bottleneck { .. })).count();
    Ok(Profile {
        adapter: match std::env::var("LP_NUM_THREADS") {
            // The pool size `open_devices` chose (or the user's): it moves lavapipe's speed.
            Ok(t) if gpus[0].adapter().is_lavapipe() => {
                format!("{} ({t} llvmpipe threads per device)", gpus[0].adapter().name)
            }
            _ => gpus[0].adapter().name.clone(),
        },
        model: spec.name.clone(),
        method: state.method.name().to_string(),
        stages: k,
        batch_size: cfg.run.batch_size,
        iterations: cfg.iterations,
        blocks,
        per_iteration,
        per_stage,
        seconds_per_iteration: seconds,
        images_per_second: cfg.run.batch_size as f64 / seconds,
        peak_tensor_bytes,
        pool_bytes,
        op_timing,
        ops,
        layers,
    })
}

fn per_iter(c: Counters, n: usize) -> Counters {
    let n = n as u64;
    let d = |v: u64| v.div_ceil(n);
    // Whole counts are rounded up, so one extra event in the window still shows.
    Counters {
        dispatches: d(c.dispatches),
        passes: d(c.passes),
        copies: d(c.copies),
        submits: d(c.submits),
        host_waits: d(c.host_waits),
        buffers_created: d(c.buffers_created),
        bytes_created: c.bytes_created / n,
        bytes_zero_filled: c.bytes_zero_filled / n,
        bind_groups_created: d(c.bind_groups_created),
        record_ns: c.record_ns / n,
        submit_ns: c.submit_ns / n,
    }
}

fn copy_batch(b: &HostBatch) -> HostBatch {
    HostBatch { images: b.images.clone(), labels: b.labels.clone() }
}

type Workload = (crate::model::ModelSpec, Vec<std::ops::Range<usize>>, Vec<HostBatch>);

/// The model, its split and enough batches: the run's data, or random images.
fn workload(cfg: &ProfileConfig) -> Result<Workload> {
    let need = cfg.warmup.max(1).max(cfg.run.splits) + 3 * cfg.iterations + cfg.timed_iterations;
    match &cfg.synthetic_input {
        None => {
            let p = prepare(&cfg.run)?;
            let batches = host_batches(&cfg.run, &p, need)?;
            Ok((p.spec, p.ranges, batches))
        }
        Some(input) => {
            cfg.run.check()?;
            if input.len() != 3 || input.contains(&0) {
                return Err(Error::InvalidConfig {
                    op: "profile",
                    detail: format!("--input-shape {input:?}: give C,H,W, each at least 1"),
                });
            }
            let spec = crate::model::resnet::build(&crate::model::resnet::ResNetConfig {
                shortcut_pad: cfg.run.shortcut_pad,
                arch: cfg.run.arch.parse()?,
                depth: cfg.run.depth,
                input: input.clone(),
                classes: 10,
            })?;
            let ranges = crate::model::split(&spec, cfg.run.splits, cfg.run.split.parse()?)?;
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.run.seed);
            let per: usize = input.iter().product();
            let b = cfg.run.batch_size;
            let batches = (0..need)
                .map(|_| HostBatch {
                    images: (0..b * per).map(|_| rng.random_range(-1.0f32..1.0)).collect(),
                    labels: (0..b).map(|_| rng.random_range(0..10u32)).collect(),
                })
                .collect();
            Ok((spec, ranges, batches))
        }
    }
}

/// `n` training batches of the run's data (the epoch's order repeats if it is shorter).
fn host_batches(cfg: &RunConfig, p: &crate::train::run::Prepared, n: usize) -> Result<Vec<HostBatch>> {
    let mut out = Vec::with_capacity(n);
    let mut epoch = 0u64;
    while out.len() < n {
        let loader = Loader::new(p.train.clone(), p.norm.clone(), cfg.train_loader(), epoch)?;
        let before = out.len();
        for b in loader {
            if b.labels.len() == cfg.batch_size && out.len() < n {
                out.push(HostBatch { images: b.images, labels: b.labels });
            }
        }
        if out.len() == before {
            return Err(Error::InvalidConfig {
                op: "profile",
                detail: format!("the training set holds fewer than --batch-size {} images", cfg.batch_size),
            });
        }
        epoch += 1;
    }
    Ok(out)
}

impl Profile {
    /// The report as markdown: the counts per iteration, then device time by layer type
    /// and by kernel.
    pub fn markdown(&self) -> String {
        let c = &self.per_iteration;
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let mut s = format!(
            "# profile: {} {} K={} batch {} on {}\n\n{:.3} s per iteration, {:.1} img/s ({} iterations after warm-up)\n\n",
            self.model, self.method, self.stages, self.batch_size, self.adapter, self.seconds_per_iteration,
            self.images_per_second, self.iterations
        );
        s += "| per steady-state iteration | all stages |";
        for k in 0..self.per_stage.len() {
            s += &format!(" stage {} |", k + 1);
        }
        s += "\n|---|---:|";
        s += &"---:|".repeat(self.per_stage.len());
        s += "\n";
        type Row = (&'static str, fn(&Counters) -> String);
        let rows: [Row; 11] = [
            ("dispatches", |c| c.dispatches.to_string()),
            ("compute passes", |c| c.passes.to_string()),
            ("copies and clears", |c| c.copies.to_string()),
            ("submits", |c| c.submits.to_string()),
            ("host waits", |c| c.host_waits.to_string()),
            ("buffers created", |c| c.buffers_created.to_string()),
            ("MiB created", |c| format!("{:.2}", c.bytes_created as f64 / 1048576.0)),
            ("MiB zero-filled", |c| format!("{:.2}", c.bytes_zero_filled as f64 / 1048576.0)),
            ("bind groups created", |c| c.bind_groups_created.to_string()),
            ("CPU ms recording", |c| format!("{:.2}", c.record_ns as f64 / 1e6)),
            ("CPU ms in queue.submit", |c| format!("{:.2}", c.submit_ns as f64 / 1e6)),
        ];
        for (name, f) in rows {
            s += &format!("| {name} | {} |", f(c));
            for st in &self.per_stage {
                s += &format!(" {} |", f(st));
            }
            s += "\n";
        }
        if self.blocks > 0 {
            s += &format!(
                "| dispatches per residual block (all of the step / {} blocks) | {:.1} |{}\n",
                self.blocks,
                c.dispatches as f64 / self.blocks as f64,
                " |".repeat(self.per_stage.len())
            );
        }
        s += &format!(
            "| peak tensor MiB | {:.1} |{}\n| pool MiB (allocator capacity) | {:.1} |{}\n",
            mib(self.peak_tensor_bytes.iter().sum()),
            self.peak_tensor_bytes.iter().map(|b| format!(" {:.1} |", mib(*b))).collect::<String>(),
            mib(self.pool_bytes.iter().sum()),
            self.pool_bytes.iter().map(|b| format!(" {:.1} |", mib(*b))).collect::<String>(),
        );
        match self.op_timing {
            None => s += "\nDevice time per kernel: not measured (--timed-iterations 0).\n",
            Some(m) => {
                let how = match m {
                    OpTimingMethod::Timestamps => "GPU timestamps around each dispatch",
                    OpTimingMethod::HostWait => {
                        "this adapter has no timestamp queries: each dispatch submitted alone and timed on the host up to its completion (includes the submit overhead)"
                    }
                };
                let total: f64 = self.layers.values().sum();
                s += &format!("\n## Device time by layer type ({how})\n\n| layer type | ms / iteration | share |\n|---|---:|---:|\n");
                let mut layers: Vec<_> = self.layers.iter().collect();
                layers.sort_by(|a, b| b.1.total_cmp(a.1));
                for (l, ms) in layers {
                    s += &format!("| {l} | {ms:.2} | {:.1}% |\n", if total > 0.0 { 100.0 * ms / total } else { 0.0 });
                }
                s += &format!("| total | {total:.2} | |\n\n## Device time by kernel\n\n| layer type | kernel | calls / iteration | ms / iteration | share |\n|---|---|---:|---:|---:|\n");
                for o in &self.ops {
                    s += &format!(
                        "| {} | {}::{} | {:.1} | {:.2} | {:.1}% |\n",
                        o.layer,
                        o.shader,
                        o.entry,
                        o.calls_per_iteration,
                        o.ms_per_iteration,
                        100.0 * o.share
                    );
                }
            }
        }
        s
    }
}
