//! `shaders/cross_entropy.wgsl` against candle autograd (log-sum-exp from max, exp, sum and
//! log; candle-core only) for the loss and dlogits, and against plain Rust for the top-1 /
//! top-5 counts, including ties and fewer than 5 classes.

mod common;

use candle_core::Var;
use common::*;
use featreplay::kernels::cross_entropy::{self as ce, CrossEntropyOut};

const EPS: f32 = f32::EPSILON;

/// Labels from a seed, uniform over the classes.
fn random_labels(n: usize, c: usize, seed: u64) -> Vec<u32> {
    random(n, seed).iter().map(|&r| (((r + 1.0) / 2.0 * c as f32) as u32).min(c as u32 - 1)).collect()
}

/// The reference loss and dlogits from candle autograd:
/// loss = mean_n(log(sum_c exp(z - max z)) + max z - sum_c z * onehot).
fn candle_reference(z: &[f32], labels: &[u32], n: usize, c: usize) -> (f32, Vec<f32>) {
    let zv = Var::from_tensor(&ct(z, &[n, c])).unwrap();
    let mut onehot = vec![0f32; n * c];
    for (i, &l) in labels.iter().enumerate() {
        onehot[i * c + l as usize] = 1.0;
    }
    let z = zv.as_tensor();
    let m = z.max_keepdim(1).unwrap().detach();
    let lse = (z.broadcast_sub(&m).unwrap().exp().unwrap().sum_keepdim(1).unwrap().log().unwrap() + &m).unwrap();
    let picked = (z * ct(&onehot, &[n, c])).unwrap().sum_keepdim(1).unwrap();
    let loss = (lse - picked).unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    (loss.to_scalar::<f32>().unwrap(), cvec(grads.get(z).unwrap()))
}

/// (top-1, top-k) counts, k = min(5, C), with PyTorch's tie order (`argmax` / `topk` put the
/// lowest class index first): a label is within the top k when fewer than k classes rank
/// ahead of it (a greater logit, or an equal one at a lower index). A row with a non-finite
/// logit is never correct.
fn topk_reference(z: &[f32], labels: &[u32], c: usize) -> (f32, f32) {
    let k = c.min(5);
    let (mut top1, mut topk) = (0, 0);
    for (row, &l) in z.chunks(c).zip(labels) {
        if row.iter().any(|v| !v.is_finite()) {
            continue;
        }
        let zl = row[l as usize];
        let ahead = row.iter().enumerate().filter(|&(i, &v)| v > zl || (v == zl && i < l as usize)).count();
        top1 += (ahead < 1) as u32;
        topk += (ahead < k) as u32;
    }
    (top1 as f32, topk as f32)
}

fn read(out: &CrossEntropyOut) -> (f32, f32, f32) {
    out.read().unwrap()
}

/// Checks loss, dlogits and counts for logits `z` [n, c].
fn check(what: &str, z: &[f32], labels: &[u32], n: usize, c: usize) {
    let gz = gpu().tensor(&[n, c], z).unwrap();
    let gl = ce::labels_tensor(gpu(), labels, c).unwrap();
    let out = ce::forward_backward(&gz, &gl).unwrap();
    let (loss, top1, top5) = read(&out);
    let (want_loss, want_grad) = candle_reference(z, labels, n, c);

    // Per row, log(s) with s = sum of C terms in (0, 1] (the max term is exactly 1) errs by
    // the relative error of s: the exp's (a few ulps) plus summation, ~ eps * sqrt(C), and
    // m - z_l and the final addition by one rounding of |loss_n| each. The batch mean adds
    // ~ eps * sqrt(N) relative. So rtol 4 eps * (sqrt(N) + 2) and atol 4 eps * sqrt(C) (the
    // log's absolute error).
    let (nf, cf) = (n as f32, c as f32);
    assert_close(&format!("loss, {what}"), &[loss], &[want_loss], 4.0 * EPS * (nf.sqrt() + 2.0), 4.0 * EPS * cf.sqrt());

    // dlogits = (q - onehot) / N with q = exp(z - m) / s: relative error of q is that of the
    // exp (a few ulps) and of s (~ sqrt(C) ulps), and the label's q - 1 cancels to an
    // absolute error of about eps / N.
    let gdl = out.dlogits.as_ref().unwrap().to_vec().unwrap();
    assert_close(&format!("dlogits, {what}"), &gdl, &want_grad, 4.0 * EPS * (cf.sqrt() + 2.0), 2.0 * EPS / nf);

    // Counts are exact.
    let (want1, want5) = topk_reference(z, labels, c);
    assert_eq!((top1, top5), (want1, want5), "top-1 / top-5 counts, {what}");

    // The evaluation-only path gives the same loss and counts (same code, same order).
    let eval = ce::forward(&gz, &gl).unwrap();
    assert!(eval.dlogits.is_none());
    assert_eq!(read(&eval), (loss, top1, top5), "forward-only, {what}");
}

