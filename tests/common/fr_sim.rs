//! An independent CPU simulation (candle-core, f32) of the Features Replay schedule of
//! `docs/schedules.md`, written from the spec alone: the oracle the GPU
//! implementation is tested against. Plain backprop (`simulate_bp`) is simulated with the
//! same building blocks, for comparison.
//!
//! State is exchanged as host tensors `(name, shape, values)` with PyTorch names:
//! - stem / any `LayerSpec::Conv` `<name>`: `<name>.weight` `[O, I, k, k]` (no bias);
//! - `LayerSpec::BatchNorm` `<name>`: `<name>.weight`, `<name>.bias` `[C]` (trainable) and
//!   `<name>.running_mean`, `<name>.running_var` `[C]` (buffers);
//! - `LayerSpec::Basic` `<name>`: `<name>.conv1.weight`, `<name>.bn1.*`, `<name>.conv2.weight`,
//!   `<name>.bn2.*` (the option-A shortcut has no parameters);
//! - `LayerSpec::Linear` `<name>`: `<name>.weight` `[out, in]`, `<name>.bias` `[out]`;
//! - the SGD momentum buffer of parameter `p`: `optimizer.momentum.<p>`, same shape as `p`.
//!
//! Bottleneck blocks are not covered (like `reference::resnet_forward`).
#![allow(dead_code)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Range;

use candle_core::{Device, Tensor as CTensor, Var};
use featreplay::model::{LayerSpec, ModelSpec};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

use super::reference::{bn_train, cross_entropy, shortcut_a, BnStats};
use super::{ct, cvec};

/// A host tensor: (PyTorch name, shape, values).
pub type HostTensor = (String, Vec<usize>, Vec<f32>);

/// Momentum of the BN running statistics: `running = (1 - m) * running + m * batch_stat`.
pub const BN_MOMENTUM: f32 = 0.1;

/// Prefix of the SGD momentum buffers' names.
pub const MOMENTUM_PREFIX: &str = "optimizer.momentum.";

/// Which pass of a module k < K updates its BN running statistics (the spec lets the
/// implementation choose; the last module always updates in its single forward).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BnUpdate {
    /// Only the play (forward on the fresh input): every iteration from t = 0.
    Play,
    /// Only the replay: from iteration t = d_k on, with the statistics of the replayed batch.
    Replay,
    /// Both, as the reference code does: play's statistics first, then replay's.
    Both,
}

/// PyTorch SGD (dampening 0) and the BN choice.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrSimConfig {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
    pub nesterov: bool,
    pub bn_update: BnUpdate,
}

/// Trainable parameters of a layer, (name, shape), in PyTorch's order.
pub fn layer_params(layer: &LayerSpec) -> Vec<(String, Vec<usize>)> {
    let bn = |name: &str, c: usize| vec![(format!("{name}.weight"), vec![c]), (format!("{name}.bias"), vec![c])];
    match layer {
        LayerSpec::Conv { name, in_channels, out_channels, kernel, .. } => {
            vec![(format!("{name}.weight"), vec![*out_channels, *in_channels, *kernel, *kernel])]
        }
        LayerSpec::BatchNorm { name, channels } => bn(name, *channels),
        LayerSpec::Basic { name, in_channels, out_channels, .. } => {
            let (i, o) = (*in_channels, *out_channels);
            let mut v = vec![(format!("{name}.conv1.weight"), vec![o, i, 3, 3])];
            v.extend(bn(&format!("{name}.bn1"), o));
            v.push((format!("{name}.conv2.weight"), vec![o, o, 3, 3]));
            v.extend(bn(&format!("{name}.bn2"), o));
            v
        }
        LayerSpec::Linear { name, in_features, out_features } => vec![
            (format!("{name}.weight"), vec![*out_features, *in_features]),
            (format!("{name}.bias"), vec![*out_features]),
        ],
        LayerSpec::Relu | LayerSpec::GlobalAvgPool => vec![],
        LayerSpec::Bottleneck { .. } => unimplemented!("the FR simulation covers basic-block ResNets"),
    }
}

