//! The GPU engine: host side of the fused CUDA kernels in `cuda/`. Every file here has a twin of
//! the same name in `src/cpu/` (the reference) and in `cuda/` (the kernels).

pub mod backei_layer;
pub mod backei_unfused;
pub mod backei_v4;
pub mod backei_v4_tiling;
pub mod conv;
pub mod conv_halo;
pub mod device;
pub mod dropout;
pub mod gemm_tc;
pub mod graph;
pub mod kernels;
pub mod linear;
pub mod loss;
pub mod memory;
pub mod network;
pub mod optim;
pub mod pinned;
pub mod pool;
pub mod profile;
pub mod ptxas;
pub mod sass;
pub mod staging;
pub mod sync_order;
pub mod util;
pub mod wheels;

pub use device::{choose, DeviceChoice, GpuDevice};
pub use memory::{memory_plan, MemoryPlan, StepSettings};
pub use network::GpuNetwork;
pub use optim::GpuOptimizer;
pub use pinned::PinnedAllocator;
