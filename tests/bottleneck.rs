//! One whole bottleneck block (1x1 conv-BN-ReLU, 3x3 conv-BN-ReLU, 1x1 conv-BN, + shortcut,
//! ReLU), forward and backward, against the same block written with candle ops and
//! differentiated by candle's autograd, from the same weights. Covers the identity shortcut
//! and the 1x1 conv + BN projection, with and without a stride.

mod common;

use candle_core::{Tensor as CTensor, Var};
use common::*;
use featreplay::layers::bottleneck::{Bottleneck, EXPANSION};
use featreplay::layers::BatchNorm2d;
use rand::SeedableRng;

use common::reference::{bn_train, EPS};

fn bn_eval(t: &CTensor, gamma: &[f32], beta: &[f32], mean: &[f32], var: &[f32]) -> CTensor {
    let c = gamma.len();
    let s = |v: Vec<f32>| ct(&v, &[1, c, 1, 1]);
    let scale: Vec<f32> = gamma.iter().zip(var).map(|(g, v)| g / (v + EPS as f32).sqrt()).collect();
    let shift: Vec<f32> = beta.iter().zip(mean).zip(&scale).map(|((b, m), s)| b - m * s).collect();
    t.broadcast_mul(&s(scale)).unwrap().broadcast_add(&s(shift)).unwrap()
}

/// Running statistics after one step from PyTorch's initial (0, 1): 0.9 * init + 0.1 * stat.
fn run(stat: &[f32], init: f32) -> Vec<f32> {
    stat.iter().map(|s| 0.9 * init + 0.1 * s).collect()
}

/// One BN of the block: its non-trivial affine parameters (written to the device layer, so
/// their gradients and effect are checked), as host data and as candle variables.
struct BnRef {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    gv: Var,
    bv: Var,
}

impl BnRef {
    fn new(layer: &BatchNorm2d, c: usize, seed: u64) -> BnRef {
        let gamma: Vec<f32> = random(c, seed).iter().map(|v| 1.0 + 0.5 * v).collect();
        let beta = random(c, seed + 1);
        gpu().write(&layer.gamma.value, &gamma).unwrap();
        gpu().write(&layer.beta.value, &beta).unwrap();
        let gv = Var::from_tensor(&ct(&gamma, &[c])).unwrap();
        let bv = Var::from_tensor(&ct(&beta, &[c])).unwrap();
        BnRef { gamma, beta, gv, bv }
    }

    /// Training-mode BN in candle; returns y and the running statistics after one step.
    fn train(&self, x: &CTensor) -> (CTensor, Vec<f32>, Vec<f32>) {
        let (y, mean, var) = bn_train(x, self.gv.as_tensor(), self.bv.as_tensor());
        (y, run(&mean, 0.0), run(&var, 1.0))
    }

    fn eval(&self, x: &CTensor, running_mean: &[f32], running_var: &[f32]) -> CTensor {
        bn_eval(x, &self.gamma, &self.beta, running_mean, running_var)
    }
}

