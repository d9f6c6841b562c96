//! MPI links between processes (feature `mpi`; `cargo test --release --features mpi --test
//! mpi`, OpenMPI's `mpirun` on the PATH). The test starts itself under `mpirun -np 2`; each
//! rank then runs one stage's links and checks every message it receives.

#![cfg(feature = "mpi")]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