/// Batch-norm layers of a layer, (name, channels).
pub fn layer_bns(layer: &LayerSpec) -> Vec<(String, usize)> {
    match layer {
        LayerSpec::BatchNorm { name, channels } => vec![(name.clone(), *channels)],
        LayerSpec::Basic { name, out_channels, .. } => {
            vec![(format!("{name}.bn1"), *out_channels), (format!("{name}.bn2"), *out_channels)]
        }
        LayerSpec::Bottleneck { .. } => unimplemented!("the FR simulation covers basic-block ResNets"),
        _ => vec![],
    }
}

/// Names of the trainable parameters of `spec.layers[range]`.
pub fn range_params(spec: &ModelSpec, range: Range<usize>) -> Vec<String> {
    spec.layers[range].iter().flat_map(layer_params).map(|(n, _)| n).collect()
}

/// Names of every state tensor of `spec.layers[range]`: parameters, BN running statistics
/// and momentum buffers.
pub fn range_state_names(spec: &ModelSpec, range: Range<usize>) -> Vec<String> {
    let params = range_params(spec, range.clone());
    let mut out = params.clone();
    for (bn, _) in spec.layers[range].iter().flat_map(layer_bns) {
        out.push(format!("{bn}.running_mean"));
        out.push(format!("{bn}.running_var"));
    }
    out.extend(params.iter().map(|p| format!("{MOMENTUM_PREFIX}{p}")));
    out
}

/// A seeded, GPU-free initial state of `spec` with the naming scheme of this module: conv
/// weights normal(0, sqrt(2 / (k * k * out))), BN gamma 1 + U(-0.1, 0.1) and beta U(-0.1, 0.1)
/// (not 1 and 0, so that a mix-up of the two shows), running mean 0 and var 1, linear weight
/// normal(0, sqrt(2 / in)) and bias U(-1/sqrt(in), 1/sqrt(in)), momentum buffers zero.
/// Order: every layer's parameters then its running statistics, layer by layer, then all
/// momentum buffers in parameter order.
pub fn init_state(spec: &ModelSpec, seed: u64) -> Vec<HostTensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    let mut momentum = Vec::new();
    for layer in &spec.layers {
        for (name, shape) in layer_params(layer) {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = if shape.len() == 4 {
                let std = (2.0 / (shape[2] * shape[3] * shape[0]) as f32).sqrt();
                let d = Normal::new(0.0f32, std).unwrap();
                (0..n).map(|_| d.sample(&mut rng)).collect()
            } else if shape.len() == 2 {
                let d = Normal::new(0.0f32, (2.0 / shape[1] as f32).sqrt()).unwrap();
                (0..n).map(|_| d.sample(&mut rng)).collect()
            } else if matches!(layer, LayerSpec::Linear { .. }) {
                let b = 1.0 / (layer_params(layer)[0].1[1] as f32).sqrt();
                (0..n).map(|_| rng.random_range(-b..b)).collect()
            } else if name.ends_with(".weight") {
                (0..n).map(|_| 1.0 + rng.random_range(-0.1f32..0.1)).collect()
            } else {
                (0..n).map(|_| rng.random_range(-0.1f32..0.1)).collect()
            };
            momentum.push((format!("{MOMENTUM_PREFIX}{name}"), shape.clone(), vec![0.0; n]));
            out.push((name, shape, values));
        }
        for (bn, c) in layer_bns(layer) {
            out.push((format!("{bn}.running_mean"), vec![c], vec![0.0; c]));
            out.push((format!("{bn}.running_var"), vec![c], vec![1.0; c]));
        }
    }
    out.extend(momentum);
    out
}

