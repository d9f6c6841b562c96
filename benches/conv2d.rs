//! Conv2d benchmark: every variant's forward, backward-data and backward-filter against
//! candle-core (CPU) forward and forward+backward, on the CIFAR ResNet shapes (A-C) and the
//! same stages at 28x28 (D-F).
//!
//! Run: `cargo bench --bench conv2d` (`-- --quick` for fewer repetitions; `-- --tiles` adds a
//! row for every configuration of the tiled variant the device runs, each tile shape at each
//! K-tile depth; `CONV_BENCH_SHAPES=C` for the shapes whose label starts with C). Prints a markdown
//! table of GFLOP/s. Times on a shared 2-core CPU vary 20-30% from run to run, so candle runs
//! in the same process, interleaved with our kernels, and the ratios are what to compare.
//!
//! Before anything is timed, every variant's three passes are checked against candle's
//! forward and autograd gradients (llm.c's habit: a fast wrong kernel is worth nothing); a
//! mismatch aborts the bench with the pass, shape and worst element.

use std::time::Instant;

use candle_core::{Device, Tensor as CTensor, Var};
use featreplay::kernels::conv2d::{self, ConvPass, ConvShape, ConvVariant, TiledTile};
use featreplay::{Gpu, Result, Tensor};
use rand::{Rng, SeedableRng};

/// (label, input [N, C, H, W], weight [O, C, K, K], stride, pad)
type Case = (&'static str, [usize; 4], [usize; 4], usize, usize);

const SHAPES: &[Case] = &[
    ("A 3x3 s1", [128, 16, 32, 32], [16, 16, 3, 3], 1, 1),
    ("B 3x3 s1", [128, 32, 16, 16], [32, 32, 3, 3], 1, 1),
    ("C 3x3 s1", [128, 64, 8, 8], [64, 64, 3, 3], 1, 1),
    // The same stages at Fashion-MNIST's 28x28 (the embedded default data).
    ("D 3x3 s1", [128, 16, 28, 28], [16, 16, 3, 3], 1, 1),
    ("E 3x3 s1", [128, 32, 14, 14], [32, 32, 3, 3], 1, 1),
    ("F 3x3 s1", [128, 64, 7, 7], [64, 64, 3, 3], 1, 1),
    ("3x3 s2", [128, 16, 32, 32], [32, 16, 3, 3], 2, 1),
    ("1x1 s2", [128, 16, 32, 32], [32, 16, 1, 1], 2, 0),
];

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Who runs a pass: one variant, one tiled configuration, or the chooser (`conv2d::forward` etc.).
#[derive(Clone, Copy)]
enum Who {
    Variant(ConvVariant),
    Tile(TiledTile),
    Chooser,
}

struct Operands {
    s: ConvShape,
    x: Tensor,
    w: Tensor,
    dy: Tensor,
}

fn run_pass(who: Who, pass: ConvPass, o: &Operands) -> Result<Tensor> {
    let (s, st, p) = (&o.s, o.s.stride, o.s.pad);
    match (who, pass) {
        (Who::Variant(v), ConvPass::Forward) => conv2d::forward_with(v, &o.x, &o.w, st, p),
        (Who::Variant(v), ConvPass::BackwardData) => {
            conv2d::backward_data_with(v, &o.dy, &o.w, &s.input_shape(), st, p)
        }
        (Who::Variant(v), ConvPass::BackwardFilter) => {
            conv2d::backward_filter_with(v, &o.x, &o.dy, &s.weight_shape(), st, p)
        }
        (Who::Tile(t), pass) => {
            let (inputs, shape) = match pass {
                ConvPass::Forward => ([&o.x, &o.w], s.output_shape()),
                ConvPass::BackwardData => ([&o.dy, &o.w], s.input_shape()),
                ConvPass::BackwardFilter => ([&o.x, &o.dy], s.weight_shape()),
            };
            let out = o.x.gpu().empty(&shape)?;
            conv2d::run_tiled(t, pass, s, inputs, &out, false)?;
            Ok(out)
        }
        (Who::Chooser, ConvPass::Forward) => conv2d::forward(&o.x, &o.w, st, p),
        (Who::Chooser, ConvPass::BackwardData) => conv2d::backward_data(&o.dy, &o.w, &s.input_shape(), st, p),
        (Who::Chooser, ConvPass::BackwardFilter) => conv2d::backward_filter(&o.x, &o.dy, &s.weight_shape(), st, p),
    }
}

const PASSES: [ConvPass; 3] = [ConvPass::Forward, ConvPass::BackwardData, ConvPass::BackwardFilter];

/// Runs `who`'s pass once and waits; returns seconds or the error.
fn time_pass(gpu: &Gpu, who: Who, pass: ConvPass, o: &Operands) -> std::result::Result<f64, String> {
    gpu.time(|| run_pass(who, pass, o)).map(|(_, t)| t).map_err(|e| e.to_string())
}

/// Candle's forward, and forward + autograd backward (dx and dw of sum(y * g)), on the CPU.
struct Candle {
    s: ConvShape,
    x: Var,
    w: Var,
    g: CTensor,
}

impl Candle {
    fn new(s: ConvShape, xs: &[f32], ws: &[f32], gs: &[f32]) -> Candle {
        let t = |d: &[f32], shape: [usize; 4]| CTensor::from_slice(d, &shape, &Device::Cpu).unwrap();
        Candle {
            s,
            x: Var::from_tensor(&t(xs, s.input_shape())).unwrap(),
            w: Var::from_tensor(&t(ws, s.weight_shape())).unwrap(),
            g: t(gs, s.output_shape()),
        }
    }
    fn forward(&self) -> CTensor {
        self.x.as_tensor().conv2d(self.w.as_tensor(), self.s.pad, self.s.stride, 1, 1).unwrap()
    }
    fn forward_backward(&self) {
        let grads = (&self.forward() * &self.g).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(self.x.as_tensor()).is_some() && grads.get(self.w.as_tensor()).is_some());
    }
    /// The reference results (y, dx, dw) of L = sum(y * g), flattened.
    fn reference(&self) -> [Vec<f32>; 3] {
        let y = self.forward();
        let grads = (&y * &self.g).unwrap().sum_all().unwrap().backward().unwrap();
        let flat = |t: &CTensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        [flat(&y), flat(grads.get(self.x.as_tensor()).unwrap()), flat(grads.get(self.w.as_tensor()).unwrap())]
    }
}

