//! The fused optimizers on the GPU: one launch updates every parameter of the network in the one
//! flat buffer, with PyTorch's exact formulas (evaluated in f64 per element like the CPU twin
//! `src/optim.rs`; kernels in `cuda/optim.cu`). The bias corrections are computed on the host
//! and staged in device memory before each step ([`GpuOptimizer::stage`]), so the launch itself
//! ([`GpuOptimizer::enqueue`]) is the same every step and a captured CUDA graph replays it.
//! The state converts to and from `optim::Optimizer` (host), which checkpoints save.

use super::device::GpuDevice;
use super::staging::PinnedBuf;
use super::util::{check_len, cuda_err, grid};
use crate::error::Result;
use crate::optim::{Optimizer, OptimizerConfig};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, PushKernelArg};
use std::sync::Arc;

pub struct GpuOptimizer {
    pub dev: Arc<GpuDevice>,
    pub config: OptimizerConfig,
    /// The learning rate in force (StepLR changes it).
    pub lr: f64,
    /// Steps taken (Adam's t).
    pub step: u64,
    /// Adam: first moment; SGD: momentum buffer.
    pub m: CudaSlice<f32>,
    /// Adam: second moment (one element for SGD, unused).
    pub v: CudaSlice<f32>,
    len: usize,
    /// The step's scalars on the device (Adam: step size, sqrt(1 − β2^t) and AdamW's decay
    /// factor 1 − lr·wd, 1 for Adam; SGD: lr and whether it is the first step), staged from
    /// `scalars_host` before each step.
    scalars: CudaSlice<f64>,
    scalars_host: PinnedBuf<f64>,
    /// A zero status word for updates outside a network step (`update`).
    no_status: CudaSlice<u32>,
}

/// f64 values of the per-step scalars.
const SCALARS: usize = 3;

impl GpuOptimizer {
    pub fn new(dev: &Arc<GpuDevice>, config: OptimizerConfig, len: usize) -> Result<Self> {
        config.validate()?;
        let vlen = if matches!(config, OptimizerConfig::Adam { .. }) { len } else { 1 };
        let m = dev.stream.alloc_zeros(len.max(1)).map_err(cuda_err("allocating the optimizer state"))?;
        let v = dev.stream.alloc_zeros(vlen.max(1)).map_err(cuda_err("allocating the optimizer state"))?;
        let scalars = dev.stream.alloc_zeros(SCALARS).map_err(cuda_err("allocating the optimizer's step scalars"))?;
        let scalars_host = PinnedBuf::new(dev, SCALARS).map_err(cuda_err("allocating page-locked memory"))?;
        let no_status = dev.stream.alloc_zeros(1).map_err(cuda_err("allocating the optimizer state"))?;
        Ok(GpuOptimizer { dev: dev.clone(), config, lr: config.lr(), step: 0, m, v, len, scalars, scalars_host, no_status })
    }

    /// Device bytes of an optimizer for `len` parameters: m, v (Adam), the step scalars and a
    /// status word.
    pub fn device_bytes(config: &OptimizerConfig, len: usize) -> usize {
        let vlen = if matches!(config, OptimizerConfig::Adam { .. }) { len } else { 1 };
        4 * (len.max(1) + vlen.max(1)) + 8 * SCALARS + 4
    }

    /// The state copied from a host optimizer (a checkpoint, or the CPU engine's).
    pub fn from_host(dev: &Arc<GpuDevice>, host: &Optimizer) -> Result<Self> {
        let mut o = GpuOptimizer::new(dev, host.config, host.m.len())?;
        o.load(host)?;
        Ok(o)
    }

