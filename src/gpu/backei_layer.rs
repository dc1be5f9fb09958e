//! Host side of the fused BackEI layer (and of the plain spiking layer, its special case with
//! back and ei off): one launch runs the whole time loop forward, one runs BPTT backward.
//! Twins: `src/cpu/backei_layer.rs` (the reference) and `cuda/backei_layer.cu`, `cuda/spiking.cu`.
//!
//! INTERFACE CONTRACT (used by `src/gpu/network.rs`; keep these signatures):
//! - parameters and gradients live in ONE flat device buffer each (the fused optimizer's view);
//!   a layer is told where its tensors are by `BackEiSlots` = [W_b, b_b, W_e, b_e] ranges
//!   (empty ranges when a gate is off), exactly as `cpu::network` lays them out.
//! - every tensor is time-major [T][B][C][H][W] f32; the input current may have T_in = 1.

use super::device::GpuDevice;
use crate::error::{BackeiError, Result};
use crate::spec::{FeedbackConfig, NeuronConfig};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
use std::ops::Range;
use std::sync::Arc;

/// Where W_b, b_b, W_e, b_e sit in the flat parameter (and gradient) buffer.
pub type BackEiSlots = [Range<usize>; 4];

pub struct GpuBackEiLayer {
    pub dev: Arc<GpuDevice>,
    pub feedback: FeedbackConfig,
    pub neuron: NeuronConfig,
    /// [C, H, W]
    pub shape: [usize; 3],
}

impl GpuBackEiLayer {
    pub fn new(dev: &Arc<GpuDevice>, shape: [usize; 3], feedback: FeedbackConfig, neuron: &NeuronConfig) -> Result<Self> {
        Ok(GpuBackEiLayer { dev: dev.clone(), feedback, neuron: *neuron, shape })
    }

    /// All T steps for a batch; the output s [T][B][C][H][W] is then `self.output()`.
    pub fn forward(&mut self, _params: &CudaSlice<f32>, _slots: &BackEiSlots, _input: &CudaView<f32>, _t_in: usize, _batch: usize, _steps: usize) -> Result<()> {
        Err(BackeiError::Cuda("GpuBackEiLayer::forward: not implemented yet".into()))
    }

    /// BPTT: ∂L/∂s [T][B][..] in, ∂L/∂I out ([T_in][B][..], summed over t when T_in = 1),
    /// parameter gradients ACCUMULATED into `grads` at `slots`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(&mut self, _params: &CudaSlice<f32>, _grads: &mut CudaSlice<f32>, _slots: &BackEiSlots, _input: &CudaView<f32>, _t_in: usize, _grad_out: &CudaView<f32>, _grad_in: &mut CudaViewMut<f32>) -> Result<()> {
        Err(BackeiError::Cuda("GpuBackEiLayer::backward: not implemented yet".into()))
    }

    /// s of the last forward.
    pub fn output(&self) -> Result<&CudaSlice<f32>> {
        Err(BackeiError::Cuda("GpuBackEiLayer::output: not implemented yet".into()))
    }

    /// (firing rate, inhibitory fraction among fired) of the last forward, reduced on the GPU.
    pub fn spike_stats(&self) -> Result<(f64, f64)> {
        Err(BackeiError::Cuda("GpuBackEiLayer::spike_stats: not implemented yet".into()))
    }
}