/// Training-mode forward of `spec.layers[range]` (basic-block ResNet layers) on any input
/// `x`, with parameters looked up by PyTorch name in `params` (plain tensors, or the tensors
/// of `Var`s for autograd). Returns the output and each BN layer's batch statistics (name,
/// mean, unbiased var) in layer order. Same ops as `reference::resnet_forward`.
pub fn forward_range(
    spec: &ModelSpec,
    range: Range<usize>,
    params: &HashMap<String, CTensor>,
    x: &CTensor,
) -> (CTensor, BnStats) {
    let v = |n: &str| params.get(n).unwrap_or_else(|| panic!("no parameter {n}")).clone();
    let mut stats = Vec::new();
    let bn = |name: &str, t: &CTensor, stats: &mut BnStats| {
        let (y, m, var) = bn_train(t, &v(&format!("{name}.weight")), &v(&format!("{name}.bias")));
        stats.push((name.to_string(), m, var));
        y
    };
    let mut h = x.clone();
    for l in &spec.layers[range] {
        h = match l {
            LayerSpec::Conv { name, stride, pad, .. } => {
                h.conv2d(&v(&format!("{name}.weight")), *pad, *stride, 1, 1).unwrap()
            }
            LayerSpec::BatchNorm { name, .. } => bn(name, &h, &mut stats),
            LayerSpec::Relu => h.relu().unwrap(),
            LayerSpec::Basic { name, in_channels, out_channels, stride, shortcut_pad } => {
                let c1 = h.conv2d(&v(&format!("{name}.conv1.weight")), 1, *stride, 1, 1).unwrap();
                let a1 = bn(&format!("{name}.bn1"), &c1, &mut stats).relu().unwrap();
                let c2 = a1.conv2d(&v(&format!("{name}.conv2.weight")), 1, 1, 1, 1).unwrap();
                let b2 = bn(&format!("{name}.bn2"), &c2, &mut stats);
                let short = if *stride == 1 && in_channels == out_channels {
                    h.clone()
                } else {
                    shortcut_a(&h, *out_channels, *stride, *shortcut_pad)
                };
                (b2 + short).unwrap().relu().unwrap()
            }
            LayerSpec::GlobalAvgPool => h.mean(3).unwrap().mean(2).unwrap(),
            LayerSpec::Linear { name, .. } => h
                .matmul(&v(&format!("{name}.weight")).t().unwrap())
                .unwrap()
                .broadcast_add(&v(&format!("{name}.bias")))
                .unwrap(),
            LayerSpec::Bottleneck { .. } => unimplemented!("the FR simulation covers basic-block ResNets"),
        };
    }
    (h, stats)
}

/// One PyTorch SGD step (dampening 0) of a parameter, in place, with the operation order of
/// `tests/bp.rs`: d = g + wd * w; buf = first ? d : momentum * buf + d; d = nesterov ?
/// d + momentum * buf : buf; w = w - lr * d. With momentum 0 the buffer is left untouched
/// (PyTorch keeps none) and d is used directly.
pub fn sgd_step(cfg: &FrSimConfig, w: &mut [f32], g: &[f32], buf: &mut [f32], first: bool) {
    assert_eq!(w.len(), g.len());
    assert_eq!(w.len(), buf.len());
    for ((w, g), b) in w.iter_mut().zip(g).zip(buf.iter_mut()) {
        let mut d = if cfg.weight_decay != 0.0 { g + cfg.weight_decay * *w } else { *g };
        if cfg.momentum != 0.0 {
            *b = if first { d } else { cfg.momentum * *b + d };
            d = if cfg.nesterov { d + cfg.momentum * *b } else { *b };
        }
        *w -= cfg.lr * d;
    }
}

/// The mutable state of a simulated network.
struct Sim<'a> {
    spec: &'a ModelSpec,
    cfg: &'a FrSimConfig,
    /// Everything in `init`, by name.
    values: HashMap<String, (Vec<usize>, Vec<f32>)>,
    /// Parameters that have taken their first SGD step (their momentum buffer exists).
    stepped: HashSet<String>,
}