    /// Replaces config, lr, step, m and v by a host optimizer's.
    pub fn load(&mut self, host: &Optimizer) -> Result<()> {
        host.config.validate()?;
        check_len("optimizer state m", host.m.len(), self.len)?;
        let adam = matches!(host.config, OptimizerConfig::Adam { .. });
        if adam {
            check_len("optimizer state v", host.v.len(), self.len)?;
            if self.v.len() != self.len.max(1) {
                self.v = self.dev.stream.alloc_zeros(self.len.max(1)).map_err(cuda_err("allocating the optimizer state"))?;
            }
        }
        if self.len > 0 {
            self.dev.stream.memcpy_htod(&host.m, &mut self.m).map_err(cuda_err("uploading the optimizer state"))?;
            if adam {
                self.dev.stream.memcpy_htod(&host.v, &mut self.v).map_err(cuda_err("uploading the optimizer state"))?;
            }
        }
        self.config = host.config;
        self.lr = host.lr;
        self.step = host.step;
        Ok(())
    }

    /// The state as a host optimizer (for checkpoints and comparisons).
    pub fn to_host(&self) -> Result<Optimizer> {
        let mut m = self.dev.stream.clone_dtoh(&self.m).map_err(cuda_err("reading the optimizer state"))?;
        m.truncate(self.len);
        let v = if matches!(self.config, OptimizerConfig::Adam { .. }) {
            let mut v = self.dev.stream.clone_dtoh(&self.v).map_err(cuda_err("reading the optimizer state"))?;
            v.truncate(self.len);
            v
        } else {
            Vec::new()
        };
        Ok(Optimizer { config: self.config, lr: self.lr, step: self.step, m, v })
    }

    /// One update of every parameter, one launch: `stage` and `enqueue` (the step always counts).
    pub fn update(&mut self, params: &mut CudaSlice<f32>, grads: &CudaSlice<f32>) -> Result<()> {
        self.stage()?;
        let no = self.no_status.as_view();
        enqueue_update(&self.dev, self.config, self.len, &mut self.m, &mut self.v, &self.scalars, params, grads, &no, 1)
    }

    /// Counts the next step (Adam's t) and copies its scalars (from the learning rate in force)
    /// to the device, stream-ordered before the step's kernels.
    pub fn stage(&mut self) -> Result<()> {
        self.step += 1;
        let values = match self.config {
            OptimizerConfig::Adam { beta1, beta2, .. } => {
                let (step_size, bc2_sqrt) = adam_step_scalars(beta1, beta2, self.lr, self.step);
                [step_size, bc2_sqrt, self.config.decay_factor(self.lr)]
            }
            OptimizerConfig::Sgd { .. } => [self.lr, (self.step == 1) as u8 as f64, 1.0],
        };
        self.scalars_host.host_mut().map_err(cuda_err("waiting for the last scalar upload"))?.copy_from_slice(&values);
        self.scalars_host.upload(&self.dev.stream, &mut self.scalars).map_err(cuda_err("uploading the optimizer's step scalars"))
    }

    /// The update of every parameter with the staged scalars, one launch, skipped on the device
    /// when a word of `status` (the step's non-finite counts) is non-zero.
    pub fn enqueue(&mut self, params: &mut CudaSlice<f32>, grads: &CudaSlice<f32>, status: &CudaView<u32>) -> Result<()> {
        let n = status.len() as i32;
        enqueue_update(&self.dev, self.config, self.len, &mut self.m, &mut self.v, &self.scalars, params, grads, status, n)
    }

    /// The device addresses of the state the launch reads (a captured graph holds them).
    pub fn state_addresses(&self) -> [u64; 3] {
        use cudarc::driver::DevicePtr;
        let s = &self.dev.stream;
        [self.m.device_ptr(s).0, self.v.device_ptr(s).0, self.scalars.device_ptr(s).0]
    }
}

