//! A run spread over processes: each process (a rank) runs one stage of the pipeline, talks
//! to its neighbours through [`StageLinks`], and sends its stage's state to rank 0 at the end
//! of every epoch, which evaluates, checkpoints and logs for the whole run. The MPI
//! implementation is [`super::mpi::MpiCluster`] (feature `mpi`); tests may provide others.

use super::link::StageLinks;
use crate::error::Result;
use crate::gpu::Gpu;

/// The processes of a run, as one of them sees them. Stage k runs on rank k.
pub trait Cluster: Sync {
    /// This process's rank (the stage it runs).
    fn rank(&self) -> usize;
    /// How many processes the run has.
    fn size(&self) -> usize;
    /// This process's rank among the processes of its machine (it picks the `--device`).
    fn local_rank(&self) -> usize;
    /// The links of stage `stage` of `stages` on `gpu`, made on the calling thread, which
    /// must be the only one to use them.
    fn stage_links(&self, stage: usize, stages: usize, gpu: &Gpu) -> Box<dyn StageLinks>;
    /// Sends a stage's state (or any bytes) to rank `to`; returns once the bytes may be
    /// dropped.
    fn send_state(&self, to: usize, bytes: Vec<u8>) -> Result<()>;
    /// The next bytes [`Self::send_state`] sent from rank `from`, waited for.
    fn receive_state(&self, from: usize) -> Result<Vec<u8>>;
}
