//! A run spread over processes (ranks): R replicas of a K-stage pipeline, one stage of one
//! replica per rank. Each rank talks to its pipeline neighbours through [`StageLinks`],
//! averages its stage's gradients with the same stage of the other replicas through a
//! [`GradientReducer`] before each update, and at every epoch's end sends what rank 0 needs
//! (its stage's state from replica 0, the training metrics from the last stages) to rank 0,
//! which evaluates, checkpoints and logs for the whole run. The MPI implementation is
//! [`super::mpi::MpiCluster`] (feature `mpi`).

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Barrier, Mutex};

use serde::{Deserialize, Serialize};

use super::link::StageLinks;
use crate::error::Result;
use crate::gpu::Gpu;

/// Where stage k of replica r runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// rank = r * K + k: a whole pipeline on consecutive ranks (so on one machine when the
    /// hosts are filled in order): the features between stages, the larger traffic on CIFAR
    /// ResNets (8 MiB at batch 128 against a stage's parameters), stay local.
    #[default]
    PipelineMajor,
    /// rank = k * R + r: a stage's replicas on consecutive ranks (their gradient averaging
    /// stays local).
    StageMajor,
}

impl FromStr for Layout {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "pipeline-major" => Ok(Layout::PipelineMajor),
            "stage-major" => Ok(Layout::StageMajor),
            _ => Err(format!("--layout {s}: choose pipeline-major or stage-major")),
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Layout::PipelineMajor => "pipeline-major",
            Layout::StageMajor => "stage-major",
        })
    }
}

/// How a stage's gradients are summed over its replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Allreduce {
    /// Gathered on the stage's first replica and summed in replica order, then sent back:
    /// the same bits on every run and every machine count.
    #[default]
    Ordered,
    /// MPI_Allreduce: faster, but its summation order is the library's (measured: not rank
    /// order), so runs are not bit-reproducible.
    Mpi,
}

impl FromStr for Allreduce {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "ordered" => Ok(Allreduce::Ordered),
            "mpi" => Ok(Allreduce::Mpi),
            _ => Err(format!("--allreduce {s}: choose ordered or mpi")),
        }
    }
}

impl fmt::Display for Allreduce {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Allreduce::Ordered => "ordered",
            Allreduce::Mpi => "mpi",
        })
    }
}

/// The shape of a run over processes: K stages, R replicas, and where each runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    pub stages: usize,
    pub replicas: usize,
    pub layout: Layout,
}

impl Topology {
    /// Processes the run needs: K x R.
    pub fn size(&self) -> usize {
        self.stages * self.replicas
    }

    /// The rank of stage `stage` of replica `replica`.
    pub fn rank(&self, stage: usize, replica: usize) -> usize {
        match self.layout {
            Layout::PipelineMajor => replica * self.stages + stage,
            Layout::StageMajor => stage * self.replicas + replica,
        }
    }

    /// (stage, replica) of rank `rank`.
    pub fn place(&self, rank: usize) -> (usize, usize) {
        match self.layout {
            Layout::PipelineMajor => (rank % self.stages, rank / self.stages),
            Layout::StageMajor => (rank / self.replicas, rank % self.replicas),
        }
    }
}

/// Averages a stage's gradients over its replicas (each replica's worker holds one, made on
/// its own thread).
pub trait GradientReducer {
    /// Replaces `grads` (this replica's, all of the stage's parameters end to end) by the
    /// replicas' mean: their sum in replica order times 1/R.
    fn average(&mut self, grads: &mut [f32]) -> Result<()>;
}

/// The mean [`GradientReducer::average`] defines, of the replicas' gradients in replica
/// order (one place for the arithmetic every reducer must match).
pub fn ordered_mean(sum: &mut [f32], others: impl Iterator<Item = Vec<f32>>, replicas: usize) {
    for g in others {
        for (s, v) in sum.iter_mut().zip(g) {
            *s += v;
        }
    }
    scale_mean(sum, replicas);
}

