//! `shaders/sgd.wgsl` against torch.optim.SGD's update written out in plain Rust, over three
//! steps, for momentum on/off, Nesterov on/off, weight decay on/off and dampening, plus tiny
//! cases whose expected values are worked out by hand.

mod common;

use common::*;
use featreplay::kernels::sgd::{self, SgdConfig};
use featreplay::Tensor;

const EPS: f32 = f32::EPSILON;

/// torch.optim.SGD's `_single_tensor_sgd` for one tensor (maximize = False), in f32, with
/// each `x.add(y, alpha=a)` fused as PyTorch's CPU kernels do:
///   d = g + wd * p;  buf = first ? d : m * buf + (1 - dampening) * d;
///   d = nesterov ? d + m * buf : buf;  p = p - lr * d.
fn torch_step(p: &mut [f32], g: &[f32], buf: &mut [f32], cfg: &SgdConfig, first: bool) {
    let one_minus_dampening = (1.0 - cfg.dampening as f64) as f32;
    for i in 0..p.len() {
        let mut d = g[i];
        if cfg.weight_decay != 0.0 {
            d = p[i].mul_add(cfg.weight_decay, d);
        }
        if cfg.momentum != 0.0 {
            buf[i] = if first { d } else { d.mul_add(one_minus_dampening, buf[i] * cfg.momentum) };
            d = if cfg.nesterov { buf[i].mul_add(cfg.momentum, d) } else { buf[i] };
        }
        p[i] = d.mul_add(-cfg.lr, p[i]);
    }
}

fn cfg(lr: f32, momentum: f32, dampening: f32, weight_decay: f32, nesterov: bool) -> SgdConfig {
    SgdConfig { lr, momentum, dampening, weight_decay, nesterov }
}

/// Runs three steps (with learning rates `lrs`) on the device and in Rust and compares.
fn check(what: &str, n: usize, base: SgdConfig, seed: u64) {
    let g = gpu();
    let mut p = random(n, seed);
    // The buffer's contents before the first step must not matter (PyTorch has none yet).
    let mut buf = random(n, seed + 1);
    let buf0 = buf.clone();
    let (tp, tb) = (g.tensor(&[n], &p).unwrap(), g.tensor(&[n], &buf).unwrap());
    let mut max_buf = 0f32;
    for (s, lr) in [0.1, 0.05, 0.1].into_iter().enumerate() {
        let c = SgdConfig { lr, ..base };
        let grad = random(n, seed + 10 + s as u64);
        let tg = g.tensor(&[n], &grad).unwrap();
        sgd::step(&tp, &tg, &tb, &c, s == 0).unwrap();
        torch_step(&mut p, &grad, &mut buf, &c, s == 0);
        max_buf = buf.iter().fold(max_buf, |m, v| m.max(v.abs()));
    }
    // Each step rounds at most 4 times (decay, buffer, Nesterov, update), each time by at
    // most 1 ulp of a value no larger than M = max(1, |buf|) (the parameters, gradients and
    // lr * d stay below that) if the device does not fuse where PyTorch does; errors add up
    // over the 3 steps (momentum <= 0.9 damps them): 3 * 4 * eps * M.
    let atol = 12.0 * EPS * max_buf.max(1.0);
    assert_close(&format!("param, {what}, n={n}"), &tp.to_vec().unwrap(), &p, 0.0, atol);
    let got_buf = tb.to_vec().unwrap();
    if base.momentum == 0.0 {
        assert_eq!(got_buf, buf0, "momentum 0 leaves the buffer alone, {what}");
    } else {
        assert_close(&format!("momentum buffer, {what}, n={n}"), &got_buf, &buf, 0.0, atol);
    }
}