fn check_block(n: usize, cin: usize, planes: usize, hw: usize, stride: usize, seed: u64) {
    let g = gpu();
    let cout = EXPANSION * planes;
    let projection = !(stride == 1 && cin == cout);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut block = Bottleneck::new(g, "layer1.0", cin, planes, stride, &mut rng).unwrap();
    assert_eq!(block.out_channels(), cout);
    assert_eq!(block.downsample.is_some(), projection);
    let r1 = BnRef::new(&block.bn1, planes, seed + 10);
    let r2 = BnRef::new(&block.bn2, planes, seed + 20);
    let r3 = BnRef::new(&block.bn3, cout, seed + 30);
    let rs = block.downsample.as_ref().map(|p| BnRef::new(&p.bn, cout, seed + 40));
    let w1 = block.conv1.weight.value.to_vec().unwrap();
    let w2 = block.conv2.weight.value.to_vec().unwrap();
    let w3 = block.conv3.weight.value.to_vec().unwrap();
    let ws = block.downsample.as_ref().map(|p| p.conv.weight.value.to_vec().unwrap());
    let (ws1, ws2, ws3, wss) = ([planes, cin, 1, 1], [planes, planes, 3, 3], [cout, planes, 1, 1], [cout, cin, 1, 1]);

    let xs = [n, cin, hw, hw];
    let x = random(xs.iter().product(), seed + 5);
    let (y_gpu, acts) = block.forward_train(&g.tensor(&xs, &x).unwrap(), true).unwrap();
    let ys = y_gpu.shape().to_vec();
    let dy = random(ys.iter().product(), seed + 6);
    let dx_gpu = block.backward(&acts, &g.tensor(&ys, &dy).unwrap()).unwrap();

    // The same block in candle (candle's conv2d takes padding, stride, dilation, groups).
    let xv = Var::from_tensor(&ct(&x, &xs)).unwrap();
    let w1v = Var::from_tensor(&ct(&w1, &ws1)).unwrap();
    let w2v = Var::from_tensor(&ct(&w2, &ws2)).unwrap();
    let w3v = Var::from_tensor(&ct(&w3, &ws3)).unwrap();
    let wsv = ws.as_ref().map(|w| Var::from_tensor(&ct(w, &wss)).unwrap());
    let c1 = xv.as_tensor().conv2d(w1v.as_tensor(), 0, 1, 1, 1).unwrap();
    let (b1, rm1, rv1) = r1.train(&c1);
    let c2 = b1.relu().unwrap().conv2d(w2v.as_tensor(), 1, stride, 1, 1).unwrap();
    let (b2, rm2, rv2) = r2.train(&c2);
    let c3 = b2.relu().unwrap().conv2d(w3v.as_tensor(), 0, 1, 1, 1).unwrap();
    let (b3, rm3, rv3) = r3.train(&c3);
    let (short, run_s) = match (&wsv, &rs) {
        (Some(wv), Some(r)) => {
            let (bs, rms, rvs) = r.train(&xv.as_tensor().conv2d(wv.as_tensor(), 0, stride, 1, 1).unwrap());
            (bs, Some((rms, rvs)))
        }
        _ => (xv.as_tensor().clone(), None),
    };
    let y = (b3 + short).unwrap().relu().unwrap();
    assert_eq!(y.dims(), ys.as_slice());
    let grads = (&y * &ct(&dy, &ys)).unwrap().sum_all().unwrap().backward().unwrap();
    let grad = |v: &Var| cvec(grads.get(v.as_tensor()).unwrap());

    // Tolerances. Every value is a chain of f32 reductions, each rounding by at most
    // sum_atol(its length) (values of order 1: inputs in [-1, 1), He-initialised convs keep
    // the variance near 1 and every BN renormalises to std 1 with |gamma| <= 1.5). Each stage
    // passes on the error it received with a gain of about 1 (BN divides by a batch std of
    // about 1), so the errors of a chain add up: sum_atol of the sum of the lengths, times 4
    // for gamma and a small batch std as in tests/residual_block.rs. Forward: conv1 sums cin
    // products, conv2 9 * planes, conv3 planes, the projection cin (in parallel; counted too).
    // Backward: it starts from the forward values, then the BN backwards sum over the pixels
    // of their layer (n * ho * wo for bn2, bn3 and the projection BN, n * h * w for bn1), the
    // data gradients over output channels and taps (cout for conv3 and the projection,
    // 9 * planes for conv2, planes for conv1), and the weight gradients over pixels.
    let pix_in = n * hw * hw;
    let pix_out = n * ys[2] * ys[3];
    let fwd_terms = 2 * cin + 9 * planes + planes;
    let bwd_terms = fwd_terms + 3 * pix_out + pix_in + 2 * cout + 9 * planes + planes + pix_in.max(pix_out);
    let fwd = 4.0 * sum_atol(fwd_terms, 1.0);
    let bwd = 4.0 * sum_atol(bwd_terms, 1.0);
    let tag = format!("n{n} {cin}->{planes}->{cout} {hw}x{hw} stride {stride}");
    let host = |t: &featreplay::Tensor| t.to_vec().unwrap();
    assert_close(&format!("block output {tag}"), &host(&y_gpu), &cvec(&y), 1e-5, fwd);
    assert_close(&format!("dx {tag}"), &host(&dx_gpu), &grad(&xv), 1e-4, bwd);
    assert_close(&format!("conv1 dW {tag}"), &host(&block.conv1.weight.grad), &grad(&w1v), 1e-4, bwd);
    assert_close(&format!("conv2 dW {tag}"), &host(&block.conv2.weight.grad), &grad(&w2v), 1e-4, bwd);
    assert_close(&format!("conv3 dW {tag}"), &host(&block.conv3.weight.grad), &grad(&w3v), 1e-4, bwd);
    let bns = [("bn1", &block.bn1, &r1), ("bn2", &block.bn2, &r2), ("bn3", &block.bn3, &r3)];
    for (name, layer, r) in bns {
        assert_close(&format!("{name} dgamma {tag}"), &host(&layer.gamma.grad), &grad(&r.gv), 1e-4, bwd);
        assert_close(&format!("{name} dbeta {tag}"), &host(&layer.beta.grad), &grad(&r.bv), 1e-4, bwd);
    }
    // Running statistics after one step.
    let runs = [("bn1", &block.bn1, &rm1, &rv1), ("bn2", &block.bn2, &rm2, &rv2), ("bn3", &block.bn3, &rm3, &rv3)];
    for (name, layer, rm, rv) in runs {
        assert_close(&format!("{name} running mean {tag}"), &host(&layer.running_mean), rm, 1e-5, fwd);
        assert_close(&format!("{name} running var {tag}"), &host(&layer.running_var), rv, 1e-5, fwd);
    }
    if let (Some(p), Some(wv), Some(r), Some((rms, rvs))) = (&block.downsample, &wsv, &rs, &run_s) {
        assert_close(&format!("downsample.0 dW {tag}"), &host(&p.conv.weight.grad), &grad(wv), 1e-4, bwd);
        assert_close(&format!("downsample.1 dgamma {tag}"), &host(&p.bn.gamma.grad), &grad(&r.gv), 1e-4, bwd);
        assert_close(&format!("downsample.1 dbeta {tag}"), &host(&p.bn.beta.grad), &grad(&r.bv), 1e-4, bwd);
        assert_close(&format!("downsample.1 running mean {tag}"), &host(&p.bn.running_mean), rms, 1e-5, fwd);
        assert_close(&format!("downsample.1 running var {tag}"), &host(&p.bn.running_var), rvs, 1e-5, fwd);
    }

    // Evaluation mode uses the running statistics: the same block in candle with BN in
    // evaluation form, from the running statistics checked above.
    let y_eval = block.forward_eval(&g.tensor(&xs, &x).unwrap()).unwrap();
    let xt = ct(&x, &xs);
    let e1 = r1.eval(&xt.conv2d(&ct(&w1, &ws1), 0, 1, 1, 1).unwrap(), &rm1, &rv1).relu().unwrap();
    let e2 = r2.eval(&e1.conv2d(&ct(&w2, &ws2), 1, stride, 1, 1).unwrap(), &rm2, &rv2).relu().unwrap();
    let e3 = r3.eval(&e2.conv2d(&ct(&w3, &ws3), 0, 1, 1, 1).unwrap(), &rm3, &rv3);
    let short = match (&ws, &rs, &run_s) {
        (Some(w), Some(r), Some((rms, rvs))) => r.eval(&xt.conv2d(&ct(w, &wss), 0, stride, 1, 1).unwrap(), rms, rvs),
        _ => xt.clone(),
    };
    let want_eval = (e3 + short).unwrap().relu().unwrap();
    // The running variance is about 0.9 + 0.1 * var, so eval-mode BN divides by about 1 too.
    assert_close(&format!("eval output {tag}"), &host(&y_eval), &cvec(&want_eval), 1e-5, fwd);
}

