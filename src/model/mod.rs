//! Models as a flat list of layers, split into K consecutive modules (stages).
//!
//! A model is first described ([`ModelSpec`]: layer specs with shapes and costs, no device
//! memory), then each stage's slice of layers is instantiated on that stage's device
//! ([`Stage`]). Weights are initialised from a per-layer seed, so a model split over K
//! devices starts from exactly the weights of the unsplit model.
//!
//! Layers know kernels; stages and the training schedules know layers only.

pub mod resnet;
pub mod split;

use std::sync::atomic::AtomicU64;

use rand::SeedableRng;

use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::kernels::batch_norm::BnSaved;
use crate::kernels::sgd::SgdConfig;
use crate::kernels::shortcut::ChannelPad;
use crate::layers::bottleneck::{Bottleneck, BottleneckActivations, EXPANSION};
use crate::layers::watch::{self, FiniteWatch};
use crate::layers::{pooling, relu};
use crate::layers::{BasicBlock, BasicBlockActivations, BatchNorm2d, Conv2d, Linear, Param};

pub use resnet::{Arch, ResNetConfig};
pub use split::{plan, split, SplitPolicy, StagePlan};

/// One layer of the flat list, before it has any device memory.
#[derive(Debug, Clone, PartialEq)]
pub enum LayerSpec {
    /// A bias-free square convolution (the stem).
    Conv {
        name: String,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        pad: usize,
    },
    BatchNorm {
        name: String,
        channels: usize,
    },
    Relu,
    /// A basic residual block with the option-A shortcut at stride or width changes.
    Basic {
        name: String,
        in_channels: usize,
        out_channels: usize,
        stride: usize,
        /// Where that shortcut puts its zero channels.
        shortcut_pad: ChannelPad,
    },
    /// A bottleneck block (expansion 4) with the 1x1 conv + BN projection shortcut.
    Bottleneck {
        name: String,
        in_channels: usize,
        planes: usize,
        stride: usize,
    },
    /// Global average pool, [N, C, H, W] -> [N, C].
    GlobalAvgPool,
    /// The classifier.
    Linear {
        name: String,
        in_features: usize,
        out_features: usize,
    },
}

fn conv_out(size: usize, kernel: usize, stride: usize, pad: usize) -> usize {
    (size + 2 * pad - kernel) / stride + 1
}

/// Per-sample output shape of a layer (without the batch dimension), its multiply-adds
/// times two per sample for the forward pass, its parameter count, and the f32 values per
/// sample its backward keeps from the forward (the cost model of the planner).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerCost {
    pub out_shape: Vec<usize>,
    pub forward_flops: f64,
    pub params: usize,
    pub kept_values: usize,
}

impl LayerSpec {
    /// A short human name for plans and errors.
    pub fn label(&self) -> String {
        match self {
            LayerSpec::Conv { name, kernel, in_channels, out_channels, .. } => {
                format!("{name} conv{kernel}x{kernel} {in_channels}->{out_channels}")
            }
            LayerSpec::BatchNorm { name, .. } => format!("{name} bn"),
            LayerSpec::Relu => "relu".into(),
            LayerSpec::Basic { name, in_channels, out_channels, stride, .. } => {
                format!("{name} basic {in_channels}->{out_channels}/{stride}")
            }
            LayerSpec::Bottleneck { name, in_channels, planes, stride } => {
                format!("{name} bottleneck {in_channels}->{}/{stride}", planes * EXPANSION)
            }
            LayerSpec::GlobalAvgPool => "avgpool".into(),
            LayerSpec::Linear { name, in_features, out_features } => {
                format!("{name} linear {in_features}->{out_features}")
            }
        }
    }

