//! candle-core versions of the layers and models, for checking the GPU code: PyTorch
//! semantics written from candle ops and differentiated by candle's autograd.
#![allow(dead_code)]

use std::collections::HashMap;

use candle_core::{Tensor as CTensor, Var};
use featreplay::kernels::shortcut::ChannelPad;
use featreplay::model::ModelSpec;

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

/// Option A: x[:, :, ::s, ::s] padded with out - in zero channels, placed as `pad` says
/// ((out - in) / 2 on each side, or all after).
pub fn shortcut_a(x: &CTensor, out_channels: usize, stride: usize, pad: ChannelPad) -> CTensor {
    let (_, c, h, w) = x.dims4().unwrap();
    let rows: Vec<u32> = (0..h as u32).step_by(stride).collect();
    let cols: Vec<u32> = (0..w as u32).step_by(stride).collect();
    let dev = x.device();
    let sub = x
        .index_select(&CTensor::new(rows.as_slice(), dev).unwrap(), 2)
        .unwrap()
        .index_select(&CTensor::new(cols.as_slice(), dev).unwrap(), 3)
        .unwrap();
    let lead = pad.leading(c, out_channels);
    sub.pad_with_zeros(1, lead, out_channels - c - lead).unwrap()
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
    let params: HashMap<String, CTensor> = vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    super::fr_sim::forward_range(spec, 0..spec.layers.len(), &params, x)
}

/// Candle variables holding the given host tensors.
pub fn vars(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> HashMap<String, Var> {
    tensors.iter().map(|(n, s, d)| (n.clone(), Var::from_tensor(&ct(d, s)).unwrap())).collect()
}