#[test]
fn matches_torch_semantics() {
    let configs = [
        ("plain", cfg(0.0, 0.0, 0.0, 0.0, false)),
        ("weight decay", cfg(0.0, 0.0, 0.0, 0.1, false)),
        ("momentum", cfg(0.0, 0.9, 0.0, 0.0, false)),
        ("momentum + decay", cfg(0.0, 0.9, 0.0, 5e-4, false)),
        ("nesterov", cfg(0.0, 0.9, 0.0, 0.0, true)),
        ("nesterov + decay", cfg(0.0, 0.9, 0.0, 0.1, true)),
        ("dampening", cfg(0.0, 0.9, 0.3, 0.0, false)),
        ("dampening + decay", cfg(0.0, 0.5, 0.9, 0.1, false)),
    ];
    for (i, (what, c)) in configs.iter().enumerate() {
        for (j, &n) in [1, 3, 4, 5, 1000, 4097].iter().enumerate() {
            check(what, n, *c, 100 * i as u64 + 10 * j as u64);
        }
    }
}

/// Three steps from p = 1 with a constant gradient of 0.5 on 5 elements (one full vec4
/// and a tail); returns (param, buffer) after each step.
fn three_steps(c: SgdConfig, buf_init: f32) -> Vec<(f32, f32)> {
    let g = gpu();
    let (p, grad, buf) = (
        g.tensor(&[5], &[1.0; 5]).unwrap(),
        g.tensor(&[5], &[0.5; 5]).unwrap(),
        g.tensor(&[5], &[buf_init; 5]).unwrap(),
    );
    (0..3)
        .map(|s| {
            sgd::step(&p, &grad, &buf, &c, s == 0).unwrap();
            let (pv, bv) = (p.to_vec().unwrap(), buf.to_vec().unwrap());
            assert!(pv.iter().all(|&v| v == pv[0]) && bv.iter().all(|&v| v == bv[0]), "all elements alike");
            (pv[0], bv[0])
        })
        .collect()
}

#[test]
fn hand_computed_cases() {
    // Every intermediate value below is a dyadic rational with a few significant bits, exact
    // in f32 whether or not the device fuses multiply-adds: the results must be exact.
    // lr = 0.5, momentum = 0.5, weight decay = 0.5, p0 = 1, g = 0.5, buffer starts at 7.
    //   step 1: d = 0.5 + 0.5*1 = 1;        buf = d = 1 (first step);     p = 1 - 0.5*1 = 0.5
    //   step 2: d = 0.5 + 0.5*0.5 = 0.75;   buf = 0.5*1 + 0.75 = 1.25;    p = 0.5 - 0.625 = -0.125
    //   step 3: d = 0.5 - 0.0625 = 0.4375;  buf = 0.625 + 0.4375 = 1.0625; p = -0.125 - 0.53125 = -0.65625
    assert_eq!(three_steps(cfg(0.5, 0.5, 0.0, 0.5, false), 7.0), [(0.5, 1.0), (-0.125, 1.25), (-0.65625, 1.0625)]);
    // The same with Nesterov: d += momentum * buf after the buffer update.
    //   step 1: d = 1;        buf = 1;                        d = 1 + 0.5 = 1.5;                p = 1 - 0.75 = 0.25
    //   step 2: d = 0.625;    buf = 0.5 + 0.625 = 1.125;      d = 0.625 + 0.5625 = 1.1875;      p = 0.25 - 0.59375 = -0.34375
    //   step 3: d = 0.328125; buf = 0.5625 + 0.328125 = 0.890625; d = 0.328125 + 0.4453125 = 0.7734375;
    //           p = -0.34375 - 0.38671875 = -0.73046875
    assert_eq!(
        three_steps(cfg(0.5, 0.5, 0.0, 0.5, true), 7.0),
        [(0.25, 1.0), (-0.34375, 1.125), (-0.73046875, 0.890625)]
    );
    // Dampening 0.5 applies from the second step on: buf = 0.5*buf + 0.5*d.
    //   step 1: d = 0.5; buf = 0.5 (not 0.25: no dampening on the first step); p = 1 - 0.25 = 0.75
    //   step 2: buf = 0.25 + 0.25 = 0.5; p = 0.5.  step 3: buf = 0.5; p = 0.25
    assert_eq!(three_steps(cfg(0.5, 0.5, 0.5, 0.0, false), 7.0), [(0.75, 0.5), (0.5, 0.5), (0.25, 0.5)]);
    // No momentum, weight decay 0.5: d = 0.5 + 0.5 p; the buffer is never touched.
    //   step 1: d = 1, p = 0.5.  step 2: d = 0.75, p = 0.125.  step 3: d = 0.5625, p = -0.15625
    assert_eq!(three_steps(cfg(0.5, 0.0, 0.0, 0.5, false), 7.0), [(0.5, 7.0), (0.125, 7.0), (-0.15625, 7.0)]);
}

