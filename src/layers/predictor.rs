//! The gradient predictor M_k of synthetic gradients (DNI; Jaderberg et al. 2017) for conv
//! nets, as `docs/schedules.md` describes it: `depth - 1` hidden layers of
//! 3x3 conv (padding 1) + BN + ReLU of `width` channels, then a 3x3 conv back to the input's
//! channels whose weight starts at zero, so the first predictions are zero. Every layer keeps
//! the spatial shape, so the prediction has the shape of the features it is given.
//!
//! Scale: the training loss is a batch mean, so a true gradient delta_k = dL/dh_k carries a
//! factor 1/N. The predictor works at per-sample scale instead: it is trained towards
//! N * delta_k with the mean squared error over all elements, 0.5 * mean((M_k(h_k) -
//! N * delta_k)^2) (PyTorch's `mse_loss`, the usual choice), and the module backpropagates
//! M_k(h_k) / N. Measured: with a sum of squares instead of the mean, the predictor's steps
//! are C * H * W times too large and it diverges within 3 steps at learning rate 0.1.
//!
//! Features without spatial dimensions (`[N, C]`, after global pooling) are treated as
//! `[N, C, 1, 1]` images.

use rand::SeedableRng;

use super::watch::{FiniteWatch, NonFiniteCount};
use super::{BatchNorm2d, Conv2d, Param};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::kernels::batch_norm::BnSaved;
use crate::kernels::elementwise as ew;
use crate::kernels::sgd::SgdConfig;

/// Shape of a DNI gradient predictor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PredictorConfig {
    /// Conv layers in all (at least 1: the zero-initialised output conv).
    pub depth: usize,
    /// Channels of the hidden layers; 0: as many as the features have.
    pub width: usize,
}

impl Default for PredictorConfig {
    /// Two hidden conv + BN + ReLU layers as wide as the features, then the output conv.
    fn default() -> Self {
        PredictorConfig { depth: 3, width: 0 }
    }
}

/// A hidden layer: conv, BN, ReLU.
struct Hidden {
    conv: Conv2d,
    bn: BatchNorm2d,
}

/// M_k: features h_k -> predicted dL/dh_k.
pub struct GradientPredictor {
    hidden: Vec<Hidden>,
    out: Conv2d,
    /// Counts non-finite values in the predictor's updates (its parameters are trained and
    /// checkpointed like the model's).
    watch: FiniteWatch,
}

/// What the predictor's backward needs from its forward.
pub struct PredictorActivations {
    /// The shape of the features the prediction was made for.
    features_shape: Vec<usize>,
    /// Per hidden layer: its input, conv output, BN saved stats and ReLU output.
    hidden: Vec<(Tensor, Tensor, BnSaved, Tensor)>,
    /// Input of the output conv.
    last_input: Tensor,
    /// The prediction itself (the loss against the true gradient needs it later).
    pub output: Tensor,
}

impl PredictorActivations {
    pub fn bytes(&self) -> u64 {
        let h: u64 = self
            .hidden
            .iter()
            .map(|(x, c, s, a)| x.buffer_bytes() + c.buffer_bytes() + s.stats.buffer_bytes() + a.buffer_bytes())
            .sum();
        h + self.last_input.buffer_bytes() + self.output.buffer_bytes()
    }
}

fn as_image(h: &Tensor) -> Result<Tensor> {
    match h.shape().len() {
        4 => Ok(h.clone()),
        2 => h.reshape(&[h.shape()[0], h.shape()[1], 1, 1]),
        _ => Err(Error::Unsupported {
            op: "dni",
            detail: format!("gradient predictor for features of shape {:?} (needs [N, C] or [N, C, H, W])", h.shape()),
        }),
    }
}

