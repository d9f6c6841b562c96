//! GPipe (micro-batch pipelining): with one micro-batch it is model-parallel backprop bit for
//! bit; with four (of uneven sizes) it equals a candle simulation of the summed, scaled
//! micro-batch gradients with per-micro-batch batch norm; and the model-parallel BP method
//! on the pipeline equals the host-driven `Network::bp_step` bit for bit.

mod common;

use common::assert_close;
use common::fr_sim::{simulate_gpipe, BnUpdate, FrSimConfig};
use common::pipeline::{batches_of, devices, host, optim, resnet8};
use featreplay::model::{split, SplitPolicy};
use featreplay::train::gpipe::{bubble_fraction, micro_batch_sizes};
use featreplay::train::method::{by_name, MethodOptions};
use featreplay::train::schedule::{self, EpochOptions, PipelineState};
use featreplay::train::Network;

type State = Vec<(String, Vec<f32>)>;

fn state(net: &Network) -> State {
    let mut s: State = net.state().into_iter().map(|(n, t)| (n, t.to_vec().unwrap())).collect();
    s.sort_by(|a, b| a.0.cmp(&b.0));
    s
}

fn assert_same(a: &State, b: &State, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: tensor count");
    for ((na, va), (nb, vb)) in a.iter().zip(b) {
        assert_eq!(na, nb, "{what}");
        assert!(va == vb, "{what}: {na} differs");
    }
}

/// `name` with `microbatches` on a fresh ResNet-8 over `k` devices, 4 batches of 6 (two
/// calls, so an epoch boundary is crossed), against `bp_step` on another fresh copy.
fn equals_bp_step(name: &str, microbatches: usize, k: usize) {
    let spec = resnet8();
    let ranges = split(&spec, k, SplitPolicy::Even).unwrap();
    let data = batches_of(4, 6, 70);
    let opt = optim();
    let mut reference = Network::new(spec.clone(), &ranges, &devices(k), 5).unwrap();
    for (x, y) in &data {
        reference.bp_step(x, y, &opt, opt.lr).unwrap();
    }
    let mut net = Network::new(spec, &ranges, &devices(k), 5).unwrap();
    let method = by_name(name, &MethodOptions { microbatches, ..MethodOptions::default() }).unwrap();
    let mut st = PipelineState::new(method, &net, 5).unwrap();
    schedule::run_epoch(&mut net, &mut st, host(&data[..2]), 2, &EpochOptions::new(&opt, opt.lr)).unwrap();
    schedule::run_epoch(&mut net, &mut st, host(&data[2..]), 2, &EpochOptions::new(&opt, opt.lr)).unwrap();
    assert_same(&state(&net), &state(&reference), &format!("{name} M={microbatches} K={k} after 4 iterations"));
}

#[test]
fn gpipe_with_one_microbatch_is_model_parallel_backprop_bit_for_bit() {
    equals_bp_step("gpipe", 1, 2);
    equals_bp_step("gpipe", 1, 3);
}

#[test]
fn the_bp_method_on_the_pipeline_is_bp_step_bit_for_bit() {
    equals_bp_step("bp", 1, 1);
    equals_bp_step("bp", 1, 3);
}

#[test]
fn gpipe_with_four_microbatches_matches_the_candle_simulation() {
    for k in [1, 2, 3] {
        let spec = resnet8();
        let ranges = split(&spec, k, SplitPolicy::Even).unwrap();
        let mut net = Network::new(spec.clone(), &ranges, &devices(k), 8).unwrap();
        let init: Vec<(String, Vec<usize>, Vec<f32>)> =
            net.state().into_iter().map(|(n, t)| (n, t.shape().to_vec(), t.to_vec().unwrap())).collect();
        // Batches of 10: micro-batches of 3, 3, 2 and 2.
        let data = batches_of(3, 10, 90);
        let opt = optim();
        let method = by_name("gpipe", &MethodOptions { microbatches: 4, ..MethodOptions::default() }).unwrap();
        let mut st = PipelineState::new(method, &net, 8).unwrap();
        let m = schedule::run_epoch(&mut net, &mut st, host(&data), 3, &EpochOptions::new(&opt, opt.lr)).unwrap();
        assert!(m.loss.is_finite() && m.samples == 30, "{m:?}");
        let cfg = FrSimConfig {
            lr: opt.lr,
            momentum: opt.momentum,
            weight_decay: opt.weight_decay,
            nesterov: opt.nesterov,
            bn_update: BnUpdate::Play,
        };
        let want = simulate_gpipe(&spec, &init, &data, |n| micro_batch_sizes(n, 4), &cfg);
        let got: std::collections::HashMap<String, Vec<f32>> =
            net.state().into_iter().map(|(n, t)| (n, t.to_vec().unwrap())).collect();
        assert_eq!(got.len(), want.len());
        // Tolerance as tests/fr.rs: a few ResNet-8 steps compounded through SGD.
        for (name, _, w) in &want {
            let g = got.get(name).unwrap_or_else(|| panic!("GPU state lacks {name}"));
            assert_close(&format!("K={k} {name} after 3 iterations"), g, w, 2e-3, 1e-4);
        }
        // Per-micro-batch batch norm is not whole-batch backprop.
        let sim_bp = common::fr_sim::simulate_bp(&spec, &init, &data, &cfg);
        let differs = sim_bp.iter().zip(&want).any(|(a, b)| a.2.iter().zip(&b.2).any(|(x, y)| (x - y).abs() > 1e-4));
        assert!(differs, "four micro-batches gave whole-batch backprop's numbers");
        // Each BN layer was updated once per micro-batch.
        let counter = net.counter_state()[0].1.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(counter, 12, "K={k}: 3 batches of 4 micro-batches");
    }
}

#[test]
fn micro_batches_and_the_bubble() {
    assert_eq!(micro_batch_sizes(10, 4), vec![3, 3, 2, 2]);
    assert_eq!(micro_batch_sizes(128, 4), vec![32; 4]);
    assert_eq!(micro_batch_sizes(2, 4), vec![1, 1], "never an empty micro-batch");
    assert_eq!(micro_batch_sizes(5, 1), vec![5]);
    assert!((bubble_fraction(4, 4) - 3.0 / 7.0).abs() < 1e-12);
    assert_eq!(bubble_fraction(1, 8), 0.0);
}
