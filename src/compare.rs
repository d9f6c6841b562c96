//! `featreplay compare`: the paper's comparison in one command. BP, FR, DDG, DNI, GPipe and
//! DGL are trained with the same model, data, seed and optimiser for every K asked for; each run
//! writes its own directory (`<method>-k<K>/`: metrics, sigma, curves, checkpoint) and the
//! comparison adds, in the output directory:
//! - `curves-k<K>.png`: training loss and test error per epoch, and against training
//!   seconds (the loss per iteration, smoothed), every method;
//! - `memory.png`: peak memory per stage, every method, one panel per K;
//! - `speed.png`: time per epoch and speedup over BP (same K) per method against K;
//! - `sigma.png`: sigma per stage over training for each decoupled method (largest K);
//! - `summary.md` and `summary.json`: best test error, peak memory per stage, time per
//!   epoch and speedup, per method and K.
//!
//! A run that diverges (NaN or infinite loss) is recorded as diverged with the epochs it
//! completed, and the others go on; any other error stops the comparison.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::pipeline::cluster::Cluster;
use crate::report::{self, plot_panels, EpochRecord, Panel, SigmaRecord};
use crate::train::run::{self, Observer, RunConfig, Start};

/// The methods `compare` knows, in the order it runs them (every registered method).
pub const METHODS: [&str; 6] = {
    let m = crate::train::method::METHODS;
    [m[0].0, m[1].0, m[2].0, m[3].0, m[4].0, m[5].0]
};

/// What to compare.
#[derive(Debug, Clone)]
pub struct CompareConfig {
    /// Model, data, optimiser, seed, epochs (its `algo` and `splits` are replaced per run).
    pub base: RunConfig,
    pub methods: Vec<String>,
    pub ks: Vec<usize>,
    /// Run BP on one device first (unless K = 1 is asked for anyway) and report speedups
    /// over it too.
    pub single_device_baseline: bool,
    pub out: PathBuf,
    /// Reuse a non-empty `out` (each run's directory is overwritten).
    pub overwrite: bool,
}

/// How one run ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Outcome {
    Completed,
    /// The run stopped in `epoch` (1-based) for `reason` (a non-finite loss, weight,
    /// gradient, statistic or output); its directory keeps the last good epoch's files.
    Diverged {
        epoch: usize,
        reason: String,
    },
}

/// One method at one K.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MethodRun {
    pub method: String,
    pub k: usize,
    pub dir: PathBuf,
    pub outcome: Outcome,
    pub records: Vec<EpochRecord>,
    #[serde(skip)]
    pub sigma: Vec<SigmaRecord>,
}

impl MethodRun {
    /// Lowest test error (1 - top-1) over the completed epochs.
    pub fn best_test_error(&self) -> Option<f64> {
        self.records.iter().map(|r| 1.0 - r.test_top1).reduce(f64::min)
    }

    /// Mean training time per epoch (measurements excluded). With two epochs or more the
    /// first is left out: it includes compiling every pipeline (0.2-1.8 s each on lavapipe).
    pub fn seconds_per_epoch(&self) -> Option<f64> {
        let timed = if self.records.len() >= 2 { &self.records[1..] } else { &self.records[..] };
        (!timed.is_empty()).then(|| timed.iter().map(|r| r.epoch_seconds).sum::<f64>() / timed.len() as f64)
    }

    /// Peak bytes per stage over all epochs.
    pub fn peak_memory(&self) -> Vec<u64> {
        let mut out: Vec<u64> = Vec::new();
        for r in &self.records {
            out.resize(out.len().max(r.peak_memory_bytes.len()), 0);
            for (o, b) in out.iter_mut().zip(&r.peak_memory_bytes) {
                *o = (*o).max(*b);
            }
        }
        out
    }
}

/// Everything a comparison produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompareSummary {
    pub runs: Vec<MethodRun>,
}

