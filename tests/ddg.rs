//! Delayed gradients (DDG) on a pipeline of devices: the weights equal a candle simulation of
//! the spec's schedule, and each module holds d_k whole graphs between iterations (d_k + 1
//! during a step), exactly, per the memory accounting.

mod common;

use common::fr_sim::{simulate_ddg, simulate_fr, BnUpdate, FrSimConfig};
use common::pipeline::*;
use common::*;
use featreplay::model::{split, SplitPolicy};
use featreplay::train::schedule::{self, EpochOptions, PipelineState};
use featreplay::train::Network;

fn check_against_simulation(k: usize) {
    let spec = resnet8();
    let ranges = split(&spec, k, SplitPolicy::Even).unwrap();
    let mut net = Network::new(spec.clone(), &ranges, &devices(k), 12).unwrap();
    let init: Vec<(String, Vec<usize>, Vec<f32>)> =
        net.state().into_iter().map(|(n, t)| (n, t.shape().to_vec(), t.to_vec().unwrap())).collect();
    let data = batches(7, 50);
    let opt = optim();
    let mut state = PipelineState::new(common::pipeline::method("ddg"), &net, 12).unwrap();
    schedule::run_epoch(&mut net, &mut state, host(&data[..4]), 4, &EpochOptions::new(&opt, opt.lr)).unwrap();
    schedule::run_epoch(&mut net, &mut state, host(&data[4..]), 3, &EpochOptions::new(&opt, opt.lr)).unwrap();
    let cfg = FrSimConfig {
        lr: opt.lr,
        momentum: opt.momentum,
        weight_decay: opt.weight_decay,
        nesterov: opt.nesterov,
        bn_update: BnUpdate::Play,
    };
    let want = simulate_ddg(&spec, &ranges, &init, &data, &cfg);
    let got: std::collections::HashMap<String, Vec<f32>> =
        net.state().into_iter().map(|(n, t)| (n, t.to_vec().unwrap())).collect();
    // Same tolerance as FR against its simulation (tests/fr.rs): 7 iterations of ResNet-8.
    for (name, _, w) in &want {
        let g = got.get(name).unwrap_or_else(|| panic!("GPU state lacks {name}"));
        assert_close(&format!("DDG K={k} {name} after 7 iterations"), g, w, 2e-3, 1e-4);
    }
    // DDG is neither backprop nor FR: stale weights in the backward make module 1 differ.
    let fr = simulate_fr(&spec, &ranges, &init, &data, &cfg);
    let first = &ranges_first_param(&net);
    let fr_first = &fr.iter().find(|(n, _, _)| n == first).unwrap().2;
    assert!(got[first].iter().zip(fr_first).any(|(a, b)| (a - b).abs() > 1e-4), "DDG equals FR: stale weights unused");
}

fn ranges_first_param(net: &Network) -> String {
    net.stages[0].params()[0].name.clone()
}

#[test]
fn ddg_two_modules_matches_the_spec_simulation() {
    check_against_simulation(2);
}

#[test]
fn ddg_three_modules_matches_the_spec_simulation() {
    check_against_simulation(3);
}

#[test]
fn ddg_stages_hold_their_delay_in_whole_graphs() {
    let spec = resnet8();
    let k = 3;
    let ranges = split(&spec, k, SplitPolicy::Even).unwrap();
    let gpus = devices(k);
    let mut net = Network::new(spec.clone(), &ranges, &gpus, 9).unwrap();
    // The device bytes of one activation set of each stage (its input included), measured
    // with the memory tracker on a batch of the same shape, and of one copy of its weights.
    let mut set_bytes = Vec::new();
    for s in 0..k {
        let stage = &net.stages[s];
        let mut shape = vec![4];
        shape.extend(spec.input_of(ranges[s].start).unwrap());
        let before = gpus[s].memory().live_tensor_bytes;
        let x = gpus[s].zeros(&shape).unwrap();
        let (out, acts) = stage.forward_train(&x, false).unwrap();
        drop((x, out));
        gpus[s].sync().unwrap();
        set_bytes.push(gpus[s].memory().live_tensor_bytes - before);
        drop(acts);
    }
    let weight_bytes: Vec<u64> = net.stages.iter().map(|s| s.weight_bytes()).collect();
    let baseline: Vec<u64> = gpus.iter().map(|g| g.memory().live_tensor_bytes).collect();
    let mut state = PipelineState::new(common::pipeline::method("ddg"), &net, 9).unwrap();
    let data = batches(6, 20);
    let opt = optim();
    for (e, chunk) in [&data[..1], &data[1..4], &data[4..]].iter().enumerate() {
        schedule::run_epoch(&mut net, &mut state, host(chunk), chunk.len(), &EpochOptions::new(&opt, opt.lr)).unwrap();
        let t = state.iteration;
        for s in 0..k {
            let d = (k - 1 - s) as u64;
            let held = t.min(d) as usize;
            assert_eq!(state.graph_counts()[s], held, "stage {s} after call {e}: graphs held");
            let out_bytes = 4
                * 4
                * spec.input_of(ranges[s].end.min(spec.layers.len() - 1)).unwrap().iter().product::<usize>() as u64;
            let pending = state.stages[s].pending_grad.is_some() as u64 * out_bytes;
            assert_eq!(
                gpus[s].memory().live_tensor_bytes,
                baseline[s] + held as u64 * (set_bytes[s] + weight_bytes[s]) + pending,
                "stage {s} after call {e}: live tensor bytes = {held} activation sets and weight copies"
            );
        }
    }
    // During a step a module holds one more graph: the peak of stage 0 covers d_0 + 1 sets.
    assert!(set_bytes[0] > 0);
    let peak = gpus[0].memory().peak_tensor_bytes;
    assert!(peak >= baseline[0] + 3 * (set_bytes[0] + weight_bytes[0]), "stage 0 peak {peak} holds d_0 + 1 = 3 graphs");
}
