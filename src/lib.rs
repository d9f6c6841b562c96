//! featreplay: Features Replay (Huo, Gu and Huang, NeurIPS 2018) and its baselines on any GPU
//! that wgpu reaches (Vulkan, Metal, DX12, GL).
//!
//! Layout, bottom up:
//! - [`gpu`]: adapters, devices, device-resident tensors, the pipeline cache, command
//!   batching and exact memory accounting;
//! - [`kernels`]: one module per op family, each the launcher of a WGSL file of the same name
//!   in `shaders/`;
//! - [`layers`]: parameters with forward and backward built from kernels;
//! - [`model`]: ResNets as flat lists of layers, split into stages on devices;
//! - [`pipeline`]: moving tensors between stages' devices;
//! - [`train`]: the training schedules (BP, FR, DDG, DNI) over a split network, the run
//!   driver, resuming and evaluation;
//! - [`predict`]: per-image top-k classes and probabilities from a saved model;
//! - [`compare`]: every method at every K, with plots and a summary;
//! - [`report`]: per-epoch metrics (JSONL, CSV) and curves (PNG);
//! - [`trace`]: the pipeline's timeline as Chrome trace events;
//! - [`data`]: datasets (CIFAR binary, IDX, image folders, the embedded default), augmentation
//!   and a background loader;
//! - [`checkpoint`]: safetensors checkpoints with checksums, written atomically;
//! - [`rundir`]: run output directories: a lock per run, no new run over an old one;
//! - [`demo`]: the foundation's demo job (a small residual net on random data).

pub mod checkpoint;
pub mod compare;
pub mod data;
pub mod demo;
pub mod error;
pub mod gpu;
pub mod kernels;
pub mod layers;
pub mod model;
pub mod pipeline;
pub mod predict;
pub mod profile;
pub mod report;
pub mod rundir;
pub mod trace;
pub mod train;

pub use error::{Error, Result};
pub use gpu::{Gpu, Tensor};
/// The wgpu version this crate is built on, for users who record their own commands.
pub use wgpu;