    /// Shape and cost for a per-sample input shape; errors when the input does not fit.
    pub fn cost(&self, input: &[usize]) -> Result<LayerCost> {
        let bad = |want: String| Error::ShapeMismatch {
            op: "model",
            detail: format!("layer '{}' expects {want}, gets per-sample input {input:?}", self.label()),
        };
        let chw = |c: usize| -> Result<(usize, usize)> {
            match input {
                [ic, h, w] if *ic == c => Ok((*h, *w)),
                _ => Err(bad(format!("[{c}, H, W]"))),
            }
        };
        let conv = |cin: usize, cout: usize, k: usize, s: usize, p: usize, h: usize, w: usize| {
            let (oh, ow) = (conv_out(h, k, s, p), conv_out(w, k, s, p));
            (oh, ow, 2.0 * (cout * oh * ow * cin * k * k) as f64)
        };
        Ok(match self {
            LayerSpec::Conv { in_channels, out_channels, kernel, stride, pad, .. } => {
                let (h, w) = chw(*in_channels)?;
                if h + 2 * pad < *kernel || w + 2 * pad < *kernel {
                    return Err(bad(format!("an input of at least {kernel}x{kernel} pixels")));
                }
                let (oh, ow, f) = conv(*in_channels, *out_channels, *kernel, *stride, *pad, h, w);
                LayerCost {
                    out_shape: vec![*out_channels, oh, ow],
                    forward_flops: f,
                    params: out_channels * in_channels * kernel * kernel,
                    kept_values: in_channels * h * w,
                }
            }
            LayerSpec::BatchNorm { channels, .. } => {
                let (h, w) = chw(*channels)?;
                let n = channels * h * w;
                LayerCost {
                    out_shape: input.to_vec(),
                    forward_flops: 4.0 * n as f64,
                    params: 2 * channels,
                    kept_values: n,
                }
            }
            LayerSpec::Relu => {
                let n: usize = input.iter().product();
                LayerCost { out_shape: input.to_vec(), forward_flops: n as f64, params: 0, kept_values: n }
            }
            LayerSpec::Basic { in_channels, out_channels, stride, .. } => {
                let (h, w) = chw(*in_channels)?;
                let (oh, ow, f1) = conv(*in_channels, *out_channels, 3, *stride, 1, h, w);
                let (_, _, f2) = conv(*out_channels, *out_channels, 3, 1, 1, oh, ow);
                let out = out_channels * oh * ow;
                LayerCost {
                    out_shape: vec![*out_channels, oh, ow],
                    forward_flops: f1 + f2 + 12.0 * out as f64,
                    params: 9 * out_channels * (in_channels + out_channels) + 4 * out_channels,
                    // x, c1, a1, c2, out (see BasicBlockActivations)
                    kept_values: in_channels * h * w + 4 * out,
                }
            }
            LayerSpec::Bottleneck { in_channels, planes, stride, .. } => {
                let (h, w) = chw(*in_channels)?;
                let out_c = planes * EXPANSION;
                let (_, _, f1) = conv(*in_channels, *planes, 1, 1, 0, h, w);
                let (oh, ow, f2) = conv(*planes, *planes, 3, *stride, 1, h, w);
                let (_, _, f3) = conv(*planes, out_c, 1, 1, 0, oh, ow);
                let project = *stride != 1 || *in_channels != out_c;
                let fp = if project { conv(*in_channels, out_c, 1, *stride, 0, h, w).2 } else { 0.0 };
                let out = out_c * oh * ow;
                LayerCost {
                    out_shape: vec![out_c, oh, ow],
                    forward_flops: f1 + f2 + f3 + fp + 12.0 * out as f64,
                    params: in_channels * planes
                        + 9 * planes * planes
                        + planes * out_c
                        + 4 * planes
                        + 2 * out_c
                        + if project { in_channels * out_c + 2 * out_c } else { 0 },
                    // x, c1, a1 (h x w), c2, a2, c3, out (oh x ow), projection output
                    kept_values: in_channels * h * w
                        + 2 * planes * h * w
                        + 2 * planes * oh * ow
                        + 2 * out
                        + if project { out } else { 0 },
                }
            }
            LayerSpec::GlobalAvgPool => match input {
                [c, h, w] => {
                    LayerCost { out_shape: vec![*c], forward_flops: (c * h * w) as f64, params: 0, kept_values: 0 }
                }
                _ => return Err(bad("[C, H, W]".into())),
            },
            LayerSpec::Linear { in_features, out_features, .. } => {
                if input != [*in_features] {
                    return Err(bad(format!("[{in_features}]")));
                }
                LayerCost {
                    out_shape: vec![*out_features],
                    forward_flops: 2.0 * (in_features * out_features) as f64,
                    params: in_features * out_features + out_features,
                    kept_values: *in_features,
                }
            }
        })
    }
}

