//! One whole basic residual block (conv-BN-ReLU-conv-BN + shortcut + ReLU), forward and
//! backward, against the same block written with candle ops and differentiated by candle's
//! autograd, from the same weights. Covers the identity and the option-A shortcut.

mod common;

use candle_core::{Tensor as CTensor, Var};
use common::*;
use featreplay::kernels::shortcut::ChannelPad;
use featreplay::layers::BasicBlock;
use rand::SeedableRng;

use common::reference::{bn_train, shortcut_a, EPS};

fn check_block(n: usize, cin: usize, cout: usize, hw: usize, stride: usize, pad: ChannelPad, seed: u64) {
    let g = gpu();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut block = BasicBlock::new(g, "layer", cin, cout, stride, pad, &mut rng).unwrap();
    // Non-trivial BN affine parameters, so their gradients and effect are checked.
    let g1 = random(cout, seed + 1).iter().map(|v| 1.0 + 0.5 * v).collect::<Vec<_>>();
    let b1 = random(cout, seed + 2);
    let g2 = random(cout, seed + 3).iter().map(|v| 1.0 + 0.5 * v).collect::<Vec<_>>();
    let b2 = random(cout, seed + 4);
    g.write(&block.bn1.gamma.value, &g1).unwrap();
    g.write(&block.bn1.beta.value, &b1).unwrap();
    g.write(&block.bn2.gamma.value, &g2).unwrap();
    g.write(&block.bn2.beta.value, &b2).unwrap();
    let w1 = block.conv1.weight.value.to_vec().unwrap();
    let w2 = block.conv2.weight.value.to_vec().unwrap();

    let xs = [n, cin, hw, hw];
    let x = random(xs.iter().product(), seed + 5);
    let (y_gpu, acts) = block.forward_train(&g.tensor(&xs, &x).unwrap(), true).unwrap();
    let ys = y_gpu.shape().to_vec();
    let dy = random(ys.iter().product(), seed + 6);
    let dx_gpu = block.backward(&acts, &g.tensor(&ys, &dy).unwrap()).unwrap();

    // The same block in candle.
    let xv = Var::from_tensor(&ct(&x, &xs)).unwrap();
    let w1v = Var::from_tensor(&ct(&w1, &[cout, cin, 3, 3])).unwrap();
    let w2v = Var::from_tensor(&ct(&w2, &[cout, cout, 3, 3])).unwrap();
    let g1v = Var::from_tensor(&ct(&g1, &[cout])).unwrap();
    let b1v = Var::from_tensor(&ct(&b1, &[cout])).unwrap();
    let g2v = Var::from_tensor(&ct(&g2, &[cout])).unwrap();
    let b2v = Var::from_tensor(&ct(&b2, &[cout])).unwrap();
    let c1 = xv.as_tensor().conv2d(w1v.as_tensor(), 1, stride, 1, 1).unwrap();
    let (bn1, m1, v1) = bn_train(&c1, g1v.as_tensor(), b1v.as_tensor());
    let a1 = bn1.relu().unwrap();
    let c2 = a1.conv2d(w2v.as_tensor(), 1, 1, 1, 1).unwrap();
    let (bn2, m2, v2) = bn_train(&c2, g2v.as_tensor(), b2v.as_tensor());
    let short =
        if stride == 1 && cin == cout { xv.as_tensor().clone() } else { shortcut_a(xv.as_tensor(), cout, stride, pad) };
    let y = (bn2 + short).unwrap().relu().unwrap();
    assert_eq!(y.dims(), ys.as_slice());
    let grads = (&y * &ct(&dy, &ys)).unwrap().sum_all().unwrap().backward().unwrap();
    let grad = |v: &Var| cvec(grads.get(v.as_tensor()).unwrap());

    // Tolerances: values pass through two convolutions (sums of 9 * channels products) and
    // two batch norms (which divide by a batch std of about 1); the backward adds sums over
    // the batch (n * h * w terms) for weight and BN gradients. Round-off of these f32 sums
    // is bounded by sum_atol of their lengths, and BN amplifies it by at most 1/std_min;
    // with |gamma| <= 1.5 we allow a further factor 4.
    let k1 = 9 * cin;
    let k2 = 9 * cout;
    let pix = n * ys[2] * ys[3];
    let fwd = 4.0 * sum_atol(k1.max(k2), 1.0);
    let bwd = 4.0 * sum_atol(pix.max(k2), 1.0);
    let tag = format!("n{n} {cin}->{cout} {hw}x{hw} stride {stride}");
    assert_close(&format!("block output {tag}"), &y_gpu.to_vec().unwrap(), &cvec(&y), 1e-5, fwd);
    assert_close(&format!("dx {tag}"), &dx_gpu.to_vec().unwrap(), &grad(&xv), 1e-4, bwd);
    assert_close(&format!("conv1 dW {tag}"), &block.conv1.weight.grad.to_vec().unwrap(), &grad(&w1v), 1e-4, bwd);
    assert_close(&format!("conv2 dW {tag}"), &block.conv2.weight.grad.to_vec().unwrap(), &grad(&w2v), 1e-4, bwd);
    assert_close(&format!("bn1 dgamma {tag}"), &block.bn1.gamma.grad.to_vec().unwrap(), &grad(&g1v), 1e-4, bwd);
    assert_close(&format!("bn1 dbeta {tag}"), &block.bn1.beta.grad.to_vec().unwrap(), &grad(&b1v), 1e-4, bwd);
    assert_close(&format!("bn2 dgamma {tag}"), &block.bn2.gamma.grad.to_vec().unwrap(), &grad(&g2v), 1e-4, bwd);
    assert_close(&format!("bn2 dbeta {tag}"), &block.bn2.beta.grad.to_vec().unwrap(), &grad(&b2v), 1e-4, bwd);
    // Running statistics after one step: 0.9 * (0, 1) + 0.1 * (mean, unbiased var).
    let run = |stat: &[f32], init: f32| stat.iter().map(|s| 0.9 * init + 0.1 * s).collect::<Vec<_>>();
    assert_close(
        &format!("bn1 running mean {tag}"),
        &block.bn1.running_mean.to_vec().unwrap(),
        &run(&m1, 0.0),
        1e-5,
        fwd,
    );
    assert_close(
        &format!("bn1 running var {tag}"),
        &block.bn1.running_var.to_vec().unwrap(),
        &run(&v1, 1.0),
        1e-5,
        fwd,
    );
    assert_close(
        &format!("bn2 running mean {tag}"),
        &block.bn2.running_mean.to_vec().unwrap(),
        &run(&m2, 0.0),
        1e-5,
        fwd,
    );
    assert_close(
        &format!("bn2 running var {tag}"),
        &block.bn2.running_var.to_vec().unwrap(),
        &run(&v2, 1.0),
        1e-5,
        fwd,
    );

    // Evaluation mode uses the running statistics: the same block in candle with BN in
    // evaluation form, from the running statistics checked above.
    let y_eval = block.forward_eval(&g.tensor(&xs, &x).unwrap()).unwrap();
    let bn_eval = |t: &CTensor, gamma: &[f32], beta: &[f32], mean: &[f32], var: &[f32]| {
        let s = |v: Vec<f32>| ct(&v, &[1, cout, 1, 1]);
        let scale: Vec<f32> = gamma.iter().zip(var).map(|(g, v)| g / (v + EPS as f32).sqrt()).collect();
        let shift: Vec<f32> = beta.iter().zip(mean).zip(&scale).map(|((b, m), s)| b - m * s).collect();
        t.broadcast_mul(&s(scale)).unwrap().broadcast_add(&s(shift)).unwrap()
    };
    let (rm1, rv1) = (run(&m1, 0.0), run(&v1, 1.0));
    let (rm2, rv2) = (run(&m2, 0.0), run(&v2, 1.0));
    let xt = ct(&x, &xs);
    let e1 = bn_eval(&xt.conv2d(&ct(&w1, &[cout, cin, 3, 3]), 1, stride, 1, 1).unwrap(), &g1, &b1, &rm1, &rv1);
    let e2 =
        bn_eval(&e1.relu().unwrap().conv2d(&ct(&w2, &[cout, cout, 3, 3]), 1, 1, 1, 1).unwrap(), &g2, &b2, &rm2, &rv2);
    let short = if stride == 1 && cin == cout { xt.clone() } else { shortcut_a(&xt, cout, stride, pad) };
    let want_eval = (e2 + short).unwrap().relu().unwrap();
    // The running variance is about 0.9 + 0.1 * var, so eval-mode BN divides by about 1 too.
    assert_close(&format!("eval output {tag}"), &y_eval.to_vec().unwrap(), &cvec(&want_eval), 1e-5, fwd);
}

#[test]
fn identity_block_matches_candle() {
    check_block(3, 16, 16, 8, 1, ChannelPad::Both, 1);
}

#[test]
fn downsampling_block_matches_candle() {
    check_block(2, 16, 32, 8, 2, ChannelPad::Both, 2);
}

#[test]
fn downsampling_block_with_zero_channels_after_matches_candle() {
    // The reference FR code's layout: the 16 input channels first, the 16 zero channels after.
    check_block(2, 16, 32, 8, 2, ChannelPad::After, 2);
}

#[test]
fn awkward_block_matches_candle() {
    // Odd spatial size and a small odd batch, with option-A padding of 2 channels each side.
    check_block(1, 6, 10, 7, 2, ChannelPad::Both, 3);
}
