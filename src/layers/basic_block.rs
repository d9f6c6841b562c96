//! The basic residual block of CIFAR ResNets (He et al. 2016):
//! conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU. At a stride or width change the
//! shortcut is option A: a stride-2 subsample padded with zero channels (no parameters).

use rand::Rng;

use super::{BatchNorm2d, Conv2d, Param};
use crate::error::Result;
use crate::gpu::{Gpu, Tensor};
use crate::kernels::batch_norm::BnSaved;
use crate::kernels::{elementwise as ew, shortcut};

/// A basic residual block.
pub struct BasicBlock {
    pub conv1: Conv2d,
    pub bn1: BatchNorm2d,
    pub conv2: Conv2d,
    pub bn2: BatchNorm2d,
    pub in_channels: usize,
    pub out_channels: usize,
    pub stride: usize,
}

/// What the block's backward needs from its forward: the input, the two conv outputs (BN
/// backward recomputes the normalised values from them and 2 floats per channel), the
/// middle ReLU output and the block output (their signs are the ReLU masks).
pub struct BasicBlockActivations {
    pub x: Tensor,
    c1: Tensor,
    bn1: BnSaved,
    a1: Tensor,
    c2: Tensor,
    bn2: BnSaved,
    pub out: Tensor,
}

impl BasicBlockActivations {
    /// Device bytes these activations hold (the input and output included).
    pub fn bytes(&self) -> u64 {
        [&self.x, &self.c1, &self.bn1.stats, &self.a1, &self.c2, &self.bn2.stats, &self.out]
            .iter()
            .map(|t| t.buffer_bytes())
            .sum()
    }
}

impl BasicBlock {
    pub fn new(
        gpu: &Gpu,
        name: &str,
        in_channels: usize,
        out_channels: usize,
        stride: usize,
        rng: &mut impl Rng,
    ) -> Result<BasicBlock> {
        Ok(BasicBlock {
            conv1: Conv2d::new(gpu, &format!("{name}.conv1"), in_channels, out_channels, 3, stride, 1, rng)?,
            bn1: BatchNorm2d::new(gpu, &format!("{name}.bn1"), out_channels)?,
            conv2: Conv2d::new(gpu, &format!("{name}.conv2"), out_channels, out_channels, 3, 1, 1, rng)?,
            bn2: BatchNorm2d::new(gpu, &format!("{name}.bn2"), out_channels)?,
            in_channels,
            out_channels,
            stride,
        })
    }

    fn identity_shortcut(&self) -> bool {
        self.stride == 1 && self.in_channels == self.out_channels
    }

    /// Training-mode forward keeping what backward needs.
    pub fn forward_train(&self, x: &Tensor, update_running: bool) -> Result<(Tensor, BasicBlockActivations)> {
        let c1 = self.conv1.forward(x)?;
        let (b1, bn1) = self.bn1.forward_train(&c1, update_running)?;
        let a1 = ew::relu_forward(&b1)?;
        drop(b1);
        let c2 = self.conv2.forward(&a1)?;
        let (b2, bn2) = self.bn2.forward_train(&c2, update_running)?;
        let sum = if self.identity_shortcut() {
            ew::add(&b2, x)?
        } else {
            ew::add(&b2, &shortcut::forward(x, self.out_channels, self.stride)?)?
        };
        drop(b2);
        let out = ew::relu_forward(&sum)?;
        Ok((out.clone(), BasicBlockActivations { x: x.clone(), c1, bn1, a1, c2, bn2, out }))
    }

    /// Evaluation-mode forward with the running statistics, keeping nothing.
    pub fn forward_eval(&self, x: &Tensor) -> Result<Tensor> {
        let a1 = ew::relu_forward(&self.bn1.forward_eval(&self.conv1.forward(x)?)?)?;
        let b2 = self.bn2.forward_eval(&self.conv2.forward(&a1)?)?;
        let sum = if self.identity_shortcut() {
            ew::add(&b2, x)?
        } else {
            ew::add(&b2, &shortcut::forward(x, self.out_channels, self.stride)?)?
        };
        ew::relu_forward(&sum)
    }

    /// Writes every parameter gradient and returns the gradient with respect to the input.
    pub fn backward(&mut self, acts: &BasicBlockActivations, dout: &Tensor) -> Result<Tensor> {
        let dsum = ew::relu_backward(&acts.out, dout)?;
        let dc2 = self.bn2.backward(&acts.c2, &dsum, &acts.bn2)?;
        let da1 = self.conv2.backward(&acts.a1, &dc2)?;
        let db1 = ew::relu_backward(&acts.a1, &da1)?;
        let dc1 = self.bn1.backward(&acts.c1, &db1, &acts.bn1)?;
        let dx = self.conv1.backward(&acts.x, &dc1)?;
        // The shortcut's gradient joins the main path's.
        if self.identity_shortcut() {
            ew::axpy(1.0, &dsum, &dx)?;
        } else {
            ew::axpy(1.0, &shortcut::backward(&dsum, acts.x.shape(), self.stride)?, &dx)?;
        }
        Ok(dx)
    }

    /// The block's parameters in PyTorch's order.
    pub fn params(&self) -> Vec<&Param> {
        vec![&self.conv1.weight, &self.bn1.gamma, &self.bn1.beta, &self.conv2.weight, &self.bn2.gamma, &self.bn2.beta]
    }

    /// [`Self::params`], mutable.
    pub fn params_mut(&mut self) -> Vec<&mut Param> {
        let (c1, b1, c2, b2) = (&mut self.conv1, &mut self.bn1, &mut self.conv2, &mut self.bn2);
        vec![&mut c1.weight, &mut b1.gamma, &mut b1.beta, &mut c2.weight, &mut b2.gamma, &mut b2.beta]
    }
}
