//! Splitting the flat layer list into K consecutive modules, and the planner's report.
//!
//! `even` is the reference code's rule: ceil(len / K) layers per module, the classifier with
//! the last one. `balanced` minimises the slowest module under a cost model (below).

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use super::ModelSpec;
use crate::error::{Error, Result};

/// How layers are assigned to modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitPolicy {
    Even,
    Balanced,
}

impl FromStr for SplitPolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<SplitPolicy> {
        match s.to_ascii_lowercase().as_str() {
            "even" => Ok(SplitPolicy::Even),
            "balanced" => Ok(SplitPolicy::Balanced),
            _ => Err(Error::InvalidConfig {
                op: "split",
                detail: format!("unknown split '{s}'; choose even or balanced"),
            }),
        }
    }
}

impl fmt::Display for SplitPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SplitPolicy::Even => "even",
            SplitPolicy::Balanced => "balanced",
        })
    }
}

/// The cost model, in FLOP-equivalents per sample.
///
/// A layer's time is modelled as compute plus memory traffic: forward FLOPs, backward twice
/// the forward (input and weight gradients), plus the bytes its activations move. Memory
/// traffic is converted at `FLOPS_PER_BYTE`, roughly a GPU's (and lavapipe's) ratio of
/// arithmetic to memory throughput, so that cheap but wide layers (BN, ReLU) are not free.
/// Under Features Replay every module but the last runs one more forward (play and replay),
/// so their forward counts twice; that makes the last module, which never replays, take a
/// larger share, as the paper suggests.
pub const FLOPS_PER_BYTE: f64 = 8.0;

fn layer_costs(spec: &ModelSpec) -> Result<Vec<(f64, f64)>> {
    Ok(spec
        .costs()?
        .iter()
        .map(|c| {
            let traffic = FLOPS_PER_BYTE * 4.0 * (c.kept_values as f64 + c.out_shape.iter().product::<usize>() as f64);
            let forward = c.forward_flops + traffic;
            let backward = 2.0 * c.forward_flops + 2.0 * traffic;
            (forward, backward)
        })
        .collect())
}

/// Per-sample cost of a module of layers `r` (FR: a non-last module also replays).
fn module_cost(costs: &[(f64, f64)], r: Range<usize>, last: bool) -> f64 {
    costs[r].iter().map(|(f, b)| if last { f + b } else { 2.0 * f + b }).sum()
}

/// Splits `spec` into `k` modules of consecutive layers.
pub fn split(spec: &ModelSpec, k: usize, policy: SplitPolicy) -> Result<Vec<Range<usize>>> {
    let n = spec.layers.len();
    if k < 1 || k > n {
        return Err(Error::InvalidConfig {
            op: "split",
            detail: format!("{k} modules: {} has {n} layers, so K must be between 1 and {n}", spec.name),
        });
    }
    match policy {
        SplitPolicy::Even => Ok(even(n, k)),
        SplitPolicy::Balanced => balanced(&layer_costs(spec)?, k),
    }
}

/// ceil(n / k) layers per module as the reference code does; when that would leave a
/// trailing module empty (e.g. 9 layers in 4 modules: 3, 3, 3, 0), module sizes differ by at
/// most one instead (3, 2, 2, 2), so every module has work.
fn even(n: usize, k: usize) -> Vec<Range<usize>> {
    let per = n.div_ceil(k);
    if per * (k - 1) < n {
        return (0..k).map(|i| i * per..((i + 1) * per).min(n)).collect();
    }
    let (base, extra) = (n / k, n % k);
    let mut start = 0;
    (0..k)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect()
}

/// Minimises the cost of the slowest module by dynamic programming over split points.
fn balanced(costs: &[(f64, f64)], k: usize) -> Result<Vec<Range<usize>>> {
    let n = costs.len();
    // best[j][i]: minimal max-cost of putting layers 0..i into j+1 modules, none of them last
    // unless j + 1 == k and i == n.
    let mut best = vec![vec![f64::INFINITY; n + 1]; k];
    let mut cut = vec![vec![0usize; n + 1]; k];
    for (i, b) in best[0].iter_mut().enumerate().skip(1) {
        *b = module_cost(costs, 0..i, k == 1 && i == n);
    }
    for j in 1..k {
        for i in (j + 1)..=n {
            let last = j + 1 == k && i == n;
            for s in j..i {
                let c = best[j - 1][s].max(module_cost(costs, s..i, last));
                if c < best[j][i] {
                    best[j][i] = c;
                    cut[j][i] = s;
                }
            }
        }
    }
    let mut ranges = Vec::with_capacity(k);
    let mut end = n;
    for j in (0..k).rev() {
        let start = if j == 0 { 0 } else { cut[j][end] };
        ranges.push(start..end);
        end = start;
    }
    ranges.reverse();
    if ranges.iter().any(|r| r.is_empty()) {
        return Err(Error::Internal { op: "split", detail: "balanced split left a module empty".into() });
    }
    Ok(ranges)
}