#[test]
fn identity_bottleneck_matches_candle() {
    check_block(3, 32, 8, 8, 1, 1);
}

#[test]
fn strided_projection_bottleneck_matches_candle() {
    check_block(2, 16, 8, 8, 2, 2);
}

#[test]
fn widening_projection_bottleneck_matches_candle() {
    // Stride 1 with a channel change (the first block of a stage after the stem).
    check_block(2, 16, 8, 6, 1, 3);
}

#[test]
fn awkward_bottleneck_matches_candle() {
    // Batch 1, odd spatial size 7x7 -> 4x4 (both the padded 3x3 and the unpadded 1x1 stride
    // 2 convs give ceil(7 / 2)), odd channel counts.
    check_block(1, 12, 5, 7, 2, 4);
    // Batch 1, 7x7, identity shortcut.
    check_block(1, 20, 5, 7, 1, 5);
}

#[test]
fn bottleneck_params_are_in_pytorch_order() {
    let g = gpu();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let block = Bottleneck::new(g, "layer2.0", 64, 32, 2, &mut rng).unwrap();
    let got: Vec<(String, Vec<usize>)> =
        block.params().iter().map(|p| (p.name.clone(), p.value.shape().to_vec())).collect();
    let want = [
        ("layer2.0.conv1.weight", vec![32, 64, 1, 1]),
        ("layer2.0.bn1.weight", vec![32]),
        ("layer2.0.bn1.bias", vec![32]),
        ("layer2.0.conv2.weight", vec![32, 32, 3, 3]),
        ("layer2.0.bn2.weight", vec![32]),
        ("layer2.0.bn2.bias", vec![32]),
        ("layer2.0.conv3.weight", vec![128, 32, 1, 1]),
        ("layer2.0.bn3.weight", vec![128]),
        ("layer2.0.bn3.bias", vec![128]),
        ("layer2.0.downsample.0.weight", vec![128, 64, 1, 1]),
        ("layer2.0.downsample.1.weight", vec![128]),
        ("layer2.0.downsample.1.bias", vec![128]),
    ];
    let want: Vec<(String, Vec<usize>)> = want.into_iter().map(|(n, s)| (n.to_string(), s)).collect();
    assert_eq!(got, want);
    // The identity block has no downsample parameters.
    let identity = Bottleneck::new(g, "layer2.1", 128, 32, 1, &mut rng).unwrap();
    assert_eq!(identity.params().len(), 9);
    assert!(identity.downsample.is_none());
}

