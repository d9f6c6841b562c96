//! `shaders/nonfinite.wgsl` against a plain Rust count of NaN and infinite values, on sizes
//! that are and are not multiples of 4 (the kernel reads vec4s and must not count padding),
//! with every kind of non-finite value, into several slots of one counter buffer; and the
//! watched SGD step (`sgd::step_watched`), which must update exactly as `sgd::step` and
//! count the non-finite values of the gradient, the new parameter and the new momentum.

mod common;

use common::*;
use featreplay::kernels::nonfinite;
use featreplay::kernels::sgd::{self, SgdConfig};

fn reference(x: &[f32]) -> u32 {
    x.iter().filter(|v| !v.is_finite()).count() as u32
}

/// Random data with non-finite values at pseudo-random places (`every`-th on average).
fn poisoned(n: usize, seed: u64, every: usize) -> Vec<f32> {
    let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN, f32::from_bits(0x7f80_0001)];
    random(n, seed)
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(seed) >> 33;
            if (h as usize).is_multiple_of(every) {
                specials[(h as usize / every) % specials.len()]
            } else {
                v * 1e30
            }
        })
        .collect()
}

#[test]
fn counts_match_a_plain_count() {
    let g = gpu();
    let sizes = [1usize, 3, 4, 5, 255, 1024, 1027, 70_001];
    let counters = nonfinite::counters(g, sizes.len() + 1).unwrap();
    let mut want = vec![0u32; sizes.len() + 1];
    for (slot, &n) in sizes.iter().enumerate() {
        let x = poisoned(n, slot as u64, 7);
        want[slot] = reference(&x);
        nonfinite::count(&g.tensor(&[n], &x).unwrap(), &counters, slot).unwrap();
    }
    // Counts add up across dispatches into one slot; finite data (huge but finite values,
    // subnormals, zeros) adds nothing.
    let last = sizes.len();
    let finite = [f32::MAX, -f32::MAX, f32::MIN_POSITIVE / 4.0, 0.0, -0.0, 1e-45];
    nonfinite::count(&g.tensor(&[finite.len()], &finite).unwrap(), &counters, last).unwrap();
    let x = poisoned(999, 77, 3);
    nonfinite::count(&g.tensor(&[999], &x).unwrap(), &counters, last).unwrap();
    nonfinite::count(&g.tensor(&[999], &x).unwrap(), &counters, last).unwrap();
    want[last] = 2 * reference(&x);
    assert!(want.iter().all(|&w| w > 0), "every case has something to find: {want:?}");
    assert_eq!(nonfinite::read_counters(&counters).unwrap(), want);
    // An empty tensor counts nothing and is no error.
    nonfinite::count(&g.zeros(&[0]).unwrap(), &counters, 0).unwrap();
    assert_eq!(nonfinite::read_counters(&counters).unwrap()[0], want[0]);
}

#[test]
fn bad_slots_and_devices_are_errors() {
    let g = gpu();
    let counters = nonfinite::counters(g, 2).unwrap();
    let x = g.zeros(&[8]).unwrap();
    let err = nonfinite::count(&x, &counters, 2).unwrap_err();
    assert!(err.to_string().contains("counter slot 2"), "{err}");
    assert!(nonfinite::count(&counters, &counters, 0).is_err(), "a buffer cannot count itself");
    assert!(nonfinite::counters(g, 0).is_err());
}

#[test]
fn watched_sgd_updates_like_sgd_and_counts_what_it_writes() {
    let g = gpu();
    let cfg = SgdConfig { lr: 0.1, momentum: 0.9, dampening: 0.0, weight_decay: 5e-4, nesterov: true };
    let n = 1031;
    let p0 = random(n, 1);
    let mut grad = random(n, 2);
    // Poison some gradient values: the parameter and momentum at those places turn NaN too.
    for i in [0usize, 17, 1030] {
        grad[i] = f32::NAN;
    }
    grad[500] = f32::INFINITY;
    let buf0 = random(n, 3);
    let run = |watched: bool| {
        let (p, gr, b) = (g.tensor(&[n], &p0).unwrap(), g.tensor(&[n], &grad).unwrap(), g.tensor(&[n], &buf0).unwrap());
        let counters = nonfinite::counters(g, 5).unwrap();
        for first in [true, false] {
            if watched {
                sgd::step_watched(&p, &gr, &b, &cfg, first, &counters, 2).unwrap();
            } else {
                sgd::step(&p, &gr, &b, &cfg, first).unwrap();
            }
        }
        (p.to_vec().unwrap(), b.to_vec().unwrap(), nonfinite::read_counters(&counters).unwrap())
    };
    let (p_plain, b_plain, _) = run(false);
    let (p_watch, b_watch, counts) = run(true);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&p_watch), bits(&p_plain), "the watched step updates exactly as the plain one");
    assert_eq!(bits(&b_watch), bits(&b_plain));
    // Two steps: each counts 4 bad gradient values, and the parameter and buffer values
    // they poisoned (4 each after the first step, still 4 after the second).
    assert_eq!(counts, vec![0, 0, 8, 8, 8], "slots 2, 3, 4: gradient, parameter, momentum");
    assert_eq!(reference(&p_watch), 4);
    // Slot bounds are checked: a step needs three counters from its slot on.
    let counters = nonfinite::counters(g, 3).unwrap();
    let t = g.zeros(&[4]).unwrap();
    let (gr, b) = (g.zeros(&[4]).unwrap(), g.zeros(&[4]).unwrap());
    assert!(sgd::step_watched(&t, &gr, &b, &cfg, true, &counters, 1).is_err());
    assert!(sgd::step_watched(&t, &gr, &b, &cfg, true, &counters, 0).is_ok());
}
