//! Training over MPI (feature `mpi`; `cargo test --release --features mpi --test mpi`,
//! OpenMPI's `mpirun` on the PATH).
//!
//! - The links: the test starts itself under `mpirun -np 2`; each rank runs one stage's
//!   links and checks every message it receives.
//! - Whole runs: `mpirun -np K featreplay train --transport mpi` against the same run in one
//!   process (`--splits K`), checkpoint tensor by tensor and metrics bit for bit; resuming
//!   across the two; a failing rank ending the run non-zero within a time limit.

#![cfg(feature = "mpi")]

#[path = "common/process.rs"]
mod process;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use featreplay::checkpoint;
use featreplay::data::Loader;
use featreplay::pipeline::cluster::ThreadReducers;
use featreplay::train::run::{self, RunConfig};
use featreplay::train::schedule::{self, EpochOptions, HostBatch, PipelineState};
use featreplay::train::Network;

use featreplay::pipeline::link::{Features, StageLinks};
use featreplay::pipeline::mpi::{world_rank_and_size, MpiLinks};
use featreplay::Gpu;

const TEST: &str = "links_carry_features_up_and_gradients_down_in_order_without_deadlock";

/// True in a process that `mpirun` started.
fn under_mpirun() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"].iter().any(|v| std::env::var(v).is_ok())
}

