//! The sufficient-direction measurement sigma_k = <g_k, g_BP_k> / ||g_BP_k||^2: exactly 1 for
//! backprop itself, about 1 for FR and DDG when the weights barely move (so the batch each
//! module's gradient belongs to is matched right), 0 for a zero-initialised DNI predictor, and
//! measuring changes nothing in the training trajectory of any method.

mod common;

use common::pipeline::{dni, host, method, optim, resnet8};
use featreplay::layers::predictor::PredictorConfig;
use featreplay::model::{split, SplitPolicy};
use featreplay::train::dni::DniModule;
use featreplay::train::schedule::{self, EpochOptions, HostBatch, PipelineState};
use featreplay::train::{sigma, Network, OptimConfig};
use featreplay::Gpu;

/// Batches of 8 (more samples per batch than elsewhere, so gradients of different batches
/// differ clearly).
fn batches(n: usize, seed: u64) -> Vec<HostBatch> {
    host(&common::pipeline::batches_of(n, 8, seed)).collect()
}

/// Three devices shared by every test here (lavapipe compiles each pipeline once per
/// device; these tests check numbers, not memory, so sharing is harmless).
fn devices(k: usize) -> Vec<Gpu> {
    static DEVICES: std::sync::OnceLock<Vec<Gpu>> = std::sync::OnceLock::new();
    DEVICES.get_or_init(|| (0..3).map(|_| Gpu::open_default().unwrap()).collect())[..k].to_vec()
}

fn network(k: usize, seed: u64) -> Network {
    let spec = resnet8();
    let ranges = split(&spec, k, SplitPolicy::Even).unwrap();
    Network::new(spec, &ranges, &devices(k), seed).unwrap()
}

#[test]
fn sigma_is_one_for_backprop_itself() {
    let mut net = network(2, 1);
    let data = batches(3, 7);
    let opt = optim();
    for b in &data[..2] {
        net.bp_step(&b.images, &b.labels, &opt, opt.lr).unwrap();
    }
    let s = sigma::measure_bp(&mut net, &data[2]).unwrap();
    assert_eq!(s.len(), 2);
    for (k, v) in s.iter().enumerate() {
        assert!((v - 1.0).abs() < 1e-12, "stage {k}: sigma {v} for backprop against itself");
    }
    // The measurement can tell batches apart: another batch's gradient is not the same
    // direction.
    let a = sigma::bp_gradients(&mut net, &data[0]).unwrap();
    let b = sigma::bp_gradients(&mut net, &data[1]).unwrap();
    for k in 0..2 {
        let v = sigma::sigma(&a[k], &b[k]);
        assert!(v < 0.9, "stage {k}: two batches' gradients agree too well ({v}) for the checks below to mean much");
    }
}

#[test]
fn fr_and_ddg_sigma_is_one_when_the_weights_barely_move() {
    // With a learning rate of 1e-6 the stale parts of FR and DDG barely differ from the
    // current weights, so sigma is 1 up to O(lr): only if every module's gradient is
    // compared with backprop on the batch it really belongs to (t - d_k).
    let opt = OptimConfig { lr: 1e-6, weight_decay: 0.0, schedule: vec![], gammas: vec![], ..OptimConfig::paper(1) };
    for method in [method("fr"), method("ddg")] {
        let mut net = network(3, 2);
        let mut state = PipelineState::new(method.clone(), &net, 2).unwrap();
        let data = batches(5, 11);
        schedule::run_epoch(&mut net, &mut state, data.into_iter(), 5, &EpochOptions::new(&opt, opt.lr)).unwrap();
        let s = sigma::measure(&mut net, &mut state).unwrap();
        for (k, v) in s.iter().enumerate() {
            assert!((v - 1.0).abs() < 1e-3, "{method:?} stage {k}: sigma {v}");
        }
    }
}

#[test]
fn dni_sigma_is_zero_for_an_untrained_predictor_and_nan_during_warm_up() {
    let opt = optim();
    let mut net = network(3, 3);
    let mut state = PipelineState::new(dni(PredictorConfig::default()), &net, 3).unwrap();
    let s = sigma::measure(&mut net, &mut state).unwrap();
    assert!(s.iter().all(|v| v.is_nan()), "nothing to measure before the first batch: {s:?}");
    let mid = EpochOptions { end_of_epoch: false, ..EpochOptions::new(&opt, opt.lr) };
    schedule::run_epoch(&mut net, &mut state, batches(1, 5).into_iter(), 1, &mid).unwrap();
    let s = sigma::measure(&mut net, &mut state).unwrap();
    assert_eq!(&s[..2], &[0.0, 0.0], "a zero predictor predicts a zero gradient: {s:?}");
    assert!((s[2] - 1.0).abs() < 1e-6, "the last module gets the true gradient: {s:?}");
}

/// Every state tensor of the network and, for DNI, of the predictors.
fn snapshot(net: &Network, state: &PipelineState) -> Vec<(String, Vec<f32>)> {
    let mut out: Vec<(String, Vec<f32>)> = net.state().into_iter().map(|(n, t)| (n, t.to_vec().unwrap())).collect();
    for k in 0..state.stages.len() {
        if let Some(p) = state.module::<DniModule>(k).and_then(|m| m.predictor.as_ref()) {
            for p in p.params() {
                out.push((format!("{k}.{}", p.name), p.value.to_vec().unwrap()));
                out.push((format!("{k}.m.{}", p.name), p.momentum.to_vec().unwrap()));
            }
        }
    }
    out
}

#[test]
fn measuring_sigma_leaves_every_method_on_the_same_trajectory() {
    let opt = optim();
    for method in [method("fr"), method("ddg"), dni(PredictorConfig { depth: 2, width: 4 })] {
        let data = batches(6, 40);
        let mut plain = network(3, 4);
        let mut plain_state = PipelineState::new(method.clone(), &plain, 4).unwrap();
        let m1 = schedule::run_epoch(
            &mut plain,
            &mut plain_state,
            data.clone().into_iter(),
            6,
            &EpochOptions::new(&opt, opt.lr),
        )
        .unwrap();

        let mut measured = network(3, 4);
        let mut st = PipelineState::new(method.clone(), &measured, 4).unwrap();
        let mut losses = Vec::new();
        for (i, chunk) in data.chunks(2).enumerate() {
            let opts = EpochOptions { end_of_epoch: i == 2, ..EpochOptions::new(&opt, opt.lr) };
            let m = schedule::run_epoch(&mut measured, &mut st, chunk.iter().cloned(), 2, &opts).unwrap();
            losses.push(m.loss);
            let s = sigma::measure(&mut measured, &mut st).unwrap();
            assert!(s.iter().skip(1).all(|v| v.is_finite()), "{method:?} after chunk {i}: {s:?}");
        }
        let mean = losses.iter().sum::<f64>() / 3.0;
        assert!((mean - m1.loss).abs() < 1e-5 * m1.loss.abs().max(1.0), "{method:?}: loss {mean} vs {}", m1.loss);
        let a = snapshot(&plain, &plain_state);
        let b = snapshot(&measured, &st);
        assert_eq!(a.len(), b.len());
        for ((na, va), (nb, vb)) in a.iter().zip(&b) {
            assert_eq!(na, nb);
            assert_eq!(va, vb, "{method:?}: {na} differs when sigma is measured");
        }
    }
}