impl GradientPredictor {
    /// A predictor for per-sample features of shape `features` (`[C, H, W]` or `[C]`), named
    /// `<name>.<layer>`, hidden convs He-initialised from `seed`, output conv zero.
    pub fn new(gpu: &Gpu, name: &str, features: &[usize], cfg: &PredictorConfig, seed: u64) -> Result<Self> {
        if cfg.depth == 0 {
            return Err(Error::Unsupported { op: "dni", detail: "the predictor needs a depth of at least 1".into() });
        }
        let channels = *features
            .first()
            .ok_or_else(|| Error::Unsupported { op: "dni", detail: "gradient predictor for scalar features".into() })?;
        let width = if cfg.width == 0 { channels } else { cfg.width };
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xD41_5EED);
        let mut hidden = Vec::new();
        let mut c_in = channels;
        for i in 0..cfg.depth - 1 {
            hidden.push(Hidden {
                conv: Conv2d::new(gpu, &format!("{name}.{i}.conv"), c_in, width, 3, 1, 1, &mut rng)?,
                bn: BatchNorm2d::new(gpu, &format!("{name}.{i}.bn"), width)?,
            });
            c_in = width;
        }
        let mut out = Conv2d::new(gpu, &format!("{name}.out.conv"), c_in, channels, 3, 1, 1, &mut rng)?;
        out.weight =
            Param::new(gpu, &out.weight.name.clone(), out.weight.value.shape(), &vec![0.0; c_in * channels * 9])?;
        let mut p = GradientPredictor { hidden, out, watch: FiniteWatch::new(gpu, &[], &[])? };
        p.watch = FiniteWatch::new(gpu, &p.params(), &[])?;
        Ok(p)
    }

    /// One SGD step of every predictor parameter, counting non-finite values.
    pub fn sgd_step(&self, cfg: &SgdConfig, first_step: bool) -> Result<()> {
        for (i, p) in self.params().into_iter().enumerate() {
            self.watch.sgd_step(i, p, cfg, first_step)?;
        }
        Ok(())
    }

    /// The predictor tensors that have held NaN or infinite values (waits for the device).
    pub fn non_finite(&self) -> Result<Vec<NonFiniteCount>> {
        self.watch.read()
    }

    /// The predicted gradient for `h` (training-mode BN; the predictor is never evaluated
    /// otherwise, so its running statistics are not kept up to date), with what backward needs.
    pub fn forward(&self, h: &Tensor) -> Result<(Tensor, PredictorActivations)> {
        let mut x = as_image(h)?;
        let mut hidden = Vec::with_capacity(self.hidden.len());
        for l in &self.hidden {
            let c = l.conv.forward(&x)?;
            let (b, saved) = l.bn.forward_train(&c, false)?;
            let a = ew::relu_forward(&b)?;
            hidden.push((x, c, saved, a.clone()));
            x = a;
        }
        let pred = self.out.forward(&x)?.reshape(h.shape())?;
        Ok((
            pred.clone(),
            PredictorActivations { features_shape: h.shape().to_vec(), hidden, last_input: x, output: pred },
        ))
    }

    /// Writes every parameter gradient for the output gradient `dpred`.
    pub fn backward(&mut self, acts: &PredictorActivations, dpred: &Tensor) -> Result<()> {
        if dpred.shape() != acts.features_shape.as_slice() {
            return Err(Error::ShapeMismatch {
                op: "dni",
                detail: format!("predictor gradient {:?} for features {:?}", dpred.shape(), acts.features_shape),
            });
        }
        let d = as_image(dpred)?;
        if self.hidden.is_empty() {
            self.out.backward_weight(&acts.last_input, &d)?;
            return Ok(());
        }
        let mut g = self.out.backward(&acts.last_input, &d)?;
        for (i, l) in self.hidden.iter_mut().enumerate().rev() {
            let (x, c, saved, a) = &acts.hidden[i];
            let db = ew::relu_backward(a, &g)?;
            let dc = l.bn.backward(c, &db, saved)?;
            if i == 0 {
                l.conv.backward_weight(x, &dc)?;
            } else {
                g = l.conv.backward(x, &dc)?;
            }
        }
        Ok(())
    }

    /// The synthetic gradient dL/dh_k of a prediction (per-sample scale, see above).
    pub fn synthetic_gradient(prediction: &Tensor) -> Result<Tensor> {
        let n = prediction.shape().first().copied().unwrap_or(1).max(1);
        let g = prediction.gpu().zeros(prediction.shape())?;
        prediction.gpu().copy(prediction, &g)?;
        ew::scale(&g, 1.0 / n as f32)?;
        Ok(g)
    }

    /// The gradient of the predictor's loss with respect to its output for the true
    /// gradient `delta` (see above): `(prediction - N * delta) / numel`.
    pub fn loss_gradient(prediction: &Tensor, delta: &Tensor) -> Result<Tensor> {
        if prediction.shape() != delta.shape() {
            return Err(Error::ShapeMismatch {
                op: "dni",
                detail: format!("prediction {:?} against true gradient {:?}", prediction.shape(), delta.shape()),
            });
        }
        // (p - N d) / numel = (p / N - d) * N / numel.
        let n = prediction.shape().first().copied().unwrap_or(1).max(1);
        let g = Self::synthetic_gradient(prediction)?;
        ew::axpy(-1.0, delta, &g)?;
        ew::scale(&g, n as f32 / prediction.numel().max(1) as f32)?;
        Ok(g)
    }

    /// The predictor's loss, 0.5 * mean((prediction - N * delta)^2) (host-side: for tests
    /// and reports, not used in training).
    pub fn loss(prediction: &Tensor, delta: &Tensor) -> Result<f64> {
        let n = prediction.shape().first().copied().unwrap_or(1).max(1) as f64;
        let p = prediction.to_vec()?;
        let d = delta.to_vec()?;
        let sum: f64 = p.iter().zip(&d).map(|(p, d)| 0.5 * (*p as f64 - n * *d as f64).powi(2)).sum();
        Ok(sum / p.len().max(1) as f64)
    }

    pub fn params(&self) -> Vec<&Param> {
        let mut v = Vec::new();
        for l in &self.hidden {
            v.extend([&l.conv.weight, &l.bn.gamma, &l.bn.beta]);
        }
        v.push(&self.out.weight);
        v
    }
}