impl<'a> Sim<'a> {
    fn new(spec: &'a ModelSpec, init: &[HostTensor], cfg: &'a FrSimConfig) -> Sim<'a> {
        let values: HashMap<String, (Vec<usize>, Vec<f32>)> =
            init.iter().map(|(n, s, d)| (n.clone(), (s.clone(), d.clone()))).collect();
        assert_eq!(values.len(), init.len(), "duplicate names in the initial state");
        for layer in &spec.layers {
            for (name, shape) in layer_params(layer) {
                for n in [name.clone(), format!("{MOMENTUM_PREFIX}{name}")] {
                    let (s, d) = values.get(&n).unwrap_or_else(|| panic!("initial state lacks {n}"));
                    assert_eq!(s, &shape, "shape of {n}");
                    assert_eq!(d.len(), shape.iter().product::<usize>(), "length of {n}");
                }
            }
            for (bn, c) in layer_bns(layer) {
                for n in [format!("{bn}.running_mean"), format!("{bn}.running_var")] {
                    let (s, _) = values.get(&n).unwrap_or_else(|| panic!("initial state lacks {n}"));
                    assert_eq!(s, &vec![c], "shape of {n}");
                }
            }
        }
        Sim { spec, cfg, values, stepped: HashSet::new() }
    }

    fn tensor(&self, name: &str) -> CTensor {
        let (s, d) = &self.values[name];
        ct(d, s)
    }

    /// Plain (untracked) parameter tensors of a module.
    fn plain(&self, range: Range<usize>) -> HashMap<String, CTensor> {
        range_params(self.spec, range).into_iter().map(|n| (n.clone(), self.tensor(&n))).collect()
    }

    /// Fresh autograd variables for a module's parameters.
    fn vars(&self, range: Range<usize>) -> HashMap<String, Var> {
        range_params(self.spec, range)
            .into_iter()
            .map(|n| (n.clone(), Var::from_tensor(&self.tensor(&n)).unwrap()))
            .collect()
    }

    fn update_running(&mut self, stats: &BnStats) {
        for (bn, mean, var) in stats {
            for (suffix, stat) in [("running_mean", mean), ("running_var", var)] {
                let (_, r) = self.values.get_mut(&format!("{bn}.{suffix}")).unwrap();
                for (r, s) in r.iter_mut().zip(stat) {
                    *r = (1.0 - BN_MOMENTUM) * *r + BN_MOMENTUM * s;
                }
            }
        }
    }

    /// SGD on every parameter of `range` with the gradients of `vars` in `grads`.
    fn sgd(&mut self, range: Range<usize>, vars: &HashMap<String, Var>, grads: &candle_core::backprop::GradStore) {
        for name in range_params(self.spec, range) {
            let g = cvec(grads.get(vars[&name].as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}")));
            let first = self.stepped.insert(name.clone());
            let mut w = std::mem::take(&mut self.values.get_mut(&name).unwrap().1);
            let buf = &mut self.values.get_mut(&format!("{MOMENTUM_PREFIX}{name}")).unwrap().1;
            sgd_step(self.cfg, &mut w, &g, buf, first);
            self.values.get_mut(&name).unwrap().1 = w;
        }
    }

    /// Play: training-mode forward with the current weights, keeping nothing.
    fn play(&mut self, range: Range<usize>, x: &CTensor, update_running: bool) -> CTensor {
        let (y, stats) = forward_range(self.spec, range.clone(), &self.plain(range), x);
        if update_running {
            self.update_running(&stats);
        }
        y
    }

    /// Training-mode forward of `range` on `x` with autograd, backward of `objective(output)`,
    /// SGD step; returns dObjective/dx when `need_dx`.
    fn train(
        &mut self,
        range: Range<usize>,
        x: &CTensor,
        objective: impl Fn(&CTensor) -> CTensor,
        update_running: bool,
        need_dx: bool,
    ) -> Option<CTensor> {
        let vars = self.vars(range.clone());
        let tensors: HashMap<String, CTensor> = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        let input = need_dx.then(|| Var::from_tensor(x).unwrap());
        let x_used = input.as_ref().map_or_else(|| x.clone(), |v| v.as_tensor().clone());
        let (y, stats) = forward_range(self.spec, range.clone(), &tensors, &x_used);
        if update_running {
            self.update_running(&stats);
        }
        let grads = objective(&y).backward().unwrap();
        self.sgd(range, &vars, &grads);
        input.map(|v| grads.get(v.as_tensor()).expect("no input gradient").detach())
    }

    fn finish(self, init: &[HostTensor]) -> Vec<HostTensor> {
        init.iter()
            .map(|(n, _, _)| {
                let (s, d) = &self.values[n];
                (n.clone(), s.clone(), d.clone())
            })
            .collect()
    }
}

