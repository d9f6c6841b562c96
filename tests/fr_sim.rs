//! Tests of the CPU simulation of Features Replay (`common::fr_sim`), the oracle of the GPU
//! implementation: its building blocks against the candle reference, K = 1 against backprop,
//! and for K = 2, 3 the schedule's delays (warm-up, the first update of each module, the
//! batch each gradient belongs to) checked through properties that an off-by-one breaks.
//! Everything runs on the CPU (no GPU needed).

mod common;

use std::collections::HashMap;

use candle_core::{Tensor as CTensor, Var};
use common::fr_sim::*;
use common::reference::{cross_entropy, resnet_forward, vars};
use common::{ct, cvec};
use featreplay::model::resnet::{build, ResNetConfig};
use featreplay::model::{split, ModelSpec, SplitPolicy};

const INPUT: usize = 8;
const CLASSES: usize = 5;
const BATCH: usize = 4;

fn resnet8() -> ModelSpec {
    build(&ResNetConfig::basic(8, &[3, INPUT, INPUT], CLASSES)).unwrap()
}

fn batches(n: usize, seed: u64) -> Vec<(Vec<f32>, Vec<u32>)> {
    (0..n as u64)
        .map(|i| {
            let s = seed + 10 * i;
            let x = common::random(BATCH * 3 * INPUT * INPUT, s);
            let y = common::random(BATCH, s + 1)
                .iter()
                .map(|v| ((v + 1.0) * 0.5 * CLASSES as f32) as u32 % CLASSES as u32)
                .collect();
            (x, y)
        })
        .collect()
}

fn paper_cfg(bn_update: BnUpdate) -> FrSimConfig {
    FrSimConfig { lr: 0.05, momentum: 0.9, weight_decay: 5e-4, nesterov: true, bn_update }
}

fn as_map(state: &[HostTensor]) -> HashMap<String, Vec<f32>> {
    state.iter().map(|(n, _, d)| (n.clone(), d.clone())).collect()
}

fn params_and_buffers(spec: &ModelSpec, range: std::ops::Range<usize>) -> Vec<String> {
    let params = range_params(spec, range);
    params.iter().cloned().chain(params.iter().map(|p| format!("{MOMENTUM_PREFIX}{p}"))).collect()
}

fn running_names(spec: &ModelSpec, range: std::ops::Range<usize>) -> Vec<String> {
    range_state_names(spec, range).into_iter().filter(|n| n.contains(".running_")).collect()
}

/// Asserts `names` hold bit-identical values in `a` and `b`.
fn assert_same(a: &HashMap<String, Vec<f32>>, b: &HashMap<String, Vec<f32>>, names: &[String], what: &str) {
    assert!(!names.is_empty(), "{what}: nothing to compare");
    for n in names {
        assert!(a[n] == b[n], "{what}: {n} differs: {:?}... vs {:?}...", &a[n][..3], &b[n][..3]);
    }
}

/// Asserts every tensor of `names` differs from `init` in at least one element.
fn assert_all_moved(now: &HashMap<String, Vec<f32>>, init: &HashMap<String, Vec<f32>>, names: &[String], what: &str) {
    assert!(!names.is_empty(), "{what}: nothing to compare");
    for n in names {
        assert!(now[n] != init[n], "{what}: {n} is still at its initial value");
    }
}

