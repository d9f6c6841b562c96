//! DNI (synthetic gradients): the gradient predictor learns, a zero-initialised predictor
//! leaves its module's weights unchanged at the first step apart from weight decay, and the
//! pipeline keeps one prediction in flight per module.

mod common;

use common::pipeline::{devices, host, optim, resnet8};
use common::*;
use featreplay::layers::predictor::{GradientPredictor, PredictorConfig};
use featreplay::model::{split, SplitPolicy};
use featreplay::train::dni::DniModule;
use featreplay::train::schedule::{self, EpochOptions, HostBatch, PipelineState};
use featreplay::train::{Network, OptimConfig};

fn batches(n: usize, seed: u64) -> Vec<HostBatch> {
    host(&common::pipeline::batches(n, seed)).collect()
}

#[test]
fn the_predictor_learns_a_fixed_target() {
    let g = gpu();
    // Features [N, C, H, W] and a true gradient at the 1/N scale of a batch-mean loss.
    let (n, c, hw) = (4, 8, 6);
    let h = g.tensor(&[n, c, hw, hw], &random(n * c * hw * hw, 3)).unwrap();
    let delta: Vec<f32> = random(n * c * hw * hw, 4).iter().map(|v| v / n as f32).collect();
    let delta = g.tensor(&[n, c, hw, hw], &delta).unwrap();
    let mut p = GradientPredictor::new(g, "m", &[c, hw, hw], &PredictorConfig::default(), 1).unwrap();
    let sgd = OptimConfig { lr: 0.1, ..OptimConfig::paper(1) }.sgd(0.1);
    let mut losses = Vec::new();
    for step in 0..40 {
        let (pred, acts) = p.forward(&h).unwrap();
        losses.push(GradientPredictor::loss(&pred, &delta).unwrap());
        let d = GradientPredictor::loss_gradient(&pred, &delta).unwrap();
        p.backward(&acts, &d).unwrap();
        for q in p.params() {
            q.sgd_step(&sgd, step == 0).unwrap();
        }
    }
    // A zero prediction first: the loss is half the mean square of N * delta.
    let dv = delta.to_vec().unwrap();
    let target_norm: f64 = dv.iter().map(|d| 0.5 * (n as f64 * *d as f64).powi(2)).sum::<f64>() / dv.len() as f64;
    assert!((losses[0] - target_norm).abs() < 1e-4 * target_norm, "first loss {} vs {target_norm}", losses[0]);
    let last = *losses.last().unwrap();
    assert!(losses.iter().all(|l| l.is_finite()), "losses {losses:?}");
    assert!(last < 0.6 * losses[0], "the predictor's loss falls: {losses:?}");
    assert!(losses.windows(2).all(|w| w[1] < w[0]), "and falls at every step on a fixed input: {losses:?}");
}

#[test]
fn a_zero_initialised_predictor_moves_its_module_only_by_weight_decay_at_the_first_step() {
    let spec = resnet8();
    let ranges = split(&spec, 2, SplitPolicy::Even).unwrap();
    let gpus = devices(2);
    let mut net = Network::new(spec, &ranges, &gpus, 5).unwrap();
    let before: Vec<Vec<f32>> = net.stages[0].params().iter().map(|p| p.value.to_vec().unwrap()).collect();
    let top_before: Vec<Vec<f32>> = net.stages[1].params().iter().map(|p| p.value.to_vec().unwrap()).collect();
    let mut state = PipelineState::new(common::pipeline::dni(PredictorConfig::default()), &net, 5).unwrap();
    let opt = optim();
    schedule::run_epoch(&mut net, &mut state, batches(1, 9).into_iter(), 1, &EpochOptions::new(&opt, opt.lr)).unwrap();
    // First SGD step (PyTorch, Nesterov): buf = d = g + wd * w; w -= lr * (d + m * buf) with
    // g = 0: w * (1 - lr * wd * (1 + m)).
    let f = 1.0 - opt.lr * opt.weight_decay * (1.0 + opt.momentum);
    for (p, w0) in net.stages[0].params().iter().zip(&before) {
        let want: Vec<f32> = w0.iter().map(|w| w * f).collect();
        assert_close(&format!("{} after one DNI step", p.name), &p.value.to_vec().unwrap(), &want, 1e-6, 1e-7);
    }
    // The last module got a real gradient.
    let moved = net.stages[1]
        .params()
        .iter()
        .zip(&top_before)
        .any(|(p, w0)| p.value.to_vec().unwrap().iter().zip(w0).any(|(a, b)| (a - b * f).abs() > 1e-5));
    assert!(moved, "the last module learns from the loss");
    // The predictor was trained on the true gradient at the end of the epoch, so it is no
    // longer zero and nothing is in flight.
    let st = state.module::<DniModule>(0).unwrap();
    assert!(st.prediction.is_none() && state.stages[0].pending_grad.is_none());
    assert_eq!(st.predictor_steps, 1);
    let out_w = st.predictor.as_ref().unwrap().params().last().unwrap().value.to_vec().unwrap();
    assert!(out_w.iter().any(|v| *v != 0.0), "the predictor's output layer learned");
}

#[test]
fn dni_trains_every_module_and_keeps_one_prediction_in_flight_within_an_epoch() {
    let spec = resnet8();
    let ranges = split(&spec, 3, SplitPolicy::Even).unwrap();
    let gpus = devices(3);
    let mut net = Network::new(spec, &ranges, &gpus, 6).unwrap();
    let mut state = PipelineState::new(common::pipeline::dni(PredictorConfig { depth: 2, width: 4 }), &net, 6).unwrap();
    let opt = optim();
    let data = batches(6, 30);
    let mid = EpochOptions { end_of_epoch: false, ..EpochOptions::new(&opt, opt.lr) };
    let m = schedule::run_epoch(&mut net, &mut state, data[..3].iter().cloned(), 3, &mid).unwrap();
    assert!(m.loss.is_finite());
    for k in 0..2 {
        let st = state.module::<DniModule>(k).unwrap();
        assert!(
            st.prediction.is_some() && state.stages[k].pending_grad.is_some(),
            "stage {k} holds its last prediction and gradient"
        );
        assert_eq!(st.predictor_steps, 2, "stage {k}: predictor trained on the first two true gradients");
    }
    schedule::run_epoch(&mut net, &mut state, data[3..].iter().cloned(), 3, &EpochOptions::new(&opt, opt.lr)).unwrap();
    for k in 0..2 {
        assert_eq!(
            state.module::<DniModule>(k).unwrap().predictor_steps,
            6,
            "stage {k}: one predictor step per iteration"
        );
        assert_eq!(state.stages[k].steps, 6);
        assert!(state.module::<DniModule>(k).unwrap().prediction.is_none());
    }
}
