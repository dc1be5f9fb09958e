//! Dropout on the GPU with a new mask at every time step, drawn from the counter-based RNG
//! (`cuda/common.cuh`, twin of `crate::rng`): the same (seed, iteration, layer, step, element)
//! gives the same mask as the CPU engine (`src/cpu/dropout.rs`). No mask is stored: the backward
//! kernel draws it again. The key is read from device memory (a [`DropoutKeys`] table the host
//! fills before each step), so the launches are the same every step and a CUDA graph replays
//! them. Kernels: `cuda/dropout.cu`.

use super::device::GpuDevice;
use super::pool::PoolIo;
use super::staging::PinnedBuf;
use super::util::{check_len, cuda_err, grid};
use crate::error::Result;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, PushKernelArg};

/// The dropout keys of a network's layers on the device, one per dropout layer, staged from
/// page-locked host memory before each step.
pub struct DropoutKeys {
    pub keys: CudaSlice<u64>,
    host: PinnedBuf<u64>,
}

impl DropoutKeys {
    /// A table of `slots` keys (at least one).
    pub fn new(dev: &GpuDevice, slots: usize) -> Result<Self> {
        let keys = dev.stream.alloc_zeros(slots.max(1)).map_err(cuda_err("allocating the dropout keys"))?;
        let host = PinnedBuf::new(dev, slots.max(1)).map_err(cuda_err("allocating page-locked memory"))?;
        Ok(DropoutKeys { keys, host })
    }

    /// Device bytes of a table of `slots` keys.
    pub fn device_bytes(slots: usize) -> usize {
        8 * slots.max(1)
    }

    /// Copies `keys` (one per slot) to the device, stream-ordered before the step's kernels.
    pub fn stage(&mut self, dev: &GpuDevice, keys: &[u64]) -> Result<()> {
        let host = self.host.host_mut().map_err(cuda_err("waiting for the last key upload"))?;
        check_len("dropout keys", keys.len().max(1), host.len())?;
        host[..keys.len()].copy_from_slice(keys);
        self.host.upload(&dev.stream, &mut self.keys).map_err(cuda_err("uploading the dropout keys"))
    }
}

/// Which mask a dropout launch applies: none (evaluation) or the key in `keys[slot]`, for the
/// elements from `index0` on (a data-parallel shard's place in the global batch: see
/// `cpu::dropout`; 0 for a whole batch).
#[derive(Clone, Copy)]
pub enum Mask<'a> {
    Off,
    Key { keys: &'a CudaSlice<u64>, slot: usize, index0: u64 },
}

/// Launches the forward or the backward kernel (they take the same arguments) on `threads`.
#[allow(clippy::too_many_arguments)]
fn launch_masked(
    dev: &GpuDevice,
    name: &'static str,
    src: &CudaView<f32>,
    dst: &mut CudaViewMut<f32>,
    (keys, slot, index0): (&CudaSlice<u64>, usize, u64),
    p: f32,
    (len, steps, t_in): (usize, usize, usize),
    threads: usize,
) -> Result<()> {
    let f = dev.kernels.function("dropout", name)?;
    let (sc, sl) = (scale(p), slot_index(keys, slot)?);
    let (l, st, ti) = (len as i64, steps as i32, t_in as i32);
    let mut b = dev.stream.launch_builder(&f);
    b.arg(src).arg(dst).arg(keys).arg(&sl).arg(&index0).arg(&p).arg(&sc).arg(&l).arg(&st).arg(&ti);
    // SAFETY: the callers checked the lengths; the key slot is checked above.
    unsafe { b.launch(grid(threads)) }.map_err(cuda_err(name))?;
    Ok(())
}

/// 1/(1−p) rounded to f32 exactly as the CPU engine does.
pub fn scale(p: f32) -> f32 {
    (1.0 / (1.0 - p as f64)) as f32
}

/// Whether `scale(p)` is a power of two: every kept x·scale of an exact x, and every sum of such
/// products, is then exact (no mantissa bits to round).
pub fn scale_is_power_of_two(p: f32) -> bool {
    scale(p).to_bits() & 0x007F_FFFF == 0
}

