//! The bottleneck residual block (He et al. 2016, expansion 4, post-activation, as in the
//! CIFAR ResNet-164 and torchvision's ImageNet ResNet-50/101/152):
//! conv1x1-BN-ReLU-conv3x3(stride s)-BN-ReLU-conv1x1-BN, plus the shortcut, then ReLU.
//! The shortcut is the identity when the stride is 1 and the input already has
//! `4 * planes` channels; otherwise it is a projection, a 1x1 convolution (stride s, no
//! padding, no bias) followed by batch norm (torchvision's `downsample`).
//!
//! Fused as the basic block is: BN1 and BN2 end with their ReLUs, BN3 with the residual add
//! (the input, or the projection's BN output) and the final ReLU; every BN backward folds in
//! the following ReLU's mask, and with the identity BN3's also writes the shortcut gradient
//! that conv1's input gradient is accumulated onto.

use rand::Rng;

use super::basic_block::accumulate_backward_data;
use super::{BatchNorm2d, Conv2d, Param};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::kernels::batch_norm::{BnSaved, Epilogue, Residual, ShortcutGrad};

/// Output channels per bottleneck plane: the block widens `planes` to `EXPANSION * planes`.
pub const EXPANSION: usize = 4;

/// The projection shortcut: 1x1 convolution with the block's stride, then batch norm
/// (PyTorch's `downsample.0` and `downsample.1`).
pub struct Projection {
    pub conv: Conv2d,
    pub bn: BatchNorm2d,
}

/// A bottleneck residual block.
pub struct Bottleneck {
    pub conv1: Conv2d,
    pub bn1: BatchNorm2d,
    pub conv2: Conv2d,
    pub bn2: BatchNorm2d,
    pub conv3: Conv2d,
    pub bn3: BatchNorm2d,
    /// `None` for the identity shortcut.
    pub downsample: Option<Projection>,
    pub in_channels: usize,
    pub planes: usize,
    pub stride: usize,
}

/// What the block's backward needs from its forward: the input (the weight gradients of
/// conv1 and of the projection conv), the three conv outputs (BN backward recomputes the
/// normalised values from them and 3 floats per channel), the two inner ReLU outputs (their
/// signs are the ReLU masks, and they are the inputs of conv2 and conv3), the projection
/// conv's output when there is one (its BN's input) and the block output (the final ReLU's
/// mask). The BN outputs and the pre-activation sum are not kept.
pub struct BottleneckActivations {
    pub x: Tensor,
    c1: Tensor,
    bn1: BnSaved,
    a1: Tensor,
    c2: Tensor,
    bn2: BnSaved,
    a2: Tensor,
    c3: Tensor,
    bn3: BnSaved,
    /// The projection conv's output and its BN's statistics; `None` for the identity.
    short: Option<(Tensor, BnSaved)>,
    pub out: Tensor,
}

impl BottleneckActivations {
    /// Device bytes these activations hold (the input and output included).
    pub fn bytes(&self) -> u64 {
        let mut tensors = vec![
            &self.x,
            &self.c1,
            &self.bn1.stats,
            &self.a1,
            &self.c2,
            &self.bn2.stats,
            &self.a2,
            &self.c3,
            &self.bn3.stats,
            &self.out,
        ];
        if let Some((cs, bns)) = &self.short {
            tensors.push(cs);
            tensors.push(&bns.stats);
        }
        tensors.iter().map(|t| t.buffer_bytes()).sum()
    }
}

impl Bottleneck {
    /// A block from `in_channels` to `EXPANSION * planes` channels, downsampling by `stride`
    /// in the 3x3 convolution (and in the projection shortcut). Parameter names follow
    /// PyTorch: `{name}.conv1.weight`, `{name}.bn1.weight`, ..., `{name}.downsample.0.weight`
    /// (the projection conv) and `{name}.downsample.1.weight` / `.bias` (its BN).
    pub fn new(
        gpu: &Gpu,
        name: &str,
        in_channels: usize,
        planes: usize,
        stride: usize,
        rng: &mut impl Rng,
    ) -> Result<Bottleneck> {
        let out_channels = EXPANSION * planes;
        let conv1 = Conv2d::new(gpu, &format!("{name}.conv1"), in_channels, planes, 1, 1, 0, rng)?;
        let bn1 = BatchNorm2d::new(gpu, &format!("{name}.bn1"), planes)?;
        let conv2 = Conv2d::new(gpu, &format!("{name}.conv2"), planes, planes, 3, stride, 1, rng)?;
        let bn2 = BatchNorm2d::new(gpu, &format!("{name}.bn2"), planes)?;
        let conv3 = Conv2d::new(gpu, &format!("{name}.conv3"), planes, out_channels, 1, 1, 0, rng)?;
        let bn3 = BatchNorm2d::new(gpu, &format!("{name}.bn3"), out_channels)?;
        let downsample = if stride == 1 && in_channels == out_channels {
            None
        } else {
            Some(Projection {
                conv: Conv2d::new(gpu, &format!("{name}.downsample.0"), in_channels, out_channels, 1, stride, 0, rng)?,
                bn: BatchNorm2d::new(gpu, &format!("{name}.downsample.1"), out_channels)?,
            })
        };
        Ok(Bottleneck { conv1, bn1, conv2, bn2, conv3, bn3, downsample, in_channels, planes, stride })
    }

    /// `EXPANSION * planes`.
    pub fn out_channels(&self) -> usize {
        EXPANSION * self.planes
    }