#[test]
fn matches_candle_random_logits() {
    for &n in &[1, 3, 128] {
        for (i, &c) in [1, 2, 4, 5, 10, 17, 100, 1000].iter().enumerate() {
            let seed = 100 * n as u64 + 10 * i as u64;
            // Logits in [-4, 4): a spread like a trained classifier's.
            let z: Vec<f32> = random(n * c, seed).iter().map(|v| 4.0 * v).collect();
            check(&format!("N={n} C={c}"), &z, &random_labels(n, c, seed + 1), n, c);
        }
    }
}

#[test]
fn stable_for_large_logits() {
    // exp(z) alone overflows f32 above 88.7: only a max-subtracted softmax survives.
    let (n, c) = (5, 7);
    let z: Vec<f32> = random(n * c, 7).iter().map(|v| 200.0 + 10.0 * v).collect();
    let gz = gpu().tensor(&[n, c], &z).unwrap();
    let labels = random_labels(n, c, 8);
    let out = ce::forward_backward(&gz, &ce::labels_tensor(gpu(), &labels, c).unwrap()).unwrap();
    let (loss, _, _) = read(&out);
    let (want, want_grad) = candle_reference(&z, &labels, n, c);
    // As in `check`, plus one rounding of m - z_l, whose operands are ~200 (ulp 1.5e-5)
    // while the difference is < 20: 200 * eps absolute per row.
    assert_close(
        "loss, logits ~ 200",
        &[loss],
        &[want],
        4.0 * EPS * 5f32.sqrt(),
        200.0 * EPS + 4.0 * EPS * 7f32.sqrt(),
    );
    // z - m is exact (Sterbenz: operands within a factor 2), so dlogits is as in `check`.
    let gdl = out.dlogits.unwrap().to_vec().unwrap();
    assert_close("dlogits, logits ~ 200", &gdl, &want_grad, 4.0 * EPS * (7f32.sqrt() + 2.0), 2.0 * EPS / n as f32);
}

#[test]
fn ties_and_few_classes() {
    // Logits on a coarse grid so rows hold many equal values; the label's own value is often
    // shared by others, which rank ahead of it when their class index is lower.
    for (i, &(n, c)) in [(64, 10), (64, 6), (32, 5), (32, 4), (16, 2), (8, 1), (128, 100)].iter().enumerate() {
        let seed = 500 + 10 * i as u64;
        let z: Vec<f32> = random(n * c, seed).iter().map(|v| (v * 2.0).round()).collect();
        check(&format!("ties, N={n} C={c}"), &z, &random_labels(n, c, seed + 1), n, c);
    }
    // A hand-made case: row 0 all equal, label 3 (classes 0-2 rank ahead: top-5 hit, top-1
    // miss); row 1 the label has six greater logits (miss); row 2 four greater and two equal
    // at lower indices (six ahead: miss); row 3 the label is the unique max (hit).
    let c = 7;
    #[rustfmt::skip]
    let z = [
        1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
        0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
        5.0, 5.0, 5.0, 5.0, 1.0, 1.0, 1.0,
        0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0,
    ];
    let labels = [3, 0, 6, 6];
    assert_eq!(topk_reference(&z, &labels, c), (1.0, 2.0));
    check("hand-made ties", &z, &labels, 4, c);
}