fn images(spec: &ModelSpec, data: &[f32]) -> CTensor {
    let per: usize = spec.input.iter().product();
    assert!(per > 0 && data.len().is_multiple_of(per), "batch of {} values for input {:?}", data.len(), spec.input);
    let mut shape = vec![data.len() / per];
    shape.extend(&spec.input);
    CTensor::from_vec(data.to_vec(), shape, &Device::Cpu).unwrap()
}

/// Features Replay over `ranges` (K = ranges.len() consecutive modules covering the whole
/// layer list), one iteration per batch, from `init`; returns the final state with the
/// names and order of `init`. Iteration t, for 1-based module k with delay d_k = K - k:
/// 1. play, k = 1..K-1: append the input to module k's history, forward with the current
///    weights (BN running statistics updated when `bn_update` is Play or Both), pass it up;
/// 2. module K: forward (running statistics always updated), mean cross-entropy against
///    batch t's labels, backward, SGD step; dL/d(input) is sent down (kept for t + 1);
/// 3. replay, k = K-1..1, when t >= d_k: forward on the oldest input of the history with the
///    current weights (running statistics updated when `bn_update` is Replay or Both),
///    backpropagate the gradient module k+1 sent during iteration t-1 (via sum(out * g)),
///    SGD step, drop that input and send dL/d(input) down (module 1 sends nothing);
/// 4. the gradients sent during iteration t become the stored g_k for iteration t + 1.
pub fn simulate_fr(
    spec: &ModelSpec,
    ranges: &[Range<usize>],
    init: &[HostTensor],
    batches: &[(Vec<f32>, Vec<u32>)],
    cfg: &FrSimConfig,
) -> Vec<HostTensor> {
    check_modules(spec, ranges);
    let k_count = ranges.len();
    let last = k_count - 1; // 0-based index of module K
    let delay = |i: usize| k_count - 1 - i; // d_k for 0-based i
    let play_updates = matches!(cfg.bn_update, BnUpdate::Play | BnUpdate::Both);
    let replay_updates = matches!(cfg.bn_update, BnUpdate::Replay | BnUpdate::Both);

    let mut sim = Sim::new(spec, init, cfg);
    let mut history: Vec<VecDeque<CTensor>> = vec![VecDeque::new(); last];
    // stored[i]: the gradient module i+1 (0-based) sent during the previous iteration.
    let mut stored: Vec<Option<CTensor>> = vec![None; last];
    for (t, (x, labels)) in batches.iter().enumerate() {
        let mut sent: Vec<Option<CTensor>> = vec![None; last];
        // 1. play
        let mut h = images(spec, x);
        for i in 0..last {
            history[i].push_back(h.clone());
            assert!(history[i].len() <= delay(i) + 1, "module {} holds more than d_k + 1 inputs", i + 1);
            h = sim.play(ranges[i].clone(), &h, play_updates);
        }
        // 2. the last module
        let dx = sim.train(ranges[last].clone(), &h, |logits| cross_entropy(logits, labels), true, last > 0);
        if last > 0 {
            sent[last - 1] = dx;
        }
        // 3. replay (every module's replay uses gradients of iteration t - 1 only, so the
        // order among modules does not matter)
        for i in (0..last).rev() {
            if t < delay(i) {
                assert!(history[i].len() == t + 1, "warm-up history of module {}", i + 1);
                continue;
            }
            let input = history[i].pop_front().unwrap();
            let g = stored[i].take().unwrap_or_else(|| panic!("module {} has no gradient at iteration {t}", i + 1));
            let dx = sim.train(
                ranges[i].clone(),
                &input,
                |out| (out * &g).unwrap().sum_all().unwrap(),
                replay_updates,
                i > 0,
            );
            if i > 0 {
                sent[i - 1] = dx;
            }
        }
        // 4. received gradients are stored for the next iteration
        stored = sent;
    }
    sim.finish(init)
}

/// Asserts `ranges` are K >= 1 non-empty consecutive modules covering the whole layer list.
fn check_modules(spec: &ModelSpec, ranges: &[Range<usize>]) {
    let k_count = ranges.len();
    assert!(k_count >= 1, "no modules");
    assert_eq!(ranges[0].start, 0, "the first module must start at layer 0");
    assert_eq!(ranges[k_count - 1].end, spec.layers.len(), "the last module must end with the last layer");
    for w in ranges.windows(2) {
        assert_eq!(w[0].end, w[1].start, "modules must be consecutive: {ranges:?}");
    }
    assert!(ranges.iter().all(|r| !r.is_empty()), "empty module in {ranges:?}");
}

