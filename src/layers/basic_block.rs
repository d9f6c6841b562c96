//! The basic residual block of CIFAR ResNets (He et al. 2016):
//! conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU. At a stride or width change the
//! shortcut is option A: a stride-2 subsample padded with zero channels (no parameters).
//!
//! Fused: BN1 ends with its ReLU, BN2 with the residual add (the option-A shortcut is read in
//! place from the block input) and the final ReLU; each BN backward folds in the following
//! ReLU's mask, and BN2's also writes the shortcut's gradient of the block input, onto which
//! conv1's input gradient is accumulated. Dispatches per training step, besides the convs and
//! SGD: 4 forward (2 per BN), 4 backward (2 per BN; 1 and 1 per BN where
//! `batch_norm::Passes::Single` applies), plus 1 add (see [`accumulate_backward_data`]) until
//! conv2d accumulates in its backward-data. The unfused block took 14 (16 with option A).

use rand::Rng;

use super::{BatchNorm2d, Conv2d, Param};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::kernels::batch_norm::{BnSaved, Epilogue, Residual, ShortcutGrad};
use crate::kernels::conv2d;
use crate::kernels::shortcut::ChannelPad;

/// `dx += conv`'s input gradient for output gradient `dy` (`dx` has the conv's input shape).
/// The shortcut's gradient is already in `dx`, and the conv's backward-data adds onto it in
/// its own output stores: no separate add pass, no extra tensor.
pub(crate) fn accumulate_backward_data(conv: &Conv2d, dy: &Tensor, dx: &Tensor) -> Result<()> {
    conv2d::backward_data_into(dy, &conv.weight.value, conv.stride, conv.pad, dx, true)
}

/// A basic residual block.
pub struct BasicBlock {
    pub conv1: Conv2d,
    pub bn1: BatchNorm2d,
    pub conv2: Conv2d,
    pub bn2: BatchNorm2d,
    pub in_channels: usize,
    pub out_channels: usize,
    pub stride: usize,
    /// Where the option-A shortcut puts its zero channels.
    pub shortcut_pad: ChannelPad,
}

/// What the block's backward needs from its forward: the input, the two conv outputs (BN
/// backward recomputes the normalised values from them and 3 floats per channel), the
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
        shortcut_pad: ChannelPad,
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
            shortcut_pad,
        })
    }

    fn identity_shortcut(&self) -> bool {
        self.stride == 1 && self.in_channels == self.out_channels
    }

    /// The shortcut of input `x` as BN2's fused residual.
    fn residual<'a>(&self, x: &'a Tensor) -> Residual<'a> {
        if self.identity_shortcut() {
            Residual::Identity(x)
        } else {
            Residual::OptionA { x, stride: self.stride, pad: self.shortcut_pad }
        }
    }

    /// Training-mode forward keeping what backward needs.
    pub fn forward_train(&self, x: &Tensor, update_running: bool) -> Result<(Tensor, BasicBlockActivations)> {
        let c1 = self.conv1.forward(x)?;
        let (a1, bn1) = self.bn1.forward_train_fused(&c1, update_running, Epilogue::RELU)?;
        let c2 = self.conv2.forward(&a1)?;
        let (out, bn2) = self.bn2.forward_train_fused(&c2, update_running, Epilogue::add_relu(self.residual(x)))?;
        Ok((out.clone(), BasicBlockActivations { x: x.clone(), c1, bn1, a1, c2, bn2, out }))
    }

    /// Evaluation-mode forward with the running statistics, keeping nothing.
    pub fn forward_eval(&self, x: &Tensor) -> Result<Tensor> {
        let a1 = self.bn1.forward_eval_fused(&self.conv1.forward(x)?, Epilogue::RELU)?;
        self.bn2.forward_eval_fused(&self.conv2.forward(&a1)?, Epilogue::add_relu(self.residual(x)))
    }

    /// Writes every parameter gradient and returns the gradient with respect to the input.
    pub fn backward(&mut self, acts: &BasicBlockActivations, dout: &Tensor) -> Result<Tensor> {
        // BN2's backward masks dout by the block output's sign and writes the shortcut's
        // gradient of the block input, which becomes the input gradient.
        let shortcut = if self.identity_shortcut() {
            ShortcutGrad::Identity
        } else {
            ShortcutGrad::OptionA { in_shape: acts.x.shape(), stride: self.stride, pad: self.shortcut_pad }
        };
        let (dc2, dx) = self.bn2.backward_fused(&acts.c2, dout, &acts.bn2, Some(&acts.out), Some(shortcut))?;
        let da1 = self.conv2.backward(&acts.a1, &dc2)?;
        drop(dc2);
        let (dc1, _) = self.bn1.backward_fused(&acts.c1, &da1, &acts.bn1, Some(&acts.a1), None)?;
        drop(da1);
        self.conv1.backward_weight(&acts.x, &dc1)?;
        // `backward_fused` returns the shortcut gradient whenever one is asked for.
        let dx = dx.ok_or(Error::Internal {
            op: "basic block backward",
            detail: "batch norm returned no shortcut gradient".into(),
        })?;
        accumulate_backward_data(&self.conv1, &dc1, &dx)?;
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