/// Products summed per output of each pass (operands in [-1, 1]): sets the tolerance.
fn terms(s: &ConvShape, pass: ConvPass) -> usize {
    match pass {
        ConvPass::Forward => s.in_channels * s.kernel * s.kernel,
        ConvPass::BackwardData => s.out_channels * s.kernel.div_ceil(s.stride).pow(2),
        ConvPass::BackwardFilter => s.batch * s.out_h() * s.out_w(),
    }
}

/// Runs `who`'s pass once and compares it with candle's result: Err names the worst element.
/// Tolerance as in tests/conv2d.rs: 1e-5 relative plus 4 ulp of 1 per summed product.
fn validate(who: Who, pass: ConvPass, o: &Operands, want: &[f32]) -> std::result::Result<(), String> {
    let got = run_pass(who, pass, o).and_then(|t| t.to_vec()).map_err(|e| e.to_string())?;
    if got.len() != want.len() {
        return Err(format!("{} values, candle has {}", got.len(), want.len()));
    }
    let atol = 4.0 * f32::EPSILON * terms(&o.s, pass).max(1) as f32;
    let worst = got
        .iter()
        .zip(want)
        .enumerate()
        .map(|(i, (g, w))| {
            (i, *g, *w, if g.is_finite() { (g - w).abs() - (atol + 1e-5 * w.abs()) } else { f32::INFINITY })
        })
        .max_by(|a, b| a.3.total_cmp(&b.3));
    match worst {
        Some((i, g, w, excess)) if excess > 0.0 => {
            Err(format!("element {i}: {g} against candle's {w} (tolerance {:.3e})", atol + 1e-5 * w.abs()))
        }
        _ => Ok(()),
    }
}