/// Plain backprop from `init`, one SGD step per batch (running statistics updated by each
/// forward); returns the final state with the names and order of `init`.
/// `cfg.bn_update` is ignored.
pub fn simulate_bp(
    spec: &ModelSpec,
    init: &[HostTensor],
    batches: &[(Vec<f32>, Vec<u32>)],
    cfg: &FrSimConfig,
) -> Vec<HostTensor> {
    let mut sim = Sim::new(spec, init, cfg);
    for (x, labels) in batches {
        sim.train(0..spec.layers.len(), &images(spec, x), |logits| cross_entropy(logits, labels), true, false);
    }
    sim.finish(init)
}

/// Delayed gradients (DDG) over `ranges`, one iteration per batch, from `init`, written from
/// the spec: iteration t, for 0-based module i < K-1 with delay d = K-1-i:
/// 1. forward on the fresh input with the current weights, keeping the whole graph (the
///    weights as they are now, the input, the output), running statistics updated;
/// 2. module K: forward, cross-entropy, backward, SGD step; dL/d(input) sent down;
/// 3. when t >= d: backpropagate the graph built at t - d (its stale weights) with the
///    gradient module i+1 sent during iteration t-1, SGD step on the CURRENT weights with
///    that gradient, send dL/d(input of that graph) down;
/// 4. the gradients sent during t become the stored ones for t + 1.
pub fn simulate_ddg(
    spec: &ModelSpec,
    ranges: &[Range<usize>],
    init: &[HostTensor],
    batches: &[(Vec<f32>, Vec<u32>)],
    cfg: &FrSimConfig,
) -> Vec<HostTensor> {
    check_modules(spec, ranges);
    let k_count = ranges.len();
    let last = k_count - 1;
    let delay = |i: usize| k_count - 1 - i;
    let mut sim = Sim::new(spec, init, cfg);
    type Graph = (HashMap<String, Var>, Option<Var>, CTensor);
    let mut graphs: Vec<VecDeque<Graph>> = (0..last).map(|_| VecDeque::new()).collect();
    let mut stored: Vec<Option<CTensor>> = vec![None; last];
    for (t, (x, labels)) in batches.iter().enumerate() {
        let mut sent: Vec<Option<CTensor>> = vec![None; last];
        let mut h = images(spec, x);
        for i in 0..last {
            let vars = sim.vars(ranges[i].clone());
            let tensors: HashMap<String, CTensor> =
                vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
            let input = (i > 0).then(|| Var::from_tensor(&h).unwrap());
            let x_used = input.as_ref().map_or_else(|| h.clone(), |v| v.as_tensor().clone());
            let (y, stats) = forward_range(spec, ranges[i].clone(), &tensors, &x_used);
            sim.update_running(&stats);
            h = y.detach();
            graphs[i].push_back((vars, input, y));
            assert!(graphs[i].len() <= delay(i) + 1, "module {} holds more than d_k + 1 graphs", i + 1);
        }
        let dx = sim.train(ranges[last].clone(), &h, |logits| cross_entropy(logits, labels), true, last > 0);
        if last > 0 {
            sent[last - 1] = dx;
        }
        for i in (0..last).rev() {
            if t < delay(i) {
                continue;
            }
            let (vars, input, y) = graphs[i].pop_front().unwrap();
            let g = stored[i].take().unwrap_or_else(|| panic!("module {} has no gradient at iteration {t}", i + 1));
            let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            sim.sgd(ranges[i].clone(), &vars, &grads);
            if i > 0 {
                sent[i - 1] = input.map(|v| grads.get(v.as_tensor()).expect("no input gradient").detach());
            }
        }
        stored = sent;
    }
    sim.finish(init)
}

/// The images of samples `range` of a batch's flat image data.
fn sample_range(spec: &ModelSpec, data: &[f32], range: Range<usize>) -> Vec<f32> {
    let per: usize = spec.input.iter().product();
    data[range.start * per..range.end * per].to_vec()
}

