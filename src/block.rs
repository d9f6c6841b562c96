//! Layers built from kernels.
