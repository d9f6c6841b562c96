//! [`StageLinks`] between processes over MPI (feature `mpi`): stage k of a pipeline runs on
//! one rank and talks to the ranks of stages k - 1 and k + 1.
//!
//! - **Sends are non-blocking**, from one buffer per link: a send waits for the link's
//!   previous send to complete before it starts (the in-process channel's capacity of 1),
//!   then returns at once. A blocking send-then-receive exchange deadlocks once messages pass
//!   MPI's eager limit (measured: 4 MiB messages hang, 1 KiB ones do not), which FR's
//!   features-up / gradient-down traffic would hit.
//! - **Receives block**, sized by a matched probe; messages on one link arrive in the order
//!   they were sent (MPI's no-overtaking rule for one source, tag and communicator).
//! - **One thread**: every MPI call of a rank is made on the thread that owns its links
//!   (communicators are neither `Send` nor `Sync`), so MPI_THREAD_SERIALIZED suffices.
//!
//! A message is little-endian `u32` words: a header (the tensor's rank and dimensions, for
//! features also `parts` and the label count, then the labels) followed by the f32 values.

use std::time::Instant;

use mpi::collective::{CommunicatorCollectives, SystemOperation};
use mpi::point_to_point::{Destination, MatchedReceiveVec, Source};
use mpi::request::{Request, StaticScope};
use mpi::topology::{Color, Communicator, Rank, SimpleCommunicator};

use super::cluster::{ordered_mean, scale_mean, Allreduce, Cluster, GradientReducer, Topology};
use super::link::{stopped, Features, StageLinks};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};

/// Tag of features going up.
const TAG_UP: i32 = 1;
/// Tag of gradients going down.
const TAG_DOWN: i32 = 2;
/// Tag of a stage's state sent to rank 0 at an epoch's end.
const TAG_STATE: i32 = 3;
/// Tag of gradients being averaged over a stage's replicas.
const TAG_REDUCE: i32 = 4;

/// A send in flight and the buffer it reads, which must outlive it.
struct PendingSend {
    request: Request<'static, [u8], StaticScope>,
}

impl PendingSend {
    fn start(comm: &SimpleCommunicator, to: Rank, tag: i32, bytes: Vec<u8>) -> PendingSend {
        // The buffer is leaked for the send's life and freed by `wait`: a request on a
        // buffer that is reused or freed before the send completes would send garbage.
        let buffer: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        PendingSend { request: comm.process_at_rank(to).immediate_send_with_tag(StaticScope, buffer, tag) }
    }

    /// Waits for the send to complete and frees its buffer.
    fn wait(self) {
        let buffer = self.request.wait_for_data();
        // SAFETY: `buffer` was leaked from a `Box<[u8]>` in `start`, and the completed send
        // holds no reference to it any more, so it is rebuilt and dropped exactly once.
        drop(unsafe { Box::from_raw(buffer as *const [u8] as *mut [u8]) });
    }
}

/// Stage `stage`'s links on rank `rank` of `comm`, to the ranks of the stages below and
/// above (None at the pipeline's ends).
pub struct MpiLinks {
    comm: SimpleCommunicator,
    stage: usize,
    gpu: Gpu,
    below: Option<Rank>,
    above: Option<Rank>,
    /// The previous send on each link, completed before the link sends again.
    up_send: Option<PendingSend>,
    down_send: Option<PendingSend>,
    stats: LinkStats,
}

/// Where a stage's link time goes, logged (level info) when the links close.
#[derive(Debug, Default)]
struct LinkStats {
    sends: u64,
    bytes: u64,
    /// Reading the (computed) tensor back from the device, encoding it and starting the
    /// send, with the wait for the link's previous send.
    send_s: f64,
    receives: u64,
    /// Waiting for a message to arrive (the neighbour is still computing).
    wait_s: f64,
    /// Receiving an arrived message, decoding it and uploading it to the device.
    receive_s: f64,
}