/// GPipe from `init`, written from the spec: every batch of N samples is cut into
/// `sizes(N)` micro-batches in order; each runs a training-mode forward of the whole model
/// with its own BN statistics (running statistics updated once per micro-batch, in order);
/// the objective is sum_m (n_m / N) * CE_m, whose gradient is the sum of the micro-batches'
/// scaled gradients; one SGD step per batch.
pub fn simulate_gpipe(
    spec: &ModelSpec,
    init: &[HostTensor],
    batches: &[(Vec<f32>, Vec<u32>)],
    sizes: impl Fn(usize) -> Vec<usize>,
    cfg: &FrSimConfig,
) -> Vec<HostTensor> {
    let mut sim = Sim::new(spec, init, cfg);
    let all = 0..spec.layers.len();
    for (x, labels) in batches {
        let n = labels.len();
        let vars = sim.vars(all.clone());
        let tensors: HashMap<String, CTensor> = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        let mut objective: Option<CTensor> = None;
        let mut start = 0;
        for size in sizes(n) {
            let part = images(spec, &sample_range(spec, x, start..start + size));
            let (logits, stats) = forward_range(spec, all.clone(), &tensors, &part);
            sim.update_running(&stats);
            let term = (cross_entropy(&logits, &labels[start..start + size]) * (size as f64 / n as f64)).unwrap();
            objective = Some(match objective {
                None => term,
                Some(o) => (o + term).unwrap(),
            });
            start += size;
        }
        let grads = objective.unwrap().backward().unwrap();
        sim.sgd(all.clone(), &vars, &grads);
    }
    sim.finish(init)
}

/// Decoupled Greedy Learning over `ranges` from `init` (the model) and `heads` (module k's
/// auxiliary head: its spec, whose input is module k's output, and initial state), written
/// from the spec: for every batch, module by module from the bottom, a training-mode forward
/// of module k on its input (running statistics updated), the head's forward on the output
/// (its statistics updated too), the head's cross-entropy against the batch's labels,
/// backward through head and module, one SGD step of each; the module's output BEFORE its
/// step is the next module's input. The last module trains on the model's own loss. Returns
/// the final model state and each head's, with the names and order of the inputs.
pub fn simulate_dgl(
    spec: &ModelSpec,
    ranges: &[Range<usize>],
    init: &[HostTensor],
    heads: &[(ModelSpec, Vec<HostTensor>)],
    batches: &[(Vec<f32>, Vec<u32>)],
    cfg: &FrSimConfig,
) -> (Vec<HostTensor>, Vec<Vec<HostTensor>>) {
    check_modules(spec, ranges);
    let last = ranges.len() - 1;
    assert_eq!(heads.len(), last, "one head per module but the last");
    let mut sim = Sim::new(spec, init, cfg);
    let mut head_sims: Vec<Sim> = heads.iter().map(|(s, i)| Sim::new(s, i, cfg)).collect();
    for (x, labels) in batches {
        let mut h = images(spec, x);
        for (i, range) in ranges.iter().enumerate().take(last) {
            let vars = sim.vars(range.clone());
            let tensors: HashMap<String, CTensor> =
                vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
            let (y, stats) = forward_range(spec, range.clone(), &tensors, &h);
            sim.update_running(&stats);
            let head = &mut head_sims[i];
            let head_range = 0..heads[i].0.layers.len();
            let hvars = head.vars(head_range.clone());
            let htensors: HashMap<String, CTensor> =
                hvars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
            let (logits, hstats) = forward_range(&heads[i].0, head_range.clone(), &htensors, &y);
            head.update_running(&hstats);
            let grads = cross_entropy(&logits, labels).backward().unwrap();
            sim.sgd(range.clone(), &vars, &grads);
            head.sgd(head_range, &hvars, &grads);
            h = y.detach();
        }
        sim.train(ranges[last].clone(), &h, |logits| cross_entropy(logits, labels), true, false);
    }
    let heads_out = head_sims.into_iter().zip(heads).map(|(s, (_, i))| s.finish(i)).collect();
    (sim.finish(init), heads_out)
}
