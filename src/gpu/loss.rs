//! Readout and losses on the GPU: the readout (mean over T of the last layer's spikes), MSE or
//! cross-entropy with their gradients, and the predicted class of each sample. Twins:
//! `src/cpu/loss.rs`, `cuda/loss.cu`. Only B losses and B predictions come back to the host.

use super::device::GpuDevice;
use super::staging::PinnedBuf;
use super::util::{check_len, cuda_err, grid};
use crate::cpu::loss::Loss;
use crate::error::{config_err, Result};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, PushKernelArg};

/// The loss's constant factors as the kernels use them (`cuda/loss_row.cuh`): 1/(B·K) for MSE and
/// 1/B for cross-entropy, each the f32 rounding of the f64 quotient (what `loss_grad_f32`
/// computes on the device, so the fused kernel that takes them from here gets the same bits).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossScales {
    pub mse: f32,
    pub inv_b: f32,
}

// SAFETY: two f32, laid out as the kernels' `struct LossScales`.
unsafe impl cudarc::driver::DeviceRepr for LossScales {}

impl LossScales {
    pub fn new(batch: usize, classes: usize) -> Self {
        LossScales { mse: (1.0 / (batch as f64 * classes as f64)) as f32, inv_b: (1.0 / batch as f64) as f32 }
    }
}

/// y [B·K] = (1/T)·Σ_t s[t] from s [T][B·K].
pub fn readout(dev: &GpuDevice, steps: usize, bk: usize, s: &CudaView<f32>, y: &mut CudaViewMut<f32>) -> Result<()> {
    check_len("readout input", s.len(), steps * bk)?;
    check_len("readout", y.len(), bk)?;
    let f = dev.kernels.function("loss", "readout_f32")?;
    let (st, n) = (steps as i32, bk as i32);
    // SAFETY: lengths checked above.
    unsafe { dev.stream.launch_builder(&f).arg(s).arg(y).arg(&st).arg(&n).launch(grid(bk)) }.map_err(cuda_err("readout_f32"))?;
    Ok(())
}

/// ds [T][B·K] = dy/T at every step.
pub fn readout_backward(dev: &GpuDevice, steps: usize, bk: usize, dy: &CudaView<f32>, ds: &mut CudaViewMut<f32>) -> Result<()> {
    check_len("readout gradient", dy.len(), bk)?;
    check_len("last layer's output gradient", ds.len(), steps * bk)?;
    let f = dev.kernels.function("loss", "readout_backward_f32")?;
    let (st, n) = (steps as i32, bk as i32);
    // SAFETY: lengths checked above.
    unsafe { dev.stream.launch_builder(&f).arg(dy).arg(ds).arg(&st).arg(&n).launch(grid(steps * bk)) }
        .map_err(cuda_err("readout_backward_f32"))?;
    Ok(())
}

/// The status words a training step leaves on the device: NaN/Inf counts of the loss rows, the
/// gradients and the updated parameters (the optimizer skips its update when any is non-zero).
pub const STATUS_WORDS: usize = 3;
pub const STATUS_LOSS: usize = 0;
pub const STATUS_GRADS: usize = 1;
pub const STATUS_PARAMS: usize = 2;

/// What a step's loss kernel and checks left on the device, read back by the host.
#[derive(Clone, Debug, PartialEq)]
pub struct StepResults {
    pub row_loss: Vec<f32>,
    pub pred: Vec<i32>,
    pub status: [u32; STATUS_WORDS],
}

/// The buffers of the loss for one batch size: the labels (staged through page-locked memory),
/// ∂L/∂readout, the per-row losses and predictions, the step's status words, and the page-locked
/// buffers their read-back lands in.
pub struct LossBuffers {
    pub batch: usize,
    pub classes: usize,
    pub labels: CudaSlice<i32>,
    labels_host: PinnedBuf<i32>,
    /// ∂L/∂readout [B][K].
    pub dy: CudaSlice<f32>,
    pub row_loss: CudaSlice<f32>,
    pub pred: CudaSlice<i32>,
    /// [`STATUS_WORDS`] non-finite counts, cumulative until `clear_status`.
    pub status: CudaSlice<u32>,
    row_loss_host: PinnedBuf<f32>,
    pred_host: PinnedBuf<i32>,
    status_host: PinnedBuf<u32>,
}

impl LossBuffers {
    pub fn new(dev: &GpuDevice, batch: usize, classes: usize) -> Result<Self> {
        let a = |what: &str| cuda_err(format!("allocating the loss buffers ({what})"));
        Ok(LossBuffers {
            batch,
            classes,
            labels: dev.stream.alloc_zeros(batch).map_err(a("labels"))?,
            labels_host: PinnedBuf::new(dev, batch).map_err(a("page-locked labels"))?,
            dy: dev.stream.alloc_zeros(batch * classes).map_err(a("dy"))?,
            row_loss: dev.stream.alloc_zeros(batch).map_err(a("loss"))?,
            pred: dev.stream.alloc_zeros(batch).map_err(a("predictions"))?,
            status: dev.stream.alloc_zeros(STATUS_WORDS).map_err(a("status"))?,
            row_loss_host: PinnedBuf::new(dev, batch).map_err(a("page-locked losses"))?,
            pred_host: PinnedBuf::new(dev, batch).map_err(a("page-locked predictions"))?,
            status_host: PinnedBuf::new(dev, STATUS_WORDS).map_err(a("page-locked status"))?,
        })
    }