#[test]
fn out_of_range_labels() {
    let g = gpu();
    // Host side: a clear error naming the label.
    let err = ce::labels_tensor(g, &[0, 9, 10], 10).unwrap_err();
    assert!(err.to_string().contains("label 10 at position 2"), "{err}");
    assert!(ce::labels_tensor(g, &[0], 0).is_err());
    assert!(ce::labels_tensor(g, &[0, 9], 10).is_ok());

    // Device side (labels not from labels_tensor): invalid rows are ignored, no fault.
    let (n, c) = (6, 5);
    let z = random(n * c, 42);
    let gz = g.tensor(&[n, c], &z).unwrap();
    let bad = g.tensor(&[n], &[2.0, -1.0, 5.0, 1.5, f32::NAN, 1e30]).unwrap();
    let out = ce::forward_backward(&gz, &bad).unwrap();
    let (loss, top1, top5) = read(&out);
    let dl = out.dlogits.unwrap().to_vec().unwrap();
    assert!(dl[c..].iter().all(|&v| v == 0.0), "ignored rows get zero gradient");
    // Row 0 alone counts, and the mean still divides by N.
    let (want_loss, want_grad) = candle_reference(&z[..c], &[2], 1, c);
    assert_close("loss with ignored rows", &[loss], &[want_loss / n as f32], 4.0 * EPS * 3.0, 4.0 * EPS * 5f32.sqrt());
    let want_grad: Vec<f32> = want_grad.iter().map(|v| v / n as f32).collect();
    assert_close(
        "dlogits with ignored rows",
        &dl[..c],
        &want_grad,
        4.0 * EPS * (5f32.sqrt() + 2.0),
        2.0 * EPS / n as f32,
    );
    let (want1, want5) = topk_reference(&z[..c], &[2], c);
    assert_eq!((top1, top5), (want1, want5));
}

#[test]
fn bad_shapes_are_errors() {
    let g = gpu();
    let z = g.zeros(&[4, 3]).unwrap();
    let err = ce::forward_backward(&z, &g.zeros(&[3]).unwrap()).unwrap_err();
    assert!(err.to_string().contains("shape mismatch in cross_entropy"), "{err}");
    assert!(ce::forward_backward(&g.zeros(&[12]).unwrap(), &g.zeros(&[12]).unwrap()).is_err());
    assert!(ce::forward(&g.zeros(&[0, 3]).unwrap(), &g.zeros(&[0]).unwrap()).is_err());
    assert!(ce::forward(&g.zeros(&[2, 0]).unwrap(), &g.zeros(&[2]).unwrap()).is_err());
    // Uniform logits: loss = log(C) exactly up to rounding. A tie goes to the lowest class
    // index (PyTorch's argmax), so only the rows labelled 0 are top-1; all are within the
    // top 3.
    let out = ce::forward_backward(&z, &ce::labels_tensor(g, &[0, 1, 2, 0], 3).unwrap()).unwrap();
    let (loss, top1, top5) = out.read().unwrap();
    assert_close("uniform loss", &[loss], &[3f32.ln()], 4.0 * EPS, 0.0);
    assert_eq!((top1, top5), (2.0, 3.0 + 1.0));
}

