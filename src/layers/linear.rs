//! Linear (fully connected) layer, PyTorch layout: y = x W^T + b.

use rand::Rng;

use super::{normal, Param};
use crate::error::Result;
use crate::gpu::{Gpu, Tensor};
use crate::kernels::linear;

/// The classifier of a ResNet.
pub struct Linear {
    pub weight: Param,
    pub bias: Param,
}

impl Linear {
    /// Kaiming-normal weight (std sqrt(2 / in_features), as the reference code's
    /// `init.kaiming_normal_`) and PyTorch's default bias, uniform(+-1/sqrt(in_features)).
    pub fn new(gpu: &Gpu, name: &str, in_features: usize, out_features: usize, rng: &mut impl Rng) -> Result<Linear> {
        let w = normal(rng, in_features * out_features, (2.0 / in_features as f32).sqrt());
        let bound = 1.0 / (in_features as f32).sqrt();
        let b: Vec<f32> = (0..out_features).map(|_| rng.random_range(-bound..=bound)).collect();
        Ok(Linear {
            weight: Param::new(gpu, &format!("{name}.weight"), &[out_features, in_features], &w)?,
            bias: Param::new(gpu, &format!("{name}.bias"), &[out_features], &b)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear::forward(x, &self.weight.value, &self.bias.value)
    }

    /// Writes the weight and bias gradients and returns the input gradient.
    pub fn backward(&mut self, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        let (dx, dw, db) = linear::backward(x, &self.weight.value, dy)?;
        self.weight.set_grad(dw)?;
        self.bias.set_grad(db)?;
        Ok(dx)
    }
}