/// `mpirun -np n` of this test binary running test `name` alone; fails the test if it does not
/// end within `limit` (a hang) or ends non-zero.
fn mpirun(n: usize, name: &str, limit: Duration) {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", &n.to_string()])
        .arg(exe)
        .args(["--exact", name, "--nocapture", "--test-threads", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun (install openmpi-bin)");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(status.success(), "mpirun -np {n} failed:\n{text}");
            assert_eq!(text.matches("rank checks passed").count(), n, "{text}");
            return;
        }
        if start.elapsed() > limit {
            child.kill().ok();
            panic!("mpirun -np {n} did not finish within {limit:?} (a hang)");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Iterations and values per message: 1.5M floats (6 MB) is past OpenMPI's eager limit, where
/// a blocking send-then-receive exchange deadlocks.
const ITERATIONS: usize = 5;
const VALUES: usize = 1_500_000;

fn features(t: usize) -> Vec<f32> {
    (0..VALUES).map(|i| (t * 1000 + i % 997) as f32 * 0.5).collect()
}

fn gradient(t: usize) -> Vec<f32> {
    (0..VALUES).map(|i| -((t * 7 + i % 89) as f32) * 0.25).collect()
}

fn labels(t: usize) -> Vec<u32> {
    (0..10).map(|i| (t + i) as u32).collect()
}

#[test]
fn links_carry_features_up_and_gradients_down_in_order_without_deadlock() {
    if !under_mpirun() {
        return mpirun(2, TEST, Duration::from_secs(180));
    }
    let (_universe, _) = mpi::initialize_with_threading(mpi::Threading::Serialized).expect("MPI initialises");
    let (rank, size) = world_rank_and_size();
    assert_eq!(size, 2);
    let gpu = Gpu::open_default().unwrap();
    let shape = [10, VALUES / 10];
    if rank == 0 {
        let mut links = MpiLinks::new(0, gpu.clone(), None, Some(1));
        assert!(links.has_above() && !links.has_below());
        // FR's pattern: the features of t + 1 go up before the gradient of t is received,
        // while the stage above sends that gradient: both sides send at once.
        for t in 0..ITERATIONS {
            let h = gpu.tensor(&shape, &features(t)).unwrap();
            links.send_up(Features { h, labels: labels(t), parts: t + 1 }).unwrap();
            if t > 0 {
                let g = links.receive_down().unwrap();
                assert_eq!(g.shape(), shape);
                assert_eq!(g.to_vec().unwrap(), gradient(t - 1), "gradient {}", t - 1);
            }
        }
        let g = links.receive_down().unwrap();
        assert_eq!(g.to_vec().unwrap(), gradient(ITERATIONS - 1));
    } else {
        let mut links = MpiLinks::new(1, gpu.clone(), Some(0), None);
        assert!(links.has_below() && !links.has_above());
        for t in 0..ITERATIONS {
            let f = links.receive_up().unwrap();
            assert_eq!((f.parts, f.labels.clone()), (t + 1, labels(t)), "features {t}");
            assert_eq!(f.h.shape(), shape);
            assert_eq!(f.h.gpu().id(), gpu.id(), "features arrive on this stage's device");
            assert_eq!(f.h.to_vec().unwrap(), features(t), "features {t}");
            links.send_down(gpu.tensor(&shape, &gradient(t)).unwrap()).unwrap();
        }
    }
    println!("rank {rank}: rank checks passed");
}

/// A small run: ResNet-8 on 96 embedded images in batches of 32 (3 iterations an epoch),
/// evaluated on 32; the learning rate steps in the middle of the second epoch whatever
/// --epochs says, so a one-epoch run resumed for a second is the two-epoch run.
const SMALL: [&str; 13] = [
    "--depth",
    "8",
    "--train-subset",
    "96",
    "--test-subset",
    "32",
    "--batch-size",
    "32",
    "--schedule",
    "1.5",
    "--gammas",
    "0.1",
    "--quiet",
];

fn small_run(algo: &str, k: usize, epochs: usize) -> Vec<String> {
    let mut a: Vec<String> = ["train", "--algo", algo].iter().map(|s| s.to_string()).collect();
    a.extend(SMALL.iter().map(|s| s.to_string()));
    a.extend(["--splits".into(), k.to_string(), "--epochs".into(), epochs.to_string()]);
    a
}

/// A fresh directory for run `name`.
fn run_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("featreplay-mpi-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// `mpirun -np n featreplay <args>`: (success, stdout and stderr); a run past `limit` is
/// killed and fails the test (a hang).
fn mpirun_featreplay(n: usize, args: &[String], limit: Duration) -> (bool, String) {
    let child = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", &n.to_string()])
        .arg(env!("CARGO_BIN_EXE_featreplay"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun (install openmpi-bin)");
    let mut child = process::KillOnDrop(child);
    let start = Instant::now();
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            let mut text = String::new();
            use std::io::Read;
            child.0.stdout.take().unwrap().read_to_string(&mut text).unwrap();
            child.0.stderr.take().unwrap().read_to_string(&mut text).unwrap();
            return (status.success(), text);
        }
        assert!(start.elapsed() < limit, "mpirun -np {n} {args:?} did not finish within {limit:?} (a hang)");
        std::thread::sleep(Duration::from_millis(50));
    }
}

const LIMIT: Duration = Duration::from_secs(300);

fn mpi_train(n: usize, args: &[String], out: &Path) {
    let mut a = args.to_vec();
    a.extend(["--transport".into(), "mpi".into(), "--out".into(), out.display().to_string()]);
    let (ok, text) = mpirun_featreplay(n, &a, LIMIT);
    assert!(ok, "mpirun -np {n} {a:?} failed:\n{text}");
}

fn local_train(args: &[String], out: &Path) {
    let mut a = args.to_vec();
    a.extend(["--out".into(), out.display().to_string()]);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    process::succeeds(&a);
}

/// An epoch record without what depends on the machine and the processes (times, memory).
fn without_timing(mut v: serde_json::Value) -> serde_json::Value {
    if let Some(o) = v.as_object_mut() {
        for key in ["epoch_seconds", "images_per_second", "peak_memory_bytes"] {
            o.remove(key);
        }
    }
    v
}

fn records(v: &serde_json::Value) -> Vec<serde_json::Value> {
    v.as_array().cloned().unwrap_or_default().into_iter().map(without_timing).collect()
}

/// Asserts that runs `a` and `b` wrote the same checkpoint (every tensor, bit for bit, the
/// pipeline state, configuration and history) and the same metrics rows, times and memory
/// left out.
fn assert_same_run(a: &Path, b: &Path) {
    let ca = checkpoint::load(a).unwrap();
    let cb = checkpoint::load(b).unwrap();
    let names = |c: &checkpoint::Checkpoint| c.names().map(String::from).collect::<Vec<_>>();
    assert_eq!(names(&ca), names(&cb), "{} vs {}: tensor names", a.display(), b.display());
    for (x, y) in ca.tensors.iter().zip(&cb.tensors) {
        assert_eq!(x.shape, y.shape, "{}", x.name);
        let bits = |t: &checkpoint::NamedTensor| t.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert!(bits(x) == bits(y), "{}: tensor {} differs", a.display(), x.name);
    }
    assert_eq!(ca.int_tensors, cb.int_tensors, "{}: counters", a.display());
    assert_eq!((ca.meta.epoch, ca.meta.iteration), (cb.meta.epoch, cb.meta.iteration));
    // The layout places the ranks; it does not change what is computed.
    let config = |c: &checkpoint::Checkpoint| {
        let mut v = c.meta.config.clone();
        v.as_object_mut().unwrap().remove("layout");
        v
    };
    assert_eq!(config(&ca), config(&cb), "configuration");
    for key in ["pipeline", "data"] {
        assert_eq!(ca.meta.extra[key], cb.meta.extra[key], "{key}");
    }
    let history = |c: &checkpoint::Checkpoint| records(&c.meta.extra["history"]["epochs"]);
    assert_eq!(history(&ca), history(&cb), "checkpoint history");
    let rows = |d: &Path| {
        let text = std::fs::read_to_string(d.join("metrics.jsonl")).unwrap();
        text.lines().map(|l| without_timing(serde_json::from_str(l).unwrap())).collect::<Vec<_>>()
    };
    assert_eq!(rows(a), rows(b), "metrics.jsonl");
    assert_eq!(rows(a).len(), ca.meta.epoch);
}

/// `algo` over K = 2 and 3 processes equals the same run in one process.
fn same_as_one_process(algo: &str) {
    for k in [2, 3] {
        let args = small_run(algo, k, 2);
        let (m, s) = (run_dir(&format!("{algo}{k}-mpi")), run_dir(&format!("{algo}{k}-local")));
        mpi_train(k, &args, &m);
        local_train(&args, &s);
        assert_same_run(&m, &s);
        println!("{algo} K = {k}: the MPI run equals the one-process run");
        let _ = (std::fs::remove_dir_all(&m), std::fs::remove_dir_all(&s));
    }
}

#[test]
fn bp_over_processes_equals_one_process() {
    same_as_one_process("bp");
}

#[test]
fn fr_over_processes_equals_one_process() {
    same_as_one_process("fr");
}

#[test]
fn ddg_over_processes_equals_one_process() {
    same_as_one_process("ddg");
}

#[test]
fn dni_over_processes_equals_one_process() {
    same_as_one_process("dni");
}

/// A checkpoint written over MPI resumes in one process, and one written in one process
/// resumes over MPI, each exactly where the run would have been.
#[test]
fn checkpoints_resume_across_transports() {
    let whole = run_dir("fr-whole");
    local_train(&small_run("fr", 2, 2), &whole);

    let from_mpi = run_dir("fr-from-mpi");
    mpi_train(2, &small_run("fr", 2, 1), &from_mpi);
    let d = from_mpi.display().to_string();
    process::succeeds(&["train", "--resume", &d, "--epochs", "2", "--quiet"]);
    assert_same_run(&from_mpi, &whole);

    let to_mpi = run_dir("fr-to-mpi");
    local_train(&small_run("fr", 2, 1), &to_mpi);
    let d = to_mpi.display().to_string();
    let resume: Vec<String> = ["train", "--resume", &d, "--epochs", "2", "--quiet", "--transport", "mpi"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (ok, text) = mpirun_featreplay(2, &resume, LIMIT);
    assert!(ok, "{text}");
    assert_same_run(&to_mpi, &whole);
    for d in [whole, from_mpi, to_mpi] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// A failing rank ends every rank: mpirun exits non-zero, soon, with the rank and stage in
/// the error, and the last good checkpoint (epoch 1) stays.
#[test]
fn a_failing_rank_ends_the_run_without_a_hang() {
    let out = run_dir("fail");
    let mut args = small_run("fr", 2, 2);
    // Iteration 4 is in the second epoch (3 iterations an epoch).
    args.extend(["--inject-failure".into(), "1:4".into(), "--transport".into(), "mpi".into()]);
    args.extend(["--out".into(), out.display().to_string()]);
    let (ok, text) = mpirun_featreplay(2, &args, Duration::from_secs(120));
    assert!(!ok, "the run should fail: {text}");
    assert!(text.contains("featreplay: error: rank 1 (stage 1): "), "{text}");
    assert!(text.contains("injected failure in stage 1 at iteration 4"), "{text}");
    assert!(!text.contains("panicked"), "{text}");
    assert_eq!(checkpoint::load(&out).unwrap().meta.epoch, 1, "the last good checkpoint stays");
    let _ = std::fs::remove_dir_all(&out);
}

/// Any process count but one per stage is refused before any work, with one line.
#[test]
fn a_process_count_that_is_not_the_stage_count_is_refused() {
    let out = run_dir("count");
    let mut args = small_run("fr", 2, 1);
    args.extend(["--transport".into(), "mpi".into(), "--out".into(), out.display().to_string()]);
    let (ok, text) = mpirun_featreplay(3, &args, Duration::from_secs(120));
    assert!(!ok, "{text}");
    assert!(text.contains("need 2 processes, not 3"), "{text}");
    assert!(!out.join("checkpoint.safetensors").exists());
}

/// FR with K = 2 and R = 2 replicas for two epochs at a constant learning rate (the step is
/// placed after the run's end).
fn replicated_run() -> Vec<String> {
    let mut a = small_run("fr", 2, 2);
    let at = a.iter().position(|x| x == "--schedule").unwrap();
    a[at + 1] = "2".into();
    a.extend(["--replicas".into(), "2".into()]);
    a
}

/// The run `args` describe, simulated in this process: R pipelines on threads, replica r fed
/// shard r of every batch, each stage's gradients averaged through [`ThreadReducers`] (the
/// ordered sum). Returns replica 0's network after the run.
fn simulate_replicas(args: &[String]) -> Network {
    let (replicas, epochs) = (2, 2);
    let mut cfg = RunConfig::default_for(epochs);
    let value = |flag: &str| args[args.iter().position(|x| x == flag).unwrap() + 1].clone();
    cfg.dataset = "embedded".into();
    cfg.algo = value("--algo");
    cfg.depth = value("--depth").parse().unwrap();
    cfg.train_subset = Some(value("--train-subset").parse().unwrap());
    cfg.test_subset = Some(value("--test-subset").parse().unwrap());
    cfg.batch_size = value("--batch-size").parse().unwrap();
    cfg.splits = value("--splits").parse().unwrap();
    cfg.optim.schedule = vec![value("--schedule").parse().unwrap()];
    cfg.optim.gammas = vec![value("--gammas").parse().unwrap()];
    let p = run::prepare(&cfg).unwrap();
    let mut pipelines: Vec<(Network, PipelineState)> = (0..replicas)
        .map(|_| {
            let gpus = run::open_devices(&["auto".to_string()], cfg.splits).unwrap();
            let net = Network::new(p.spec.clone(), &p.ranges, &gpus, cfg.seed).unwrap();
            let st = PipelineState::new(cfg.method().unwrap(), &net, cfg.seed).unwrap();
            (net, st)
        })
        .collect();
    let reducers = ThreadReducers::new(cfg.splits, replicas);
    let sample: usize = p.spec.input.iter().product();
    for epoch in 0..epochs {
        let batches: Vec<HostBatch> = Loader::new(p.train.clone(), p.norm.clone(), cfg.train_loader(), epoch as u64)
            .unwrap()
            .map(|b| HostBatch { images: b.images, labels: b.labels })
            .collect();
        let n = batches.len();
        let lr = cfg.optim.lr_at(pipelines[0].1.iteration, n);
        assert_eq!(cfg.optim.next_change(pipelines[0].1.iteration, n).map(|i| i >= (epochs * n) as u64), Some(true));
        std::thread::scope(|scope| {
            for (r, (net, st)) in pipelines.iter_mut().enumerate() {
                let shards: Vec<HostBatch> = batches
                    .iter()
                    .map(|b| {
                        let m = b.labels.len() / replicas;
                        HostBatch {
                            images: b.images[r * m * sample..(r + 1) * m * sample].to_vec(),
                            labels: b.labels[r * m..(r + 1) * m].to_vec(),
                        }
                    })
                    .collect();
                let (optim, reducers) = (&cfg.optim, &reducers);
                scope.spawn(move || {
                    let opts = EpochOptions { thread_replicas: Some((reducers, r)), ..EpochOptions::new(optim, lr) };
                    schedule::run_epoch(net, st, shards.into_iter(), n, &opts).unwrap();
                });
            }
        });
    }
    pipelines.swap_remove(0).0
}

/// Two replicas over four processes train exactly as the in-process simulation of two
/// replicas with the same ordered sum; the stage-major layout changes nothing.
#[test]
fn replicas_over_processes_equal_the_in_process_simulation() {
    let args = replicated_run();
    let (pm, sm) = (run_dir("replicas-pipeline-major"), run_dir("replicas-stage-major"));
    mpi_train(4, &args, &pm);
    let mut stage_major = args.clone();
    stage_major.extend(["--layout".into(), "stage-major".into()]);
    mpi_train(4, &stage_major, &sm);
    assert_same_run(&pm, &sm);

    let net = simulate_replicas(&args);
    let ck = checkpoint::load(&pm).unwrap();
    let state = net.state();
    assert!(!state.is_empty());
    for (name, t) in state {
        let saved = ck.get(&name).unwrap_or_else(|| panic!("{name} not in the checkpoint"));
        assert_eq!(saved.shape, t.shape(), "{name}");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(bits(&saved.data) == bits(&t.to_vec().unwrap()), "{name} differs from the simulation");
    }
    for (name, c) in net.counter_state() {
        let saved = ck.int_tensors.iter().find(|t| t.name == name).unwrap();
        assert_eq!(saved.data, vec![c.load(std::sync::atomic::Ordering::Relaxed) as i64], "{name}");
    }
    for d in [pm, sm] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// MPI_Allreduce sums in its own order: the run works and its replicas stay identical (the
/// epoch-end check), though its bits may differ from the ordered sum's.
#[test]
fn replicas_with_mpi_allreduce_train_and_stay_identical() {
    let out = run_dir("replicas-allreduce-mpi");
    let mut args = replicated_run();
    args.extend(["--allreduce".into(), "mpi".into()]);
    mpi_train(4, &args, &out);
    let ck = checkpoint::load(&out).unwrap();
    assert_eq!(ck.meta.epoch, 2);
    assert_eq!(ck.meta.config["allreduce"], "mpi");
    let _ = std::fs::remove_dir_all(&out);
}

/// `compare --transport mpi` runs the methods at one K over the processes, and each of its
/// runs is the run `train` makes.
#[test]
fn compare_over_processes_runs_each_method_as_train_does() {
    let out = run_dir("compare");
    let mut args: Vec<String> =
        ["compare", "--methods", "bp,fr", "--k", "2", "--epochs", "1"].map(String::from).to_vec();
    args.extend(SMALL.iter().map(|s| s.to_string()));
    args.extend(["--transport".into(), "mpi".into(), "--out".into(), out.display().to_string()]);
    let (ok, text) = mpirun_featreplay(2, &args, LIMIT);
    assert!(ok, "{text}");
    assert!(out.join("summary.md").exists(), "{text}");
    let local = run_dir("compare-fr-local");
    local_train(&small_run("fr", 2, 1), &local);
    assert_same_run(&out.join("fr-k2"), &local);
    let mut wrong = args.clone();
    let at = wrong.iter().position(|a| a == "--k").unwrap();
    wrong[at + 1] = "2,3".into();
    let (ok, text) = mpirun_featreplay(2, &wrong, LIMIT);
    assert!(!ok && text.contains("compares the methods at one K"), "{text}");
    for d in [out, local] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// `eval --transport mpi` splits the model over the processes, one stage each, and
/// measures what one process measures.
#[test]
fn eval_over_processes_equals_one_process() {
    let dir = run_dir("eval");
    local_train(&small_run("fr", 2, 1), &dir);
    let d = dir.display().to_string();
    let one = process::succeeds(&["eval", &d, "--test-subset", "all", "--batch-size", "128"]);
    assert!(one.contains("(1000 images)"), "{one}");
    for n in [2, 3] {
        let args: Vec<String> = ["eval", &d, "--test-subset", "all", "--batch-size", "128", "--transport", "mpi"]
            .map(String::from)
            .to_vec();
        let (ok, text) = mpirun_featreplay(n, &args, LIMIT);
        assert!(ok, "{text}");
        assert_eq!(text.trim(), one.trim(), "eval over {n} processes");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