/// Turns a sum over `replicas` into the mean.
pub fn scale_mean(sum: &mut [f32], replicas: usize) {
    let inv = 1.0 / replicas as f32;
    for s in sum.iter_mut() {
        *s *= inv;
    }
}

/// The processes of a run, as one of them sees them.
pub trait Cluster: Sync {
    /// The run's shape.
    fn topology(&self) -> Topology;
    /// This process's rank.
    fn rank(&self) -> usize;
    /// How many processes the run has.
    fn size(&self) -> usize;
    /// This process's rank among the processes of its machine (it picks the `--device`).
    fn local_rank(&self) -> usize;
    /// How many of the run's processes share this machine (they share a CPU adapter's cores).
    fn local_size(&self) -> usize;
    /// (stage, replica) this process runs.
    fn place(&self) -> (usize, usize) {
        self.topology().place(self.rank())
    }
    /// The links of this process's stage on `gpu`, made on the calling thread, which must
    /// be the only one to use them.
    fn stage_links(&self, gpu: &Gpu) -> Box<dyn StageLinks>;
    /// The averaging of this stage's gradients with its other replicas (None with one
    /// replica), made on the calling thread as [`Self::stage_links`]. Collective: every
    /// rank makes its reducer at the same point.
    fn reducer(&self) -> Option<Box<dyn GradientReducer>>;
    /// Sends bytes (a stage's state, a weight hash) to rank `to`; returns once they may be
    /// dropped.
    fn send_state(&self, to: usize, bytes: Vec<u8>) -> Result<()>;
    /// The next bytes [`Self::send_state`] sent from rank `from`, waited for.
    fn receive_state(&self, from: usize) -> Result<Vec<u8>>;
}

/// Each replica's gradients of the current update, and a barrier of R.
type ReplicaSlots = (Mutex<Vec<Vec<f32>>>, Barrier);

/// Replicas as threads of one process: the reducers of one stage's R replicas share their
/// gradients through memory and each takes the same [`ordered_mean`] ([`Allreduce::Ordered`]'s
/// bits). Tests simulate a run of several replicas with it.
#[derive(Clone)]
pub struct ThreadReducers {
    /// Per stage: each replica's gradients of the current update, and a barrier of R.
    stages: Vec<Arc<ReplicaSlots>>,
    replicas: usize,
}

impl ThreadReducers {
    /// The reducers of `stages` stages of `replicas` replicas.
    pub fn new(stages: usize, replicas: usize) -> ThreadReducers {
        let group =
            || std::sync::Arc::new((std::sync::Mutex::new(vec![vec![]; replicas]), std::sync::Barrier::new(replicas)));
        ThreadReducers { stages: (0..stages).map(|_| group()).collect(), replicas }
    }

    /// The reducer of stage `stage` of replica `replica`.
    pub fn reducer(&self, stage: usize, replica: usize) -> Box<dyn GradientReducer + Send> {
        Box::new(ThreadReducer { group: self.stages[stage].clone(), replica, replicas: self.replicas })
    }
}

struct ThreadReducer {
    group: Arc<ReplicaSlots>,
    replica: usize,
    replicas: usize,
}

impl GradientReducer for ThreadReducer {
    fn average(&mut self, grads: &mut [f32]) -> Result<()> {
        let (slots, barrier) = &*self.group;
        let lock =
            || slots.lock().map_err(|_| crate::error::Error::Schedule { detail: "a replica thread panicked".into() });
        lock()?[self.replica] = grads.to_vec();
        barrier.wait();
        {
            let all = lock()?;
            grads.copy_from_slice(&all[0]);
            ordered_mean(grads, all[1..].iter().cloned(), self.replicas);
        }
        // Nobody writes the next update's gradients before everyone has read these.
        barrier.wait();
        Ok(())
    }
}
