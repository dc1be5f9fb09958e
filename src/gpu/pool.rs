//! 2×2 average pooling on the GPU (stride 2, floor on odd sizes). Twins: `src/cpu/pool.rs`,
//! `cuda/pool.cu` (one thread per output element forward, per input element backward).

use super::device::GpuDevice;
use super::util::{check_len, cuda_err, grid};
use crate::error::Result;
use cudarc::driver::{CudaView, CudaViewMut, PushKernelArg};

/// y [planes][h/2][w/2] from x [planes][h][w] (planes = samples·channels).
pub fn forward(dev: &GpuDevice, planes: usize, h: usize, w: usize, x: &CudaView<f32>, y: &mut CudaViewMut<f32>) -> Result<()> {
    check_len("pool input", x.len(), planes * h * w)?;
    check_len("pool output", y.len(), planes * (h / 2) * (w / 2))?;
    let f = dev.kernels.function("pool", "avgpool2_forward_f32")?;
    let (pl, hh, ww) = (planes as i64, h as i32, w as i32);
    let cfg = grid(y.len());
    // SAFETY: lengths checked above.
    unsafe { dev.stream.launch_builder(&f).arg(x).arg(&mut *y).arg(&pl).arg(&hh).arg(&ww).launch(cfg) }
        .map_err(cuda_err("avgpool2_forward_f32"))?;
    Ok(())
}

/// `forward` of int8 spikes x (planes·h·w bytes in ⌈planes·h·w/4⌉ f32 words: a v4 BackEI layer's
/// compact output), bit for bit what `forward` gives on the same spikes in f32.
pub fn forward_s8(dev: &GpuDevice, planes: usize, h: usize, w: usize, x: &CudaView<f32>, y: &mut CudaViewMut<f32>) -> Result<()> {
    check_len("pool input (int8 spikes, in f32 words)", x.len(), (planes * h * w).div_ceil(4))?;
    check_len("pool output", y.len(), planes * (h / 2) * (w / 2))?;
    let f = dev.kernels.function("pool", "avgpool2_forward_s8")?;
    let (pl, hh, ww) = (planes as i64, h as i32, w as i32);
    let cfg = grid(y.len());
    // SAFETY: lengths checked above (x holds planes·h·w bytes).
    unsafe { dev.stream.launch_builder(&f).arg(x).arg(&mut *y).arg(&pl).arg(&hh).arg(&ww).launch(cfg) }
        .map_err(cuda_err("avgpool2_forward_s8"))?;
    Ok(())
}

/// dx (overwritten, 0 on the rows/columns the floor dropped) from dy.
pub fn backward(dev: &GpuDevice, planes: usize, h: usize, w: usize, dy: &CudaView<f32>, dx: &mut CudaViewMut<f32>) -> Result<()> {
    check_len("pool output gradient", dy.len(), planes * (h / 2) * (w / 2))?;
    check_len("pool input gradient", dx.len(), planes * h * w)?;
    let f = dev.kernels.function("pool", "avgpool2_backward_f32")?;
    let (pl, hh, ww) = (planes as i64, h as i32, w as i32);
    let cfg = grid(dx.len());
    // SAFETY: lengths checked above.
    unsafe { dev.stream.launch_builder(&f).arg(dy).arg(&mut *dx).arg(&pl).arg(&hh).arg(&ww).launch(cfg) }
        .map_err(cuda_err("avgpool2_backward_f32"))?;
    Ok(())
}
