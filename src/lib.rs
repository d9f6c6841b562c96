//! featreplay: Features Replay (Huo, Gu and Huang, NeurIPS 2018) and its baselines on any GPU
//! that wgpu reaches (Vulkan, Metal, DX12, GL).
//!
//! Layout, bottom up:
//! - [`gpu`]: adapters, devices, device-resident tensors, the pipeline cache, command
//!   batching and exact memory accounting;
//! - [`kernels`]: one module per op family, each the launcher of a WGSL file of the same name
//!   in `shaders/`;
//! - [`layers`]: parameters with forward and backward built from kernels;
//! - [`demo`]: the foundation's demo job (a small residual net on random data).

pub mod demo;
pub mod error;
pub mod gpu;
pub mod kernels;
pub mod layers;

pub use error::{Error, Result};
pub use gpu::{Gpu, Tensor};
/// The wgpu version this crate is built on, for users who record their own commands.
pub use wgpu;