/// A whole model: its layers and the per-sample input shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    /// Per-sample input shape [C, H, W].
    pub input: Vec<usize>,
    pub classes: usize,
    pub layers: Vec<LayerSpec>,
}

impl ModelSpec {
    /// Every layer's cost in order, checking that the shapes chain.
    pub fn costs(&self) -> Result<Vec<LayerCost>> {
        let mut shape = self.input.clone();
        let mut out = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let c = l.cost(&shape)?;
            shape = c.out_shape.clone();
            out.push(c);
        }
        if shape != [self.classes] {
            return Err(Error::ShapeMismatch {
                op: "model",
                detail: format!("{} ends with shape {shape:?}, not [{}] logits", self.name, self.classes),
            });
        }
        Ok(out)
    }

    /// Total parameter count.
    pub fn params(&self) -> Result<usize> {
        Ok(self.costs()?.iter().map(|c| c.params).sum())
    }

    /// Per-sample input shape of layer `i`.
    pub fn input_of(&self, i: usize) -> Result<Vec<usize>> {
        let costs = self.costs()?;
        Ok(if i == 0 { self.input.clone() } else { costs[i - 1].out_shape.clone() })
    }
}

/// A layer with device memory.
pub enum Layer {
    Conv(Conv2d),
    BatchNorm(BatchNorm2d),
    Relu,
    Basic(Box<BasicBlock>),
    Bottleneck(Box<Bottleneck>),
    GlobalAvgPool,
    Linear(Linear),
}

/// What one layer's backward needs from its forward.
pub enum LayerActivations {
    Conv { x: Tensor },
    BatchNorm { x: Tensor, saved: BnSaved },
    Relu { y: Tensor },
    Basic(Box<BasicBlockActivations>),
    Bottleneck(Box<BottleneckActivations>),
    GlobalAvgPool { in_shape: Vec<usize> },
    Linear { x: Tensor },
}

impl LayerActivations {
    /// Device bytes held (tensors shared with a neighbour's activations count in both).
    pub fn bytes(&self) -> u64 {
        match self {
            LayerActivations::Conv { x } | LayerActivations::Linear { x } => x.buffer_bytes(),
            LayerActivations::BatchNorm { x, saved } => x.buffer_bytes() + saved.stats.buffer_bytes(),
            LayerActivations::Relu { y } => y.buffer_bytes(),
            LayerActivations::Basic(a) => a.bytes(),
            LayerActivations::Bottleneck(a) => a.bytes(),
            LayerActivations::GlobalAvgPool { .. } => 0,
        }
    }
}

/// A seed for layer `index` of a model seeded with `seed`, independent of the split.
fn layer_seed(seed: u64, index: usize) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(index as u64).rotate_left(17) ^ 0x5851_F42D_4C95_7F2D
}