    /// Device bytes of the loss buffers for (batch, classes).
    pub fn device_bytes(batch: usize, classes: usize) -> usize {
        4 * (batch + batch * classes + batch + batch + STATUS_WORDS)
    }

    /// Checks `labels` and copies them to the device, stream-ordered before the step's kernels.
    pub fn stage_labels(&mut self, dev: &GpuDevice, labels: &[u8]) -> Result<()> {
        if labels.len() != self.batch {
            return Err(config_err("labels", format!("{} labels for a batch of {}", labels.len(), self.batch)));
        }
        if let Some((i, l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= self.classes) {
            return Err(config_err("labels", format!("label {l} of sample {i} is not below the {} classes", self.classes)));
        }
        let host = self.labels_host.host_mut().map_err(cuda_err("waiting for the last label upload"))?;
        host.iter_mut().zip(labels).for_each(|(h, &l)| *h = l as i32);
        self.labels_host.upload(&dev.stream, &mut self.labels).map_err(cuda_err("uploading the labels"))
    }

    /// The loss kernel on readout `y` and the staged labels: ∂L/∂y into `dy`, per-row losses and
    /// predictions; with `check` (training) the rows' NaN/Inf count is added to the loss status
    /// word.
    pub fn enqueue(&mut self, dev: &GpuDevice, loss: Loss, y: &CudaView<f32>, check: bool) -> Result<()> {
        check_len("readout", y.len(), self.batch * self.classes)?;
        let f = dev.kernels.function("loss", "loss_grad_f32")?;
        let (b, k, kind) = (self.batch as i32, self.classes as i32, matches!(loss, Loss::Ce) as i32);
        // SAFETY: every buffer was sized for (batch, classes).
        unsafe {
            dev.stream
                .launch_builder(&f)
                .arg(y)
                .arg(&self.labels)
                .arg(&mut self.dy)
                .arg(&mut self.row_loss)
                .arg(&mut self.pred)
                .arg(&b)
                .arg(&k)
                .arg(&kind)
                .launch(grid(self.batch))
        }
        .map_err(cuda_err("loss_grad_f32"))?;
        if !check {
            return Ok(());
        }
        let mut word = self.status.slice_mut(STATUS_LOSS..STATUS_LOSS + 1);
        super::optim::count_nonfinite_into(dev, &self.row_loss.as_view(), &mut word)
    }

    /// Copies the per-row losses, the predictions and the status words to page-locked memory
    /// (asynchronously; `results` waits for them).
    pub fn enqueue_readback(&mut self, dev: &GpuDevice) -> Result<()> {
        let e = || cuda_err("reading back the step's results");
        self.row_loss_host.download(&dev.stream, &self.row_loss).map_err(e())?;
        self.pred_host.download(&dev.stream, &self.pred).map_err(e())?;
        self.status_host.download(&dev.stream, &self.status).map_err(e())
    }

    /// The results of the last `enqueue_readback`, once its copies are done.
    pub fn results(&self) -> Result<StepResults> {
        let e = || cuda_err("waiting for the step's results");
        let status = self.status_host.host().map_err(e())?;
        Ok(StepResults {
            row_loss: self.row_loss_host.host().map_err(e())?.to_vec(),
            pred: self.pred_host.host().map_err(e())?.to_vec(),
            status: [status[0], status[1], status[2]],
        })
    }

    /// Zeroes the status words (after the host has reported a non-finite step).
    pub fn clear_status(&mut self, dev: &GpuDevice) -> Result<()> {
        dev.stream.memset_zeros(&mut self.status).map_err(cuda_err("clearing the step status"))
    }

    /// The loss of readout `y` against `labels` (summed over the rows in f64) and the predicted
    /// classes, synchronously; ∂L/∂y is left in `self.dy`.
    pub fn compute(&mut self, dev: &GpuDevice, loss: Loss, y: &CudaView<f32>, labels: &[u8]) -> Result<(f64, Vec<usize>)> {
        self.stage_labels(dev, labels)?;
        self.enqueue(dev, loss, y, false)?;
        self.enqueue_readback(dev)?;
        let r = self.results()?;
        Ok((r.row_loss.iter().map(|&x| x as f64).sum(), r.pred.iter().map(|&p| p as usize).collect()))
    }

    /// Predicted classes only (no labels): argmax of each row, computed on the host from the
    /// B×K readout (tiny), ties to the lowest index as the CPU engine.
    pub fn predict(dev: &GpuDevice, y: &CudaView<f32>, classes: usize) -> Result<Vec<usize>> {
        let host = dev.stream.clone_dtoh(y).map_err(cuda_err("reading the readout"))?;
        Ok(crate::cpu::loss::argmax_rows(&host, classes))
    }
}