impl MpiLinks {
    /// The links of stage `stage` whose tensors live on `gpu`, talking to ranks `below` and
    /// `above` of the world communicator. Call on the thread that will use them.
    pub fn new(stage: usize, gpu: Gpu, below: Option<Rank>, above: Option<Rank>) -> MpiLinks {
        MpiLinks {
            comm: SimpleCommunicator::world(),
            stage,
            gpu,
            below,
            above,
            up_send: None,
            down_send: None,
            stats: LinkStats::default(),
        }
    }

    fn receive(&mut self, from: Rank, tag: i32) -> Vec<u32> {
        let t0 = Instant::now();
        let probed = self.comm.process_at_rank(from).matched_probe_with_tag(tag);
        let t1 = Instant::now();
        let (bytes, _) = probed.matched_receive_vec::<u8>();
        self.stats.receives += 1;
        self.stats.wait_s += (t1 - t0).as_secs_f64();
        self.stats.receive_s += t1.elapsed().as_secs_f64();
        bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }

    /// Sends `words` on the link whose previous send is `slot` (up or down).
    fn send(&mut self, up: bool, to: Rank, words: Vec<u32>, started: Instant) {
        let (slot, tag) = if up { (&mut self.up_send, TAG_UP) } else { (&mut self.down_send, TAG_DOWN) };
        self.stats.sends += 1;
        self.stats.bytes += 4 * words.len() as u64;
        send_after(slot, &self.comm, to, tag, words);
        self.stats.send_s += started.elapsed().as_secs_f64();
    }

    fn bad(&self, detail: String) -> Error {
        Error::Schedule { detail: format!("stage {}: a malformed message: {detail}", self.stage) }
    }

    /// Reads a tensor (rank, dims, values) at `words[at..]`, uploads it to this stage's device.
    fn tensor_at(&self, words: &[u32], at: usize) -> Result<Tensor> {
        let rank = *words.get(at).ok_or_else(|| self.bad("no tensor rank".into()))? as usize;
        let dims: Vec<usize> = words
            .get(at + 1..at + 1 + rank)
            .ok_or_else(|| self.bad("short shape".into()))?
            .iter()
            .map(|&d| d as usize)
            .collect();
        let values: Vec<f32> = words[at + 1 + rank..].iter().map(|&w| f32::from_bits(w)).collect();
        if values.len() != dims.iter().product::<usize>() {
            return Err(self.bad(format!("{} values for shape {dims:?}", values.len())));
        }
        self.gpu.tensor(&dims, &values)
    }
}

/// Appends a tensor's rank, dimensions and values (read back from its device) to `words`.
fn push_tensor(words: &mut Vec<u32>, t: &Tensor) -> Result<()> {
    words.push(t.shape().len() as u32);
    words.extend(t.shape().iter().map(|&d| d as u32));
    words.extend(t.to_vec()?.into_iter().map(f32::to_bits));
    Ok(())
}

/// Starts sending `words` on a link once the link's previous send (`slot`) has completed.
fn send_after(slot: &mut Option<PendingSend>, comm: &SimpleCommunicator, to: Rank, tag: i32, words: Vec<u32>) {
    if let Some(previous) = slot.take() {
        previous.wait();
    }
    let bytes = words.into_iter().flat_map(u32::to_le_bytes).collect();
    *slot = Some(PendingSend::start(comm, to, tag, bytes));
}

impl StageLinks for MpiLinks {
    fn has_above(&self) -> bool {
        self.above.is_some()
    }

    fn has_below(&self) -> bool {
        self.below.is_some()
    }

    fn send_up(&mut self, f: Features) -> Result<()> {
        // The device finishes computing the tensor first: that wait is the stage's compute,
        // not the link's.
        f.h.gpu().sync()?;
        let started = Instant::now();
        let to = self.above.ok_or_else(|| stopped(self.stage, "no stage above"))?;
        let mut words = vec![f.parts as u32, f.labels.len() as u32];
        words.extend(&f.labels);
        push_tensor(&mut words, &f.h)?;
        self.send(true, to, words, started);
        Ok(())
    }