impl Layer {
    /// Instantiates `spec` on `gpu`, initialised from (seed, index).
    pub fn new(gpu: &Gpu, spec: &LayerSpec, seed: u64, index: usize) -> Result<Layer> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(layer_seed(seed, index));
        Ok(match spec {
            LayerSpec::Conv { name, in_channels, out_channels, kernel, stride, pad } => {
                Layer::Conv(Conv2d::new(gpu, name, *in_channels, *out_channels, *kernel, *stride, *pad, &mut rng)?)
            }
            LayerSpec::BatchNorm { name, channels } => Layer::BatchNorm(BatchNorm2d::new(gpu, name, *channels)?),
            LayerSpec::Relu => Layer::Relu,
            LayerSpec::Basic { name, in_channels, out_channels, stride, shortcut_pad } => Layer::Basic(Box::new(
                BasicBlock::new(gpu, name, *in_channels, *out_channels, *stride, *shortcut_pad, &mut rng)?,
            )),
            LayerSpec::Bottleneck { name, in_channels, planes, stride } => {
                Layer::Bottleneck(Box::new(Bottleneck::new(gpu, name, *in_channels, *planes, *stride, &mut rng)?))
            }
            LayerSpec::GlobalAvgPool => Layer::GlobalAvgPool,
            LayerSpec::Linear { name, in_features, out_features } => {
                Layer::Linear(Linear::new(gpu, name, *in_features, *out_features, &mut rng)?)
            }
        })
    }

    /// Training-mode forward keeping what backward needs. `update_running` says whether BN
    /// running statistics are updated by this pass.
    pub fn forward_train(&self, x: &Tensor, update_running: bool) -> Result<(Tensor, LayerActivations)> {
        Ok(match self {
            Layer::Conv(c) => (c.forward(x)?, LayerActivations::Conv { x: x.clone() }),
            Layer::BatchNorm(b) => {
                let (y, saved) = b.forward_train(x, update_running)?;
                (y, LayerActivations::BatchNorm { x: x.clone(), saved })
            }
            Layer::Relu => {
                let y = relu::forward(x)?;
                (y.clone(), LayerActivations::Relu { y })
            }
            Layer::Basic(b) => {
                let (y, a) = b.forward_train(x, update_running)?;
                (y, LayerActivations::Basic(Box::new(a)))
            }
            Layer::Bottleneck(b) => {
                let (y, a) = b.forward_train(x, update_running)?;
                (y, LayerActivations::Bottleneck(Box::new(a)))
            }
            Layer::GlobalAvgPool => {
                (pooling::global_avg_forward(x)?, LayerActivations::GlobalAvgPool { in_shape: x.shape().to_vec() })
            }
            Layer::Linear(l) => (l.forward(x)?, LayerActivations::Linear { x: x.clone() }),
        })
    }

    /// Evaluation-mode forward (running BN statistics), keeping nothing.
    pub fn forward_eval(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Layer::Conv(c) => c.forward(x),
            Layer::BatchNorm(b) => b.forward_eval(x),
            Layer::Relu => relu::forward(x),
            Layer::Basic(b) => b.forward_eval(x),
            Layer::Bottleneck(b) => b.forward_eval(x),
            Layer::GlobalAvgPool => pooling::global_avg_forward(x),
            Layer::Linear(l) => l.forward(x),
        }
    }

    /// Writes the parameter gradients; returns the input gradient when `need_dx`.
    pub fn backward(&mut self, acts: &LayerActivations, dy: &Tensor, need_dx: bool) -> Result<Option<Tensor>> {
        let mismatch = || Error::ShapeMismatch { op: "model", detail: "activations of another layer kind".into() };
        Ok(match (self, acts) {
            (Layer::Conv(c), LayerActivations::Conv { x }) => {
                if need_dx {
                    Some(c.backward(x, dy)?)
                } else {
                    c.backward_weight(x, dy)?;
                    None
                }
            }
            (Layer::BatchNorm(b), LayerActivations::BatchNorm { x, saved }) => Some(b.backward(x, dy, saved)?),
            (Layer::Relu, LayerActivations::Relu { y }) => Some(relu::backward(y, dy)?),
            (Layer::Basic(b), LayerActivations::Basic(a)) => Some(b.backward(a, dy)?),
            (Layer::Bottleneck(b), LayerActivations::Bottleneck(a)) => Some(b.backward(a, dy)?),
            (Layer::GlobalAvgPool, LayerActivations::GlobalAvgPool { in_shape }) => {
                Some(pooling::global_avg_backward(dy, in_shape)?)
            }
            (Layer::Linear(l), LayerActivations::Linear { x }) => Some(l.backward(x, dy)?),
            _ => return Err(mismatch()),
        })
    }

    /// [`Self::params`], mutable.
    pub fn params_mut(&mut self) -> Vec<&mut Param> {
        match self {
            Layer::Conv(c) => vec![&mut c.weight],
            Layer::BatchNorm(b) => vec![&mut b.gamma, &mut b.beta],
            Layer::Basic(b) => b.params_mut(),
            Layer::Bottleneck(b) => b.params_mut(),
            Layer::Linear(l) => vec![&mut l.weight, &mut l.bias],
            Layer::Relu | Layer::GlobalAvgPool => vec![],
        }
    }

    /// Trainable parameters, in PyTorch's order.
    pub fn params(&self) -> Vec<&Param> {
        match self {
            Layer::Conv(c) => vec![&c.weight],
            Layer::BatchNorm(b) => vec![&b.gamma, &b.beta],
            Layer::Basic(b) => b.params(),
            Layer::Bottleneck(b) => b.params(),
            Layer::Linear(l) => vec![&l.weight, &l.bias],
            Layer::Relu | Layer::GlobalAvgPool => vec![],
        }
    }

    /// Non-trainable state (BN running statistics) with PyTorch names.
    pub fn buffers(&self) -> Vec<(String, &Tensor)> {
        self.batch_norms().into_iter().flat_map(|b| b.buffers()).collect()
    }

    /// The BN update counters (`num_batches_tracked`) with PyTorch names.
    pub fn counters(&self) -> Vec<(String, &AtomicU64)> {
        self.batch_norms().into_iter().map(|b| b.counter()).collect()
    }

    fn batch_norms(&self) -> Vec<&BatchNorm2d> {
        match self {
            Layer::BatchNorm(b) => vec![b],
            Layer::Basic(b) => vec![&b.bn1, &b.bn2],
            Layer::Bottleneck(b) => {
                let mut v = vec![&b.bn1, &b.bn2, &b.bn3];
                if let Some(p) = &b.downsample {
                    v.push(&p.bn);
                }
                v
            }
            _ => vec![],
        }
    }
}

