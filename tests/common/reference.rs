//! candle-core versions of the layers and models, for checking the GPU code: PyTorch
//! semantics written from candle ops and differentiated by candle's autograd.
#![allow(dead_code)]

use std::collections::HashMap;

use candle_core::{Tensor as CTensor, Var};
use featreplay::model::{LayerSpec, ModelSpec};

use super::{ct, cvec};

pub const EPS: f64 = 1e-5;

/// Training-mode batch norm: batch mean and biased variance over (N, H, W). Returns y and
/// (mean, unbiased var) for the running statistics.
pub fn bn_train(x: &CTensor, gamma: &CTensor, beta: &CTensor) -> (CTensor, Vec<f32>, Vec<f32>) {
    let (n, c, h, w) = x.dims4().unwrap();
    let count = (n * h * w) as f64;
    let mean = x.mean_keepdim(0).unwrap().mean_keepdim(2).unwrap().mean_keepdim(3).unwrap();
    let xc = x.broadcast_sub(&mean).unwrap();
    let var = xc.sqr().unwrap().mean_keepdim(0).unwrap().mean_keepdim(2).unwrap().mean_keepdim(3).unwrap();
    let inv = (var.clone() + EPS).unwrap().sqrt().unwrap().recip().unwrap();
    let y = xc
        .broadcast_mul(&inv)
        .unwrap()
        .broadcast_mul(&gamma.reshape((1, c, 1, 1)).unwrap())
        .unwrap()
        .broadcast_add(&beta.reshape((1, c, 1, 1)).unwrap())
        .unwrap();
    let unbiased = (var * (count / (count - 1.0))).unwrap();
    (y, cvec(&mean), cvec(&unbiased))
}

/// Option A: x[:, :, ::s, ::s] padded with (out - in) / 2 zero channels on each side.
pub fn shortcut_a(x: &CTensor, out_channels: usize, stride: usize) -> CTensor {
    let (_, c, h, w) = x.dims4().unwrap();
    let rows: Vec<u32> = (0..h as u32).step_by(stride).collect();
    let cols: Vec<u32> = (0..w as u32).step_by(stride).collect();
    let dev = x.device();
    let sub = x
        .index_select(&CTensor::new(rows.as_slice(), dev).unwrap(), 2)
        .unwrap()
        .index_select(&CTensor::new(cols.as_slice(), dev).unwrap(), 3)
        .unwrap();
    let pad = (out_channels - c) / 2;
    sub.pad_with_zeros(1, pad, pad).unwrap()
}

/// Mean softmax cross-entropy of `logits` [N, C] against `labels`.
pub fn cross_entropy(logits: &CTensor, labels: &[u32]) -> CTensor {
    let m = logits.max_keepdim(1).unwrap();
    let shifted = logits.broadcast_sub(&m).unwrap();
    let lse = shifted.exp().unwrap().sum_keepdim(1).unwrap().log().unwrap();
    let logp = shifted.broadcast_sub(&lse).unwrap();
    let idx = CTensor::new(labels, logits.device()).unwrap().reshape((labels.len(), 1)).unwrap();
    (logp.gather(&idx, 1).unwrap().sum_all().unwrap() * (-1.0 / labels.len() as f64)).unwrap()
}

/// Running-statistics updates a training forward produced: (name, batch mean, unbiased var).
pub type BnStats = Vec<(String, Vec<f32>, Vec<f32>)>;

/// Training-mode forward of a basic-block ResNet `spec` whose parameters are `vars`
/// (PyTorch names). Returns the logits and every BN layer's batch statistics.
pub fn resnet_forward(spec: &ModelSpec, vars: &HashMap<String, Var>, x: &CTensor) -> (CTensor, BnStats) {
    let v = |n: &str| vars.get(n).unwrap_or_else(|| panic!("no parameter {n}")).as_tensor().clone();
    let mut stats = Vec::new();
    let bn = |name: &str, t: &CTensor, stats: &mut BnStats| {
        let (y, m, var) = bn_train(t, &v(&format!("{name}.weight")), &v(&format!("{name}.bias")));
        stats.push((name.to_string(), m, var));
        y
    };
    let mut h = x.clone();
    for l in &spec.layers {
        h = match l {
            LayerSpec::Conv { name, stride, pad, .. } => {
                h.conv2d(&v(&format!("{name}.weight")), *pad, *stride, 1, 1).unwrap()
            }
            LayerSpec::BatchNorm { name, .. } => bn(name, &h, &mut stats),
            LayerSpec::Relu => h.relu().unwrap(),
            LayerSpec::Basic { name, in_channels, out_channels, stride } => {
                let c1 = h.conv2d(&v(&format!("{name}.conv1.weight")), 1, *stride, 1, 1).unwrap();
                let a1 = bn(&format!("{name}.bn1"), &c1, &mut stats).relu().unwrap();
                let c2 = a1.conv2d(&v(&format!("{name}.conv2.weight")), 1, 1, 1, 1).unwrap();
                let b2 = bn(&format!("{name}.bn2"), &c2, &mut stats);
                let short = if *stride == 1 && in_channels == out_channels {
                    h.clone()
                } else {
                    shortcut_a(&h, *out_channels, *stride)
                };
                (b2 + short).unwrap().relu().unwrap()
            }
            LayerSpec::GlobalAvgPool => h.mean(3).unwrap().mean(2).unwrap(),
            LayerSpec::Linear { name, .. } => h
                .matmul(&v(&format!("{name}.weight")).t().unwrap())
                .unwrap()
                .broadcast_add(&v(&format!("{name}.bias")))
                .unwrap(),
            LayerSpec::Bottleneck { .. } => unimplemented!("the candle reference covers basic-block ResNets"),
        };
    }
    (h, stats)
}

/// Candle variables holding the given host tensors.
pub fn vars(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> HashMap<String, Var> {
    tensors.iter().map(|(n, s, d)| (n.clone(), Var::from_tensor(&ct(d, s)).unwrap())).collect()
}
