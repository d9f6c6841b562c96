//! Conv2d layer (no bias, as in CIFAR ResNets): weight init, forward, backward.

use rand::Rng;

use super::{normal, Param};
use crate::error::Result;
use crate::gpu::{Gpu, Tensor};
use crate::kernels::conv2d;

/// A square-kernel 2-D convolution without bias.
pub struct Conv2d {
    pub weight: Param,
    pub stride: usize,
    pub pad: usize,
}

impl Conv2d {
    /// He initialisation as in the reference code: normal(0, sqrt(2 / (k * k * out_channels))).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        gpu: &Gpu,
        name: &str,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        pad: usize,
        rng: &mut impl Rng,
    ) -> Result<Conv2d> {
        let shape = [out_channels, in_channels, kernel, kernel];
        let std = (2.0 / (kernel * kernel * out_channels) as f32).sqrt();
        let data = normal(rng, shape.iter().product(), std);
        Ok(Conv2d { weight: Param::new(gpu, &format!("{name}.weight"), &shape, &data)?, stride, pad })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        conv2d::forward(x, &self.weight.value, self.stride, self.pad)
    }

    /// Writes the weight gradient for input `x` and output gradient `dy`, and returns the
    /// input gradient.
    pub fn backward(&mut self, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        self.backward_weight(x, dy)?;
        conv2d::backward_data(dy, &self.weight.value, x.shape(), self.stride, self.pad)
    }

    /// Writes the weight gradient only: the first layer of a network needs no input gradient.
    pub fn backward_weight(&mut self, x: &Tensor, dy: &Tensor) -> Result<()> {
        let w = &self.weight.value;
        if self.weight.grad.is_view() {
            // A stage's packed gradient: written in place, where one SGD dispatch reads it.
            return conv2d::backward_filter_into(x, dy, self.stride, self.pad, &self.weight.grad);
        }
        let dw = conv2d::backward_filter(x, dy, w.shape(), self.stride, self.pad)?;
        self.weight.set_grad(dw)
    }
}