/// A consecutive slice of the model's layers on one device: one pipeline stage.
pub struct Stage {
    pub index: usize,
    pub gpu: Gpu,
    /// Index of this stage's first layer in the whole model.
    pub first_layer: usize,
    pub layers: Vec<Layer>,
    /// Counts NaN and infinite values in what the stage produces (divergence detection).
    watch: FiniteWatch,
    /// Every parameter's value, gradient and momentum as views of three buffers, so one
    /// SGD dispatch updates the whole stage.
    packed: PackedParams,
}

/// A divergence check in flight ([`Stage::start_check_finite`]).
pub struct PendingCheck {
    stage: usize,
    iteration: u64,
    counts: watch::PendingCounts,
}

impl PendingCheck {
    /// Waits for the counters and errors with [`Error::NonFinite`] when any is non-zero.
    pub fn finish(self) -> Result<()> {
        let found = self.counts.wait()?;
        if found.is_empty() {
            return Ok(());
        }
        Err(Error::NonFinite { stage: self.stage, iteration: self.iteration, detail: watch::describe(&found) })
    }
}

/// A stage's parameters packed for the single-dispatch SGD step.
struct PackedParams {
    values: Tensor,
    grads: Tensor,
    momentum: Tensor,
    /// Per chunk of `chunk` floats, the first divergence counter of its parameter.
    chunk_slots: Tensor,
    chunk: usize,
}