#[allow(clippy::too_many_arguments)]
fn enqueue_update(
    dev: &GpuDevice,
    config: OptimizerConfig,
    len: usize,
    m: &mut CudaSlice<f32>,
    v: &mut CudaSlice<f32>,
    scalars: &CudaSlice<f64>,
    params: &mut CudaSlice<f32>,
    grads: &CudaSlice<f32>,
    status: &CudaView<u32>,
    nstatus: i32,
) -> Result<()> {
    check_len("parameters", params.len(), len)?;
    check_len("gradients", grads.len(), len)?;
    if len == 0 {
        return Ok(());
    }
    let n = len as i64;
    let cfg = grid(len);
    match config {
        OptimizerConfig::Adam { beta1, beta2, eps, weight_decay, decoupled_weight_decay, .. } => {
            let f = dev.kernels.function("optim", "adam_f32")?;
            // AdamW's decay is the staged factor; the kernel's weight_decay is Adam's L2 term
            let weight_decay = if decoupled_weight_decay { 0.0 } else { weight_decay };
            // SAFETY: params, grads, m and v hold len values, scalars three, status nstatus.
            unsafe {
                dev.stream
                    .launch_builder(&f)
                    .arg(params)
                    .arg(grads)
                    .arg(m)
                    .arg(v)
                    .arg(&n)
                    .arg(&beta1)
                    .arg(&beta2)
                    .arg(&eps)
                    .arg(&weight_decay)
                    .arg(scalars)
                    .arg(status)
                    .arg(&nstatus)
                    .launch(cfg)
            }
            .map_err(cuda_err("adam_f32"))?;
        }
        OptimizerConfig::Sgd { momentum, weight_decay, .. } => {
            let f = dev.kernels.function("optim", "sgd_f32")?;
            // SAFETY: params, grads and m hold len values, scalars three, status nstatus.
            unsafe {
                dev.stream
                    .launch_builder(&f)
                    .arg(params)
                    .arg(grads)
                    .arg(m)
                    .arg(&n)
                    .arg(&momentum)
                    .arg(&weight_decay)
                    .arg(scalars)
                    .arg(status)
                    .arg(&nstatus)
                    .launch(cfg)
            }
            .map_err(cuda_err("sgd_f32"))?;
        }
    }
    Ok(())
}

/// Adds the number of NaN/Inf elements of `x` to `count` (one word, not cleared; no read-back).
pub fn count_nonfinite_into(dev: &GpuDevice, x: &CudaView<f32>, count: &mut CudaViewMut<u32>) -> Result<()> {
    if x.is_empty() {
        return Ok(());
    }
    check_len("non-finite counter", count.len(), 1)?;
    let f = dev.kernels.function("optim", "count_nonfinite_f32")?;
    let n = x.len() as i64;
    // SAFETY: x holds n values, count one.
    unsafe { dev.stream.launch_builder(&f).arg(x).arg(&n).arg(count).launch(grid(x.len().min(1 << 22))) }
        .map_err(cuda_err("count_nonfinite_f32"))?;
    Ok(())
}

/// How many elements of `x` are NaN or Inf (one reduction on the device, one u32 back).
pub fn count_nonfinite(dev: &GpuDevice, x: &CudaSlice<f32>, count: &mut CudaSlice<u32>) -> Result<u32> {
    dev.stream.memset_zeros(count).map_err(cuda_err("clearing a counter"))?;
    if x.is_empty() {
        return Ok(0);
    }
    let f = dev.kernels.function("optim", "count_nonfinite_f32")?;
    let n = x.len() as i64;
    let cfg = grid(x.len().min(1 << 22));
    // SAFETY: x holds n values, count one.
    unsafe { dev.stream.launch_builder(&f).arg(x).arg(&n).arg(&mut *count).launch(cfg) }.map_err(cuda_err("count_nonfinite_f32"))?;
    Ok(dev.stream.clone_dtoh(count).map_err(cuda_err("reading a counter"))?[0])
}

/// `adam_f32`'s bias-corrected scalars for step `step` (1-based): (lr / (1 − β1^t), sqrt(1 − β2^t)),
/// in f64 as the CPU optimizer computes them.
pub fn adam_step_scalars(beta1: f64, beta2: f64, lr: f64, step: u64) -> (f64, f64) {
    let bc1 = 1.0 - beta1.powi(step as i32);
    let bc2 = 1.0 - beta2.powi(step as i32);
    (lr / bc1, bc2.sqrt())
}
