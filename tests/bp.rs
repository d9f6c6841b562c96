//! Backprop training: a whole ResNet-8 forward and backward against a candle model built
//! from the same weights, several SGD iterations following candle's trajectory, and
//! model-parallel BP over K devices equal to single-device BP bit for bit.

mod common;

use std::collections::HashMap;

use candle_core::Var;
use common::reference::{cross_entropy, resnet_forward, vars};
use common::*;
use featreplay::model::resnet::{build, ResNetConfig};
use featreplay::model::{split, ModelSpec, SplitPolicy};
use featreplay::train::{Network, OptimConfig};
use featreplay::Gpu;

fn resnet8(input: usize, classes: usize) -> ModelSpec {
    build(&ResNetConfig::basic(8, &[3, input, input], classes)).unwrap()
}

fn host_state(net: &Network) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    net.state().into_iter().map(|(n, t)| (n, t.shape().to_vec(), t.to_vec().unwrap())).collect()
}

/// Asserts two networks hold bit-identical state, tensor by tensor (sorted by name: the
/// per-stage grouping differs between splits).
fn assert_same_state(a: &Network, b: &Network, when: &str) {
    let (mut sa, mut sb) = (host_state(a), host_state(b));
    sa.sort_by(|x, y| x.0.cmp(&y.0));
    sb.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(sa.len(), sb.len(), "{when}: tensor count");
    for ((na, shape_a, va), (nb, shape_b, vb)) in sa.iter().zip(&sb) {
        assert_eq!((na, shape_a), (nb, shape_b), "{when}");
        assert!(va == vb, "{when}: {na} differs");
    }
}

fn optim() -> OptimConfig {
    OptimConfig::constant(0.05)
}

fn batch(seed: u64, n: usize, input: usize, classes: usize) -> (Vec<f32>, Vec<u32>) {
    let x = random(n * 3 * input * input, seed);
    let y = random(n, seed + 1).iter().map(|v| ((v + 1.0) * 0.5 * classes as f32) as u32 % classes as u32).collect();
    (x, y)
}

#[test]
fn model_parallel_bp_equals_single_device_bp_exactly() {
    let spec = resnet8(8, 5);
    let mut one =
        Network::new(spec.clone(), &split(&spec, 1, SplitPolicy::Even).unwrap(), &[gpu().clone()], 7).unwrap();
    // Three devices from one adapter: a stage each.
    let gpus: Vec<Gpu> = (0..3).map(|_| Gpu::open_default().unwrap()).collect();
    let mut three = Network::new(spec.clone(), &split(&spec, 3, SplitPolicy::Even).unwrap(), &gpus, 7).unwrap();
    assert_same_state(&one, &three, "initial weights (same seed whatever the split)");
    let opt = optim();
    for it in 0..4 {
        let (x, y) = batch(100 + it, 4, 8, 5);
        let a = one.bp_step(&x, &y, &opt, opt.lr).unwrap().loss.to_vec().unwrap();
        let b = three.bp_step(&x, &y, &opt, opt.lr).unwrap().loss.to_vec().unwrap();
        assert_eq!(a, b, "iteration {it} loss");
    }
    assert_same_state(&one, &three, "after 4 iterations");
}

#[test]
fn resnet8_matches_candle_forward_backward_and_sgd_trajectory() {
    let (input, classes, n) = (8, 6, 5);
    let spec = resnet8(input, classes);
    let mut net =
        Network::new(spec.clone(), &split(&spec, 1, SplitPolicy::Even).unwrap(), &[gpu().clone()], 3).unwrap();
    let opt = optim();
    let state = host_state(&net);
    let is_param = |n: &str| !n.starts_with("optimizer.") && !n.contains("running_");
    let mut params: HashMap<String, (Vec<usize>, Vec<f32>)> =
        state.iter().filter(|(n, _, _)| is_param(n)).map(|(n, s, d)| (n.clone(), (s.clone(), d.clone()))).collect();
    let mut momentum: HashMap<String, Vec<f32>> = HashMap::new();
    let mut running: HashMap<String, Vec<f32>> =
        state.iter().filter(|(n, _, _)| n.contains("running_")).map(|(n, _, d)| (n.clone(), d.clone())).collect();
    // Tolerances: one iteration chains ~10 reductions (convolutions over 9*64 terms, batch
    // norms over n*h*w values, the loss over the batch) whose f32 round-off (sum_atol of
    // each) compounds multiplicatively through the layers; we allow 1e-3 relative plus an
    // absolute floor of 5e-5 on values of order 1 (gradients are O(0.1)). Parameters after
    // SGD inherit lr times the gradient error.
    let (rtol, atol) = (1e-3, 5e-5);
    for it in 0..3u64 {
        let (x, y) = batch(200 + it, n, input, classes);
        let lr = opt.lr;
        let out = net.bp_step(&x, &y, &opt, lr).unwrap();

        // candle: the same step from the same weights.
        let list: Vec<(String, Vec<usize>, Vec<f32>)> =
            params.iter().map(|(k, (s, d))| (k.clone(), s.clone(), d.clone())).collect();
        let vs: HashMap<String, Var> = vars(&list);
        let (logits, stats) = resnet_forward(&spec, &vs, &ct(&x, &[n, 3, input, input]));
        let loss = cross_entropy(&logits, &y);
        let grads = loss.backward().unwrap();
        assert_close(&format!("iteration {it} loss"), &out.loss.to_vec().unwrap(), &cvec(&loss), rtol, atol);

        let gpu_params: HashMap<String, (Vec<f32>, Vec<f32>)> = net.stages[0]
            .params()
            .iter()
            .map(|p| (p.name.clone(), (p.grad.to_vec().unwrap(), p.value.to_vec().unwrap())))
            .collect();
        let mut names: Vec<&String> = params.keys().collect();
        names.sort();
        let mut updated = HashMap::new();
        for name in names {
            let (shape, w) = &params[name];
            let g = cvec(grads.get(vs[name].as_tensor()).unwrap());
            let (gpu_grad, gpu_value) = &gpu_params[name];
            assert_close(&format!("iteration {it} grad {name}"), gpu_grad, &g, rtol, atol);
            // PyTorch SGD, Nesterov, weight decay, first step initialises the buffer.
            let d: Vec<f32> = g.iter().zip(w).map(|(g, w)| g + opt.weight_decay * w).collect();
            let buf: Vec<f32> = match momentum.get(name) {
                None => d.clone(),
                Some(b) => b.iter().zip(&d).map(|(b, d)| opt.momentum * b + d).collect(),
            };
            let new_w: Vec<f32> =
                w.iter().zip(&d).zip(&buf).map(|((w, d), b)| w - lr * (d + opt.momentum * b)).collect();
            assert_close(&format!("iteration {it} weight {name}"), gpu_value, &new_w, rtol, atol);
            momentum.insert(name.clone(), buf);
            updated.insert(name.clone(), (shape.clone(), new_w));
        }
        params = updated;
        for (bn, mean, var) in stats {
            for (suffix, stat) in [("running_mean", mean), ("running_var", var)] {
                let key = format!("{bn}.{suffix}");
                let r = running.get_mut(&key).unwrap();
                for (r, s) in r.iter_mut().zip(&stat) {
                    *r = 0.9 * *r + 0.1 * s;
                }
            }
        }
        let now = host_state(&net);
        for (name, _, v) in now.iter().filter(|(n, _, _)| n.contains("running_")) {
            assert_close(&format!("iteration {it} {name}"), v, &running[name], rtol, atol);
        }
    }
}
