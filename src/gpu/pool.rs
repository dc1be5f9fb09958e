//! 2×2 average pooling on the GPU (stride 2, floor on odd sizes). Twins: `src/cpu/pool.rs`,
//! `cuda/pool.cu` (one thread per output element forward, per input element backward).

use super::device::GpuDevice;
use super::util::{check_len, cuda_err, grid};
use crate::error::Result;
use cudarc::driver::{CudaView, CudaViewMut, PushKernelArg};

/// The element types of a pooling's input and output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolIo {
    /// f32 in, f32 out.
    F32 = 0,
    /// int8 spikes in (n bytes in ⌈n/4⌉ f32 words: a v4 BackEI layer's compact output), f32 out:
    /// what the same spikes in f32 give, bit for bit.
    S8 = 1,
    /// int8 spikes in, the pooled spikes out as int8 codes c (their f32 value c · 0.25 exactly,
    /// with a dropout between c · scale/4: [`q8_factor`]): what only the tensor-core GEMMs read
    /// (`memory::pooled_as_codes`, `gemm_tc::XForm::Q8`).
    S8ToQ8 = 2,
}

impl PoolIo {
    pub fn from_flags(x_s8: bool, y_q8: bool) -> Self {
        match (x_s8, y_q8) {
            (true, true) => PoolIo::S8ToQ8,
            (true, false) => PoolIo::S8,
            _ => PoolIo::F32,
        }
    }

    /// f32 words of an input of n elements, and of an output of n elements.
    pub fn words(self, n_in: usize, n_out: usize) -> (usize, usize) {
        match self {
            PoolIo::F32 => (n_in, n_out),
            PoolIo::S8 => (n_in.div_ceil(4), n_out),
            PoolIo::S8ToQ8 => (n_in.div_ceil(4), n_out.div_ceil(4)),
        }
    }

    /// The kernel of these types among a kernel family's `[f32, s8, s8_q8]` names (the
    /// discriminants index it).
    pub fn pick(self, names: [&'static str; 3]) -> &'static str {
        names[self as usize]
    }
}

/// What one int8 code of pooled spikes stands for: 1/4 of the sum of the (kept) spikes, times the
/// dropout's scale 1/(1 − p) where a training step applies one before the pooling. Exact only where
/// that scale is a power of two (`memory::pooled_as_codes` asks for codes only then).
pub fn q8_factor(dropout_scale: Option<f32>) -> f32 {
    dropout_scale.map_or(0.25, |s| s * 0.25)
}

/// y [planes][h/2][w/2] from x [planes][h][w] (planes = samples·channels), in the types of `io`.
pub fn forward(dev: &GpuDevice, planes: usize, h: usize, w: usize, x: &CudaView<f32>, io: PoolIo, y: &mut CudaViewMut<f32>) -> Result<()> {
    let (n, outs) = (planes * h * w, planes * (h / 2) * (w / 2));
    let (xw, yw) = io.words(n, outs);
    check_len("pool input (in f32 words)", x.len(), xw)?;
    check_len("pool output (in f32 words)", y.len(), yw)?;
    let kernel = io.pick(["avgpool2_forward_f32", "avgpool2_forward_s8", "avgpool2_forward_s8_q8"]);
    let f = dev.kernels.function("pool", kernel)?;
    let (pl, hh, ww) = (planes as i64, h as i32, w as i32);
    let cfg = grid(outs);
    // SAFETY: lengths checked above (x and y hold the elements in the types of `io`).
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