impl PackedParams {
    /// Moves the parameters of `layers` into packed buffers (values copied on the device;
    /// gradients and momentum start at zero, as [`Param::new`] makes them).
    fn pack(gpu: &Gpu, layers: &mut [Layer]) -> Result<PackedParams> {
        let mut params: Vec<&mut Param> = layers.iter_mut().flat_map(|l| l.params_mut()).collect();
        let shapes: Vec<Vec<usize>> = params.iter().map(|p| p.value.shape().to_vec()).collect();
        let n = Tensor::packed_len(gpu, &shapes).max(1);
        let (values, grads, momentum) = (gpu.zeros(&[n])?, gpu.zeros(&[n])?, gpu.zeros(&[n])?);
        let (vv, gv, mv) = (values.views(&shapes)?, grads.views(&shapes)?, momentum.views(&shapes)?);
        let chunk = (gpu.view_alignment() / 4) as usize;
        let mut slots = vec![0u32; n.div_ceil(chunk)];
        for (i, (((p, v), g), m)) in params.iter_mut().zip(vv).zip(gv).zip(mv).enumerate() {
            gpu.copy(&p.value, &v)?;
            let first = v.byte_offset() as usize / 4 / chunk;
            let last = (v.byte_offset() as usize / 4 + v.numel()).div_ceil(chunk);
            for s in &mut slots[first..last.max(first + 1)] {
                *s = FiniteWatch::param_slot(i) as u32;
            }
            p.value = v;
            p.grad = g;
            p.momentum = m;
        }
        let bits: Vec<f32> = slots.iter().map(|&s| f32::from_bits(s)).collect();
        let chunk_slots = gpu.tensor(&[bits.len()], &bits)?;
        Ok(PackedParams { values, grads, momentum, chunk_slots, chunk })
    }
}

/// Everything a stage's backward needs from its forward.
pub struct StageActivations {
    pub layers: Vec<LayerActivations>,
}

impl StageActivations {
    pub fn bytes(&self) -> u64 {
        self.layers.iter().map(|a| a.bytes()).sum()
    }
}

impl Stage {
    /// Instantiates layers `range` of `spec` on `gpu`.
    pub fn new(index: usize, gpu: &Gpu, spec: &ModelSpec, range: std::ops::Range<usize>, seed: u64) -> Result<Stage> {
        let mut layers =
            range.clone().map(|i| Layer::new(gpu, &spec.layers[i], seed, i)).collect::<Result<Vec<_>>>()?;
        let packed = PackedParams::pack(gpu, &mut layers)?;
        let params: Vec<&Param> = layers.iter().flat_map(|l| l.params()).collect();
        let buffers: Vec<(String, &Tensor)> = layers.iter().flat_map(|l| l.buffers()).collect();
        let watch = FiniteWatch::new(gpu, &params, &buffers)?;
        Ok(Stage { index, gpu: gpu.clone(), first_layer: range.start, layers, watch, packed })
    }

    /// One SGD step of every parameter with its current gradient, in one dispatch; the step
    /// counts the non-finite values of each gradient, weight and momentum buffer.
    pub fn sgd_step(&self, cfg: &SgdConfig, first_step: bool) -> Result<()> {
        let p = &self.packed;
        crate::kernels::sgd::step_packed(
            &p.values,
            &p.grads,
            &p.momentum,
            cfg,
            first_step,
            self.watch.counters(),
            &p.chunk_slots,
            p.chunk,
        )
    }

    /// Counts the non-finite values of this stage's output (features sent up, or logits).
    pub fn watch_output(&self, h: &Tensor) -> Result<()> {
        self.watch.check(h, watch::OUTPUT)
    }

    /// Counts the non-finite values of the gradient this stage sends down.
    pub fn watch_input_grad(&self, dx: &Tensor) -> Result<()> {
        self.watch.check(dx, watch::INPUT_GRAD)
    }