#[test]
fn step_all_matches_single_steps() {
    let c = cfg(0.1, 0.9, 0.0, 5e-4, true);
    let shapes: [&[usize]; 3] = [&[16, 3, 3, 3], &[10], &[10, 64]];
    let make = |seed: u64| -> Vec<Tensor> {
        shapes.iter().enumerate().map(|(i, s)| pair(s, seed + i as u64).0).collect::<Vec<_>>()
    };
    let (pa, pb, grads, bufs_a, bufs_b) = (make(1), make(1), make(10), make(20), make(20));
    for first in [true, false] {
        let items: Vec<_> = (0..3).map(|i| (&pa[i], &grads[i], &bufs_a[i])).collect();
        sgd::step_all(&items, &c, first).unwrap();
        for i in 0..3 {
            sgd::step(&pb[i], &grads[i], &bufs_b[i], &c, first).unwrap();
        }
    }
    for i in 0..3 {
        // Same kernel, same inputs: bit-identical.
        assert_eq!(pa[i].to_vec().unwrap(), pb[i].to_vec().unwrap());
        assert_eq!(bufs_a[i].to_vec().unwrap(), bufs_b[i].to_vec().unwrap());
    }
    // A parameter listed twice is rejected before anything is updated.
    let before = pa[0].to_vec().unwrap();
    let err = sgd::step_all(&[(&pa[0], &grads[0], &bufs_a[0]), (&pa[0], &grads[1], &bufs_a[1])], &c, false);
    assert!(err.is_err());
    assert_eq!(pa[0].to_vec().unwrap(), before);
}

#[test]
fn invalid_configs_are_errors() {
    let g = gpu();
    let (p, gr, b) = (g.zeros(&[4]).unwrap(), g.zeros(&[4]).unwrap(), g.zeros(&[4]).unwrap());
    let bad = [
        ("nesterov with dampening", cfg(0.1, 0.9, 0.1, 0.0, true)),
        ("nesterov without momentum", cfg(0.1, 0.0, 0.0, 0.0, true)),
        ("negative lr", cfg(-0.1, 0.9, 0.0, 0.0, false)),
        ("negative momentum", cfg(0.1, -0.9, 0.0, 0.0, false)),
        ("negative weight decay", cfg(0.1, 0.9, 0.0, -1e-4, false)),
        ("NaN lr", cfg(f32::NAN, 0.9, 0.0, 0.0, false)),
        ("infinite dampening", cfg(0.1, 0.9, f32::INFINITY, 0.0, false)),
    ];
    for (what, c) in bad {
        let err = sgd::step(&p, &gr, &b, &c, true).unwrap_err();
        assert!(err.to_string().contains("unsupported sgd configuration"), "{what}: {err}");
        assert!(sgd::step_all(&[(&p, &gr, &b)], &c, true).is_err(), "{what}");
    }
    let err = sgd::step(&p, &gr, &b, &cfg(0.1, 0.9, 0.1, 0.0, true), false).unwrap_err();
    assert!(err.to_string().contains("Nesterov"), "{err}");
    // Valid: Nesterov with momentum and no dampening; dampening without Nesterov.
    assert!(sgd::step(&p, &gr, &b, &cfg(0.1, 0.9, 0.0, 0.0, true), true).is_ok());
    assert!(sgd::step(&p, &gr, &b, &cfg(0.1, 0.9, 0.5, 0.0, false), true).is_ok());
    // Shapes and aliasing.
    let err = sgd::step(&p, &g.zeros(&[5]).unwrap(), &b, &cfg(0.1, 0.9, 0.0, 0.0, false), true).unwrap_err();
    assert!(err.to_string().contains("shape mismatch in sgd"), "{err}");
    assert!(sgd::step(&p, &p, &b, &cfg(0.1, 0.9, 0.0, 0.0, false), true).is_err());
    assert!(sgd::step(
        &p,
        &gr,
        &p.reshape(&[2, 2]).unwrap().reshape(&[4]).unwrap(),
        &cfg(0.1, 0.9, 0.0, 0.0, false),
        true
    )
    .is_err());
}