#[test]
fn nan_logits_never_count_as_correct() {
    // A diverged net: row 0 all NaN, row 1 NaN at the label, row 2 one NaN elsewhere, row 3
    // finite and right. Only row 3 counts, for top-1 and top-5.
    let c = 6;
    let nan = f32::NAN;
    #[rustfmt::skip]
    let z = [
        nan, nan, nan, nan, nan, nan,
        0.0, nan, 0.0, 0.0, 0.0, 0.0,
        nan, 5.0, 0.0, 0.0, 0.0, 0.0,
        0.0, 0.0, 7.0, 0.0, 0.0, 0.0,
    ];
    let labels = [0u32, 1, 1, 2];
    let gz = gpu().tensor(&[4, c], &z).unwrap();
    let gl = ce::labels_tensor(gpu(), &labels, c).unwrap();
    let (loss, top1, top5) = read(&ce::forward(&gz, &gl).unwrap());
    assert!(loss.is_nan(), "the loss of NaN logits is NaN, got {loss}");
    assert_eq!((top1, top5), (1.0, 1.0), "only the finite row counts");
}

#[test]
fn ties_and_infinite_logits_never_favour_the_label() {
    // All-zero weights give all-equal logits: correct only for class 0, whatever the label
    // (with 10 classes, top-5 holds classes 0..4). An infinite bias at the label gives loss
    // NaN and must not count as correct either; -inf elsewhere too.
    let c = 10;
    let n = 10;
    let labels: Vec<u32> = (0..n as u32).collect();
    let g = gpu();
    let zeros = g.zeros(&[n, c]).unwrap();
    let (_, top1, top5) = read(&ce::forward(&zeros, &ce::labels_tensor(g, &labels, c).unwrap()).unwrap());
    assert_eq!((top1, top5), (1.0, 5.0), "a tie counts for the lowest class only");
    assert_eq!(topk_reference(&vec![0.0; n * c], &labels, c), (1.0, 5.0));

    let mut z = vec![0f32; n * c];
    for (i, &l) in labels.iter().enumerate() {
        z[i * c + l as usize] = f32::INFINITY;
    }
    z[c + 3] = f32::NEG_INFINITY;
    let gz = g.tensor(&[n, c], &z).unwrap();
    let (loss, top1, top5) = read(&ce::forward(&gz, &ce::labels_tensor(g, &labels, c).unwrap()).unwrap());
    assert!(!loss.is_finite(), "loss of infinite logits: {loss}");
    assert_eq!((top1, top5), (0.0, 0.0), "non-finite rows are never correct");

    // Ties in random data (logits rounded to a few values) against the reference.
    let (n, c) = (64, 7);
    let z: Vec<f32> = random(n * c, 9).iter().map(|v| (v * 2.0).round()).collect();
    let labels = random_labels(n, c, 10);
    let gz = g.tensor(&[n, c], &z).unwrap();
    let (_, top1, top5) = read(&ce::forward(&gz, &ce::labels_tensor(g, &labels, c).unwrap()).unwrap());
    assert_eq!((top1, top5), topk_reference(&z, &labels, c));
}

/// The metrics keep every batch's loss in order, also past their first allocation (1024
/// batches), and the sums stay exact.
#[test]
fn metrics_keep_every_batch_loss_past_the_first_allocation() {
    use featreplay::layers::loss::{LossOutput, MetricsAccumulator};
    let g = gpu();
    let mut acc = MetricsAccumulator::new(g).unwrap();
    let n = 1030;
    for i in 0..n {
        let out =
            LossOutput { loss: g.tensor(&[1], &[i as f32]).unwrap(), correct: g.tensor(&[2], &[1.0, 2.0]).unwrap() };
        acc.add(&out, 2).unwrap();
    }
    let m = acc.read().unwrap();
    assert_eq!(m.batch_losses, (0..n).map(|i| i as f32).collect::<Vec<_>>());
    assert_eq!(m.samples, 2 * n);
    assert_eq!(m.loss, (n - 1) as f64 / 2.0);
    assert_eq!((m.top1, m.top5), (0.5, 1.0));
}
