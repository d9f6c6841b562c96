//! Decoupled Greedy Learning: with one module it is backprop bit for bit; with two and
//! three, every module's and every auxiliary head's weights follow a candle computation of
//! their local loss gradients on the same inputs (tests/common/fr_sim.rs, written from the
//! spec); and nothing flows down (no gradient is ever pending).

mod common;

use common::assert_close;
use common::fr_sim::{simulate_dgl, BnUpdate, FrSimConfig, HostTensor};
use common::pipeline::{batches_of, devices, host, method, optim, resnet8};
use featreplay::model::{split, SplitPolicy};
use featreplay::train::dgl::{AuxConfig, DglModule};
use featreplay::train::method::{by_name, MethodOptions};
use featreplay::train::schedule::{self, EpochOptions, PipelineState};
use featreplay::train::Network;

fn host_state(ts: Vec<(String, featreplay::gpu::Tensor)>) -> Vec<HostTensor> {
    ts.into_iter().map(|(n, t)| (n, t.shape().to_vec(), t.to_vec().unwrap())).collect()
}

/// A head's state as the simulation takes it: parameters, running statistics, momentum.
fn head_state(m: &DglModule) -> Vec<HostTensor> {
    let h = m.head.as_ref().unwrap();
    let mut out: Vec<HostTensor> = Vec::new();
    for p in h.params() {
        out.push((p.name.clone(), p.value.shape().to_vec(), p.value.to_vec().unwrap()));
    }
    for (n, t) in h.buffers() {
        out.push((n, t.shape().to_vec(), t.to_vec().unwrap()));
    }
    for p in h.params() {
        out.push((format!("optimizer.momentum.{}", p.name), p.momentum.shape().to_vec(), p.momentum.to_vec().unwrap()));
    }
    out
}

#[test]
fn dgl_with_one_module_is_backprop_bit_for_bit() {
    let spec = resnet8();
    let ranges = split(&spec, 1, SplitPolicy::Even).unwrap();
    let data = batches_of(3, 6, 21);
    let opt = optim();
    let mut bp = Network::new(spec.clone(), &ranges, &devices(1), 4).unwrap();
    for (x, y) in &data {
        bp.bp_step(x, y, &opt, opt.lr).unwrap();
    }
    let mut net = Network::new(spec, &ranges, &devices(1), 4).unwrap();
    let mut st = PipelineState::new(method("dgl"), &net, 4).unwrap();
    schedule::run_epoch(&mut net, &mut st, host(&data), 3, &EpochOptions::new(&opt, opt.lr)).unwrap();
    for ((na, _, va), (nb, _, vb)) in host_state(net.state()).iter().zip(&host_state(bp.state())) {
        assert_eq!(na, nb);
        assert!(va == vb, "{na} differs from backprop");
    }
}

fn check_local_gradients(k: usize, aux: AuxConfig) {
    let spec = resnet8();
    let ranges = split(&spec, k, SplitPolicy::Even).unwrap();
    let mut net = Network::new(spec.clone(), &ranges, &devices(k), 13).unwrap();
    let init = host_state(net.state());
    let method = by_name("dgl", &MethodOptions { dgl: aux, ..MethodOptions::default() }).unwrap();
    let mut st = PipelineState::new(method, &net, 13).unwrap();
    let heads: Vec<_> = (0..k - 1)
        .map(|i| {
            let m = st.module::<DglModule>(i).unwrap();
            let features = spec.input_of(ranges[i].end).unwrap();
            (aux.head(i, &features, spec.classes), head_state(m))
        })
        .collect();
    let data = batches_of(4, 6, 31);
    let opt = optim();
    // Two calls: the epoch boundary changes nothing (nothing is in flight).
    schedule::run_epoch(&mut net, &mut st, host(&data[..2]), 2, &EpochOptions::new(&opt, opt.lr)).unwrap();
    schedule::run_epoch(&mut net, &mut st, host(&data[2..]), 2, &EpochOptions::new(&opt, opt.lr)).unwrap();
    assert!(st.stages.iter().all(|s| s.pending_grad.is_none()), "DGL sends no gradient down");
    let cfg = FrSimConfig {
        lr: opt.lr,
        momentum: opt.momentum,
        weight_decay: opt.weight_decay,
        nesterov: opt.nesterov,
        bn_update: BnUpdate::Play,
    };
    let (want, want_heads) = simulate_dgl(&spec, &ranges, &init, &heads, &data, &cfg);
    let got: std::collections::HashMap<String, Vec<f32>> =
        host_state(net.state()).into_iter().map(|(n, _, d)| (n, d)).collect();
    for (name, _, w) in &want {
        assert_close(&format!("K={k} {name} after 4 iterations"), &got[name], w, 2e-3, 1e-4);
    }
    for (i, want) in want_heads.iter().enumerate() {
        let got: std::collections::HashMap<String, Vec<f32>> =
            head_state(st.module::<DglModule>(i).unwrap()).into_iter().map(|(n, _, d)| (n, d)).collect();
        for (name, _, w) in want {
            assert_close(&format!("K={k} head {i} {name} after 4 iterations"), &got[name], w, 2e-3, 1e-4);
        }
    }
}

#[test]
fn every_module_follows_its_local_loss_two_modules() {
    check_local_gradients(2, AuxConfig::default());
}

#[test]
fn every_module_follows_its_local_loss_three_modules_narrow_heads() {
    check_local_gradients(3, AuxConfig { depth: 2, width: 4 });
}
