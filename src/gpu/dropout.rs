//! Dropout on the GPU with a new mask at every time step, drawn from the counter-based RNG
//! (`cuda/common.cuh`, twin of `crate::rng`): the same (seed, iteration, layer, step, element)
//! gives the same mask as the CPU engine (`src/cpu/dropout.rs`). No mask is stored: the backward
//! kernel draws it again. Kernels: `cuda/dropout.cu`.

use super::device::GpuDevice;
use super::util::{check_len, cuda_err, grid};
use crate::error::Result;
use cudarc::driver::{CudaView, CudaViewMut, PushKernelArg};

/// 1/(1−p) rounded to f32 exactly as the CPU engine does.
pub fn scale(p: f32) -> f32 {
    (1.0 / (1.0 - p as f64)) as f32
}

/// Training: y [steps][len] = mask·x/(1−p), x [t_in][len] with t_in = 1 (broadcast) or steps.
/// Evaluation (`key` = None): y = x broadcast over the steps.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    dev: &GpuDevice,
    key: Option<u64>,
    p: f32,
    len: usize,
    steps: usize,
    t_in: usize,
    x: &CudaView<f32>,
    y: &mut CudaViewMut<f32>,
) -> Result<()> {
    check_len("dropout input", x.len(), t_in * len)?;
    check_len("dropout output", y.len(), steps * len)?;
    let (l, st, ti) = (len as i64, steps as i32, t_in as i32);
    match key {
        Some(key) => {
            let f = dev.kernels.function("dropout", "dropout_forward_f32")?;
            let sc = scale(p);
            // SAFETY: lengths checked above.
            unsafe {
                dev.stream.launch_builder(&f).arg(x).arg(y).arg(&key).arg(&p).arg(&sc).arg(&l).arg(&st).arg(&ti).launch(grid(steps * len))
            }
            .map_err(cuda_err("dropout_forward_f32"))?;
        }
        None if t_in == steps => {
            dev.stream.memcpy_dtod(x, y).map_err(cuda_err("dropout (eval) copy"))?;
        }
        None => {
            let f = dev.kernels.function("dropout", "broadcast_steps_f32")?;
            // SAFETY: lengths checked above.
            unsafe { dev.stream.launch_builder(&f).arg(x).arg(y).arg(&l).arg(&st).launch(grid(steps * len)) }
                .map_err(cuda_err("broadcast_steps_f32"))?;
        }
    }
    Ok(())
}

/// dx [t_in][len] from dy [steps][len] (summed over the steps when t_in = 1).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dev: &GpuDevice,
    key: Option<u64>,
    p: f32,
    len: usize,
    steps: usize,
    t_in: usize,
    dy: &CudaView<f32>,
    dx: &mut CudaViewMut<f32>,
) -> Result<()> {
    check_len("dropout output gradient", dy.len(), steps * len)?;
    check_len("dropout input gradient", dx.len(), t_in * len)?;
    let (l, st, ti) = (len as i64, steps as i32, t_in as i32);
    match key {
        Some(key) => {
            let f = dev.kernels.function("dropout", "dropout_backward_f32")?;
            let sc = scale(p);
            // SAFETY: lengths checked above.
            unsafe {
                dev.stream.launch_builder(&f).arg(dy).arg(dx).arg(&key).arg(&p).arg(&sc).arg(&l).arg(&st).arg(&ti).launch(grid(steps * len))
            }
            .map_err(cuda_err("dropout_backward_f32"))?;
        }
        None if t_in == steps => {
            dev.stream.memcpy_dtod(dy, dx).map_err(cuda_err("dropout (eval) gradient copy"))?;
        }
        None => {
            let f = dev.kernels.function("dropout", "sum_steps_f32")?;
            // SAFETY: lengths checked above.
            unsafe { dev.stream.launch_builder(&f).arg(dy).arg(dx).arg(&l).arg(&st).launch(grid(len)) }
                .map_err(cuda_err("sum_steps_f32"))?;
        }
    }
    Ok(())
}