impl Candle {
    /// Seconds of (forward, forward + backward).
    fn time(&self) -> (f64, f64) {
        let t0 = Instant::now();
        self.forward();
        let tf = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        self.forward_backward();
        (tf, t0.elapsed().as_secs_f64())
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let every_tile = std::env::args().any(|a| a == "--tiles");
    let reps = if quick { 3 } else { 7 };
    let gpu = Gpu::open_default().expect("a GPU adapter (lavapipe works)");
    println!("Adapter: {}", gpu.adapter());
    println!(
        "GFLOP/s (forward flops; each pass costs the same); fwd+bwd = 3 x forward flops over the summed \
         time of our three passes, candle's over its forward + autograd backward (dx and dw). \
         Median of {reps} runs; candle interleaved in the same process.\n"
    );
    println!(
        "| shape | variant | fwd | bwd-data | bwd-filter | fwd+bwd | candle fwd | candle fwd+bwd | fwd vs candle | fwd+bwd vs candle |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    // CONV_BENCH_SHAPES=C (a label prefix) runs only the matching shapes.
    let only: Option<String> = std::env::var("CONV_BENCH_SHAPES").ok();
    for (i, &(label, xshape, wshape, stride, pad)) in SHAPES.iter().enumerate() {
        if only.as_ref().is_some_and(|o| !label.starts_with(o.as_str())) {
            continue;
        }
        let s = ConvShape::new(&xshape, &wshape, stride, pad).unwrap();
        let seed = 100 * i as u64;
        let xs = random(s.input_shape().iter().product(), seed);
        let ws = random(s.weight_shape().iter().product(), seed + 1);
        let gs = random(s.output_shape().iter().product(), seed + 2);
        let o = Operands {
            s,
            x: gpu.tensor(&s.input_shape(), &xs).unwrap(),
            w: gpu.tensor(&s.weight_shape(), &ws).unwrap(),
            dy: gpu.tensor(&s.output_shape(), &gs).unwrap(),
        };
        let flops = s.flops();
        let gf = |t: f64| flops / t / 1e9;
        let chosen: Vec<String> = PASSES
            .iter()
            .map(|&p| conv2d::choose(&gpu, &s, p).map(|v| v.name().to_string()).unwrap_or_else(|e| e.to_string()))
            .collect();
        let tiles = if every_tile { conv2d::tiled_tiles(&gpu) } else { Vec::new() };
        let rows: Vec<(String, Who)> = ConvVariant::ALL
            .iter()
            .map(|&v| (v.name().to_string(), Who::Variant(v)))
            .chain(tiles.into_iter().map(|t| (format!("tiled {t}"), Who::Tile(t))))
            .chain(std::iter::once((format!("chosen ({})", chosen.join("/")), Who::Chooser)))
            .collect();
        let candle = Candle::new(s, &xs, &ws, &gs);
        // Correctness first (this also compiles the pipelines): a wrong result aborts the bench.
        let reference = candle.reference();
        for (name, who) in &rows {
            for (&pass, want) in PASSES.iter().zip(&reference) {
                if let Err(e) = validate(*who, pass, &o, want) {
                    eprintln!(
                        "conv2d bench: {name} {pass:?} of {label} {xshape:?}x{wshape:?} does not match candle: {e}"
                    );
                    std::process::exit(1);
                }
            }
        }
        candle.time();
        // Warm-up; a variant that fails keeps its first error.
        let mut errors: Vec<Option<String>> =
            rows.iter().map(|&(_, who)| PASSES.iter().find_map(|&p| time_pass(&gpu, who, p, &o).err())).collect();
        // Interleaved repetitions: candle and every variant see the same machine load.
        let (mut cf, mut cb) = (Vec::new(), Vec::new());
        let mut ours = vec![[Vec::new(), Vec::new(), Vec::new()]; rows.len()];
        for _ in 0..reps {
            let (f, b) = candle.time();
            cf.push(f);
            cb.push(b);
            for (r, &(_, who)) in rows.iter().enumerate() {
                // Candle's worker threads spin for a while after their work: let them park, so
                // they do not compete with the adapter's threads for the cores.
                std::thread::sleep(std::time::Duration::from_millis(50));
                for (i, &p) in PASSES.iter().enumerate() {
                    if errors[r].is_some() {
                        continue;
                    }
                    match time_pass(&gpu, who, p, &o) {
                        Ok(t) => ours[r][i].push(t),
                        Err(e) => errors[r] = Some(e),
                    }
                }
            }
        }
        let (cf, cb) = (median(cf), median(cb));
        let shape = format!("{label} {xshape:?}x{wshape:?}");
        for (r, (name, _)) in rows.iter().enumerate() {
            if let Some(e) = &errors[r] {
                println!("| {shape} | {name} | error: {e} | | | | {:.1} | {:.1} | | |", gf(cf), 3.0 * flops / cb / 1e9);
                continue;
            }
            let [tf, td, tw] = ours[r].clone().map(median);
            let total = tf + td + tw;
            println!(
                "| {shape} | {name} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2}x | {:.2}x |",
                gf(tf),
                gf(td),
                gf(tw),
                3.0 * flops / total / 1e9,
                gf(cf),
                3.0 * flops / cb / 1e9,
                cf / tf,
                cb / total
            );
        }
    }
}
