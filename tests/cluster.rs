//! The pieces of a run over processes that need no MPI: where each stage of each replica
//! runs, the replicas' ordered mean and its in-process reducers, and the epoch-end check
//! that a stage's replicas hold the same weights (against a stand-in cluster).

mod common;

use std::sync::Mutex;

use common::pipeline::{devices, resnet8};
use featreplay::error::Error;
use featreplay::pipeline::cluster::{ordered_mean, Cluster, GradientReducer, Layout, ThreadReducers, Topology};
use featreplay::pipeline::link::StageLinks;
use featreplay::train::stage_state::{check_replicas, weights_hash};
use featreplay::train::Network;
use featreplay::Gpu;

#[test]
fn every_rank_runs_one_stage_of_one_replica_in_either_layout() {
    for layout in [Layout::PipelineMajor, Layout::StageMajor] {
        let t = Topology { stages: 3, replicas: 2, layout };
        let mut seen = vec![false; t.size()];
        for k in 0..3 {
            for r in 0..2 {
                let rank = t.rank(k, r);
                assert_eq!(t.place(rank), (k, r), "{layout}");
                assert!(!seen[rank], "{layout}: rank {rank} twice");
                seen[rank] = true;
            }
        }
    }
    let t = Topology { stages: 3, replicas: 2, layout: Layout::PipelineMajor };
    assert_eq!((0..3).map(|k| t.rank(k, 1)).collect::<Vec<_>>(), [3, 4, 5], "a pipeline on consecutive ranks");
    let t = Topology { layout: Layout::StageMajor, ..t };
    assert_eq!((0..2).map(|r| t.rank(2, r)).collect::<Vec<_>>(), [4, 5], "a stage's replicas on consecutive ranks");
}

/// The mean is the replicas' sum in replica order times 1/R, every reducer the same bits.
#[test]
fn thread_reducers_give_every_replica_the_ordered_mean() {
    let grads: Vec<Vec<f32>> =
        (0..3).map(|r| (0..1000).map(|i| ((i * 7 + r * 13) % 101) as f32 * 0.137 - 3.1).collect()).collect();
    let mut want = grads[0].clone();
    for g in &grads[1..] {
        for (w, v) in want.iter_mut().zip(g) {
            *w += v;
        }
    }
    let inv = 1.0f32 / 3.0;
    want.iter_mut().for_each(|w| *w *= inv);
    let mut by_function = grads[0].clone();
    ordered_mean(&mut by_function, grads[1..].iter().cloned(), 3);
    assert_eq!(by_function, want);

    let group = ThreadReducers::new(2, 3);
    let results: Vec<Vec<f32>> = std::thread::scope(|s| {
        let handles: Vec<_> = grads
            .iter()
            .enumerate()
            .map(|(r, g)| {
                let mut reducer = group.reducer(1, r);
                let mut g = g.clone();
                s.spawn(move || {
                    // Two updates in a row: the second must not see the first's gradients.
                    reducer.average(&mut g).unwrap();
                    let mut again = vec![r as f32; 4];
                    reducer.average(&mut again).unwrap();
                    assert_eq!(again, vec![1.0; 4], "replica {r}: (0 + 1 + 2) / 3");
                    g
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (r, got) in results.iter().enumerate() {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(got), bits(&want), "replica {r}");
    }
}

/// Rank 0 of a stage with two replicas: the other replica's weight hash arrives (as from
/// a real cluster) and is compared with its own.
struct StandIn {
    replica_hash: Vec<u8>,
    received: Mutex<usize>,
}

impl Cluster for StandIn {
    fn topology(&self) -> Topology {
        Topology { stages: 1, replicas: 2, layout: Layout::PipelineMajor }
    }
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        2
    }
    fn local_rank(&self) -> usize {
        0
    }
    fn local_size(&self) -> usize {
        2
    }
    fn stage_links(&self, _gpu: &Gpu) -> Box<dyn StageLinks> {
        unreachable!("no training here")
    }
    fn reducer(&self) -> Option<Box<dyn GradientReducer>> {
        None
    }
    fn send_state(&self, _to: usize, _bytes: Vec<u8>) -> featreplay::Result<()> {
        unreachable!("replica 0 only receives")
    }
    fn receive_state(&self, from: usize) -> featreplay::Result<Vec<u8>> {
        assert_eq!(from, 1, "replica 1 of stage 0 is rank 1");
        *self.received.lock().unwrap() += 1;
        Ok(self.replica_hash.clone())
    }
}

#[test]
fn replicas_whose_weights_differ_stop_the_run() {
    let spec = resnet8();
    let gpus = devices(1);
    let whole = vec![0..spec.layers.len(); 1];
    let net = Network::new(spec.clone(), &whole, &gpus, 7).unwrap();
    let same = StandIn { replica_hash: weights_hash(&net, 0).unwrap().into_bytes(), received: Mutex::new(0) };
    check_replicas(&same, &net, 3).unwrap();
    assert_eq!(*same.received.lock().unwrap(), 1);

    // Another seed: other weights, another hash.
    let other = Network::new(spec.clone(), &whole, &gpus, 8).unwrap();
    let differs = StandIn { replica_hash: weights_hash(&other, 0).unwrap().into_bytes(), received: Mutex::new(0) };
    match check_replicas(&differs, &net, 3) {
        Err(e @ Error::ReplicasDiffer { stage: 0, replica: 1, epoch: 3 }) => {
            assert_eq!(e.to_string(), "stage 0: replica 1's weights differ from replica 0's after epoch 3")
        }
        other => panic!("expected ReplicasDiffer, got {other:?}"),
    }
}
