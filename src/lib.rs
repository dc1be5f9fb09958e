//! backei: the BackEISNN spiking network (Zhao, Zeng, Li, Neural Networks 2022) trained by
//! backpropagation through time on the CPU (the reference engine) and on NVIDIA GPUs (fused
//! NVRTC kernels).

pub mod data;