    fn receive_up(&mut self) -> Result<Features> {
        let from = self.below.ok_or_else(|| stopped(self.stage, "no input"))?;
        let words = self.receive(from, TAG_UP);
        let started = Instant::now();
        let (parts, n) = match words.as_slice() {
            [p, n, ..] => (*p as usize, *n as usize),
            _ => return Err(self.bad("no features header".into())),
        };
        let labels = words.get(2..2 + n).ok_or_else(|| self.bad("short labels".into()))?.to_vec();
        let h = self.tensor_at(&words, 2 + n)?;
        self.stats.receive_s += started.elapsed().as_secs_f64();
        Ok(Features { h, labels, parts })
    }

    fn send_down(&mut self, g: Tensor) -> Result<()> {
        g.gpu().sync()?;
        let started = Instant::now();
        let to = self.below.ok_or_else(|| stopped(self.stage, "no stage below"))?;
        let mut words = Vec::new();
        push_tensor(&mut words, &g)?;
        self.send(false, to, words, started);
        Ok(())
    }

    fn receive_down(&mut self) -> Result<Tensor> {
        let from = self.above.ok_or_else(|| stopped(self.stage, "no gradient source"))?;
        let words = self.receive(from, TAG_DOWN);
        let started = Instant::now();
        let g = self.tensor_at(&words, 0);
        self.stats.receive_s += started.elapsed().as_secs_f64();
        g
    }
}

impl Drop for MpiLinks {
    /// Sends still in flight complete before their buffers go (the receiver takes them).
    fn drop(&mut self) {
        for s in [self.up_send.take(), self.down_send.take()].into_iter().flatten() {
            s.wait();
        }
        let s = &self.stats;
        log::info!(
            "stage {} links: {} sends ({:.1} MB) in {:.3} s; {} receives: {:.3} s waiting, {:.3} s receiving",
            self.stage,
            s.sends,
            s.bytes as f64 / 1e6,
            s.send_s,
            s.receives,
            s.wait_s,
            s.receive_s
        );
    }
}

/// This process's rank and the world's size, from MPI (initialised by the caller).
pub fn world_rank_and_size() -> (usize, usize) {
    let world = SimpleCommunicator::world();
    (world.rank() as usize, world.size() as usize)
}

/// The world communicator as a [`Cluster`] of `topology`'s shape. It holds no
/// communicator (they cannot cross threads): each call takes the world's, and a reducer
/// makes its own on its worker's thread.
pub struct MpiCluster {
    topology: Topology,
    allreduce: Allreduce,
    rank: usize,
    size: usize,
    local_rank: usize,
    local_size: usize,
}

impl MpiCluster {
    /// The world of an initialised MPI as a run of `topology`'s shape. Collective: every
    /// rank calls it at the same point (finding the node-local rank splits the world by
    /// shared memory). The world's size is checked by the run, not here.
    pub fn new(topology: Topology, allreduce: Allreduce) -> MpiCluster {
        let world = SimpleCommunicator::world();
        let local = world.split_shared(world.rank());
        MpiCluster {
            topology,
            allreduce,
            rank: world.rank() as usize,
            size: world.size() as usize,
            local_rank: local.rank() as usize,
            local_size: local.size() as usize,
        }
    }

    /// Ends every rank of the run with `code` (a failing rank calls this, so that the others,
    /// which may be waiting for its messages, do not wait forever; rsmpi issue 197).
    pub fn abort(&self, code: i32) -> ! {
        SimpleCommunicator::world().abort(code)
    }
}