    /// Training-mode forward keeping what backward needs.
    pub fn forward_train(&self, x: &Tensor, update_running: bool) -> Result<(Tensor, BottleneckActivations)> {
        let c1 = self.conv1.forward(x)?;
        let (a1, bn1) = self.bn1.forward_train_fused(&c1, update_running, Epilogue::RELU)?;
        let c2 = self.conv2.forward(&a1)?;
        let (a2, bn2) = self.bn2.forward_train_fused(&c2, update_running, Epilogue::RELU)?;
        let c3 = self.conv3.forward(&a2)?;
        let ((out, bn3), short) = match &self.downsample {
            None => {
                (self.bn3.forward_train_fused(&c3, update_running, Epilogue::add_relu(Residual::Identity(x)))?, None)
            }
            Some(p) => {
                let cs = p.conv.forward(x)?;
                // The projection's BN output is the residual of BN3's fused add (not kept).
                let (bs, bns) = p.bn.forward_train(&cs, update_running)?;
                let r =
                    self.bn3.forward_train_fused(&c3, update_running, Epilogue::add_relu(Residual::Identity(&bs)))?;
                (r, Some((cs, bns)))
            }
        };
        let acts = BottleneckActivations { x: x.clone(), c1, bn1, a1, c2, bn2, a2, c3, bn3, short, out: out.clone() };
        Ok((out, acts))
    }

    /// Evaluation-mode forward with the running statistics, keeping nothing.
    pub fn forward_eval(&self, x: &Tensor) -> Result<Tensor> {
        let a1 = self.bn1.forward_eval_fused(&self.conv1.forward(x)?, Epilogue::RELU)?;
        let a2 = self.bn2.forward_eval_fused(&self.conv2.forward(&a1)?, Epilogue::RELU)?;
        drop(a1);
        let c3 = self.conv3.forward(&a2)?;
        drop(a2);
        match &self.downsample {
            None => self.bn3.forward_eval_fused(&c3, Epilogue::add_relu(Residual::Identity(x))),
            Some(p) => {
                let bs = p.bn.forward_eval(&p.conv.forward(x)?)?;
                self.bn3.forward_eval_fused(&c3, Epilogue::add_relu(Residual::Identity(&bs)))
            }
        }
    }

    /// Writes every parameter gradient and returns the gradient with respect to the input.
    pub fn backward(&mut self, acts: &BottleneckActivations, dout: &Tensor) -> Result<Tensor> {
        if self.downsample.is_some() != acts.short.is_some() {
            return Err(Error::ShapeMismatch {
                op: "bottleneck backward",
                detail: "activations come from a block with a different shortcut".to_string(),
            });
        }
        // Every BN backward folds in the mask of the ReLU after it; the final ReLU's mask (the
        // block output's sign) applies to BN3 and to the projection's BN alike. With the
        // identity, BN3's backward also writes the masked gradient as the shortcut's gradient,
        // which becomes the input gradient.
        let identity = acts.short.is_none().then_some(ShortcutGrad::Identity);
        let (dc3, dx_short) = self.bn3.backward_fused(&acts.c3, dout, &acts.bn3, Some(&acts.out), identity)?;
        let da2 = self.conv3.backward(&acts.a2, &dc3)?;
        drop(dc3);
        let (dc2, _) = self.bn2.backward_fused(&acts.c2, &da2, &acts.bn2, Some(&acts.a2), None)?;
        drop(da2);
        let da1 = self.conv2.backward(&acts.a1, &dc2)?;
        drop(dc2);
        let (dc1, _) = self.bn1.backward_fused(&acts.c1, &da1, &acts.bn1, Some(&acts.a1), None)?;
        drop(da1);
        self.conv1.backward_weight(&acts.x, &dc1)?;
        let dx = match (&mut self.downsample, &acts.short, dx_short) {
            (None, None, Some(dx)) => dx,
            (Some(p), Some((cs, bns)), None) => {
                let (dcs, _) = p.bn.backward_fused(cs, dout, bns, Some(&acts.out), None)?;
                p.conv.backward(&acts.x, &dcs)?
            }
            _ => {
                return Err(Error::Internal {
                    op: "bottleneck backward",
                    detail: "batch norm returned no shortcut gradient for the identity".to_string(),
                })
            }
        };
        // The main path's input gradient joins the shortcut's.
        accumulate_backward_data(&self.conv1, &dc1, &dx)?;
        Ok(dx)
    }

    /// The block's parameters in PyTorch's order (conv1, bn1, conv2, bn2, conv3, bn3, then
    /// the projection's conv and BN).
    pub fn params(&self) -> Vec<&Param> {
        let mut params = vec![
            &self.conv1.weight,
            &self.bn1.gamma,
            &self.bn1.beta,
            &self.conv2.weight,
            &self.bn2.gamma,
            &self.bn2.beta,
            &self.conv3.weight,
            &self.bn3.gamma,
            &self.bn3.beta,
        ];
        if let Some(p) = &self.downsample {
            params.extend([&p.conv.weight, &p.bn.gamma, &p.bn.beta]);
        }
        params
    }

    /// [`Self::params`], mutable.
    pub fn params_mut(&mut self) -> Vec<&mut Param> {
        let mut params = vec![
            &mut self.conv1.weight,
            &mut self.bn1.gamma,
            &mut self.bn1.beta,
            &mut self.conv2.weight,
            &mut self.bn2.gamma,
            &mut self.bn2.beta,
            &mut self.conv3.weight,
            &mut self.bn3.gamma,
            &mut self.bn3.beta,
        ];
        if let Some(p) = &mut self.downsample {
            params.extend([&mut p.conv.weight, &mut p.bn.gamma, &mut p.bn.beta]);
        }
        params
    }
}