/// What `featreplay plan` prints for one module.
#[derive(Debug, Clone)]
pub struct StagePlan {
    pub index: usize,
    pub layers: Range<usize>,
    pub labels: Vec<String>,
    pub params: usize,
    /// Bytes the module keeps for one backward at the batch size (BP's activation memory).
    pub activation_bytes: u64,
    /// Bytes of the module's input at the batch size (what FR stores d_k + 1 times).
    pub input_bytes: u64,
    /// Estimated cost per iteration (FLOP-equivalents, see [`FLOPS_PER_BYTE`]).
    pub cost: f64,
    /// This module's share of the summed cost.
    pub cost_share: f64,
}

impl StagePlan {
    /// Device bytes one backprop step of this module holds at its peak: parameters with
    /// their gradients and momentum buffers, the kept activations and the input.
    pub fn training_bytes(&self) -> u64 {
        12 * self.params as u64 + self.activation_bytes + self.input_bytes
    }
}

/// Describes each module of a split at a batch size.
pub fn plan(spec: &ModelSpec, ranges: &[Range<usize>], batch: usize) -> Result<Vec<StagePlan>> {
    let costs = spec.costs()?;
    let lc = layer_costs(spec)?;
    let k = ranges.len();
    let total: f64 = ranges.iter().enumerate().map(|(i, r)| module_cost(&lc, r.clone(), i + 1 == k)).sum();
    ranges
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let input: usize = spec.input_of(r.start)?.iter().product();
            let cost = module_cost(&lc, r.clone(), i + 1 == k) * batch as f64;
            Ok(StagePlan {
                index: i,
                layers: r.clone(),
                labels: spec.layers[r.clone()].iter().map(|l| l.label()).collect(),
                params: costs[r.clone()].iter().map(|c| c.params).sum(),
                activation_bytes: 4 * batch as u64 * costs[r.clone()].iter().map(|c| c.kept_values as u64).sum::<u64>(),
                input_bytes: 4 * (batch * input) as u64,
                cost,
                cost_share: cost / (total * batch as f64),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::resnet::{build, ResNetConfig};

    fn resnet(depth: usize) -> ModelSpec {
        build(&ResNetConfig::basic(depth, &[3, 32, 32], 10)).unwrap()
    }

    #[test]
    fn even_follows_the_reference_rule() {
        assert_eq!(even(14, 4), vec![0..4, 4..8, 8..12, 12..14]);
        assert_eq!(even(14, 1), vec![0..14]);
        assert_eq!(even(9, 4), vec![0..3, 3..5, 5..7, 7..9]);
        assert_eq!(even(4, 4), vec![0..1, 1..2, 2..3, 3..4]);
    }

    #[test]
    fn splits_cover_every_layer_once() {
        let s = resnet(56);
        for k in 1..=8 {
            for p in [SplitPolicy::Even, SplitPolicy::Balanced] {
                let r = split(&s, k, p).unwrap();
                assert_eq!(r.len(), k);
                assert_eq!(r[0].start, 0);
                assert_eq!(r[k - 1].end, s.layers.len());
                assert!(r.windows(2).all(|w| w[0].end == w[1].start && !w[0].is_empty()));
            }
        }
    }

    #[test]
    fn balanced_is_no_worse_than_even() {
        let s = resnet(56);
        let lc = layer_costs(&s).unwrap();
        for k in 2..=4 {
            let worst = |r: &[Range<usize>]| {
                r.iter().enumerate().map(|(i, r)| module_cost(&lc, r.clone(), i + 1 == k)).fold(0.0, f64::max)
            };
            let e = worst(&split(&s, k, SplitPolicy::Even).unwrap());
            let b = worst(&split(&s, k, SplitPolicy::Balanced).unwrap());
            assert!(b <= e + 1e-6, "k={k}: balanced {b} > even {e}");
        }
    }

    #[test]
    fn bad_k_is_an_error() {
        let s = resnet(20);
        assert!(split(&s, 0, SplitPolicy::Even).unwrap_err().to_string().contains("K must be between 1 and 14"));
        assert!(split(&s, 15, SplitPolicy::Balanced).is_err());
        assert!("uneven".parse::<SplitPolicy>().is_err());
    }

    #[test]
    fn plan_reports_every_module() {
        let s = resnet(20);
        let r = split(&s, 2, SplitPolicy::Even).unwrap();
        let p = plan(&s, &r, 128).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].input_bytes, 4 * 128 * 3 * 32 * 32);
        assert_eq!(p.iter().map(|m| m.params).sum::<usize>(), s.params().unwrap());
        assert!((p.iter().map(|m| m.cost_share).sum::<f64>() - 1.0).abs() < 1e-9);
        assert!(p.iter().all(|m| m.activation_bytes > 0));
    }
}
