//! Layers: parameters plus forward and backward built from kernels. Layers know kernels;
//! the training schedules (BP, FR, DDG, DNI) know layers and never kernels.

pub mod basic_block;
pub mod batch_norm;
pub mod bottleneck;
pub mod conv;
pub mod linear;
pub mod loss;
pub mod pooling;
pub mod predictor;
pub mod relu;
pub mod watch;

pub use basic_block::{BasicBlock, BasicBlockActivations};
pub use batch_norm::BatchNorm2d;
pub use conv::Conv2d;
pub use linear::Linear;

use rand::Rng;
use rand_distr::StandardNormal;

use crate::error::Result;
use crate::gpu::{Gpu, Tensor};
use crate::kernels::sgd::{self, SgdConfig};

/// A trainable tensor with its gradient (written by the owning layer's backward) and its
/// SGD momentum buffer.
pub struct Param {
    /// Name a PyTorch user would recognise, e.g. `layer1.0.conv1.weight`.
    pub name: String,
    pub value: Tensor,
    pub grad: Tensor,
    pub momentum: Tensor,
}

impl Param {
    /// A parameter holding `data`, with zero gradient and momentum.
    pub fn new(gpu: &Gpu, name: &str, shape: &[usize], data: &[f32]) -> Result<Param> {
        Ok(Param {
            name: name.to_string(),
            value: gpu.tensor(shape, data)?,
            grad: gpu.zeros(shape)?,
            momentum: gpu.zeros(shape)?,
        })
    }

    /// Takes `g` as the gradient: a packed gradient (a view into its stage's gradient buffer,
    /// which one SGD dispatch updates from) receives a device copy, else `g` replaces it.
    pub fn set_grad(&mut self, g: Tensor) -> Result<()> {
        if self.grad.is_view() {
            g.gpu().copy(&g, &self.grad)
        } else {
            self.grad = g;
            Ok(())
        }
    }

    /// One SGD step on this parameter with its current gradient.
    pub fn sgd_step(&self, config: &SgdConfig, first_step: bool) -> Result<()> {
        sgd::step(&self.value, &self.grad, &self.momentum, config, first_step)
    }
}

/// `n` samples of normal(0, std) from `rng`.
pub fn normal(rng: &mut impl Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n).map(|_| std * rng.sample::<f32, _>(StandardNormal)).collect()
}
