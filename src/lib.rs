//! featreplay: Features Replay (Huo, Gu and Huang, NeurIPS 2018) and its baselines on any GPU
//! that wgpu reaches (Vulkan, Metal, DX12, GL).
//!
//! Layout, bottom up:
//! - [`gpu`]: adapters, devices, device-resident tensors, the pipeline cache, command
//!   batching and exact memory accounting;
//! - [`kernels`]: one module per op family, each the launcher of a WGSL file of the same name
//!   in `shaders/`;
//! - [`block`]: layers built from kernels (for now the basic residual block).

pub mod block;
pub mod error;
pub mod gpu;
pub mod kernels;

pub use error::{Error, Result};
pub use gpu::{Gpu, Tensor};
/// The wgpu version this crate is built on, for users who record their own commands.
pub use wgpu;