/// Training: y [steps][len] = mask·x/(1−p), x [t_in][len] with t_in = 1 (broadcast) or steps.
/// Evaluation (`Mask::Off`): y = x broadcast over the steps.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    dev: &GpuDevice,
    mask: Mask,
    p: f32,
    len: usize,
    steps: usize,
    t_in: usize,
    x: &CudaView<f32>,
    y: &mut CudaViewMut<f32>,
) -> Result<()> {
    check_len("dropout input", x.len(), t_in * len)?;
    check_len("dropout output", y.len(), steps * len)?;
    let (l, st) = (len as i64, steps as i32);
    match mask {
        Mask::Key { keys, slot, index0 } => {
            launch_masked(dev, "dropout_forward_f32", x, y, (keys, slot, index0), p, (len, steps, t_in), steps * len)?
        }
        Mask::Off if t_in == steps => {
            dev.stream.memcpy_dtod(x, y).map_err(cuda_err("dropout (eval) copy"))?;
        }
        Mask::Off => {
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
    mask: Mask,
    p: f32,
    len: usize,
    steps: usize,
    t_in: usize,
    dy: &CudaView<f32>,
    dx: &mut CudaViewMut<f32>,
) -> Result<()> {
    check_len("dropout output gradient", dy.len(), steps * len)?;
    check_len("dropout input gradient", dx.len(), t_in * len)?;
    let (l, st) = (len as i64, steps as i32);
    match mask {
        Mask::Key { keys, slot, index0 } => {
            launch_masked(dev, "dropout_backward_f32", dy, dx, (keys, slot, index0), p, (len, steps, t_in), steps * len)?
        }
        Mask::Off if t_in == steps => {
            dev.stream.memcpy_dtod(dy, dx).map_err(cuda_err("dropout (eval) gradient copy"))?;
        }
        Mask::Off => {
            let f = dev.kernels.function("dropout", "sum_steps_f32")?;
            // SAFETY: lengths checked above.
            unsafe { dev.stream.launch_builder(&f).arg(dy).arg(dx).arg(&l).arg(&st).launch(grid(len)) }
                .map_err(cuda_err("sum_steps_f32"))?;
        }
    }
    Ok(())
}

fn slot_index(keys: &CudaSlice<u64>, slot: usize) -> Result<i32> {
    if slot >= keys.len() {
        return Err(crate::error::shape_err("dropout key slot", format!("< {}", keys.len()), format!("{slot}")));
    }
    Ok(slot as i32)
}

/// Dropout followed by 2×2 average pooling in one pass (`dropout_avgpool2_forward_f32`): y
/// [steps][planes][h/2][w/2] from x [steps][planes][h][w] (planes = B·C per step), bit for bit
/// what `forward` then `pool::forward` give; the dropout's output is never stored. In the types of
/// `io` ([`PoolIo`]): x as int8 spikes (a v4 BackEI layer's compact output), y what the same spikes
/// in f32 give; or y as int8 codes of the pooled spikes (`pool::q8_factor`, exact where the
/// dropout's scale is a power of two).
#[allow(clippy::too_many_arguments)]
pub fn forward_pooled(
    dev: &GpuDevice,
    mask: Mask,
    p: f32,
    planes: usize,
    steps: usize,
    h: usize,
    w: usize,
    x: &CudaView<f32>,
    io: PoolIo,
    y: &mut CudaViewMut<f32>,
) -> Result<()> {
    let (n, outs) = (steps * planes * h * w, steps * planes * (h / 2) * (w / 2));
    let (xw, yw) = io.words(n, outs);
    check_len("dropout+pool input (in f32 words)", x.len(), xw)?;
    check_len("dropout+pool output (in f32 words)", y.len(), yw)?;
    let kernel = io.pick(["dropout_avgpool2_forward_f32", "dropout_avgpool2_forward_s8", "dropout_avgpool2_forward_s8_q8"]);
    pooled(dev, kernel, mask, p, planes, steps, h, w, x, y, outs)
}

/// The gradient of `forward_pooled`: dx [steps][planes][h][w] from dy [steps][planes][h/2][w/2].
#[allow(clippy::too_many_arguments)]
pub fn backward_pooled(
    dev: &GpuDevice,
    mask: Mask,
    p: f32,
    planes: usize,
    steps: usize,
    h: usize,
    w: usize,
    dy: &CudaView<f32>,
    dx: &mut CudaViewMut<f32>,
) -> Result<()> {
    check_len("dropout+pool output gradient", dy.len(), steps * planes * (h / 2) * (w / 2))?;
    check_len("dropout+pool input gradient", dx.len(), steps * planes * h * w)?;
    pooled(dev, "dropout_avgpool2_backward_f32", mask, p, planes, steps, h, w, dy, dx, dx.len())
}

#[allow(clippy::too_many_arguments)]
fn pooled(
    dev: &GpuDevice,
    kernel: &'static str,
    mask: Mask,
    p: f32,
    planes: usize,
    steps: usize,
    h: usize,
    w: usize,
    src: &CudaView<f32>,
    dst: &mut CudaViewMut<f32>,
    threads: usize,
) -> Result<()> {
    use cudarc::driver::DevicePtr;
    let f = dev.kernels.function("dropout", kernel)?;
    let (keys, slot, index0, apply) = match mask {
        Mask::Key { keys, slot, index0 } => (keys.device_ptr(&dev.stream).0, slot_index(keys, slot)?, index0, 1i32),
        // evaluation: no mask, and the kernel reads no key
        Mask::Off => (0u64, 0, 0u64, 0),
    };
    let (sc, pl, st, hh, ww) = (scale(p), planes as i64, steps as i32, h as i32, w as i32);
    // SAFETY: lengths checked by the callers, the key slot above.
    unsafe {
        dev.stream
            .launch_builder(&f)
            .arg(src)
            .arg(&mut *dst)
            .arg(&keys)
            .arg(&slot)
            .arg(&index0)
            .arg(&apply)
            .arg(&p)
            .arg(&sc)
            .arg(&pl)
            .arg(&st)
            .arg(&hh)
            .arg(&ww)
            .launch(grid(threads))
    }
    .map_err(cuda_err(kernel))?;
    Ok(())
}