/// Packed parameters (one buffer each for values, gradients and momentum) take one dispatch
/// and give bit-identical results to per-tensor steps; non-finite values are counted in the
/// slot of the parameter they belong to.
#[test]
fn packed_step_matches_single_steps_and_counts_per_parameter() {
    // A device of its own: other tests' dispatches would move the shared one's counters.
    let own = featreplay::Gpu::open_default().unwrap();
    let g = &own;
    let c = cfg(0.1, 0.9, 0.0, 5e-4, false);
    let shapes: Vec<Vec<usize>> = vec![vec![16, 3, 3, 3], vec![10], vec![10, 64], vec![3]];
    let n = Tensor::packed_len(g, &shapes);
    let (pv, gv, mv) = (g.zeros(&[n]).unwrap(), g.zeros(&[n]).unwrap(), g.zeros(&[n]).unwrap());
    let (p, gr, m) = (pv.views(&shapes).unwrap(), gv.views(&shapes).unwrap(), mv.views(&shapes).unwrap());
    let singles: Vec<(Tensor, Tensor, Tensor)> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let k = s.iter().product::<usize>();
            let (a, b) = (random(k, 1 + i as u64), random(k, 10 + i as u64));
            g.write(&p[i], &a).unwrap();
            g.write(&gr[i], &b).unwrap();
            (g.tensor(s, &a).unwrap(), g.tensor(s, &b).unwrap(), g.zeros(s).unwrap())
        })
        .collect();
    let chunk = (g.view_alignment() / 4) as usize;
    let mut slots = vec![0u32; n.div_ceil(chunk)];
    for (i, v) in p.iter().enumerate() {
        let first = v.byte_offset() as usize / 4 / chunk;
        let last = (v.byte_offset() as usize / 4 + v.numel()).div_ceil(chunk);
        slots[first..last].iter_mut().for_each(|s| *s = 3 * i as u32);
    }
    let bits: Vec<f32> = slots.iter().map(|&s| f32::from_bits(s)).collect();
    let slot_t = g.tensor(&[bits.len()], &bits).unwrap();
    let counters = featreplay::kernels::nonfinite::counters(g, 3 * shapes.len()).unwrap();
    for first in [true, false] {
        let before = g.counters();
        sgd::step_packed(&pv, &gv, &mv, &c, first, &counters, &slot_t, chunk).unwrap();
        assert_eq!((g.counters() - before).dispatches, 1);
        for (a, b, bu) in &singles {
            sgd::step(a, b, bu, &c, first).unwrap();
        }
    }
    for (i, (a, _, bu)) in singles.iter().enumerate() {
        assert_eq!(p[i].to_vec().unwrap(), a.to_vec().unwrap(), "parameter {i}");
        assert_eq!(m[i].to_vec().unwrap(), bu.to_vec().unwrap(), "momentum {i}");
    }
    assert!(featreplay::kernels::nonfinite::read_counters(&counters).unwrap().iter().all(|&x| x == 0));
    // One NaN in parameter 2's gradient: its gradient, value and momentum counters see it.
    let mut bad = random(640, 12);
    bad[5] = f32::NAN;
    g.write(&gr[2], &bad).unwrap();
    sgd::step_packed(&pv, &gv, &mv, &c, false, &counters, &slot_t, chunk).unwrap();
    let counts = featreplay::kernels::nonfinite::read_counters(&counters).unwrap();
    assert_eq!(&counts[6..9], &[1, 1, 1], "{counts:?}");
    assert_eq!(counts.iter().sum::<u32>(), 3, "{counts:?}");
    // A slot table too short for the values is refused.
    let short = g.tensor(&[1], &[0.0]).unwrap();
    assert!(sgd::step_packed(&pv, &gv, &mv, &c, false, &counters, &short, chunk).is_err());
}
