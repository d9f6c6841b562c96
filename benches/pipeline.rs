//! Features Replay against model-parallel backprop on the same K devices: time per
//! iteration and peak memory per stage. A benchmark, not a test (`cargo bench --bench
//! pipeline`); options: `-- --model 20 --batch 128 --iters 6 --k 2 --split even
//! --memory-model 56 --memory-batch 128 --skip-memory --skip-speed`.
//!
//! On a CPU adapter (lavapipe) each stage gets its own wgpu instance and an equal share of
//! the cores (`open_devices`), so with K = 2 on two cores each stage is one single-thread
//! lavapipe device, as the issue asks.

use std::time::Instant;

use featreplay::model::resnet::{build, ResNetConfig};
use featreplay::model::{split, ModelSpec, SplitPolicy};
use featreplay::train::run::open_devices;
use featreplay::train::schedule::{self, EpochOptions, HostBatch, PipelineState};
use featreplay::train::{Network, OptimConfig};
use rand::{Rng, SeedableRng};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

fn resnet(depth: usize) -> ModelSpec {
    build(&ResNetConfig::basic(depth, &[3, 32, 32], 10)).expect("model")
}

fn batches(n: usize, batch: usize, seed: u64) -> Vec<HostBatch> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| HostBatch {
            images: (0..batch * 3 * 32 * 32).map(|_| rng.random_range(-1.0f32..1.0)).collect(),
            labels: (0..batch).map(|_| rng.random_range(0..10u32)).collect(),
        })
        .collect()
}

fn optim() -> OptimConfig {
    OptimConfig::constant(0.01)
}

/// Seconds per iteration of model-parallel BP and of FR, measured after `warmup` iterations.
fn speed(spec: &ModelSpec, k: usize, policy: SplitPolicy, batch: usize, iters: usize) -> (f64, f64) {
    let ranges = split(spec, k, policy).expect("split");
    let gpus = open_devices(&["auto".to_string()], k).expect("devices");
    let opt = optim();
    let warmup = k + 1;
    let data = batches(warmup + iters, batch, 1);

    let mut bp = Network::new(spec.clone(), &ranges, &gpus, 0).expect("network");
    for b in &data[..warmup] {
        bp.bp_step(&b.images, &b.labels, &opt, opt.lr).expect("bp");
        bp.sync().expect("sync");
    }
    let t0 = Instant::now();
    for b in &data[warmup..] {
        bp.bp_step(&b.images, &b.labels, &opt, opt.lr).expect("bp");
        bp.sync().expect("sync");
    }
    let bp_s = t0.elapsed().as_secs_f64() / iters as f64;
    drop(bp);

    let mut net = Network::new(spec.clone(), &ranges, &gpus, 0).expect("network");
    let mut state = PipelineState::fr(k);
    let copy = |r: &[HostBatch]| -> Vec<HostBatch> {
        r.iter().map(|b| HostBatch { images: b.images.clone(), labels: b.labels.clone() }).collect()
    };
    schedule::run_epoch(
        &mut net,
        &mut state,
        copy(&data[..warmup]).into_iter(),
        warmup,
        &EpochOptions::new(&opt, opt.lr),
    )
    .expect("fr warm-up");
    let t0 = Instant::now();
    schedule::run_epoch(
        &mut net,
        &mut state,
        copy(&data[warmup..]).into_iter(),
        iters,
        &EpochOptions::new(&opt, opt.lr),
    )
    .expect("fr");
    let fr_s = t0.elapsed().as_secs_f64() / iters as f64;
    (bp_s, fr_s)
}

/// Peak bytes per stage (tensors) of BP and FR at steady state.
fn memory(spec: &ModelSpec, k: usize, batch: usize) -> (Vec<u64>, Vec<u64>) {
    let ranges = split(spec, k, SplitPolicy::Even).expect("split");
    let gpus = open_devices(&["auto".to_string()], k).expect("devices");
    let opt = optim();
    let data = batches(k + 2, batch, 2);
    let peaks = |gpus: &[featreplay::Gpu]| gpus.iter().map(|g| g.memory().peak_tensor_bytes).collect::<Vec<_>>();

    let mut bp = Network::new(spec.clone(), &ranges, &gpus, 0).expect("network");
    for g in &gpus {
        g.reset_peak_memory();
    }
    for b in &data[..2] {
        bp.bp_step(&b.images, &b.labels, &opt, opt.lr).expect("bp");
        bp.sync().expect("sync");
    }
    let bp_peak = peaks(&gpus);
    drop(bp);

    let mut net = Network::new(spec.clone(), &ranges, &gpus, 0).expect("network");
    let mut state = PipelineState::fr(k);
    let it = data.iter().map(|b| HostBatch { images: b.images.clone(), labels: b.labels.clone() });
    // Warm-up fills the histories; the peak is taken over the steady-state iterations.
    let mut it = it.collect::<Vec<_>>().into_iter();
    schedule::run_epoch(&mut net, &mut state, it.by_ref().take(k), k, &EpochOptions::new(&opt, opt.lr))
        .expect("fr warm-up");
    for g in &gpus {
        g.reset_peak_memory();
    }
    schedule::run_epoch(&mut net, &mut state, it, 2, &EpochOptions::new(&opt, opt.lr)).expect("fr");
    (bp_peak, peaks(&gpus))
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn main() {
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
    let depth: usize = arg("--model", "20").parse().expect("--model depth");
    let batch: usize = arg("--batch", "128").parse().expect("--batch");
    let iters: usize = arg("--iters", "6").parse().expect("--iters");
    let k: usize = arg("--k", "2").parse().expect("--k");
    let policy: SplitPolicy = arg("--split", "even").parse().expect("--split");
    let adapters = featreplay::gpu::list_adapters();
    println!("adapter: {}", adapters.first().map(|a| a.to_string()).unwrap_or_default());

    if !flag("--skip-speed") {
        let spec = resnet(depth);
        let (bp, fr) = speed(&spec, k, policy, batch, iters);
        println!("\n## Time per iteration, {} batch {batch}, K = {k}, {policy} split, {iters} iterations\n", spec.name);
        println!("| method | s / iteration | speedup over BP |");
        println!("|---|---|---|");
        println!("| BP (model-parallel, same {k} devices) | {bp:.3} | 1.00x |");
        println!("| FR | {fr:.3} | {:.2}x |", bp / fr);
        println!("\nideal with replay 3K/4 = {:.2}x", 3.0 * k as f64 / 4.0);
    }
    if !flag("--skip-memory") {
        let mdepth: usize = arg("--memory-model", "56").parse().expect("--memory-model");
        let mbatch: usize = arg("--memory-batch", "128").parse().expect("--memory-batch");
        let spec = resnet(mdepth);
        println!("\n## Peak tensor memory per stage (MiB), {} batch {mbatch}, even split\n", spec.name);
        println!("| K | BP per stage | FR per stage | FR / BP (max stage) |");
        println!("|---|---|---|---|");
        for k in [2usize, 3, 4] {
            let (bp, fr) = memory(&spec, k, mbatch);
            let fmt = |v: &[u64]| v.iter().map(|b| format!("{:.1}", mib(*b))).collect::<Vec<_>>().join(" / ");
            let ratio = *fr.iter().max().unwrap() as f64 / *bp.iter().max().unwrap() as f64;
            println!("| {k} | {} | {} | {ratio:.2} |", fmt(&bp), fmt(&fr));
        }
    }
}
