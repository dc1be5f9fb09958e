//! backei: the BackEISNN spiking network (Zhao, Zeng, Li, Neural Networks 2022) trained by
//! backpropagation through time on the CPU (the reference engine) and on NVIDIA GPUs (fused
//! NVRTC kernels).

pub mod atomic_file;
pub mod cpu;
pub mod data;
pub mod dist;
pub mod engine;
pub mod error;
pub mod gpu;
pub mod memory;
pub mod optim;
pub mod plot;
pub mod precision;
pub mod predict;
pub mod real;
pub mod rng;
pub mod spec;
pub mod train;

pub use cpu::loss::Loss;
pub use cpu::network::{Network, ParamSlot, StepStats};
pub use engine::Engine;
pub use error::{BackeiError, Result};
pub use optim::{CosineLr, LrSchedule, Optimizer, OptimizerConfig, StepLr};
pub use precision::Precision;
pub use real::Real;
pub use spec::{FeedbackConfig, FiringMode, LayerSpec, NetworkSpec, NeuronConfig, Surrogate};