    /// Counts the non-finite values of the batch-norm running statistics.
    pub fn watch_buffers(&self) -> Result<()> {
        self.watch.check_buffers(self.params().len(), &self.buffers())
    }

    /// Errors with [`Error::NonFinite`] when anything watched on this stage has held a NaN or
    /// an infinity (reads the counters: waits for the device). `iteration` is for the message.
    pub fn check_finite(&self, iteration: u64) -> Result<()> {
        self.start_check_finite(iteration)?.finish()
    }

    /// [`Self::check_finite`] in two halves: the counters are copied now (after the work
    /// recorded so far) and checked by [`PendingCheck::finish`], which waits for that copy
    /// only, so the next iteration can be recorded (and run) meanwhile.
    pub fn start_check_finite(&self, iteration: u64) -> Result<PendingCheck> {
        Ok(PendingCheck { stage: self.index, iteration, counts: self.watch.read_async()? })
    }

    /// Training-mode forward keeping every layer's activations (for backward).
    pub fn forward_train(&self, x: &Tensor, update_running: bool) -> Result<(Tensor, StageActivations)> {
        let mut h = x.clone();
        let mut acts = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let (y, a) = l.forward_train(&h, update_running)?;
            acts.push(a);
            h = y;
        }
        Ok((h, StageActivations { layers: acts }))
    }

    /// Training-mode forward that keeps no activations (Features Replay's "play"): each
    /// layer's intermediates are dropped as soon as the next layer has its input.
    pub fn forward_play(&self, x: &Tensor, update_running: bool) -> Result<Tensor> {
        let mut h = x.clone();
        for l in &self.layers {
            h = l.forward_train(&h, update_running)?.0;
        }
        Ok(h)
    }

    /// Evaluation-mode forward.
    pub fn forward_eval(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for l in &self.layers {
            h = l.forward_eval(&h)?;
        }
        Ok(h)
    }

    /// Backpropagates `dy` through the stage, writing every parameter gradient; returns the
    /// gradient with respect to the stage input when `need_dx` (not for the first stage).
    pub fn backward(&mut self, acts: StageActivations, dy: &Tensor, need_dx: bool) -> Result<Option<Tensor>> {
        let n = self.layers.len();
        let mut grad = dy.clone();
        // Activations are consumed from the top, so each layer's memory is released as soon
        // as its backward is recorded.
        let mut acts = acts.layers;
        for i in (0..n).rev() {
            let a = acts.pop().ok_or_else(|| Error::ShapeMismatch {
                op: "stage",
                detail: format!("stage {} has {n} layers but fewer activations", self.index),
            })?;
            match self.layers[i].backward(&a, &grad, need_dx || i > 0)? {
                Some(g) => grad = g,
                None => return Ok(None),
            }
        }
        Ok(Some(grad))
    }

    /// Like [`Self::backward`], but leaves `acts` intact (a measurement may backpropagate a
    /// stored graph without consuming it).
    pub fn backward_keeping(&mut self, acts: &StageActivations, dy: &Tensor, need_dx: bool) -> Result<Option<Tensor>> {
        if acts.layers.len() != self.layers.len() {
            return Err(Error::ShapeMismatch {
                op: "stage",
                detail: format!(
                    "stage {} has {} layers but {} activations",
                    self.index,
                    self.layers.len(),
                    acts.layers.len()
                ),
            });
        }
        let mut grad = dy.clone();
        for i in (0..self.layers.len()).rev() {
            match self.layers[i].backward(&acts.layers[i], &grad, need_dx || i > 0)? {
                Some(g) => grad = g,
                None => return Ok(None),
            }
        }
        Ok(Some(grad))
    }

    pub fn params(&self) -> Vec<&Param> {
        self.layers.iter().flat_map(|l| l.params()).collect()
    }

    pub fn buffers(&self) -> Vec<(String, &Tensor)> {
        self.layers.iter().flat_map(|l| l.buffers()).collect()
    }

    pub fn counters(&self) -> Vec<(String, &AtomicU64)> {
        self.layers.iter().flat_map(|l| l.counters()).collect()
    }

    /// Device copies of the current parameter values (in [`Self::params`] order).
    pub fn snapshot_weights(&self) -> Result<Vec<Tensor>> {
        self.params()
            .iter()
            .map(|p| {
                let t = self.gpu.empty(p.value.shape())?;
                self.gpu.copy(&p.value, &t)?;
                Ok(t)
            })
            .collect()
    }

    /// Copies `values` (from [`Self::snapshot_weights`]) into the parameters.
    pub fn load_weights(&self, values: &[Tensor]) -> Result<()> {
        let params = self.params();
        if params.len() != values.len() {
            return Err(Error::ShapeMismatch {
                op: "stage",
                detail: format!("{} weight tensors for {} parameters", values.len(), params.len()),
            });
        }
        for (p, v) in params.iter().zip(values) {
            self.gpu.copy(v, &p.value)?;
        }
        Ok(())
    }

    /// A buffer the size of the stage's packed gradients (uninitialised), for summing the
    /// gradients of several backward passes (GPipe's micro-batches).
    pub fn grad_accumulator(&self) -> Result<Tensor> {
        self.gpu.empty(self.packed.grads.shape())
    }

    /// `acc = ` the gradients the last backward wrote (one copy for the stage).
    pub fn store_grads(&self, acc: &Tensor) -> Result<()> {
        self.gpu.copy(&self.packed.grads, acc)
    }

    /// `acc += ` the gradients the last backward wrote (one dispatch for the stage).
    pub fn accumulate_grads(&self, acc: &Tensor) -> Result<()> {
        crate::kernels::elementwise::axpy(1.0, &self.packed.grads, acc)
    }

    /// The gradients the last backward wrote `+= acc`: every parameter gradient becomes the
    /// sum (one dispatch for the stage).
    pub fn add_to_grads(&self, acc: &Tensor) -> Result<()> {
        crate::kernels::elementwise::axpy(1.0, acc, &self.packed.grads)
    }

    /// Every parameter's gradient, end to end in [`Self::params`] order, whatever the packed
    /// layout's padding (which depends on the device): one read of the packed buffer.
    pub fn read_grads(&self) -> Result<Vec<f32>> {
        let packed = self.packed.grads.to_vec()?;
        let mut out = Vec::with_capacity(packed.len());
        for p in self.params() {
            let at = p.grad.byte_offset() as usize / 4;
            out.extend_from_slice(&packed[at..at + p.grad.numel()]);
        }
        Ok(out)
    }

    /// Sets the gradients from `grads` in [`Self::read_grads`]' order: one write of the
    /// packed buffer (its padding stays zero).
    pub fn write_grads(&self, grads: &[f32]) -> Result<()> {
        let mut packed = vec![0.0f32; self.packed.grads.numel()];
        let mut from = 0;
        for p in self.params() {
            let (at, n) = (p.grad.byte_offset() as usize / 4, p.grad.numel());
            let src = grads.get(from..from + n).ok_or_else(|| Error::ShapeMismatch {
                op: "stage",
                detail: format!("{} gradient values for the stage's parameters", grads.len()),
            })?;
            packed[at..at + n].copy_from_slice(src);
            from += n;
        }
        if from != grads.len() {
            return Err(Error::ShapeMismatch {
                op: "stage",
                detail: format!("{} gradient values for {from} parameter values", grads.len()),
            });
        }
        self.gpu.write(&self.packed.grads, &packed)
    }

    /// Device bytes of this stage's parameter values.
    pub fn weight_bytes(&self) -> u64 {
        self.params().iter().map(|p| p.value.buffer_bytes()).sum()
    }
}