#[test]
fn bottleneck_activations_hold_what_backward_needs() {
    // Activation bytes: x, c1, a1, c2, a2, c3, out (and the projection conv's output), plus
    // 3 floats per channel per BN; and a replay forward without running-stat updates leaves
    // the running statistics alone.
    let g = gpu();
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let (n, cin, planes, hw) = (2, 16, 8, 8);
    let block = Bottleneck::new(g, "b", cin, planes, 2, &mut rng).unwrap();
    let (x, _) = pair(&[n, cin, hw, hw], 9);
    let (_, acts) = block.forward_train(&x, false).unwrap();
    let bytes = |floats: usize| (4 * floats).div_ceil(16).max(1) as u64 * 16;
    let (cout, ho) = (4 * planes, hw / 2);
    let want = bytes(n * cin * hw * hw) // x
        + 2 * bytes(n * planes * hw * hw) // c1, a1
        + 2 * bytes(n * planes * ho * ho) // c2, a2
        + 3 * bytes(n * cout * ho * ho) // c3, projection conv output, out
        + 2 * bytes(3 * planes)
        + 2 * bytes(3 * cout);
    assert_eq!(acts.bytes(), want);
    for bn in [&block.bn1, &block.bn2, &block.bn3, &block.downsample.as_ref().unwrap().bn] {
        let c = bn.running_mean.numel();
        assert_eq!(bn.running_mean.to_vec().unwrap(), vec![0.0; c]);
        assert_eq!(bn.running_var.to_vec().unwrap(), vec![1.0; c]);
    }
}
