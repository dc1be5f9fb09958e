//! The GPU engine: host side of the fused CUDA kernels in `cuda/`. Every file here has a twin of
//! the same name in `src/cpu/` (the reference) and in `cuda/` (the kernels).

pub mod backei_layer;
pub mod device;
pub mod kernels;
pub mod ptxas;

pub use device::{choose, DeviceChoice, GpuDevice};