impl CompareSummary {
    pub fn get(&self, method: &str, k: usize) -> Option<&MethodRun> {
        self.runs.iter().find(|r| r.method == method && r.k == k)
    }

    /// Time per epoch of BP over that of `run` at the same K.
    pub fn speedup(&self, run: &MethodRun) -> Option<f64> {
        let bp = self.get("bp", run.k)?.seconds_per_epoch()?;
        Some(bp / run.seconds_per_epoch()?)
    }

    /// Time per epoch of BP on one device over that of `run` (when BP ran at K = 1).
    pub fn speedup_over_one_device(&self, run: &MethodRun) -> Option<f64> {
        let bp = self.get("bp", 1)?.seconds_per_epoch()?;
        Some(bp / run.seconds_per_epoch()?)
    }
}

impl CompareConfig {
    fn check(&self) -> Result<()> {
        let bad = |detail: String| Error::InvalidConfig { op: "compare", detail };
        if self.methods.is_empty() {
            return Err(bad(format!("--methods is empty: name at least one of {}", METHODS.join(", "))));
        }
        for m in &self.methods {
            if !METHODS.contains(&m.as_str()) {
                return Err(bad(format!("unknown method '{m}': choose from {}", METHODS.join(", "))));
            }
        }
        if self.ks.is_empty() || self.ks.contains(&0) {
            return Err(bad("--k needs one or more module counts of at least 1".into()));
        }
        Ok(())
    }

    /// The configurations of every run, in the order they run.
    fn runs(&self) -> Vec<(&'static str, usize, RunConfig)> {
        let main_k = *self.ks.iter().max().unwrap_or(&1);
        let mut out = Vec::new();
        if self.single_device_baseline && !self.ks.contains(&1) {
            let mut rc = self.base.clone();
            rc.algo = "bp".into();
            rc.splits = 1;
            rc.measure_sigma = None;
            out.push(("bp", 1, rc));
        }
        for &k in &self.ks {
            for method in METHODS.iter().filter(|m| self.methods.iter().any(|c| c == *m)) {
                let mut rc = self.base.clone();
                rc.algo = method.to_string();
                rc.splits = k;
                if k != main_k {
                    // Runs at other K serve the memory and speed comparison only.
                    rc.measure_sigma = None;
                }
                out.push((*method, k, rc));
            }
        }
        out
    }

    /// Checks the whole plan before the first run: every run's configuration (model, split
    /// at each K, memory) and the output directory, so a bad K fails now, not after hours.
    fn check_plan(&self) -> Result<()> {
        self.check()?;
        let p = run::prepare(&self.base)?;
        for (method, k, rc) in self.runs() {
            rc.check()
                .map_err(|e| Error::InvalidConfig { op: "compare", detail: format!("{method} with K = {k}: {e}") })?;
            let ranges = crate::model::split(&p.spec, k, rc.split.parse()?)
                .map_err(|e| Error::InvalidConfig { op: "compare", detail: format!("--k {k}: {e}") })?;
            let pk = run::Prepared { ranges, ..p.clone() };
            run::estimate_memory(&rc, &pk)
                .and_then(|_| run::check_memory(&rc, &pk))
                .map_err(|e| Error::InvalidConfig { op: "compare", detail: format!("{method} with K = {k}: {e}") })?;
        }
        crate::rundir::check_new_run_dir(&self.out, self.overwrite)
    }
}

/// Runs every method at every K (K in the order given, methods in [`METHODS`] order) and
/// writes the plots and the summary. `observer` is told about each run before it starts.
pub fn compare(
    cfg: &CompareConfig,
    on_run: impl FnMut(&str, usize, &Path),
    obs: &mut dyn Observer,
) -> Result<CompareSummary> {
    compare_on(cfg, on_run, obs, None)
}