#[test]
fn init_state_follows_the_naming_scheme() {
    let spec = resnet8();
    let state = init_state(&spec, 1);
    let names: Vec<&str> = state.iter().map(|(n, _, _)| n.as_str()).collect();
    for want in [
        "conv1.weight",
        "bn1.weight",
        "bn1.bias",
        "bn1.running_mean",
        "bn1.running_var",
        "layer1.0.conv1.weight",
        "layer1.0.bn1.weight",
        "layer1.0.bn1.running_var",
        "layer2.0.conv2.weight",
        "layer3.0.bn2.bias",
        "linear.weight",
        "linear.bias",
        "optimizer.momentum.conv1.weight",
        "optimizer.momentum.layer3.0.bn2.weight",
        "optimizer.momentum.linear.bias",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let m = as_map(&state);
    let shape = |n: &str| state.iter().find(|(k, _, _)| k == n).unwrap().1.clone();
    assert_eq!(shape("conv1.weight"), [16, 3, 3, 3]);
    assert_eq!(shape("layer2.0.conv1.weight"), [32, 16, 3, 3]);
    assert_eq!(shape("layer2.0.conv2.weight"), [32, 32, 3, 3]);
    assert_eq!(shape("linear.weight"), [CLASSES, 64]);
    assert_eq!(shape("linear.bias"), [CLASSES]);
    assert!(m["bn1.running_mean"].iter().all(|&v| v == 0.0) && m["bn1.running_var"].iter().all(|&v| v == 1.0));
    assert!(state
        .iter()
        .filter(|(n, _, _)| n.starts_with(MOMENTUM_PREFIX))
        .all(|(_, _, d)| d.iter().all(|&v| v == 0.0)));
    // Every parameter has its momentum buffer; 2 + 2 BN per block, 3 blocks, plus stem and fc.
    let params = range_params(&spec, 0..spec.layers.len());
    assert_eq!(params.len(), 3 + 3 * 6 + 2);
    assert_eq!(state.len(), params.len() * 2 + 2 * 7);
    assert_eq!(init_state(&spec, 1), state, "seeded");
    assert_ne!(init_state(&spec, 2), state);
}

#[test]
fn sgd_step_is_pytorch_sgd() {
    // w = 1, g = 0.5, wd = 0.1: d = 0.6. First step: buf = 0.6; Nesterov d = 0.6 + 0.9 * 0.6
    // = 1.14, w = 1 - 0.1 * 1.14 = 0.886. Second step with g = 0.5: d = 0.5 + 0.0886 =
    // 0.5886, buf = 0.54 + 0.5886 = 1.1286, d = 0.5886 + 1.01574 = 1.60434, w = 0.725566.
    let mut cfg = FrSimConfig { lr: 0.1, momentum: 0.9, weight_decay: 0.1, nesterov: true, bn_update: BnUpdate::Play };
    let (mut w, mut b) = (vec![1.0f32], vec![123.0f32]);
    sgd_step(&cfg, &mut w, &[0.5], &mut b, true);
    assert!((w[0] - 0.886).abs() < 1e-6 && (b[0] - 0.6).abs() < 1e-6, "{w:?} {b:?}");
    sgd_step(&cfg, &mut w, &[0.5], &mut b, false);
    assert!((w[0] - 0.725566).abs() < 1e-6 && (b[0] - 1.1286).abs() < 1e-6, "{w:?} {b:?}");
    // Plain momentum: the step is the buffer.
    cfg.nesterov = false;
    let (mut w, mut b) = (vec![1.0f32], vec![0.0f32]);
    sgd_step(&cfg, &mut w, &[0.5], &mut b, true);
    assert!((w[0] - 0.94).abs() < 1e-6, "{w:?}");
    sgd_step(&cfg, &mut w, &[0.5], &mut b, false);
    // d = 0.5 + 0.094 = 0.594, buf = 0.54 + 0.594 = 1.134, w = 0.94 - 0.1134
    assert!((w[0] - 0.8266).abs() < 1e-6 && (b[0] - 1.134).abs() < 1e-6, "{w:?} {b:?}");
}

#[test]
fn forward_range_composes_to_the_reference_forward() {
    let spec = resnet8();
    let init = init_state(&spec, 3);
    let (x, _) = &batches(1, 40)[0];
    let x = ct(x, &[BATCH, 3, INPUT, INPUT]);
    let vs = vars(&init);
    let tensors: HashMap<String, CTensor> = vs.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    let (want, want_stats) = resnet_forward(&spec, &vs, &x);
    let n = spec.layers.len();
    let (full, full_stats) = forward_range(&spec, 0..n, &tensors, &x);
    assert_eq!(cvec(&full), cvec(&want));
    assert_eq!(full_stats, want_stats);
    for k in 2..=4 {
        let ranges = split(&spec, k, SplitPolicy::Even).unwrap();
        let mut h = x.clone();
        let mut stats = Vec::new();
        for r in ranges {
            let (y, s) = forward_range(&spec, r, &tensors, &h);
            h = y;
            stats.extend(s);
        }
        assert_eq!(cvec(&h), cvec(&want), "K = {k}: composed forward");
        assert_eq!(stats, want_stats, "K = {k}: BN statistics");
    }
}

#[test]
fn k1_features_replay_is_backprop_exactly() {
    let spec = resnet8();
    let init = init_state(&spec, 5);
    let data = batches(4, 100);
    let ranges = split(&spec, 1, SplitPolicy::Even).unwrap();
    assert_eq!(ranges, vec![0..spec.layers.len()]);
    for bn in [BnUpdate::Play, BnUpdate::Replay, BnUpdate::Both] {
        let cfg = paper_cfg(bn);
        let fr = simulate_fr(&spec, &ranges, &init, &data, &cfg);
        let bp = simulate_bp(&spec, &init, &data, &cfg);
        assert_eq!(fr, bp, "{bn:?}");
        let names: Vec<String> = init.iter().map(|(n, _, _)| n.clone()).collect();
        assert_all_moved(&as_map(&fr), &as_map(&init), &names, "K = 1 after 4 iterations");
    }
}

#[test]
fn bp_step_matches_a_direct_candle_step() {
    // simulate_bp's first step, written out with the reference forward and the SGD formula.
    let spec = resnet8();
    let init = init_state(&spec, 6);
    let data = batches(1, 200);
    let cfg = paper_cfg(BnUpdate::Play);
    let got = as_map(&simulate_bp(&spec, &init, &data, &cfg));
    let vs = vars(&init);
    let (logits, stats) = resnet_forward(&spec, &vs, &ct(&data[0].0, &[BATCH, 3, INPUT, INPUT]));
    let grads = cross_entropy(&logits, &data[0].1).backward().unwrap();
    let init_map = as_map(&init);
    for p in range_params(&spec, 0..spec.layers.len()) {
        let g = cvec(grads.get(vs[&p].as_tensor()).unwrap());
        let w = &init_map[&p];
        let d: Vec<f32> = g.iter().zip(w).map(|(g, w)| g + cfg.weight_decay * w).collect();
        let want: Vec<f32> = w.iter().zip(&d).map(|(w, d)| w - cfg.lr * (d + cfg.momentum * d)).collect();
        assert_eq!(got[&p], want, "{p}");
        assert_eq!(got[&format!("{MOMENTUM_PREFIX}{p}")], d, "buffer of {p}");
    }
    for (bn, mean, var) in stats {
        let rm: Vec<f32> = mean.iter().map(|m| 0.9 * 0.0 + 0.1 * m).collect();
        let rv: Vec<f32> = var.iter().map(|v| 0.9 * 1.0 + 0.1 * v).collect();
        assert_eq!(got[&format!("{bn}.running_mean")], rm, "{bn}");
        assert_eq!(got[&format!("{bn}.running_var")], rv, "{bn}");
    }
}

#[test]
fn warm_up_keeps_module_k_at_init_for_d_k_iterations() {
    let spec = resnet8();
    let init = init_state(&spec, 7);
    let init_map = as_map(&init);
    let data = batches(4, 300);
    for k in [2usize, 3] {
        let ranges = split(&spec, k, SplitPolicy::Even).unwrap();
        assert_eq!(ranges.len(), k);
        for bn in [BnUpdate::Play, BnUpdate::Replay] {
            let cfg = paper_cfg(bn);
            for n in 1..=k + 1 {
                let now = as_map(&simulate_fr(&spec, &ranges, &init, &data[..n], &cfg));
                for (i, r) in ranges.iter().enumerate() {
                    let d = k - 1 - i;
                    let what = format!("K = {k}, {bn:?}, module {} (d = {d}) after {n} iterations", i + 1);
                    let trained = params_and_buffers(&spec, r.clone());
                    if n <= d {
                        assert_same(&now, &init_map, &trained, &what);
                    } else {
                        assert_all_moved(&now, &init_map, &trained, &what);
                    }
                    let running = running_names(&spec, r.clone());
                    if running.is_empty() {
                        continue;
                    }
                    // Play (and the last module's single forward) updates from iteration 0;
                    // Replay only from the first replay.
                    if bn == BnUpdate::Replay && n <= d {
                        assert_same(&now, &init_map, &running, &what);
                    } else {
                        assert_all_moved(&now, &init_map, &running, &what);
                    }
                }
            }
        }
    }
}

#[test]
fn first_update_of_module_k_is_the_bp_step_on_batch_0() {
    // Until module k's first replay (t = d_k) nothing below the modules above it has
    // changed their inputs and every module above replays batch 0 at its own first update, so
    // the gradient module k uses first is exactly backprop's gradient of batch 0 at init.
    let spec = resnet8();
    let init = init_state(&spec, 8);
    let data = batches(4, 400);
    for bn in [BnUpdate::Play, BnUpdate::Replay] {
        let cfg = paper_cfg(bn);
        let bp1 = as_map(&simulate_bp(&spec, &init, &data[..1], &cfg));
        let bp2 = as_map(&simulate_bp(&spec, &init, &data[..2], &cfg));
        for k in [2usize, 3] {
            let ranges = split(&spec, k, SplitPolicy::Even).unwrap();
            for (i, r) in ranges.iter().enumerate() {
                let d = k - 1 - i;
                let fr = as_map(&simulate_fr(&spec, &ranges, &init, &data[..d + 1], &cfg));
                let what = format!("K = {k}, {bn:?}, module {} after d_k + 1 = {} iterations", i + 1, d + 1);
                assert_same(&fr, &bp1, &params_and_buffers(&spec, r.clone()), &what);
                // A wrong delay would pair the update with batch 1 or a second step.
                let p = &range_params(&spec, r.clone())[0];
                assert!(fr[p] != bp2[p], "{what}: equals two BP steps");
                // Under Replay the running statistics of k < K saw exactly that forward.
                if bn == BnUpdate::Replay && d > 0 {
                    assert_same(&fr, &bp1, &running_names(&spec, r.clone()), &what);
                }
            }
        }
    }
}

/// Per-batch BN statistics of a training forward of the whole model at `state`'s weights.
fn batch_stats(
    spec: &ModelSpec,
    state: &[HostTensor],
    data: &[(Vec<f32>, Vec<u32>)],
) -> Vec<HashMap<String, Vec<Vec<f32>>>> {
    let tensors: HashMap<String, CTensor> = state.iter().map(|(n, s, d)| (n.clone(), ct(d, s))).collect();
    data.iter()
        .map(|(x, _)| {
            let (_, stats) = forward_range(spec, 0..spec.layers.len(), &tensors, &ct(x, &[BATCH, 3, INPUT, INPUT]));
            stats.into_iter().map(|(n, m, v)| (n, vec![m, v])).collect()
        })
        .collect()
}

#[test]
fn with_lr_zero_module_k_accumulates_the_bp_gradients_of_batches_delayed_by_d_k() {
    // With lr = 0 the weights never move, so staleness vanishes: module k's t-th gradient is
    // backprop's gradient at init of batch t - d_k, and its momentum buffer after n
    // iterations equals backprop's after the first n - d_k batches. The running statistics
    // follow the per-batch statistics at init: play sees batch t, replay batch t - d_k.
    let spec = resnet8();
    let init = init_state(&spec, 9);
    let init_map = as_map(&init);
    let n = 5;
    let data = batches(n, 500);
    let stats = batch_stats(&spec, &init, &data);
    for nesterov in [false, true] {
        for k in [2usize, 3] {
            let ranges = split(&spec, k, SplitPolicy::Even).unwrap();
            for bn in [BnUpdate::Play, BnUpdate::Replay, BnUpdate::Both] {
                let cfg = FrSimConfig { lr: 0.0, momentum: 0.9, weight_decay: 5e-4, nesterov, bn_update: bn };
                let fr = as_map(&simulate_fr(&spec, &ranges, &init, &data, &cfg));
                for (i, r) in ranges.iter().enumerate() {
                    let d = k - 1 - i;
                    let what = format!("K = {k}, {bn:?}, nesterov {nesterov}, module {} (d = {d})", i + 1);
                    let bp = as_map(&simulate_bp(&spec, &init, &data[..n - d], &cfg));
                    let params = range_params(&spec, r.clone());
                    assert_same(&fr, &init_map, &params, &what);
                    let bufs: Vec<String> = params.iter().map(|p| format!("{MOMENTUM_PREFIX}{p}")).collect();
                    assert_same(&fr, &bp, &bufs, &what);
                    // The running statistics, by the recurrence of the chosen passes.
                    let last = d == 0;
                    for bn_name in running_names(&spec, r.clone()) {
                        let (layer, suffix) = bn_name.rsplit_once('.').unwrap();
                        let which = usize::from(suffix == "running_var");
                        let mut run = init_map[&bn_name].clone();
                        let mut apply = |s: &Vec<f32>| {
                            for (r, s) in run.iter_mut().zip(s) {
                                *r = 0.9 * *r + 0.1 * s;
                            }
                        };
                        for t in 0..n {
                            if last || bn != BnUpdate::Replay {
                                apply(&stats[t][layer][which]);
                            }
                            if !last && bn != BnUpdate::Play && t >= d {
                                apply(&stats[t - d][layer][which]);
                            }
                        }
                        assert!(fr[&bn_name] == run, "{what}: {bn_name}");
                    }
                }
            }
        }
    }
}

fn apply_running(running: &mut HashMap<String, Vec<f32>>, stats: common::reference::BnStats) {
    for (bn, m, v) in stats {
        for (suffix, s) in [("running_mean", m), ("running_var", v)] {
            for (r, s) in running.get_mut(&format!("{bn}.{suffix}")).unwrap().iter_mut().zip(&s) {
                *r = 0.9 * *r + 0.1 * s;
            }
        }
    }
}

/// Gradients of `objective(forward(range))` at `params` on `x`: (parameter gradients, input
/// gradient when `need_dx`, BN batch statistics).
fn grads(
    spec: &ModelSpec,
    range: std::ops::Range<usize>,
    params: &HashMap<String, Vec<f32>>,
    shapes: &HashMap<String, Vec<usize>>,
    x: &CTensor,
    objective: impl Fn(&CTensor) -> CTensor,
    need_dx: bool,
) -> (HashMap<String, Vec<f32>>, Option<CTensor>, common::reference::BnStats) {
    let names = range_params(spec, range.clone());
    let vs: HashMap<String, Var> =
        names.iter().map(|n| (n.clone(), Var::from_tensor(&ct(&params[n], &shapes[n])).unwrap())).collect();
    let tensors = vs.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    let xv = Var::from_tensor(x).unwrap();
    let (y, stats) = forward_range(spec, range, &tensors, if need_dx { xv.as_tensor() } else { x });
    let g = objective(&y).backward().unwrap();
    let pg = names.iter().map(|n| (n.clone(), cvec(g.get(vs[n].as_tensor()).unwrap()))).collect();
    (pg, need_dx.then(|| g.get(xv.as_tensor()).unwrap().detach()), stats)
}

#[test]
fn k2_matches_the_schedule_written_out_by_hand() {
    // Three iterations of K = 2 unrolled: module 2 trains on module 1's play output of the
    // same iteration; module 1 replays the previous batch with its current weights and
    // module 2's gradient of the previous iteration; play uses module 1's weights before that
    // iteration's replay update. Running statistics: play and module 2 only (BnUpdate::Play).
    let spec = resnet8();
    let init = init_state(&spec, 10);
    let data = batches(3, 600);
    let cfg = paper_cfg(BnUpdate::Play);
    let ranges = split(&spec, 2, SplitPolicy::Even).unwrap();
    let (r1, r2) = (ranges[0].clone(), ranges[1].clone());
    let shapes: HashMap<String, Vec<usize>> = init.iter().map(|(n, s, _)| (n.clone(), s.clone())).collect();
    let mut w = as_map(&init); // parameters, running statistics and buffers
    let mut steps: HashMap<String, usize> = HashMap::new();
    let mut step = |w: &mut HashMap<String, Vec<f32>>, g: HashMap<String, Vec<f32>>| {
        for (n, g) in g {
            let first = *steps.entry(n.clone()).and_modify(|s| *s += 1).or_insert(0) == 0;
            let mut buf = w[&format!("{MOMENTUM_PREFIX}{n}")].clone();
            sgd_step(&cfg, w.get_mut(&n).unwrap(), &g, &mut buf, first);
            w.insert(format!("{MOMENTUM_PREFIX}{n}"), buf);
        }
    };
    let image = |t: usize| ct(&data[t].0, &[BATCH, 3, INPUT, INPUT]);
    let play = |w: &mut HashMap<String, Vec<f32>>, t: usize| {
        let tensors =
            range_params(&spec, r1.clone()).into_iter().map(|n| (n.clone(), ct(&w[&n], &shapes[&n]))).collect();
        let (h, stats) = forward_range(&spec, r1.clone(), &tensors, &image(t));
        apply_running(w, stats);
        h
    };
    let d = &data;
    let ce = |t: usize| move |logits: &CTensor| cross_entropy(logits, &d[t].1);
    let replay_objective = |delta: CTensor| move |o: &CTensor| (o * &delta).unwrap().sum_all().unwrap();

    // t = 0: play batch 0; module 2 steps on it; module 1 is warming up.
    let h0 = play(&mut w, 0);
    let (g2, delta0, s2) = grads(&spec, r2.clone(), &w, &shapes, &h0, ce(0), true);
    apply_running(&mut w, s2);
    step(&mut w, g2);
    // t = 1: play batch 1 with module 1 still at init; module 2 steps; module 1 replays batch
    // 0 with delta0.
    let h1 = play(&mut w, 1);
    let (g2, delta1, s2) = grads(&spec, r2.clone(), &w, &shapes, &h1, ce(1), true);
    apply_running(&mut w, s2);
    let (g1, _, _) = grads(&spec, r1.clone(), &w, &shapes, &image(0), replay_objective(delta0.unwrap()), false);
    step(&mut w, g2);
    step(&mut w, g1);
    // t = 2: play batch 2 with module 1 after one step; module 2 steps; module 1 replays batch
    // 1 with its current weights and delta1 (computed from the features of its old weights).
    let h2 = play(&mut w, 2);
    let (g2, _, s2) = grads(&spec, r2.clone(), &w, &shapes, &h2, ce(2), true);
    apply_running(&mut w, s2);
    let (g1, _, _) = grads(&spec, r1.clone(), &w, &shapes, &image(1), replay_objective(delta1.unwrap()), false);
    step(&mut w, g2);
    step(&mut w, g1);

    let fr = simulate_fr(&spec, &ranges, &init, &data, &cfg);
    for (n, _, v) in &fr {
        assert!(*v == w[n], "{n} differs from the hand-written schedule");
    }
    // And it is not backprop.
    let bp = as_map(&simulate_bp(&spec, &init, &data, &cfg));
    assert!(as_map(&fr)["conv1.weight"] != bp["conv1.weight"]);
}