impl Cluster for MpiCluster {
    fn topology(&self) -> Topology {
        self.topology
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn local_rank(&self) -> usize {
        self.local_rank
    }

    fn local_size(&self) -> usize {
        self.local_size
    }

    fn stage_links(&self, gpu: &Gpu) -> Box<dyn StageLinks> {
        let (stage, replica) = self.place();
        let t = self.topology;
        let below = (stage > 0).then(|| t.rank(stage - 1, replica) as Rank);
        let above = (stage + 1 < t.stages).then(|| t.rank(stage + 1, replica) as Rank);
        Box::new(MpiLinks::new(stage, gpu.clone(), below, above))
    }

    fn reducer(&self) -> Option<Box<dyn GradientReducer>> {
        let t = self.topology;
        if t.replicas == 1 {
            return None;
        }
        let (stage, replica) = self.place();
        let world = SimpleCommunicator::world();
        Some(match self.allreduce {
            Allreduce::Ordered => {
                let ranks = (0..t.replicas).map(|r| t.rank(stage, r) as Rank).collect();
                Box::new(OrderedReducer { world, ranks, replica })
            }
            Allreduce::Mpi => {
                // Collective over the world: every rank makes its reducer at the same point.
                let comm = world.split_by_color(Color::with_value(stage as i32)).expect("every rank has a color");
                Box::new(MpiReducer { comm, replicas: t.replicas })
            }
        })
    }

    fn send_state(&self, to: usize, bytes: Vec<u8>) -> Result<()> {
        // Blocking: every receiver takes what it waits for in a fixed order, and nothing
        // else is in flight between two ranks at an epoch's end.
        SimpleCommunicator::world().process_at_rank(to as Rank).send_with_tag(&bytes[..], TAG_STATE);
        Ok(())
    }

    fn receive_state(&self, from: usize) -> Result<Vec<u8>> {
        let world = SimpleCommunicator::world();
        let (bytes, _) =
            world.process_at_rank(from as Rank).matched_probe_with_tag(TAG_STATE).matched_receive_vec::<u8>();
        Ok(bytes)
    }
}

/// [`Allreduce::Ordered`]: the stage's first replica receives the others' gradients in
/// replica order, takes their [`ordered_mean`] and sends it back to each.
struct OrderedReducer {
    world: SimpleCommunicator,
    /// The ranks of this stage's replicas, in replica order.
    ranks: Vec<Rank>,
    replica: usize,
}

impl GradientReducer for OrderedReducer {
    fn average(&mut self, grads: &mut [f32]) -> Result<()> {
        let receive = |from: Rank| -> Vec<f32> {
            let (v, _) =
                self.world.process_at_rank(from).matched_probe_with_tag(TAG_REDUCE).matched_receive_vec::<f32>();
            v
        };
        if self.replica == 0 {
            let others: Vec<Vec<f32>> = self.ranks[1..].iter().map(|&r| receive(r)).collect();
            if let Some(bad) = others.iter().find(|g| g.len() != grads.len()) {
                return Err(Error::Schedule {
                    detail: format!("a replica sent {} gradient values, not {}", bad.len(), grads.len()),
                });
            }
            ordered_mean(grads, others.into_iter(), self.ranks.len());
            for &r in &self.ranks[1..] {
                self.world.process_at_rank(r).send_with_tag(&grads[..], TAG_REDUCE);
            }
        } else {
            self.world.process_at_rank(self.ranks[0]).send_with_tag(&grads[..], TAG_REDUCE);
            let mean = receive(self.ranks[0]);
            if mean.len() != grads.len() {
                return Err(Error::Schedule {
                    detail: format!("{} mean gradient values, not {}", mean.len(), grads.len()),
                });
            }
            grads.copy_from_slice(&mean);
        }
        Ok(())
    }
}

/// [`Allreduce::Mpi`]: MPI_Allreduce over a communicator of the stage's replicas.
struct MpiReducer {
    comm: SimpleCommunicator,
    replicas: usize,
}

impl GradientReducer for MpiReducer {
    fn average(&mut self, grads: &mut [f32]) -> Result<()> {
        let mine = grads.to_vec();
        self.comm.all_reduce_into(&mine[..], grads, SystemOperation::sum());
        scale_mean(grads, self.replicas);
        Ok(())
    }
}