/// [`compare`] as one process of a run over a [`Cluster`]: every method at the cluster's
/// one K, each run as [`run::train_on`] runs it (rank 0 writes every output; the others
/// return an empty summary). A divergence ends the whole comparison (the other ranks cannot
/// tell it from a failure), and sigma is not measured (it needs every stage in one process).
pub fn compare_on(
    cfg: &CompareConfig,
    mut on_run: impl FnMut(&str, usize, &Path),
    obs: &mut dyn Observer,
    cluster: Option<&dyn Cluster>,
) -> Result<CompareSummary> {
    if let Some(c) = cluster {
        let stages = cfg.base.topology().stages;
        if cfg.ks != [stages] || cfg.single_device_baseline || cfg.base.measure_sigma.is_some() {
            return Err(Error::InvalidConfig {
                op: "compare",
                detail: format!(
                    "--transport mpi compares the methods at one K, the processes' {} / --replicas {}: give --k {stages} and leave out --single-device-baseline and --measure-sigma",
                    c.size(),
                    cfg.base.replicas
                ),
            });
        }
        if c.rank() > 0 {
            cfg.check()?;
            for (_, _, rc) in cfg.runs() {
                let dir = cfg.out.join(format!("{}-k{}", rc.algo, rc.splits));
                run::train_on(&rc, &dir, Start::New { overwrite: cfg.overwrite }, None, obs, cluster)?;
            }
            return Ok(CompareSummary { runs: vec![] });
        }
    }
    cfg.check_plan()?;
    let _lock = crate::rundir::RunLock::acquire(&cfg.out)?;
    if cfg.overwrite {
        for (method, k, _) in cfg.runs() {
            let dir = cfg.out.join(format!("{method}-k{k}"));
            if dir.exists() {
                crate::rundir::clear_run_outputs(&dir)?;
            }
        }
    }
    let mut runs = Vec::new();
    for (method, k, rc) in cfg.runs() {
        let dir = cfg.out.join(format!("{method}-k{k}"));
        on_run(method, k, &dir);
        let outcome = match run::train_on(&rc, &dir, Start::New { overwrite: cfg.overwrite }, None, obs, cluster) {
            Ok(_) => Outcome::Completed,
            Err(Error::Diverged { epoch, reason }) if cluster.is_none() => Outcome::Diverged { epoch, reason },
            Err(e) => return Err(e),
        };
        let metrics = dir.join("metrics.jsonl");
        let records = if metrics.exists() { report::read_metrics(&metrics)? } else { vec![] };
        let sigma_path = dir.join("sigma.jsonl");
        let sigma = if sigma_path.exists() { report::read_sigma(&sigma_path)? } else { vec![] };
        runs.push(MethodRun { method: method.to_string(), k, dir, outcome, records, sigma });
    }
    let summary = CompareSummary { runs };
    write_outputs(cfg, &summary)?;
    Ok(summary)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// The summary table in markdown.
pub fn summary_markdown(cfg: &CompareConfig, s: &CompareSummary) -> String {
    let b = &cfg.base;
    let mut md = String::new();
    let _ = writeln!(md, "# featreplay compare\n");
    let _ = writeln!(
        md,
        "{} depth {} on {}{}, {} epoch(s), batch {}, lr {} (steps {:?} x {:?}), momentum {}, weight decay {}, seed {}, split {}{}.\n",
        b.arch,
        b.depth,
        b.dataset,
        b.train_subset.map(|n| format!(" (training subset of {n} images)")).unwrap_or_default(),
        b.epochs,
        b.batch_size,
        b.optim.lr,
        b.optim.schedule,
        b.optim.gammas,
        b.optim.momentum,
        b.optim.weight_decay,
        b.seed,
        b.split,
        b.test_subset.map(|n| format!(", test on the first {n} test images")).unwrap_or_default(),
    );
    let _ = writeln!(
        md,
        "| method | K | status | best test error | final train loss | time/epoch (s) | speedup over BP | speedup over BP, K = 1 | peak memory per stage (MiB) | mean sigma per stage |"
    );
    let _ = writeln!(md, "|---|---:|---|---:|---:|---:|---:|---:|---|---|");
    for r in &s.runs {
        let status = match &r.outcome {
            Outcome::Completed => "completed".to_string(),
            Outcome::Diverged { epoch, reason } => {
                format!("**diverged** in epoch {epoch}: {}", reason.replace('|', "/"))
            }
        };
        let fmt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map(f).unwrap_or_else(|| "-".into());
        let mem = r.peak_memory().iter().map(|b| format!("{:.1}", mib(*b))).collect::<Vec<_>>().join(" / ");
        let sig = SigmaRecord::mean(&r.sigma, r.k);
        let sig = if sig.is_empty() {
            "-".to_string()
        } else {
            sig.iter()
                .map(|v| if v.is_finite() { format!("{v:.3}") } else { "-".into() })
                .collect::<Vec<_>>()
                .join(" / ")
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.method,
            r.k,
            status,
            fmt(r.best_test_error(), &|v| format!("{:.2}%", 100.0 * v)),
            fmt(r.records.last().map(|x| x.train_loss), &|v| format!("{v:.4}")),
            fmt(r.seconds_per_epoch(), &|v| format!("{v:.1}")),
            fmt(s.speedup(r), &|v| format!("{v:.2}x")),
            fmt(s.speedup_over_one_device(r), &|v| format!("{v:.2}x")),
            if mem.is_empty() { "-".into() } else { mem },
            sig
        );
    }
    let mut gpipe_ks: Vec<usize> = s.runs.iter().filter(|r| r.method == "gpipe").map(|r| r.k).collect();
    gpipe_ks.dedup();
    for k in gpipe_ks {
        let m = b.microbatches;
        let _ = writeln!(
            md,
            "\nGPipe at K = {k}: {m} micro-batches per batch, bubble (K - 1) / (M + K - 1) = {:.1}% of each module's iteration.",
            100.0 * crate::train::gpipe::bubble_fraction(k, m)
        );
    }
    let _ = writeln!(
        md,
        "\nTime per epoch excludes evaluation and sigma measurements, and the first epoch when there are more (it compiles the pipelines). Speedup over BP: BP's time per epoch at the same K (model-parallel BP on the same devices, the paper's baseline) over the method's; over BP, K = 1: single-device BP's (with --single-device-baseline or K = 1 in --k). Peak memory: bytes allocated on each stage's device during training (tensors and runtime buffers). Plots: curves-k<K>.png, memory.png, speed.png, sigma.png; per-run metrics in <method>-k<K>/."
    );
    md
}

fn write_outputs(cfg: &CompareConfig, s: &CompareSummary) -> Result<()> {
    report::write_atomic(&cfg.out.join("summary.md"), summary_markdown(cfg, s).as_bytes())?;
    let js = cfg.out.join("summary.json");
    let json = serde_json::to_string_pretty(s)
        .map_err(|e| Error::Data { path: js.display().to_string(), message: e.to_string() })?;
    report::write_atomic(&js, json.as_bytes())?;
    let mut ks = cfg.ks.clone();
    ks.sort_unstable();
    ks.dedup();
    let name = |r: &MethodRun| match r.outcome {
        Outcome::Completed => r.method.to_uppercase(),
        Outcome::Diverged { .. } => format!("{} (diverged)", r.method.to_uppercase()),
    };
    for &k in &ks {
        let runs: Vec<&MethodRun> = s.runs.iter().filter(|r| r.k == k).collect();
        let per_epoch = |f: &dyn Fn(&EpochRecord) -> f64| -> Vec<(String, Vec<(f64, f64)>)> {
            runs.iter().map(|r| (name(r), r.records.iter().map(|e| (e.epoch as f64, f(e))).collect())).collect()
        };
        let panels = [
            Panel {
                title: format!("training loss, K = {k}"),
                x_desc: "epoch".into(),
                y_desc: "loss".into(),
                series: per_epoch(&|e| e.train_loss),
            },
            Panel {
                title: format!("test error, K = {k}"),
                x_desc: "epoch".into(),
                y_desc: "test error (%)".into(),
                series: per_epoch(&|e| 100.0 * (1.0 - e.test_top1)),
            },
            // The paper's "faster convergence" is per unit of time.
            Panel {
                title: format!("training loss per iteration (smoothed), K = {k}"),
                x_desc: "training seconds".into(),
                y_desc: "loss".into(),
                series: runs
                    .iter()
                    .map(|r| {
                        let pts = report::smoothed_iteration_losses(&r.records);
                        (name(r), pts.iter().map(|p| (p.1, p.2)).collect())
                    })
                    .collect(),
            },
            Panel {
                title: format!("test error, K = {k}"),
                x_desc: "training seconds".into(),
                y_desc: "test error (%)".into(),
                series: runs
                    .iter()
                    .map(|r| {
                        let pts = report::test_error_by_seconds(&r.records);
                        (name(r), pts.iter().map(|p| (p.0, 100.0 * p.1)).collect())
                    })
                    .collect(),
            },
        ];
        plot_panels(&panels, &cfg.out.join(format!("curves-k{k}.png")))?;
    }
    let memory: Vec<Panel> = ks
        .iter()
        .map(|&k| Panel {
            title: format!("peak memory per stage, K = {k}"),
            x_desc: "stage".into(),
            y_desc: "MiB".into(),
            series: s
                .runs
                .iter()
                .filter(|r| r.k == k)
                .map(|r| {
                    (name(r), r.peak_memory().iter().enumerate().map(|(i, b)| ((i + 1) as f64, mib(*b))).collect())
                })
                .collect(),
        })
        .collect();
    plot_panels(&memory, &cfg.out.join("memory.png"))?;
    let methods: Vec<&str> = METHODS.iter().copied().filter(|m| cfg.methods.iter().any(|c| c == m)).collect();
    let by_k = |f: &dyn Fn(&MethodRun) -> Option<f64>| -> Vec<(String, Vec<(f64, f64)>)> {
        methods
            .iter()
            .map(|m| {
                let pts =
                    s.runs.iter().filter(|r| r.method == *m).filter_map(|r| f(r).map(|v| (r.k as f64, v))).collect();
                (m.to_uppercase(), pts)
            })
            .collect()
    };
    let speed = [
        Panel {
            title: "time per epoch".into(),
            x_desc: "K (modules / devices)".into(),
            y_desc: "seconds".into(),
            series: by_k(&|r| r.seconds_per_epoch()),
        },
        Panel {
            title: "speedup over model-parallel BP".into(),
            x_desc: "K (modules / devices)".into(),
            y_desc: "x".into(),
            series: by_k(&|r| s.speedup(r)),
        },
    ];
    plot_panels(&speed, &cfg.out.join("speed.png"))?;
    let main_k = ks.last().copied().unwrap_or(1);
    let sigma: Vec<Panel> = s
        .runs
        .iter()
        .filter(|r| r.k == main_k && !r.sigma.is_empty())
        .map(|r| Panel {
            title: format!("sigma per stage, {}, K = {main_k}", name(r)),
            x_desc: "iteration".into(),
            y_desc: "sigma".into(),
            series: (0..main_k)
                .map(|st| {
                    let pts =
                        r.sigma.iter().filter_map(|m| m.sigma.get(st).map(|v| (m.iteration as f64, *v))).collect();
                    (format!("stage {}", st + 1), pts)
                })
                .collect(),
        })
        .collect();
    let sigma = if sigma.is_empty() {
        vec![Panel {
            title: "sigma not measured (give --measure-sigma N)".into(),
            x_desc: "iteration".into(),
            y_desc: "sigma".into(),
            series: vec![],
        }]
    } else {
        sigma
    };
    plot_panels(&sigma, &cfg.out.join("sigma.png"))?;
    Ok(())
}
