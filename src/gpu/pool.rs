//! 2×2 average pooling on the GPU (stride 2, floor on odd sizes). Twins: `src/cpu/pool.rs`,
//! `cuda/pool.cu` (one thread per output element forward, per input element backward).

use super::device::GpuDevice;
use super::util::{check_len, cuda_err, grid};
use crate::error::Result;
use cudarc::driver::{CudaView, CudaViewMut, PushKernelArg};

/// y [planes][h/2][w/2] from x [planes][h][w] (planes = samples·channels). With `x_s8`, x holds
/// int8 spikes (planes·h·w bytes in ⌈planes·h·w/4⌉ f32 words: a v4 BackEI layer's compact output;
/// `avgpool2_forward_s8`), and y is what the same spikes in f32 give, bit for bit.
pub fn forward(dev: &GpuDevice, planes: usize, h: usize, w: usize, x: &CudaView<f32>, x_s8: bool, y: &mut CudaViewMut<f32>) -> Result<()> {
    let n = planes * h * w;
    match x_s8 {
        true => check_len("pool input (int8 spikes, in f32 words)", x.len(), n.div_ceil(4))?,
        false => check_len("pool input", x.len(), n)?,
    }
    check_len("pool output", y.len(), planes * (h / 2) * (w / 2))?;
    let kernel = if x_s8 { "avgpool2_forward_s8" } else { "avgpool2_forward_f32" };
    let f = dev.kernels.function("pool", kernel)?;
    let (pl, hh, ww) = (planes as i64, h as i32, w as i32);
    let cfg = grid(y.len());
    // SAFETY: lengths checked above (x holds planes·h·w floats, or bytes with x_s8).
    unsafe { dev.stream.launch_builder(&f).arg(x).arg(&mut *y).arg(&pl).arg(&hh).arg(&ww).launch(cfg) }.map_err(cuda_err(kernel))?;
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
